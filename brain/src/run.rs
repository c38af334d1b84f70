//! The running brain: the QUIC endpoint for cells, the management API, and
//! one loop that owns the [`Cluster`] and acts on it.
//!
//! ```text
//!  cells ──QUIC──▶ connection tasks ──Input──▶ ┌──────────── loop ────────────┐
//!        ◀─────── (one per cell)   ◀─Message── │ Cluster (pure)               │
//!                                              │ converge → starts, stops     │
//!  API (hyper) ── store commit ── changes ───▶ │ auction  → bids → StartWork  │
//!                                              │ effects  → store, StopWork   │
//!                                              └──────── SharedView ──▶ API ───┘
//! ```
//!
//! Connection tasks do the protocol's mechanics: the handshake (identity
//! from the certificate), the hello and version negotiation, framing, and
//! closing with a [`CloseCode`] that says why. Everything that decides
//! lives in the loop, which processes what arrived in a batch, then runs
//! convergence once over the slots it touched: event-driven, plus a full
//! pass on cell changes, a safety sweep every [`SWEEP`] and a wake-up when
//! a grace or backoff ends.
//!
//! # Auctions
//!
//! Starts are batched (up to [`ROUND_ITEMS`] per round, like Diego's
//! auctioneer batching its pending work), with up to [`ROUNDS_IN_FLIGHT`]
//! rounds waiting for bids at once: what a round offers is held (reserved)
//! on its cell until the cell reports the instance, so later rounds see the
//! capacity taken. A round:
//!
//! 1. the brain scores every connected cell centrally from the state the
//!    cells report ([`run_auction`](crate::auction::run_auction); Diego's
//!    auctioneer likewise fetches its cells' state and scores centrally),
//!    which sees the whole batch and
//!    spreads it;
//! 2. each chosen cell is sent a [`BidRequest`] holding only the items
//!    placed on it, and answers with a bid or a refusal per item from its
//!    live state (capacity, tags, root filesystem, evacuation) — so traffic
//!    grows with the batch, not with batch × cells;
//! 3. accepted items are recorded as placements (one store commit) and
//!    sent as [`StartWork`]; refused ones go back to the queue, never to
//!    the same cell again in this try; a cell that does not answer within
//!    [`BID_TIMEOUT`] is treated as refusing.
//!
//! An item that fits nowhere is logged with the reason ("no cell has 512 MB
//! free: largest free is 256 MB on cell-2"), counted by reason, and tried
//! again after [`UNPLACED_RETRY`]; a task that fits nowhere fails with the
//! reason, as in Diego.
//!
//! Store writes happen on the loop, synchronously: redb commits take about a
//! millisecond, and doing them in order keeps "recorded before sent".

use crate::api::{ActualView, ApiState, SharedView};
use crate::auction::{AuctionConfig, CellView as AuctionCell};
use crate::backoff::BackoffConfig;
use crate::cluster::{Cluster, Effect, Pending};
use crate::config::Config;
use crate::converge::{converge, converge_slots, Action, ConvergeConfig, StopReason};
use crate::desired::{AppKey, ChangeEvent, Placement, TaskId, TaskResult, TaskState, Workload};
use crate::hello::accept_hello;
use crate::metrics::BrainMetrics;
use crate::model::{LrpKey, Time};
use crate::store::{Op, RedbStore, Store, StoreError};
use corral_link::framed::{LinkError, MessageReader, MessageWriter};
use corral_link::tls::{self, Credentials};
use corral_link::PeerIdentity;
use corral_proto::policy::PolicyRule;
use corral_proto::service::Service;
use corral_proto::wire::{
    AckOutcome, BidOutcome, BidRequest, BrainId, CloseCode, Hello, Message, Refusal, RequestId,
    Sender, StartWork, StopWork, WorkItem, MAX_BATCH_ITEMS, SUPPORTED_VERSIONS,
};
use corral_proto::wire::{
    Endpoints, Ipv4Net, Policies, RemoteEndpoint, Route, Routes, Services, MAX_ENDPOINTS,
    MAX_SERVICES,
};
use corral_proto::{CellId, InstanceId, InstanceKind, Timestamp};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{broadcast, mpsc};

/// The convergence safety sweep.
pub const SWEEP: Duration = Duration::from_secs(5);
/// Convergence (with the API view and the network picture) takes at most
/// about a tenth of the loop's time: after a pass that took `t`, the next
/// waits `10 × t` (at most [`MAX_CONVERGE_INTERVAL`]) unless a timer is due.
/// A small cluster converges after every batch; 100,000 instances do not
/// make every bid answer pay for a walk over all of them.
const CONVERGE_SHARE: u32 = 10;
pub const MAX_CONVERGE_INTERVAL: Duration = Duration::from_secs(1);
/// Most starts in one auction round (each chosen cell gets its share in bid
/// requests of at most [`MAX_BATCH_ITEMS`]). Larger rounds place faster and,
/// since a cell's share of a round is not charged the starting weight
/// ([`AuctionConfig::round_share`]), balance better too: the round is dealt
/// out largest first by load (in process, 1,000 cells: 2.3 % memory spread
/// at 8,192 per round, 6.2 % at 1,000; end to end, `bench auction --quic`
/// with every app posted within a second: 4.4–4.5 % at 16,384 in two runs,
/// 5.6 % at 8,192 in one; both before memory counted three times in the
/// score, which brought 16,384 to a median of ~2 %).
pub const ROUND_ITEMS: usize = 16384;
/// Rounds waiting for bids at once. Capacity offered in a round is held
/// (reserved) on its cell until the cell reports the instance, so the next
/// round sees it taken; a new round starts while others wait only when a
/// whole round's worth of items is queued.
pub const ROUNDS_IN_FLIGHT: usize = 4;
/// The rounds whose starts a cell may still be reporting when the next
/// round is placed ([`AuctionConfig::pipeline_items`]): in `cargo xtask
/// bench auction --quic`, groups of cells reported running up to two
/// rounds after their peers (docs/benchmarks.md).
pub const RECENT_ROUNDS: usize = 2;
/// How long a cell has to answer a bid request.
pub const BID_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a cell has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon an item that fit nowhere is tried again (sooner if cells come).
pub const UNPLACED_RETRY: Duration = Duration::from_secs(5);
/// A stop not done after this long is sent again.
const STOP_RESEND: Duration = Duration::from_secs(30);
/// Grace a stop gives an instance between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Messages queued to one cell before it counts as stuck and is dropped
/// (it reconnects and resynchronises).
const OUTBOX: usize = 8192;

/// The brain's clock: monotonic, with an epoch at the Unix epoch so that
/// crash-backoff deadlines persisted as wall-clock times keep their meaning
/// across a restart.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_wall_ms: u64,
}

impl Clock {
    pub fn new() -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Self {
            start: Instant::now(),
            start_wall_ms: wall,
        }
    }

    pub fn now(&self) -> Time {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        Time::from_millis(self.start_wall_ms.saturating_add(elapsed))
    }

    pub fn wall(&self) -> Timestamp {
        self.now().to_timestamp()
    }

    fn instant_of(&self, t: Time) -> Instant {
        let from_start = t.as_millis().saturating_sub(self.start_wall_ms);
        self.start + Duration::from_millis(from_start)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Why the brain could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] corral_link::tls::TlsError),
    #[error("the certificate {cert} is for {found}, but this brain is brain {expected}: issue one with `corral-brain certs issue --brain {expected}` or set brain_id")]
    WrongIdentity {
        cert: std::path::PathBuf,
        found: PeerIdentity,
        expected: BrainId,
    },
    #[error("cannot listen for the management API on {addr}: {source}")]
    ApiBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What arrives at the loop.
enum Input {
    Connected {
        conn: u64,
        hello: Hello,
        outbox: mpsc::Sender<Message>,
        connection: quinn::Connection,
    },
    Message {
        cell: CellId,
        conn: u64,
        msg: Message,
        /// When its connection task read it.
        read_at: Instant,
    },
    Disconnected {
        cell: CellId,
        conn: u64,
        reason: String,
    },
}

/// A running brain's addresses, for tests and the demo.
#[derive(Debug, Clone)]
pub struct Bound {
    pub quic: SocketAddr,
    pub api: Option<SocketAddr>,
}

/// Runs the brain until `shutdown` completes. `ready` receives the bound
/// addresses once the brain accepts cells and API requests.
pub async fn run(
    config: Config,
    ready: impl FnOnce(Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let creds = Credentials::from_files(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let me = PeerIdentity::Brain(config.brain_id.clone());
    if creds.identity() != &me {
        return Err(StartError::WrongIdentity {
            cert: config.tls.cert.clone(),
            found: creds.identity().clone(),
            expected: config.brain_id.clone(),
        });
    }
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&config.store_path())?);
    let clock = Clock::new();
    let mut snapshot = store.snapshot()?;
    if let Some(range) = config.vip_range {
        let given = crate::store::give_missing_vips(&*store, &snapshot.apps, range);
        match &given {
            Ok(apps) => {
                for app in apps {
                    let vip = app.vip.map(|v| v.to_string()).unwrap_or_default();
                    tracing::info!(app = %app.key(), %vip, "app without a VIP given one");
                }
            }
            Err(e) => tracing::warn!("giving VIPs to apps created without one: {e}"),
        }
        // Read again only when something was written (or may have been).
        if !matches!(&given, Ok(apps) if apps.is_empty()) {
            snapshot = store.snapshot()?;
        }
    }
    let backoff = BackoffConfig::default();
    let cluster = Cluster::restore(backoff, snapshot, clock.now(), clock.wall());
    tracing::info!(
        apps = cluster.apps.len(),
        tasks = cluster.tasks.len(),
        placements = cluster.placements.len(),
        cells = cluster.cells.len(),
        "store opened: {}",
        config.store_path().display()
    );
    let view = Arc::new(SharedView::new(cluster.view()));
    let metrics = Arc::new(BrainMetrics::new());
    let api = Arc::new(
        ApiState::new(
            store.clone(),
            view.clone() as Arc<dyn ActualView>,
            config.tokens.clone(),
        )?
        .with_vip_range(config.vip_range)
        .with_metrics({
            let metrics = metrics.clone();
            move || metrics.render()
        }),
    );
    let endpoint = tls::server_endpoint(config.quic_listen, &creds)?;
    let quic = endpoint
        .local_addr()
        .map_err(|source| StartError::ApiBind {
            addr: config.quic_listen,
            source,
        })?;
    let listener = match config.api_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::ApiBind { addr, source })?,
        ),
        None => None,
    };
    let api_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
    tracing::info!(brain = %config.brain_id, %quic, api = ?api_addr, "brain running");

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_task = listener.map(|l| {
        let api = api.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(crate::api::serve(l, api, async move {
            let _ = stop.wait_for(|s| *s).await;
        }))
    });
    let (input_tx, input_rx) = mpsc::channel(65_536);
    let accept_task = tokio::spawn(accept_loop(
        endpoint.clone(),
        config.brain_id.clone(),
        config.vip_range,
        input_tx,
        metrics.clone(),
    ));
    ready(Bound {
        quic,
        api: api_addr,
    });
    let brain = Loop {
        cluster,
        conns: BTreeMap::new(),
        store,
        api,
        view,
        metrics,
        clock,
        converge: ConvergeConfig {
            lost_cell_grace: Duration::from_secs(config.cell_lost_grace_secs),
            ..ConvergeConfig::default()
        },
        auction: AuctionConfig::default(),
        next_request: 1,
        requests: Requests::default(),
        queue: VecDeque::new(),
        offers: BTreeMap::new(),
        rounds: BTreeMap::new(),
        next_round: 0,
        recent_rounds: VecDeque::with_capacity(RECENT_ROUNDS),
        input_lag: tracing::enabled!(target: "corral_brain::round", tracing::Level::DEBUG)
            .then(BTreeMap::new),
        accepted: Vec::new(),
        last_converge: None,
        last_full: None,
        tasks_changed: false,
        dirty: false,
        converge_cost: Duration::ZERO,
        behind: false,
        step_started: Instant::now(),
        wake_at: None,
        policies: Vec::new(),
        told_routes: Vec::new(),
        told_endpoints: BTreeMap::new(),
        told_policies: Vec::new(),
        told_services: BTreeMap::new(),
        vip_range: config.vip_range,
    };
    brain.run(input_rx, shutdown).await;
    let _ = stop_tx.send(true);
    accept_task.abort();
    endpoint.close(
        quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
        b"brain shutting down",
    );
    if let Some(t) = api_task {
        let _ = t.await;
    }
    endpoint.wait_idle().await;
    tracing::info!("brain stopped");
    Ok(())
}

// ---------------------------------------------------------------------------
// Connections.

async fn accept_loop(
    endpoint: quinn::Endpoint,
    brain: BrainId,
    vips: Option<Ipv4Net>,
    input: mpsc::Sender<Input>,
    metrics: Arc<BrainMetrics>,
) {
    let mut next_conn = 0u64;
    while let Some(incoming) = endpoint.accept().await {
        next_conn += 1;
        let conn = next_conn;
        let input = input.clone();
        let brain = brain.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(connection) => serve_cell(conn, connection, brain, vips, input, metrics).await,
                Err(e) => match tls::handshake_refusal(&e) {
                    Some(r) => tracing::warn!(%remote, "refused a cell's connection: {r}"),
                    None => tracing::info!(%remote, "a cell's connection failed: {e}"),
                },
            }
        });
    }
}

fn close(connection: &quinn::Connection, code: CloseCode, reason: &str) {
    connection.close(quinn::VarInt::from_u32(code.as_u32()), reason.as_bytes());
}

/// One cell's connection, from the hello to its end.
async fn serve_cell(
    conn: u64,
    connection: quinn::Connection,
    brain: BrainId,
    vips: Option<Ipv4Net>,
    input: mpsc::Sender<Input>,
    metrics: Arc<BrainMetrics>,
) {
    let remote = connection.remote_address();
    let peer = match tls::peer_identity(&connection) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%remote, "refused a connection: {e}");
            close(&connection, CloseCode::Identity, &e.to_string());
            return;
        }
    };
    let greeting = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, recv) = connection.accept_bi().await?;
        let mut reader = MessageReader::new(recv, Sender::Cell);
        let first = reader.next().await?;
        Ok::<_, LinkError>((MessageWriter::new(send), reader, first))
    })
    .await;
    let (mut writer, mut reader, hello) = match greeting {
        Ok(Ok((w, r, Some(Message::Hello(hello))))) => (w, r, hello),
        Ok(Ok((_, _, other))) => {
            let what = other.as_ref().map_or("nothing", Message::name);
            tracing::warn!(%peer, %remote, "refused: sent {what} before hello");
            close(&connection, CloseCode::Protocol, "hello first");
            return;
        }
        Ok(Err(e)) => {
            tracing::warn!(%peer, %remote, "refused: {e}");
            close(&connection, CloseCode::Protocol, &e.to_string());
            return;
        }
        Err(_) => {
            tracing::warn!(%peer, %remote, "refused: no hello within {HELLO_TIMEOUT:?}");
            close(&connection, CloseCode::Protocol, "no hello in time");
            return;
        }
    };
    let ack = match accept_hello(
        &peer,
        &hello,
        SUPPORTED_VERSIONS,
        &brain,
        hello.subnet,
        vips,
    ) {
        Ok(ack) => ack,
        Err(e) => {
            tracing::warn!(%peer, %remote, "refused the cell: {e}");
            close(&connection, e.close_code(), &e.to_string());
            return;
        }
    };
    if let Err(e) = writer.send(&Message::HelloAck(ack)).await {
        tracing::info!(%peer, "lost the cell during the hello: {e}");
        return;
    }
    let cell = hello.cell.clone();
    tracing::info!(%cell, %remote, zone = %hello.zone, "cell connected");
    let (outbox_tx, mut outbox) = mpsc::channel::<Message>(OUTBOX);
    if input
        .send(Input::Connected {
            conn,
            hello,
            outbox: outbox_tx,
            connection: connection.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    // Reading and writing run side by side, not as branches of one select
    // whose body awaits: when the loop's input queue is full, the reading
    // half waits for room, and the writing half keeps delivering bid
    // requests and work (a cell that is not sent its bid requests looks
    // silent, and one whose stream backs up stops answering).
    let reading = async {
        loop {
            match reader.next().await {
                Ok(Some(msg)) => {
                    metrics.message("in", msg.name());
                    let msg = Input::Message {
                        cell: cell.clone(),
                        conn,
                        msg,
                        read_at: Instant::now(),
                    };
                    if input.send(msg).await.is_err() {
                        break "the brain is stopping".to_owned();
                    }
                }
                Ok(None) => break "the cell finished its stream".to_owned(),
                Err(LinkError::Closed(e))
                | Err(LinkError::Read(quinn::ReadError::ConnectionLost(e))) => {
                    break format!("connection lost: {e}");
                }
                Err(e) => {
                    tracing::warn!(%cell, "dropping the cell: {e}");
                    close(&connection, CloseCode::Protocol, &e.to_string());
                    break e.to_string();
                }
            }
        }
    };
    let writing = async {
        while let Some(msg) = outbox.recv().await {
            metrics.message("out", msg.name());
            if let Err(e) = writer.send(&msg).await {
                return format!("sending {}: {e}", msg.name());
            }
        }
        // The loop replaced or dropped this connection.
        "replaced".to_owned()
    };
    let reason = tokio::select! {
        r = reading => r,
        w = writing => w,
    };
    let _ = input.send(Input::Disconnected { cell, conn, reason }).await;
}

// ---------------------------------------------------------------------------
// The loop.

struct Conn {
    id: u64,
    outbox: mpsc::Sender<Message>,
    connection: quinn::Connection,
}

/// What a request to a cell was for, to act on its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    Start {
        id: InstanceId,
        slot: Option<LrpKey>,
        task: Option<TaskId>,
    },
    Stop,
}

/// Requests sent to cells and not answered yet, with the cell each went to.
/// A cell answers on the connection a request came by, so when it
/// connects again the answers to what its older connection carried will
/// never come: they are forgotten (the new connection's snapshot says what
/// was done, see `Cluster::start_again`), instead of piling up with every
/// agent restart.
#[derive(Debug, Default)]
struct Requests(BTreeMap<RequestId, (CellId, Request)>);

impl Requests {
    fn insert(&mut self, id: RequestId, cell: &CellId, r: Request) {
        self.0.insert(id, (cell.clone(), r));
    }

    /// The request `id` answered by `cell`; None if unknown, or sent to
    /// another cell (then it stays).
    fn answered(&mut self, id: RequestId, cell: &CellId) -> Option<Request> {
        match self.0.get(&id) {
            Some((to, _)) if to == cell => self.0.remove(&id).map(|(_, r)| r),
            _ => None,
        }
    }

    fn forget_cell(&mut self, cell: &CellId) {
        self.0.retain(|_, (to, _)| to != cell);
    }
}

/// What the change events since the last look touched.
#[derive(Default)]
struct Changed {
    apps: BTreeSet<AppKey>,
    tasks: BTreeSet<TaskId>,
    policies: bool,
    /// Events were lost: read everything.
    everything: bool,
}

impl Changed {
    fn note(&mut self, event: ChangeEvent) {
        match event {
            ChangeEvent::AppCreated { app, .. } | ChangeEvent::AppUpdated { app, .. } => {
                self.apps.insert(app.key());
            }
            ChangeEvent::AppDeleted { tenant, name, .. } => {
                self.apps.insert(AppKey { tenant, name });
            }
            ChangeEvent::TaskCreated { task, .. } | ChangeEvent::TaskUpdated { task, .. } => {
                self.tasks.insert(task.id);
            }
            ChangeEvent::PolicyCreated { .. } | ChangeEvent::PolicyDeleted { .. } => {
                self.policies = true;
            }
        }
    }
}

/// An item waiting for an auction, and the cells that refused it.
struct Queued {
    item: WorkItem,
    /// Boxed: a queued start is moved several times on its way to a cell
    /// (queue, round, offer, acceptance), and the spec is most of its size.
    spec: Box<corral_proto::InstanceSpec>,
    slot: Option<(LrpKey, u64)>,
    refused_by: BTreeSet<CellId>,
}

impl Queued {
    /// What the item takes from a cell.
    fn need(&self) -> corral_proto::Capacity {
        corral_proto::Capacity {
            memory_mb: self.item.resources.memory_mb,
            disk_mb: self.item.resources.disk_mb,
            containers: 1,
        }
    }

    /// The app whose instance this is (LRPs only).
    fn app(&self) -> Option<AppKey> {
        self.slot.as_ref().map(|(s, _)| s.app.clone())
    }
}

/// An auction waiting for bids.
struct Round {
    started: Instant,
    deadline: Instant,
    /// Bid requests not answered yet.
    waiting: usize,
}

/// Items offered to a cell in a bid request, waiting for its bids.
struct Offer {
    cell: CellId,
    items: Vec<Queued>,
    round: u64,
}

struct Loop {
    cluster: Cluster,
    conns: BTreeMap<CellId, Conn>,
    store: Arc<dyn Store>,
    api: Arc<ApiState>,
    view: Arc<SharedView>,
    metrics: Arc<BrainMetrics>,
    clock: Clock,
    converge: ConvergeConfig,
    auction: AuctionConfig,
    next_request: u64,
    requests: Requests,
    queue: VecDeque<Queued>,
    /// Per bid request sent: what it offered.
    offers: BTreeMap<RequestId, Offer>,
    /// Rounds waiting for bids, by number.
    rounds: BTreeMap<u64, Round>,
    next_round: u64,
    /// Items placed by the last [`RECENT_ROUNDS`] rounds, oldest first
    /// ([`AuctionConfig::pipeline_items`]).
    recent_rounds: VecDeque<u64>,
    /// With the round log on (`corral_brain::round` at debug; `None`: off):
    /// per cell, the longest a state delta waited between its connection
    /// task reading it and the loop applying it, since the last round.
    input_lag: Option<BTreeMap<CellId, Duration>>,
    /// Bids accepted and not yet recorded (see `start_accepted`).
    accepted: Vec<(CellId, Vec<Queued>)>,
    /// When convergence last ran, to bound its cost under a storm of reports.
    last_converge: Option<Instant>,
    /// When the last full pass (over every app) ran.
    last_full: Option<Instant>,
    /// Tasks changed since they were last looked at.
    tasks_changed: bool,
    /// Inputs arrived since convergence last ran.
    dirty: bool,
    /// How long the last convergence pass took.
    converge_cost: Duration,
    /// Inputs were waiting when this pass started.
    behind: bool,
    /// When this pass started, every input that had arrived read: a bid
    /// deadline counts only if it passed before then (a long pass must not
    /// turn bids that arrived during it into silence).
    step_started: Instant,
    wake_at: Option<Time>,
    /// Desired policies, from the store.
    policies: Vec<PolicyRule>,
    /// What every connected cell was last told.
    told_routes: Vec<Route>,
    told_endpoints: BTreeMap<Ipv4Addr, RemoteEndpoint>,
    told_policies: Vec<PolicyRule>,
    told_services: BTreeMap<Ipv4Addr, Service>,
    /// `[network] vip_range`, for the free-VIP gauge.
    vip_range: Option<Ipv4Net>,
}

impl Loop {
    async fn run(mut self, mut input: mpsc::Receiver<Input>, shutdown: impl Future<Output = ()>) {
        // Subscribed before the first read, so that no change is missed.
        let mut changes = self.api.subscribe_events();
        tokio::pin!(shutdown);
        self.reload_desired();
        self.step(false);
        loop {
            let wake = self.next_wake();
            // A pass starts when something arrives (or a timer is due).
            let mut pass: Option<Instant> = None;
            tokio::select! {
                // What cells said first: a bid deadline must not win over
                // bids that have arrived.
                biased;
                got = input.recv() => {
                    let Some(first) = got else { break };
                    pass = Some(Instant::now());
                    self.handle(first);
                    // Take whatever else has arrived, then decide once.
                    while let Ok(more) = input.try_recv() {
                        self.handle(more);
                    }
                }
                event = changes.recv() => {
                    let mut changed = Changed::default();
                    let mut next = event;
                    loop {
                        match next {
                            Ok(e) => changed.note(e),
                            Err(broadcast::error::RecvError::Lagged(_)) => changed.everything = true,
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                        next = match changes.try_recv() {
                            Ok(e) => Ok(e),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Err(broadcast::error::RecvError::Lagged(n))
                            }
                            Err(_) => break,
                        };
                    }
                    pass = Some(Instant::now());
                    self.reload_changed(changed);
                }
                () = tokio::time::sleep_until(wake.into()) => {}
                () = &mut shutdown => break,
            }
            let started = pass.unwrap_or_else(Instant::now);
            self.step(!input.is_empty());
            self.metrics.loop_pass(started.elapsed().as_secs_f64());
        }
        for conn in self.conns.values() {
            close(&conn.connection, CloseCode::Normal, "brain shutting down");
        }
    }

    fn next_wake(&self) -> Instant {
        let mut wake = Instant::now() + SWEEP;
        if self.dirty {
            if let Some(last) = self.last_converge {
                wake = wake.min(last + self.converge_interval());
            }
        }
        if let Some(at) = self.wake_at {
            wake = wake.min(self.clock.instant_of(at));
        }
        if let Some(r) = self.rounds.values().map(|r| r.deadline).min() {
            wake = wake.min(r);
        }
        wake
    }

    /// Reads what changed from the store (its current state, whatever the
    /// order the events arrived in), or everything if events were lost.
    fn reload_changed(&mut self, changed: Changed) {
        if changed.everything {
            self.reload_desired();
            return;
        }
        if changed.policies {
            match self.store.policies() {
                Ok(p) => self.policies = p.into_iter().map(|p| p.rule).collect(),
                Err(e) => tracing::error!("reading policies: {e}"),
            }
        }
        self.tasks_changed |= !changed.tasks.is_empty();
        for key in changed.apps {
            self.cluster.touch(key.clone());
            match self.store.app(&key) {
                Ok(Some(app)) => {
                    self.cluster.apps.insert(key, app);
                }
                Ok(None) => {
                    self.cluster.apps.remove(&key);
                }
                Err(e) => {
                    tracing::error!("reading app {}/{}: {e}", key.tenant, key.name);
                    self.reload_desired();
                    return;
                }
            }
        }
        for id in changed.tasks {
            match self.store.task(&id) {
                Ok(Some(task)) => {
                    self.cluster.tasks.insert(id, task);
                }
                Ok(None) => {
                    self.cluster.tasks.remove(&id);
                }
                Err(e) => {
                    tracing::error!("reading task {id}: {e}");
                    self.reload_desired();
                    return;
                }
            }
        }
    }

    fn reload_desired(&mut self) {
        match self.store.policies() {
            Ok(p) => self.policies = p.into_iter().map(|p| p.rule).collect(),
            Err(e) => tracing::error!("reading policies: {e}"),
        }
        match (self.store.apps(None), self.store.tasks(None)) {
            (Ok(apps), Ok(tasks)) => {
                self.cluster.apps = apps.into_iter().map(|a| (a.key(), a)).collect();
                self.cluster.tasks = tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
                self.cluster.touch_all();
            }
            (Err(e), _) | (_, Err(e)) => tracing::error!("reading desired state: {e}"),
        }
    }

    fn request_id(&mut self) -> RequestId {
        let id = RequestId(self.next_request);
        self.next_request += 1;
        id
    }

    fn send(&mut self, cell: &CellId, msg: Message) -> bool {
        let Some(conn) = self.conns.get(cell) else {
            return false;
        };
        match conn.outbox.try_send(msg) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(%cell, "the cell is not keeping up ({e}): dropping its connection");
                close(
                    &conn.connection,
                    CloseCode::Protocol,
                    "too far behind; reconnect",
                );
                false
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now = self.clock.now();
        let wall = self.clock.wall();
        match input {
            Input::Connected {
                conn,
                hello,
                outbox,
                connection,
            } => {
                let cell = hello.cell.clone();
                if let Some(old) = self.conns.remove(&cell) {
                    tracing::info!(%cell, "the cell connected again: closing its older connection");
                    close(
                        &old.connection,
                        CloseCode::Replaced,
                        "replaced by a newer connection",
                    );
                }
                self.cluster.connect(&hello, wall);
                self.requests.forget_cell(&cell);
                self.conns.insert(
                    cell.clone(),
                    Conn {
                        id: conn,
                        outbox,
                        connection,
                    },
                );
                self.tell_network(&cell);
            }
            Input::Disconnected { cell, conn, reason } => {
                if self.conns.get(&cell).is_some_and(|c| c.id == conn) {
                    self.conns.remove(&cell);
                    self.cluster.disconnect(&cell, now, wall);
                    tracing::warn!(%cell, "cell disconnected: {reason}");
                }
            }
            Input::Message {
                cell,
                conn,
                msg,
                read_at,
            } => {
                if self.conns.get(&cell).is_none_or(|c| c.id != conn) {
                    return; // From a connection already replaced.
                }
                let waited = read_at.elapsed();
                self.metrics.input_waited(waited.as_secs_f64());
                if let Some(lag) = self.input_lag.as_mut() {
                    if matches!(msg, Message::StateDelta(_)) {
                        let worst = lag.entry(cell.clone()).or_default();
                        *worst = (*worst).max(waited);
                    }
                }
                self.on_message(&cell, msg, now, wall);
            }
        }
    }

    fn on_message(&mut self, cell: &CellId, msg: Message, now: Time, wall: Timestamp) {
        let applied = match msg {
            Message::StateSnapshot(s) => self.cluster.apply_snapshot(cell, s, now, wall),
            Message::StateDelta(d) => self.cluster.apply_delta(cell, d, now, wall),
            Message::Bids(bids) => {
                self.on_bids(cell, bids);
                return;
            }
            Message::Ack(ack) => {
                self.on_ack(cell, ack.request, ack.outcome, wall);
                return;
            }
            Message::Event(e) => {
                tracing::debug!(%cell, instance = %e.id, event = e.kind.name(), "instance event");
                if matches!(e.kind, corral_proto::wire::InstanceEventKind::Evacuating) {
                    self.cluster.set_draining(cell, true);
                }
                return;
            }
            Message::Ping { seq } => {
                self.send(cell, Message::Pong { seq });
                return;
            }
            Message::Pong { .. } => return,
            // The reader refuses brain-only messages; a second hello is a
            // protocol error.
            other => {
                tracing::warn!(%cell, "unexpected {} from the cell: dropping it", other.name());
                if let Some(c) = self.conns.get(cell) {
                    close(&c.connection, CloseCode::Protocol, "unexpected message");
                }
                return;
            }
        };
        match applied {
            Ok(effects) => self.carry_out(effects),
            Err(e) => {
                tracing::info!("{e}");
                self.send(cell, Message::RequestState);
            }
        }
    }

    fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut ops = Vec::new();
        let mut tasks = Vec::new();
        for effect in effects {
            match effect {
                Effect::PersistCrash(record) => {
                    tracing::warn!(slot = %record.key, count = record.count, "instance crashed: {}", record.last_reason);
                    self.metrics.crash();
                    ops.push(Op::PutCrash {
                        record,
                        expect: crate::store::Expect::Any,
                    });
                }
                Effect::Lost { slot, reason } => {
                    tracing::warn!(%slot, "instance lost by its cell, restarted without counting a crash: {reason}");
                    self.metrics.lost();
                }
                Effect::PersistTask(task) => {
                    tasks.push(task.clone());
                    ops.push(Op::PutTask {
                        task,
                        expect: crate::store::Expect::Any,
                    });
                }
                Effect::DeletePlacement(instance) => ops.push(Op::DeletePlacement {
                    instance,
                    expect: crate::store::Expect::Any,
                }),
                Effect::Remove { cell, id } => {
                    let request = self.request_id();
                    self.requests.insert(request, &cell, Request::Stop);
                    self.send(
                        &cell,
                        Message::StopWork(StopWork {
                            request,
                            id,
                            grace: STOP_GRACE,
                        }),
                    );
                }
                Effect::RequestState { cell } => {
                    self.send(&cell, Message::RequestState);
                }
                Effect::StartAgain {
                    cell,
                    id,
                    spec,
                    slot,
                    task,
                } => {
                    tracing::info!(%cell, instance = %id, "sending a start again: the cell's snapshot does not show it");
                    self.send_start(&cell, id, *spec, slot, task);
                }
            }
        }
        if ops.is_empty() {
            return;
        }
        match self.store.commit(ops) {
            Ok(revision) => {
                for mut task in tasks {
                    task.revision = revision;
                    if let Some(t) = self.cluster.tasks.get_mut(&task.id) {
                        t.revision = revision;
                    }
                    self.api
                        .publish(ChangeEvent::TaskUpdated { revision, task });
                }
            }
            Err(e) => tracing::error!("recording what cells reported: {e}"),
        }
    }

    fn on_ack(&mut self, cell: &CellId, request: RequestId, outcome: AckOutcome, wall: Timestamp) {
        let Some(req) = self.requests.answered(request, cell) else {
            return;
        };
        let (AckOutcome::Refused(refusal), Request::Start { id, slot, task }) = (outcome, req)
        else {
            return;
        };
        self.cluster.release(cell, &id);
        if matches!(refusal, Refusal::Duplicate { .. }) {
            return; // Already there: the start happened.
        }
        tracing::warn!(%cell, instance = %id, "the cell refused to start the instance: {refusal}");
        self.apply_refusal(cell, &refusal);
        if let Some(slot) = slot {
            if self.cluster.pending.get(&slot).is_some_and(|p| p.id == id) {
                self.cluster.pending.remove(&slot);
            }
            self.cluster.touch_slot(slot);
        }
        if let Some(task) = task {
            self.cluster.pending_tasks.remove(&task);
            self.task_back_to_pending(&task, wall);
            self.tasks_changed = true;
        }
        self.cluster.placements.remove(&id);
        self.carry_out(vec![Effect::DeletePlacement(id)]);
    }

    fn task_back_to_pending(&mut self, task: &TaskId, wall: Timestamp) {
        if let Some(t) = self.cluster.tasks.get_mut(task) {
            if t.transition(TaskState::Pending, None, None, wall).is_ok() {
                let t = t.clone();
                self.carry_out(vec![Effect::PersistTask(t)]);
            }
        }
    }

    fn apply_refusal(&mut self, cell: &CellId, refusal: &Refusal) {
        match refusal {
            Refusal::Evacuating => self.cluster.set_draining(cell, true),
            Refusal::RootfsUnavailable { rootfs } => {
                if let Some(c) = self.cluster.cells.get_mut(cell) {
                    c.missing_rootfs.insert(rootfs.clone());
                }
            }
            _ => {}
        }
    }

    // -----------------------------------------------------------------
    // Deciding.

    fn converge_interval(&self) -> Duration {
        (self.converge_cost * CONVERGE_SHARE).min(MAX_CONVERGE_INTERVAL)
    }

    /// One pass after a batch of inputs: record and send accepted work,
    /// converge, move the auction on.
    ///
    /// Convergence is incremental: a pass looks only at the slots the
    /// inputs touched (an instance reported or gone, a start refused; every
    /// slot of an app that changed), which costs what those slots hold,
    /// not what the cluster holds. A *full* pass, over every app, runs when something that
    /// concerns every app changed (a cell came, went or drains), when a
    /// timer is due (a grace, a backoff, a start timeout) and at least every
    /// [`SWEEP`] as the safety net. Full passes and the walks over every
    /// instance that follow a pass (the API view, the network picture) take
    /// at most about a tenth of the loop's time (see [`CONVERGE_SHARE`]).
    /// `behind`: inputs are waiting; a bid deadline does not count while the
    /// loop has not read everything that arrived.
    fn step(&mut self, behind: bool) {
        self.behind = behind;
        self.step_started = Instant::now();
        let now = self.clock.now();
        let wall = self.clock.wall();
        self.start_accepted();
        let timer_due = self.wake_at.is_some_and(|w| w <= now);
        let interval = self.converge_interval();
        let recent = self.last_converge.is_some_and(|t| t.elapsed() < interval);
        let sweep_due = self.last_full.is_none_or(|t| t.elapsed() >= SWEEP);
        let full_due = timer_due || sweep_due || self.cluster.touched().all;
        if recent && !timer_due {
            // The walks over everything wait; the touched apps do not.
            self.dirty = true;
            self.converge_touched(now, wall);
            self.auction_step(now, wall);
            return;
        }
        self.dirty = false;
        let started = Instant::now();
        self.last_converge = Some(started);
        if full_due {
            self.last_full = Some(started);
            self.hold_waiting_starts(now);
            self.cluster
                .expire_pending(now, self.converge.start_timeout);
            self.cluster
                .expire_reservations(now, self.converge.start_timeout);
            self.cluster.take_touched();
            let plan = converge(&self.converge, &self.cluster.converge_state(), now);
            self.metrics.convergence_run();
            self.wake_at = plan.wake_at;
            self.carry_out_plan(plan.actions, now, wall);
            self.tasks_changed = false;
            self.queue_tasks(now);
        } else {
            self.converge_touched(now, wall);
        }
        let auction = Instant::now();
        self.auction_step(now, wall);
        let auction = auction.elapsed();
        self.spread_network();
        self.publish_view();
        // The auction is not convergence's cost: it is what the share
        // leaves time for.
        self.converge_cost = started.elapsed().saturating_sub(auction);
    }

    /// Converges the slots touched since the last pass (every slot of an
    /// app that changed), and places tasks that changed. A cell-wide
    /// change waits for the next full pass.
    fn converge_touched(&mut self, now: Time, wall: Timestamp) {
        if std::mem::take(&mut self.tasks_changed) {
            self.queue_tasks(now);
        }
        let touched = self.cluster.touched();
        if touched.apps.is_empty() && touched.slots.is_empty() {
            return;
        }
        let touched = self.cluster.take_touched();
        if touched.all {
            self.cluster.touch_all();
        }
        let mut slots = self.cluster.slots_of_apps(&touched.apps);
        slots.extend(touched.slots);
        let plan = converge_slots(
            &self.converge,
            &self.cluster.converge_state_for(&slots),
            now,
            Some(&slots),
        );
        self.metrics.convergence_run();
        if let Some(at) = plan.wake_at {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
        self.carry_out_plan(plan.actions, now, wall);
    }

    fn carry_out_plan(&mut self, actions: Vec<Action>, now: Time, wall: Timestamp) {
        for action in actions {
            self.metrics.convergence_action(action_name(&action));
            match action {
                Action::MarkCellLost { cell } => {
                    tracing::warn!(%cell, grace = ?self.converge.lost_cell_grace, "cell lost: its instances are started elsewhere");
                    let effects = self.cluster.mark_lost(&cell, wall);
                    self.carry_out(effects);
                }
                Action::Start {
                    slot,
                    version,
                    reason,
                } => self.queue_lrp(slot, version, &reason, now),
                Action::Stop {
                    cell,
                    instance,
                    slot,
                    reason,
                } => {
                    if self.cluster.stop_in_flight(&instance, now, STOP_RESEND) {
                        continue;
                    }
                    let why = match &reason {
                        StopReason::ScaledDown => "scaled down".to_owned(),
                        StopReason::AppDeleted => "app deleted".to_owned(),
                        StopReason::Duplicate { kept } => format!("duplicate of {kept}"),
                        StopReason::Replaced { by } => format!("replaced by {by}"),
                    };
                    tracing::info!(%cell, %instance, %slot, "stopping: {why}");
                    let request = self.request_id();
                    if self.send(
                        &cell,
                        Message::StopWork(StopWork {
                            request,
                            id: instance.clone(),
                            grace: STOP_GRACE,
                        }),
                    ) {
                        self.requests.insert(request, &cell, Request::Stop);
                        self.cluster.stopping.insert(instance, now);
                    }
                }
                Action::RestartAt { .. } => {}
            }
        }
    }

    /// A start waiting in the brain's own queue, offered in a round or
    /// accepted and not yet sent has not timed out: only a cell that never
    /// reports it has. Without this, a long queue under load would have its
    /// starts asked for again and placed twice.
    fn hold_waiting_starts(&mut self, now: Time) {
        let mut waiting: BTreeSet<&InstanceId> = self.queue.iter().map(|q| &q.item.id).collect();
        waiting.extend(
            self.offers
                .values()
                .flat_map(|o| o.items.iter().map(|q| &q.item.id)),
        );
        waiting.extend(
            self.accepted
                .iter()
                .flat_map(|(_, items)| items.iter().map(|q| &q.item.id)),
        );
        for p in self.cluster.pending.values_mut() {
            if waiting.contains(&p.id) {
                p.since = now;
            }
        }
        for (task, since) in self.cluster.pending_tasks.iter_mut() {
            if waiting.contains(task.instance_id()) {
                *since = now;
            }
        }
    }

    /// A new connection learns the whole network picture as last told to
    /// everyone (what changed since reaches it with everyone else's).
    fn tell_network(&mut self, cell: &CellId) {
        let routes = self
            .told_routes
            .iter()
            .filter(|r| &r.cell != cell)
            .cloned()
            .collect();
        self.send(cell, Message::Routes(Routes { routes }));
        let all: Vec<RemoteEndpoint> = self.told_endpoints.values().cloned().collect();
        let mut first = true;
        for chunk in all.chunks(MAX_ENDPOINTS) {
            self.send(
                cell,
                Message::Endpoints(Endpoints {
                    reset: first,
                    upsert: chunk.to_vec(),
                    remove: Vec::new(),
                }),
            );
            first = false;
        }
        if first {
            self.send(
                cell,
                Message::Endpoints(Endpoints {
                    reset: true,
                    upsert: Vec::new(),
                    remove: Vec::new(),
                }),
            );
        }
        self.send(
            cell,
            Message::Policies(Policies {
                policies: self.told_policies.clone(),
            }),
        );
        let all: Vec<Service> = self.told_services.values().cloned().collect();
        for msg in services_messages(true, all, Vec::new()) {
            self.send(cell, msg);
        }
    }

    /// Tells every connected cell what changed in the routes, the endpoint
    /// map and the policies since they were last told.
    fn spread_network(&mut self) {
        let cells: Vec<CellId> = self.conns.keys().cloned().collect();
        let routes = self.cluster.routes();
        if routes != self.told_routes {
            for cell in &cells {
                let mine = routes.iter().filter(|r| &r.cell != cell).cloned().collect();
                self.send(cell, Message::Routes(Routes { routes: mine }));
            }
            self.told_routes = routes;
        }
        let endpoints = self.cluster.endpoints();
        if endpoints != self.told_endpoints {
            let upsert: Vec<RemoteEndpoint> = endpoints
                .iter()
                .filter(|(a, e)| self.told_endpoints.get(*a) != Some(*e))
                .map(|(_, e)| e.clone())
                .collect();
            let remove: Vec<Ipv4Addr> = self
                .told_endpoints
                .keys()
                .filter(|a| !endpoints.contains_key(*a))
                .copied()
                .collect();
            for chunk in upsert.chunks(MAX_ENDPOINTS) {
                for cell in &cells {
                    self.send(
                        cell,
                        Message::Endpoints(Endpoints {
                            reset: false,
                            upsert: chunk.to_vec(),
                            remove: Vec::new(),
                        }),
                    );
                }
            }
            for chunk in remove.chunks(MAX_ENDPOINTS) {
                for cell in &cells {
                    self.send(
                        cell,
                        Message::Endpoints(Endpoints {
                            reset: false,
                            upsert: Vec::new(),
                            remove: chunk.to_vec(),
                        }),
                    );
                }
            }
            self.told_endpoints = endpoints;
        }
        if self.policies != self.told_policies {
            for cell in &cells {
                self.send(
                    cell,
                    Message::Policies(Policies {
                        policies: self.policies.clone(),
                    }),
                );
            }
            self.told_policies = self.policies.clone();
        }
        let services = self.cluster.services();
        if services != self.told_services {
            let upsert: Vec<Service> = services
                .iter()
                .filter(|(vip, s)| self.told_services.get(*vip) != Some(*s))
                .map(|(_, s)| s.clone())
                .collect();
            let remove: Vec<Ipv4Addr> = self
                .told_services
                .keys()
                .filter(|vip| !services.contains_key(*vip))
                .copied()
                .collect();
            for msg in services_messages(false, upsert, remove) {
                for cell in &cells {
                    self.send(cell, msg.clone());
                }
            }
            self.told_services = services;
        }
    }

    fn queue_lrp(
        &mut self,
        slot: LrpKey,
        version: u64,
        reason: &crate::converge::StartReason,
        now: Time,
    ) {
        let Some(app) = self.cluster.apps.get(&slot.app) else {
            return;
        };
        if self.cluster.pending.contains_key(&slot) {
            return;
        }
        let id = lrp_instance_id(&slot);
        let spec = app.instance_spec(slot.index);
        let item = WorkItem::new(id.clone(), &spec, app.tags.clone());
        tracing::debug!(%slot, instance = %id, ?reason, "starting");
        self.cluster.pending.insert(
            slot.clone(),
            Pending {
                id,
                version,
                since: now,
            },
        );
        self.queue.push_back(Queued {
            item,
            spec: Box::new(spec),
            slot: Some((slot, version)),
            refused_by: BTreeSet::new(),
        });
    }

    fn queue_tasks(&mut self, now: Time) {
        let tasks: Vec<_> = self
            .cluster
            .tasks_to_place()
            .into_iter()
            .map(|t| (t.id.clone(), t.instance_spec(), t.spec.tags.clone()))
            .collect();
        for (task, spec, tags) in tasks {
            let item = WorkItem::new(task.instance_id().clone(), &spec, tags);
            self.cluster.pending_tasks.insert(task, now);
            self.queue.push_back(Queued {
                item,
                spec: Box::new(spec),
                slot: None,
                refused_by: BTreeSet::new(),
            });
        }
    }

    /// Finishes rounds whose bids are in (or late), then starts the next.
    fn auction_step(&mut self, now: Time, wall: Timestamp) {
        self.close_rounds();
        if self.queue.is_empty() || self.rounds.len() >= ROUNDS_IN_FLIGHT {
            return;
        }
        // While rounds wait, gather a whole round before starting another.
        if !self.rounds.is_empty() && self.queue.len() < ROUND_ITEMS {
            return;
        }
        let take = self.queue.len().min(ROUND_ITEMS);
        let batch: Vec<Queued> = self.queue.drain(..take).collect();
        let apps: BTreeSet<&AppKey> = batch
            .iter()
            .filter_map(|q| q.slot.as_ref().map(|(s, _)| &s.app))
            .collect();
        let mut cells = self.cluster.auction_cells(apps);
        // For diagnosing balance (`RUST_LOG=corral_brain::round=debug`,
        // which `input_lag` is kept for): each cell's view as the round
        // found it.
        let before: Option<Vec<(CellId, u32, u64)>> = self.input_lag.is_some().then(|| {
            cells
                .iter()
                .map(|c| (c.id.clone(), c.starting, c.available.memory_mb))
                .collect()
        });
        let config = AuctionConfig {
            pipeline_items: self.recent_rounds.iter().sum(),
            ..self.auction
        };
        let (placed, unplaced) = place(&config, &mut cells, batch);
        let placed_items: usize = placed.values().map(Vec::len).sum();
        if self.recent_rounds.len() == RECENT_ROUNDS {
            self.recent_rounds.pop_front();
        }
        self.recent_rounds
            .push_back(u64::try_from(placed_items).unwrap_or(u64::MAX));
        if let Some(before) = before {
            let lag = self
                .input_lag
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default();
            log_round(self.next_round, &before, &placed, &lag);
        }
        for (q, error) in unplaced {
            self.metrics.placement_failure(error.reason());
            self.unplaced(q, &error.to_string(), now, wall);
        }
        let per_cell = placed;
        if per_cell.is_empty() {
            return;
        }
        let round = self.next_round;
        self.next_round += 1;
        let mut waiting = 0;
        for (cell, mut items) in per_cell {
            while !items.is_empty() {
                let rest = items.split_off(items.len().min(MAX_BATCH_ITEMS));
                let chunk = std::mem::replace(&mut items, rest);
                let request = self.request_id();
                let msg = Message::BidRequest(BidRequest {
                    request,
                    items: chunk.iter().map(|q| q.item.clone()).collect(),
                });
                if self.send(&cell, msg) {
                    for q in &chunk {
                        self.cluster
                            .reserve(&cell, &q.item.id, q.need(), q.app(), now);
                    }
                    self.offers.insert(
                        request,
                        Offer {
                            cell: cell.clone(),
                            items: chunk,
                            round,
                        },
                    );
                    waiting += 1;
                } else {
                    for mut q in chunk {
                        q.refused_by.insert(cell.clone());
                        self.queue.push_back(q);
                    }
                }
            }
        }
        if waiting == 0 {
            return;
        }
        let started = Instant::now();
        self.rounds.insert(
            round,
            Round {
                started,
                deadline: started + BID_TIMEOUT,
                waiting,
            },
        );
    }

    /// Ends the rounds whose bids are all in, and those past their deadline
    /// (unless inputs are still waiting to be read): whoever has not
    /// answered refuses by silence.
    fn close_rounds(&mut self) {
        let at = self.step_started;
        let ended: Vec<u64> = self
            .rounds
            .iter()
            .filter(|(_, r)| r.waiting == 0 || (at >= r.deadline && !self.behind))
            .map(|(n, _)| *n)
            .collect();
        if ended.is_empty() {
            return;
        }
        let silent: Vec<RequestId> = self
            .offers
            .iter()
            .filter(|(_, o)| ended.contains(&o.round))
            .map(|(r, _)| *r)
            .collect();
        for request in silent {
            let Some(offer) = self.offers.remove(&request) else {
                continue;
            };
            let cell = offer.cell;
            tracing::warn!(%cell, items = offer.items.len(), "no bids within {BID_TIMEOUT:?}");
            for mut q in offer.items {
                self.cluster.release(&cell, &q.item.id);
                q.refused_by.insert(cell.clone());
                self.queue.push_back(q);
            }
        }
        for n in ended {
            if let Some(r) = self.rounds.remove(&n) {
                self.metrics.auction_done(r.started.elapsed().as_secs_f64());
            }
        }
    }

    fn unplaced(&mut self, q: Queued, error: &str, now: Time, wall: Timestamp) {
        match q.slot {
            Some((slot, _)) => {
                tracing::warn!(%slot, "cannot place: {error}");
                let since = match self.cluster.unplaced.get(&slot) {
                    Some((same, since)) if same == error => *since,
                    _ => wall,
                };
                self.cluster
                    .unplaced
                    .insert(slot.clone(), (error.to_owned(), since));
                // Held as pending so that convergence does not ask again at
                // once; it expires after UNPLACED_RETRY.
                if let Some(p) = self.cluster.pending.get_mut(&slot) {
                    let hold = self.converge.start_timeout.saturating_sub(UNPLACED_RETRY);
                    p.since = Time::from_millis(
                        now.as_millis()
                            .saturating_sub(u64::try_from(hold.as_millis()).unwrap_or(0)),
                    );
                }
            }
            None => {
                let Ok(task) = TaskId::new(q.item.id.as_str()) else {
                    return;
                };
                tracing::warn!(%task, "cannot place the task: {error}");
                self.cluster.pending_tasks.remove(&task);
                if let Some(t) = self.cluster.tasks.get_mut(&task) {
                    let result = TaskResult {
                        exit_code: None,
                        reason: Some(format!("cannot place: {error}")),
                        finished_at: wall,
                    };
                    if t.transition(TaskState::Failed, None, Some(result), wall)
                        .is_ok()
                    {
                        let t = t.clone();
                        self.carry_out(vec![Effect::PersistTask(t)]);
                    }
                }
            }
        }
    }

    fn on_bids(&mut self, cell: &CellId, bids: corral_proto::wire::Bids) {
        match self.offers.get(&bids.request) {
            Some(o) if &o.cell == cell => {}
            _ => return,
        }
        let Some(Offer { items, round, .. }) = self.offers.remove(&bids.request) else {
            return;
        };
        if let Some(r) = self.rounds.get_mut(&round) {
            r.waiting = r.waiting.saturating_sub(1);
        }
        let refusals: BTreeMap<InstanceId, Refusal> = bids
            .bids
            .into_iter()
            .filter_map(|b| match b.outcome {
                BidOutcome::Refused(r) => Some((b.id, r)),
                BidOutcome::Score(_) => None,
            })
            .collect();
        let mut accepted = Vec::new();
        for mut q in items {
            if let Some(r) = refusals.get(&q.item.id) {
                tracing::info!(%cell, instance = %q.item.id, "bid refused: {r}");
                self.cluster.release(cell, &q.item.id);
                self.apply_refusal(cell, r);
                q.refused_by.insert(cell.clone());
                self.queue.push_back(q);
            } else {
                accepted.push(q);
            }
        }
        if !accepted.is_empty() {
            self.accepted.push((cell.clone(), accepted));
        }
    }

    /// Records every placement accepted since the last call in one store
    /// commit, then sends the work: one disk sync per loop pass, however
    /// many cells answered (an auction over 1,000 cells gets about one item
    /// accepted per answer).
    fn start_accepted(&mut self) {
        if self.accepted.is_empty() {
            return;
        }
        let wall = self.clock.wall();
        let batches = std::mem::take(&mut self.accepted);
        let mut accepted: Vec<(CellId, Queued)> =
            Vec::with_capacity(batches.iter().map(|(_, items)| items.len()).sum());
        for (cell, items) in batches {
            accepted.extend(items.into_iter().map(|q| (cell.clone(), q)));
        }
        let placements: Vec<Placement> = accepted
            .iter()
            .map(|(cell, q)| Placement {
                instance: q.item.id.clone(),
                cell: cell.clone(),
                tenant: q.item.tenant.clone(),
                workload: match &q.slot {
                    Some((slot, version)) => Workload::Lrp {
                        app: slot.app.name.clone(),
                        index: slot.index,
                        version: *version,
                    },
                    None => Workload::Task {
                        task: TaskId::new(q.item.id.as_str())
                            .unwrap_or_else(|_| unreachable_task_id()),
                    },
                },
                since: wall,
                revision: 0,
            })
            .collect();
        let mut ops: Vec<Op> = placements
            .iter()
            .map(|p| Op::PutPlacement {
                placement: p.clone(),
                expect: crate::store::Expect::Any,
            })
            .collect();
        let mut running_tasks = Vec::new();
        for (cell, q) in &accepted {
            if q.item.kind == InstanceKind::Task {
                if let Ok(id) = TaskId::new(q.item.id.as_str()) {
                    if let Some(t) = self.cluster.tasks.get_mut(&id) {
                        if t.transition(TaskState::Running, Some(cell.clone()), None, wall)
                            .is_ok()
                        {
                            running_tasks.push(t.clone());
                            ops.push(Op::PutTask {
                                task: t.clone(),
                                expect: crate::store::Expect::Any,
                            });
                        }
                    }
                }
            }
        }
        let revision = match self.store.commit(ops) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("recording placements: {e}; they are auctioned again");
                for (cell, q) in accepted {
                    self.cluster.release(&cell, &q.item.id);
                    self.queue.push_back(q);
                }
                return;
            }
        };
        for task in running_tasks {
            self.api.publish(ChangeEvent::TaskUpdated {
                revision,
                task: crate::desired::Task { revision, ..task },
            });
        }
        for (_, q) in &accepted {
            if let Some((slot, _)) = &q.slot {
                self.cluster.unplaced.remove(slot);
            }
        }
        for mut p in placements {
            p.revision = revision;
            self.cluster.placements.insert(p.instance.clone(), p);
        }
        self.metrics.placed(accepted.len());
        for (cell, q) in accepted {
            let task = match q.item.kind {
                InstanceKind::Task => TaskId::new(q.item.id.as_str()).ok(),
                InstanceKind::Lrp => None,
            };
            let slot = q.slot.map(|(s, _)| s);
            self.send_start(&cell, q.item.id, *q.spec, slot, task);
        }
    }

    /// Sends a `StartWork`, noting what it was for to act on its answer.
    fn send_start(
        &mut self,
        cell: &CellId,
        id: InstanceId,
        spec: corral_proto::InstanceSpec,
        slot: Option<LrpKey>,
        task: Option<TaskId>,
    ) {
        let request = self.request_id();
        self.requests.insert(
            request,
            cell,
            Request::Start {
                id: id.clone(),
                slot,
                task,
            },
        );
        self.send(cell, Message::StartWork(StartWork { request, id, spec }));
    }

    fn publish_view(&mut self) {
        let view = self.cluster.view();
        let (desired, running) = self.cluster.instance_counts();
        self.metrics.observe_cluster(&view, desired, running);
        let backends = self
            .told_services
            .values()
            .map(|s| s.backends.len() as u64)
            .sum();
        let vips_free = self.vip_range.map_or(0, |range| {
            crate::claims::free_vips(
                range,
                self.cluster.apps.values().filter_map(|a| a.vip.as_ref()),
            )
        });
        self.metrics
            .observe_services(self.told_services.len() as u64, backends, vips_free);
        self.view.set(view);
    }
}

/// Items placed, by cell, and items that fit nowhere (with why).
type Placed = (
    BTreeMap<CellId, Vec<Queued>>,
    Vec<(Queued, crate::auction::PlacementError)>,
);

/// One debug line per round: per cell, `id:starting:free memory MB:placed:
/// their memory MB:input lag ms`, as the round found it, what it placed
/// there, and the longest one of the cell's state deltas waited for the
/// loop since the last round.
fn log_round(
    round: u64,
    before: &[(CellId, u32, u64)],
    placed: &BTreeMap<CellId, Vec<Queued>>,
    lag: &BTreeMap<CellId, Duration>,
) {
    use std::fmt::Write;
    let mut line = String::with_capacity(before.len() * 24);
    for (id, starting, free) in before {
        let on = placed.get(id).map_or(&[][..], Vec::as_slice);
        let mem: u64 = on.iter().map(|q| q.item.resources.memory_mb).sum();
        let ms = lag.get(id).map_or(0, Duration::as_millis);
        let _ = write!(line, " {id}:{starting}:{free}:{}:{mem}:{ms}", on.len());
    }
    tracing::debug!(target: "corral_brain::round", round, "view{line}");
}

/// Runs the auction over a batch, excluding for each item the cells that
/// refused it: items are grouped by the set of cells they exclude, and each
/// group is placed on the remaining cells in turn, all on one working view so
/// that capacity taken by one group is seen by the next.
fn place(config: &AuctionConfig, cells: &mut [AuctionCell], batch: Vec<Queued>) -> Placed {
    let mut groups: BTreeMap<BTreeSet<CellId>, Vec<Queued>> = BTreeMap::new();
    for q in batch {
        match groups.get_mut(&q.refused_by) {
            Some(group) => group.push(q),
            None => {
                groups.insert(q.refused_by.clone(), vec![q]);
            }
        }
    }
    let mut placed: BTreeMap<CellId, Vec<Queued>> = BTreeMap::new();
    let mut unplaced = Vec::new();
    for (excluded, group) in groups {
        // Allowed cells first; the auction sees only those.
        if !excluded.is_empty() {
            cells.sort_by_key(|c| excluded.contains(&c.id));
        }
        let allowed = cells.iter().filter(|c| !excluded.contains(&c.id)).count();
        let mut on: Vec<Vec<usize>> = vec![Vec::new(); allowed];
        let mut nowhere = Vec::new();
        let items: Vec<&WorkItem> = group.iter().map(|q| &q.item).collect();
        crate::auction::auction_by_position(
            config,
            &mut cells[..allowed],
            &items,
            |i, at| match at {
                Ok(at) => on[at].push(i),
                Err(error) => nowhere.push((i, error)),
            },
        );
        let mut group: Vec<Option<Queued>> = group.into_iter().map(Some).collect();
        for (at, items) in on.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let list = placed.entry(cells[at].id.clone()).or_default();
            list.extend(items.into_iter().filter_map(|i| group[i].take()));
        }
        unplaced.extend(
            nowhere
                .into_iter()
                .filter_map(|(i, error)| group[i].take().map(|q| (q, error))),
        );
    }
    (placed, unplaced)
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::MarkCellLost { .. } => "mark-cell-lost",
        Action::Start { .. } => "start",
        Action::Stop { .. } => "stop",
        Action::RestartAt { .. } => "wait-backoff",
    }
}

/// A fresh instance id for a slot: `<app>-<index>-<random>`, readable in
/// `corral app` and on the cell, unique across the slot's placements.
pub fn lrp_instance_id(slot: &LrpKey) -> InstanceId {
    let name: String = slot.app.name.as_str().chars().take(40).collect();
    let suffix = random_u32();
    InstanceId::new(format!("{name}-{}-{suffix:08x}", slot.index))
        .or_else(|_| InstanceId::new(format!("i-{suffix:08x}")))
        .unwrap_or_else(|_| unreachable_instance_id())
}

fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}

#[allow(clippy::expect_used)]
fn unreachable_instance_id() -> InstanceId {
    InstanceId::new("i").expect("\"i\" is a valid instance id")
}

#[allow(clippy::expect_used)]
fn unreachable_task_id() -> TaskId {
    TaskId::new("t").expect("\"t\" is a valid task id")
}

/// What a message of services may hold, well below the frame limit (1 MiB):
/// a thousand services with 256 backends each would not fit in one.
const SERVICES_BYTES: usize = 512 << 10;

/// An upper bound of a service's encoded size (postcard: varints, length
/// prefixes).
fn service_size_bound(s: &Service) -> usize {
    32 + s.tenant.as_str().len() + s.app.as_str().len() + 8 * s.ports.len() + 4 * s.backends.len()
}

/// Changes to the services as messages of at most [`MAX_SERVICES`] entries
/// and [`SERVICES_BYTES`]: upserts first, then removals. With `reset`, the
/// first message resets (and one is sent even when there is nothing, so
/// the cell forgets what it had); without, nothing to say is no message.
fn services_messages(reset: bool, upsert: Vec<Service>, remove: Vec<Ipv4Addr>) -> Vec<Message> {
    let mut out = Vec::new();
    let mut chunk: Vec<Service> = Vec::new();
    let mut bytes = 0;
    for s in upsert {
        let size = service_size_bound(&s);
        if !chunk.is_empty() && (chunk.len() == MAX_SERVICES || bytes + size > SERVICES_BYTES) {
            out.push(Services {
                reset: false,
                upsert: std::mem::take(&mut chunk),
                remove: Vec::new(),
            });
            bytes = 0;
        }
        bytes += size;
        chunk.push(s);
    }
    if !chunk.is_empty() {
        out.push(Services {
            reset: false,
            upsert: chunk,
            remove: Vec::new(),
        });
    }
    out.extend(remove.chunks(MAX_SERVICES).map(|c| Services {
        reset: false,
        upsert: Vec::new(),
        remove: c.to_vec(),
    }));
    if reset {
        match out.first_mut() {
            Some(first) => first.reset = true,
            None => out.push(Services {
                reset: true,
                upsert: Vec::new(),
                remove: Vec::new(),
            }),
        }
    }
    out.into_iter().map(Message::Services).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::service::{PortSpec, MAX_SERVICE_BACKENDS, MAX_SERVICE_PORTS};
    use corral_proto::{AppId, TenantId};

    fn service(n: u32, backends: usize) -> Service {
        Service {
            vip: Ipv4Addr::from(0x0a60_0000 + n),
            tenant: TenantId::new("t".repeat(60)).unwrap(),
            app: AppId::new(format!("app-{n}")).unwrap(),
            ports: (1..=MAX_SERVICE_PORTS as u16)
                .map(|p| PortSpec {
                    published: Some(30000 + p),
                    ..PortSpec::tcp(60000 + p)
                })
                .collect(),
            backends: (0..backends)
                .map(|b| Ipv4Addr::from(0x0af4_0000 + b as u32))
                .collect(),
        }
    }

    fn services(msgs: &[Message]) -> Vec<&Services> {
        msgs.iter()
            .map(|m| match m {
                Message::Services(s) => s,
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_full_set_resets_once_and_every_message_fits_a_frame() {
        let big: Vec<Service> = (0..2000)
            .map(|n| service(n, MAX_SERVICE_BACKENDS))
            .collect();
        let removed: Vec<Ipv4Addr> = (0..1500).map(|n| Ipv4Addr::from(0x0b00_0000 + n)).collect();
        let msgs = services_messages(true, big, removed);
        let s = services(&msgs);
        assert!(s[0].reset && s[1..].iter().all(|m| !m.reset));
        assert_eq!(s.iter().map(|m| m.upsert.len()).sum::<usize>(), 2000);
        assert_eq!(s.iter().map(|m| m.remove.len()).sum::<usize>(), 1500);
        for m in &msgs {
            m.check_limits().unwrap();
            let bytes = corral_proto::wire::encode(m).unwrap();
            assert!(
                bytes.len() < corral_proto::wire::MAX_FRAME_LEN,
                "{}",
                bytes.len()
            );
        }
    }

    #[test]
    fn a_request_is_answered_by_its_cell_and_forgotten_when_that_cell_reconnects() {
        let (c1, c2) = (CellId::new("c1").unwrap(), CellId::new("c2").unwrap());
        let start = |id: &str| Request::Start {
            id: InstanceId::new(id).unwrap(),
            slot: None,
            task: None,
        };
        let mut r = Requests::default();
        r.insert(RequestId(1), &c1, start("a"));
        r.insert(RequestId(2), &c1, Request::Stop);
        r.insert(RequestId(3), &c2, start("b"));
        // Another cell cannot answer c1's request; c1 can, once.
        assert_eq!(r.answered(RequestId(1), &c2), None);
        assert_eq!(r.answered(RequestId(1), &c1), Some(start("a")));
        assert_eq!(r.answered(RequestId(1), &c1), None);
        // c1 reconnects: its older connection's answers will never come.
        r.forget_cell(&c1);
        assert_eq!(r.answered(RequestId(2), &c1), None);
        assert_eq!(r.answered(RequestId(3), &c2), Some(start("b")));
        assert!(r.0.is_empty());
    }

    #[test]
    fn nothing_to_say_is_one_reset_or_no_message() {
        let s = services_messages(true, Vec::new(), Vec::new());
        assert_eq!(
            services(&s),
            vec![&Services {
                reset: true,
                upsert: vec![],
                remove: vec![]
            }]
        );
        assert!(services_messages(false, Vec::new(), Vec::new()).is_empty());
        let one = services_messages(false, vec![service(1, 3)], Vec::new());
        assert_eq!(one.len(), 1);
    }
}
