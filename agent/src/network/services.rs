//! The cell's service load balancer: the brain's [`Service`]s (VIP, ports,
//! ready instances) turned into the socket-level balancer's maps
//! (`corral_ebpf::lb`), through `corral_router`'s table and plan.
//!
//! ```text
//!  Services (brain) ─▶ known services ─▶ router::ServiceTable ─▶ plan ─▶ Balancer::apply
//! ```
//!
//! - Every port of a service is one router service `VIP:port/proto`, with
//!   a backend `instance:port` per ready instance (the service port is the
//!   port the instances listen on).
//! - The maps outlive the agent (they are pinned, and so are the links on
//!   the instances' cgroup2 directory): a restarted agent reads them back
//!   and adopts their ids, so the brain's full set, once it arrives,
//!   plans no change for what did not change. Until the brain has sent
//!   that set the maps are left as they are, so connections to VIPs keep
//!   working while no brain is reachable.
//! - A service the table refuses (a limit reached) is logged and counted,
//!   and the others are programmed: one bad service never blocks the rest.

// corral_ebpf::Error carries aya's errors by value; these are cold paths.
#![allow(clippy::result_large_err)]

use corral_ebpf::lb::Balancer;
use corral_proto::service::{Service, Transport};
use corral_proto::wire::Services;
use corral_router::{
    plan, Backend, BackendAddr, Limits, Programmed, Protocol, ServiceKey, ServiceOwner,
    ServiceSpec, ServiceTable, Weight,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The router services of one brain service (pure).
pub fn router_services(s: &Service) -> Vec<(ServiceKey, ServiceSpec)> {
    s.ports
        .iter()
        .map(|p| {
            let key = ServiceKey {
                vip: s.vip,
                port: p.port,
                protocol: match p.protocol {
                    Transport::Tcp => Protocol::Tcp,
                    Transport::Udp => Protocol::Udp,
                },
            };
            let spec = ServiceSpec {
                owner: ServiceOwner {
                    tenant: s.tenant.clone(),
                    app: s.app.clone(),
                },
                published: false,
                backends: s
                    .backends
                    .iter()
                    .map(|&addr| Backend {
                        addr: BackendAddr { addr, port: p.port },
                        weight: Weight::ONE,
                        ready: true,
                    })
                    .collect(),
            };
            (key, spec)
        })
        .collect()
}

/// What one update changed, for logs and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Map operations carried out.
    pub ops: usize,
    /// Services the table refused, with why.
    pub refused: Vec<String>,
}

struct Inner {
    balancer: Balancer,
    table: ServiceTable,
    programmed: Programmed,
    /// The brain's services, by VIP.
    known: BTreeMap<Ipv4Addr, Service>,
    /// Whether the brain's full set has arrived since this agent started.
    synced: bool,
}

/// The loaded balancer and its bookkeeping.
pub struct Lb {
    inner: Mutex<Inner>,
}

impl Lb {
    /// Loads the balancer's programs and maps (re-using pins in `pin_dir`)
    /// and adopts what an earlier run programmed.
    pub fn load(pin_dir: &Path) -> Result<Lb, String> {
        let balancer = Balancer::load(pin_dir).map_err(|e| format!("loading the balancer: {e}"))?;
        let mut programmed = Programmed::new();
        for op in balancer.dump().map_err(|e| e.to_string())? {
            // An entry that does not fit the model (a dangling reference
            // left by a crash mid-plan) is left for the next plan to fix.
            if let Err(e) = programmed.apply(&op) {
                tracing::warn!("ignoring a load-balancer map entry: {e}");
            }
        }
        let table = ServiceTable::adopt(Limits::default(), &programmed)
            .map_err(|e| format!("adopting the load-balancer maps: {e}"))?;
        if !programmed.services().is_empty() {
            tracing::info!(
                services = programmed.services().len(),
                backends = programmed.backends().len(),
                "load-balancer maps restored from pins"
            );
        }
        Ok(Lb {
            inner: Mutex::new(Inner {
                balancer,
                table,
                programmed,
                known: BTreeMap::new(),
                synced: false,
            }),
        })
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches the programs to the cgroup2 directory holding the
    /// instances (links pinned by an earlier run are kept).
    pub fn attach(&self, cgroup2: &Path) -> Result<usize, String> {
        self.inner()
            .balancer
            .attach(cgroup2)
            .map_err(|e| format!("attaching the balancer to {}: {e}", cgroup2.display()))
    }

    /// Services programmed and backend addresses in use.
    pub fn counts(&self) -> (usize, usize) {
        let i = self.inner();
        (i.programmed.services().len(), i.programmed.backends().len())
    }

    /// Applies one message of the brain's services.
    pub fn apply(&self, update: &Services) -> Result<Applied, String> {
        let mut i = self.inner();
        if update.reset {
            i.known.clear();
            i.synced = true;
        }
        for s in &update.remove {
            i.known.remove(s);
        }
        let mut applied = Applied::default();
        for s in &update.upsert {
            let problems = s.check();
            if problems.is_empty() {
                i.known.insert(s.vip, s.clone());
            } else {
                applied.refused.push(format!(
                    "service {} ({}/{}): {}",
                    s.vip,
                    s.tenant,
                    s.app,
                    problems.join("; ")
                ));
            }
        }
        if !i.synced {
            return Ok(applied);
        }
        let want: BTreeMap<ServiceKey, ServiceSpec> =
            i.known.values().flat_map(router_services).collect();
        let Inner {
            balancer,
            table,
            programmed,
            ..
        } = &mut *i;
        let stale: Vec<ServiceKey> = table
            .desired()
            .services()
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            let _ = table.remove(&k);
        }
        for (key, spec) in want {
            if let Err(e) = table.upsert(key, spec) {
                applied.refused.push(format!("service {key}: {e}"));
            }
        }
        let ops = plan(programmed, &table.desired());
        for op in &ops {
            balancer.apply(op).map_err(|e| e.to_string())?;
            programmed
                .apply(op)
                .map_err(|e| format!("load-balancer model: {e}"))?;
            applied.ops += 1;
        }
        table.release(programmed);
        Ok(applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::service::PortSpec;
    use corral_proto::{AppId, TenantId};

    #[test]
    fn every_port_is_a_service_over_every_backend() {
        let s = Service {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            tenant: TenantId::new("acme").unwrap(),
            app: AppId::new("web").unwrap(),
            ports: vec![
                PortSpec::tcp(8080),
                PortSpec {
                    port: 53,
                    protocol: Transport::Udp,
                    published: None,
                },
            ],
            backends: vec![Ipv4Addr::new(10, 244, 1, 2), Ipv4Addr::new(10, 244, 2, 2)],
        };
        let r = router_services(&s);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0.to_string(), "10.96.0.1:8080/tcp");
        assert_eq!(r[1].0.to_string(), "10.96.0.1:53/udp");
        let b: Vec<String> = r[1].1.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(b, ["10.244.1.2:53", "10.244.2.2:53"]);
        assert!(r
            .iter()
            .all(|(_, s)| !s.published && s.backends.iter().all(|b| b.ready)));
    }
}
