//! A cluster of node namespaces: a *fabric* namespace holding a bridge (the
//! nodes' shared network) and the brain, and cells attached to it by veth
//! pairs. Everything is made by the test and removed on drop.
//!
//! ```text
//!   fabric netns: br0 10.99.0.1/24, corral-brain (QUIC :7901, API :7900)
//!        │ veth                 │ veth
//!   cell netns: n0 10.99.0.2    cell netns: n0 10.99.0.3 ...
//! ```

use super::Cell;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static FABRICS: AtomicU32 = AtomicU32::new(0);

pub const ADMIN: &str = "admin-token-0123456789abcdef";
pub const ACME: &str = "acme-token-0123456789abcdef";
pub const GLOBEX: &str = "globex-token-0123456789abcdef";
pub const BRAIN_IP: &str = "10.99.0.1";
/// The brain's `[network] vip_range`: apps' service addresses.
pub const VIP_RANGE: &str = "10.96.0.0/24";
pub const QUIC_PORT: u16 = 7901;
pub const API_PORT: u16 = 7900;

/// `$CORRAL_BRAIN_BIN`, else the brain built next to the agent under test
/// (so a `CARGO_TARGET_DIR` build is found through `$CORRAL_AGENT_BIN`).
pub fn brain_bin() -> PathBuf {
    std::env::var_os("CORRAL_BRAIN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::agent_bin().with_file_name("corral-brain"))
}

/// `$CORRAL_CLI_BIN`, else the CLI built next to the agent under test.
pub fn cli_bin() -> PathBuf {
    std::env::var_os("CORRAL_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| super::agent_bin().with_file_name("corral"))
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The nodes' network and the brain.
pub struct Fabric {
    pub netns: String,
    pub dir: tempfile::TempDir,
    brain: Option<Child>,
    /// Cell netns → host index, for the veths made.
    attached: Vec<(String, u32)>,
    next: u32,
}

impl Fabric {
    /// A fabric namespace with its bridge, and certificates for a brain and
    /// for the cells `cells` (ids). The brain is not started yet.
    pub fn new(cells: &[&str]) -> Fabric {
        let netns = format!(
            "corral-f{}x{}",
            std::process::id(),
            FABRICS.fetch_add(1, Ordering::SeqCst)
        );
        ok("ip", &["netns", "add", &netns]);
        let fabric = Fabric {
            netns: netns.clone(),
            dir: tempfile::Builder::new()
                .prefix("corral-fabric-")
                .tempdir()
                .unwrap(),
            brain: None,
            attached: Vec::new(),
            next: 2,
        };
        ok("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        ok(
            "ip",
            &["-n", &netns, "link", "add", "br0", "type", "bridge"],
        );
        ok(
            "ip",
            &[
                "-n",
                &netns,
                "addr",
                "add",
                &format!("{BRAIN_IP}/24"),
                "dev",
                "br0",
            ],
        );
        ok("ip", &["-n", &netns, "link", "set", "br0", "up"]);
        let certs = fabric.certs();
        let c = certs.to_str().unwrap();
        let brain = |args: &[&str]| {
            let o = sh(brain_bin().to_str().unwrap(), args);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        };
        brain(&["certs", "init", "--dir", c]);
        brain(&["certs", "issue", "--dir", c, "--brain", "b1"]);
        for cell in cells {
            brain(&["certs", "issue", "--dir", c, "--cell", cell]);
        }
        let d = fabric.dir.path().display();
        std::fs::write(
            fabric.dir.path().join("brain.toml"),
            format!(
                "brain_id = \"b1\"\ndata_dir = \"{d}/data\"\ncell_lost_grace_secs = 4\n\
                 [api]\nlisten = \"{BRAIN_IP}:{API_PORT}\"\n[quic]\nlisten = \"{BRAIN_IP}:{QUIC_PORT}\"\n\
                 [tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/brain-b1.pem\"\nkey = \"{c}/brain-b1-key.pem\"\n\
                 [network]\nvip_range = \"{VIP_RANGE}\"\n\
                 [tokens]\nadmin = \"{ADMIN}\"\n\
                 [[tokens.tenant]]\ntenant = \"acme\"\ntoken = \"{ACME}\"\n\
                 [[tokens.tenant]]\ntenant = \"globex\"\ntoken = \"{GLOBEX}\"\n"
            ),
        )
        .unwrap();
        fabric
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    /// The `[brain]` table (and zone) for a cell's agent config.
    pub fn agent_config(&self, cell: &str, zone: &str) -> String {
        self.agent_config_with(cell, zone, &self.certs())
    }

    /// Like [`agent_config`](Self::agent_config), with certificates from
    /// another directory (another CA).
    pub fn agent_config_with(&self, cell: &str, zone: &str, certs: &Path) -> String {
        let c = certs.display();
        format!(
            "zone = \"{zone}\"\n[brain]\naddresses = [\"{BRAIN_IP}:{QUIC_PORT}\"]\n\
             ca = \"{c}/ca.pem\"\ncert = \"{c}/cell-{cell}.pem\"\nkey = \"{c}/cell-{cell}-key.pem\"\n"
        )
    }

    pub fn brain_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("brain.log")).unwrap_or_default()
    }

    pub fn start_brain(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("brain.log"))
            .unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(brain_bin())
            .arg("--config")
            .arg(self.dir.path().join("brain.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.brain = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.cli(&["cells"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "brain not answering:\n{}",
                self.brain_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL to the brain (nsenter execs it in place, so the child is
    /// the brain), and reap it.
    pub fn kill9_brain(&mut self) {
        if let Some(mut c) = self.brain.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait; SIGKILL after 15 s.
    pub fn stop_brain(&mut self) {
        if let Some(mut c) = self.brain.take() {
            #[allow(unsafe_code)]
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Connects a cell's node namespace to the bridge: `n0` in the cell,
    /// with the next address of 10.99.0.0/24.
    pub fn attach(&mut self, cell: &Cell) -> String {
        let host = self.next;
        self.next += 1;
        let outer = format!("fb{}x{host}", std::process::id() % 100_000);
        ok(
            "ip",
            &[
                "-n",
                &self.netns,
                "link",
                "add",
                &outer,
                "type",
                "veth",
                "peer",
                "name",
                "n0",
                "netns",
                &cell.netns,
            ],
        );
        ok(
            "ip",
            &["-n", &self.netns, "link", "set", &outer, "master", "br0"],
        );
        ok("ip", &["-n", &self.netns, "link", "set", &outer, "up"]);
        let ip = format!("10.99.0.{host}");
        ok(
            "ip",
            &[
                "-n",
                &cell.netns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "n0",
            ],
        );
        ok("ip", &["-n", &cell.netns, "link", "set", "n0", "up"]);
        self.attached.push((cell.netns.clone(), host));
        ip
    }

    /// Takes a cell's node off the network (its link down), or back.
    pub fn set_link(&self, cell: &Cell, up: bool) {
        ok(
            "ip",
            &[
                "-n",
                &cell.netns,
                "link",
                "set",
                "n0",
                if up { "up" } else { "down" },
            ],
        );
    }

    /// Removes a cell's veth (before the cell checks it left nothing).
    pub fn detach(&mut self, cell: &Cell) {
        let _ = sh("ip", &["-n", &cell.netns, "link", "del", "n0"]);
        self.attached.retain(|(n, _)| n != &cell.netns);
    }

    /// Runs `corral` against the brain, inside the fabric namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(cli_bin())
            .args(["--brain", &format!("http://{BRAIN_IP}:{API_PORT}")])
            .args(["--token", ADMIN])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `corral` against the brain and asserts it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "corral {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `corral ... -o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        let o = self.cli(&all);
        assert!(
            o.status.success(),
            "corral {args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "corral {args:?}: {e}: {}",
                String::from_utf8_lossy(&o.stdout)
            )
        })
    }

    /// Polls until `pred` holds for `corral ... -o json`, or panics.
    pub fn wait_json(&self, args: &[&str], what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.cli_json(args);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v}\nbrain log:\n{}",
                self.brain_log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.stop_brain();
        for (netns, _) in std::mem::take(&mut self.attached) {
            let _ = sh("ip", &["-n", &netns, "link", "del", "n0"]);
        }
        let _ = sh("ip", &["netns", "del", &self.netns]);
    }
}

impl Fabric {
    /// Waits until the brain lists `n` connected cells.
    pub fn wait_connected(&self, n: usize) -> Value {
        self.wait_json(&["cells"], &format!("{n} connected cells"), |v| {
            v["cells"]
                .as_array()
                .is_some_and(|l| l.iter().filter(|c| c["state"] == "connected").count() == n)
        })
    }
}

/// A brain and cells in node namespaces, every cell connected. The fabric
/// is the first field, so it is dropped first: a failing test stops the
/// brain before the cells are emptied.
pub struct Cluster {
    pub fabric: Fabric,
    pub cells: Vec<Cell>,
    /// Each cell's node address on the bridge, in the order of `cells`.
    pub addrs: Vec<String>,
}

impl Cluster {
    /// `n` cells in zones z1, z2, …; `config(i, name, &fabric)` is cell
    /// i's extra configuration (its `[brain]` table included).
    pub fn start(n: usize, config: impl Fn(usize, &str, &Fabric) -> String) -> Cluster {
        let names: Vec<String> = (0..n).map(|_| Cell::new_name()).collect();
        let ids: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut fabric = Fabric::new(&ids);
        fabric.start_brain();
        let mut cluster = Cluster {
            fabric,
            cells: Vec::new(),
            addrs: Vec::new(),
        };
        for (i, name) in names.iter().enumerate() {
            let cell = Cell::start_named(name, &config(i, name, &cluster.fabric));
            cluster.addrs.push(cluster.fabric.attach(&cell));
            cluster.cells.push(cell);
        }
        cluster.fabric.wait_connected(n);
        cluster
    }

    /// `n` cells, cell i with the instance subnet 10.244.(i+1).0/24.
    pub fn with_subnets(n: usize) -> Cluster {
        Cluster::start(n, |i, name, fabric| {
            format!(
                "{}[network]\nsubnet = \"10.244.{}.0/24\"\n",
                fabric.agent_config(name, &format!("z{}", i + 1)),
                i + 1
            )
        })
    }
}
