//! Small helpers shared by the subcommands.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `cargo`, the same one that runs us when invoked through `cargo xtask`.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio and fails if it does not exit 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd`, capturing its output; fails with its stderr if it does not exit 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{shown}`"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command line as a person would type it, for messages: programs by name
/// (`cargo`, not the toolchain path `$CARGO` points to).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(program.as_os_str());
    let mut parts = vec![name.to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(arg: &OsStr) -> String {
    let s = arg.to_string_lossy();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@".contains(c))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Prints `==> title`, runs `f`, and prints how long it took.
pub fn step<T>(title: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    println!("\n==> {title}");
    let start = Instant::now();
    let result = f();
    let took = fmt_duration(start.elapsed());
    match &result {
        Ok(_) => println!("    {title}: ok ({took})"),
        Err(_) => println!("    {title}: FAILED ({took})"),
    }
    result
}

pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{:.0} ms", secs * 1000.0)
    } else if secs < 120.0 {
        format!("{secs:.1} s")
    } else {
        format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

/// Builds release binaries with `cargo build --release BUILD...` and then
/// becomes the release xtask running `xtask ARGS...`: for benchmarks, whose
/// own speed is part of every figure. Returns only if the exec failed.
#[cfg(feature = "ebpf")]
pub fn become_release_xtask(build: &[&str], args: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    step("building (release)", || {
        run(cargo().args(["build", "--release"]).args(build))
    })?;
    let release = target_dir().join("release/xtask");
    let err = Command::new(&release).args(args).exec();
    Err(err).with_context(|| format!("run {}", release.display()))
}

/// `$CARGO_TARGET_DIR` (as cargo resolves it from the workspace root) or
/// the workspace's `target`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}
