//! The agent refuses bad configuration files and says everything wrong at once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

#[test]
fn a_bad_config_is_refused_with_every_problem_and_exit_code_2() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "cell_id = \"no/slashes\"\ndata_dir = \"relative\"\n[api]\nlisten = \"nowhere\"\n[capacity]\nmax_containers = 0\n",
    )
    .unwrap();
    let out = Command::new(common::agent_bin())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("4 problem(s)"), "{err}");
    for needle in ["cell_id", "data_dir", "api.listen", "max_containers"] {
        assert!(err.contains(needle), "{needle} not reported: {err}");
    }
    // Nothing was created for a refused config.
    assert!(!dir.path().join("relative").exists());

    let missing = Command::new(common::agent_bin())
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr)
        .contains("cannot read config file /nonexistent/agent.toml"));
}

#[test]
fn check_mode_validates_config_and_host_without_starting() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{0}/d\"\nrun_dir = \"{0}/r\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(common::agent_bin())
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("are fine"));
    assert!(
        !dir.path().join("d").exists(),
        "--check must not create state"
    );
}
