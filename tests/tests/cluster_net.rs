//! The data plane across cells: a brain and two cells with instance subnets
//! in node namespaces joined by a bridge. The brain hands each cell routes to
//! the other's subnet and the cluster-wide endpoint map; an instance reaches
//! a same-tenant instance on the other cell, another tenant's connection is
//! dropped on its own cell (and counted) until a policy made on the brain
//! lets it through, and the entries go when the instances go.
//!
//! Run as root through `cargo xtask test`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::Fabric;
use common::{task, Cell};
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs a task of `tenant` on `cell` that fetches `addr`:8080, retrying for
/// a few seconds (policies and endpoints travel through the brain); true if
/// it got the page.
fn connects(cell: &Cell, id: &str, tenant: &str, addr: &str, tries: u32) -> bool {
    let mut t = task(&format!(
        "i=0; while [ $i -lt {tries} ]; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 {addr} 8080 | grep -q hello && exit 0; i=$((i+1)); sleep 0.3; done; exit 1"
    ));
    t["tenant"] = serde_json::json!(tenant);
    cell.put_ok(id, &t);
    let v = cell.wait_for(id, "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    cell.delete(id);
    v["exit_code"] == 0
}

/// Runs one task of `tenant` on `cell` that tries each address once (TCP
/// 8080) and reports which answered.
fn reach(cell: &Cell, id: &str, tenant: &str, addrs: &[String]) -> Vec<(String, bool)> {
    let list = addrs.join(" ");
    let mut t = task(&format!(
        "for a in {list}; do if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 1 $a 8080 | grep -q hello; then echo \"$a ok\"; else echo \"$a fail\"; fi; done"
    ));
    t["tenant"] = serde_json::json!(tenant);
    cell.put_ok(id, &t);
    cell.wait_for(id, "ended", |v| {
        v["state"] == "exited" || v["state"] == "crashed"
    });
    let logs = cell.logs(id);
    cell.delete(id);
    addrs
        .iter()
        .map(|a| (a.clone(), logs.contains(&format!("{a} ok"))))
        .collect()
}

/// The node (its own network namespace, not an instance) fetches a page.
fn node_reaches(cell: &Cell, addr: &str) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cell.netns))
        .args([
            "bash",
            "-c",
            &format!(
                "exec 3<>/dev/tcp/{addr}/8080 && printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3 && timeout 2 cat <&3 | grep -q hello"
            ),
        ])
        .status()
        .is_ok_and(|s| s.success())
}

fn drops(cell: &Cell, tenant: &str) -> u64 {
    let series = format!("corral_network_drops_total{{tenant=\"{tenant}\",reason=\"policy\"}}");
    cell.metrics()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(0, |v| v as u64)
}

fn routes(cell: &Cell) -> String {
    let o = Command::new("ip")
        .args(["-n", &cell.netns, "route", "show", "proto", "200"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn remote_endpoints(cell: &Cell) -> Vec<Value> {
    let dp = cell.client.get("/v1/dataplane").unwrap().json().unwrap();
    dp["endpoints"].as_array().cloned().unwrap_or_default()
}

fn wait(what: &str, ctx: impl Fn() -> String, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn tenants_reach_their_own_instances_across_cells_and_policies_open_the_rest() {
    common::require_root();
    let names: Vec<String> = (0..2).map(|_| Cell::new_name()).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    // Declared before the fabric, so dropped after it: if the test fails,
    // the brain is stopped before the cells are emptied.
    let mut cells = Vec::new();
    let mut fabric = Fabric::new(&ids);
    fabric.start_brain();
    for (i, name) in names.iter().enumerate() {
        let extra = format!(
            "{}[network]\nsubnet = \"10.244.{}.0/24\"\n",
            fabric.agent_config(name, &format!("z{}", i + 1)),
            i + 1
        );
        let cell = Cell::start_named(name, &extra);
        fabric.attach(&cell);
        cells.push(cell);
    }
    fabric.wait_connected(2);

    let ctx = || {
        format!(
            "endpoints: {:?} / {:?}\ninstances: {} / {}\nbrain log:\n{}\ncell 1 log:\n{}\ncell 2 log:\n{}",
            remote_endpoints(&cells[0]),
            remote_endpoints(&cells[1]),
            cells[0].client.get("/v1/instances").unwrap().text(),
            cells[1].client.get("/v1/instances").unwrap().text(),
            fabric.brain_log(),
            cells[0].agent_log(),
            cells[1].agent_log()
        )
    };
    // Each cell routes the other's subnet via the other's node address.
    wait("routes to the other cell", ctx, || {
        routes(&cells[0]).contains("10.244.2.0/24 via 10.99.0.3")
            && routes(&cells[1]).contains("10.244.1.0/24 via 10.99.0.2")
    });

    // An app of acme with one instance per cell.
    let root = common::rootfs();
    let out = fabric.cli(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "2",
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
        "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = fabric.wait_json(
        &["app", "web", "--tenant", "acme"],
        "2 running with addresses",
        |v| {
            let l = v["instances"].as_array().unwrap();
            l.len() == 2
                && l.iter()
                    .all(|i| i["state"] == "running" && i["address"].is_string())
        },
    );
    let on = |cell: &Cell| -> String {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["cell"] == cell.name.as_str())
            .unwrap_or_else(|| panic!("no instance on {}: {v}", cell.name))["address"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let far = on(&cells[1]);
    assert!(far.starts_with("10.244.2."), "{far}");

    // Cell 1 learns cell 2's instance as a remote endpoint of acme.
    wait("the remote endpoint on cell 1", ctx, || {
        remote_endpoints(&cells[0])
            .iter()
            .any(|e| e["address"] == far.as_str() && e["tenant"] == "acme")
    });

    // Same tenant across cells: through.
    assert!(connects(&cells[0], "probe-acme", "acme", &far, 10));

    // A second tenant with an instance on each cell too; then every pair:
    // each tenant, from each cell, to every instance of both tenants.
    let out = fabric.cli(&[
        "push",
        "shop",
        "--tenant",
        "globex",
        "--instances",
        "2",
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
        "mkdir -p /www && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shop = fabric.wait_json(
        &["app", "shop", "--tenant", "globex"],
        "shop running",
        |v| {
            let l = v["instances"].as_array().unwrap();
            l.len() == 2
                && l.iter()
                    .all(|i| i["state"] == "running" && i["address"].is_string())
        },
    );
    let addrs = |v: &Value| -> Vec<String> {
        v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["address"].as_str().unwrap().to_owned())
            .collect()
    };
    let acme_addrs = addrs(&v);
    let globex_addrs = addrs(&shop);
    let all: Vec<String> = acme_addrs.iter().chain(&globex_addrs).cloned().collect();
    wait("every endpoint on both cells", ctx, || {
        cells.iter().all(|c| {
            let eps = remote_endpoints(c);
            all.iter()
                .all(|a| eps.iter().any(|e| e["address"] == a.as_str()))
        })
    });
    let drops_before: Vec<u64> = cells
        .iter()
        .map(|c| drops(c, "acme") + drops(c, "globex"))
        .collect();
    for (n, cell) in cells.iter().enumerate() {
        for (tenant, own) in [("acme", &acme_addrs), ("globex", &globex_addrs)] {
            for (addr, ok) in reach(cell, &format!("pairs-{tenant}-{n}"), tenant, &all) {
                assert_eq!(
                    ok,
                    own.contains(&addr),
                    "{tenant} on cell {n} -> {addr}: {}",
                    if ok {
                        "connected across tenants"
                    } else {
                        "same tenant refused"
                    }
                );
            }
        }
        // The node itself reaches every instance on it and elsewhere.
        for addr in &all {
            assert!(node_reaches(cell, addr), "node {n} -> {addr}");
        }
    }
    for (n, cell) in cells.iter().enumerate() {
        let after = drops(cell, "acme") + drops(cell, "globex");
        assert!(after > drops_before[n], "cell {n}: drops did not rise");
    }
    // Another tenant: dropped on its own cell, and counted there.
    let before = drops(&cells[0], "globex");
    assert!(!connects(&cells[0], "probe-globex", "globex", &far, 2));
    assert!(drops(&cells[0], "globex") > before);

    // A policy made on the brain opens it; deleting it closes it again.
    let out = fabric.cli(&[
        "policy",
        "add",
        "globex",
        "acme",
        "--protocol",
        "tcp",
        "--port",
        "8080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = fabric.cli_json(&["policies"]);
    assert_eq!(listed["policies"].as_array().unwrap().len(), 1, "{listed}");
    assert!(connects(&cells[0], "probe-globex-2", "globex", &far, 20));
    let out = fabric.cli(&[
        "policy",
        "delete",
        "globex",
        "acme",
        "--protocol",
        "tcp",
        "--port",
        "8080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait("the policy gone from cell 1", ctx, || {
        let dp = cells[0]
            .client
            .get("/v1/dataplane")
            .unwrap()
            .json()
            .unwrap();
        dp["policies"] == 0
    });
    assert!(!connects(&cells[0], "probe-globex-3", "globex", &far, 2));

    // A policy for one app opens that app only: one for acme's (empty) app
    // "api" leaves "web" closed; one for "web" opens it.
    let out = fabric.cli(&[
        "push",
        "api",
        "--tenant",
        "acme",
        "--instances",
        "0",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--",
        "/bin/true",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app_policy = |verb: &str, app: &str| {
        let out = fabric.cli(&[
            "policy",
            verb,
            "globex",
            "acme",
            "--app",
            app,
            "--protocol",
            "tcp",
            "--port",
            "8080",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let policies_on_cell_1 = |n: u64| {
        wait(&format!("{n} policies on cell 1"), ctx, || {
            let dp = cells[0]
                .client
                .get("/v1/dataplane")
                .unwrap()
                .json()
                .unwrap();
            dp["policies"] == n
        });
    };
    app_policy("add", "api");
    policies_on_cell_1(1);
    assert!(!connects(&cells[0], "probe-globex-4", "globex", &far, 2));
    app_policy("add", "web");
    policies_on_cell_1(2);
    assert!(connects(&cells[0], "probe-globex-5", "globex", &far, 20));
    app_policy("delete", "web");
    app_policy("delete", "api");
    policies_on_cell_1(0);
    assert!(!connects(&cells[0], "probe-globex-6", "globex", &far, 2));
    let out = fabric.cli(&["policy", "add", "globex", "acme", "--app", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tenant acme has no app nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = fabric.cli(&["delete-app", "api", "--tenant", "acme"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A policy naming an unknown tenant is refused by the brain.
    let out = fabric.cli(&["policy", "add", "nobody", "acme"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown tenant nobody"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The apps go: so do their endpoints, on both cells.
    for (app, tenant) in [("web", "acme"), ("shop", "globex")] {
        let out = fabric.cli(&["delete-app", app, "--tenant", tenant]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait("no endpoints left", ctx, || {
        cells.iter().all(|c| remote_endpoints(c).is_empty())
    });
    fabric.stop_brain();
    for cell in &cells {
        fabric.detach(cell);
    }
    for cell in &cells {
        cell.assert_clean();
    }
}
