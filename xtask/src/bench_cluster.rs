//! `cargo xtask bench auction --quic`: the brain's auction **end to end over
//! QUIC**, the cluster-level counterpart of the in-process measurement in
//! [`crate::bench_auction`].
//!
//! Three processes on loopback:
//! - the brain: the release `corral-brain --config FILE`, as deployed (its
//!   store on disk in a temporary directory, `RUST_LOG=warn`, log in a file);
//! - a load generator: this program again (`bench auction-loadgen`, hidden),
//!   holding N simulated cells ([`corral_brain::sim`]): each has its own
//!   certificate, UDP socket and QUIC connection to the brain, says hello,
//!   reports its state, answers bids from its live capacity and accepts
//!   work, and reports an instance `running` a short delay after accepting
//!   it. No containers;
//! - this process: it makes the certificates, starts the two others, waits
//!   for every cell to be connected, then pushes apps through the brain's
//!   HTTP API (`POST /v1/apps` with lists of `--bulk` apps, admin token, a
//!   few keep-alive connections) and polls `GET /metrics` every 100 ms.
//!
//! The clock starts before the first POST. Reported: when every POST was
//! answered; when `corral_brain_placements_total` reached the number of
//! instances asked for (placement decided, recorded in the store and
//! `StartWork` sent); when the brain's `corral_brain_instances_running`
//! gauge reached it; and when every slot (app, index) has a running
//! instance as the cells themselves see it (asked of the load generator
//! once the gauge is there), which is where the clock stops: the gauge
//! counts duplicates too. Auction round latency comes from the brain's
//! `corral_brain_auction_duration_seconds` histogram, so it has the
//! histogram's bucket resolution. Balance is the spread (max − min used
//! fraction across cells) read from `GET /v1/cells` at the end, once the
//! cells hold exactly the instances asked for (or after 30 s): the workload
//! asks for about half of the cells' memory, so the end is "after placing
//! half the capacity". Memory is the brain's VmHWM/VmRSS from /proc.
//!
//! The workload (fixed seed): apps of 1–3 (60 %), 4–20 (30 %) or 21–100
//! (10 %) instances as in the in-process benchmark; memory per instance
//! 128 MB–4 GB (mostly small, mean 409.6 MB, which is half of 1,000 cells ×
//! 80 GiB over 100,000 instances; scaled for other cell and instance
//! counts so that the total stays at half the memory); disk 256 MB–4 GB.
//!
//! It prints numbers and asserts nothing about them. All three processes
//! share the machine's CPUs: the load generator's 1,000 QUIC endpoints cost
//! CPU too, and the report says how much each process used.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use corral_brain::api::{CellState, CellView};
use corral_brain::certs::{self, Validity};
use corral_brain::sim::{self, Mark, SimCell};
use corral_brain::tls::Credentials;
use corral_brain::PeerIdentity;
use corral_proto::wire::{BrainId, Zone};
use corral_proto::{Capacity, CellId};
use serde_json::{json, Value};

use crate::bench_auction::{spread_of, Rng, CELL, ZONES};
use crate::util;

const ADMIN: &str = "bench-admin-token-0123456789";
const TENANT: &str = "bench";
const BRAIN_ID: &str = "bench";
/// Per-instance memory (MB) by weight: mean 409.6 MB.
const MEMORY: [(u64, u64); 6] = [
    (40, 128),
    (30, 256),
    (17, 512),
    (9, 1024),
    (3, 2048),
    (1, 4096),
];
const MEMORY_MEAN: f64 = 409.6;
const DISK: [(u64, u64); 5] = [(30, 256), (30, 512), (25, 1024), (10, 2048), (5, 4096)];
const POLL: Duration = Duration::from_millis(100);
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// How long to wait, after the clock stops, for the cells to hold exactly
/// the instances asked for (duplicates stopped) before reading the balance.
const SETTLE: Duration = Duration::from_secs(30);
/// How long to watch the brain after that, for work still queued.
const AFTERWARDS: Duration = Duration::from_secs(10);

const HELP: &str = "\
usage: cargo xtask bench auction --quic [--cells N] [--instances M] [--seed S]
                                 [--clients K] [--bulk B] [--start-delay-ms D]
                                 [--timeout SECS] [--keep]

The auction end to end: the release corral-brain as its own process, a load
generator process holding N simulated cells (real QUIC + mTLS connections on
127.0.0.1, answering bids and accepting work without containers), and M
instances pushed through POST /v1/apps. Reports placements per second,
auction round latency p50/p99 (from the brain's histogram), the spread of
memory utilisation across cells with half the memory placed, and the
brain's RSS.

  --cells N          simulated cells (default 1000)
  --instances M      instances to place (default 100000); memory per instance
                     is scaled so that they ask for half the cells' memory
  --seed S           workload seed (default 0xc077a1)
  --clients K        concurrent API connections pushing apps (default 4)
  --bulk B           apps per POST /v1/apps (a list; default 250, at most
                     1000); 1 posts each app on its own (the single form)
  --start-delay-ms D a simulated cell reports an instance running D ms after
                     accepting it (default 10)
  --timeout SECS     give up waiting for everything to run (default 600)
  --keep             keep the temporary directory (certificates, store, logs,
                     the cells as the balance was read, and timeline.txt:
                     when each simulated cell got bid requests and work,
                     marked instances running and reported them); with
                     CORRAL_BENCH_BRAIN_LOG=warn,corral_brain::round=debug the
                     brain logs every round's view of every cell

Smoke test: cargo xtask bench auction --quic --cells 50 --instances 2000";

#[derive(Debug, Clone)]
struct Options {
    cells: usize,
    instances: usize,
    seed: u64,
    clients: usize,
    bulk: usize,
    start_delay_ms: u64,
    timeout: Duration,
    keep: bool,
}

fn value<T: std::str::FromStr>(name: &str, v: Option<&String>) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    let v = v.with_context(|| format!("{name} needs a value"))?;
    v.parse()
        .with_context(|| format!("{name} {v:?} is not a valid value"))
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        cells: 1000,
        instances: 100_000,
        seed: 0x00c0_77a1,
        clients: 4,
        bulk: 250,
        start_delay_ms: 10,
        timeout: Duration::from_secs(600),
        keep: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let name = arg.as_str();
        match name {
            "--cells" => o.cells = value(name, it.next())?,
            "--instances" => o.instances = value(name, it.next())?,
            "--seed" => o.seed = value(name, it.next())?,
            "--clients" => o.clients = value(name, it.next())?,
            "--bulk" => o.bulk = value(name, it.next())?,
            "--start-delay-ms" => o.start_delay_ms = value(name, it.next())?,
            "--timeout" => o.timeout = Duration::from_secs(value(name, it.next())?),
            "--keep" => o.keep = true,
            "-h" | "--help" => {
                println!("{HELP}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n\n{HELP}"),
        }
    }
    if o.cells == 0 || o.instances == 0 || o.clients == 0 || o.bulk == 0 {
        bail!("--cells, --instances, --clients and --bulk must be at least 1");
    }
    if o.bulk > corral_brain::api::MAX_BULK_APPS {
        bail!(
            "--bulk {} is more than the brain takes in one request ({})",
            o.bulk,
            corral_brain::api::MAX_BULK_APPS
        );
    }
    let slots = o.cells as u64 * CELL.containers;
    if o.instances as u64 > slots * 9 / 10 {
        bail!(
            "{} instances do not fit comfortably in {} cells of {} containers each",
            o.instances,
            o.cells,
            CELL.containers
        );
    }
    Ok(o)
}

// ---------------------------------------------------------------------------
// Workload.

#[derive(Debug, Clone)]
struct AppSpec {
    name: String,
    instances: u32,
    memory_mb: u64,
    disk_mb: u64,
}

/// How much [`MEMORY`] is scaled by so that `instances` instances ask for
/// half the memory of `cells` cells.
pub(crate) fn half_memory_scale(cells: usize, instances: usize) -> f64 {
    let target_mean = CELL.memory_mb as f64 * cells as f64 / 2.0 / instances as f64;
    target_mean / MEMORY_MEAN
}

/// One instance's memory (MB): drawn from [`MEMORY`], scaled.
pub(crate) fn draw_memory_mb(rng: &mut Rng, scale: f64) -> u64 {
    ((rng.weighted(&MEMORY) as f64 * scale).round() as u64).max(16)
}

fn workload(o: &Options) -> Vec<AppSpec> {
    let mut rng = Rng(o.seed);
    let scale = half_memory_scale(o.cells, o.instances);
    let mut apps = Vec::new();
    let mut left = o.instances as u64;
    while left > 0 {
        let count = match rng.range(0, 99) {
            0..=59 => rng.range(1, 3),
            60..=89 => rng.range(4, 20),
            _ => rng.range(21, 100),
        }
        .min(left);
        let memory_mb = draw_memory_mb(&mut rng, scale);
        let disk_mb = rng.weighted(&DISK);
        apps.push(AppSpec {
            name: format!("app-{:06}", apps.len()),
            instances: u32::try_from(count).unwrap_or(u32::MAX),
            memory_mb,
            disk_mb,
        });
        left -= count;
    }
    apps
}

// ---------------------------------------------------------------------------
// A minimal keep-alive HTTP/1.1 client (the CLI's client closes after every
// request; 10,000 POSTs want one connection each per pushing thread).

struct Http {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// One request; a connection the server closed while idle is replaced
    /// once. Returns the status and the body.
    fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String)> {
        let reused = self.conn.is_some();
        match self.try_request(method, path, body) {
            Ok(r) => Ok(r),
            Err(_) if reused => {
                self.conn = None;
                self.try_request(method, path, body)
            }
            Err(e) => Err(e),
        }
        .with_context(|| format!("{method} {path} on http://{}", self.addr))
    }

    fn try_request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        if self.conn.is_none() {
            let s = TcpStream::connect(self.addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(Duration::from_secs(120)))?;
            self.conn = Some(BufReader::new(s));
        }
        let Some(conn) = self.conn.as_mut() else {
            bail!("no connection");
        };
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: brain\r\nauthorization: Bearer {ADMIN}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let result = (|| {
            conn.get_mut().write_all(req.as_bytes())?;
            let mut line = String::new();
            if conn.read_line(&mut line)? == 0 {
                bail!("connection closed");
            }
            let status: u16 = line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("bad status line {line:?}"))?;
            let mut length = None;
            let mut close = false;
            loop {
                line.clear();
                conn.read_line(&mut line)?;
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    let k = k.trim().to_ascii_lowercase();
                    if k == "content-length" {
                        length = Some(v.trim().parse::<usize>()?);
                    } else if k == "connection" && v.trim().eq_ignore_ascii_case("close") {
                        close = true;
                    } else if k == "transfer-encoding" {
                        bail!("chunked responses are not supported here");
                    }
                }
            }
            let mut buf = vec![0; length.context("response without content-length")?];
            conn.read_exact(&mut buf)?;
            Ok((status, String::from_utf8_lossy(&buf).into_owned(), close))
        })();
        match result {
            Ok((status, body, close)) => {
                if close {
                    self.conn = None;
                }
                Ok((status, body))
            }
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    fn get(&mut self, path: &str) -> Result<String> {
        let (status, body) = self.request("GET", path, None)?;
        if status != 200 {
            bail!("GET {path}: HTTP {status}: {}", body.trim());
        }
        Ok(body)
    }
}

// ---------------------------------------------------------------------------
// The brain's metrics.

/// The samples of a Prometheus/OpenMetrics text exposition.
struct Metrics(Vec<(String, f64)>);

impl Metrics {
    fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| {
                    let (name, v) = l.rsplit_once(' ')?;
                    Some((name.to_owned(), v.parse().ok()?))
                })
                .collect(),
        )
    }

    fn get(&self, name: &str) -> f64 {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0.0, |(_, v)| *v)
    }

    /// Samples `prefix{label="x"}` as (x, value).
    fn labelled(&self, prefix: &str) -> Vec<(String, f64)> {
        let start = format!("{prefix}{{");
        self.0
            .iter()
            .filter_map(|(n, v)| {
                let labels = n.strip_prefix(&start)?.strip_suffix('}')?;
                let (_, value) = labels.split_once('=')?;
                Some((value.trim_matches('"').to_owned(), *v))
            })
            .collect()
    }

    /// Cumulative histogram buckets (upper bound, count), +Inf last.
    fn buckets(&self, histogram: &str) -> Vec<(f64, f64)> {
        let mut b: Vec<(f64, f64)> = self
            .labelled(&format!("{histogram}_bucket"))
            .into_iter()
            .filter_map(|(le, v)| {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}

/// The q-quantile of a cumulative histogram, interpolated linearly inside
/// its bucket (as Prometheus' `histogram_quantile`). `Err(bound)` when it
/// falls in the +Inf bucket: above the largest finite bound.
fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<Result<f64, f64>> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(Err(lower.0));
            }
            let inside = count - lower.1;
            let frac = if inside > 0.0 {
                (rank - lower.1) / inside
            } else {
                1.0
            };
            return Some(Ok(lower.0 + (le - lower.0) * frac));
        }
        lower = (le, count);
    }
    None
}

fn fmt_quantile(q: Option<Result<f64, f64>>) -> String {
    match q {
        None => "n/a".into(),
        Some(Ok(s)) => format!("{:.1} ms", s * 1e3),
        Some(Err(bound)) => format!("> {:.0} ms", bound * 1e3),
    }
}

// ---------------------------------------------------------------------------
// Processes.

/// A child process, stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Result<Self> {
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork
        // and exec. The child gets SIGTERM if this process dies, so that a
        // crash here leaves no brain or load generator behind.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let shown = util::display(cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("could not start `{shown}`"))?;
        Ok(Self { name, child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited.
    fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the {} exited ({status}); its log {}:\n{}",
                self.name,
                log.display(),
                tail(log, 20)
            );
        }
        Ok(())
    }

    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: kill has no memory-safety preconditions; the pid
                // is our own unreaped child, so it cannot have been reused.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A `/proc/<pid>/status` field in KiB.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// User + system CPU time of a process so far.
fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// Time a thread spent on a CPU and waiting for one (runnable, not
/// running): `/proc/<pid>/task/<tid>/schedstat`.
fn schedstat(task: &str) -> Option<(Duration, Duration)> {
    let text = std::fs::read_to_string(format!("/proc/{task}/schedstat")).ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((
        Duration::from_nanos(f.next()??),
        Duration::from_nanos(f.next()??),
    ))
}

fn free_port_tcp() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn free_port_udp() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn toml_str(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))?;
    Ok(serde_json::to_string(s)?)
}

fn cell_name(i: usize) -> String {
    format!("c{i:04}")
}

/// The brain's release binary: `$CORRAL_BRAIN_BIN`, or built now.
fn brain_binary() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("CORRAL_BRAIN_BIN") {
        return Ok(bin.into());
    }
    util::run(util::cargo().args([
        "build",
        "--release",
        "--quiet",
        "--package",
        "corral-brain",
        "--bin",
        "corral-brain",
    ]))?;
    Ok(util::target_dir().join("release/corral-brain"))
}

/// The least and the most used cells by memory, and how many stand more
/// than 2.5 points off the mean either way: one cell left behind and a
/// wide spread read differently.
fn extremes(cells: &[CellView], mean: f64) -> String {
    let used = |c: &CellView| {
        let total = c.total.memory_mb.max(1) as f64;
        1.0 - c.available.memory_mb as f64 / total
    };
    let mut connected: Vec<&CellView> = cells
        .iter()
        .filter(|c| c.state == CellState::Connected)
        .collect();
    if connected.is_empty() {
        return String::new();
    }
    connected.sort_by(|a, b| used(a).total_cmp(&used(b)));
    let show = |c: &CellView| {
        format!(
            "{} (zone {}, {} instances, {:.1} %)",
            c.id,
            c.zone,
            c.instances,
            used(c) * 100.0
        )
    };
    let off = |far: &dyn Fn(f64) -> bool| {
        let ids: Vec<String> = connected
            .iter()
            .filter(|c| far(used(c)))
            .map(|c| c.id.to_string())
            .collect();
        let listed = ids.iter().take(12).cloned().collect::<Vec<_>>().join(" ");
        let more = if ids.len() > 12 { " …" } else { "" };
        (ids.len(), format!("{listed}{more}"))
    };
    let (below, below_ids) = off(&|u| u < mean - 0.025);
    let (above, above_ids) = off(&|u| u > mean + 0.025);
    let n = connected.len();
    format!(
        "Memory extremes: least used {}, {}; most used {}, {}; {below} cells more than 2.5 \
         points below the mean ({below_ids}), {above} more than 2.5 above ({above_ids}).\n\n",
        show(connected[0]),
        show(connected[1.min(n - 1)]),
        show(connected[n - 1]),
        show(connected[n.saturating_sub(2)]),
    )
}

// ---------------------------------------------------------------------------
// The load generator (`bench auction-loadgen`, run by `run` below).

struct LoadgenOptions {
    brain: SocketAddr,
    certs: PathBuf,
    cells: usize,
    start_delay: Duration,
    /// Where to answer "what do the cells run?" (asked on stdin).
    status: Option<PathBuf>,
    /// Where to write, with each answer, when each cell did what.
    timeline: Option<PathBuf>,
}

/// What the simulated cells hold, as they see it.
#[derive(Debug, Clone, Copy, Default)]
struct CellsStatus {
    /// Distinct (app, index) slots with a running instance.
    slots_running: u64,
    running: u64,
    /// Starting or running.
    live: u64,
}

/// Counts what the cells run (clones every cell's instances: only asked
/// for at the end of the timed phase).
fn cells_status(cells: &[sim::SimHandle]) -> CellsStatus {
    let mut slots = std::collections::HashSet::new();
    let mut st = CellsStatus::default();
    for c in cells {
        for (spec, state) in c.instances().into_values() {
            match state {
                corral_proto::InstanceState::Running => {
                    st.running += 1;
                    st.live += 1;
                    slots.insert((spec.app, spec.index));
                }
                corral_proto::InstanceState::Starting => st.live += 1,
                _ => {}
            }
        }
    }
    st.slots_running = slots.len() as u64;
    st
}

/// Writes every cell's timeline to `path`, one `<cell> <mark> <µs since
/// the epoch> <items>` line per step.
fn write_timeline(cells: &[sim::SimHandle], path: &Path) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (i, c) in cells.iter().enumerate() {
        let name = cell_name(i);
        for m in c.timeline() {
            writeln!(out, "{name} {} {} {}", m.mark.name(), m.at_us, m.n)?;
        }
    }
    out.flush()
}

/// Answers every line on stdin (a sequence number) by writing
/// `<seq> <slots running> <running> <live>` to `path`, replaced whole
/// (and the cells' timelines to `timeline`, if given).
fn answer_status(cells: Vec<sim::SimHandle>, path: PathBuf, timeline: Option<PathBuf>) {
    let tmp = path.with_extension("tmp");
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { return };
        if let Some(t) = &timeline {
            if let Err(e) = write_timeline(&cells, t) {
                eprintln!("writing {}: {e}", t.display());
            }
        }
        let st = cells_status(&cells);
        let text = format!(
            "{} {} {} {}\n",
            line.trim(),
            st.slots_running,
            st.running,
            st.live
        );
        if std::fs::write(&tmp, text).is_err() || std::fs::rename(&tmp, &path).is_err() {
            return;
        }
    }
}

/// Raises the soft open-file limit to the hard one: every simulated cell
/// holds a UDP socket.
fn raise_nofile() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write to/read from the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            return None;
        }
    }
    Some((lim.rlim_cur, lim.rlim_max))
}

/// Holds `--cells` simulated cells connected to `--brain` until killed.
pub fn loadgen(args: &[String]) -> Result<()> {
    let mut o = LoadgenOptions {
        brain: "127.0.0.1:7901".parse()?,
        certs: PathBuf::new(),
        cells: 1000,
        start_delay: Duration::from_millis(10),
        status: None,
        timeline: None,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let name = arg.as_str();
        match name {
            "--brain" => o.brain = value(name, it.next())?,
            "--certs" => o.certs = value(name, it.next())?,
            "--cells" => o.cells = value(name, it.next())?,
            "--start-delay-ms" => o.start_delay = Duration::from_millis(value(name, it.next())?),
            "--status" => o.status = Some(value(name, it.next())?),
            "--timeline" => o.timeline = Some(value(name, it.next())?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let nofile = raise_nofile();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!(
        "load generator: {} cells → {}, open-file limit {nofile:?}, {} runtime workers",
        o.cells,
        o.brain,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    runtime.block_on(async move {
        let mut cells = Vec::with_capacity(o.cells);
        for i in 0..o.cells {
            let id = CellId::new(cell_name(i))?;
            let creds = Credentials::from_dir(&o.certs, &PeerIdentity::Cell(id.clone()))?;
            cells.push(sim::spawn(
                SimCell {
                    id,
                    zone: Zone::new(format!("zone-{}", i % ZONES))?,
                    tags: Default::default(),
                    total: CELL,
                    start_delay: o.start_delay,
                },
                creds,
                o.brain,
                Duration::from_secs(1),
            ));
        }
        if o.timeline.is_some() {
            for c in &cells {
                c.record_timeline();
            }
        }
        if let Some(path) = o.status.clone() {
            let cells = cells.clone();
            let timeline = o.timeline.clone();
            std::thread::spawn(move || answer_status(cells, path, timeline));
        }
        let started = Instant::now();
        let mut last = usize::MAX;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let connected = cells.iter().filter(|c| c.connected()).count();
            if connected != last {
                println!(
                    "{:>6.1} s: {connected} cells connected",
                    started.elapsed().as_secs_f64()
                );
                last = connected;
            }
        }
    })
}

// ---------------------------------------------------------------------------
// The benchmark.

/// What the timed phase saw.
#[derive(Default)]
struct Timings {
    posted: Option<Duration>,
    placed: Option<Duration>,
    /// `instances_running` reached the total (duplicates count).
    running: Option<Duration>,
    /// Every slot has a running instance, as the cells see it.
    slots: Option<Duration>,
    /// What the cells held when last asked.
    cells: CellsStatus,
    /// Where it stopped (all, or when it timed out).
    end: Duration,
    final_placed: f64,
    final_running: f64,
    post_errors: Vec<String>,
    brain_cpu: Duration,
    /// Of which the main thread, where the brain's loop runs.
    brain_main_cpu: Duration,
    /// Time the main thread was runnable but waited for a CPU.
    brain_main_wait: Duration,
    loadgen_cpu: Duration,
    self_cpu: Duration,
}

struct Setup {
    certs: Duration,
    connect: Duration,
}

/// Runs the benchmark. `args` are what follows `bench auction --quic`.
pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    if cfg!(debug_assertions) {
        eprintln!("note: built without optimisations; `cargo xtask bench auction` re-runs itself in release");
    }
    let brain_bin = brain_binary()?;
    let dir = std::env::temp_dir().join(format!("corral-bench-auction-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    println!("==> working directory {}", dir.display());
    let result = run_in(&o, &brain_bin, &dir);
    if o.keep || result.is_err() {
        println!(
            "kept {} (certificates, store, brain.log, loadgen.log, cells.json, timeline.txt)",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn run_in(o: &Options, brain_bin: &Path, dir: &Path) -> Result<()> {
    let apps = workload(o);
    let total: usize = apps.iter().map(|a| a.instances as usize).sum();
    let requested_mb: u64 = apps
        .iter()
        .map(|a| u64::from(a.instances) * a.memory_mb)
        .sum();
    let capacity_mb = CELL.memory_mb * o.cells as u64;

    // Certificates (setup, not timed in the results).
    let certs_dir = dir.join("certs");
    let t = Instant::now();
    let v = Validity::days_from(SystemTime::now(), 2);
    certs::init(&certs_dir, v, false)?;
    certs::issue(
        &certs_dir,
        &PeerIdentity::Brain(BrainId::new(BRAIN_ID)?),
        v,
        false,
    )?;
    for i in 0..o.cells {
        certs::issue(
            &certs_dir,
            &PeerIdentity::Cell(CellId::new(cell_name(i))?),
            v,
            false,
        )?;
    }
    let certs_took = t.elapsed();
    println!(
        "==> certificates for the brain and {} cells: {}",
        o.cells,
        util::fmt_duration(certs_took)
    );

    // The brain.
    let api_port = free_port_tcp()?;
    let quic_port = free_port_udp()?;
    let api: SocketAddr = ([127, 0, 0, 1], api_port).into();
    let quic: SocketAddr = ([127, 0, 0, 1], quic_port).into();
    let config = format!(
        "brain_id = \"{BRAIN_ID}\"\ndata_dir = {}\ncell_lost_grace_secs = 60\n\
         [api]\nlisten = \"{api}\"\n[quic]\nlisten = \"{quic}\"\n\
         [tls]\nca = {}\ncert = {}\nkey = {}\n[tokens]\nadmin = \"{ADMIN}\"\n",
        toml_str(&dir.join("data"))?,
        toml_str(&certs_dir.join("ca.pem"))?,
        toml_str(&certs_dir.join(format!("brain-{BRAIN_ID}.pem")))?,
        toml_str(&certs_dir.join(format!("brain-{BRAIN_ID}-key.pem")))?,
    );
    let config_path = dir.join("brain.toml");
    std::fs::write(&config_path, config)?;
    let brain_log = dir.join("brain.log");
    let mut brain = Proc::spawn(
        "brain",
        Command::new(brain_bin)
            .arg("--config")
            .arg(&config_path)
            .env(
                "RUST_LOG",
                std::env::var("CORRAL_BENCH_BRAIN_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("brain.stdout"))?)
            .stderr(std::fs::File::create(&brain_log)?),
    )?;
    println!(
        "==> brain {} (pid {}): API http://{api}, QUIC {quic}",
        brain_bin.display(),
        brain.pid()
    );
    let mut http = Http::new(api);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        brain.check_alive(&brain_log)?;
        if http.get("/healthz").is_ok() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the brain's API did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    // The load generator.
    let loadgen_log = dir.join("loadgen.log");
    let log = std::fs::File::create(&loadgen_log)?;
    let t = Instant::now();
    let mut loadgen = Proc::spawn(
        "load generator",
        Command::new(std::env::current_exe()?)
            .args(["bench", "auction-loadgen", "--brain"])
            .arg(quic.to_string())
            .arg("--certs")
            .arg(&certs_dir)
            .args(["--cells", &o.cells.to_string()])
            .args(["--start-delay-ms", &o.start_delay_ms.to_string()])
            .arg("--status")
            .arg(dir.join("loadgen.status"))
            .args(
                o.keep
                    .then(|| {
                        [
                            "--timeline".into(),
                            dir.join("timeline.txt").into_os_string(),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let mut cells_link = CellsLink {
        stdin: loadgen
            .child
            .stdin
            .take()
            .context("the load generator's stdin")?,
        path: dir.join("loadgen.status"),
        seq: 0,
    };
    println!(
        "==> load generator (pid {}): {} simulated cells",
        loadgen.pid(),
        o.cells
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        brain.check_alive(&brain_log)?;
        loadgen.check_alive(&loadgen_log)?;
        let connected = connected_cells(&mut http)?;
        if connected >= o.cells {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {connected} of {} cells connected within 300 s",
                o.cells
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let setup = Setup {
        certs: certs_took,
        connect: t.elapsed(),
    };
    println!(
        "==> all {} cells connected after {}; brain RSS {} MiB",
        o.cells,
        util::fmt_duration(setup.connect),
        status_kib(brain.pid(), "VmRSS:").unwrap_or(0) / 1024
    );
    let brain_rss_idle = status_kib(brain.pid(), "VmRSS:");

    println!(
        "==> placing {total} instances of {} apps ({:.1} % of the cells' memory) with {} API connections, {} apps per POST",
        apps.len(),
        requested_mb as f64 / capacity_mb as f64 * 100.0,
        o.clients,
        o.bulk
    );
    let timings = timed_phase(
        o,
        &apps,
        total,
        api,
        &mut brain,
        &mut loadgen,
        &mut cells_link,
        (&brain_log, &loadgen_log),
    )?;

    // After: what the cells hold when the clock stopped, then once settled
    // (no instance more than asked for: duplicates stopped), memory, log.
    let on_cells_at_end = cell_views(&mut http)?
        .iter()
        .map(|c| u64::from(c.instances))
        .sum::<u64>();
    let settle_start = Instant::now();
    let (metrics, cells) = loop {
        let metrics = Metrics::parse(&http.get("/metrics")?);
        let cells = cell_views(&mut http)?;
        let on_cells: u64 = cells.iter().map(|c| u64::from(c.instances)).sum();
        let running = metrics.get("corral_brain_instances_running");
        if (on_cells == total as u64 && running >= total as f64) || settle_start.elapsed() > SETTLE
        {
            break (metrics, cells);
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let settled = (settle_start.elapsed(), on_cells_at_end);
    // The cells as the balance was read (kept with --keep).
    std::fs::write(dir.join("cells.json"), serde_json::to_vec_pretty(&cells)?)?;
    let brain_mem = (
        status_kib(brain.pid(), "VmHWM:"),
        status_kib(brain.pid(), "VmRSS:"),
    );
    let loadgen_mem = (
        status_kib(loadgen.pid(), "VmHWM:"),
        status_kib(loadgen.pid(), "VmRSS:"),
    );
    // Whether the brain still has work queued once everything runs.
    std::thread::sleep(AFTERWARDS);
    let later = Metrics::parse(&http.get("/metrics")?);
    let afterwards = (
        later.get("corral_brain_placements_total") - metrics.get("corral_brain_placements_total"),
        later.get("corral_brain_messages_total{direction=\"out\",type=\"stop-work\"}")
            - metrics.get("corral_brain_messages_total{direction=\"out\",type=\"stop-work\"}"),
    );
    let log_summary = summarise_log(&brain_log);
    let report = report(&Report {
        o,
        apps: apps.len(),
        total,
        requested: requested_mb as f64 / capacity_mb as f64,
        setup: &setup,
        timings: &timings,
        metrics: &metrics,
        cells: &cells,
        settled,
        afterwards,
        brain_mem,
        brain_rss_idle,
        loadgen_mem,
        log: &log_summary,
    });
    println!("\n{report}");
    if o.keep {
        match std::fs::read_to_string(dir.join("timeline.txt")) {
            Ok(text) => println!("{}", timeline_summary(&text)),
            Err(e) => println!("no timeline.txt: {e}"),
        }
    }
    brain.stop();
    loadgen.stop();
    Ok(())
}

/// What the simulated cells' timelines (`timeline.txt`, `<cell> <mark>
/// <µs> <n>` per line) say about where a start's time went, over every
/// cell: from a cell's bid answer to the next `StartWork` it received (the
/// brain's loop and the way back), from a `StartWork` to the next instance
/// its timer marked running (the load generator's timers), and from that
/// to the next report sent (the load generator). Each step is paired with
/// the next one of the following kind on the same cell, so it is an
/// estimate, good for telling which side is slow.
fn timeline_summary(text: &str) -> String {
    let mut cells: BTreeMap<&str, BTreeMap<&str, Vec<u64>>> = BTreeMap::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(cell), Some(mark), Some(Ok(us))) = (f.next(), f.next(), f.next().map(str::parse))
        else {
            continue;
        };
        cells
            .entry(cell)
            .or_default()
            .entry(mark)
            .or_default()
            .push(us);
    }
    let step = |from: &str, to: &str| {
        let mut waits: Vec<u64> = Vec::new();
        for marks in cells.values() {
            let (Some(a), Some(b)) = (marks.get(from), marks.get(to)) else {
                continue;
            };
            let mut b = b.clone();
            b.sort_unstable();
            for &t in a {
                let next = b.partition_point(|&x| x < t);
                if let Some(&u) = b.get(next) {
                    waits.push(u - t);
                }
            }
        }
        waits.sort_unstable();
        // Nearest rank.
        let at = |q: f64| {
            let i = ((waits.len() as f64 * q).ceil() as usize).saturating_sub(1);
            waits
                .get(i)
                .map_or("n/a".to_owned(), |us| format!("{:.0} ms", *us as f64 / 1e3))
        };
        format!(
            "p50 {}, p90 {}, max {} ({} pairs)",
            at(0.5),
            at(0.9),
            at(1.0),
            waits.len()
        )
    };
    format!(
        "Simulated cells' timelines ({} cells, timeline.txt): bid answer → StartWork {}; \
         StartWork → running (the start delay's timer) {}; running → report {}.",
        cells.len(),
        step(Mark::Bids.name(), Mark::StartWork.name()),
        step(Mark::StartWork.name(), Mark::Running.name()),
        step(Mark::Running.name(), Mark::Delta.name()),
    )
}

fn cell_views(http: &mut Http) -> Result<Vec<CellView>> {
    let body: Value = serde_json::from_str(&http.get("/v1/cells")?)?;
    Ok(serde_json::from_value(body["cells"].clone())?)
}

fn connected_cells(http: &mut Http) -> Result<usize> {
    let body: Value = serde_json::from_str(&http.get("/v1/cells")?)?;
    Ok(body["cells"].as_array().map_or(0, |c| {
        c.iter().filter(|c| c["state"] == "connected").count()
    }))
}

/// Asks the load generator what its cells run.
struct CellsLink {
    stdin: std::process::ChildStdin,
    path: PathBuf,
    seq: u64,
}

impl CellsLink {
    fn ask(&mut self) -> Result<CellsStatus> {
        self.seq += 1;
        writeln!(self.stdin, "{}", self.seq).context("asking the load generator")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            let f: Vec<u64> = text
                .split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect();
            if let [seq, slots_running, running, live] = f[..] {
                if seq == self.seq {
                    return Ok(CellsStatus {
                        slots_running,
                        running,
                        live,
                    });
                }
            }
            if Instant::now() > deadline {
                bail!("the load generator did not say what its cells run within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn timed_phase(
    o: &Options,
    apps: &[AppSpec],
    total: usize,
    api: SocketAddr,
    brain: &mut Proc,
    loadgen: &mut Proc,
    cells_link: &mut CellsLink,
    logs: (&Path, &Path),
) -> Result<Timings> {
    let brain_pid = brain.pid().to_string();
    let loadgen_pid = loadgen.pid().to_string();
    let cpu = |pid: &str| cpu_time(pid).unwrap_or_default();
    // The brain's loop runs on its main thread (the runtime's block_on);
    // connections and the API on the worker threads.
    let brain_main = format!("{brain_pid}/task/{brain_pid}");
    let cpu0 = (
        cpu(&brain_pid),
        cpu(&loadgen_pid),
        cpu("self"),
        cpu(&brain_main),
    );
    let sched0 = schedstat(&brain_main).unwrap_or_default();
    let app_json = |a: &AppSpec| {
        json!({
            "tenant": TENANT, "name": a.name, "instances": a.instances,
            "rootfs": "/var/lib/corral/rootfs/base",
            "command": ["/bin/sleep", "infinity"],
            "resources": {"memory_mb": a.memory_mb, "disk_mb": a.disk_mb},
        })
    };
    // One body per POST: an app, or a list of `--bulk` apps.
    let bodies: Arc<Vec<(usize, String)>> = Arc::new(if o.bulk == 1 {
        apps.iter().map(|a| (1, app_json(a).to_string())).collect()
    } else {
        apps.chunks(o.bulk)
            .map(|c| {
                (
                    c.len(),
                    Value::from(c.iter().map(app_json).collect::<Vec<_>>()).to_string(),
                )
            })
            .collect()
    });
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));

    let start = Instant::now();
    let posters: Vec<_> = (0..o.clients)
        .map(|_| {
            let (bodies, next, done, errors) =
                (bodies.clone(), next.clone(), done.clone(), errors.clone());
            std::thread::spawn(move || {
                let mut http = Http::new(api);
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((count, body)) = bodies.get(i) else {
                        break;
                    };
                    let outcome = http.request("POST", "/v1/apps", Some(body));
                    let failed = match outcome {
                        Ok((201, _)) => None,
                        Ok((status, body)) => Some(format!("HTTP {status}: {}", body.trim())),
                        Err(e) => Some(format!("{e:#}")),
                    };
                    if let Some(e) = failed {
                        errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                    }
                    done.fetch_add(*count, Ordering::Relaxed);
                }
            })
        })
        .collect();

    let mut t = Timings::default();
    let mut http = Http::new(api);
    let mut last_progress = (Instant::now(), cpu(&brain_pid), 0.0);
    let total_f = total as f64;
    loop {
        std::thread::sleep(POLL);
        let elapsed = start.elapsed();
        if t.posted.is_none() && done.load(Ordering::Relaxed) == apps.len() {
            t.posted = Some(elapsed);
        }
        let m = Metrics::parse(&http.get("/metrics")?);
        let placed = m.get("corral_brain_placements_total");
        let running = m.get("corral_brain_instances_running");
        (t.final_placed, t.final_running, t.end) = (placed, running, elapsed);
        if t.placed.is_none() && placed >= total_f {
            t.placed = Some(elapsed);
        }
        if running >= total_f {
            t.running.get_or_insert(elapsed);
            // Duplicates count in the gauge: the cells say whether every
            // slot runs.
            let cells = cells_link.ask()?;
            t.cells = cells;
            if cells.slots_running >= total as u64 {
                t.slots = Some(start.elapsed());
                break;
            }
        }
        if last_progress.0.elapsed() >= PROGRESS_EVERY {
            let dt = last_progress.0.elapsed().as_secs_f64();
            let brain_cpu = cpu(&brain_pid);
            println!(
                "    {:>6.1} s: apps posted {:>6}/{}, placed {:>7}, running {:>7}, \
                 {:>6.0} placements/s, brain CPU {:>3.0} %",
                elapsed.as_secs_f64(),
                done.load(Ordering::Relaxed),
                apps.len(),
                placed,
                running,
                (placed - last_progress.2) / dt,
                (brain_cpu.saturating_sub(last_progress.1)).as_secs_f64() / dt * 100.0,
            );
            last_progress = (Instant::now(), brain_cpu, placed);
        }
        if elapsed > o.timeout {
            println!(
                "    timed out after {}: {running} of {total} running",
                util::fmt_duration(elapsed)
            );
            break;
        }
        if let Err(e) = brain
            .check_alive(logs.0)
            .and_then(|()| loadgen.check_alive(logs.1))
        {
            // Let the posting threads finish (they fail fast).
            next.store(bodies.len(), Ordering::Relaxed);
            for p in posters {
                let _ = p.join();
            }
            return Err(e);
        }
    }
    // The posting threads are done when everything runs; after a timeout
    // they are told to stop.
    next.store(bodies.len(), Ordering::Relaxed);
    for p in posters {
        let _ = p.join();
    }
    if t.posted.is_none() && done.load(Ordering::Relaxed) == apps.len() {
        t.posted = Some(start.elapsed());
    }
    t.post_errors = std::mem::take(&mut *errors.lock().unwrap_or_else(|e| e.into_inner()));
    t.brain_cpu = cpu(&brain_pid).saturating_sub(cpu0.0);
    t.loadgen_cpu = cpu(&loadgen_pid).saturating_sub(cpu0.1);
    t.self_cpu = cpu("self").saturating_sub(cpu0.2);
    t.brain_main_cpu = cpu(&brain_main).saturating_sub(cpu0.3);
    t.brain_main_wait = schedstat(&brain_main)
        .unwrap_or_default()
        .1
        .saturating_sub(sched0.1);
    Ok(t)
}

/// Removes ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Warnings and errors in the brain's log, by message (the timestamp and
/// `key=value` fields such as cell and instance names left out, so that
/// alike lines group).
fn summarise_log(path: &Path) -> BTreeMap<String, usize> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = strip_ansi(line);
        // `<timestamp> <LEVEL> <target>: <message> <key=value>...`
        let mut words = line.split_whitespace();
        let _timestamp = words.next();
        let Some(level) = words.next().filter(|l| ["WARN", "ERROR"].contains(l)) else {
            continue;
        };
        let target = words.next().unwrap_or("").trim_end_matches(':');
        let msg = words
            .filter(|w| !w.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        let msg: String = msg.chars().take(120).collect();
        *out.entry(format!("{level} {target}: {msg}")).or_insert(0) += 1;
    }
    out
}

struct Report<'a> {
    o: &'a Options,
    apps: usize,
    total: usize,
    requested: f64,
    setup: &'a Setup,
    timings: &'a Timings,
    metrics: &'a Metrics,
    cells: &'a [CellView],
    /// Time waited after the clock stopped; instances on cells when it stopped.
    settled: (Duration, u64),
    /// Placements and stops sent in the [`AFTERWARDS`] after the balance
    /// was read.
    afterwards: (f64, f64),
    brain_mem: (Option<u64>, Option<u64>),
    brain_rss_idle: Option<u64>,
    loadgen_mem: (Option<u64>, Option<u64>),
    log: &'a BTreeMap<String, usize>,
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("n/a".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn report(r: &Report<'_>) -> String {
    let o = r.o;
    let t = r.timings;
    let total = r.total as f64;
    let rate = |d: Option<Duration>| {
        d.map_or("not reached".into(), |d| {
            format!("{:.0}/s", total / d.as_secs_f64().max(1e-9))
        })
    };
    let time = |d: Option<Duration>| d.map_or("not reached".into(), util::fmt_duration);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut s = format!(
        "### auction over QUIC ({} cells, {} instances in {} apps, seed {:#x})\n\n\
         Brain: release `corral-brain` in its own process (store on disk, RUST_LOG=warn). \
         Load generator: {} simulated cells in one process, each with its own UDP socket, \
         QUIC connection and certificate; instances report running {} ms after being accepted. \
         {} keep-alive API connections push the apps, {} per `POST /v1/apps`. All three processes share {cpus} CPUs.\n\n\
         Setup, not timed: certificates for {} cells {}; all cells connected {} after the load \
         generator started.\n\n",
        o.cells,
        r.total,
        r.apps,
        o.seed,
        o.cells,
        o.start_delay_ms,
        o.clients,
        o.bulk,
        o.cells,
        util::fmt_duration(r.setup.certs),
        util::fmt_duration(r.setup.connect),
    );
    s += "| from the first POST until | time | instances/s |\n|---|---:|---:|\n";
    s += &format!(
        "| every `POST /v1/apps` answered ({} apps) | {} | {} |\n",
        r.apps,
        time(t.posted),
        rate(t.posted)
    );
    s += &format!(
        "| `placements_total` = {} (bid accepted, recorded, StartWork sent) | {} | {} |\n",
        r.total,
        time(t.placed),
        rate(t.placed)
    );
    s += &format!(
        "| `instances_running` = {} (the brain counts them running, duplicates included) | {} | {} |\n",
        r.total,
        time(t.running),
        rate(t.running)
    );
    s += &format!(
        "| every one of the {} slots running, as the cells see it | {} | **{}** |\n\n",
        r.total,
        time(t.slots),
        rate(t.slots)
    );
    if t.running.is_some() {
        s += &format!(
            "The cells then held {} running instances ({} distinct slots) and {} starting.\n\n",
            t.cells.running,
            t.cells.slots_running,
            t.cells.live - t.cells.running,
        );
    }
    if t.slots.is_none() {
        s += &format!(
            "Stopped after {}: {} placed, {} running.\n\n",
            util::fmt_duration(t.end),
            t.final_placed,
            t.final_running
        );
    }
    let m = r.metrics;
    let auctions = m.get("corral_brain_auctions_total");
    let buckets = m.buckets("corral_brain_auction_duration_seconds");
    let sum = m.get("corral_brain_auction_duration_seconds_sum");
    let count = m.get("corral_brain_auction_duration_seconds_count");
    s += &format!(
        "Auction rounds: {auctions:.0} (`corral_brain_auctions_total`), {:.0} placements per round on average. \
         Round latency (`corral_brain_auction_duration_seconds`: bid requests sent → round closed by \
         the loop once the last bid is processed; the answers that arrive together are recorded in one \
         store commit; the central scoring before it is not included), from the histogram, interpolated within buckets: p50 {}, p99 {}, mean {:.1} ms.\n\n",
        m.get("corral_brain_placements_total") / auctions.max(1.0),
        fmt_quantile(quantile(&buckets, 0.5)),
        fmt_quantile(quantile(&buckets, 0.99)),
        sum / count.max(1.0) * 1e3,
    );
    // The loop's cadence: how long its passes take, and so how long a
    // cell's answer waits to be applied (a bid that just misses a pass gets
    // its work a pass later).
    let hist = |name: &str| {
        let b = m.buckets(name);
        format!(
            "p50 {}, p99 {} over {:.0}",
            fmt_quantile(quantile(&b, 0.5)),
            fmt_quantile(quantile(&b, 0.99)),
            m.get(&format!("{name}_count")),
        )
    };
    let passes = m.buckets("corral_brain_loop_pass_duration_seconds");
    let total = passes.last().map_or(0.0, |b| b.1);
    let within = |le: f64| {
        passes
            .iter()
            .find(|b| (b.0 - le).abs() < 1e-9)
            .map_or(0.0, |b| b.1)
    };
    s += &format!(
        "The brain's loop (whole run, setup included): a pass (`corral_brain_loop_pass_duration_seconds`) {} passes, \
         of which {:.0} took over 100 ms and {:.0} over 250 ms; \
         a cell's message waited to be applied (`corral_brain_input_wait_seconds`) {} messages.\n\n",
        hist("corral_brain_loop_pass_duration_seconds"),
        total - within(0.1),
        total - within(0.25),
        hist("corral_brain_input_wait_seconds"),
    );
    let msg = |dir: &str, ty: &str| {
        m.get(&format!(
            "corral_brain_messages_total{{direction=\"{dir}\",type=\"{ty}\"}}"
        ))
    };
    let action = |a: &str| {
        m.get(&format!(
            "corral_brain_convergence_actions_total{{action=\"{a}\"}}"
        ))
    };
    let on_cells: u64 = r.cells.iter().map(|c| u64::from(c.instances)).sum();
    s += &format!(
        "What the brain did: {:.0} convergence passes (after a batch of inputs, over the slots \
         it touched; over every slot on cell changes, timers and every 5 s); {:.0} starts and {:.0} stops decided; {:.0} placements \
         ({:.0} more than instances asked for, {:.2} per bids answer); messages out: {:.0} bid-request, {:.0} \
         start-work, {:.0} stop-work; in: {:.0} bids (the answers of one loop pass are one \
         store commit), {:.0} ack, {:.0} state-delta. Instances on the cells when the \
         clock stopped: {}; {} later: {on_cells}.\n\n",
        m.get("corral_brain_convergence_runs_total"),
        action("start"),
        action("stop"),
        m.get("corral_brain_placements_total"),
        m.get("corral_brain_placements_total") - total,
        m.get("corral_brain_placements_total") / msg("in", "bids").max(1.0),
        msg("out", "bid-request"),
        msg("out", "start-work"),
        msg("out", "stop-work"),
        msg("in", "bids"),
        msg("in", "ack"),
        msg("in", "state-delta"),
        r.settled.1,
        util::fmt_duration(r.settled.0),
    );
    s += &format!(
        "In the {} after that the brain placed {:.0} more instances and sent {:.0} more \
         stop-work.\n\n",
        util::fmt_duration(AFTERWARDS),
        r.afterwards.0,
        r.afterwards.1,
    );
    let failures = m.labelled("corral_brain_placement_failures_total");
    if !failures.is_empty() {
        let f: Vec<String> = failures
            .iter()
            .map(|(k, v)| format!("{v:.0} {k}"))
            .collect();
        s += &format!("Placement failures: {}.\n\n", f.join(", "));
    }
    let caps: Vec<(Capacity, Capacity)> = r
        .cells
        .iter()
        .filter(|c| c.state == CellState::Connected)
        .map(|c| (c.total, c.available))
        .collect();
    let sp = spread_of(&caps);
    let (lo, hi) = r
        .cells
        .iter()
        .map(|c| c.instances)
        .fold((u32::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
    s += &format!(
        "Balance with {:.1} % of the memory asked for (mean used {:.1} % as the cells report it): \
         spread of used memory {:.1} %, disk {:.1} %, container slots {:.1} % (max − min across \
         {} connected cells); instances per cell {lo}–{hi}.\n\n",
        r.requested * 100.0,
        sp.mean_memory * 100.0,
        sp.memory * 100.0,
        sp.disk * 100.0,
        sp.containers * 100.0,
        caps.len(),
    );
    s += &extremes(r.cells, sp.mean_memory);
    let secs = t.end.as_secs_f64().max(1e-9);
    s += &format!(
        "Memory: brain VmHWM {} (VmRSS {} at the end, {} with the cells connected and nothing placed); \
         load generator VmHWM {} (VmRSS {}).\n\n\
         CPU during the timed phase ({}): brain {:.1} s ({:.0} % of one CPU; its main thread, which \
         runs the loop, {:.1} s = {:.0} %, and it waited {:.1} s = {:.0} % for a CPU while \
         runnable), load generator {:.1} s ({:.0} %), this process {:.1} s \
         ({:.0} %).\n\n",
        mib(r.brain_mem.0),
        mib(r.brain_mem.1),
        mib(r.brain_rss_idle),
        mib(r.loadgen_mem.0),
        mib(r.loadgen_mem.1),
        util::fmt_duration(t.end),
        t.brain_cpu.as_secs_f64(),
        t.brain_cpu.as_secs_f64() / secs * 100.0,
        t.brain_main_cpu.as_secs_f64(),
        t.brain_main_cpu.as_secs_f64() / secs * 100.0,
        t.brain_main_wait.as_secs_f64(),
        t.brain_main_wait.as_secs_f64() / secs * 100.0,
        t.loadgen_cpu.as_secs_f64(),
        t.loadgen_cpu.as_secs_f64() / secs * 100.0,
        t.self_cpu.as_secs_f64(),
        t.self_cpu.as_secs_f64() / secs * 100.0,
    );
    if !t.post_errors.is_empty() {
        s += &format!(
            "API errors: {} POSTs failed, first: {}\n\n",
            t.post_errors.len(),
            t.post_errors[0]
        );
    }
    if r.log.is_empty() {
        s += "Brain log: no warnings or errors.\n\n";
    } else {
        s += "Brain log, warnings and errors by message:\n\n";
        let mut by_count: Vec<_> = r.log.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1));
        for (msg, n) in by_count.iter().take(8) {
            s += &format!("- {n} × {msg}\n");
        }
        s += "\n";
    }
    let met = |ok: bool| if ok { "met" } else { "not met" };
    let per_sec = t.slots.map(|d| total / d.as_secs_f64().max(1e-9));
    s += &format!(
        "Anchors: Nomad placed 1M containers at ~3,750/s on 5 servers (C1M); kube-scheduler \
         ~100–400 pods/s. Target: ≥ 20,000 placements/s: {} ({}); utilisation spread ≤ 5 %: {} \
         ({:.1} %).",
        met(per_sec.is_some_and(|p| p >= 20_000.0)),
        per_sec.map_or("not all placed".into(), |p| format!("{p:.0}/s")),
        met(sp.memory <= 0.05),
        sp.memory * 100.0,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeline_is_summarised_step_by_step() {
        let text = "c1 bids 1000 2\nc1 start-work 5000 1\nc1 start-work 6000 1\n\
                    c1 running 16000 1\nc1 running 17000 1\nc1 delta 17000 2\n\
                    c2 bids 2000 1\nc2 start-work 102000 1\nc2 running 112000 1\n\
                    c2 delta 113000 1\nnot a line\n";
        let s = timeline_summary(text);
        assert!(s.contains("(2 cells"), "{s}");
        // c1 waited 4 ms, c2 100 ms.
        assert!(
            s.contains("bid answer → StartWork p50 4 ms, p90 100 ms, max 100 ms (2 pairs)"),
            "{s}"
        );
        // Each StartWork to the next running: 11 and 10 ms on c1, 10 on c2.
        assert!(
            s.contains("timer) p50 10 ms, p90 11 ms, max 11 ms (3 pairs)"),
            "{s}"
        );
        // Each running to the next report: 1 and 0 ms on c1, 1 on c2.
        assert!(
            s.contains("running → report p50 1 ms, p90 1 ms, max 1 ms (3 pairs)"),
            "{s}"
        );
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let b = [
            (0.01, 0.0),
            (0.1, 50.0),
            (1.0, 100.0),
            (f64::INFINITY, 100.0),
        ];
        assert_eq!(quantile(&b, 0.5), Some(Ok(0.1)));
        let Some(Ok(p75)) = quantile(&b, 0.75) else {
            panic!("p75 in a finite bucket")
        };
        assert!((p75 - 0.55).abs() < 1e-9);
        let b = [(0.01, 0.0), (f64::INFINITY, 4.0)];
        assert_eq!(quantile(&b, 0.99), Some(Err(0.01)));
        assert_eq!(quantile(&[], 0.5), None);
    }

    #[test]
    fn log_lines_group_without_colours_and_fields() {
        let dir = std::env::temp_dir().join(format!("corral-xtask-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let log = dir.join("brain.log");
        std::fs::write(
            &log,
            "\x1b[2m2026-11-25T14:55:32.614444Z\x1b[0m \x1b[33m WARN\x1b[0m \x1b[2mcorral_brain::run\x1b[0m\x1b[2m:\x1b[0m no bids within 2s \x1b[3mcell\x1b[0m\x1b[2m=\x1b[0mc0000\n\
             2026-11-25T14:55:32.7Z  WARN corral_brain::run: no bids within 2s cell=c0001 items=1\n\
             2026-11-25T14:55:32.8Z  INFO corral_brain::run: cell connected\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let summary = summarise_log(&log);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            summary.into_iter().collect::<Vec<_>>(),
            vec![("WARN corral_brain::run: no bids within 2s".to_owned(), 2)]
        );
    }

    #[test]
    fn metrics_parse_openmetrics_text() {
        let m = Metrics::parse(
            "# TYPE x counter\ncorral_brain_placements_total 12\n\
             corral_brain_auction_duration_seconds_bucket{le=\"0.001\"} 3\n\
             corral_brain_auction_duration_seconds_bucket{le=\"+Inf\"} 5\n# EOF\n",
        );
        assert_eq!(m.get("corral_brain_placements_total"), 12.0);
        assert_eq!(
            m.buckets("corral_brain_auction_duration_seconds"),
            vec![(0.001, 3.0), (f64::INFINITY, 5.0)]
        );
    }

    #[test]
    fn the_default_workload_asks_for_half_the_memory() {
        let o = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        let apps = workload(&o);
        let total: u64 = apps.iter().map(|a| u64::from(a.instances)).sum();
        assert_eq!(total, 100_000);
        assert!(apps.iter().all(|a| a.instances <= 1000));
        let mb: u64 = apps
            .iter()
            .map(|a| u64::from(a.instances) * a.memory_mb)
            .sum();
        let frac = mb as f64 / (CELL.memory_mb * 1000) as f64;
        assert!((0.4..0.6).contains(&frac), "{frac}");
    }
}
