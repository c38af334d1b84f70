//! Test harness: a cell agent in its own node network namespace (and its own
//! mount namespace), with RAII clean-up of everything a test makes.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use corral_cli::client::{Client, Response};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod cluster;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("CORRAL_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/corral-agent"))
}

pub fn rootfs() -> PathBuf {
    std::env::var_os("CORRAL_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/rootfs/busybox"))
}

/// A process's command line, read again while it is in the middle of an
/// execve: between the kernel installing the new image and laying out its
/// arguments, `cmdline` reads empty (a shim re-executing itself as its
/// monitor right after it reported the container running). Kernel threads
/// (no `exe`) and zombies read empty for good and are returned as such.
pub fn cmdline(pid: u32) -> Option<Vec<u8>> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let in_exec = cmd.is_empty() && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok();
        if !in_exec || Instant::now() >= deadline {
            return Some(cmd);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged tests must run as root (cargo xtask test)"
    );
    assert!(
        agent_bin().exists(),
        "build the agent first: {}",
        agent_bin().display()
    );
    assert!(
        rootfs().join("bin/busybox").exists(),
        "build the rootfs first: cargo xtask rootfs"
    );
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

/// Waits for a child; kills it (our own child, by pid) after `limit` so a
/// test that expects an exit never hangs.
pub fn wait_with_timeout(mut child: Child, limit: Duration) -> std::process::Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "process did not exit within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Runs `f` on a thread of its own that entered the network namespace
/// `netns` (a name under /run/netns), so that the sockets it opens live
/// there (a cell's 127.0.0.1). Only that thread changes namespace.
pub fn spawn_in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .unwrap_or_else(|e| panic!("open /run/netns/{netns}: {e}"));
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on a valid namespace fd; it changes only this
        // thread, which ends after `f`.
        #[allow(unsafe_code)]
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// [`spawn_in_netns`], waiting for its result.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(netns, f).join().unwrap()
}

/// An instance spec with the busybox rootfs.
pub fn spec(kind: &str, command: &[&str]) -> Value {
    json!({
        "tenant": "acme",
        "app": "app",
        "index": 0,
        "kind": kind,
        "rootfs": rootfs(),
        "command": command,
        "env": {},
        "resources": {"memory_mb": 32, "disk_mb": 64, "cpu_weight": 100, "max_pids": 64},
        "ports": []
    })
}

pub fn lrp(script: &str) -> Value {
    spec("lrp", &["/bin/sh", "-c", script])
}

pub fn task(script: &str) -> Value {
    spec("task", &["/bin/sh", "-c", script])
}

/// A cell: a node namespace, state directories and an agent.
pub struct Cell {
    pub name: String,
    pub netns: String,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub cgroup_root: String,
    pub client: Client,
    agent: Option<Child>,
    /// A command the agent runs under (e.g. `setpriv ... --`), if any.
    wrapper: Vec<String>,
    /// Holds the cell's private mount namespace across agent restarts, as
    /// the host's mount namespace does for a real node.
    mount_holder: Child,
}

impl Cell {
    pub fn start() -> Cell {
        Self::start_with("")
    }

    /// Starts a cell; `extra` is appended to the generated config.
    pub fn start_with(extra: &str) -> Cell {
        Self::start_named(&Self::new_name(), extra)
    }

    /// A fresh cell name (its cell id, and the base of its namespace names).
    pub fn new_name() -> String {
        format!(
            "ct{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        )
    }

    /// Starts a cell with this name (from [`Cell::new_name`]).
    pub fn start_named(name: &str, extra: &str) -> Cell {
        Self::start_full(name, extra, Vec::new())
    }

    /// Starts a cell whose agent runs under `wrapper` (a command that execs
    /// its arguments, such as `setpriv --bounding-set ... --`).
    pub fn start_wrapped(extra: &str, wrapper: Vec<String>) -> Cell {
        Self::start_full(&Self::new_name(), extra, wrapper)
    }

    fn start_full(name: &str, extra: &str, wrapper: Vec<String>) -> Cell {
        Self::start_prepared(name, extra, wrapper, |_| {})
    }

    /// Starts a cell; `prepare` runs once its namespaces and directories
    /// exist and before its agent starts (e.g. to mount a filesystem in
    /// the cell's mount namespace, through [`Cell::mount_ns_pid`]).
    pub fn start_prepared(
        name: &str,
        extra: &str,
        wrapper: Vec<String>,
        prepare: impl FnOnce(&Cell),
    ) -> Cell {
        require_root();
        let name = name.to_owned();
        let netns = format!("corral-{name}");
        let out = run("ip", &["netns", "add", &netns]);
        assert!(
            out.status.success(),
            "ip netns add: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        run("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        let dir = tempfile::Builder::new()
            .prefix("corral-test-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("agent.toml");
        let cgroup_root = format!("corral-{name}");
        let d = dir.path().display();
        let zone = if extra.contains("zone =") {
            ""
        } else {
            "zone = \"z1\"\n"
        };
        let text = format!(
            "cell_id = \"{name}\"\n{zone}data_dir = \"{d}/data\"\nrun_dir = \"{d}/run\"\n\
             cgroup_root = \"{cgroup_root}\"\nstop_grace_secs = 2\n{extra}\n"
        );
        // Sections given in `extra` win; add the defaults only where missing.
        let mut text = text;
        if !extra.contains("[api]") {
            text.push_str(&format!(
                "[api]\nlisten = \"off\"\nsocket = \"{d}/run/agent.sock\"\n"
            ));
        }
        if !extra.contains("[metrics]") {
            text.push_str("[metrics]\nlisten = \"off\"\n");
        }
        if !extra.contains("[capacity]") {
            text.push_str("[capacity]\nmemory_mb = 2048\ndisk_mb = 8192\nmax_containers = 50\n");
        }
        std::fs::write(&config, text).unwrap();
        let client = Client::unix(dir.path().join("run/agent.sock"))
            .with_timeout(Some(Duration::from_secs(90)));
        let mount_holder = Command::new("unshare")
            .args(["--mount", "--propagation", "slave", "sleep", "infinity"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Wait until the holder has entered its own mount namespace.
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", mount_holder.id()))
            .ok()
            .as_ref()
            == Some(&own)
        {
            assert!(
                Instant::now() < deadline,
                "unshare --mount did not take effect"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut cell = Cell {
            name,
            netns,
            dir,
            config,
            cgroup_root,
            client,
            agent: None,
            wrapper,
            mount_holder,
        };
        prepare(&cell);
        cell.spawn_agent();
        cell
    }

    /// A process in the cell's mount namespace (the agent's and its shims'),
    /// alive for the cell's whole life: `/proc/<it>/root/...` reaches paths
    /// as the agent sees them, `/proc/<it>/ns/mnt` enters the namespace.
    pub fn mount_ns_pid(&self) -> u32 {
        self.mount_holder.id()
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// Starts the agent inside the node's network namespace and a private
    /// mount namespace, and waits for /readyz.
    pub fn spawn_agent(&mut self) {
        self.spawn_agent_env(&[]);
        self.wait_ready();
    }

    /// Starts the agent with extra environment variables; returns at once.
    pub fn spawn_agent_env(&mut self, env: &[(&str, &std::ffi::OsStr)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(format!("--mount=/proc/{}/ns/mnt", self.mount_holder.id()))
            .args(&self.wrapper)
            .arg(agent_bin())
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.agent = Some(child);
    }

    /// Waits until the agent answers /readyz.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(c) = self.agent.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("agent exited early ({st}):\n{}", self.agent_log());
                }
            }
            if let Ok(r) = self.client.get("/readyz") {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's pid (nsenter and unshare exec it in place).
    pub fn agent_pid(&self) -> u32 {
        self.agent.as_ref().expect("agent running").id()
    }

    pub fn kill9_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait up to `limit` (SIGKILL after it); returns how
    /// long the agent took to exit.
    pub fn stop_agent_within(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        if let Some(mut c) = self.agent.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            while c.try_wait().unwrap().is_none() {
                if started.elapsed() > limit {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        started.elapsed()
    }

    pub fn stop_agent(&mut self) {
        if let Some(mut c) = self.agent.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn put(&self, id: &str, spec: &Value) -> Response {
        self.client
            .put_json(&format!("/v1/instances/{id}"), spec)
            .unwrap()
    }

    pub fn put_ok(&self, id: &str, spec: &Value) -> Value {
        let r = self.put(id, spec);
        assert!(
            r.is_success(),
            "PUT {id}: {} {}\n{}",
            r.status,
            r.text(),
            self.agent_log()
        );
        r.json().unwrap()
    }

    pub fn get(&self, id: &str) -> Value {
        let r = self.client.get(&format!("/v1/instances/{id}")).unwrap();
        assert_eq!(r.status, 200, "GET {id}: {}", r.text());
        r.json().unwrap()
    }

    pub fn delete(&self, id: &str) -> Value {
        let r = self
            .client
            .delete(&format!("/v1/instances/{id}?grace_secs=1"))
            .unwrap();
        assert_eq!(r.status, 200, "DELETE {id}: {}", r.text());
        r.json().unwrap()
    }

    pub fn logs(&self, id: &str) -> String {
        self.client
            .get(&format!("/v1/instances/{id}/logs"))
            .unwrap()
            .text()
    }

    pub fn metrics(&self) -> String {
        self.client.get("/metrics").unwrap().text()
    }

    /// Polls an instance until `pred` holds.
    pub fn wait_for(&self, id: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.get(id);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{id} never became {what}: {v:#}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_state(&self, id: &str, state: &str) -> Value {
        self.wait_for(id, state, |v| v["state"] == state)
    }

    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut found = vec![];
        for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let d = entry.path().join(&self.cgroup_root);
            if let Ok(rd) = std::fs::read_dir(&d) {
                found.extend(rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()));
            }
        }
        found
    }

    /// Processes (other than the agent) whose command line mentions this
    /// cell's directory: its shims and helpers.
    pub fn shim_pids(&self) -> Vec<u32> {
        let needle = self.dir.path().to_string_lossy().into_owned();
        let agent = self.agent.as_ref().map(|c| c.id());
        let mut pids = vec![];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if Some(pid) == agent {
                continue;
            }
            if let Some(cmd) = cmdline(pid) {
                if String::from_utf8_lossy(&cmd).contains(&needle) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// Asserts that no instance left anything behind: no instance cgroups,
    /// mounts, state directories, shims, or network interfaces.
    pub fn assert_clean(&self) {
        assert_eq!(
            self.cgroup_dirs(),
            Vec::<PathBuf>::new(),
            "leftover cgroups"
        );
        for d in [
            self.data().join("instances"),
            self.run_dir().join("instances"),
        ] {
            let left: Vec<_> = std::fs::read_dir(&d)
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "leftover state in {}: {left:?}",
                d.display()
            );
        }
        let needle = self.dir.path().to_string_lossy().into_owned();
        let mut mountinfos = vec![std::fs::read_to_string("/proc/self/mountinfo").unwrap()];
        mountinfos.push(
            std::fs::read_to_string(format!("/proc/{}/mountinfo", self.mount_holder.id()))
                .unwrap_or_default(),
        );
        for m in mountinfos {
            let left: Vec<_> = m.lines().filter(|l| l.contains(&needle)).collect();
            assert!(left.is_empty(), "leftover mounts: {left:?}");
        }
        assert_eq!(
            self.shim_pids(),
            Vec::<u32>::new(),
            "leftover shim processes"
        );
        let links = run("ip", &["-n", &self.netns, "-o", "link", "show"]);
        let links = String::from_utf8_lossy(&links.stdout).into_owned();
        assert_eq!(
            links.lines().count(),
            1,
            "only lo may exist in the node namespace: {links}"
        );
    }

    /// SIGKILLs every process in the cell's instance cgroups and waits (up
    /// to 5 s) until they are gone, so the cgroups can be removed.
    fn kill_cgroup_processes(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut pids = Vec::new();
            for d in self.cgroup_dirs() {
                if let Ok(text) = std::fs::read_to_string(d.join("cgroup.procs")) {
                    pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
                }
            }
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            for pid in pids {
                #[allow(unsafe_code)]
                // SAFETY: kill(2) on processes in cgroups this test's cell made.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Deletes every instance through the API.
    pub fn delete_all(&self) {
        if let Ok(r) = self.client.get("/v1/instances") {
            if let Ok(v) = r.json() {
                for i in v["instances"].as_array().cloned().unwrap_or_default() {
                    let id = i["id"].as_str().unwrap_or_default().to_owned();
                    let _ = self
                        .client
                        .delete(&format!("/v1/instances/{id}?grace_secs=0"));
                }
            }
        }
    }
}

impl Drop for Cell {
    fn drop(&mut self) {
        // Bring an agent back if a test killed it, so that instances are
        // stopped through the normal path; then remove everything.
        if self.agent.is_none() && !std::thread::panicking() {
            self.spawn_agent();
        } else if self.agent.is_none() {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.spawn_agent()));
        }
        self.delete_all();
        self.stop_agent();
        for pid in self.shim_pids() {
            // Last resort after a failed test: only processes of this cell.
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on pids whose command line names this test's directory.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        // A container whose shim is gone (killed above, or a brain that
        // kept placing while the cell was being emptied) keeps its cgroup:
        // end what runs in this cell's cgroups, which only this test made.
        self.kill_cgroup_processes();
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let d = entry.path().join(&self.cgroup_root);
            if let Ok(rd) = std::fs::read_dir(&d) {
                for sub in rd.flatten().filter(|e| e.path().is_dir()) {
                    let _ = std::fs::remove_dir(sub.path());
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
        let _ = self.mount_holder.kill();
        let _ = self.mount_holder.wait();
        let _ = run("ip", &["netns", "del", &self.netns]);
    }
}
