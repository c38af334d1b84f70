//! `cargo xtask bench start`: how fast the agent starts instances, against
//! `runc run` as the standard peer, and how much memory the agent and its
//! shims take. Reports numbers; it asserts nothing about them.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::http::Client;
use crate::sandbox::{self, parallel, Capacity, Sandbox, Spec};
use crate::util::{self, is_root, step, workspace_root};
use crate::{deps, rootfs};

const STARTS: usize = 200;
const CLIENTS: usize = 8;
const LRPS: usize = 100;

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates a network namespace, cgroups and containers: run it as root");
    }
    step("checking dependencies", deps::run)?;
    let agent_bin = sandbox::build_agent("release", &["--release", "--bins"])?;
    let rootfs = step("preparing the busybox rootfs", rootfs::ensure)?;
    // /proc/<pid>/exe is canonical; so must be what shims are compared with.
    let agent_bin = fs::canonicalize(&agent_bin)
        .with_context(|| format!("{} was not built", agent_bin.display()))?;

    let sandbox = step("starting a cell agent in its own network namespace", || {
        Sandbox::start(&Spec {
            prefix: "corral-bench",
            cell_id: "bench-cell-1",
            agent_bin: agent_bin.clone(),
            stop_grace_secs: 1,
            capacity: Capacity {
                memory_mb: 20000,
                disk_mb: 10240,
                max_containers: 300,
            },
            // Like the runc bundle: a new network namespace with loopback only.
            subnet: None,
        })
    })?;
    let api = &sandbox.client;
    let agent_pid = i32::try_from(sandbox.agent_pid)?;
    thread::sleep(Duration::from_secs(1));
    let rss_idle = sandbox::vm_rss_kib(agent_pid)?;

    let seq = step(&format!("corral: {STARTS} starts, 1 client"), || {
        starts(api, &rootfs, "seq", 1)
    })?;
    let conc = step(
        &format!("corral: {STARTS} starts, {CLIENTS} clients"),
        || starts(api, &rootfs, "conc", CLIENTS),
    )?;
    let rss_churned = sandbox::vm_rss_kib(agent_pid)?;
    let runc = step(
        &format!("runc: {STARTS} sequential `runc run` of /bin/true"),
        || runc_runs(&sandbox.dir, &rootfs, &sandbox.netns),
    )?;
    let mem = step(
        &format!("memory with {LRPS} long-running instances"),
        || lrp_memory(&sandbox, &rootfs, agent_pid),
    )?;
    drop(sandbox);

    // The same starts on a cell network: a veth, an address, routes and the
    // eBPF programs per instance.
    let net_sandbox = step("starting a networked cell agent", || {
        Sandbox::start(&Spec {
            prefix: "corral-bench-net",
            cell_id: "bench-cell-2",
            agent_bin: agent_bin.clone(),
            stop_grace_secs: 1,
            capacity: Capacity {
                memory_mb: 20000,
                disk_mb: 10240,
                max_containers: 300,
            },
            subnet: Some("10.244.0.0/16"),
        })
    })?;
    let net = step(
        &format!("corral with network + data plane: {STARTS} starts, 1 client"),
        || starts(&net_sandbox.client, &rootfs, "net", 1),
    )?;
    drop(net_sandbox);

    let starts = Starts {
        seq,
        conc,
        runc,
        net,
    };
    let report = report(&agent_bin, &starts, rss_idle, rss_churned, &mem);
    println!("\n{report}");
    let path = workspace_root().join("docs/benchmarks.md");
    append_report(&path, &report)?;
    println!("appended to {}", path.display());
    Ok(())
}

/// Every start measurement of one run.
struct Starts {
    seq: Timings,
    conc: Timings,
    runc: Timings,
    net: Timings,
}

/// Latencies of one batch of starts, and how long the whole batch took.
pub(crate) struct Timings {
    pub(crate) latencies: Vec<Duration>,
    pub(crate) wall: Duration,
}

impl Timings {
    pub(crate) fn new(mut latencies: Vec<Duration>, wall: Duration) -> Self {
        latencies.sort();
        Self { latencies, wall }
    }

    /// Nearest-rank percentile.
    pub(crate) fn percentile(&self, p: f64) -> Duration {
        let n = self.latencies.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.latencies[rank.clamp(1, n) - 1]
    }

    pub(crate) fn mean(&self) -> Duration {
        let n = u32::try_from(self.latencies.len())
            .unwrap_or(u32::MAX)
            .max(1);
        self.latencies.iter().sum::<Duration>() / n
    }

    fn summary(&self) -> String {
        format!(
            "p50 {}, p99 {}, {:.1}/s",
            ms(self.percentile(50.0)),
            ms(self.percentile(99.0)),
            self.per_second()
        )
    }

    fn per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

fn task_spec(rootfs: &Path, index: usize) -> Value {
    json!({
        "tenant": "bench",
        "app": "true",
        "index": index,
        "kind": "task",
        "rootfs": rootfs,
        "command": ["/bin/true"],
        "env": {},
        "resources": {"memory_mb": 16, "disk_mb": 16, "cpu_weight": 100, "max_pids": 16},
        "ports": [],
    })
}

pub(crate) fn lrp_spec(rootfs: &Path, index: usize) -> Value {
    json!({
        "tenant": "bench",
        "app": "sleep",
        "index": index,
        "kind": "lrp",
        "rootfs": rootfs,
        "command": ["/bin/sleep", "3600"],
        "env": {},
        "resources": {"memory_mb": 16, "disk_mb": 16, "cpu_weight": 100, "max_pids": 8},
        "ports": [],
    })
}

/// Times `STARTS` PUTs of a `/bin/true` task from `clients` threads (the PUT
/// answers once the process runs), then deletes them all, untimed.
fn starts(api: &Client, rootfs: &Path, prefix: &str, clients: usize) -> Result<Timings> {
    let (ids, started) = put_all(api, STARTS, prefix, clients, |i| task_spec(rootfs, i));
    let deleted = delete_all(api, &ids);
    let t = started?;
    deleted?;
    println!("{}", t.summary());
    Ok(t)
}

/// PUTs instances `<prefix>-0` .. `<prefix>-<n-1>` from `clients` threads,
/// timing each from sending the request to receiving the answer. Returns the
/// ids (to delete, whatever happened) and the timings or the first failure.
pub(crate) fn put_all(
    api: &Client,
    n: usize,
    prefix: &str,
    clients: usize,
    spec: impl Fn(usize) -> Value + Sync,
) -> (Vec<String>, Result<Timings>) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let indexes: Vec<usize> = (0..n).collect();
    let latencies = Mutex::new(Vec::with_capacity(n));
    let start = Instant::now();
    let failed = parallel(&indexes, clients, |&i| {
        let body = spec(i);
        let t = Instant::now();
        api.put(&format!("/v1/instances/{}", ids[i]), &body)?.ok()?;
        let took = t.elapsed();
        latencies
            .lock()
            .map_err(|_| anyhow!("latency list poisoned"))?
            .push(took);
        Ok(())
    });
    let wall = start.elapsed();
    let timings = match failed.first() {
        Some((&i, e)) => Err(anyhow!(
            "{} of {n} starts failed; {}: {e:#}",
            failed.len(),
            ids[i]
        )),
        None => latencies
            .into_inner()
            .map_err(|_| anyhow!("latency list poisoned"))
            .map(|l| Timings::new(l, wall)),
    };
    (ids, timings)
}

pub(crate) fn delete_all(api: &Client, ids: &[String]) -> Result<()> {
    let failed = parallel(ids, CLIENTS, |id| {
        let r = api.delete(&format!("/v1/instances/{id}"))?;
        // 404: the start failed, so there is nothing to delete.
        if r.status != 404 {
            r.ok()?;
        }
        Ok(())
    });
    match failed.first() {
        Some((id, e)) => bail!("{} deletes failed; {id}: {e:#}", failed.len()),
        None => Ok(()),
    }
}

/// `runc run` of /bin/true on the same rootfs, to completion, one at a time.
fn runc_runs(dir: &Path, rootfs: &Path, name: &str) -> Result<Timings> {
    let bundle = dir.join("runc-bundle");
    fs::create_dir_all(&bundle).with_context(|| format!("create {}", bundle.display()))?;
    util::run(
        Command::new("runc")
            .arg("spec")
            .arg("--bundle")
            .arg(&bundle),
    )?;
    let config = bundle.join("config.json");
    let text = fs::read_to_string(&config).with_context(|| format!("read {}", config.display()))?;
    let mut spec: Value = serde_json::from_str(&text).context("parse runc's config.json")?;
    set(&mut spec, "/process", "args", json!(["/bin/true"]))?;
    set(&mut spec, "/process", "terminal", json!(false))?;
    set(&mut spec, "/root", "path", json!(rootfs))?;
    set(&mut spec, "/root", "readonly", json!(true))?;
    fs::write(&config, serde_json::to_string_pretty(&spec)?)
        .with_context(|| format!("write {}", config.display()))?;

    let state = dir.join("runc-root");
    let mut latencies = Vec::with_capacity(STARTS);
    let start = Instant::now();
    for i in 0..STARTS {
        let mut cmd = Command::new("runc");
        cmd.arg("--root")
            .arg(&state)
            .arg("run")
            .arg("-b")
            .arg(&bundle)
            // Unique per run: runc names the container's cgroups after it.
            .arg(format!("{name}-runc-{i}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let t = Instant::now();
        let out = cmd.output().context("run runc")?;
        latencies.push(t.elapsed());
        if !out.status.success() {
            bail!(
                "`{}` failed ({}): {}",
                util::display(&cmd),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let t = Timings::new(latencies, start.elapsed());
    println!("{}", t.summary());
    Ok(t)
}

fn set(spec: &mut Value, object: &str, key: &str, value: Value) -> Result<()> {
    spec.pointer_mut(object)
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("runc's config.json has no {object} object"))?
        .insert(key.to_owned(), value);
    Ok(())
}

struct Memory {
    agent_kib: u64,
    /// Medians over the shims: VmRSS (shared binary pages included), private
    /// anonymous memory, and proportional set size.
    shim_median_kib: Option<(u64, u64, u64)>,
    shims: usize,
}

fn lrp_memory(sandbox: &Sandbox, rootfs: &Path, agent_pid: i32) -> Result<Memory> {
    let api = &sandbox.client;
    let (ids, started) = put_all(api, LRPS, "sleep", CLIENTS, |i| lrp_spec(rootfs, i));
    let measured = started.and_then(|_| {
        thread::sleep(Duration::from_secs(2));
        measure_memory(sandbox, agent_pid)
    });
    println!("deleting {LRPS} LRPs (each waits out the 1 s stop grace period)");
    let deleted = delete_all(api, &ids);
    let memory = measured?;
    deleted?;
    Ok(memory)
}

fn measure_memory(sandbox: &Sandbox, agent_pid: i32) -> Result<Memory> {
    let agent_kib = sandbox::vm_rss_kib(agent_pid)?;
    let pids = sandbox::shim_pids(&sandbox.agent_bin, &sandbox.netns);
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    };
    let field = |file: &str, name: &str| {
        pids.iter()
            .filter_map(|pid| sandbox::proc_kib(*pid, file, name).ok())
            .collect::<Vec<u64>>()
    };
    if pids.is_empty() {
        println!("no shim processes found (`<agent> shim ...` in the sandbox's namespace)");
    }
    let rss = median(field("status", "VmRSS:"));
    let anon = median(field("status", "RssAnon:"));
    let pss = median(field("smaps_rollup", "Pss:"));
    Ok(Memory {
        agent_kib,
        shim_median_kib: rss.zip(anon).zip(pss).map(|((r, a), p)| (r, a, p)),
        shims: pids.len(),
    })
}

/// When and on what a benchmark ran, for its report.
pub(crate) struct Machine {
    pub date: String,
    pub kernel: String,
    pub cpus: usize,
    pub cpu: String,
}

pub(crate) fn machine() -> Machine {
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".to_owned());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned());
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());

    Machine {
        date,
        kernel,
        cpus,
        cpu,
    }
}

fn report(
    agent_bin: &Path,
    starts: &Starts,
    rss_idle: u64,
    rss_churned: u64,
    mem: &Memory,
) -> String {
    let Machine {
        date,
        kernel,
        cpus,
        cpu,
    } = machine();

    let Starts {
        seq,
        conc,
        runc,
        net,
    } = starts;
    let root = workspace_root();
    let agent = agent_bin.strip_prefix(&root).unwrap_or(agent_bin).display();
    let mut out = format!(
        "## {date}: `cargo xtask bench start`\n\n\
         Kernel {kernel}, {cpus} CPUs ({cpu}); agent `{agent}` in its own network \
         namespace; busybox rootfs.\n\n\
         | start of `/bin/true` ({STARTS} times) | p50 | p95 | p99 | mean | starts/s |\n\
         |---|---:|---:|---:|---:|---:|\n"
    );
    for (label, t) in [
        ("corral `PUT /v1/instances/{id}`, 1 client".to_owned(), seq),
        (
            format!("corral `PUT /v1/instances/{{id}}`, {CLIENTS} clients"),
            conc,
        ),
        ("`runc run` (to completion), sequential".to_owned(), runc),
        (
            "corral with a cell network (veth, address, routes, eBPF), 1 client".to_owned(),
            net,
        ),
    ] {
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {:.1} |\n",
            ms(t.percentile(50.0)),
            ms(t.percentile(95.0)),
            ms(t.percentile(99.0)),
            ms(t.mean()),
            t.per_second()
        ));
    }
    let ratio = seq.percentile(50.0).as_secs_f64() / runc.percentile(50.0).as_secs_f64().max(1e-9);
    out.push_str(&format!(
        "\ncorral p50 / runc p50 (sequential): {ratio:.2}\n\n\
         | memory (VmRSS) | |\n|---|---:|\n\
         | corral-agent, idle | {} |\n\
         | corral-agent, after {} starts and deletes | {} |\n\
         | corral-agent, {LRPS} LRPs running | {} |\n",
        mib(rss_idle),
        2 * STARTS,
        mib(rss_churned),
        mib(mem.agent_kib),
    ));
    match mem.shim_median_kib {
        Some((rss, anon, pss)) => out.push_str(&format!(
            "| shim VmRSS, median of {n} (includes the binary's pages shared by all shims and the agent) | {} |\n\
             | shim private memory (RssAnon), median of {n} | {} |\n\
             | shim PSS (shared pages divided among sharers), median of {n} | {} |\n",
            mib(rss),
            mib(anon),
            mib(pss),
            n = mem.shims,
        )),
        None => out.push_str("| shim | no shim processes found |\n"),
    }
    out
}

pub(crate) fn append_report(path: &Path, report: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let new = !path.exists();
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let mut text = String::new();
    if new {
        text.push_str(
            "# Benchmarks\n\nResults of `cargo xtask bench start`, one section per run, \
             newest last.\n",
        );
    }
    text.push('\n');
    text.push_str(report);
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub(crate) fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let lat: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        let t = Timings::new(lat, Duration::from_secs(2));
        assert_eq!(t.percentile(50.0), Duration::from_millis(100));
        assert_eq!(t.percentile(95.0), Duration::from_millis(190));
        assert_eq!(t.percentile(99.0), Duration::from_millis(198));
        assert_eq!(t.percentile(100.0), Duration::from_millis(200));
        assert_eq!(t.mean(), Duration::from_micros(100_500));
        assert!((t.per_second() - 100.0).abs() < 1e-9);
    }

    #[test]
    fn percentiles_of_few_samples() {
        let t = Timings::new(vec![Duration::from_millis(7)], Duration::from_millis(7));
        assert_eq!(t.percentile(50.0), Duration::from_millis(7));
        assert_eq!(t.percentile(99.0), Duration::from_millis(7));
        assert_eq!(
            Timings::new(vec![], Duration::ZERO).percentile(50.0),
            Duration::ZERO
        );
    }
}
