//! The running brain end to end without root: a real brain (store, API,
//! QUIC endpoint, loop) and simulated cells over real QUIC with real
//! certificates ([`corral_brain::sim`]), which run no containers but speak
//! the whole protocol. Apps are pushed through the real HTTP API.
//!
//! The same scenarios with real agents and containers run as root in
//! `tests/tests/brain.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::certs::{self, Validity};
use corral_brain::config::{Config, TlsFiles, Token, Tokens};
use corral_brain::sim::{self, Mark, SimCell, SimHandle};
use corral_brain::tls::Credentials;
use corral_brain::PeerIdentity;
use corral_proto::wire::{BrainId, Zone};
use corral_proto::{Capacity, CellId, InstanceState, TenantId};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ADMIN: &str = "admin-token-0123456789";
const ACME: &str = "acme-token-0123456789";
const GRACE_SECS: u64 = 2;
const WAIT: Duration = Duration::from_secs(30);

struct Brain {
    api: SocketAddr,
    quic: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Brain {
    async fn start(dir: &Path, quic: Option<SocketAddr>) -> Brain {
        Self::start_with(dir, quic, None).await
    }

    async fn start_with(dir: &Path, quic: Option<SocketAddr>, vip_range: Option<&str>) -> Brain {
        let config = Config {
            brain_id: BrainId::new("b1").unwrap(),
            data_dir: dir.join("data"),
            api_listen: Some("127.0.0.1:0".parse().unwrap()),
            quic_listen: quic.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap()),
            tls: TlsFiles {
                ca: dir.join("certs/ca.pem"),
                cert: dir.join("certs/brain-b1.pem"),
                key: dir.join("certs/brain-b1-key.pem"),
            },
            tokens: Tokens::new(
                Some(Token::new(ADMIN).unwrap()),
                vec![(Token::new(ACME).unwrap(), TenantId::new("acme").unwrap())],
            )
            .unwrap(),
            cell_lost_grace_secs: GRACE_SECS,
            vip_range: vip_range.map(|r| r.parse().unwrap()),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
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
        let bound = ready_rx.await.unwrap();
        Brain {
            api: bound.api.unwrap(),
            quic: bound.quic,
            stop: Some(stop_tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the brain stops")
            .unwrap();
    }
}

fn make_certs(dir: &Path, cells: &[&str]) -> PathBuf {
    let certs = dir.join("certs");
    let v = Validity::days_from(SystemTime::now(), 2);
    certs::init(&certs, v, false).unwrap();
    certs::issue(
        &certs,
        &PeerIdentity::Brain(BrainId::new("b1").unwrap()),
        v,
        false,
    )
    .unwrap();
    for c in cells {
        certs::issue(
            &certs,
            &PeerIdentity::Cell(CellId::new(*c).unwrap()),
            v,
            false,
        )
        .unwrap();
    }
    certs
}

fn cell(certs: &Path, id: &str, zone: &str, brain: SocketAddr, reconnect: Duration) -> SimHandle {
    let who = PeerIdentity::Cell(CellId::new(id).unwrap());
    let creds = Credentials::from_dir(certs, &who).unwrap();
    sim::spawn(sim_cell(id, zone), creds, brain, reconnect)
}

/// A simulated cell with an instance subnet: its instances have addresses.
fn networked_cell(certs: &Path, id: &str, subnet: &str, brain: SocketAddr) -> SimHandle {
    let who = PeerIdentity::Cell(CellId::new(id).unwrap());
    let creds = Credentials::from_dir(certs, &who).unwrap();
    sim::spawn_networked(
        sim_cell(id, "z1"),
        subnet.parse().unwrap(),
        creds,
        brain,
        Duration::from_millis(200),
    )
}

fn sim_cell(id: &str, zone: &str) -> SimCell {
    SimCell {
        id: CellId::new(id).unwrap(),
        zone: Zone::new(zone).unwrap(),
        tags: Default::default(),
        total: Capacity {
            memory_mb: 4096,
            disk_mb: 16_384,
            containers: 50,
        },
        start_delay: Duration::from_millis(50),
    }
}

/// One HTTP/1.1 request; returns the status and the JSON body.
async fn call(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: brain\r\nauthorization: Bearer {ADMIN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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

async fn push(api: SocketAddr, name: &str, instances: u32) {
    let (status, body) = call(
        api,
        "POST",
        "/v1/apps",
        Some(json!({
            "tenant": "acme", "name": name, "instances": instances, "rootfs": "/rootfs",
            "command": ["/bin/sleep", "1000"], "resources": {"memory_mb": 64, "disk_mb": 64},
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

async fn scale(api: SocketAddr, name: &str, instances: u32) {
    let (status, body) = call(
        api,
        "PATCH",
        &format!("/v1/apps/{name}?tenant=acme"),
        Some(json!({ "instances": instances })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Running instances per cell, as the cells themselves hold them.
fn running(cells: &[&SimHandle]) -> Vec<usize> {
    cells
        .iter()
        .map(|c| {
            c.instances()
                .values()
                .filter(|(_, s)| *s == InstanceState::Running)
                .count()
        })
        .collect()
}

async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Per-cell counts settle (equal for `settle`) before they are judged.
async fn settled(cells: &[&SimHandle], total: usize) -> Vec<usize> {
    let mut last = Vec::new();
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + WAIT;
    loop {
        let now = running(cells);
        let all_live: usize = cells.iter().map(|c| c.live()).sum();
        if now != last {
            last = now.clone();
            stable_since = Instant::now();
        } else if now.iter().sum::<usize>() == total
            && all_live == total
            && stable_since.elapsed() > Duration::from_millis(700)
        {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {total} running, have {now:?} ({all_live} live)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_spread_scale_heal_and_survive_a_brain_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), &["c1", "c2", "c3"]);
    let brain = Brain::start(dir.path(), None).await;
    let fast = Duration::from_millis(200);
    let c1 = cell(&certs, "c1", "z1", brain.quic, fast);
    let c2 = cell(&certs, "c2", "z2", brain.quic, fast);
    let c3 = cell(&certs, "c3", "z3", brain.quic, fast);
    let all = [&c1, &c2, &c3];
    c1.record_timeline();
    wait_for("three cells", || all.iter().all(|c| c.connected())).await;
    let (_, cells) = call(brain.api, "GET", "/v1/cells", None).await;
    assert_eq!(cells["cells"].as_array().unwrap().len(), 3, "{cells}");

    // Six instances spread evenly over three cells in three zones.
    push(brain.api, "web", 6).await;
    assert_eq!(settled(&all, 6).await, vec![2, 2, 2]);
    // The timeline (what `bench auction --quic --keep` writes) has each
    // step of c1's two starts, in order.
    let steps: Vec<(Mark, u32)> = c1.timeline().iter().map(|m| (m.mark, m.n)).collect();
    let count = |mark: Mark| -> u32 {
        steps
            .iter()
            .filter(|(m, _)| *m == mark)
            .map(|(_, n)| n)
            .sum()
    };
    // (An offer the brain gave up waiting for would be offered again.)
    for mark in [Mark::BidRequest, Mark::Bids] {
        assert!(count(mark) >= 2, "{mark:?} in {steps:?}");
    }
    for mark in [Mark::StartWork, Mark::Running, Mark::Delta] {
        assert_eq!(count(mark), 2, "{mark:?} in {steps:?}");
    }
    let first = |mark: Mark| steps.iter().position(|(m, _)| *m == mark).unwrap();
    assert!(first(Mark::BidRequest) < first(Mark::Bids), "{steps:?}");
    assert!(first(Mark::Bids) < first(Mark::StartWork), "{steps:?}");
    assert!(first(Mark::StartWork) < first(Mark::Running), "{steps:?}");
    assert!(first(Mark::Running) < first(Mark::Delta), "{steps:?}");
    let (_, inst) = call(brain.api, "GET", "/v1/apps/web/instances?tenant=acme", None).await;
    let list = inst["instances"].as_array().unwrap();
    assert_eq!(list.len(), 6, "{inst}");
    let mut indexes: Vec<u64> = list.iter().map(|i| i["index"].as_u64().unwrap()).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, vec![0, 1, 2, 3, 4, 5]);

    // Scale up and down.
    scale(brain.api, "web", 9).await;
    assert_eq!(settled(&all, 9).await, vec![3, 3, 3]);
    scale(brain.api, "web", 6).await;
    assert_eq!(settled(&all, 6).await.iter().sum::<usize>(), 6);

    // A crashed instance is replaced, and the crash is counted.
    let (victim, _) = c1
        .instances()
        .into_iter()
        .find(|(_, (_, s))| *s == InstanceState::Running)
        .unwrap();
    assert!(c1.crash(&victim, 137));
    wait_for("the crashed instance to be replaced and removed", || {
        !c1.instances().contains_key(&victim)
    })
    .await;
    assert_eq!(settled(&all, 6).await.iter().sum::<usize>(), 6);
    let metrics = metrics(brain.api).await;
    assert!(
        metrics.contains("corral_brain_instance_crashes_total 1"),
        "{metrics}"
    );

    // A brain restart restarts nothing and loses nothing.
    let before: Vec<(u64, u64)> = all.iter().map(|c| c.counts()).collect();
    let quic = brain.quic;
    brain.stop().await;
    let brain = Brain::start(dir.path(), Some(quic)).await;
    wait_for("cells to reconnect", || all.iter().all(|c| c.connected())).await;
    // Long enough for the lost-cell grace and a few convergence passes.
    tokio::time::sleep(Duration::from_secs(GRACE_SECS + 2)).await;
    assert_eq!(settled(&all, 6).await.iter().sum::<usize>(), 6);
    let after: Vec<(u64, u64)> = all.iter().map(|c| c.counts()).collect();
    assert_eq!(before, after, "no start or stop after a brain restart");
    let (_, app) = call(brain.api, "GET", "/v1/apps/web?tenant=acme", None).await;
    assert_eq!(app["instances"], 6, "{app}");

    // Drain a cell: its instances are replaced elsewhere, then stopped.
    c3.evacuate();
    wait_for("c3 to be emptied", || c3.live() == 0).await;
    let counts = settled(&all, 6).await;
    assert_eq!(counts, vec![3, 3, 0]);

    // Deleting the app stops everything.
    let (status, _) = call(brain.api, "DELETE", "/v1/apps/web?tenant=acme", None).await;
    assert_eq!(status, 200);
    wait_for("every instance to stop", || {
        all.iter().all(|c| c.instances().is_empty())
    })
    .await;
    brain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_cell_is_replaced_and_its_return_does_not_over_count() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), &["c1", "c2", "c3"]);
    let brain = Brain::start(dir.path(), None).await;
    let fast = Duration::from_millis(200);
    let c1 = cell(&certs, "c1", "z1", brain.quic, fast);
    let c2 = cell(&certs, "c2", "z2", brain.quic, fast);
    // c3 stays away for longer than the grace when it drops.
    let c3 = cell(
        &certs,
        "c3",
        "z3",
        brain.quic,
        Duration::from_secs(GRACE_SECS + 4),
    );
    let all = [&c1, &c2, &c3];
    wait_for("three cells", || all.iter().all(|c| c.connected())).await;
    push(brain.api, "web", 6).await;
    assert_eq!(settled(&all, 6).await, vec![2, 2, 2]);

    let lost_at = Instant::now();
    c3.disconnect();
    // Its two instances are started elsewhere once the grace is over (c3's
    // own copies keep running: it is only unreachable).
    wait_for("replacements on c1 and c2", || {
        running(&[&c1, &c2]).iter().sum::<usize>() == 6
    })
    .await;
    let healed = lost_at.elapsed();
    assert!(
        healed >= Duration::from_secs(GRACE_SECS),
        "replaced before the grace: {healed:?}"
    );
    // It comes back with its stale copies: they are stopped, nothing else.
    wait_for("c3 to come back", || c3.connected()).await;
    wait_for("c3's stale copies to stop", || c3.live() == 0).await;
    assert_eq!(settled(&all, 6).await, vec![3, 3, 0]);
    let (_, cells) = call(brain.api, "GET", "/v1/cells", None).await;
    let states: Vec<&str> = cells["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["connected"; 3], "{cells}");
    brain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_from_another_ca_is_refused_and_an_unplaceable_app_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), &["c1"]);
    let other = tempfile::tempdir().unwrap();
    let other_certs = make_certs(other.path(), &["c9"]);
    let brain = Brain::start(dir.path(), None).await;
    let c1 = cell(&certs, "c1", "z1", brain.quic, Duration::from_millis(200));
    let rogue = cell(
        &other_certs,
        "c9",
        "z1",
        brain.quic,
        Duration::from_millis(200),
    );
    wait_for("c1", || c1.connected()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!rogue.connected(), "a cell from another CA must be refused");
    let (_, cells) = call(brain.api, "GET", "/v1/cells", None).await;
    let ids: Vec<&str> = cells["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["c1"]);

    // Too big for any cell: nothing starts, the failure is counted by reason.
    let (status, body) = call(
        brain.api,
        "POST",
        "/v1/apps",
        Some(json!({
            "tenant": "acme", "name": "huge", "instances": 1, "rootfs": "/rootfs",
            "command": ["/bin/true"], "resources": {"memory_mb": 999_999},
        })),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = metrics(brain.api).await;
        if m.contains("corral_brain_placement_failures_total{reason=\"memory\"}") {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(c1.instances().is_empty());
    // The app says why, through the API.
    let (_, inst) = call(
        brain.api,
        "GET",
        "/v1/apps/huge/instances?tenant=acme",
        None,
    )
    .await;
    let reason = inst["unplaced"][0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("no cell has 999999 MB free: largest free is 4096 MB on c1"),
        "{inst}"
    );
    rogue.kill();
    brain.stop().await;
}

async fn metrics(api: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(api).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: b\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_learns_each_apps_service_whole_on_connect_then_by_difference() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path(), &["c1", "c2", "c3"]);
    let brain = Brain::start_with(dir.path(), None, Some("10.96.0.0/24")).await;
    let c1 = networked_cell(&certs, "c1", "10.244.1.0/24", brain.quic);
    let c2 = networked_cell(&certs, "c2", "10.244.2.0/24", brain.quic);
    wait_for("two cells", || c1.connected() && c2.connected()).await;
    let (status, app) = call(
        brain.api,
        "POST",
        "/v1/apps",
        Some(json!({
            "tenant": "acme", "name": "web", "instances": 2, "rootfs": "/rootfs",
            "command": ["/bin/sleep", "1000"], "resources": {"memory_mb": 64},
            "ports": [8080, {"port": 53, "protocol": "udp"}],
        })),
    )
    .await;
    assert_eq!(status, 201, "{app}");
    assert_eq!(app["vip"], "10.96.0.1");
    let vip: std::net::Ipv4Addr = "10.96.0.1".parse().unwrap();
    let backends = |c: &SimHandle| c.services().get(&vip).map_or(0, |s| s.backends.len());
    wait_for("two backends on both cells", || {
        backends(&c1) == 2 && backends(&c2) == 2
    })
    .await;
    let told = c1.services()[&vip].clone();
    assert_eq!((told.tenant.as_str(), told.app.as_str()), ("acme", "web"));
    assert_eq!(told.ports.len(), 2);
    let mut addresses: Vec<_> = c1.addresses().into_values().collect();
    addresses.extend(c2.addresses().into_values());
    addresses.sort();
    assert_eq!(told.backends, addresses, "the instances' own addresses");
    for c in [&c1, &c2] {
        let first = &c.services_messages()[0];
        assert!(first.reset, "a connection starts with the whole set");
    }

    // Scaling up: an upsert of the whole service, not a new reset.
    scale(brain.api, "web", 4).await;
    wait_for("four backends", || backends(&c1) == 4 && backends(&c2) == 4).await;
    let msgs = c1.services_messages();
    let last = msgs.last().unwrap();
    assert!(!last.reset && last.remove.is_empty(), "{last:?}");
    assert_eq!(last.upsert[0].backends.len(), 4);
    assert!(msgs[1..].iter().all(|m| !m.reset), "{msgs:?}");
    let m = metrics(brain.api).await;
    assert!(m.contains("corral_brain_services 1"), "{m}");
    assert!(m.contains("corral_brain_service_backends 4"), "{m}");
    assert!(m.contains("corral_brain_vips_free 253"), "{m}");

    // A cell that connects later gets the whole set at once.
    let c3 = networked_cell(&certs, "c3", "10.244.3.0/24", brain.quic);
    wait_for("c3 to learn the service", || backends(&c3) == 4).await;
    let first = &c3.services_messages()[0];
    assert!(first.reset && first.upsert.len() == 1, "{first:?}");

    // Deleting the app removes its service everywhere.
    let (status, _) = call(brain.api, "DELETE", "/v1/apps/web?tenant=acme", None).await;
    assert_eq!(status, 200);
    wait_for("the service to be removed", || {
        [&c1, &c2, &c3].iter().all(|c| c.services().is_empty())
    })
    .await;
    let last = c2.services_messages().last().cloned().unwrap();
    assert_eq!(last.remove, vec![vip], "{last:?}");
    c3.kill();
    brain.stop().await;
}
