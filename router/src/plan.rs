//! Programming the load-balancing maps: the desired contents, an exact
//! model of what the maps hold, and the ordered list of operations that
//! takes the one to the other.
//!
//! [`plan`] compares a [`Programmed`] state (what the maps hold now) with a
//! [`Desired`] one (from [`ServiceTable::desired`](crate::ServiceTable::desired))
//! and returns the [`Op`]s to apply, in this order:
//!
//! 1. `PutBackend` for backends that are new;
//! 2. `CreateRing` for rings that are new or change size (under the other
//!    generation, so the one in use is never touched), `PutRingSlots` for
//!    the slots that change in a ring of unchanged size;
//! 3. `PutService` for service entries that are new or change;
//! 4. `DeleteService` for services that are gone;
//! 5. `DeleteRing` for rings no service entry refers to any more;
//! 6. `DeleteBackend` for backends nothing refers to any more.
//!
//! So at every point of the sequence, everything a reader can reach exists:
//! what a service entry or ring points to is written before it, and removed
//! after the last pointer to it. A plan applied only in part (the agent
//! stops at the first failed operation) leaves a consistent data plane, and
//! planning again from the model of that state finishes the job.
//!
//! Nothing is written that would not change: with nothing to do the plan is
//! empty, and a change to one service touches only that service's entries
//! (and the backends it alone adds or drops).
//!
//! [`Programmed`] is also the in-memory model of the maps: [`Programmed::apply`]
//! performs an operation on it and refuses, with a [`ModelError`], any
//! operation that would leave a dangling reference. The agent applies each
//! operation to the kernel and then to its model, so the model is always
//! what the kernel holds; after an agent restart it can rebuild the model
//! by reading the maps back as `Put` operations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::ids::{BackendId, ServiceId};
use crate::service::{BackendAddr, ServiceKey, ServiceTable, MAX_BACKENDS_PER_SERVICE};

/// `corral_lb_service.flags` bit: the service is published (north-south)
/// and may have a ring.
pub const FLAG_PUBLISHED: u32 = 1;

/// The key of a ring in `lb_rings`: a service may have a ring under
/// generation 0 or 1; a ring that changes size is built under the other
/// generation and the service entry is switched to it in one write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RingKey {
    /// The service the ring belongs to.
    pub service: ServiceId,
    /// 0 or 1.
    pub generation: u32,
}

/// Where a service entry finds its ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingRef {
    /// The ring is at `RingKey { service: entry.id, generation }`.
    pub generation: u32,
    /// Its number of slots `M` (prime): the slot of a flow is `hash % size`.
    pub size: u32,
}

/// A value of `lb_services` (`struct corral_lb_service`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceEntry {
    /// The service's id.
    pub id: ServiceId,
    /// Published (north-south) or not.
    pub published: bool,
    /// Its Maglev ring: published services with at least one ready backend.
    pub ring: Option<RingRef>,
    /// The east-west array (`count` = its length, at most
    /// [`MAX_BACKENDS_PER_SERVICE`]); empty when no backend is ready.
    pub backends: Vec<BackendId>,
}

impl ServiceEntry {
    /// The `flags` word of the entry.
    pub fn flags(&self) -> u32 {
        if self.published {
            FLAG_PUBLISHED
        } else {
            0
        }
    }
}

/// One map operation, in terms the maps follow directly (see the crate
/// docs for the layout).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `lb_backends[id] = addr` (new backend).
    PutBackend {
        /// Key.
        id: BackendId,
        /// Value.
        addr: BackendAddr,
    },
    /// Build a ring of `slots.len()` entries holding `slots`, then publish
    /// it as `lb_rings[ring]` (replacing an unused leftover, if any): create
    /// the inner array, fill it, then insert it into the outer map.
    CreateRing {
        /// Key in the outer map.
        ring: RingKey,
        /// Every slot, in order.
        slots: Arc<[BackendId]>,
    },
    /// In the existing ring `lb_rings[ring]`, set `ring[slot] = backend` for
    /// each pair (only the slots that change).
    PutRingSlots {
        /// Key in the outer map.
        ring: RingKey,
        /// `(slot, backend)` pairs, by slot.
        slots: Vec<(u32, BackendId)>,
    },
    /// `lb_services[key] = entry` (one atomic element update).
    PutService {
        /// Key.
        key: ServiceKey,
        /// The whole value.
        entry: ServiceEntry,
    },
    /// Delete `lb_services[key]`.
    DeleteService {
        /// Key.
        key: ServiceKey,
    },
    /// Delete `lb_rings[ring]` (nothing refers to it any more).
    DeleteRing {
        /// Key in the outer map.
        ring: RingKey,
    },
    /// Delete `lb_backends[id]` (nothing refers to it any more).
    DeleteBackend {
        /// Key.
        id: BackendId,
    },
}

/// What the maps should hold for one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredService {
    /// Its id.
    pub id: ServiceId,
    /// Published (north-south) or not.
    pub published: bool,
    /// The east-west array: each ready backend once (by address) if their
    /// weights are equal, else [`MAX_BACKENDS_PER_SERVICE`] entries shared
    /// by weight; empty when no backend is ready.
    pub backends: Vec<BackendId>,
    /// The Maglev ring (published services with a ready backend), whose
    /// length is its prime size.
    pub ring: Option<Arc<[BackendId]>>,
}

/// What the maps should hold: made by
/// [`ServiceTable::desired`](crate::ServiceTable::desired), so every id it
/// refers to is among its backends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    services: BTreeMap<ServiceKey, DesiredService>,
    backends: BTreeMap<BackendId, BackendAddr>,
}

impl Desired {
    pub(crate) fn new(
        services: BTreeMap<ServiceKey, DesiredService>,
        backends: BTreeMap<BackendId, BackendAddr>,
    ) -> Desired {
        Desired { services, backends }
    }

    /// The services, by key.
    pub fn services(&self) -> &BTreeMap<ServiceKey, DesiredService> {
        &self.services
    }

    /// Every backend some service lists (ready or not), by id.
    pub fn backends(&self) -> &BTreeMap<BackendId, BackendAddr> {
        &self.backends
    }
}

/// An operation the model refuses: applying it to the kernel would leave
/// the data plane pointing at something missing, or it makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The operation refers to a backend that is not in `lb_backends`.
    #[error("backend {id} is not programmed")]
    MissingBackend {
        /// The backend.
        id: BackendId,
    },
    /// The operation refers to a ring that is not in `lb_rings`.
    #[error("ring {}/{} is not programmed", ring.service, ring.generation)]
    MissingRing {
        /// The ring.
        ring: RingKey,
    },
    /// There is no such service entry.
    #[error("service {key} is not programmed")]
    MissingService {
        /// The service.
        key: ServiceKey,
    },
    /// A backend that a service or ring refers to would be deleted or
    /// changed.
    #[error("backend {id} is still referred to ({refs} times)")]
    BackendInUse {
        /// The backend.
        id: BackendId,
        /// How many list entries and ring slots refer to it.
        refs: u64,
    },
    /// A ring that a service entry refers to would be deleted or replaced.
    #[error("ring {}/{} is in use by its service", ring.service, ring.generation)]
    RingInUse {
        /// The ring.
        ring: RingKey,
    },
    /// A service entry gives a ring size that is not the ring's.
    #[error("service {key} says its ring has {said} slots, the ring has {actual}")]
    RingSizeMismatch {
        /// The service.
        key: ServiceKey,
        /// `ring_size` in the entry.
        said: u32,
        /// Slots of the ring.
        actual: usize,
    },
    /// A slot past the end of a ring.
    #[error("slot {slot} is outside ring {}/{} of {size} slots", ring.service, ring.generation)]
    SlotOutOfRange {
        /// The ring.
        ring: RingKey,
        /// The slot.
        slot: u32,
        /// The ring's size.
        size: usize,
    },
    /// A ring without slots.
    #[error("ring {}/{} has no slots", ring.service, ring.generation)]
    EmptyRing {
        /// The ring.
        ring: RingKey,
    },
    /// A service entry with more backends than the array holds.
    #[error("service {key} has {count} backends, more than {MAX_BACKENDS_PER_SERVICE}")]
    TooManyBackends {
        /// The service.
        key: ServiceKey,
        /// Its backends.
        count: usize,
    },
    /// Two service entries with the same id.
    #[error("service id {id} is already used by {other}")]
    DuplicateServiceId {
        /// The id.
        id: ServiceId,
        /// The service that has it.
        other: ServiceKey,
    },
}

/// What the maps hold, exactly: the model [`plan`] starts from and
/// [`Programmed::apply`] keeps up to date.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Programmed {
    services: BTreeMap<ServiceKey, ServiceEntry>,
    rings: BTreeMap<RingKey, Vec<BackendId>>,
    backends: BTreeMap<BackendId, BackendAddr>,
    /// Derived: which key holds each service id.
    keys_by_id: BTreeMap<ServiceId, ServiceKey>,
    /// Derived: how many list entries and ring slots refer to each backend.
    backend_refs: BTreeMap<BackendId, u64>,
}

impl Programmed {
    /// Empty maps.
    pub fn new() -> Programmed {
        Programmed::default()
    }

    /// The `lb_services` entries.
    pub fn services(&self) -> &BTreeMap<ServiceKey, ServiceEntry> {
        &self.services
    }

    /// The rings of `lb_rings`.
    pub fn rings(&self) -> &BTreeMap<RingKey, Vec<BackendId>> {
        &self.rings
    }

    /// The `lb_backends` entries.
    pub fn backends(&self) -> &BTreeMap<BackendId, BackendAddr> {
        &self.backends
    }

    /// Whether the maps still hold anything under this service id (an entry
    /// or a ring).
    pub fn holds_service(&self, id: ServiceId) -> bool {
        self.keys_by_id.contains_key(&id) || self.rings_of(id).next().is_some()
    }

    /// Whether a service entry has this id.
    pub(crate) fn has_service_id(&self, id: ServiceId) -> bool {
        self.keys_by_id.contains_key(&id)
    }

    /// The rings under a service id (at most two generations).
    fn rings_of(&self, id: ServiceId) -> impl Iterator<Item = (&RingKey, &Vec<BackendId>)> + '_ {
        let first = RingKey {
            service: id,
            generation: 0,
        };
        let last = RingKey {
            service: id,
            generation: u32::MAX,
        };
        self.rings.range(first..=last)
    }

    /// The generation of the ring the entry with this id points to.
    fn ring_in_use_of(&self, id: ServiceId) -> Option<u32> {
        self.keys_by_id
            .get(&id)
            .and_then(|key| self.services.get(key))
            .and_then(|entry| entry.ring)
            .map(|r| r.generation)
    }

    /// Whether a ring under this service id is not the one its entry (if
    /// any) points to.
    pub(crate) fn has_unused_ring(&self, id: ServiceId) -> bool {
        let used = self.ring_in_use_of(id);
        self.rings_of(id)
            .any(|(ring, _)| Some(ring.generation) != used)
    }

    /// Whether the maps hold exactly what `want` asks for under `key`
    /// (ring generation aside), with no leftover ring under its id: the
    /// one-service version of [`Programmed::satisfies`].
    pub(crate) fn matches(&self, key: &ServiceKey, want: &DesiredService) -> bool {
        let Some(have) = self.services.get(key) else {
            return false;
        };
        if have.id != want.id || have.published != want.published || have.backends != want.backends
        {
            return false;
        }
        let mut rings = self.rings_of(want.id);
        match (&want.ring, have.ring) {
            (None, None) => rings.next().is_none(),
            (Some(slots), Some(r)) => {
                r.size as usize == slots.len()
                    && rings.all(|(ring, have)| {
                        ring.generation == r.generation && have.as_slice() == &slots[..]
                    })
                    && self.rings.contains_key(&RingKey {
                        service: want.id,
                        generation: r.generation,
                    })
            }
            _ => false,
        }
    }

    /// Whether the maps hold exactly what `desired` asks for (ring
    /// generations aside), with no leftover ring or backend.
    pub fn satisfies(&self, desired: &Desired) -> bool {
        if self.backends != desired.backends || self.services.len() != desired.services.len() {
            return false;
        }
        let mut rings_used = 0;
        for (key, want) in &desired.services {
            let Some(have) = self.services.get(key) else {
                return false;
            };
            if have.id != want.id
                || have.published != want.published
                || have.backends != want.backends
            {
                return false;
            }
            let ring = have.ring.and_then(|r| {
                self.rings.get(&RingKey {
                    service: have.id,
                    generation: r.generation,
                })
            });
            match (&want.ring, ring) {
                (None, None) if have.ring.is_none() => {}
                (Some(want), Some(have)) if **want == **have => rings_used += 1,
                _ => return false,
            }
        }
        rings_used == self.rings.len()
    }

    /// Applies every operation in order; stops at the first refusal and
    /// returns its index (the operations before it stay applied).
    pub fn apply_all<'a>(
        &mut self,
        ops: impl IntoIterator<Item = &'a Op>,
    ) -> Result<(), (usize, ModelError)> {
        for (i, op) in ops.into_iter().enumerate() {
            self.apply(op).map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Performs one operation, or refuses it and changes nothing.
    pub fn apply(&mut self, op: &Op) -> Result<(), ModelError> {
        match op {
            Op::PutBackend { id, addr } => {
                let refs = self.refs(*id);
                if self.backends.get(id).is_some_and(|a| a != addr) && refs > 0 {
                    return Err(ModelError::BackendInUse { id: *id, refs });
                }
                self.backends.insert(*id, *addr);
            }
            Op::CreateRing { ring, slots } => {
                if slots.is_empty() {
                    return Err(ModelError::EmptyRing { ring: *ring });
                }
                self.check_backends(slots.iter())?;
                if self.ring_in_use(ring) {
                    return Err(ModelError::RingInUse { ring: *ring });
                }
                if let Some(old) = self.rings.remove(ring) {
                    self.unref(&old);
                }
                self.add_refs(slots.iter());
                self.rings.insert(*ring, slots.to_vec());
            }
            Op::PutRingSlots { ring, slots } => self.put_ring_slots(ring, slots)?,
            Op::PutService { key, entry } => self.put_service(key, entry)?,
            Op::DeleteService { key } => {
                let old = self
                    .services
                    .remove(key)
                    .ok_or(ModelError::MissingService { key: *key })?;
                self.keys_by_id.remove(&old.id);
                self.unref(&old.backends);
            }
            Op::DeleteRing { ring } => {
                if self.ring_in_use(ring) {
                    return Err(ModelError::RingInUse { ring: *ring });
                }
                let old = self
                    .rings
                    .remove(ring)
                    .ok_or(ModelError::MissingRing { ring: *ring })?;
                self.unref(&old);
            }
            Op::DeleteBackend { id } => {
                if !self.backends.contains_key(id) {
                    return Err(ModelError::MissingBackend { id: *id });
                }
                let refs = self.refs(*id);
                if refs > 0 {
                    return Err(ModelError::BackendInUse { id: *id, refs });
                }
                self.backends.remove(id);
            }
        }
        Ok(())
    }

    fn put_ring_slots(
        &mut self,
        ring: &RingKey,
        slots: &[(u32, BackendId)],
    ) -> Result<(), ModelError> {
        let size = self
            .rings
            .get(ring)
            .ok_or(ModelError::MissingRing { ring: *ring })?
            .len();
        if let Some(&(slot, _)) = slots.iter().find(|(s, _)| *s as usize >= size) {
            return Err(ModelError::SlotOutOfRange {
                ring: *ring,
                slot,
                size,
            });
        }
        self.check_backends(slots.iter().map(|(_, b)| b))?;
        let mut old = Vec::with_capacity(slots.len());
        if let Some(r) = self.rings.get_mut(ring) {
            for &(slot, backend) in slots {
                old.push(std::mem::replace(&mut r[slot as usize], backend));
            }
        }
        self.unref(&old);
        self.add_refs(slots.iter().map(|(_, b)| b));
        Ok(())
    }

    fn put_service(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<(), ModelError> {
        if entry.backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(ModelError::TooManyBackends {
                key: *key,
                count: entry.backends.len(),
            });
        }
        self.check_backends(entry.backends.iter())?;
        if let Some(r) = entry.ring {
            let ring = RingKey {
                service: entry.id,
                generation: r.generation,
            };
            let slots = self
                .rings
                .get(&ring)
                .ok_or(ModelError::MissingRing { ring })?;
            if slots.len() != r.size as usize {
                return Err(ModelError::RingSizeMismatch {
                    key: *key,
                    said: r.size,
                    actual: slots.len(),
                });
            }
        }
        if let Some(other) = self.keys_by_id.get(&entry.id).filter(|k| *k != key) {
            return Err(ModelError::DuplicateServiceId {
                id: entry.id,
                other: *other,
            });
        }
        if let Some(old) = self.services.remove(key) {
            self.keys_by_id.remove(&old.id);
            self.unref(&old.backends);
        }
        self.add_refs(entry.backends.iter());
        self.keys_by_id.insert(entry.id, *key);
        self.services.insert(*key, entry.clone());
        Ok(())
    }

    fn refs(&self, id: BackendId) -> u64 {
        self.backend_refs.get(&id).copied().unwrap_or(0)
    }

    fn check_backends<'a>(
        &self,
        mut ids: impl Iterator<Item = &'a BackendId>,
    ) -> Result<(), ModelError> {
        match ids.find(|id| !self.backends.contains_key(id)) {
            Some(id) => Err(ModelError::MissingBackend { id: *id }),
            None => Ok(()),
        }
    }

    fn add_refs<'a>(&mut self, ids: impl Iterator<Item = &'a BackendId>) {
        for id in ids {
            *self.backend_refs.entry(*id).or_insert(0) += 1;
        }
    }

    fn unref(&mut self, ids: &[BackendId]) {
        for id in ids {
            if let Some(n) = self.backend_refs.get_mut(id) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.backend_refs.remove(id);
                }
            }
        }
    }

    fn ring_in_use(&self, ring: &RingKey) -> bool {
        self.ring_in_use_of(ring.service) == Some(ring.generation)
    }
}

/// The operations that take the maps from `current` to `desired`, in a safe
/// order (see the module docs). Empty when there is nothing to change.
pub fn plan(current: &Programmed, desired: &Desired) -> Vec<Op> {
    let mut ops = Vec::new();

    // 1. New backends, before anything can point to them.
    for (&id, &addr) in &desired.backends {
        if current.backends.get(&id) != Some(&addr) {
            ops.push(Op::PutBackend { id, addr });
        }
    }

    // 2. Rings, before the service entries that point to them.
    let mut entries = Vec::new();
    let mut rings_kept = BTreeSet::new();
    for (key, want) in &desired.services {
        let entry = plan_service(current, key, want, &mut rings_kept, &mut ops);
        entries.extend(entry);
    }

    // 3. Service entries.
    ops.extend(entries);

    // 4.-6. What nothing points to any more.
    for key in current.services.keys() {
        if !desired.services.contains_key(key) {
            ops.push(Op::DeleteService { key: *key });
        }
    }
    for ring in current.rings.keys() {
        if !rings_kept.contains(ring) {
            ops.push(Op::DeleteRing { ring: *ring });
        }
    }
    for id in current.backends.keys() {
        if !desired.backends.contains_key(id) {
            ops.push(Op::DeleteBackend { id: *id });
        }
    }
    ops
}

/// The operations that take the maps from `current` to what `table`
/// wants, like [`plan()`] (same operations, same order) but looking only
/// at what changed in the table since the maps last matched it (see
/// [`ServiceTable::release`](crate::ServiceTable::release)): one service's
/// change costs `O(that service)`, whatever the number of services.
///
/// `current` must be the maps the table's changes are counted against:
/// maps programmed from this table (starting empty, for
/// [`ServiceTable::new`](crate::ServiceTable::new)) or the maps it was
/// adopted from ([`ServiceTable::adopt`](crate::ServiceTable::adopt)),
/// changed since only by operations of plans of this table.
pub fn plan_changes(current: &Programmed, table: &ServiceTable) -> Vec<Op> {
    let mut ops = Vec::new();

    // 1. New backends; the ones to delete wait for step 6.
    let mut gone_backends = Vec::new();
    for (id, addr) in table.changed_backends() {
        match addr {
            Some(addr) if current.backends.get(&id) != Some(&addr) => {
                ops.push(Op::PutBackend { id, addr });
            }
            None if current.backends.contains_key(&id) => gone_backends.push(id),
            _ => {}
        }
    }

    // 2.-4. Rings and entries of the changed services; deleted entries.
    let mut entries = Vec::new();
    let mut deleted = Vec::new();
    let mut rings_kept = BTreeSet::new();
    let mut ring_owners: BTreeSet<ServiceId> = table.changed_rings().collect();
    for (key, want, retired) in table.changed_services() {
        ring_owners.extend(current.services.get(key).map(|e| e.id));
        ring_owners.extend(retired);
        match want {
            Some(want) => {
                ring_owners.insert(want.id);
                entries.extend(plan_service(current, key, want, &mut rings_kept, &mut ops));
            }
            None if current.services.contains_key(key) => {
                deleted.push(Op::DeleteService { key: *key });
            }
            None => {}
        }
    }
    ops.extend(entries);
    ops.extend(deleted);

    // 5.-6. Rings and backends nothing points to any more.
    for id in ring_owners {
        for (ring, _) in current.rings_of(id) {
            if !rings_kept.contains(ring) {
                ops.push(Op::DeleteRing { ring: *ring });
            }
        }
    }
    ops.extend(gone_backends.into_iter().map(|id| Op::DeleteBackend { id }));
    ops
}

/// The ring operations of one service (pushed to `ops`) and, if its entry
/// must change, the `PutService` to push after every ring operation.
fn plan_service(
    current: &Programmed,
    key: &ServiceKey,
    want: &DesiredService,
    rings_kept: &mut BTreeSet<RingKey>,
    ops: &mut Vec<Op>,
) -> Option<Op> {
    let ring = want
        .ring
        .as_ref()
        .map(|slots| plan_ring(current, key, want.id, slots, ops));
    if let Some(r) = ring {
        rings_kept.insert(RingKey {
            service: want.id,
            generation: r.generation,
        });
    }
    let entry = ServiceEntry {
        id: want.id,
        published: want.published,
        ring,
        backends: want.backends.clone(),
    };
    (current.services.get(key) != Some(&entry)).then_some(Op::PutService { key: *key, entry })
}

/// The ring operations of one service; returns where its entry must point.
/// A ring of the same size is changed in place (only the slots that differ);
/// otherwise a new one is built under the generation the entry does not use.
fn plan_ring(
    current: &Programmed,
    key: &ServiceKey,
    id: ServiceId,
    slots: &Arc<[BackendId]>,
    ops: &mut Vec<Op>,
) -> RingRef {
    let size = u32::try_from(slots.len()).unwrap_or(u32::MAX);
    let in_use = current
        .services
        .get(key)
        .filter(|entry| entry.id == id)
        .and_then(|entry| entry.ring);
    if let Some(r) = in_use {
        let ring = RingKey {
            service: id,
            generation: r.generation,
        };
        if let Some(have) = current.rings.get(&ring).filter(|h| h.len() == slots.len()) {
            let changed: Vec<(u32, BackendId)> = (0u32..)
                .zip(have.iter().zip(slots.iter()))
                .filter(|(_, (old, new))| old != new)
                .map(|(slot, (_, new))| (slot, *new))
                .collect();
            if !changed.is_empty() {
                ops.push(Op::PutRingSlots {
                    ring,
                    slots: changed,
                });
            }
            return r;
        }
    }
    let generation = in_use.map_or(0, |r| r.generation ^ 1);
    let ring = RingKey {
        service: id,
        generation,
    };
    // A plan that stopped half-way may have built this very ring already.
    if current.rings.get(&ring).map(Vec::as_slice) != Some(&slots[..]) {
        ops.push(Op::CreateRing {
            ring,
            slots: Arc::clone(slots),
        });
    }
    RingRef { generation, size }
}

#[cfg(test)]
mod tests;
