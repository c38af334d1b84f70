//! The brain under systemd, with a fake notification socket: READY=1 once
//! cells and the API are accepted, keep-alives while the API answers and
//! the loop turns, STOPPING=1 on SIGTERM; an impossible watchdog refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn brain() -> Command {
    Command::new(env!("CARGO_BIN_EXE_corral-brain"))
}

fn next(sock: &UnixDatagram, within: Duration) -> Option<String> {
    sock.set_read_timeout(Some(within.max(Duration::from_millis(1))))
        .unwrap();
    let mut buf = [0u8; 4096];
    sock.recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn has(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

/// Certificates and a config for brain b1 in `d`, ephemeral ports.
fn setup(d: &Path) -> std::path::PathBuf {
    let c = d.join("certs");
    let c = c.to_str().unwrap();
    for args in [
        vec!["certs", "init", "--dir", c],
        vec!["certs", "issue", "--dir", c, "--brain", "b1"],
    ] {
        assert!(brain().args(&args).output().unwrap().status.success());
    }
    let path = d.join("brain.toml");
    std::fs::write(
        &path,
        format!(
            "brain_id = \"b1\"\ndata_dir = \"{data}\"\n[api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\n\
             [tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/brain-b1.pem\"\nkey = \"{c}/brain-b1-key.pem\"\n\
             [tokens]\nadmin = \"0123456789abcdef0123\"\n",
            data = d.join("data").display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn ready_keepalives_and_stopping() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut child = brain()
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "4000000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let m = next(&sock, Duration::from_secs(30)).expect("a notification");
    assert!(has(&m, "READY=1"), "{m}");
    assert!(m.contains("STATUS=ready: cells on 127.0.0.1:"), "{m}");
    let t = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let m = next(&sock, Duration::from_secs(10)).expect("a keep-alive");
        assert!(!m.contains("unhealthy"), "{m}");
        pings += has(&m, "WATCHDOG=1") as u32;
    }
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    // Our own child, not yet reaped: its pid is still its own.
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let mut stopping = false;
    while let Some(m) = next(&sock, Duration::from_secs(3)) {
        stopping |= has(&m, "STOPPING=1");
    }
    let status = child.wait().unwrap();
    assert!(stopping, "no STOPPING=1");
    assert!(status.success(), "{status}");
}

#[test]
fn an_impossible_watchdog_is_refused_before_anything_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = setup(tmp.path());
    let out = brain()
        .arg("--config")
        .arg(&config)
        .env("NOTIFY_SOCKET", tmp.path().join("notify.sock"))
        .env("WATCHDOG_USEC", "1000000")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("WatchdogSec=1s is too short for corral-brain"),
        "{err}"
    );
    assert!(!tmp.path().join("data").exists());
}

#[test]
fn the_shipped_brain_config_is_valid_once_its_token_is_written() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etc/brain.toml"),
    )
    .unwrap();
    assert!(text.contains("@ADMIN_TOKEN@"));
    let text = text.replace("@ADMIN_TOKEN@", &"ab".repeat(32));
    let cfg = corral_brain::config::Config::parse(&text, "node-1").unwrap();
    assert_eq!(cfg.data_dir, Path::new("/var/lib/corral-brain"));
}
