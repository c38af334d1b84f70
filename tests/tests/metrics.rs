//! `promtool check metrics` over real scrapes: a cell with the data plane,
//! an app placed by a brain, traffic to its instance and a task that ended;
//! and that brain. Every family in the scrapes is documented in
//! docs/metrics.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::cluster::{Fabric, API_PORT, BRAIN_IP};
use common::{rootfs, task, Cell};
use std::io::Write;
use std::process::{Command, Stdio};

/// `promtool check metrics` on `text`: its complaints (empty when clean).
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (cargo xtask deps installs prometheus)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said.trim().to_owned()
    } else {
        format!("promtool failed ({}): {said}", out.status)
    }
}

/// The metric families (`# TYPE name type`) of a scrape.
fn families(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// A family is documented when docs/metrics.md names one of its sample
/// names (counters are exposed as `<family>_total`).
fn undocumented(text: &str, docs: &str) -> Vec<String> {
    families(text)
        .into_iter()
        .filter(|f| {
            ![f.clone(), format!("{f}_total")]
                .iter()
                .any(|n| docs.contains(&format!("`{n}`")))
        })
        .collect()
}

/// GET /metrics from the brain (inside the fabric namespace) with extra
/// header lines; the body. busybox nc: its static wget crashes in glibc's
/// resolver on the host.
fn brain_get(fabric: &Fabric, headers: &str) -> String {
    let mut nc = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", fabric.netns))
        .arg(rootfs().join("bin/busybox"))
        .args(["nc", "-w", "5", BRAIN_IP, &API_PORT.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // stdin stays open until the answer is in: hyper drops a connection
    // whose client half-closes before it has replied.
    let mut stdin = nc.stdin.take().unwrap();
    stdin
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nHost: brain\r\nConnection: close\r\n{headers}\r\n")
                .as_bytes(),
        )
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(nc.stdout.as_mut().unwrap(), &mut text).unwrap();
    drop(stdin);
    nc.wait().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    body.to_owned()
}

#[test]
fn scrapes_of_a_cell_and_a_brain_pass_promtool_and_are_documented() {
    common::require_root();
    let docs = std::fs::read_to_string(common::workspace().join("docs/metrics.md")).unwrap();
    let name = Cell::new_name();
    let mut fabric = Fabric::new(&[&name]);
    fabric.start_brain();
    let cell = Cell::start_named(
        &name,
        &format!(
            "{}[network]\nsubnet = \"10.244.7.0/24\"\n",
            fabric.agent_config(&name, "z1")
        ),
    );
    fabric.attach(&cell);
    fabric.wait_connected(1);
    let root = rootfs();
    fabric.cli_ok(&[
        "push",
        "web",
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
        "--",
        "/bin/sleep",
        "100000",
    ]);
    let app = fabric.wait_json(&["app", "web", "--tenant", "acme"], "running", |v| {
        v["instances"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["state"] == "running"))
    });
    let id = app["instances"][0]["id"].as_str().unwrap().to_owned();
    let addr = cell.get(&id)["address"].as_str().unwrap().to_owned();
    // Traffic through the data plane, from the node to the instance.
    let ping = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", cell.netns))
        .arg(root.join("bin/busybox"))
        .args(["ping", "-c", "2", "-W", "1", &addr])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );
    // A task that ends: instance_ends_total gets a sample.
    cell.put_ok("t-0", &task("true"));
    cell.wait_state("t-0", "exited");

    let agent = cell.metrics();
    for family in [
        "corral_instance_start_duration_seconds",
        "corral_instance_cpu_seconds_total",
        "corral_tenant_network_bytes_total",
        "corral_brain_messages_total",
    ] {
        assert!(
            families(&agent).iter().any(|f| f == family),
            "{family} missing:\n{agent}"
        );
    }
    assert_eq!(promtool(&agent), "", "agent scrape:\n{agent}");
    assert_eq!(undocumented(&agent, &docs), Vec::<String>::new());

    let brain = brain_get(&fabric, "");
    // Prometheus asks for OpenMetrics and gets it; curl and promtool get
    // the classic format.
    let om = brain_get(
        &fabric,
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(!brain.contains("# EOF"), "{brain}");
    assert!(brain.contains("corral_brain_placements_total 1"), "{brain}");
    assert_eq!(promtool(&brain), "", "brain scrape:\n{brain}");
    assert_eq!(undocumented(&brain, &docs), Vec::<String>::new());

    cell.delete("t-0");
    fabric.cli_ok(&["delete-app", "web", "--tenant", "acme"]);
    fabric.detach(&cell);
}
