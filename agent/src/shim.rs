//! The shim: one single-threaded process per instance, the agent binary
//! re-executed as `corral-agent shim <launch.json>`.
//!
//! libcontainer forks and changes process-wide state, so it never runs in the
//! multi-threaded agent. The shim detaches from the agent (fork + setsid), so
//! the agent can restart or die without touching the instance; it creates and
//! starts the container, stays its parent (child subreaper), copies its
//! stdout/stderr into rotated log files, forwards a stop request (SIGTERM to
//! the shim) as SIGTERM then SIGKILL after the grace period, and when the
//! container ends it records the exit status, releases every resource the
//! instance had (cgroups, mount, writable layer) and exits.
//!
//! Everything the agent needs to know is in `record.json` (written atomically),
//! plus one line on the shim's stdout once the start has succeeded or failed.

use crate::logs::{format_record, LineSplitter, LogWriter, Stream};
use crate::paths::InstancePaths;
use crate::{cgroups, oci, sys};
use corral_proto::{Event, InstanceId, InstanceSpec, Status, Timestamp};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use nix::fcntl::{fcntl, FcntlArg, Flock, FlockArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What the agent hands a shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Launch {
    pub id: InstanceId,
    pub spec: InstanceSpec,
    pub paths: InstancePaths,
    pub stop_grace_secs: u64,
    pub log_max_bytes: u64,
    pub log_keep: u32,
    /// The agent's cgroup2 directory, when the host has a separate cgroup2
    /// hierarchy (hybrid); the instance also gets a directory below it.
    pub cgroup2_root: Option<PathBuf>,
    /// Whether the layer is a filesystem of its own, sized `disk_mb`.
    pub disk_quota: bool,
    /// The network namespace the agent prepared (None: a new, empty one).
    pub netns: Option<PathBuf>,
    /// Tells this launch from any other of the same instance id (the wall
    /// clock in nanoseconds when the agent wrote it): a shim checks, once it
    /// holds the lock, that the launch file is still the one it read.
    #[serde(default)]
    pub issued_ns: u64,
    /// The `corral-init` executable ([`crate::init`]) to run the command
    /// under; none (a launch from an agent before it): the command is the
    /// container's first process itself.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

/// What the shim records about its instance; the agent's source of truth.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub shim_pid: u32,
    pub shim_start: u64,
    pub init_pid: Option<u32>,
    pub init_start: Option<u64>,
    pub status: Status,
    /// CPU time used, recorded when the instance ended.
    pub cpu_ns: Option<u64>,
    pub oom_kills: u64,
    pub logs_dropped: u64,
}

/// The one line a shim prints to the agent once the start is decided.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartReport {
    Running {
        pid: u32,
        shim_pid: u32,
        shim_start: u64,
    },
    Failed {
        reason: String,
        shim_pid: u32,
    },
}

pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(d.as_nanos() as u64)
}

pub fn write_record(path: &Path, rec: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(rec).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn read_record(path: &Path) -> std::io::Result<Record> {
    let data = std::fs::read(path)?;
    serde_json::from_slice(&data).map_err(std::io::Error::other)
}

fn container_id(id: &InstanceId) -> String {
    id.to_string()
}

/// Entry point of `corral-agent shim`. Never returns.
pub fn main(launch_path: &Path) -> ! {
    let launch = std::fs::read(launch_path)
        .map_err(|e| e.to_string())
        .and_then(|b| {
            serde_json::from_slice::<Launch>(&b)
                .map(|l| (b, l))
                .map_err(|e| e.to_string())
        });
    let (launch_bytes, launch) = match launch {
        Ok(l) => l,
        Err(e) => {
            report(&StartReport::Failed {
                reason: format!("cannot read launch file: {e}"),
                shim_pid: 0,
            });
            std::process::exit(1);
        }
    };
    // Detach: the agent reaps the parent at once; the child is adopted by init
    // (or a subreaper) and lives in its own session, beyond the agent's reach.
    // SAFETY: the shim is single-threaded here; the child only continues
    // running ordinary Rust code.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => std::process::exit(0),
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => {
            report(&StartReport::Failed {
                reason: format!("fork failed: {e}"),
                shim_pid: 0,
            });
            std::process::exit(1);
        }
    }
    let _ = nix::unistd::setsid();
    let lock = match claim(&launch.paths, launch_path, &launch_bytes) {
        Ok(l) => l,
        Err(reason) => {
            report(&StartReport::Failed {
                reason,
                shim_pid: std::process::id(),
            });
            std::process::exit(1);
        }
    };
    redirect_stderr(&launch.paths.shim_log());
    let mut shim = Shim::new(launch, launch_path.to_owned());
    shim.lock = Some(lock);
    let code = shim.run();
    std::process::exit(code)
}

/// What [`try_lock`] found.
#[derive(Debug)]
pub enum ShimLock {
    /// Another process holds the lock: a shim is alive (or an agent is
    /// looking at the instance).
    Held,
    /// Nobody held it; the caller does now, until the value is dropped.
    Taken(Flock<std::fs::File>),
    /// The instance's runtime directory is gone (deleted, or the node
    /// restarted): no shim can hold or take it.
    Absent,
}

/// Tries to take the instance's shim lock ([`InstancePaths::shim_lock`])
/// without waiting. The file is created in the runtime directory if
/// missing; the directory never is.
pub fn try_lock(p: &InstancePaths) -> std::io::Result<ShimLock> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p.shim_lock())
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ShimLock::Absent),
        Err(e) => return Err(e),
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(ShimLock::Taken(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(ShimLock::Held),
        Err((_, e)) => Err(e.into()),
    }
}

/// A shim's first step: take the instance's lock for the rest of its life,
/// then check that its start still stands: the launch file it read is
/// still there, unchanged (each launch says when it was issued). An agent
/// that restarted and found no record calls a start off by removing the
/// launch file while it holds the lock, so a shim that comes after that
/// stops here instead of running an instance nobody tracks.
fn claim(
    p: &InstancePaths,
    launch_path: &Path,
    read: &[u8],
) -> Result<Flock<std::fs::File>, String> {
    let lock = match try_lock(p) {
        Ok(ShimLock::Taken(l)) => l,
        Ok(ShimLock::Held) => return Err("another process holds the instance's shim lock".into()),
        Ok(ShimLock::Absent) => return Err("the instance's runtime directory is gone".into()),
        Err(e) => return Err(format!("cannot lock {}: {e}", p.shim_lock().display())),
    };
    match std::fs::read(launch_path) {
        Ok(now) if now == read => Ok(lock),
        _ => Err("the start was called off (the launch file is gone or replaced)".into()),
    }
}

fn report(r: &StartReport) {
    if let Ok(line) = serde_json::to_string(r) {
        let mut out = std::io::stdout();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

fn redirect_stderr(path: &Path) {
    if let Ok(f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = nix::unistd::dup2(f.as_raw_fd(), 2);
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .try_init();
}

struct Shim {
    launch: Launch,
    launch_path: PathBuf,
    record: Record,
    /// The container's last stderr line, quoted in a crash reason.
    last_err: Option<String>,
    /// The instance's shim lock, held for the shim's life (through the
    /// handover to the monitor).
    lock: Option<Flock<std::fs::File>>,
}

struct Running {
    init: Pid,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    /// The read end of `corral-init`'s status pipe (non-blocking).
    status: Option<OwnedFd>,
}

/// How the container's first process ended, and, when it is `corral-init`,
/// how the command it ran ended.
struct Exit {
    init: WaitStatus,
    child: Option<crate::init::ChildEnd>,
}

impl Shim {
    fn new(launch: Launch, launch_path: PathBuf) -> Self {
        let shim_pid = std::process::id();
        let shim_start = sys::start_time(shim_pid).unwrap_or(0);
        Self {
            launch,
            launch_path,
            record: Record {
                shim_pid,
                shim_start,
                init_pid: None,
                init_start: None,
                status: Status::new(),
                cpu_ns: None,
                oom_kills: 0,
                logs_dropped: 0,
            },
            last_err: None,
            lock: None,
        }
    }

    fn save(&self) {
        if let Err(e) = write_record(&self.launch.paths.record(), &self.record) {
            tracing::error!("cannot write record: {e}");
        }
    }

    fn apply(&mut self, ev: Event) {
        if let Err(e) = self.record.status.apply(self.launch.spec.kind, ev) {
            tracing::warn!("{e}");
        }
        self.save();
    }

    fn run(mut self) -> i32 {
        self.save();
        if let Err(e) = sys::set_child_subreaper() {
            return self.fail(format!("cannot become a child subreaper: {e}"));
        }
        let running = match self.start() {
            Ok(r) => r,
            Err(reason) => return self.fail(reason),
        };
        let pid = running.init.as_raw() as u32;
        self.record.init_pid = Some(pid);
        self.record.init_start = sys::start_time(pid).ok();
        self.apply(Event::Started { pid, at: now() });
        // From here on a stop request may come: keep it pending (through the
        // handover to the monitor) until the signalfd reads it.
        let _ = supervised_signals().thread_block();
        report(&StartReport::Running {
            pid,
            shim_pid: self.record.shim_pid,
            shim_start: self.record.shim_start,
        });
        // The agent has its answer; nothing more goes to it through stdout.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            let _ = nix::unistd::dup2(null.as_raw_fd(), 1);
        }
        // Shed what the set-up used (libcontainer and its allocations):
        // supervise from a fresh image of this binary. The child-subreaper
        // flag, the container (our child) and the pipes survive execve.
        let lock = self.lock.as_ref().map(|l| l.as_raw_fd());
        let e = exec_monitor(&self.launch_path, &running, lock);
        tracing::error!("cannot re-exec as monitor ({e}); supervising in place");
        let exit = self.supervise(running);
        self.finish(exit);
        0
    }

    fn fail(&mut self, reason: String) -> i32 {
        tracing::error!("start failed: {reason}");
        self.cleanup();
        self.apply(Event::StartFailed {
            reason: reason.clone(),
            at: now(),
        });
        report(&StartReport::Failed {
            reason,
            shim_pid: self.record.shim_pid,
        });
        1
    }

    /// Creates the writable layer, the container and its cgroups, and starts
    /// it. On error the caller cleans up whatever was made.
    fn start(&mut self) -> Result<Running, String> {
        let l = &self.launch;
        let p = &l.paths;
        crate::layer::create(p, l.spec.resources.disk_mb, l.disk_quota)?;
        for d in [p.logs(), p.rootfs_mount(), p.bundle(), p.container_state()] {
            std::fs::create_dir_all(&d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            l.spec.rootfs,
            p.upper().display(),
            p.work().display()
        );
        nix::mount::mount(
            Some("overlay"),
            &p.rootfs_mount(),
            Some("overlay"),
            nix::mount::MsFlags::MS_NODEV,
            Some(opts.as_str()),
        )
        .map_err(|e| {
            format!(
                "cannot mount the instance's overlay on {}: {e}",
                p.rootfs_mount().display()
            )
        })?;

        let spec = oci::build(
            &l.id,
            &l.spec,
            &p.rootfs_mount(),
            &p.cgroup,
            l.netns.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        spec.save(p.bundle().join("config.json"))
            .map_err(|e| format!("cannot write config.json: {e}"))?;

        let (out_r, out_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        let (err_r, err_w) =
            nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
        for fd in [&out_r, &err_r] {
            fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
                .map_err(|e| format!("fcntl: {e}"))?;
        }
        let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
        // Under corral-init: its executable, open for the container's first
        // process to run, and the pipe it reports on. Both close on exec.
        let init = match &l.init {
            Some(path) => {
                let exe = std::fs::File::open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
                let (status_r, status_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
                    .map_err(|e| format!("pipe: {e}"))?;
                Some((exe, status_r, status_w))
            }
            None => None,
        };

        let builder = ContainerBuilder::new(container_id(&l.id), SyscallType::default())
            .with_root_path(p.container_state())
            .map_err(|e| format!("container state dir: {e}"))?;
        let builder = match &init {
            Some((exe, _, status_w)) => builder.with_executor(crate::init::InitExecutor {
                init: exe.as_raw_fd(),
                status: status_w.as_raw_fd(),
            }),
            None => builder.with_executor(DefaultExecutor {}),
        };
        let mut container = builder
            .with_stdin(OwnedFd::from(null))
            .with_stdout(out_w)
            .with_stderr(err_w)
            .validate_id()
            .map_err(|e| format!("container id: {e}"))?
            .as_init(p.bundle())
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| format!("cannot create the container: {e}"))?;
        let first = container.pid().ok_or("the container has no init process")?;

        if let Some(root) = &l.cgroup2_root {
            let dir = p.cgroup2();
            debug_assert!(dir.starts_with(root));
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("cgroup.procs"), first.as_raw().to_string()))
                .map_err(|e| {
                    format!(
                        "cannot place the instance in cgroup2 {}: {e}",
                        dir.display()
                    )
                })?;
        }
        container
            .start()
            .map_err(|e| format!("cannot start the container: {e}"))?;
        Ok(Running {
            init: first,
            out: Some(out_r),
            err: Some(err_r),
            // The executable and the write end close here: the container's
            // process has its own.
            status: init.map(|(_, status_r, _)| status_r),
        })
    }

    /// Waits for the container's init to end, copying its output into the
    /// logs and carrying out a stop request. Returns how it ended.
    fn supervise(&mut self, r: Running) -> Exit {
        let mask = supervised_signals();
        let _ = mask.thread_block();
        let mut sfd =
            match SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::error!("signalfd: {e}; polling instead");
                    None
                }
            };
        let p = self.launch.paths.clone();
        let log = LogWriter::open(
            p.log_file(),
            self.launch.log_max_bytes,
            self.launch.log_keep,
        )
        .map_err(|e| tracing::error!("cannot open the log file: {e}"))
        .ok();
        let mut pump = Pump::new([r.out, r.err], log);
        let mut exit: Option<WaitStatus> = None;
        let mut kill_at: Option<Instant> = None;
        let mut drain_until: Option<Instant> = None;

        loop {
            // Reap first: a SIGCHLD may have come before the signalfd existed.
            if let Some(ws) = reap(r.init) {
                if exit.is_none() {
                    exit = Some(ws);
                    drain_until = Some(Instant::now() + Duration::from_secs(2));
                }
            }
            if kill_at.is_some_and(|at| Instant::now() >= at) && exit.is_none() {
                // SIGKILL to a pid namespace's init kills the whole namespace.
                let _ = kill(r.init, Signal::SIGKILL);
                kill_at = None;
            }
            if let Some(ws) = exit {
                if !pump.open() || drain_until.is_some_and(|d| Instant::now() >= d) {
                    pump.finish();
                    self.record.logs_dropped = pump.log.as_ref().map_or(0, |w| w.dropped);
                    self.last_err = pump.last_err.take();
                    return Exit {
                        init: ws,
                        child: r.status.as_ref().and_then(read_child_end),
                    };
                }
            }

            let deadline = [kill_at, drain_until].into_iter().flatten().min();
            let timeout = match deadline {
                Some(d) => d
                    .saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(1000) as u16,
                None if sfd.is_none() => 200,
                None => 1000,
            };
            let (sig_ready, out_ready) = wait_ready(sfd.as_ref(), &pump, timeout);
            if sig_ready {
                while let Some(Ok(Some(info))) = sfd.as_mut().map(|s| s.read_signal()) {
                    let sig = info.ssi_signo as i32;
                    let stop = sig == libc::SIGTERM || sig == libc::SIGINT;
                    if stop && exit.is_none() && kill_at.is_none() {
                        let grace = std::fs::read_to_string(p.stop_request())
                            .ok()
                            .and_then(|s| s.trim().parse::<u64>().ok())
                            .unwrap_or(self.launch.stop_grace_secs);
                        self.apply(Event::StopRequested);
                        let _ = kill(r.init, Signal::SIGTERM);
                        // A command that is its container's init itself (a
                        // launch without corral-init) and does not handle
                        // SIGTERM never sees it: waiting the grace would be
                        // waiting for nothing. corral-init passes it on.
                        let deaf = self.launch.init.is_none()
                            && std::fs::read_to_string(format!("/proc/{}/status", r.init))
                                .is_ok_and(|s| sigterm_is_dropped(&s));
                        kill_at = Some(if deaf {
                            Instant::now()
                        } else {
                            Instant::now() + Duration::from_secs(grace)
                        });
                    }
                }
            }
            for (slot, ready) in out_ready.into_iter().enumerate() {
                // Once the init has exited, read whatever is left without waiting.
                if ready || exit.is_some() {
                    pump.drain(slot);
                }
            }
        }
    }

    fn finish(&mut self, exit: Exit) {
        let stats = cgroups::read_v1(&self.launch.paths);
        self.record.cpu_ns = stats.cpu_ns;
        self.record.oom_kills = stats.oom_kills.unwrap_or(0);
        let (code, signal) = exit_of(&exit);
        // A SIGKILL while the memory cgroup recorded an OOM kill is the OOM killer's.
        let oom_killed = self.record.oom_kills > 0 && signal == Some(libc::SIGKILL);
        self.cleanup();
        self.apply(Event::Exited {
            code,
            signal,
            oom_killed,
            at: now(),
        });
        if let Some(line) = self.last_err.take() {
            if self.record.status.state == corral_proto::InstanceState::Crashed {
                let mut line = line;
                line.truncate(200);
                if let Some(r) = self.record.status.reason.as_mut() {
                    r.push_str(&format!(" (last stderr line: {line:?})"));
                }
                self.save();
            }
        }
    }

    /// Releases what the instance had: container (and its v1 cgroups),
    /// cgroup2 directory, overlay mount, writable layer, bundle. Idempotent.
    fn cleanup(&mut self) {
        cleanup(
            &self.launch.id,
            &self.launch.paths,
            self.launch.cgroup2_root.is_some(),
        );
    }
}

/// How the instance ended: as `corral-init` said its command ended (its own
/// exit code is the command's, or 128 + the signal), else as the first
/// process itself ended (killed from outside before the command ended, as
/// by a stop's SIGKILL, or a command run without corral-init).
fn exit_of(exit: &Exit) -> (Option<i32>, Option<i32>) {
    use crate::init::ChildEnd;
    match (exit.child, exit.init) {
        (Some(ChildEnd::Exited(c)), _) => (Some(c), None),
        (Some(ChildEnd::Signaled(s)), _) => (None, Some(s)),
        (None, WaitStatus::Exited(_, c)) => (Some(c), None),
        (None, WaitStatus::Signaled(_, s, _)) => (None, Some(s as i32)),
        _ => (None, None),
    }
}

/// What corral-init wrote on its status pipe, once it has exited.
fn read_child_end(fd: &OwnedFd) -> Option<crate::init::ChildEnd> {
    let mut buf = [0u8; 64];
    let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).ok()?;
    crate::init::parse_status(&buf[..n])
}

/// Replaces the shim's image with `corral-agent shim-monitor`, handing over
/// the container's pid, output pipes and status pipe. Returns only on
/// failure.
fn exec_monitor(launch_path: &Path, r: &Running, lock: Option<RawFd>) -> std::io::Error {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let fd = |f: &Option<OwnedFd>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
    let handed = [&r.out, &r.err, &r.status]
        .into_iter()
        .flatten()
        .map(|f| f.as_raw_fd());
    for f in handed.chain(lock) {
        if let Err(e) = fcntl(f, FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())) {
            return e.into();
        }
    }
    // argv[0] stays the agent's path, so operators (and tools) see which
    // binary the monitor is.
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "corral-agent".into());
    let args: Result<Vec<CString>, _> = [
        argv0.as_bytes().to_vec(),
        b"shim-monitor".to_vec(),
        launch_path.as_os_str().as_bytes().to_vec(),
        r.init.as_raw().to_string().into_bytes(),
        fd(&r.out).to_string().into_bytes(),
        fd(&r.err).to_string().into_bytes(),
        lock.unwrap_or(-1).to_string().into_bytes(),
        fd(&r.status).to_string().into_bytes(),
    ]
    .into_iter()
    .map(CString::new)
    .collect();
    let args = match args {
        Ok(a) => a,
        Err(e) => return std::io::Error::other(e),
    };
    // Not std's Command::exec: it resets the signal mask, and a stop request
    // (SIGTERM) that arrives during the handover must stay pending until the
    // monitor's signalfd reads it. execve keeps the mask and pending signals.
    match nix::unistd::execv(c"/proc/self/exe", &args) {
        Ok(never) => match never {},
        Err(e) => e.into(),
    }
}

/// Entry point of `corral-agent shim-monitor LAUNCH INIT_PID OUT_FD ERR_FD
/// LOCK_FD STATUS_FD` (-1: none):
/// the second half of a shim's life, after the container started.
pub fn monitor_main(args: &[std::ffi::OsString]) -> ! {
    let parse = |i: usize| {
        args.get(i)
            .and_then(|a| a.to_str())
            .and_then(|a| a.parse::<i32>().ok())
    };
    let (Some(launch_path), Some(init), Some(out), Some(err)) =
        (args.first(), parse(1), parse(2), parse(3))
    else {
        eprintln!("corral-agent shim-monitor: bad arguments");
        std::process::exit(2)
    };
    let launch_path = PathBuf::from(launch_path);
    let launch: Launch = match std::fs::read(&launch_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(l) => l,
        Err(e) => {
            // The agent sees the shim gone without an end and cleans up.
            eprintln!(
                "corral-agent shim-monitor: cannot read {}: {e}",
                launch_path.display()
            );
            std::process::exit(1)
        }
    };
    let mut shim = Shim::new(launch, launch_path);
    // The lock came through the exec still held (same open file): wrapping
    // it again takes nothing new, and closes it on exec from here on.
    shim.lock = parse(4)
        .and_then(sys::owned_fd)
        .map(std::fs::File::from)
        .and_then(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).ok());
    if let Some(l) = &shim.lock {
        let _ = fcntl(
            l.as_raw_fd(),
            FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    if let Ok(rec) = read_record(&shim.launch.paths.record()) {
        shim.record = rec;
    }
    let running = Running {
        init: Pid::from_raw(init),
        out: sys::owned_fd(out),
        err: sys::owned_fd(err),
        status: parse(5).and_then(sys::owned_fd),
    };
    // Not handed to anything this monitor starts.
    for fd in [&running.out, &running.err, &running.status]
        .into_iter()
        .flatten()
    {
        let _ = fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    let exit = shim.supervise(running);
    shim.finish(exit);
    std::process::exit(0)
}

/// Whether the kernel throws a SIGTERM to this process away: it is its pid
/// namespace's init (every instance's first process is) and neither
/// handles SIGTERM nor ignores it on purpose, so the default action
/// applies, which an init is spared. `status` is its `/proc/PID/status`.
/// Outside a container the default action would have ended it at once, so
/// a stop kills it at once instead of waiting out the grace (as an init
/// like `docker --init` would, by passing the signal on). Unknown (the
/// masks unreadable): false, and the grace is waited.
fn sigterm_is_dropped(status: &str) -> bool {
    let mask = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let bit = 1u64 << (libc::SIGTERM - 1);
    match (mask("SigCgt:"), mask("SigIgn:")) {
        (Some(caught), Some(ignored)) => (caught | ignored) & bit == 0,
        _ => false,
    }
}

/// The signals the supervisor reads through its signalfd.
fn supervised_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        mask.add(s);
    }
    mask
}

/// Reaps exited children (the shim is a subreaper, so orphans of the
/// container come here too); returns the init's status if it was among them.
fn reap(init: Pid) -> Option<WaitStatus> {
    let mut init_status = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return init_status,
            Ok(ws) if ws.pid() == Some(init) => init_status = Some(ws),
            Ok(_) => {}
        }
    }
}

/// Polls the signalfd and the open output pipes; returns which are readable.
fn wait_ready(sfd: Option<&SignalFd>, pump: &Pump, timeout_ms: u16) -> (bool, [bool; 2]) {
    let mut fds = Vec::with_capacity(3);
    let mut slots = Vec::with_capacity(3);
    if let Some(s) = sfd {
        fds.push(PollFd::new(s.as_fd(), PollFlags::POLLIN));
        slots.push(None);
    }
    for (slot, fd) in pump.fds.iter().enumerate() {
        if let Some(fd) = fd {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            slots.push(Some(slot));
        }
    }
    let _ = poll(&mut fds, PollTimeout::from(timeout_ms));
    let mut sig = false;
    let mut out = [false; 2];
    for (fd, slot) in fds.iter().zip(slots) {
        let ready = fd.revents().is_some_and(|e| !e.is_empty());
        match slot {
            None => sig = ready,
            Some(i) => out[i] = ready,
        }
    }
    (sig, out)
}

/// Copies the container's stdout (slot 0) and stderr (slot 1) into the log.
struct Pump {
    fds: [Option<OwnedFd>; 2],
    split: [LineSplitter; 2],
    log: Option<LogWriter>,
    /// The last non-empty stderr line, quoted in a crash reason.
    last_err: Option<String>,
    buf: Vec<u8>,
}

impl Pump {
    const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    fn new(fds: [Option<OwnedFd>; 2], log: Option<LogWriter>) -> Self {
        Self {
            fds,
            split: Default::default(),
            log,
            last_err: None,
            buf: vec![0; 64 * 1024],
        }
    }

    fn open(&self) -> bool {
        self.fds.iter().any(Option::is_some)
    }

    /// Reads everything available now on `slot` (the pipes are non-blocking).
    fn drain(&mut self, slot: usize) {
        while let Some(fd) = self.fds[slot].as_ref() {
            match nix::unistd::read(fd.as_raw_fd(), &mut self.buf) {
                Ok(0) => self.fds[slot] = None,
                Ok(n) => {
                    for (text, partial) in self.split[slot].push(&self.buf[..n]) {
                        self.record(slot, partial, &text);
                    }
                }
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    fn record(&mut self, slot: usize, partial: bool, text: &[u8]) {
        let stream = Self::STREAMS[slot];
        if stream == Stream::Stderr && !text.is_empty() {
            self.last_err = Some(String::from_utf8_lossy(text).into_owned());
        }
        if let Some(w) = self.log.as_mut() {
            let at = now();
            w.write(at, &format_record(at, stream, partial, text));
        }
    }

    /// Writes out unterminated last lines.
    fn finish(&mut self) {
        for slot in 0..2 {
            if let Some(rest) = self.split[slot].finish() {
                self.record(slot, false, &rest);
            }
        }
    }
}

/// Removes every kernel and filesystem resource of an instance except its
/// record, spec and logs. Safe to call on a half-created instance and more
/// than once. Must run in a single-threaded process (libcontainer).
pub fn cleanup(id: &InstanceId, p: &InstancePaths, cgroup2: bool) {
    let state = p.container_state().join(container_id(id));
    if state.exists() {
        match Container::load(state.clone()) {
            Ok(mut c) => {
                if let Err(e) = c.delete(true) {
                    tracing::warn!("deleting container: {e}");
                }
            }
            Err(e) => tracing::warn!("loading container state {}: {e}", state.display()),
        }
    }
    cgroups::remove(p, cgroup2);
    crate::layer::remove(p);
    let mnt = p.rootfs_mount();
    if mnt.exists() {
        let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    }
    for d in [p.rootfs_mount(), p.bundle(), p.container_state()] {
        let _ = std::fs::remove_dir_all(&d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(caught: &str, ignored: &str) -> String {
        format!(
            "Name:\tsleep\nPid:\t42\nSigQ:\t0/95446\nSigPnd:\t0000000000000000\n\
             SigBlk:\t0000000000000000\nSigIgn:\t{ignored}\nSigCgt:\t{caught}\n\
             CapInh:\t0000000000000000\n"
        )
    }

    #[test]
    fn an_instance_ends_as_corral_init_says_its_command_ended() {
        use crate::init::ChildEnd;
        let pid = Pid::from_raw(42);
        let exit = |init, child| exit_of(&Exit { init, child });
        // The init exits with the command's code, or 128 + its signal: the
        // line says which.
        assert_eq!(
            exit(WaitStatus::Exited(pid, 3), Some(ChildEnd::Exited(3))),
            (Some(3), None)
        );
        assert_eq!(
            exit(WaitStatus::Exited(pid, 137), Some(ChildEnd::Signaled(9))),
            (None, Some(9))
        );
        // A command that exits 137 itself is an exit code.
        assert_eq!(
            exit(WaitStatus::Exited(pid, 137), Some(ChildEnd::Exited(137))),
            (Some(137), None)
        );
        // No line (no init, or it could not say): its own status.
        assert_eq!(exit(WaitStatus::Exited(pid, 7), None), (Some(7), None));
        // The init killed from outside (a stop's SIGKILL) before the
        // command ended: that signal.
        assert_eq!(
            exit(WaitStatus::Signaled(pid, Signal::SIGKILL, false), None),
            (None, Some(9))
        );
        // Killed just after the command ended and it said so: the command's.
        assert_eq!(
            exit(
                WaitStatus::Signaled(pid, Signal::SIGKILL, false),
                Some(ChildEnd::Exited(0))
            ),
            (Some(0), None)
        );
    }

    #[test]
    fn a_sigterm_is_dropped_only_for_an_init_with_the_default_action() {
        // `sleep`: no handler, nothing ignored.
        assert!(sigterm_is_dropped(&status(
            "0000000000000000",
            "0000000000000000"
        )));
        // Other signals handled or ignored do not matter.
        assert!(sigterm_is_dropped(&status(
            "0000000000010002",
            "0000000000000004"
        )));
        // `trap ... TERM`, or a server with a handler: it gets the grace.
        assert!(!sigterm_is_dropped(&status(
            "0000000000004000",
            "0000000000000000"
        )));
        assert!(!sigterm_is_dropped(&status(
            "0000000180014002",
            "0000000000000000"
        )));
        // Ignored on purpose (`trap '' TERM`): the grace too.
        assert!(!sigterm_is_dropped(&status(
            "0000000000000000",
            "0000000000004000"
        )));
        // Unreadable masks: unknown, so the grace.
        assert!(!sigterm_is_dropped("Name:\tx\n"));
        assert!(!sigterm_is_dropped(&status("zz", "0")));
    }

    fn paths(dir: &Path) -> InstancePaths {
        InstancePaths {
            data: dir.join("data"),
            run: dir.join("run"),
            layer: dir.join("layer"),
            cgroup: "/corral-test/x".into(),
        }
    }

    #[test]
    fn the_shim_lock_tells_a_live_shim_from_none_and_a_gone_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        // No runtime directory: nothing can hold it, and it is not made.
        assert!(matches!(try_lock(&p).unwrap(), ShimLock::Absent));
        assert!(!p.run.exists());
        std::fs::create_dir_all(&p.run).unwrap();
        let held = match try_lock(&p).unwrap() {
            ShimLock::Taken(l) => l,
            other => panic!("{other:?}"),
        };
        // Another open file (another process, as far as flock goes) is refused.
        assert!(matches!(try_lock(&p).unwrap(), ShimLock::Held));
        drop(held);
        assert!(matches!(try_lock(&p).unwrap(), ShimLock::Taken(_)));
    }

    #[test]
    fn a_late_shim_stops_when_its_start_was_called_off() {
        let dir = tempfile::tempdir().unwrap();
        let p = paths(dir.path());
        std::fs::create_dir_all(&p.run).unwrap();
        let launch = p.launch();
        let read = br#"{"issued_ns":1}"#;
        std::fs::write(&launch, read).unwrap();

        // The start stands: the lock is the shim's for as long as it lives.
        let lock = claim(&p, &launch, read).unwrap();
        assert!(matches!(try_lock(&p).unwrap(), ShimLock::Held));
        let err = claim(&p, &launch, read).unwrap_err();
        assert!(err.contains("holds the instance's shim lock"), "{err}");
        drop(lock);

        // An agent called it off while holding the lock.
        let agent = try_lock(&p).unwrap();
        assert!(matches!(agent, ShimLock::Taken(_)));
        std::fs::remove_file(&launch).unwrap();
        drop(agent);
        let err = claim(&p, &launch, read).unwrap_err();
        assert!(err.contains("called off"), "{err}");

        // A new start of the same id wrote a new launch file: not this shim's.
        std::fs::write(&launch, br#"{"issued_ns":2}"#).unwrap();
        assert!(claim(&p, &launch, read).is_err());

        // The instance was deleted: its runtime directory is gone.
        std::fs::remove_dir_all(&p.run).unwrap();
        let err = claim(&p, &launch, read).unwrap_err();
        assert!(err.contains("gone"), "{err}");
    }
}
