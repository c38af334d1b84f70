//! Builds `corral-init` (agent/init/corral-init.c), every instance's first
//! process, as a static executable in `$OUT_DIR/corral-init`; the agent
//! embeds it (`agent/src/init.rs`) and the shim runs it from memory, so it
//! may depend on nothing in the container's root filesystem.
//!
//! The compiler is `$CC`, or `cc` (which Rust's own linking needs anyway);
//! the static C library comes from libc6-dev. Only the `runtime` feature
//! (the daemon and its shim) needs it.

use std::path::PathBuf;
use std::process::Command;

const SOURCE: &str = "init/corral-init.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CC");
    if std::env::var_os("CARGO_FEATURE_RUNTIME").is_none() {
        return;
    }
    if let Err(e) = build() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(var("CARGO_MANIFEST_DIR")?);
    let out = PathBuf::from(var("OUT_DIR")?).join("corral-init");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let status = Command::new(&cc)
        .args([
            "-static",
            "-O2",
            "-s",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fno-asynchronous-unwind-tables",
            "-o",
        ])
        .arg(&out)
        .arg(manifest.join(SOURCE))
        .status()
        .map_err(|e| {
            format!("running {cc} to build corral-init: {e} (install gcc and libc6-dev: cargo xtask deps)")
        })?;
    if !status.success() {
        return Err(format!(
            "{cc} failed to build corral-init ({status}); a static build needs libc6-dev"
        ));
    }
    Ok(())
}

fn var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|e| format!("{name}: {e}"))
}
