//! Who may talk to a cell agent: its unix socket is root's only (a
//! non-root process gets EACCES, and the socket's mode is the reason), its
//! TCP API is off unless configured, asks for `[api] token` on every route
//! but the probes when one is set, and an address beyond loopback without
//! a token is refused at start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{in_netns, Cell};
use corral_cli::client::{Client, Endpoint};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const TOKEN: &str = "0123456789abcdef-agent-token";
/// `nobody`: an unprivileged user every Debian system has.
const NOBODY: &str = "65534";

fn cli_bin() -> PathBuf {
    std::env::var_os("CORRAL_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::workspace().join("target/debug/corral"))
}

/// The CLI as uid/gid 65534 without supplementary groups.
fn corral_as_nobody(socket: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups", "--"])
        .arg(cli_bin())
        .arg("--agent")
        .arg(socket)
        .arg("instances")
        .output()
        .unwrap()
}

#[test]
fn the_unix_socket_is_root_only() {
    let cell = Cell::start();
    let socket = cell.run_dir().join("agent.sock");
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600, "socket mode");
    assert_eq!((meta.uid(), meta.gid()), (0, 0), "socket owner");

    // Open the directories on the way, so that only the socket's own mode
    // can refuse (tempdirs are 0700).
    for dir in [cell.dir.path().to_owned(), cell.run_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = corral_as_nobody(&socket);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "nobody must not connect: {err}");
    assert!(err.contains("Permission denied"), "{err}");

    // The control: with the socket opened up, the same command gets
    // through, so the refusal above was the socket's mode.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = corral_as_nobody(&socket);
    assert!(
        out.status.success(),
        "control: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    // Root still gets in.
    cell.client.get("/v1/instances").unwrap();
}

/// TCP sockets listening in the agent's network namespace.
fn tcp_listeners(agent_pid: u32) -> Vec<String> {
    let mut found = Vec::new();
    for file in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{agent_pid}/net/{file}")).unwrap();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 0A: LISTEN.
            if cols.get(3) == Some(&"0A") {
                found.push(format!("{file} {}", cols[1]));
            }
        }
    }
    found
}

#[test]
fn the_tcp_api_is_off_by_default() {
    // `[api]` without `listen`: the default. (`[metrics]` is off in tests.)
    let cell = Cell::start_with("[api]\n");
    cell.client.get("/v1/instances").unwrap();
    assert_eq!(
        tcp_listeners(cell.agent_pid()),
        Vec::<String>::new(),
        "nothing may listen on TCP"
    );
    let refused = in_netns(&cell.netns, || {
        std::net::TcpStream::connect("127.0.0.1:7800").map_err(|e| e.kind())
    });
    assert_eq!(refused.err(), Some(std::io::ErrorKind::ConnectionRefused));
}

#[test]
fn the_tcp_api_asks_for_its_token_on_every_route_but_the_probes() {
    let cell = Cell::start_with(&format!(
        "[api]\nlisten = \"127.0.0.1:7800\"\ntoken = \"{TOKEN}\"\n"
    ));
    let spec = common::lrp("sleep 1000").to_string();
    let statuses = in_netns(&cell.netns, move || {
        let addr = "127.0.0.1:7800".parse().unwrap();
        let anon = Client::new(Endpoint::Tcp(addr));
        let wrong = anon
            .clone()
            .with_token(Some("0123456789abcdef-agent-tokeN".into()));
        let right = anon.clone().with_token(Some(TOKEN.into()));
        let mut out = Vec::new();
        for (method, path, body) in [
            ("GET", "/v1/state", None),
            ("GET", "/v1/instances", None),
            ("PUT", "/v1/instances/intruder", Some(spec.as_bytes())),
            ("DELETE", "/v1/instances/intruder", None),
            ("GET", "/v1/instances/intruder/logs", None),
            ("GET", "/v1/policies", None),
            (
                "PUT",
                "/v1/policies",
                Some(&b"{\"from\":\"a\",\"to\":\"b\"}"[..]),
            ),
            ("GET", "/v1/evacuate", None),
            ("POST", "/v1/evacuate", None),
            ("GET", "/v1/dataplane", None),
        ] {
            for (who, client) in [("anon", &anon), ("wrong", &wrong)] {
                let r = client.request(method, path, body).unwrap();
                out.push((format!("{who} {method} {path}"), r.status, 401));
            }
        }
        for path in ["/healthz", "/readyz", "/metrics"] {
            let status = anon.get(path).unwrap().status;
            out.push((format!("anon GET {path}"), status, 200));
        }
        let status = right.get("/v1/state").unwrap().status;
        out.push(("right GET /v1/state".into(), status, 200));
        out
    });
    for (what, status, expected) in &statuses {
        assert_eq!(status, expected, "{what}");
    }
    // Nothing the refused requests asked for happened.
    let state = cell.client.get("/v1/state").unwrap().json().unwrap();
    assert_eq!(state["instances"], serde_json::json!([]), "{state}");
    assert_eq!(state["evacuating"], false, "{state}");

    // The CLI sends the token with --agent-token (or CORRAL_AGENT_TOKEN).
    let netns = format!("--net=/run/netns/{}", cell.netns);
    let cli = |token: Option<&str>| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(&netns)
            .arg(cli_bin())
            .args(["--agent-addr", "127.0.0.1:7800", "instances"])
            .env_remove("CORRAL_AGENT_TOKEN");
        if let Some(t) = token {
            cmd.env("CORRAL_AGENT_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    let out = cli(None);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(Some(TOKEN));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_tcp_api_beyond_loopback_without_a_token_is_refused_at_start() {
    common::require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = \"{0}/d\"\nrun_dir = \"{0}/r\"\n[api]\nlisten = \"0.0.0.0:7800\"\n",
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
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("api.listen 0.0.0.0:7800 is not a loopback address and api.token is not set"),
        "{err}"
    );
    assert!(!dir.path().join("d").exists(), "nothing was created");
}
