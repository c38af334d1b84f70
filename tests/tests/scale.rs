//! 250 long-running instances on one cell with a subnet and the eBPF data
//! plane (a veth, an address and map entries each). The agent's memory and CPU are
//! measured and printed (figures, not asserted: the machine is shared);
//! while the instances run, the agent's API and `/metrics` must answer,
//! correctly and completely: every instance in the listing, in every
//! per-instance metric family, running as its own process in its own
//! cgroup. "Responsive" is a request timeout of [`RESPONSIVE`], far above
//! any normal answer, so that only a hang fails; the latencies measured
//! are printed. Then everything is deleted and nothing may be left.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{spawn_in_netns, spec, Cell};
use corral_cli::client::{Client, Endpoint, Response};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INSTANCES: usize = 250;
/// Start and delete requests in flight at once, as a brain's batches are.
const CLIENTS: usize = 8;
/// A request not answered within this is a hang.
const RESPONSIVE: Duration = Duration::from_secs(30);
/// How long the agent is left alone to measure its idle CPU use.
const IDLE: Duration = Duration::from_secs(10);
/// The cell's metrics listener, inside its network namespace.
const METRICS_ADDR: &str = "127.0.0.1:9800";
/// The cell's instance subnet: room for 250 and more.
const SUBNET: &str = "10.244.0.0/22";
/// The families with one sample per running instance (counters carry
/// `_total` in the classic text format).
const PER_INSTANCE: [&str; 6] = [
    "corral_instance_cpu_seconds_total",
    "corral_instance_memory_bytes",
    "corral_instance_memory_limit_bytes",
    "corral_instance_oom_kills_total",
    "corral_instance_disk_used_bytes",
    "corral_instance_pids",
];

fn id(i: usize) -> String {
    format!("s-{i}")
}

/// A small sleeping LRP; `/bin/sleep` ignores SIGTERM as a container's
/// init, so deletes use no grace period.
fn sleeper(index: usize) -> Value {
    let mut s = spec("lrp", &["/bin/sleep", "1000000"]);
    s["app"] = json!("scale");
    s["index"] = json!(index);
    s["resources"] = json!({"memory_mb": 16, "disk_mb": 16, "cpu_weight": 10, "max_pids": 8});
    s
}

/// What the agent process uses, from /proc.
#[derive(Clone, Copy)]
struct Usage {
    rss_kib: u64,
    hwm_kib: u64,
    cpu: Duration,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in /proc/<pid>/status:\n{status}"))
}

/// User + system CPU time of every thread of `pid` (/proc/<pid>/stat
/// fields 14 and 15, counted after the command name's last `)`).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz.max(1))
}

fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    Usage {
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
        cpu: cpu_time(pid),
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// Latencies, sorted, for printing.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Self(v)
    }

    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> Duration {
        let n = self.0.len();
        let rank = ((p / 100.0) * n as f64).ceil() as usize;
        self.0[rank.clamp(1, n) - 1]
    }

    fn summary(&self) -> String {
        format!(
            "n {}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            self.0.len(),
            self.pct(50.0).as_secs_f64() * 1e3,
            self.pct(99.0).as_secs_f64() * 1e3,
            self.pct(100.0).as_secs_f64() * 1e3,
        )
    }
}

/// One request, timed; a transport error (the timeout among them) fails
/// the test, naming the request.
fn timed(
    what: &str,
    f: impl FnOnce() -> Result<Response, corral_cli::client::ClientError>,
) -> (Response, Duration) {
    let t = Instant::now();
    let r = f().unwrap_or_else(|e| {
        panic!(
            "{what}: no answer ({e}) after {:.1} s (timeout {RESPONSIVE:?})",
            t.elapsed().as_secs_f64()
        )
    });
    (r, t.elapsed())
}

/// The instance label of every sample of `family` in a scrape.
fn instances_in(scrape: &str, family: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter_map(|l| l.strip_prefix(family)?.strip_prefix('{'))
        .filter_map(|l| {
            let v = &l[l.find("instance=\"")? + "instance=\"".len()..];
            Some(v[..v.find('"')?].to_owned())
        })
        .collect()
}

/// What a complete scrape lacks: for each per-instance family, the ids of
/// `must` it has no sample for, and the ids it has beyond `may`.
fn incomplete(scrape: &str, must: &BTreeSet<String>, may: &BTreeSet<String>) -> Vec<String> {
    let mut wrong = Vec::new();
    for family in PER_INSTANCE {
        let found = instances_in(scrape, family);
        let missing: Vec<_> = must.difference(&found).collect();
        let extra: Vec<_> = found.difference(may).collect();
        if !missing.is_empty() || !extra.is_empty() {
            wrong.push(format!(
                "{family}: {} missing {missing:?}, unexpected {extra:?}",
                missing.len()
            ));
        }
    }
    let running = format!("corral_instances{{state=\"running\"}} {}", must.len());
    let running_more = format!("corral_instances{{state=\"running\"}} {}", may.len());
    if !scrape.lines().any(|l| l == running || l == running_more) {
        wrong.push(format!("no `{running}`"));
    }
    wrong
}

/// The process `pid` (the instance's first, `corral-init`) is alive (not a
/// zombie) and sits in the instance's own memory cgroup, and its one child
/// runs `sleep`.
fn check_process(cell: &Cell, id: &str, pid: u64) {
    let alive = |pid: u64| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_else(|e| panic!("{id}: process {pid} is gone: {e}"));
        let state = stat[stat.rfind(')').unwrap() + 1..]
            .split_whitespace()
            .next()
            .map(str::to_owned);
        assert_ne!(
            state.as_deref(),
            Some("Z"),
            "{id}: process {pid} is a zombie"
        );
    };
    alive(pid);
    let init = common::cmdline(pid as u32).unwrap_or_default();
    assert!(
        init.starts_with(b"corral-init\0"),
        "{id}: process {pid} runs {:?}",
        String::from_utf8_lossy(&init)
    );
    // Answered "running", the command may still be on its way into
    // `sleep` (its execve under way): give it a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (child, cmdline) = loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let child: Option<u64> = children
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok());
        let cmd = child
            .and_then(|c| common::cmdline(c as u32))
            .unwrap_or_default();
        if cmd.starts_with(b"/bin/sleep\0") || Instant::now() >= deadline {
            break (child, cmd);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with("/bin/sleep\0"),
        "{id}: the child {child:?} of {pid} runs {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    if let Some(child) = child {
        alive(child);
    }
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let own = format!("/{}/{id}", cell.cgroup_root);
    assert!(
        cgroups
            .lines()
            .any(|l| l.contains(":memory:") && l.ends_with(&own)),
        "{id}: process {pid} is not in its memory cgroup {own}:\n{cgroups}"
    );
}

/// Runs `f(i)` for `0..n` from [`CLIENTS`] threads; the latencies of the
/// calls and the wall time of the whole.
fn parallel(n: usize, f: impl Fn(usize) + Sync) -> (Latencies, Duration) {
    let next = AtomicUsize::new(0);
    let latencies = Mutex::new(Vec::with_capacity(n));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..CLIENTS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let t = Instant::now();
                f(i);
                latencies.lock().unwrap().push(t.elapsed());
            });
        }
    });
    let wall = start.elapsed();
    (Latencies::new(latencies.into_inner().unwrap()), wall)
}

#[test]
fn a_cell_with_250_instances_answers_its_api_and_metrics_and_cleans_up() {
    let cell = Cell::start_with(&format!(
        "[capacity]\nmemory_mb = 8192\ndisk_mb = 8192\nmax_containers = {}\n\
         [metrics]\nlisten = \"{METRICS_ADDR}\"\n[network]\nsubnet = \"{SUBNET}\"\n",
        INSTANCES + 10
    ));
    let api = cell.client.clone().with_timeout(Some(RESPONSIVE));
    let agent = cell.agent_pid();
    let at_start = usage(agent);

    let (starts, wall) = parallel(INSTANCES, |i| {
        let (r, _) = timed(&format!("PUT {}", id(i)), || {
            api.put_json(&format!("/v1/instances/{}", id(i)), &sleeper(i))
        });
        assert_eq!(r.status, 201, "PUT {}: {}", id(i), r.text());
        let v = r.json().unwrap();
        assert_eq!(v["state"], "running", "{}: {v:#}", id(i));
    });
    let started = usage(agent);
    println!(
        "started {INSTANCES} instances in {:.1} s ({:.1}/s; {CLIENTS} clients; PUT {}); \
         agent CPU during the starts {:.2} s",
        wall.as_secs_f64(),
        INSTANCES as f64 / wall.as_secs_f64(),
        starts.summary(),
        (started.cpu - at_start.cpu).as_secs_f64(),
    );

    std::thread::sleep(IDLE);
    let idle = usage(agent);
    let shims = cell.shim_pids();
    assert_eq!(shims.len(), INSTANCES, "one shim per instance: {shims:?}");
    let shim_anon: u64 = shims
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .map(|s| status_kib(&s, "RssAnon:"))
        .sum();
    // Each instance's first process, corral-init, beside its command.
    let inits: Vec<u64> = (0..INSTANCES)
        .filter_map(|i| cell.get(&id(i))["pid"].as_u64())
        .collect();
    let init_anon: u64 = inits
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
        .map(|s| status_kib(&s, "RssAnon:"))
        .sum();
    println!(
        "agent with {INSTANCES} instances: VmRSS {} (VmHWM {}; {} before the starts), \
         CPU {:.2} % of a core over {} s idle; the {} shims' private memory (RssAnon) {} in all, \
         the {} corral-inits' {}",
        mib(idle.rss_kib),
        mib(idle.hwm_kib),
        mib(at_start.rss_kib),
        100.0 * (idle.cpu - started.cpu).as_secs_f64() / IDLE.as_secs_f64(),
        IDLE.as_secs(),
        shims.len(),
        mib(shim_anon),
        inits.len(),
        mib(init_anon),
    );

    // Prometheus' part: scrapes over TCP, back to back, for as long as the
    // API is being exercised below.
    let ids: BTreeSet<String> = (0..INSTANCES).map(id).collect();
    let extra = "s-extra".to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, ids) = (Arc::clone(&stop), ids.clone());
        let may: BTreeSet<String> = ids.iter().cloned().chain([extra.clone()]).collect();
        spawn_in_netns(&cell.netns, move || {
            let metrics = Client::new(Endpoint::Tcp(METRICS_ADDR.parse().unwrap()))
                .with_timeout(Some(RESPONSIVE));
            let mut latencies = Vec::new();
            loop {
                let (r, took) = timed("GET /metrics", || metrics.get("/metrics"));
                assert_eq!(r.status, 200, "GET /metrics: {}", r.text());
                let text = r.text();
                let wrong = incomplete(&text, &ids, &may);
                assert!(wrong.is_empty(), "incomplete scrape: {wrong:#?}\n{text}");
                latencies.push(took);
                if stop.load(Ordering::SeqCst) {
                    return Latencies::new(latencies);
                }
            }
        })
    };

    let during = Instant::now();
    let mut lists = Vec::new();
    for _ in 0..5 {
        let (r, took) = timed("GET /v1/instances", || api.get("/v1/instances"));
        assert_eq!(r.status, 200, "GET /v1/instances: {}", r.text());
        let v = r.json().unwrap();
        let listed = v["instances"].as_array().unwrap();
        let listed_ids: BTreeSet<String> = listed
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(listed_ids, ids, "the listing holds exactly the instances");
        for i in listed {
            assert_eq!(i["state"], "running", "{i:#}");
        }
        lists.push(took);
    }
    let mut gets = Vec::new();
    let mut addresses = BTreeSet::new();
    for i in &ids {
        let (r, took) = timed(&format!("GET {i}"), || {
            api.get(&format!("/v1/instances/{i}"))
        });
        assert_eq!(r.status, 200, "GET {i}: {}", r.text());
        let v = r.json().unwrap();
        assert_eq!(v["state"], "running", "{v:#}");
        check_process(&cell, i, v["pid"].as_u64().unwrap());
        let addr = v["address"]
            .as_str()
            .unwrap_or_else(|| panic!("{i} has no address: {v:#}"));
        assert!(
            addr.starts_with("10.244."),
            "{i}: {addr} is not from {SUBNET}"
        );
        assert!(addresses.insert(addr.to_owned()), "{i}: {addr} given twice");
        gets.push(took);
    }
    // One host veth per instance in the node namespace, besides lo.
    let links = std::process::Command::new("ip")
        .args(["-n", &cell.netns, "-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout).lines().count();
    assert_eq!(links, INSTANCES + 1, "lo and one veth per instance");
    // One more instance comes and goes while the 250 run.
    let (r, put) = timed("PUT s-extra", || {
        api.put_json(&format!("/v1/instances/{extra}"), &sleeper(INSTANCES))
    });
    assert_eq!(r.status, 201, "PUT {extra}: {}", r.text());
    let v = r.json().unwrap();
    assert_eq!(v["state"], "running", "{v:#}");
    check_process(&cell, &extra, v["pid"].as_u64().unwrap());
    let (r, list_extra) = timed("GET /v1/instances", || api.get("/v1/instances"));
    let n = r.json().unwrap()["instances"].as_array().unwrap().len();
    assert_eq!(n, INSTANCES + 1, "the listing with the extra instance");
    let (r, delete) = timed("DELETE s-extra", || {
        api.delete(&format!("/v1/instances/{extra}?grace_secs=0"))
    });
    assert_eq!(r.status, 200, "DELETE {extra}: {}", r.text());
    assert_eq!(
        api.get(&format!("/v1/instances/{extra}")).unwrap().status,
        404
    );
    lists.push(list_extra);
    stop.store(true, Ordering::SeqCst);
    let scrapes = scraper
        .join()
        .expect("the scraping thread failed (see above)");
    let busy = usage(agent);
    let lists = Latencies::new(lists);
    let gets = Latencies::new(gets);
    println!(
        "with {INSTANCES} instances, over {:.1} s of API requests and scrapes side by side \
         (agent CPU {:.2} s):\n  GET /metrics (TCP, complete each time): {}\n  \
         GET /v1/instances: {}\n  GET /v1/instances/<id>: {}\n  \
         PUT of one more: {:.1} ms, DELETE of it: {:.1} ms",
        during.elapsed().as_secs_f64(),
        (busy.cpu - idle.cpu).as_secs_f64(),
        scrapes.summary(),
        lists.summary(),
        gets.summary(),
        put.as_secs_f64() * 1e3,
        delete.as_secs_f64() * 1e3,
    );

    let (deletes, wall) = parallel(INSTANCES, |i| {
        let (r, _) = timed(&format!("DELETE {}", id(i)), || {
            api.delete(&format!("/v1/instances/{}?grace_secs=0", id(i)))
        });
        assert_eq!(r.status, 200, "DELETE {}: {}", id(i), r.text());
    });
    let end = usage(agent);
    println!(
        "deleted {INSTANCES} instances in {:.1} s (DELETE {}); agent VmRSS {} after, VmHWM {}",
        wall.as_secs_f64(),
        deletes.summary(),
        mib(end.rss_kib),
        mib(end.hwm_kib),
    );
    let v = api.get("/v1/instances").unwrap().json().unwrap();
    assert_eq!(v["instances"], json!([]), "{v:#}");
    cell.assert_clean();
}

/// The completeness check itself (no root needed): a scrape missing one
/// instance in one family, or holding one too many, is reported.
#[test]
fn an_incomplete_scrape_is_noticed() {
    let ids: BTreeSet<String> = ["a", "b"].map(String::from).into();
    let scrape = |skip: &str, extra: &str| {
        let mut text = String::from("corral_instances{state=\"running\"} 2\n");
        for family in PER_INSTANCE {
            for i in ["a", "b", extra].iter().filter(|i| !i.is_empty()) {
                if format!("{family} {i}") != skip {
                    text.push_str(&format!("{family}{{instance=\"{i}\",tenant=\"acme\"}} 1\n"));
                }
            }
        }
        text
    };
    assert_eq!(
        incomplete(&scrape("", ""), &ids, &ids),
        Vec::<String>::new()
    );
    let missing = incomplete(&scrape("corral_instance_pids b", ""), &ids, &ids);
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert!(
        missing[0].starts_with("corral_instance_pids: 1 missing"),
        "{missing:?}"
    );
    assert_eq!(
        incomplete(&scrape("", "c"), &ids, &ids).len(),
        PER_INSTANCE.len()
    );
    let none = BTreeSet::new();
    assert_eq!(
        incomplete(&scrape("", ""), &ids, &none).len(),
        PER_INSTANCE.len()
    );
    assert_eq!(
        incomplete("", &none, &none),
        vec!["no `corral_instances{state=\"running\"} 0`"]
    );
}
