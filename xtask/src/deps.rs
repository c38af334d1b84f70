//! `cargo xtask deps`: the Debian packages the build, tests, demo and
//! benchmarks need.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{self, is_root};

/// clang + libbpf for the eBPF programs, libseccomp + pkg-config for
/// libcontainer, busybox for the test rootfs, iproute2 for network
/// namespaces, runc as the benchmark peer, bpftool for inspecting maps,
/// e2fsprogs (mkfs.ext4) and util-linux (mount, nsenter, unshare) for
/// instance disks and test nodes; both are essential on Debian but named here.
/// `cargo xtask dist` and its tests: systemd (systemd-analyze verify),
/// binutils (strip); prometheus for promtool (`promtool check metrics`).
/// `cargo xtask bench lb` compares with iptables (kube-proxy's DNAT chains,
/// loaded by `iptables-restore`) and IPVS (`ipvsadm`). gcc and libc6-dev
/// (the static C library) build `corral-init` (agent/build.rs); Rust's own
/// linking needs both too, so they are there before this runs.
const PACKAGES: &[&str] = &[
    "gcc",
    "libc6-dev",
    "clang-19",
    "libbpf-dev",
    "libseccomp-dev",
    "pkg-config",
    "busybox-static",
    "iproute2",
    "runc",
    "bpftool",
    "e2fsprogs",
    "util-linux",
    "systemd",
    "binutils",
    "prometheus",
    "iptables",
    "ipvsadm",
];

pub fn run() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        println!("all {} required packages are installed", PACKAGES.len());
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "missing packages {list}: run `cargo xtask deps` as root or `apt-get install {list}`"
        );
    }
    println!("installing missing packages: {list}");
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    // Only promtool is wanted from the prometheus package; its server is
    // enabled (and, under systemd, started) by the package. Put it back
    // off when this run installed it.
    if missing.contains(&"prometheus") && Path::new("/run/systemd/system").exists() {
        let off = Command::new("systemctl")
            .args(["disable", "--now", "prometheus.service"])
            .status();
        if !matches!(off, Ok(s) if s.success()) {
            println!("note: could not disable prometheus.service (only promtool is needed)");
        }
    }
    let still: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
    if !still.is_empty() {
        bail!(
            "apt-get reported success but these packages are still not installed: {}",
            still.join(" ")
        );
    }
    Ok(())
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|out| {
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).trim() == "install ok installed"
        })
}
