//! `cargo xtask fuzz [SECONDS]`: runs every cargo-fuzz target for SECONDS
//! each (default 60), installing cargo-fuzz first when it is missing.
//! `cargo xtask test` runs them too, for [`SHORT_SECONDS`] each.
//!
//! Each target starts from its kept corpus (`<crate>/fuzz/corpus/<target>`,
//! not in git) and the seeds in git (`<crate>/fuzz/seeds/<target>`: valid
//! inputs to start from, and every input that once crashed it). A crash
//! is fixed in the real code and its input kept as a unit test next to
//! that code, and as a seed.
//!
//! cargo-fuzz needs nightly-only flags (`-Zsanitizer=address`); on a stable
//! toolchain `RUSTC_BOOTSTRAP=1` unlocks them, so no nightly is needed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo, fmt_duration, step, workspace_root};

const DEFAULT_SECONDS: u64 = 60;

/// Seconds per target in `cargo xtask test`: enough to run every seed and
/// a few hundred thousand new inputs, short enough for CI.
pub const SHORT_SECONDS: u64 = 10;

/// Crates with a `fuzz/` directory of cargo-fuzz targets. The agent's and
/// the brain's fuzz crates build them without their default features, so
/// the sanitizer build compiles only their pure parsers.
const FUZZED_CRATES: &[&str] = &["proto", "agent", "brain"];

pub fn run(args: &[String]) -> Result<()> {
    let seconds = parse_args(args)?;
    step("cargo-fuzz", ensure_cargo_fuzz)?;
    run_all(seconds)
}

/// Builds and runs every target for `seconds` each (cargo-fuzz must be
/// installed).
pub fn run_all(seconds: u64) -> Result<()> {
    let start = Instant::now();
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
                let fuzz_dir = dir.join("fuzz");
                let corpus = fuzz_dir.join("corpus").join(&target);
                std::fs::create_dir_all(&corpus)
                    .with_context(|| format!("creating {}", corpus.display()))?;
                let mut cmd = fuzz(&dir);
                cmd.args(["run", "--target-dir"])
                    .arg(target_dir())
                    .arg(&target)
                    .arg(&corpus);
                let seeds = fuzz_dir.join("seeds").join(&target);
                if seeds.is_dir() {
                    cmd.arg(&seeds);
                }
                cmd.arg("--")
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

/// One build directory for every fuzz crate: they share most of their
/// dependencies (libFuzzer itself, serde, toml, corral-proto), so a cold
/// build of all of them costs little more than one (73 s here, against
/// 4 min 23 s with a directory each).
fn target_dir() -> std::path::PathBuf {
    workspace_root().join("target/fuzz")
}

/// `cargo fuzz` in `dir`, on whatever toolchain runs us, with nightly
/// features unlocked.
fn fuzz(dir: &Path) -> Command {
    let mut cmd = cargo();
    // The sanitizer build goes to `target_dir()`, whatever target directory
    // the caller uses for the workspace.
    cmd.arg("fuzz")
        .current_dir(dir)
        .env("RUSTC_BOOTSTRAP", "1")
        .env_remove("CARGO_TARGET_DIR");
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

pub fn ensure_cargo_fuzz() -> Result<()> {
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
