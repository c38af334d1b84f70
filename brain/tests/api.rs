//! The management API over real HTTP on 127.0.0.1: apps and tasks CRUD,
//! tenant isolation on every route, authentication, refusal of bad input
//! without any change, restart, and the event stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use corral_brain::api::{
    serve, ActualSnapshot, ApiState, CellState, CellView, InstanceView, SharedView,
};
use corral_brain::config::{Token, Tokens};
use corral_brain::store::{RedbStore, Snapshot, Store};
use corral_proto::wire::Zone;
use corral_proto::{AppId, Capacity, CellId, InstanceId, InstanceState, TenantId, Timestamp};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const ADMIN: &str = "admin-token-0123456789";
const ACME: &str = "acme-token-0123456789";
const BETA: &str = "beta-token-0123456789";
const GAMMA: &str = "gamma-token-0123456789";
const NOW: Timestamp = Timestamp(1_700_000_000_000_000_000);

fn tokens() -> Tokens {
    let t = |s: &str| Token::new(s).unwrap();
    Tokens::new(
        Some(t(ADMIN)),
        vec![
            (t(ACME), TenantId::new("acme").unwrap()),
            (t(BETA), TenantId::new("beta").unwrap()),
            (t(GAMMA), TenantId::new("gamma").unwrap()),
        ],
    )
    .unwrap()
}

fn instance(tenant: &str, app: &str, index: u32, cell: &str, ip: &str) -> InstanceView {
    InstanceView {
        id: InstanceId::new(format!("{tenant}-{app}-{index}")).unwrap(),
        tenant: TenantId::new(tenant).unwrap(),
        app: AppId::new(app).unwrap(),
        index,
        cell: CellId::new(cell).unwrap(),
        state: InstanceState::Running,
        address: Some(ip.parse().unwrap()),
        since: Timestamp(1_000_000_000),
        reason: None,
    }
}

/// A fixed picture of actual state, as the brain would fill it.
fn actual() -> ActualSnapshot {
    let cap = Capacity {
        memory_mb: 4096,
        disk_mb: 10_000,
        containers: 100,
    };
    let cell = |id: &str, zone: &str, state| CellView {
        id: CellId::new(id).unwrap(),
        zone: Zone::new(zone).unwrap(),
        tags: Default::default(),
        state,
        total: cap,
        available: cap,
        instances: 1,
        since: Timestamp(0),
    };
    ActualSnapshot {
        cells: vec![
            cell("cell-2", "z2", CellState::Draining),
            cell("cell-1", "z1", CellState::Connected),
        ],
        instances: vec![
            instance("acme", "web", 1, "cell-2", "10.244.2.5"),
            instance("acme", "web", 0, "cell-1", "10.244.1.5"),
            instance("beta", "web", 0, "cell-2", "10.244.2.6"),
        ],
        unplaced: vec![],
    }
}

struct Server {
    addr: SocketAddr,
    state: Arc<ApiState>,
    store: Arc<RedbStore>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(path: &Path) -> Server {
    start_with(path, None).await
}

async fn start_with(path: &Path, vip_range: Option<&str>) -> Server {
    let store = Arc::new(RedbStore::open(path).unwrap());
    let view = Arc::new(SharedView::new(actual()));
    let state = Arc::new(
        ApiState::new(store.clone(), view, tokens())
            .unwrap()
            .with_clock(|| NOW)
            .with_vip_range(vip_range.map(|r| r.parse().unwrap())),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        state,
        store,
        stop,
        task,
    }
}

impl Server {
    fn snapshot(&self) -> Snapshot {
        self.store.snapshot().unwrap()
    }

    /// Stops serving and waits until nothing holds the store any more, so
    /// that it can be opened again.
    async fn shutdown(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("server did not stop")
            .unwrap();
        drop(self.state);
        let mut store = self.store;
        for _ in 0..500 {
            match Arc::try_unwrap(store) {
                Ok(s) => {
                    drop(s);
                    return;
                }
                Err(s) => store = s,
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the store is still referenced after shutdown");
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Resp {
        call(
            self.addr,
            method,
            path,
            token.map(|t| format!("Bearer {t}")),
            body,
        )
        .await
    }

    async fn get(&self, path: &str, token: &str) -> Resp {
        self.call("GET", path, Some(token), None).await
    }

    async fn send(&self, method: &str, path: &str, token: &str, body: Value) -> Resp {
        self.call(method, path, Some(token), Some(&body.to_string()))
            .await
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[track_caller]
    fn expect(self, status: u16) -> Value {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..eol]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    authorization: Option<String>,
    body: Option<&str>,
) -> Resp {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: brain\r\nConnection: close\r\n");
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or(""));
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response timed out")
        .unwrap();
    parse(&buf)
}

fn parse(buf: &[u8]) -> Resp {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8(buf[..split].to_vec()).unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let raw = &buf[split + 4..];
    let mut resp = Resp {
        status,
        head,
        body: Vec::new(),
    };
    resp.body = if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        dechunk(raw)
    } else {
        raw.to_vec()
    };
    resp
}

fn web(instances: u32) -> Value {
    json!({
        "name": "web", "instances": instances,
        "rootfs": "/var/lib/corral/rootfs/busybox",
        "command": ["/bin/httpd", "-f", "-p", "8080"],
        "env": {"GREETING": "hello"},
        "resources": {"memory_mb": 64, "disk_mb": 128},
        "ports": [8080],
    })
}

fn task_body() -> Value {
    json!({
        "rootfs": "/var/lib/corral/rootfs/busybox",
        "command": ["/bin/echo", "hi"],
        "resources": {"memory_mb": 16},
    })
}

#[tokio::test]
async fn apps_crud() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    let mut changes = srv.state.watch_changes();
    assert_eq!(*changes.borrow_and_update(), 0);

    let created = srv.send("POST", "/v1/apps", ACME, web(2)).await.expect(201);
    assert_eq!(created["tenant"], "acme");
    assert_eq!(created["instances"], 2);
    assert_eq!(created["version"], 1);
    assert_eq!(created["resources"]["cpu_weight"], 100, "defaults apply");
    assert_eq!(created["created_at"], "2023-11-14T22:13:20.000000000Z");
    let rev = created["revision"].as_u64().unwrap();
    assert_eq!(rev, srv.store.revision().unwrap());
    assert!(
        changes.has_changed().unwrap(),
        "the convergence loop is woken"
    );
    assert_eq!(*changes.borrow_and_update(), rev);

    let dup = srv.send("POST", "/v1/apps", ACME, web(1)).await.expect(409);
    assert_eq!(dup["error"], "app acme/web already exists");

    assert_eq!(srv.get("/v1/apps/web", ACME).await.expect(200), created);
    let list = srv.get("/v1/apps", ACME).await.expect(200);
    assert_eq!(list["apps"], json!([created]));

    // Scaling keeps the version; a resource change bumps it.
    let scaled = srv
        .send("PATCH", "/v1/apps/web", ACME, json!({"instances": 5}))
        .await
        .expect(200);
    assert_eq!(
        (scaled["instances"].as_u64(), scaled["version"].as_u64()),
        (Some(5), Some(1))
    );
    let bigger = srv
        .send(
            "PATCH",
            "/v1/apps/web",
            ACME,
            json!({"resources": {"memory_mb": 128}, "env": {}}),
        )
        .await
        .expect(200);
    assert_eq!(bigger["version"], 2);
    assert_eq!(bigger["resources"]["memory_mb"], 128);
    assert_eq!(
        bigger["resources"]["disk_mb"], 128,
        "unnamed resources stay"
    );
    assert_eq!(bigger["env"], json!({}));
    assert_eq!(
        *changes.borrow_and_update(),
        bigger["revision"].as_u64().unwrap()
    );
    // A patch that changes nothing writes nothing.
    let before = srv.snapshot();
    let same = srv
        .send("PATCH", "/v1/apps/web", ACME, json!({"instances": 5}))
        .await
        .expect(200);
    assert_eq!(same, bigger);
    assert_eq!(srv.snapshot(), before);
    assert!(!changes.has_changed().unwrap());

    // Instances come from the view of actual state, ordered by index.
    let inst = srv.get("/v1/apps/web/instances", ACME).await.expect(200);
    assert_eq!(inst["desired"], 5);
    let got: Vec<(u64, &str, &str, &str)> = inst["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["index"].as_u64().unwrap(),
                i["cell"].as_str().unwrap(),
                i["state"].as_str().unwrap(),
                i["address"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (0, "cell-1", "running", "10.244.1.5"),
            (1, "cell-2", "running", "10.244.2.5")
        ]
    );
    assert_eq!(
        inst["instances"][0]["since"],
        "1970-01-01T00:00:01.000000000Z"
    );

    let deleted = srv
        .call("DELETE", "/v1/apps/web", Some(ACME), None)
        .await
        .expect(200);
    assert_eq!(deleted["name"], "web");
    assert!(*changes.borrow_and_update() > bigger["revision"].as_u64().unwrap());
    let gone = srv.get("/v1/apps/web", ACME).await.expect(404);
    assert_eq!(gone["error"], "no app web");
    srv.call("DELETE", "/v1/apps/web", Some(ACME), None)
        .await
        .expect(404);
    assert_eq!(
        srv.get("/v1/apps", ACME).await.expect(200)["apps"],
        json!([])
    );
    srv.shutdown().await;
}

#[tokio::test]
async fn the_admin_names_a_tenant_and_sees_all() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    let e = srv
        .send("POST", "/v1/apps", ADMIN, web(1))
        .await
        .expect(400);
    assert!(
        e["error"].as_str().unwrap().contains("give \"tenant\""),
        "{e}"
    );
    let mut body = web(1);
    body["tenant"] = "acme".into();
    srv.send("POST", "/v1/apps", ADMIN, body).await.expect(201);
    // The same name in another tenant is another app.
    srv.send("POST", "/v1/apps", BETA, web(3)).await.expect(201);
    assert_eq!(
        srv.get("/v1/apps/web", ACME).await.expect(200)["instances"],
        1
    );
    assert_eq!(
        srv.get("/v1/apps/web", BETA).await.expect(200)["instances"],
        3
    );

    assert_eq!(
        srv.get("/v1/apps", ADMIN).await.expect(200)["apps"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let only_beta = srv.get("/v1/apps?tenant=beta", ADMIN).await.expect(200);
    assert_eq!(only_beta["apps"][0]["tenant"], "beta");
    assert_eq!(only_beta["apps"].as_array().unwrap().len(), 1);
    // Ambiguous for the admin until a tenant is named.
    let amb = srv.get("/v1/apps/web", ADMIN).await.expect(409);
    assert_eq!(amb["details"], json!(["acme", "beta"]));
    let b = srv.get("/v1/apps/web?tenant=beta", ADMIN).await.expect(200);
    assert_eq!(b["instances"], 3);
    srv.send(
        "PATCH",
        "/v1/apps/web?tenant=acme",
        ADMIN,
        json!({"instances": 7}),
    )
    .await
    .expect(200);
    assert_eq!(
        srv.get("/v1/apps/web", ACME).await.expect(200)["instances"],
        7
    );
    let inst = srv
        .get("/v1/apps/web/instances?tenant=beta", ADMIN)
        .await
        .expect(200);
    assert_eq!(inst["instances"].as_array().unwrap().len(), 1);
    assert_eq!(inst["instances"][0]["address"], "10.244.2.6");

    // Cells: the admin's view only, ordered by id.
    let cells = srv.get("/v1/cells", ADMIN).await.expect(200);
    let cells = cells["cells"].as_array().unwrap().clone();
    assert_eq!(cells.len(), 2);
    assert_eq!(
        (cells[0]["id"].as_str(), cells[0]["zone"].as_str()),
        (Some("cell-1"), Some("z1"))
    );
    assert_eq!(cells[1]["state"], "draining");
    assert_eq!(cells[1]["total"]["memory_mb"], 4096);

    srv.call("DELETE", "/v1/apps/web?tenant=beta", Some(ADMIN), None)
        .await
        .expect(200);
    // Now unambiguous.
    srv.get("/v1/apps/web", ADMIN).await.expect(200);
    srv.shutdown().await;
}

#[tokio::test]
async fn tasks_crud() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    let t = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201);
    let id = t["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("task-") && id.len() == 21, "{id}");
    assert_eq!(t["state"], "pending");
    assert_eq!(t["tenant"], "acme");
    assert_eq!(t["app"].as_str(), Some(id.as_str()), "labelled by its id");
    assert_eq!(t["spec"]["resources"]["memory_mb"], 16);
    assert_eq!(
        srv.get(&format!("/v1/tasks/{id}"), ACME).await.expect(200),
        t
    );
    assert_eq!(
        srv.get(&format!("/v1/tasks/{id}"), ADMIN).await.expect(200),
        t
    );

    let mut labelled = task_body();
    labelled["app"] = "migrations".into();
    let t2 = srv
        .send("POST", "/v1/tasks", ACME, labelled)
        .await
        .expect(201);
    assert_eq!(t2["app"], "migrations");
    assert_ne!(t2["id"], t["id"]);

    let list = srv.get("/v1/tasks", ACME).await.expect(200);
    assert_eq!(list["tasks"].as_array().unwrap().len(), 2);
    srv.get("/v1/tasks/task-0000000000000000", ACME)
        .await
        .expect(404);
    srv.get("/v1/tasks/-bad", ACME).await.expect(400);
    srv.send("POST", "/v1/tasks", ADMIN, task_body())
        .await
        .expect(400);
    let mut for_beta = task_body();
    for_beta["tenant"] = "beta".into();
    srv.send("POST", "/v1/tasks", ADMIN, for_beta)
        .await
        .expect(201);
    assert_eq!(
        srv.get("/v1/tasks", ADMIN).await.expect(200)["tasks"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    srv.shutdown().await;
}

/// Every route, with a body where it takes one.
fn every_route(task: &str) -> Vec<(&'static str, String, Option<Value>)> {
    vec![
        ("GET", "/v1/apps".into(), None),
        ("POST", "/v1/apps".into(), Some(web(1))),
        ("GET", "/v1/apps/web".into(), None),
        (
            "PATCH",
            "/v1/apps/web".into(),
            Some(json!({"instances": 9})),
        ),
        ("DELETE", "/v1/apps/web".into(), None),
        ("GET", "/v1/apps/web/instances".into(), None),
        ("GET", "/v1/tasks".into(), None),
        ("POST", "/v1/tasks".into(), Some(task_body())),
        ("GET", format!("/v1/tasks/{task}"), None),
        ("GET", "/v1/cells".into(), None),
        ("GET", "/v1/policies".into(), None),
        (
            "POST",
            "/v1/policies".into(),
            Some(json!({"from": "beta", "to": "acme"})),
        ),
        (
            "DELETE",
            "/v1/policies".into(),
            Some(json!({"from": "beta", "to": "acme"})),
        ),
        ("GET", "/v1/events".into(), None),
        ("GET", "/v1/nonexistent".into(), None),
    ]
}

/// A route's shape: the path without its query, with names as placeholders.
fn route_of(method: &str, path: &str) -> String {
    let path = path.split('?').next().unwrap();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let shape = match segs.as_slice() {
        ["v1", "apps", _] => "/v1/apps/{app}".to_owned(),
        ["v1", "apps", _, rest] => format!("/v1/apps/{{app}}/{rest}"),
        ["v1", "tasks", _] => "/v1/tasks/{task}".to_owned(),
        _ => path.to_owned(),
    };
    format!("{method} {shape}")
}

/// Tenant beta against everything tenant acme has, on every route of
/// [`every_route`] (the test fails if a route there is left out here):
/// acme's objects answer 404 (as if they did not exist) or 403, listings
/// hold only beta's own, beta's event stream carries none of acme's
/// changes, and the store is exactly as before.
#[tokio::test]
async fn tenant_b_cannot_read_change_or_delete_tenant_a_objects_on_any_route() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    // acme: apps "web" and "api", a task, a policy opening acme to gamma.
    srv.send("POST", "/v1/apps", ACME, web(2)).await.expect(201);
    let mut api = web(1);
    api["name"] = "api".into();
    srv.send("POST", "/v1/apps", ACME, api).await.expect(201);
    let acme_task = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let gamma_to_acme = json!({"from": "gamma", "to": "acme", "protocol": "tcp", "port": 8080});
    srv.send("POST", "/v1/policies", ACME, gamma_to_acme.clone())
        .await
        .expect(201);
    // beta: its own "web" (the same name) and task, so listings are not
    // trivially empty.
    srv.send("POST", "/v1/apps", BETA, web(1)).await.expect(201);
    let beta_task = srv
        .send("POST", "/v1/tasks", BETA, task_body())
        .await
        .expect(201)["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (mut beta_events, mut beta_buf) = subscribe(srv.addr, BETA).await;
    let (mut gamma_events, mut gamma_buf) = subscribe(srv.addr, GAMMA).await;
    let before = srv.snapshot();

    let mut for_acme_app = web(1);
    for_acme_app["tenant"] = "acme".into();
    let mut for_acme_task = task_body();
    for_acme_task["tenant"] = "acme".into();
    let t = &acme_task;
    // (method, path, body, status)
    let cases: Vec<(&str, String, Option<Value>, u16)> = vec![
        ("POST", "/v1/apps".into(), Some(for_acme_app), 403),
        ("POST", "/v1/apps?tenant=acme".into(), Some(web(3)), 403),
        ("GET", "/v1/apps/api".into(), None, 404),
        ("GET", "/v1/apps/web?tenant=acme".into(), None, 404),
        (
            "PATCH",
            "/v1/apps/api".into(),
            Some(json!({"instances": 9})),
            404,
        ),
        (
            "PATCH",
            "/v1/apps/web?tenant=acme".into(),
            Some(json!({"instances": 0})),
            404,
        ),
        ("DELETE", "/v1/apps/api".into(), None, 404),
        ("DELETE", "/v1/apps/web?tenant=acme".into(), None, 404),
        ("GET", "/v1/apps/api/instances".into(), None, 404),
        (
            "GET",
            "/v1/apps/web/instances?tenant=acme".into(),
            None,
            404,
        ),
        ("POST", "/v1/tasks".into(), Some(for_acme_task), 403),
        (
            "POST",
            "/v1/tasks?tenant=acme".into(),
            Some(task_body()),
            403,
        ),
        ("GET", format!("/v1/tasks/{t}"), None, 404),
        ("GET", format!("/v1/tasks/{t}?tenant=acme"), None, 404),
        ("GET", "/v1/cells".into(), None, 403),
        // beta may open only itself: not acme to beta, not acme to gamma.
        (
            "POST",
            "/v1/policies".into(),
            Some(json!({"from": "beta", "to": "acme"})),
            403,
        ),
        (
            "POST",
            "/v1/policies".into(),
            Some(gamma_to_acme.clone()),
            403,
        ),
        (
            "DELETE",
            "/v1/policies".into(),
            Some(gamma_to_acme.clone()),
            403,
        ),
        (
            "DELETE",
            "/v1/policies".into(),
            Some(json!({"from": "beta", "to": "acme"})),
            403,
        ),
        ("GET", "/v1/nonexistent".into(), None, 404),
    ];
    for (method, path, body, status) in &cases {
        let r = srv
            .call(
                method,
                path,
                Some(BETA),
                body.as_ref().map(|b| b.to_string()).as_deref(),
            )
            .await;
        assert_eq!(
            r.status,
            *status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        // Only an error: nothing of acme's objects, not even acme's name.
        let v = r.json();
        assert!(v["error"].is_string(), "{method} {path}: {v}");
        assert!(v.get("revision").is_none(), "{method} {path}: {v}");
        assert!(
            !v.to_string().contains("acme"),
            "{method} {path} leaks: {v}"
        );
    }

    // Listings: beta's own only, with or without naming acme.
    let apps = srv.get("/v1/apps", BETA).await.expect(200);
    let tenants: Vec<&Value> = apps["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["tenant"])
        .collect();
    assert_eq!(tenants, [&json!("beta")], "{apps}");
    let own_web = srv.get("/v1/apps/web", BETA).await.expect(200);
    assert_eq!(own_web["tenant"], "beta", "the name finds beta's own app");
    let instances = srv.get("/v1/apps/web/instances", BETA).await.expect(200);
    for i in instances["instances"].as_array().unwrap() {
        assert_eq!(i["tenant"], "beta", "{instances}");
    }
    let tasks = srv.get("/v1/tasks", BETA).await.expect(200);
    let ids: Vec<&Value> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| &t["id"])
        .collect();
    assert_eq!(ids, [&json!(beta_task)], "{tasks}");
    for path in ["/v1/apps?tenant=acme", "/v1/tasks?tenant=acme"] {
        let v = srv.get(path, BETA).await.expect(200);
        let list = v.as_object().unwrap().values().next().unwrap();
        assert_eq!(list, &json!([]), "{path}: {v}");
    }
    // A policy between acme and gamma is none of beta's business.
    let policies = srv.get("/v1/policies", BETA).await.expect(200);
    assert_eq!(policies["policies"], json!([]), "{policies}");
    assert_eq!(
        srv.get("/v1/policies", GAMMA).await.expect(200)["policies"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Every route is in the table above (or a listing checked just now).
    let mut covered: std::collections::BTreeSet<String> =
        cases.iter().map(|(m, p, _, _)| route_of(m, p)).collect();
    covered.extend(
        [
            "GET /v1/apps",
            "GET /v1/tasks",
            "GET /v1/policies",
            "GET /v1/events",
        ]
        .map(String::from),
    );
    for (method, path, _) in every_route("t") {
        let route = route_of(method, &path);
        assert!(
            covered.contains(&route),
            "{route} is not tested across tenants"
        );
    }
    assert_eq!(srv.snapshot(), before, "beta changed nothing of anyone's");

    // The event stream: acme's changes do not reach beta; beta's own do.
    srv.send("PATCH", "/v1/apps/api", ACME, json!({"instances": 3}))
        .await
        .expect(200);
    srv.send("DELETE", "/v1/policies", ACME, gamma_to_acme)
        .await
        .expect(200);
    srv.send("PATCH", "/v1/apps/web", BETA, json!({"instances": 2}))
        .await
        .expect(200);
    read_until(&mut beta_events, &mut beta_buf, "event: app.updated").await;
    let text = String::from_utf8_lossy(&beta_buf).into_owned();
    assert!(!text.contains("acme"), "{text}");
    assert!(!text.contains("policy."), "{text}");
    assert_eq!(
        event_data(&beta_buf, "app.updated")["app"]["tenant"],
        "beta"
    );
    // Gamma, the policy's `from`, lists it and so sees it go.
    read_until(&mut gamma_events, &mut gamma_buf, "event: policy.deleted").await;
    assert_eq!(
        event_data(&gamma_buf, "policy.deleted")["policy"]["from"],
        "gamma"
    );
    assert!(!String::from_utf8_lossy(&gamma_buf).contains("app."));
    srv.shutdown().await;
}

#[tokio::test]
async fn every_route_needs_a_valid_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    srv.send("POST", "/v1/apps", ACME, web(1)).await.expect(201);
    let task = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201);
    let before = srv.snapshot();
    for (method, path, body) in every_route(task["id"].as_str().unwrap()) {
        let body = body.map(|b| b.to_string());
        for auth in [
            None,
            Some("Bearer wrong-token-0123456789".to_owned()),
            Some(format!("Bearer {}", &ACME[..ACME.len() - 1])),
            Some(format!("Basic {ACME}")),
            Some(ACME.to_owned()),
            Some("Bearer".to_owned()),
        ] {
            let r = call(srv.addr, method, &path, auth.clone(), body.as_deref()).await;
            assert_eq!(r.status, 401, "{method} {path} with {auth:?}");
            assert_eq!(
                r.header("www-authenticate"),
                Some("Bearer realm=\"corral\"")
            );
            assert!(
                r.json()["error"].as_str().unwrap().contains("token")
                    || r.json()["error"].as_str().unwrap().contains("Bearer")
            );
        }
    }
    assert_eq!(srv.snapshot(), before, "refused requests changed nothing");
    // Health needs no token.
    let h = srv.call("GET", "/healthz", None, None).await;
    assert_eq!((h.status, h.body.as_slice()), (200, b"ok\n".as_slice()));
    srv.shutdown().await;
}

#[tokio::test]
async fn a_tenant_cannot_see_change_or_delete_another_tenants_apps_and_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    srv.send("POST", "/v1/apps", ACME, web(2)).await.expect(201);
    let task = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201);
    let task = task["id"].as_str().unwrap().to_owned();
    let before = srv.snapshot();

    // What beta gets for a name that exists nowhere: the answers for acme's
    // objects must be exactly the same, so nothing leaks.
    let missing_app = srv.get("/v1/apps/nothing-here", BETA).await.expect(404);
    let missing_task = srv
        .get("/v1/tasks/task-00000000deadbeef", BETA)
        .await
        .expect(404);
    let same_as_missing = |r: Resp, missing: &Value, name: &str, what: &str| {
        let v = r.expect(404);
        let expected = missing["error"].as_str().unwrap().replace(
            if what == "app" {
                "nothing-here"
            } else {
                "task-00000000deadbeef"
            },
            name,
        );
        assert_eq!(v["error"], expected.as_str());
        assert_eq!(v.as_object().unwrap().len(), 1);
    };

    let mut acme_tenant_app = web(1);
    acme_tenant_app["tenant"] = "acme".into();
    let mut acme_tenant_task = task_body();
    acme_tenant_task["tenant"] = "acme".into();

    // (method, path, body, expected status); 404s are compared to "missing".
    let cases: Vec<(&str, String, Option<Value>, u16)> = vec![
        ("GET", "/v1/apps/web".into(), None, 404),
        ("GET", "/v1/apps/web?tenant=acme".into(), None, 404),
        (
            "PATCH",
            "/v1/apps/web".into(),
            Some(json!({"instances": 9})),
            404,
        ),
        (
            "PATCH",
            "/v1/apps/web?tenant=acme".into(),
            Some(json!({"instances": 0})),
            404,
        ),
        ("DELETE", "/v1/apps/web".into(), None, 404),
        ("DELETE", "/v1/apps/web?tenant=acme".into(), None, 404),
        ("GET", "/v1/apps/web/instances".into(), None, 404),
        (
            "GET",
            "/v1/apps/web/instances?tenant=acme".into(),
            None,
            404,
        ),
        ("GET", format!("/v1/tasks/{task}"), None, 404),
        ("GET", format!("/v1/tasks/{task}?tenant=acme"), None, 404),
        ("POST", "/v1/apps".into(), Some(acme_tenant_app), 403),
        ("POST", "/v1/tasks".into(), Some(acme_tenant_task), 403),
        ("POST", "/v1/apps?tenant=acme".into(), Some(web(1)), 403),
        (
            "POST",
            "/v1/tasks?tenant=acme".into(),
            Some(task_body()),
            403,
        ),
        ("GET", "/v1/cells".into(), None, 403),
    ];
    for (method, path, body, status) in cases {
        let r = srv
            .call(
                method,
                &path,
                Some(BETA),
                body.map(|b| b.to_string()).as_deref(),
            )
            .await;
        assert_eq!(
            r.status,
            status,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        if status == 404 {
            if path.contains("/tasks/") {
                same_as_missing(r, &missing_task, &task, "task");
            } else {
                same_as_missing(r, &missing_app, "web", "app");
            }
        } else {
            assert!(r.json()["error"].is_string());
        }
    }
    // Listings show nothing of acme's, with or without asking for it.
    for path in ["/v1/apps", "/v1/apps?tenant=acme"] {
        assert_eq!(
            srv.get(path, BETA).await.expect(200)["apps"],
            json!([]),
            "{path}"
        );
    }
    for path in ["/v1/tasks", "/v1/tasks?tenant=acme"] {
        assert_eq!(
            srv.get(path, BETA).await.expect(200)["tasks"],
            json!([]),
            "{path}"
        );
    }
    assert_eq!(srv.snapshot(), before, "beta changed nothing");
    // acme's objects are intact and still acme's.
    assert_eq!(
        srv.get("/v1/apps/web", ACME).await.expect(200)["instances"],
        2
    );
    srv.get(&format!("/v1/tasks/{task}"), ACME)
        .await
        .expect(200);
    srv.shutdown().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    srv.send("POST", "/v1/apps", ACME, web(1)).await.expect(201);
    let before = srv.snapshot();

    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = web(1);
        f(&mut v);
        v.to_string()
    };
    let task_with = |f: &dyn Fn(&mut Value)| {
        let mut v = task_body();
        f(&mut v);
        v.to_string()
    };
    // (method, path, body, a piece of the expected message)
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("POST", "/v1/apps", "{\"name\":".into(), "invalid app"),
        ("POST", "/v1/apps", "".into(), "invalid app"),
        ("POST", "/v1/apps", "[1,2]".into(), "invalid app"),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["replicas"] = 3.into()),
            "unknown field `replicas`",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["resources"]["memory_gb"] = 1.into()),
            "unknown field `memory_gb`",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["name"] = "../etc".into()),
            "must start with a letter or digit",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["name"] = "x".repeat(64).into()),
            "longer than 63",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["tenant"] = "bad tenant".into()),
            "tenant",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["instances"] = 1001.into()),
            "instances 1001 is outside 0..=1000",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["instances"] = (-1).into()),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["resources"]["memory_mb"] = (1u64 << 40).into()),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["resources"]["cpu_weight"] = 0.into()),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["rootfs"] = "relative/path".into()),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["command"] = json!([])),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["ports"] = json!([80, 80])),
            "invalid app",
        ),
        (
            "POST",
            "/v1/apps",
            with(&|v| v["tags"] = json!(["no spaces allowed"])),
            "placement tag",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            "{\"instances\": 5000}".into(),
            "invalid app patch",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            "{\"resources\": {\"memory_mb\": 0}}".into(),
            "invalid app patch",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            "{\"name\": \"other\"}".into(),
            "unknown field `name`",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            "{\"instances\": \"many\"}".into(),
            "invalid app patch",
        ),
        (
            "PATCH",
            "/v1/apps/web",
            "not json".into(),
            "invalid app patch",
        ),
        ("PATCH", "/v1/apps/-web", "{}".into(), "app \"-web\""),
        (
            "GET",
            "/v1/apps/web?colour=blue",
            "".into(),
            "unknown or repeated query parameter",
        ),
        ("GET", "/v1/apps?tenant=../x", "".into(), "tenant"),
        (
            "POST",
            "/v1/tasks",
            task_with(&|v| v["resources"]["memory_mb"] = 1.into()),
            "invalid task",
        ),
        (
            "POST",
            "/v1/tasks",
            task_with(&|v| v["ports"] = json!([80])),
            "unknown field `ports`",
        ),
        (
            "POST",
            "/v1/tasks",
            task_with(&|v| v["app"] = "../x".into()),
            "app",
        ),
    ];
    for (method, path, body, msg) in cases {
        let r = srv
            .call(
                method,
                path,
                Some(ACME),
                (!body.is_empty() || method != "GET").then_some(body.as_str()),
            )
            .await;
        let v = r.expect(400);
        let mut text = v["error"].as_str().unwrap().to_owned();
        for d in v["details"].as_array().into_iter().flatten() {
            text.push('\n');
            text.push_str(d.as_str().unwrap());
        }
        assert!(text.contains(msg), "{method} {path} {body}: {text}");
    }
    // Validation reports every problem at once, in details.
    let r = srv
        .send(
            "POST",
            "/v1/apps",
            ACME,
            json!({
                "name": "multi", "instances": 2000, "rootfs": "rel", "command": [],
                "resources": {"memory_mb": 1, "cpu_weight": 0},
            }),
        )
        .await
        .expect(400);
    assert_eq!(r["error"], "invalid app");
    assert_eq!(r["details"].as_array().unwrap().len(), 5, "{r}");

    // A body over the limit is refused before it is read.
    let mut s = TcpStream::connect(srv.addr).await.unwrap();
    s.write_all(
        format!(
            "POST /v1/apps HTTP/1.1\r\nHost: b\r\nConnection: close\r\nAuthorization: Bearer {ACME}\r\nContent-Length: {}\r\n\r\n",
            2 << 20
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let r = parse(&buf);
    assert_eq!(r.status, 413);
    assert!(r.json()["error"]
        .as_str()
        .unwrap()
        .contains("larger than 1048576 bytes"));

    // Wrong methods and unknown routes.
    let r = srv.call("PUT", "/v1/apps", Some(ACME), Some("{}")).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, POST"));
    srv.get("/v1/nothing", ACME).await.expect(404);
    srv.get("/v2/apps", ACME).await.expect(404);

    assert_eq!(srv.snapshot(), before, "nothing was written");
    srv.shutdown().await;
}

#[tokio::test]
async fn apps_and_tasks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("brain.redb");
    let srv = start(&path).await;
    srv.send("POST", "/v1/apps", ACME, web(3)).await.expect(201);
    let mut other = web(1);
    other["name"] = "api".into();
    srv.send("POST", "/v1/apps", BETA, other).await.expect(201);
    srv.send(
        "PATCH",
        "/v1/apps/web",
        ACME,
        json!({"resources": {"memory_mb": 96}}),
    )
    .await
    .expect(200);
    let task = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201);
    let apps_before = srv.get("/v1/apps", ADMIN).await.expect(200);
    let rev = srv.store.revision().unwrap();
    srv.shutdown().await;

    let srv = start(&path).await;
    assert_eq!(srv.get("/v1/apps", ADMIN).await.expect(200), apps_before);
    assert_eq!(
        *srv.state.watch_changes().borrow(),
        rev,
        "starts from the stored revision"
    );
    let web_app = srv.get("/v1/apps/web", ACME).await.expect(200);
    assert_eq!(
        (web_app["instances"].as_u64(), web_app["version"].as_u64()),
        (Some(3), Some(2))
    );
    let id = task["id"].as_str().unwrap();
    assert_eq!(
        srv.get(&format!("/v1/tasks/{id}"), ACME).await.expect(200),
        task
    );
    // Writes continue the revision sequence.
    let scaled = srv
        .send("PATCH", "/v1/apps/web", ACME, json!({"instances": 4}))
        .await
        .expect(200);
    assert_eq!(scaled["revision"].as_u64(), Some(rev + 1));
    srv.shutdown().await;
}

/// Reads from an event stream until `needle` has arrived; returns all read.
async fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, needle: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(buf).contains(needle) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no {needle:?} in: {}", String::from_utf8_lossy(buf)))
            .unwrap();
        assert!(
            n > 0,
            "stream closed before {needle:?}: {}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn subscribe(addr: SocketAddr, token: &str) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /v1/events HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    // The greeting comes after the headers: from then on nothing is missed.
    read_until(&mut s, &mut buf, "corral brain events").await;
    let head = String::from_utf8_lossy(&buf).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/event-stream"),
        "{head}"
    );
    (s, buf)
}

/// The `data:` JSON of the first `event: <name>` in `buf`.
fn event_data(buf: &[u8], name: &str) -> Value {
    let text = String::from_utf8_lossy(buf);
    let at = text.find(&format!("event: {name}\n")).unwrap();
    let data = text[at..].split("data: ").nth(1).unwrap();
    serde_json::from_str(data.split('\n').next().unwrap()).unwrap()
}

#[tokio::test]
async fn the_event_stream_delivers_changes_to_those_who_may_see_them() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    let (mut acme, mut acme_buf) = subscribe(srv.addr, ACME).await;
    let (mut beta, mut beta_buf) = subscribe(srv.addr, BETA).await;
    let (mut admin, mut admin_buf) = subscribe(srv.addr, ADMIN).await;

    let created = srv.send("POST", "/v1/apps", ACME, web(2)).await.expect(201);
    read_until(&mut acme, &mut acme_buf, "event: app.created").await;
    let ev = event_data(&acme_buf, "app.created");
    assert_eq!(ev["type"], "app.created");
    assert_eq!(ev["app"], created);
    assert_eq!(ev["revision"], created["revision"]);
    let id_line = format!("id: {}\n", created["revision"]);
    assert!(String::from_utf8_lossy(&acme_buf).contains(&id_line));
    read_until(&mut admin, &mut admin_buf, "event: app.created").await;

    // beta's stream skipped acme's event: the first thing it gets is its own.
    let mut other = web(1);
    other["name"] = "beta-app".into();
    srv.send("POST", "/v1/apps", BETA, other).await.expect(201);
    read_until(&mut beta, &mut beta_buf, "event: app.created").await;
    assert_eq!(
        event_data(&beta_buf, "app.created")["app"]["name"],
        "beta-app"
    );
    assert!(!String::from_utf8_lossy(&beta_buf).contains("\"acme\""));

    srv.send("PATCH", "/v1/apps/web", ACME, json!({"instances": 3}))
        .await
        .expect(200);
    read_until(&mut acme, &mut acme_buf, "event: app.updated").await;
    assert_eq!(event_data(&acme_buf, "app.updated")["app"]["instances"], 3);
    srv.call("DELETE", "/v1/apps/web", Some(ACME), None)
        .await
        .expect(200);
    read_until(&mut acme, &mut acme_buf, "event: app.deleted").await;
    assert_eq!(event_data(&acme_buf, "app.deleted")["name"], "web");
    let t = srv
        .send("POST", "/v1/tasks", ACME, task_body())
        .await
        .expect(201);
    read_until(&mut acme, &mut acme_buf, "event: task.created").await;
    assert_eq!(event_data(&acme_buf, "task.created")["task"]["id"], t["id"]);
    read_until(&mut admin, &mut admin_buf, "event: task.created").await;
    assert!(String::from_utf8_lossy(&admin_buf).contains("beta-app"));

    // Shutting down ends the streams instead of waiting for them forever.
    srv.shutdown().await;
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), acme.read_to_end(&mut rest))
        .await
        .expect("stream did not end")
        .unwrap();
}

#[tokio::test]
async fn policies_are_granted_by_the_tenant_they_open_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start(&dir.path().join("brain.redb")).await;
    let rule = json!({"from": "beta", "to": "acme", "protocol": "tcp", "port": 8080});

    // beta cannot open acme's instances; acme can.
    srv.send("POST", "/v1/policies", BETA, rule.clone())
        .await
        .expect(403);
    let p = srv
        .send("POST", "/v1/policies", ACME, rule.clone())
        .await
        .expect(201);
    assert_eq!(p["from"], "beta");
    assert!(p["revision"].as_u64().unwrap() > 0);
    srv.send("POST", "/v1/policies", ACME, rule.clone())
        .await
        .expect(409);

    // Both tenants see it, the admin too; a third tenant would not.
    for token in [ACME, BETA, ADMIN] {
        let v = srv.get("/v1/policies", token).await.expect(200);
        assert_eq!(v["policies"].as_array().unwrap().len(), 1, "{v}");
    }

    // Bad input changes nothing.
    for (body, words) in [
        (json!({"from": "acme", "to": "acme"}), "to itself"),
        (
            json!({"from": "beta", "to": "acme", "protocol": "icmp", "port": 1}),
            "needs protocol",
        ),
        (
            json!({"from": "nobody", "to": "acme"}),
            "unknown tenant nobody",
        ),
        (
            json!({"from": "beta", "to": "acme", "app": "web"}),
            "tenant acme has no app web",
        ),
        (
            json!({"from": "beta", "to": "acme", "cell": "c1"}),
            "unknown field",
        ),
    ] {
        let r = srv.send("POST", "/v1/policies", ADMIN, body).await;
        assert_eq!(r.status, 400);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert!(text.contains(words), "{text}");
    }
    let v = srv.get("/v1/policies", ADMIN).await.expect(200);
    assert_eq!(v["policies"].as_array().unwrap().len(), 1);

    // beta cannot withdraw it; acme can, once.
    srv.send("DELETE", "/v1/policies", BETA, rule.clone())
        .await
        .expect(403);
    srv.send("DELETE", "/v1/policies", ACME, rule.clone())
        .await
        .expect(200);
    srv.send("DELETE", "/v1/policies", ACME, rule)
        .await
        .expect(404);
    let v = srv.get("/v1/policies", ADMIN).await.expect(200);
    assert!(v["policies"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn apps_show_their_vip_and_ports_and_published_ports_are_cluster_wide() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with(&dir.path().join("s.redb"), Some("10.96.0.0/30")).await;
    let body = |name: &str, ports: Value| {
        json!({"name": name, "rootfs": "/r", "command": ["x"],
               "resources": {"memory_mb": 8}, "ports": ports})
    };
    // A tenant token creates an app with ports: it gets the first VIP.
    let web = srv
        .send(
            "POST",
            "/v1/apps",
            ACME,
            body(
                "web",
                json!([8080, {"port": 53, "protocol": "udp"},
                               {"port": 80, "published": 30080}]),
            ),
        )
        .await
        .expect(201);
    assert_eq!(web["vip"], "10.96.0.1");
    assert_eq!(
        web["ports"],
        json!([{"port": 8080, "protocol": "tcp", "published": null},
               {"port": 53, "protocol": "udp", "published": null},
               {"port": 80, "protocol": "tcp", "published": 30080}])
    );
    for (path, token) in [("/v1/apps/web", ACME), ("/v1/apps/web?tenant=acme", ADMIN)] {
        let got = srv.get(path, token).await.expect(200);
        assert_eq!((&got["vip"], &got["ports"]), (&web["vip"], &web["ports"]));
    }
    let list = srv.get("/v1/apps", ACME).await.expect(200);
    assert_eq!(list["apps"][0]["vip"], "10.96.0.1");
    // No ports, no VIP.
    let quiet = srv
        .send("POST", "/v1/apps", ACME, body("quiet", json!([])))
        .await
        .expect(201);
    assert_eq!(quiet["vip"], Value::Null);

    // Another tenant may not publish the same port: 409, without naming
    // the other tenant's app; the admin is told which app holds it.
    let taken = body("web", json!([{"port": 80, "published": 30080}]));
    let e = srv
        .send("POST", "/v1/apps", BETA, taken.clone())
        .await
        .expect(409);
    assert_eq!(
        e["error"],
        "published port 30080/tcp is held by another tenant's app: choose another"
    );
    let mut as_admin = taken.clone();
    as_admin["tenant"] = "beta".into();
    let e = srv
        .send("POST", "/v1/apps", ADMIN, as_admin)
        .await
        .expect(409);
    assert_eq!(
        e["error"],
        "published port 30080/tcp is held by app acme/web: choose another"
    );
    let e = srv
        .send(
            "PATCH",
            "/v1/apps/quiet",
            ACME,
            json!({"ports": [{"port": 1, "published": 30080}]}),
        )
        .await
        .expect(409);
    assert!(e["error"].as_str().unwrap().contains("acme/web"), "{e}");
    // Bad ports: every problem, nothing created.
    let e = srv
        .send("POST", "/v1/apps", BETA, body("bad", json!([0, 80, 80])))
        .await
        .expect(400);
    assert_eq!(e["details"].as_array().unwrap().len(), 2, "{e}");

    // The range has two addresses: the third app with ports is refused.
    srv.send("POST", "/v1/apps", BETA, body("web", json!([8080])))
        .await
        .expect(201);
    let before = srv.snapshot();
    let e = srv
        .send("POST", "/v1/apps", BETA, body("more", json!([8080])))
        .await
        .expect(507);
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("vip_range 10.96.0.0/30"),
        "{e}"
    );
    assert_eq!(srv.snapshot(), before, "nothing was created");
    // Deleting an app frees its VIP for the next.
    srv.call("DELETE", "/v1/apps/web", Some(ACME), None)
        .await
        .expect(200);
    let more = srv
        .send("POST", "/v1/apps", BETA, body("more", json!([8080])))
        .await
        .expect(201);
    assert_eq!(more["vip"], "10.96.0.1");
    srv.shutdown().await;
}

#[tokio::test]
async fn a_list_of_apps_is_created_in_one_commit_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let srv = start_with(&dir.path().join("s.redb"), Some("10.96.0.0/24")).await;
    let named = |name: &str, port: u16| {
        let mut v = web(1);
        v["name"] = name.into();
        v["ports"] = json!([{"port": 8080, "published": port}]);
        v
    };
    let before = srv.store.revision().unwrap();
    let created = srv
        .send(
            "POST",
            "/v1/apps",
            ACME,
            json!([named("a", 30001), named("b", 30002)]),
        )
        .await
        .expect(201);
    let apps = created["apps"].as_array().unwrap();
    assert_eq!(apps.len(), 2);
    assert_eq!(
        (apps[0]["name"].as_str(), apps[1]["name"].as_str()),
        (Some("a"), Some("b"))
    );
    let rev = srv.store.revision().unwrap();
    assert_eq!(rev, before + 1, "one commit");
    assert!(apps
        .iter()
        .all(|a| a["revision"] == rev && a["tenant"] == "acme"));
    // Each gets its own VIP, as if created one after the other.
    assert_ne!(apps[0]["vip"], apps[1]["vip"]);
    assert_eq!(srv.get("/v1/apps/b", ACME).await.expect(200), apps[1]);

    // Every problem of every app at once, each with its position; nothing
    // is created.
    let mut bad = named("c", 30003);
    bad["instances"] = 5000.into();
    bad["command"] = json!([]);
    let r = srv
        .send(
            "POST",
            "/v1/apps",
            ACME,
            json!([named("d", 30004), bad, named("d", 30005)]),
        )
        .await
        .expect(400);
    assert_eq!(r["error"], "invalid apps");
    let details: Vec<&str> = r["details"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert_eq!(details.len(), 3, "{details:?}");
    assert!(details[0].starts_with("apps[1] (c): "), "{details:?}");
    assert!(
        details[2].contains("apps[2] (d): app acme/d is named twice"),
        "{details:?}"
    );
    // One existing app, or a published port another app holds, refuses
    // the whole list.
    srv.send(
        "POST",
        "/v1/apps",
        ACME,
        json!([named("e", 30006), named("a", 30007)]),
    )
    .await
    .expect(409);
    srv.send(
        "POST",
        "/v1/apps",
        ACME,
        json!([named("f", 30008), named("g", 30001)]),
    )
    .await
    .expect(409);
    assert_eq!(srv.store.revision().unwrap(), rev, "nothing written");
    for missing in ["c", "d", "e", "f", "g"] {
        srv.get(&format!("/v1/apps/{missing}"), ACME)
            .await
            .expect(404);
    }
    // A tenant token acts for its own tenant only, in a list too.
    let mut other = named("h", 30009);
    other["tenant"] = "beta".into();
    srv.send("POST", "/v1/apps", ACME, json!([other]))
        .await
        .expect(403);
    srv.send("POST", "/v1/apps", ACME, json!([]))
        .await
        .expect(400);
    let many: Vec<Value> = (0..1001).map(|i| named(&format!("m{i}"), 0)).collect();
    let r = srv
        .send("POST", "/v1/apps", ACME, json!(many))
        .await
        .expect(400);
    assert!(r["error"].as_str().unwrap().contains("at most 1000"), "{r}");
}
