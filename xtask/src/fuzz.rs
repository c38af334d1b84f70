//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target for SECONDS
//! each (default 60), installing cargo-fuzz first when it is missing.
//!
//! cargo-fuzz needs nightly-only flags (`-Zsanitizer=address`); on a stable
//! toolchain `RUSTC_BOOTSTRAP=1` unlocks them, so no nightly is needed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo, fmt_duration, step, workspace_root};

const DEFAULT_SECONDS: u64 = 60;

/// Crates with a `fuzz/` directory of cargo-fuzz targets.
const FUZZED_CRATES: &[&str] = &["proto"];

pub fn run(args: &[String]) -> Result<()> {
    let seconds = parse_args(args)?;
    let start = Instant::now();
    step("cargo-fuzz", ensure_cargo_fuzz)?;
    let mut ran = 0;
    for krate in FUZZED_CRATES {
        let dir = workspace_root().join(krate);
        let targets = list_targets(&dir)?;
        if targets.is_empty() {
            bail!("no fuzz targets in {}/fuzz", dir.display());
        }
        for target in targets {
            let title = format!("fuzz {krate}/{target} for {seconds} s");
            step(&title, || {
                let mut cmd = fuzz(&dir);
                cmd.args(["run", &target, "--"])
                    .arg(format!("-max_total_time={seconds}"))
                    // Report any single allocation far above the largest
                    // legitimate one (a frame) instead of letting a lying
                    // length prefix go unnoticed.
                    .arg("-malloc_limit_mb=16")
                    .arg("-print_final_stats=1");
                println!(
                    "    (cd {} && RUSTC_BOOTSTRAP=1 {})",
                    dir.display(),
                    util::display(&cmd)
                );
                util::run(&mut cmd)
            })?;
            ran += 1;
        }
    }
    println!(
        "\n{ran} fuzz target(s) ran {seconds} s each without finding a crash ({}); \
         corpora are kept under <crate>/fuzz/corpus",
        fmt_duration(start.elapsed())
    );
    Ok(())
}

fn parse_args(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(DEFAULT_SECONDS),
        [s] => match s.parse::<u64>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("fuzz: SECONDS must be a positive whole number, not {s:?}"),
        },
        _ => bail!("fuzz takes at most one argument, SECONDS"),
    }
}

/// `cargo fuzz` in `dir`, on whatever toolchain runs us, with nightly
/// features unlocked.
fn fuzz(dir: &Path) -> Command {
    let mut cmd = cargo();
    cmd.arg("fuzz").current_dir(dir).env("RUSTC_BOOTSTRAP", "1");
    cmd
}

fn have_cargo_fuzz() -> bool {
    cargo()
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_cargo_fuzz() -> Result<()> {
    if have_cargo_fuzz() {
        println!("    cargo-fuzz is installed");
        return Ok(());
    }
    println!("    cargo-fuzz is missing: installing it from crates.io");
    util::run(cargo().args(["install", "--locked", "cargo-fuzz"]))?;
    if !have_cargo_fuzz() {
        bail!("`cargo install cargo-fuzz` succeeded but `cargo fuzz` still does not run: is ~/.cargo/bin on PATH?");
    }
    Ok(())
}

fn list_targets(dir: &Path) -> Result<Vec<String>> {
    let out = util::output(fuzz(dir).arg("list"))
        .with_context(|| format!("listing the fuzz targets of {}", dir.display()))?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_argument() {
        assert_eq!(parse_args(&[]).unwrap(), DEFAULT_SECONDS);
        assert_eq!(parse_args(&["20".into()]).unwrap(), 20);
        assert!(parse_args(&["0".into()]).is_err());
        assert!(parse_args(&["-5".into()]).is_err());
        assert!(parse_args(&["1".into(), "2".into()]).is_err());
    }
}
