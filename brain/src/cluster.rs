//! The brain's picture of the cluster: desired state as the store holds it,
//! actual state as the cells report it, and what is in flight between the
//! two (starts asked for, stops sent). Pure: the run loop ([`crate::run`])
//! feeds it what arrives, with the time, and carries out the [`Effect`]s it
//! returns; it never touches a socket, a clock or the store itself.
//!
//! From this picture come the inputs of the pure decisions: the
//! [`ClusterState`] that [`converge`](crate::converge::converge) plans from,
//! the cells an auction places on ([`Cluster::auction_cells`]), and the
//! view the management API shows ([`Cluster::view`]).
//!
//! What the brain learns from a cell is reconciled per instance, by id:
//!
//! - an LRP instance that reaches `running` ends its slot's start in flight
//!   and tells the slot's crash backoff it runs;
//! - one that reaches `crashed` counts a crash for its slot (persisted) and
//!   is removed from its cell (its record has served its purpose); the
//!   convergence then restarts the slot, subject to the backoff;
//! - a task that starts is `running` in the store; one that ends is
//!   `succeeded` or `failed` with its exit code, then removed from its cell;
//! - an instance that leaves its cell takes its placement record with it.

use crate::api::{ActualSnapshot, CellState, CellView as ApiCell, InstanceView, UnplacedView};
use crate::auction::{CellView as AuctionCell, RootfsSupport};
use crate::backoff::{BackoffConfig, CrashBackoff, CrashState};
use crate::converge::{
    ActualInstance, CellStatus, ClusterState, DesiredApp, Liveness, PendingStart,
};
use crate::desired::{
    App, AppKey, CrashKey, CrashRecord, Placement, Task, TaskId, TaskResult, TaskState, Workload,
};
use crate::model::{LrpKey, Time};
use crate::store::Snapshot;
use corral_proto::service::{Service, MAX_SERVICE_BACKENDS};
use corral_proto::wire::{
    Hello, Ipv4Net, RemoteEndpoint, Route, StateChange, StateDelta, StateSnapshot, Tag, Zone,
};
use corral_proto::{
    Capacity, CellId, InstanceId, InstanceInfo, InstanceKind, InstanceState, Timestamp,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// A cell as the brain knows it.
#[derive(Debug, Clone)]
pub struct Cell {
    pub id: CellId,
    pub zone: Zone,
    pub tags: BTreeSet<Tag>,
    pub total: Capacity,
    pub available: Capacity,
    pub subnet: Option<Ipv4Net>,
    pub addresses: Vec<IpAddr>,
    pub liveness: Liveness,
    /// Asked to evacuate (by the operator or by the cell itself).
    pub draining: bool,
    /// Since when the cell has been in its current liveness, wall clock.
    pub since: Timestamp,
    /// The last state sequence number applied; `None` until a snapshot.
    seq: Option<u64>,
    /// What the cell runs, by id, with when each entered its state.
    pub instances: BTreeMap<InstanceId, Observed>,
    /// Root filesystems the cell said it does not have.
    pub missing_rootfs: BTreeSet<String>,
    /// The cell has never reported since the brain started: what it runs
    /// is known only from the store's placements.
    pub restored: bool,
    /// Instances in `instances` that are starting.
    starting: u32,
    /// Work placed on the cell (offered or sent) that the cell has not
    /// reported yet: its capacity is not in `available` yet.
    reserved: BTreeMap<InstanceId, Reserved>,
    /// The sum of `reserved`.
    reserved_total: Capacity,
}

impl Cell {
    /// The cell as convergence sees it. It has reported once a snapshot
    /// arrived on its current connection; until then (and, after a brain
    /// restart, while its instances are only the store's placements) what
    /// the brain holds of it may be stale.
    fn status(&self) -> CellStatus {
        CellStatus {
            id: self.id.clone(),
            liveness: self.liveness,
            draining: self.draining,
            reported: self.seq.is_some(),
        }
    }
}

/// Capacity held on a cell for work it has not reported yet.
#[derive(Debug, Clone, PartialEq)]
struct Reserved {
    need: Capacity,
    app: Option<AppKey>,
    since: Time,
}

/// Live long-running instances (starting or running, reported or
/// reserved) per app and cell, kept as they come and go, so that an
/// auction looks up the apps of its batch instead of counting every
/// instance of the cluster.
#[derive(Debug, Clone, Default)]
struct AppTally(BTreeMap<AppKey, BTreeMap<CellId, u32>>);

impl AppTally {
    fn add(&mut self, app: &AppKey, cell: &CellId) {
        let cells = match self.0.get_mut(app) {
            Some(c) => c,
            None => self.0.entry(app.clone()).or_default(),
        };
        match cells.get_mut(cell) {
            Some(n) => *n += 1,
            None => {
                cells.insert(cell.clone(), 1);
            }
        }
    }

    fn remove(&mut self, app: &AppKey, cell: &CellId) {
        let Some(cells) = self.0.get_mut(app) else {
            return;
        };
        if let Some(n) = cells.get_mut(cell) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                cells.remove(cell);
            }
        }
        if cells.is_empty() {
            self.0.remove(app);
        }
    }

    fn of(&self, app: &AppKey) -> Option<&BTreeMap<CellId, u32>> {
        self.0.get(app)
    }
}

/// Long-running instances reported on cells (any state), by slot: what a
/// convergence pass over a few slots reads instead of every cell.
#[derive(Debug, Clone, Default)]
struct BySlot(BTreeMap<LrpKey, BTreeMap<InstanceId, CellId>>);

impl BySlot {
    fn add(&mut self, info: &InstanceInfo, cell: &CellId) {
        if info.kind != InstanceKind::Lrp {
            return;
        }
        self.0
            .entry(lrp_key(info))
            .or_default()
            .insert(info.id.clone(), cell.clone());
    }

    fn remove(&mut self, info: &InstanceInfo, cell: &CellId) {
        if info.kind != InstanceKind::Lrp {
            return;
        }
        let slot = lrp_key(info);
        let Some(ids) = self.0.get_mut(&slot) else {
            return;
        };
        // Only this cell's record: the same id may be reported by two
        // cells (a stale copy on a returning cell).
        if ids.get(&info.id) == Some(cell) {
            ids.remove(&info.id);
        }
        if ids.is_empty() {
            self.0.remove(&slot);
        }
    }
}

/// Every slot of `app`, as a range of [`LrpKey`]s.
fn slots_of(app: &AppKey) -> std::ops::RangeInclusive<LrpKey> {
    LrpKey::new(app.clone(), 0)..=LrpKey::new(app.clone(), u32::MAX)
}

/// What changed in the picture since the loop last asked
/// ([`Cluster::take_touched`]): the apps whose every slot convergence must
/// look at again (the app changed), the slots whose instances changed, or
/// `all` when something that concerns every app changed (a
/// cell came, went, started or stopped draining, a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub apps: BTreeSet<AppKey>,
    pub slots: BTreeSet<LrpKey>,
    pub all: bool,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        !self.all && self.apps.is_empty() && self.slots.is_empty()
    }
}

fn is_live_lrp(info: &InstanceInfo) -> bool {
    info.kind == InstanceKind::Lrp
        && matches!(info.state, InstanceState::Starting | InstanceState::Running)
}

/// Whether two records of an instance are of the same kind and slot (only
/// its state and details differ).
fn same_slot(a: &InstanceInfo, b: &InstanceInfo) -> bool {
    a.kind == b.kind && a.index == b.index && a.app == b.app && a.tenant == b.tenant
}

/// Counts an instance record coming onto (`true`) or leaving a cell.
fn tally(apps: &mut AppTally, cell: &mut Cell, info: &InstanceInfo, coming: bool) {
    let starting = info.state == InstanceState::Starting;
    if is_live_lrp(info) {
        let key = lrp_key(info).app;
        if coming {
            apps.add(&key, &cell.id);
        } else {
            apps.remove(&key, &cell.id);
        }
    }
    if starting {
        cell.starting = if coming {
            cell.starting.saturating_add(1)
        } else {
            cell.starting.saturating_sub(1)
        };
    }
}

fn sub(a: Capacity, b: Capacity) -> Capacity {
    Capacity {
        memory_mb: a.memory_mb.saturating_sub(b.memory_mb),
        disk_mb: a.disk_mb.saturating_sub(b.disk_mb),
        containers: a.containers.saturating_sub(b.containers),
    }
}

fn add(a: Capacity, b: Capacity) -> Capacity {
    Capacity {
        memory_mb: a.memory_mb.saturating_add(b.memory_mb),
        disk_mb: a.disk_mb.saturating_add(b.disk_mb),
        containers: a.containers.saturating_add(b.containers),
    }
}

/// Gives back what `id` held on `cell`, if anything.
fn release(apps: &mut AppTally, cell: &mut Cell, id: &InstanceId) {
    if let Some(r) = cell.reserved.remove(id) {
        cell.reserved_total = sub(cell.reserved_total, r.need);
        if let Some(app) = &r.app {
            apps.remove(app, &cell.id);
        }
    }
}

/// Gives back everything held on `cell`.
fn release_all(apps: &mut AppTally, cell: &mut Cell) {
    for (_, r) in std::mem::take(&mut cell.reserved) {
        if let Some(app) = &r.app {
            apps.remove(app, &cell.id);
        }
    }
    cell.reserved_total = Capacity::default();
}

/// One instance as its cell last reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub info: InstanceInfo,
    /// When the brain saw it enter its current state.
    pub since: Time,
    pub since_wall: Timestamp,
}

/// A start the brain asked for and no cell has reported yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: InstanceId,
    pub version: u64,
    pub since: Time,
}

/// What the run loop must do as a consequence of what the cluster learnt.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Persist the slot's crash record.
    PersistCrash(CrashRecord),
    /// The slot's instance was lost by its cell (see
    /// [`InstanceInfo::lost`]): not counted as a crash; only logged.
    Lost { slot: LrpKey, reason: String },
    /// Persist a task's new state.
    PersistTask(Task),
    /// Forget a placement (its instance left its cell).
    DeletePlacement(InstanceId),
    /// Remove an ended instance's record from its cell (a `StopWork`).
    Remove { cell: CellId, id: InstanceId },
    /// Ask the cell for a fresh snapshot: a delta did not follow on.
    RequestState { cell: CellId },
    /// Send a start in flight again (see [`Cluster::start_again`]).
    StartAgain {
        cell: CellId,
        id: InstanceId,
        spec: Box<corral_proto::InstanceSpec>,
        slot: Option<LrpKey>,
        task: Option<TaskId>,
    },
}

/// Why a report from a cell was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("cell {0} is not connected")]
    UnknownCell(CellId),
    #[error(
        "state delta {got} from cell {cell} does not follow {expected}: asking for a snapshot"
    )]
    Gap {
        cell: CellId,
        expected: u64,
        got: u64,
    },
}

/// The whole picture (see the module docs).
#[derive(Debug, Clone)]
pub struct Cluster {
    backoff: BackoffConfig,
    pub cells: BTreeMap<CellId, Cell>,
    pub apps: BTreeMap<AppKey, App>,
    pub tasks: BTreeMap<TaskId, Task>,
    pub placements: BTreeMap<InstanceId, Placement>,
    /// LRP starts in flight, per slot.
    pub pending: BTreeMap<LrpKey, Pending>,
    /// Task starts in flight.
    pub pending_tasks: BTreeMap<TaskId, Time>,
    pub crashes: BTreeMap<LrpKey, CrashBackoff>,
    /// Stops sent and not yet done, with when they were sent.
    pub stopping: BTreeMap<InstanceId, Time>,
    /// Slots the last auction could place nowhere: why, and since when.
    pub unplaced: BTreeMap<LrpKey, (String, Timestamp)>,
    /// Live LRP instances per app and cell (see [`AppTally`]).
    tally: AppTally,
    /// Reported LRP instances by app (see [`BySlot`]).
    by_slot: BySlot,
    /// What changed since the loop last took it.
    touched: Touched,
}

fn lrp_key(info: &InstanceInfo) -> LrpKey {
    LrpKey::new(
        AppKey {
            tenant: info.tenant.clone(),
            name: info.app.clone(),
        },
        info.index,
    )
}

fn crash_key(slot: &LrpKey) -> CrashKey {
    CrashKey {
        tenant: slot.app.tenant.clone(),
        app: slot.app.name.clone(),
        index: slot.index,
    }
}

/// After a brain restart, how much longer than the lost-cell grace a cell
/// that held placements has to come back: the QUIC idle timeout (4 s) in
/// which it notices the old brain is gone, plus its longest reconnect
/// backoff (10 s).
pub const RESTART_RECONNECT_SLACK: std::time::Duration = std::time::Duration::from_secs(14);

impl Cluster {
    /// The picture after a brain (re)start, from the store: desired state,
    /// crash history and placements. Every cell that holds a placement is
    /// *disconnected since `now`*, with its placed instances assumed to
    /// run: convergence waits the lost-cell grace for it to come back
    /// rather than starting duplicates of everything at once.
    pub fn restore(backoff: BackoffConfig, snap: Snapshot, now: Time, wall: Timestamp) -> Self {
        let mut cluster = Self {
            backoff,
            cells: BTreeMap::new(),
            apps: snap.apps.into_iter().map(|a| (a.key(), a)).collect(),
            tasks: snap.tasks.into_iter().map(|t| (t.id.clone(), t)).collect(),
            placements: BTreeMap::new(),
            pending: BTreeMap::new(),
            pending_tasks: BTreeMap::new(),
            crashes: BTreeMap::new(),
            stopping: BTreeMap::new(),
            unplaced: BTreeMap::new(),
            tally: AppTally::default(),
            by_slot: BySlot::default(),
            touched: Touched {
                all: true,
                ..Touched::default()
            },
        };
        for record in snap.crashes {
            let slot = LrpKey::new(
                AppKey {
                    tenant: record.key.tenant.clone(),
                    name: record.key.app.clone(),
                },
                record.key.index,
            );
            let at = Time::from_timestamp(record.last_at);
            let restart_at = at.plus(backoff.delay_after(record.count));
            let state = CrashState {
                crashes: record.count,
                running_since: None,
                restart_at: Some(restart_at),
            };
            cluster
                .crashes
                .insert(slot, CrashBackoff::with_state(backoff, state));
        }
        for p in snap.placements {
            let cell = cluster.cells.entry(p.cell.clone()).or_insert_with(|| Cell {
                id: p.cell.clone(),
                zone: unknown_zone(),
                tags: BTreeSet::new(),
                total: Capacity::default(),
                available: Capacity::default(),
                subnet: None,
                addresses: Vec::new(),
                // As if last heard a little in the future: a cell notices
                // the old brain is gone only when its QUIC connection idles
                // out, then reconnects with backoff; it must not be
                // declared lost (and its instances duplicated) meanwhile.
                liveness: Liveness::Disconnected {
                    last_seen: now.plus(RESTART_RECONNECT_SLACK),
                },
                draining: false,
                since: wall,
                seq: None,
                instances: BTreeMap::new(),
                missing_rootfs: BTreeSet::new(),
                restored: true,
                starting: 0,
                reserved: BTreeMap::new(),
                reserved_total: Capacity::default(),
            });
            if let Some(info) = cluster_placeholder(&p, &cluster.apps, &cluster.tasks) {
                tally(&mut cluster.tally, cell, &info, true);
                cluster.by_slot.add(&info, &cell.id);
                cell.instances.insert(
                    p.instance.clone(),
                    Observed {
                        info,
                        since: now,
                        since_wall: p.since,
                    },
                );
            }
            cluster.placements.insert(p.instance.clone(), p);
        }
        cluster
    }

    // -----------------------------------------------------------------
    // What cells say.

    /// A cell said hello (its identity already checked against its
    /// certificate). What it runs arrives with its snapshot.
    pub fn connect(&mut self, hello: &Hello, wall: Timestamp) {
        let cell = self
            .cells
            .entry(hello.cell.clone())
            .or_insert_with(|| Cell {
                id: hello.cell.clone(),
                zone: hello.zone.clone(),
                tags: BTreeSet::new(),
                total: Capacity::default(),
                available: Capacity::default(),
                subnet: None,
                addresses: Vec::new(),
                liveness: Liveness::Lost,
                draining: false,
                since: wall,
                seq: None,
                instances: BTreeMap::new(),
                missing_rootfs: BTreeSet::new(),
                restored: false,
                starting: 0,
                reserved: BTreeMap::new(),
                reserved_total: Capacity::default(),
            });
        cell.zone = hello.zone.clone();
        cell.tags = hello.tags.clone();
        cell.total = hello.total;
        cell.available = hello.available;
        cell.subnet = hello.subnet;
        cell.addresses = hello.addresses.clone();
        cell.liveness = Liveness::Connected;
        cell.since = wall;
        cell.seq = None;
        cell.missing_rootfs.clear();
        // What was offered to an older connection is answered, or not, by
        // the round's deadline; the snapshot that follows says what runs.
        release_all(&mut self.tally, cell);
        // A stop sent on an older connection was carried out (the snapshot
        // will say so) or died with it: either way it is no longer in
        // flight, and convergence sends it again if the snapshot shows the
        // instance still running. A stop is idempotent on the cell.
        self.stopping
            .retain(|id, _| !cell.instances.contains_key(id));
        self.touched.all = true;
    }

    /// The cell's connection ended at `now`.
    pub fn disconnect(&mut self, id: &CellId, now: Time, wall: Timestamp) {
        if let Some(cell) = self.cells.get_mut(id) {
            if cell.liveness == Liveness::Connected {
                cell.liveness = Liveness::Disconnected { last_seen: now };
                cell.since = wall;
            }
            release_all(&mut self.tally, cell);
        }
        self.touched.all = true;
    }

    /// Convergence declared the cell lost: its instances are replaced, its
    /// placements forgotten. If it comes back, what it still runs is
    /// reconciled as stale copies.
    pub fn mark_lost(&mut self, id: &CellId, wall: Timestamp) -> Vec<Effect> {
        let Some(cell) = self.cells.get_mut(id) else {
            return Vec::new();
        };
        cell.liveness = Liveness::Lost;
        cell.since = wall;
        let gone: Vec<InstanceId> = cell.instances.keys().cloned().collect();
        for o in std::mem::take(&mut cell.instances).into_values() {
            tally(&mut self.tally, cell, &o.info, false);
            self.by_slot.remove(&o.info, &cell.id);
        }
        release_all(&mut self.tally, cell);
        self.touched.all = true;
        let mut effects = Vec::new();
        for instance in gone {
            // An LRP's placement stays: if the cell comes back with the
            // instance, the placement's generation marks it as the older
            // copy. A task is placed again (same id), so its old placement
            // goes.
            let Some(Workload::Task { task }) = self.placements.get(&instance).map(|p| &p.workload)
            else {
                continue;
            };
            if let Some(t) = self.tasks.get_mut(task) {
                if t.transition(TaskState::Pending, None, None, wall).is_ok() {
                    effects.push(Effect::PersistTask(t.clone()));
                }
            }
            self.placements.remove(&instance);
            effects.push(Effect::DeletePlacement(instance));
        }
        effects
    }

    pub fn set_draining(&mut self, id: &CellId, draining: bool) {
        if let Some(cell) = self.cells.get_mut(id) {
            if cell.draining != draining {
                self.touched.all = true;
            }
            cell.draining = draining;
        }
    }

    /// Everything the cell runs. Instances it no longer has are gone.
    pub fn apply_snapshot(
        &mut self,
        id: &CellId,
        snap: StateSnapshot,
        now: Time,
        wall: Timestamp,
    ) -> Result<Vec<Effect>, ReportError> {
        let cell = self
            .cells
            .get_mut(id)
            .ok_or_else(|| ReportError::UnknownCell(id.clone()))?;
        cell.seq = Some(snap.seq);
        cell.available = snap.available;
        cell.restored = false;
        self.touched.all = true;
        // The cell says whether it is evacuating in every snapshot: a
        // cancelled drain takes it back.
        cell.draining = snap.evacuating;
        let reported: BTreeMap<InstanceId, InstanceInfo> = snap
            .instances
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        let vanished: Vec<InstanceId> = cell
            .instances
            .keys()
            .filter(|k| !reported.contains_key(*k))
            .cloned()
            .collect();
        let mut effects = Vec::new();
        for gone in vanished {
            self.removed(id, &gone, &mut effects);
        }
        let placed_here: Vec<InstanceId> = self
            .placements
            .values()
            .filter(|p| &p.cell == id && !reported.contains_key(&p.instance))
            .map(|p| p.instance.clone())
            .collect();
        for gone in placed_here {
            // Placed here, but the cell does not have it (any more): a start
            // in flight is not reported yet, anything else is gone.
            let in_flight = self.pending.values().any(|p| p.id == gone)
                || TaskId::new(gone.as_str()).is_ok_and(|t| self.pending_tasks.contains_key(&t));
            if !in_flight {
                self.placements.remove(&gone);
                effects.push(Effect::DeletePlacement(gone));
            } else if let Some(again) = self.start_again(id, &gone, now) {
                effects.push(again);
            }
        }
        for info in reported.into_values() {
            self.upsert(id, info, now, wall, &mut effects);
        }
        Ok(effects)
    }

    /// A start in flight to `cell` that the cell's snapshot does not show:
    /// sent on an older connection (lost with it when the agent restarted)
    /// or still queued on the cell. It is sent again, its capacity held
    /// again: a start is idempotent on a cell (the same id and spec is
    /// answered as done), and the slot need not wait for the start timeout.
    /// None when the start is no longer the one wanted (the app changed
    /// version, the task ended): convergence sees to those.
    fn start_again(&mut self, cell: &CellId, id: &InstanceId, now: Time) -> Option<Effect> {
        let p = self.placements.get(id)?;
        let (spec, slot, task) = match &p.workload {
            Workload::Lrp {
                app,
                index,
                version,
            } => {
                let key = AppKey {
                    tenant: p.tenant.clone(),
                    name: app.clone(),
                };
                let slot = LrpKey::new(key.clone(), *index);
                let a = self.apps.get(&key)?;
                let pending = self.pending.get_mut(&slot)?;
                if &pending.id != id || pending.version != *version || a.version != *version {
                    return None;
                }
                // The start timeout runs from this sending.
                pending.since = now;
                (a.instance_spec(*index), Some(slot), None)
            }
            Workload::Task { task } => {
                let t = self.tasks.get(task)?;
                let since = self.pending_tasks.get_mut(task)?;
                if t.state.is_final() {
                    return None;
                }
                *since = now;
                (t.instance_spec(), None, Some(task.clone()))
            }
        };
        let app = slot.as_ref().map(|s| s.app.clone());
        self.reserve(cell, id, Capacity::of(&spec), app, now);
        Some(Effect::StartAgain {
            cell: cell.clone(),
            id: id.clone(),
            spec: Box::new(spec),
            slot,
            task,
        })
    }

    /// Changes since the last snapshot or delta.
    pub fn apply_delta(
        &mut self,
        id: &CellId,
        delta: StateDelta,
        now: Time,
        wall: Timestamp,
    ) -> Result<Vec<Effect>, ReportError> {
        let cell = self
            .cells
            .get_mut(id)
            .ok_or_else(|| ReportError::UnknownCell(id.clone()))?;
        let expected = cell.seq.map_or(0, |s| s.wrapping_add(1));
        if cell.seq.is_none() || delta.seq != expected {
            return Err(ReportError::Gap {
                cell: id.clone(),
                expected,
                got: delta.seq,
            });
        }
        cell.seq = Some(delta.seq);
        cell.available = delta.available;
        let mut effects = Vec::new();
        for change in delta.changes {
            match change {
                StateChange::Upsert { instance } => {
                    self.upsert(id, instance, now, wall, &mut effects)
                }
                StateChange::Removed { id: gone } => self.removed(id, &gone, &mut effects),
            }
        }
        Ok(effects)
    }

    fn removed(&mut self, cell: &CellId, id: &InstanceId, effects: &mut Vec<Effect>) {
        if let Some(c) = self.cells.get_mut(cell) {
            if let Some(o) = c.instances.remove(id) {
                tally(&mut self.tally, c, &o.info, false);
                self.by_slot.remove(&o.info, cell);
                if o.info.kind == InstanceKind::Lrp {
                    self.touched.slots.insert(lrp_key(&o.info));
                }
            }
            release(&mut self.tally, c, id);
        }
        self.stopping.remove(id);
        if let Some(p) = self.placements.get(id) {
            if &p.cell == cell {
                self.placements.remove(id);
                effects.push(Effect::DeletePlacement(id.clone()));
            }
        }
    }

    fn upsert(
        &mut self,
        cell_id: &CellId,
        info: InstanceInfo,
        now: Time,
        wall: Timestamp,
        effects: &mut Vec<Effect>,
    ) {
        let Some(cell) = self.cells.get_mut(cell_id) else {
            return;
        };
        let id = info.id.clone();
        let state = info.state;
        let kind = info.kind;
        let exit_code = info.exit_code;
        let reason = info.reason.clone();
        let lost = info.lost;
        // Reported: its capacity is in the cell's `available` now, so its
        // hold is released (after counting the instance itself, so that
        // the app's count on the cell does not drop to zero and come back).
        // Returned: the state before, and the slot when the state changed.
        let (old_state, changed) = match cell.instances.get_mut(&id) {
            // The same instance in a new state, or reported again: the
            // common case (starting, then running), updated in place.
            Some(o) if same_slot(&o.info, &info) => {
                let old_state = o.info.state;
                let changed = old_state != state;
                if changed {
                    o.since = now;
                    o.since_wall = wall;
                    let (was, is) = (is_live_lrp(&o.info), is_live_lrp(&info));
                    if was != is {
                        let key = lrp_key(&info).app;
                        if is {
                            self.tally.add(&key, &cell.id);
                        } else {
                            self.tally.remove(&key, &cell.id);
                        }
                    }
                    if old_state == InstanceState::Starting {
                        cell.starting = cell.starting.saturating_sub(1);
                    }
                    if state == InstanceState::Starting {
                        cell.starting = cell.starting.saturating_add(1);
                    }
                }
                let slot = changed.then(|| lrp_key(&info));
                o.info = info;
                release(&mut self.tally, cell, &id);
                (Some(old_state), slot)
            }
            _ => {
                let old = cell.instances.get(&id);
                let old_state = old.map(|o| o.info.state);
                let (since, since_wall) = match old {
                    Some(o) if o.info.state == state => (o.since, o.since_wall),
                    _ => (now, wall),
                };
                let slot = (old_state != Some(state)).then(|| lrp_key(&info));
                tally(&mut self.tally, cell, &info, true);
                release(&mut self.tally, cell, &id);
                if let Some(o) = cell.instances.get(&id) {
                    self.by_slot.remove(&o.info, cell_id);
                }
                self.by_slot.add(&info, cell_id);
                let old = cell.instances.insert(
                    id.clone(),
                    Observed {
                        info,
                        since,
                        since_wall,
                    },
                );
                if let Some(old) = old {
                    tally(&mut self.tally, cell, &old.info, false);
                }
                (old_state, slot)
            }
        };
        let Some(slot) = changed else {
            return;
        };
        match kind {
            InstanceKind::Lrp => {
                // Two reports change no decision when the instance is the
                // slot's only one (both states are live; with no other
                // copy, there is nothing to stop or prefer):
                // - it goes from starting to running;
                // - it is the start the brain asked for, of the version
                //   the app wants, for a slot the app still has, arriving
                //   live on a cell that is not draining.
                // Convergence would plan nothing for the slot (its safety
                // sweep still looks at every slot).
                let alone = self.by_slot.0.get(&slot).is_some_and(|ids| ids.len() == 1);
                let started =
                    old_state == Some(InstanceState::Starting) && state == InstanceState::Running;
                let live = matches!(state, InstanceState::Starting | InstanceState::Running);
                let arrived = old_state.is_none()
                    && live
                    && self.pending.get(&slot).is_some_and(|p| {
                        p.id == id
                            && self
                                .apps
                                .get(&slot.app)
                                .is_some_and(|a| slot.index < a.instances && a.version == p.version)
                    })
                    && self.cells.get(cell_id).is_some_and(|c| !c.draining);
                if !(alone && (started || arrived)) {
                    self.touched.slots.insert(slot.clone());
                }
                if self.pending.get(&slot).is_some_and(|p| p.id == id) {
                    self.pending.remove(&slot);
                }
                self.unplaced.remove(&slot);
                match state {
                    InstanceState::Running => {
                        if let Some(b) = self.crashes.get_mut(&slot) {
                            b.on_running_since(now);
                        }
                    }
                    InstanceState::Crashed => {
                        // A crash of the slot's current placement counts;
                        // a stale copy's does not, nor an instance its cell
                        // lost (an agent killed during its start, a node
                        // restart): restarted at once, not backed off.
                        let current = self.placements.get(&id).is_some_and(|p| &p.cell == cell_id);
                        if current && lost && self.apps.contains_key(&slot.app) {
                            effects.push(Effect::Lost {
                                slot: slot.clone(),
                                reason: reason.clone().unwrap_or_default(),
                            });
                        } else if current && self.apps.contains_key(&slot.app) {
                            let backoff = self
                                .crashes
                                .entry(slot.clone())
                                .or_insert_with(|| CrashBackoff::new(self.backoff));
                            backoff.on_crash(now);
                            let count = backoff.state().crashes;
                            effects.push(Effect::PersistCrash(CrashRecord {
                                key: crash_key(&slot),
                                count,
                                last_at: wall,
                                last_reason: reason.unwrap_or_else(|| "crashed".to_owned()),
                                revision: 0,
                            }));
                        }
                        if self.manages(&id, &slot.app) {
                            effects.push(Effect::Remove {
                                cell: cell_id.clone(),
                                id,
                            });
                        }
                    }
                    InstanceState::Exited if self.manages(&id, &slot.app) => {
                        effects.push(Effect::Remove {
                            cell: cell_id.clone(),
                            id,
                        })
                    }
                    InstanceState::Exited => {}
                    InstanceState::Starting | InstanceState::Stopping => {}
                }
            }
            InstanceKind::Task => {
                let Ok(task_id) = TaskId::new(id.as_str()) else {
                    return;
                };
                self.pending_tasks.remove(&task_id);
                let Some(task) = self.tasks.get_mut(&task_id) else {
                    // Not a task of the brain's: started through the cell's
                    // own API, it is the cell's business.
                    return;
                };
                let (to, result) = match state {
                    InstanceState::Starting | InstanceState::Running => (TaskState::Running, None),
                    InstanceState::Exited | InstanceState::Crashed => {
                        let to = if state == InstanceState::Exited && exit_code == Some(0) {
                            TaskState::Succeeded
                        } else {
                            TaskState::Failed
                        };
                        let result = TaskResult {
                            exit_code,
                            reason,
                            finished_at: wall,
                        };
                        (to, Some(result))
                    }
                    InstanceState::Stopping => return,
                };
                if task.state != to
                    && task
                        .transition(to, Some(cell_id.clone()), result, wall)
                        .is_ok()
                {
                    effects.push(Effect::PersistTask(task.clone()));
                }
                if to.is_final() {
                    effects.push(Effect::Remove {
                        cell: cell_id.clone(),
                        id,
                    });
                }
            }
        }
    }

    /// Whether the brain manages this instance: it placed it (a placement
    /// record) or it is of an app the brain has. Anything else was started
    /// through the cell's own API and is left alone.
    fn manages(&self, id: &InstanceId, app: &AppKey) -> bool {
        self.placements.contains_key(id) || self.apps.contains_key(app)
    }

    // -----------------------------------------------------------------
    // What the brain decides.

    /// The input of [`converge`](crate::converge::converge).
    pub fn converge_state(&self) -> ClusterState {
        let mut actual = Vec::new();
        for cell in self.cells.values() {
            for (id, o) in &cell.instances {
                actual.extend(self.actual(cell, id, o));
            }
        }
        ClusterState {
            desired: self.apps.values().map(DesiredApp::from).collect(),
            actual,
            cells: self.cells.values().map(Cell::status).collect(),
            pending: self
                .pending
                .iter()
                .map(|(slot, p)| PendingStart {
                    slot: slot.clone(),
                    version: p.version,
                    since: p.since,
                })
                .collect(),
            crashes: self.crashes.clone(),
        }
    }

    /// What changed since the last call (see [`Touched`]).
    pub fn take_touched(&mut self) -> Touched {
        std::mem::take(&mut self.touched)
    }

    /// What changed since [`take_touched`](Self::take_touched) last ran.
    pub fn touched(&self) -> &Touched {
        &self.touched
    }

    /// Marks an app for the next convergence pass (its desired state or
    /// a start in flight changed).
    pub fn touch(&mut self, app: AppKey) {
        self.touched.apps.insert(app);
    }

    /// Marks a slot for the next convergence pass (its start in flight
    /// changed).
    pub fn touch_slot(&mut self, slot: LrpKey) {
        self.touched.slots.insert(slot);
    }

    /// Marks everything for the next convergence pass.
    pub fn touch_all(&mut self) {
        self.touched.all = true;
    }

    /// An instance as convergence sees it, if it is a long-running one the
    /// brain manages.
    fn actual(&self, cell: &Cell, id: &InstanceId, o: &Observed) -> Option<ActualInstance> {
        if o.info.kind != InstanceKind::Lrp {
            return None;
        }
        let app = lrp_key(&o.info).app;
        if !self.manages(id, &app) {
            return None;
        }
        let (version, generation) = match self.placements.get(id) {
            Some(Placement {
                workload: Workload::Lrp { version, .. },
                revision,
                cell: placed_on,
                ..
            }) if placed_on == &cell.id => (*version, *revision),
            // Unknown to the store: an instance the brain never
            // placed (or forgot). Version 0 is never current, so
            // it is replaced, and only once its replacement runs.
            _ => (0, 0),
        };
        Some(ActualInstance {
            id: id.clone(),
            cell: cell.id.clone(),
            app,
            index: o.info.index,
            version,
            state: o.info.state,
            since: o.since,
            generation,
        })
    }

    /// The input of [`converge_slots`](crate::converge::converge_slots)
    /// for `slots` only: their apps' desired state, their instances, starts
    /// in flight and crash records, and the cells holding their instances.
    /// Convergence decides each slot from these alone, so its plan for this
    /// input is the whole plan's part for these slots (the test
    /// `converging_some_slots_plans_what_the_whole_pass_plans_for_them`).
    pub fn converge_state_for(&self, slots: &BTreeSet<LrpKey>) -> ClusterState {
        let mut state = ClusterState::default();
        let mut cells = BTreeSet::new();
        let mut apps = BTreeSet::new();
        for slot in slots {
            if apps.insert(&slot.app) {
                if let Some(app) = self.apps.get(&slot.app) {
                    state.desired.push(DesiredApp::from(app));
                }
            }
            for (id, cell_id) in self.by_slot.0.get(slot).into_iter().flatten() {
                let Some(cell) = self.cells.get(cell_id) else {
                    continue;
                };
                let Some(o) = cell.instances.get(id) else {
                    continue;
                };
                if let Some(a) = self.actual(cell, id, o) {
                    cells.insert(cell_id);
                    state.actual.push(a);
                }
            }
            if let Some(p) = self.pending.get(slot) {
                state.pending.push(PendingStart {
                    slot: slot.clone(),
                    version: p.version,
                    since: p.since,
                });
            }
            if let Some(b) = self.crashes.get(slot) {
                state.crashes.insert(slot.clone(), *b);
            }
        }
        state.cells = cells
            .into_iter()
            .filter_map(|id| self.cells.get(id))
            .map(Cell::status)
            .collect();
        state
    }

    /// The slots of `apps` that matter to convergence: every desired one,
    /// and every one with an instance, a start in flight or a crash record
    /// (of an app deleted or scaled down too).
    pub fn slots_of_apps(&self, apps: &BTreeSet<AppKey>) -> BTreeSet<LrpKey> {
        let mut slots = BTreeSet::new();
        for key in apps {
            if let Some(app) = self.apps.get(key) {
                slots.extend((0..app.instances).map(|i| LrpKey::new(key.clone(), i)));
            }
            slots.extend(self.by_slot.0.range(slots_of(key)).map(|(s, _)| s.clone()));
            slots.extend(self.pending.range(slots_of(key)).map(|(s, _)| s.clone()));
            slots.extend(self.crashes.range(slots_of(key)).map(|(s, _)| s.clone()));
        }
        slots
    }

    /// Connected cells as the auction sees them: what they report, less
    /// what is reserved on them, with the starts they report and the live
    /// (or reserved) instances of `apps` (the apps of the batch; others do not matter to
    /// the auction).
    pub fn auction_cells<'a>(
        &self,
        apps: impl IntoIterator<Item = &'a AppKey>,
    ) -> Vec<AuctionCell> {
        let mut at: BTreeMap<&CellId, usize> = BTreeMap::new();
        let mut views: Vec<AuctionCell> = Vec::new();
        for c in self
            .cells
            .values()
            .filter(|c| c.liveness == Liveness::Connected)
        {
            let mut view = AuctionCell::new(c.id.clone(), c.zone.clone(), c.total);
            view.tags = c.tags.clone();
            view.available = sub(c.available, c.reserved_total);
            view.draining = c.draining;
            if !c.missing_rootfs.is_empty() {
                view.rootfs = RootfsSupport::Except(c.missing_rootfs.clone());
            }
            // Starts in flight on the cell: those it reports, and work
            // offered or sent that it has not reported yet. A start moving
            // from held to reported leaves the count as it is, so the
            // starting weight does not depend on how soon the brain reads
            // a cell's report (counting only reported starts, the memory
            // spread of `bench auction --quic` was 5.0-6.3 % in three runs;
            // with held work counted, a median of 4.2 % in thirteen, before
            // memory counted three times in the score: docs/benchmarks.md).
            let held = u32::try_from(c.reserved.len()).unwrap_or(u32::MAX);
            view.starting = c.starting.saturating_add(held);
            at.insert(&c.id, views.len());
            views.push(view);
        }
        for app in apps {
            for (cell, &n) in self.tally.of(app).into_iter().flatten() {
                if let Some(&i) = at.get(cell) {
                    views[i].app_instances.insert(app.clone(), n);
                }
            }
        }
        views
    }

    /// Holds `need` on `cell` for `id` until the cell reports it (or the
    /// hold is released): later auctions see the capacity as taken.
    pub fn reserve(
        &mut self,
        cell: &CellId,
        id: &InstanceId,
        need: Capacity,
        app: Option<AppKey>,
        now: Time,
    ) {
        let Some(c) = self.cells.get_mut(cell) else {
            return;
        };
        release(&mut self.tally, c, id);
        if let Some(app) = &app {
            self.tally.add(app, cell);
        }
        c.reserved_total = add(c.reserved_total, need);
        c.reserved.insert(
            id.clone(),
            Reserved {
                need,
                app,
                since: now,
            },
        );
    }

    /// Gives back what `id` held on `cell` (its bid was refused, its start
    /// refused or never sent).
    pub fn release(&mut self, cell: &CellId, id: &InstanceId) {
        if let Some(c) = self.cells.get_mut(cell) {
            release(&mut self.tally, c, id);
        }
    }

    /// Gives back holds older than `timeout`: work a cell accepted but
    /// never reported (it came and went between two reports, or was lost).
    pub fn expire_reservations(&mut self, now: Time, timeout: Duration) {
        for c in self.cells.values_mut() {
            let old: Vec<InstanceId> = c
                .reserved
                .iter()
                .filter(|(_, r)| now.since(r.since) >= timeout)
                .map(|(id, _)| id.clone())
                .collect();
            for id in old {
                release(&mut self.tally, c, &id);
            }
        }
    }

    /// Tasks waiting to be placed: pending in the store, not in flight.
    pub fn tasks_to_place(&self) -> Vec<&Task> {
        self.tasks
            .values()
            .filter(|t| t.state == TaskState::Pending && !self.pending_tasks.contains_key(&t.id))
            .collect()
    }

    /// Forgets starts in flight that are older than `timeout` (their auction
    /// or cell never answered); convergence asks again.
    pub fn expire_pending(&mut self, now: Time, timeout: Duration) {
        self.pending.retain(|_, p| now.since(p.since) < timeout);
        self.pending_tasks
            .retain(|_, since| now.since(*since) < timeout);
    }

    /// Whether a stop for `id` was sent less than `resend` ago.
    pub fn stop_in_flight(&self, id: &InstanceId, now: Time, resend: Duration) -> bool {
        self.stopping
            .get(id)
            .is_some_and(|sent| now.since(*sent) < resend)
    }

    // -----------------------------------------------------------------
    // What the API shows.

    pub fn view(&self) -> ActualSnapshot {
        let mut snap = ActualSnapshot::default();
        for (slot, (reason, since)) in &self.unplaced {
            // Only while the slot is still wanted.
            let wanted = self
                .apps
                .get(&slot.app)
                .is_some_and(|a| slot.index < a.instances);
            if wanted {
                snap.unplaced.push(UnplacedView {
                    tenant: slot.app.tenant.clone(),
                    app: slot.app.name.clone(),
                    index: slot.index,
                    reason: reason.clone(),
                    since: *since,
                });
            }
        }
        for c in self.cells.values() {
            let state = match c.liveness {
                Liveness::Connected if c.draining => CellState::Draining,
                Liveness::Connected => CellState::Connected,
                Liveness::Disconnected { .. } | Liveness::Lost => CellState::Lost,
            };
            snap.cells.push(ApiCell {
                id: c.id.clone(),
                zone: c.zone.clone(),
                tags: c.tags.clone(),
                state,
                total: c.total,
                available: c.available,
                instances: u32::try_from(c.instances.len()).unwrap_or(u32::MAX),
                since: c.since,
            });
            if c.liveness == Liveness::Lost {
                continue;
            }
            for o in c.instances.values() {
                snap.instances.push(InstanceView {
                    id: o.info.id.clone(),
                    tenant: o.info.tenant.clone(),
                    app: o.info.app.clone(),
                    index: o.info.index,
                    cell: c.id.clone(),
                    state: o.info.state,
                    address: o.info.address.map(IpAddr::V4),
                    since: o.since_wall,
                    reason: o.info.reason.clone(),
                });
            }
        }
        snap
    }

    /// How to reach each cell's instances: every cell not declared lost
    /// that announced a subnet and a node address.
    pub fn routes(&self) -> Vec<Route> {
        self.cells
            .values()
            .filter(|c| c.liveness != Liveness::Lost)
            .filter_map(|c| {
                Some(Route {
                    cell: c.id.clone(),
                    subnet: c.subnet?,
                    via: *c.addresses.first()?,
                })
            })
            .collect()
    }

    /// Every instance with an address on a cell not declared lost: the
    /// cluster-wide endpoint map of the data plane.
    pub fn endpoints(&self) -> BTreeMap<std::net::Ipv4Addr, RemoteEndpoint> {
        let mut map = BTreeMap::new();
        for c in self.cells.values().filter(|c| c.liveness != Liveness::Lost) {
            for o in c.instances.values() {
                let holds = matches!(
                    o.info.state,
                    InstanceState::Starting | InstanceState::Running | InstanceState::Stopping
                );
                if let (true, Some(addr)) = (holds, o.info.address) {
                    map.insert(
                        addr,
                        RemoteEndpoint {
                            addr,
                            tenant: o.info.tenant.clone(),
                            app: o.info.app.clone(),
                            instance: o.info.id.clone(),
                            cell: c.id.clone(),
                        },
                    );
                }
            }
        }
        map
    }

    /// Every app's service: for each app with a VIP and ports, the
    /// addresses of its instances that run, say they are ready and have an
    /// address, on cells not declared lost (as [`endpoints`](Self::endpoints)),
    /// sorted, at most [`MAX_SERVICE_BACKENDS`]. One walk over the
    /// instances, like `endpoints`.
    pub fn services(&self) -> BTreeMap<std::net::Ipv4Addr, Service> {
        let mut backends: BTreeMap<AppKey, BTreeSet<std::net::Ipv4Addr>> = self
            .apps
            .iter()
            .filter(|(_, a)| a.vip.is_some() && !a.ports.is_empty())
            .map(|(k, _)| (k.clone(), BTreeSet::new()))
            .collect();
        if !backends.is_empty() {
            for c in self.cells.values().filter(|c| c.liveness != Liveness::Lost) {
                for o in c.instances.values() {
                    let i = &o.info;
                    let (InstanceState::Running, true, Some(addr)) = (i.state, i.ready, i.address)
                    else {
                        continue;
                    };
                    let key = AppKey {
                        tenant: i.tenant.clone(),
                        name: i.app.clone(),
                    };
                    if let Some(set) = backends.get_mut(&key) {
                        set.insert(addr);
                    }
                }
            }
        }
        let mut out = BTreeMap::new();
        for (key, set) in backends {
            let Some(app) = self.apps.get(&key) else {
                continue;
            };
            let Some(vip) = app.vip else { continue };
            out.insert(
                vip,
                Service {
                    vip,
                    tenant: app.tenant.clone(),
                    app: app.name.clone(),
                    ports: app.ports.clone(),
                    backends: set.into_iter().take(MAX_SERVICE_BACKENDS).collect(),
                },
            );
        }
        out
    }

    /// Counts for metrics: desired and actual (running) LRP instances.
    pub fn instance_counts(&self) -> (u64, u64) {
        let desired = self.apps.values().map(|a| u64::from(a.instances)).sum();
        let running = self
            .cells
            .values()
            .filter(|c| c.liveness != Liveness::Lost)
            .flat_map(|c| c.instances.values())
            .filter(|o| o.info.kind == InstanceKind::Lrp && o.info.state == InstanceState::Running)
            .count();
        (desired, running as u64)
    }
}

/// An instance record standing for a placement until its cell reports.
fn cluster_placeholder(
    p: &Placement,
    apps: &BTreeMap<AppKey, App>,
    tasks: &BTreeMap<TaskId, Task>,
) -> Option<InstanceInfo> {
    let (spec, kind) = match &p.workload {
        Workload::Lrp { app, index, .. } => {
            let key = AppKey {
                tenant: p.tenant.clone(),
                name: app.clone(),
            };
            (apps.get(&key)?.instance_spec(*index), InstanceKind::Lrp)
        }
        Workload::Task { task } => {
            let t = tasks.get(task)?;
            if t.state.is_final() {
                return None;
            }
            (t.instance_spec(), InstanceKind::Task)
        }
    };
    let status = corral_proto::Status {
        state: InstanceState::Running,
        ..corral_proto::Status::new()
    };
    let mut info = InstanceInfo::new(&p.instance, &spec, &status);
    info.kind = kind;
    Some(info)
}
/// The zone of a cell known only from the store, until it says hello.
fn unknown_zone() -> Zone {
    #[allow(clippy::expect_used)]
    Zone::new("unknown").expect("\"unknown\" is a valid zone name")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::converge::{converge, converge_slots, Action, ConvergeConfig};
    use corral_proto::wire::{Hello, SUPPORTED_VERSIONS};
    use corral_proto::{AppId, TenantId};

    fn cell_id(s: &str) -> CellId {
        CellId::new(s).unwrap()
    }

    fn hello(cell: &str, subnet: &str, addr: &str) -> Hello {
        let cap = Capacity {
            memory_mb: 1024,
            disk_mb: 1024,
            containers: 10,
        };
        Hello {
            versions: SUPPORTED_VERSIONS,
            cell: cell_id(cell),
            zone: Zone::new("z").unwrap(),
            tags: BTreeSet::new(),
            total: cap,
            available: cap,
            subnet: Some(subnet.parse().unwrap()),
            addresses: vec![addr.parse().unwrap()],
        }
    }

    /// A cluster restored at time zero from a store holding only `apps`.
    fn with_apps(apps: Vec<App>) -> Cluster {
        Cluster::restore(
            BackoffConfig::default(),
            Snapshot {
                apps,
                ..Snapshot::default()
            },
            Time::ZERO,
            Timestamp(1),
        )
    }

    fn app(name: &str, instances: u32) -> App {
        serde_json::from_value::<crate::desired::NewApp>(serde_json::json!({
            "name": name, "instances": instances, "rootfs": "/r", "command": ["x"],
            "resources": {"memory_mb": 8},
        }))
        .unwrap()
        .into_app(TenantId::new("acme").unwrap(), Timestamp(1))
        .unwrap()
    }

    fn info(
        id: &str,
        app: &str,
        index: u32,
        state: InstanceState,
        addr: Option<&str>,
    ) -> InstanceInfo {
        let a = self::app(app, 1);
        let spec = a.instance_spec(index);
        let status = corral_proto::Status {
            state,
            exit_code: (state == InstanceState::Crashed).then_some(1),
            ..corral_proto::Status::new()
        };
        let mut i = InstanceInfo::new(&InstanceId::new(id).unwrap(), &spec, &status);
        i.address = addr.map(|a| a.parse().unwrap());
        i
    }

    fn snapshot(seq: u64, instances: Vec<InstanceInfo>) -> StateSnapshot {
        StateSnapshot {
            seq,
            available: Capacity::default(),
            evacuating: false,
            instances,
        }
    }

    fn placement(id: &str, cell: &str, app: &str, index: u32, revision: u64) -> Placement {
        Placement {
            instance: InstanceId::new(id).unwrap(),
            cell: cell_id(cell),
            tenant: TenantId::new("acme").unwrap(),
            workload: Workload::Lrp {
                app: AppId::new(app).unwrap(),
                index,
                version: 1,
            },
            since: Timestamp(1),
            revision,
        }
    }

    /// A small seeded generator: `next(n)` is below `n`.
    fn below(seed: u64) -> impl FnMut(u64) -> u64 {
        let mut rng = seed;
        move |n| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % n
        }
    }

    /// The slot an action is about, if any.
    fn action_slot(a: &Action) -> Option<&LrpKey> {
        match a {
            Action::Start { slot, .. }
            | Action::Stop { slot, .. }
            | Action::RestartAt { slot, .. } => Some(slot),
            Action::MarkCellLost { .. } => None,
        }
    }

    /// The counts `Cluster` keeps as reports come (live instances per app
    /// and cell, starts per cell, instances per slot), recomputed from
    /// scratch.
    fn recount(c: &Cluster) -> (AppTally, BTreeMap<CellId, u32>, BySlot) {
        let mut tally = AppTally::default();
        let mut starting = BTreeMap::new();
        let mut by_slot = BySlot::default();
        for (id, cell) in &c.cells {
            let mut n = 0;
            for o in cell.instances.values() {
                if is_live_lrp(&o.info) {
                    tally.add(&lrp_key(&o.info).app, id);
                }
                if o.info.state == InstanceState::Starting {
                    n += 1;
                }
                by_slot.add(&o.info, id);
            }
            for r in cell.reserved.values() {
                if let Some(app) = &r.app {
                    tally.add(app, id);
                }
            }
            starting.insert(id.clone(), n);
        }
        (tally, starting, by_slot)
    }

    #[test]
    fn the_start_asked_for_arriving_as_asked_touches_nothing_and_anything_else_does() {
        let cfg = ConvergeConfig::default();
        // (pending id matches, app instances, pending version offset, draining)
        let cases = [
            (true, 2, 0, false, false),
            (false, 2, 0, false, true),
            (true, 1, 0, false, true),
            (true, 2, 1, false, true),
            (true, 2, 0, true, true),
        ];
        for (same_id, instances, stale, draining, touched) in cases {
            let mut c = with_apps(vec![app("a0", instances)]);
            let cell = cell_id("c0");
            c.connect(&hello("c0", "10.244.0.0/24", "10.99.0.2"), Timestamp(1));
            c.apply_snapshot(&cell, snapshot(0, vec![]), Time::ZERO, Timestamp(1))
                .unwrap();
            c.set_draining(&cell, draining);
            let key = app("a0", 1).key();
            let slot = LrpKey::new(key.clone(), 1);
            let version = c.apps[&key].version + stale;
            let asked = if same_id { "a0-1-x" } else { "a0-1-y" };
            c.pending.insert(
                slot.clone(),
                Pending {
                    id: InstanceId::new(asked).unwrap(),
                    version,
                    since: Time::ZERO,
                },
            );
            c.placements.insert(
                InstanceId::new("a0-1-x").unwrap(),
                placement("a0-1-x", "c0", "a0", 1, 1),
            );
            c.take_touched();
            let delta = StateDelta {
                seq: 1,
                available: Capacity::default(),
                changes: vec![StateChange::Upsert {
                    instance: info("a0-1-x", "a0", 1, InstanceState::Starting, None),
                }],
            };
            let now = Time::from_secs(1);
            c.apply_delta(&cell, delta, now, Timestamp(2)).unwrap();
            let case = (same_id, instances, stale, draining);
            assert_eq!(c.take_touched().slots.contains(&slot), touched, "{case:?}");
            if !touched {
                // What a pass over the slot would have planned: nothing.
                let slots = [slot.clone()].into();
                let plan = converge_slots(&cfg, &c.converge_state_for(&slots), now, Some(&slots));
                assert!(plan.actions.is_empty(), "{case:?}: {:?}", plan.actions);
            }
        }
    }

    #[test]
    fn counts_kept_as_reports_come_equal_counts_made_from_scratch() {
        let states = [
            InstanceState::Starting,
            InstanceState::Running,
            InstanceState::Stopping,
            InstanceState::Crashed,
            InstanceState::Exited,
        ];
        for seed in 0..300u64 {
            let mut next = below(seed);
            let mut c = with_apps(vec![app("a0", 3), app("a1", 2)]);
            let cells: Vec<CellId> = (0..3).map(|i| cell_id(&format!("c{i}"))).collect();
            for (i, cell) in cells.iter().enumerate() {
                let subnet = format!("10.244.{i}.0/24");
                c.connect(&hello(cell.as_str(), &subnet, "10.99.0.2"), Timestamp(1));
                c.apply_snapshot(cell, snapshot(0, vec![]), Time::ZERO, Timestamp(1))
                    .unwrap();
            }
            let mut seq = [0u64; 3];
            for step in 0..60 {
                let at = next(3) as usize;
                let cell = &cells[at];
                // Ids are per cell, so that no id is on two cells at once.
                let id = format!("i{}-c{at}", next(6));
                let (a, index) = (format!("a{}", next(3)), next(3) as u32);
                let now = Time::from_secs(step);
                match next(5) {
                    0 => c.reserve(
                        cell,
                        &InstanceId::new(&id).unwrap(),
                        Capacity::default(),
                        Some(app(&a, 1).key()),
                        now,
                    ),
                    1 => c.release(cell, &InstanceId::new(&id).unwrap()),
                    kind => {
                        let change = if kind == 2 {
                            StateChange::Removed {
                                id: InstanceId::new(&id).unwrap(),
                            }
                        } else {
                            let state = states[next(states.len() as u64) as usize];
                            let mut i = info(&id, &a, index, state, None);
                            if next(4) == 0 {
                                i.kind = InstanceKind::Task;
                            }
                            StateChange::Upsert { instance: i }
                        };
                        seq[at] += 1;
                        let delta = StateDelta {
                            seq: seq[at],
                            available: Capacity::default(),
                            changes: vec![change],
                        };
                        c.apply_delta(cell, delta, now, Timestamp(2)).unwrap();
                    }
                }
                let (tally, starting, by_slot) = recount(&c);
                assert_eq!(c.tally.0, tally.0, "seed {seed}, step {step}: live per app");
                for (id, n) in starting {
                    assert_eq!(c.cells[&id].starting, n, "seed {seed}, step {step}: {id}");
                }
                assert_eq!(c.by_slot.0, by_slot.0, "seed {seed}, step {step}: by slot");
            }
        }
    }

    #[test]
    fn converging_some_slots_plans_what_the_whole_pass_plans_for_them() {
        let cfg = ConvergeConfig::default();
        let states = [
            InstanceState::Starting,
            InstanceState::Running,
            InstanceState::Running,
            InstanceState::Crashed,
            InstanceState::Exited,
        ];
        for seed in 0..200u64 {
            let mut next = below(seed);
            let mut apps = Vec::new();
            for a in 0..4 {
                if next(5) > 0 {
                    apps.push(app(&format!("a{a}"), next(4) as u32));
                }
            }
            let mut c = with_apps(apps);
            let now = Time::from_secs(100);
            for cell in 0..4 {
                let name = format!("c{cell}");
                let subnet = format!("10.244.{cell}.0/24");
                c.connect(&hello(&name, &subnet, "10.99.0.2"), Timestamp(1));
                let mut instances = Vec::new();
                for i in 0..next(6) {
                    let (a, index) = (next(5), next(5) as u32);
                    let id = format!("a{a}-{index}-{cell}{i}");
                    let state = states[next(states.len() as u64) as usize];
                    instances.push(info(&id, &format!("a{a}"), index, state, None));
                    if next(3) > 0 {
                        let p = placement(&id, &name, &format!("a{a}"), index, next(10));
                        c.placements.insert(InstanceId::new(&id).unwrap(), p);
                    }
                }
                let snap = snapshot(0, instances);
                c.apply_snapshot(&cell_id(&name), snap, now, Timestamp(2))
                    .unwrap();
                match next(4) {
                    0 => {
                        let seen = Time::from_secs(100 - next(20));
                        c.disconnect(&cell_id(&name), seen, Timestamp(3));
                    }
                    1 => c.set_draining(&cell_id(&name), true),
                    _ => {}
                }
            }
            for a in 0..5 {
                if next(3) == 0 {
                    let slot = LrpKey::new(app(&format!("a{a}"), 1).key(), next(3) as u32);
                    let since = Time::from_secs(next(100));
                    let id = InstanceId::new("p").unwrap();
                    c.pending.insert(
                        slot,
                        Pending {
                            id,
                            version: 1,
                            since,
                        },
                    );
                }
            }
            let whole = converge(&cfg, &c.converge_state(), now);
            for a in 0..5 {
                let key = app(&format!("a{a}"), 1).key();
                // The whole app, then one slot of it.
                let all = c.slots_of_apps(&[key.clone()].into());
                let one: BTreeSet<LrpKey> = [LrpKey::new(key.clone(), next(4) as u32)].into();
                for slots in [all, one] {
                    let state = c.converge_state_for(&slots);
                    let part = converge_slots(&cfg, &state, now, Some(&slots));
                    let mine: Vec<&Action> = whole
                        .actions
                        .iter()
                        .filter(|x| action_slot(x).is_some_and(|s| slots.contains(s)))
                        .collect();
                    let got: Vec<&Action> = part
                        .actions
                        .iter()
                        .filter(|x| action_slot(x).is_some())
                        .collect();
                    assert_eq!(got, mine, "seed {seed}, slots {slots:?}");
                    // A cell it marks lost, the whole pass marks lost too.
                    for lost in part.actions.iter().filter(|x| action_slot(x).is_none()) {
                        assert!(whole.actions.contains(lost), "seed {seed}: {lost:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn after_a_restart_placed_instances_count_until_the_grace_and_reconnect_slack_end() {
        let snap = Snapshot {
            revision: 5,
            apps: vec![app("web", 1)],
            placements: vec![placement("web-0-a", "c1", "web", 0, 4)],
            ..Snapshot::default()
        };
        let now = Time::from_secs(1000);
        let c = Cluster::restore(BackoffConfig::default(), snap, now, Timestamp(1));
        let cfg = ConvergeConfig::default();
        let plan = converge(&cfg, &c.converge_state(), now);
        assert!(plan.actions.is_empty(), "{plan:?}");
        // A cell needs up to the slack to notice the restart and reconnect.
        let grace_only = now.plus(cfg.lost_cell_grace);
        let plan = converge(&cfg, &c.converge_state(), grace_only);
        assert!(plan.actions.is_empty(), "{plan:?}");
        let later = grace_only.plus(RESTART_RECONNECT_SLACK);
        let plan = converge(&cfg, &c.converge_state(), later);
        assert!(
            matches!(plan.actions[0], Action::MarkCellLost { .. }),
            "{plan:?}"
        );
    }

    /// What the brain kill -9 fault test found: placements in the store
    /// are not all running. One was recorded just before the brain died
    /// and never reached the cell; another was stopped (scaled down) and is
    /// still stopping. Until the cell reports, they count (no new copy is
    /// started) but decide nothing: neither is kept at the expense of a
    /// real copy, nor stopped.
    #[test]
    fn after_a_restart_a_cell_is_judged_on_its_report_not_on_the_placements() {
        let mut api = app("api", 1);
        api.version = 2;
        let mut api_new = placement("api-0-new", "c1", "api", 0, 9);
        api_new.workload = Workload::Lrp {
            app: AppId::new("api").unwrap(),
            index: 0,
            version: 2,
        };
        let snap = Snapshot {
            revision: 10,
            apps: vec![app("web", 2), api],
            placements: vec![
                placement("web-0-a", "c1", "web", 0, 2),
                placement("web-1-a", "c1", "web", 1, 4),
                placement("web-1-b", "c1", "web", 1, 8),
                placement("api-0-old", "c1", "api", 0, 3),
                api_new,
            ],
            ..Snapshot::default()
        };
        let now = Time::from_secs(1000);
        let mut c = Cluster::restore(BackoffConfig::default(), snap, now, Timestamp(1));
        let cfg = ConvergeConfig::default();
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(2));
        let plan = converge(&cfg, &c.converge_state(), now);
        assert!(
            plan.actions.is_empty(),
            "decided before the report: {plan:?}"
        );
        let report = vec![
            info("web-0-a", "web", 0, InstanceState::Running, None),
            info("web-1-a", "web", 1, InstanceState::Stopping, None),
            info("api-0-old", "api", 0, InstanceState::Running, None),
        ];
        let effects = c
            .apply_snapshot(&cell_id("c1"), snapshot(0, report), now, Timestamp(3))
            .unwrap();
        let forgotten: BTreeSet<String> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::DeletePlacement(id) => Some(id.to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(forgotten, ["api-0-new", "web-1-b"].map(String::from).into());
        // web/1 starts again, api/0 is updated; nothing real is stopped.
        let plan = converge(&cfg, &c.converge_state(), now);
        let starts: Vec<(String, &crate::converge::StartReason)> = plan
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Start { slot, reason, .. } => Some((slot.to_string(), reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            starts,
            [
                (
                    "acme/api/0".to_owned(),
                    &crate::converge::StartReason::Update {
                        instance: InstanceId::new("api-0-old").unwrap()
                    }
                ),
                (
                    "acme/web/1".to_owned(),
                    &crate::converge::StartReason::Missing
                ),
            ]
        );
        assert_eq!(plan.actions.len(), 2, "{plan:?}");
    }

    #[test]
    fn a_crash_is_counted_and_removed_but_a_local_instance_is_left_alone() {
        let mut c = with_apps(vec![app("web", 1)]);
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        c.placements.insert(
            InstanceId::new("web-0-a").unwrap(),
            placement("web-0-a", "c1", "web", 0, 3),
        );
        let crashed = info("web-0-a", "web", 0, InstanceState::Crashed, None);
        let local = info("mine", "other", 0, InstanceState::Exited, None);
        let effects = c
            .apply_snapshot(
                &cell_id("c1"),
                snapshot(0, vec![crashed, local]),
                Time::from_secs(1),
                Timestamp(2),
            )
            .unwrap();
        assert!(
            effects
                .iter()
                .any(|e| matches!(e, Effect::PersistCrash(r) if r.count == 1)),
            "{effects:?}"
        );
        let removed: Vec<&InstanceId> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Remove { id, .. } => Some(id),
                _ => None,
            })
            .collect();
        assert_eq!(removed, vec![&InstanceId::new("web-0-a").unwrap()]);
        // The local instance is not the brain's: convergence does not see it.
        assert!(c
            .converge_state()
            .actual
            .iter()
            .all(|a| a.id.as_str() != "mine"));
    }

    #[test]
    fn an_instance_its_cell_lost_is_removed_and_restarted_without_counting_a_crash() {
        let mut c = with_apps(vec![app("web", 1)]);
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        let mut lost = info("web-0-a", "web", 0, InstanceState::Starting, None);
        let mut status = corral_proto::Status::new();
        status
            .apply(
                InstanceKind::Lrp,
                corral_proto::Event::Lost {
                    reason: "no runtime record".into(),
                    at: Timestamp(2),
                },
            )
            .unwrap();
        (lost.state, lost.lost, lost.reason) = (status.state, status.lost, status.reason);
        assert!(lost.lost && lost.state == InstanceState::Crashed);
        // Lost four times: a crash each would back the slot off (the fourth
        // waits 30 s); lost, it is started again at once every time.
        for n in 0..4 {
            let id = format!("web-0-{n}");
            c.placements.insert(
                InstanceId::new(&id).unwrap(),
                placement(&id, "c1", "web", 0, 3 + n),
            );
            lost.id = InstanceId::new(&id).unwrap();
            let effects = c
                .apply_snapshot(
                    &cell_id("c1"),
                    snapshot(n, vec![lost.clone()]),
                    Time::from_secs(n + 1),
                    Timestamp(2),
                )
                .unwrap();
            assert!(
                !effects.iter().any(|e| matches!(e, Effect::PersistCrash(_))),
                "{effects:?}"
            );
            assert!(effects.iter().any(|e| matches!(e, Effect::Lost { .. })));
            assert!(effects.iter().any(|e| matches!(e, Effect::Remove { .. })));
            c.removed(&cell_id("c1"), &lost.id, &mut Vec::new());
        }
        assert!(c.crashes.is_empty());
    }

    #[test]
    fn a_start_in_flight_that_a_reconnected_cell_does_not_show_is_sent_again() {
        let mut c = with_apps(vec![app("web", 2)]);
        let c1 = hello("c1", "10.244.1.0/24", "10.99.0.2");
        c.connect(&c1, Timestamp(1));
        let key = app("web", 2).key();
        assert_eq!(c.apps[&key].version, 1);
        for (index, id) in [(0, "web-0-a"), (1, "web-1-a")] {
            c.pending.insert(
                LrpKey::new(key.clone(), index),
                Pending {
                    id: InstanceId::new(id).unwrap(),
                    version: 1,
                    since: Time::ZERO,
                },
            );
            c.placements.insert(
                InstanceId::new(id).unwrap(),
                placement(id, "c1", "web", index, 2),
            );
        }
        // The agent restarted: web-0-a had been admitted, web-1-a was lost
        // with the old connection.
        c.connect(&c1, Timestamp(2));
        let shown = info("web-0-a", "web", 0, InstanceState::Starting, None);
        let effects = c
            .apply_snapshot(
                &cell_id("c1"),
                snapshot(0, vec![shown]),
                Time::from_secs(1),
                Timestamp(2),
            )
            .unwrap();
        let again: Vec<_> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::StartAgain {
                    cell,
                    id,
                    spec,
                    slot,
                    task,
                } => Some((
                    cell.as_str(),
                    id.as_str(),
                    spec.index,
                    slot.clone(),
                    task.clone(),
                )),
                _ => None,
            })
            .collect();
        assert_eq!(
            again,
            [("c1", "web-1-a", 1, Some(LrpKey::new(key.clone(), 1)), None)],
            "{effects:?}"
        );
        // Its start timeout runs from now, and its capacity is held again
        // until the cell reports it.
        let slot1 = LrpKey::new(key.clone(), 1);
        assert_eq!(c.pending[&slot1].since, Time::from_secs(1));
        assert!(c.cells[&cell_id("c1")]
            .reserved
            .contains_key(&InstanceId::new("web-1-a").unwrap()));
        // Not once the app moved on to another version: convergence
        // replaces it.
        c.apps.get_mut(&key).unwrap().version = 2;
        let effects = c
            .apply_snapshot(
                &cell_id("c1"),
                snapshot(1, vec![]),
                Time::from_secs(2),
                Timestamp(3),
            )
            .unwrap();
        assert!(
            !effects
                .iter()
                .any(|e| matches!(e, Effect::StartAgain { .. })),
            "{effects:?}"
        );
    }

    #[test]
    fn a_stop_sent_on_an_older_connection_is_no_longer_in_flight_once_the_cell_reconnects() {
        let mut c = with_apps(vec![app("web", 2)]);
        let (c1, c2) = (
            hello("c1", "10.244.1.0/24", "10.99.0.2"),
            hello("c2", "10.244.2.0/24", "10.99.0.3"),
        );
        c.connect(&c1, Timestamp(1));
        c.connect(&c2, Timestamp(1));
        let running = |id, index| info(id, "web", index, InstanceState::Running, None);
        c.apply_snapshot(
            &cell_id("c1"),
            snapshot(0, vec![running("w0", 0)]),
            Time::ZERO,
            Timestamp(1),
        )
        .unwrap();
        c.apply_snapshot(
            &cell_id("c2"),
            snapshot(0, vec![running("w1", 1)]),
            Time::ZERO,
            Timestamp(1),
        )
        .unwrap();
        let now = Time::from_secs(1);
        let resend = Duration::from_secs(30);
        for id in ["w0", "w1"] {
            c.stopping.insert(InstanceId::new(id).unwrap(), Time::ZERO);
        }
        // c1's agent restarts: its connection is new, its older stop gone
        // with the old one; c2's stop is still in flight.
        c.connect(&c1, Timestamp(2));
        assert!(!c.stop_in_flight(&InstanceId::new("w0").unwrap(), now, resend));
        assert!(c.stop_in_flight(&InstanceId::new("w1").unwrap(), now, resend));
    }

    #[test]
    fn a_delta_that_does_not_follow_on_asks_for_a_snapshot() {
        let mut c = with_apps(vec![]);
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        let delta = |seq| StateDelta {
            seq,
            available: Capacity::default(),
            changes: vec![],
        };
        // No snapshot yet.
        assert!(c
            .apply_delta(&cell_id("c1"), delta(1), Time::ZERO, Timestamp(1))
            .is_err());
        c.apply_snapshot(
            &cell_id("c1"),
            snapshot(7, vec![]),
            Time::ZERO,
            Timestamp(1),
        )
        .unwrap();
        assert!(c
            .apply_delta(&cell_id("c1"), delta(8), Time::ZERO, Timestamp(1))
            .is_ok());
        let err = c
            .apply_delta(&cell_id("c1"), delta(10), Time::ZERO, Timestamp(1))
            .unwrap_err();
        assert_eq!(
            err,
            ReportError::Gap {
                cell: cell_id("c1"),
                expected: 9,
                got: 10
            }
        );
    }

    #[test]
    fn routes_and_endpoints_cover_every_cell_not_lost() {
        let mut c = with_apps(vec![]);
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        c.connect(&hello("c2", "10.244.2.0/24", "10.99.0.3"), Timestamp(1));
        for (cell, id, addr) in [("c1", "a", "10.244.1.2"), ("c2", "b", "10.244.2.2")] {
            let running = info(id, "web", 0, InstanceState::Running, Some(addr));
            let ended = info(
                &format!("{id}-old"),
                "web",
                1,
                InstanceState::Exited,
                Some("10.244.9.9"),
            );
            c.apply_snapshot(
                &cell_id(cell),
                snapshot(0, vec![running, ended]),
                Time::ZERO,
                Timestamp(1),
            )
            .unwrap();
        }
        let routes = c.routes();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[1].via.to_string(), "10.99.0.3");
        let eps = c.endpoints();
        assert_eq!(eps.len(), 2, "ended instances hold no address: {eps:?}");
        assert_eq!(eps[&"10.244.2.2".parse().unwrap()].cell, cell_id("c2"));

        // A disconnected cell keeps its routes (its instances may still
        // serve); a lost one does not.
        c.disconnect(&cell_id("c2"), Time::from_secs(1), Timestamp(2));
        assert_eq!(c.routes().len(), 2);
        c.mark_lost(&cell_id("c2"), Timestamp(3));
        assert_eq!(c.routes().len(), 1);
        assert_eq!(c.endpoints().len(), 1);
    }

    #[test]
    fn services_list_ready_running_instances_with_an_address_on_cells_not_lost() {
        let mut web = app("web", 3);
        web.ports = vec![corral_proto::service::PortSpec::tcp(8080)];
        web.vip = Some("10.96.0.1".parse().unwrap());
        let mut hidden = app("hidden", 1);
        hidden.vip = Some("10.96.0.2".parse().unwrap()); // no ports: no service
        let snap = Snapshot {
            apps: vec![web, hidden, app("plain", 1)],
            ..Snapshot::default()
        };
        let mut c = Cluster::restore(BackoffConfig::default(), snap, Time::ZERO, Timestamp(1));
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        c.connect(&hello("c2", "10.244.2.0/24", "10.99.0.3"), Timestamp(1));
        let ready = |id: &str, app: &str, addr: &str| {
            let mut i = info(id, app, 0, InstanceState::Running, Some(addr));
            i.ready = true;
            i
        };
        let mut not_ready = info("w-2", "web", 2, InstanceState::Running, Some("10.244.1.4"));
        not_ready.ready = false;
        let mut no_addr = ready("w-3", "web", "10.244.1.5");
        no_addr.address = None;
        let mut starting = ready("w-4", "web", "10.244.1.6");
        starting.state = InstanceState::Starting;
        c.apply_snapshot(
            &cell_id("c1"),
            snapshot(
                0,
                vec![
                    ready("w-1", "web", "10.244.1.3"),
                    ready("w-0", "web", "10.244.1.2"),
                    not_ready,
                    no_addr,
                    starting,
                    ready("p-0", "plain", "10.244.1.9"),
                    ready("h-0", "hidden", "10.244.1.10"),
                ],
            ),
            Time::ZERO,
            Timestamp(1),
        )
        .unwrap();
        c.apply_snapshot(
            &cell_id("c2"),
            snapshot(0, vec![ready("w-9", "web", "10.244.2.2")]),
            Time::ZERO,
            Timestamp(1),
        )
        .unwrap();
        let s = c.services();
        assert_eq!(s.len(), 1, "{s:?}");
        let web = &s[&"10.96.0.1".parse().unwrap()];
        let addrs: Vec<String> = web.backends.iter().map(|a| a.to_string()).collect();
        assert_eq!(addrs, vec!["10.244.1.2", "10.244.1.3", "10.244.2.2"]);
        assert_eq!((web.tenant.as_str(), web.app.as_str()), ("acme", "web"));
        assert!(web.check().is_empty());

        // A disconnected cell's instances still serve; a lost one's do not.
        c.disconnect(&cell_id("c2"), Time::from_secs(1), Timestamp(2));
        assert_eq!(
            c.services()[&"10.96.0.1".parse().unwrap()].backends.len(),
            3
        );
        c.mark_lost(&cell_id("c2"), Timestamp(3));
        assert_eq!(
            c.services()[&"10.96.0.1".parse().unwrap()].backends.len(),
            2
        );
        // An app without ready instances still has its service, empty.
        c.apps.values_mut().for_each(|a| a.instances = 0);
        c.cells.clear();
        assert!(c.services()[&"10.96.0.1".parse().unwrap()]
            .backends
            .is_empty());
    }

    #[test]
    fn reserved_work_counts_until_its_cell_reports_it() {
        let mut c = with_apps(vec![]);
        c.connect(&hello("c1", "10.244.1.0/24", "10.99.0.2"), Timestamp(1));
        let full = Capacity {
            memory_mb: 1024,
            disk_mb: 1024,
            containers: 10,
        };
        let snap = StateSnapshot {
            available: full,
            ..snapshot(0, vec![])
        };
        c.apply_snapshot(&cell_id("c1"), snap, Time::ZERO, Timestamp(1))
            .unwrap();
        let web = AppKey {
            tenant: TenantId::new("acme").unwrap(),
            name: AppId::new("web").unwrap(),
        };
        let apps: BTreeSet<AppKey> = [web.clone()].into();
        let need = Capacity {
            memory_mb: 100,
            disk_mb: 10,
            containers: 1,
        };
        let a = InstanceId::new("a").unwrap();
        let b = InstanceId::new("b").unwrap();
        c.reserve(&cell_id("c1"), &a, need, Some(web.clone()), Time::ZERO);
        c.reserve(&cell_id("c1"), &b, need, Some(web.clone()), Time::ZERO);
        let view = &c.auction_cells(&apps)[0];
        assert_eq!(view.available.memory_mb, 1024 - 200);
        assert_eq!(view.available.containers, 10 - 2);
        assert_eq!(view.app_instances.get(&web), Some(&2));
        // Held work is starting on the cell, for the starting weight.
        assert_eq!(view.starting, 2);
        // Only the batch's apps are counted.
        assert!(c.auction_cells(&BTreeSet::<AppKey>::new())[0]
            .app_instances
            .is_empty());

        // A refused bid gives its hold back.
        c.release(&cell_id("c1"), &b);
        assert_eq!(c.auction_cells(&apps)[0].app_instances.get(&web), Some(&1));
        assert_eq!(c.auction_cells(&apps)[0].starting, 1);

        // Reported (with the capacity it took): the hold ends, the
        // instance counts as itself.
        let mut started = info("a", "web", 0, InstanceState::Starting, None);
        started.id = a.clone();
        let delta = StateDelta {
            seq: 1,
            available: Capacity {
                memory_mb: 1024 - 100,
                disk_mb: 1024 - 10,
                containers: 9,
            },
            changes: vec![StateChange::Upsert { instance: started }],
        };
        c.apply_delta(&cell_id("c1"), delta, Time::ZERO, Timestamp(1))
            .unwrap();
        let view = &c.auction_cells(&apps)[0];
        assert_eq!(view.available.memory_mb, 1024 - 100);
        assert_eq!(view.app_instances.get(&web), Some(&1));
        assert_eq!(view.starting, 1);

        // Gone from the cell: nothing left of it.
        let delta = StateDelta {
            seq: 2,
            available: Capacity {
                memory_mb: 1024,
                disk_mb: 1024,
                containers: 10,
            },
            changes: vec![StateChange::Removed { id: a }],
        };
        c.apply_delta(&cell_id("c1"), delta, Time::ZERO, Timestamp(1))
            .unwrap();
        let view = &c.auction_cells(&apps)[0];
        assert!(view.app_instances.is_empty());
        assert_eq!(view.starting, 0);
        assert_eq!(view.available.memory_mb, 1024);

        // A hold the cell never reports expires.
        c.reserve(&cell_id("c1"), &b, need, Some(web.clone()), Time::ZERO);
        c.expire_reservations(Time::from_secs(120), Duration::from_secs(60));
        let view = &c.auction_cells(&apps)[0];
        assert_eq!(view.available.memory_mb, 1024);
        assert!(view.app_instances.is_empty());
    }
}
