//! Service load balancing end to end: a brain and two cells in node
//! namespaces. An app of acme gets a VIP from the brain; clients inside
//! instances (tasks, which run in the cell's cgroup2 directory where the
//! socket-level balancer is attached) connect to VIP:port and reach every
//! ready instance on both cells; a killed instance stops receiving new
//! connections; a scaled-up one starts; another tenant's client cannot
//! reach the VIP; a connection opened through the VIP survives a restart
//! of its cell's agent, and new ones work right after.
//!
//! Run as root through `cargo xtask test lb`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{Cluster, Fabric};
use common::{task, Cell};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The app's server: answers every request with its instance id.
const SERVER: &str = "mkdir -p /www && echo \"id=$CORRAL_INSTANCE_ID\" > /www/index.html && exec httpd -f -p 8080 -h /www";

/// A task of `tenant` on `cell` that connects `n` times to `vip`:8080 and
/// prints each answer; returns how often each instance id answered, and
/// the number of failed connects.
fn spread(cell: &Cell, id: &str, tenant: &str, vip: &str, n: u32) -> (BTreeMap<String, u32>, u32) {
    let mut t = task(&format!(
        "for i in $(seq {n}); do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {vip} 8080 | grep '^id=' || echo fail; done"
    ));
    t["tenant"] = serde_json::json!(tenant);
    cell.put_ok(id, &t);
    cell.wait_for(id, "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    let logs = cell.logs(id);
    cell.delete(id);
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for line in logs.lines() {
        if let Some(i) = line.find("id=") {
            *seen.entry(line[i + 3..].trim().to_owned()).or_insert(0) += 1;
        } else if line.ends_with("fail") {
            failed += 1;
        }
    }
    (seen, failed)
}

fn gauge(cell: &Cell, name: &str) -> Option<u64> {
    cell.metrics().lines().find_map(|l| {
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    })
}

fn context(fabric: &Fabric, cells: &[Cell]) -> String {
    format!(
        "metrics 1:\n{}\nmetrics 2:\n{}\nbrain log:\n{}\ncell 1 log:\n{}",
        cells[0].metrics(),
        cells[1].metrics(),
        fabric.brain_log(),
        cells[0].agent_log()
    )
}

fn wait(what: &str, ctx: impl Fn() -> String, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The ids of the app's running instances, as the brain lists them.
fn running(fabric: &Fabric) -> Vec<String> {
    let v = fabric.cli_json(&["app", "web", "--tenant", "acme"]);
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn connections_to_a_vip_reach_every_ready_instance_across_cells() {
    common::require_root();
    // Bound after the cells, so dropped before them.
    let Cluster {
        mut cells, fabric, ..
    } = Cluster::with_subnets(2);

    let root = common::rootfs();
    fabric.cli_ok(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "3",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--disk",
        "64",
        "--port",
        "8080",
        "--",
        "/bin/sh",
        "-c",
        SERVER,
    ]);
    let app = fabric.wait_json(&["app", "web", "--tenant", "acme"], "3 running", |v| {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|i| i["state"] == "running")
            .count()
            == 3
    });
    let vip = app["app"]["vip"]
        .as_str()
        .unwrap_or_else(|| panic!("no vip: {app}"))
        .to_owned();
    assert!(vip.starts_with("10.96.0."), "{vip}");
    // Every cell programs the service with the three ready backends.
    wait(
        "3 backends on both cells",
        || context(&fabric, &cells),
        || {
            cells
                .iter()
                .all(|c| gauge(c, "corral_lb_backends") == Some(3))
        },
    );

    // From either cell, connections to the VIP reach all three instances.
    let all = running(&fabric);
    for (n, cell) in cells.iter().enumerate() {
        let (seen, failed) = spread(cell, &format!("client-{n}"), "acme", &vip, 30);
        assert_eq!(failed, 0, "failed connects from cell {n}: {seen:?}");
        for id in &all {
            assert!(
                seen.get(id).is_some_and(|&c| c >= 2),
                "instance {id} got {:?} of 30 connects from cell {n}: {seen:?}",
                seen.get(id)
            );
        }
    }

    // Another tenant's client cannot reach acme's VIP.
    let (seen, failed) = spread(&cells[0], "client-globex", "globex", &vip, 3);
    assert!(seen.is_empty(), "globex reached acme's VIP: {seen:?}");
    assert_eq!(failed, 3);
    // A policy from globex to acme's web (made on the brain) opens the VIP
    // to globex, every backend included; deleting it closes it again.
    let policy = [
        "globex",
        "acme",
        "--app",
        "web",
        "--protocol",
        "tcp",
        "--port",
        "8080",
    ];
    fabric.cli_ok(&[&["policy", "add"][..], &policy[..]].concat());
    let mut opened = BTreeMap::new();
    wait(
        "the policy on cell 1",
        || context(&fabric, &cells),
        || {
            let (seen, _) = spread(&cells[0], "client-globex-p", "globex", &vip, 12);
            opened = seen;
            !opened.is_empty()
        },
    );
    let (seen, failed) = spread(&cells[0], "client-globex-p2", "globex", &vip, 30);
    assert_eq!(failed, 0, "with the policy: {seen:?} (before: {opened:?})");
    assert_eq!(
        seen.len(),
        3,
        "with the policy every backend answers: {seen:?}"
    );
    fabric.cli_ok(&[&["policy", "delete"][..], &policy[..]].concat());
    wait(
        "the policy gone",
        || context(&fabric, &cells),
        || {
            spread(&cells[0], "client-globex-p3", "globex", &vip, 3)
                .0
                .is_empty()
        },
    );

    // A connection opened through the VIP, held across an agent restart:
    // the request goes out after the restart and is answered.
    let mut held = task(&format!(
        "(sleep 6; printf 'GET / HTTP/1.0\\r\\n\\r\\n') | nc -w 10 {vip} 8080 | grep '^id=' || echo fail"
    ));
    held["tenant"] = serde_json::json!("acme");
    cells[0].put_ok("held", &held);
    std::thread::sleep(Duration::from_millis(1500));
    cells[0].stop_agent();
    cells[0].spawn_agent();
    cells[0].wait_ready();
    // New connections work at once after the restart (the maps and links
    // are pinned; nothing waits for the brain).
    let (seen, failed) = spread(&cells[0], "client-after-restart", "acme", &vip, 6);
    assert_eq!(failed, 0, "after restart: {seen:?}");
    let v = cells[0].wait_for("held", "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    let logs = cells[0].logs("held");
    assert!(
        logs.contains("id="),
        "the held connection was not answered: {v} {logs}"
    );
    cells[0].delete("held");

    // Kill one instance's server: once it is no longer ready it gets no
    // new connections (the brain replaces it under a new id).
    let victim = all[0].clone();
    let owner = cells
        .iter()
        .find(|c| {
            c.client
                .get(&format!("/v1/instances/{victim}"))
                .is_ok_and(|r| r.status == 200)
        })
        .expect("a cell runs the victim");
    let pid = owner.get(&victim)["pid"].as_u64().unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the pid of a container init of this test's cell.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    wait(
        "the killed instance out of the backends",
        || context(&fabric, &cells),
        || {
            !running(&fabric).contains(&victim) && gauge(&cells[0], "corral_lb_backends") == Some(2)
                || running(&fabric).len() == 3 && !running(&fabric).contains(&victim)
        },
    );
    let (seen, _) = spread(&cells[0], "client-after-kill", "acme", &vip, 20);
    assert!(
        !seen.contains_key(&victim),
        "the killed instance {victim} still got connections: {seen:?}"
    );

    // Scale up: the new instance receives connections too.
    let before = running(&fabric);
    fabric.cli_ok(&["scale", "web", "4", "--tenant", "acme"]);
    wait(
        "4 backends on both cells",
        || context(&fabric, &cells),
        || {
            cells
                .iter()
                .all(|c| gauge(c, "corral_lb_backends") == Some(4))
        },
    );
    let now = running(&fabric);
    let fresh: Vec<&String> = now.iter().filter(|i| !before.contains(i)).collect();
    assert!(!fresh.is_empty(), "no new instance: {before:?} → {now:?}");
    let (seen, failed) = spread(&cells[1], "client-after-scale", "acme", &vip, 40);
    assert_eq!(failed, 0, "{seen:?}");
    for id in fresh {
        assert!(
            seen.contains_key(id),
            "new instance {id} got nothing: {seen:?}"
        );
    }

    // Deleting the app removes the service from every cell.
    fabric.cli_ok(&["delete-app", "web", "--tenant", "acme"]);
    no_service_left(&fabric, &cells);
}

/// Waits until no cell programs a service any more, then empties them.
fn no_service_left(fabric: &Fabric, cells: &[Cell]) {
    wait(
        "no service left",
        || context(fabric, cells),
        || {
            cells
                .iter()
                .all(|c| gauge(c, "corral_lb_services") == Some(0))
        },
    );
    for c in cells {
        c.delete_all();
    }
}

/// A client outside the cluster: a namespace on the fabric's bridge.
struct Client {
    netns: String,
}

impl Client {
    fn new(fabric: &Fabric, addr: &str) -> Client {
        let netns = format!("corral-cl{}", std::process::id());
        let run = |args: &[&str]| {
            let o = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&["netns", "add", &netns]);
        let client = Client { netns };
        let outer = format!("cl{}", std::process::id() % 100_000);
        run(&[
            "-n",
            &fabric.netns,
            "link",
            "add",
            &outer,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client.netns,
        ]);
        run(&["-n", &fabric.netns, "link", "set", &outer, "master", "br0"]);
        run(&["-n", &fabric.netns, "link", "set", &outer, "up"]);
        run(&[
            "-n",
            &client.netns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "c0",
        ]);
        run(&["-n", &client.netns, "link", "set", "c0", "up"]);
        run(&["-n", &client.netns, "link", "set", "lo", "up"]);
        client
    }

    /// `bash -c script` in the client's namespace.
    fn bash(&self, script: &str) -> std::process::Command {
        let mut c = std::process::Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .args(["bash", "-c", script]);
        c
    }

    /// One HTTP request to addr:port; the instance id that answered.
    fn fetch(&self, addr: &str, port: u16) -> Option<String> {
        // A flow the node drops would wait for TCP's own connect timeout.
        let o = self
            .bash(&format!(
                "timeout 3 bash -c 'exec 3<>/dev/tcp/{addr}/{port} && printf \"GET / HTTP/1.0\\r\\n\\r\\n\" >&3 && cat <&3'"
            ))
            .output()
            .ok()?;
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines()
            .find_map(|l| l.strip_prefix("id="))
            .map(|s| s.trim().to_owned())
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
    }
}

#[test]
fn a_published_port_is_balanced_at_every_node_over_every_cell_and_flows_stick() {
    common::require_root();
    // Bound after the cells, so dropped before them.
    let Cluster {
        mut cells,
        fabric,
        addrs: node_addrs,
    } = Cluster::with_subnets(2);
    let names: Vec<String> = cells.iter().map(|c| c.name.clone()).collect();
    // The uplinks exist now: restart each agent balancing published ports
    // on its own.
    for cell in &mut cells {
        let text = std::fs::read_to_string(&cell.config).unwrap();
        std::fs::write(
            &cell.config,
            text.replace("[network]\n", "[network]\nuplinks = [\"n0\"]\n"),
        )
        .unwrap();
        cell.stop_agent();
        cell.spawn_agent();
    }
    fabric.wait_connected(2);
    let client = Client::new(&fabric, "10.99.0.250");

    // One instance, published on every node's port 30080.
    let root = common::rootfs();
    fabric.cli_ok(&[
        "push",
        "edge",
        "--tenant",
        "acme",
        "--instances",
        "1",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--disk",
        "64",
        "--port",
        "8080:30080",
        "--",
        "/bin/sh",
        "-c",
        SERVER,
    ]);
    let app = fabric.wait_json(&["app", "edge", "--tenant", "acme"], "1 running", |v| {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["state"] == "running")
    });
    let first = app["instances"][0].clone();
    let first_id = first["id"].as_str().unwrap().to_owned();
    let home = names
        .iter()
        .position(|n| first["cell"] == n.as_str())
        .unwrap();
    let home_addr = node_addrs[home].clone();
    wait(
        "the published service on both cells",
        || context(&fabric, &cells),
        || {
            cells
                .iter()
                .all(|c| gauge(c, "corral_lb_services") == Some(2))
        },
    );

    // From outside, through the node that runs it: every request answered
    // by the instance, from the node's address (a real TCP handshake).
    for _ in 0..10 {
        assert_eq!(
            client.fetch(&home_addr, 30080).as_deref(),
            Some(first_id.as_str())
        );
    }
    let local = "corral_north_south_packets_total{verdict=\"local\"}";
    let counted = cells[home]
        .metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix(local)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0);
    assert!(counted >= 10.0, "{}", cells[home].metrics());

    // A flow opened now keeps its backend while the service grows.
    let held = client
        .bash(&format!(
            "exec 3<>/dev/tcp/{home_addr}/30080 && sleep 6 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 3 cat <&3"
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    fabric.cli_ok(&["scale", "edge", "3", "--tenant", "acme"]);
    wait(
        "3 backends on both cells",
        || context(&fabric, &cells),
        || {
            cells
                .iter()
                .all(|c| gauge(c, "corral_lb_backends") == Some(3))
        },
    );
    let out = common::wait_with_timeout(held, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("id={first_id}")),
        "the held flow moved or broke: {text:?}"
    );

    // New flows through either node reach every instance, on both cells
    // (a flow for another cell's instance travels there in IPIP and is
    // answered from there, with the address the client used).
    let all: Vec<String> = fabric.cli_json(&["app", "edge", "--tenant", "acme"])["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(all.len(), 3);
    for addr in &node_addrs {
        let mut answered = BTreeMap::new();
        let mut failed = 0;
        for _ in 0..45 {
            match client.fetch(addr, 30080) {
                Some(id) => *answered.entry(id).or_insert(0) += 1,
                None => failed += 1,
            }
        }
        assert_eq!(
            failed,
            0,
            "through {addr}: {answered:?}\n{}",
            context(&fabric, &cells)
        );
        for id in &all {
            assert!(
                answered.contains_key(id),
                "{id} not reached through {addr}: {answered:?}"
            );
        }
    }
    for c in &cells {
        let m = c.metrics();
        assert!(
            m.contains("corral_north_south_packets_total{verdict=\"forwarded\"}")
                && m.contains("corral_north_south_packets_total{verdict=\"decapsulated\"}"),
            "{m}"
        );
    }

    fabric.cli_ok(&["delete-app", "edge", "--tenant", "acme"]);
    no_service_left(&fabric, &cells);
}

/// A UDP server in an instance's network namespace (a thread of this test
/// that entered it), answering every datagram with `id=<instance>`.
struct UdpServer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpServer {
    fn start(pid: u64, id: String, port: u16) -> UdpServer {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
            #[allow(unsafe_code)]
            // SAFETY: setns(2) on this thread only, with a namespace fd we own.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let sock = std::net::UdpSocket::bind(("0.0.0.0", port)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !flag.load(Ordering::Relaxed) {
                if let Ok((_, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(format!("id={id}\n").as_bytes(), from);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("udp server up");
        UdpServer {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `bash -c script` inside instance `id` of `cell`: in its network
/// namespace and its cgroup2 directory, where the balancer's programs are
/// attached (as the instance's own processes are).
fn in_instance(cell: &Cell, id: &str, script: &str) -> String {
    let pid = cell.get(id)["pid"].as_u64().unwrap();
    let procs = format!(
        "/sys/fs/cgroup/unified/{}/{id}/cgroup.procs",
        cell.cgroup_root
    );
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {procs} && exec nsenter --net=/proc/{pid}/ns/net timeout 20 bash -c \"$0\""
        ))
        .arg(script)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn udp_goes_through_a_vip_and_a_service_without_ready_instances_refuses_at_once() {
    common::require_root();
    // Bound after the cells, so dropped before them.
    let Cluster { cells, fabric, .. } = Cluster::with_subnets(2);
    let root = common::rootfs();
    let push = |name: &str, n: &str, port: &str| {
        fabric.cli_ok(&[
            "push",
            name,
            "--tenant",
            "acme",
            "--instances",
            n,
            "--rootfs",
            root.to_str().unwrap(),
            "--memory",
            "32",
            "--disk",
            "64",
            "--port",
            port,
            "--",
            "/bin/sh",
            "-c",
            "exec sleep 100000",
        ]);
    };
    // Two instances serving UDP 5353 (servers run by this test inside
    // their namespaces), and a client instance.
    push("dns", "2", "5353/udp");
    push("client", "1", "9/tcp");
    let running = |app: &str, n: usize| {
        fabric.wait_json(&["app", app, "--tenant", "acme"], "running", |v| {
            v["instances"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|i| i["state"] == "running")
                .count()
                == n
        })
    };
    let dns = running("dns", 2);
    let vip = dns["app"]["vip"].as_str().unwrap().to_owned();
    let cell_of = |i: &serde_json::Value| -> &Cell {
        cells.iter().find(|c| i["cell"] == c.name.as_str()).unwrap()
    };
    let mut servers = Vec::new();
    let mut dns_ids = Vec::new();
    for i in dns["instances"].as_array().unwrap() {
        let id = i["id"].as_str().unwrap().to_owned();
        let pid = cell_of(i).get(&id)["pid"].as_u64().unwrap();
        servers.push(UdpServer::start(pid, id.clone(), 5353));
        dns_ids.push(id);
    }
    // The client app has a TCP port nobody listens on: never ready, but
    // running, which is all a client needs.
    let client = running("client", 1)["instances"][0].clone();
    let client_id = client["id"].as_str().unwrap().to_owned();
    let client_cell = cell_of(&client);
    wait(
        "the dns service on the client's cell",
        || context(&fabric, &cells),
        || {
            client_cell
                .metrics()
                .lines()
                .any(|l| l == "corral_lb_backends 2")
        },
    );

    // UDP through the VIP (bash's /dev/udp connects the socket), many
    // times: both instances answer. (`head` reads a whole datagram; bash's
    // `read` would take it one byte at a time, losing the rest.)
    let out = in_instance(
        client_cell,
        &client_id,
        &format!(
            "for i in $(seq 30); do exec 3<>/dev/udp/{vip}/5353; echo q >&3; timeout 2 head -n 1 <&3; exec 3<&-; done"
        ),
    );
    for id in &dns_ids {
        assert!(
            out.contains(&format!("id={id}")),
            "{id} never answered: {out}"
        );
    }

    // Scaled to zero: the service stays, with no backend, and a connect to
    // it is refused at once instead of hanging.
    fabric.cli_ok(&["scale", "dns", "0", "--tenant", "acme"]);
    wait(
        "no dns backend",
        || context(&fabric, &cells),
        || {
            client_cell
                .metrics()
                .lines()
                .any(|l| l == "corral_lb_backends 0")
        },
    );
    let out = in_instance(
        client_cell,
        &client_id,
        &format!("exec 3<>/dev/udp/{vip}/5353 && echo connected"),
    );
    // The errno itself shows it was refused, not timed out.
    assert!(out.contains("Connection refused"), "{out}");
    drop(servers);
    for app in ["dns", "client"] {
        fabric.cli_ok(&["delete-app", app, "--tenant", "acme"]);
    }
    for c in &cells {
        c.delete_all();
    }
}

/// The brain's `corral_brain_instance_crashes_total`, read from its API
/// inside the fabric's namespace.
fn brain_crashes(fabric: &Fabric) -> u64 {
    let o = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", fabric.netns))
        .args([
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{}/{} && printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 3 cat <&3",
                common::cluster::BRAIN_IP,
                common::cluster::API_PORT
            ),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("corral_brain_instance_crashes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[test]
fn an_instance_failing_its_http_check_is_never_a_backend_and_is_restarted() {
    common::require_root();
    let Cluster { cells, fabric, .. } = Cluster::with_subnets(1);
    let cell = &cells[0];
    let root = common::rootfs();
    let push = |app: &str, page: &str| {
        fabric.cli_ok(&[
            "push",
            app,
            "--tenant",
            "acme",
            "--instances",
            "1",
            "--rootfs",
            root.to_str().unwrap(),
            "--memory",
            "32",
            "--disk",
            "64",
            "--port",
            "8080",
            "--health-check",
            "http:8080/healthz,start=3,failures=2",
            "--",
            "/bin/sh",
            "-c",
            &format!("mkdir -p /www && echo ok > /www/{page} && exec httpd -f -p 8080 -h /www"),
        ]);
    };
    // `well` serves /healthz; `sick` answers it with 404.
    push("well", "healthz");
    push("sick", "index.html");
    wait(
        "well's backend",
        || context_one(&fabric, cell),
        || gauge(cell, "corral_lb_backends") == Some(1),
    );

    // Over several start timeouts, sick is killed and restarted again and
    // again (its crashes counted by the brain), and never becomes a backend.
    let crashes_before = brain_crashes(&fabric);
    let mut sick_ids = std::collections::BTreeSet::new();
    let mut reasons = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while brain_crashes(&fabric) < crashes_before + 2 {
        assert!(
            Instant::now() < deadline,
            "sick was not restarted twice\n{}",
            context_one(&fabric, cell)
        );
        assert_eq!(
            gauge(cell, "corral_lb_backends"),
            Some(1),
            "sick became a backend"
        );
        let v = fabric.cli_json(&["app", "sick", "--tenant", "acme"]);
        for i in v["instances"].as_array().unwrap() {
            sick_ids.insert(i["id"].as_str().unwrap().to_owned());
            if let Some(r) = i["reason"].as_str() {
                reasons.push(r.to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    // The cell says why it killed them (the crashed records themselves are
    // removed by the brain as soon as it has counted them).
    assert!(
        cell.agent_log()
            .contains("killing the instance: health check did not pass within 3000 ms"),
        "{}",
        cell.agent_log()
    );
    eprintln!("sick instances seen: {sick_ids:?}, reasons: {reasons:?}");
    let well = fabric.cli_json(&["app", "well", "--tenant", "acme"]);
    assert_eq!(well["instances"][0]["state"], "running", "{well}");
    for app in ["well", "sick"] {
        fabric.cli_ok(&["delete-app", app, "--tenant", "acme"]);
    }
    cell.delete_all();
}

fn context_one(fabric: &Fabric, cell: &Cell) -> String {
    format!(
        "metrics:\n{}\nbrain log:\n{}\ncell log:\n{}",
        cell.metrics(),
        fabric.brain_log(),
        cell.agent_log()
    )
}
