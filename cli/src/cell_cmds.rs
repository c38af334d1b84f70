//! `corral cell status|drain|undrain`: the local cell's state and its
//! evacuation, through the agent's API (`GET /v1/state`, `POST` and
//! `DELETE /v1/evacuate`).

use crate::{call, print, s, table, Cli, Fail, Output};
use clap::Subcommand;
use corral_cli::client::Client;
use serde_json::Value;
use std::time::Duration;

/// Longest `--wait`, as the agent allows.
const MAX_WAIT: u64 = 3600;

#[derive(Subcommand)]
pub(crate) enum CellCmd {
    /// Capacity and instances of the local cell.
    Status,
    /// Drains the cell: it takes no new work, and the brain replaces its
    /// instances on other cells before stopping them here. Survives an
    /// agent restart until `corral cell undrain`.
    Drain {
        /// Wait up to SECS for the cell to run no LRP instance (exit 1 if
        /// some still do; the cell keeps draining).
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
    },
    /// Cancels a drain: the cell takes new work again.
    Undrain,
}

pub(crate) fn run(cli: &Cli, c: Client, cmd: &CellCmd) -> Result<(), Fail> {
    match cmd {
        CellCmd::Status => {
            let v = call(c.get("/v1/state"))?;
            print(cli.output, &v, |v| {
                let draining = if v["evacuating"] == true {
                    ", draining: takes no new work"
                } else {
                    ""
                };
                println!("cell {} (zone {}){draining}", s(v, "cell_id"), s(v, "zone"));
                let (t, a) = (&v["capacity"]["total"], &v["capacity"]["available"]);
                for k in ["memory_mb", "disk_mb", "containers"] {
                    println!("  {k:<11} {:>8} available of {:>8}", s(a, k), s(t, k));
                }
                table(
                    v["instances"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                );
            });
        }
        CellCmd::Drain { wait: None } => {
            let v = call(c.request("POST", "/v1/evacuate", None))?;
            print(cli.output, &v, |v| println!("{}", drain_message(v, false)));
        }
        CellCmd::Drain { wait: Some(secs) } => {
            if *secs > MAX_WAIT {
                return Err(Fail::Usage(format!("--wait must be 0..={MAX_WAIT}")));
            }
            // The agent answers when the wait is over; give it time to.
            let c = c.with_timeout(Some(Duration::from_secs(secs + 30)));
            let r = c
                .request("POST", &format!("/v1/evacuate?wait_secs={secs}"), None)
                .map_err(Fail::Unreachable)?;
            if r.status == 504 {
                // Still draining: not a refusal. Scripts get the figures.
                let v = r.json().unwrap_or(Value::Null);
                if cli.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
                return Err(Fail::Failed(not_drained_message(&v, *secs)));
            }
            let v = call(Ok(r))?;
            print(cli.output, &v, |v| println!("{}", drain_message(v, true)));
        }
        CellCmd::Undrain => {
            let v = call(c.delete("/v1/evacuate"))?;
            print(cli.output, &v, |v| println!("{}", undrain_message(v)));
        }
    }
    Ok(())
}

fn lrps(n: u64) -> String {
    match n {
        0 => "no LRP instance runs here".into(),
        1 => "1 LRP instance still runs here".into(),
        n => format!("{n} LRP instances still run here"),
    }
}

/// What `corral cell drain` says about the agent's answer; `waited`: after
/// a wait that ended with the cell empty.
pub(crate) fn drain_message(v: &Value, waited: bool) -> String {
    let cell = s(v, "cell_id");
    let remaining = v["remaining"].as_u64().unwrap_or(0);
    if waited {
        return format!("cell {cell} is drained: {}", lrps(0));
    }
    let state = if v["changed"] == false {
        format!("cell {cell} was already draining (since {})", s(v, "since"))
    } else {
        format!("cell {cell} is draining")
    };
    if remaining == 0 {
        format!("{state}: {}", lrps(0))
    } else {
        format!(
            "{state}: {}; the brain starts replacements on other cells, then stops them here \
             (`corral cell drain --wait SECS` waits for that)",
            lrps(remaining)
        )
    }
}

/// Why `corral cell drain --wait` failed when the wait ran out.
pub(crate) fn not_drained_message(v: &Value, secs: u64) -> String {
    let cell = s(v, "cell_id");
    match v["remaining"].as_u64() {
        Some(n) => format!(
            "cell {cell} is not drained after {secs} s: {}; it keeps draining \
             (is the brain connected? `corral cell undrain` cancels)",
            lrps(n)
        ),
        None => format!("cell {cell} is not drained after {secs} s; it keeps draining"),
    }
}

pub(crate) fn undrain_message(v: &Value) -> String {
    let cell = s(v, "cell_id");
    if v["changed"] == false {
        format!("cell {cell} was not draining")
    } else {
        format!("cell {cell} takes new work again")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drain_messages_say_what_is_left_and_what_happens_next() {
        let started = json!({"cell_id": "c1", "evacuating": true, "since": "2026-11-25T12:00:00.000000000Z", "remaining": 2, "changed": true});
        let m = drain_message(&started, false);
        assert!(m.starts_with("cell c1 is draining: 2 LRP instances still run here; the brain starts replacements"), "{m}");
        let again = json!({"cell_id": "c1", "evacuating": true, "since": "2026-11-25T12:00:00.000000000Z", "remaining": 1, "changed": false});
        let m = drain_message(&again, false);
        assert!(m.starts_with("cell c1 was already draining (since 2026-11-25T12:00:00.000000000Z): 1 LRP instance still runs here"), "{m}");
        let empty = json!({"cell_id": "c1", "evacuating": true, "remaining": 0, "changed": true});
        assert_eq!(
            drain_message(&empty, false),
            "cell c1 is draining: no LRP instance runs here"
        );
        assert_eq!(
            drain_message(&empty, true),
            "cell c1 is drained: no LRP instance runs here"
        );
    }

    #[test]
    fn a_wait_that_runs_out_and_an_undrain_are_explained() {
        let left = json!({"cell_id": "c1", "evacuating": true, "remaining": 3, "error": "..."});
        let m = not_drained_message(&left, 30);
        assert!(m.starts_with("cell c1 is not drained after 30 s: 3 LRP instances still run here; it keeps draining"), "{m}");
        assert_eq!(
            undrain_message(&json!({"cell_id": "c1", "evacuating": false, "changed": true})),
            "cell c1 takes new work again"
        );
        assert_eq!(
            undrain_message(&json!({"cell_id": "c1", "evacuating": false, "changed": false})),
            "cell c1 was not draining"
        );
    }
}
