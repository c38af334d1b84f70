//! The agent under systemd, with a fake notification socket (a unix
//! datagram socket the test binds and names in NOTIFY_SOCKET): READY=1 only
//! once the running instances are re-adopted, keep-alives while healthy
//! when WATCHDOG_USEC is set, STOPPING=1 on SIGTERM, and nothing of it
//! leaks to the instances' shims. And the unit's capability bounding set
//! leaves the agent all it needs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{lrp, Cell};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

/// The next datagram, or `None` after `within`.
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

#[test]
fn ready_only_after_readoption_then_keepalives_then_stopping() {
    let mut cell = Cell::start();
    cell.put_ok("sd-0", &lrp("exec sleep 1000"));
    cell.wait_state("sd-0", "running");
    cell.put_ok("sd-1", &lrp("exec sleep 1000"));
    cell.wait_state("sd-1", "running");
    cell.stop_agent();

    let path = cell.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    cell.spawn_agent_env(&[
        ("NOTIFY_SOCKET", path.as_os_str()),
        // 4 s (the shortest the agent accepts): a keep-alive every 2 s.
        ("WATCHDOG_USEC", "4000000".as_ref()),
    ]);

    // Until READY=1: status only, never a keep-alive. At READY=1 both
    // instances are already in the table the API serves.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut before = Vec::new();
    let ready = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let m = next(&sock, left)
            .unwrap_or_else(|| panic!("no READY=1 (got {before:?}):\n{}", cell.agent_log()));
        if has(&m, "READY=1") {
            break m;
        }
        assert!(!has(&m, "WATCHDOG=1"), "keep-alive before READY=1: {m}");
        before.push(m);
    };
    for id in ["sd-0", "sd-1"] {
        let v = cell.get(id);
        assert_eq!(v["state"], "running", "{id} at READY=1: {v:#}");
    }
    assert!(
        ready.contains(&format!(
            "STATUS=ready: cell {}, 2 instance(s) re-adopted",
            cell.name
        )),
        "{ready}"
    );
    assert!(
        before
            .iter()
            .any(|m| has(m, "STATUS=re-adopting instances")),
        "{before:?}"
    );

    // Keep-alives every WATCHDOG_USEC/2, from the health check.
    let t = Instant::now();
    let mut pings = 0;
    while pings < 3 {
        let m = next(&sock, Duration::from_secs(10)).expect("a keep-alive");
        if has(&m, "WATCHDOG=1") {
            pings += 1;
        }
    }
    // The first is due at once, then one every 2 s: paced, not sent in a
    // burst. (That each one comes at all is the 10 s wait above; how soon
    // is not asserted, since a busy machine delays them.)
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(3500),
        "3 keep-alives in {took:?}, expected one every 2 s"
    );

    // A shim started by this agent does not inherit the notification socket.
    cell.put_ok("sd-2", &lrp("exec sleep 1000"));
    cell.wait_state("sd-2", "running");
    for pid in cell.shim_pids() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains("NOTIFY_SOCKET=") && !env.contains("WATCHDOG_USEC="),
            "shim {pid} inherited systemd's variables"
        );
    }

    // SIGTERM: STOPPING=1, and the instances keep running.
    let shims = cell.shim_pids();
    cell.stop_agent();
    let mut stopping = false;
    while let Some(m) = next(&sock, Duration::from_secs(2)) {
        stopping |= has(&m, "STOPPING=1");
    }
    assert!(
        stopping,
        "no STOPPING=1 after SIGTERM:\n{}",
        cell.agent_log()
    );
    for pid in &shims {
        assert!(
            std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "shim {pid} ended with the agent"
        );
    }
    // Drop brings an agent back (without systemd) and removes everything.
}

/// The capabilities the agent's unit leaves it (`CapabilityBoundingSet=~…`)
/// are enough: with that bounding set (applied by setpriv, as systemd
/// would), the agent runs an instance with its own network and the eBPF
/// data plane, the node reaches it, and it is removed cleanly.
#[test]
fn the_units_capability_bounding_set_is_enough_for_instances_and_the_data_plane() {
    common::require_root();
    let unit =
        std::fs::read_to_string(common::workspace().join("dist/systemd/corral-agent.service"))
            .unwrap();
    let dropped: Vec<String> = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet=~"))
        .expect("the agent's unit drops capabilities")
        .split_whitespace()
        .map(|c| format!("-{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let wrapper = vec![
        "setpriv".to_owned(),
        "--bounding-set".to_owned(),
        dropped.join(","),
        "--".to_owned(),
    ];
    let cell = Cell::start_wrapped("[network]\nsubnet = \"10.244.9.0/24\"\n", wrapper);
    let status = std::fs::read_to_string(format!("/proc/{}/status", cell.agent_pid())).unwrap();
    let bnd = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_MODULE: u32 = 16;
    assert_eq!(
        bnd & (1 << CAP_SYS_MODULE),
        0,
        "the bounding set was not applied"
    );
    cell.put_ok("caps-0", &lrp("exec httpd -f -p 8080"));
    let v = cell.wait_state("caps-0", "running");
    let addr = v["address"].as_str().expect("an address").to_owned();
    let ping = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cell.netns))
        .arg(common::rootfs().join("bin/busybox"))
        .args(["ping", "-c", "1", "-W", "2", &addr])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    let m = cell.metrics();
    assert!(
        m.contains("corral_instance_network_packets_total{instance=\"caps-0\""),
        "{m}"
    );
    cell.delete("caps-0");
    cell.assert_clean();
}

/// Keep-alives follow the agent's health, not a timer: when the data
/// plane's pins disappear from bpffs the agent says why and stops the
/// keep-alives (systemd would restart it); when they are back, so are the
/// keep-alives.
#[test]
fn keepalives_stop_while_the_data_plane_is_unreachable() {
    let mut cell = Cell::start_with("[network]\nsubnet = \"10.244.11.0/24\"\n");
    cell.stop_agent();
    let path = cell.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    cell.spawn_agent_env(&[
        ("NOTIFY_SOCKET", path.as_os_str()),
        ("WATCHDOG_USEC", "4000000".as_ref()),
    ]);
    cell.wait_ready();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m =
            next(&sock, deadline.saturating_duration_since(Instant::now())).expect("a keep-alive");
        if has(&m, "WATCHDOG=1") {
            break;
        }
    }
    // The agent's bpffs is in the cell's mount namespace.
    let bpf = format!("/proc/{}/root/sys/fs/bpf/corral", cell.agent_pid());
    let pins = format!("{bpf}/{}", cell.name);
    let aside = format!("{bpf}/{}-aside", cell.name);
    std::fs::rename(&pins, &aside).unwrap();
    struct Restore(String, String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::rename(&self.1, &self.0);
        }
    }
    let restore = Restore(pins, aside);
    let status = loop {
        let m = next(&sock, Duration::from_secs(10)).expect("an unhealthy status");
        if !has(&m, "WATCHDOG=1") {
            break m;
        }
    };
    assert!(
        status.starts_with("STATUS=unhealthy: the data plane: its pins in /sys/fs/bpf/corral/"),
        "{status}"
    );
    // A whole watchdog period (4 s) without a keep-alive.
    let quiet = Instant::now();
    while let Some(m) = next(
        &sock,
        Duration::from_secs(5).saturating_sub(quiet.elapsed()),
    ) {
        assert!(!has(&m, "WATCHDOG=1"), "keep-alive while unhealthy: {m}");
        if quiet.elapsed() >= Duration::from_secs(5) {
            break;
        }
    }
    drop(restore);
    let back = next(&sock, Duration::from_secs(10)).expect("keep-alives again");
    assert_eq!(back, "WATCHDOG=1\nSTATUS=healthy again\n");
    assert!(
        cell.agent_log().contains("unhealthy"),
        "{}",
        cell.agent_log()
    );
}
