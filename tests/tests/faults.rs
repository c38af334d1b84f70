//! Faults injected on purpose, and what must survive them:
//!
//! - the agent SIGKILLed at random moments while instances start and stop
//!   (50 times), through its own API and while the brain scales apps:
//!   nothing leaks, nothing runs twice, nothing acknowledged is lost, and
//!   the cluster ends as the brain wants it;
//! - a cell's agent, shims and instances all killed at once: the new agent
//!   cleans up after them, the brain starts them again without counting
//!   crashes;
//! - the filesystem holding an instance's logs full: the instance and the
//!   agent carry on, and the log says how much it lost once space is back;
//! - the brain SIGKILLed with pushes and scales in flight: nothing it
//!   acknowledged is lost, no instance restarted;
//! - a cell cut off from the brain for 30 s: its instances keep serving,
//!   and the apps converge with none ever above its count.
//!
//! Random choices come from a seeded generator: the seed is printed, and
//! `CORRAL_FAULT_SEED=<seed>` replays a run. Results are recorded in
//! docs/reliability.md. Run as root through `cargo xtask test faults`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{Cluster, Fabric, BRAIN_IP};
use common::{lrp, Cell};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NET: &str = "[network]\nsubnet = \"10.244.3.0/24\"\n";

/// splitmix64: small, seedable, good enough to pick delays and ids.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `$CORRAL_FAULT_SEED`, else one from the clock; printed either way.
fn seed(test: &str) -> u64 {
    let seed = std::env::var("CORRAL_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {seed} (replay with CORRAL_FAULT_SEED={seed})");
    seed
}

fn sh(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn sh_ok(cmd: &str, args: &[&str]) -> String {
    let o = sh(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------------------
// The agent killed during starts and stops.

/// What the test knows of an instance id from the answers it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// A PUT was acknowledged (2xx) and nothing was asked since.
    Running,
    /// A DELETE was acknowledged (2xx or 404) and nothing was asked since.
    Absent,
    /// A request got no answer (the agent died under it): either outcome.
    Unknown,
}

const IDS: usize = 8;
const ROUNDS: usize = 50;

fn storm_id(i: usize) -> String {
    format!("storm-{i}")
}

/// Random PUTs and DELETEs on the ids `mine` until `stop`, recording what
/// each answer proves.
fn churn(
    client: corral_cli::client::Client,
    mine: Vec<usize>,
    seed: u64,
    stop: Arc<AtomicBool>,
    known: Arc<Mutex<Vec<Known>>>,
) -> usize {
    let mut rng = Rng(seed);
    let mut ops = 0;
    while !stop.load(Ordering::SeqCst) {
        let i = mine[rng.below(mine.len() as u64) as usize];
        let id = storm_id(i);
        let start = rng.below(2) == 0;
        known.lock().unwrap()[i] = Known::Unknown;
        let answer = if start {
            client.put_json(&format!("/v1/instances/{id}"), &lrp("exec sleep 100000"))
        } else {
            client.delete(&format!("/v1/instances/{id}?grace_secs=0"))
        };
        ops += 1;
        let Ok(r) = answer else {
            // No answer: the agent is gone. Nothing more until it is back.
            return ops;
        };
        let proven = match (start, r.status) {
            (true, s) if (200..300).contains(&s) => Known::Running,
            (false, s) if (200..300).contains(&s) || s == 404 => Known::Absent,
            // 409 (being deleted, no capacity…) or 5xx: nothing proven.
            _ => Known::Unknown,
        };
        known.lock().unwrap()[i] = proven;
    }
    ops
}

/// The instances the agent lists, by id.
fn listed(cell: &Cell) -> BTreeMap<String, Value> {
    let v = cell.client.get("/v1/instances").unwrap().json().unwrap();
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_str().unwrap().to_owned(), i.clone()))
        .collect()
}

/// Polls until no instance is starting or stopping.
fn settled(cell: &Cell) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let all = listed(cell);
        if all
            .values()
            .all(|i| i["state"] != "starting" && i["state"] != "stopping")
        {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "instances never settled: {all:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Shim processes by the instance id in their launch path.
fn shims_by_id(cell: &Cell) -> BTreeMap<String, Vec<u32>> {
    let mut by: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for pid in cell.shim_pids() {
        let Some(cmd) = common::cmdline(pid) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        // The shim execs itself as `shim-monitor` once the container runs.
        if !matches!(
            args.get(1).map(String::as_str),
            Some("shim" | "shim-monitor")
        ) {
            continue;
        }
        if let Some(id) = args.get(2).and_then(|p| id_in_path(p)) {
            by.entry(id).or_default().push(pid);
        }
    }
    // While a shim starts its container, libcontainer's forks of it carry
    // its command line until they exec: children of a shim are its own.
    for pids in by.values_mut() {
        let group = pids.clone();
        pids.retain(|p| !parent(*p).is_some_and(|pp| group.contains(&pp)));
    }
    by
}

/// A process's parent pid, from `/proc/PID/stat` (None once it is gone).
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// The instance id in a path under the cell's `instances/` or `layers/`.
fn id_in_path(p: &str) -> Option<String> {
    for marker in ["/instances/", "/layers/"] {
        if let Some((_, rest)) = p.split_once(marker) {
            let id = rest.split('/').next()?.trim_end_matches(".img");
            if !id.is_empty() && !id.starts_with('.') {
                return Some(id.to_owned());
            }
        }
    }
    None
}

/// The host sides of instance veths: every link of the node namespace but
/// lo and `n0`, the node's link to the test fabric (in cluster tests).
fn veths(cell: &Cell) -> Vec<String> {
    sh_ok("ip", &["-n", &cell.netns, "-o", "link", "show"])
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_owned()))
        .map(|n| n.split('@').next().unwrap_or_default().to_owned())
        .filter(|n| n != "lo" && n != "n0")
        .collect()
}

/// Mounts (in the test's and in the cell's mount namespace) under the
/// cell's directory, by the instance id in their mount point.
fn mounts_by_id(cell: &Cell) -> BTreeMap<String, usize> {
    let needle = cell.dir.path().to_string_lossy().into_owned();
    let mut by = BTreeMap::new();
    let holder = cell.mount_ns_pid();
    for file in [
        "/proc/self/mountinfo".to_owned(),
        format!("/proc/{holder}/mountinfo"),
    ] {
        for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
            let Some(point) = line.split(' ').nth(4) else {
                continue;
            };
            if point.contains(&needle) {
                let id = id_in_path(point).unwrap_or_else(|| format!("?{point}"));
                *by.entry(id).or_insert(0) += 1;
            }
        }
    }
    by
}

/// Loop devices whose backing file is under the cell's directory.
fn loops(cell: &Cell) -> Vec<String> {
    let needle = cell.dir.path().to_string_lossy().into_owned();
    let mut found = vec![];
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = e.path().join("loop/backing_file");
        if let Ok(f) = std::fs::read_to_string(&backing) {
            if f.contains(&needle) {
                found.push(f.trim().to_owned());
            }
        }
    }
    found
}

/// The agent's bpffs pins (names, recursively), as its mount namespace sees them.
fn pins(cell: &Cell) -> BTreeSet<String> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeSet<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            out.insert(p.strip_prefix(base).unwrap().display().to_string());
            if p.is_dir() {
                walk(&p, base, out);
            }
        }
    }
    let base = PathBuf::from(format!(
        "/proc/{}/root/sys/fs/bpf/corral/{}",
        cell.agent_pid(),
        cell.name
    ));
    let mut out = BTreeSet::new();
    walk(&base, &base, &mut out);
    out
}

/// The data plane's endpoint and interface addresses.
fn dataplane(cell: &Cell) -> (BTreeSet<String>, BTreeSet<String>) {
    let dp = cell.client.get("/v1/dataplane").unwrap().json().unwrap();
    let addrs = |k: &str| {
        dp[k]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].as_str().unwrap().to_owned())
            .collect()
    };
    (addrs("endpoints"), addrs("interfaces"))
}

/// Everything the kernel and the filesystem hold for the cell matches the
/// instances the agent lists: one shim, one cgroup, one veth, one data
/// plane entry each; mounts and loop devices only for them; the listed
/// running ones are alive, in their cgroup. The endpoint map holds them and
/// `remote`, the addresses of other cells' instances.
fn assert_matches_listed(cell: &Cell, pins_at_start: &BTreeSet<String>, remote: &BTreeSet<String>) {
    let all = settled(cell);
    let live: BTreeSet<String> = all
        .iter()
        .filter(|(_, i)| i["state"] == "running")
        .map(|(id, _)| id.clone())
        .collect();
    let ids: BTreeSet<String> = all.keys().cloned().collect();

    let shims = shims_by_id(cell);
    for (id, pids) in &shims {
        assert_eq!(pids.len(), 1, "{id} has several shims: {pids:?}");
        assert!(live.contains(id), "a shim for {id}, not running: {all:#?}");
    }
    for id in &live {
        assert!(shims.contains_key(id), "running {id} has no shim");
        let pid = all[id]["pid"].as_u64().expect("a running pid");
        let procs = std::fs::read_to_string(format!(
            "/sys/fs/cgroup/unified/{}/{id}/cgroup.procs",
            cell.cgroup_root
        ))
        .unwrap_or_default();
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "{id}'s process {pid} is not in its cgroup2 directory: {procs:?}"
        );
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{id}: {pid} gone"
        );
    }
    for d in cell.cgroup_dirs() {
        let id = d.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            live.contains(&id),
            "cgroup {} left for {id}: {all:#?}",
            d.display()
        );
    }
    for (id, n) in mounts_by_id(cell) {
        assert!(
            live.contains(&id),
            "{n} mounts left for {id}: {:#?}",
            mounts_by_id(cell)
        );
    }
    let with_disk = loops(cell);
    assert_eq!(
        with_disk.len(),
        live.len(),
        "loop devices {with_disk:?} for running {live:?}"
    );
    let addrs: BTreeSet<String> = live
        .iter()
        .map(|id| all[id]["address"].as_str().expect("an address").to_owned())
        .collect();
    let (endpoints, interfaces) = dataplane(cell);
    let everywhere: BTreeSet<String> = addrs.union(remote).cloned().collect();
    assert_eq!(endpoints, everywhere, "endpoint map vs running instances");
    assert_eq!(interfaces, addrs, "interface map vs running instances");
    let v = veths(cell);
    assert_eq!(v.len(), live.len(), "veths {v:?} for running {live:?}");
    let stale: Vec<_> = ids.difference(&live).collect();
    assert!(
        stale.is_empty(),
        "instances neither running nor gone: {stale:?} {all:#?}"
    );
    assert_eq!(&pins(cell), pins_at_start, "pins changed");
}

#[test]
fn agent_kill9_during_starts_and_stops_leaks_nothing_and_loses_nothing() {
    common::require_root();
    let seed = seed("agent kill -9");
    let mut rng = Rng(seed);
    let mut cell = Cell::start_with(NET);
    let pins_at_start = pins(&cell);
    assert!(!pins_at_start.is_empty(), "the data plane pins nothing?");
    let known = Arc::new(Mutex::new(vec![Known::Absent; IDS]));
    let mut ops = 0;
    // Outcomes of unanswered requests: running, gone, ended otherwise.
    let mut outcomes = [0; 3];
    let started = Instant::now();
    for round in 0..ROUNDS {
        // Two threads on disjoint ids, so each id sees one request at a time.
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let mine: Vec<usize> = (0..IDS).filter(|i| i % 2 == w).collect();
                let (client, stop, known) = (cell.client.clone(), stop.clone(), known.clone());
                let s = rng.next();
                std::thread::spawn(move || churn(client, mine, s, stop, known))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        cell.kill9_agent();
        stop.store(true, Ordering::SeqCst);
        for w in workers {
            ops += w.join().unwrap();
        }
        cell.spawn_agent();

        // What the agent re-adopted agrees with every answer it gave.
        let all = settled(&cell);
        let mut k = known.lock().unwrap();
        for (i, state) in k.iter_mut().enumerate() {
            let id = storm_id(i);
            let got = all
                .get(&id)
                .map(|v| v["state"].as_str().unwrap().to_owned());
            match *state {
                Known::Running => assert_eq!(
                    got.as_deref(),
                    Some("running"),
                    "round {round}: {id} was acknowledged running (seed {seed})\n{}",
                    cell.agent_log()
                ),
                Known::Absent => assert_eq!(
                    got, None,
                    "round {round}: {id} was acknowledged deleted (seed {seed})"
                ),
                Known::Unknown => {
                    *state = match got.as_deref() {
                        Some("running") => {
                            outcomes[0] += 1;
                            Known::Running
                        }
                        None => {
                            outcomes[1] += 1;
                            Known::Absent
                        }
                        // An interrupted start may end crashed: delete it.
                        Some(_) => {
                            outcomes[2] += 1;
                            let r = cell
                                .client
                                .delete(&format!("/v1/instances/{id}?grace_secs=0"))
                                .unwrap();
                            assert!(r.is_success(), "{id}: {}", r.text());
                            Known::Absent
                        }
                    };
                }
            }
        }
        drop(k);
        let shims = shims_by_id(&cell);
        assert!(
            shims.values().all(|p| p.len() == 1),
            "round {round}: duplicate shims {shims:?} (seed {seed})"
        );
    }
    eprintln!(
        "{ROUNDS} kills, {ops} requests; unanswered ones ended running {}, gone {}, \
         crashed/exited {}; in {:?}",
        outcomes[0],
        outcomes[1],
        outcomes[2],
        started.elapsed()
    );

    // A final desired set, then everything agrees with it.
    let mut want = BTreeSet::new();
    for i in 0..IDS {
        let id = storm_id(i);
        if rng.below(2) == 0 {
            cell.put_ok(&id, &lrp("exec sleep 100000"));
            want.insert(id);
        } else {
            let r = cell
                .client
                .delete(&format!("/v1/instances/{id}?grace_secs=0"))
                .unwrap();
            assert!(r.is_success() || r.status == 404, "{id}: {}", r.text());
        }
    }
    let all = settled(&cell);
    let running: BTreeSet<String> = all
        .iter()
        .filter(|(_, v)| v["state"] == "running")
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(running, want, "(seed {seed})");
    assert_matches_listed(&cell, &pins_at_start, &BTreeSet::new());

    // Emptied, the cell holds nothing.
    for id in &want {
        cell.delete(id);
    }
    assert_matches_listed(&cell, &pins_at_start, &BTreeSet::new());
    assert!(loops(&cell).is_empty());
    cell.assert_clean();
}

// ---------------------------------------------------------------------------
// The log disk full.

/// A size-limited tmpfs on the cell's data directory, mounted in the cell's
/// own mount namespace (so the test's namespace never sees it); unmounted on
/// drop.
struct SmallDisk {
    holder: u32,
    point: PathBuf,
}

impl SmallDisk {
    fn mount(cell: &Cell, size: &str) -> SmallDisk {
        let point = cell.data();
        std::fs::create_dir_all(&point).unwrap();
        let holder = cell.mount_ns_pid();
        sh_ok(
            "nsenter",
            &[
                &format!("--mount=/proc/{holder}/ns/mnt"),
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "corral-test-logs",
                point.to_str().unwrap(),
            ],
        );
        SmallDisk { holder, point }
    }

    /// A path inside the small filesystem, reached through the cell's
    /// mount namespace.
    fn path(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}/{rel}",
            self.holder,
            self.point.display()
        ))
    }

    fn unmount(&self) {
        let _ = sh(
            "nsenter",
            &[
                &format!("--mount=/proc/{}/ns/mnt", self.holder),
                "umount",
                "-l",
                self.point.to_str().unwrap(),
            ],
        );
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Fills the filesystem holding `file` until a write fails.
fn fill(file: &Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(file).unwrap();
    let block = vec![0x5a_u8; 64 * 1024];
    let mut written = 0;
    loop {
        match f.write(&block) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    // Small writes until not a byte fits.
    while let Ok(n) = f.write(&block[..512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    written
}

#[test]
fn a_full_log_disk_drops_records_and_says_so_once_space_is_back() {
    common::require_root();
    // The small filesystem is the data directory from the agent's first start.
    let disk: Arc<Mutex<Option<SmallDisk>>> = Default::default();
    let cell = Cell::start_prepared(
        &Cell::new_name(),
        "[disk]\nenforce = false\n[logs]\nmax_bytes = 2097152\nkeep = 1\n",
        Vec::new(),
        |c| *disk.lock().unwrap() = Some(SmallDisk::mount(c, "8m")),
    );
    let disk = disk.lock().unwrap().take().unwrap();

    cell.put_ok(
        "chatty",
        // Fast, but not so fast that rotation (2 MiB, one old file) pushes
        // the marker out of the log before the test reads it.
        &lrp(
            "i=0; while true; do echo line-$i; i=$((i+1)); [ $((i % 50)) = 0 ] && sleep 0.01; done",
        ),
    );
    cell.wait_state("chatty", "running");
    std::thread::sleep(Duration::from_millis(500));
    let filler = disk.path("filler");
    let filled = fill(&filler);
    eprintln!("filled the log disk with {filled} bytes");
    // Full for a while: the instance keeps writing, the shim keeps dropping.
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(100));
        for path in ["/healthz", "/readyz", "/v1/instances"] {
            let r = cell.client.get(path).unwrap();
            assert_eq!(r.status, 200, "{path} while the disk is full: {}", r.text());
        }
    }
    assert_eq!(cell.get("chatty")["state"], "running");
    // A start while the disk is full is refused with the reason, and
    // leaves nothing of itself behind.
    let r = cell.put("late", &lrp("exec sleep 100000"));
    assert!(
        r.status == 507 && r.text().contains("No space left on device"),
        "a start on a full disk: {} {}",
        r.status,
        r.text()
    );
    eprintln!("a start on the full disk: {} {}", r.status, r.text().trim());
    assert_eq!(cell.client.get("/v1/instances/late").unwrap().status, 404);
    assert!(
        !disk.path("instances/late").exists(),
        "the refused start left its directory"
    );
    let before = cell.logs("chatty");
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let marker = loop {
        let logs = cell.logs("chatty");
        if let Some(l) = logs.lines().find(|l| l.contains("log records dropped")) {
            break l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no drop marker once space was back; log ends:\n{}",
            &logs[logs.len().saturating_sub(2000)..]
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{marker}");
    let lost: u64 = marker
        .split("corral: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a count in the marker");
    assert!(lost > 0, "{marker}");
    // The numbering jumps across the marker by at least what it reports.
    let after = cell.logs("chatty");
    assert_ne!(before, after);
    let numbers: Vec<(usize, u64)> = after
        .lines()
        .enumerate()
        .filter_map(|(n, l)| Some((n, l.rsplit("line-").next()?.trim().parse().ok()?)))
        .collect();
    let at = after
        .lines()
        .position(|l| l.contains("log records dropped"))
        .unwrap();
    let last_before = numbers.iter().rev().find(|(n, _)| *n < at).map(|x| x.1);
    let first_after = numbers.iter().find(|(n, _)| *n > at).map(|x| x.1);
    if let (Some(a), Some(b)) = (last_before, first_after) {
        assert!(b > a + lost, "{a} .. {b} around a marker of {lost}");
    }
    assert_eq!(cell.get("chatty")["state"], "running");
    assert_eq!(cell.client.get("/readyz").unwrap().status, 200);
    // With space back, the refused start goes through.
    cell.put_ok("late", &lrp("exec sleep 100000"));
    cell.delete("late");
    cell.delete("chatty");
    disk.unmount();
    cell.assert_clean();
}

// ---------------------------------------------------------------------------
// The brain killed under load; a cell cut off from it.

fn connected(v: &Value) -> usize {
    v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["state"] == "connected")
        .count()
}

/// A fabric with a brain and `n` cells (zones z1..zn), all connected.
fn cluster(n: usize, extra: impl Fn(usize) -> String) -> (Fabric, Vec<Cell>) {
    let c = Cluster::start(n, |i, name, fabric| {
        let mut cfg = fabric.agent_config(name, &format!("z{}", i + 1));
        cfg.push_str(&extra(i));
        cfg
    });
    (c.fabric, c.cells)
}

fn push_args(app: &str, count: usize, command: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "push",
        app,
        "--tenant",
        "acme",
        "--instances",
        &count.to_string(),
        "--rootfs",
        common::rootfs().to_str().unwrap(),
        "--memory",
        "16",
        "--disk",
        "32",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(command.iter().map(|s| s.to_string()));
    a
}

/// `corral push` of acme's `app` (see [`push_args`]), which must succeed.
fn push_ok(fabric: &Fabric, app: &str, count: usize, command: &[&str]) {
    let args = push_args(app, count, command);
    fabric.cli_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn instances_of(fabric: &Fabric, app: &str) -> Option<Value> {
    let o = fabric.cli(&["app", app, "--tenant", "acme", "-o", "json"]);
    if !o.status.success() {
        return None;
    }
    serde_json::from_slice(&o.stdout).ok()
}

fn running_ids(app: &Value) -> BTreeSet<String> {
    app["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Every cell's agent's own view: running instance ids (of any app).
fn running_on_cells(cells: &[Cell]) -> BTreeSet<String> {
    cells
        .iter()
        .flat_map(|c| listed(c).into_iter())
        .filter(|(_, v)| v["state"] == "running")
        .map(|(id, _)| id)
        .collect()
}

/// What a `corral` call proves about its request.
#[derive(Debug, PartialEq, Eq)]
enum Ack {
    /// Exit status 0: the brain acknowledged it.
    Yes,
    /// No connection: the request never reached the brain.
    NotSent,
    /// Anything else (reset mid-request…): it may or may not have applied.
    Unknown,
}

/// `corral` against the brain from the fabric namespace.
fn brain_cli(netns: &str, args: &[String]) -> Ack {
    let o = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{netns}"))
        .arg(common::cluster::cli_bin())
        .args([
            "--brain",
            &format!("http://{BRAIN_IP}:{}", common::cluster::API_PORT),
        ])
        .args(["--token", common::cluster::ADMIN])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    if o.status.success() {
        return Ack::Yes;
    }
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("cannot connect to") {
        Ack::NotSent
    } else {
        eprintln!("corral {}: {}", args[..2].join(" "), err.trim());
        Ack::Unknown
    }
}

/// Every cell's agent's running instances and their processes.
fn pids_on_cells(cells: &[Cell]) -> BTreeMap<String, u64> {
    cells
        .iter()
        .flat_map(|c| listed(c).into_iter())
        .filter(|(_, v)| v["state"] == "running")
        .map(|(id, v)| (id, v["pid"].as_u64().unwrap_or(0)))
        .collect()
}

/// Empties the cells once the brain is gone.
fn teardown(mut fabric: Fabric, cells: Vec<Cell>) {
    fabric.stop_brain();
    for cell in &cells {
        fabric.detach(cell);
        cell.delete_all();
    }
    std::thread::sleep(Duration::from_secs(1));
    for cell in &cells {
        cell.assert_clean();
    }
    drop(fabric);
    drop(cells);
}

#[test]
fn brain_kill9_with_pushes_and_scales_in_flight_loses_nothing_acknowledged() {
    common::require_root();
    let seed = seed("brain kill -9");
    let mut rng = Rng(seed);
    let (mut fabric, cells) = cluster(2, |_| String::new());
    // Steady apps, not touched during the kill: their instances must not restart.
    for app in ["steady-a", "steady-b"] {
        push_ok(&fabric, app, 2, &["/bin/sleep", "100000"]);
    }
    for app in ["steady-a", "steady-b"] {
        fabric.wait_json(&["app", app, "--tenant", "acme"], "2 running", |v| {
            running_ids(v).len() == 2
        });
    }
    let steady_before: BTreeMap<&str, BTreeSet<String>> = ["steady-a", "steady-b"]
        .into_iter()
        .map(|a| (a, running_ids(&instances_of(&fabric, a).unwrap())))
        .collect();
    let pids_before = pids_on_cells(&cells);

    // Load: threads pushing new apps and scaling them, recording what the
    // brain acknowledged (exit status 0).
    let acked: Arc<Mutex<BTreeMap<String, usize>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (acked, stop) = (acked.clone(), stop.clone());
            let netns = fabric.netns.clone();
            let cli = move |args: &[String]| brain_cli(&netns, args);
            let mut rng = Rng(rng.next());
            std::thread::spawn(move || {
                let (mut mine, mut pushed): (Vec<String>, usize) = (Vec::new(), 0);
                while !stop.load(Ordering::SeqCst) {
                    // Six apps each, then scales of them.
                    if pushed < 6 {
                        let app = format!("load-{w}-{pushed}");
                        pushed += 1;
                        let count = 1 + rng.below(2) as usize;
                        let args = push_args(&app, count, &["/bin/sleep", "100000"]);
                        if cli(&args) == Ack::Yes {
                            acked.lock().unwrap().insert(app.clone(), count);
                            mine.push(app);
                        }
                        // Else maybe stored, maybe not: not checked.
                        continue;
                    }
                    if mine.is_empty() {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let app = mine[rng.below(mine.len() as u64) as usize].clone();
                    let to = 1 + rng.below(3) as usize;
                    let args: Vec<String> = ["scale", &app, &to.to_string(), "--tenant", "acme"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                    match cli(&args) {
                        Ack::Yes => {
                            acked.lock().unwrap().insert(app, to);
                        }
                        Ack::NotSent => std::thread::sleep(Duration::from_millis(50)),
                        Ack::Unknown => {
                            // Either count may be the stored one: not checked.
                            acked.lock().unwrap().remove(&app);
                            mine.retain(|a| a != &app);
                        }
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500 + rng.below(2000)));
    fabric.kill9_brain();
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    fabric.start_brain();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    eprintln!("brain back in {:?}", killed_at.elapsed());
    fabric.wait_json(&["cells"], "cells back", |v| connected(v) == 2);

    // Every acknowledged app exists with its acknowledged count, and runs it.
    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty(), "no push was acknowledged");
    eprintln!("acknowledged: {acked:?}");
    for (app, count) in &acked {
        fabric.wait_json(
            &["app", app, "--tenant", "acme"],
            &format!("{app} at {count}"),
            |v| v["app"]["instances"] == *count && running_ids(v).len() == *count,
        );
    }
    // No steady instance was restarted, here or on the cells.
    std::thread::sleep(Duration::from_secs(3));
    let on_cells = running_on_cells(&cells);
    for (app, before) in &steady_before {
        let now = running_ids(&instances_of(&fabric, app).unwrap());
        assert_eq!(&now, before, "{app}'s instances changed (seed {seed})");
        assert!(
            before.is_subset(&on_cells),
            "{app}: {before:?} not on the cells"
        );
    }
    let pids_after = pids_on_cells(&cells);
    for (id, pid) in &pids_before {
        assert_eq!(pids_after.get(id), Some(pid), "{id} was restarted");
    }
    // No slot was placed twice, before the kill or after: neither brain
    // stopped anything as a duplicate. A slot is started only when no copy
    // of it is known: starts in flight count, and after the restart the
    // store's placements count until the cell reports what it runs; then
    // the cell is judged on that report, not on the placements (some of
    // which the old brain had stopped already, or recorded and never
    // sent). A second copy needs a cell declared lost (a reconnect slower
    // than the grace plus the restart slack, which the steady apps' checks
    // above would likely catch too) or a start in flight for longer than
    // the start timeout (60 s).
    let log = fabric.brain_log();
    let dups: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stopping: duplicate of"))
        .collect();
    assert!(
        dups.is_empty(),
        "copies stopped as duplicates (seed {seed}):\n{}",
        dups.join("\n")
    );
    teardown(fabric, cells);
}

/// Every instance of `apps` the brain lists, with its state, index and cell.
fn brain_instances(fabric: &Fabric, apps: &[&str]) -> Option<Vec<Value>> {
    let mut all = vec![];
    for app in apps {
        all.extend(instances_of(fabric, app)?["instances"].as_array()?.clone());
    }
    Some(all)
}

/// Whether the brain and the cells agree on `want` (app → count): the brain
/// lists exactly indexes 0..count of each app, one running copy each, and
/// the cells run exactly those copies and nothing else, every instance
/// settled.
fn converged(fabric: &Fabric, cells: &[Cell], want: &BTreeMap<&str, usize>) -> Result<(), String> {
    let apps: Vec<&str> = want.keys().copied().collect();
    let listed_by_brain = brain_instances(fabric, &apps).ok_or("the brain did not answer")?;
    let mut brain_running = BTreeSet::new();
    let mut slots = BTreeSet::new();
    for i in &listed_by_brain {
        if i["state"] != "running" {
            return Err(format!("the brain lists {i}"));
        }
        let slot = (
            i["app"].as_str().unwrap_or_default().to_owned(),
            i["index"].as_u64().unwrap_or(u64::MAX),
        );
        if !slots.insert(slot.clone()) {
            return Err(format!("two copies of {slot:?}"));
        }
        brain_running.insert(i["id"].as_str().unwrap_or_default().to_owned());
    }
    let expected: BTreeSet<(String, u64)> = want
        .iter()
        .flat_map(|(app, n)| (0..*n as u64).map(|i| (app.to_string(), i)))
        .collect();
    if slots != expected {
        return Err(format!("the brain runs {slots:?}, wants {expected:?}"));
    }
    let mut on_cells = BTreeSet::new();
    for c in cells {
        for (id, v) in listed(c) {
            if v["state"] != "running" {
                return Err(format!("{} lists {id} {}", c.name, v["state"]));
            }
            on_cells.insert(id);
        }
    }
    if on_cells != brain_running {
        return Err(format!(
            "the cells run {on_cells:?}, the brain {brain_running:?}"
        ));
    }
    Ok(())
}

#[test]
fn agent_kill9_while_the_brain_scales_apps_converges_to_what_the_brain_wants() {
    common::require_root();
    let seed = seed("agent kill -9 under the brain");
    let mut rng = Rng(seed);
    const APPS: [&str; 3] = ["churn-a", "churn-b", "churn-c"];
    let (fabric, mut cells) = cluster(2, |i| {
        format!("[network]\nsubnet = \"10.244.{}.0/24\"\n", 31 + i)
    });
    let pins_at_start: Vec<BTreeSet<String>> = cells.iter().map(pins).collect();
    for app in APPS {
        push_ok(&fabric, app, 2, &["/bin/sleep", "100000"]);
    }

    // The brain scales the apps up and down (0 to 4) all along, so its
    // starts and stops land on the first cell while its agent is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let scales = Arc::new(Mutex::new(0usize));
    let scaler = {
        let (stop, scales) = (stop.clone(), scales.clone());
        let netns = fabric.netns.clone();
        let mut rng = Rng(rng.next());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let app = APPS[rng.below(APPS.len() as u64) as usize];
                let to = rng.below(5).to_string();
                let args: Vec<String> = ["scale", app, &to, "--tenant", "acme"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                if brain_cli(&netns, &args) == Ack::Yes {
                    *scales.lock().unwrap() += 1;
                }
                std::thread::sleep(Duration::from_millis(50 + rng.below(300)));
            }
        })
    };
    let started = Instant::now();
    for round in 0..ROUNDS {
        std::thread::sleep(Duration::from_millis(rng.below(1500)));
        cells[0].kill9_agent();
        cells[0].spawn_agent();
        let shims = shims_by_id(&cells[0]);
        assert!(
            shims.values().all(|p| p.len() == 1),
            "round {round}: duplicate shims {shims:?} (seed {seed})"
        );
    }
    stop.store(true, Ordering::SeqCst);
    scaler.join().unwrap();
    eprintln!(
        "{ROUNDS} kills during {} acknowledged scales, in {:?}",
        scales.lock().unwrap(),
        started.elapsed()
    );

    // A last count for each app; then the brain and both cells agree on
    // exactly it.
    let want: BTreeMap<&str, usize> = APPS
        .iter()
        .map(|app| (*app, 1 + rng.below(4) as usize))
        .collect();
    for (app, n) in &want {
        fabric.cli_ok(&["scale", app, &n.to_string(), "--tenant", "acme"]);
    }
    let took = settle(&fabric, &cells, &want, &pins_at_start, seed);
    eprintln!("converged to {want:?} {took:?} after the last kill");
    assert_nothing_charged(&fabric, seed);
    teardown(fabric, cells);
}

/// Waits (up to 120 s) until the brain and the cells agree on `want`
/// ([`converged`]); then every cell holds exactly what it runs (its endpoint
/// map also the other cells' instances, which may lag a moment). Returns
/// how long agreement took.
fn settle(
    fabric: &Fabric,
    cells: &[Cell],
    want: &BTreeMap<&str, usize>,
    pins_at_start: &[BTreeSet<String>],
    seed: u64,
) -> Duration {
    let t = Instant::now();
    let deadline = t + Duration::from_secs(120);
    loop {
        match converged(fabric, cells, want) {
            Ok(()) => break,
            Err(why) => assert!(
                Instant::now() < deadline,
                "never converged to {want:?} (seed {seed}): {why}\n{}",
                fabric.brain_log()
            ),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = t.elapsed();
    for (i, (cell, pins)) in cells.iter().zip(pins_at_start).enumerate() {
        let remote: BTreeSet<String> = cells
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, c)| listed(c).into_values())
            .map(|v| v["address"].as_str().unwrap().to_owned())
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dataplane(cell).0.is_superset(&remote) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_matches_listed(cell, pins, &remote);
    }
    took
}

/// The faults cost the apps nothing: no slot was placed twice, and no
/// instance lost by its cell was counted as the workload's crash (which
/// would back its slot off for 30 s from the fourth on).
fn assert_nothing_charged(fabric: &Fabric, seed: u64) {
    let log = fabric.brain_log();
    let said = |what: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(what)).collect() };
    let (dups, crashes) = (said("stopping: duplicate of"), said("instance crashed"));
    eprintln!(
        "instances lost by their cell: {}; starts sent again after a reconnect: {}",
        said("instance lost by its cell").len(),
        said("sending a start again").len()
    );
    assert!(
        dups.is_empty(),
        "copies stopped as duplicates (seed {seed}):\n{}",
        dups.join("\n")
    );
    assert!(
        crashes.is_empty(),
        "crashes counted (seed {seed}):\n{}",
        crashes.join("\n")
    );
}

#[test]
fn a_cell_whose_agent_shims_and_instances_all_die_at_once_comes_back_as_the_brain_wants() {
    common::require_root();
    let seed = seed("a cell's processes all killed");
    const APPS: [&str; 2] = ["node-a", "node-b"];
    let (fabric, mut cells) = cluster(2, |i| {
        format!("[network]\nsubnet = \"10.244.{}.0/24\"\n", 33 + i)
    });
    let pins_at_start: Vec<BTreeSet<String>> = cells.iter().map(pins).collect();
    let want: BTreeMap<&str, usize> = APPS.iter().map(|a| (*a, 3)).collect();
    for app in APPS {
        push_ok(&fabric, app, 3, &["/bin/sleep", "100000"]);
    }
    settle(&fabric, &cells, &want, &pins_at_start, seed);
    let doomed: BTreeMap<String, Value> = listed(&cells[0]);
    assert!(!doomed.is_empty(), "nothing placed on the first cell");

    // Everything of the first cell dies at once, as in a power cut of its
    // processes (kernel state stays: cgroups, mounts, veths, pins): the
    // agent, every shim, every instance's processes.
    cells[0].kill9_agent();
    for pid in cells[0].shim_pids() {
        let _ = sh("kill", &["-9", &pid.to_string()]);
    }
    for id in doomed.keys() {
        let kill = format!(
            "/sys/fs/cgroup/unified/{}/{id}/cgroup.kill",
            cells[0].cgroup_root
        );
        std::fs::write(&kill, "1").unwrap_or_else(|e| panic!("{kill}: {e}"));
    }
    for v in doomed.values() {
        let pid = v["pid"].as_u64().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{pid}")).exists() {
            assert!(Instant::now() < deadline, "{pid} survived cgroup.kill");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    cells[0].spawn_agent();

    // The new agent finds its instances gone and cleans up after them; the
    // brain starts them again, and the cell ends holding exactly what runs.
    let took = settle(&fabric, &cells, &want, &pins_at_start, seed);
    eprintln!(
        "{} instances lost with the cell's processes; back to {want:?} {took:?} after the restart",
        doomed.len()
    );
    let running: BTreeSet<String> = running_on_cells(&cells);
    for id in doomed.keys() {
        assert!(!running.contains(id), "{id} died, yet is listed running");
    }
    let log = fabric.brain_log();
    let lost = log
        .lines()
        .filter(|l| l.contains("instance lost by its cell"))
        .count();
    assert_eq!(
        lost,
        doomed.len(),
        "each instance that died is reported lost once:\n{log}"
    );
    assert_nothing_charged(&fabric, seed);
    teardown(fabric, cells);
}

/// An iptables table in the cell's node namespace dropping everything to
/// and from the brain's address; removed on drop. Only the cell's own
/// namespace is touched.
struct Partition {
    netns: String,
}

impl Partition {
    fn cut(cell: &Cell) -> Partition {
        let p = Partition {
            netns: cell.netns.clone(),
        };
        p.iptables(&["-I", "OUTPUT", "-d", BRAIN_IP, "-j", "DROP"]);
        p.iptables(&["-I", "INPUT", "-s", BRAIN_IP, "-j", "DROP"]);
        p
    }

    fn iptables(&self, args: &[&str]) -> bool {
        let ns = format!("--net=/run/netns/{}", self.netns);
        let mut all = vec![ns.as_str(), "iptables", "-w", "5"];
        all.extend(args);
        sh("nsenter", &all).status.success()
    }

    fn heal(&self) {
        while self.iptables(&["-D", "OUTPUT", "-d", BRAIN_IP, "-j", "DROP"]) {}
        while self.iptables(&["-D", "INPUT", "-s", BRAIN_IP, "-j", "DROP"]) {}
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

/// An HTTP GET of `addr:8080` from the cell's node namespace (busybox nc):
/// the body, or None.
fn fetch(cell: &Cell, addr: &str) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cell.netns))
        .arg(common::rootfs().join("bin/busybox"))
        .args(["nc", "-w", "2", addr, "8080"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n");
    let out = common::wait_with_timeout(child, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
}

/// Running instances of `app`, as the cells' agents see them (the truth,
/// whatever the brain believes).
fn running_of(cells: &[Cell], app: &str) -> BTreeMap<String, (String, String)> {
    let mut out = BTreeMap::new();
    for c in cells {
        for (id, v) in listed(c) {
            if v["app"] == app && v["state"] == "running" {
                let addr = v["address"].as_str().unwrap_or_default().to_owned();
                out.insert(id, (c.name.clone(), addr));
            }
        }
    }
    out
}

#[test]
fn a_cell_cut_off_from_the_brain_keeps_serving_and_nothing_runs_above_its_count() {
    common::require_root();
    const DESIRED: usize = 4;
    let (fabric, cells) = cluster(2, |i| {
        format!("[network]\nsubnet = \"10.244.{}.0/24\"\n", 21 + i)
    });
    let web = "mkdir -p /www && echo served > /www/index.html && exec httpd -f -p 8080 -h /www";
    push_ok(&fabric, "web", DESIRED, &["/bin/sh", "-c", web]);
    let app = ["app", "web", "--tenant", "acme"];
    fabric.wait_json(&app, "4 running on both cells", |v| {
        running_ids(v).len() == DESIRED
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while running_of(&cells, "web").len() != DESIRED {
        assert!(Instant::now() < deadline, "{:?}", running_of(&cells, "web"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let cut_off: BTreeMap<String, String> = running_of(&cells, "web")
        .into_iter()
        .filter(|(_, (c, _))| c == &cells[0].name)
        .map(|(id, (_, a))| (id, a))
        .collect();
    assert!(!cut_off.is_empty(), "nothing placed on the first cell");
    for addr in cut_off.values() {
        assert_eq!(fetch(&cells[0], addr).as_deref(), Some("served"));
    }
    let pids_before = pids_on_cells(&cells[..1]);

    // Cut for 30 s: the cut-off instances keep running and serving.
    let partition = Partition::cut(&cells[0]);
    let t = Instant::now();
    let (mut fetches, mut most) = (0, 0);
    while t.elapsed() < Duration::from_secs(30) {
        for (id, addr) in &cut_off {
            assert_eq!(
                fetch(&cells[0], addr).as_deref(),
                Some("served"),
                "{id} stopped serving {:?} into the partition",
                t.elapsed()
            );
            fetches += 1;
        }
        most = most.max(running_of(&cells, "web").len());
        std::thread::sleep(Duration::from_millis(500));
    }
    let pids_during = pids_on_cells(&cells[..1]);
    for (id, pid) in &pids_before {
        assert_eq!(
            pids_during.get(id),
            Some(pid),
            "{id} restarted in the partition"
        );
    }
    eprintln!("{fetches} fetches served during the partition; at most {most} running meanwhile");
    partition.heal();
    drop(partition);

    // Healed: converges to the count, and stays there.
    let t = Instant::now();
    let deadline = t + Duration::from_secs(90);
    while running_of(&cells, "web").len() != DESIRED {
        assert!(
            Instant::now() < deadline,
            "never back to {DESIRED}: {:?}\n{}",
            running_of(&cells, "web"),
            fabric.brain_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("converged {:?} after the heal", t.elapsed());
    let mut most_after = 0;
    let watch = Instant::now();
    while watch.elapsed() < Duration::from_secs(15) {
        let now = running_of(&cells, "web").len();
        let brain = instances_of(&fabric, "web").map_or(0, |v| running_ids(&v).len());
        most_after = most_after.max(now).max(brain);
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        most_after <= DESIRED,
        "{most_after} running after convergence, above {DESIRED}"
    );
    assert_eq!(running_of(&cells, "web").len(), DESIRED);
    let v = fabric.wait_json(&app, "the brain's view at 4", |v| {
        running_ids(v).len() == DESIRED
    });
    let seen: BTreeSet<String> = running_of(&cells, "web").into_keys().collect();
    assert_eq!(running_ids(&v), seen, "the brain and the cells disagree");
    for (id, (c, addr)) in running_of(&cells, "web") {
        let cell = cells.iter().find(|x| x.name == c).unwrap();
        assert_eq!(fetch(cell, &addr).as_deref(), Some("served"), "{id}");
    }
    teardown(fabric, cells);
}
