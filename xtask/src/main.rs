//! `cargo xtask`: the project's developer tasks.
//!
//! Everything here shells out to the same tools a person would use (cargo,
//! apt-get, ip, runc) and prints what it does, so a failing step can be
//! re-run by hand.

mod bench;
mod bench_auction;
mod bench_cluster;
#[cfg(feature = "ebpf")]
mod bench_lb;
#[cfg(feature = "ebpf")]
mod bench_net;
mod bench_scrape;
#[cfg(test)]
mod dashboard;
mod demo;
mod demo_cluster;
mod deps;
mod dist;
mod fuzz;
mod http;
mod rootfs;
mod sandbox;
mod test;
mod util;

use std::process::ExitCode;

const USAGE: &str = "\
usage: cargo xtask <command> [args]

commands:
  deps                 install the Debian packages the build and tests need (root)
  rootfs               build the busybox test rootfs under target/rootfs/busybox
  test [--unit] [ARGS] fmt, clippy, build, unit tests, then the privileged
                       end-to-end tests as root (ARGS go to that last cargo test,
                       e.g. a test name filter); --unit stops before them
  demo                 run a cell agent in a throw-away network namespace and
                       show what it does (root)
  bench start          benchmark instance start latency against runc and
                       measure memory; appends to docs/benchmarks.md (root)
  bench scrape         time GET /metrics and the instance API (list, one) of
                       a cell running 250 instances, and the agent's memory
                       and CPU with them; appends to docs/benchmarks.md (root)
  bench auction [OPTS] the brain's auction core in process: 100,000 instances
                       on 1,000 simulated cells (--cells --instances --batch
                       --seed --starting-weight --app-penalty --memory-weight
                       --no-round-share --no-reference --trace; --half: the
                       --quic run's memory sizes, asking for half the cells'
                       memory)
  bench auction --quic [OPTS]
                       the auction end to end: the release corral-brain, a
                       load generator holding 1,000 simulated cells over real
                       QUIC, 100,000 instances pushed through the API
                       (--cells --instances --seed --clients --start-delay-ms
                       --timeout --keep; `--quic --help` explains; smoke test:
                       --quic --cells 50 --instances 2000)
  bench net [OPTS]     the eBPF data plane's cost: ns/packet of each TC program
                       path (BPF_PROG_TEST_RUN), and TCP request/response and
                       bulk between instances on one cell and on two, with vs
                       without the programs; appends to docs/benchmarks.md
                       (root; `bench net --help` lists the options)
  bench lb [OPTS]      east-west service load balancing: new connections/s and
                       connect+request latency through a VIP with 10, 1,000
                       and 10,000 services, against direct, kube-proxy-style
                       iptables DNAT (and IPVS if the kernel has it); time to
                       program the services and to change one; appends to
                       docs/benchmarks.md (root; `bench lb --help`)
  dist [--debug]       build the .deb (release build): binaries, systemd units
                       (checked with systemd-analyze verify), default configs,
                       state directories; target/corral_<version>_<arch>.deb
  fuzz [SECONDS]       run every cargo-fuzz target SECONDS each (default 60);
                       installs cargo-fuzz if missing, works on stable
  help                 print this message

environment:
  CORRAL_AGENT_BIN     agent binary for demo and bench, used as it is (default:
                       build the workspace, use target/{debug,release}/corral-agent)";

/// The benchmarks built on `corral-ebpf`, in an xtask built with them.
#[cfg(feature = "ebpf")]
fn ebpf_bench(sub: &str, rest: &[String]) -> anyhow::Result<()> {
    match sub {
        "net" => bench_net::run(rest),
        "lb" => bench_lb::run(rest),
        // Hidden: the load `bench lb` runs inside its namespaces.
        "lb-peer" => bench_lb::peer(rest),
        // Hidden: the load `bench net` runs inside instances' namespaces.
        _ => bench_net::peer(rest),
    }
}

/// Without them: install what corral-ebpf's build needs (clang), then run
/// the same command in an xtask built with the `ebpf` feature.
#[cfg(not(feature = "ebpf"))]
fn ebpf_bench(sub: &str, rest: &[String]) -> anyhow::Result<()> {
    deps::run()?;
    util::run(
        util::cargo()
            .args([
                "run",
                "--quiet",
                "--package",
                "xtask",
                "--features",
                "ebpf",
                "--",
            ])
            .args(["bench", sub])
            .args(rest),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = match (cmd.as_str(), rest) {
        ("deps", []) => deps::run(),
        ("rootfs", []) => rootfs::run(),
        ("test", rest) => test::run(rest),
        ("demo", []) => demo::run(),
        ("bench", [sub]) if sub == "start" => bench::run(),
        ("bench", [sub]) if sub == "scrape" => bench_scrape::run(),
        // Hidden: the load generator `bench auction --quic` starts.
        ("bench", [sub, rest @ ..]) if sub == "auction-loadgen" => bench_cluster::loadgen(rest),
        // Placement speed means nothing in a debug build: re-run in release.
        ("bench", [sub, rest @ ..]) if sub == "auction" && cfg!(debug_assertions) => util::run(
            util::cargo()
                .args([
                    "run",
                    "--release",
                    "--quiet",
                    "--package",
                    "xtask",
                    "--",
                    "bench",
                    "auction",
                ])
                .args(rest),
        ),
        ("bench", [sub, rest @ ..]) if sub == "auction" => {
            if rest.iter().any(|a| a == "--quic") {
                let rest: Vec<String> = rest.iter().filter(|a| *a != "--quic").cloned().collect();
                bench_cluster::run(&rest)
            } else {
                bench_auction::run(rest)
            }
        }
        ("bench", [sub, rest @ ..])
            if ["net", "net-peer", "lb", "lb-peer"].contains(&sub.as_str()) =>
        {
            ebpf_bench(sub, rest)
        }
        ("fuzz", rest) => fuzz::run(rest),
        ("dist", rest) => dist::run(rest),
        ("help" | "-h" | "--help", _) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("unknown command: {}\n\n{USAGE}", args.join(" "));
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The signal handler is cleaning up and will exit with 130 itself;
        // an error seen here is only the consequence of that.
        Err(_) if sandbox::interrupted() => sandbox::wait_for_interrupt_exit(),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
