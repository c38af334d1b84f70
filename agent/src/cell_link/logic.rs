//! The cell side's decisions, pure: reconnect backoff, bids, which
//! snapshots, deltas and events describe the cell's instances. The session
//! feeds these with what it reads from the executor (and the clock, and a
//! random number) and sends what they return.

use corral_proto::wire::{
    Bid, BidOutcome, BidRequest, Bids, InstanceEvent, InstanceEventKind, Refusal, StateChange,
    StateDelta, StateSnapshot, Tag, WorkItem, MAX_DELTA_CHANGES,
};
use corral_proto::{Capacity, InstanceId, InstanceInfo, InstanceKind, InstanceState, Timestamp};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

/// Delays between connection attempts: doubling from `initial` up to `max`,
/// each with "equal jitter" (half the step, plus a random part of the other
/// half), so that the cells of a cluster that lost its brain do not all
/// come back in the same instant, and no delay is close to zero.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub const INITIAL: Duration = Duration::from_millis(200);
    pub const MAX: Duration = Duration::from_secs(10);

    pub fn new(initial: Duration, max: Duration) -> Self {
        let max = max.max(initial);
        Self {
            initial,
            max,
            step: initial,
        }
    }

    /// The delay before the next attempt; `random` is any random number.
    pub fn next_delay(&mut self, random: u64) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.max);
        let half = step / 2;
        let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(random % spread.saturating_add(1))
    }

    /// Back to the first step, after a connection that worked.
    pub fn reset(&mut self) {
        self.step = self.initial;
    }
}

/// What the cell offers to a bid: its tags and capacity, and whether it is
/// leaving.
#[derive(Debug, Clone, Copy)]
pub struct CellOffer<'a> {
    pub tags: &'a BTreeSet<Tag>,
    pub total: Capacity,
    pub available: Capacity,
    pub evacuating: bool,
}

/// What an item holds once placed.
pub fn request_of(item: &WorkItem) -> Capacity {
    Capacity {
        memory_mb: item.resources.memory_mb,
        disk_mb: item.resources.disk_mb,
        containers: 1,
    }
}

/// A bid's score: 1000 × the mean of the used fractions of memory, disk
/// and container slots once `request` is placed, so 0..=1000, lower is
/// better (an emptier cell). It is Diego's resource term (and the brain's
/// `Scoring::Mean`), so a cell's own bid ranks it as the brain would.
pub fn score(total: Capacity, available: Capacity, request: Capacity) -> u32 {
    fn used_after(total: u64, available: u64, request: u64) -> f64 {
        if total == 0 {
            return 1.0;
        }
        let used = total.saturating_sub(available).saturating_add(request);
        (used as f64 / total as f64).min(1.0)
    }
    let mean = (used_after(total.memory_mb, available.memory_mb, request.memory_mb)
        + used_after(total.disk_mb, available.disk_mb, request.disk_mb)
        + used_after(total.containers, available.containers, request.containers))
        / 3.0;
    (mean * 1000.0).round() as u32
}

/// Whether `rootfs` is a path the cell may look at: absolute, without NUL,
/// `.` or `..`. Anything else is unavailable without touching the disk.
pub fn rootfs_path_ok(rootfs: &str) -> bool {
    rootfs.starts_with('/')
        && !rootfs.contains('\0')
        && !rootfs.split('/').any(|c| c == "." || c == "..")
}

/// The cell's bid for one item against what `cell` has free. Refusals are
/// checked in this order: evacuating, tags, root filesystem, capacity.
pub fn bid(item: &WorkItem, cell: &CellOffer<'_>, rootfs_available: bool) -> BidOutcome {
    if cell.evacuating {
        return BidOutcome::Refused(Refusal::Evacuating);
    }
    let missing: BTreeSet<Tag> = item.tags.difference(cell.tags).cloned().collect();
    if !missing.is_empty() {
        return BidOutcome::Refused(Refusal::MissingTags { missing });
    }
    if !rootfs_available {
        return BidOutcome::Refused(Refusal::RootfsUnavailable {
            rootfs: item.rootfs.clone(),
        });
    }
    let request = request_of(item);
    match Capacity::check_fit(cell.total, cell.available, request) {
        Err(e) => BidOutcome::Refused(Refusal::Capacity(e)),
        Ok(()) => BidOutcome::Score(score(cell.total, cell.available, request)),
    }
}

/// Bids for a whole request, one per item in order. The brain sends a cell
/// only the items it placed there, so the bids are a promise for the batch:
/// each item that gets a score is charged against what is free before the
/// next is judged, and items that do not fit together are refused rather
/// than accepted and then refused at `StartWork`. `probe` says whether a
/// root filesystem directory exists; it is asked once per distinct rootfs,
/// and only for well-formed paths.
pub fn bids(req: &BidRequest, cell: &CellOffer<'_>, mut probe: impl FnMut(&Path) -> bool) -> Bids {
    let mut probed: BTreeMap<&str, bool> = BTreeMap::new();
    let mut offer = *cell;
    let bids = req
        .items
        .iter()
        .map(|item| {
            let rootfs = item.rootfs.as_str();
            let rootfs_available = *probed
                .entry(rootfs)
                .or_insert_with(|| rootfs_path_ok(rootfs) && probe(Path::new(rootfs)));
            let outcome = bid(item, &offer, rootfs_available);
            if let BidOutcome::Score(_) = outcome {
                offer.available = minus(offer.available, request_of(item));
            }
            Bid {
                id: item.id.clone(),
                outcome,
            }
        })
        .collect();
    Bids {
        request: req.request,
        bids,
    }
}

fn minus(a: Capacity, b: Capacity) -> Capacity {
    Capacity {
        memory_mb: a.memory_mb.saturating_sub(b.memory_mb),
        disk_mb: a.disk_mb.saturating_sub(b.disk_mb),
        containers: a.containers.saturating_sub(b.containers),
    }
}

/// The events that tell the brain what became of an instance, given how it
/// was last reported (`prev`; `None`: not reported yet) and how it is now.
///
/// - `Started` when it reaches running; also when it is seen ended without
///   having been seen running but did run (it has a start time), so that a
///   short-lived instance still reports its start;
/// - `Crashed` / `Exited` when it reaches that final state.
///
/// Stopping and removal send no event: the brain asked for them, and the
/// state deltas carry them.
pub fn events_for(
    prev: Option<&InstanceInfo>,
    cur: &InstanceInfo,
    now: Timestamp,
) -> Vec<InstanceEvent> {
    let was = prev.map(|p| p.state);
    if was == Some(cur.state) {
        return Vec::new();
    }
    let event = |at: Option<Timestamp>, kind| InstanceEvent {
        id: cur.id.clone(),
        at: at.unwrap_or(now),
        kind,
    };
    let mut out = Vec::new();
    let not_seen_running = matches!(was, None | Some(InstanceState::Starting));
    let started = match cur.state {
        InstanceState::Running => true,
        InstanceState::Crashed | InstanceState::Exited => {
            not_seen_running && cur.started_at.is_some()
        }
        InstanceState::Starting | InstanceState::Stopping => false,
    };
    if started {
        out.push(event(cur.started_at, InstanceEventKind::Started));
    }
    match cur.state {
        InstanceState::Crashed => out.push(event(
            cur.finished_at,
            InstanceEventKind::Crashed {
                reason: cur.reason.clone().unwrap_or_else(|| "crashed".to_owned()),
                exit_code: cur.exit_code,
            },
        )),
        InstanceState::Exited => out.push(event(
            cur.finished_at,
            InstanceEventKind::Exited {
                exit_code: cur.exit_code,
            },
        )),
        InstanceState::Starting | InstanceState::Running | InstanceState::Stopping => {}
    }
    out
}

/// What to send after the instances changed, in this order: the snapshot
/// or the deltas, then the events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// A whole snapshot instead of deltas, when the cell started or stopped
    /// evacuating: only a snapshot carries that flag.
    pub snapshot: Option<StateSnapshot>,
    /// Consecutive deltas (several when there are more than
    /// [`MAX_DELTA_CHANGES`] changes); empty when nothing changed.
    pub deltas: Vec<StateDelta>,
    pub events: Vec<InstanceEvent>,
}

/// What the brain was last told about this cell's instances and whether it
/// is evacuating, and the sequence number the next delta continues. One per
/// connection.
#[derive(Debug, Clone, Default)]
pub struct StateTracker {
    seq: u64,
    available: Capacity,
    evacuating: bool,
    sent: BTreeMap<InstanceId, InstanceInfo>,
}

impl StateTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A full snapshot with the next sequence number; later deltas continue
    /// from it.
    pub fn snapshot(
        &mut self,
        available: Capacity,
        evacuating: bool,
        instances: Vec<InstanceInfo>,
    ) -> StateSnapshot {
        self.seq += 1;
        self.available = available;
        self.evacuating = evacuating;
        self.sent = instances
            .iter()
            .map(|i| (i.id.clone(), i.clone()))
            .collect();
        StateSnapshot {
            seq: self.seq,
            available,
            evacuating,
            instances,
        }
    }

    /// The deltas and events that bring the brain from what it was last
    /// told to `instances`. Changes are in id order, removals after upserts.
    ///
    /// When `evacuating` differs from what the brain was told, the update
    /// is a snapshot instead (with the same events); when evacuation
    /// begins, each LRP instance that has not ended also gets an
    /// `Evacuating` event, so the brain knows to replace it before asking
    /// for its stop.
    pub fn update(
        &mut self,
        available: Capacity,
        evacuating: bool,
        instances: Vec<InstanceInfo>,
        now: Timestamp,
    ) -> Update {
        if evacuating != self.evacuating {
            let mut events: Vec<InstanceEvent> = instances
                .iter()
                .flat_map(|i| events_for(self.sent.get(&i.id), i, now))
                .collect();
            if evacuating {
                events.extend(
                    instances
                        .iter()
                        .filter(|i| i.kind == InstanceKind::Lrp && !i.state.is_final())
                        .map(|i| InstanceEvent {
                            id: i.id.clone(),
                            at: now,
                            kind: InstanceEventKind::Evacuating,
                        }),
                );
            }
            return Update {
                snapshot: Some(self.snapshot(available, evacuating, instances)),
                deltas: Vec::new(),
                events,
            };
        }
        let mut changes = Vec::new();
        let mut events = Vec::new();
        let mut current = BTreeMap::new();
        for info in instances {
            let prev = self.sent.get(&info.id);
            if prev != Some(&info) {
                events.extend(events_for(prev, &info, now));
                changes.push(StateChange::Upsert {
                    instance: info.clone(),
                });
            }
            current.insert(info.id.clone(), info);
        }
        changes.extend(
            self.sent
                .keys()
                .filter(|id| !current.contains_key(*id))
                .map(|id| StateChange::Removed { id: id.clone() }),
        );
        self.sent = current;
        if changes.is_empty() && available == self.available {
            return Update::default();
        }
        self.available = available;
        let mut deltas = Vec::new();
        let mut rest = changes.into_iter().peekable();
        loop {
            let chunk: Vec<StateChange> = rest.by_ref().take(MAX_DELTA_CHANGES).collect();
            self.seq += 1;
            deltas.push(StateDelta {
                seq: self.seq,
                available,
                changes: chunk,
            });
            if rest.peek().is_none() {
                break;
            }
        }
        Update {
            snapshot: None,
            deltas,
            events,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::wire::RequestId;
    use corral_proto::{CapacityError, InstanceSpec, Status};

    fn spec(memory_mb: u64) -> InstanceSpec {
        let mut s: InstanceSpec = serde_json::from_str(
            r#"{"tenant":"t","app":"a","kind":"lrp","rootfs":"/srv/rootfs","command":["/bin/sh"],"resources":{"memory_mb":64,"disk_mb":100}}"#,
        )
        .unwrap();
        s.resources.memory_mb = memory_mb;
        s
    }

    fn item(id: &str, memory_mb: u64, tags: &[&str]) -> WorkItem {
        WorkItem::new(
            InstanceId::new(id).unwrap(),
            &spec(memory_mb),
            tags.iter().map(|t| Tag::new(*t).unwrap()).collect(),
        )
    }

    fn tags(t: &[&str]) -> BTreeSet<Tag> {
        t.iter().map(|t| Tag::new(*t).unwrap()).collect()
    }

    const TOTAL: Capacity = Capacity {
        memory_mb: 1000,
        disk_mb: 1000,
        containers: 10,
    };

    fn info(id: &str, state: InstanceState) -> InstanceInfo {
        let mut st = Status::new();
        st.state = state;
        InstanceInfo::new(&InstanceId::new(id).unwrap(), &spec(64), &st)
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Backoff::INITIAL, Backoff::MAX);
        let lows: Vec<_> = (0..8).map(|_| b.next_delay(0)).collect();
        assert_eq!(
            lows.iter().map(Duration::as_millis).collect::<Vec<_>>(),
            [100, 200, 400, 800, 1600, 3200, 5000, 5000]
        );
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(100));
        // The second step is 400 ms: 200 ms plus up to 200 ms of jitter.
        for r in [1, 12345, 200_000_000, u64::MAX] {
            let mut b = Backoff::new(Backoff::INITIAL, Backoff::MAX);
            b.next_delay(0);
            let d = b.next_delay(r);
            assert!(
                (Duration::from_millis(200)..=Duration::from_millis(400)).contains(&d),
                "{d:?}"
            );
        }
        assert_eq!(
            Backoff::new(Backoff::INITIAL, Backoff::MAX).next_delay(100_000_000),
            Duration::from_millis(200)
        );
    }

    #[test]
    fn score_is_the_mean_used_fraction_after_placement() {
        // Empty cell: (100/1000 + 100/1000 + 1/10) / 3 = 0.1.
        assert_eq!(score(TOTAL, TOTAL, request_of(&item("i", 100, &[]))), 100);
        let half = Capacity {
            memory_mb: 500,
            disk_mb: 500,
            containers: 5,
        };
        assert_eq!(score(TOTAL, half, request_of(&item("i", 100, &[]))), 600);
        let empty = Capacity::default();
        assert_eq!(score(empty, empty, Capacity::default()), 1000);
    }

    #[test]
    fn bids_refuse_with_the_first_reason_in_order() {
        let cell_tags = tags(&["ssd"]);
        let offer = CellOffer {
            tags: &cell_tags,
            total: TOTAL,
            available: TOTAL,
            evacuating: false,
        };
        let ok = item("a", 64, &["ssd"]);
        assert!(matches!(bid(&ok, &offer, true), BidOutcome::Score(_)));
        assert_eq!(
            bid(&item("b", 64, &["ssd", "gpu", "pci"]), &offer, true),
            BidOutcome::Refused(Refusal::MissingTags {
                missing: tags(&["gpu", "pci"])
            })
        );
        assert_eq!(
            bid(&ok, &offer, false),
            BidOutcome::Refused(Refusal::RootfsUnavailable {
                rootfs: "/srv/rootfs".into()
            })
        );
        assert_eq!(
            bid(&item("c", 4096, &[]), &offer, true),
            BidOutcome::Refused(Refusal::Capacity(CapacityError::Memory {
                requested: 4096,
                free: 1000,
                total: 1000
            }))
        );
        let full = CellOffer {
            available: Capacity {
                containers: 0,
                ..TOTAL
            },
            ..offer
        };
        assert!(matches!(
            bid(&ok, &full, true),
            BidOutcome::Refused(Refusal::Capacity(CapacityError::Containers { total: 10 }))
        ));
        let leaving = CellOffer {
            evacuating: true,
            ..offer
        };
        assert_eq!(
            bid(&item("d", 64, &["gpu"]), &leaving, false),
            BidOutcome::Refused(Refusal::Evacuating)
        );
    }

    #[test]
    fn a_batch_gets_one_bid_per_item_and_probes_each_rootfs_once() {
        let cell_tags = tags(&[]);
        let offer = CellOffer {
            tags: &cell_tags,
            total: TOTAL,
            available: TOTAL,
            evacuating: false,
        };
        let mut odd = item("c", 64, &[]);
        odd.rootfs = "/srv/../etc".into();
        let req = BidRequest {
            request: RequestId(7),
            items: vec![item("a", 64, &[]), item("b", 128, &[]), odd],
        };
        let mut probes = Vec::new();
        let out = bids(&req, &offer, |p| {
            probes.push(p.to_owned());
            true
        });
        assert_eq!(out.request, RequestId(7));
        let ids: Vec<&str> = out.bids.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(probes, [Path::new("/srv/rootfs")]);
        assert!(matches!(
            out.bids[2].outcome,
            BidOutcome::Refused(Refusal::RootfsUnavailable { .. })
        ));
        // The second is judged after the first is charged.
        let after_first = minus(TOTAL, request_of(&req.items[0]));
        assert_eq!(
            out.bids[1].outcome,
            BidOutcome::Score(score(TOTAL, after_first, request_of(&req.items[1])))
        );
    }

    #[test]
    fn a_batch_that_fits_only_in_part_is_refused_in_part() {
        let cell_tags = tags(&["ssd"]);
        let offer = CellOffer {
            tags: &cell_tags,
            total: TOTAL,
            available: TOTAL,
            evacuating: false,
        };
        let req = BidRequest {
            request: RequestId(1),
            items: vec![
                item("a", 600, &[]),
                item("refused-tags", 100, &["gpu"]),
                item("b", 600, &[]),
                item("c", 400, &[]),
            ],
        };
        let out = bids(&req, &offer, |_| true);
        let scored: Vec<&str> = out
            .bids
            .iter()
            .filter(|b| matches!(b.outcome, BidOutcome::Score(_)))
            .map(|b| b.id.as_str())
            .collect();
        // A refused item holds nothing: c still fits after a.
        assert_eq!(scored, ["a", "c"]);
        assert_eq!(
            out.bids[2].outcome,
            BidOutcome::Refused(Refusal::Capacity(CapacityError::Memory {
                requested: 600,
                free: 400,
                total: 1000
            }))
        );
    }

    fn kinds(events: &[InstanceEvent]) -> Vec<&'static str> {
        events.iter().map(|e| e.kind.name()).collect()
    }

    #[test]
    fn events_follow_state_changes() {
        let now = Timestamp(99);
        let starting = info("i", InstanceState::Starting);
        let mut running = info("i", InstanceState::Running);
        running.started_at = Some(Timestamp(5));
        let stopping = info("i", InstanceState::Stopping);
        let mut crashed = running.clone();
        crashed.state = InstanceState::Crashed;
        crashed.reason = Some("out of memory".into());
        crashed.exit_code = None;
        crashed.finished_at = Some(Timestamp(9));
        let mut exited = running.clone();
        exited.state = InstanceState::Exited;
        exited.exit_code = Some(0);

        assert!(events_for(None, &starting, now).is_empty());
        assert!(events_for(Some(&starting), &starting, now).is_empty());
        let ev = events_for(Some(&starting), &running, now);
        assert_eq!(kinds(&ev), ["started"]);
        assert_eq!(ev[0].at, Timestamp(5));
        assert!(events_for(Some(&running), &stopping, now).is_empty());
        let ev = events_for(Some(&running), &crashed, now);
        assert_eq!(
            ev[0].kind,
            InstanceEventKind::Crashed {
                reason: "out of memory".into(),
                exit_code: None
            }
        );
        assert_eq!(ev[0].at, Timestamp(9));
        assert_eq!(
            kinds(&events_for(Some(&stopping), &exited, now)),
            ["exited"]
        );
        // Ran and ended between two looks: both are reported, in order.
        assert_eq!(
            kinds(&events_for(Some(&starting), &crashed, now)),
            ["started", "crashed"]
        );
        assert_eq!(
            kinds(&events_for(None, &exited, now)),
            ["started", "exited"]
        );
        // Never ran (the start failed): only the crash, at `now` if untimed.
        let mut failed = starting.clone();
        failed.state = InstanceState::Crashed;
        let ev = events_for(Some(&starting), &failed, now);
        assert_eq!(kinds(&ev), ["crashed"]);
        assert_eq!(ev[0].at, now);
    }

    #[test]
    fn deltas_continue_the_snapshot_and_carry_only_changes() {
        let mut t = StateTracker::new();
        let a = info("a", InstanceState::Running);
        let b = info("b", InstanceState::Starting);
        let snap = t.snapshot(TOTAL, false, vec![a.clone(), b.clone()]);
        assert_eq!(snap.seq, 1);
        assert_eq!(snap.instances.len(), 2);
        let now = Timestamp(1);
        assert_eq!(
            t.update(TOTAL, false, vec![a.clone(), b.clone()], now),
            Update::default()
        );

        let mut b_running = b.clone();
        b_running.state = InstanceState::Running;
        let c = info("c", InstanceState::Starting);
        let less = Capacity {
            memory_mb: 900,
            ..TOTAL
        };
        let u = t.update(less, false, vec![b_running.clone(), c.clone()], now);
        assert_eq!(u.deltas.len(), 1);
        let d = &u.deltas[0];
        assert_eq!((d.seq, d.available), (2, less));
        assert_eq!(
            d.changes,
            [
                StateChange::Upsert {
                    instance: b_running.clone()
                },
                StateChange::Upsert {
                    instance: c.clone()
                },
                StateChange::Removed { id: a.id.clone() },
            ]
        );
        assert_eq!(kinds(&u.events), ["started"]);

        // Capacity alone changing is news too.
        let u = t.update(TOTAL, false, vec![b_running.clone(), c.clone()], now);
        assert_eq!(u.deltas[0].seq, 3);
        assert!(u.deltas[0].changes.is_empty());

        // A fresh snapshot restarts the comparison from what it carried.
        let snap = t.snapshot(TOTAL, false, vec![b.clone()]);
        assert_eq!(snap.seq, 4);
        let u = t.update(TOTAL, false, vec![b_running], now);
        assert_eq!(u.deltas[0].seq, 5);
        assert_eq!(kinds(&u.events), ["started"]);
    }

    #[test]
    fn many_changes_split_into_consecutive_deltas() {
        let mut t = StateTracker::new();
        t.snapshot(TOTAL, false, vec![]);
        let many: Vec<InstanceInfo> = (0..MAX_DELTA_CHANGES + 5)
            .map(|n| info(&format!("i{n}"), InstanceState::Starting))
            .collect();
        let u = t.update(TOTAL, false, many, Timestamp(1));
        let seqs: Vec<u64> = u.deltas.iter().map(|d| d.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(u.deltas[0].changes.len(), MAX_DELTA_CHANGES);
        assert_eq!(u.deltas[1].changes.len(), 5);
    }

    #[test]
    fn starting_or_stopping_evacuation_is_a_snapshot_with_the_flag() {
        let mut t = StateTracker::new();
        let mut web = info("web", InstanceState::Running);
        web.started_at = Some(Timestamp(5));
        let mut job = info("job", InstanceState::Running);
        job.kind = corral_proto::InstanceKind::Task;
        let mut done = info("done", InstanceState::Exited);
        done.exit_code = Some(0);
        let snap = t.snapshot(TOTAL, false, vec![web.clone(), job.clone(), done.clone()]);
        assert!(!snap.evacuating);
        let now = Timestamp(7);

        // Evacuation begins, and meanwhile a new instance started.
        let fresh = info("fresh", InstanceState::Starting);
        let all = vec![web.clone(), job.clone(), done.clone(), fresh.clone()];
        let u = t.update(TOTAL, true, all.clone(), now);
        assert!(u.deltas.is_empty());
        let snap = u.snapshot.expect("a flag change is a snapshot");
        assert_eq!(snap.seq, 2);
        assert!(snap.evacuating);
        assert_eq!(snap.instances, all);
        // Live LRPs only: not the task, not the ended one.
        let evacuating: Vec<&str> = u
            .events
            .iter()
            .filter(|e| e.kind == InstanceEventKind::Evacuating)
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(evacuating, ["web", "fresh"]);
        assert!(u.events.iter().all(|e| e.at == now));

        // While it goes on, changes are deltas again, continuing the snapshot.
        let mut stopping = web.clone();
        stopping.state = InstanceState::Stopping;
        let u = t.update(TOTAL, true, vec![stopping.clone(), job.clone()], now);
        assert!(u.snapshot.is_none());
        assert_eq!(u.deltas[0].seq, 3);
        assert!(u.events.is_empty());
        assert_eq!(
            t.update(TOTAL, true, vec![stopping.clone(), job.clone()], now),
            Update::default()
        );

        // Cancelled: a snapshot without the flag, and no evacuation events.
        let u = t.update(TOTAL, false, vec![stopping, job], now);
        let snap = u.snapshot.expect("a flag change is a snapshot");
        assert_eq!((snap.seq, snap.evacuating), (4, false));
        assert!(u.events.is_empty());
    }

    #[test]
    fn a_snapshot_carries_the_flag_and_a_fresh_session_starts_from_it() {
        let mut t = StateTracker::new();
        let web = info("web", InstanceState::Running);
        // A cell that was already evacuating when the session began says
        // so in its first snapshot; no flag change follows.
        assert!(t.snapshot(TOTAL, true, vec![web.clone()]).evacuating);
        assert_eq!(
            t.update(TOTAL, true, vec![web], Timestamp(1)),
            Update::default()
        );
    }

    #[test]
    fn an_evacuating_cell_refuses_every_item_of_a_batch() {
        let cell_tags = tags(&["ssd"]);
        let offer = CellOffer {
            tags: &cell_tags,
            total: TOTAL,
            available: TOTAL,
            evacuating: true,
        };
        let req = BidRequest {
            request: RequestId(3),
            items: vec![item("a", 64, &[]), item("b", 64, &["ssd"])],
        };
        let out = bids(&req, &offer, |_| true);
        assert!(out
            .bids
            .iter()
            .all(|b| b.outcome == BidOutcome::Refused(Refusal::Evacuating)));
    }
}
