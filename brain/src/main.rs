//! `corral-brain`: the brain node. `corral-brain --config FILE` runs it
//! (`--check` validates the configuration and certificates and changes
//! nothing); `corral-brain certs` makes the cluster CA and issues cell and
//! brain certificates.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use corral_brain::certs::{self, Validity, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS};
use corral_brain::config::Config;
use corral_brain::PeerIdentity;
use corral_proto::wire::BrainId;
use corral_proto::CellId;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

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
            ExitCode::FAILURE
        }
    }
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
    let config = Config::load(path, &hostname())?;
    if check {
        let creds = corral_brain::tls::Credentials::from_files(
            &config.tls.ca,
            &config.tls.cert,
            &config.tls.key,
        )?;
        let me = PeerIdentity::Brain(config.brain_id.clone());
        if creds.identity() != &me {
            bail!(
                "{} is a certificate for {}, not for {me}",
                config.tls.cert.display(),
                creds.identity()
            );
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
        corral_brain::run::run(config, |_| {}, shutdown_signal()).await?;
        Ok(())
    })
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
