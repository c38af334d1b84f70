//! `cargo xtask bench lb`: east-west service load balancing through a VIP
//! (`corral_ebpf::lb::Balancer`, socket-level, `cgroup/connect4`) against
//! connecting straight to the backend and against kube-proxy's iptables
//! DNAT chains, with 10, 1,000 and 10,000 services installed; and how long
//! programming the services takes. Reports numbers; asserts nothing about
//! them.
//!
//! ```text
//!   node netns (corral)                      iptables netns (kube-proxy style)
//!     d0 (veth): backends 10.245.0.1-4         d0: the same addresses
//!     server peer on :8080                     server peer on :8080
//!     client peer in cgroup2 dir ─ connect4    nat OUTPUT → KUBE-SERVICES (one rule
//!       VIP 10.96.x.y:80 → a backend             per service, the measured one last)
//!     client peer outside it: direct           → KUBE-SVC-* → KUBE-SEP-* (DNAT)
//! ```
//!
//! **Load.** A client peer (this binary re-executed under `nsenter --net`
//! as the hidden `bench lb-peer`) runs connect, one small request, the
//! server's answer (which names the backend address it was reached on) and
//! close, one connection at a time, for `--secs`: new connections per
//! second and connect+request latency (p50, p99). The server closes first,
//! so the client's ports are never held in TIME_WAIT. Every answer's
//! backend is counted: a VIP run that reached anything but the measured
//! service's backends, or a direct run that reached anything but its
//! address, fails the bench. Configurations alternate in rounds (the order
//! rotating) so that a change in the machine's load touches all of them;
//! ratios to direct are medians of per-round ratios.
//!
//! **Corral.** The `Balancer` is loaded into a bpffs mounted in the private
//! mount namespace of one thread (as in `bench net`), attached to a
//! throw-away cgroup2 directory; the VIP client moves itself into that
//! directory before it measures. Services are programmed the way the agent
//! does: table change → `plan_changes(&programmed, &table)` → for each
//! op `balancer.apply(&op)` then `programmed.apply(&op)` →
//! `table.release(&programmed)`, timed as a whole and by part; then one
//! service among them is changed repeatedly (a backend added, then removed)
//! and each change timed, with its operations listed.
//!
//! **iptables.** The same services as a kube-proxy ruleset (nft backend,
//! `iptables-restore`, timed) in a namespace of their own; the measured
//! service is the last rule of `KUBE-SERVICES`, the worst case of its
//! linear match. **IPVS** is measured only if the kernel has it; this
//! machine's does not (`CONFIG_IP_VS` unset), and the bench says so.
//!
//! Cleanup: guards (and `sandbox` hooks on Ctrl-C) delete the namespaces,
//! kill the peers and remove the cgroup; the bpffs, with the pinned links
//! and maps, goes with the thread's mount namespace, i.e. at the latest
//! when this process ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use corral_ebpf::lb::{Balancer, MAX_SERVICE_ID};
use corral_proto::{AppId, TenantId};
use corral_router::{
    plan_changes, Backend, BackendAddr, Op, Programmed, Protocol, ServiceKey, ServiceOwner,
    ServiceSpec, ServiceTable, Weight,
};
use serde_json::{json, Value};

use crate::bench_net::{
    append, del_netns, kill, loadavg, machine, median, met, percentile, private_bpffs, thousands,
};
use crate::sandbox;
use crate::util::{self, is_root, step, workspace_root};

const PORT: u16 = 8080;
const VIP_PORT: u16 = 80;
/// Backends listen on these addresses of each namespace's interface.
const BACKENDS: [Ipv4Addr; 4] = [
    Ipv4Addr::new(10, 245, 0, 1),
    Ipv4Addr::new(10, 245, 0, 2),
    Ipv4Addr::new(10, 245, 0, 3),
    Ipv4Addr::new(10, 245, 0, 4),
];
/// The address the one-service changes add and remove (nothing listens).
const EXTRA_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 245, 1, 1);
/// Clients reach VIPs from this address (so kube-proxy's hairpin rules,
/// which match a backend's own address, never do).
const CLIENT_SRC: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
const VIP_BASE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);
const VIP_NET: &str = "10.96.0.0/16";
/// What the issue measured here for the same chain (nft backend, service
/// last), as the anchor of the comparison.
const ISSUE_FIGURES: &str = "10 services 0.97× direct, 1,000 0.80×, 10,000 0.35×; \
                             `iptables-restore` of 10,000 services 0.44 s";
const TARGET_RATIO: f64 = 0.95;
const TARGET_OVER_IPTABLES: f64 = 2.5;
const TARGET_PROGRAM: Duration = Duration::from_millis(250);
const TARGET_CHANGE: Duration = Duration::from_millis(1);
const TARGET_SERVICES: usize = 10_000;

const HELP: &str = "\
usage: cargo xtask bench lb [--services LIST] [--rounds N] [--secs S]
                            [--changes N] [--no-record]

  --services LIST  numbers of services installed, comma-separated; default
                   10,1000,10000 (corral installs at most the maps' limit,
                   16,384; the report says so)
  --rounds N       rounds per number of services, each measuring every
                   configuration once (order rotating); default 9
  --secs S         length of each measured run; default 1
  --changes N      one-service changes timed per number of services;
                   default 50
  --no-record      print the report without appending it to docs/benchmarks.md";

struct Options {
    services: Vec<usize>,
    rounds: usize,
    secs: f64,
    changes: usize,
    record: bool,
}

const DEFAULT_SERVICES: [usize; 3] = [10, 1_000, 10_000];

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        services: DEFAULT_SERVICES.to_vec(),
        rounds: 9,
        secs: 1.0,
        changes: 50,
        record: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| anyhow!("{name} needs a value\n\n{HELP}"))
                .cloned()
        };
        match arg.as_str() {
            "--services" => {
                o.services = value("--services")?
                    .split(',')
                    .map(|n| n.trim().replace('_', "").parse::<usize>())
                    .collect::<Result<_, _>>()
                    .context("--services takes numbers separated by commas, e.g. 10,1000")?;
            }
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--secs" => o.secs = value("--secs")?.parse().context("--secs")?,
            "--changes" => o.changes = value("--changes")?.parse().context("--changes")?,
            "--no-record" => o.record = false,
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    if o.services.is_empty() || o.services.iter().any(|&n| n == 0 || n > 60_000) {
        bail!("--services: each number must be between 1 and 60,000");
    }
    if o.rounds == 0 || o.changes == 0 {
        bail!("--rounds and --changes must be at least 1");
    }
    if !(0.2..=60.0).contains(&o.secs) {
        bail!("--secs must be between 0.2 and 60");
    }
    Ok(o)
}

fn command_line(o: &Options) -> String {
    let mut cmd = "cargo xtask bench lb".to_owned();
    if o.services != DEFAULT_SERVICES {
        let list: Vec<String> = o.services.iter().map(usize::to_string).collect();
        let _ = write!(cmd, " --services {}", list.join(","));
    }
    if o.rounds != 9 {
        let _ = write!(cmd, " --rounds {}", o.rounds);
    }
    if o.secs != 1.0 {
        let _ = write!(cmd, " --secs {}", o.secs);
    }
    if o.changes != 50 {
        let _ = write!(cmd, " --changes {}", o.changes);
    }
    cmd
}

/// `cargo xtask bench lb [OPTS]`.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return Ok(());
    }
    let o = parse(args)?;
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs and creates network namespaces, cgroups and \
             iptables rules inside them: run it as root"
        );
    }
    // The load generator and the programming path are both measured: never
    // in a debug build. Only xtask is needed (no agent).
    if cfg!(debug_assertions) {
        let args: Vec<String> = ["bench", "lb"]
            .map(String::from)
            .into_iter()
            .chain(args.iter().cloned())
            .collect();
        return util::become_release_xtask(&["--package", "xtask", "--features", "ebpf"], &args);
    }
    step("checking dependencies", crate::deps::run)?;
    sandbox::install_signal_handler()?;
    let load_before = loadavg();
    let results = bench(&o)?;
    let report = report(&o, &results, &load_before, &loadavg());
    println!("\n{report}");
    if o.record {
        let path = workspace_root().join("docs/benchmarks.md");
        append(&path, &report)?;
        println!("appended to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// services, as the router and as kube-proxy see them

/// Service `i` (1-based): VIP 10.96.0.0 + i, port 80/TCP.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(VIP_BASE) + u32::try_from(i).unwrap_or(u32::MAX))
}

fn service_key(i: usize) -> ServiceKey {
    ServiceKey {
        vip: vip(i),
        port: VIP_PORT,
        protocol: Protocol::Tcp,
    }
}

/// Service `i`'s two backends (of the four addresses), as kube-proxy would
/// see two endpoints.
fn service_backends(i: usize) -> [Ipv4Addr; 2] {
    [BACKENDS[i % 4], BACKENDS[(i + 1) % 4]]
}

fn ready(addr: Ipv4Addr) -> Backend {
    Backend {
        addr: BackendAddr { addr, port: PORT },
        weight: Weight::ONE,
        ready: true,
    }
}

fn service_spec(i: usize, extra: bool) -> Result<ServiceSpec> {
    let mut backends: Vec<Backend> = service_backends(i).into_iter().map(ready).collect();
    if extra {
        backends.push(ready(EXTRA_BACKEND));
    }
    Ok(ServiceSpec {
        owner: ServiceOwner {
            tenant: TenantId::new("bench")?,
            app: AppId::new(format!("svc-{i}"))?,
        },
        published: false,
        backends,
    })
}

/// kube-proxy's chain names end in 16 characters of a hash of the service
/// (and endpoint); any unique 16 characters do here.
fn svc_chain(i: usize) -> String {
    format!("KUBE-SVC-{i:016X}")
}

fn sep_chain(i: usize, e: usize) -> String {
    format!("KUBE-SEP-{i:014X}{e:02X}")
}

/// The nat table kube-proxy (iptables mode) writes for services
/// `1..=n`, each with the endpoints of [`service_backends`], listed in
/// `KUBE-SERVICES` in order: service `n`, the measured one, is the last
/// rule. Includes the masquerade mark and postrouting chains and each
/// endpoint's hairpin rule, as kube-proxy does.
fn kube_proxy_ruleset(n: usize) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for c in ["KUBE-SERVICES", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"] {
        let _ = writeln!(chains, ":{c} - [0:0]");
    }
    rules.push_str(
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" \
         -j MASQUERADE --random-fully\n",
    );
    for i in 1..=n {
        let svc = svc_chain(i);
        let name = format!("bench/svc-{i}:http");
        let _ = writeln!(chains, ":{svc} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{name} cluster IP\" \
             -m tcp --dport {VIP_PORT} -j {svc}",
            vip(i)
        );
        let endpoints = service_backends(i);
        for (e, addr) in endpoints.iter().enumerate() {
            let sep = sep_chain(i, e);
            let _ = writeln!(chains, ":{sep} - [0:0]");
            // As kube-proxy: endpoint e of k is taken with probability
            // 1/(k-e); the last one unconditionally.
            let left = endpoints.len() - e;
            let statistic = if left > 1 {
                format!(
                    " -m statistic --mode random --probability {:.11}",
                    1.0 / left as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                rules,
                "-A {svc} -m comment --comment \"{name} -> {addr}:{PORT}\"{statistic} -j {sep}"
            );
            let _ = writeln!(
                rules,
                "-A {sep} -s {addr}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
                 -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT \
                 --to-destination {addr}:{PORT}"
            );
        }
    }
    format!("*nat\n{chains}{rules}COMMIT\n")
}

/// The same services for `ipvsadm -R` (round robin, masquerading).
fn ipvs_rules(n: usize) -> String {
    let mut out = String::new();
    for i in 1..=n {
        let v = vip(i);
        let _ = writeln!(out, "-A -t {v}:{VIP_PORT} -s rr");
        for addr in service_backends(i) {
            let _ = writeln!(out, "-a -t {v}:{VIP_PORT} -r {addr}:{PORT} -m -w 1");
        }
    }
    out
}

// ---------------------------------------------------------------------------
// corral: the balancer on a thread with its own bpffs

/// What the agent holds: the maps (through the balancer), the table and
/// the model of what is programmed.
struct Corral {
    balancer: Balancer,
    table: ServiceTable,
    programmed: Programmed,
}

type Job = Box<dyn FnOnce(&mut Corral) + Send>;

/// The thread that owns the balancer. Its mount namespace holds the bpffs
/// with the pins (links included): when the thread ends, the bpffs goes,
/// and with it the links and the maps.
struct LbThread {
    jobs: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<Result<()>>>,
}

impl LbThread {
    fn start(cgroup: &Path) -> Result<Self> {
        let cgroup = cgroup.to_owned();
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = thread::spawn(move || -> Result<()> {
            let setup = || -> Result<Corral> {
                private_bpffs()?;
                let mut balancer = Balancer::load(Path::new("/sys/fs/bpf/corral-bench-lb"))
                    .context("load the balancer")?;
                balancer
                    .attach(&cgroup)
                    .with_context(|| format!("attach the balancer to {}", cgroup.display()))?;
                Ok(Corral {
                    balancer,
                    table: ServiceTable::new(corral_router::Limits::default())?,
                    programmed: Programmed::new(),
                })
            };
            let mut corral = match setup() {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            for job in inbox {
                job(&mut corral);
            }
            corral.balancer.detach().context("detach the balancer")?;
            Ok(())
        });
        let lb = LbThread {
            jobs: Some(jobs),
            handle: Some(handle),
        };
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the balancer thread ended during set-up"))??;
        Ok(lb)
    }

    /// Runs `f` on the balancer's thread and returns its result.
    fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Corral) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .as_ref()
            .ok_or_else(|| anyhow!("the balancer thread is stopped"))?
            .send(Box::new(move |c: &mut Corral| {
                let _ = tx.send(f(c));
            }))
            .map_err(|_| anyhow!("the balancer thread has ended"))?;
        rx.recv()
            .map_err(|_| anyhow!("the balancer thread ended during a job"))?
    }

    fn stop(&mut self) -> Result<()> {
        self.jobs.take();
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow!("the balancer thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for LbThread {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("warning: {e:#}");
        }
    }
}

/// One programming pass: from the table change to the released ids.
#[derive(Clone, Copy, Default, Debug)]
struct Pass {
    ops: usize,
    total: Duration,
    /// `upsert` / `set_backends` / `remove` on the table.
    table: Duration,
    /// `plan_changes()` (what the table changed since the last release).
    plan: Duration,
    /// `balancer.apply` (the kernel map writes).
    kernel: Duration,
    /// `programmed.apply` (the model).
    model: Duration,
    release: Duration,
}

impl Pass {
    /// Plans and carries out what the table now wants, as the agent will.
    fn sync(c: &mut Corral, table_time: Duration, start: Instant) -> Result<(Pass, Vec<Op>)> {
        let t = Instant::now();
        let ops = plan_changes(&c.programmed, &c.table);
        let plan_time = t.elapsed();
        let (mut kernel, mut model) = (Duration::ZERO, Duration::ZERO);
        for op in &ops {
            let t = Instant::now();
            c.balancer
                .apply(op)
                .with_context(|| format!("apply {op:?}"))?;
            let t2 = Instant::now();
            c.programmed
                .apply(op)
                .with_context(|| format!("model {op:?}"))?;
            kernel += t2 - t;
            model += t2.elapsed();
        }
        let t = Instant::now();
        c.table.release(&c.programmed);
        let release = t.elapsed();
        Ok((
            Pass {
                ops: ops.len(),
                total: start.elapsed(),
                table: table_time,
                plan: plan_time,
                kernel,
                model,
                release,
            },
            ops,
        ))
    }
}

/// Installs services `1..=n` in one table change.
fn program_all(c: &mut Corral, n: usize) -> Result<Pass> {
    let specs: Vec<(ServiceKey, ServiceSpec)> = (1..=n)
        .map(|i| Ok((service_key(i), service_spec(i, false)?)))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    for (key, spec) in specs {
        c.table.upsert(key, spec)?;
    }
    let table = start.elapsed();
    Ok(Pass::sync(c, table, start)?.0)
}

/// Removes every service in one table change.
fn remove_all(c: &mut Corral, n: usize) -> Result<Pass> {
    let start = Instant::now();
    for i in 1..=n {
        c.table.remove(&service_key(i))?;
    }
    let table = start.elapsed();
    Ok(Pass::sync(c, table, start)?.0)
}

/// One service's change: service `i` gains (or loses) a backend.
#[derive(Clone, Debug)]
struct Change {
    pass: Pass,
    /// The operations, summarised ("PutBackend 10.245.1.1:8080", …).
    ops: Vec<String>,
    /// Whether every operation concerns service `i` or the backend added
    /// or removed.
    only_that_service: bool,
}

fn change_one(c: &mut Corral, i: usize, add: bool) -> Result<Change> {
    let key = service_key(i);
    let backends = service_spec(i, add)?.backends;
    let start = Instant::now();
    c.table.set_backends(&key, backends)?;
    let table = start.elapsed();
    let (pass, ops) = Pass::sync(c, table, start)?;
    let extra = BackendAddr {
        addr: EXTRA_BACKEND,
        port: PORT,
    };
    let extra_id = c.table.backend_id(&extra);
    let mut only = true;
    let summary = ops
        .iter()
        .map(|op| match op {
            Op::PutService { key: k, entry } => {
                only &= *k == key;
                format!("PutService {k} ({} backends)", entry.backends.len())
            }
            Op::PutBackend { id, addr } => {
                only &= *addr == extra;
                format!("PutBackend {} = {addr}", id.get())
            }
            Op::DeleteBackend { id } => {
                // Removed: the table no longer knows it, the add did.
                only &= extra_id.is_none();
                format!("DeleteBackend {}", id.get())
            }
            other => {
                only = false;
                format!("{other:?}")
            }
        })
        .collect();
    Ok(Change {
        pass,
        ops: summary,
        only_that_service: only,
    })
}

// ---------------------------------------------------------------------------
// namespaces, cgroup, peers

/// A network namespace made like a node: loopback, an interface with
/// the backend addresses and the client's source address, a route for the
/// VIP range (kube-proxy nodes route it; connect4 does not need it), and
/// room for many short connections. Deleted when dropped.
struct Netns {
    name: String,
    hook: u64,
}

impl Netns {
    fn create(role: &str) -> Result<Self> {
        let name = format!("corral-blb-{role}-{}", std::process::id());
        if Path::new("/run/netns").join(&name).exists() {
            bail!("network namespace {name} exists: remove it with `ip netns del {name}`");
        }
        let hook = {
            let name = name.clone();
            sandbox::register_hook(move || del_netns(&name))
        };
        let ns = Netns { name, hook };
        let n = ns.name.as_str();
        let ip = |args: &[&str]| util::run(Command::new("ip").arg("-n").arg(n).args(args));
        util::run(Command::new("ip").args(["netns", "add", n]))?;
        ip(&["link", "set", "lo", "up"])?;
        // A veth pair with both ends inside stands for the node's uplink
        // (this kernel has no dummy interfaces).
        ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])?;
        ip(&["link", "set", "d0", "up"])?;
        ip(&["link", "set", "d1", "up"])?;
        for addr in BACKENDS.iter().chain([&CLIENT_SRC]) {
            ip(&["addr", "add", &format!("{addr}/32"), "dev", "d0"])?;
        }
        ip(&[
            "route",
            "add",
            VIP_NET,
            "dev",
            "d0",
            "src",
            &CLIENT_SRC.to_string(),
        ])?;
        for (key, value) in [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ] {
            util::output(
                ns.exec("sysctl")
                    .args(["-q", "-w", &format!("{key}={value}")]),
            )?;
        }
        Ok(ns)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `program` inside the namespace (nsenter: unlike `ip netns exec`,
    /// it leaves the mounts alone).
    fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        del_netns(&self.name);
        sandbox::unregister_hook(self.hook);
    }
}

/// A throw-away cgroup2 directory; removed (after killing what is left in
/// it) when dropped.
struct Cgroup {
    path: PathBuf,
    hook: u64,
}

fn cgroup2_root() -> Result<PathBuf> {
    // Hybrid hosts (this one) mount cgroup2 at /sys/fs/cgroup/unified;
    // pure cgroup2 hosts at /sys/fs/cgroup.
    for dir in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        if Path::new(dir).join("cgroup.procs").exists()
            && Path::new(dir).join("cgroup.subtree_control").exists()
        {
            return Ok(PathBuf::from(dir));
        }
    }
    bail!("no cgroup2 hierarchy at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

fn remove_cgroup(path: &Path) {
    if !path.exists() {
        return;
    }
    for _ in 0..50 {
        let procs = fs::read_to_string(path.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            kill(pid);
        }
        if fs::remove_dir(path).is_ok() {
            return;
        }
        thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "warning: could not remove cgroup {}: `rmdir` it once empty",
        path.display()
    );
}

impl Cgroup {
    fn create() -> Result<Self> {
        let path = cgroup2_root()?.join(format!("corral-blb-{}", std::process::id()));
        if path.exists() {
            bail!("{} exists (left from an earlier run?)", path.display());
        }
        let hook = {
            let path = path.clone();
            sandbox::register_hook(move || remove_cgroup(&path))
        };
        let cg = Cgroup { path, hook };
        fs::create_dir(&cg.path).with_context(|| format!("create {}", cg.path.display()))?;
        Ok(cg)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
        sandbox::unregister_hook(self.hook);
    }
}

/// `this binary bench lb-peer ARGS` in `ns`, dying with us.
fn peer_command(exe: &Path, ns: &Netns, args: &[&str]) -> Command {
    let mut cmd = ns.exec(exe);
    cmd.args(["bench", "lb-peer"]).args(args);
    // SAFETY: prctl is async-signal-safe and acts on the child only.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// A server peer; killed when dropped or on Ctrl-C.
struct Server {
    child: Child,
    hook: u64,
}

impl Server {
    fn start(exe: &Path, ns: &Netns) -> Result<Self> {
        let mut cmd = peer_command(exe, ns, &["server", &PORT.to_string()]);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start `{}`", util::display(&cmd)))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        let server = Server {
            child,
            hook: sandbox::register_hook(move || kill(pid)),
        };
        let mut line = String::new();
        if let Some(out) = stdout {
            BufReader::new(out)
                .read_line(&mut line)
                .context("read the server's first line")?;
        }
        if line.trim() != "ready" {
            bail!("the server in {} did not start (said {line:?})", ns.name);
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill(self.child.id());
        let _ = self.child.wait();
        sandbox::unregister_hook(self.hook);
    }
}

// ---------------------------------------------------------------------------
// measuring

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    Direct,
    Vip,
    Iptables,
    Ipvs,
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct to the backend",
            Config::Vip => "corral VIP (connect4)",
            Config::Iptables => "iptables DNAT (kube-proxy)",
            Config::Ipvs => "IPVS",
        }
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct Sample {
    conns_per_s: f64,
    p50_us: f64,
    p99_us: f64,
}

/// Everything measured at one number of services.
struct Level {
    /// Services asked for (iptables, IPVS).
    services: usize,
    /// Services corral installed (at most the maps' limit).
    corral_services: usize,
    /// Per configuration, one sample per round.
    samples: Vec<(Config, Vec<Sample>)>,
    /// Per round, each configuration's rate over direct's.
    ratios: Vec<(Config, Vec<f64>)>,
    /// Per round, direct's p50 latency over each configuration's.
    p50_ratios: Vec<(Config, Vec<f64>)>,
    program: Pass,
    remove: Pass,
    changes: Vec<Change>,
    /// `iptables-restore` of the whole ruleset, each try.
    restore: Vec<Duration>,
    rules: usize,
}

struct Results {
    levels: Vec<Level>,
    ipvs: Result<(), String>,
    iptables_version: String,
}

/// Why IPVS cannot be measured here, if it cannot.
fn ipvs_available() -> Result<(), String> {
    if !Path::new("/proc/net/ip_vs").exists() {
        let modprobe = Command::new("modprobe")
            .arg("ip_vs")
            .output()
            .map_err(|e| format!("modprobe ip_vs: {e}"))
            .and_then(|out| {
                if out.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "modprobe ip_vs: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ))
                }
            });
        if !Path::new("/proc/net/ip_vs").exists() {
            let config = kernel_config("CONFIG_IP_VS").unwrap_or_else(|| "unknown".to_owned());
            return Err(format!(
                "the kernel has no IPVS (/proc/net/ip_vs absent; {}; kernel config: {config})",
                modprobe
                    .err()
                    .unwrap_or_else(|| "modprobe ip_vs ran".to_owned())
            ));
        }
    }
    Command::new("ipvsadm")
        .arg("--version")
        .output()
        .map_err(|e| format!("ipvsadm: {e}"))
        .map(drop)
}

fn kernel_config(key: &str) -> Option<String> {
    let out = Command::new("zcat").arg("/proc/config.gz").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.starts_with(&format!("{key}=")) || l.contains(&format!("{key} is not set")))
        .map(str::to_owned)
}

fn bench(o: &Options) -> Result<Results> {
    // This very binary, even if a build replaced the file meanwhile.
    let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    let ipvs = ipvs_available();
    if let Err(why) = &ipvs {
        println!("IPVS: skipped: {why}");
    }
    let iptables_version = util::output(Command::new("iptables-restore").arg("--version"))?
        .trim()
        .to_owned();
    let dir = std::env::temp_dir().join(format!("corral-blb-{}", std::process::id()));
    let dir_guard = RemoveDir::create(&dir)?;

    let cgroup = Cgroup::create()?;
    println!("cgroup2 directory: {}", cgroup.path.display());
    let mut lb = step("loading and attaching the balancer", || {
        LbThread::start(&cgroup.path)
    })?;
    let mut levels = Vec::new();
    for &n in &o.services {
        let level = step(&format!("{} services", thousands(n as u64)), || {
            // Fresh namespaces for each number of services: no connection
            // tracking or TIME_WAIT state carried over from the level
            // before (tens of thousands of entries per level).
            let nodes = Nodes::create(&exe, ipvs.is_ok())?;
            measure_level(o, &exe, n, &nodes, &cgroup, &lb, &dir)
        })?;
        levels.push(level);
    }
    lb.stop()?;
    drop(lb);
    drop(cgroup);
    drop(dir_guard);
    Ok(Results {
        levels,
        ipvs,
        iptables_version,
    })
}

/// The namespaces of one level and their servers. Dropped field by field:
/// the servers before the namespaces.
struct Nodes {
    _servers: Vec<Server>,
    node: Netns,
    ipt: Netns,
    ipvs: Option<Netns>,
}

impl Nodes {
    fn create(exe: &Path, with_ipvs: bool) -> Result<Self> {
        let node = Netns::create("node")?;
        let ipt = Netns::create("ipt")?;
        let ipvs = if with_ipvs {
            Some(Netns::create("ipvs")?)
        } else {
            None
        };
        let mut servers = vec![Server::start(exe, &node)?, Server::start(exe, &ipt)?];
        if let Some(ns) = &ipvs {
            servers.push(Server::start(exe, ns)?);
        }
        Ok(Nodes {
            _servers: servers,
            node,
            ipt,
            ipvs,
        })
    }
}

/// A scratch directory (the rulesets), removed when dropped or on Ctrl-C.
struct RemoveDir {
    path: PathBuf,
    hook: u64,
}

impl RemoveDir {
    fn create(path: &Path) -> Result<Self> {
        let hook = {
            let path = path.to_owned();
            sandbox::register_hook(move || {
                let _ = fs::remove_dir_all(&path);
            })
        };
        let dir = RemoveDir {
            path: path.to_owned(),
            hook,
        };
        fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        Ok(dir)
    }
}

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
        sandbox::unregister_hook(self.hook);
    }
}

fn measure_level(
    o: &Options,
    exe: &Path,
    n: usize,
    nodes: &Nodes,
    cgroup: &Cgroup,
    lb: &LbThread,
    dir: &Path,
) -> Result<Level> {
    let (node, ipt, ipvs) = (&nodes.node, &nodes.ipt, nodes.ipvs.as_ref());
    let corral_n = n.min(MAX_SERVICE_ID as usize);
    if corral_n < n {
        println!(
            "corral: {} services (lb_services holds {MAX_SERVICE_ID}); iptables: {}",
            thousands(corral_n as u64),
            thousands(n as u64)
        );
    }
    let program = lb.run(move |c| program_all(c, corral_n))?;
    println!(
        "    corral: {} services programmed in {} ({} ops)",
        thousands(corral_n as u64),
        ms(program.total),
        program.ops
    );
    // A service in the middle changes, the measured (last) one does not.
    let changed = corral_n.div_ceil(2);
    let changes = lb.run({
        let reps = o.changes;
        move |c| {
            (0..reps)
                .map(|k| change_one(c, changed, k % 2 == 0))
                .collect::<Result<Vec<_>>>()
        }
    })?;

    let ruleset = kube_proxy_ruleset(n);
    let rules = ruleset.lines().filter(|l| l.starts_with("-A ")).count();
    let file = dir.join(format!("kube-proxy-{n}.rules"));
    fs::write(&file, &ruleset).with_context(|| format!("write {}", file.display()))?;
    let mut restore = Vec::new();
    for _ in 0..3 {
        let input = fs::File::open(&file).with_context(|| format!("open {}", file.display()))?;
        let t = Instant::now();
        util::run(ipt.exec("iptables-restore").stdin(input))?;
        restore.push(t.elapsed());
    }
    println!(
        "    iptables-restore of {} rules: {}",
        thousands(rules as u64),
        ms(restore[1])
    );
    if let Some(ns) = ipvs {
        let file = dir.join(format!("ipvs-{n}.rules"));
        fs::write(&file, ipvs_rules(n))?;
        util::run(ns.exec("ipvsadm").arg("-C"))?;
        let input = fs::File::open(&file)?;
        util::run(ns.exec("ipvsadm").arg("-R").stdin(input))?;
    }

    let mut configs = vec![Config::Direct, Config::Vip, Config::Iptables];
    if ipvs.is_some() {
        configs.push(Config::Ipvs);
    }
    let target = |config: Config| -> (String, &Netns, Option<&Path>, Vec<Ipv4Addr>) {
        let vip_of = |i: usize| format!("{}:{VIP_PORT}", vip(i));
        match config {
            Config::Direct => (
                format!("{}:{PORT}", BACKENDS[0]),
                node,
                None,
                vec![BACKENDS[0]],
            ),
            Config::Vip => (
                vip_of(corral_n),
                node,
                Some(cgroup.path.as_path()),
                service_backends(corral_n).to_vec(),
            ),
            Config::Iptables => (vip_of(n), ipt, None, service_backends(n).to_vec()),
            Config::Ipvs => (
                vip_of(n),
                ipvs.unwrap_or(ipt),
                None,
                service_backends(n).to_vec(),
            ),
        }
    };
    let run = |config: Config, secs: f64| -> Result<Sample> {
        let (to, ns, cg, allowed) = target(config);
        client(exe, ns, &to, secs, cg, &allowed)
            .with_context(|| format!("{} with {n} services", config.name()))
    };
    for &config in &configs {
        run(config, 0.3)?;
    }
    let mut samples: Vec<(Config, Vec<Sample>)> =
        configs.iter().map(|&c| (c, Vec::new())).collect();
    let mut ratios: Vec<(Config, Vec<f64>)> = configs.iter().map(|&c| (c, Vec::new())).collect();
    let mut p50_ratios = ratios.clone();
    for round in 0..o.rounds {
        let mut order = configs.clone();
        order.rotate_left(round % configs.len());
        let mut this: BTreeMap<usize, Sample> = BTreeMap::new();
        for &config in &order {
            let s = run(config, o.secs)?;
            let idx = configs.iter().position(|&c| c == config).unwrap_or(0);
            this.insert(idx, s);
        }
        let direct = this.get(&0).map_or(f64::NAN, |s| s.conns_per_s);
        let direct_p50 = this.get(&0).map_or(f64::NAN, |s| s.p50_us);
        let mut line = format!("    round {}/{}:", round + 1, o.rounds);
        for (idx, s) in &this {
            samples[*idx].1.push(*s);
            ratios[*idx].1.push(s.conns_per_s / direct);
            p50_ratios[*idx].1.push(direct_p50 / s.p50_us);
            let _ = write!(
                line,
                " {} {:.0}/s ({:.2}×, p50 {:.0} µs, p99 {:.0} µs);",
                short(configs[*idx]),
                s.conns_per_s,
                s.conns_per_s / direct,
                s.p50_us,
                s.p99_us
            );
        }
        println!("{}", line.trim_end_matches(';'));
    }
    let remove = lb.run(move |c| remove_all(c, corral_n))?;
    Ok(Level {
        services: n,
        corral_services: corral_n,
        samples,
        ratios,
        p50_ratios,
        program,
        remove,
        changes,
        restore,
        rules,
    })
}

fn short(c: Config) -> &'static str {
    match c {
        Config::Direct => "direct",
        Config::Vip => "VIP",
        Config::Iptables => "iptables",
        Config::Ipvs => "IPVS",
    }
}

/// Runs a client peer; checks which backends answered.
fn client(
    exe: &Path,
    ns: &Netns,
    to: &str,
    secs: f64,
    cgroup: Option<&Path>,
    allowed: &[Ipv4Addr],
) -> Result<Sample> {
    let secs_s = secs.to_string();
    let mut args = vec!["client", to, &secs_s];
    let cg;
    if let Some(path) = cgroup {
        cg = path.display().to_string();
        args.push(&cg);
    }
    let out = util::output(&mut peer_command(exe, ns, &args))?;
    let v: Value =
        serde_json::from_str(out.trim()).with_context(|| format!("the peer's report: {out}"))?;
    let f = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| anyhow!("the peer's report has no {k}: {v}"))
    };
    let conns = f("connections")?;
    if conns < 1.0 {
        bail!("no connection to {to} succeeded: {v}");
    }
    let seen = v["backends"]
        .as_object()
        .ok_or_else(|| anyhow!("the peer's report has no backends: {v}"))?;
    for addr in seen.keys() {
        let a: Ipv4Addr = addr.parse().context("a backend address in the report")?;
        if !allowed.contains(&a) {
            bail!("a connection to {to} reached {a}, not one of {allowed:?}: {v}");
        }
    }
    Ok(Sample {
        conns_per_s: conns / f("secs")?,
        p50_us: f("p50_ns")? / 1000.0,
        p99_us: f("p99_ns")? / 1000.0,
    })
}

// ---------------------------------------------------------------------------
// the peer: `bench lb-peer server PORT | client ADDR:PORT SECS [CGROUP]`

/// The hidden `bench lb-peer` mode, run inside a namespace.
pub fn peer(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["server", port] => serve(port.parse().context("port")?),
        ["client", to, secs, rest @ ..] if rest.len() <= 1 => {
            if let Some(cgroup) = rest.first() {
                // Before the first connect: the hooks act on the sockets of
                // processes in their cgroup.
                let procs = Path::new(cgroup).join("cgroup.procs");
                fs::write(&procs, std::process::id().to_string())
                    .with_context(|| format!("join {}", procs.display()))?;
            }
            let report = connections(
                to.parse().context("address")?,
                Duration::from_secs_f64(secs.parse().context("seconds")?),
            )?;
            println!("{report}");
            Ok(())
        }
        _ => bail!("usage: bench lb-peer server PORT | client ADDR:PORT SECS [CGROUP]"),
    }
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n";
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const SERVER_THREADS: usize = 2;

/// Answers each connection's request with the address it was reached on,
/// then closes (first, so that TIME_WAIT is on this side).
fn serve(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let mut threads = Vec::new();
    for _ in 0..SERVER_THREADS {
        let listener = listener.try_clone()?;
        threads.push(thread::spawn(move || {
            for conn in listener.incoming() {
                let answered = conn.map_err(anyhow::Error::from).and_then(answer);
                if let Err(e) = answered {
                    eprintln!("lb-peer server: {e:#}");
                }
            }
        }));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn answer(mut conn: TcpStream) -> Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 256];
    let mut got = 0;
    while !buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf[got..])?;
        if n == 0 || got + n == buf.len() {
            bail!("bad request");
        }
        got += n;
    }
    let local = conn.local_addr()?.ip().to_string();
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{local}",
        local.len()
    );
    conn.write_all(response.as_bytes())?;
    Ok(())
}

/// Connect, request, read the answer to its end, close; one at a time for
/// `secs`. Latency is from before `connect` to the end of the answer.
fn connections(to: SocketAddr, secs: Duration) -> Result<Value> {
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 18);
    let mut backends: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0u64;
    let mut first_error = None;
    let mut buf = Vec::with_capacity(256);
    let start = Instant::now();
    while start.elapsed() < secs {
        let t = Instant::now();
        match one_connection(to, &mut buf) {
            Ok(()) => {
                lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
                let body = buf
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| String::from_utf8_lossy(&buf[i + 4..]).into_owned())
                    .unwrap_or_default();
                *backends.entry(body).or_default() += 1;
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
                if errors > 100 {
                    bail!("more than 100 failed connections to {to}; the first: {first_error:?}");
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    Ok(json!({
        "connections": lat.len(),
        "errors": errors,
        "first_error": first_error,
        "secs": elapsed,
        "p50_ns": percentile(&lat, 50.0),
        "p99_ns": percentile(&lat, 99.0),
        "backends": backends,
    }))
}

fn one_connection(to: SocketAddr, buf: &mut Vec<u8>) -> Result<()> {
    let mut conn =
        TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connect {to}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.write_all(REQUEST)?;
    buf.clear();
    conn.read_to_end(buf)?;
    if !buf.starts_with(b"HTTP/1.1 200") {
        bail!("unexpected answer {:?}", String::from_utf8_lossy(buf));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// the report

fn ms(d: Duration) -> String {
    let v = d.as_secs_f64() * 1000.0;
    if v < 1.0 {
        format!("{:.0} µs", v * 1000.0)
    } else {
        format!("{v:.1} ms")
    }
}

fn median_duration(v: &[Duration]) -> Duration {
    let secs = median(v.iter().map(Duration::as_secs_f64).collect());
    if secs.is_finite() {
        Duration::from_secs_f64(secs)
    } else {
        Duration::ZERO
    }
}

fn sample_medians(v: &[Sample]) -> Sample {
    Sample {
        conns_per_s: median(v.iter().map(|s| s.conns_per_s).collect()),
        p50_us: median(v.iter().map(|s| s.p50_us).collect()),
        p99_us: median(v.iter().map(|s| s.p99_us).collect()),
    }
}

fn level_sample(l: &Level, c: Config) -> Option<Sample> {
    l.samples
        .iter()
        .find(|(x, _)| *x == c)
        .map(|(_, v)| sample_medians(v))
}

fn level_ratio(l: &Level, c: Config) -> Option<f64> {
    ratio_of(&l.ratios, c)
}

fn ratio_of(ratios: &[(Config, Vec<f64>)], c: Config) -> Option<f64> {
    ratios
        .iter()
        .find(|(x, _)| *x == c)
        .map(|(_, v)| median(v.clone()))
}

fn services_label(l: &Level) -> String {
    if l.corral_services == l.services {
        thousands(l.services as u64)
    } else {
        format!(
            "{} (corral: {})",
            thousands(l.services as u64),
            thousands(l.corral_services as u64)
        )
    }
}

fn report(o: &Options, r: &Results, load_before: &str, load_after: &str) -> String {
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".to_owned());
    let mut out = format!(
        "## {date}: Service load balancing (`{}`)\n\n\
         {}; load average {load_before} at the start, {load_after} at the end. \
         {}; each service has 2 backends (of 4 addresses in the namespace).\n\n",
        command_line(o),
        machine(),
        r.iptables_version,
    );
    let configs: Vec<Config> = r
        .levels
        .first()
        .map(|l| l.samples.iter().map(|(c, _)| *c).collect())
        .unwrap_or_default();
    let _ = write!(
        out,
        "**New connections through a service address** (one client, one connection at a time: \
         connect, a 29-byte request, the backend's answer, close; {rounds} rounds of {secs} s per \
         configuration, order rotating; medians; × direct = median of the per-round ratios to \
         direct, of the connection rate and of the p50 latency (direct's p50 / this one's: \
         the steadier figure on a shared machine, where preemption moves rates and p99s); the \
         measured service is the last one installed, last in `KUBE-SERVICES`)\n\n\
         | services | configuration | connections/s | × direct (rate) | p50 | × direct (p50) | p99 |\n\
         |---|---|---:|---:|---:|---:|---:|\n",
        rounds = o.rounds,
        secs = o.secs
    );
    for l in &r.levels {
        for &c in &configs {
            let (Some(s), Some(ratio)) = (level_sample(l, c), level_ratio(l, c)) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} | {:.2} | {:.0} µs | {:.2} | {:.0} µs |",
                services_label(l),
                c.name(),
                s.conns_per_s,
                ratio,
                s.p50_us,
                ratio_of(&l.p50_ratios, c).unwrap_or(f64::NAN),
                s.p99_us
            );
        }
    }
    if let Err(why) = &r.ipvs {
        let _ = writeln!(out, "\nIPVS: not measured: {why}.");
    }
    let _ = write!(
        out,
        "\nThe issue's figures for the same chain on these machines: {ISSUE_FIGURES}.\n\n\
         **Programming** (corral: the agent's path, table change → `plan_changes` → `Balancer::apply` + \
         `Programmed::apply` per op → `release`; iptables: `iptables-restore` of the whole nat \
         table, median of 3)\n\n\
         | services | corral: all services | ops | table | plan | kernel writes | model | \
         release | remove all | `iptables-restore` | rules |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for l in &r.levels {
        let p = &l.program;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            services_label(l),
            ms(p.total),
            thousands(p.ops as u64),
            ms(p.table),
            ms(p.plan),
            ms(p.kernel),
            ms(p.model),
            ms(p.release),
            ms(l.remove.total),
            ms(median_duration(&l.restore)),
            thousands(l.rules as u64)
        );
    }
    let _ = write!(
        out,
        "\n**One service changed among the others** ({} changes each: the middle service gains a \
         backend, then loses it; time from the table change to `release`)\n\n\
         | services | median | max | plan (median) | kernel writes (median) | ops per change | only that service's entries |\n\
         |---|---:|---:|---:|---:|---|---|\n",
        o.changes
    );
    for l in &r.levels {
        let totals: Vec<Duration> = l.changes.iter().map(|c| c.pass.total).collect();
        let plans: Vec<Duration> = l.changes.iter().map(|c| c.pass.plan).collect();
        let kernel: Vec<Duration> = l.changes.iter().map(|c| c.pass.kernel).collect();
        let max = totals.iter().max().copied().unwrap_or_default();
        let mut kinds: Vec<String> = l.changes.iter().take(2).map(|c| c.ops.join(", ")).collect();
        kinds.dedup();
        let only = l.changes.iter().all(|c| c.only_that_service);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {} |",
            services_label(l),
            ms(median_duration(&totals)),
            ms(max),
            ms(median_duration(&plans)),
            ms(median_duration(&kernel)),
            kinds.join(" / "),
            if only { "yes" } else { "**no**" }
        );
    }
    out.push_str(&targets(r));
    out
}

/// `met` / `**not met**` when measured at the target's size; otherwise
/// not a verdict: what was measured, and at what size.
fn verdict(ok: bool, measured_at: usize) -> String {
    if measured_at >= TARGET_SERVICES {
        met(ok).to_owned()
    } else {
        format!(
            "**not verified** (measured at {} services, not {}; at {0}: {})",
            thousands(measured_at as u64),
            thousands(TARGET_SERVICES as u64),
            if ok { "met" } else { "not met" }
        )
    }
}

fn targets(r: &Results) -> String {
    let mut out = String::from("\nTargets:\n");
    let Some(big) = r.levels.iter().max_by_key(|l| l.services) else {
        return out;
    };
    let vip = level_ratio(big, Config::Vip).unwrap_or(f64::NAN);
    let ipt = level_ratio(big, Config::Iptables).unwrap_or(f64::NAN);
    let vip_p50 = ratio_of(&big.p50_ratios, Config::Vip).unwrap_or(f64::NAN);
    let (n, corral_n) = (big.services, big.corral_services);
    let _ = writeln!(
        out,
        "- VIP ≥ {TARGET_RATIO}× direct at {} services: {vip:.2}× by rate, {vip_p50:.2}× by p50 \
         (corral holding {}), {}",
        thousands(TARGET_SERVICES as u64),
        thousands(corral_n as u64),
        verdict(vip.min(vip_p50) >= TARGET_RATIO, corral_n)
    );
    let _ = writeln!(
        out,
        "- VIP ≥ {TARGET_OVER_IPTABLES}× iptables at {} services: {:.2}× (corral holding {}, \
         iptables {}), {}",
        thousands(TARGET_SERVICES as u64),
        vip / ipt,
        thousands(corral_n as u64),
        thousands(n as u64),
        verdict(vip / ipt >= TARGET_OVER_IPTABLES, corral_n.min(n))
    );
    let _ = writeln!(
        out,
        "- {} services programmed in ≤ {}: {} for {}, {}",
        thousands(TARGET_SERVICES as u64),
        ms(TARGET_PROGRAM),
        ms(big.program.total),
        thousands(corral_n as u64),
        verdict(big.program.total <= TARGET_PROGRAM, corral_n)
    );
    let totals: Vec<Duration> = big.changes.iter().map(|c| c.pass.total).collect();
    let m = median_duration(&totals);
    let _ = writeln!(
        out,
        "- one service's change applied in ≤ {} without touching the others: median {} among {} \
         services, {}",
        ms(TARGET_CHANGE),
        ms(m),
        thousands(corral_n as u64),
        verdict(
            m <= TARGET_CHANGE && big.changes.iter().all(|c| c.only_that_service),
            corral_n
        )
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_router::plan;

    fn owned(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn ruleset_is_kube_proxy_shaped_with_the_measured_service_last() {
        let rules = kube_proxy_ruleset(3);
        assert!(rules.starts_with("*nat\n") && rules.ends_with("COMMIT\n"));
        let services: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES "))
            .collect();
        assert_eq!(services.len(), 3);
        assert!(services[2].contains("-d 10.96.0.3/32") && services[2].ends_with(&svc_chain(3)));
        // Every chain jumped to is declared once.
        for chain in [svc_chain(2), sep_chain(2, 0), sep_chain(2, 1)] {
            assert_eq!(
                rules
                    .lines()
                    .filter(|l| *l == format!(":{chain} - [0:0]"))
                    .count(),
                1,
                "{chain}"
            );
        }
        // Two endpoints: the first at probability 1/2, the last always.
        let svc2: Vec<&str> = rules
            .lines()
            .filter(|l| l.starts_with(&format!("-A {} ", svc_chain(2))))
            .collect();
        assert_eq!(svc2.len(), 2);
        assert!(svc2[0].contains("--probability 0.50000000000"));
        assert!(!svc2[1].contains("statistic"));
        let [a, b] = service_backends(2);
        assert!(rules.contains(&format!(
            "-A {} -p tcp -m comment --comment \"bench/svc-2:http\" -m tcp -j DNAT --to-destination {a}:8080",
            sep_chain(2, 0)
        )));
        assert!(rules.contains(&format!("--to-destination {b}:8080")));
        // 1 + 2 per service (KUBE-SERVICES, KUBE-SVC) + 2 per endpoint + 6 fixed.
        let appended = rules.lines().filter(|l| l.starts_with("-A ")).count();
        assert_eq!(appended, 6 + 3 * (1 + 2 + 2 * 2));
        // Chain names fit iptables' 28 characters, also at 60,000 services.
        assert!(svc_chain(60_000).len() <= 28 && sep_chain(60_000, 1).len() <= 28);
    }

    #[test]
    fn vips_and_ipvs_rules() {
        assert_eq!(vip(1), Ipv4Addr::new(10, 96, 0, 1));
        assert_eq!(vip(10_000), Ipv4Addr::new(10, 96, 39, 16));
        let rules = ipvs_rules(2);
        assert_eq!(rules.lines().count(), 2 * 3);
        assert!(rules.starts_with("-A -t 10.96.0.1:80 -s rr\n"));
        assert!(rules.contains("-a -t 10.96.0.2:80 -r 10.245.0.3:8080 -m -w 1"));
    }

    #[test]
    fn options_default_and_parse() {
        let o = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(o.services, [10, 1_000, 10_000]);
        assert_eq!(command_line(&o), "cargo xtask bench lb");
        let o = parse(&owned(&[
            "--services",
            "10,1_000",
            "--secs",
            "2",
            "--no-record",
        ]))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(!o.record);
        assert_eq!(o.services, [10, 1_000]);
        assert_eq!(
            command_line(&o),
            "cargo xtask bench lb --services 10,1000 --secs 2"
        );
        assert!(parse(&owned(&["--services", "0"])).is_err());
        assert!(parse(&owned(&["--services", "ten"])).is_err());
        assert!(parse(&owned(&["--rounds", "0"])).is_err());
        assert!(parse(&owned(&["--bogus"])).is_err());
    }

    #[test]
    fn medians_of_samples_and_durations() {
        let s = |c: f64| Sample {
            conns_per_s: c,
            p50_us: c / 10.0,
            p99_us: c,
        };
        let m = sample_medians(&[s(3.0), s(1.0), s(2.0)]);
        assert_eq!((m.conns_per_s, m.p50_us), (2.0, 0.2));
        let d = |ms: u64| Duration::from_millis(ms);
        assert_eq!(median_duration(&[d(4), d(1), d(3), d(2)]), d(2) + d(1) / 2);
        assert_eq!(median_duration(&[]), Duration::ZERO);
        assert_eq!(ms(Duration::from_micros(250)), "250 µs");
        assert_eq!(ms(Duration::from_micros(2_500)), "2.5 ms");
    }

    #[test]
    fn verdicts_below_the_target_size_are_not_verdicts() {
        assert_eq!(verdict(true, 10_000), "met");
        assert_eq!(verdict(false, 10_000), "**not met**");
        assert!(verdict(true, 4_096).starts_with("**not verified** (measured at 4,096 services"));
    }

    /// Without a kernel: the table and plan a one-service change produces
    /// touch that service (and the backend it gains or loses) only.
    #[test]
    fn one_change_plans_only_that_service() {
        let mut table =
            ServiceTable::new(corral_router::Limits::default()).unwrap_or_else(|e| panic!("{e}"));
        let mut model = Programmed::new();
        for i in 1..=100 {
            table
                .upsert(
                    service_key(i),
                    service_spec(i, false).unwrap_or_else(|e| panic!("{e}")),
                )
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let ops = plan(&model, &table.desired());
        // 4 backends + 100 services.
        assert_eq!(ops.len(), 104);
        model
            .apply_all(&ops)
            .map_err(|(i, e)| format!("{i}: {e}"))
            .unwrap_or_else(|e| panic!("{e}"));
        table.release(&model);
        table
            .set_backends(
                &service_key(50),
                service_spec(50, true)
                    .unwrap_or_else(|e| panic!("{e}"))
                    .backends,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let ops = plan_changes(&model, &table);
        assert_eq!(ops, plan(&model, &table.desired()));
        assert_eq!(ops.len(), 2, "{ops:?}");
        assert!(matches!(&ops[0], Op::PutBackend { addr, .. } if addr.addr == EXTRA_BACKEND));
        assert!(matches!(&ops[1], Op::PutService { key, .. } if *key == service_key(50)));
    }
}
