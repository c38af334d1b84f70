//! A simulated cell: a real QUIC client with a real cell certificate that
//! speaks the whole cell protocol (hello, snapshot, deltas, bids, start,
//! stop, pings) and keeps honest capacity accounts, but runs no containers:
//! an instance it accepts is `starting`, then `running` after
//! [`SimCell::start_delay`]. For the brain's tests without root and for
//! `cargo xtask bench auction`, which holds 1,000 of these on loopback.
//!
//! Tests drive what a real cell would experience through a [`SimHandle`]:
//! crash an instance, report state, disconnect, come back. A cell started
//! with [`spawn_networked`] also has a subnet: it gives each instance an
//! address, reports running instances with ports as ready, and keeps the
//! services the brain tells it ([`SimHandle::services`]).

use corral_link::framed::{MessageReader, MessageWriter};
use corral_link::tls::{self, Credentials};
use corral_proto::service::Service;
use corral_proto::wire::{
    Ack, AckOutcome, Bid, BidOutcome, Bids, CloseCode, Hello, Ipv4Net, Message, Refusal, Sender,
    Services, StateChange, StateDelta, StateSnapshot, Tag, Zone, SUPPORTED_VERSIONS,
};
use corral_proto::{
    Capacity, CellId, Event, InstanceId, InstanceInfo, InstanceSpec, InstanceState, Status,
};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// How a simulated cell is set up.
#[derive(Debug, Clone)]
pub struct SimCell {
    pub id: CellId,
    pub zone: Zone,
    pub tags: BTreeSet<Tag>,
    pub total: Capacity,
    /// Time from an accepted start to `running`.
    pub start_delay: Duration,
}

/// What a simulated cell runs, shared with its handle.
#[derive(Debug, Default)]
struct Shared {
    instances: BTreeMap<InstanceId, (InstanceSpec, Status)>,
    /// Changes not yet sent.
    changed: BTreeSet<InstanceId>,
    removed: BTreeSet<InstanceId>,
    connected: bool,
    /// Evacuating: said in every snapshot from now on.
    evacuating: bool,
    /// A snapshot is due (the evacuation flag changed).
    resend: bool,
    starts: u64,
    stops: u64,
    /// Where instance addresses come from (none: instances have none).
    subnet: Option<Ipv4Net>,
    addresses: BTreeMap<InstanceId, Ipv4Addr>,
    /// The services as the brain's messages left them.
    services: BTreeMap<Ipv4Addr, Service>,
    /// The last [`SERVICES_KEPT`] services messages received.
    services_log: Vec<Services>,
    /// What happened when, if asked for ([`SimHandle::record_timeline`]).
    timeline: Option<Vec<Moment>>,
}

/// One step of a simulated cell's work, for finding out where time goes
/// (`cargo xtask bench auction --quic --keep`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A bid request for `n` items arrived.
    BidRequest,
    /// The bids for `n` items were sent.
    Bids,
    /// A StartWork arrived.
    StartWork,
    /// `n` instances were marked running by their timers.
    Running,
    /// A state delta with `n` instances running was sent.
    Delta,
}

impl Mark {
    pub fn name(self) -> &'static str {
        match self {
            Self::BidRequest => "bid-request",
            Self::Bids => "bids",
            Self::StartWork => "start-work",
            Self::Running => "running",
            Self::Delta => "delta",
        }
    }
}

/// When (microseconds of wall-clock time since the Unix epoch) a [`Mark`]
/// happened, and for how many items.
#[derive(Debug, Clone, Copy)]
pub struct Moment {
    pub at_us: u64,
    pub mark: Mark,
    pub n: u32,
}

impl Shared {
    fn note(&mut self, mark: Mark, n: usize) {
        if let Some(t) = &mut self.timeline {
            let at_us = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
            t.push(Moment {
                at_us,
                mark,
                n: u32::try_from(n).unwrap_or(u32::MAX),
            });
        }
    }
}

/// Services messages a simulated cell keeps for its test to read.
const SERVICES_KEPT: usize = 1024;

impl Shared {
    /// The lowest free address of the subnet from .2 (.1 is a gateway's).
    fn assign_address(&mut self, id: &InstanceId) {
        let Some(subnet) = self.subnet else { return };
        let used: BTreeSet<Ipv4Addr> = self.addresses.values().copied().collect();
        let base = u32::from(subnet.addr());
        let size = 1u64 << (32 - u32::from(subnet.prefix()));
        let free = (2..size.saturating_sub(1))
            .filter_map(|n| u32::try_from(n).ok())
            .map(|n| Ipv4Addr::from(base.wrapping_add(n)))
            .find(|a| !used.contains(a));
        if let Some(a) = free {
            self.addresses.insert(id.clone(), a);
        }
    }

    fn info(&self, id: &InstanceId, spec: &InstanceSpec, st: &Status) -> InstanceInfo {
        let mut i = InstanceInfo::new(id, spec, st);
        i.address = self.addresses.get(id).copied();
        i.ready = st.state == InstanceState::Running && !spec.ports.is_empty();
        i
    }

    fn apply_services(&mut self, s: Services) {
        if s.reset {
            self.services.clear();
        }
        for v in &s.upsert {
            self.services.insert(v.vip, v.clone());
        }
        for vip in &s.remove {
            self.services.remove(vip);
        }
        if self.services_log.len() == SERVICES_KEPT {
            self.services_log.remove(0);
        }
        self.services_log.push(s);
    }
}

/// Commands from the test.
enum Command {
    Disconnect,
}

/// Controls a running simulated cell.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    commands: mpsc::UnboundedSender<Command>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl SimHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Instances and their states.
    pub fn instances(&self) -> BTreeMap<InstanceId, (InstanceSpec, InstanceState)> {
        self.lock()
            .instances
            .iter()
            .map(|(id, (spec, st))| (id.clone(), (spec.clone(), st.state)))
            .collect()
    }

    /// Starting or running instances.
    pub fn live(&self) -> usize {
        self.lock()
            .instances
            .values()
            .filter(|(_, s)| matches!(s.state, InstanceState::Starting | InstanceState::Running))
            .count()
    }

    pub fn connected(&self) -> bool {
        self.lock().connected
    }

    /// From now on, note when each step of the work happens.
    pub fn record_timeline(&self) {
        self.lock().timeline.get_or_insert_with(Vec::new);
    }

    /// What was noted since [`SimHandle::record_timeline`].
    pub fn timeline(&self) -> Vec<Moment> {
        self.lock().timeline.clone().unwrap_or_default()
    }

    /// The services the brain has told this cell, by VIP.
    pub fn services(&self) -> BTreeMap<Ipv4Addr, Service> {
        self.lock().services.clone()
    }

    /// The services messages received, oldest first (the last 1,024).
    pub fn services_messages(&self) -> Vec<Services> {
        self.lock().services_log.clone()
    }

    /// Instance addresses (cells started with [`spawn_networked`]).
    pub fn addresses(&self) -> BTreeMap<InstanceId, Ipv4Addr> {
        self.lock().addresses.clone()
    }

    /// StartWork messages accepted, StopWork messages done.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.starts, s.stops)
    }

    /// The instance's process died with this exit code: it is `crashed`.
    pub fn crash(&self, id: &InstanceId, exit_code: i32) -> bool {
        let mut s = self.lock();
        let Some((spec, status)) = s.instances.get_mut(id) else {
            return false;
        };
        let kind = spec.kind;
        let ok = status
            .apply(
                kind,
                Event::Exited {
                    code: Some(exit_code),
                    signal: None,
                    oom_killed: false,
                    at: corral_proto::Timestamp(1),
                },
            )
            .is_ok();
        s.changed.insert(id.clone());
        drop(s);
        self.wake.notify_one();
        ok
    }

    /// The cell evacuates: it says so in a fresh snapshot and refuses new
    /// work, as an agent being drained does.
    pub fn evacuate(&self) {
        let mut s = self.lock();
        s.evacuating = true;
        s.resend = true;
        drop(s);
        self.wake.notify_one();
    }

    /// Drops the connection; the cell reconnects after `reconnect_after`
    /// given to [`spawn`].
    pub fn disconnect(&self) {
        let _ = self.commands.send(Command::Disconnect);
    }

    /// Stops the simulated cell for good (its process "dies").
    pub fn kill(&self) {
        self.task.abort();
        self.lock().connected = false;
    }
}

/// Starts a simulated cell connecting to `brain`; it reconnects
/// `reconnect_after` after losing the connection, until killed.
pub fn spawn(
    sim: SimCell,
    creds: Credentials,
    brain: SocketAddr,
    reconnect_after: Duration,
) -> SimHandle {
    start(sim, None, creds, brain, reconnect_after)
}

/// Like [`spawn`], for a cell with an instance subnet: it announces it in
/// its hello and gives each instance it starts an address from it.
pub fn spawn_networked(
    sim: SimCell,
    subnet: Ipv4Net,
    creds: Credentials,
    brain: SocketAddr,
    reconnect_after: Duration,
) -> SimHandle {
    start(sim, Some(subnet), creds, brain, reconnect_after)
}

fn start(
    sim: SimCell,
    subnet: Option<Ipv4Net>,
    creds: Credentials,
    brain: SocketAddr,
    reconnect_after: Duration,
) -> SimHandle {
    let shared = Arc::new(Mutex::new(Shared {
        subnet,
        ..Shared::default()
    }));
    let wake = Arc::new(Notify::new());
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(
        sim,
        creds,
        brain,
        reconnect_after,
        shared.clone(),
        wake.clone(),
        rx,
    ));
    SimHandle {
        shared,
        wake,
        commands: tx,
        task: Arc::new(task),
    }
}

fn available(sim: &SimCell, s: &Shared) -> Capacity {
    Capacity::available(
        sim.total,
        s.instances.values().map(|(spec, st)| (spec, st.state)),
    )
}

async fn run(
    sim: SimCell,
    creds: Credentials,
    brain: SocketAddr,
    reconnect_after: Duration,
    shared: Arc<Mutex<Shared>>,
    wake: Arc<Notify>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let Ok(endpoint) = tls::client_endpoint(([127, 0, 0, 1], 0).into(), &creds, None) else {
        return;
    };
    loop {
        if let Err(e) = session(&sim, &endpoint, brain, &shared, &wake, &mut commands).await {
            tracing::debug!(cell = %sim.id, "simulated cell session ended: {e}");
        }
        shared.lock().unwrap_or_else(|e| e.into_inner()).connected = false;
        tokio::time::sleep(reconnect_after).await;
    }
}

type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

async fn session(
    sim: &SimCell,
    endpoint: &quinn::Endpoint,
    brain: SocketAddr,
    shared: &Arc<Mutex<Shared>>,
    wake: &Arc<Notify>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
) -> Fallible<()> {
    let connection = tls::connect(endpoint, brain)?.await?;
    let (send, recv) = connection.open_bi().await?;
    let mut w = MessageWriter::new(send);
    let mut r = MessageReader::new(recv, Sender::Brain);
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    let (avail, subnet) = {
        let s = lock();
        (available(sim, &s), s.subnet)
    };
    w.send(&Message::Hello(Hello {
        versions: SUPPORTED_VERSIONS,
        cell: sim.id.clone(),
        zone: sim.zone.clone(),
        tags: sim.tags.clone(),
        total: sim.total,
        available: avail,
        subnet,
        addresses: if subnet.is_some() {
            vec![std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)]
        } else {
            vec![]
        },
    }))
    .await?;
    match r.next().await? {
        Some(Message::HelloAck(_)) => {}
        other => return Err(format!("expected hello-ack, got {other:?}").into()),
    }
    let mut seq = 0u64;
    let snapshot = |seq: u64| {
        let mut s = lock();
        s.changed.clear();
        s.removed.clear();
        s.resend = false;
        s.connected = true;
        Message::StateSnapshot(StateSnapshot {
            seq,
            available: available(sim, &s),
            evacuating: s.evacuating,
            instances: s
                .instances
                .iter()
                .map(|(id, (spec, st))| s.info(id, spec, st))
                .collect(),
        })
    };
    w.send(&snapshot(seq)).await?;
    let (starting_tx, mut starting_rx) = mpsc::unbounded_channel::<InstanceId>();
    loop {
        tokio::select! {
            msg = r.next() => {
                let Some(msg) = msg? else { return Ok(()) };
                match msg {
                    Message::RequestState => {
                        seq += 1;
                        w.send(&snapshot(seq)).await?;
                    }
                    Message::BidRequest(req) => {
                        let (mut free, evacuating) = {
                            let mut s = lock();
                            s.note(Mark::BidRequest, req.items.len());
                            (available(sim, &s), s.evacuating)
                        };
                        let bids = req.items.iter().map(|item| {
                            let outcome = if evacuating {
                                BidOutcome::Refused(Refusal::Evacuating)
                            } else if !item.tags.is_subset(&sim.tags) {
                                BidOutcome::Refused(Refusal::MissingTags {
                                    missing: item.tags.difference(&sim.tags).cloned().collect(),
                                })
                            } else {
                                let need = Capacity {
                                    memory_mb: item.resources.memory_mb,
                                    disk_mb: item.resources.disk_mb,
                                    containers: 1,
                                };
                                match Capacity::check_fit(sim.total, free, need) {
                                    Ok(()) => {
                                        free.memory_mb -= need.memory_mb;
                                        free.disk_mb -= need.disk_mb;
                                        free.containers -= 1;
                                        BidOutcome::Score(0)
                                    }
                                    Err(e) => BidOutcome::Refused(Refusal::Capacity(e)),
                                }
                            };
                            Bid { id: item.id.clone(), outcome }
                        }).collect();
                        w.send(&Message::Bids(Bids { request: req.request, bids })).await?;
                        lock().note(Mark::Bids, req.items.len());
                    }
                    Message::StartWork(work) => {
                        let outcome = {
                        let mut s = lock();
                        s.note(Mark::StartWork, 1);
                        match s.instances.get(&work.id) {
                            Some((spec, _)) if *spec == work.spec => AckOutcome::Done,
                            Some(_) => AckOutcome::Refused(Refusal::Duplicate { id: work.id.clone() }),
                            None => {
                                s.instances.insert(work.id.clone(), (work.spec.clone(), Status::new()));
                                s.assign_address(&work.id);
                                s.changed.insert(work.id.clone());
                                s.starts += 1;
                                let _ = starting_tx.send(work.id.clone());
                                AckOutcome::Done
                            }
                        }
                        };
                        w.send(&Message::Ack(Ack { request: work.request, outcome })).await?;
                        wake.notify_one();
                    }
                    Message::StopWork(stop) => {
                        {
                            let mut s = lock();
                            if s.instances.remove(&stop.id).is_some() {
                                s.addresses.remove(&stop.id);
                                s.changed.remove(&stop.id);
                                s.removed.insert(stop.id.clone());
                                s.stops += 1;
                            }
                        }
                        w.send(&Message::Ack(Ack { request: stop.request, outcome: AckOutcome::Done })).await?;
                        wake.notify_one();
                    }
                    Message::Ping { seq } => w.send(&Message::Pong { seq }).await?,
                    Message::Services(services) => lock().apply_services(services),
                    _ => {}
                }
            }
            Some(id) = starting_rx.recv() => {
                let delay = sim.start_delay;
                let shared = shared.clone();
                let wake = wake.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((spec, st)) = s.instances.get_mut(&id) {
                        if st.state == InstanceState::Starting {
                            let _ = st.apply(spec.kind, Event::Started { pid: 1, at: corral_proto::Timestamp(1) });
                            s.changed.insert(id);
                            s.note(Mark::Running, 1);
                            wake.notify_one();
                        }
                    }
                });
            }
            () = wake.notified() => {
                if lock().resend {
                    seq += 1;
                    w.send(&snapshot(seq)).await?;
                    continue;
                }
                let (changes, avail, running) = {
                let mut s = lock();
                let mut changes: Vec<StateChange> = s.removed.iter().map(|id| StateChange::Removed { id: id.clone() }).collect();
                for id in std::mem::take(&mut s.changed) {
                    if let Some((spec, st)) = s.instances.get(&id) {
                        changes.push(StateChange::Upsert { instance: s.info(&id, spec, st) });
                    }
                }
                s.removed.clear();
                let running = if s.timeline.is_some() {
                    changes.iter().filter(|c| matches!(c, StateChange::Upsert { instance } if instance.state == InstanceState::Running)).count()
                } else {
                    0
                };
                (changes, available(sim, &s), running)
                };
                if changes.is_empty() {
                    continue;
                }
                for chunk in changes.chunks(corral_proto::wire::MAX_DELTA_CHANGES) {
                    seq += 1;
                    w.send(&Message::StateDelta(StateDelta { seq, available: avail, changes: chunk.to_vec() })).await?;
                }
                if running > 0 {
                    lock().note(Mark::Delta, running);
                }
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Disconnect) | None => {
                    connection.close(quinn::VarInt::from_u32(CloseCode::Normal.as_u32()), b"simulated disconnect");
                    return Ok(());
                }
            },
        }
    }
}
