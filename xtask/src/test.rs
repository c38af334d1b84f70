//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::util::{self, cargo, fmt_duration, is_root, step, workspace_root};
use crate::{deps, dist, fuzz, rootfs};

pub fn run(args: &[String]) -> Result<()> {
    let (unit_only, extra) = parse_args(args);
    if !unit_only && !is_root() {
        // Checked up front rather than after ten minutes of unit steps.
        bail!(
            "the privileged end-to-end tests need root: run `sudo cargo xtask test`, \
             or `cargo xtask test --unit` for everything else"
        );
    }
    let start = Instant::now();
    step("deps", deps::run)?;
    step("fmt", || {
        util::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    step("clippy", || {
        util::run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    step("build", || {
        util::run(cargo().args(["build", "--workspace", "--bins"]))
    })?;
    // The privileged `tests` crate runs last, as root, one test at a time.
    step("unit tests", || {
        util::run(cargo().args([
            "test",
            "--workspace",
            "--all-features",
            "--exclude",
            "corral-tests",
        ]))
    })?;
    // Short: every seed and a few hundred thousand new inputs per target;
    // `cargo xtask fuzz` runs longer.
    step("cargo-fuzz", fuzz::ensure_cargo_fuzz)?;
    step("fuzz (short)", || fuzz::run_all(fuzz::SHORT_SECONDS))?;
    let rootfs = step("rootfs", rootfs::ensure)?;
    // The package of the debug build: its units are verified here, its
    // contents and installation by the privileged `dist` tests.
    let deb = step("dist (debug .deb)", || dist::package("debug"))?;
    if unit_only {
        println!("\n--unit: skipped the privileged end-to-end tests");
    } else {
        let target = util::target_dir().join("debug");
        let tests_dir = workspace_root().join("tests/tests");
        let (file, extra) = test_file(extra, |name| tests_dir.join(format!("{name}.rs")).is_file());
        step("privileged end-to-end tests", || {
            let mut cmd = cargo();
            cmd.args(["test", "-p", "corral-tests"]);
            if let Some(file) = file {
                cmd.args(["--test", file]);
            }
            util::run(
                cmd.args(["--", "--test-threads=1"])
                    .args(extra)
                    .env("CORRAL_AGENT_BIN", target.join("corral-agent"))
                    .env("CORRAL_CLI_BIN", target.join("corral"))
                    .env("CORRAL_TEST_ROOTFS", &rootfs)
                    .env("CORRAL_DEB", &deb),
            )
        })?;
    }
    println!("\nall steps passed ({})", fmt_duration(start.elapsed()));
    Ok(())
}

/// A leading `--unit`; everything else goes to the privileged
/// test run (a leading `--` is accepted and dropped).
fn parse_args(args: &[String]) -> (bool, &[String]) {
    match args.split_first() {
        Some((first, rest)) if first == "--unit" => {
            let (_, extra) = parse_args(rest);
            (true, extra)
        }
        Some((first, rest)) if first == "--" => (false, rest),
        _ => (false, args),
    }
}

/// A first argument that names a file of `tests/tests` (`network` for
/// `network.rs`) selects that file; anything else filters test names. A
/// `--` right after the file is dropped (`test scale -- --nocapture`):
/// passed on, it would make libtest take `--nocapture` for a name filter
/// and run nothing.
fn test_file(extra: &[String], is_file: impl Fn(&str) -> bool) -> (Option<&str>, &[String]) {
    match extra.split_first() {
        Some((first, rest)) if !first.starts_with('-') && is_file(first) => {
            let rest = match rest.split_first() {
                Some((dashes, after)) if dashes == "--" => after,
                _ => rest,
            };
            (Some(first), rest)
        }
        _ => (None, extra),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn splits_unit_flag_from_test_args() {
        let a = strings(&["--unit"]);
        assert_eq!(parse_args(&a), (true, &[][..]));
        let a = strings(&["netns", "--nocapture"]);
        assert_eq!(parse_args(&a), (false, &a[..]));
        let a = strings(&["--", "--unit"]);
        assert_eq!(parse_args(&a), (false, &a[1..]));
        let a = strings(&["--unit", "--", "x"]);
        assert_eq!(parse_args(&a), (true, &a[2..]));
    }

    #[test]
    fn a_file_name_selects_the_file_and_anything_else_filters() {
        let files = |n: &str| ["network", "ebpf"].contains(&n);
        let a = strings(&["network", "--nocapture"]);
        assert_eq!(test_file(&a, files), (Some("network"), &a[1..]));
        let a = strings(&["network", "--", "--nocapture"]);
        assert_eq!(test_file(&a, files), (Some("network"), &a[2..]));
        let a = strings(&["spoof"]);
        assert_eq!(test_file(&a, files), (None, &a[..]));
        let a = strings(&["--nocapture", "ebpf"]);
        assert_eq!(test_file(&a, files), (None, &a[..]));
        assert_eq!(test_file(&[], files), (None, &[][..]));
    }
}
