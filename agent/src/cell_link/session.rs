//! The link's I/O: the reconnect loop and one connection's conversation.
//! Decisions are in `logic`; this file moves messages.

use super::logic::{self, Backoff, CellOffer, StateTracker};
use super::runtime::CellRuntime;
use super::{LinkSettings, LinkStatus};
use crate::config::BrainAddress;
use crate::metrics::Metrics;
use corral_link::framed::{LinkError, MessageReader, MessageWriter};
use corral_link::tls::{self, Credentials, RefusedBy, TlsError};
use corral_link::PeerIdentity;
use corral_proto::wire::{
    check_chosen_version, Ack, BrainId, CloseCode, Hello, HelloAck, Message, Sender, StartWork,
    StopWork, SUPPORTED_VERSIONS,
};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

/// Longest close reason sent; QUIC needs it to fit in one packet.
const MAX_CLOSE_REASON: usize = 256;
/// Start and stop requests queued for the worker before reading pauses.
const WORK_QUEUE: usize = 1024;
/// How long the endpoints get to deliver a goodbye when the link stops.
const IDLE_WAIT: Duration = Duration::from_secs(1);

/// How an attempt ended, and how loudly to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Problem {
    level: tracing::Level,
    message: String,
}

impl Problem {
    fn error(message: String) -> Self {
        Self {
            level: tracing::Level::ERROR,
            message,
        }
    }

    fn warn(message: String) -> Self {
        Self {
            level: tracing::Level::WARN,
            message,
        }
    }

    fn info(message: String) -> Self {
        Self {
            level: tracing::Level::INFO,
            message,
        }
    }
}

enum Ended {
    /// No session: the connection, the handshake or the hello failed.
    Failed(Problem),
    /// A session was established, then ended.
    AfterSession(Problem),
    Shutdown,
}

/// What every attempt shares.
struct Ctx<R> {
    settings: LinkSettings,
    creds: Credentials,
    runtime: Arc<R>,
    metrics: Arc<Metrics>,
    status: watch::Sender<LinkStatus>,
}

/// One client endpoint per address family, made when first needed and
/// kept across reconnections.
#[derive(Default)]
struct Endpoints {
    v4: Option<quinn::Endpoint>,
    v6: Option<quinn::Endpoint>,
}

impl Endpoints {
    fn for_addr<R>(&mut self, addr: SocketAddr, ctx: &Ctx<R>) -> Result<quinn::Endpoint, TlsError> {
        let (slot, bind): (_, SocketAddr) = match addr.ip() {
            IpAddr::V4(_) => (&mut self.v4, (std::net::Ipv4Addr::UNSPECIFIED, 0).into()),
            IpAddr::V6(_) => (&mut self.v6, (std::net::Ipv6Addr::UNSPECIFIED, 0).into()),
        };
        if let Some(ep) = slot {
            return Ok(ep.clone());
        }
        let ep = tls::client_endpoint(bind, &ctx.creds, ctx.settings.brain_id.as_ref())?;
        *slot = Some(ep.clone());
        Ok(ep)
    }

    async fn close(self) {
        for ep in [self.v4, self.v6].into_iter().flatten() {
            let _ = tokio::time::timeout(IDLE_WAIT, ep.wait_idle()).await;
        }
    }
}

/// Logs each distinct problem at its level and repeats of the last one at
/// debug, so a long outage does not fill the journal.
#[derive(Default)]
struct Reporter {
    last: Option<String>,
}

impl Reporter {
    fn report(&mut self, p: &Problem) {
        let repeat = self.last.as_deref() == Some(p.message.as_str());
        let msg = &p.message;
        match p.level {
            _ if repeat => tracing::debug!("{msg} (again)"),
            tracing::Level::ERROR => tracing::error!("{msg}"),
            tracing::Level::WARN => tracing::warn!("{msg}"),
            _ => tracing::info!("{msg}"),
        }
        self.last = Some(p.message.clone());
    }
}

pub(super) struct Link<R> {
    ctx: Ctx<R>,
    shutdown: watch::Receiver<bool>,
    endpoints: Endpoints,
}

impl<R: CellRuntime> Link<R> {
    pub(super) fn new(
        settings: LinkSettings,
        creds: Credentials,
        runtime: Arc<R>,
        metrics: Arc<Metrics>,
        status: watch::Sender<LinkStatus>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            ctx: Ctx {
                settings,
                creds,
                runtime,
                metrics,
                status,
            },
            shutdown,
            endpoints: Endpoints::default(),
        }
    }

    pub(super) async fn run(mut self) {
        let span = tracing::info_span!("brain_link", cell = %self.ctx.settings.cell);
        async move {
            let addresses = self.ctx.settings.addresses.clone();
            if addresses.is_empty() {
                tracing::error!("no brain address configured; the link does nothing");
                return;
            }
            let mut backoff = Backoff::new(
                self.ctx.settings.backoff_initial,
                self.ctx.settings.backoff_max,
            );
            let mut reporter = Reporter::default();
            for target in addresses.iter().cycle() {
                let span = tracing::info_span!("brain", addr = %target);
                let ended = attempt(&self.ctx, &mut self.endpoints, &mut self.shutdown, target)
                    .instrument(span)
                    .await;
                self.ctx.metrics.brain_connected.set(0);
                let problem = match ended {
                    Ended::Shutdown => break,
                    Ended::Failed(p) => p,
                    Ended::AfterSession(p) => {
                        backoff.reset();
                        reporter = Reporter::default();
                        p
                    }
                };
                reporter.report(&problem);
                self.ctx.status.send_modify(|s| {
                    s.connected = None;
                    s.last_error = Some(problem.message.clone());
                });
                let delay = backoff.next_delay(random_u64());
                tracing::debug!(delay_ms = delay.as_millis() as u64, "reconnecting");
                let sleep = tokio::time::sleep(delay);
                if or_shutdown(&mut self.shutdown, sleep).await.is_none() {
                    break;
                }
            }
            self.endpoints.close().await;
            tracing::info!("brain link stopped");
        }
        .instrument(span)
        .await
    }
}

/// Resolves, connects, and runs a session until it ends.
async fn attempt<R: CellRuntime>(
    ctx: &Ctx<R>,
    endpoints: &mut Endpoints,
    shutdown: &mut watch::Receiver<bool>,
    target: &BrainAddress,
) -> Ended {
    let addr = match or_shutdown(shutdown, resolve(target)).await {
        None => return Ended::Shutdown,
        Some(Ok(a)) => a,
        Some(Err(p)) => return Ended::Failed(p),
    };
    let ep = match endpoints.for_addr(addr, ctx) {
        Ok(ep) => ep,
        Err(e) => return Ended::Failed(Problem::error(format!("no QUIC endpoint: {e}"))),
    };
    let connecting = match tls::connect(&ep, addr) {
        Ok(c) => c,
        Err(e) => {
            return Ended::Failed(Problem::warn(format!(
                "cannot connect to the brain at {addr}: {e}"
            )))
        }
    };
    let conn = match or_shutdown(shutdown, connecting).await {
        None => return Ended::Shutdown,
        Some(Ok(c)) => c,
        Some(Err(e)) => return Ended::Failed(explain(&e, addr)),
    };
    let brain = match tls::peer_identity(&conn) {
        Ok(PeerIdentity::Brain(b)) => b,
        Ok(other) => {
            // The TLS verifier admits only brain certificates; never here.
            close(&conn, CloseCode::Identity, "not a brain certificate");
            return Ended::Failed(Problem::error(format!(
                "the server at {addr} presented the certificate of {other}, not of a brain"
            )));
        }
        Err(e) => {
            close(&conn, CloseCode::Identity, "no identity");
            return Ended::Failed(Problem::error(format!("the brain at {addr}: {e}")));
        }
    };
    Session::start(ctx, conn, brain, addr, shutdown).await
}

async fn resolve(target: &BrainAddress) -> Result<SocketAddr, Problem> {
    match target {
        BrainAddress::Socket(a) => Ok(*a),
        BrainAddress::Host { name, port } => {
            let mut found = tokio::net::lookup_host((name.as_str(), *port))
                .await
                .map_err(|e| Problem::warn(format!("cannot resolve brain {target}: {e}")))?;
            found
                .next()
                .ok_or_else(|| Problem::warn(format!("brain {target} resolves to no address")))
        }
    }
}

/// One established connection's conversation.
struct Session<'a, R> {
    ctx: &'a Ctx<R>,
    conn: quinn::Connection,
    addr: SocketAddr,
    writer: MessageWriter,
    tracker: StateTracker,
}

impl<'a, R: CellRuntime> Session<'a, R> {
    /// Opens the stream, says hello, and runs the session when the brain
    /// answers.
    async fn start(
        ctx: &'a Ctx<R>,
        conn: quinn::Connection,
        brain: BrainId,
        addr: SocketAddr,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let (send, recv) = match or_shutdown(shutdown, conn.open_bi()).await {
            None => return goodbye(&conn),
            Some(Ok(s)) => s,
            Some(Err(e)) => return Ended::Failed(explain(&e, addr)),
        };
        let mut s = Session {
            ctx,
            conn,
            addr,
            writer: MessageWriter::new(send),
            tracker: StateTracker::new(),
        };
        let mut reader = MessageReader::new(recv, Sender::Brain);
        let hello = s.hello();
        if let Err(p) = s.send(hello).await {
            return Ended::Failed(p);
        }
        let waited = tokio::time::timeout(
            ctx.settings.hello_timeout,
            or_shutdown(shutdown, s.wait_hello_ack(&mut reader)),
        )
        .await;
        let ack = match waited {
            Err(_) => {
                let why = "no hello-ack in time";
                close(&s.conn, CloseCode::Protocol, why);
                return Ended::Failed(Problem::warn(format!(
                    "the brain at {addr} did not answer our hello within {} s",
                    ctx.settings.hello_timeout.as_secs()
                )));
            }
            Ok(None) => return goodbye(&s.conn),
            Ok(Some(Err(p))) => return Ended::Failed(p),
            Ok(Some(Ok(ack))) => ack,
        };
        let version = match check_chosen_version(SUPPORTED_VERSIONS, ack.version) {
            Ok(v) => v,
            Err(e) => {
                close(&s.conn, CloseCode::Version, &e.to_string());
                return Ended::Failed(Problem::error(format!("the brain at {addr}: {e}")));
            }
        };
        if ack.brain != brain {
            tracing::warn!(
                certificate = %brain,
                hello_ack = %ack.brain,
                "the brain's hello-ack names another brain than its certificate; trusting the certificate"
            );
        }
        if let Some(assigned) = ack.subnet {
            if ctx.settings.subnet != Some(assigned) {
                tracing::warn!(
                    %assigned,
                    configured = ?ctx.settings.subnet.map(|s| s.to_string()),
                    "the brain assigns this cell another instance subnet than [network] subnet; \
                     keeping the configured one (change the configuration and restart to follow the brain)"
                );
            }
        }
        ctx.metrics.brain_connected.set(1);
        ctx.metrics.brain_connects.inc();
        ctx.status.send_modify(|st| {
            st.connected = Some((brain.clone(), addr));
            st.sessions += 1;
        });
        tracing::info!(%brain, %addr, version, "connected to the brain");
        s.serve(reader, shutdown).await
    }

    fn hello(&self) -> Message {
        let settings = &self.ctx.settings;
        // quinn reports no local address for a client connection; the
        // kernel's choice of source address towards the brain is what other
        // cells reach this node by (a connected UDP socket sends nothing).
        let addresses = self
            .conn
            .local_ip()
            .or_else(|| source_address_towards(self.conn.remote_address()))
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect();
        Message::Hello(Hello {
            versions: SUPPORTED_VERSIONS,
            cell: settings.cell.clone(),
            zone: settings.zone.clone(),
            tags: settings.tags.clone(),
            total: self.ctx.runtime.total(),
            available: self.ctx.runtime.available(),
            subnet: settings.subnet,
            addresses,
        })
    }

    async fn wait_hello_ack(&mut self, reader: &mut MessageReader) -> Result<HelloAck, Problem> {
        loop {
            match self.receive(reader).await? {
                Message::HelloAck(ack) => return Ok(ack),
                Message::Ping { seq } => self.send(Message::Pong { seq }).await?,
                other => {
                    return Err(self.violation(format!(
                        "{} before hello-ack; expected hello-ack",
                        other.name()
                    )))
                }
            }
        }
    }

    /// The established session: snapshot, then answer the brain and follow
    /// the executor until either side ends it.
    async fn serve(
        mut self,
        mut reader: MessageReader,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Ended {
        let runtime = &self.ctx.runtime;
        // Marked seen before the snapshot is read: a change after this
        // point fires the feed, so none falls between snapshot and deltas.
        let mut changes = runtime.changes();
        changes.borrow_and_update();
        let mut feed_open = true;
        if let Err(p) = self.send_snapshot().await {
            return Ended::AfterSession(p);
        }
        // Unbounded, so that the worker never waits for this loop while
        // this loop waits for room in the work queue; it holds at most the
        // acks of work the brain sent.
        let (ack_tx, mut acks) = mpsc::unbounded_channel::<Message>();
        let (work, work_rx) = mpsc::channel::<Work>(WORK_QUEUE);
        tokio::spawn(worker(Arc::clone(runtime), work_rx, ack_tx).in_current_span());
        loop {
            // Unbiased: a busy change feed must not starve the brain's
            // requests, nor a chatty brain the state reports.
            let step = tokio::select! {
                () = stopping(shutdown) => return goodbye(&self.conn),
                Some(ack) = acks.recv() => self.send(ack).await,
                changed = changes.changed(), if feed_open => match changed {
                    Ok(()) => {
                        changes.borrow_and_update();
                        self.send_update().await
                    }
                    Err(_) => {
                        // The executor is gone; nothing will change any more.
                        feed_open = false;
                        Ok(())
                    }
                },
                msg = self.receive(&mut reader) => match msg {
                    Ok(msg) => self.handle(msg, &work).await,
                    Err(p) => Err(p),
                },
            };
            if let Err(p) = step {
                return Ended::AfterSession(p);
            }
        }
    }

    async fn handle(&mut self, msg: Message, work: &mpsc::Sender<Work>) -> Result<(), Problem> {
        match msg {
            Message::RequestState => self.send_snapshot().await,
            Message::BidRequest(req) => {
                let runtime = &self.ctx.runtime;
                let offer = CellOffer {
                    tags: &self.ctx.settings.tags,
                    total: runtime.total(),
                    available: runtime.available(),
                    evacuating: runtime.evacuating(),
                };
                let bids = logic::bids(&req, &offer, |p| runtime.rootfs_available(p));
                self.send(Message::Bids(bids)).await
            }
            Message::StartWork(w) => self.queue(work, Work::Start(Box::new(w))).await,
            Message::StopWork(w) => self.queue(work, Work::Stop(w)).await,
            Message::Ping { seq } => self.send(Message::Pong { seq }).await,
            Message::Pong { .. } => Ok(()),
            update @ (Message::Routes(_)
            | Message::Endpoints(_)
            | Message::Policies(_)
            | Message::Services(_)) => {
                self.ctx.runtime.clone().network(update).await;
                Ok(())
            }
            // The reader refuses what only a cell may send; what is left is
            // a brain message out of place.
            other => Err(self.violation(format!("unexpected {} after hello-ack", other.name()))),
        }
    }

    async fn queue(&self, work: &mpsc::Sender<Work>, w: Work) -> Result<(), Problem> {
        work.send(w)
            .await
            .map_err(|_| Problem::error("the work queue is gone".into()))
    }

    async fn send_snapshot(&mut self) -> Result<(), Problem> {
        let runtime = &self.ctx.runtime;
        let snapshot = self.tracker.snapshot(
            runtime.available(),
            runtime.evacuating(),
            runtime.instances(),
        );
        self.send(Message::StateSnapshot(snapshot)).await
    }

    async fn send_update(&mut self) -> Result<(), Problem> {
        let runtime = &self.ctx.runtime;
        let update = self.tracker.update(
            runtime.available(),
            runtime.evacuating(),
            runtime.instances(),
            crate::shim::now(),
        );
        if let Some(snapshot) = update.snapshot {
            self.send(Message::StateSnapshot(snapshot)).await?;
        }
        for delta in update.deltas {
            self.send(Message::StateDelta(delta)).await?;
        }
        for event in update.events {
            self.send(Message::Event(event)).await?;
        }
        Ok(())
    }

    async fn send(&mut self, msg: Message) -> Result<(), Problem> {
        match self.writer.send(&msg).await {
            Ok(()) => {
                self.ctx.metrics.count_brain_message(true, &msg);
                Ok(())
            }
            // Our own message did not encode (too large): a bug or a cell
            // beyond the protocol's limits, not the brain's fault.
            Err(LinkError::Wire(e)) => {
                let why = format!("the cell cannot encode its {}: {e}", msg.name());
                close(&self.conn, CloseCode::Normal, &why);
                Err(Problem::error(why))
            }
            Err(e) => Err(self.lost(e)),
        }
    }

    async fn receive(&self, reader: &mut MessageReader) -> Result<Message, Problem> {
        match reader.next().await {
            Ok(Some(msg)) => {
                self.ctx.metrics.count_brain_message(false, &msg);
                Ok(msg)
            }
            Ok(None) => {
                close(&self.conn, CloseCode::Normal, "stream finished");
                Err(Problem::warn(format!(
                    "the brain at {} finished the stream",
                    self.addr
                )))
            }
            Err(LinkError::Wire(e)) => Err(self.violation(format!("bad frame: {e}"))),
            Err(LinkError::Protocol(e)) => Err(self.violation(e)),
            Err(e) => Err(self.lost(e)),
        }
    }

    /// Closes the connection as a protocol error.
    fn violation(&self, what: String) -> Problem {
        close(&self.conn, CloseCode::Protocol, &what);
        Problem::error(format!(
            "protocol error from the brain at {}: {what}; closed the connection",
            self.addr
        ))
    }

    fn lost(&self, e: LinkError) -> Problem {
        match self.conn.close_reason() {
            Some(reason) => explain(&reason, self.addr),
            None => Problem::warn(format!("the brain at {}: {e}", self.addr)),
        }
    }
}

/// A start or stop, carried out in order by one worker per session, so a
/// stop that follows a start of the same instance is never overtaken by it.
enum Work {
    Start(Box<StartWork>),
    Stop(StopWork),
}

async fn worker<R: CellRuntime>(
    runtime: Arc<R>,
    mut work: mpsc::Receiver<Work>,
    acks: mpsc::UnboundedSender<Message>,
) {
    while let Some(w) = work.recv().await {
        let (request, id, what, outcome) = match w {
            Work::Start(s) => {
                let s = *s;
                let outcome = Arc::clone(&runtime).start(s.id.clone(), s.spec).await;
                (s.request, s.id, "start", outcome)
            }
            Work::Stop(s) => {
                let outcome = Arc::clone(&runtime).stop(s.id.clone(), s.grace).await;
                (s.request, s.id, "stop", outcome)
            }
        };
        match &outcome {
            corral_proto::wire::AckOutcome::Done => {
                tracing::info!(instance = %id, %request, "brain's {what} accepted")
            }
            corral_proto::wire::AckOutcome::Refused(r) => {
                tracing::warn!(instance = %id, %request, "brain's {what} refused: {r}")
            }
        }
        // The session may be gone; the work is done all the same, and the
        // next session's snapshot shows it.
        let _ = acks.send(Message::Ack(Ack { request, outcome }));
    }
}

/// The agent is stopping: say so to the brain.
fn goodbye(conn: &quinn::Connection) -> Ended {
    close(conn, CloseCode::Normal, "the agent is stopping");
    Ended::Shutdown
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    conn.close(
        quinn::VarInt::from_u32(code.as_u32()),
        &reason.as_bytes()[..end],
    );
}

/// Why a connection ended, in an operator's words.
fn explain(e: &quinn::ConnectionError, addr: SocketAddr) -> Problem {
    if let Some(r) = tls::handshake_refusal(e) {
        return Problem::error(match r.by {
            RefusedBy::Peer => format!(
                "the brain at {addr} refused our certificate: {} (TLS alert {:?})",
                r.reason, r.alert
            ),
            RefusedBy::Us => format!(
                "refused the brain at {addr}: its certificate is not acceptable: {}",
                r.reason
            ),
        });
    }
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason);
            let code = u32::try_from(c.error_code.into_inner())
                .ok()
                .and_then(CloseCode::from_u32);
            let said = |what: &str| {
                format!("the brain at {addr} closed the connection ({what}): {reason}")
            };
            match code {
                Some(CloseCode::Normal) => Problem::info(said("normal close")),
                Some(CloseCode::Replaced) => {
                    Problem::info(said("replaced by a newer connection of this cell"))
                }
                Some(CloseCode::Protocol) => Problem::error(said("protocol error")),
                Some(CloseCode::Version) => Problem::error(said("no common protocol version")),
                Some(CloseCode::Identity) => {
                    Problem::error(said("our hello does not match our certificate"))
                }
                Some(CloseCode::Conflict) => Problem::error(said(
                    "this cell's configuration conflicts with the cluster's",
                )),
                None => Problem::warn(said(&format!("unknown code {}", c.error_code))),
            }
        }
        quinn::ConnectionError::TimedOut => {
            Problem::warn(format!("the brain at {addr} does not answer (timed out)"))
        }
        other => Problem::warn(format!("connection to the brain at {addr}: {other}")),
    }
}

/// Runs `f` unless the link is told to stop first (`None`).
async fn or_shutdown<F: Future>(shutdown: &mut watch::Receiver<bool>, f: F) -> Option<F::Output> {
    tokio::select! {
        biased;
        () = stopping(shutdown) => None,
        out = f => Some(out),
    }
}

/// Completes when the link is told to stop. A dropped handle is not a stop:
/// the link then runs as long as the runtime.
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|stop| *stop).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A random number for jitter, without a dependency: std's hasher keys are
/// random per process and differ per instance.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

/// The address the kernel would send from to reach `peer`.
fn source_address_towards(peer: std::net::SocketAddr) -> Option<std::net::IpAddr> {
    let any: std::net::SocketAddr = match peer {
        std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any).ok()?;
    socket.connect(peer).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}
