//! Glue between instances and the eBPF data plane (`corral-ebpf`): which
//! numbers stand for tenants and instances in the kernel's maps, and what an
//! instance's arrival and departure write there.
//!
//! - A tenant's number is the FNV-1a hash of its id (0 mapped to 1), so every
//!   cell computes the same number without coordination. Two tenants whose
//!   ids hash alike would share isolation; the brain, which knows every
//!   tenant, is where such a collision gets refused.
//! - An instance's number is its IPv4 address as a `u32`: unique in the
//!   cluster while the instance lives (cells own disjoint subnets) and never
//!   0. Its counters are removed when it leaves.

// corral_ebpf::Error carries aya's errors by value; every use here is a cold
// path (start-up, instance start/stop), so its size does not matter.
#![allow(clippy::result_large_err)]

use super::Attachment;
use corral_ebpf::{
    AppNum, Counters, Dataplane, Endpoint, InstanceIface, InstanceNum, Policy, Protocol, TenantNum,
};
use corral_proto::policy::{PolicyRule, Protocol as WireProtocol};
use corral_proto::wire::Endpoints;
use corral_proto::{AppId, CellId, TenantId};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

const TENANT_ONE: TenantNum = match TenantNum::new(1) {
    Some(n) => n,
    None => panic!("1 is a valid tenant number"),
};
const INSTANCE_ONE: InstanceNum = match InstanceNum::new(1) {
    Some(n) => n,
    None => panic!("1 is a valid instance number"),
};

/// 32-bit FNV-1a: numbers every cell derives alike, with no coordination.
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    bytes.into_iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

pub fn tenant_num(t: &TenantId) -> TenantNum {
    TenantNum::new(fnv1a(t.as_str().bytes())).unwrap_or(TENANT_ONE)
}

const APP_ONE: AppNum = match AppNum::new(1) {
    Some(n) => n,
    None => panic!("1 is a valid app number"),
};

/// An app's number: FNV-1a of "tenant/app" (app names are per tenant).
pub fn app_num(t: &TenantId, a: &AppId) -> AppNum {
    let bytes = t.as_str().bytes().chain([b'/']).chain(a.as_str().bytes());
    AppNum::new(fnv1a(bytes)).unwrap_or(APP_ONE)
}

pub fn instance_num(addr: Ipv4Addr) -> InstanceNum {
    InstanceNum::new(u32::from(addr)).unwrap_or(INSTANCE_ONE)
}

/// The loaded data plane plus the tenant and app names behind its numbers.
pub struct Plane {
    dp: Mutex<Dataplane>,
    tenants: Mutex<BTreeMap<TenantNum, TenantId>>,
    apps: Mutex<BTreeMap<AppNum, AppId>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Plane {
    /// Loads the programs, re-using the maps pinned in `pin_dir` by a previous run.
    pub fn load(pin_dir: &Path) -> Result<Self, corral_ebpf::Error> {
        let dp = Dataplane::load(pin_dir)?;
        if dp.restored() {
            tracing::info!(pins = %pin_dir.display(), "data plane maps restored from pins");
        }
        Ok(Self {
            dp: Mutex::new(dp),
            tenants: Mutex::new(BTreeMap::new()),
            apps: Mutex::new(BTreeMap::new()),
        })
    }

    /// An ifindex for a new instance's host veth, in a free slot of the
    /// data plane (see [`corral_ebpf::Dataplane::reserve_ifindex`]); give it
    /// back with [`Plane::unreserve`] if the instance is not added.
    pub fn reserve_ifindex(&self) -> Result<u32, corral_ebpf::Error> {
        lock(&self.dp).reserve_ifindex()
    }

    pub fn unreserve(&self, ifindex: u32) {
        lock(&self.dp).unreserve(ifindex);
    }

    /// Enforces and meters an instance's traffic: its interface entry (set
    /// before attaching: the programs fail closed), its endpoint, the filters.
    pub fn add(
        &self,
        att: &Attachment,
        tenant: &TenantId,
        app: &AppId,
    ) -> Result<(), corral_ebpf::Error> {
        let t = self.remember_tenant(tenant);
        let a = self.remember_app(tenant, app);
        let i = instance_num(att.address);
        let mut dp = lock(&self.dp);
        dp.set_interface(
            att.host_ifindex,
            &InstanceIface {
                addr: att.address,
                tenant: t,
                instance: i,
                app: a,
            },
        )?;
        dp.set_endpoint(
            att.address,
            &Endpoint {
                tenant: t,
                instance: i,
                app: a,
            },
        )?;
        dp.attach(&att.host_if)?;
        Ok(())
    }

    /// Removes an instance's entries; its counters are folded into its
    /// tenant's. Idempotent; the filters go with the veth.
    pub fn remove(&self, att: &Attachment) {
        let mut dp = lock(&self.dp);
        let i = instance_num(att.address);
        // Only the endpoint still owned by this instance (an address can be
        // handed out again only after this runs, but stay careful).
        if dp
            .endpoint(att.address)
            .ok()
            .flatten()
            .is_some_and(|e| e.instance == i)
        {
            if let Err(e) = dp.remove_endpoint(att.address) {
                tracing::warn!("removing endpoint {}: {e}", att.address);
            }
        }
        if att.host_ifindex != 0 {
            if let Err(e) = dp.remove_interface(att.host_ifindex) {
                tracing::warn!("removing interface {}: {e}", att.host_ifindex);
            }
        }
    }

    /// Proves the data plane is reachable (the watchdog's check): one map
    /// lookup, and its pins still in bpffs (without them a restarted agent
    /// would lose the maps that keep traffic flowing).
    pub fn probe(&self) -> Result<(), String> {
        let dp = lock(&self.dp);
        dp.endpoint(Ipv4Addr::UNSPECIFIED)
            .map_err(|e| format!("reading the endpoint map: {e}"))?;
        if !dp.pin_dir().is_dir() {
            return Err(format!("its pins in {} are gone", dp.pin_dir().display()));
        }
        Ok(())
    }

    pub fn counters(&self) -> Option<Counters> {
        lock(&self.dp)
            .counters()
            .map_err(|e| tracing::warn!("reading counters: {e}"))
            .ok()
    }

    /// The tenant's id if an instance of it was seen, else its number.
    pub fn tenant_name(&self, n: TenantNum) -> String {
        lock(&self.tenants)
            .get(&n)
            .map_or_else(|| format!("#{n}"), ToString::to_string)
    }

    /// What the maps hold, for operators (`GET /v1/dataplane`).
    pub fn dump(&self) -> Result<serde_json::Value, corral_ebpf::Error> {
        let dp = lock(&self.dp);
        let endpoints: Vec<_> = dp
            .endpoints()?
            .into_iter()
            .map(|(a, e)| serde_json::json!({"address": a, "tenant": self.tenant_name(e.tenant), "instance": e.instance.get()}))
            .collect();
        let interfaces: Vec<_> = dp
            .interfaces()?
            .into_iter()
            .map(|(i, f)| serde_json::json!({"ifindex": i, "address": f.addr, "tenant": self.tenant_name(f.tenant)}))
            .collect();
        Ok(serde_json::json!({
            "pin_dir": dp.pin_dir(),
            "endpoints": endpoints,
            "interfaces": interfaces,
            "policies": dp.policies()?.len(),
            "conntrack_entries": dp.conntrack_len()?,
        }))
    }

    pub fn set_policy(&self, p: &Policy) -> Result<(), corral_ebpf::Error> {
        lock(&self.dp).set_policy(p)
    }

    pub fn remove_policy(&self, p: &Policy) -> Result<bool, corral_ebpf::Error> {
        lock(&self.dp).remove_policy(p)
    }

    pub fn policies(&self) -> Result<Vec<Policy>, corral_ebpf::Error> {
        lock(&self.dp).policies()
    }

    /// Applies the brain's changes to the cluster-wide endpoint map. Local
    /// instances' endpoints are this agent's own (written by [`Plane::add`])
    /// and never touched here; `reset` removes every other endpoint first,
    /// which also clears what a previous agent process learnt. Returns how
    /// many entries were written and removed.
    pub fn apply_endpoints(
        &self,
        update: &Endpoints,
        own_cell: &CellId,
    ) -> Result<(usize, usize), corral_ebpf::Error> {
        let mut dp = lock(&self.dp);
        let local: std::collections::BTreeSet<Ipv4Addr> =
            dp.interfaces()?.into_iter().map(|(_, f)| f.addr).collect();
        let mut removed = 0;
        if update.reset {
            for (addr, _) in dp.endpoints()? {
                if !local.contains(&addr) && dp.remove_endpoint(addr)? {
                    removed += 1;
                }
            }
        }
        for addr in &update.remove {
            if !local.contains(addr) && dp.remove_endpoint(*addr)? {
                removed += 1;
            }
        }
        let mut written = 0;
        for e in &update.upsert {
            if &e.cell == own_cell || local.contains(&e.addr) {
                continue;
            }
            let tenant = self.remember_tenant(&e.tenant);
            let app = self.remember_app(&e.tenant, &e.app);
            dp.set_endpoint(
                e.addr,
                &Endpoint {
                    tenant,
                    instance: instance_num(e.addr),
                    app,
                },
            )?;
            written += 1;
        }
        Ok((written, removed))
    }

    /// Makes the policy map hold exactly `rules` (the brain's whole set).
    /// Returns how many were added and removed.
    pub fn replace_policies(
        &self,
        rules: &[PolicyRule],
    ) -> Result<(usize, usize), corral_ebpf::Error> {
        let want: Vec<Policy> = rules
            .iter()
            .map(|r| Policy {
                from: self.remember_tenant(&r.from),
                to: self.remember_tenant(&r.to),
                app: r.app.as_ref().map(|a| self.remember_app(&r.to, a)),
                protocol: match r.protocol {
                    WireProtocol::Any => Protocol::Any,
                    WireProtocol::Icmp => Protocol::Icmp,
                    WireProtocol::Tcp => Protocol::Tcp,
                    WireProtocol::Udp => Protocol::Udp,
                    WireProtocol::Sctp => Protocol::Sctp,
                },
                port: r.port,
            })
            .collect();
        let mut dp = lock(&self.dp);
        let have = dp.policies()?;
        let mut removed = 0;
        for p in have.iter().filter(|p| !want.contains(p)) {
            if dp.remove_policy(p)? {
                removed += 1;
            }
        }
        let mut added = 0;
        for p in want.iter().filter(|p| !have.contains(p)) {
            dp.set_policy(p)?;
            added += 1;
        }
        Ok((added, removed))
    }

    pub fn remember_tenant(&self, t: &TenantId) -> TenantNum {
        let n = tenant_num(t);
        lock(&self.tenants).insert(n, t.clone());
        n
    }

    pub fn remember_app(&self, t: &TenantId, a: &AppId) -> AppNum {
        let n = app_num(t, a);
        lock(&self.apps).insert(n, a.clone());
        n
    }

    /// The app's name if an instance or policy of it was seen, else its number.
    pub fn app_name(&self, n: AppNum) -> String {
        lock(&self.apps)
            .get(&n)
            .map_or_else(|| format!("#{n}"), ToString::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_stable_and_non_zero() {
        let a = tenant_num(&TenantId::new("acme").unwrap());
        assert_eq!(a, tenant_num(&TenantId::new("acme").unwrap()));
        assert_ne!(a, tenant_num(&TenantId::new("globex").unwrap()));
        assert_eq!(
            instance_num(Ipv4Addr::new(10, 244, 1, 2)).get(),
            0x0af4_0102
        );
    }
}
