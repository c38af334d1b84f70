//! Instance networking: addresses from the cell subnet, veth wiring, and
//! reachability between instances and from the node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{lrp, task, Cell};
use std::process::Command;

const NET: &str = "[network]\nsubnet = \"10.244.1.0/24\"\n";

fn web(body: &str) -> serde_json::Value {
    lrp(&format!(
        "mkdir -p /www && echo {body} > /www/index.html && exec httpd -f -p 8080 -h /www"
    ))
}

/// Sends an HTTP request from the node's network namespace with busybox nc
/// (busybox's static wget crashes in glibc's resolver on the host).
fn fetch_from_node(cell: &Cell, addr: &str) -> String {
    use std::io::Write;
    for _ in 0..50 {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", cell.netns))
            .arg(common::rootfs().join("bin/busybox"))
            .args(["nc", "-w", "2", addr, "8080"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET / HTTP/1.0\r\n\r\n");
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some((_, body)) = text.split_once("\r\n\r\n") {
            return body.to_owned();
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("node cannot reach {addr}:8080");
}

#[test]
fn instances_get_addresses_and_reach_each_other_and_the_node_reaches_them() {
    let mut cell = Cell::start_with(NET);
    let a = cell.put_ok("a", &web("hello-from-a"));
    let addr = a["address"].as_str().expect("an address").to_owned();
    assert!(addr.starts_with("10.244.1."), "{addr}");
    assert_ne!(addr, "10.244.1.1", "the node's address is never handed out");
    assert_eq!(fetch_from_node(&cell, &addr).trim(), "hello-from-a");

    // Another instance reaches it through the node.
    cell.put_ok(
        "b",
        &task(&format!(
            "for i in 1 2 3 4 5 6 7 8 9 10; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} 8080 | grep hello && exit 0; sleep 0.2; done; exit 1"
        )),
    );
    let b = cell.wait_for("b", "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    assert_eq!(b["exit_code"], 0, "{b:#}\n{}", cell.logs("b"));
    assert!(cell.logs("b").contains("hello-from-a"));
    let b_addr = b["address"].as_str();
    assert!(
        b_addr.is_none(),
        "an ended task gives its address back: {b:#}"
    );

    // Inside: eth0 with a /32 and a default route via the gateway.
    cell.put_ok("probe", &task("ip -4 addr show eth0; ip route"));
    cell.wait_state("probe", "exited");
    let logs = cell.logs("probe");
    assert!(logs.contains("/32"), "{logs}");
    assert!(logs.contains("default via 169.254.1.1"), "{logs}");

    // An agent restart keeps the instance's address and its reachability.
    cell.kill9_agent();
    assert_eq!(fetch_from_node(&cell, &addr).trim(), "hello-from-a");
    cell.spawn_agent();
    assert_eq!(cell.get("a")["address"].as_str(), Some(addr.as_str()));
    let c = cell.put_ok("c", &web("hello-from-c"));
    assert_ne!(
        c["address"].as_str(),
        Some(addr.as_str()),
        "re-adopted addresses are not handed out again"
    );

    for id in ["a", "b", "c", "probe"] {
        cell.delete(id);
    }
    let routes = Command::new("ip")
        .args(["-n", &cell.netns, "-4", "route", "show"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).trim().is_empty(),
        "routes left: {}",
        String::from_utf8_lossy(&routes.stdout)
    );
    cell.assert_clean();
}

#[test]
fn an_exhausted_subnet_leaves_the_instance_crashed_and_nothing_behind() {
    // A /29 has five instance addresses.
    let cell = Cell::start_with("[network]\nsubnet = \"10.244.2.0/29\"\n");
    for i in 0..5 {
        cell.put_ok(&format!("s{i}"), &lrp("exec sleep 1000"));
    }
    let v = cell.put_ok("s5", &lrp("exec sleep 1000"));
    assert_eq!(v["state"], "crashed", "{v:#}");
    assert!(
        v["reason"].as_str().unwrap().contains("no free address"),
        "{v:#}"
    );
    assert!(v["address"].is_null());
    let links = Command::new("ip")
        .args(["-n", &cell.netns, "-o", "link", "show"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&links.stdout).lines().count(),
        6,
        "lo + five veths"
    );
    for i in 0..6 {
        cell.delete(&format!("s{i}"));
    }
    cell.assert_clean();
}

#[test]
fn a_subnet_overlapping_the_node_is_refused_at_start() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let ns = format!("corral-ovl{}", std::process::id());
    assert!(Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    let _guard = NetnsGuard(ns.clone());
    // The node already has 10.244.0.10/16 (on a veth: this kernel has no dummy driver).
    for args in [
        &[
            "link", "add", "ovl0", "type", "veth", "peer", "name", "ovl1",
        ][..],
        &["addr", "add", "10.244.0.10/16", "dev", "ovl0"][..],
    ] {
        assert!(
            Command::new("ip")
                .arg("-n")
                .arg(&ns)
                .args(args)
                .status()
                .unwrap()
                .success(),
            "{args:?}"
        );
    }
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{0}/d\"\nrun_dir = \"{0}/r\"\ncgroup_root = \"corral-ovl\"\n[api]\nlisten = \"off\"\n[metrics]\nlisten = \"off\"\n[network]\nsubnet = \"10.244.1.0/24\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["unshare", "--mount", "--propagation", "slave"])
        .arg(common::agent_bin())
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = common::wait_with_timeout(child, std::time::Duration::from_secs(20));
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("overlaps the node's network 10.244.0.0/16"),
        "{err}"
    );
    for ctrl in ["memory", "cpu", "cpuacct", "pids"] {
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup/{ctrl}/corral-ovl"));
    }
    let _ = std::fs::remove_dir("/sys/fs/cgroup/unified/corral-ovl");
}

struct NetnsGuard(String);
impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs a client task of `tenant` that fetches `addr`:8080; true if it got the page.
fn connects(cell: &Cell, id: &str, tenant: &str, addr: &str) -> bool {
    let mut t = task(&format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} 8080 | grep -q hello"
    ));
    t["tenant"] = serde_json::json!(tenant);
    cell.put_ok(id, &t);
    let v = cell.wait_for(id, "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    cell.delete(id);
    v["exit_code"] == 0
}

fn metric(cell: &Cell, series: &str) -> u64 {
    let m = cell.metrics();
    m.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

#[test]
fn tenants_are_isolated_policies_open_paths_spoofing_is_dropped_and_traffic_is_metered() {
    let cell = Cell::start_with(NET);
    let a = cell.put_ok("a1", &web("hello-acme"));
    let mut g = web("hello-globex");
    g["tenant"] = serde_json::json!("globex");
    let g = cell.put_ok("g1", &g);
    let (a_addr, g_addr) = (
        a["address"].as_str().unwrap().to_owned(),
        g["address"].as_str().unwrap().to_owned(),
    );

    assert!(
        connects(&cell, "ca", "acme", &a_addr),
        "same tenant must connect"
    );
    assert!(
        connects(&cell, "cg", "globex", &g_addr),
        "same tenant must connect"
    );
    let drops = r#"corral_network_drops_total{tenant="globex",reason="policy"}"#;
    let before = metric(&cell, drops);
    assert!(
        !connects(&cell, "x1", "globex", &a_addr),
        "cross-tenant must fail"
    );
    assert!(
        !connects(&cell, "x2", "acme", &g_addr),
        "cross-tenant must fail"
    );
    assert!(
        metric(&cell, drops) > before,
        "policy drops must be counted:\n{}",
        cell.metrics()
    );

    // A policy opens globex -> acme on tcp/8080, and only that way.
    let policy =
        serde_json::json!({"from": "globex", "to": "acme", "protocol": "tcp", "port": 8080});
    let r = cell
        .client
        .request("PUT", "/v1/policies", Some(policy.to_string().as_bytes()))
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let list = cell.client.get("/v1/policies").unwrap().json().unwrap();
    assert_eq!(list["policies"][0]["from"], "globex", "{list:#}");
    assert!(
        connects(&cell, "p1", "globex", &a_addr),
        "the policy must allow globex -> acme:8080"
    );
    assert!(
        !connects(&cell, "p2", "acme", &g_addr),
        "the policy is one-way"
    );
    let r = cell
        .client
        .request(
            "DELETE",
            "/v1/policies",
            Some(policy.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !connects(&cell, "p3", "globex", &a_addr),
        "removing the policy closes the path"
    );

    // Bad policies are refused.
    for bad in [
        serde_json::json!({"from": "acme", "to": "acme"}),
        serde_json::json!({"from": "acme", "to": "globex", "protocol": "icmp", "port": 80}),
        serde_json::json!({"from": "acme", "to": "globex", "protocol": "carrier-pigeon"}),
        serde_json::json!({"from": "../x", "to": "globex"}),
    ] {
        let r = cell
            .client
            .request("PUT", "/v1/policies", Some(bad.to_string().as_bytes()))
            .unwrap();
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }

    // A packet from an address the instance does not own is dropped.
    let pid = a["pid"].as_u64().unwrap();
    let ns = format!("--net=/proc/{pid}/ns/net");
    let ok = Command::new("nsenter")
        .args([
            ns.as_str(),
            "ip",
            "addr",
            "add",
            "10.244.1.250/32",
            "dev",
            "eth0",
        ])
        .status()
        .unwrap();
    assert!(ok.success());
    let spoof = r#"corral_network_drops_total{tenant="acme",reason="spoof"}"#;
    let before = metric(&cell, spoof);
    let _ = Command::new("nsenter")
        .arg(&ns)
        .arg(common::rootfs().join("bin/busybox"))
        .args(["ping", "-c", "2", "-W", "1", "-I", "10.244.1.250", &g_addr])
        .output()
        .unwrap();
    assert!(
        metric(&cell, spoof) > before,
        "spoofed packets must be dropped and counted:\n{}",
        cell.metrics()
    );

    // Metering.
    let sent = metric(
        &cell,
        r#"corral_tenant_network_bytes_total{tenant="acme",direction="transmit"}"#,
    );
    assert!(sent > 0, "{}", cell.metrics());
    let m = cell.metrics();
    assert!(m.contains(r#"corral_instance_network_bytes_total{instance="a1",tenant="acme",app="app",direction="receive"}"#), "{m}");

    let dp = cell.client.get("/v1/dataplane").unwrap().json().unwrap();
    assert_eq!(dp["endpoints"].as_array().unwrap().len(), 2, "{dp:#}");
    cell.delete("a1");
    cell.delete("g1");
    let dp = cell.client.get("/v1/dataplane").unwrap().json().unwrap();
    assert_eq!(
        dp["endpoints"],
        serde_json::json!([]),
        "no endpoint left: {dp:#}"
    );
    assert_eq!(
        dp["interfaces"],
        serde_json::json!([]),
        "no interface left: {dp:#}"
    );
    cell.assert_clean();
}

#[test]
fn a_tcp_stream_between_instances_survives_an_agent_kill9_and_restart() {
    let mut cell = Cell::start_with(NET);
    let server = cell.put_ok(
        "sink",
        // nc closes the connection when its stdin ends: keep that open.
        &lrp("sleep 100000 | nc -l -p 9000 | while read n; do echo got-$n; done"),
    );
    let addr = server["address"].as_str().unwrap().to_owned();
    std::thread::sleep(std::time::Duration::from_millis(300));
    cell.put_ok(
        "source",
        &lrp(&format!(
            "i=0; while true; do echo $i; i=$((i+1)); sleep 0.05; done | nc {addr} 9000"
        )),
    );
    let last = |cell: &Cell| -> u64 {
        cell.logs("sink")
            .lines()
            .filter_map(|l| l.rsplit("got-").next()?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    };
    std::thread::sleep(std::time::Duration::from_secs(1));
    let before = last(&cell);
    assert!(
        before > 5,
        "the stream never started:\n{}",
        cell.logs("sink")
    );
    cell.kill9_agent();
    std::thread::sleep(std::time::Duration::from_secs(1));
    cell.spawn_agent();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let after = last(&cell);
    assert!(
        after > before + 20,
        "the stream stalled across the restart: {before} -> {after}"
    );
    // Every number arrived, in order: nothing was lost on the way.
    let got: Vec<u64> = cell
        .logs("sink")
        .lines()
        .filter_map(|l| l.rsplit("got-").next()?.trim().parse().ok())
        .collect();
    assert!(
        got.windows(2).all(|w| w[1] == w[0] + 1),
        "gaps in the stream: {got:?}"
    );
    assert_eq!(cell.get("source")["state"], "running");
    cell.delete("source");
    cell.delete("sink");
    cell.assert_clean();
}
