//! The cluster part of `cargo xtask demo`: a brain and two cells, each in
//! its own node namespace, joined by a bridge in a *fabric* namespace that
//! also holds the brain; apps of two tenants pushed, scaled and deleted
//! through the `corral` CLI.
//!
//! ```text
//!   fabric netns: br0 10.99.0.1/24 ── corral-brain (QUIC :7901, API :7900)
//!        │ veth                    │ veth
//!   demo-cell-1 (z1) 10.99.0.11    demo-cell-2 (z2) 10.99.0.12
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::sandbox::{self, Capacity, Sandbox, Spec};
use crate::util::{self, workspace_root};

const BRAIN_IP: &str = "10.99.0.1";
const ADMIN: &str = "demo-admin-token-0123456789";

/// The fabric namespace and the brain in it; removed on drop (and on
/// Ctrl-C, through a sandbox hook).
struct Fabric {
    netns: String,
    dir: PathBuf,
    brain: Option<Child>,
    hook: u64,
}

fn del_netns(netns: &str) {
    if Path::new("/run/netns").join(netns).exists() {
        let _ = Command::new("ip").args(["netns", "del", netns]).status();
    }
}

fn kill_pid(pid: u32, signal: i32) {
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the pid of a child this process spawned.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

impl Fabric {
    fn start() -> Result<Fabric> {
        let netns = format!("corral-demo-fabric-{}", std::process::id());
        let dir = std::env::temp_dir().join(&netns);
        if dir.exists() {
            bail!(
                "{} exists (left from an earlier run?): remove it first",
                dir.display()
            );
        }
        std::fs::create_dir_all(&dir)?;
        let hook = {
            let netns = netns.clone();
            sandbox::register_hook(move || del_netns(&netns))
        };
        let mut fabric = Fabric {
            netns: netns.clone(),
            dir: dir.clone(),
            brain: None,
            hook,
        };
        let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
        ip(&["netns", "add", &netns])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        ip(&["-n", &netns, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{BRAIN_IP}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &netns, "link", "set", "br0", "up"])?;
        println!("fabric netns:   {netns} (bridge br0 {BRAIN_IP}/24)");

        let certs = dir.join("certs");
        let v = corral_brain::certs::Validity::days_from(SystemTime::now(), 1);
        corral_brain::certs::init(&certs, v, false)?;
        let brain_id = corral_proto::wire::BrainId::new("demo-brain")?;
        corral_brain::certs::issue(
            &certs,
            &corral_brain::PeerIdentity::Brain(brain_id),
            v,
            false,
        )?;
        for cell in ["demo-cell-1", "demo-cell-2"] {
            let who = corral_brain::PeerIdentity::Cell(corral_proto::CellId::new(cell)?);
            corral_brain::certs::issue(&certs, &who, v, false)?;
        }
        println!(
            "certificates:   {} (cluster CA, brain, two cells)",
            certs.display()
        );
        let c = certs.display();
        let config = dir.join("brain.toml");
        std::fs::write(
            &config,
            format!(
                "brain_id = \"demo-brain\"\ndata_dir = \"{d}/data\"\ncell_lost_grace_secs = 5\n\
                 [api]\nlisten = \"{BRAIN_IP}:7900\"\n[quic]\nlisten = \"{BRAIN_IP}:7901\"\n\
                 [tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/brain-demo-brain.pem\"\nkey = \"{c}/brain-demo-brain-key.pem\"\n\
                 [network]\nvip_range = \"10.96.0.0/24\"\n\
                 [tokens]\nadmin = \"{ADMIN}\"\n",
                d = dir.display()
            ),
        )?;
        let log = std::fs::File::create(dir.join("brain.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(workspace_root().join("target/debug/corral-brain"))
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start corral-brain")?;
        println!(
            "brain pid:      {} (log {})",
            child.id(),
            dir.join("brain.log").display()
        );
        let pid = child.id();
        fabric.brain = Some(child);
        // An interrupt stops the brain first, so that it does not re-place
        // what the cells are deleting.
        sandbox::unregister_hook(fabric.hook);
        fabric.hook = {
            let netns = netns.clone();
            sandbox::register_hook(move || {
                kill_pid(pid, libc::SIGTERM);
                thread::sleep(Duration::from_secs(1));
                del_netns(&netns);
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !fabric.corral_quiet(&["cells"]) {
            if Instant::now() > deadline {
                bail!(
                    "the brain did not answer; its log: {}",
                    dir.join("brain.log").display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        Ok(fabric)
    }

    fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    fn cli(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg(workspace_root().join("target/debug/corral"))
            .args(["--brain", &format!("http://{BRAIN_IP}:7900")])
            .env("CORRAL_TOKEN", ADMIN);
        cmd
    }

    /// `corral ARGS`, its output shown as a user would see it.
    fn corral(&self, args: &[&str]) -> Result<()> {
        println!("\n$ corral {}", args.join(" "));
        let status = self.cli().args(args).status()?;
        if !status.success() {
            bail!("corral {} failed ({status})", args.join(" "));
        }
        Ok(())
    }

    fn corral_quiet(&self, args: &[&str]) -> bool {
        self.cli()
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn corral_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.cli().args(args).args(["-o", "json"]).output()?;
        if !out.status.success() {
            bail!(
                "corral {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Connects a cell's node namespace to the bridge as 10.99.0.`host`.
    fn attach(&self, cell: &Sandbox, host: u8) -> Result<()> {
        let outer = format!("fd{}c{host}", std::process::id() % 100_000);
        let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
        ip(&[
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
        ])?;
        ip(&["-n", &self.netns, "link", "set", &outer, "master", "br0"])?;
        ip(&["-n", &self.netns, "link", "set", &outer, "up"])?;
        ip(&[
            "-n",
            &cell.netns,
            "addr",
            "add",
            &format!("10.99.0.{host}/24"),
            "dev",
            "n0",
        ])?;
        ip(&["-n", &cell.netns, "link", "set", "n0", "up"])?;
        Ok(())
    }

    fn stop_brain(&mut self) {
        if let Some(mut brain) = self.brain.take() {
            kill_pid(brain.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(15);
            while matches!(brain.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    let _ = brain.kill();
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = brain.wait();
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        self.stop_brain();
        sandbox::unregister_hook(self.hook);
        let kept = workspace_root().join("target/xtask/demo-brain.log");
        if let Some(parent) = kept.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        if std::fs::copy(self.dir.join("brain.log"), &kept).is_ok() {
            println!("brain log kept at {}", kept.display());
        }
        del_netns(&self.netns);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running(app: &Value) -> usize {
    app["instances"]
        .as_array()
        .map_or(0, |l| l.iter().filter(|i| i["state"] == "running").count())
}

fn wait_running(fabric: &Fabric, app: &str, tenant: &str, n: usize) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = fabric.corral_json(&["app", app, "--tenant", tenant])?;
        let listed = v["instances"].as_array().map_or(0, Vec::len);
        if running(&v) == n && listed == n {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{app} of {tenant} did not reach {n} running instances: {v}");
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// The cluster tour (see the module docs).
/// A client of acme on the first cell connects to web's VIP again and
/// again: the socket-level balancer sends each connection to one of web's
/// ready instances, on either cell.
fn through_the_vip(fabric: &Fabric, cells: &[Sandbox], rootfs: &str) -> Result<()> {
    let app = fabric.corral_json(&["app", "web", "--tenant", "acme"])?;
    let vip = app["app"]["vip"]
        .as_str()
        .with_context(|| format!("web has no VIP: {app}"))?
        .to_owned();
    let cell_of: BTreeMap<String, String> = app["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some((i["id"].as_str()?.to_owned(), i["cell"].as_str()?.to_owned())))
        .collect();
    // The cells learn the ready instances from the brain.
    let deadline = Instant::now() + Duration::from_secs(30);
    let api = &cells[0].client;
    loop {
        let m = api.get("/metrics")?.body;
        if m.lines().any(|l| l == "corral_lb_backends 4") {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cell did not program web's 4 backends:\n{m}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    println!("\n==> 20 connections to web's VIP {vip}:8080 from a task of acme on demo-cell-1");
    let spec = serde_json::json!({
        "tenant": "acme",
        "app": "client",
        "kind": "task",
        "rootfs": rootfs,
        "command": ["/bin/sh", "-c", format!(
            "for i in $(seq 20); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {vip} 8080 | grep hello || echo failed; done"
        )],
        "resources": {"memory_mb": 16, "disk_mb": 16},
    });
    api.put("/v1/instances/vip-client", &spec)?.ok()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = api.get("/v1/instances/vip-client")?.ok()?.json()?;
        if v["state"] == "exited" || v["state"] == "crashed" {
            break;
        }
        if Instant::now() > deadline {
            bail!("the client task did not end: {v}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    let logs = api.get("/v1/instances/vip-client/logs")?.ok()?.body;
    api.delete("/v1/instances/vip-client")?.ok()?;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for line in logs.lines() {
        let who = line
            .split("hello from ")
            .nth(1)
            .map_or_else(|| "failed".to_owned(), |id| id.trim().to_owned());
        *tally.entry(who).or_default() += 1;
    }
    for (who, n) in &tally {
        let cell = cell_of.get(who).map_or("", String::as_str);
        println!("  {n:>2} answered by {who} {cell}");
    }
    Ok(())
}

pub fn run(agent_bin: &Path, rootfs: &Path) -> Result<()> {
    let fabric = Fabric::start()?;
    let mut cells = Vec::new();
    for (n, zone, subnet) in [(1u8, "z1", "10.244.1.0/24"), (2, "z2", "10.244.2.0/24")] {
        let cell_id: &'static str = if n == 1 { "demo-cell-1" } else { "demo-cell-2" };
        let c = fabric.certs();
        let c = c.display();
        let extra = format!(
            "zone = \"{zone}\"\n[brain]\naddresses = [\"{BRAIN_IP}:7901\"]\n\
             ca = \"{c}/ca.pem\"\ncert = \"{c}/cell-{cell_id}.pem\"\nkey = \"{c}/cell-{cell_id}-key.pem\"\n"
        );
        let cell = Sandbox::start_with(
            &Spec {
                prefix: if n == 1 {
                    "corral-demo-c1"
                } else {
                    "corral-demo-c2"
                },
                cell_id,
                agent_bin: agent_bin.to_owned(),
                stop_grace_secs: 2,
                capacity: Capacity {
                    memory_mb: 2048,
                    disk_mb: 8192,
                    max_containers: 50,
                },
                subnet: Some(subnet),
            },
            &extra,
        )?;
        fabric.attach(&cell, 10 + n)?;
        println!(
            "{cell_id}: zone {zone}, node address 10.99.0.{}, instances in {subnet}",
            10 + n
        );
        cells.push(cell);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = fabric.corral_json(&["cells"])?;
        let connected = v["cells"].as_array().map_or(0, |l| {
            l.iter().filter(|c| c["state"] == "connected").count()
        });
        if connected == 2 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the cells did not connect to the brain: {v}");
        }
        thread::sleep(Duration::from_millis(200));
    }
    fabric.corral(&["cells"])?;

    let root = rootfs.to_string_lossy().into_owned();
    let web = "mkdir -p /www && echo \"hello from $CORRAL_INSTANCE_ID\" > /www/index.html && exec httpd -f -p 8080 -h /www";
    fabric.corral(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "4",
        "--rootfs",
        &root,
        "--memory",
        "32",
        "--disk",
        "64",
        "--port",
        "8080",
        "--",
        "/bin/sh",
        "-c",
        web,
    ])?;
    fabric.corral(&[
        "push",
        "api",
        "--tenant",
        "globex",
        "--instances",
        "2",
        "--rootfs",
        &root,
        "--memory",
        "32",
        "--disk",
        "64",
        "--",
        "/bin/sh",
        "-c",
        "while true; do sleep 1; done",
    ])?;
    println!("\nwaiting for the auctions and the starts ...");
    let started = Instant::now();
    wait_running(&fabric, "web", "acme", 4)?;
    wait_running(&fabric, "api", "globex", 2)?;
    println!(
        "6 instances running after {}",
        util::fmt_duration(started.elapsed())
    );
    fabric.corral(&["app", "web", "--tenant", "acme"])?;
    fabric.corral(&["app", "api", "--tenant", "globex"])?;
    through_the_vip(&fabric, &cells, &root)?;

    fabric.corral(&["scale", "web", "2", "--tenant", "acme"])?;
    wait_running(&fabric, "web", "acme", 2)?;
    fabric.corral(&["apps"])?;

    fabric.corral(&["delete-app", "web", "--tenant", "acme"])?;
    fabric.corral(&["delete-app", "api", "--tenant", "globex"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: usize = cells
            .iter()
            .map(|c| {
                c.client
                    .get("/v1/instances")
                    .and_then(|r| r.json())
                    .map_or(0, |v| sandbox::instance_ids(&v).len())
            })
            .sum();
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{left} instances still on the cells after deleting the apps");
        }
        thread::sleep(Duration::from_millis(300));
    }
    println!("\nevery instance stopped and removed from both cells");
    drop(fabric);
    drop(cells);
    Ok(())
}
