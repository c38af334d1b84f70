//! What systemd passes in the environment is checked before anything
//! changes: an impossible watchdog or a malformed notification socket
//! stops the start with exit code 2 and a message naming the setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn an_impossible_systemd_environment_is_refused_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{0}/data\"\nrun_dir = \"{0}/run\"\n[api]\nlisten = \"off\"\n[metrics]\nlisten = \"off\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let sock = dir.path().join("notify.sock");
    let sock = sock.to_str().unwrap();
    for (env, needle) in [
        (
            vec![("NOTIFY_SOCKET", sock), ("WATCHDOG_USEC", "500000")],
            "WatchdogSec=500ms is too short for corral-agent",
        ),
        (
            vec![("NOTIFY_SOCKET", sock), ("WATCHDOG_USEC", "soon")],
            "WATCHDOG_USEC=\"soon\" is not a positive number of microseconds",
        ),
        (
            vec![("NOTIFY_SOCKET", "notify.sock")],
            "NOTIFY_SOCKET=\"notify.sock\" is neither an absolute path",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_corral-agent"))
            .arg("--config")
            .arg(&cfg)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
        assert!(err.contains(needle), "{env:?}: {err}");
        assert!(
            !dir.path().join("data").exists(),
            "{env:?} changed the host"
        );
        assert!(!dir.path().join("run").exists(), "{env:?} changed the host");
    }
}

#[test]
fn the_shipped_agent_config_is_valid() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/etc/agent.toml"),
    )
    .unwrap();
    let host = corral_agent::config::HostFacts {
        hostname: "node-1".into(),
        memory_mb: 8192,
        disk_free_mb: 100_000,
    };
    let cfg = corral_agent::config::Config::parse(&text, &host).unwrap();
    assert_eq!(
        cfg.api_listen, None,
        "the packaged agent keeps its API off TCP"
    );
    assert_eq!(cfg.data_dir, std::path::Path::new("/var/lib/corral"));
    assert_eq!(cfg.run_dir, std::path::Path::new("/run/corral"));
}
