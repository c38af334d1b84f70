//! `cargo xtask demo`: one cell agent in a throw-away network namespace, a
//! long-running process and a task, and a tour of the agent's API.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::http::Client;
use crate::sandbox::{self, Capacity, Sandbox, Spec};
use crate::util::{fmt_duration, is_root, step};
use crate::{deps, rootfs};

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo creates a network namespace, cgroups and containers: run it as root");
    }
    step("checking dependencies", deps::run)?;
    let agent_bin = sandbox::build_agent("debug", &["--workspace", "--bins"])?;
    let rootfs = step("preparing the busybox rootfs", rootfs::ensure)?;
    println!("rootfs: {}", rootfs.display());

    let sandbox = step("starting a cell agent in its own network namespace", || {
        Sandbox::start(&Spec {
            prefix: "corral-demo",
            cell_id: "demo-cell-1",
            agent_bin: agent_bin.clone(),
            stop_grace_secs: 2,
            capacity: Capacity {
                memory_mb: 4096,
                disk_mb: 10240,
                max_containers: 250,
            },
            subnet: Some("10.244.1.0/24"),
        })
    })?;
    let api = &sandbox.client;

    section(
        "starting two instances",
        "`web` is a long-running process (LRP) of tenant acme; `job` is a one-off \
         task of tenant globex that fails on purpose with exit code 3",
    );
    put(api, "web", &web_spec(&rootfs))?;
    put(api, "job", &job_spec(&rootfs))?;

    section(
        "instances (GET /v1/instances)",
        "what the cell runs right now",
    );
    print_instances(api)?;

    println!("\nletting them run for 3 s ...");
    thread::sleep(Duration::from_secs(3));
    let job = api.get("/v1/instances/job")?.ok()?.json()?;
    println!(
        "job is now {}, exit code {} (its command ends with `exit 3`)",
        text(&job["state"]),
        text(&job["exit_code"])
    );

    for id in ["web", "job"] {
        section(
            &format!("logs of {id} (GET /v1/instances/{id}/logs)"),
            "one line per output line: timestamp, stream, F(ull)/P(artial), text",
        );
        let logs = api.get(&format!("/v1/instances/{id}/logs"))?.ok()?;
        for line in logs.body.lines() {
            println!("  {line}");
        }
    }

    section(
        "tenant isolation (eBPF on each instance's veth)",
        "a task of tenant acme and one of tenant globex each fetch web's page (web is acme's); \
         the data plane lets acme through and drops globex's packets",
    );
    let web = api.get("/v1/instances/web")?.ok()?.json()?;
    let addr = text(&web["address"]);
    println!("web listens on {addr}:8080");
    for tenant in ["acme", "globex"] {
        let id = format!("probe-{tenant}");
        put(api, &id, &probe_spec(&rootfs, tenant, &addr))?;
    }
    for tenant in ["acme", "globex"] {
        let id = format!("probe-{tenant}");
        let v = wait_ended(api, &id)?;
        let logs = api.get(&format!("/v1/instances/{id}/logs"))?.ok()?;
        let got = logs
            .body
            .lines()
            .find(|l| l.contains("hello from"))
            .map(|l| l.rsplit(" F ").next().unwrap_or(l).to_owned());
        match got {
            Some(page) => println!("{id}: exit {}, got {page:?}", text(&v["exit_code"])),
            None => println!("{id}: exit {}, no answer (dropped)", text(&v["exit_code"])),
        }
        api.delete(&format!("/v1/instances/{id}"))?.ok()?;
    }
    let metrics = api.get("/metrics")?.ok()?;
    for line in metrics.body.lines().filter(|l| {
        l.starts_with("corral_network_drops_total")
            || l.starts_with("corral_tenant_network_bytes_total")
    }) {
        println!("  {line}");
    }

    section(
        "cell state (GET /v1/state)",
        "what the cell reports to the brain: identity and capacity left for bids",
    );
    let mut state = api.get("/v1/state")?.ok()?.json()?;
    let count = state["instances"].as_array().map_or(0, Vec::len);
    if let Some(map) = state.as_object_mut() {
        map.remove("instances");
    }
    println!("{}", serde_json::to_string_pretty(&state)?);
    println!("(plus {count} instances, as listed above)");

    section(
        "metrics (GET /metrics, corral_* series)",
        "the same Prometheus text an SRE scrapes; the socket serves it too",
    );
    let metrics = api.get("/metrics")?.ok()?;
    for line in metrics.body.lines().filter(|l| l.starts_with("corral_")) {
        println!("  {line}");
    }

    section(
        "deleting both instances",
        "DELETE returns once the instance is stopped and removed",
    );
    for id in ["web", "job"] {
        let start = Instant::now();
        api.delete(&format!("/v1/instances/{id}"))?.ok()?;
        println!("deleted {id} in {}", fmt_duration(start.elapsed()));
    }
    let left = sandbox::instance_ids(&api.get("/v1/instances")?.ok()?.json()?);
    if !left.is_empty() {
        bail!("instances still listed after DELETE: {}", left.join(", "));
    }
    println!("GET /v1/instances lists no instances: both are gone");

    drop(sandbox);

    section(
        "a brain and two cells",
        "corral-brain in a fabric namespace with a bridge; two cells in their own node \
         namespaces connect to it over QUIC with mutual TLS; apps of two tenants are \
         pushed, scaled and deleted with the corral CLI",
    );
    crate::demo_cluster::run(&agent_bin, &rootfs)?;
    println!("\ndemo finished");
    Ok(())
}

fn web_spec(rootfs: &Path) -> Value {
    json!({
        "tenant": "acme",
        "app": "hello",
        "index": 0,
        "kind": "lrp",
        "rootfs": rootfs,
        "command": [
            "/bin/sh", "-c",
            "mkdir -p /www && echo \"hello from $(hostname), tenant acme\" > /www/index.html && httpd -p 8080 -h /www && i=0; while true; do echo \"web tick $i\"; i=$((i+1)); sleep 1; done"
        ],
        "env": {},
        "resources": {"memory_mb": 64, "disk_mb": 64, "cpu_weight": 100, "max_pids": 64},
        "ports": [],
    })
}

fn job_spec(rootfs: &Path) -> Value {
    json!({
        "tenant": "globex",
        "app": "batch",
        "index": 0,
        "kind": "task",
        "rootfs": rootfs,
        "command": ["/bin/sh", "-c", "echo crunching numbers; echo oops >&2; exit 3"],
        "env": {},
        "resources": {"memory_mb": 32, "disk_mb": 32, "cpu_weight": 100, "max_pids": 16},
        "ports": [],
    })
}

fn probe_spec(rootfs: &Path, tenant: &str, addr: &str) -> Value {
    json!({
        "tenant": tenant,
        "app": "probe",
        "index": 0,
        "kind": "task",
        "rootfs": rootfs,
        "command": ["/bin/sh", "-c", format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} 8080")],
        "env": {},
        "resources": {"memory_mb": 16, "disk_mb": 16, "cpu_weight": 100, "max_pids": 16},
        "ports": [],
    })
}

fn wait_ended(api: &Client, id: &str) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = api.get(&format!("/v1/instances/{id}"))?.ok()?.json()?;
        if v["state"] == "exited" || v["state"] == "crashed" {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{id} did not end within 30 s: {v}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn section(title: &str, what: &str) {
    println!("\n==> {title}");
    println!("    {what}\n");
}

fn put(api: &Client, id: &str, spec: &Value) -> Result<()> {
    let start = Instant::now();
    let r = api.put(&format!("/v1/instances/{id}"), spec)?.ok()?;
    let inst = r.json()?;
    println!(
        "PUT /v1/instances/{id} -> {} in {}: state {}, pid {}",
        r.status,
        fmt_duration(start.elapsed()),
        text(&inst["state"]),
        text(&inst["pid"])
    );
    Ok(())
}

fn print_instances(api: &Client) -> Result<()> {
    let list = api.get("/v1/instances")?.ok()?.json()?;
    let cols = [
        "id",
        "tenant",
        "app",
        "kind",
        "state",
        "pid",
        "address",
        "exit_code",
    ];
    let mut rows = vec![cols.map(str::to_owned).to_vec()];
    for inst in list["instances"].as_array().into_iter().flatten() {
        rows.push(cols.iter().map(|c| text(&inst[*c])).collect());
    }
    let widths: Vec<usize> = (0..cols.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("  {}", cells.join("  ").trim_end());
    }
    Ok(())
}

/// A JSON value as a table cell: strings unquoted, null as `-`.
fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
