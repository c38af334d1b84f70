//! `cargo xtask bench net`: what the eBPF data plane costs, in two ways.
//! Reports numbers; it asserts nothing about them.
//!
//! **Per packet.** Both TC programs run on crafted frames through
//! `BPF_PROG_TEST_RUN` with a repeat count; the kernel reports the average
//! time of one run (the way Katran measures its XDP path). An empty
//! classifier, loaded with bpf(2) directly, measures the harness's own share
//! of every figure on this machine. The programs are loaded with
//! `corral_ebpf::Dataplane` into a bpffs mounted in a private mount
//! namespace of the measuring thread, so nothing shows on the host and
//! nothing is left behind, even on Ctrl-C. The maps hold a realistic picture
//! (three instances of two tenants among a thousand other endpoints, a
//! hundred policies) and every verdict path that matters is timed: same
//! tenant, outside the cluster, a policy's forward packet (conntrack write),
//! its reply (conntrack hit), and a cross-tenant drop.
//!
//! **Traffic.** Real instances, started through real agents:
//!
//! ```text
//!   fabric netns: bridge br0 (no brain; the bench adds the routes)
//!        │ veth                                │ veth
//!   cell 1 node: n0 10.99.0.11                 cell 2 node: n0 10.99.0.12
//!     10.244.1.0/24: instances a, b              10.244.2.0/24: instance c
//! ```
//!
//! The instances run `sleep`; the load runs *in their network namespaces*:
//! this binary re-executed under `nsenter --net=/proc/<init pid>/ns/net` as
//! the hidden `bench net-peer` (a TCP server in b and c, clients in a). One
//! cell is a → b (host veth, node routing, host veth), two cells a → c
//! (through both nodes and the bridge). Each measurement is TCP
//! request/response (1-byte ping-pong, transactions/s and latency) and one
//! bulk TCP stream (Gbit/s), with the programs attached and with the same
//! veths' filters removed (the clsact qdisc stays): the two runs of a load
//! back to back, which goes first alternating each round. The programs put
//! back are this process's instances of them, on the agent's pinned maps,
//! replacing the agent's in place as an agent restart would. The overhead
//! is the median of the per-round ratios
//! (with their middle half, to show the noise), so that a machine whose load
//! drifts still compares neighbours in time. The programs' own packet
//! counters prove which state each run was in. Finally one more run of each
//! load with the kernel's run-time accounting on (`BPF_ENABLE_STATS`, off
//! again when its fd closes) gives the programs' cost per run on real
//! traffic and their share of the run's time: a low-noise estimate of the
//! overhead that the A/B comparison measures with noise.
//!
//! Cleanup: the agents' sandboxes (`sandbox.rs`) remove instances, node
//! namespaces, cgroups and pins; the fabric namespace and the peer processes
//! are removed by guards and by sandbox hooks on Ctrl-C.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::{TestRun, TestRunOptions};
use corral_ebpf::{
    AppNum, Dataplane, Direction, Endpoint, InstanceIface, InstanceNum, Policy, Program, Protocol,
    TenantNum,
};
use serde_json::{json, Value};

use crate::sandbox::{self, Capacity, Sandbox, Spec};
use crate::util::{self, is_root, step, workspace_root};
use crate::{deps, rootfs};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs as if on the loopback device.
const LO: u32 = 1;
const PORT: u16 = 5201;
const FABRIC_PREFIX: &str = "10.99.0";
const KATRAN: &str = "Katran's XDP load balancer: 101–119 ns/packet on one core, \
                      measured with BPF_PROG_TEST_RUN the same way";
const TARGET_NS: f64 = 100.0;
const TARGET_OVERHEAD_PCT: f64 = 5.0;

const HELP: &str = "\
usage: cargo xtask bench net [--rounds N] [--secs S] [--size B] [--repeat N]
                             [--trials N] [--pin C,S] [--per-packet-only]
                             [--traffic-only] [--no-record]

  --rounds N         traffic rounds, each measuring with and without the
                     programs (order alternating); default 15
  --secs S           length of each request/response and bulk run; default 1
  --size B           request/response message size in bytes; default 1
  --repeat N         BPF_PROG_TEST_RUN repeat count; default 1000000
  --trials N         test runs per path (the median is reported); default 5
  --pin C,S          pin the client peer to CPU C and the server peer to CPU S
  --per-packet-only  skip the instances and the traffic
  --traffic-only     skip the per-packet measurement
  --no-record        print the report without appending it to docs/benchmarks.md";

struct Options {
    rounds: usize,
    secs: f64,
    size: usize,
    repeat: u32,
    trials: usize,
    traffic: bool,
    per_packet: bool,
    /// CPUs for the client and the server peers.
    pin: Option<(usize, usize)>,
    record: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options {
        rounds: 15,
        secs: 1.0,
        size: 1,
        repeat: 1_000_000,
        trials: 5,
        traffic: true,
        per_packet: true,
        pin: None,
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
            "--rounds" => o.rounds = value("--rounds")?.parse().context("--rounds")?,
            "--secs" => o.secs = value("--secs")?.parse().context("--secs")?,
            "--size" => o.size = value("--size")?.parse().context("--size")?,
            "--repeat" => o.repeat = value("--repeat")?.parse().context("--repeat")?,
            "--trials" => o.trials = value("--trials")?.parse().context("--trials")?,
            "--per-packet-only" => o.traffic = false,
            "--traffic-only" => o.per_packet = false,
            "--pin" => {
                let v = value("--pin")?;
                let (c, s) = v
                    .split_once(',')
                    .ok_or_else(|| anyhow!("--pin takes CLIENT_CPU,SERVER_CPU, e.g. 0,1"))?;
                let cpu = |v: &str| -> Result<usize> {
                    let n: usize = v.parse().context("--pin")?;
                    if n >= libc::CPU_SETSIZE as usize {
                        bail!("--pin: no CPU {n}");
                    }
                    Ok(n)
                };
                o.pin = Some((cpu(c)?, cpu(s)?));
            }
            "--no-record" => o.record = false,
            other => bail!("unknown option {other}\n\n{HELP}"),
        }
    }
    if !o.traffic && !o.per_packet {
        bail!("--per-packet-only and --traffic-only leave nothing to measure");
    }
    if o.rounds == 0 || o.trials == 0 || o.repeat == 0 || o.size == 0 {
        bail!("--rounds, --trials, --repeat and --size must be at least 1");
    }
    if !(0.2..=600.0).contains(&o.secs) {
        bail!("--secs must be between 0.2 and 600");
    }
    Ok(o)
}

/// `cargo xtask bench net [OPTS]`.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{HELP}");
        return Ok(());
    }
    let o = parse(args)?;
    if !is_root() {
        bail!(
            "the benchmark loads eBPF programs and creates network namespaces and containers: \
             run it as root"
        );
    }
    // The load generator's own speed is part of every figure: never debug.
    // One release build of every binary (the agent's and this one, with the
    // same features, so the build inside finds nothing to do), then this
    // process becomes the release xtask.
    if cfg!(debug_assertions) {
        let args: Vec<String> = ["bench", "net"]
            .map(String::from)
            .into_iter()
            .chain(args.iter().cloned())
            .collect();
        return util::become_release_xtask(&["--bins", "--features", "xtask/ebpf"], &args);
    }
    let load_before = loadavg();
    let costs = if o.per_packet {
        let costs = step(
            "per-packet cost of the TC programs (BPF_PROG_TEST_RUN)",
            || per_packet(&o),
        )?;
        print_costs(&costs, &o);
        costs
    } else {
        Vec::new()
    };

    let traffic = if o.traffic {
        step("checking dependencies", deps::run)?;
        let agent_bin = sandbox::build_agent("release", &["--release", "--bins"])?;
        let agent_bin = fs::canonicalize(&agent_bin)
            .with_context(|| format!("{} was not built", agent_bin.display()))?;
        let rootfs = step("preparing the busybox rootfs", rootfs::ensure)?;
        Some(traffic(&o, &agent_bin, &rootfs)?)
    } else {
        None
    };
    let report = report(&o, &costs, traffic.as_ref(), &load_before, &loadavg());
    println!("\n{report}");
    if o.record {
        let path = workspace_root().join("docs/benchmarks.md");
        append(&path, &report)?;
        println!("appended to {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// per packet: BPF_PROG_TEST_RUN

/// One timed verdict path.
struct Cost {
    /// The C function name.
    program: &'static str,
    path: &'static str,
    frame: usize,
    verdict: u32,
    /// Kernel-reported ns per run, one per trial, sorted.
    ns: Vec<u64>,
}

impl Cost {
    fn median(&self) -> u64 {
        self.ns.get(self.ns.len() / 2).copied().unwrap_or(0)
    }

    fn min(&self) -> u64 {
        self.ns.first().copied().unwrap_or(0)
    }
}

fn tenant(n: u32) -> Result<TenantNum> {
    TenantNum::new(n).ok_or_else(|| anyhow!("tenant number 0 is reserved"))
}

fn instance(addr: Ipv4Addr) -> Result<InstanceNum> {
    InstanceNum::new(u32::from(addr)).ok_or_else(|| anyhow!("instance number 0 is reserved"))
}

/// Apps are numbered after their tenant here: one app per tenant.
fn app(t: u32) -> Result<AppNum> {
    AppNum::new(t).ok_or_else(|| anyhow!("app number 0 is reserved"))
}

fn iface(addr: Ipv4Addr, t: u32) -> Result<InstanceIface> {
    Ok(InstanceIface {
        addr,
        tenant: tenant(t)?,
        instance: instance(addr)?,
        app: app(t)?,
    })
}

/// Runs on a thread of its own, in a mount namespace of its own with a
/// fresh bpffs: the pins vanish with the thread.
fn per_packet(o: &Options) -> Result<Vec<Cost>> {
    let (repeat, trials) = (o.repeat, o.trials);
    thread::spawn(move || -> Result<Vec<Cost>> {
        private_bpffs()?;
        let mut dp = Dataplane::load(Path::new("/sys/fs/bpf/corral-bench"))
            .context("load the data plane")?;
        let costs = measure_paths(&mut dp, repeat, trials);
        drop(dp);
        costs
    })
    .join()
    .map_err(|_| anyhow!("the per-packet measurement thread panicked"))?
}

/// Gives the calling thread a private mount namespace with a new bpffs on
/// /sys/fs/bpf (only this thread sees it; it goes when the thread ends).
pub(crate) fn private_bpffs() -> Result<()> {
    let c = |s: &str| std::ffi::CString::new(s).context("a path with a NUL byte");
    let (root, bpf, target) = (c("/")?, c("bpf")?, c("/sys/fs/bpf")?);
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: unshare with a constant flag changes only this thread's mount
    // namespace (a thread may unshare CLONE_NEWNS, which implies CLONE_FS).
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        bail!("unshare(CLONE_NEWNS): {}", std::io::Error::last_os_error());
    }
    // SAFETY: mount(2) with valid NUL-terminated strings (or null where the
    // kernel allows it), acting on this thread's private mount namespace:
    // first stop propagation back to the host, then mount a new bpffs.
    unsafe {
        if libc::mount(
            none,
            root.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            bail!("make / private: {}", std::io::Error::last_os_error());
        }
        if libc::mount(
            bpf.as_ptr(),
            target.as_ptr(),
            bpf.as_ptr(),
            0,
            std::ptr::null(),
        ) != 0
        {
            bail!(
                "mount a bpffs on /sys/fs/bpf: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

const SAME: &str = "same tenant";
const SAME_BIG: &str = "same tenant, full-size frame";
const OUTSIDE: &str = "to a non-endpoint (the node, the outside)";
const ALLOWED: &str = "cross tenant, a policy allows (conntrack write)";
const REPLY: &str = "cross tenant, reply of an allowed flow (conntrack hit)";
const DENIED: &str = "cross tenant, no policy: dropped";

const TENANT_A: u32 = 0x0a;
const TENANT_B: u32 = 0x0b;

fn measure_paths(dp: &mut Dataplane, repeat: u32, trials: usize) -> Result<Vec<Cost>> {
    let a1 = iface(Ipv4Addr::new(10, 244, 1, 2), TENANT_A)?;
    let a2 = iface(Ipv4Addr::new(10, 244, 1, 3), TENANT_A)?;
    let b1 = iface(Ipv4Addr::new(10, 244, 2, 2), TENANT_B)?;
    for who in [&a1, &a2, &b1] {
        dp.set_endpoint(
            who.addr,
            &Endpoint {
                tenant: who.tenant,
                instance: who.instance,
                app: who.app,
            },
        )?;
    }
    // The rest of a cluster: a thousand endpoints of fifty other tenants and
    // a hundred policies among them, so lookups do not run on empty maps.
    for i in 0..1000u32 {
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 245, 0, 0)) + i);
        dp.set_endpoint(
            addr,
            &Endpoint {
                tenant: tenant(100 + i % 50)?,
                instance: instance(addr)?,
                app: app(100 + i % 50)?,
            },
        )?;
    }
    for i in 0..100u32 {
        dp.set_policy(&Policy {
            from: tenant(100 + i % 50)?,
            to: tenant(100 + (i + 1) % 50)?,
            app: None,
            protocol: Protocol::Tcp,
            port: 8000 + u16::try_from(i)?,
        })?;
    }
    dp.set_policy(&Policy {
        from: a1.tenant,
        to: b1.tenant,
        app: None,
        protocol: Protocol::Tcp,
        port: 80,
    })?;

    let outside = Ipv4Addr::new(192, 0, 2, 1);
    let same = tcp(a1.addr, 40000, a2.addr, 8080, 0);
    let same_big = tcp(a1.addr, 40000, a2.addr, 8080, 1500 - 54);
    let forward = tcp(a1.addr, 40001, b1.addr, 80, 0);
    let reply = tcp(b1.addr, 80, a1.addr, 40001, 0);
    let denied = tcp(a1.addr, 40002, b1.addr, 443, 0);
    let to_outside = tcp(a1.addr, 40003, outside, 443, 0);
    use Program::{FromInstance as From, ToInstance as To};
    let cases: [(Program, &'static str, &InstanceIface, &[u8], u32); 10] = [
        (From, SAME, &a1, &same, TC_ACT_OK),
        (From, SAME_BIG, &a1, &same_big, TC_ACT_OK),
        (From, OUTSIDE, &a1, &to_outside, TC_ACT_OK),
        (From, ALLOWED, &a1, &forward, TC_ACT_OK),
        (From, REPLY, &b1, &reply, TC_ACT_OK),
        (From, DENIED, &a1, &denied, TC_ACT_SHOT),
        (To, SAME, &a2, &same, TC_ACT_OK),
        (To, ALLOWED, &b1, &forward, TC_ACT_OK),
        (To, REPLY, &a1, &reply, TC_ACT_OK),
        (To, DENIED, &b1, &denied, TC_ACT_SHOT),
    ];
    let run = |dp: &Dataplane, program: Program, packet: &[u8], repeat: u32| {
        dp.program(program)?
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", program.name()))
    };
    let mut costs: Vec<Cost> = Vec::with_capacity(cases.len() + 1);
    for &(program, path, _, packet, expected) in &cases {
        costs.push(Cost {
            program: program.name(),
            path,
            frame: packet.len(),
            verdict: expected,
            ns: Vec::with_capacity(trials),
        });
    }
    let floor = EmptyProgram::load()?;
    costs.push(Cost {
        program: "(empty program)",
        path: "returns TC_ACT_OK at once: the harness's own cost",
        frame: same.len(),
        verdict: TC_ACT_OK,
        ns: Vec::with_capacity(trials),
    });
    // A wrong verdict would time another path than the one named.
    for &(program, path, who, packet, expected) in &cases {
        // The kernel runs the packet on lo: make lo the instance's veth.
        dp.set_interface(LO, who)?;
        let verdict = run(dp, program, packet, 1)?.return_value;
        if verdict != expected {
            bail!(
                "{} ({path}) returned {verdict} instead of {expected}: the maps are not what the bench meant",
                program.name()
            );
        }
    }
    // Trials go round the paths, so that a change in the machine's load
    // touches every path alike.
    for _ in 0..trials {
        for (&(program, _, who, packet, _), cost) in cases.iter().zip(&mut costs) {
            dp.set_interface(LO, who)?;
            let took = run(dp, program, packet, repeat)?.duration;
            cost.ns
                .push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        }
        let took = floor.test_run(&same, repeat)?;
        if let Some(cost) = costs.last_mut() {
            cost.ns.push(took);
        }
    }
    for cost in &mut costs {
        cost.ns.sort_unstable();
    }
    Ok(costs)
}

/// A classifier that returns `TC_ACT_OK` and nothing else, loaded with the
/// bpf(2) syscall directly (aya loads only ELF objects): what
/// `BPF_PROG_TEST_RUN` itself costs per run on this machine, which every
/// other figure includes (Katran's too, on its machine).
struct EmptyProgram {
    fd: OwnedFd,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_LOAD`; the kernel
/// treats the fields after them as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
}

/// The leading fields of `union bpf_attr` for `BPF_PROG_TEST_RUN`.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// bpf(2) with `attr` as its whole attribute block.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    let size = libc::c_uint::try_from(std::mem::size_of::<T>()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of the
    // kernel's `union bpf_attr` for `cmd`, `size` bytes long; the kernel
    // reads and writes only within those bytes, and every pointer inside
    // it points to a buffer that outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl EmptyProgram {
    fn load() -> Result<Self> {
        // r0 = TC_ACT_OK (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
        let insns: [u64; 2] = [0xb7, 0x95];
        let license = b"GPL\0";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("load an empty classifier")?;
        let fd = i32::try_from(fd).context("program fd")?;
        // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing
        // else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd })
    }

    /// Kernel-reported ns per run.
    fn test_run(&self, packet: &[u8], repeat: u32) -> Result<u64> {
        let mut attr = TestRunAttr {
            prog_fd: u32::try_from(self.fd.as_raw_fd()).context("program fd")?,
            data_size_in: u32::try_from(packet.len()).context("packet size")?,
            data_in: packet.as_ptr() as u64,
            repeat,
            ..TestRunAttr::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of the empty classifier")?;
        if attr.retval != TC_ACT_OK {
            bail!("the empty classifier returned {}", attr.retval);
        }
        Ok(u64::from(attr.duration))
    }
}

fn print_costs(costs: &[Cost], o: &Options) {
    println!(
        "ns per packet, median of {} runs of {} repeats:",
        o.trials, o.repeat
    );
    for c in costs {
        println!(
            "  {:<22} {:<56} {:>5} B  {:>4} ns (min {})",
            c.program,
            c.path,
            c.frame,
            c.median(),
            c.min()
        );
    }
}

// Crafted frames (as in tests/tests/ebpf.rs).

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap_or(u16::MAX);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // id, DF, ttl, proto, csum
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !(((folded & 0xffff) + (folded >> 16)) as u16);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(l4);
    ethernet(0x0800, &ip)
}

/// An ACK segment with `payload` bytes: the common packet of a stream.
fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload);
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1]); // seq, ack
    seg.extend_from_slice(&[0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0]); // ACK, window
    seg.resize(seg.len() + payload, 0xab);
    ipv4(src, dst, 6, &seg)
}

// ---------------------------------------------------------------------------
// traffic between instances

/// An instance under test.
struct Inst {
    id: &'static str,
    cell: usize,
    addr: Ipv4Addr,
    num: InstanceNum,
    /// Its network namespace, as its init process holds it.
    netns: PathBuf,
    /// The host end of its veth, in its cell's node namespace.
    veth: String,
}

/// A cell: the agent's sandbox and this process's own handle on the
/// agent's pinned maps and programs (to detach and re-attach filters and
/// to read counters).
struct Cell {
    dp: Dataplane,
    sandbox: Sandbox,
}

struct Scenario {
    name: &'static str,
    client: usize,
    server: usize,
}

/// One run of each load, in one filter state.
#[derive(Clone, Copy, Default)]
struct Sample {
    transactions: f64,
    tps: f64,
    p50_us: f64,
    p99_us: f64,
    bytes: f64,
    gbps: f64,
    /// Packets the programs counted for the two instances during the run.
    counted: u64,
}

struct ScenarioResult {
    name: &'static str,
    /// (with the programs, without), one pair per round.
    rounds: Vec<(Sample, Sample)>,
}

struct Traffic {
    results: Vec<ScenarioResult>,
    in_path: Vec<InPath>,
}

/// What the kernel accounted to the programs while real traffic ran.
struct InPath {
    scenario: &'static str,
    load: Load,
    /// ns per run of `corral_from_instance`, `corral_to_instance`.
    from_ns: f64,
    to_ns: f64,
    /// Program runs (both programs, every veth on the way).
    runs: u64,
    /// Transactions (request/response) or bytes (bulk) in that time.
    work: f64,
    /// The programs' run time as a share of the run's wall time: of each
    /// transaction's (request/response: the runs are on its critical
    /// path), of one CPU's (bulk).
    share: f64,
}

/// Two cells on a fabric, instances a and b on cell 1 and c on cell 2.
/// Dropped field by field: the cells (instances, agents, node namespaces)
/// before the fabric.
struct Testbed {
    cells: Vec<Cell>,
    insts: Vec<Inst>,
    _fabric: Fabric,
}

const SCENARIOS: [Scenario; 2] = [
    Scenario {
        name: "one cell (a → b)",
        client: 0,
        server: 1,
    },
    Scenario {
        name: "two cells (a → c)",
        client: 0,
        server: 2,
    },
];

fn traffic(o: &Options, agent_bin: &Path, rootfs: &Path) -> Result<Traffic> {
    let mut bed = testbed(agent_bin, rootfs)?;
    // This very binary, even if a build replaced the file meanwhile.
    let exe = PathBuf::from(format!("/proc/{}/exe", std::process::id()));
    // Declared after the testbed, so dropped (killed) before it.
    let mut peers = Peers::new();
    for server in [&bed.insts[1], &bed.insts[2]] {
        peers.start_server(&exe, server, o.pin.map(|(_, s)| s))?;
    }
    step("warming up", || {
        let short = Options { secs: 0.5, ..*o };
        let mut scratch = Sample::default();
        for s in &SCENARIOS {
            for load in Load::ALL {
                measure(&short, &exe, &bed.cells, &bed.insts, s, load, &mut scratch)?;
            }
        }
        Ok(())
    })?;
    let mut results: Vec<ScenarioResult> = SCENARIOS
        .iter()
        .map(|s| ScenarioResult {
            name: s.name,
            rounds: Vec::new(),
        })
        .collect();
    for round_no in 0..o.rounds {
        for (s, result) in SCENARIOS.iter().zip(&mut results) {
            let title = format!("round {}/{}: {}", round_no + 1, o.rounds, s.name);
            let pair = step(&title, || {
                round(o, &exe, &mut bed.cells, &bed.insts, s, round_no)
            })?;
            result.rounds.push(pair);
        }
    }
    check_states(&results)?;
    let mut in_path = Vec::new();
    for s in &SCENARIOS {
        for load in Load::ALL {
            let title = format!(
                "run time in the datapath (BPF_ENABLE_STATS): {}, {}",
                s.name,
                load.name()
            );
            in_path.push(step(&title, || {
                measure_in_path(o, &exe, &mut bed.cells, &bed.insts, s, load)
            })?);
        }
    }
    drop(peers);
    drop(bed);
    Ok(Traffic { results, in_path })
}

fn testbed(agent_bin: &Path, rootfs: &Path) -> Result<Testbed> {
    // Should anything below fail, what exists is dropped in reverse order:
    // the cells before the fabric.
    let fabric = Fabric::create()?;
    let mut cells = Vec::new();
    for (n, cell_id, prefix, subnet) in [
        (1u8, "bench-net-1", "corral-bnet-c1", "10.244.1.0/24"),
        (2, "bench-net-2", "corral-bnet-c2", "10.244.2.0/24"),
    ] {
        let sandbox = step(&format!("starting cell {n} ({subnet})"), || {
            Sandbox::start(&Spec {
                prefix,
                cell_id,
                agent_bin: agent_bin.to_owned(),
                stop_grace_secs: 1,
                capacity: Capacity {
                    memory_mb: 4096,
                    disk_mb: 4096,
                    max_containers: 10,
                },
                subnet: Some(subnet),
            })
        })?;
        fabric.attach(&sandbox, 10 + n)?;
        let dp = agent_dataplane(&sandbox, &Path::new("/sys/fs/bpf/corral").join(cell_id))
            .with_context(|| format!("open cell {n}'s data plane"))?;
        cells.push(Cell { dp, sandbox });
    }
    // Each node routes the other cell's subnet over the bridge, as a brain
    // would make it do.
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        util::run(Command::new("ip").args([
            "-n",
            &cells[from].sandbox.netns,
            "route",
            "add",
            &format!("10.244.{}.0/24", to + 1),
            "via",
            &format!("{FABRIC_PREFIX}.{}", 11 + to),
        ]))?;
    }
    let insts = step("starting instances a, b (cell 1) and c (cell 2)", || {
        let mut insts = Vec::new();
        for (id, cell) in [("net-a", 0usize), ("net-b", 0), ("net-c", 1)] {
            insts.push(start_instance(&cells[cell], cell, id, rootfs)?);
        }
        Ok(insts)
    })?;
    // The agents declared the instances' interfaces: read them back.
    for cell in &mut cells {
        cell.dp.refresh()?;
    }
    // What the brain's endpoint map would tell each cell about the other's
    // instances, so that cross-cell packets take the same-tenant path.
    for i in &insts {
        let endpoint = cells[i.cell]
            .dp
            .endpoint(i.addr)?
            .ok_or_else(|| anyhow!("instance {} has no endpoint on its own cell", i.id))?;
        for (n, cell) in cells.iter_mut().enumerate() {
            if n != i.cell {
                cell.dp.set_endpoint(i.addr, &endpoint)?;
            }
        }
        println!(
            "{}: {} on cell {}, host veth {}, {}",
            i.id,
            i.addr,
            i.cell + 1,
            i.veth,
            i.netns.display()
        );
    }
    Ok(Testbed {
        cells,
        insts,
        _fabric: fabric,
    })
}

/// The programs' own counters say whether every run was in the state the
/// bench meant: packets counted with the filters attached, none without.
fn check_states(results: &[ScenarioResult]) -> Result<()> {
    for r in results {
        let leaked: u64 = r.rounds.iter().map(|(_, w)| w.counted).sum();
        let seen: u64 = r.rounds.iter().map(|(w, _)| w.counted).sum();
        if leaked > 0 || seen == 0 {
            bail!(
                "{}: the programs counted {seen} packets with the filters attached and {leaked} \
                 without: the runs were not in the states the bench set",
                r.name
            );
        }
    }
    Ok(())
}

/// One more run of `load` with the programs attached and the kernel's
/// run-time accounting on (`BPF_ENABLE_STATS`, which ends when its file
/// descriptor closes: nothing stays switched on). Its two clock reads per
/// program run are why this is not one of the compared runs.
fn measure_in_path(
    o: &Options,
    exe: &Path,
    cells: &mut [Cell],
    insts: &[Inst],
    s: &Scenario,
    load: Load,
) -> Result<InPath> {
    // Attaching puts this process's program instances on the veths, the
    // ones whose statistics are read below.
    set_filters(cells, insts, &[s.client, s.server], true)?;
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enable the kernel's BPF run-time statistics")?;
    let before = program_stats(cells)?;
    let mut sample = Sample::default();
    measure(o, exe, cells, insts, s, load, &mut sample)?;
    let after = program_stats(cells)?;
    drop(stats);
    let per_run = |i: usize| {
        let (t0, n0) = before[i];
        let (t1, n1) = after[i];
        let runs = n1.saturating_sub(n0);
        (t1.saturating_sub(t0) as f64 / runs.max(1) as f64, runs)
    };
    let (from_ns, from_runs) = per_run(0);
    let (to_ns, to_runs) = per_run(1);
    let busy_ns = from_ns * from_runs as f64 + to_ns * to_runs as f64;
    let wall_s = match load {
        Load::RequestResponse => sample.transactions / sample.tps.max(1e-9),
        Load::Bulk => sample.bytes * 8.0 / (sample.gbps * 1e9).max(1e-9),
    };
    println!(
        "    {from_ns:.0} ns per run of corral_from_instance ({from_runs} runs), \
         {to_ns:.0} ns per run of corral_to_instance ({to_runs} runs)"
    );
    Ok(InPath {
        scenario: s.name,
        load,
        from_ns,
        to_ns,
        runs: from_runs + to_runs,
        work: match load {
            Load::RequestResponse => sample.transactions,
            Load::Bulk => sample.bytes,
        },
        share: busy_ns / (wall_s * 1e9).max(1.0),
    })
}

/// (run time in ns, run count) of `corral_from_instance` and of
/// `corral_to_instance`, summed over this process's instances of them on
/// every cell.
fn program_stats(cells: &[Cell]) -> Result<[(u64, u64); 2]> {
    let mut out = [(0, 0); 2];
    for cell in cells {
        for (slot, program) in out.iter_mut().zip(Program::ALL) {
            let info = cell.dp.program(program)?.info()?;
            slot.0 += u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX);
            slot.1 += info.run_count();
        }
    }
    Ok(out)
}

/// The agent's data plane, as the agent sees it: its pins are on a bpffs
/// that the agent may have mounted in its private mount namespace, so they
/// are opened from a thread that joined that namespace. The maps and
/// programs are file descriptors, valid in every namespace afterwards.
fn agent_dataplane(sandbox: &Sandbox, pins: &Path) -> Result<Dataplane> {
    let path = format!("/proc/{}/ns/mnt", sandbox.agent_pid);
    let mnt = File::open(&path).with_context(|| format!("open {path}"))?;
    let pins = pins.to_owned();
    thread::spawn(move || -> Result<Dataplane> {
        // SAFETY: unshare(CLONE_FS) gives this thread its own root and
        // working directory, which joining a mount namespace requires;
        // setns then moves only this thread, which ends right after.
        unsafe {
            if libc::unshare(libc::CLONE_FS) != 0 {
                bail!("unshare(CLONE_FS): {}", std::io::Error::last_os_error());
            }
            if libc::setns(mnt.as_raw_fd(), libc::CLONE_NEWNS) != 0 {
                bail!("enter {path}: {}", std::io::Error::last_os_error());
            }
        }
        Ok(Dataplane::load(&pins)?)
    })
    .join()
    .map_err(|_| anyhow!("the thread opening the agent's data plane panicked"))?
}

fn start_instance(cell: &Cell, n: usize, id: &'static str, rootfs: &Path) -> Result<Inst> {
    let spec = json!({
        "tenant": "bench",
        "app": "net",
        "index": 0,
        "kind": "lrp",
        "rootfs": rootfs,
        "command": ["/bin/sleep", "3600"],
        "env": {},
        "resources": {"memory_mb": 32, "disk_mb": 16, "cpu_weight": 100, "max_pids": 8},
        "ports": [],
    });
    let v = cell
        .sandbox
        .client
        .put(&format!("/v1/instances/{id}"), &spec)?
        .ok()?
        .json()?;
    if v["state"] != "running" {
        bail!("instance {id} did not start: {v}");
    }
    let addr: Ipv4Addr = v["address"]
        .as_str()
        .ok_or_else(|| anyhow!("instance {id} has no address: {v}"))?
        .parse()
        .context("instance address")?;
    let pid = v["pid"]
        .as_u64()
        .ok_or_else(|| anyhow!("instance {id} has no pid: {v}"))?;
    let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let node = Path::new("/run/netns").join(&cell.sandbox.netns);
    let inode = |p: &Path| fs::metadata(p).map(|m| m.ino());
    if inode(&netns).context("the instance's network namespace")? == inode(&node)? {
        bail!("instance {id} (pid {pid}) runs in the node's network namespace, not its own");
    }
    // The kernel's own answer to "which veth leads to the instance".
    let out = util::output(Command::new("ip").args([
        "-n",
        &cell.sandbox.netns,
        "-j",
        "route",
        "get",
        &addr.to_string(),
    ]))?;
    let route: Value = serde_json::from_str(&out).context("parse `ip -j route get`")?;
    let veth = route[0]["dev"]
        .as_str()
        .ok_or_else(|| anyhow!("no route to {addr} on cell {}: {out}", n + 1))?
        .to_owned();
    let num = cell
        .dp
        .endpoint(addr)?
        .ok_or_else(|| anyhow!("instance {id} ({addr}) is not in its cell's endpoint map"))?
        .instance;
    Ok(Inst {
        id,
        cell: n,
        addr,
        num,
        netns,
        veth,
    })
}

/// Attaches (replacing the agent's filters in place, as an agent restart
/// does) or detaches the programs on the host veths of `which`, then checks
/// with `tc` that the veths are in that state.
fn set_filters(cells: &mut [Cell], insts: &[Inst], which: &[usize], attached: bool) -> Result<()> {
    for &i in which {
        let inst = &insts[i];
        let cell = &mut cells[inst.cell];
        let node = Path::new("/run/netns").join(&cell.sandbox.netns);
        let ns = File::open(&node).with_context(|| format!("open {}", node.display()))?;
        let dp = &mut cell.dp;
        let veth = inst.veth.as_str();
        thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                // SAFETY: `ns` is an open network-namespace file; setns with
                // CLONE_NEWNET moves only this scoped thread, which ends
                // right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "enter {}: {}",
                        node.display(),
                        std::io::Error::last_os_error()
                    );
                }
                if attached {
                    dp.attach(veth)?;
                } else {
                    dp.detach(veth)?;
                }
                Ok(())
            })
            .join()
            .map_err(|_| anyhow!("the filter thread panicked"))?
        })?;
        for (hook, program) in [
            ("ingress", Program::FromInstance),
            ("egress", Program::ToInstance),
        ] {
            let shown = util::output(Command::new("tc").args([
                "-n",
                &cell.sandbox.netns,
                "filter",
                "show",
                "dev",
                veth,
                hook,
            ]))?;
            if shown.contains(program.name()) != attached {
                bail!(
                    "{veth} {hook}: expected the filter {}, found:\n{shown}",
                    if attached { "attached" } else { "gone" }
                );
            }
        }
    }
    Ok(())
}

fn counted(cells: &[Cell], insts: &[Inst], which: &[usize]) -> Result<u64> {
    let mut n = 0;
    for &i in which {
        let inst = &insts[i];
        for dir in Direction::ALL {
            n += cells[inst.cell].dp.instance_counter(inst.num, dir)?.packets;
        }
    }
    Ok(n)
}

#[derive(Clone, Copy)]
enum Load {
    RequestResponse,
    Bulk,
}

impl Load {
    const ALL: [Load; 2] = [Load::RequestResponse, Load::Bulk];

    const fn name(self) -> &'static str {
        match self {
            Load::RequestResponse => "request/response",
            Load::Bulk => "bulk",
        }
    }
}

/// One round of a scenario: each load with and without the programs, the
/// two runs of a load next to each other in time, the state that goes
/// first alternating between rounds (drift in the machine's load then
/// favours neither). Leaves the programs attached.
fn round(
    o: &Options,
    exe: &Path,
    cells: &mut [Cell],
    insts: &[Inst],
    s: &Scenario,
    round_no: usize,
) -> Result<(Sample, Sample)> {
    let order = if round_no % 2 == 0 {
        [true, false]
    } else {
        [false, true]
    };
    let (mut with, mut without) = (Sample::default(), Sample::default());
    for load in Load::ALL {
        for attached in order {
            set_filters(cells, insts, &[s.client, s.server], attached)?;
            let sample = if attached { &mut with } else { &mut without };
            measure(o, exe, cells, insts, s, load, sample)?;
        }
    }
    set_filters(cells, insts, &[s.client, s.server], true)?;
    for (label, x) in [("with", &with), ("without", &without)] {
        println!(
            "    {label:<8} {:>7.0} transactions/s (p50 {:>5.1} µs, p99 {:>6.1} µs), {:>6.2} Gbit/s; \
             {} packets counted by the programs",
            x.tps, x.p50_us, x.p99_us, x.gbps, x.counted
        );
    }
    Ok((with, without))
}

/// Runs `load` once from the scenario's client and adds its figures to
/// `sample`.
fn measure(
    o: &Options,
    exe: &Path,
    cells: &[Cell],
    insts: &[Inst],
    s: &Scenario,
    load: Load,
    sample: &mut Sample,
) -> Result<()> {
    let (client, server) = (&insts[s.client], &insts[s.server]);
    let to = format!("{}:{PORT}", server.addr);
    let secs = o.secs.to_string();
    let size = o.size.to_string();
    let cpu = o.pin.map(|(c, _)| c);
    let f = |v: &Value, k: &str| {
        v[k].as_f64()
            .ok_or_else(|| anyhow!("the peer's report has no {k}: {v}"))
    };
    let before = counted(cells, insts, &[s.client, s.server])?;
    match load {
        Load::RequestResponse => {
            let rr = run_peer(exe, client, cpu, &["rr", &to, &secs, &size])?;
            sample.transactions = f(&rr, "transactions")?;
            sample.tps = sample.transactions / f(&rr, "secs")?;
            sample.p50_us = f(&rr, "p50_ns")? / 1000.0;
            sample.p99_us = f(&rr, "p99_ns")? / 1000.0;
        }
        Load::Bulk => {
            let bulk = run_peer(exe, client, cpu, &["bulk", &to, &secs])?;
            sample.bytes = f(&bulk, "bytes")?;
            sample.gbps = sample.bytes * 8.0 / f(&bulk, "secs")? / 1e9;
        }
    }
    let after = counted(cells, insts, &[s.client, s.server])?;
    sample.counted += after.saturating_sub(before);
    Ok(())
}

fn peer_command(exe: &Path, inst: &Inst, cpu: Option<usize>, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", inst.netns.display()))
        .arg("--")
        .arg(exe)
        .args(["bench", "net-peer"])
        .args(args);
    // SAFETY: prctl and sched_setaffinity are async-signal-safe system
    // calls on the child itself; the CPU set is a zeroed local.
    unsafe {
        cmd.pre_exec(move || {
            // A peer never outlives this process, whatever ends it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(cpu) = cpu {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    cmd
}

/// Runs a client peer inside `inst`'s namespace; returns its JSON report.
fn run_peer(exe: &Path, inst: &Inst, cpu: Option<usize>, args: &[&str]) -> Result<Value> {
    let mut cmd = peer_command(exe, inst, cpu, args);
    let out = util::output(&mut cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("the peer's report: {out}"))
}

/// The server peers, killed (by pid) when dropped or on Ctrl-C.
struct Peers {
    children: Vec<Child>,
    hooks: Vec<u64>,
}

impl Peers {
    fn new() -> Self {
        Self {
            children: Vec::new(),
            hooks: Vec::new(),
        }
    }

    fn start_server(&mut self, exe: &Path, inst: &Inst, cpu: Option<usize>) -> Result<()> {
        let mut cmd = peer_command(exe, inst, cpu, &["server", &PORT.to_string()]);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("start `{}`", util::display(&cmd)))?;
        let pid = child.id();
        self.hooks.push(sandbox::register_hook(move || kill(pid)));
        let stdout = child.stdout.take();
        self.children.push(child);
        let mut line = String::new();
        if let Some(out) = stdout {
            BufReader::new(out)
                .read_line(&mut line)
                .context("read the server's first line")?;
        }
        if line.trim() != "ready" {
            bail!("the server in {} did not start (said {line:?})", inst.id);
        }
        Ok(())
    }
}

pub(crate) fn kill(pid: u32) {
    if let Ok(pid) = i32::try_from(pid) {
        // SAFETY: kill(2) on the pid of a child this process spawned.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for child in &mut self.children {
            kill(child.id());
            let _ = child.wait();
        }
        for key in self.hooks.drain(..) {
            sandbox::unregister_hook(key);
        }
    }
}

/// The nodes' shared network: a namespace with a bridge; the cells' node
/// namespaces hang off it by veths (which go with the node namespaces).
struct Fabric {
    netns: String,
    hook: u64,
}

pub(crate) fn del_netns(netns: &str) {
    if Path::new("/run/netns").join(netns).exists() {
        let _ = Command::new("ip").args(["netns", "del", netns]).status();
    }
}

impl Fabric {
    fn create() -> Result<Self> {
        let netns = format!("corral-bnet-fabric-{}", std::process::id());
        if Path::new("/run/netns").join(&netns).exists() {
            bail!("network namespace {netns} exists: remove it with `ip netns del {netns}`");
        }
        let hook = {
            let netns = netns.clone();
            sandbox::register_hook(move || del_netns(&netns))
        };
        let fabric = Fabric { netns, hook };
        let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
        let ns = fabric.netns.as_str();
        ip(&["netns", "add", ns])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
        Ok(fabric)
    }

    /// Connects a cell's node to the bridge as `10.99.0.<host>`.
    fn attach(&self, cell: &Sandbox, host: u8) -> Result<()> {
        let outer = format!("bn{}c{host}", std::process::id() % 100_000);
        let ip = |args: &[&str]| util::run(Command::new("ip").args(args));
        let ns = self.netns.as_str();
        ip(&[
            "-n",
            ns,
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
        ip(&["-n", ns, "link", "set", &outer, "master", "br0"])?;
        ip(&["-n", ns, "link", "set", &outer, "up"])?;
        ip(&[
            "-n",
            &cell.netns,
            "addr",
            "add",
            &format!("{FABRIC_PREFIX}.{host}/24"),
            "dev",
            "n0",
        ])?;
        ip(&["-n", &cell.netns, "link", "set", "n0", "up"])?;
        Ok(())
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        del_netns(&self.netns);
        sandbox::unregister_hook(self.hook);
    }
}

// ---------------------------------------------------------------------------
// the peer: `bench net-peer server PORT | rr ADDR:PORT SECS SIZE | bulk ADDR:PORT SECS`

/// The hidden `bench net-peer` mode, run inside an instance's namespace.
pub fn peer(args: &[String]) -> Result<()> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["server", port] => serve(port.parse().context("port")?),
        ["rr", to, secs, size] => {
            let report = request_response(
                to.parse().context("address")?,
                Duration::from_secs_f64(secs.parse().context("seconds")?),
                size.parse().context("size")?,
            )?;
            println!("{report}");
            Ok(())
        }
        ["bulk", to, secs] => {
            let report = bulk(
                to.parse().context("address")?,
                Duration::from_secs_f64(secs.parse().context("seconds")?),
            )?;
            println!("{report}");
            Ok(())
        }
        _ => bail!(
            "usage: bench net-peer server PORT | rr ADDR:PORT SECS SIZE | bulk ADDR:PORT SECS"
        ),
    }
}

const MODE_RR: u8 = b'r';
const MODE_BULK: u8 = b'b';
const BULK_BUF: usize = 256 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn serve(port: u16) -> Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    for conn in listener.incoming() {
        let conn = conn.context("accept")?;
        thread::spawn(move || {
            if let Err(e) = handle(conn) {
                eprintln!("net-peer server: {e:#}");
            }
        });
    }
    Ok(())
}

fn handle(mut conn: TcpStream) -> Result<()> {
    conn.set_nodelay(true)?;
    let mut mode = [0u8; 5];
    conn.read_exact(&mut mode)?;
    match mode[0] {
        MODE_RR => {
            let size = u32::from_le_bytes([mode[1], mode[2], mode[3], mode[4]]) as usize;
            let mut buf = vec![0u8; size];
            loop {
                match conn.read_exact(&mut buf) {
                    Ok(()) => conn.write_all(&buf)?,
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        MODE_BULK => {
            let mut buf = vec![0u8; BULK_BUF];
            let mut total: u64 = 0;
            loop {
                let n = conn.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            conn.write_all(&total.to_le_bytes())?;
            Ok(())
        }
        other => bail!("unknown mode {other}"),
    }
}

fn connect(to: SocketAddr) -> Result<TcpStream> {
    let conn =
        TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connect {to}"))?;
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(conn)
}

/// Ping-pong of `size`-byte messages for `secs`; one transaction is a
/// request and its echo.
fn request_response(to: SocketAddr, secs: Duration, size: usize) -> Result<Value> {
    let mut conn = connect(to)?;
    let mut hello = vec![MODE_RR];
    hello.extend_from_slice(&u32::try_from(size)?.to_le_bytes());
    conn.write_all(&hello)?;
    let mut buf = vec![0x5a; size];
    let mut lat: Vec<u64> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    loop {
        let t = Instant::now();
        if t.duration_since(start) >= secs {
            break;
        }
        conn.write_all(&buf)?;
        conn.read_exact(&mut buf)?;
        lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    let elapsed = start.elapsed().as_secs_f64();
    drop(conn);
    lat.sort_unstable();
    Ok(json!({
        "transactions": lat.len(),
        "secs": elapsed,
        "p50_ns": percentile(&lat, 50.0),
        "p99_ns": percentile(&lat, 99.0),
    }))
}

/// One stream for `secs`; the rate is what the receiver counted over the
/// time until it confirmed the end.
fn bulk(to: SocketAddr, secs: Duration) -> Result<Value> {
    let mut conn = connect(to)?;
    conn.write_all(&[MODE_BULK, 0, 0, 0, 0])?;
    let buf = vec![0x5a; BULK_BUF];
    let start = Instant::now();
    while start.elapsed() < secs {
        conn.write_all(&buf)?;
    }
    conn.shutdown(Shutdown::Write)?;
    let mut total = [0u8; 8];
    conn.read_exact(&mut total)?;
    Ok(json!({
        "bytes": u64::from_le_bytes(total),
        "secs": start.elapsed().as_secs_f64(),
    }))
}

/// Nearest rank, on sorted values.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// ---------------------------------------------------------------------------
// the report

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

pub(crate) fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub(crate) fn machine() -> String {
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
    let jit = fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|j| if j.trim() == "0" { "off" } else { "on" })
        .unwrap_or("unknown");
    format!("Kernel {kernel}, {cpus} CPUs ({cpu}), BPF JIT {jit}")
}

/// 1000000 → "1,000,000".
pub(crate) fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(crate) fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "**not met**"
    }
}

fn command_line(o: &Options) -> String {
    let mut cmd = "cargo xtask bench net".to_owned();
    if o.rounds != 15 {
        cmd.push_str(&format!(" --rounds {}", o.rounds));
    }
    if o.secs != 1.0 {
        cmd.push_str(&format!(" --secs {}", o.secs));
    }
    if o.size != 1 {
        cmd.push_str(&format!(" --size {}", o.size));
    }
    if o.repeat != 1_000_000 {
        cmd.push_str(&format!(" --repeat {}", o.repeat));
    }
    if o.trials != 5 {
        cmd.push_str(&format!(" --trials {}", o.trials));
    }
    if let Some((c, s)) = o.pin {
        cmd.push_str(&format!(" --pin {c},{s}"));
    }
    if !o.traffic {
        cmd.push_str(" --per-packet-only");
    }
    if !o.per_packet {
        cmd.push_str(" --traffic-only");
    }
    cmd
}

fn report_costs(o: &Options, costs: &[Cost]) -> String {
    let mut out = format!(
        "**Per packet** (`BPF_PROG_TEST_RUN`, {} repeats, median and minimum of {} runs \
         taken round-robin over the paths; maps: 1,003 endpoints of 52 tenants, 101 policies)\n\n\
         | program | path | frame | verdict | ns/packet | min |\n\
         |---|---|---:|---|---:|---:|\n",
        thousands(u64::from(o.repeat)),
        o.trials
    );
    for c in costs {
        let verdict = if c.verdict == TC_ACT_OK {
            "pass"
        } else {
            "drop"
        };
        out.push_str(&format!(
            "| `{}` | {} | {} B | {verdict} | {} | {} |\n",
            c.program,
            c.path,
            c.frame,
            c.median(),
            c.min()
        ));
    }
    let find = |program: &str, path: &str| {
        costs
            .iter()
            .find(|c| c.program == program && c.path == path)
            .map_or(0, Cost::median)
    };
    let from = find(Program::FromInstance.name(), SAME);
    let to = find(Program::ToInstance.name(), SAME);
    let floor = costs.last().map_or(0, Cost::median);
    let worst = costs.iter().map(Cost::median).max().unwrap_or(0);
    out.push_str(&format!(
        "\nSame-tenant path (the common packet): {from} ns in `corral_from_instance`, {to} ns in \
         `corral_to_instance`, {both} ns for a packet between two instances (it crosses both); \
         the harness alone (an empty program) takes {floor} ns of each figure. Slowest path: {worst} ns. \
         Anchor: {KATRAN}. Target ≤ {TARGET_NS:.0} ns per packet (same-tenant path, each program): {}.\n",
        met(from.max(to) as f64 <= TARGET_NS),
        both = from + to,
    ));
    out
}

fn report(
    o: &Options,
    costs: &[Cost],
    traffic: Option<&Traffic>,
    load_before: &str,
    load_after: &str,
) -> String {
    let date = util::output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|d| d.trim().to_owned())
        .unwrap_or_else(|_| "unknown date".to_owned());
    let mut out = format!(
        "## {date}: Network data plane (`{}`)\n\n\
         {}; load average {load_before} at the start, {load_after} at the end.\n\n",
        command_line(o),
        machine(),
    );
    if !costs.is_empty() {
        out.push_str(&report_costs(o, costs));
    }
    if let Some(t) = traffic {
        out.push_str(&report_traffic(o, t));
    }
    out
}

/// The median and the middle half (quartiles, nearest rank) of `v`.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
        v.get(rank - 1).copied().unwrap_or(f64::NAN)
    };
    (median(v.clone()), q(0.25), q(0.75))
}

fn report_traffic(o: &Options, t: &Traffic) -> String {
    let mut out = format!(
        "\n**Traffic between instances** (TCP, one connection; {rounds} rounds of {secs} s per load \
         and state, with and without the programs on the same veths (filters removed, clsact \
         qdisc kept), the two runs of a load back to back, order alternating{pin}. Figures are \
         medians; overhead is the median of the per-round ratios, with their middle half: how \
         far the machine's noise reaches. Negative: faster with the programs, i.e. noise.)\n\n\
         | path | load | with programs | without | overhead | middle half |\n\
         |---|---|---:|---:|---:|---:|\n",
        rounds = o.rounds,
        secs = o.secs,
        pin = o.pin.map_or_else(
            || "; peers not pinned".to_owned(),
            |(c, s)| format!("; client on CPU {c}, server on CPU {s}")
        ),
    );
    let mut worst = f64::NEG_INFINITY;
    for r in &t.results {
        let with = |f: fn(&Sample) -> f64| median(r.rounds.iter().map(|(w, _)| f(w)).collect());
        let without = |f: fn(&Sample) -> f64| median(r.rounds.iter().map(|(_, n)| f(n)).collect());
        // Rates: how much lower with the programs; latencies: how much longer.
        let rate = |f: fn(&Sample) -> f64| {
            spread(
                r.rounds
                    .iter()
                    .map(|(w, n)| (1.0 - f(w) / f(n)) * 100.0)
                    .collect(),
            )
        };
        let latency = |f: fn(&Sample) -> f64| {
            spread(
                r.rounds
                    .iter()
                    .map(|(w, n)| (f(w) / f(n) - 1.0) * 100.0)
                    .collect(),
            )
        };
        let row =
            |out: &mut String, load: &str, w: String, n: String, (m, q1, q3): (f64, f64, f64)| {
                out.push_str(&format!(
                    "| {} | {load} | {w} | {n} | {m:+.1} % | {q1:+.1} … {q3:+.1} % |\n",
                    r.name
                ));
            };
        let tps = rate(|s| s.tps);
        let gbps = rate(|s| s.gbps);
        worst = worst.max(tps.0).max(gbps.0);
        row(
            &mut out,
            &format!("request/response ({} B), transactions/s", o.size),
            format!("{:.0}", with(|s| s.tps)),
            format!("{:.0}", without(|s| s.tps)),
            tps,
        );
        row(
            &mut out,
            "request/response latency p50",
            format!("{:.1} µs", with(|s| s.p50_us)),
            format!("{:.1} µs", without(|s| s.p50_us)),
            latency(|s| s.p50_us),
        );
        row(
            &mut out,
            "request/response latency p99",
            format!("{:.1} µs", with(|s| s.p99_us)),
            format!("{:.1} µs", without(|s| s.p99_us)),
            latency(|s| s.p99_us),
        );
        row(
            &mut out,
            "bulk, one stream",
            format!("{:.2} Gbit/s", with(|s| s.gbps)),
            format!("{:.2} Gbit/s", without(|s| s.gbps)),
            gbps,
        );
    }
    out.push_str(&format!(
        "\nTarget ≤ {TARGET_OVERHEAD_PCT:.0} % throughput overhead (request/response rate and bulk): \
         {} (largest median: {worst:+.1} %).\n",
        met(worst <= TARGET_OVERHEAD_PCT)
    ));
    out.push_str(&format!(
        "\n**In the datapath**: one more {secs} s run of each load with the kernel's run-time \
         accounting on (`BPF_ENABLE_STATS`; not one of the runs compared above): what a program \
         run costs on real traffic, caches shared with the TCP stack and the peers (the \
         accounting's own two clock reads per run included), how many runs the load needs, and \
         the programs' time as a share of the run: a low-noise estimate of the overhead.\n\n\
         | path | load | `corral_from_instance` | `corral_to_instance` | program runs | programs' share |\n\
         |---|---|---:|---:|---:|---:|\n",
        secs = o.secs
    ));
    for p in &t.in_path {
        let (load, runs, share) = match p.load {
            Load::RequestResponse => (
                "request/response",
                format!("{:.1} per transaction", p.runs as f64 / p.work.max(1.0)),
                "of a transaction's time",
            ),
            Load::Bulk => (
                "bulk",
                format!("{:.1} per MB", p.runs as f64 / (p.work / 1e6).max(1e-9)),
                "of one CPU",
            ),
        };
        out.push_str(&format!(
            "| {} | {load} | {:.0} ns/run | {:.0} ns/run | {runs} | {:.1} % {share} |\n",
            p.scenario,
            p.from_ns,
            p.to_ns,
            p.share * 100.0
        ));
    }
    out
}

pub(crate) fn append(path: &Path, report: &str) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.write_all(format!("\n{report}").as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crafted_frames_have_valid_ipv4_checksums() {
        let f = tcp(
            Ipv4Addr::new(10, 244, 1, 2),
            40000,
            Ipv4Addr::new(10, 244, 1, 3),
            80,
            0,
        );
        assert_eq!(f.len(), 54);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!((folded & 0xffff) + (folded >> 16), 0xffff);
        assert_eq!(
            tcp(Ipv4Addr::LOCALHOST, 1, Ipv4Addr::LOCALHOST, 2, 1446).len(),
            1500
        );
    }

    #[test]
    fn medians_and_percentiles() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&[], 50.0), 0);
        let (m, q1, q3) = spread(vec![5.0, -1.0, 3.0, 9.0, 0.0, 4.0, 2.0, 7.0]);
        assert_eq!((m, q1, q3), (3.5, 0.0, 5.0));
        assert!(spread(Vec::new()).0.is_nan());
        assert_eq!(thousands(1_000_000), "1,000,000");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(12_345), "12,345");
    }

    #[test]
    fn options_default_and_parse() {
        let o = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (o.rounds, o.repeat, o.trials, o.size),
            (15, 1_000_000, 5, 1)
        );
        assert_eq!(command_line(&o), "cargo xtask bench net");
        let args: Vec<String> = ["--rounds", "3", "--secs", "1.5", "--no-record"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        let o = parse(&args).unwrap_or_else(|e| panic!("{e}"));
        assert!(!o.record);
        assert_eq!(
            command_line(&o),
            "cargo xtask bench net --rounds 3 --secs 1.5"
        );
        assert!(parse(&["--rounds".to_owned(), "0".to_owned()]).is_err());
        assert!(parse(&["--bogus".to_owned()]).is_err());
    }
}
