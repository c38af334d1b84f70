//! `cargo xtask dist`: the `.deb` that installs corral on a node.
//!
//! Built with `dpkg-deb --build` from a staging tree under `target/dist/`
//! (no debhelper: the package is three binaries, two units, configs and
//! directories). The units are checked with `systemd-analyze verify`
//! against the staged tree before the package is written; any diagnostic
//! fails the build, since systemd ignores a bad setting with a warning and
//! starts the unit anyway.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo, workspace_root};

/// The binaries installed in /usr/bin, and the packages that build them.
const BINARIES: &[(&str, &str)] = &[
    ("corral-agent", "corral-agent"),
    ("corral-brain", "corral-brain"),
    ("corral", "corral-cli"),
];

/// The units, from `dist/systemd/`.
pub const UNITS: &[&str] = &["corral-agent.service", "corral-brain.service"];

/// What the package holds besides the binaries: (source under the
/// workspace, path on the node, mode).
const FILES: &[(&str, &str, u32)] = &[
    (
        "dist/systemd/corral-agent.service",
        "usr/lib/systemd/system/corral-agent.service",
        0o644,
    ),
    (
        "dist/systemd/corral-brain.service",
        "usr/lib/systemd/system/corral-brain.service",
        0o644,
    ),
    (
        "dist/tmpfiles.conf",
        "usr/lib/tmpfiles.d/corral.conf",
        0o644,
    ),
    ("dist/etc/agent.toml", "etc/corral/agent.toml", 0o644),
    // The brain's config holds a secret: postinst writes it from this.
    ("dist/etc/brain.toml", "usr/share/corral/brain.toml", 0o644),
    ("README.md", "usr/share/doc/corral/README.md", 0o644),
    ("docs/systemd.md", "usr/share/doc/corral/systemd.md", 0o644),
    ("docs/metrics.md", "usr/share/doc/corral/metrics.md", 0o644),
    (
        "docs/grafana/corral.json",
        "usr/share/doc/corral/grafana/corral.json",
        0o644,
    ),
    ("dist/debian/postinst", "DEBIAN/postinst", 0o755),
    ("dist/debian/postrm", "DEBIAN/postrm", 0o755),
];

/// Directories the package owns: (path, mode).
const DIRS: &[(&str, u32)] = &[("etc/corral/certs", 0o755), ("var/lib/corral", 0o711)];

/// Runtime dependencies: glibc, libgcc (unwinding), libseccomp (libcontainer),
/// e2fsprogs (mkfs.ext4 for instance disks), util-linux (losetup, mount),
/// passwd (the brain's user, made by postinst). Not systemd: the units are
/// for hosts that run it, the daemons run without it.
const DEPENDS: &str = "libc6 (>= 2.36), libgcc-s1, libseccomp2, e2fsprogs, util-linux, passwd";

pub fn run(args: &[String]) -> Result<()> {
    let debug = match args {
        [] => false,
        [a] if a == "--debug" => true,
        _ => bail!("usage: cargo xtask dist [--debug]"),
    };
    let profile = if debug { "debug" } else { "release" };
    let mut build = cargo();
    build.args(["build", "--bins"]);
    if debug {
        // The same build as `cargo xtask test` (same feature set), so the
        // binaries are not rebuilt between the two.
        build.arg("--workspace");
    } else {
        for (_, package) in BINARIES {
            build.args(["--package", package]);
        }
        build.arg("--release");
    }
    util::run(&mut build)?;
    let deb = package(profile)?;
    println!(
        "{}",
        util::output(Command::new("dpkg-deb").arg("--contents").arg(&deb))?
    );
    println!("built {}", deb.display());
    Ok(())
}

/// Stages and builds the package from `target/<profile>` (the target
/// directory cargo uses: `$CARGO_TARGET_DIR` when set); returns its path
/// (`target/corral_<version>_<arch>.deb`, `-debug` added for a debug build).
pub fn package(profile: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let target = util::target_dir();
    let version = env!("CARGO_PKG_VERSION");
    let arch = util::output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_owned();
    let stage = target.join("dist").join(profile).join("corral");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for (bin, _) in BINARIES {
        let from = target.join(profile).join(bin);
        let to = stage.join("usr/bin").join(bin);
        install(&from, &to, 0o755)?;
        // Debug info stays in target/ (the release profile keeps line
        // tables for backtraces there); the node gets lean binaries.
        util::run(Command::new("strip").arg("--strip-debug").arg(&to))?;
    }
    for (from, to, mode) in FILES {
        install(&root.join(from), &stage.join(to), *mode)?;
    }
    // Shell completion scripts, made by the packaged CLI itself.
    let cli = stage.join("usr/bin/corral");
    for (shell, to) in [
        ("bash", "usr/share/bash-completion/completions/corral"),
        ("zsh", "usr/share/zsh/vendor-completions/_corral"),
        ("fish", "usr/share/fish/vendor_completions.d/corral.fish"),
    ] {
        let script = util::output(Command::new(&cli).args(["completions", shell]))?;
        write(&stage.join(to), &script, 0o644)?;
    }
    for (dir, mode) in DIRS {
        let d = stage.join(dir);
        fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        set_mode(&d, *mode)?;
    }
    write(
        &stage.join("DEBIAN/conffiles"),
        "/etc/corral/agent.toml\n",
        0o644,
    )?;
    let size_kib = du_kib(&stage)?;
    write(
        &stage.join("DEBIAN/control"),
        &control(version, &arch, size_kib),
        0o644,
    )?;
    verify_units(&stage, &target.join("dist").join(profile).join("verify"))?;
    let suffix = if profile == "release" { "" } else { "-debug" };
    let deb = target.join(format!("corral_{version}_{arch}{suffix}.deb"));
    // xz for what ships; gzip keeps the test build quick.
    let compress = if profile == "release" {
        "-Zxz"
    } else {
        "-Zgzip"
    };
    util::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", compress, "--build"])
            .arg(&stage)
            .arg(&deb),
    )?;
    Ok(deb)
}

/// The package's control file (pure).
pub fn control(version: &str, arch: &str, size_kib: u64) -> String {
    format!(
        "Package: corral\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: corral developers <corral@localhost>\n\
         Installed-Size: {size_kib}\n\
         Depends: {DEPENDS}\n\
         Section: admin\n\
         Priority: optional\n\
         Description: platform-as-a-service cell agent, brain and CLI\n \
         corral runs application instances as containers on cells (corral-agent,\n \
         with an eBPF data plane for tenant isolation and metering) and places\n \
         them by auction from a brain (corral-brain) over QUIC with mutual TLS.\n \
         The corral command line talks to both. Units: corral-agent.service,\n \
         corral-brain.service (installed, not enabled).\n"
    )
}

/// `systemd-analyze verify` of the units in a copy of `stage` that also
/// holds the host's units (for the targets they refer to). The staged
/// binaries are hard links, so `ExecStart=` is checked against them.
pub fn verify_units(stage: &Path, scratch: &Path) -> Result<()> {
    if scratch.exists() {
        fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    }
    let units = scratch.join("usr/lib/systemd/system");
    fs::create_dir_all(&units).with_context(|| format!("creating {}", units.display()))?;
    util::run(
        Command::new("cp")
            .arg("-a")
            .arg("/usr/lib/systemd/system/.")
            .arg(&units),
    )?;
    util::run(
        Command::new("cp")
            .args(["-al", "--remove-destination"])
            .arg(stage.join("usr"))
            .arg(scratch),
    )?;
    let result = analyze(scratch, UNITS);
    fs::remove_dir_all(scratch).with_context(|| format!("removing {}", scratch.display()))?;
    result
}

/// Runs `systemd-analyze verify --root=ROOT UNITS`; any output is a failure.
pub fn analyze(root: &Path, units: &[&str]) -> Result<()> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units);
    let out = cmd
        .output()
        .context("could not run systemd-analyze (cargo xtask deps installs systemd)")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "systemd-analyze verify refused the units ({}):\n{}",
            out.status,
            said.trim()
        );
    }
    println!("systemd-analyze verify: {} pass", units.join(", "));
    Ok(())
}

fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    set_mode(to, mode)
}

fn write(to: &Path, text: &str, mode: u32) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    set_mode(to, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

fn du_kib(dir: &Path) -> Result<u64> {
    let out = util::output(
        Command::new("du")
            .args(["-sk", "--exclude=DEBIAN"])
            .arg(dir),
    )?;
    out.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("du -sk {}: unexpected output {out:?}", dir.display()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// A root holding the host's units, ours (as shipped, or as given), and
    /// stand-in executables where `ExecStart=` points.
    fn scratch_root(agent_unit: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let units = dir.path().join("usr/lib/systemd/system");
        fs::create_dir_all(&units).unwrap();
        util::run(
            Command::new("cp")
                .arg("-a")
                .arg("/usr/lib/systemd/system/.")
                .arg(&units),
        )
        .unwrap();
        for unit in UNITS {
            fs::copy(
                workspace_root().join("dist/systemd").join(unit),
                units.join(unit),
            )
            .unwrap();
        }
        if let Some(text) = agent_unit {
            fs::write(units.join("corral-agent.service"), text).unwrap();
        }
        for (bin, _) in BINARIES {
            let to = dir.path().join("usr/bin").join(bin);
            install(Path::new("/bin/true"), &to, 0o755).unwrap();
        }
        dir
    }

    fn have_systemd_analyze() -> bool {
        Command::new("systemd-analyze")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn the_units_pass_systemd_analyze_verify() {
        assert!(
            have_systemd_analyze(),
            "systemd-analyze is missing: cargo xtask deps installs it"
        );
        let root = scratch_root(None);
        analyze(root.path(), UNITS).unwrap();
    }

    #[test]
    fn an_impossible_unit_setting_is_refused_with_its_line() {
        assert!(have_systemd_analyze());
        let shipped =
            fs::read_to_string(workspace_root().join("dist/systemd/corral-agent.service")).unwrap();
        for (from, to, needle) in [
            ("KillMode=process", "KillMode=sometimes", "kill mode"),
            ("WatchdogSec=30s", "WatchdogSec=soon", "sec value"),
            (
                "Delegate=yes",
                "Delegate=yes\nDelegateTo=everyone",
                "DelegateTo",
            ),
        ] {
            assert!(shipped.contains(from), "{from} not in the unit");
            let root = scratch_root(Some(&shipped.replace(from, to)));
            let e = analyze(root.path(), &["corral-agent.service"])
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{to}: {e}");
        }
    }

    /// The settings the daemons depend on are in the units (see docs/systemd.md).
    #[test]
    fn the_units_say_what_the_daemons_rely_on() {
        let unit = |name: &str| {
            fs::read_to_string(workspace_root().join("dist/systemd").join(name)).unwrap()
        };
        let agent = unit("corral-agent.service");
        for line in [
            "Type=notify",
            "NotifyAccess=main",
            "Restart=always",
            "KillMode=process",
            "Delegate=yes",
            "WatchdogSec=30s",
            "ExecStart=/usr/bin/corral-agent --config /etc/corral/agent.toml",
        ] {
            assert!(agent.lines().any(|l| l == line), "agent unit lacks {line}");
        }
        // Anything that gives the agent a mount namespace of its own would
        // hide its mounts from the next agent and from `cleanup`.
        for key in [
            "ProtectSystem=",
            "PrivateTmp=",
            "ProtectHome=",
            "PrivateDevices=",
            "ReadWritePaths=",
            "ProtectKernelTunables=",
            "RuntimeDirectory=",
            "NoNewPrivileges=",
            "SystemCallFilter=",
        ] {
            assert!(
                !agent.lines().any(|l| l.starts_with(key)),
                "the agent unit must not set {key}"
            );
        }
        let brain = unit("corral-brain.service");
        for line in [
            "Type=notify",
            "Restart=always",
            "WatchdogSec=30s",
            "User=corral-brain",
            "StateDirectory=corral-brain",
            "NoNewPrivileges=yes",
            "ExecStart=/usr/bin/corral-brain --config /etc/corral/brain.toml",
        ] {
            assert!(brain.lines().any(|l| l == line), "brain unit lacks {line}");
        }
    }

    #[test]
    fn control_file_fields() {
        let c = control("0.1.0", "amd64", 1234);
        assert!(c.starts_with("Package: corral\nVersion: 0.1.0\nArchitecture: amd64\n"));
        assert!(c.contains("Installed-Size: 1234\n"));
        assert!(c.contains("Depends: libc6"));
        // Continuation lines of the description start with a space.
        for l in c
            .lines()
            .skip_while(|l| !l.starts_with("Description:"))
            .skip(1)
        {
            assert!(l.starts_with(' '), "{l:?}");
        }
    }
}
