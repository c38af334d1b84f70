//! A brain and three cells, each in its own node namespace, with real
//! agents and containers, driven through the `corral` CLI: placement across
//! cells and zones, scaling, healing a killed process, losing and regaining
//! a node, a brain restart that restarts nothing, a cell drained through its
//! own agent (`corral cell drain`), and a cell from another CA refused.
//!
//! Run as root through `cargo xtask test`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{Cluster, Fabric};
use common::{rootfs, Cell};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `corral app web -o json` instances that are running, by cell.
fn running_by_cell(app: &Value) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for i in app["instances"].as_array().unwrap() {
        if i["state"] == "running" {
            *by.entry(i["cell"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
    }
    by
}

fn running_ids(app: &Value) -> BTreeSet<String> {
    app["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .collect()
}

fn total(app: &Value) -> usize {
    running_by_cell(app).values().sum()
}

/// Runs `corral` against a cell's agent socket.
fn cell_cli(cell: &Cell, args: &[&str]) -> std::process::Output {
    Command::new(common::cluster::cli_bin())
        .arg("--agent")
        .arg(cell.run_dir().join("agent.sock"))
        .args(args)
        .output()
        .unwrap()
}

/// `corral cell drain --wait` on `cell`, watching the app meanwhile:
/// the CLI's output and the fewest instances seen running.
fn drain(cell: &Cell, fabric: &Fabric, app: &[&str]) -> (std::process::Output, usize) {
    let mut child = Command::new(common::cluster::cli_bin())
        .arg("--agent")
        .arg(cell.run_dir().join("agent.sock"))
        .args(["cell", "drain", "--wait", "90", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The CLI gives up 30 s after its --wait, so this loop ends.
    let mut fewest = usize::MAX;
    while child.try_wait().unwrap().is_none() {
        fewest = fewest.min(total(&fabric.cli_json(app)));
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    (out, fewest)
}

/// Instances the cell's own agent runs (starting or running).
fn live_on(cell: &Cell) -> usize {
    let v = cell.client.get("/v1/instances").unwrap().json().unwrap();
    v["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["state"] == "running" || i["state"] == "starting")
        .count()
}

#[test]
fn a_brain_places_scales_and_heals_across_three_cells() {
    common::require_root();
    let names: Vec<String> = (0..3).map(|_| Cell::new_name()).collect();
    let ids: Vec<&str> = names.iter().map(String::as_str).collect();
    // Declared before the fabric, so dropped after it: if the test fails,
    // the brain is stopped before the cells are emptied.
    let mut cells = Vec::new();
    let mut fabric = Fabric::new(&ids);
    fabric.start_brain();
    for (i, name) in names.iter().enumerate() {
        let cell = Cell::start_named(name, &fabric.agent_config(name, &format!("z{}", i + 1)));
        fabric.attach(&cell);
        cells.push(cell);
    }
    fabric.wait_connected(3);

    // Six instances: two on each cell (one cell per zone).
    let root = rootfs();
    let out = fabric.cli(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "6",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--disk",
        "64",
        "--",
        "/bin/sleep",
        "100000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = ["app", "web", "--tenant", "acme"];
    let v = fabric.wait_json(&app, "6 running", |v| total(v) == 6);
    let by = running_by_cell(&v);
    assert_eq!(by.len(), 3, "{v}");
    assert!(by.values().all(|n| *n == 2), "{by:?}");

    // Scale up, then down.
    assert!(fabric
        .cli(&["scale", "web", "8", "--tenant", "acme"])
        .status
        .success());
    fabric.wait_json(&app, "8 running", |v| total(v) == 8);
    assert!(fabric
        .cli(&["scale", "web", "4", "--tenant", "acme"])
        .status
        .success());
    let v = fabric.wait_json(&app, "4 running", |v| {
        total(v) == 4 && v["instances"].as_array().unwrap().len() == 4
    });

    // Kill an instance's process: it is replaced.
    let victim = v["instances"][0]["id"].as_str().unwrap().to_owned();
    let on = v["instances"][0]["cell"].as_str().unwrap().to_owned();
    let cell = cells.iter().find(|c| c.name == on).unwrap();
    let pid = cell.get(&victim)["pid"].as_u64().unwrap();
    #[allow(unsafe_code)]
    // SAFETY: kill(2) on the init of a container this test started.
    unsafe {
        libc::kill(pid as i32, libc::SIGKILL);
    }
    let v = fabric.wait_json(&app, "the killed instance replaced", |v| {
        total(v) == 4 && !running_ids(v).contains(&victim)
    });
    let before_loss = running_ids(&v);

    // Take the third cell's node away (agent killed, link down): its
    // instances run elsewhere once the grace is over.
    let lost = cells[2].name.clone();
    let had = running_by_cell(&v).get(&lost).copied().unwrap_or(0);
    cells[2].kill9_agent();
    fabric.set_link(&cells[2], false);
    let t = Instant::now();
    fabric.wait_json(&app, "instances of the lost cell elsewhere", |v| {
        let by = running_by_cell(v);
        !by.contains_key(&lost) && by.values().sum::<usize>() == 4
    });
    eprintln!(
        "lost cell had {had} instances; replaced after {:?}",
        t.elapsed()
    );
    assert!(!before_loss.is_empty());
    // It comes back with its old instances still running: they are stopped,
    // and the app never stays above its count.
    fabric.set_link(&cells[2], true);
    cells[2].spawn_agent();
    fabric.wait_json(&["cells"], "the cell back", |v| {
        v["cells"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == lost.as_str() && c["state"] == "connected")
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while live_on(&cells[2]) > 0 {
        assert!(
            Instant::now() < deadline,
            "stale instances not stopped:\n{}",
            fabric.brain_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Converged: four running, and nothing else listed once the stale
    // copy's stop (SIGTERM, then SIGKILL after the grace) is done.
    fabric.wait_json(&app, "converged at 4", |v| {
        total(v) == 4 && v["instances"].as_array().unwrap().len() == 4
    });

    // A brain restart restarts nothing and keeps the app.
    let v = fabric.cli_json(&app);
    let ids_before = running_ids(&v);
    fabric.stop_brain();
    fabric.start_brain();
    fabric.wait_json(&["cells"], "cells back after the restart", |v| {
        v["cells"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == "connected")
            .count()
            == 3
    });
    std::thread::sleep(Duration::from_secs(6));
    let v = fabric.wait_json(&app, "4 running", |v| total(v) == 4);
    assert_eq!(running_ids(&v), ids_before, "no instance restarted");

    // Drain the cell that runs the most, with the CLI on its agent's
    // socket: its instances are started elsewhere before they are stopped
    // on it, so the app never runs fewer than four.
    let (drained, had) = running_by_cell(&v)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .unwrap();
    let cell = cells.iter().find(|c| c.name == drained).unwrap();
    let t = Instant::now();
    let (out, fewest) = drain(cell, &fabric, &app);
    assert!(
        out.status.success(),
        "corral cell drain: {}{}\nbrain log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        fabric.brain_log()
    );
    eprintln!(
        "drained {had} instances off {drained} in {:?}; fewest running meanwhile: {fewest}",
        t.elapsed()
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&body["evacuating"], &body["remaining"]),
        (&Value::from(true), &Value::from(0)),
        "{body}"
    );
    assert_eq!(live_on(cell), 0);
    assert!(
        fewest >= 4,
        "the app dropped to {fewest} running while draining"
    );
    fabric.wait_json(&app, "4 running, none on the drained cell", |v| {
        let by = running_by_cell(v);
        !by.contains_key(&drained) && by.values().sum::<usize>() == 4
    });
    let v = fabric.cli_json(&["cells"]);
    let view = v["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == drained.as_str())
        .unwrap();
    assert_eq!(view["state"], "draining", "{v}");
    let state = cell.client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["evacuating"], true);
    assert!(cell.metrics().contains("corral_cell_evacuating 1"));
    // Undrained, the agent takes work again. (The brain does not yet take
    // a cell back when it stops evacuating: see agent/tests/brain_interop.rs.)
    let out = cell_cli(cell, &["cell", "undrain", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&body["evacuating"], &body["changed"]),
        (&Value::from(false), &Value::from(true)),
        "{body}"
    );
    let state = cell.client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["evacuating"], false);

    // A cell whose certificate comes from another CA is refused.
    let rogue_name = Cell::new_name();
    let other = tempfile::tempdir().unwrap();
    let oc = other.path().to_str().unwrap();
    let brain_bin = common::cluster::brain_bin();
    for args in [
        vec!["certs", "init", "--dir", oc],
        vec!["certs", "issue", "--dir", oc, "--cell", &rogue_name],
    ] {
        let o = std::process::Command::new(&brain_bin)
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success());
    }
    let rogue = Cell::start_named(
        &rogue_name,
        &fabric.agent_config_with(&rogue_name, "z1", other.path()),
    );
    fabric.attach(&rogue);
    std::thread::sleep(Duration::from_secs(3));
    let v = fabric.cli_json(&["cells"]);
    assert!(
        !v["cells"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == rogue_name.as_str()),
        "{v}"
    );
    assert!(
        fabric.brain_log().contains("refused"),
        "{}",
        fabric.brain_log()
    );
    fabric.detach(&rogue);
    drop(rogue);

    // Delete the app: every instance stops; nothing is left on any cell.
    assert!(fabric
        .cli(&["delete-app", "web", "--tenant", "acme"])
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while cells.iter().map(live_on).sum::<usize>() > 0 {
        assert!(Instant::now() < deadline, "{}", fabric.brain_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    fabric.stop_brain();
    for cell in &cells {
        fabric.detach(cell);
        cell.delete_all();
    }
    std::thread::sleep(Duration::from_secs(1));
    for cell in &cells {
        cell.assert_clean();
    }
}

#[test]
fn a_cell_that_drains_on_stop_hands_its_instances_over_before_it_exits() {
    common::require_root();
    // Bound after the cells, so dropped before them.
    let Cluster {
        mut cells, fabric, ..
    } = Cluster::start(2, |i, name, fabric| {
        let mut extra = fabric.agent_config(name, &format!("z{}", i + 1));
        if i == 0 {
            extra.push_str("[shutdown]\ndrain = true\ndrain_timeout_secs = 120\n");
        }
        extra
    });
    let names: Vec<String> = cells.iter().map(|c| c.name.clone()).collect();
    let root = rootfs();
    let out = fabric.cli(&[
        "push",
        "web",
        "--tenant",
        "acme",
        "--instances",
        "4",
        "--rootfs",
        root.to_str().unwrap(),
        "--memory",
        "32",
        "--disk",
        "64",
        "--",
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 1; done",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let app = ["app", "web", "--tenant", "acme"];
    let v = fabric.wait_json(&app, "4 running on both cells", |v| {
        total(v) == 4 && running_by_cell(v).len() == 2
    });
    let before = running_ids(&v);

    // SIGTERM to the draining cell's agent: it exits only once the brain
    // has moved every instance away.
    let took = cells[0].stop_agent_within(Duration::from_secs(150));
    let shims = cells[0].shim_pids();
    assert!(
        shims.is_empty(),
        "instances left on the drained cell: shims {shims:?}"
    );
    let v = fabric.wait_json(&app, "4 running, all on the other cell", |v| {
        let by = running_by_cell(v);
        total(v) == 4 && by.get(names[1].as_str()) == Some(&4)
    });
    eprintln!("drained on stop in {took:?}");
    assert_ne!(running_ids(&v), before, "nothing was replaced");
    assert!(
        cells[0]
            .agent_log()
            .contains("drained: no LRP instance left"),
        "{}",
        cells[0].agent_log()
    );

    // Started again, the cell takes work: the drain was the stop's.
    cells[0].spawn_agent();
    let state = cells[0].client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["evacuating"], false, "{state}");

    assert!(fabric
        .cli(&["delete-app", "web", "--tenant", "acme"])
        .status
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    while cells.iter().map(live_on).sum::<usize>() > 0 {
        assert!(Instant::now() < deadline, "{}", fabric.brain_log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for cell in &cells {
        cell.delete_all();
    }
}
