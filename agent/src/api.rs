//! The agent's HTTP/JSON API, served on a unix socket and optionally TCP:
//! instance lifecycle, logs, cell state, health and metrics.

use crate::config::ApiToken;
use crate::executor::{ExecError, Executor};
use bytes::Bytes;
use corral_proto::policy::PolicyRule;
use corral_proto::{InstanceId, InstanceSpec};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

pub type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub struct ApiState {
    pub exec: Arc<Executor>,
    pub registry: Registry,
    pub ready: AtomicBool,
    /// `[api] token`: asked for on the TCP API listener.
    pub token: Option<ApiToken>,
}

/// Which listener a request came through: it decides what is served and
/// whether a token is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The unix socket: mode 0600, so only root reaches it; no token.
    Unix,
    /// `[api] listen`: the whole API, behind `[api] token` when set.
    Tcp,
    /// `[metrics] listen`: only `/metrics` and `/healthz`, no token.
    Metrics,
}

/// Routes that answer without a token: probes and scrapes, which reveal
/// nothing an instance could not see and change nothing.
fn is_open_route(segs: &[&str]) -> bool {
    matches!(segs, ["healthz" | "readyz" | "metrics"])
}

/// Whether a request may go on: on the TCP listener with a token set,
/// every route but the open ones needs `Authorization: Bearer <token>`.
fn check_token(
    token: Option<&ApiToken>,
    listener: Listener,
    segs: &[&str],
    authorization: Option<&[u8]>,
) -> Result<(), &'static str> {
    let Some(token) = token else { return Ok(()) };
    if listener != Listener::Tcp || is_open_route(segs) {
        return Ok(());
    }
    let Some(value) = authorization else {
        return Err("missing bearer token: send 'Authorization: Bearer <token>' ([api] token)");
    };
    let presented = value
        .iter()
        .position(|&b| b == b' ')
        .filter(|&i| value[..i].eq_ignore_ascii_case(b"bearer"))
        .map(|i| value[i + 1..].trim_ascii())
        .ok_or("the Authorization header must be 'Bearer <token>'")?;
    if token.matches(presented) {
        Ok(())
    } else {
        Err("invalid bearer token")
    }
}

/// A streaming body fed through a channel (followed logs).
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn full(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    if let Ok(v) = ctype.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

fn json(status: StatusCode, v: &impl serde::Serialize) -> Response<RespBody> {
    match serde_json::to_vec_pretty(v) {
        Ok(mut b) => {
            b.push(b'\n');
            full(status, "application/json", b)
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding response: {e}"),
            vec![],
        ),
    }
}

fn error(status: StatusCode, msg: String, details: Vec<String>) -> Response<RespBody> {
    let mut v = serde_json::json!({ "error": msg });
    if !details.is_empty() {
        v["details"] = details.into();
    }
    json(status, &v)
}

fn exec_error(e: ExecError) -> Response<RespBody> {
    let status = match &e {
        ExecError::BadSpec(_) | ExecError::BadRootfs(_) => StatusCode::BAD_REQUEST,
        ExecError::Conflict { .. }
        | ExecError::Deleting { .. }
        | ExecError::NoCapacity(_)
        | ExecError::Evacuating => StatusCode::CONFLICT,
        ExecError::NotFound(_) => StatusCode::NOT_FOUND,
        // The cell's disk is full: retrying elsewhere (or later) helps.
        ExecError::Io { source, .. } if source.kind() == std::io::ErrorKind::StorageFull => {
            StatusCode::INSUFFICIENT_STORAGE
        }
        ExecError::StopTimeout { .. } | ExecError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let details = match &e {
        ExecError::BadSpec(s) => s.problems.clone(),
        _ => vec![],
    };
    error(status, e.to_string(), details)
}

fn query(req: &Request<Incoming>, key: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == key).then(|| v.to_owned())
    })
}

pub async fn handle(
    state: Arc<ApiState>,
    listener: Listener,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let metrics_only = listener == Listener::Metrics;
    let authorization = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(msg) = check_token(state.token.as_ref(), listener, &segs, authorization) {
        let mut r = error(StatusCode::UNAUTHORIZED, msg.into(), vec![]);
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"corral-agent\""),
        );
        return Ok(r);
    }
    let resp = match (&method, segs.as_slice()) {
        (_, ["metrics" | "healthz"]) | (_, _)
            if metrics_only && !matches!(segs.as_slice(), ["metrics" | "healthz"]) =>
        {
            error(
                StatusCode::NOT_FOUND,
                format!("the metrics listener serves only /metrics and /healthz, not {path}"),
                vec![],
            )
        }
        (&Method::GET, ["healthz"]) => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, ["readyz"]) => {
            if state.ready.load(Ordering::Acquire) {
                full(StatusCode::OK, "text/plain", "ready\n")
            } else {
                full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "re-adopting instances\n",
                )
            }
        }
        (&Method::GET, ["metrics"]) => {
            let accept = req
                .headers()
                .get(hyper::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (body, ctype) = corral_proto::exposition::negotiate(
                crate::metrics::render(&state.registry),
                accept,
            );
            full(StatusCode::OK, ctype, body)
        }
        _ if !state.ready.load(Ordering::Acquire) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "agent is starting: re-adopting instances".into(),
            vec![],
        ),
        (&Method::GET, ["v1", "state"]) => {
            let exec = &state.exec;
            let cfg = exec.config();
            let instances: Vec<_> = exec.snapshot().into_iter().map(|s| s.info).collect();
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "cell_id": cfg.cell_id,
                    "zone": cfg.zone,
                    "capacity": { "total": exec.total(), "available": exec.available() },
                    "disk_limits": if exec.disk_quota() { "filesystem-per-instance" } else { "none" },
                    "evacuating": exec.evacuating().is_some(),
                    "instances": instances,
                }),
            )
        }
        (&Method::GET, ["v1", "instances"]) => {
            let instances: Vec<_> = state.exec.snapshot().into_iter().map(|s| s.info).collect();
            json(
                StatusCode::OK,
                &serde_json::json!({ "instances": instances }),
            )
        }
        (_, ["v1", "policies"]) => policies(&state, method.clone(), req).await,
        (_, ["v1", "evacuate"]) => evacuate(&state, &method, &req).await,
        (&Method::GET, ["v1", "dataplane"]) => match state.exec.plane() {
            None => error(
                StatusCode::CONFLICT,
                "this cell has no data plane".into(),
                vec![],
            ),
            Some(p) => match p.dump() {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
            },
        },
        (_, ["v1", "instances", raw, rest @ ..]) => match InstanceId::new(*raw) {
            Err(e) => error(StatusCode::BAD_REQUEST, e.to_string(), vec![]),
            Ok(id) => instance_route(&state, method, id, rest, req).await,
        },
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
            vec![],
        ),
    };
    Ok(resp)
}

async fn instance_route(
    state: &Arc<ApiState>,
    method: Method,
    id: InstanceId,
    rest: &[&str],
    req: Request<Incoming>,
) -> Response<RespBody> {
    match (method, rest) {
        (Method::GET, []) => match state.exec.get(&id) {
            Some(i) => json(StatusCode::OK, &i),
            None => error(StatusCode::NOT_FOUND, format!("no instance {id}"), vec![]),
        },
        (Method::PUT, []) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("reading body (limit {MAX_BODY} bytes): {e}"),
                        vec![],
                    )
                }
            };
            let spec: InstanceSpec = match serde_json::from_slice(&body) {
                Ok(s) => s,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("invalid instance spec: {e}"),
                        vec![],
                    )
                }
            };
            match state.exec.put(id, spec).await {
                Ok((true, info)) => json(StatusCode::CREATED, &info),
                Ok((false, info)) => json(StatusCode::OK, &info),
                Err(e) => exec_error(e),
            }
        }
        (Method::DELETE, []) => {
            let grace = match query(&req, "grace_secs").map(|g| g.parse::<u64>()) {
                None => None,
                Some(Ok(g)) if g <= 3600 => Some(g),
                Some(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "grace_secs must be 0..=3600".into(),
                        vec![],
                    )
                }
            };
            match state.exec.delete(&id, grace).await {
                Ok(info) => json(StatusCode::OK, &info),
                Err(e) => exec_error(e),
            }
        }
        (Method::GET, ["logs"]) => logs(state, id, &req),
        (m, _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{m} is not allowed here"),
            vec![],
        ),
    }
}

fn logs(state: &Arc<ApiState>, id: InstanceId, req: &Request<Incoming>) -> Response<RespBody> {
    let Some(mut status) = state.exec.watch(&id) else {
        return error(StatusCode::NOT_FOUND, format!("no instance {id}"), vec![]);
    };
    let tail = match query(req, "tail").map(|t| t.parse::<usize>()) {
        None => None,
        Some(Ok(t)) => Some(t),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "tail must be a number of lines".into(),
                vec![],
            )
        }
    };
    let follow = matches!(query(req, "follow").as_deref(), Some("true" | "1" | ""));
    let path = state.exec.paths(&id).log_file();
    let keep = state.exec.config().log_keep;
    // Open the live file first and read the history through the same handle,
    // so following continues exactly where the history ended.
    let mut live = std::fs::File::open(&path).ok();
    let mut history = Vec::new();
    for n in (1..=keep).rev() {
        if let Ok(mut b) = std::fs::read(crate::logs::rotated(&path, n)) {
            history.append(&mut b);
        }
    }
    if let Some(f) = live.as_mut() {
        let _ = f.read_to_end(&mut history);
    }
    if let Some(n) = tail {
        history = tail_lines(history, n);
    }
    if !follow {
        return full(StatusCode::OK, "text/plain; charset=utf-8", history);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        if tx.send(Bytes::from(history)).await.is_err() {
            return;
        }
        let mut buf = Vec::new();
        loop {
            let ended = status.borrow_and_update().state.is_final();
            buf.clear();
            if let Some(f) = live.as_mut() {
                let _ = f.read_to_end(&mut buf);
            }
            // Rotated away: finish the old file, then switch to the new one.
            let rotated = match (live.as_ref(), std::fs::metadata(&path)) {
                (Some(f), Ok(m)) => f
                    .metadata()
                    .map(|fm| {
                        use std::os::unix::fs::MetadataExt;
                        fm.ino() != m.ino()
                    })
                    .unwrap_or(false),
                (None, Ok(_)) => true,
                _ => false,
            };
            if rotated {
                live = std::fs::File::open(&path).ok();
                if let Some(f) = live.as_mut() {
                    let _ = f.seek(SeekFrom::Start(0));
                    let _ = f.read_to_end(&mut buf);
                }
            }
            if !buf.is_empty() && tx.send(Bytes::copy_from_slice(&buf)).await.is_err() {
                return;
            }
            if ended && buf.is_empty() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                r = status.changed() => if r.is_err() { return },
            }
        }
    });
    let mut r = Response::new(ChannelBody(rx).boxed());
    if let Ok(v) = "text/plain; charset=utf-8".parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Longest `wait_secs` of `POST /v1/evacuate`.
const MAX_EVACUATION_WAIT: u64 = 3600;

/// The cell's evacuation as the API shows it; `changed` says whether the
/// request changed it.
fn evacuation(exec: &Executor, changed: Option<bool>) -> serde_json::Value {
    let since = exec.evacuating();
    let mut v = serde_json::json!({
        "cell_id": exec.config().cell_id,
        "evacuating": since.is_some(),
        "since": since,
        "remaining": exec.live_lrps(),
    });
    if let Some(c) = changed {
        v["changed"] = c.into();
    }
    v
}

/// How waiting for an evacuation ended.
enum Drained {
    Empty,
    TimedOut,
    Cancelled,
}

/// Waits until no LRP instance is live, the evacuation is cancelled, or
/// `limit` passes.
async fn wait_drained(exec: &Executor, limit: Duration) -> Drained {
    let deadline = tokio::time::Instant::now() + limit;
    // Subscribed before the first look, so no change falls in between.
    let mut changes = exec.changes();
    loop {
        changes.borrow_and_update();
        if exec.evacuating().is_none() {
            return Drained::Cancelled;
        }
        if exec.live_lrps() == 0 {
            return Drained::Empty;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Err(_) => return Drained::TimedOut,
            // The executor is gone: nothing will change any more.
            Ok(Err(_)) => return Drained::TimedOut,
            Ok(Ok(())) => {}
        }
    }
}

/// `GET/POST/DELETE /v1/evacuate`: whether the cell is draining; start
/// draining (202, or with `?wait_secs=N` 200 once no LRP instance runs, 504
/// if some still do after N s); cancel (200).
async fn evacuate(
    state: &Arc<ApiState>,
    method: &Method,
    req: &Request<Incoming>,
) -> Response<RespBody> {
    let exec = &state.exec;
    match *method {
        Method::GET => json(StatusCode::OK, &evacuation(exec, None)),
        Method::DELETE => match exec.set_evacuating(false) {
            Ok(changed) => json(StatusCode::OK, &evacuation(exec, Some(changed))),
            Err(e) => exec_error(e),
        },
        Method::POST => {
            let wait = match query(req, "wait_secs").map(|w| w.parse::<u64>()) {
                None => None,
                Some(Ok(w)) if w <= MAX_EVACUATION_WAIT => Some(w),
                Some(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("wait_secs must be 0..={MAX_EVACUATION_WAIT}"),
                        vec![],
                    )
                }
            };
            let changed = match exec.set_evacuating(true) {
                Ok(c) => c,
                Err(e) => return exec_error(e),
            };
            let Some(secs) = wait else {
                return json(StatusCode::ACCEPTED, &evacuation(exec, Some(changed)));
            };
            let outcome = wait_drained(exec, Duration::from_secs(secs)).await;
            let mut body = evacuation(exec, Some(changed));
            let remaining = body["remaining"].clone();
            match outcome {
                Drained::Empty => json(StatusCode::OK, &body),
                Drained::TimedOut => {
                    body["error"] = format!(
                        "{remaining} LRP instances still run after {secs} s; the cell keeps evacuating"
                    )
                    .into();
                    json(StatusCode::GATEWAY_TIMEOUT, &body)
                }
                Drained::Cancelled => {
                    body["error"] = format!(
                        "the evacuation was cancelled while waiting; {remaining} LRP instances run"
                    )
                    .into();
                    json(StatusCode::CONFLICT, &body)
                }
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here (GET, POST, DELETE)"),
            vec![],
        ),
    }
}

/// The data plane's protocol for a rule's.
fn protocol(p: corral_proto::policy::Protocol) -> corral_ebpf::Protocol {
    use corral_ebpf::Protocol as E;
    use corral_proto::policy::Protocol as W;
    match p {
        W::Any => E::Any,
        W::Icmp => E::Icmp,
        W::Tcp => E::Tcp,
        W::Udp => E::Udp,
        W::Sctp => E::Sctp,
    }
}

/// A `PUT`/`DELETE /v1/policies` body: the brain's rule format, checked by
/// the same `PolicyRule::validate`, before anything (not even a tenant's
/// name) is remembered by the data plane.
fn policy_body(body: &[u8]) -> Result<PolicyRule, (String, Vec<String>)> {
    let rule: PolicyRule =
        serde_json::from_slice(body).map_err(|e| (format!("invalid policy: {e}"), vec![]))?;
    rule.validate()
        .map_err(|problems| ("invalid policy".to_owned(), problems))?;
    Ok(rule)
}

/// `GET/PUT/DELETE /v1/policies`: the cell's cross-tenant allowances (the
/// brain distributes them to every cell; an operator may set them here).
async fn policies(
    state: &Arc<ApiState>,
    method: Method,
    req: Request<Incoming>,
) -> Response<RespBody> {
    let Some(plane) = state.exec.plane() else {
        return error(
            StatusCode::CONFLICT,
            "this cell has no data plane: configure [network] subnet (and keep [network] dataplane on)".into(),
            vec![],
        );
    };
    if method == Method::GET {
        return match plane.policies() {
            Ok(ps) => {
                let list: Vec<_> = ps
                    .iter()
                    .map(|p| {
                        serde_json::json!({
                            "from": plane.tenant_name(p.from),
                            "to": plane.tenant_name(p.to),
                            "app": p.app.map(|a| plane.app_name(a)),
                            "protocol": p.protocol.to_string(),
                            "port": p.port,
                        })
                    })
                    .collect();
                json(StatusCode::OK, &serde_json::json!({ "policies": list }))
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
        };
    }
    if method != Method::PUT && method != Method::DELETE {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed here"),
            vec![],
        );
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("reading body: {e}"),
                vec![],
            )
        }
    };
    let rule = match policy_body(&body) {
        Ok(r) => r,
        Err((msg, details)) => return error(StatusCode::BAD_REQUEST, msg, details),
    };
    let policy = corral_ebpf::Policy {
        from: plane.remember_tenant(&rule.from),
        to: plane.remember_tenant(&rule.to),
        app: rule.app.as_ref().map(|a| plane.remember_app(&rule.to, a)),
        protocol: protocol(rule.protocol),
        port: rule.port,
    };
    if let Err(e) = policy.to_key() {
        return error(StatusCode::BAD_REQUEST, e.to_string(), vec![]);
    }
    let r = if method == Method::PUT {
        plane.set_policy(&policy).map(|()| true)
    } else {
        plane.remove_policy(&policy)
    };
    match r {
        Ok(changed) => json(
            StatusCode::OK,
            &serde_json::json!({ "policy": rule, "changed": changed }),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
    }
}

/// The last `n` lines of `data`.
pub fn tail_lines(mut data: Vec<u8>, n: usize) -> Vec<u8> {
    if n == 0 {
        return Vec::new();
    }
    let mut seen = 0;
    let end = if data.last() == Some(&b'\n') {
        data.len() - 1
    } else {
        data.len()
    };
    for i in (0..end).rev() {
        if data[i] == b'\n' {
            seen += 1;
            if seen == n {
                data.drain(..=i);
                return data;
            }
        }
    }
    data
}

/// Serves the API on a listener until the process ends.
pub async fn serve_unix(state: Arc<ApiState>, listener: tokio::net::UnixListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_conn(state.clone(), Listener::Unix, stream),
            Err(e) => {
                tracing::warn!("accept on unix socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

pub async fn serve_tcp(state: Arc<ApiState>, listener: tokio::net::TcpListener, kind: Listener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_conn(state.clone(), kind, stream),
            Err(e) => {
                tracing::warn!("accept on tcp: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn spawn_conn<S>(state: Arc<ApiState>, listener: Listener, stream: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let svc = hyper::service::service_fn(move |req| handle(state.clone(), listener, req));
        let io = hyper_util::rt::TokioIo::new(stream);
        if let Err(e) = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, svc)
            .await
        {
            tracing::debug!("connection: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_insufficient_storage_other_io_errors_are_internal() {
        let io = |errno| ExecError::Io {
            what: "writing spec.json".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        assert_eq!(
            exec_error(io(libc::ENOSPC)).status(),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            exec_error(io(libc::EIO)).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn the_tcp_api_asks_for_its_token_except_on_open_routes() {
        let token = ApiToken::new("0123456789abcdef-agent".into()).unwrap();
        let t = Some(&token);
        let good: &[u8] = b"Bearer 0123456789abcdef-agent";
        let check = |listener, path: &str, auth: Option<&[u8]>| {
            let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
            check_token(t, listener, &segs, auth)
        };
        for path in [
            "/v1/instances",
            "/v1/instances/x",
            "/v1/state",
            "/v1/policies",
            "/v1/evacuate",
            "/nowhere",
        ] {
            assert!(check(Listener::Tcp, path, None).is_err(), "{path}");
            for bad in [
                &b"Bearer wrong"[..],
                b"Bearer 0123456789abcdef-agen",
                b"Basic 0123456789abcdef-agent",
                b"0123456789abcdef-agent",
                b"Bearer",
                b"",
            ] {
                assert!(
                    check(Listener::Tcp, path, Some(bad)).is_err(),
                    "{path} {bad:?}"
                );
            }
            assert_eq!(check(Listener::Tcp, path, Some(good)), Ok(()));
            assert_eq!(
                check(
                    Listener::Tcp,
                    path,
                    Some(b"bearer  0123456789abcdef-agent ")
                ),
                Ok(())
            );
            // The unix socket is root's; it never asks.
            assert_eq!(check(Listener::Unix, path, None), Ok(()));
        }
        for path in ["/healthz", "/readyz", "/metrics"] {
            assert_eq!(check(Listener::Tcp, path, None), Ok(()), "{path}");
        }
        // Without a token nothing is asked (loopback only: the config refuses more).
        assert_eq!(
            check_token(None, Listener::Tcp, &["v1", "state"], None),
            Ok(())
        );
    }

    #[test]
    fn policy_bodies_are_the_brains_rules_checked_before_use() {
        let r =
            policy_body(br#"{"from":"globex","to":"acme","protocol":"tcp","port":8080}"#).unwrap();
        assert_eq!(r.to_string(), "globex -> acme tcp/8080");
        assert_eq!(protocol(r.protocol), corral_ebpf::Protocol::Tcp);
        for (bad, words) in [
            (&br#"{"from":"acme","to":"acme"}"#[..], "to itself"),
            (
                br#"{"from":"acme","to":"globex","protocol":"icmp","port":80}"#,
                "needs protocol",
            ),
            (
                br#"{"from":"acme","to":"globex","protocol":"carrier-pigeon"}"#,
                "unknown variant",
            ),
            (br#"{"from":"../x","to":"globex"}"#, "invalid policy"),
            (br#"{"from":"a","to":"b","cell":"c"}"#, "unknown field"),
        ] {
            let (msg, details) = policy_body(bad).unwrap_err();
            let all = format!("{msg} {details:?}");
            assert!(all.contains(words), "{all}");
        }
    }

    #[test]
    fn tail() {
        assert_eq!(tail_lines(b"a\nb\nc\n".to_vec(), 2), b"b\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc\n".to_vec(), 5), b"a\nb\nc\n");
        assert_eq!(tail_lines(b"a\nb\nc".to_vec(), 1), b"c");
        assert!(tail_lines(b"a\n".to_vec(), 0).is_empty());
    }
}
