//! The agent's side of instances: admits them against capacity, launches a
//! shim per instance, watches shims through pidfds, stops and removes
//! instances, and re-adopts running ones after an agent restart.
//!
//! The agent never calls libcontainer itself: creation happens in the shim and
//! clean-up of an instance whose shim died in `corral-agent cleanup`, both
//! single-threaded processes.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::network::ipam::Ipam;
use crate::network::plane::Plane;
use crate::network::services::Lb;
use crate::network::{Attachment, Network};
use crate::paths::{InstancePaths, Layout};
use crate::shim::{self, Launch, Record, StartReport};
use crate::sys;
use corral_proto::health::{Change, CheckKind, HealthCheck, Readiness};
use corral_proto::{
    AppId, Capacity, CapacityError, Event, InstanceId, InstanceInfo, InstanceSpec, InstanceState,
    SpecError, Status, TenantId, Timestamp,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;
use tracing::Instrument;

/// How long a shim may take to report that its container started.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent adopting its instances waits for a shim that holds its
/// lock to write its first record (its first step after taking the lock).
const LAUNCH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    BadSpec(#[from] SpecError),
    #[error("{0}")]
    BadRootfs(String),
    #[error("instance {id} already exists with a different spec; delete it first")]
    Conflict { id: InstanceId },
    #[error("instance does not fit on this cell: {0}")]
    NoCapacity(#[from] CapacityError),
    #[error("instance {id} is being deleted; retry once it is gone")]
    Deleting { id: InstanceId },
    #[error(
        "the cell is evacuating and takes no new instances \
         (cancel with `corral cell undrain` or DELETE /v1/evacuate)"
    )]
    Evacuating,
    #[error("no instance {0}")]
    NotFound(InstanceId),
    #[error("instance {id} did not stop within {secs} s (shim pid {pid})")]
    StopTimeout { id: InstanceId, secs: u64, pid: u32 },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ExecError {
    let what = what.into();
    move |source| ExecError::Io { what, source }
}

struct Entry {
    spec: InstanceSpec,
    status: watch::Sender<Status>,
    /// The shim's pid and start time, once known.
    shim: Option<(u32, u64)>,
    init: Option<(u32, u64)>,
    /// Final figures recorded by the shim.
    cpu_ns: Option<u64>,
    oom_kills: u64,
    deleting: bool,
    /// The instance's address while its network is attached.
    address: Option<Ipv4Addr>,
    /// Results of its readiness check so far (see [`crate::health`]).
    readiness: Readiness,
}

impl Entry {
    fn new(spec: InstanceSpec, status: watch::Sender<Status>) -> Self {
        Self {
            spec,
            status,
            shim: None,
            init: None,
            cpu_ns: None,
            oom_kills: 0,
            deleting: false,
            address: None,
            readiness: Readiness::default(),
        }
    }

    fn info(&self, id: &InstanceId) -> InstanceInfo {
        let mut i = InstanceInfo::new(id, &self.spec, &self.status.borrow());
        i.address = self.address;
        // Without a check, running is ready; with one, it must also pass.
        i.ready = i.state == InstanceState::Running
            && (self.spec.health_check.is_none() || self.readiness.ready);
        // The shim saw a SIGKILL; the reason it was sent is the agent's.
        if let (InstanceState::Crashed, Some(why)) = (i.state, &self.readiness.killed) {
            i.reason = Some(why.clone());
        }
        i
    }
}

/// The cell network, when a subnet is configured.
struct NetState {
    network: Network,
    ipam: Mutex<Ipam>,
    /// The eBPF data plane, when enabled.
    plane: Option<Plane>,
    /// The service load balancer, with the data plane.
    lb: Option<Lb>,
}

/// A read-only view of one instance for the API and metrics.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub info: InstanceInfo,
    pub paths: InstancePaths,
    pub final_cpu_ns: Option<u64>,
    pub final_oom_kills: u64,
}

pub struct Executor {
    cfg: Config,
    layout: Layout,
    cgroup2_root: Option<PathBuf>,
    disk_quota: bool,
    exe: PathBuf,
    table: Mutex<BTreeMap<InstanceId, Entry>>,
    metrics: Arc<Metrics>,
    net: Option<NetState>,
    /// Since when the cell is evacuating (draining), if it is; mirrored by
    /// the file [`Layout::evacuation`].
    evacuation: Mutex<Option<Timestamp>>,
    /// Ticks whenever anything an [`InstanceInfo`] shows changes: an entry
    /// added or removed, its status or its address; and when the cell
    /// starts or stops evacuating. A `watch` keeps only
    /// "something changed since you last looked", so a slow reader misses
    /// nothing: it re-reads the table. Every such change below calls
    /// [`changed`](Self::changed).
    changes: watch::Sender<()>,
}

/// What [`Executor::admit`] decided.
enum Admission {
    /// The same spec is already there.
    Exists(InstanceInfo),
    /// A new entry, starting, with its status channel, to be launched.
    New(watch::Sender<Status>, InstancePaths),
}

impl Executor {
    pub fn new(
        cfg: Config,
        exe: PathBuf,
        metrics: Arc<Metrics>,
        network: Option<(Network, Option<Plane>)>,
        lb: Option<Lb>,
    ) -> Arc<Self> {
        let net = network
            .zip(cfg.subnet)
            .map(|((network, plane), subnet)| NetState {
                network,
                ipam: Mutex::new(Ipam::new(subnet)),
                plane,
                lb,
            });
        let layout = Layout {
            data_dir: cfg.data_dir.clone(),
            run_dir: cfg.run_dir.clone(),
            layers_dir: cfg.layers_dir.clone(),
            cgroup_root: cfg.cgroup_root.clone(),
        };
        let disk_quota = cfg.disk_enforce;
        let cgroup2_root = Path::new(crate::paths::CGROUP2_HYBRID)
            .join("cgroup.procs")
            .exists()
            .then(|| layout.cgroup2_root());
        Arc::new(Self {
            cfg,
            layout,
            cgroup2_root,
            disk_quota,
            exe,
            table: Mutex::new(BTreeMap::new()),
            metrics,
            net,
            evacuation: Mutex::new(None),
            changes: watch::Sender::new(()),
        })
    }

    /// Subscribes to changes of the table (see the field's docs). The
    /// receiver starts with the current state seen: it fires on the next
    /// change.
    pub fn changes(&self) -> watch::Receiver<()> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_replace(());
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The eBPF data plane, when the cell network has one.
    pub fn plane(&self) -> Option<&Plane> {
        self.net.as_ref().and_then(|n| n.plane.as_ref())
    }

    /// The service load balancer, when the data plane has one.
    pub fn lb(&self) -> Option<&Lb> {
        self.net.as_ref().and_then(|n| n.lb.as_ref())
    }

    /// Applies the brain's routes, endpoint map or policies (see
    /// [`crate::cell_link::CellRuntime::network`]). `Ok(None)`: nothing to
    /// do here (no cell network, or no data plane for endpoints and
    /// policies); `Ok(Some(summary))`: what changed.
    pub async fn apply_network(
        &self,
        update: corral_proto::wire::Message,
    ) -> Result<Option<String>, String> {
        let Some(net) = self.net.as_ref() else {
            return Ok(None);
        };
        match update {
            corral_proto::wire::Message::Routes(r) => {
                let own = self.config().subnet;
                let mut want = Vec::new();
                for route in &r.routes {
                    let subnet = (route.subnet.addr(), route.subnet.prefix());
                    let std::net::IpAddr::V4(via) = route.via else {
                        tracing::warn!(cell = %route.cell, via = %route.via, "skipping a route via an IPv6 address: instance networking is IPv4");
                        continue;
                    };
                    let overlaps = own.is_some_and(|o| {
                        route.subnet.contains(o.network()) || o.contains(route.subnet.addr())
                    });
                    if overlaps {
                        tracing::error!(cell = %route.cell, subnet = %route.subnet, "the brain routes a subnet that overlaps this cell's: skipped");
                        continue;
                    }
                    want.push((subnet, via));
                }
                let (added, removed) = net
                    .network
                    .sync_routes(&want)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(lb) = net.lb.as_ref() {
                    let peers: Vec<Ipv4Addr> = want.iter().map(|(_, via)| *via).collect();
                    lb.set_peers(&peers)?;
                }
                Ok((added + removed > 0).then(|| {
                    format!(
                        "{} routes to other cells ({added} added, {removed} removed)",
                        want.len()
                    )
                }))
            }
            corral_proto::wire::Message::Endpoints(e) => {
                let Some(plane) = net.plane.as_ref() else {
                    return Ok(None);
                };
                let (written, removed) = plane
                    .apply_endpoints(&e, &self.config().cell_id)
                    .map_err(|e| e.to_string())?;
                Ok((written + removed > 0 || e.reset)
                    .then(|| format!("{written} remote endpoints written, {removed} removed")))
            }
            corral_proto::wire::Message::Policies(p) => {
                let Some(plane) = net.plane.as_ref() else {
                    return Ok(None);
                };
                let (added, removed) = plane
                    .replace_policies(&p.policies)
                    .map_err(|e| e.to_string())?;
                Ok((added + removed > 0).then(|| {
                    format!(
                        "{} policies ({added} added, {removed} removed)",
                        p.policies.len()
                    )
                }))
            }
            corral_proto::wire::Message::Services(update) => {
                let Some(lb) = net.lb.as_ref() else {
                    return Ok(None);
                };
                let applied = lb.apply(&update)?;
                for r in &applied.refused {
                    tracing::error!("service not programmed: {r}");
                }
                self.metrics.services_refused(applied.refused.len() as u64);
                Ok((applied.ops > 0 || !applied.refused.is_empty()).then(|| {
                    let (services, backends) = lb.counts();
                    format!(
                        "{} load-balancer map writes; {services} service ports, {backends} backends; {} refused",
                        applied.ops,
                        applied.refused.len()
                    )
                }))
            }
            _ => Ok(None),
        }
    }

    /// Whether instances' disk limits are enforced (a filesystem each).
    pub fn disk_quota(&self) -> bool {
        self.disk_quota
    }

    pub fn cgroup2_root(&self) -> Option<&Path> {
        self.cgroup2_root.as_deref()
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<InstanceId, Entry>> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn snapshot(&self) -> Vec<Snapshot> {
        self.table()
            .iter()
            .map(|(id, e)| Snapshot {
                info: e.info(id),
                paths: self.layout.instance(id),
                final_cpu_ns: e.cpu_ns,
                final_oom_kills: e.oom_kills,
            })
            .collect()
    }

    /// What the readiness checker should check now: every running
    /// instance with an address and a tcp or http check.
    pub fn checks(&self) -> Vec<(InstanceId, Ipv4Addr, HealthCheck)> {
        self.table()
            .iter()
            .filter(|(_, e)| e.status.borrow().state == InstanceState::Running && !e.deleting)
            .filter_map(|(id, e)| {
                let c = e.spec.health_check.as_ref()?;
                (c.kind != CheckKind::Process).then_some((id.clone(), e.address?, c.clone()))
            })
            .collect()
    }

    /// The span of every log line about instance `id`: its id, app and
    /// tenant (only the id once it has left the table).
    pub fn span(&self, id: &InstanceId) -> tracing::Span {
        match self.table().get(id) {
            Some(e) => {
                tracing::info_span!("instance", id = %id, app = %e.spec.app, tenant = %e.spec.tenant)
            }
            None => tracing::info_span!("instance", id = %id),
        }
    }

    /// Records one readiness check result of `id`; an instance its check
    /// condemns (see [`corral_proto::health`]) is killed, so that it
    /// crashes and goes down the crash path.
    pub fn record_check(&self, id: &InstanceId, passed: bool) {
        let (change, init) = {
            let mut t = self.table();
            let Some(e) = t.get_mut(id) else { return };
            let Some(check) = e.spec.health_check.clone() else {
                return;
            };
            let running_ms = e.status.borrow().started_at.map_or(0, |s| {
                shim::now().nanos().saturating_sub(s.nanos()) / 1_000_000
            });
            (e.readiness.record(passed, &check, running_ms), e.init)
        };
        match change {
            Change::None => return,
            Change::Readiness => {
                let ready = self.get(id).is_some_and(|i| i.ready);
                self.span(id)
                    .in_scope(|| tracing::info!(ready, "readiness changed"));
            }
            Change::Kill(why) => {
                let span = self.span(id);
                let _in = span.enter();
                tracing::warn!("killing the instance: {why}");
                let killed = init.is_some_and(|(pid, start)| {
                    matches!(sys::pidfd_for(pid, start), Ok(Some(fd)) if sys::pidfd_signal(&fd, libc::SIGKILL).unwrap_or(false))
                });
                if !killed {
                    tracing::warn!("its process was already gone");
                }
            }
        }
        self.changed();
    }

    pub fn get(&self, id: &InstanceId) -> Option<InstanceInfo> {
        self.table().get(id).map(|e| e.info(id))
    }

    pub fn paths(&self, id: &InstanceId) -> InstancePaths {
        self.layout.instance(id)
    }

    /// Subscribes to an instance's status changes.
    pub fn watch(&self, id: &InstanceId) -> Option<watch::Receiver<Status>> {
        self.table().get(id).map(|e| e.status.subscribe())
    }

    pub fn total(&self) -> Capacity {
        self.cfg.capacity
    }

    /// Since when the cell is evacuating, or `None` when it takes work.
    pub fn evacuating(&self) -> Option<Timestamp> {
        *lock(&self.evacuation)
    }

    /// Starts (`true`) or cancels evacuation; returns whether that changed
    /// anything. The file is written (or removed) first, so the state the
    /// API reports is the one a restarted agent comes back with.
    pub fn set_evacuating(&self, on: bool) -> Result<bool, ExecError> {
        let path = self.layout.evacuation();
        let mut cur = lock(&self.evacuation);
        if cur.is_some() == on {
            return Ok(false);
        }
        if on {
            let since = shim::now();
            let body = serde_json::to_vec(&Evacuation { since })
                .map_err(|e| io("encoding the evacuation marker")(std::io::Error::other(e)))?;
            write_atomic(&path, &body).map_err(io(format!("writing {}", path.display())))?;
            *cur = Some(since);
            tracing::info!("cell evacuating: no new work; the brain moves its instances away");
        } else {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("removing {}", path.display()))(e)),
            }
            *cur = None;
            tracing::info!("cell evacuation cancelled: taking new work again");
        }
        drop(cur);
        self.changed();
        Ok(true)
    }

    /// Reads the evacuation marker left by an earlier run. A marker that
    /// does not parse still means "evacuating" (since now): draining by
    /// mistake is safer than taking work by mistake.
    fn restore_evacuation(&self) {
        let path = self.layout.evacuation();
        let since = match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!("reading {}: {e}; the cell stays evacuating", path.display());
                shim::now()
            }
            Ok(b) => match serde_json::from_slice::<Evacuation>(&b) {
                Ok(ev) => ev.since,
                Err(e) => {
                    tracing::error!("{}: {e}; the cell stays evacuating", path.display());
                    shim::now()
                }
            },
        };
        tracing::warn!(%since, "the cell is evacuating (from an earlier run): it takes no new work until cancelled");
        *lock(&self.evacuation) = Some(since);
        self.changed();
    }

    /// LRP instances that have not ended (starting, running or stopping):
    /// what an evacuation waits for.
    pub fn live_lrps(&self) -> usize {
        self.table()
            .values()
            .filter(|e| {
                e.spec.kind == corral_proto::InstanceKind::Lrp
                    && !e.status.borrow().state.is_final()
            })
            .count()
    }

    pub fn available(&self) -> Capacity {
        let t = self.table();
        let states: Vec<(&InstanceSpec, InstanceState)> = t
            .values()
            .map(|e| (&e.spec, e.status.borrow().state))
            .collect();
        Capacity::available(self.cfg.capacity, states)
    }

    /// Creates and starts an instance; returns whether it was created (false:
    /// the same spec already existed) and its state once the start is decided.
    pub async fn put(
        self: &Arc<Self>,
        id: InstanceId,
        spec: InstanceSpec,
    ) -> Result<(bool, InstanceInfo), ExecError> {
        let span =
            tracing::info_span!("instance", id = %id, app = %spec.app, tenant = %spec.tenant);
        async move {
            match self.admit(&id, &spec)? {
                Admission::Exists(info) => Ok((false, info)),
                Admission::New(tx, paths) => self.start_admitted(id, spec, tx, paths).await,
            }
        }
        .instrument(span)
        .await
    }

    /// Like [`put`](Self::put), but returns as soon as the instance is
    /// admitted (`true`) or found already there with the same spec
    /// (`false`); the start goes on in the background and is seen through
    /// [`changes`](Self::changes). For the brain, whose `StartWork` is
    /// acknowledged on admission, not after the start.
    pub fn start_detached(
        self: &Arc<Self>,
        id: InstanceId,
        spec: InstanceSpec,
    ) -> Result<bool, ExecError> {
        let span =
            tracing::info_span!("instance", id = %id, app = %spec.app, tenant = %spec.tenant);
        match span.in_scope(|| self.admit(&id, &spec))? {
            Admission::Exists(_) => Ok(false),
            Admission::New(tx, paths) => {
                let this = Arc::clone(self);
                tokio::spawn(
                    async move {
                        // Failures after admission end as a crashed
                        // instance; only I/O errors that undo the
                        // admission land here.
                        if let Err(e) = this.start_admitted(id, spec, tx, paths).await {
                            tracing::error!("instance start failed: {e}");
                        }
                    }
                    .instrument(span),
                );
                Ok(true)
            }
        }
    }

    /// Checks a start request and, when it is new and fits, enters it in
    /// the table as starting (so capacity is held from here on).
    fn admit(&self, id: &InstanceId, spec: &InstanceSpec) -> Result<Admission, ExecError> {
        spec.validate()?;
        check_rootfs(spec)?;
        let mut t = self.table();
        if let Some(e) = t.get(id) {
            return if e.deleting {
                Err(ExecError::Deleting { id: id.clone() })
            } else if e.spec == *spec {
                Ok(Admission::Exists(e.info(id)))
            } else {
                Err(ExecError::Conflict { id: id.clone() })
            };
        }
        // After the look-up: a repeated start of what already runs here is
        // still answered as done.
        if self.evacuating().is_some() {
            return Err(ExecError::Evacuating);
        }
        let states: Vec<(&InstanceSpec, InstanceState)> = t
            .values()
            .map(|e| (&e.spec, e.status.borrow().state))
            .collect();
        let avail = Capacity::available(self.cfg.capacity, states);
        Capacity::check_fit(self.cfg.capacity, avail, Capacity::of(spec))?;
        let (tx, _) = watch::channel(Status::new());
        t.insert(id.clone(), Entry::new(spec.clone(), tx.clone()));
        drop(t);
        self.changed();
        Ok(Admission::New(tx, self.layout.instance(id)))
    }

    /// Prepares, wires and launches an admitted instance; returns once its
    /// start is decided.
    async fn start_admitted(
        self: &Arc<Self>,
        id: InstanceId,
        spec: InstanceSpec,
        tx: watch::Sender<Status>,
        paths: InstancePaths,
    ) -> Result<(bool, InstanceInfo), ExecError> {
        let started = Instant::now();
        if let Err(e) = self.prepare(&spec, &paths) {
            self.table().remove(&id);
            self.changed();
            let _ = std::fs::remove_dir_all(&paths.data);
            let _ = std::fs::remove_dir_all(&paths.run);
            return Err(e);
        }
        let netns = match self
            .attach_network(&id, &spec.tenant, &spec.app, &paths)
            .await
        {
            Ok(n) => n,
            Err(reason) => {
                tracing::warn!(%reason, "instance network set-up failed");
                let _ = std::fs::remove_file(paths.launch());
                tx.send_modify(|s| {
                    let _ = s.apply(
                        spec.kind,
                        Event::StartFailed {
                            reason,
                            at: shim::now(),
                        },
                    );
                });
                self.changed();
                self.persist_status(&id);
                self.count_end(&id);
                let info = self
                    .get(&id)
                    .ok_or_else(|| ExecError::NotFound(id.clone()))?;
                return Ok((true, info));
            }
        };
        if let Err(e) = self.write_launch(&id, &spec, &paths, netns) {
            self.release_network(&id).await;
            self.table().remove(&id);
            self.changed();
            let _ = std::fs::remove_dir_all(&paths.data);
            let _ = std::fs::remove_dir_all(&paths.run);
            return Err(e);
        }
        let report = self.launch(&paths).await;
        match report {
            Ok(StartReport::Running {
                pid,
                shim_pid,
                shim_start,
            }) => {
                self.metrics
                    .start_latency
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(pid, shim_pid, "instance running");
                let init_start = sys::start_time(pid).unwrap_or(0);
                if let Some(e) = self.table().get_mut(&id) {
                    e.shim = Some((shim_pid, shim_start));
                    e.init = Some((pid, init_start));
                }
                self.refresh_from_record(&id, &paths);
                self.spawn_watcher(id.clone(), shim_pid, shim_start);
            }
            Ok(StartReport::Failed { reason, .. }) => {
                tracing::warn!(%reason, "instance failed to start");
                self.refresh_from_record(&id, &paths);
                let still_starting = tx.borrow().state == InstanceState::Starting;
                if still_starting {
                    tx.send_modify(|s| {
                        let _ = s.apply(
                            spec.kind,
                            Event::StartFailed {
                                reason,
                                at: shim::now(),
                            },
                        );
                    });
                    self.changed();
                }
                self.release_network(&id).await;
                self.count_end(&id);
            }
            Err(reason) => {
                tracing::error!(%reason, "shim did not report");
                self.refresh_from_record(&id, &paths);
                self.start_unreported(&id, &paths, reason).await;
            }
        }
        let info = self
            .get(&id)
            .ok_or_else(|| ExecError::NotFound(id.clone()))?;
        Ok((true, info))
    }

    fn prepare(&self, spec: &InstanceSpec, p: &InstancePaths) -> Result<(), ExecError> {
        std::fs::create_dir_all(&p.data).map_err(io(format!("creating {}", p.data.display())))?;
        std::fs::create_dir_all(&p.run).map_err(io(format!("creating {}", p.run.display())))?;
        let spec_json = serde_json::to_vec_pretty(spec)
            .map_err(|e| io("encoding spec")(std::io::Error::other(e)))?;
        write_atomic(&p.spec(), &spec_json).map_err(io("writing spec.json"))?;
        Ok(())
    }

    fn write_launch(
        &self,
        id: &InstanceId,
        spec: &InstanceSpec,
        p: &InstancePaths,
        netns: Option<PathBuf>,
    ) -> Result<(), ExecError> {
        // Written at start-up (`adopt`); again if the run directory lost it.
        let mut init = crate::init::path(&self.layout.run_dir);
        if !init.exists() {
            init = self.install_init()?;
        }
        let launch = Launch {
            id: id.clone(),
            spec: spec.clone(),
            paths: p.clone(),
            stop_grace_secs: self.cfg.stop_grace_secs,
            log_max_bytes: self.cfg.log_max_bytes,
            log_keep: self.cfg.log_keep,
            cgroup2_root: self.cgroup2_root.clone(),
            disk_quota: self.disk_quota,
            netns,
            issued_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
            init: Some(init),
        };
        let launch_json = serde_json::to_vec_pretty(&launch)
            .map_err(|e| io("encoding launch")(std::io::Error::other(e)))?;
        write_atomic(&p.launch(), &launch_json).map_err(io("writing launch.json"))
    }

    async fn launch(&self, p: &InstancePaths) -> Result<StartReport, String> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("shim")
            .arg(p.launch())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot run the shim {}: {e}", self.exe.display()))?;
        let stdout = child.stdout.take().ok_or("shim has no stdout")?;
        // The first process forks the real shim and exits at once.
        let _ = child.wait().await;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Err(_) => Err(format!(
                "the shim did not report within {} s",
                START_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(format!("reading the shim's report: {e}")),
            Ok(Ok(None)) => Err("the shim exited without reporting".into()),
            Ok(Ok(Some(line))) => {
                serde_json::from_str(&line).map_err(|e| format!("bad shim report {line:?}: {e}"))
            }
        }
    }

    /// Copies the shim's record (status, final figures) into the table.
    fn refresh_from_record(&self, id: &InstanceId, p: &InstancePaths) -> Option<Record> {
        let rec = shim::read_record(&p.record()).ok()?;
        self.apply_record(id, &rec);
        Some(rec)
    }

    fn apply_record(&self, id: &InstanceId, rec: &Record) {
        if let Some(e) = self.table().get_mut(id) {
            e.cpu_ns = rec.cpu_ns;
            e.oom_kills = rec.oom_kills;
            if e.init.is_none() {
                e.init = rec.init_pid.zip(rec.init_start);
            }
            e.status.send_replace(rec.status.clone());
            self.changed();
        }
    }

    fn count_end(&self, id: &InstanceId) {
        if let Some(info) = self.get(id) {
            if info.state.is_final() {
                self.metrics.count_end(&info);
            }
        }
    }

    fn spawn_watcher(self: &Arc<Self>, id: InstanceId, pid: u32, start: u64) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            match sys::pidfd_for(pid, start) {
                Ok(Some(fd)) => wait_pidfd(fd).await,
                Ok(None) => {}
                Err(e) => this
                    .span(&id)
                    .in_scope(|| tracing::error!("pidfd_open({pid}): {e}")),
            }
            // An ended instance gives its network back before its end is
            // published, so nobody sees an ended instance holding an address.
            // The shim is gone, so its record no longer changes: read it once.
            let rec = shim::read_record(&this.layout.instance(&id).record()).ok();
            let recorded_end = rec.as_ref().is_some_and(|r| r.status.state.is_final());
            if recorded_end {
                this.release_network(&id).await;
            }
            this.shim_gone(&id, rec);
            if !recorded_end {
                this.release_network(&id).await;
            }
        });
    }

    /// Writes `corral-init` into the run directory unless it is there whole.
    fn install_init(&self) -> Result<PathBuf, ExecError> {
        let run = &self.layout.run_dir;
        crate::init::install(run)
            .map_err(io(format!("writing {}", crate::init::path(run).display())))
    }

    /// A start whose shim never said how it went: still starting, it fails
    /// with `reason` and whatever the shim made is cleaned up; either way
    /// its network is given back and its end counted.
    async fn start_unreported(&self, id: &InstanceId, p: &InstancePaths, reason: String) {
        let failed = match self.table().get(id) {
            Some(e) if e.status.borrow().state == InstanceState::Starting => {
                let kind = e.spec.kind;
                e.status.send_modify(|s| {
                    let _ = s.apply(
                        kind,
                        Event::StartFailed {
                            reason,
                            at: shim::now(),
                        },
                    );
                });
                true
            }
            _ => false,
        };
        if failed {
            self.changed();
            self.cleanup_orphan(id, p);
        }
        self.release_network(id).await;
        self.count_end(id);
    }

    /// Follows the start of an instance adopted while its shim was still
    /// starting it: the shim's report went to the agent that died, so its
    /// record is read until the start is decided (the shim's exit is the
    /// watcher's), or [`START_TIMEOUT`] passes, as for a start of its own.
    fn follow_start(self: &Arc<Self>, id: InstanceId) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let p = this.layout.instance(&id);
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let starting = this
                    .table()
                    .get(&id)
                    .is_some_and(|e| e.status.borrow().state == InstanceState::Starting);
                if !starting {
                    return;
                }
                if let Ok(rec) = shim::read_record(&p.record()) {
                    if rec.status.state != InstanceState::Starting {
                        this.apply_record(&id, &rec);
                        this.count_end(&id);
                        return;
                    }
                }
                if Instant::now() >= deadline {
                    let reason = format!(
                        "the shim did not finish the start within {} s",
                        START_TIMEOUT.as_secs()
                    );
                    this.span(&id).in_scope(|| tracing::error!(%reason));
                    this.start_unreported(&id, &p, reason).await;
                    return;
                }
            }
        });
    }

    /// The shim has exited: its record (`rec`, read after the exit) holds
    /// the end, unless it died.
    fn shim_gone(&self, id: &InstanceId, rec: Option<Record>) {
        let p = self.layout.instance(id);
        if let Some(r) = &rec {
            self.apply_record(id, r);
        }
        let ended = rec.as_ref().is_some_and(|r| r.status.state.is_final());
        if !ended {
            self.span(id)
                .in_scope(|| tracing::error!("shim exited without recording the instance's end"));
            self.mark_lost(id, "the instance's shim died; the instance was stopped");
            self.cleanup_orphan(id, &p);
        }
        self.count_end(id);
    }

    fn mark_lost(&self, id: &InstanceId, reason: &str) {
        let p = self.layout.instance(id);
        let mut t = self.table();
        let Some(e) = t.get_mut(id) else { return };
        let kind = e.spec.kind;
        let mut st = e.status.borrow().clone();
        if st
            .apply(
                kind,
                Event::Lost {
                    reason: reason.into(),
                    at: shim::now(),
                },
            )
            .is_ok()
        {
            e.status.send_replace(st.clone());
            self.changed();
            let rec = Record {
                shim_pid: e.shim.map_or(0, |s| s.0),
                shim_start: e.shim.map_or(0, |s| s.1),
                init_pid: e.init.map(|s| s.0),
                init_start: e.init.map(|s| s.1),
                status: st,
                cpu_ns: None,
                oom_kills: 0,
                logs_dropped: 0,
            };
            drop(t);
            let _ = std::fs::create_dir_all(&p.run);
            if let Err(e) = shim::write_record(&p.record(), &rec) {
                self.span(id)
                    .in_scope(|| tracing::error!("cannot write record: {e}"));
            }
        }
    }

    /// Releases the resources of an instance whose shim is gone: kills its
    /// container's init if it still runs, then runs `corral-agent cleanup`.
    fn cleanup_orphan(&self, id: &InstanceId, p: &InstancePaths) {
        if let Ok(rec) = shim::read_record(&p.record()) {
            if let (Some(pid), Some(start)) = (rec.init_pid, rec.init_start) {
                if let Ok(Some(fd)) = sys::pidfd_for(pid, start) {
                    let _ = sys::pidfd_signal(&fd, libc::SIGKILL);
                }
            }
        }
        let args = CleanupArgs {
            id: id.clone(),
            paths: p.clone(),
            cgroup2: self.cgroup2_root.is_some(),
        };
        let Ok(arg) = serde_json::to_string(&args) else {
            return;
        };
        match std::process::Command::new(&self.exe)
            .arg("cleanup")
            .arg(arg)
            .status()
        {
            Ok(s) if s.success() => {}
            Ok(s) => self
                .span(id)
                .in_scope(|| tracing::error!("cleanup helper failed: {s}")),
            Err(e) => self
                .span(id)
                .in_scope(|| tracing::error!("cannot run the cleanup helper: {e}")),
        }
    }

    /// Stops an instance (SIGTERM, `grace`, SIGKILL) and removes it and
    /// everything it had. Returns its last state.
    pub async fn delete(
        &self,
        id: &InstanceId,
        grace_secs: Option<u64>,
    ) -> Result<InstanceInfo, ExecError> {
        let span = self.span(id);
        self.delete_inner(id, grace_secs).instrument(span).await
    }

    async fn delete_inner(
        &self,
        id: &InstanceId,
        grace_secs: Option<u64>,
    ) -> Result<InstanceInfo, ExecError> {
        let mut rx = {
            let mut t = self.table();
            let e = t
                .get_mut(id)
                .ok_or_else(|| ExecError::NotFound(id.clone()))?;
            e.deleting = true;
            e.status.subscribe()
        };
        // A start in progress is decided first.
        let _ = rx.wait_for(|s| s.state != InstanceState::Starting).await;
        let grace = grace_secs.unwrap_or(self.cfg.stop_grace_secs);
        let p = self.layout.instance(id);
        if !rx.borrow().state.is_final() {
            let shim = self.table().get(id).and_then(|e| e.shim);
            let _ = std::fs::write(p.stop_request(), grace.to_string());
            let signalled = match shim {
                Some((pid, start)) => match sys::pidfd_for(pid, start) {
                    Ok(Some(fd)) => sys::pidfd_signal(&fd, libc::SIGTERM).unwrap_or(false),
                    _ => false,
                },
                None => false,
            };
            if !signalled {
                // Its watcher will notice the shim is gone and record it.
                tracing::warn!("shim not running while stopping");
            } else {
                let kind = self.table().get(id).map(|e| e.spec.kind);
                if let (Some(kind), Some(e)) = (kind, self.table().get(id)) {
                    e.status.send_modify(|s| {
                        let _ = s.apply(kind, Event::StopRequested);
                    });
                    self.changed();
                }
            }
            let limit = Duration::from_secs(grace + 30);
            if tokio::time::timeout(limit, rx.wait_for(|s| s.state.is_final()))
                .await
                .is_err()
            {
                if let Some(e) = self.table().get_mut(id) {
                    e.deleting = false;
                }
                return Err(ExecError::StopTimeout {
                    id: id.clone(),
                    secs: limit.as_secs(),
                    pid: shim.map_or(0, |s| s.0),
                });
            }
        }
        let info = self
            .get(id)
            .ok_or_else(|| ExecError::NotFound(id.clone()))?;
        self.release_network(id).await;
        for d in [&p.data, &p.run] {
            if let Err(e) = std::fs::remove_dir_all(d) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(io(format!("removing {}", d.display()))(e));
                }
            }
        }
        self.table().remove(id);
        self.changed();
        tracing::info!("instance removed");
        Ok(info)
    }

    /// An instance with a spec and no shim record: the agent died between
    /// writing the one and its shim writing the other. The shim lock tells
    /// which way it went: held, a shim is alive and about to write its
    /// record (waited for, up to [`LAUNCH_WAIT`]); free, no shim got that
    /// far, and the start is called off (its launch file removed while the
    /// lock is held) so that a shim still on its way stops at its first
    /// step instead of running an instance nobody tracks.
    async fn interrupted_launch(&self, id: &InstanceId, p: &InstancePaths) -> Option<shim::Record> {
        let deadline = Instant::now() + LAUNCH_WAIT;
        loop {
            match shim::try_lock(p) {
                Ok(shim::ShimLock::Taken(_held)) => {
                    // A shim may have written its record and exited since.
                    if let Ok(r) = shim::read_record(&p.record()) {
                        return Some(r);
                    }
                    match std::fs::remove_file(p.launch()) {
                        Ok(()) => self.span(id).in_scope(|| {
                            tracing::info!("interrupted start called off: no shim had begun it")
                        }),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => self.span(id).in_scope(|| {
                            tracing::error!("cannot call off the interrupted start: {e}")
                        }),
                    }
                    return None;
                }
                Ok(shim::ShimLock::Absent) => return None,
                Ok(shim::ShimLock::Held) => {
                    if let Ok(r) = shim::read_record(&p.record()) {
                        self.span(id).in_scope(|| {
                            tracing::info!("a shim was still starting the instance: adopting it")
                        });
                        return Some(r);
                    }
                    if Instant::now() >= deadline {
                        self.span(id).in_scope(|| {
                            tracing::warn!(
                                "a shim holds the instance's lock but wrote no record within {} s",
                                LAUNCH_WAIT.as_secs()
                            )
                        });
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => {
                    self.span(id)
                        .in_scope(|| tracing::error!("cannot take the shim lock: {e}"));
                    return None;
                }
            }
        }
    }

    /// Rebuilds the table from disk after an agent (re)start: running
    /// instances are re-adopted through their shims, ended ones keep their
    /// exit status, and ones whose shim vanished are marked crashed. An
    /// evacuation started by an earlier run goes on.
    pub async fn adopt(self: &Arc<Self>) -> Result<usize, ExecError> {
        self.restore_evacuation();
        let dir = self.layout.instances_data();
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        std::fs::create_dir_all(self.layout.instances_run()).map_err(io("creating the run dir"))?;
        self.install_init()?;
        let mut adopted = 0;
        for ent in std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))? {
            let Ok(ent) = ent else { continue };
            let name = ent.file_name().to_string_lossy().into_owned();
            let Ok(id) = InstanceId::new(name.as_str()) else {
                tracing::warn!("ignoring {}: not an instance id", ent.path().display());
                continue;
            };
            let p = self.layout.instance(&id);
            let bytes = match std::fs::read(p.spec()) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // A start cut between making the instance's directories
                    // and writing its spec (written first, atomically):
                    // nothing else of it exists, and it was never answered.
                    self.span(&id).in_scope(|| {
                        tracing::warn!(
                            "removing the directories of a start cut before its spec was written"
                        )
                    });
                    let _ = std::fs::remove_dir_all(&p.data);
                    let _ = std::fs::remove_dir_all(&p.run);
                    continue;
                }
                r => r.map_err(|e| e.to_string()),
            };
            let spec: InstanceSpec =
                match bytes.and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
                    Ok(s) => s,
                    Err(e) => {
                        self.span(&id).in_scope(|| {
                            tracing::error!("ignoring instance with unreadable spec.json: {e}")
                        });
                        continue;
                    }
                };
            let rec = match shim::read_record(&p.record()) {
                Ok(r) => Some(r),
                Err(_) => self.interrupted_launch(&id, &p).await,
            };
            let (tx, _) =
                watch::channel(rec.as_ref().map_or_else(Status::new, |r| r.status.clone()));
            self.table().insert(
                id.clone(),
                Entry {
                    shim: rec.as_ref().map(|r| (r.shim_pid, r.shim_start)),
                    init: rec.as_ref().and_then(|r| r.init_pid.zip(r.init_start)),
                    cpu_ns: rec.as_ref().and_then(|r| r.cpu_ns),
                    oom_kills: rec.as_ref().map_or(0, |r| r.oom_kills),
                    ..Entry::new(spec, tx)
                },
            );
            self.changed();
            match rec {
                None => {
                    self.mark_lost(
                        &id,
                        "no runtime record: the node restarted or the start was interrupted",
                    );
                    self.cleanup_orphan(&id, &p);
                    self.release_network(&id).await;
                }
                Some(r) if r.status.state.is_final() => self.release_network(&id).await,
                Some(r) => match sys::pidfd_for(r.shim_pid, r.shim_start) {
                    Ok(Some(_)) => {
                        self.span(&id).in_scope(|| {
                            tracing::info!(shim_pid = r.shim_pid, "re-adopted running instance")
                        });
                        adopted += 1;
                        self.readopt_network(&id);
                        self.spawn_watcher(id.clone(), r.shim_pid, r.shim_start);
                        if r.status.state == InstanceState::Starting {
                            self.follow_start(id.clone());
                        }
                    }
                    _ => {
                        // Read again: the shim may have finished its record
                        // after the read above.
                        let rec = shim::read_record(&p.record()).ok();
                        self.shim_gone(&id, rec);
                        self.release_network(&id).await;
                    }
                },
            }
        }
        Ok(adopted)
    }
}

impl Executor {
    /// Allocates an address and wires up the instance's network namespace;
    /// returns its path (None without a cell network). Nothing is left
    /// behind on error.
    async fn attach_network(
        &self,
        id: &InstanceId,
        tenant: &TenantId,
        app: &AppId,
        p: &InstancePaths,
    ) -> Result<Option<PathBuf>, String> {
        let Some(net) = &self.net else {
            return Ok(None);
        };
        let addr = lock(&net.ipam)
            .allocate()
            .map_err(|e| format!("no address for the instance: {e}"))?;
        // Recorded before anything is made, so that an agent killed halfway
        // leaves a record its successor can clean up from (the host veth's
        // name is derived from the id; the index is filled in below).
        let intent = Attachment {
            address: addr,
            host_if: crate::network::host_if_name(id),
            host_ifindex: 0,
            netns: p.netns(),
        };
        let record = |att: &Attachment| {
            serde_json::to_vec(att)
                .map_err(std::io::Error::other)
                .and_then(|b| write_atomic(&p.net(), &b))
        };
        if let Err(e) = record(&intent) {
            lock(&net.ipam).release(addr);
            return Err(format!("cannot record the instance's network: {e}"));
        }
        let t0 = Instant::now();
        // The host veth's ifindex decides its slot in the data plane.
        let ifindex = match net.plane.as_ref().map(Plane::reserve_ifindex).transpose() {
            Ok(i) => i,
            Err(e) => {
                lock(&net.ipam).release(addr);
                let _ = std::fs::remove_file(p.net());
                return Err(format!("data plane: {e}"));
            }
        };
        let unreserve = || {
            if let (Some(plane), Some(i)) = (&net.plane, ifindex) {
                plane.unreserve(i);
            }
        };
        let att = match net.network.attach(id, addr, &p.netns(), ifindex).await {
            Ok(a) => a,
            Err(e) => {
                unreserve();
                lock(&net.ipam).release(addr);
                let _ = std::fs::remove_file(p.net());
                return Err(format!("network set-up failed: {e}"));
            }
        };
        let wired = t0.elapsed();
        if let Err(e) = record(&att) {
            unreserve();
            net.network.detach(&att).await;
            lock(&net.ipam).release(addr);
            let _ = std::fs::remove_file(p.net());
            return Err(format!("cannot record the instance's network: {e}"));
        }
        if let Some(plane) = &net.plane {
            if let Err(e) = plane.add(&att, tenant, app) {
                plane.remove(&att);
                unreserve();
                net.network.detach(&att).await;
                lock(&net.ipam).release(addr);
                let _ = std::fs::remove_file(p.net());
                return Err(format!("data plane: {e}"));
            }
        }
        if let Some(e) = self.table().get_mut(id) {
            e.address = Some(addr);
        }
        self.changed();
        tracing::info!(%addr, host_if = %att.host_if, wired_ms = wired.as_millis() as u64, total_ms = t0.elapsed().as_millis() as u64, "instance network attached");
        Ok(Some(att.netns))
    }

    /// Removes the instance's network, if it has one, and frees its address.
    /// Idempotent.
    async fn release_network(&self, id: &InstanceId) {
        let Some(net) = &self.net else { return };
        let p = self.layout.instance(id);
        let Ok(att) = std::fs::read(p.net())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Attachment>(&b).map_err(|e| e.to_string()))
        else {
            // No record: at most a namespace file is left.
            crate::network::remove_netns(&p.netns());
            return;
        };
        if let Some(plane) = &net.plane {
            plane.remove(&att);
        }
        net.network.detach(&att).await;
        lock(&net.ipam).release(att.address);
        let _ = std::fs::remove_file(p.net());
        if let Some(e) = self.table().get_mut(id) {
            e.address = None;
        }
        self.changed();
    }

    /// Takes back a running instance's address after an agent restart.
    fn readopt_network(&self, id: &InstanceId) {
        let Some(net) = &self.net else { return };
        let p = self.layout.instance(id);
        let Ok(att) = std::fs::read(p.net())
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Attachment>(&b).map_err(|e| e.to_string()))
        else {
            return;
        };
        match lock(&net.ipam).reserve(att.address) {
            Ok(()) => {
                let owner = self.table().get_mut(id).map(|e| {
                    e.address = Some(att.address);
                    (e.spec.tenant.clone(), e.spec.app.clone())
                });
                self.changed();
                // Re-attaching replaces the filters' programs in place; the
                // entries are rewritten as they were.
                if let (Some(plane), Some((tenant, app))) = (&net.plane, owner) {
                    if let Err(e) = plane.add(&att, &tenant, &app) {
                        self.span(id)
                            .in_scope(|| tracing::error!("re-adopting the data plane: {e}"));
                    }
                }
            }
            Err(e) => self
                .span(id)
                .in_scope(|| tracing::error!("re-adopting address: {e}")),
        }
    }

    /// Writes the current status as the record when no shim will (start
    /// failures decided by the agent), so a restart still shows them.
    fn persist_status(&self, id: &InstanceId) {
        let p = self.layout.instance(id);
        let Some(st) = self.table().get(id).map(|e| e.status.borrow().clone()) else {
            return;
        };
        let rec = Record {
            shim_pid: 0,
            shim_start: 0,
            init_pid: None,
            init_start: None,
            status: st,
            cpu_ns: None,
            oom_kills: 0,
            logs_dropped: 0,
        };
        if let Err(e) = shim::write_record(&p.record(), &rec) {
            self.span(id)
                .in_scope(|| tracing::error!("cannot write record: {e}"));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The evacuation marker's contents.
#[derive(serde::Serialize, serde::Deserialize)]
struct Evacuation {
    since: Timestamp,
}

/// Arguments of `corral-agent cleanup`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct CleanupArgs {
    pub id: InstanceId,
    pub paths: InstancePaths,
    pub cgroup2: bool,
}

async fn wait_pidfd(fd: OwnedFd) {
    match sys::async_fd(fd) {
        Ok(afd) => {
            let _ = afd.readable().await;
        }
        Err(e) => {
            tracing::error!("cannot watch pidfd: {e}");
            std::future::pending::<()>().await;
        }
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

/// Checks that the rootfs exists and holds the command, so that a typo is a
/// 400 and not a crashed instance.
fn check_rootfs(spec: &InstanceSpec) -> Result<(), ExecError> {
    let root = Path::new(&spec.rootfs);
    if !root.is_dir() {
        return Err(ExecError::BadRootfs(format!(
            "rootfs {} does not exist or is not a directory",
            spec.rootfs
        )));
    }
    let prog = &spec.command[0];
    let path_var = spec
        .env
        .get("PATH")
        .map(String::as_str)
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    let candidates: Vec<PathBuf> = if prog.contains('/') {
        vec![PathBuf::from(prog)]
    } else {
        path_var
            .split(':')
            .filter(|d| d.starts_with('/'))
            .map(|d| Path::new(d).join(prog))
            .collect()
    };
    let found = candidates.iter().any(|c| is_executable_in(root, c));
    if found {
        Ok(())
    } else {
        Err(ExecError::BadRootfs(format!(
            "command {prog:?} is not an executable file in rootfs {}",
            spec.rootfs
        )))
    }
}

/// Whether `path` (absolute, inside the container) is an executable file in
/// `root`, following symlinks within the rootfs as the container would.
fn is_executable_in(root: &Path, path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let mut cur = path.to_path_buf();
    for _ in 0..16 {
        // Resolve '.' and '..' lexically, never above the rootfs.
        let mut rel = PathBuf::new();
        for c in cur.components() {
            match c {
                std::path::Component::Normal(n) => rel.push(n),
                std::path::Component::ParentDir => {
                    rel.pop();
                }
                _ => {}
            }
        }
        let host = root.join(&rel);
        match std::fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => match std::fs::read_link(&host) {
                Ok(t) if t.is_absolute() => cur = t,
                Ok(t) => {
                    cur = Path::new("/")
                        .join(rel.parent().unwrap_or(Path::new("")))
                        .join(t)
                }
                Err(_) => return false,
            },
            Ok(m) => return m.is_file() && m.permissions().mode() & 0o111 != 0,
            Err(_) => return false,
        }
    }
    false
}
