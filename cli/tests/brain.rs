//! The `corral` binary against the brain's real management API, served
//! in-process on 127.0.0.1 with a temporary store. No cell is connected, so
//! apps have no instances.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::api::{serve, ApiState, SharedView};
use corral_brain::config::{Token, Tokens};
use corral_brain::store::RedbStore;
use corral_proto::TenantId;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

const ADMIN: &str = "admin-token-0123456789";
const ACME: &str = "acme-token-0123456789";
const BETA: &str = "beta-token-0123456789";

fn tokens() -> Tokens {
    let t = |s: &str| Token::new(s).unwrap();
    Tokens::new(
        Some(t(ADMIN)),
        vec![
            (t(ACME), TenantId::new("acme").unwrap()),
            (t(BETA), TenantId::new("beta").unwrap()),
        ],
    )
    .unwrap()
}

/// A brain API on its own runtime thread; stopped and joined on drop.
struct Brain {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn start() -> Brain {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("brain.redb");
    let (addr_tx, addr_rx) = mpsc::channel::<SocketAddr>();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = Arc::new(RedbStore::open(&path).unwrap());
            let view = Arc::new(SharedView::default());
            let state = Arc::new(ApiState::new(store, view, tokens()).unwrap());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            serve(listener, state, async {
                let _ = stopped.await;
            })
            .await;
        });
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    Brain {
        url: format!("http://{addr}"),
        stop: Some(stop),
        thread: Some(thread),
        _dir: dir,
    }
}

impl Drop for Brain {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn command(url: &str, token: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_corral"));
    c.args(args)
        .env("CORRAL_BRAIN", url)
        .env("CORRAL_TOKEN", token)
        .env_remove("CORRAL_AGENT_SOCKET")
        .env_remove("CORRAL_AGENT_ADDR");
    c
}

/// Runs `corral` against the brain with the token from the environment.
fn corral(b: &Brain, token: &str, args: &[&str]) -> Output {
    command(&b.url, token, args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// The exit code and stderr of a command that must fail.
#[track_caller]
fn fails(o: Output) -> (i32, String) {
    assert!(!o.status.success(), "succeeded: {}", stdout(&o));
    (o.status.code().unwrap(), stderr(&o))
}

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

const WEB: &[&str] = &[
    "push",
    "web",
    "--instances",
    "2",
    "--rootfs",
    "/srv/rootfs/busybox",
    "--memory",
    "64",
    "--port",
    "8080",
    "--env",
    "GREETING=hello world",
    "--",
    "/bin/sh",
    "-c",
    "sleep 1000",
];

#[test]
fn push_is_idempotent_and_apps_can_be_listed_shown_scaled_and_deleted() {
    let b = start();
    let out = ok(corral(&b, ACME, WEB));
    assert_eq!(out, "created app acme/web (version 1, 2 instances)\n");
    let out = ok(corral(&b, ACME, WEB));
    assert_eq!(out, "app acme/web is unchanged (version 1, 2 instances)\n");

    // What an instance runs changes: the version goes up.
    let out = ok(corral(
        &b,
        ACME,
        &["push", "web", "--memory", "128", "--", "sleep", "2000"],
    ));
    assert_eq!(
        out,
        "updated app acme/web (version 2, 2 instances): command, memory 64 -> 128\n"
    );
    let v = json(&ok(corral(
        &b,
        ACME,
        &["-o", "json", "push", "web", "--instances", "3"],
    )));
    assert_eq!(
        (v["version"].as_u64(), v["instances"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(v["env"]["GREETING"], "hello world", "left alone: {v}");

    let table = ok(corral(&b, ACME, &["apps"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("TENANT  NAME  INSTANCES  VERSION"),
        "{table}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..5], ["acme", "web", "3", "2", "128"], "{table}");
    assert!(lines[1].ends_with("busybox  sleep 2000"), "{table}");
    let v = json(&ok(corral(&b, ACME, &["apps", "--output", "json"])));
    assert_eq!(v["apps"].as_array().unwrap().len(), 1);
    assert_eq!(v["apps"][0]["name"], "web");
    assert_eq!(v["apps"][0]["version"], 2);

    let shown = ok(corral(&b, ACME, &["app", "web"]));
    assert!(
        shown.starts_with("app web\n  tenant     acme\n  version    2 "),
        "{shown}"
    );
    assert!(shown.contains("  command    sleep 2000\n"), "{shown}");
    assert!(
        shown.contains("  env        GREETING=hello world\n"),
        "{shown}"
    );
    assert!(
        shown.contains("0 of 3 instances reported (no cell runs it yet)\nINDEX  STATE  CELL  ADDRESS  SINCE  ID  REASON\n"),
        "{shown}"
    );
    let v = json(&ok(corral(&b, ACME, &["app", "web", "-o", "json"])));
    assert_eq!(v["app"]["name"], "web");
    assert_eq!(v["instances"], serde_json::json!([]));

    let out = ok(corral(&b, ACME, &["scale", "web", "5"]));
    assert_eq!(out, "scaled app acme/web to 5 instances (version 2)\n");

    // The brain's problems are listed, one per line; nothing changed.
    let (code, err) = fails(corral(
        &b,
        ACME,
        &["push", "web", "--cpu-weight", "0", "--rootfs", "../x"],
    ));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.starts_with("corral: the brain refused (400): invalid app patch\n  - "),
        "{err}"
    );
    assert!(err.contains("cpu_weight 0"), "{err}");
    assert_eq!(
        err.lines().filter(|l| l.starts_with("  - ")).count(),
        2,
        "{err}"
    );
    let v = json(&ok(corral(&b, ACME, &["app", "web", "-o", "json"])));
    assert_eq!(v["app"]["resources"]["cpu_weight"], 100);

    let out = ok(corral(&b, ACME, &["delete-app", "web"]));
    assert_eq!(out, "deleted app acme/web: its instances will be stopped\n");
    let (code, err) = fails(corral(&b, ACME, &["app", "web"]));
    assert_eq!(code, 1);
    assert!(err.contains("the brain refused (404): no app web"), "{err}");

    // Creating needs more than an update does; usage errors exit 2.
    let (code, err) = fails(corral(&b, ACME, &["push", "ghost", "--instances", "1"]));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("there is no app ghost yet: to create it, give --rootfs, --memory, the command after --"),
        "{err}"
    );
    let (code, err) = fails(corral(&b, ACME, &["push", "Bad/Name", "--memory", "1"]));
    assert_eq!(code, 2, "{err}");
    let (code, err) = fails(corral(&b, ACME, &["push", "web", "--env", "NOVALUE"]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("NAME=VALUE"), "{err}");
}

#[test]
fn tenants_see_only_their_own() {
    let b = start();
    ok(corral(&b, ACME, WEB));
    let (code, err) = fails(corral(&b, BETA, &["app", "web"]));
    assert_eq!(code, 1);
    assert!(err.contains("(404): no app web"), "{err}");
    assert!(err.contains("corral apps"), "{err}");
    let (code, _) = fails(corral(&b, BETA, &["scale", "web", "9"]));
    assert_eq!(code, 1);
    let (code, _) = fails(corral(&b, BETA, &["delete-app", "web"]));
    assert_eq!(code, 1);
    let v = json(&ok(corral(&b, BETA, &["apps", "-o", "json"])));
    assert_eq!(v["apps"], serde_json::json!([]));
    let mut as_acme = WEB.to_vec();
    as_acme.splice(2..2, ["--tenant", "acme"]);
    let (code, err) = fails(corral(&b, BETA, &as_acme));
    assert_eq!(code, 1);
    assert!(
        err.contains("(403): this token acts for tenant beta only"),
        "{err}"
    );
    assert!(err.contains("leave out --tenant"), "{err}");

    // beta's own app of the same name is another app.
    let mut beta_web = WEB.to_vec();
    beta_web[3] = "1";
    assert_eq!(
        ok(corral(&b, BETA, &beta_web)),
        "created app beta/web (version 1, 1 instance)\n"
    );
    let acme = json(&ok(corral(&b, ACME, &["app", "web", "-o", "json"])));
    assert_eq!(acme["app"]["instances"], 2);

    // The admin sees both, and must say which one it means.
    let v = json(&ok(corral(&b, ADMIN, &["apps", "-o", "json"])));
    assert_eq!(v["apps"].as_array().unwrap().len(), 2);
    let (code, err) = fails(corral(&b, ADMIN, &["app", "web"]));
    assert_eq!(code, 1);
    assert!(err.contains("several tenants have an app web"), "{err}");
    assert!(err.contains("--tenant"), "{err}");
    let out = ok(corral(
        &b,
        ADMIN,
        &["scale", "web", "4", "--tenant", "beta"],
    ));
    assert_eq!(out, "scaled app beta/web to 4 instances (version 1)\n");
    let mut admin_push = WEB.to_vec();
    admin_push[1] = "api";
    let (code, err) = fails(corral(&b, ADMIN, &admin_push));
    assert_eq!(code, 1);
    assert!(err.contains("--tenant"), "{err}");
    admin_push.splice(2..2, ["--tenant", "acme"]);
    assert_eq!(
        ok(corral(&b, ADMIN, &admin_push)),
        "created app acme/api (version 1, 2 instances)\n"
    );

    // Cells are the admin's: none connected here.
    assert_eq!(
        ok(corral(&b, ADMIN, &["cells"])),
        "ID  ZONE  STATE  INSTANCES  MEMORY MB  DISK MB  CONTAINERS  TAGS  SINCE\n"
    );
    let (code, err) = fails(corral(&b, ACME, &["cells"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("(403)") && err.contains("admin token"),
        "{err}"
    );
}

#[test]
fn tasks_run_and_can_be_read_back() {
    let b = start();
    let out = ok(corral(
        &b,
        ACME,
        &[
            "task",
            "run",
            "--rootfs",
            "/srv/rootfs/busybox",
            "--memory",
            "32",
            "--app",
            "web",
            "--",
            "echo",
            "hi",
        ],
    ));
    let first = out.lines().next().unwrap();
    assert!(first.starts_with("created task task-"), "{out}");
    assert!(first.ends_with(" for tenant acme (pending)"), "{out}");
    let id = first.split_whitespace().nth(2).unwrap();
    let shown = ok(corral(&b, ACME, &["task", "get", id]));
    assert!(shown.starts_with(&format!("task {id}\n")), "{shown}");
    assert!(shown.contains("  state      pending\n"), "{shown}");
    assert!(shown.contains("  command    echo hi\n"), "{shown}");
    let v = json(&ok(corral(
        &b,
        ACME,
        &[
            "task",
            "run",
            "-o",
            "json",
            "--rootfs",
            "/srv/rootfs/busybox",
            "--memory",
            "32",
            "--env",
            "A=1",
            "--",
            "true",
        ],
    )));
    assert_eq!(v["spec"]["env"]["A"], "1");
    let listed = json(&ok(corral(&b, ACME, &["tasks", "-o", "json"])));
    assert_eq!(listed["tasks"].as_array().unwrap().len(), 2);
    let table = ok(corral(&b, ACME, &["tasks"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(id) && l.contains("pending")),
        "{table}"
    );

    let (code, err) = fails(corral(&b, BETA, &["task", "get", id]));
    assert_eq!(code, 1);
    assert!(err.contains("(404)"), "{err}");
    let (code, err) = fails(corral(&b, ACME, &["task", "run", "--", "true"]));
    assert_eq!(code, 2);
    assert!(err.contains("a task needs --rootfs, --memory"), "{err}");
}

#[test]
fn bad_tokens_and_unreachable_brains_say_what_to_do() {
    let b = start();
    let (code, err) = fails(corral(&b, "not-a-known-token-at-all", &["apps"]));
    assert_eq!(code, 1);
    assert!(err.contains("the brain refused the token (401)"), "{err}");
    assert!(err.contains("--token or CORRAL_TOKEN"), "{err}");
    assert!(
        !err.contains("not-a-known-token"),
        "the token is not echoed: {err}"
    );

    // No token at all is a usage error, caught before any request.
    let o = command(&b.url, "", &["apps"])
        .env_remove("CORRAL_TOKEN")
        .output()
        .unwrap();
    let (code, err) = fails(o);
    assert_eq!(code, 2);
    assert!(err.contains("set --token or CORRAL_TOKEN"), "{err}");

    // Flags override the environment.
    let o = command(
        "http://127.0.0.1:1",
        "wrong-token-0123456789",
        &["apps", "--brain", &b.url, "--token", ACME],
    )
    .output()
    .unwrap();
    assert_eq!(ok(o).lines().count(), 1);

    // A port nothing listens on.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let (code, err) = fails(command(&url, ACME, &["apps"]).output().unwrap());
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(&format!("cannot connect to {url}")), "{err}");
    assert!(err.contains("--brain URL or set CORRAL_BRAIN"), "{err}");

    let (code, err) = fails(
        command("https://brain:7900", ACME, &["apps"])
            .output()
            .unwrap(),
    );
    assert_eq!(code, 2);
    assert!(err.contains("invalid brain URL"), "{err}");

    // The agent's commands are as they were.
    let o = command(
        &b.url,
        ACME,
        &["--agent", "/nonexistent/agent.sock", "instances"],
    )
    .output()
    .unwrap();
    let (code, err) = fails(o);
    assert_eq!(code, 3);
    assert!(err.contains("is corral-agent running?"), "{err}");
}

/// `corral events` as a child whose output lines arrive on channels.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn lines_of(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn follow(b: &Brain, token: &str, args: &[&str]) -> Follower {
    let mut child = command(&b.url, token, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines_of(child.stderr.take().unwrap());
    // Once it says it follows, the brain has subscribed it.
    let first = err.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        first.starts_with("corral: following events from"),
        "{first}"
    );
    let lines = lines_of(child.stdout.take().unwrap());
    Follower { child, lines }
}

impl Follower {
    fn next(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .expect("no event line within 10 s")
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        // Child::kill signals our own child by its pid.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn events_follow_changes() {
    let b = start();
    let acme = follow(&b, ACME, &["events"]);
    let acme_json = follow(&b, ACME, &["events", "-o", "json"]);
    let beta = follow(&b, BETA, &["events"]);

    ok(corral(&b, ACME, WEB));
    let line = acme.next();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words[1..],
        ["app.created", "acme/web", "version", "1,", "2", "instances"],
        "{line}"
    );
    let v = json(&acme_json.next());
    assert_eq!(v["type"], "app.created");
    assert_eq!(v["app"]["name"], "web");

    ok(corral(&b, ACME, &["scale", "web", "3"]));
    assert!(acme
        .next()
        .contains("app.updated   acme/web  version 1, 3 instances"));
    ok(corral(&b, ACME, &["delete-app", "web"]));
    assert!(acme.next().ends_with("app.deleted   acme/web"));

    // beta saw none of acme's: its first line is its own.
    let mut beta_web = WEB.to_vec();
    beta_web[1] = "beta-app";
    ok(corral(&b, BETA, &beta_web));
    assert!(beta.next().contains("app.created   beta/beta-app"));

    // A refused stream is an ordinary refusal.
    let (code, err) = fails(corral(&b, "bad-token-0123456789", &["events"]));
    assert_eq!(code, 1);
    assert!(err.contains("(401)"), "{err}");
}
