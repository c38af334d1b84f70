//! The service table: what the cell should load-balance, with the ids the
//! maps use, checked against explicit capacity limits.
//!
//! A service is keyed by `(VIP, port, protocol)` and belongs to an app of a
//! tenant. Its backends are `(address, port)` pairs with a weight and a
//! ready flag; only ready backends receive traffic. The table gives each
//! service and each distinct backend address a small id (see
//! the crate docs); a backend listed by several services has one id.
//!
//! Every change is checked completely before anything changes: a change
//! that does not fit (too many services, backends, or backends for one
//! service) or is malformed returns an [`Error`] and leaves the table, and
//! so every other service, exactly as it was.
//!
//! Capacity counts ids that are pending release (removed from the table,
//! maybe still in the maps), and a backend gets its id when it is listed,
//! ready or not. Two consequences an operator can rely on: with the kernel
//! maps sized to the same [`Limits`], applying a plan never meets a full
//! map; and a readiness change (health checks flip these all the time)
//! never fails for lack of room.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::num::NonZeroU32;
use std::sync::Arc;

use corral_proto::{AppId, TenantId};

use crate::ids::{BackendId, IdPool, ServiceId};
use crate::maglev::{self, MaglevError, Weight};
use crate::plan::{Desired, DesiredService, Programmed};

/// The size of the backend array of a service entry in the maps
/// (`CORRAL_LB_MAX_BACKENDS_PER_SERVICE`); [`Limits::max_backends_per_service`]
/// cannot exceed it. It is also the resolution of weights for east-west
/// traffic (see [`DesiredService::backends`]).
pub const MAX_BACKENDS_PER_SERVICE: u32 = 256;

/// The transport protocol of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP (`IPPROTO_TCP`, 6).
    Tcp,
    /// UDP (`IPPROTO_UDP`, 17).
    Udp,
}

impl Protocol {
    /// The `IPPROTO_*` number, as stored in the service key.
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// The protocol of an `IPPROTO_*` number, `None` if unsupported.
    pub const fn from_number(n: u8) -> Option<Protocol> {
        match n {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// What identifies a service in the data plane: the destination a client
/// uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The virtual IP.
    pub vip: Ipv4Addr,
    /// The service port (host byte order).
    pub port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.vip, self.port, self.protocol)
    }
}

/// A backend's address: its stable identity. Its id and its Maglev
/// preference list are derived from it, never from its position in a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    /// The instance's address.
    pub addr: Ipv4Addr,
    /// The port the instance listens on (host byte order).
    pub port: u16,
}

impl BackendAddr {
    /// The key Maglev hashes: address and port packed into 48 bits.
    pub fn maglev_key(self) -> u64 {
        (u64::from(u32::from(self.addr)) << 16) | u64::from(self.port)
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

/// One backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Where it listens.
    pub addr: BackendAddr,
    /// Its relative share of new connections.
    pub weight: Weight,
    /// Whether it passes its health checks; only ready backends get traffic.
    pub ready: bool,
}

/// Whom a service belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceOwner {
    /// The tenant owning the app.
    pub tenant: TenantId,
    /// The app the backends are instances of.
    pub app: AppId,
}

/// Everything the table is told about a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Whom it belongs to.
    pub owner: ServiceOwner,
    /// Whether it is reachable from outside the cluster (north-south): only
    /// published services get a Maglev ring.
    pub published: bool,
    /// Its backends, in any order; each address at most once.
    pub backends: Vec<Backend>,
}

/// Capacity limits. They must equal the `max_entries` of the kernel maps
/// (see the crate docs), which is what makes "map full" impossible at apply
/// time: it is refused here instead, with an [`Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Services (entries of `lb_services`, lists of `lb_slots`). Default
    /// 16,384.
    pub max_services: u32,
    /// Distinct backend addresses (entries of `lb_backends`). Default 65,536.
    pub max_backends: u32,
    /// Backends listed by one service, ready or not. Default and maximum
    /// [`MAX_BACKENDS_PER_SERVICE`].
    pub max_backends_per_service: u32,
    /// Published services, i.e. Maglev rings: a guard on memory, since each
    /// ring is `M × 4` bytes (64 KiB at the default size) in the kernel and
    /// again in the agent. At most `max_services`. Default 1,024.
    pub max_published_services: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_services: 16_384,
            max_backends: 65_536,
            max_backends_per_service: MAX_BACKENDS_PER_SERVICE,
            max_published_services: 1_024,
        }
    }
}

/// Why the table refused a change. The table is unchanged after any error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The limits themselves are unusable.
    #[error("invalid router limits: {reason}")]
    InvalidLimits {
        /// What is wrong.
        reason: String,
    },
    /// The service key cannot be load-balanced.
    #[error("invalid service {key}: {reason}")]
    InvalidService {
        /// The service.
        key: ServiceKey,
        /// What is wrong.
        reason: &'static str,
    },
    /// A backend address cannot receive traffic.
    #[error("invalid backend {backend} of service {key}: {reason}")]
    InvalidBackend {
        /// The service.
        key: ServiceKey,
        /// The backend.
        backend: BackendAddr,
        /// What is wrong.
        reason: &'static str,
    },
    /// The same address was listed twice for one service.
    #[error("backend {backend} is listed twice for service {key}")]
    DuplicateBackend {
        /// The service.
        key: ServiceKey,
        /// The repeated backend.
        backend: BackendAddr,
    },
    /// No such service in the table.
    #[error("no service {key}")]
    UnknownService {
        /// The service asked for.
        key: ServiceKey,
    },
    /// No such backend in the service.
    #[error("service {key} has no backend {backend}")]
    UnknownBackend {
        /// The service.
        key: ServiceKey,
        /// The backend asked for.
        backend: BackendAddr,
    },
    /// The service table is full.
    #[error(
        "cannot add service {key}: service table full ({limit} ids, {pending} of them \
         waiting for their removal to be programmed); remove services or raise max_services"
    )]
    ServicesFull {
        /// The service that did not fit.
        key: ServiceKey,
        /// `max_services`.
        limit: u32,
        /// Ids of removed services the maps may still hold.
        pending: u32,
    },
    /// Publishing the service would exceed `max_published_services`.
    #[error(
        "cannot publish service {key}: {limit} services are published already \
         (max_published_services); unpublish one or raise the limit"
    )]
    PublishedFull {
        /// The service.
        key: ServiceKey,
        /// `max_published_services`.
        limit: u32,
    },
    /// The backend table cannot take the new backend addresses.
    #[error(
        "cannot update service {key}: it needs {needed} new backend ids but only {available} \
         of {limit} are free ({pending} waiting for their removal to be programmed); \
         raise max_backends"
    )]
    BackendsFull {
        /// The service whose change did not fit.
        key: ServiceKey,
        /// New backend addresses the change needs ids for.
        needed: u32,
        /// Ids free now.
        available: u32,
        /// `max_backends`.
        limit: u32,
        /// Ids of removed backends the maps may still hold.
        pending: u32,
    },
    /// One service lists more backends than a service entry holds.
    #[error(
        "service {key} lists {requested} backends, more than the limit of {limit} per service"
    )]
    TooManyBackendsForService {
        /// The service.
        key: ServiceKey,
        /// Backends listed.
        requested: usize,
        /// `max_backends_per_service`.
        limit: u32,
    },
    /// Rebuilding the table from the maps found what these limits cannot
    /// hold.
    #[error("cannot adopt the programmed maps: {reason}")]
    Adopt {
        /// What does not fit.
        reason: String,
    },
    /// A Maglev table could not be built (a bug: inputs are checked first).
    #[error("maglev table for service {key}")]
    Maglev {
        /// The service.
        key: ServiceKey,
        /// The cause.
        #[source]
        source: MaglevError,
    },
}

/// A service as the table holds it.
#[derive(Debug, Clone)]
struct Service {
    id: ServiceId,
    owner: ServiceOwner,
    published: bool,
    /// Sorted by address.
    backends: Vec<Backend>,
    /// Derived: what the maps should hold for it.
    programmed: DesiredService,
}

/// A backend address with its id, and how many services list it.
#[derive(Debug, Clone, Copy)]
struct BackendSlot {
    id: BackendId,
    refs: u32,
}

/// The services of a cell and the ids they use; see the module docs.
#[derive(Debug, Clone)]
pub struct ServiceTable {
    limits: Limits,
    services: BTreeMap<ServiceKey, Service>,
    backends: BTreeMap<BackendAddr, BackendSlot>,
    service_ids: IdPool,
    backend_ids: IdPool,
    /// Removed, with ids pending release; a key that comes back before the
    /// release gets its old id again (its entries may still be in the maps).
    retired_services: BTreeMap<ServiceKey, ServiceId>,
    retired_backends: BTreeMap<BackendAddr, BackendId>,
    /// How many services are published (so publishing one counts nothing).
    published: usize,
    /// What may differ between the maps and the table, so that
    /// [`plan_changes`](crate::plan_changes) need not look at the rest.
    changes: Changes,
}

/// What changed since the maps last matched the table, per service key,
/// backend id and ring owner. Everything *not* listed here is programmed
/// as the table wants it: a new table starts with empty maps and nothing
/// listed, an adopted one lists everything the adopted maps hold. An entry
/// leaves the list only when [`ServiceTable::release`] sees maps that
/// match it, so a plan cut short is finished by the next one.
#[derive(Debug, Clone, Default)]
struct Changes {
    /// Keys upserted (with a difference) or removed.
    services: BTreeSet<ServiceKey>,
    /// Backend ids given, revived or retired, with the address they stood
    /// for last.
    backends: BTreeMap<BackendId, BackendAddr>,
    /// Service ids whose rings no entry may point to (found in adopted
    /// maps without their service entry).
    rings: BTreeSet<ServiceId>,
}

impl ServiceTable {
    /// An empty table.
    pub fn new(limits: Limits) -> Result<ServiceTable, Error> {
        check_limits(&limits)?;
        Ok(ServiceTable {
            limits,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_ids: IdPool::new(limits.max_services),
            backend_ids: IdPool::new(limits.max_backends),
            retired_services: BTreeMap::new(),
            retired_backends: BTreeMap::new(),
            published: 0,
            changes: Changes::default(),
        })
    }

    /// An empty table that knows the ids already in the maps (read back
    /// after an agent restart): they are pending, and a service or backend
    /// that is upserted again under the same key or address gets its old
    /// id, so re-declaring what was programmed plans no change at all.
    /// Everything the maps hold counts as changed, so that
    /// [`plan_changes`](crate::plan_changes) deletes what is not declared
    /// again, as [`plan()`](crate::plan()) would.
    pub fn adopt(limits: Limits, programmed: &Programmed) -> Result<ServiceTable, Error> {
        check_limits(&limits)?;
        let too_big = |what: &str, id: u32, limit: u32| Error::Adopt {
            reason: format!(
                "the maps hold {what} id {id}, above the limit of {limit}: \
                 they were made for larger limits"
            ),
        };
        let mut service_ids = BTreeSet::new();
        let mut retired_services = BTreeMap::new();
        for (key, entry) in programmed.services() {
            if entry.id.get() > limits.max_services {
                return Err(too_big("service", entry.id.get(), limits.max_services));
            }
            service_ids.insert(NonZeroU32::from(entry.id));
            retired_services.insert(*key, entry.id);
        }
        // Rings of services whose entry is gone still occupy their id.
        let mut orphan_rings = BTreeSet::new();
        for ring in programmed.rings().keys() {
            if ring.service.get() > limits.max_services {
                return Err(too_big("service", ring.service.get(), limits.max_services));
            }
            service_ids.insert(NonZeroU32::from(ring.service));
            if !programmed.has_service_id(ring.service) {
                orphan_rings.insert(ring.service);
            }
        }
        let mut backend_ids = BTreeSet::new();
        let mut retired_backends = BTreeMap::new();
        for (&id, &addr) in programmed.backends() {
            if id.get() > limits.max_backends {
                return Err(too_big("backend", id.get(), limits.max_backends));
            }
            backend_ids.insert(NonZeroU32::from(id));
            retired_backends.entry(addr).or_insert(id);
        }
        Ok(ServiceTable {
            limits,
            services: BTreeMap::new(),
            backends: BTreeMap::new(),
            service_ids: IdPool::with_pending(limits.max_services, &service_ids),
            backend_ids: IdPool::with_pending(limits.max_backends, &backend_ids),
            changes: Changes {
                services: retired_services.keys().copied().collect(),
                backends: programmed.backends().clone(),
                rings: orphan_rings,
            },
            retired_services,
            retired_backends,
            published: 0,
        })
    }

    /// The limits the table enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Adds a service or replaces everything about it. Its id stays the same
    /// across upserts. All or nothing: on error nothing changed.
    pub fn upsert(&mut self, key: ServiceKey, spec: ServiceSpec) -> Result<ServiceId, Error> {
        check_key(&key, spec.published)?;
        let mut backends = spec.backends;
        backends.sort_by_key(|b| b.addr);
        self.check_backends(&key, &backends)?;
        let existing = self.services.get(&key);
        if let Some(s) = existing.filter(|s| {
            s.owner == spec.owner && s.published == spec.published && s.backends == backends
        }) {
            return Ok(s.id);
        }
        let ring = maglev_ring(&key, spec.published, &backends)?;
        let existing_id = existing.map(|s| s.id);
        let was_published = existing.is_some_and(|s| s.published);
        if spec.published
            && !was_published
            && self.published >= self.limits.max_published_services as usize
        {
            return Err(Error::PublishedFull {
                key,
                limit: self.limits.max_published_services,
            });
        }
        let needs_service_id = existing.is_none() && !self.retired_services.contains_key(&key);
        if needs_service_id && self.service_ids.available() == 0 {
            return Err(Error::ServicesFull {
                key,
                limit: self.service_ids.limit(),
                pending: self.service_ids.pending_count(),
            });
        }
        let old: BTreeSet<BackendAddr> = existing
            .map(|s| s.backends.iter().map(|b| b.addr).collect())
            .unwrap_or_default();
        let needed = backends
            .iter()
            .filter(|b| {
                !old.contains(&b.addr)
                    && !self.backends.contains_key(&b.addr)
                    && !self.retired_backends.contains_key(&b.addr)
            })
            .count();
        let needed = u32::try_from(needed).unwrap_or(u32::MAX);
        if needed > self.backend_ids.available() {
            return Err(Error::BackendsFull {
                key,
                needed,
                available: self.backend_ids.available(),
                limit: self.backend_ids.limit(),
                pending: self.backend_ids.pending_count(),
            });
        }

        // Checked: from here on nothing fails.
        let id = match existing_id {
            Some(id) => id,
            None => self.take_service_id(key)?,
        };
        let new: BTreeSet<BackendAddr> = backends.iter().map(|b| b.addr).collect();
        for addr in new.difference(&old) {
            self.add_backend_ref(&key, *addr)?;
        }
        for addr in old.difference(&new) {
            self.drop_backend_ref(*addr);
        }
        let programmed = self.derive(id, spec.published, &backends, ring.as_deref());
        match (was_published, spec.published) {
            (false, true) => self.published += 1,
            (true, false) => self.published = self.published.saturating_sub(1),
            _ => {}
        }
        self.changes.services.insert(key);
        self.services.insert(
            key,
            Service {
                id,
                owner: spec.owner,
                published: spec.published,
                backends,
                programmed,
            },
        );
        Ok(id)
    }

    /// Replaces the backends of an existing service, keeping its owner and
    /// publication.
    pub fn set_backends(&mut self, key: &ServiceKey, backends: Vec<Backend>) -> Result<(), Error> {
        let service = self
            .services
            .get(key)
            .ok_or(Error::UnknownService { key: *key })?;
        let spec = ServiceSpec {
            owner: service.owner.clone(),
            published: service.published,
            backends,
        };
        self.upsert(*key, spec).map(|_| ())
    }

    /// Marks one backend of a service ready or not (a health check result).
    pub fn set_ready(
        &mut self,
        key: &ServiceKey,
        backend: BackendAddr,
        ready: bool,
    ) -> Result<(), Error> {
        let service = self
            .services
            .get(key)
            .ok_or(Error::UnknownService { key: *key })?;
        let mut backends = service.backends.clone();
        let b = backends
            .iter_mut()
            .find(|b| b.addr == backend)
            .ok_or(Error::UnknownBackend { key: *key, backend })?;
        if b.ready == ready {
            return Ok(());
        }
        b.ready = ready;
        self.set_backends(key, backends)
    }

    /// Removes a service; its id (and those of backends no other service
    /// lists) stay pending until [`ServiceTable::release`].
    pub fn remove(&mut self, key: &ServiceKey) -> Result<ServiceId, Error> {
        let service = self
            .services
            .remove(key)
            .ok_or(Error::UnknownService { key: *key })?;
        for b in &service.backends {
            self.drop_backend_ref(b.addr);
        }
        if service.published {
            self.published = self.published.saturating_sub(1);
        }
        self.changes.services.insert(*key);
        self.service_ids.retire(service.id.into());
        self.retired_services.insert(*key, service.id);
        Ok(service.id)
    }

    /// The service's id, if the table has it.
    pub fn service_id(&self, key: &ServiceKey) -> Option<ServiceId> {
        self.services.get(key).map(|s| s.id)
    }

    /// The service as last upserted (backends sorted by address).
    pub fn spec(&self, key: &ServiceKey) -> Option<ServiceSpec> {
        self.services.get(key).map(|s| ServiceSpec {
            owner: s.owner.clone(),
            published: s.published,
            backends: s.backends.clone(),
        })
    }

    /// The backend id the table gave an address, if some service lists it.
    pub fn backend_id(&self, addr: &BackendAddr) -> Option<BackendId> {
        self.backends.get(addr).map(|b| b.id)
    }

    /// The keys of the services, in order.
    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> + '_ {
        self.services.keys()
    }

    /// The number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the table has no services.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// What the maps should hold, every service of it: the input of the
    /// full [`plan()`](crate::plan()). It clones every service's entry
    /// (rings are shared), so it costs `O(services)`;
    /// [`plan_changes`](crate::plan_changes) needs no such copy.
    pub fn desired(&self) -> Desired {
        Desired::new(
            self.services
                .iter()
                .map(|(k, s)| (*k, s.programmed.clone()))
                .collect(),
            self.backends.iter().map(|(a, b)| (b.id, *a)).collect(),
        )
    }

    /// Frees the pending ids that `programmed` (the maps as they are, after
    /// applying a plan) no longer holds, so they can be handed out again,
    /// and forgets the changes it shows programmed. Until this is called
    /// with such a state, removed ids are not reused. Costs `O(changes +
    /// pending ids)`, not `O(services)`.
    pub fn release(&mut self, programmed: &Programmed) {
        let mut changes = std::mem::take(&mut self.changes);
        changes.services.retain(|key| match self.services.get(key) {
            Some(s) => !programmed.matches(key, &s.programmed),
            None => {
                programmed.services().contains_key(key)
                    || self
                        .retired_services
                        .get(key)
                        .is_some_and(|id| programmed.holds_service(*id))
            }
        });
        changes.backends.retain(|id, addr| {
            programmed.backends().get(id) != self.live_backend(*id, *addr).as_ref()
        });
        changes.rings.retain(|id| programmed.has_unused_ring(*id));
        self.changes = changes;
        self.retired_services.retain(|_, id| {
            let held = programmed.holds_service(*id);
            if !held {
                self.service_ids.release((*id).into());
            }
            held
        });
        self.retired_backends.retain(|_, id| {
            let held = programmed.backends().contains_key(id);
            if !held {
                self.backend_ids.release((*id).into());
            }
            held
        });
    }

    /// Ids in use and pending: `(live services, pending services, live
    /// backends, pending backends)`, for metrics.
    pub fn id_usage(&self) -> (u32, u32, u32, u32) {
        (
            self.service_ids.live(),
            self.service_ids.pending_count(),
            self.backend_ids.live(),
            self.backend_ids.pending_count(),
        )
    }

    /// How many keys, backend ids and ring owners are listed as changed.
    #[cfg(test)]
    pub(crate) fn unprogrammed_changes(&self) -> usize {
        self.changes.services.len() + self.changes.backends.len() + self.changes.rings.len()
    }

    /// The changed keys, with what the maps should hold for each (`None`:
    /// removed), and the id a removed key's entries may still be under.
    #[allow(clippy::type_complexity)]
    pub(crate) fn changed_services(
        &self,
    ) -> impl Iterator<Item = (&ServiceKey, Option<&DesiredService>, Option<ServiceId>)> + '_ {
        self.changes.services.iter().map(|key| {
            let want = self.services.get(key).map(|s| &s.programmed);
            (key, want, self.retired_services.get(key).copied())
        })
    }

    /// The changed backend ids, with the address each should hold
    /// (`None`: none, it is retired or free).
    pub(crate) fn changed_backends(
        &self,
    ) -> impl Iterator<Item = (BackendId, Option<BackendAddr>)> + '_ {
        self.changes
            .backends
            .iter()
            .map(|(&id, &addr)| (id, self.live_backend(id, addr)))
    }

    /// Service ids whose rings must be checked though no changed key
    /// leads to them.
    pub(crate) fn changed_rings(&self) -> impl Iterator<Item = ServiceId> + '_ {
        self.changes.rings.iter().copied()
    }

    /// `addr` if the table has it under `id`.
    fn live_backend(&self, id: BackendId, addr: BackendAddr) -> Option<BackendAddr> {
        self.backends
            .get(&addr)
            .is_some_and(|slot| slot.id == id)
            .then_some(addr)
    }

    fn check_backends(&self, key: &ServiceKey, backends: &[Backend]) -> Result<(), Error> {
        if backends.len() > self.limits.max_backends_per_service as usize {
            return Err(Error::TooManyBackendsForService {
                key: *key,
                requested: backends.len(),
                limit: self.limits.max_backends_per_service,
            });
        }
        for b in backends {
            let reason = if b.addr.port == 0 {
                Some("port 0")
            } else {
                unusable_addr(b.addr.addr)
            };
            if let Some(reason) = reason {
                return Err(Error::InvalidBackend {
                    key: *key,
                    backend: b.addr,
                    reason,
                });
            }
        }
        // Sorted by address, so duplicates are neighbours.
        if let Some(pair) = backends.windows(2).find(|p| p[0].addr == p[1].addr) {
            return Err(Error::DuplicateBackend {
                key: *key,
                backend: pair[0].addr,
            });
        }
        Ok(())
    }

    fn take_service_id(&mut self, key: ServiceKey) -> Result<ServiceId, Error> {
        if let Some(id) = self.retired_services.remove(&key) {
            self.service_ids.revive(id.into());
            return Ok(id);
        }
        self.service_ids
            .take()
            .and_then(|id| ServiceId::new(id.get()))
            .ok_or(Error::ServicesFull {
                key,
                limit: self.service_ids.limit(),
                pending: self.service_ids.pending_count(),
            })
    }

    fn add_backend_ref(&mut self, key: &ServiceKey, addr: BackendAddr) -> Result<(), Error> {
        if let Some(slot) = self.backends.get_mut(&addr) {
            slot.refs += 1;
            return Ok(());
        }
        let id = match self.retired_backends.remove(&addr) {
            Some(id) => {
                self.backend_ids.revive(id.into());
                id
            }
            None => self
                .backend_ids
                .take()
                .and_then(|id| BackendId::new(id.get()))
                .ok_or(Error::BackendsFull {
                    key: *key,
                    needed: 1,
                    available: 0,
                    limit: self.backend_ids.limit(),
                    pending: self.backend_ids.pending_count(),
                })?,
        };
        self.backends.insert(addr, BackendSlot { id, refs: 1 });
        self.changes.backends.insert(id, addr);
        Ok(())
    }

    fn drop_backend_ref(&mut self, addr: BackendAddr) {
        let Some(slot) = self.backends.get_mut(&addr) else {
            return;
        };
        slot.refs = slot.refs.saturating_sub(1);
        if slot.refs == 0 {
            let id = slot.id;
            self.backends.remove(&addr);
            self.backend_ids.retire(id.into());
            self.retired_backends.insert(addr, id);
            self.changes.backends.insert(id, addr);
        }
    }

    /// The map contents of a service whose backends all have ids.
    /// `ring` holds indices into the ready backends.
    fn derive(
        &self,
        id: ServiceId,
        published: bool,
        backends: &[Backend],
        ring: Option<&[u32]>,
    ) -> DesiredService {
        let ready: Vec<(BackendId, Weight)> = backends
            .iter()
            .filter(|b| b.ready)
            .filter_map(|b| self.backends.get(&b.addr).map(|s| (s.id, b.weight)))
            .collect();
        let ring = ring.map(|slots| {
            slots
                .iter()
                .filter_map(|&i| ready.get(i as usize).map(|r| r.0))
                .collect::<Arc<[BackendId]>>()
        });
        DesiredService {
            id,
            published,
            backends: east_west(&ready),
            ring,
        }
    }
}

fn check_limits(limits: &Limits) -> Result<(), Error> {
    let invalid = |reason: String| Err(Error::InvalidLimits { reason });
    if limits.max_services == 0 || limits.max_backends == 0 {
        return invalid("max_services and max_backends must be at least 1".into());
    }
    if limits.max_backends_per_service == 0
        || limits.max_backends_per_service > MAX_BACKENDS_PER_SERVICE
    {
        return invalid(format!(
            "max_backends_per_service must be between 1 and {MAX_BACKENDS_PER_SERVICE} \
             (the size of a service entry's backend array), not {}",
            limits.max_backends_per_service
        ));
    }
    if limits.max_published_services > limits.max_services {
        return invalid(format!(
            "max_published_services ({}) cannot exceed max_services ({})",
            limits.max_published_services, limits.max_services
        ));
    }
    Ok(())
}

/// A published port is keyed `{0.0.0.0, port, protocol}`: 0.0.0.0 stands
/// for "an address of this node" (the north-south programs match it on
/// the node's own addresses), so it is valid for published services only.
fn check_key(key: &ServiceKey, published: bool) -> Result<(), Error> {
    let reason = if key.port == 0 {
        Some("port 0")
    } else if published && key.vip.is_unspecified() {
        None
    } else if key.vip.is_unspecified() {
        Some("unspecified address 0.0.0.0 (only a published port may use it)")
    } else {
        unusable_addr(key.vip)
    };
    match reason {
        Some(reason) => Err(Error::InvalidService { key: *key, reason }),
        None => Ok(()),
    }
}

fn unusable_addr(addr: Ipv4Addr) -> Option<&'static str> {
    if addr.is_unspecified() {
        Some("unspecified address 0.0.0.0")
    } else if addr.is_broadcast() {
        Some("broadcast address")
    } else if addr.is_multicast() {
        Some("multicast address")
    } else {
        None
    }
}

/// The Maglev ring of a published service as indices into its ready
/// backends (sorted by address); `None` if it is not published or has no
/// ready backend.
fn maglev_ring(
    key: &ServiceKey,
    published: bool,
    backends: &[Backend],
) -> Result<Option<Vec<u32>>, Error> {
    if !published {
        return Ok(None);
    }
    let entries: Vec<maglev::Entry> = backends
        .iter()
        .filter(|b| b.ready)
        .map(|b| maglev::Entry {
            key: b.addr.maglev_key(),
            weight: b.weight,
        })
        .collect();
    let size = maglev::table_size_for(entries.len());
    let table =
        maglev::populate(&entries, size).map_err(|source| Error::Maglev { key: *key, source })?;
    Ok(table.map(|t| t.slots().to_vec()))
}

/// The east-west backend array: each ready backend once when all weights
/// are equal; otherwise [`MAX_BACKENDS_PER_SERVICE`] entries shared in
/// proportion to the weights (largest remainder, at least one each), so
/// that `random % count` honours the weights to within 1/256.
fn east_west(ready: &[(BackendId, Weight)]) -> Vec<BackendId> {
    let Some(&(_, first)) = ready.first() else {
        return Vec::new();
    };
    if ready.iter().all(|&(_, w)| w == first) {
        return ready.iter().map(|&(id, _)| id).collect();
    }
    let total_slots = u64::from(MAX_BACKENDS_PER_SERVICE);
    let n = ready.len() as u64;
    // One slot each, the rest by weight.
    let spare = total_slots.saturating_sub(n);
    let total_weight: u64 = ready.iter().map(|&(_, w)| u64::from(w.get())).sum();
    let mut counts: Vec<u64> = ready
        .iter()
        .map(|&(_, w)| 1 + spare * u64::from(w.get()) / total_weight)
        .collect();
    let given: u64 = counts.iter().sum();
    let mut by_remainder: Vec<usize> = (0..ready.len()).collect();
    // Largest remainder first; ties to the earlier (lower address) backend.
    by_remainder.sort_by_key(|&i| {
        let rem = spare * u64::from(ready[i].1.get()) % total_weight;
        (std::cmp::Reverse(rem), i)
    });
    for &i in by_remainder
        .iter()
        .take(total_slots.saturating_sub(given) as usize)
    {
        counts[i] += 1;
    }
    ready
        .iter()
        .zip(counts)
        .flat_map(|(&(id, _), c)| std::iter::repeat_n(id, c as usize))
        .collect()
}

#[cfg(test)]
mod tests;
