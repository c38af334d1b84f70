//! `corral-brain`: the brain node. For now only `certs` works: it makes the
//! cluster CA and issues cell and brain certificates. Running the brain
//! itself is not implemented yet, and says so.
//!
//! Exit codes: 0 success, 1 failure, 2 bad usage.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use corral_brain::certs::{self, Validity, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS};
use corral_brain::PeerIdentity;
use corral_proto::wire::BrainId;
use corral_proto::CellId;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

#[derive(Parser)]
#[command(name = "corral-brain", version, about = "corral brain node")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The cluster CA and node certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Runs the brain (not implemented yet).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
        args: Vec<String>,
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
    match cli.cmd {
        Cmd::Certs { cmd } => certs_cmd(cmd),
        Cmd::Run { .. } => bail!(
            "running the brain is not implemented yet: this version only has `corral-brain certs`"
        ),
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
