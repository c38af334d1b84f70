//! The cell's brain link over real QUIC on 127.0.0.1, without root: a tiny
//! brain made of `corral_link` parts and certificates from
//! `corral_brain::certs` talks to the link, which runs on the real executor
//! (no instance can start without root, so only what needs none: hello,
//! snapshots, bids, pings, refused starts, stops of unknown instances), and
//! on a fake runtime for the start → state → event path.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_agent::cell_link;
use corral_agent::config::{BrainAddress, BrainConfig, Config, HostFacts};
use corral_agent::executor::Executor;
use corral_agent::metrics::Metrics;
use corral_brain::certs::{Ca, Validity};
use corral_link::framed::MessageReader;
use corral_link::tls::{self, Credentials};
use corral_link::PeerIdentity;
use corral_proto::wire::{
    encode, AckOutcome, BidOutcome, BidRequest, CloseCode, Hello, HelloAck, InstanceEventKind,
    Message, Refusal, RequestId, Sender, StartWork, StateChange, StopWork, WorkItem,
    SUPPORTED_VERSIONS,
};
use corral_proto::{CapacityError, CellId, InstanceId, InstanceState, Status, Timestamp};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

mod common;

use common::*;

// ---- certificates ----------------------------------------------------------

struct Cluster {
    ca: Ca,
}

impl Cluster {
    fn new() -> Self {
        let validity = Validity::days_from(SystemTime::now(), 30);
        Self {
            ca: Ca::generate(validity).unwrap().0,
        }
    }

    /// Credentials for `who`, issued by `issuer`, trusting this CA.
    fn creds_from(&self, issuer: &Cluster, who: &PeerIdentity) -> Credentials {
        let pems = issuer
            .ca
            .issue(who, Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        Credentials::from_pem(
            (Path::new("ca.pem"), self.ca.cert_pem().as_bytes()),
            (Path::new("leaf.pem"), pems.cert.as_bytes()),
            (Path::new("leaf-key.pem"), pems.key.as_bytes()),
        )
        .unwrap()
    }

    fn creds(&self, who: &PeerIdentity) -> Credentials {
        self.creds_from(self, who)
    }

    /// Writes `who`'s certificate files into `dir`, as the `[brain]` table
    /// names them.
    fn files(&self, dir: &Path, who: &PeerIdentity) -> BrainConfig {
        let pems = self
            .ca
            .issue(who, Validity::days_from(SystemTime::now(), 1))
            .unwrap();
        let cfg = BrainConfig {
            addresses: vec![BrainAddress::Socket("127.0.0.1:1".parse().unwrap())],
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            brain_id: None,
        };
        std::fs::write(&cfg.ca, self.ca.cert_pem()).unwrap();
        std::fs::write(&cfg.cert, pems.cert).unwrap();
        std::fs::write(&cfg.key, pems.key).unwrap();
        cfg
    }
}

// ---- the tiny brain ----------------------------------------------------------

struct TestBrain {
    ep: quinn::Endpoint,
}

impl TestBrain {
    fn new(creds: &Credentials) -> Self {
        let ep = tls::server_endpoint("127.0.0.1:0".parse().unwrap(), creds).unwrap();
        Self { ep }
    }

    fn addr(&self) -> SocketAddr {
        self.ep.local_addr().unwrap()
    }

    /// The next connection, its identity checked, and the stream the cell
    /// opens.
    async fn accept(&self) -> BrainConn {
        within(async {
            let conn = self.ep.accept().await.unwrap().await.unwrap();
            assert_eq!(
                tls::peer_identity(&conn).unwrap(),
                PeerIdentity::Cell(cell_id())
            );
            let (send, recv) = conn.accept_bi().await.unwrap();
            BrainConn {
                conn,
                reader: MessageReader::new(recv, Sender::Cell),
                send,
            }
        })
        .await
    }

    /// The brain's side of a handshake that must fail.
    async fn accept_refused(&self) -> quinn::ConnectionError {
        within(async {
            let incoming = self.ep.accept().await.unwrap();
            match incoming.await {
                Err(e) => e,
                Ok(conn) => conn.closed().await,
            }
        })
        .await
    }
}

struct BrainConn {
    conn: quinn::Connection,
    reader: MessageReader,
    /// Raw, so that a test can also send what no writer would.
    send: quinn::SendStream,
}

impl BrainConn {
    async fn recv(&mut self) -> Message {
        within(self.reader.next())
            .await
            .unwrap()
            .expect("the cell ended the stream")
    }

    async fn send(&mut self, m: Message) {
        self.send_raw(&encode(&m).unwrap()).await;
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        within(self.send.write_all(bytes)).await.unwrap();
    }

    /// Reads the hello and answers it.
    async fn greet(&mut self) -> Hello {
        let Message::Hello(hello) = self.recv().await else {
            panic!("the first message must be a hello");
        };
        self.send(Message::HelloAck(HelloAck {
            version: corral_proto::wire::PROTOCOL_VERSION,
            brain: brain_id(),
            subnet: None,
        }))
        .await;
        hello
    }

    /// Messages until one matches, returning it and those before it.
    async fn until(&mut self, mut pred: impl FnMut(&Message) -> bool) -> (Message, Vec<Message>) {
        let mut before = Vec::new();
        loop {
            let m = self.recv().await;
            if pred(&m) {
                return (m, before);
            }
            before.push(m);
        }
    }

    /// How the cell closed this connection.
    async fn closed_by_cell(&self) -> (Option<CloseCode>, String) {
        match within(self.conn.closed()).await {
            quinn::ConnectionError::ApplicationClosed(c) => (
                CloseCode::from_u32(u32::try_from(c.error_code.into_inner()).unwrap()),
                String::from_utf8_lossy(&c.reason).into_owned(),
            ),
            other => panic!("not closed by the application: {other}"),
        }
    }
}

// ---- the cell ---------------------------------------------------------------

/// The real executor on a temporary directory (no root needed until an
/// instance starts).
async fn executor(dir: &Path) -> Arc<Executor> {
    let exec = unadopted_executor(dir);
    exec.adopt().await.unwrap();
    exec
}

fn unadopted_executor(dir: &Path) -> Arc<Executor> {
    let host = HostFacts {
        hostname: CELL.into(),
        memory_mb: 16_000,
        disk_free_mb: 100_000,
    };
    let text = format!(
        "cell_id = \"{CELL}\"\ndata_dir = \"{d}/data\"\nrun_dir = \"{d}/run\"\n\
         [api]\nlisten = \"off\"\n[metrics]\nlisten = \"off\"\n[disk]\nenforce = false\n\
         [capacity]\nmemory_mb = {}\ndisk_mb = {}\nmax_containers = {}\n",
        TOTAL.memory_mb,
        TOTAL.disk_mb,
        TOTAL.containers,
        d = dir.display()
    );
    let cfg = Config::parse(&text, &host).unwrap();
    Executor::new(
        cfg,
        PathBuf::from("/bin/false"),
        Arc::new(Metrics::new()),
        None,
        None,
    )
}

fn item(id: &str, rootfs: &Path, memory_mb: u64, needs: &[&str]) -> WorkItem {
    WorkItem::new(
        InstanceId::new(id).unwrap(),
        &spec(rootfs, memory_mb),
        tags(needs),
    )
}

// ---- tests ------------------------------------------------------------------

#[tokio::test]
async fn hello_snapshot_bids_and_work_against_the_real_executor() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let exec = executor(dir.path()).await;
    let metrics = Arc::new(Metrics::new());
    let creds = cluster.creds(&PeerIdentity::Cell(cell_id()));
    let link =
        cell_link::spawn(settings(brain.addr()), creds, exec.clone(), metrics.clone()).unwrap();

    let mut c = brain.accept().await;
    let hello = c.greet().await;
    assert_eq!(hello.versions, SUPPORTED_VERSIONS);
    assert_eq!(hello.cell, cell_id());
    assert_eq!(hello.zone.as_str(), "z1");
    assert_eq!(hello.tags, tags(&["ssd"]));
    assert_eq!((hello.total, hello.available), (TOTAL, TOTAL));
    assert_eq!(hello.subnet.unwrap().to_string(), "10.244.1.0/24");
    assert!(
        hello.addresses.iter().all(|a| a.is_loopback()),
        "{:?}",
        hello.addresses
    );

    // The snapshot follows the hello-ack.
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("a snapshot must follow the hello-ack");
    };
    assert_eq!(snap.seq, 1);
    assert!(!snap.evacuating);
    assert!(snap.instances.is_empty());
    assert_eq!(snap.available, TOTAL);
    let status = wait_status(&link, |s| s.connected.is_some()).await;
    assert_eq!(status.connected, Some((brain_id(), brain.addr())));

    // One bid per item, in order, with the reason for each refusal.
    let missing_rootfs = dir.path().join("no-such-rootfs");
    c.send(Message::BidRequest(BidRequest {
        request: RequestId(7),
        items: vec![
            item("fits", &rootfs, 256, &["ssd"]),
            item("needs-gpu", &rootfs, 256, &["ssd", "gpu"]),
            item("too-big", &rootfs, 4096, &[]),
            item("no-rootfs", &missing_rootfs, 64, &[]),
        ],
    }))
    .await;
    let Message::Bids(bids) = c.recv().await else {
        panic!("bids expected");
    };
    assert_eq!(bids.request, RequestId(7));
    let outcomes: Vec<_> = bids
        .bids
        .iter()
        .map(|b| (b.id.as_str(), &b.outcome))
        .collect();
    // (256/1024 + 128/4096 + 1/10) / 3 ≈ 0.127
    assert_eq!(outcomes[0], ("fits", &BidOutcome::Score(127)));
    assert_eq!(
        outcomes[1],
        (
            "needs-gpu",
            &BidOutcome::Refused(Refusal::MissingTags {
                missing: tags(&["gpu"])
            })
        )
    );
    assert_eq!(
        outcomes[2],
        (
            "too-big",
            // The batch's first item holds 256 MB of it.
            &BidOutcome::Refused(Refusal::Capacity(CapacityError::Memory {
                requested: 4096,
                free: 768,
                total: 1024
            }))
        )
    );
    assert_eq!(
        outcomes[3],
        (
            "no-rootfs",
            &BidOutcome::Refused(Refusal::RootfsUnavailable {
                rootfs: missing_rootfs.to_str().unwrap().into()
            })
        )
    );

    c.send(Message::Ping { seq: 42 }).await;
    assert_eq!(c.recv().await, Message::Pong { seq: 42 });

    // Starts that need no root to be refused; a stop of an unknown
    // instance is done (it is gone).
    let id = |s: &str| InstanceId::new(s).unwrap();
    let mut bad = spec(&rootfs, 64);
    bad.resources.memory_mb = 0;
    for (request, spec) in [
        (1, bad),
        (2, spec(&missing_rootfs, 64)),
        (3, spec(&rootfs, 64)), // no /bin/server in the rootfs
    ] {
        c.send(Message::StartWork(StartWork {
            request: RequestId(request),
            id: id("i1"),
            spec,
        }))
        .await;
    }
    c.send(Message::StopWork(StopWork {
        request: RequestId(4),
        id: id("ghost"),
        grace: Duration::from_secs(1),
    }))
    .await;
    let mut acks = BTreeMap::new();
    while acks.len() < 4 {
        let Message::Ack(a) = c.recv().await else {
            panic!("acks expected");
        };
        acks.insert(a.request.0, a.outcome);
    }
    assert!(
        matches!(&acks[&1], AckOutcome::Refused(Refusal::Invalid { reason }) if reason.contains("memory_mb")),
        "{:?}",
        acks[&1]
    );
    assert!(
        matches!(
            &acks[&2],
            AckOutcome::Refused(Refusal::RootfsUnavailable { .. })
        ),
        "{:?}",
        acks[&2]
    );
    assert!(
        matches!(&acks[&3], AckOutcome::Refused(Refusal::Invalid { reason }) if reason.contains("/bin/server")),
        "{:?}",
        acks[&3]
    );
    assert_eq!(acks[&4], AckOutcome::Done);

    // A fresh snapshot on request; nothing changed, so it is empty still.
    c.send(Message::RequestState).await;
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("snapshot expected");
    };
    assert_eq!(snap.seq, 2);
    assert!(snap.instances.is_empty());

    let text = corral_agent::metrics::render(&metrics.registry(std::sync::Weak::new()));
    assert!(text.contains("corral_brain_connected 1"), "{text}");
    assert!(text.contains("corral_brain_connects_total 1"), "{text}");
    assert!(
        text.contains(r#"corral_brain_messages_total{direction="received",type="bid-request"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"corral_brain_messages_total{direction="sent",type="ack"} 4"#),
        "{text}"
    );

    // The brain goes away: the cell comes back with a new hello and a
    // whole snapshot.
    c.conn.close(
        quinn::VarInt::from_u32(CloseCode::Normal.as_u32()),
        b"restarting",
    );
    let mut c = brain.accept().await;
    let again = c.greet().await;
    assert_eq!(again.cell, cell_id());
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("a snapshot must follow the second hello-ack");
    };
    assert_eq!(snap.seq, 1);
    let status = wait_status(&link, |s| s.sessions == 2 && s.connected.is_some()).await;
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("restarting"),
        "{status:?}"
    );

    // The agent stops: it says goodbye.
    link.shutdown().await;
    let (code, reason) = c.closed_by_cell().await;
    assert_eq!(code, Some(CloseCode::Normal));
    assert!(reason.contains("stopping"), "{reason}");
    let text = corral_agent::metrics::render(&metrics.registry(std::sync::Weak::new()));
    assert!(text.contains("corral_brain_connected 0"), "{text}");
}

#[tokio::test]
async fn an_instance_found_at_adoption_is_reported_and_a_stop_removes_it() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let exec = unadopted_executor(dir.path());
    // An instance that ended before the agent (re)started: its files only.
    let id = InstanceId::new("old-0").unwrap();
    let paths = exec.paths(&id);
    std::fs::create_dir_all(&paths.data).unwrap();
    std::fs::create_dir_all(&paths.run).unwrap();
    let the_spec = spec(Path::new("/srv/rootfs"), 64);
    std::fs::write(paths.spec(), serde_json::to_vec(&the_spec).unwrap()).unwrap();
    let mut status = Status::new();
    status.state = InstanceState::Exited;
    status.exit_code = Some(0);
    corral_agent::shim::write_record(
        &paths.record(),
        &corral_agent::shim::Record {
            shim_pid: 0,
            shim_start: 0,
            init_pid: None,
            init_start: None,
            status,
            cpu_ns: None,
            oom_kills: 0,
            logs_dropped: 0,
        },
    )
    .unwrap();
    exec.adopt().await.unwrap();

    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        exec,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let mut c = brain.accept().await;
    c.greet().await;
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("snapshot expected");
    };
    assert_eq!(snap.instances.len(), 1);
    assert_eq!(
        (&snap.instances[0].id, snap.instances[0].state),
        (&id, InstanceState::Exited)
    );
    // An ended instance holds nothing.
    assert_eq!(snap.available, TOTAL);

    c.send(Message::StopWork(StopWork {
        request: RequestId(1),
        id: id.clone(),
        grace: Duration::from_secs(1),
    }))
    .await;
    let removed = StateChange::Removed { id: id.clone() };
    let (m, before) = c
        .until(|m| matches!(m, Message::StateDelta(d) if d.changes.contains(&removed)))
        .await;
    let Message::StateDelta(delta) = m else {
        unreachable!()
    };
    assert_eq!(delta.seq, snap.seq + 1);
    let acked = before
        .iter()
        .any(|m| matches!(m, Message::Ack(a) if a.request == RequestId(1) && a.outcome == AckOutcome::Done));
    if !acked {
        let Message::Ack(a) = c.recv().await else {
            panic!("ack expected")
        };
        assert_eq!((a.request, a.outcome), (RequestId(1), AckOutcome::Done));
    }
    assert!(!paths.data.exists() && !paths.run.exists());
    link.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_close_the_connection_and_the_cell_comes_back() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let exec = executor(dir.path()).await;
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        exec,
        Arc::new(Metrics::new()),
    )
    .unwrap();

    // A version the cell does not speak.
    let mut c = brain.accept().await;
    let Message::Hello(_) = c.recv().await else {
        panic!("hello expected");
    };
    c.send(Message::HelloAck(HelloAck {
        version: 99,
        brain: brain_id(),
        subnet: None,
    }))
    .await;
    assert_eq!(c.closed_by_cell().await.0, Some(CloseCode::Version));

    // A message only a cell may send.
    let mut c = brain.accept().await;
    c.greet().await;
    c.recv().await; // the snapshot
    c.send(Message::Ping { seq: 1 }).await;
    assert_eq!(c.recv().await, Message::Pong { seq: 1 });
    c.send(Message::Event(corral_proto::wire::InstanceEvent {
        id: InstanceId::new("x").unwrap(),
        at: Timestamp(1),
        kind: InstanceEventKind::Started,
    }))
    .await;
    let (code, reason) = c.closed_by_cell().await;
    assert_eq!(code, Some(CloseCode::Protocol));
    assert!(reason.contains("event"), "{reason}");

    // Bytes that are no frame: a length prefix far above the limit.
    let mut c = brain.accept().await;
    c.greet().await;
    c.recv().await;
    c.send_raw(&[0xff, 0xff, 0xff, 0xff]).await;
    let (code, reason) = c.closed_by_cell().await;
    assert_eq!(code, Some(CloseCode::Protocol));
    assert!(reason.contains("exceeds the maximum"), "{reason}");

    // The brain finishing its stream ends the session politely.
    let mut c = brain.accept().await;
    c.greet().await;
    c.recv().await;
    c.send.finish().unwrap();
    assert_eq!(c.closed_by_cell().await.0, Some(CloseCode::Normal));

    // And the cell is back each time.
    let mut c = brain.accept().await;
    c.greet().await;
    let status = wait_status(&link, |s| s.sessions == 4).await;
    assert!(status.connected.is_some());
    let logs = logs();
    assert!(
        logs.contains(&format!(
            "protocol error from the brain at {}",
            brain.addr()
        )),
        "{logs}"
    );
    link.shutdown().await;
}

#[tokio::test]
async fn a_brain_from_another_ca_is_refused_and_logged() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    let other = Cluster::new();
    // It trusts our CA, so only the cell can refuse it.
    let brain = TestBrain::new(&cluster.creds_from(&other, &PeerIdentity::Brain(brain_id())));
    let exec = executor(dir.path()).await;
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        exec,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let brain_saw = brain.accept_refused().await;
    let refusal = tls::handshake_refusal(&brain_saw).expect("a TLS refusal");
    assert_eq!(refusal.by, tls::RefusedBy::Peer);
    let status = wait_status(&link, |s| s.last_error.is_some()).await;
    let err = status.last_error.unwrap();
    let expected = format!("refused the brain at {}", brain.addr());
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("not acceptable"), "{err}");
    assert_eq!(status.sessions, 0);
    assert!(logs().contains(&expected), "not logged: {expected}");
    link.shutdown().await;
}

#[tokio::test]
async fn a_cell_certificate_from_another_ca_is_refused_by_the_brain_and_logged() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    let other = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let exec = executor(dir.path()).await;
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds_from(&other, &PeerIdentity::Cell(cell_id())),
        exec,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    brain.accept_refused().await;
    let status = wait_status(&link, |s| s.last_error.is_some()).await;
    let err = status.last_error.unwrap();
    let expected = format!("the brain at {} refused our certificate", brain.addr());
    assert!(err.contains(&expected), "{err}");
    assert!(logs().contains(&expected), "not logged: {expected}");
    link.shutdown().await;
}

#[test]
fn credentials_must_load_and_name_this_cell() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new();
    let ok = cluster.files(dir.path(), &PeerIdentity::Cell(cell_id()));
    let creds = cell_link::load_credentials(&ok, &cell_id()).unwrap();
    assert_eq!(*creds.identity(), PeerIdentity::Cell(cell_id()));

    let other_dir = tempfile::tempdir().unwrap();
    let other = cluster.files(
        other_dir.path(),
        &PeerIdentity::Cell(CellId::new("c2").unwrap()),
    );
    let err = cell_link::load_credentials(&other, &cell_id())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is the certificate of cell c2, not of this cell (c1)"),
        "{err}"
    );
    assert!(err.contains("--cell c1"), "{err}");

    let brain_dir = tempfile::tempdir().unwrap();
    let brain = cluster.files(brain_dir.path(), &PeerIdentity::Brain(brain_id()));
    let err = cell_link::load_credentials(&brain, &cell_id())
        .unwrap_err()
        .to_string();
    assert!(err.contains("brain b1"), "{err}");

    let missing = BrainConfig {
        cert: dir.path().join("nope.pem"),
        ..ok
    };
    let err = cell_link::load_credentials(&missing, &cell_id())
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.pem"), "{err}");
}

#[tokio::test]
async fn started_work_is_acknowledged_then_reported_as_deltas_and_events() {
    capture_logs();
    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let cell = FakeCell::new();
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        cell.clone(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let mut c = brain.accept().await;
    c.greet().await;
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("snapshot expected");
    };
    let rootfs = Path::new("/srv/rootfs");
    let id = InstanceId::new("web-0").unwrap();
    c.send(Message::StartWork(StartWork {
        request: RequestId(1),
        id: id.clone(),
        spec: spec(rootfs, 256),
    }))
    .await;

    // The ack, the delta that shows it starting, then running, and its event.
    let mut seq = snap.seq;
    let mut seen_states = Vec::new();
    let mut acked = false;
    let mut started = false;
    while !(acked && started && seen_states.last() == Some(&InstanceState::Running)) {
        match c.recv().await {
            Message::Ack(a) => {
                assert_eq!((a.request, a.outcome), (RequestId(1), AckOutcome::Done));
                acked = true;
            }
            Message::StateDelta(d) => {
                seq += 1;
                assert_eq!(d.seq, seq, "deltas continue the snapshot");
                for ch in d.changes {
                    let StateChange::Upsert { instance } = ch else {
                        panic!("unexpected removal");
                    };
                    seen_states.push(instance.state);
                }
                assert_eq!(d.available.memory_mb, TOTAL.memory_mb - 256);
            }
            Message::Event(e) => {
                assert_eq!(
                    (e.id.clone(), e.kind),
                    (id.clone(), InstanceEventKind::Started)
                );
                assert_eq!(e.at, Timestamp(5));
                started = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen_states.first(), Some(&InstanceState::Starting));

    // Idempotent with the same spec; a different one is a duplicate.
    c.send(Message::StartWork(StartWork {
        request: RequestId(2),
        id: id.clone(),
        spec: spec(rootfs, 256),
    }))
    .await;
    c.send(Message::StartWork(StartWork {
        request: RequestId(3),
        id: id.clone(),
        spec: spec(rootfs, 512),
    }))
    .await;
    let Message::Ack(a) = c.recv().await else {
        panic!("ack expected")
    };
    assert_eq!((a.request, a.outcome), (RequestId(2), AckOutcome::Done));
    let Message::Ack(a) = c.recv().await else {
        panic!("ack expected")
    };
    assert_eq!(
        (a.request, a.outcome),
        (
            RequestId(3),
            AckOutcome::Refused(Refusal::Duplicate { id: id.clone() })
        )
    );

    // A crash is an event with its reason.
    cell.set_state(&id, InstanceState::Crashed, 9);
    let (m, _) = c.until(|m| matches!(m, Message::Event(_))).await;
    let Message::Event(e) = m else { unreachable!() };
    assert_eq!(
        e.kind,
        InstanceEventKind::Crashed {
            reason: "long-running process exited with code 3".into(),
            exit_code: Some(3)
        }
    );
    assert_eq!(e.at, Timestamp(9));

    // Stopping removes it.
    c.send(Message::StopWork(StopWork {
        request: RequestId(4),
        id: id.clone(),
        grace: Duration::from_secs(1),
    }))
    .await;
    let (m, before) = c
        .until(|m| {
            matches!(m, Message::StateDelta(d)
                if d.changes.contains(&StateChange::Removed { id: InstanceId::new("web-0").unwrap() }))
        })
        .await;
    let acks: Vec<_> = before
        .iter()
        .chain([&m])
        .filter_map(|m| match m {
            Message::Ack(a) => Some(a.request),
            _ => None,
        })
        .collect();
    if acks.is_empty() {
        let Message::Ack(a) = c.recv().await else {
            panic!("ack expected")
        };
        assert_eq!((a.request, a.outcome), (RequestId(4), AckOutcome::Done));
    } else {
        assert_eq!(acks, [RequestId(4)]);
    }
    link.shutdown().await;
}

#[tokio::test]
async fn an_evacuating_cell_refuses_new_work_says_so_and_stays_evacuating_after_a_restart() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    // A rootfs that holds the command, so a start gets as far as admission.
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::write(rootfs.join("bin/server"), "#!/bin/sh\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            rootfs.join("bin/server"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
    }
    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let exec = executor(dir.path()).await;
    let metrics = Arc::new(Metrics::new());
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        exec.clone(),
        metrics.clone(),
    )
    .unwrap();
    let mut c = brain.accept().await;
    c.greet().await;
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("snapshot expected");
    };
    assert!(!snap.evacuating);

    // Draining: a fresh snapshot says so (deltas cannot).
    assert!(exec.set_evacuating(true).unwrap());
    assert!(!exec.set_evacuating(true).unwrap(), "already evacuating");
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("a snapshot must follow the start of an evacuation");
    };
    assert!(snap.evacuating);
    assert_eq!(snap.seq, 2);
    let since = exec.evacuating().unwrap();

    // No bid, no start.
    c.send(Message::BidRequest(BidRequest {
        request: RequestId(1),
        items: vec![item("a", &rootfs, 64, &[])],
    }))
    .await;
    let Message::Bids(bids) = c.recv().await else {
        panic!("bids expected");
    };
    assert_eq!(
        bids.bids[0].outcome,
        BidOutcome::Refused(Refusal::Evacuating)
    );
    c.send(Message::StartWork(StartWork {
        request: RequestId(2),
        id: InstanceId::new("a").unwrap(),
        spec: spec(&rootfs, 64),
    }))
    .await;
    let Message::Ack(a) = c.recv().await else {
        panic!("ack expected");
    };
    assert_eq!(
        (a.request, a.outcome),
        (RequestId(2), AckOutcome::Refused(Refusal::Evacuating))
    );
    assert!(exec.get(&InstanceId::new("a").unwrap()).is_none());
    let text = corral_agent::metrics::render(&metrics.registry(Arc::downgrade(&exec)));
    assert!(text.contains("corral_cell_evacuating 1"), "{text}");

    // A restarted agent (a new executor on the same directories) is still
    // draining, since the same instant.
    let again = executor(dir.path()).await;
    assert_eq!(again.evacuating(), Some(since));
    drop(again);

    // Cancelled: a snapshot without the flag; bids are scored again.
    assert!(exec.set_evacuating(false).unwrap());
    let Message::StateSnapshot(snap) = c.recv().await else {
        panic!("a snapshot must follow the end of an evacuation");
    };
    assert!(!snap.evacuating);
    assert_eq!(snap.seq, 3);
    c.send(Message::BidRequest(BidRequest {
        request: RequestId(3),
        items: vec![item("a", &rootfs, 64, &[])],
    }))
    .await;
    let Message::Bids(bids) = c.recv().await else {
        panic!("bids expected");
    };
    assert!(matches!(bids.bids[0].outcome, BidOutcome::Score(_)));
    let text = corral_agent::metrics::render(&metrics.registry(Arc::downgrade(&exec)));
    assert!(text.contains("corral_cell_evacuating 0"), "{text}");
    assert_eq!(executor(dir.path()).await.evacuating(), None);
    link.shutdown().await;
}

#[tokio::test]
async fn evacuation_tells_the_brain_about_each_running_lrp() {
    capture_logs();
    let cluster = Cluster::new();
    let brain = TestBrain::new(&cluster.creds(&PeerIdentity::Brain(brain_id())));
    let cell = FakeCell::new();
    let link = cell_link::spawn(
        settings(brain.addr()),
        cluster.creds(&PeerIdentity::Cell(cell_id())),
        cell.clone(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let mut c = brain.accept().await;
    c.greet().await;
    let Message::StateSnapshot(_) = c.recv().await else {
        panic!("snapshot expected");
    };
    let rootfs = Path::new("/srv/rootfs");
    let id = InstanceId::new("web-0").unwrap();
    c.send(Message::StartWork(StartWork {
        request: RequestId(1),
        id: id.clone(),
        spec: spec(rootfs, 64),
    }))
    .await;
    c.until(|m| matches!(m, Message::Event(e) if e.kind == InstanceEventKind::Started))
        .await;

    cell.set_evacuating(true);
    let (m, _) = c.until(|m| matches!(m, Message::StateSnapshot(_))).await;
    let Message::StateSnapshot(snap) = m else {
        unreachable!()
    };
    assert!(snap.evacuating);
    assert_eq!(snap.instances.len(), 1);
    let Message::Event(e) = c.recv().await else {
        panic!("an evacuating event must follow the snapshot");
    };
    assert_eq!((e.id, e.kind), (id.clone(), InstanceEventKind::Evacuating));

    // What runs keeps running; a repeated start of it is still done, a new
    // one is refused.
    for (request, which) in [(2, "web-0"), (3, "web-1")] {
        c.send(Message::StartWork(StartWork {
            request: RequestId(request),
            id: InstanceId::new(which).unwrap(),
            spec: spec(rootfs, 64),
        }))
        .await;
    }
    let mut acks = BTreeMap::new();
    while acks.len() < 2 {
        let (m, _) = c.until(|m| matches!(m, Message::Ack(_))).await;
        let Message::Ack(a) = m else { unreachable!() };
        acks.insert(a.request.0, a.outcome);
    }
    assert_eq!(acks[&2], AckOutcome::Done);
    assert_eq!(acks[&3], AckOutcome::Refused(Refusal::Evacuating));
    assert_eq!(running_here(&cell), 1);
    link.shutdown().await;
}

fn running_here(cell: &FakeCell) -> usize {
    use corral_agent::cell_link::CellRuntime;
    cell.instances()
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .count()
}
