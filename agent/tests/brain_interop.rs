//! The cell's brain link against the real brain (`corral_brain::run`), in
//! process, over real QUIC with real certificates, without root: the cell
//! side is the real link on a fake runtime (`common::FakeCell`), so this
//! checks the two halves of the protocol agree on what they do — placement,
//! scale-down, crash replacement. With real containers the same
//! runs as root in `tests/`.
// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use corral_agent::cell_link::{self, CellRuntime};
use corral_agent::metrics::Metrics;
use corral_brain::certs::{self, Validity};
use corral_brain::config::{Config, TlsFiles, Token, Tokens};
use corral_link::tls::Credentials;
use corral_link::PeerIdentity;
use corral_proto::{InstanceState, TenantId};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-token-0123456789";
const ACME: &str = "acme-token-0123456789";

struct Brain {
    api: SocketAddr,
    quic: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Brain {
    async fn start(dir: &Path) -> Brain {
        let certs = dir.join("certs");
        let config = Config {
            brain_id: brain_id(),
            data_dir: dir.join("data"),
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            quic_listen: "127.0.0.1:0".parse().unwrap(),
            tls: TlsFiles {
                ca: certs.join("ca.pem"),
                cert: certs.join("brain-b1.pem"),
                key: certs.join("brain-b1-key.pem"),
            },
            tokens: Tokens::new(
                Some(Token::new(ADMIN).unwrap()),
                vec![(Token::new(ACME).unwrap(), TenantId::new("acme").unwrap())],
            )
            .unwrap(),
            cell_lost_grace_secs: 2,
            vip_range: None,
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            corral_brain::run::run(
                config,
                move |b| {
                    let _ = ready_tx.send(b);
                },
                async move {
                    let _ = stop_rx.await;
                },
            )
            .await
            .unwrap();
        });
        let bound = within(ready_rx).await.unwrap();
        Brain {
            api: bound.api.unwrap(),
            quic: bound.quic,
            stop,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        within(self.task).await.unwrap();
    }
}

/// One HTTP/1.1 request to the brain's API as the admin; the status and
/// the JSON body.
async fn call(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: brain\r\nauthorization: Bearer {ADMIN}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf);
    let status: u16 = text[9..12].parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn running(cell: &FakeCell) -> usize {
    cell.instances()
        .iter()
        .filter(|i| i.state == InstanceState::Running)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_brain_places_scales_and_heals_through_the_link() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let v = Validity::days_from(SystemTime::now(), 2);
    certs::init(&certs, v, false).unwrap();
    certs::issue(&certs, &PeerIdentity::Brain(brain_id()), v, false).unwrap();
    certs::issue(&certs, &PeerIdentity::Cell(cell_id()), v, false).unwrap();
    let brain = Brain::start(dir.path()).await;

    let cell = FakeCell::new();
    let creds = Credentials::from_dir(&certs, &PeerIdentity::Cell(cell_id())).unwrap();
    let mut s = settings(brain.quic);
    s.tags = Default::default();
    let link = cell_link::spawn(s, creds, cell.clone(), Arc::new(Metrics::new())).unwrap();
    wait_status(&link, |s| s.connected.is_some()).await;
    // The brain's API view follows its loop, a moment after the hello-ack.
    let deadline = Instant::now() + DEADLINE;
    let cells = loop {
        let (_, cells) = call(brain.api, "GET", "/v1/cells", None).await;
        if cells["cells"][0]["id"] == CELL || Instant::now() > deadline {
            break cells;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(cells["cells"][0]["id"], CELL, "{cells}");
    assert_eq!(cells["cells"][0]["zone"], "z1", "{cells}");

    // Placed here (bids, StartWork, acks, deltas, events).
    let (status, body) = call(
        brain.api,
        "POST",
        "/v1/apps",
        Some(json!({
            "tenant": "acme", "name": "web", "instances": 3, "rootfs": "/rootfs",
            "command": ["/bin/sleep", "1000"], "resources": {"memory_mb": 64, "disk_mb": 64},
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    wait_for("three running", || running(&cell) == 3).await;

    // Scaled down (StopWork).
    let (status, body) = call(
        brain.api,
        "PATCH",
        "/v1/apps/web?tenant=acme",
        Some(json!({ "instances": 1 })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    wait_for("one left", || cell.instances().len() == 1).await;

    // A crash (an event) is replaced.
    let victim = cell.instances()[0].id.clone();
    cell.set_state(&victim, InstanceState::Crashed, 9);
    wait_for("the replacement", || {
        let now = cell.instances();
        now.iter()
            .any(|i| i.id != victim && i.state == InstanceState::Running)
            && !now.iter().any(|i| i.id == victim)
    })
    .await;
    let (_, inst) = call(brain.api, "GET", "/v1/apps/web/instances?tenant=acme", None).await;
    let list = inst["instances"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{inst}");
    assert_eq!(list[0]["cell"], CELL, "{inst}");

    link.shutdown().await;
    brain.stop().await;
}

/// The brain's view of one cell (`GET /v1/cells`), once `pred` holds.
async fn cell_view(api: SocketAddr, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (_, cells) = call(api, "GET", "/v1/cells", None).await;
        let found = cells["cells"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["id"] == id).cloned())
            .unwrap_or(Value::Null);
        if pred(&found) {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for cell {id}: {cells}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_brain_replaces_the_instances_of_an_evacuating_cell_first() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let v = Validity::days_from(SystemTime::now(), 2);
    let c2 = corral_proto::CellId::new("c2").unwrap();
    certs::init(&certs, v, false).unwrap();
    certs::issue(&certs, &PeerIdentity::Brain(brain_id()), v, false).unwrap();
    for c in [cell_id(), c2.clone()] {
        certs::issue(&certs, &PeerIdentity::Cell(c), v, false).unwrap();
    }
    let brain = Brain::start(dir.path()).await;
    let mut links = Vec::new();
    let mut cells = Vec::new();
    for id in [cell_id(), c2.clone()] {
        let cell = FakeCell::new();
        let creds = Credentials::from_dir(&certs, &PeerIdentity::Cell(id.clone())).unwrap();
        let mut s = settings(brain.quic);
        s.tags = Default::default();
        s.cell = id;
        let link = cell_link::spawn(s, creds, cell.clone(), Arc::new(Metrics::new())).unwrap();
        wait_status(&link, |s| s.connected.is_some()).await;
        links.push(link);
        cells.push(cell);
    }
    for id in [CELL, "c2"] {
        cell_view(brain.api, id, |c| c["state"] == "connected").await;
    }
    let (status, body) = call(
        brain.api,
        "POST",
        "/v1/apps",
        Some(json!({
            "tenant": "acme", "name": "web", "instances": 4, "rootfs": "/rootfs",
            "command": ["/bin/sleep", "1000"], "resources": {"memory_mb": 64, "disk_mb": 64},
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    wait_for("four running", || {
        running(&cells[0]) + running(&cells[1]) == 4
    })
    .await;
    let had = running(&cells[0]);
    assert!(had > 0, "the first cell got none of the four");

    // c1 drains: its instances are started on c2 first, then stopped on c1;
    // four run throughout.
    cells[0].set_evacuating(true);
    cell_view(brain.api, CELL, |c| c["state"] == "draining").await;
    let deadline = Instant::now() + DEADLINE;
    while !cells[0].instances().is_empty() {
        assert!(
            running(&cells[0]) + running(&cells[1]) >= 4,
            "fewer than four running while draining"
        );
        assert!(Instant::now() < deadline, "c1 not drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    wait_for("four on c2", || running(&cells[1]) == 4).await;

    for link in links {
        link.shutdown().await;
    }
    brain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_brain_takes_a_cell_back_when_its_evacuation_is_cancelled() {
    capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let v = Validity::days_from(SystemTime::now(), 2);
    certs::init(&certs, v, false).unwrap();
    certs::issue(&certs, &PeerIdentity::Brain(brain_id()), v, false).unwrap();
    certs::issue(&certs, &PeerIdentity::Cell(cell_id()), v, false).unwrap();
    let brain = Brain::start(dir.path()).await;
    let cell = FakeCell::new();
    let creds = Credentials::from_dir(&certs, &PeerIdentity::Cell(cell_id())).unwrap();
    let link = cell_link::spawn(
        settings(brain.quic),
        creds,
        cell.clone(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    cell_view(brain.api, CELL, |c| c["state"] == "connected").await;
    cell.set_evacuating(true);
    cell_view(brain.api, CELL, |c| c["state"] == "draining").await;
    cell.set_evacuating(false);
    cell_view(brain.api, CELL, |c| c["state"] == "connected").await;
    link.shutdown().await;
    brain.stop().await;
}
