//! The `.deb` of `cargo xtask dist`: its contents are the ones the README
//! documents, and `dpkg -i` on this Debian (in a throw-away overlay of the
//! root filesystem, in private mount and network namespaces) installs
//! something that starts: the agent run exactly as its unit's `ExecStart=`
//! says, with the packaged configuration, reports READY=1 to a fake
//! notification socket and STOPPING=1 on SIGTERM; the brain's generated
//! configuration and the README's certificate steps pass `--check` as the
//! `corral-brain` user.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn deb() -> PathBuf {
    let p = std::env::var_os("CORRAL_DEB")
        .map(PathBuf::from)
        .expect("CORRAL_DEB: the .deb to test (cargo xtask test builds it)");
    assert!(p.exists(), "{} is missing", p.display());
    p
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files of the package, as "README: Install on a node" lists them.
const DOCUMENTED_FILES: &[&str] = &[
    "./usr/bin/corral-agent",
    "./usr/bin/corral-brain",
    "./usr/bin/corral",
    "./usr/lib/systemd/system/corral-agent.service",
    "./usr/lib/systemd/system/corral-brain.service",
    "./usr/lib/tmpfiles.d/corral.conf",
    "./etc/corral/agent.toml",
    "./usr/share/corral/brain.toml",
    "./usr/share/doc/corral/README.md",
    "./usr/share/doc/corral/systemd.md",
    "./usr/share/doc/corral/metrics.md",
    "./usr/share/bash-completion/completions/corral",
    "./usr/share/zsh/vendor-completions/_corral",
    "./usr/share/fish/vendor_completions.d/corral.fish",
];

#[test]
fn the_package_holds_what_the_readme_documents() {
    common::require_root();
    let deb = deb();
    let listing = ok(
        Command::new("dpkg-deb")
            .arg("--contents")
            .arg(&deb)
            .output()
            .unwrap(),
        "dpkg-deb --contents",
    );
    // "drwxr-xr-x root/root 0 2026-11-25 12:00 ./etc/corral/"
    let entries: Vec<(String, String)> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), f[5].to_owned())
        })
        .collect();
    let files: Vec<&str> = entries
        .iter()
        .filter(|(m, _)| m.starts_with('-'))
        .map(|(_, p)| p.as_str())
        .collect();
    let mut want = DOCUMENTED_FILES.to_vec();
    want.sort_unstable();
    let mut got = files.clone();
    got.sort_unstable();
    assert_eq!(got, want, "package files differ from the README's list");
    let mode = |path: &str| {
        entries
            .iter()
            .find(|(_, p)| p == path)
            .map(|(m, _)| m.clone())
            .unwrap_or_else(|| panic!("{path} not in the package"))
    };
    for bin in ["corral-agent", "corral-brain", "corral"] {
        assert_eq!(mode(&format!("./usr/bin/{bin}")), "-rwxr-xr-x");
    }
    assert_eq!(mode("./etc/corral/certs/"), "drwxr-xr-x");
    assert_eq!(mode("./var/lib/corral/"), "drwx--x--x");
    assert!(
        listing.lines().all(|l| l.contains(" root/root ")),
        "everything is owned by root"
    );
    let control = tempfile::tempdir().unwrap();
    let ctl = control.path().join("DEBIAN");
    ok(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&ctl)
            .output()
            .unwrap(),
        "dpkg-deb --control",
    );
    assert_eq!(
        std::fs::read_to_string(ctl.join("conffiles")).unwrap(),
        "/etc/corral/agent.toml\n"
    );
    let field = |name: &str| {
        ok(
            Command::new("dpkg-deb")
                .arg("--field")
                .arg(&deb)
                .arg(name)
                .output()
                .unwrap(),
            "dpkg-deb --field",
        )
        .trim()
        .to_owned()
    };
    assert_eq!(field("Package"), "corral");
    assert!(field("Depends").contains("libseccomp2"));
    let info = ok(
        Command::new("dpkg-deb")
            .arg("--info")
            .arg(&deb)
            .output()
            .unwrap(),
        "dpkg-deb --info",
    );
    for script in ["postinst", "postrm", "conffiles", "control"] {
        assert!(info.contains(script), "no {script}: {info}");
    }
}

/// A private mount + network namespace holding an overlay of `/` whose
/// writes go to a tmpfs; everything in it vanishes with the holder.
struct Sandbox {
    holder: Child,
    dir: tempfile::TempDir,
    cgroup_root: String,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix("corral-dist-")
            .tempdir()
            .unwrap();
        let holder = Command::new("unshare")
            .args([
                "--mount",
                "--net",
                "--propagation",
                "private",
                "sleep",
                "infinity",
            ])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let own = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/ns/mnt", holder.id())).ok() == Some(own.clone())
        {
            assert!(Instant::now() < deadline, "unshare did not take effect");
            std::thread::sleep(Duration::from_millis(5));
        }
        let sb = Sandbox {
            holder,
            cgroup_root: format!("corral-dist-{}", std::process::id()),
            dir,
        };
        let w = sb.dir.path().join("w");
        let w = w.display();
        sb.sh(&format!(
            "mkdir -p {w} && mount -t tmpfs tmpfs {w} && mkdir {w}/upper {w}/work {w}/root && \
             mount -t overlay overlay -o lowerdir=/,upperdir={w}/upper,workdir={w}/work {w}/root && \
             mount --rbind /proc {w}/root/proc && mount --rbind /sys {w}/root/sys && \
             mount --rbind /dev {w}/root/dev && mkdir -p {w}/root/sandbox && \
             mount --bind {d} {w}/root/sandbox && ip link set lo up",
            d = sb.dir.path().display()
        ));
        sb
    }

    /// The overlay's root, as a path inside the namespace.
    fn root(&self) -> PathBuf {
        self.dir.path().join("w/root")
    }

    /// The overlay's root, as a path from this process (which does not see
    /// the namespace's mounts).
    fn view(&self) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}",
            self.holder.id(),
            self.root().display()
        ))
    }

    fn nsenter(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .arg(format!("--net=/proc/{}/ns/net", self.holder.id()));
        c
    }

    /// Runs a shell command in the namespaces (not chrooted).
    fn sh(&self, script: &str) -> String {
        ok(
            self.nsenter().args(["sh", "-c", script]).output().unwrap(),
            script,
        )
    }

    /// Runs a command chrooted into the overlay.
    fn chroot(&self, args: &[&str]) -> Output {
        self.nsenter()
            .arg("chroot")
            .arg(self.root())
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        // The agent made its cgroups in the host's hierarchies (sysfs is shared).
        for entry in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(entry.path().join(&self.cgroup_root));
        }
    }
}

fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[test]
fn dpkg_install_then_the_agent_starts_as_its_unit_says() {
    common::require_root();
    let deb = deb();
    let sb = Sandbox::new();
    std::fs::copy(&deb, sb.dir.path().join("corral.deb")).unwrap();
    ok(sb.chroot(&["dpkg", "-i", "/sandbox/corral.deb"]), "dpkg -i");

    // What postinst made.
    ok(
        sb.chroot(&["getent", "passwd", "corral-brain"]),
        "the brain's user",
    );
    let root = sb.view();
    let brain_toml = std::fs::read_to_string(root.join("etc/corral/brain.toml")).unwrap();
    assert!(!brain_toml.contains("@ADMIN_TOKEN@"), "token not written");
    let stat = ok(
        sb.chroot(&[
            "stat",
            "-c",
            "%a %U %G",
            "/etc/corral/brain.toml",
            "/var/lib/corral-brain",
        ]),
        "stat",
    );
    assert_eq!(
        stat,
        "640 root corral-brain\n700 corral-brain corral-brain\n"
    );

    // The README's brain steps, then --check as the brain's user.
    let host = ok(sb.chroot(&["cat", "/proc/sys/kernel/hostname"]), "hostname");
    let host = host.trim();
    let key = format!("/etc/corral/certs/brain-{host}-key.pem");
    for args in [
        vec![
            "corral-brain",
            "certs",
            "init",
            "--dir",
            "/etc/corral/certs",
        ],
        vec![
            "corral-brain",
            "certs",
            "issue",
            "--dir",
            "/etc/corral/certs",
            "--brain",
            host,
        ],
        vec!["chgrp", "corral-brain", &key],
        vec!["chmod", "0640", &key],
        vec![
            "runuser",
            "-u",
            "corral-brain",
            "--",
            "corral-brain",
            "--config",
            "/etc/corral/brain.toml",
            "--check",
        ],
    ] {
        ok(sb.chroot(&args), &args.join(" "));
    }

    // The agent: its unit's ExecStart, the packaged config (only the cgroup
    // root renamed, so that this test cannot meet another agent's cgroups).
    let unit =
        std::fs::read_to_string(root.join("usr/lib/systemd/system/corral-agent.service")).unwrap();
    let exec: Vec<&str> = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart")
        .split_whitespace()
        .collect();
    let cfg = root.join("etc/corral/agent.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("cgroup_root = \"{}\"\n{text}", sb.cgroup_root),
    )
    .unwrap();
    ok(
        sb.chroot(&[
            "corral-agent",
            "--config",
            "/etc/corral/agent.toml",
            "--check",
        ]),
        "corral-agent --check",
    );
    let sock_path = sb.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let log = std::fs::File::create(sb.dir.path().join("agent.log")).unwrap();
    let mut agent = sb
        .nsenter()
        .arg("chroot")
        .arg(sb.root())
        .args(&exec)
        .env("NOTIFY_SOCKET", "/sandbox/notify.sock")
        .env("WATCHDOG_USEC", "30000000")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(sb.dir.path().join("agent.log")).unwrap_or_default();
    let mut ready = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(m) = next(&sock, left) else {
            let _ = agent.kill();
            panic!("no READY=1 from the installed agent:\n{}", agent_log());
        };
        ready = m.lines().any(|l| l == "READY=1");
    }
    // The API answers on the packaged socket path, inside the overlay.
    let state = ok(
        sb.chroot(&["corral", "cell", "status"]),
        "corral cell status",
    );
    assert!(state.contains("cell"), "{state}");
    assert!(root.join("run/corral/agent.sock").exists());
    Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status()
        .unwrap();
    let mut stopping = false;
    while let Some(m) = next(&sock, Duration::from_secs(5)) {
        stopping |= m.lines().any(|l| l == "STOPPING=1");
        if stopping {
            break;
        }
    }
    let st = common::wait_with_timeout(agent, Duration::from_secs(20)).status;
    assert!(stopping, "no STOPPING=1:\n{}", agent_log());
    assert!(st.success(), "agent exit {st}:\n{}", agent_log());
}
