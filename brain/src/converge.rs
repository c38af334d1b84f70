//! Convergence: what to do so that the instances that run are the instances
//! that are desired (Diego's BBS convergence, the "health manager").
//!
//! [`converge`] is a pure function of a [`ClusterState`] (desired apps,
//! instances as the cells report them, cell liveness, starts in flight,
//! crash records) and the current [`Time`]. It returns a [`Plan`]: actions
//! for the brain to carry out, and when to look again even if nothing
//! happens. The brain calls it after every event and on a periodic safety
//! sweep; calling it twice on the same state gives the same plan, so a
//! repeated action (a stop not yet acknowledged) is harmless as long as the
//! brain makes starts and stops idempotent.
//!
//! # The rules
//!
//! A *slot* is an app index (`LrpKey`). An instance is *live* while it is
//! starting or running on a cell that is not gone; a cell is *gone* when it
//! was marked lost, or has been disconnected for longer than
//! [`ConvergeConfig::lost_cell_grace`] (the plan then also marks it lost),
//! or is unknown. A live instance is *good* if it runs the app's current
//! version on a cell that is not draining; otherwise it is *leaving* (an
//! evacuation or an update replaces it).
//!
//! - Live instances of apps no longer desired, or with an index at or above
//!   the desired count, are stopped: scaling down removes the highest
//!   indexes.
//! - A slot without a good instance is started, unless a start for it is
//!   already in flight (younger than [`ConvergeConfig::start_timeout`]) or
//!   its crash backoff says to wait; then the plan says when to restart.
//!   Instances on a disconnected cell still count until the grace is over:
//!   a cell that blips is not duplicated.
//! - In each slot the *preferred* instance is the good one on a connected
//!   cell placed last (highest [`ActualInstance::generation`]). Only once it
//!   *runs* are the slot's other live instances stopped: stale copies on a
//!   cell that came back after being declared lost, duplicates, and the
//!   instances being evacuated or updated. So an evacuation starts the
//!   replacement first and stops the original only once the replacement
//!   runs, and a slot's last running copy is never stopped for a
//!   replacement that is not running.
//! - Nothing is ever stopped on a cell that is not connected; it is dealt
//!   with when it comes back (or forgotten when it is lost).
//! - A cell that is connected but has not yet reported what it runs on
//!   this connection counts as away within its grace: the brain's picture
//!   of it may be stale (after a brain restart it is only the store's
//!   placements, each assumed running), so its instances count, but none
//!   of them is stopped or preferred until its report arrives.
//!
//! The property tests below replay random clusters and random event
//! sequences (crashes, cells lost and returning, drains, scaling, updates)
//! and check that once events stop, every desired slot has exactly one
//! instance, running, and nothing else runs.

use crate::backoff::CrashBackoff;
use crate::desired::{App, AppKey};
use crate::model::{LrpKey, Time};
use corral_proto::{CellId, InstanceId, InstanceState};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Convergence timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvergeConfig {
    /// How long a cell may be disconnected before it is declared lost and
    /// its instances are started elsewhere. Default 10 s: a QUIC connection
    /// notices a dead peer within a few seconds (idle timeout, keep-alives),
    /// so this is the margin for a restarting agent or a network blip.
    pub lost_cell_grace: Duration,
    /// How long a start may stay in flight (asked for, not yet reported by
    /// any cell) before it is asked for again. Default 60 s.
    pub start_timeout: Duration,
}

impl Default for ConvergeConfig {
    fn default() -> Self {
        Self {
            lost_cell_grace: Duration::from_secs(10),
            start_timeout: Duration::from_secs(60),
        }
    }
}

/// A desired long-running process, as convergence needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredApp {
    pub key: AppKey,
    /// How many instances should run.
    pub instances: u32,
    /// What the instances should run; an instance of another version is
    /// replaced.
    pub version: u64,
}

impl From<&App> for DesiredApp {
    fn from(app: &App) -> Self {
        Self {
            key: app.key(),
            instances: app.instances,
            version: app.version,
        }
    }
}

/// A long-running instance as the cells last reported it (only LRPs; tasks
/// are not converged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActualInstance {
    pub id: InstanceId,
    pub cell: CellId,
    pub app: AppKey,
    pub index: u32,
    /// The app version it was started from.
    pub version: u64,
    pub state: InstanceState,
    /// Since when it has been in `state`.
    pub since: Time,
    /// Orders the placements of a slot: a later placement has a higher
    /// generation (the store revision at which the brain recorded it fits).
    /// It tells a stale copy on a returning cell from its replacement.
    pub generation: u64,
}

impl ActualInstance {
    pub fn slot(&self) -> LrpKey {
        LrpKey::new(self.app.clone(), self.index)
    }

    fn is_live(&self) -> bool {
        matches!(self.state, InstanceState::Starting | InstanceState::Running)
    }
}

/// Whether the brain can talk to a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Connected,
    /// The connection dropped; `last_seen` is when the brain last heard
    /// from the cell.
    Disconnected {
        last_seen: Time,
    },
    /// Declared lost: its instances have been (or are being) replaced.
    /// A lost cell that connects again is `Connected`.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellStatus {
    pub id: CellId,
    pub liveness: Liveness,
    /// The cell is being evacuated: its instances are replaced elsewhere.
    pub draining: bool,
    /// What it runs has been reported on its current connection. Until
    /// then, a connected cell is treated as away (see the module docs).
    pub reported: bool,
}

/// A start the brain asked for (auction queued or work sent) that no cell
/// has reported yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingStart {
    pub slot: LrpKey,
    pub version: u64,
    pub since: Time,
}

/// Everything convergence looks at. Ids are unique within each list (apps,
/// instances, cells); input order does not matter.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub desired: Vec<DesiredApp>,
    pub actual: Vec<ActualInstance>,
    pub cells: Vec<CellStatus>,
    pub pending: Vec<PendingStart>,
    /// Crash history per slot; a slot absent here has not crashed.
    pub crashes: BTreeMap<LrpKey, CrashBackoff>,
}

/// Why a slot is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartReason {
    /// Never started, or scaled up.
    Missing,
    /// Its instance crashed (and the backoff allows a restart now).
    Crashed,
    /// Its instance was on a cell declared lost.
    CellLost { cell: CellId },
    /// Its instance is on a draining cell; this is the replacement.
    Evacuating { cell: CellId, instance: InstanceId },
    /// Its instance runs an old version; this is the replacement.
    Update { instance: InstanceId },
    /// A start was asked for but never showed up.
    Retry,
}

/// Why an instance is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// Its index is at or above the desired count.
    ScaledDown,
    /// Its app is no longer desired.
    AppDeleted,
    /// Another good instance of the slot, placed later, runs.
    Duplicate { kept: InstanceId },
    /// It was leaving (draining cell, old version) and its replacement runs.
    Replaced { by: InstanceId },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Declare the cell lost: its instances are started elsewhere.
    MarkCellLost { cell: CellId },
    /// Start an instance of the slot at this version, through the auction.
    Start {
        slot: LrpKey,
        version: u64,
        reason: StartReason,
    },
    /// Stop this instance.
    Stop {
        cell: CellId,
        instance: InstanceId,
        slot: LrpKey,
        reason: StopReason,
    },
    /// The slot waits for its crash backoff: start it at `at`.
    RestartAt { slot: LrpKey, at: Time },
}

/// What to do now, and when to call [`converge`] again if nothing happens
/// before (a grace ending, a backoff or a start timeout expiring).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Cells marked lost first, then starts, stops and waits, each by slot.
    pub actions: Vec<Action>,
    pub wake_at: Option<Time>,
}

impl Plan {
    fn wake(&mut self, at: Time) {
        self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
    }
}

/// What convergence makes of a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    Connected {
        draining: bool,
    },
    /// Disconnected, within the grace, or connected and not yet reported:
    /// its instances still count, and none is stopped or preferred.
    Away {
        draining: bool,
    },
    Gone,
}

impl Reach {
    fn draining(self) -> bool {
        match self {
            Self::Connected { draining } | Self::Away { draining } => draining,
            Self::Gone => false,
        }
    }
}

/// The decisions for the cluster as it is at `now` (see the module docs).
pub fn converge(config: &ConvergeConfig, state: &ClusterState, now: Time) -> Plan {
    converge_slots(config, state, now, None)
}

/// [`converge`] for some slots only: the desired apps' other slots are
/// neither started nor waited for. Each slot is decided from its own
/// instances, starts in flight and crash record, so `state` need hold only
/// those of `slots` (and the cells of their instances); the plan is then
/// the whole plan's part for these slots. `None`: every slot.
pub fn converge_slots(
    config: &ConvergeConfig,
    state: &ClusterState,
    now: Time,
    slots: Option<&BTreeSet<LrpKey>>,
) -> Plan {
    let mut plan = Plan::default();
    let reach = cell_reach(config, state, now, &mut plan);
    let reach_of = |cell: &CellId| reach.get(cell).copied().unwrap_or(Reach::Gone);
    let desired: BTreeMap<&AppKey, &DesiredApp> =
        state.desired.iter().map(|d| (&d.key, d)).collect();

    // Live instances by slot; slots that lost an instance with a cell.
    let mut live: BTreeMap<LrpKey, Vec<&ActualInstance>> = BTreeMap::new();
    let mut lost_with: BTreeMap<LrpKey, &CellId> = BTreeMap::new();
    for inst in state.actual.iter().filter(|i| i.is_live()) {
        match reach_of(&inst.cell) {
            Reach::Gone => {
                let cell = lost_with.entry(inst.slot()).or_insert(&inst.cell);
                *cell = (*cell).min(&inst.cell);
            }
            _ => live.entry(inst.slot()).or_default().push(inst),
        }
    }
    for instances in live.values_mut() {
        instances.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let mut stops = Vec::new();
    for inst in live.values().flatten() {
        let reason = match desired.get(&inst.app) {
            None => StopReason::AppDeleted,
            Some(d) if inst.index >= d.instances => StopReason::ScaledDown,
            Some(_) => continue,
        };
        if matches!(reach_of(&inst.cell), Reach::Connected { .. }) {
            stops.push(stop(inst, reason));
        }
    }

    let in_flight = in_flight(config, state, now, &mut plan);
    let mut starts = Vec::new();
    let mut waits = Vec::new();
    let wanted: Box<dyn Iterator<Item = (&DesiredApp, u32)>> = match slots {
        None => Box::new(
            desired
                .values()
                .flat_map(|app| (0..app.instances).map(move |index| (*app, index))),
        ),
        Some(slots) => Box::new(slots.iter().filter_map(|slot| {
            let app = desired.get(&slot.app)?;
            (slot.index < app.instances).then_some((*app, slot.index))
        })),
    };
    for (app, index) in wanted {
        {
            let slot = LrpKey::new(app.key.clone(), index);
            let instances = live.get(&slot).map(Vec::as_slice).unwrap_or(&[]);
            let (good, leaving): (Vec<&ActualInstance>, Vec<&ActualInstance>) = instances
                .iter()
                .partition(|i| i.version == app.version && !reach_of(&i.cell).draining());
            if let Some(kept) = preferred(&good, &reach_of) {
                if kept.state == InstanceState::Running {
                    for other in instances.iter().filter(|i| i.id != kept.id) {
                        if !matches!(reach_of(&other.cell), Reach::Connected { .. }) {
                            continue;
                        }
                        let reason = if good.iter().any(|g| g.id == other.id) {
                            StopReason::Duplicate {
                                kept: kept.id.clone(),
                            }
                        } else {
                            StopReason::Replaced {
                                by: kept.id.clone(),
                            }
                        };
                        stops.push(stop(other, reason));
                    }
                }
            }
            if !good.is_empty() {
                continue;
            }
            match in_flight.get(&slot) {
                Some(Flight::Fresh(versions)) if versions.contains(&app.version) => continue,
                _ => {}
            }
            let crash = state.crashes.get(&slot);
            if let Some(at) = crash.and_then(CrashBackoff::restart_at) {
                if at > now {
                    plan.wake(at);
                    waits.push(Action::RestartAt { slot, at });
                    continue;
                }
            }
            let reason = start_reason(
                &leaving,
                &reach_of,
                lost_with.get(&slot).copied(),
                crash.is_some_and(|c| c.restart_at().is_some()),
                matches!(in_flight.get(&slot), Some(Flight::Expired)),
            );
            starts.push(Action::Start {
                slot,
                version: app.version,
                reason,
            });
        }
    }
    stops.sort_by(|a, b| sort_key(a).cmp(&sort_key(b)));
    plan.actions.extend(starts);
    plan.actions.extend(stops);
    plan.actions.extend(waits);
    plan
}

/// Classifies every cell; marks the ones whose grace is over lost.
fn cell_reach<'a>(
    config: &ConvergeConfig,
    state: &'a ClusterState,
    now: Time,
    plan: &mut Plan,
) -> BTreeMap<&'a CellId, Reach> {
    let mut reach = BTreeMap::new();
    let mut cells: Vec<&CellStatus> = state.cells.iter().collect();
    cells.sort_by(|a, b| a.id.cmp(&b.id));
    for cell in cells {
        let r = match cell.liveness {
            Liveness::Connected if cell.reported => Reach::Connected {
                draining: cell.draining,
            },
            Liveness::Connected => Reach::Away {
                draining: cell.draining,
            },
            Liveness::Lost => Reach::Gone,
            Liveness::Disconnected { last_seen } => {
                let deadline = last_seen.plus(config.lost_cell_grace);
                if now >= deadline {
                    plan.actions.push(Action::MarkCellLost {
                        cell: cell.id.clone(),
                    });
                    Reach::Gone
                } else {
                    plan.wake(deadline);
                    Reach::Away {
                        draining: cell.draining,
                    }
                }
            }
        };
        reach.insert(&cell.id, r);
    }
    reach
}

enum Flight {
    /// Starts younger than the timeout, by version.
    Fresh(BTreeSet<u64>),
    /// Only starts that timed out.
    Expired,
}

fn in_flight(
    config: &ConvergeConfig,
    state: &ClusterState,
    now: Time,
    plan: &mut Plan,
) -> BTreeMap<LrpKey, Flight> {
    let mut flights: BTreeMap<LrpKey, Flight> = BTreeMap::new();
    for p in &state.pending {
        let expires = p.since.plus(config.start_timeout);
        let entry = flights.entry(p.slot.clone()).or_insert(Flight::Expired);
        if now < expires {
            plan.wake(expires);
            match entry {
                Flight::Fresh(versions) => {
                    versions.insert(p.version);
                }
                Flight::Expired => *entry = Flight::Fresh([p.version].into()),
            }
        }
    }
    flights
}

/// The good instance to keep: on a connected cell, placed last; among
/// equals the one in its state the longest, then the lowest id.
fn preferred<'a>(
    good: &[&'a ActualInstance],
    reach_of: &impl Fn(&CellId) -> Reach,
) -> Option<&'a ActualInstance> {
    good.iter()
        .copied()
        .filter(|i| matches!(reach_of(&i.cell), Reach::Connected { .. }))
        .max_by(|a, b| {
            a.generation
                .cmp(&b.generation)
                .then(b.since.cmp(&a.since))
                .then_with(|| b.id.cmp(&a.id))
        })
}

fn start_reason(
    leaving: &[&ActualInstance],
    reach_of: &impl Fn(&CellId) -> Reach,
    lost_with: Option<&CellId>,
    crashed: bool,
    retried: bool,
) -> StartReason {
    if let Some(old) = leaving.iter().find(|i| reach_of(&i.cell).draining()) {
        return StartReason::Evacuating {
            cell: old.cell.clone(),
            instance: old.id.clone(),
        };
    }
    if let Some(old) = leaving.first() {
        return StartReason::Update {
            instance: old.id.clone(),
        };
    }
    if let Some(cell) = lost_with {
        return StartReason::CellLost { cell: cell.clone() };
    }
    if crashed {
        return StartReason::Crashed;
    }
    if retried {
        return StartReason::Retry;
    }
    StartReason::Missing
}

fn stop(inst: &ActualInstance, reason: StopReason) -> Action {
    Action::Stop {
        cell: inst.cell.clone(),
        instance: inst.id.clone(),
        slot: inst.slot(),
        reason,
    }
}

/// Orders stops by slot, then instance.
fn sort_key(a: &Action) -> (Option<&LrpKey>, Option<&InstanceId>) {
    match a {
        Action::Stop { slot, instance, .. } => (Some(slot), Some(instance)),
        Action::Start { slot, .. } | Action::RestartAt { slot, .. } => (Some(slot), None),
        Action::MarkCellLost { .. } => (None, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backoff::BackoffConfig;
    use corral_proto::{AppId, TenantId};
    use proptest::prelude::*;

    fn key(name: &str) -> AppKey {
        AppKey {
            tenant: TenantId::new("acme").unwrap(),
            name: AppId::new(name).unwrap(),
        }
    }

    fn slot(name: &str, index: u32) -> LrpKey {
        LrpKey::new(key(name), index)
    }

    fn cell_id(id: &str) -> CellId {
        CellId::new(id).unwrap()
    }

    fn desired(name: &str, instances: u32) -> DesiredApp {
        DesiredApp {
            key: key(name),
            instances,
            version: 1,
        }
    }

    fn connected(id: &str) -> CellStatus {
        CellStatus {
            id: cell_id(id),
            liveness: Liveness::Connected,
            draining: false,
            reported: true,
        }
    }

    fn inst(id: &str, cell: &str, app: &str, index: u32, generation: u64) -> ActualInstance {
        ActualInstance {
            id: InstanceId::new(id).unwrap(),
            cell: cell_id(cell),
            app: key(app),
            index,
            version: 1,
            state: InstanceState::Running,
            since: Time::ZERO,
            generation,
        }
    }

    fn secs(s: u64) -> Time {
        Time::from_secs(s)
    }

    fn plan(state: &ClusterState, now: Time) -> Plan {
        converge(&ConvergeConfig::default(), state, now)
    }

    fn start(name: &str, index: u32, reason: StartReason) -> Action {
        Action::Start {
            slot: slot(name, index),
            version: 1,
            reason,
        }
    }

    fn stop_of(i: &ActualInstance, reason: StopReason) -> Action {
        Action::Stop {
            cell: i.cell.clone(),
            instance: i.id.clone(),
            slot: i.slot(),
            reason,
        }
    }

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    #[test]
    fn missing_instances_are_started() {
        let state = ClusterState {
            desired: vec![desired("web", 3)],
            actual: vec![inst("w0", "c1", "web", 0, 1)],
            cells: vec![connected("c1")],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(100));
        assert_eq!(
            p.actions,
            [
                start("web", 1, StartReason::Missing),
                start("web", 2, StartReason::Missing)
            ]
        );
        assert_eq!(p.wake_at, None);
    }

    #[test]
    fn scaling_down_stops_the_highest_indexes_and_deleting_stops_all() {
        let web: Vec<_> = (0..4)
            .map(|i| inst(&format!("w{i}"), "c1", "web", i, 1))
            .collect();
        let gone = inst("old0", "c1", "old", 0, 1);
        let mut actual = web.clone();
        actual.push(gone.clone());
        let state = ClusterState {
            desired: vec![desired("web", 2)],
            actual,
            cells: vec![connected("c1")],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(100));
        assert_eq!(
            p.actions,
            [
                stop_of(&gone, StopReason::AppDeleted),
                stop_of(&web[2], StopReason::ScaledDown),
                stop_of(&web[3], StopReason::ScaledDown),
            ]
        );
    }

    #[test]
    fn a_crashed_slot_restarts_at_once_three_times_then_backs_off() {
        let mut backoff = CrashBackoff::new(BackoffConfig::default());
        let mut crashed = inst("w0", "c1", "web", 0, 1);
        crashed.state = InstanceState::Crashed;
        let mut state = ClusterState {
            desired: vec![desired("web", 1)],
            actual: vec![crashed],
            cells: vec![connected("c1")],
            ..ClusterState::default()
        };
        let mut now = secs(100);
        for _ in 0..3 {
            backoff.on_crash(now);
            state.crashes.insert(slot("web", 0), backoff);
            let p = plan(&state, now);
            assert_eq!(p.actions, [start("web", 0, StartReason::Crashed)]);
            // It runs a little, and crashes again.
            backoff.on_running_since(now.plus(Duration::from_secs(1)));
            now = now.plus(Duration::from_secs(10));
        }
        backoff.on_crash(now);
        state.crashes.insert(slot("web", 0), backoff);
        let p = plan(&state, now);
        let at = now.plus(Duration::from_secs(30));
        assert_eq!(
            p.actions,
            [Action::RestartAt {
                slot: slot("web", 0),
                at
            }]
        );
        assert_eq!(p.wake_at, Some(at));
        let p = plan(&state, Time::from_millis(at.as_millis() - 1));
        assert!(matches!(p.actions[..], [Action::RestartAt { .. }]));
        assert_eq!(
            plan(&state, at).actions,
            [start("web", 0, StartReason::Crashed)]
        );
        // Once the restart is in flight it is not asked for twice.
        state.pending.push(PendingStart {
            slot: slot("web", 0),
            version: 1,
            since: at,
        });
        let p = plan(&state, at.plus(Duration::from_secs(1)));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.wake_at, Some(at.plus(Duration::from_secs(60))));
    }

    #[test]
    fn a_lost_cell_is_declared_after_the_grace_and_its_instances_rescheduled() {
        let on_c2 = inst("w1", "c2", "web", 1, 1);
        let mut state = ClusterState {
            desired: vec![desired("web", 2)],
            actual: vec![inst("w0", "c1", "web", 0, 1), on_c2],
            cells: vec![
                connected("c1"),
                CellStatus {
                    liveness: Liveness::Disconnected {
                        last_seen: secs(100),
                    },
                    ..connected("c2")
                },
            ],
            ..ClusterState::default()
        };
        // Within the grace: a blip; nothing is duplicated.
        let p = plan(&state, secs(109));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.wake_at, Some(secs(110)));
        // Grace over: lost, and web/1 starts elsewhere.
        let p = plan(&state, secs(110));
        let lost = StartReason::CellLost {
            cell: cell_id("c2"),
        };
        assert_eq!(
            p.actions,
            [
                Action::MarkCellLost {
                    cell: cell_id("c2")
                },
                start("web", 1, lost.clone())
            ]
        );
        // Once marked, the same holds without the mark.
        state.cells[1].liveness = Liveness::Lost;
        assert_eq!(plan(&state, secs(111)).actions, [start("web", 1, lost)]);
    }

    #[test]
    fn a_returning_cells_stale_copies_are_stopped_once_the_replacements_run() {
        let stale = inst("w1-old", "c2", "web", 1, 3);
        let mut replacement = inst("w1-new", "c1", "web", 1, 7);
        replacement.state = InstanceState::Starting;
        let mut state = ClusterState {
            desired: vec![desired("web", 2)],
            actual: vec![inst("w0", "c1", "web", 0, 1), stale.clone(), replacement],
            // c2 was lost and has just come back with what it ran.
            cells: vec![connected("c1"), connected("c2")],
            ..ClusterState::default()
        };
        // The replacement is not running yet: keep the stale copy for now,
        // and do not stop the replacement either.
        let p = plan(&state, secs(200));
        assert!(p.actions.is_empty(), "{p:?}");
        state.actual[2].state = InstanceState::Running;
        let p = plan(&state, secs(201));
        assert_eq!(
            p.actions,
            [stop_of(
                &stale,
                StopReason::Duplicate { kept: id("w1-new") }
            )]
        );
        // Applied: exactly the desired two run.
        state.actual[1].state = InstanceState::Stopping;
        assert!(plan(&state, secs(202)).actions.is_empty());
        let running = state
            .actual
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .count();
        assert_eq!(running, 2);
    }

    #[test]
    fn evacuation_starts_the_replacement_first_and_stops_the_original_once_it_runs() {
        let original = inst("w0", "c1", "web", 0, 1);
        let mut state = ClusterState {
            desired: vec![desired("web", 1)],
            actual: vec![original.clone()],
            cells: vec![
                CellStatus {
                    draining: true,
                    ..connected("c1")
                },
                connected("c2"),
            ],
            ..ClusterState::default()
        };
        let evacuating = StartReason::Evacuating {
            cell: cell_id("c1"),
            instance: id("w0"),
        };
        assert_eq!(
            plan(&state, secs(10)).actions,
            [start("web", 0, evacuating)]
        );
        state.pending.push(PendingStart {
            slot: slot("web", 0),
            version: 1,
            since: secs(10),
        });
        assert!(plan(&state, secs(11)).actions.is_empty());
        state.pending.clear();
        let mut replacement = inst("w0-b", "c2", "web", 0, 2);
        replacement.state = InstanceState::Starting;
        state.actual.push(replacement);
        assert!(
            plan(&state, secs(12)).actions.is_empty(),
            "the original keeps running while its replacement starts"
        );
        state.actual[1].state = InstanceState::Running;
        assert_eq!(
            plan(&state, secs(13)).actions,
            [stop_of(&original, StopReason::Replaced { by: id("w0-b") })]
        );
    }

    #[test]
    fn a_new_version_replaces_each_instance_after_its_successor_runs() {
        let old = inst("w0", "c1", "web", 0, 1);
        let mut state = ClusterState {
            desired: vec![DesiredApp {
                version: 2,
                ..desired("web", 1)
            }],
            actual: vec![old.clone()],
            cells: vec![connected("c1")],
            ..ClusterState::default()
        };
        assert_eq!(
            plan(&state, secs(1)).actions,
            [Action::Start {
                slot: slot("web", 0),
                version: 2,
                reason: StartReason::Update { instance: id("w0") }
            }]
        );
        let mut new = inst("w0-v2", "c1", "web", 0, 2);
        new.version = 2;
        state.actual.push(new);
        assert_eq!(
            plan(&state, secs(2)).actions,
            [stop_of(&old, StopReason::Replaced { by: id("w0-v2") })]
        );
    }

    #[test]
    fn nothing_is_stopped_on_a_cell_that_is_away() {
        let extra = inst("w5", "c2", "web", 5, 1);
        let state = ClusterState {
            desired: vec![desired("web", 1)],
            actual: vec![inst("w0", "c1", "web", 0, 1), extra],
            cells: vec![
                connected("c1"),
                CellStatus {
                    liveness: Liveness::Disconnected {
                        last_seen: secs(50),
                    },
                    ..connected("c2")
                },
            ],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(55));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.wake_at, Some(secs(60)));
    }

    /// After a brain restart, a cell's instances are the store's
    /// placements, assumed running, until the cell reports: a placement
    /// recorded just before the brain died may never have reached the cell,
    /// and a copy stopped just before may still be stopping. Deciding on
    /// them as soon as the cell connects stopped the slot's real copy as a
    /// duplicate of the phantom one (the brain kill -9 fault test).
    #[test]
    fn nothing_is_stopped_or_preferred_on_a_cell_until_it_has_reported() {
        let real = inst("w0-real", "c1", "web", 0, 3);
        let later = inst("w0-later", "c2", "web", 0, 9);
        let scaled = inst("w1", "c2", "web", 1, 4);
        let mut state = ClusterState {
            desired: vec![desired("web", 1)],
            actual: vec![real.clone(), later.clone(), scaled.clone()],
            cells: vec![
                connected("c1"),
                CellStatus {
                    reported: false,
                    ..connected("c2")
                },
            ],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(100));
        assert!(p.actions.is_empty(), "{p:?}");
        assert_eq!(p.wake_at, None, "a connected cell has no grace to end");
        // Its report: the later placement never arrived; the scaled-down
        // copy runs. The real copy is kept, the extra one stopped.
        state.cells[1].reported = true;
        state.actual.retain(|i| i.id != later.id);
        assert_eq!(
            plan(&state, secs(101)).actions,
            [stop_of(&scaled, StopReason::ScaledDown)]
        );
        // Had the later placement arrived and run, it would be the one kept.
        state.actual.push(later);
        assert_eq!(
            plan(&state, secs(102)).actions,
            [
                stop_of(
                    &real,
                    StopReason::Duplicate {
                        kept: id("w0-later")
                    }
                ),
                stop_of(&scaled, StopReason::ScaledDown),
            ]
        );
    }

    #[test]
    fn a_start_that_never_shows_up_is_retried_after_the_timeout() {
        let state = ClusterState {
            desired: vec![desired("web", 1)],
            cells: vec![connected("c1")],
            pending: vec![PendingStart {
                slot: slot("web", 0),
                version: 1,
                since: secs(100),
            }],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(159));
        assert!(p.actions.is_empty());
        assert_eq!(p.wake_at, Some(secs(160)));
        assert_eq!(
            plan(&state, secs(160)).actions,
            [start("web", 0, StartReason::Retry)]
        );
    }

    #[test]
    fn a_start_in_flight_for_an_old_version_does_not_hold_the_slot() {
        let state = ClusterState {
            desired: vec![DesiredApp {
                version: 3,
                ..desired("web", 1)
            }],
            cells: vec![connected("c1")],
            pending: vec![PendingStart {
                slot: slot("web", 0),
                version: 2,
                since: secs(100),
            }],
            ..ClusterState::default()
        };
        let p = plan(&state, secs(101));
        assert_eq!(
            p.actions,
            [Action::Start {
                slot: slot("web", 0),
                version: 3,
                reason: StartReason::Missing
            }]
        );
    }

    #[test]
    fn desired_apps_convert_from_the_store_record() {
        let app: App = serde_json::from_value(serde_json::json!({
            "name": "web", "tenant": "acme", "instances": 4, "rootfs": "/r",
            "command": ["x"], "resources": {"memory_mb": 64}, "version": 7,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        let d = DesiredApp::from(&app);
        assert_eq!((d.key, d.instances, d.version), (key("web"), 4, 7));
    }

    // ---- property tests ----

    const APPS: [&str; 3] = ["a", "b", "c"];
    const CELLS: usize = 5;
    const NOW: Time = Time::from_secs(10_000);

    fn config() -> ConvergeConfig {
        ConvergeConfig::default()
    }

    fn arb_liveness() -> impl Strategy<Value = Liveness> {
        prop_oneof![
            6 => Just(Liveness::Connected),
            2 => (0u64..30_000).prop_map(|ago| Liveness::Disconnected {
                last_seen: Time::from_millis(NOW.as_millis() - ago)
            }),
            2 => Just(Liveness::Lost),
        ]
    }

    fn arb_state() -> impl Strategy<Value = ClusterState> {
        let cells = proptest::collection::vec(
            (
                arb_liveness(),
                proptest::bool::weighted(0.25),
                proptest::bool::weighted(0.8),
            ),
            CELLS - 1,
        );
        let desired = proptest::collection::vec((any::<bool>(), 0u32..5, 1u64..3), APPS.len());
        let states = proptest::sample::select(InstanceState::ALL.to_vec());
        let actual = proptest::collection::vec(
            (
                0usize..3,
                0u32..6,
                1u64..3,
                states,
                0usize..CELLS,
                1u64..40,
                0u64..10_000,
            ),
            0..20,
        );
        let pending = proptest::collection::vec((0usize..3, 0u32..6, 1u64..3, 0u64..120_000), 0..4);
        let crashes =
            proptest::collection::vec((0usize..3, 0u32..6, 0u32..8, 0u64..2, 0u64..100_000), 0..4);
        (cells, desired, actual, pending, crashes).prop_map(
            |(cells, desired, actual, pending, crashes)| {
                let mut state = ClusterState::default();
                // c0 is always connected and open, so starts can land.
                state.cells.push(connected("c0"));
                for (i, (liveness, draining, reported)) in cells.into_iter().enumerate() {
                    state.cells.push(CellStatus {
                        id: cell_id(&format!("c{}", i + 1)),
                        liveness,
                        draining,
                        reported,
                    });
                }
                for (i, (on, instances, version)) in desired.into_iter().enumerate() {
                    if on {
                        state.desired.push(DesiredApp {
                            key: key(APPS[i]),
                            instances,
                            version,
                        });
                    }
                }
                for (n, (app, index, version, st, cell, generation, since)) in
                    actual.into_iter().enumerate()
                {
                    state.actual.push(ActualInstance {
                        id: id(&format!("x{n}")),
                        cell: cell_id(&format!("c{cell}")),
                        app: key(APPS[app]),
                        index,
                        version,
                        state: st,
                        since: Time::from_millis(since),
                        generation,
                    });
                }
                for (app, index, version, ago) in pending {
                    state.pending.push(PendingStart {
                        slot: slot(APPS[app], index),
                        version,
                        since: Time::from_millis(NOW.as_millis() - ago),
                    });
                }
                for (app, index, crashes, waiting, at) in crashes {
                    let restart_at =
                        (waiting == 1).then(|| Time::from_millis(NOW.as_millis() - 50_000 + at));
                    state.crashes.insert(
                        slot(APPS[app], index),
                        CrashBackoff::with_state(
                            BackoffConfig::default(),
                            crate::backoff::CrashState {
                                crashes,
                                running_since: None,
                                restart_at,
                            },
                        ),
                    );
                }
                state
            },
        )
    }

    /// What the brain knows of a cell, as the tests see it.
    fn cell_of<'a>(state: &'a ClusterState, id: &CellId) -> Option<&'a CellStatus> {
        state.cells.iter().find(|c| c.id == *id)
    }

    /// Connected and reported: a cell the brain acts on.
    fn is_connected(state: &ClusterState, id: &CellId) -> bool {
        cell_of(state, id).is_some_and(|c| c.liveness == Liveness::Connected && c.reported)
    }

    fn not_gone(state: &ClusterState, id: &CellId, now: Time) -> bool {
        cell_of(state, id).is_some_and(|c| match c.liveness {
            Liveness::Connected => true,
            Liveness::Disconnected { last_seen } => now < last_seen.plus(config().lost_cell_grace),
            Liveness::Lost => false,
        })
    }

    fn is_draining(state: &ClusterState, id: &CellId) -> bool {
        cell_of(state, id).is_some_and(|c| c.draining)
    }

    /// Checks one plan against the state it was made from.
    fn check_plan(state: &ClusterState, p: &Plan, now: Time) -> Result<(), TestCaseError> {
        let desired: BTreeMap<&AppKey, &DesiredApp> =
            state.desired.iter().map(|d| (&d.key, d)).collect();
        let by_id: BTreeMap<&InstanceId, &ActualInstance> =
            state.actual.iter().map(|i| (&i.id, i)).collect();
        let stopped: BTreeSet<&InstanceId> = p
            .actions
            .iter()
            .filter_map(|a| match a {
                Action::Stop { instance, .. } => Some(instance),
                _ => None,
            })
            .collect();
        let stop_count = p
            .actions
            .iter()
            .filter(|a| matches!(a, Action::Stop { .. }))
            .count();
        prop_assert_eq!(stopped.len(), stop_count, "an instance stopped twice");
        let mut started = BTreeSet::new();
        let mut lost = BTreeSet::new();
        for a in &p.actions {
            match a {
                Action::Stop {
                    instance,
                    reason,
                    cell,
                    slot,
                } => {
                    let i = by_id[instance];
                    prop_assert!(i.is_live() && &i.cell == cell && &i.slot() == slot);
                    prop_assert!(
                        is_connected(state, cell),
                        "stop sent to an unconnected cell"
                    );
                    match (desired.get(&i.app), reason) {
                        (None, StopReason::AppDeleted) => {}
                        (Some(d), StopReason::ScaledDown) => prop_assert!(i.index >= d.instances),
                        (
                            Some(d),
                            StopReason::Duplicate { kept } | StopReason::Replaced { by: kept },
                        ) => {
                            // Never the last running copy: the kept one
                            // runs the current version, on a connected open
                            // cell, and is not stopped itself.
                            prop_assert!(i.index < d.instances);
                            let k = by_id[kept];
                            prop_assert_eq!(k.slot(), i.slot());
                            prop_assert_eq!(k.state, InstanceState::Running);
                            prop_assert_eq!(k.version, d.version);
                            prop_assert!(
                                is_connected(state, &k.cell) && !is_draining(state, &k.cell)
                            );
                            prop_assert!(!stopped.contains(kept));
                            if matches!(reason, StopReason::Duplicate { .. }) {
                                prop_assert!(k.generation >= i.generation, "kept the stale copy");
                            }
                        }
                        (d, r) => {
                            prop_assert!(false, "stop {instance} for {r:?} with desired {d:?}")
                        }
                    }
                }
                Action::Start { slot, version, .. } => {
                    prop_assert!(started.insert(slot.clone()), "two starts for {slot}");
                    let d = desired.get(&slot.app);
                    prop_assert!(
                        d.is_some_and(|d| slot.index < d.instances && d.version == *version)
                    );
                    let good = state.actual.iter().any(|i| {
                        i.slot() == *slot
                            && i.is_live()
                            && i.version == *version
                            && not_gone(state, &i.cell, now)
                            && !is_draining(state, &i.cell)
                    });
                    prop_assert!(!good, "{slot} started though a good instance is live");
                    let fresh = state.pending.iter().any(|q| {
                        q.slot == *slot
                            && q.version == *version
                            && now < q.since.plus(config().start_timeout)
                    });
                    prop_assert!(!fresh, "{slot} started twice while in flight");
                    let waiting = state.crashes.get(slot).and_then(CrashBackoff::restart_at);
                    prop_assert!(
                        waiting.is_none_or(|t| t <= now),
                        "{slot} restarted during its backoff"
                    );
                }
                Action::RestartAt { slot, at } => {
                    prop_assert!(*at > now);
                    prop_assert_eq!(
                        state.crashes.get(slot).and_then(CrashBackoff::restart_at),
                        Some(*at)
                    );
                    prop_assert!(!started.contains(slot));
                }
                Action::MarkCellLost { cell } => {
                    lost.insert(cell.clone());
                }
            }
        }
        let expected: BTreeSet<CellId> = state
            .cells
            .iter()
            .filter(|c| matches!(c.liveness, Liveness::Disconnected { last_seen } if now >= last_seen.plus(config().lost_cell_grace)))
            .map(|c| c.id.clone())
            .collect();
        prop_assert_eq!(lost, expected);
        if let Some(w) = p.wake_at {
            prop_assert!(w > now);
        }
        Ok(())
    }

    /// Something that happens to the cluster between two convergence runs.
    #[derive(Debug, Clone)]
    enum Ev {
        Crash(usize),
        Disconnect(usize),
        /// Connects again; what it runs is reported later.
        Reconnect(usize),
        /// A connected cell reports what it runs (its snapshot).
        Report(usize),
        ToggleDrain(usize),
        Scale(usize, u32),
        Update(usize),
        Delete(usize),
        /// Starts asked for in this round are not placed yet.
        Hold,
        Tick(u64),
    }

    fn arb_ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            3 => (0usize..64).prop_map(Ev::Crash),
            1 => (1usize..CELLS).prop_map(Ev::Disconnect),
            1 => (1usize..CELLS).prop_map(Ev::Reconnect),
            1 => (1usize..CELLS).prop_map(Ev::Report),
            1 => (1usize..CELLS).prop_map(Ev::ToggleDrain),
            2 => (0usize..3, 0u32..6).prop_map(|(a, n)| Ev::Scale(a, n)),
            1 => (0usize..3).prop_map(Ev::Update),
            1 => (0usize..3).prop_map(Ev::Delete),
            1 => Just(Ev::Hold),
            2 => (1u64..20_000).prop_map(Ev::Tick),
        ]
    }

    /// A cluster driven by convergence: plans are applied, cells start and
    /// stop what they are told, events happen.
    struct Sim {
        state: ClusterState,
        now: Time,
        next: u64,
        hold: bool,
    }

    impl Sim {
        fn new(state: ClusterState) -> Self {
            Self {
                state,
                now: NOW,
                next: 1000,
                hold: false,
            }
        }

        fn cell_mut(&mut self, n: usize) -> &mut CellStatus {
            let id = cell_id(&format!("c{n}"));
            self.state.cells.iter_mut().find(|c| c.id == id).unwrap()
        }

        fn event(&mut self, ev: &Ev) {
            let now = self.now;
            match *ev {
                Ev::Crash(k) => {
                    let running: Vec<usize> = (0..self.state.actual.len())
                        .filter(|&i| {
                            let inst = &self.state.actual[i];
                            inst.state == InstanceState::Running
                                && is_connected(&self.state, &inst.cell)
                        })
                        .collect();
                    if let Some(&i) = running.get(k % running.len().max(1)) {
                        let inst = &mut self.state.actual[i];
                        inst.state = InstanceState::Crashed;
                        inst.since = now;
                        let slot = inst.slot();
                        self.state
                            .crashes
                            .entry(slot)
                            .or_insert_with(|| CrashBackoff::new(BackoffConfig::default()))
                            .on_crash(now);
                    }
                }
                Ev::Disconnect(n) => {
                    let c = self.cell_mut(n);
                    if c.liveness == Liveness::Connected {
                        c.liveness = Liveness::Disconnected { last_seen: now };
                    }
                }
                Ev::Reconnect(n) => {
                    let c = self.cell_mut(n);
                    c.liveness = Liveness::Connected;
                    c.reported = false;
                }
                Ev::Report(n) => {
                    let c = self.cell_mut(n);
                    if c.liveness == Liveness::Connected {
                        c.reported = true;
                    }
                }
                Ev::ToggleDrain(n) => {
                    let c = self.cell_mut(n);
                    c.draining = !c.draining;
                }
                Ev::Scale(a, instances) => {
                    match self
                        .state
                        .desired
                        .iter_mut()
                        .find(|d| d.key == key(APPS[a]))
                    {
                        Some(d) => d.instances = instances,
                        None => self.state.desired.push(DesiredApp {
                            key: key(APPS[a]),
                            instances,
                            version: 1,
                        }),
                    }
                }
                Ev::Update(a) => {
                    if let Some(d) = self
                        .state
                        .desired
                        .iter_mut()
                        .find(|d| d.key == key(APPS[a]))
                    {
                        d.version += 1;
                    }
                }
                Ev::Delete(a) => self.state.desired.retain(|d| d.key != key(APPS[a])),
                Ev::Hold => self.hold = true,
                Ev::Tick(ms) => self.now = self.now.plus(Duration::from_millis(ms)),
            }
        }

        /// Carries out a plan the way the brain would.
        fn apply(&mut self, p: &Plan) {
            for a in &p.actions {
                match a {
                    Action::MarkCellLost { cell } => {
                        if let Some(c) = self.state.cells.iter_mut().find(|c| c.id == *cell) {
                            c.liveness = Liveness::Lost;
                        }
                    }
                    Action::Start { slot, version, .. } => {
                        self.state.pending.retain(|q| q.slot != *slot);
                        self.state.pending.push(PendingStart {
                            slot: slot.clone(),
                            version: *version,
                            since: self.now,
                        });
                    }
                    Action::Stop { instance, .. } => {
                        let i = self
                            .state
                            .actual
                            .iter_mut()
                            .find(|i| i.id == *instance)
                            .unwrap();
                        i.state = InstanceState::Stopping;
                        i.since = self.now;
                    }
                    Action::RestartAt { .. } => {}
                }
            }
        }

        /// One second passes: connected cells finish what they were
        /// starting and stopping, then new work is placed.
        fn progress(&mut self) {
            let now = self.now;
            let connected: BTreeSet<CellId> = self
                .state
                .cells
                .iter()
                .filter(|c| c.liveness == Liveness::Connected)
                .map(|c| c.id.clone())
                .collect();
            for i in &mut self.state.actual {
                if !connected.contains(&i.cell) {
                    continue;
                }
                match i.state {
                    InstanceState::Starting => {
                        i.state = InstanceState::Running;
                        i.since = now;
                        if let Some(b) = self.state.crashes.get_mut(&i.slot()) {
                            b.on_running_since(now);
                        }
                    }
                    InstanceState::Stopping => {
                        i.state = InstanceState::Exited;
                        i.since = now;
                    }
                    _ => {}
                }
            }
            if !std::mem::take(&mut self.hold) {
                let open: Vec<CellId> = self
                    .state
                    .cells
                    .iter()
                    .filter(|c| c.liveness == Liveness::Connected && !c.draining)
                    .map(|c| c.id.clone())
                    .collect();
                for q in std::mem::take(&mut self.state.pending) {
                    self.next += 1;
                    let cell = open[(self.next as usize) % open.len()].clone();
                    self.state.actual.push(ActualInstance {
                        id: id(&format!("n{}", self.next)),
                        cell,
                        app: q.slot.app.clone(),
                        index: q.slot.index,
                        version: q.version,
                        state: InstanceState::Starting,
                        since: now,
                        generation: self.next,
                    });
                }
            }
            self.now = self.now.plus(Duration::from_secs(1));
        }

        fn round(&mut self) -> Result<Plan, TestCaseError> {
            let p = converge(&config(), &self.state, self.now);
            check_plan(&self.state, &p, self.now)?;
            self.apply(&p);
            self.progress();
            Ok(p)
        }

        fn settled(&self, p: &Plan) -> bool {
            p.actions
                .iter()
                .all(|a| matches!(a, Action::RestartAt { .. }))
                && self.state.pending.is_empty()
                && !self.state.actual.iter().any(|i| {
                    matches!(i.state, InstanceState::Starting | InstanceState::Stopping)
                        && is_connected(&self.state, &i.cell)
                })
        }

        /// Runs without events until nothing is left to do, jumping over
        /// quiet waits (graces, backoffs).
        fn quiesce(&mut self) -> Result<(), TestCaseError> {
            for _ in 0..400 {
                let p = self.round()?;
                if self.settled(&p) {
                    match p.wake_at {
                        Some(at) => self.now = self.now.max(at),
                        None => {
                            let last = converge(&config(), &self.state, self.now);
                            if last.actions.is_empty() && last.wake_at.is_none() {
                                return Ok(());
                            }
                        }
                    }
                }
            }
            Err(TestCaseError::fail("did not converge in 400 rounds"))
        }

        /// The end state: every desired slot has exactly one live instance,
        /// running the current version on a connected, open cell; nothing
        /// else is live on a cell the brain can reach.
        fn check_converged(&self) -> Result<(), TestCaseError> {
            let desired: BTreeMap<&AppKey, &DesiredApp> =
                self.state.desired.iter().map(|d| (&d.key, d)).collect();
            let mut per_slot: BTreeMap<LrpKey, Vec<&ActualInstance>> = BTreeMap::new();
            for i in &self.state.actual {
                if i.is_live() && not_gone(&self.state, &i.cell, self.now) {
                    let d = desired.get(&i.app);
                    prop_assert!(
                        d.is_some_and(|d| i.index < d.instances),
                        "{} runs but is not desired",
                        i.id
                    );
                    per_slot.entry(i.slot()).or_default().push(i);
                }
            }
            for d in desired.values() {
                let mut running = 0;
                for index in 0..d.instances {
                    let s = LrpKey::new(d.key.clone(), index);
                    let live = per_slot.get(&s).map(Vec::as_slice).unwrap_or(&[]);
                    prop_assert_eq!(live.len(), 1, "{} has {:?}", s, live);
                    let i = live[0];
                    prop_assert_eq!(i.state, InstanceState::Running);
                    prop_assert_eq!(i.version, d.version);
                    prop_assert!(
                        is_connected(&self.state, &i.cell) && !is_draining(&self.state, &i.cell)
                    );
                    running += 1;
                }
                prop_assert_eq!(running, d.instances);
            }
            Ok(())
        }
    }

    fn config_cases(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Regressions found by `plans_do_not_depend_on_input_order`: a start's
    /// reason named whichever leaving instance or lost cell came first.
    #[test]
    fn reasons_name_the_lowest_instance_and_cell_whatever_the_input_order() {
        let mut old1 = inst("x1", "c0", "b", 0, 1);
        old1.version = 2;
        let mut old0 = inst("x0", "c0", "b", 0, 2);
        old0.version = 2;
        let mut state = ClusterState {
            desired: vec![desired("b", 3)],
            actual: vec![
                old1,
                old0,
                inst("y2", "c2", "b", 2, 1),
                inst("z2", "c1", "b", 2, 1),
            ],
            cells: vec![
                connected("c0"),
                CellStatus {
                    liveness: Liveness::Lost,
                    ..connected("c1")
                },
                CellStatus {
                    liveness: Liveness::Lost,
                    ..connected("c2")
                },
            ],
            ..ClusterState::default()
        };
        let expected = vec![
            start("b", 0, StartReason::Update { instance: id("x0") }),
            start("b", 1, StartReason::Missing),
            start(
                "b",
                2,
                StartReason::CellLost {
                    cell: cell_id("c1"),
                },
            ),
        ];
        assert_eq!(plan(&state, secs(1)).actions, expected);
        state.actual.reverse();
        state.cells.reverse();
        assert_eq!(plan(&state, secs(1)).actions, expected);
    }

    /// The issue's scenario, end to end through the simulated cluster: a
    /// cell goes away, its instances run elsewhere after the grace, it comes
    /// back with its old instances, and no app runs more than desired.
    #[test]
    fn a_cell_lost_and_returning_ends_with_no_over_count() -> Result<(), TestCaseError> {
        let state = ClusterState {
            desired: vec![desired("web", 3)],
            cells: (0..3).map(|i| connected(&format!("c{i}"))).collect(),
            ..ClusterState::default()
        };
        let mut sim = Sim::new(state);
        sim.quiesce()?;
        sim.check_converged()?;
        let on_c1: Vec<InstanceId> = sim
            .state
            .actual
            .iter()
            .filter(|i| i.cell == cell_id("c1") && i.state == InstanceState::Running)
            .map(|i| i.id.clone())
            .collect();
        assert!(
            !on_c1.is_empty(),
            "the placement used c1: {:?}",
            sim.state.actual
        );
        sim.event(&Ev::Disconnect(1));
        sim.quiesce()?;
        sim.check_converged()?;
        sim.event(&Ev::Reconnect(1));
        let p = sim.round()?;
        assert!(
            !p.actions.iter().any(|a| matches!(a, Action::Stop { .. })),
            "stopped before c1 reported: {p:?}"
        );
        sim.event(&Ev::Report(1));
        sim.quiesce()?;
        sim.check_converged()?;
        for id in &on_c1 {
            let i = sim.state.actual.iter().find(|i| i.id == *id).unwrap();
            assert_eq!(i.state, InstanceState::Exited, "stale {id} was stopped");
        }
        let live = sim.state.actual.iter().filter(|i| i.is_live()).count();
        assert_eq!(live, 3);
        Ok(())
    }

    proptest! {
        #![proptest_config(config_cases(1024))]

        #[test]
        fn every_plan_keeps_the_invariants(state in arb_state()) {
            let p = converge(&config(), &state, NOW);
            check_plan(&state, &p, NOW)?;
        }

        #[test]
        fn plans_do_not_depend_on_input_order(state in arb_state(), rot in 0usize..16) {
            let p = converge(&config(), &state, NOW);
            let mut shuffled = state.clone();
            shuffled.actual.reverse();
            shuffled.cells.reverse();
            shuffled.desired.reverse();
            shuffled.pending.reverse();
            if !shuffled.actual.is_empty() {
                let k = rot % shuffled.actual.len();
                shuffled.actual.rotate_left(k);
            }
            prop_assert_eq!(p, converge(&config(), &shuffled, NOW));
        }
    }

    proptest! {
        #![proptest_config(config_cases(256))]

        #[test]
        fn after_any_events_the_cluster_converges_to_exactly_what_is_desired(
            state in arb_state(),
            events in proptest::collection::vec(arb_ev(), 0..40),
            all_return in any::<bool>(),
        ) {
            let mut sim = Sim::new(state);
            for ev in &events {
                sim.event(ev);
                sim.round()?;
            }
            if all_return {
                // Every lost or disconnected cell comes back with whatever
                // it still runs: stale copies must not over-count.
                for c in &mut sim.state.cells {
                    c.liveness = Liveness::Connected;
                }
            }
            // Every connected cell's report arrives.
            for c in &mut sim.state.cells {
                c.reported |= c.liveness == Liveness::Connected;
            }
            sim.quiesce()?;
            sim.check_converged()?;
        }
    }
}
