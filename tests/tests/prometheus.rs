//! A real Prometheus server (Debian's `prometheus` package, our own process,
//! not the system service) scrapes a brain and a cell; its HTTP query API
//! must return the instance, capacity and auction metrics, and every
//! expression of the Grafana dashboard (docs/grafana/corral.json) must
//! evaluate without error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{Fabric, API_PORT, BRAIN_IP};
use common::{rootfs, Cell};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PROMETHEUS: &str = "/usr/bin/prometheus";
/// Where Prometheus listens, inside the fabric namespace.
const PROM_ADDR: &str = "127.0.0.1:9090";
const CELL_METRICS_PORT: u16 = 9800;
/// Every wait of this test is bounded by this.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `f` on a thread that has entered the network namespace `netns`
/// (a network namespace is per thread, so the test's own threads stay put).
fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
            #[allow(unsafe_code)]
            // SAFETY: setns(2) on an open namespace file; it changes only
            // this thread's network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {netns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

/// HTTP/1.0 GET (the server closes the connection and sends no chunks):
/// the status code and the body, or an error text.
fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("not an HTTP response: {text}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head}"))?;
    Ok((code, body.to_owned()))
}

/// Percent-encodes a query-string value.
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Our own Prometheus server in a network namespace, with its config and
/// TSDB in a temporary directory. Drop kills it (by pid) and removes the
/// directory, also when the test fails.
struct Prometheus {
    child: Child,
    netns: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus in `netns` scraping every `(job, target)` each
    /// second, and waits until it is ready.
    fn start(netns: &str, targets: &[(&str, String)]) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} missing: cargo xtask deps installs the prometheus package"
        );
        let dir = tempfile::Builder::new()
            .prefix("corral-prometheus-")
            .tempdir()
            .unwrap();
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg(PROMETHEUS)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={PROM_ADDR}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut prom = Prometheus {
            child,
            netns: netns.to_owned(),
            dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(Some(st)) = prom.child.try_wait() {
                panic!("prometheus exited ({st}):\n{}", prom.log());
            }
            if matches!(prom.get("/-/ready"), Ok((200, _))) {
                return prom;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn get(&self, path: &str) -> Result<(u16, String), String> {
        in_netns(&self.netns, || http_get(PROM_ADDR, path))
    }

    /// `GET /api/v1/query`: the whole answer (`status`, `data` or `error`).
    fn query(&self, promql: &str) -> Value {
        let (code, body) = self
            .get(&format!("/api/v1/query?query={}", encode(promql)))
            .unwrap();
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{promql}: HTTP {code}, not JSON ({e}): {body}"))
    }

    /// Polls `promql` until it returns at least one sample; the samples.
    fn wait_samples(&self, promql: &str) -> Vec<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = self.query(promql);
            assert_eq!(v["status"], "success", "{promql}: {v}");
            if let Some(r) = v["data"]["result"].as_array().filter(|r| !r.is_empty()) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{promql} returned no samples within {WAIT:?}: {v}\ntargets: {}",
                self.get("/api/v1/targets")
                    .map(|(_, b)| b)
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Our own child, by pid; the directory goes when `dir` drops.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every PromQL expression of the dashboard (panel targets and template
/// variables' `label_values` selectors), with Grafana's variables replaced
/// by values Prometheus accepts.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(e) = m.get("expr").and_then(Value::as_str) {
                    out.push(e.to_owned());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_default();
        if let Some(inner) = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            out.push(inner.rsplit_once(',').map_or(inner, |(m, _)| m).to_owned());
        }
    }
    out.into_iter()
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("${cell:regex}", ".*")
                .replace("${tenant:regex}", ".*")
                .replace("$cell", ".*")
                .replace("$tenant", ".*")
        })
        .collect()
}

#[test]
fn prometheus_scrapes_a_cell_and_a_brain() {
    common::require_root();
    let name = Cell::new_name();
    let mut fabric = Fabric::new(&[&name]);
    fabric.start_brain();
    let cell = Cell::start_named(
        &name,
        &format!(
            "{}[metrics]\nlisten = \"0.0.0.0:{CELL_METRICS_PORT}\"\n",
            fabric.agent_config(&name, "z1")
        ),
    );
    let cell_ip = fabric.attach(&cell);
    fabric.wait_connected(1);
    let root = rootfs();
    fabric.cli_ok(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "1",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--disk",
        "64",
        "--",
        "/bin/sleep",
        "100000",
    ]);
    let app = fabric.wait_json(&["app", "web", "--tenant", "acme"], "running", |v| {
        v["instances"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["state"] == "running"))
    });
    let id = app["instances"][0]["id"].as_str().unwrap().to_owned();

    let cell_target = format!("{cell_ip}:{CELL_METRICS_PORT}");
    let prom = Prometheus::start(
        &fabric.netns,
        &[
            ("corral-brain", format!("{BRAIN_IP}:{API_PORT}")),
            ("corral-agent", cell_target.clone()),
        ],
    );

    // Both targets are up.
    for job in ["corral-brain", "corral-agent"] {
        prom.wait_samples(&format!("up{{job=\"{job}\"}} == 1"));
    }
    // Per-instance usage. The agent's `instance` label (corral's instance
    // id) meets Prometheus' target label of the same name: Prometheus keeps
    // the target's and renames ours to `exported_instance`.
    for family in [
        "corral_instance_cpu_seconds_total",
        "corral_instance_memory_bytes",
        "corral_instance_memory_limit_bytes",
    ] {
        let samples = prom.wait_samples(&format!(
            "{family}{{job=\"corral-agent\",tenant=\"acme\",app=\"web\"}}"
        ));
        let m = &samples[0]["metric"];
        assert_eq!(m["exported_instance"], id.as_str(), "{family}: {m}");
        assert_eq!(m["instance"], cell_target.as_str(), "{family}: {m}");
    }
    // Capacity: what the test harness configures (2048 MB, 50 containers).
    let cap = prom.wait_samples("corral_cell_memory_capacity_bytes");
    assert_eq!(cap[0]["value"][1], (2048u64 << 20).to_string(), "{cap:?}");
    prom.wait_samples("corral_cell_containers_capacity == 50");
    prom.wait_samples("corral_cell_memory_available_bytes < corral_cell_memory_capacity_bytes");
    prom.wait_samples("corral_instances{state=\"running\"} >= 1");
    prom.wait_samples("corral_instance_start_duration_seconds_count >= 1");
    // The auction that placed the app, from the brain.
    prom.wait_samples("corral_brain_auctions_total{job=\"corral-brain\"} >= 1");
    prom.wait_samples("corral_brain_placements_total >= 1");
    prom.wait_samples("corral_brain_auction_duration_seconds_count >= 1");
    prom.wait_samples("corral_brain_instances_running == 1");

    // Every expression of the dashboard is valid PromQL for this server.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(common::workspace().join("docs/grafana/corral.json")).unwrap(),
    )
    .unwrap();
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() > 20, "{queries:?}");
    for q in &queries {
        let v = prom.query(q);
        assert_eq!(v["status"], "success", "dashboard query {q}: {v}");
    }
    // And the dashboard's main panels show data from this cluster.
    for q in [
        "sum by (state) (corral_instances)",
        "corral_brain_instances_desired",
    ] {
        prom.wait_samples(q);
    }

    drop(prom);
    fabric.cli_ok(&["delete-app", "web", "--tenant", "acme"]);
    fabric.detach(&cell);
}
