//! A cell agent running in a network namespace of its own (entered with
//! `nsenter --net`), for the demo and the benchmarks, and the guard that
//! removes everything again.
//!
//! Everything the sandbox creates is named after our pid (`<prefix>-<pid>`):
//! the network namespace, the state directory under /tmp and the agent's
//! cgroup root. Cleanup only ever touches those, the agent process we
//! spawned, and processes inside that namespace or those cgroups. It runs
//! exactly once, from whichever comes first: the guard's `Drop` (normal end
//! or error) or the SIGINT/SIGTERM/SIGHUP handler.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::http::Client;
use crate::util::{self, fmt_duration};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Capacity {
    pub memory_mb: u64,
    pub disk_mb: u64,
    pub max_containers: u64,
}

pub struct Spec {
    /// Names the namespace, state dir and cgroup root: `<prefix>-<pid>`.
    pub prefix: &'static str,
    pub cell_id: &'static str,
    pub agent_bin: PathBuf,
    pub stop_grace_secs: u64,
    pub capacity: Capacity,
    /// The cell's instance subnet (`[network] subnet`); None: instances get
    /// a network namespace with loopback only (as `runc run` does).
    pub subnet: Option<&'static str>,
}

/// The agent binary to run: `$CORRAL_AGENT_BIN` (as for the privileged
/// tests), used as it is, or the workspace's own build for `profile` (in
/// `$CARGO_TARGET_DIR` when set, as cargo builds it), built
/// first with `cargo build <build_args>`.
pub fn build_agent(profile: &str, build_args: &[&str]) -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CORRAL_AGENT_BIN") {
        let bin = PathBuf::from(bin);
        println!(
            "\n==> using CORRAL_AGENT_BIN={} (not building)",
            bin.display()
        );
        return Ok(bin);
    }
    util::step(&format!("building the workspace ({profile})"), || {
        util::run(util::cargo().arg("build").args(build_args))
    })?;
    Ok(util::target_dir().join(profile).join("corral-agent"))
}

pub struct Sandbox {
    cleanup: Arc<Cleanup>,
    pub client: Client,
    pub agent_pid: u32,
    pub agent_bin: PathBuf,
    pub netns: String,
    /// The sandbox's state directory; removed with everything in it.
    pub dir: PathBuf,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.cleanup.run();
        lock(active()).retain(|c| !Arc::ptr_eq(c, &self.cleanup));
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether a termination signal arrived and its handler is cleaning up.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Called when the main thread fails because the handler pulled the agent
/// away: give the handler time to finish; it exits the process itself.
pub fn wait_for_interrupt_exit() -> std::process::ExitCode {
    thread::sleep(STOP_TIMEOUT * 6);
    std::process::ExitCode::from(130)
}

fn active() -> &'static Mutex<Vec<Arc<Cleanup>>> {
    static ACTIVE: Mutex<Vec<Arc<Cleanup>>> = Mutex::new(Vec::new());
    &ACTIVE
}

type Hook = Box<dyn Fn() + Send>;

fn hooks() -> &'static Mutex<Vec<(u64, Hook)>> {
    static HOOKS: Mutex<Vec<(u64, Hook)>> = Mutex::new(Vec::new());
    &HOOKS
}

/// Registers clean-up that an interrupt runs before the sandboxes' own
/// (e.g. stopping a brain that would otherwise re-place what the cells are
/// deleting). Returns a key for [`unregister_hook`].
pub fn register_hook(hook: impl Fn() + Send + 'static) -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let key = NEXT.fetch_add(1, Ordering::SeqCst);
    lock(hooks()).push((key, Box::new(hook)));
    key
}

pub fn unregister_hook(key: u64) {
    lock(hooks()).retain(|(k, _)| *k != key);
}

/// Installs the Ctrl-C handler that runs the hooks and the sandboxes' clean-up
/// (once; [`Sandbox::start`] does it too).
pub fn install_signal_handler() -> Result<()> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    if INSTALLED.get().is_some() {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        let cleanup: Vec<Arc<Cleanup>> = lock(active()).clone();
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: exiting without finishing the cleanup");
            for c in &cleanup {
                eprintln!(
                    "left behind (maybe): network namespace {} (`ip netns del {}`), {}",
                    c.netns,
                    c.netns,
                    c.dir.display()
                );
            }
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: cleaning up (Ctrl-C again to give up)");
        // On a thread of its own: this handler thread must stay free to
        // receive the second Ctrl-C.
        thread::spawn(move || {
            for (_, hook) in lock(hooks()).iter() {
                hook();
            }
            for c in cleanup.iter().rev() {
                c.run();
            }
            std::process::exit(130);
        });
    })
    .context("install the Ctrl-C handler")?;
    let _ = INSTALLED.set(());
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Sandbox {
    pub fn start(spec: &Spec) -> Result<Self> {
        Self::start_with(spec, "")
    }

    /// Like [`Sandbox::start`], with `extra` appended to the agent's config
    /// (a `zone = ...` in it replaces the default zone).
    pub fn start_with(spec: &Spec, extra: &str) -> Result<Self> {
        install_signal_handler()?;
        let name = format!("{}-{}", spec.prefix, std::process::id());
        let dir = std::env::temp_dir().join(&name);
        // Checked before the cleanup guard exists: these are not ours to remove.
        if dir.exists() {
            bail!(
                "{} already exists (left from an earlier run?): remove it first",
                dir.display()
            );
        }
        if Path::new("/run/netns").join(&name).exists() {
            bail!("network namespace {name} already exists: remove it with `ip netns del {name}`");
        }
        let socket = dir.join("run/agent.sock");
        let log = dir.join("agent.log");
        let pins = Path::new("/sys/fs/bpf/corral").join(spec.cell_id);
        let cleanup = Arc::new(Cleanup {
            netns: name.clone(),
            dir: dir.clone(),
            cgroup_root: name.clone(),
            client: Client::new(&socket).with_timeout(Duration::from_secs(30)),
            log: log.clone(),
            kept_log: util::workspace_root()
                .join(format!("target/xtask/{}-agent.log", spec.prefix)),
            new_bpf_pins: (!pins.exists()).then_some(pins),
            state: Mutex::new(State::default()),
        });
        // Registered before anything exists, so an interrupt at any point
        // below finds and removes whatever was created so far.
        lock(active()).push(Arc::clone(&cleanup));
        let mut sandbox = Sandbox {
            cleanup: Arc::clone(&cleanup),
            client: Client::new(&socket),
            agent_pid: 0,
            agent_bin: spec.agent_bin.clone(),
            netns: name.clone(),
            dir: dir.clone(),
        };

        for sub in ["data", "run"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        }
        println!("state dir:      {}", dir.display());

        util::run(Command::new("ip").args(["netns", "add", &name]))?;
        util::run(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]))?;
        println!("netns:          {name} (loopback only)");

        let config = dir.join("agent.toml");
        let mut text = agent_config(spec, &name, &dir, &socket);
        if extra.contains("zone =") {
            text = text.replace("zone = \"z1\"\n", "");
        }
        // Top-level keys of `extra` go first: after a table header they
        // would belong to that table.
        let (top, tables) = extra.split_at(extra.find('[').unwrap_or(extra.len()));
        text = format!("{top}{text}{tables}");
        fs::write(&config, text).with_context(|| format!("write {}", config.display()))?;
        println!("agent config:   {}", config.display());
        println!("agent log:      {}", log.display());

        sandbox.agent_pid = cleanup.spawn_agent(&spec.agent_bin, &config)?;
        println!("agent pid:      {}", sandbox.agent_pid);
        sandbox.wait_ready()?;
        Ok(sandbox)
    }

    fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        let probe = self.client.clone().with_timeout(Duration::from_secs(2));
        loop {
            if let Some(status) = self.cleanup.agent_exit_status() {
                self.cleanup.print_log_tail();
                bail!("the agent exited during start-up ({status}); its log is above");
            }
            if let Ok(r) = probe.get("/readyz") {
                if r.status == 200 {
                    println!("agent ready after {}", fmt_duration(start.elapsed()));
                    return Ok(());
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                self.cleanup.print_log_tail();
                bail!(
                    "the agent did not answer GET /readyz with 200 within {}s; its log is above",
                    READY_TIMEOUT.as_secs()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

fn agent_config(spec: &Spec, name: &str, dir: &Path, socket: &Path) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string(); // a valid TOML basic string
    let p = |v: &Path| s(&v.to_string_lossy());
    format!(
        "# written by cargo xtask for a throw-away sandbox\n\
         cell_id = {cell}\n\
         zone = \"z1\"\n\
         data_dir = {data}\n\
         run_dir = {run}\n\
         cgroup_root = {cgroup}\n\
         stop_grace_secs = {grace}\n\
         \n[api]\nlisten = \"127.0.0.1:7800\"\nsocket = {socket}\n\
         \n[metrics]\nlisten = \"127.0.0.1:9800\"\n\
         \n[capacity]\nmemory_mb = {mem}\ndisk_mb = {disk}\nmax_containers = {max}\n{net}",
        cell = s(spec.cell_id),
        data = p(&dir.join("data")),
        run = p(&dir.join("run")),
        cgroup = s(name),
        grace = spec.stop_grace_secs,
        socket = p(socket),
        mem = spec.capacity.memory_mb,
        disk = spec.capacity.disk_mb,
        max = spec.capacity.max_containers,
        net = spec
            .subnet
            .map(|n| format!("\n[network]\nsubnet = {}\n", s(n)))
            .unwrap_or_default(),
    )
}

#[derive(Default)]
struct State {
    done: bool,
    agent: Option<Child>,
}

struct Cleanup {
    netns: String,
    dir: PathBuf,
    cgroup_root: String,
    client: Client,
    log: PathBuf,
    kept_log: PathBuf,
    /// The agent's bpffs pin directory, if it did not exist before we started.
    new_bpf_pins: Option<PathBuf>,
    state: Mutex<State>,
}

impl Cleanup {
    fn spawn_agent(&self, bin: &Path, config: &Path) -> Result<u32> {
        let log = fs::File::create(&self.log)
            .with_context(|| format!("create {}", self.log.display()))?;
        let log_err = log.try_clone().context("duplicate the log file handle")?;
        // Not `ip netns exec`: that mounts a fresh sysfs on /sys, which hides
        // /sys/fs/cgroup from the agent. nsenter switches the network
        // namespace and `unshare --mount` gives the agent a private mount
        // namespace (a copy of the host's, with /sys/fs/cgroup), so the bpffs,
        // overlay and disk mounts it makes vanish with it and its shims. Both
        // exec in place, so the child's pid is the agent's.
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .args(["unshare", "--mount", "--propagation", "slave"])
            .arg(bin)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            // Out of the terminal's process group: Ctrl-C reaches only us, and
            // we stop the agent in order, after its instances.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches only the child.
        unsafe {
            cmd.pre_exec(|| {
                // If xtask dies without cleaning up, the agent still stops.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Spawned under the lock so that the signal handler either runs
        // before (and we find `done`) or after (and finds the child).
        let mut state = lock(&self.state);
        if state.done {
            bail!("interrupted");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start `{}`", util::display(&cmd)))?;
        let pid = child.id();
        state.agent = Some(child);
        Ok(pid)
    }

    fn agent_exit_status(&self) -> Option<std::process::ExitStatus> {
        let mut state = lock(&self.state);
        state
            .agent
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn print_log_tail(&self) {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        eprintln!(
            "--- last {} lines of {} ---",
            tail.len(),
            self.log.display()
        );
        for line in tail {
            eprintln!("{line}");
        }
        eprintln!("---");
    }

    /// Idempotent; every step is best effort and says what is left behind
    /// if it fails.
    fn run(&self) {
        let mut state = lock(&self.state);
        if state.done {
            return;
        }
        state.done = true;
        println!("\n==> cleaning up sandbox {}", self.netns);
        let start = Instant::now();

        if let Some(mut agent) = state.agent.take() {
            if matches!(agent.try_wait(), Ok(None)) {
                // The agent leaves instances running when it stops (so that it
                // can restart under them); delete them first.
                self.delete_all_instances();
                stop_agent(&mut agent);
            }
            if let Some(parent) = self.kept_log.parent() {
                let _ = fs::create_dir_all(parent);
            }
            if fs::copy(&self.log, &self.kept_log).is_ok() {
                println!("agent log kept at {}", self.kept_log.display());
            }
        }
        self.kill_leftovers();
        let netns_path = Path::new("/run/netns").join(&self.netns);
        if netns_path.exists() {
            if let Err(e) = util::run(Command::new("ip").args(["netns", "del", &self.netns])) {
                eprintln!(
                    "warning: {e:#}: remove it with `ip netns del {}`",
                    self.netns
                );
            }
        }
        if let Some(pins) = self.new_bpf_pins.as_deref().filter(|p| p.exists()) {
            if let Err(e) = fs::remove_dir_all(pins) {
                eprintln!("warning: remove bpf pins {}: {e}", pins.display());
            }
            if let Some(parent) = pins.parent() {
                let _ = fs::remove_dir(parent); // only if empty
            }
        }
        // remove_dir_all would descend into a mount that is still there, such
        // as a bind mount of the shared rootfs, and delete its files.
        if self.dir.exists() && release_mounts_and_loops(&self.dir) {
            if let Err(e) = fs::remove_dir_all(&self.dir) {
                eprintln!(
                    "warning: remove {}: {e}: remove it with `rm -rf {}`",
                    self.dir.display(),
                    self.dir.display()
                );
            }
        }
        println!("    cleanup done ({})", fmt_duration(start.elapsed()));
    }

    fn delete_all_instances(&self) {
        let ids = match self.client.get("/v1/instances").and_then(|r| {
            let v = r.json()?;
            Ok(instance_ids(&v))
        }) {
            Ok(ids) => ids,
            Err(e) => {
                eprintln!("warning: could not list instances to delete them: {e:#}");
                return;
            }
        };
        if ids.is_empty() {
            return;
        }
        println!("deleting {} remaining instance(s)", ids.len());
        // A hung agent must not hold the cleanup up for long.
        let deadline = Instant::now() + Duration::from_secs(60);
        let failed = parallel(&ids, 8, |id| {
            if Instant::now() > deadline {
                bail!("skipped: cleanup deadline passed");
            }
            self.client
                .delete(&format!("/v1/instances/{id}"))
                .map(|_| ())
        });
        for (id, e) in failed {
            eprintln!("warning: DELETE /v1/instances/{id}: {e:#}");
        }
    }

    /// Whatever outlived the agent and is provably ours: processes in our
    /// network namespace (shims), processes in our cgroups (containers).
    fn kill_leftovers(&self) {
        for pid in pids_in_netns(&self.netns) {
            println!(
                "killing leftover process {pid} ({})",
                cmdline(pid).join(" ")
            );
            kill(pid, libc::SIGKILL);
        }
        remove_cgroups(&self.cgroup_root);
    }
}

fn stop_agent(agent: &mut Child) {
    let pid = agent.id();
    print!("stopping agent {pid} (SIGTERM) ... ");
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let Ok(raw) = i32::try_from(pid) else { return };
    kill(raw, libc::SIGTERM);
    let start = Instant::now();
    while start.elapsed() < STOP_TIMEOUT {
        match agent.try_wait() {
            Ok(Some(status)) => {
                println!("exited ({status}) after {}", fmt_duration(start.elapsed()));
                return;
            }
            Ok(None) => thread::sleep(Duration::from_millis(50)),
            Err(_) => break,
        }
    }
    println!(
        "still running after {}s, sending SIGKILL",
        STOP_TIMEOUT.as_secs()
    );
    let _ = agent.kill();
    let _ = agent.wait();
}

fn kill(pid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions; callers pass only
    // pids they own (our child, not yet reaped) or found inside our sandbox.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Processes whose network namespace is the named one (under /run/netns).
fn pids_in_netns(netns: &str) -> Vec<i32> {
    let Ok(meta) = fs::metadata(Path::new("/run/netns").join(netns)) else {
        return Vec::new();
    };
    let ns = format!("net:[{}]", meta.ino());
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|pid: &i32| {
            fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.as_os_str() == ns.as_str())
        })
        .collect()
}

pub fn cmdline(pid: i32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Shims: processes running the agent binary with `shim` as first argument,
/// inside `netns`.
pub fn shim_pids(agent_bin: &Path, netns: &str) -> Vec<i32> {
    pids_in_netns(netns)
        .into_iter()
        .filter(|pid| {
            let args = cmdline(*pid);
            let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
            let is_agent = exe.as_deref() == Some(agent_bin)
                || args.first().is_some_and(|a| Path::new(a) == agent_bin);
            // `shim` until the container runs, `shim-monitor` after.
            is_agent
                && args
                    .get(1)
                    .is_some_and(|a| a == "shim" || a == "shim-monitor")
        })
        .collect()
}

/// VmRSS of a process in KiB.
pub fn vm_rss_kib(pid: i32) -> Result<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// A `<field> N kB` line of /proc/<pid>/<file> (status, smaps_rollup).
pub fn proc_kib(pid: i32, file: &str, field: &str) -> Result<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}"))
        .with_context(|| format!("read /proc/{pid}/{file}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/{file}"))
}

/// Kills what is in the cgroups named `root` in every hierarchy (hybrid v1 +
/// cgroup2, or pure cgroup2) and removes them, innermost first.
fn remove_cgroups(root: &str) {
    let base = Path::new("/sys/fs/cgroup");
    let mut tops = vec![base.join(root)];
    if let Ok(entries) = fs::read_dir(base) {
        tops.extend(entries.flatten().map(|e| e.path().join(root)));
    }
    let mut seen = std::collections::HashSet::new();
    let tops: Vec<PathBuf> = tops
        .into_iter()
        .filter_map(|t| fs::canonicalize(t).ok())
        .filter(|t| seen.insert(t.clone()))
        .collect();
    if tops.is_empty() {
        return;
    }
    for attempt in 0..50 {
        let mut dirs = Vec::new();
        for top in &tops {
            collect_dirs(top, &mut dirs);
        }
        if dirs.is_empty() {
            return;
        }
        // The same process shows up once per hierarchy.
        let mut procs = std::collections::BTreeSet::new();
        for dir in &dirs {
            // A frozen process does not die until thawed.
            let _ = fs::write(dir.join("freezer.state"), "THAWED");
            let _ = fs::write(dir.join("cgroup.freeze"), "0");
            let text = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            procs.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        for pid in procs {
            if attempt == 0 {
                println!(
                    "killing leftover process {pid} ({})",
                    cmdline(pid).join(" ")
                );
            }
            kill(pid, libc::SIGKILL);
        }
        // Deepest first: a cgroup can only be removed once its children are.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in &dirs {
            let _ = fs::remove_dir(dir);
        }
        thread::sleep(Duration::from_millis(100));
    }
    for top in tops.iter().filter(|t| t.exists()) {
        eprintln!("warning: could not remove cgroup {}", top.display());
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

/// Unmounts whatever the agent left mounted under `dir` (overlays, the
/// quota filesystem) and detaches loop devices backed by files in it.
/// Returns whether `dir` is free of mounts, and so safe to delete.
fn release_mounts_and_loops(dir: &Path) -> bool {
    let mut mounts = mounts_under(dir);
    // Innermost first.
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in mounts {
        println!("unmounting leftover {m}");
        if let Err(e) = util::run(Command::new("umount").args(["-l", &m])) {
            eprintln!("warning: {e:#}");
        }
    }
    if let Ok(blocks) = fs::read_dir("/sys/block") {
        for dev in blocks.flatten() {
            let name = dev.file_name().to_string_lossy().into_owned();
            let backing =
                fs::read_to_string(dev.path().join("loop/backing_file")).unwrap_or_default();
            let backing = backing.trim().trim_end_matches(" (deleted)");
            if name.starts_with("loop") && is_under(Path::new(backing), dir) {
                let dev = format!("/dev/{name}");
                println!("detaching leftover {dev} ({backing})");
                if let Err(e) = util::run(Command::new("losetup").args(["-d", &dev])) {
                    eprintln!("warning: {e:#}");
                }
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!(
            "warning: not removing {}: still mounted: {}",
            dir.display(),
            left.join(", ")
        );
    }
    left.is_empty()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| is_under(Path::new(p), dir))
        .collect()
}

fn is_under(path: &Path, dir: &Path) -> bool {
    path.is_absolute() && path.starts_with(dir)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut rest = p;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

pub fn instance_ids(list: &serde_json::Value) -> Vec<String> {
    list.get("instances")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|i| i.get("id").and_then(|v| v.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` over `items` on `threads` threads; returns the failures.
pub fn parallel<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Vec<(&T, anyhow::Error)> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    thread::scope(|s| {
        for _ in 0..threads.min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(item) = items.get(i) else { break };
                if let Err(e) = f(item) {
                    lock(&failures).push((item, e));
                }
            });
        }
    });
    failures.into_inner().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mount_path(r"/tmp/a\040b\134c"), r"/tmp/a b\c");
        assert_eq!(unescape_mount_path(r"/plain"), "/plain");
        assert_eq!(unescape_mount_path(r"/odd\x"), r"/odd\x");
    }

    #[test]
    fn config_is_what_the_agent_expects() {
        let spec = Spec {
            prefix: "corral-demo",
            cell_id: "demo-cell-1",
            agent_bin: PathBuf::from("/x/corral-agent"),
            stop_grace_secs: 2,
            capacity: Capacity {
                memory_mb: 4096,
                disk_mb: 10240,
                max_containers: 250,
            },
            subnet: Some("10.244.1.0/24"),
        };
        let text = agent_config(
            &spec,
            "corral-demo-7",
            Path::new("/tmp/d"),
            Path::new("/tmp/d/run/agent.sock"),
        );
        for line in [
            "cell_id = \"demo-cell-1\"",
            "data_dir = \"/tmp/d/data\"",
            "cgroup_root = \"corral-demo-7\"",
            "stop_grace_secs = 2",
            "subnet = \"10.244.1.0/24\"",
            "socket = \"/tmp/d/run/agent.sock\"",
            "max_containers = 250",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
