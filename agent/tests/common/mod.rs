//! Helpers shared by the brain link's tests.
#![allow(dead_code)] // each test crate uses its own subset

use corral_agent::cell_link::{CellRuntime, LinkHandle, LinkSettings, LinkStatus};
use corral_agent::config::BrainAddress;
use corral_proto::wire::{AckOutcome, BrainId, Ipv4Net, Refusal, Tag, Zone};
use corral_proto::{
    Capacity, CellId, InstanceId, InstanceInfo, InstanceSpec, InstanceState, Status, Timestamp,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::watch;

pub const DEADLINE: Duration = Duration::from_secs(10);
pub const CELL: &str = "c1";
pub const TOTAL: Capacity = Capacity {
    memory_mb: 1024,
    disk_mb: 4096,
    containers: 10,
};

pub async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f)
        .await
        .expect("test step timed out")
}

// ---- logs ----------------------------------------------------------------

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every test's logs, in one buffer (tests tell theirs apart by port).
pub fn capture_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        tracing_subscriber::fmt()
            .with_env_filter("info,corral_agent=debug")
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
    });
}

pub fn logs() -> String {
    String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned()
}

// ---- the cell ----------------------------------------------------------------

pub fn cell_id() -> CellId {
    CellId::new(CELL).unwrap()
}

pub fn brain_id() -> BrainId {
    BrainId::new("b1").unwrap()
}

pub fn tags(t: &[&str]) -> BTreeSet<Tag> {
    t.iter().map(|t| Tag::new(*t).unwrap()).collect()
}

pub fn settings(addr: SocketAddr) -> LinkSettings {
    LinkSettings {
        addresses: vec![BrainAddress::Socket(addr)],
        brain_id: Some(brain_id()),
        cell: cell_id(),
        zone: Zone::new("z1").unwrap(),
        tags: tags(&["ssd"]),
        subnet: Some("10.244.1.0/24".parse::<Ipv4Net>().unwrap()),
        backoff_initial: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        hello_timeout: Duration::from_secs(5),
    }
}

pub fn spec(rootfs: &Path, memory_mb: u64) -> InstanceSpec {
    let mut s: InstanceSpec = serde_json::from_value(serde_json::json!({
        "tenant": "t1", "app": "web", "kind": "lrp",
        "rootfs": rootfs.to_str().unwrap(),
        "command": ["/bin/server"],
        "resources": {"memory_mb": 64, "disk_mb": 128},
    }))
    .unwrap();
    s.resources.memory_mb = memory_mb;
    s
}

pub async fn wait_status(link: &LinkHandle, pred: impl Fn(&LinkStatus) -> bool) -> LinkStatus {
    let mut rx = link.status();
    let status = within(rx.wait_for(|s| pred(s))).await.unwrap().clone();
    status
}

// ---- a fake runtime -------------------------------------------------------------

/// Instances that "run" as soon as they are admitted, a moment later.
pub struct FakeCell {
    table: Mutex<BTreeMap<InstanceId, (InstanceSpec, InstanceInfo)>>,
    evacuating: AtomicBool,
    changes: watch::Sender<()>,
}

impl FakeCell {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            table: Mutex::new(BTreeMap::new()),
            evacuating: AtomicBool::new(false),
            changes: watch::Sender::new(()),
        })
    }

    /// Starts or cancels evacuation, as `POST`/`DELETE /v1/evacuate` do.
    pub fn set_evacuating(&self, on: bool) {
        self.evacuating.store(on, Ordering::SeqCst);
        self.changes.send_replace(());
    }

    pub fn set_state(&self, id: &InstanceId, state: InstanceState, at: u64) {
        let mut t = self.table.lock().unwrap();
        let Some((_, info)) = t.get_mut(id) else {
            return;
        };
        info.state = state;
        match state {
            InstanceState::Running => info.started_at = Some(Timestamp(at)),
            InstanceState::Crashed => {
                info.finished_at = Some(Timestamp(at));
                info.exit_code = Some(3);
                info.reason = Some("long-running process exited with code 3".into());
            }
            _ => {}
        }
        drop(t);
        self.changes.send_replace(());
    }
}

impl CellRuntime for FakeCell {
    fn total(&self) -> Capacity {
        TOTAL
    }

    fn available(&self) -> Capacity {
        let t = self.table.lock().unwrap();
        Capacity::available(TOTAL, t.values().map(|(s, i)| (s, i.state)))
    }

    fn instances(&self) -> Vec<InstanceInfo> {
        let t = self.table.lock().unwrap();
        t.values().map(|(_, i)| i.clone()).collect()
    }

    fn evacuating(&self) -> bool {
        self.evacuating.load(Ordering::SeqCst)
    }

    fn changes(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    /// Every root filesystem is "there".
    fn rootfs_available(&self, _: &Path) -> bool {
        true
    }

    async fn start(self: Arc<Self>, id: InstanceId, spec: InstanceSpec) -> AckOutcome {
        {
            let mut t = self.table.lock().unwrap();
            if let Some((existing, _)) = t.get(&id) {
                return if *existing == spec {
                    AckOutcome::Done
                } else {
                    AckOutcome::Refused(Refusal::Duplicate { id })
                };
            }
            if self.evacuating() {
                return AckOutcome::Refused(Refusal::Evacuating);
            }
            let info = InstanceInfo::new(&id, &spec, &Status::new());
            t.insert(id.clone(), (spec, info));
        }
        self.changes.send_replace(());
        let this = Arc::clone(&self);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            this.set_state(&id, InstanceState::Running, 5);
        });
        AckOutcome::Done
    }

    async fn stop(self: Arc<Self>, id: InstanceId, _grace: Duration) -> AckOutcome {
        if self.table.lock().unwrap().remove(&id).is_some() {
            self.changes.send_replace(());
        }
        AckOutcome::Done
    }
}
