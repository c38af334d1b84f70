//! `corral-brain`: the brain node. `corral-brain --config FILE` runs it
//! (`--check` validates the configuration and certificates and changes
//! nothing); `corral-brain certs` makes the cluster CA and issues cell and
//! brain certificates.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage or a configuration that
//! cannot work (the file, its certificates, the unit's settings).

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use corral_brain::certs::{self, Validity, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS};
use corral_brain::config::Config;
use corral_brain::PeerIdentity;
use corral_proto::wire::BrainId;
use corral_proto::CellId;
use corral_systemd::notify::{self, Notifier, State};
use corral_systemd::{probe, Check, Progress};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// mimalloc rather than glibc's malloc: the loop allocates and frees many
/// small keys and messages; in `cargo xtask bench auction --quic` glibc's
/// malloc, free and page clearing took ~30 % of the loop thread, and
/// mimalloc cut the loop's CPU per 100,000 placements from 4.3 s to 3.3 s
/// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The shortest `WatchdogSec=` accepted: keep-alives go every half period,
/// each after a health check that may take a quarter period (1 s here).
const MIN_WATCHDOG: Duration = Duration::from_secs(4);

/// The brain's loop converges at least every sweep (5 s) even when idle,
/// and at most every 10 × the last pass's duration when loaded: a pass
/// counter that has not moved for this long means the loop is stuck.
const LOOP_STALL: Duration = Duration::from_secs(60);

/// The counter the watchdog follows.
const CONVERGENCE_RUNS: &str = "corral_brain_convergence_runs_total";

#[derive(Parser)]
#[command(
    name = "corral-brain",
    version,
    about = "corral brain node",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Runs the brain with this configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validates the configuration and certificates, then exits.
    #[arg(long, requires = "config")]
    check: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// The cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Makes a new cluster CA: DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    Init {
        #[command(flatten)]
        common: Common,
        /// Days the CA is valid.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
    /// Issues a cell or brain certificate signed by the CA in DIR:
    /// DIR/cell-<id>.pem + DIR/cell-<id>-key.pem (or brain-<name>...).
    Issue {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        who: Who,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = DEFAULT_LEAF_DAYS, value_parser = clap::value_parser!(u32).range(1..=36_500))]
        days: u32,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct Who {
    /// A certificate for this cell.
    #[arg(long)]
    cell: Option<String>,
    /// A certificate for this brain.
    #[arg(long)]
    brain: Option<String>,
}

#[derive(Args)]
struct Common {
    /// The certificate directory.
    #[arg(long)]
    dir: PathBuf,
    /// Replace existing files.
    #[arg(long)]
    force: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.cmd.is_none() && cli.config.is_none() {
        eprintln!(
            "corral-brain: give --config FILE to run the brain, or a subcommand (see --help)"
        );
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Our errors carry their causes in their messages already.
            eprintln!("corral-brain: {e}");
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A configuration (the file, its certificates, or the unit's settings)
/// that cannot work: exit code 2, which the systemd unit does not restart
/// (`RestartPreventExitStatus=2`), as for the agent.
#[derive(Debug)]
struct BadConfig(anyhow::Error);

impl std::fmt::Display for BadConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BadConfig {}

fn bad_config(e: impl Into<anyhow::Error>) -> anyhow::Error {
    anyhow::Error::new(BadConfig(e.into()))
}

fn run(cli: Cli) -> Result<()> {
    match (cli.cmd, cli.config) {
        (Some(Cmd::Certs { cmd }), _) => certs_cmd(cmd),
        (None, Some(path)) => run_brain(&path, cli.check),
        (None, None) => bail!("give --config FILE to run the brain, or a subcommand (see --help)"),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "brain".to_owned())
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("CORRAL_LOG_FORMAT").is_ok_and(|v| v == "json");
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn run_brain(path: &Path, check: bool) -> Result<()> {
    // Read (and removed from the environment) while single-threaded; a
    // unit that asks for something impossible stops the start here.
    let notifier = Notifier::take_from_env("corral-brain", MIN_WATCHDOG).map_err(bad_config)?;
    let config = Config::load(path, &hostname()).map_err(bad_config)?;
    if check {
        let creds = corral_brain::tls::Credentials::from_files(
            &config.tls.ca,
            &config.tls.cert,
            &config.tls.key,
        )
        .map_err(bad_config)?;
        let me = PeerIdentity::Brain(config.brain_id.clone());
        if creds.identity() != &me {
            return Err(bad_config(anyhow::anyhow!(
                "{} is a certificate for {}, not for {me}",
                config.tls.cert.display(),
                creds.identity()
            )));
        }
        println!(
            "{}: configuration and certificates are valid",
            path.display()
        );
        return Ok(());
    }
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let sd = notifier.clone();
        let ready = move |bound: corral_brain::run::Bound| {
            let api = bound
                .api
                .map_or_else(|| "off".to_owned(), |a| a.to_string());
            notify::send(
                sd.as_ref(),
                &[
                    State::Ready,
                    State::Status(format!("ready: cells on {}, API on {api}", bound.quic)),
                ],
            );
            if let Some(n) = sd {
                tokio::spawn(corral_systemd::watchdog::run(n, health(bound.api)));
            }
        };
        let shutdown = async {
            shutdown_signal().await;
            notify::send(
                notifier.as_ref(),
                &[State::Stopping, State::Status("stopping".into())],
            );
        };
        corral_brain::run::run(config, ready, shutdown).await?;
        Ok(())
    })
}

/// The brain's health for systemd's watchdog: its API answers `/metrics`,
/// and the loop's convergence counter keeps moving (the loop sweeps every
/// 5 s even when idle). Without an API only the runtime's liveness is
/// proved: this task runs.
fn health(
    api: Option<SocketAddr>,
) -> impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = Check> + Send>> {
    let progress = Arc::new(Mutex::new(Progress::new(
        "the brain's convergence loop",
        LOOP_STALL,
    )));
    move || {
        let progress = progress.clone();
        Box::pin(async move {
            let Some(addr) = api else {
                return Ok(());
            };
            let addr = loopback_for(addr);
            let stream = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| format!("the API on {addr}: {e}"))?;
            let r = probe::get(stream, "/metrics")
                .await
                .map_err(|e| format!("the API on {addr}: {e}"))?;
            if r.status != 200 {
                return Err(format!(
                    "the API on {addr} answered /metrics with {}",
                    r.status
                ));
            }
            let runs = probe::sample(&r.body, CONVERGENCE_RUNS)
                .ok_or_else(|| format!("/metrics has no {CONVERGENCE_RUNS}"))?;
            let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
            p.observe(runs as u64, Instant::now())
        })
    }
}

/// Where to reach a listener bound to `addr` from this host.
fn loopback_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn certs_cmd(cmd: CertsCmd) -> Result<()> {
    let now = SystemTime::now();
    match cmd {
        CertsCmd::Init { common, days } => {
            let written = certs::init(&common.dir, Validity::days_from(now, days), common.force)?;
            report("cluster CA", &written, days);
            println!(
                "keep {} secret: it signs every node's certificate",
                common.dir.join(certs::CA_KEY_FILE).display()
            );
        }
        CertsCmd::Issue { common, who, days } => {
            let who = match (who.cell, who.brain) {
                (Some(cell), None) => PeerIdentity::Cell(CellId::new(cell)?),
                (None, Some(brain)) => PeerIdentity::Brain(BrainId::new(brain)?),
                // clap enforces exactly one.
                _ => bail!("give exactly one of --cell and --brain"),
            };
            let written = certs::issue(
                &common.dir,
                &who,
                Validity::days_from(now, days),
                common.force,
            )?;
            report(&format!("{who} ({})", who.uri()), &written, days);
        }
    }
    Ok(())
}

fn report(what: &str, written: &[PathBuf], days: u32) {
    println!("{what}: valid for {days} days");
    for path in written {
        println!("  wrote {}", Path::new(path).display());
    }
}
