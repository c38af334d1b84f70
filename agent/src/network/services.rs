//! The cell's service load balancer: the brain's [`Service`]s (VIP, ports,
//! ready instances) turned into the socket-level balancer's maps
//! (`corral_ebpf::lb`), through `corral_router`'s table and plan.
//!
//! ```text
//!  Services (brain) ─▶ known services ─▶ router::ServiceTable ─▶ plan_changes ─▶ Balancer::apply
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
use corral_ebpf::nodeport::NodePort;
use corral_proto::service::{Service, Transport};
use corral_proto::wire::Services;
use corral_router::{
    plan_changes, Backend, BackendAddr, Limits, Programmed, Protocol, ServiceKey, ServiceOwner,
    ServiceSpec, ServiceTable, Weight,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The router services of one brain service (pure): `VIP:port/proto` for
/// every port, and, when this cell balances published ports
/// (`north_south`), `0.0.0.0:published/proto` (published, with a Maglev
/// ring: "any address of this node") for every published one.
pub fn router_services(s: &Service, north_south: bool) -> Vec<(ServiceKey, ServiceSpec)> {
    let mut out = Vec::new();
    for p in &s.ports {
        let protocol = match p.protocol {
            Transport::Tcp => Protocol::Tcp,
            Transport::Udp => Protocol::Udp,
        };
        let spec = |published: bool| ServiceSpec {
            owner: ServiceOwner {
                tenant: s.tenant.clone(),
                app: s.app.clone(),
            },
            published,
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
        let key = |vip, port| ServiceKey {
            vip,
            port,
            protocol,
        };
        out.push((key(s.vip, p.port), spec(false)));
        if let (true, Some(published)) = (north_south, p.published) {
            out.push((key(Ipv4Addr::UNSPECIFIED, published), spec(true)));
        }
    }
    out
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
    /// The north-south balancer on the uplinks, when configured.
    nodeport: Option<NodePort>,
    /// VIPs with a router service the table refused (a limit reached).
    refused: BTreeSet<Ipv4Addr>,
    /// Every known service must be told to the table again (north-south
    /// was enabled: published ports become services of their own).
    resync: bool,
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
                nodeport: None,
                refused: BTreeSet::new(),
                resync: false,
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

    /// Balances the published ports of services on `uplinks`, for traffic
    /// to `node_addresses`; backends in `subnet` are this cell's. The
    /// programs share the balancer's pinned maps and stay attached after
    /// the agent exits.
    pub fn enable_north_south(
        &self,
        pin_dir: &Path,
        uplinks: &[String],
        node_addresses: &[Ipv4Addr],
        subnet: (Ipv4Addr, u8),
    ) -> Result<(), String> {
        let mut np = NodePort::load(pin_dir)
            .map_err(|e| format!("loading the north-south balancer: {e}"))?;
        np.set_node_addresses(node_addresses)
            .and_then(|()| np.set_cell_subnet(subnet.0, subnet.1))
            .map_err(|e| format!("configuring the north-south balancer: {e}"))?;
        for u in uplinks {
            np.attach(u)
                .map_err(|e| format!("attaching the north-south balancer to uplink {u:?}: {e}"))?;
        }
        let mut i = self.inner();
        i.nodeport = Some(np);
        i.resync = true;
        Ok(())
    }

    /// The other cells' node addresses (the gateways of the routes to
    /// their subnets): the nodes that may forward published-port flows to
    /// this one, and to which this one forwards. No-op without north-south.
    pub fn set_peers(&self, peers: &[Ipv4Addr]) -> Result<(), String> {
        let mut i = self.inner();
        match i.nodeport.as_mut() {
            Some(np) => np
                .set_peer_addresses(peers)
                .map_err(|e| format!("setting the north-south peers: {e}")),
            None => Ok(()),
        }
    }

    /// North-south packets by verdict, when it is enabled.
    pub fn north_south_counters(&self) -> Option<Vec<(&'static str, u64, u64)>> {
        let i = self.inner();
        let np = i.nodeport.as_ref()?;
        let counters = np.counters().ok()?;
        Some(
            counters
                .into_iter()
                .map(|(v, c)| (v.name(), c.packets, c.bytes))
                .collect(),
        )
    }

    /// Services programmed and backend addresses in use.
    pub fn counts(&self) -> (usize, usize) {
        let i = self.inner();
        (i.programmed.services().len(), i.programmed.backends().len())
    }

    /// Applies one message of the brain's services: only the services it
    /// names (and those refused earlier, which may fit now) are told to
    /// the table, and only what changed is planned, so a message about one
    /// service costs the same among 10 or 10,000. A full set (`reset`)
    /// compares everything.
    pub fn apply(&self, update: &Services) -> Result<Applied, String> {
        let mut i = self.inner();
        let Inner {
            balancer,
            table,
            programmed,
            known,
            synced,
            refused,
            resync,
            nodeport,
        } = &mut *i;
        let north_south = nodeport.is_some();
        let mut applied = Applied::default();
        // VIPs whose router services may have changed, with what the
        // table was told for them before this message.
        let mut changed: BTreeMap<Ipv4Addr, Option<Service>> = BTreeMap::new();
        let reset = update.reset;
        if reset {
            known.clear();
            refused.clear();
            *synced = true;
        }
        for vip in &update.remove {
            let old = known.remove(vip);
            changed.entry(*vip).or_insert(old);
        }
        for s in &update.upsert {
            let problems = s.check();
            if problems.is_empty() {
                let old = known.insert(s.vip, s.clone());
                changed.entry(s.vip).or_insert(old);
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
        if !*synced {
            return Ok(applied);
        }
        if reset || std::mem::take(resync) {
            // Everything: what the table holds and the brain no longer
            // has goes, whatever this agent was told before.
            let want: BTreeSet<ServiceKey> = known
                .values()
                .flat_map(|s| router_services(s, north_south))
                .map(|(k, _)| k)
                .collect();
            let stale: Vec<ServiceKey> = table
                .keys()
                .filter(|k| !want.contains(k))
                .copied()
                .collect();
            for k in stale {
                let _ = table.remove(&k);
            }
            for (vip, s) in known.iter() {
                let change = (None, Some(s));
                update_vip(table, *vip, change, north_south, refused, &mut applied);
            }
        } else {
            // Refused before: there may be room now.
            for vip in refused.clone() {
                changed.entry(vip).or_insert(None);
            }
            for (vip, old) in &changed {
                let change = (old.as_ref(), known.get(vip));
                update_vip(table, *vip, change, north_south, refused, &mut applied);
            }
        }
        let ops = plan_changes(programmed, table);
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

/// Tells the table what one brain service (at `vip`) now is, `(old,
/// new)`: its router services upserted, those of `old` it no longer has
/// removed. Pure: no kernel. A refusal is recorded in `refused` (retried
/// with the next message) and `applied`.
fn update_vip(
    table: &mut ServiceTable,
    vip: Ipv4Addr,
    (old, new): (Option<&Service>, Option<&Service>),
    north_south: bool,
    refused: &mut BTreeSet<Ipv4Addr>,
    applied: &mut Applied,
) {
    let services = |s: &Service| router_services(s, north_south);
    let want: BTreeMap<ServiceKey, ServiceSpec> =
        new.map(services).unwrap_or_default().into_iter().collect();
    for (key, _) in old.map(services).unwrap_or_default() {
        if !want.contains_key(&key) {
            let _ = table.remove(&key);
        }
    }
    refused.remove(&vip);
    for (key, spec) in want {
        if let Err(e) = table.upsert(key, spec) {
            applied.refused.push(format!("service {key}: {e}"));
            refused.insert(vip);
        }
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
        assert_eq!(router_services(&s, true).len(), 2, "nothing published");
        let r = router_services(&s, false);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].0.to_string(), "10.96.0.1:8080/tcp");
        assert_eq!(r[1].0.to_string(), "10.96.0.1:53/udp");
        let b: Vec<String> = r[1].1.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(b, ["10.244.1.2:53", "10.244.2.2:53"]);
        assert!(r
            .iter()
            .all(|(_, s)| !s.published && s.backends.iter().all(|b| b.ready)));
    }

    #[test]
    fn a_service_update_changes_only_its_own_router_services() {
        let web = |ports: Vec<PortSpec>, last: u8| Service {
            vip: Ipv4Addr::new(10, 96, 0, 1),
            tenant: TenantId::new("acme").unwrap(),
            app: AppId::new("web").unwrap(),
            ports,
            backends: vec![Ipv4Addr::new(10, 244, 1, last)],
        };
        let limits = Limits {
            max_services: 2,
            max_published_services: 0,
            ..Limits::default()
        };
        let mut table = ServiceTable::new(limits).unwrap();
        let mut programmed = Programmed::new();
        let mut refused = BTreeSet::new();
        let mut applied = Applied::default();
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        let three = web(
            vec![PortSpec::tcp(80), PortSpec::tcp(81), PortSpec::tcp(82)],
            2,
        );
        update_vip(
            &mut table,
            vip,
            (None, Some(&three)),
            false,
            &mut refused,
            &mut applied,
        );
        // Two ports fit, the third is refused and remembered for a retry.
        assert_eq!(table.len(), 2);
        assert_eq!(applied.refused.len(), 1);
        assert!(refused.contains(&vip));
        for op in plan_changes(&programmed, &table) {
            programmed.apply(&op).unwrap();
        }
        table.release(&programmed);

        // Port 80 goes, the backend moves: port 82 fits now, 80's id is
        // still held by the maps, so 82 waits for the next retry.
        let two = web(vec![PortSpec::tcp(81), PortSpec::tcp(82)], 3);
        let mut applied = Applied::default();
        update_vip(
            &mut table,
            vip,
            (Some(&three), Some(&two)),
            false,
            &mut refused,
            &mut applied,
        );
        let keys: Vec<String> = table.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["10.96.0.1:81/tcp"]);
        assert!(refused.contains(&vip));
        let ops = plan_changes(&programmed, &table);
        for op in &ops {
            programmed.apply(op).unwrap();
        }
        table.release(&programmed);
        let mut applied = Applied::default();
        update_vip(
            &mut table,
            vip,
            (None, Some(&two)),
            false,
            &mut refused,
            &mut applied,
        );
        let keys: Vec<String> = table.keys().map(|k| k.to_string()).collect();
        assert_eq!(keys, ["10.96.0.1:81/tcp", "10.96.0.1:82/tcp"]);
        assert!(refused.is_empty() && applied.refused.is_empty());
    }
}
