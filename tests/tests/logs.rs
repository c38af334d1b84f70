//! The agent's own log as JSON (`log_format = "json"`): every line about an
//! instance carries its id, app and tenant, from the instance's span.
//!
//! Run as root through `cargo xtask test logs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{lrp, task, Cell};
use serde_json::Value;

#[test]
fn every_log_line_about_an_instance_names_its_app_and_tenant() {
    common::require_root();
    let mut cell = Cell::start_with("log_format = \"json\"\n");
    let mut web = lrp("exec sleep 1000");
    web["app"] = "web".into();
    cell.put_ok("web-0", &web);
    cell.wait_state("web-0", "running");
    let mut job = task("echo done");
    job["tenant"] = "globex".into();
    job["app"] = "batch".into();
    cell.put_ok("job-0", &job);
    cell.wait_for("job-0", "ended", |v| v["state"] == "exited");
    // A restart re-adopts web-0 (more lines about it), then both go.
    cell.stop_agent();
    cell.spawn_agent();
    cell.delete("web-0");
    cell.delete("job-0");

    let log = cell.agent_log();
    let owners = [("web-0", "web", "acme"), ("job-0", "batch", "globex")];
    let mut about = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        for (id, app, tenant) in owners {
            if !line.contains(id) {
                continue;
            }
            about += 1;
            let span = &v["span"];
            assert_eq!(span["name"], "instance", "no instance span: {line}");
            assert_eq!(
                (&span["id"], &span["app"], &span["tenant"]),
                (&Value::from(id), &Value::from(app), &Value::from(tenant)),
                "{line}"
            );
        }
    }
    assert!(about >= 4, "only {about} lines about the instances:\n{log}");
    cell.assert_clean();
}
