//! `cargo xtask bench scrape`: what a Prometheus scrape of a busy cell
//! costs, and what the agent's API answers cost beside it. One cell agent
//! (the sandbox of `bench start`) runs 250 long-running instances;
//! `/metrics` is fetched over TCP from its metrics listener, as Prometheus
//! does, the instance list and single instances over the API's unix
//! socket, as the CLI does, each timed; the agent's memory and CPU are read
//! from /proc while it idles and while it answers. Reports numbers; asserts
//! nothing about them (`tests/tests/scale.rs` checks the answers).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::bench::{self, Timings};
use crate::http::{Client, Response};
use crate::sandbox::{self, Capacity, Sandbox, Spec};
use crate::util::{is_root, step, workspace_root};
use crate::{deps, rootfs};

const INSTANCES: usize = 250;
const SCRAPES: usize = 200;
const BASELINE_SCRAPES: usize = 50;
/// `GET /v1/instances` requests with 250 instances (and with none).
const LISTS: usize = 200;
/// `GET /v1/instances/{id}` requests, over the instances in turn (enough
/// for the agent's CPU time, counted in 10 ms ticks, to say something).
const GETS: usize = 2500;
const IDLE: Duration = Duration::from_secs(10);
const CLIENTS: usize = 8;
/// The sandbox agent's `[metrics] listen`, inside its network namespace.
const METRICS_ADDR: &str = "127.0.0.1:9800";
/// What Prometheus 2.x asks for.
const ACCEPT: &str = "application/openmetrics-text;version=1.0.0,\
                      application/openmetrics-text;version=0.0.1;q=0.75,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the benchmark creates a network namespace, cgroups and containers: run it as root");
    }
    step("checking dependencies", deps::run)?;
    let agent_bin = sandbox::build_agent("release", &["--release", "--bins"])?;
    let rootfs = step("preparing the busybox rootfs", rootfs::ensure)?;
    let agent_bin = fs::canonicalize(&agent_bin)
        .with_context(|| format!("{} was not built", agent_bin.display()))?;

    let sandbox = step("starting a cell agent in its own network namespace", || {
        Sandbox::start(&Spec {
            prefix: "corral-bench-scrape",
            cell_id: "bench-scrape-1",
            agent_bin: agent_bin.clone(),
            stop_grace_secs: 1,
            capacity: Capacity {
                memory_mb: 20000,
                disk_mb: 20000,
                max_containers: 300,
            },
            // Loopback-only instance namespaces: starting 250 instances
            // stays quick, and the scrape has no data-plane families.
            subnet: None,
        })
    })?;
    let pid = i32::try_from(sandbox.agent_pid)?;
    let baseline = step(
        &format!("{BASELINE_SCRAPES} scrapes with no instances"),
        || scrapes(&sandbox, pid, BASELINE_SCRAPES),
    )?;
    let empty_list = step(
        &format!("{BASELINE_SCRAPES} GET /v1/instances with no instances"),
        || {
            let list = |_| "/v1/instances".to_owned();
            requests(&sandbox.client, pid, BASELINE_SCRAPES, list, |r| {
                listed(r, 0)
            })
        },
    )?;

    let api = &sandbox.client;
    let (ids, started) = step(&format!("starting {INSTANCES} LRPs"), || {
        let (ids, t) = bench::put_all(api, INSTANCES, "lrp", CLIENTS, |i| {
            bench::lrp_spec(&rootfs, i)
        });
        Ok((ids, t))
    })?;
    let measured = started.and_then(|t| {
        println!(
            "started in {:.1} s (p50 {})",
            t.wall.as_secs_f64(),
            bench::ms(t.percentile(50.0))
        );
        // Let the starts settle before measuring an idle agent.
        thread::sleep(Duration::from_secs(3));
        let idle = step(&format!("agent idle for {}s", IDLE.as_secs()), || idle(pid))?;
        let busy = step(&format!("{SCRAPES} scrapes with {INSTANCES} LRPs"), || {
            scrapes(&sandbox, pid, SCRAPES)
        })?;
        let lists = step(
            &format!("{LISTS} GET /v1/instances with {INSTANCES} LRPs"),
            || {
                let list = |_| "/v1/instances".to_owned();
                requests(api, pid, LISTS, list, |r| listed(r, INSTANCES))
            },
        )?;
        let gets = step(
            &format!("{GETS} GET /v1/instances/{{id}} with {INSTANCES} LRPs"),
            || {
                let one = |i: usize| format!("/v1/instances/{}", ids[i % ids.len()]);
                requests(api, pid, GETS, one, running)
            },
        )?;
        Ok(Measured {
            starts: t,
            idle,
            scrapes: busy,
            lists,
            gets,
            delete_wall: Duration::ZERO,
        })
    });
    println!("deleting {INSTANCES} LRPs (each waits out the 1 s stop grace period)");
    let t = Instant::now();
    let deleted = bench::delete_all(api, &ids);
    let delete_wall = t.elapsed();
    let mut measured = measured?;
    deleted?;
    drop(sandbox);

    measured.delete_wall = delete_wall;
    let report = report(&agent_bin, &baseline, &empty_list, &measured);
    println!("\n{report}");
    let path = workspace_root().join("docs/benchmarks.md");
    bench::append_report(&path, &report)?;
    println!("appended to {}", path.display());
    Ok(())
}

/// A series of scrapes: their latencies, the last body's size and series
/// count, and the agent's CPU time over them.
struct Scrapes {
    timings: Timings,
    bytes: usize,
    instance_series: usize,
    agent_cpu: Duration,
}

/// Everything measured with the instances running.
struct Measured {
    starts: Timings,
    idle: Idle,
    scrapes: Scrapes,
    lists: Requests,
    gets: Requests,
    /// How long deleting them all took (filled in once done).
    delete_wall: Duration,
}

/// A series of API requests: latencies, the last body's size and the
/// agent's CPU time over them.
struct Requests {
    timings: Timings,
    bytes: usize,
    agent_cpu: Duration,
}

/// `n` requests `GET path(i)`, one after the other, each on a new
/// connection and timed to its last byte; `check` then looks at the answer
/// (untimed).
fn requests(
    api: &Client,
    pid: i32,
    n: usize,
    path: impl Fn(usize) -> String,
    check: impl Fn(&Response) -> Result<()>,
) -> Result<Requests> {
    let before = cpu_time(pid)?;
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    let mut bytes = 0;
    for i in 0..n {
        let t = Instant::now();
        let r = api.get(&path(i))?;
        latencies.push(t.elapsed());
        let r = r.ok()?;
        check(&r)?;
        bytes = r.body.len();
    }
    let timings = Timings::new(latencies, start.elapsed());
    let agent_cpu = cpu_time(pid)?.saturating_sub(before);
    println!(
        "p50 {}, p99 {}, {bytes} bytes, agent CPU {} per request",
        ms2(timings.percentile(50.0)),
        ms2(timings.percentile(99.0)),
        ms2(agent_cpu / u32::try_from(n.max(1))?),
    );
    Ok(Requests {
        timings,
        bytes,
        agent_cpu,
    })
}

/// API answers take tenths of a millisecond: two decimals.
fn ms2(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// An instance list that holds `expected` instances.
fn listed(r: &Response, expected: usize) -> Result<()> {
    let n = r.json()?["instances"].as_array().map_or(0, Vec::len);
    if n != expected {
        bail!("{} listed {n} instances, not {expected}", r.request);
    }
    Ok(())
}

/// An instance that is running.
fn running(r: &Response) -> Result<()> {
    let state = r.json()?["state"].clone();
    if state != "running" {
        bail!("{}: the instance is {state}, not running", r.request);
    }
    Ok(())
}

/// The agent's resident memory and CPU use over [`IDLE`].
struct Idle {
    rss_kib: u64,
    cpu: Duration,
}

fn idle(pid: i32) -> Result<Idle> {
    let before = cpu_time(pid)?;
    thread::sleep(IDLE);
    let cpu = cpu_time(pid)?.saturating_sub(before);
    let rss_kib = sandbox::vm_rss_kib(pid)?;
    println!(
        "VmRSS {}, CPU {:.2} % of a core",
        bench::mib(rss_kib),
        100.0 * cpu.as_secs_f64() / IDLE.as_secs_f64()
    );
    Ok(Idle { rss_kib, cpu })
}

/// `n` scrapes, one after the other, each on a new connection, from a
/// thread inside the sandbox's network namespace.
fn scrapes(sandbox: &Sandbox, pid: i32, n: usize) -> Result<Scrapes> {
    let netns = Path::new("/run/netns").join(&sandbox.netns);
    let before = cpu_time(pid)?;
    let start = Instant::now();
    let (latencies, body) = thread::scope(|s| {
        s.spawn(|| -> Result<(Vec<Duration>, String)> {
            enter_netns(&netns)?;
            let mut latencies = Vec::with_capacity(n);
            let mut body = String::new();
            for _ in 0..n {
                let t = Instant::now();
                body = scrape()?;
                latencies.push(t.elapsed());
            }
            Ok((latencies, body))
        })
        .join()
        .map_err(|_| anyhow!("the scraping thread panicked"))?
    })?;
    let wall = start.elapsed();
    let agent_cpu = cpu_time(pid)?.saturating_sub(before);
    let timings = Timings::new(latencies, wall);
    let instance_series = body
        .lines()
        .filter(|l| l.starts_with("corral_instance_memory_bytes{"))
        .count();
    println!(
        "p50 {}, p99 {}, {} bytes, {instance_series} instances in the scrape, agent CPU {} per scrape",
        bench::ms(timings.percentile(50.0)),
        bench::ms(timings.percentile(99.0)),
        body.len(),
        bench::ms(agent_cpu / u32::try_from(n.max(1))?),
    );
    Ok(Scrapes {
        timings,
        bytes: body.len(),
        instance_series,
        agent_cpu,
    })
}

/// Moves the calling thread (only it) into a network namespace.
fn enter_netns(path: &Path) -> Result<()> {
    let ns = fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: setns(2) on an open namespace file; it changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// One `GET /metrics` as Prometheus sends it; the body.
fn scrape() -> Result<String> {
    let mut s =
        TcpStream::connect(METRICS_ADDR).with_context(|| format!("connect {METRICS_ADDR}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {METRICS_ADDR}\r\nAccept: {ACCEPT}\r\n\
         Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("not an HTTP response: {text}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics: {head}");
    }
    Ok(body.to_owned())
}

/// User + system CPU time of a process (all its threads).
fn cpu_time(pid: i32) -> Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&stat).ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100);
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// utime + stime (fields 14 and 15) of /proc/<pid>/stat; the command name
/// (field 2) may hold spaces and parentheses, so fields count from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn report(
    agent_bin: &Path,
    baseline: &Scrapes,
    empty_list: &Requests,
    measured: &Measured,
) -> String {
    let (busy, idle) = (&measured.scrapes, &measured.idle);
    let m = bench::machine();
    let root = workspace_root();
    let agent = agent_bin.strip_prefix(&root).unwrap_or(agent_bin).display();
    let mut out = format!(
        "## {}: `cargo xtask bench scrape`\n\n\
         Kernel {}, {} CPUs ({}); agent `{agent}` in its own network namespace; \
         {INSTANCES} LRPs (`/bin/sleep 3600`, 16 MB, busybox rootfs) without a cell \
         network (no data-plane families in the scrape). Each scrape is a new TCP \
         connection to the metrics listener with Prometheus' `Accept` header \
         (OpenMetrics), one at a time, timed from connect to the last byte.\n\n\
         | scrape of `/metrics` | p50 | p99 | max | mean | size | agent CPU per scrape |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
        m.date, m.kernel, m.cpus, m.cpu
    );
    for (label, s) in [
        (
            format!("no instances ({BASELINE_SCRAPES} scrapes)"),
            baseline,
        ),
        (
            format!(
                "{INSTANCES} instances ({SCRAPES} scrapes; {} in the scrape)",
                busy.instance_series
            ),
            busy,
        ),
    ] {
        let n = u32::try_from(s.timings.latencies.len().max(1)).unwrap_or(u32::MAX);
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {:.1} KiB | {} |\n",
            bench::ms(s.timings.percentile(50.0)),
            bench::ms(s.timings.percentile(99.0)),
            bench::ms(s.timings.percentile(100.0)),
            bench::ms(s.timings.mean()),
            s.bytes as f64 / 1024.0,
            bench::ms(s.agent_cpu / n),
        ));
    }
    out.push_str(
        "\nThe agent's API over its unix socket (as the CLI uses it), one request \
         at a time, each a new connection:\n\n\
         | request | p50 | p99 | max | mean | size | agent CPU per request |\n\
         |---|---:|---:|---:|---:|---:|---:|\n",
    );
    let rows = [
        (
            format!("`GET /v1/instances`, no instances ({BASELINE_SCRAPES} requests)"),
            empty_list,
        ),
        (
            format!("`GET /v1/instances`, {INSTANCES} instances ({LISTS} requests)"),
            &measured.lists,
        ),
        (
            format!("`GET /v1/instances/{{id}}`, {INSTANCES} instances ({GETS} requests)"),
            &measured.gets,
        ),
    ];
    for (label, r) in rows {
        let n = u32::try_from(r.timings.latencies.len().max(1)).unwrap_or(u32::MAX);
        out.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {:.1} KiB | {} |\n",
            ms2(r.timings.percentile(50.0)),
            ms2(r.timings.percentile(99.0)),
            ms2(r.timings.percentile(100.0)),
            ms2(r.timings.mean()),
            r.bytes as f64 / 1024.0,
            ms2(r.agent_cpu / n),
        ));
    }
    out.push_str(&format!(
        "\n{INSTANCES} LRPs started in {:.1} s from {CLIENTS} clients (PUT p50 {}, p99 {}); \
         deleted in {:.1} s.\n",
        measured.starts.wall.as_secs_f64(),
        bench::ms(measured.starts.percentile(50.0)),
        bench::ms(measured.starts.percentile(99.0)),
        measured.delete_wall.as_secs_f64(),
    ));
    out.push_str(&format!(
        "\n| corral-agent with {INSTANCES} instances, idle for {} s (no scrapes) | |\n\
         |---|---:|\n\
         | VmRSS | {} |\n\
         | CPU | {:.2} % of a core |\n",
        IDLE.as_secs(),
        bench::mib(idle.rss_kib),
        100.0 * idle.cpu.as_secs_f64() / IDLE.as_secs_f64(),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_count_fields_from_the_last_parenthesis() {
        let stat = "4242 (corral agent) (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    37 12 0 0 20 0 9 0 1234 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(49));
        assert_eq!(parse_cpu_ticks("1 (x) S 1"), None);
    }
}
