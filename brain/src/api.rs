//! The management API (HTTP/1.1 + JSON, hyper): the "cloud controller"
//! subset. Apps (desired LRPs), tasks, an app's instances and the cells
//! (read from the brain's view of actual state), health, and a server-sent
//! event stream of changes.
//!
//! Authentication is a bearer token from the config: the admin token sees
//! and changes everything; a tenant token sees and changes only its
//! tenant's apps and tasks. Another tenant's app or task answers 404, the
//! same answer as one that does not exist, so names do not leak across
//! tenants. App names are unique per tenant.
//!
//! Every body is parsed strictly (unknown fields refused), size-limited and
//! validated before the store is touched, so a refused request changes
//! nothing. Each accepted write is one store commit; it then wakes the
//! convergence loop ([`ApiState::watch_changes`]) and is announced on the
//! event stream.

use crate::config::{Principal, Tokens};
use crate::desired::StoredPolicy;
use crate::desired::{App, AppKey, AppPatch, ChangeEvent, NewApp, NewTask, Task, TaskId};
use crate::store::{Expect, Op, Store, StoreError};
use bytes::Bytes;
use corral_proto::policy::PolicyRule;
use corral_proto::wire::{Ipv4Net, Tag, Zone};
use corral_proto::{AppId, Capacity, CellId, InstanceId, InstanceState, TenantId, Timestamp};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::Instrument;

/// Largest request body accepted (413 above it).
pub const MAX_BODY: usize = 1 << 20;
/// Most apps in one `POST /v1/apps` list.
pub const MAX_BULK_APPS: usize = 1000;
/// Time a client has to send a request's headers, and then its body.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Comment lines on an idle event stream, so proxies keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Events buffered per subscriber before it is told it lagged. A few
/// lists of [`MAX_BULK_APPS`] apps arriving together must not make the
/// brain's loop lag (it would then read every app again).
const EVENT_BUFFER: usize = 8192;

pub type RespBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------
// The view of actual state the API reads. The brain fills it; the API never
// changes it.

/// How the brain sees a cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CellState {
    /// Connected and taking work.
    Connected,
    /// Connected, evacuating: takes no new work.
    Draining,
    /// Disconnected; its instances are rescheduled after the grace period.
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellView {
    pub id: CellId,
    pub zone: Zone,
    pub tags: BTreeSet<Tag>,
    pub state: CellState,
    pub total: Capacity,
    pub available: Capacity,
    /// Instances it runs.
    pub instances: u32,
    /// Since when it is in `state`.
    pub since: Timestamp,
}

/// One running (or starting, crashed …) instance of an app, as reported by
/// its cell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: InstanceId,
    pub tenant: TenantId,
    pub app: AppId,
    pub index: u32,
    pub cell: CellId,
    pub state: InstanceState,
    /// Its address on the cell network, once wired up.
    pub address: Option<IpAddr>,
    /// Since when it is in `state`.
    pub since: Timestamp,
    /// Why it is in `state` (for crashed instances).
    #[serde(default)]
    pub reason: Option<String>,
}

/// Read-only access to actual state.
pub trait ActualView: Send + Sync {
    fn cells(&self) -> Vec<CellView>;
    /// The instances of one app, in any order.
    fn instances(&self, app: &AppKey) -> Vec<InstanceView>;
    /// The app's instances that fit on no cell at the last try.
    fn unplaced(&self, app: &AppKey) -> Vec<UnplacedView> {
        let _ = app;
        Vec::new()
    }
}

/// An app instance that the last auction could place on no cell, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnplacedView {
    pub tenant: TenantId,
    pub app: AppId,
    pub index: u32,
    /// E.g. "no cell has 512 MB free: largest free is 256 MB on cell-2".
    pub reason: String,
    pub since: Timestamp,
}

/// A whole picture of actual state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualSnapshot {
    pub cells: Vec<CellView>,
    pub instances: Vec<InstanceView>,
    pub unplaced: Vec<UnplacedView>,
}

/// An [`ActualView`] the brain replaces wholesale whenever its picture
/// changes (readers keep the snapshot they started with).
#[derive(Debug, Default)]
pub struct SharedView(RwLock<Arc<ActualSnapshot>>);

impl SharedView {
    pub fn new(snapshot: ActualSnapshot) -> Self {
        Self(RwLock::new(Arc::new(snapshot)))
    }

    pub fn set(&self, snapshot: ActualSnapshot) {
        // A panic elsewhere while holding the lock cannot leave a
        // half-written Arc, so a poisoned lock is still usable.
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(snapshot);
    }

    pub fn get(&self) -> Arc<ActualSnapshot> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl ActualView for SharedView {
    fn cells(&self) -> Vec<CellView> {
        self.get().cells.clone()
    }

    fn instances(&self, app: &AppKey) -> Vec<InstanceView> {
        self.get()
            .instances
            .iter()
            .filter(|i| i.tenant == app.tenant && i.app == app.name)
            .cloned()
            .collect()
    }

    fn unplaced(&self, app: &AppKey) -> Vec<UnplacedView> {
        self.get()
            .unplaced
            .iter()
            .filter(|u| u.tenant == app.tenant && u.app == app.name)
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------
// State shared by all connections.

/// What the API serves from. Shared with the rest of the brain, which may
/// also [`publish`](ApiState::publish) its own changes (e.g. task results).
pub struct ApiState {
    store: Arc<dyn Store>,
    view: Arc<dyn ActualView>,
    tokens: Tokens,
    events: broadcast::Sender<ChangeEvent>,
    changes: watch::Sender<u64>,
    clock: Box<dyn Fn() -> Timestamp + Send + Sync>,
    metrics: Option<Box<dyn Fn() -> String + Send + Sync>>,
    /// Where apps' VIPs come from (`[network] vip_range`); none: no VIPs.
    vip_range: Option<Ipv4Net>,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("revision", &*self.changes.borrow())
            .finish_non_exhaustive()
    }
}

fn system_now() -> Timestamp {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Timestamp(nanos)
}

impl ApiState {
    /// Reads the store's revision, which [`watch_changes`](Self::watch_changes)
    /// starts from.
    pub fn new(
        store: Arc<dyn Store>,
        view: Arc<dyn ActualView>,
        tokens: Tokens,
    ) -> Result<Self, StoreError> {
        let revision = store.revision()?;
        Ok(Self {
            store,
            view,
            tokens,
            events: broadcast::channel(EVENT_BUFFER).0,
            changes: watch::channel(revision).0,
            clock: Box::new(system_now),
            metrics: None,
            vip_range: None,
        })
    }

    /// Gives apps with ports a VIP from `range` (`[network] vip_range`).
    pub fn with_vip_range(mut self, range: Option<Ipv4Net>) -> Self {
        self.vip_range = range;
        self
    }

    /// Replaces the wall clock (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> Timestamp + Send + Sync + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Serves `GET /metrics` (no token) with what `render` returns.
    pub fn with_metrics(mut self, render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.metrics = Some(Box::new(render));
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Changes as they are made, each once. A slow subscriber loses the
    /// oldest and is told how many (`RecvError::Lagged`).
    pub fn subscribe_events(&self) -> broadcast::Receiver<ChangeEvent> {
        self.events.subscribe()
    }

    /// The latest revision written through the API (or published): wakes
    /// the convergence loop on every change, and never misses the last one
    /// however slowly it is read.
    pub fn watch_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Announces a change that has been committed to the store.
    pub fn publish(&self, event: ChangeEvent) {
        let rev = event.revision();
        self.changes.send_if_modified(|cur| {
            let newer = rev > *cur;
            if newer {
                *cur = rev;
            }
            newer
        });
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }
}

// ---------------------------------------------------------------------------
// Responses.

/// A refused request: status, message, and the list of problems.
#[derive(Debug)]
struct Failure {
    status: StatusCode,
    message: String,
    details: Vec<String>,
    allow: Option<&'static str>,
    /// Refused because another app holds a VIP or published port (a
    /// conflict that reading again does not resolve).
    claimed: Option<Box<(crate::claims::Claim, AppKey)>>,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            details: Vec::new(),
            allow: None,
            claimed: None,
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    fn details(mut self, details: Vec<String>) -> Self {
        self.details = details;
        self
    }

    fn into_response(self) -> Response<RespBody> {
        let mut v = serde_json::json!({ "error": self.message });
        if !self.details.is_empty() {
            v["details"] = self.details.into();
        }
        let mut r = json(self.status, &v);
        let headers = r.headers_mut();
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"corral\""),
            );
        }
        if let Some(allow) = self.allow {
            headers.insert(ALLOW, HeaderValue::from_static(allow));
        }
        r
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Exists { .. }
            | StoreError::Conflict { .. }
            | StoreError::Claimed { .. } => StatusCode::CONFLICT,
            StoreError::NotFound { .. } => StatusCode::NOT_FOUND,
            StoreError::VipsExhausted { .. } => StatusCode::INSUFFICIENT_STORAGE,
            // The brain's disk is full: nothing was written; a retry once
            // there is room goes through (the store reopens itself).
            StoreError::Backend {
                source: redb::Error::Io(io),
                ..
            } if io.kind() == std::io::ErrorKind::StorageFull => {
                tracing::error!("store: {e}");
                StatusCode::INSUFFICIENT_STORAGE
            }
            _ => {
                tracing::error!("store: {e}");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut f = Self::new(status, e.to_string());
        if let StoreError::Claimed { claim, holder } = &e {
            f.claimed = Some(Box::new((*claim, holder.clone())));
        }
        f
    }
}

/// A published port is cluster-wide, so another tenant's app can hold one;
/// a tenant token learns that it is taken, not by whom.
fn hide_holder(mut f: Failure, who: &Principal) -> Failure {
    if let (Some(held), Principal::Tenant(own)) = (&f.claimed, who) {
        let (claim, holder) = held.as_ref();
        if &holder.tenant != own {
            f.message = format!("{claim} is held by another tenant's app: choose another");
        }
    }
    f
}

type Reply = Result<Response<RespBody>, Failure>;

fn full(status: StatusCode, ctype: &'static str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json(status: StatusCode, v: &impl Serialize) -> Response<RespBody> {
    match serde_json::to_vec_pretty(v) {
        Ok(mut b) => {
            b.push(b'\n');
            full(status, "application/json", b)
        }
        Err(e) => full(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding response: {e}\n"),
        ),
    }
}

/// A streaming body fed through a channel (the event stream).
struct ChannelBody(mpsc::Receiver<Bytes>);

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

// ---------------------------------------------------------------------------
// Request plumbing.

fn authenticate(state: &ApiState, req: &Request<Incoming>) -> Result<Principal, Failure> {
    let unauthorized = |m: &str| Failure::new(StatusCode::UNAUTHORIZED, m);
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return Err(unauthorized(
            "missing bearer token: send 'Authorization: Bearer <token>'",
        ));
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| unauthorized("the Authorization header must be 'Bearer <token>'"))?;
    state
        .tokens
        .authenticate(token)
        .ok_or_else(|| unauthorized("invalid bearer token"))
}

/// The query string: only `tenant` is known (to the admin it picks a
/// tenant; to a tenant token any other tenant shows nothing).
fn query_tenant(req: &Request<Incoming>) -> Result<Option<TenantId>, Failure> {
    let mut tenant = None;
    for kv in req.uri().query().unwrap_or("").split('&') {
        if kv.is_empty() {
            continue;
        }
        match kv.split_once('=') {
            Some(("tenant", v)) if tenant.is_none() => {
                tenant = Some(TenantId::new(v).map_err(|e| Failure::bad(e.to_string()))?);
            }
            _ => {
                return Err(Failure::bad(format!(
                    "unknown or repeated query parameter {kv:?}: only 'tenant' is known"
                )))
            }
        }
    }
    Ok(tenant)
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, what: &str) -> Result<T, Failure> {
    let bytes = read_body(req, what).await?;
    serde_json::from_slice(&bytes).map_err(|e| Failure::bad(format!("invalid {what}: {e}")))
}

async fn read_body(req: Request<Incoming>, what: &str) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the {what} is larger than {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = match tokio::time::timeout(READ_TIMEOUT, body).await {
        Err(_) => {
            return Err(Failure::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the {what} did not arrive within {READ_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Ok(Err(e)) => return Err(Failure::bad(format!("reading the {what}: {e}"))),
        Ok(Ok(b)) => b.to_bytes(),
    };
    Ok(bytes)
}

/// Runs a store call off the async threads (writes wait for fsync).
async fn blocking<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
        Ok(r) => r.map_err(Failure::from),
        Err(e) => Err(Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("store call failed: {e}"),
        )),
    }
}

/// The tenant a create acts for, named in the body or the query (not two
/// different ones): the admin must name one; a tenant token acts for its own
/// tenant only.
fn acting_tenant(
    principal: &Principal,
    body: Option<TenantId>,
    query: Option<TenantId>,
) -> Result<TenantId, Failure> {
    let named = match (body, query) {
        (Some(b), Some(q)) if b != q => {
            return Err(Failure::bad(format!(
                "the body names tenant {b} and the query tenant {q}"
            )))
        }
        (b, q) => b.or(q),
    };
    match (principal, named) {
        (Principal::Admin, Some(t)) => Ok(t),
        (Principal::Admin, None) => Err(Failure::bad(
            "the admin token acts for no tenant of its own: give \"tenant\" in the body or ?tenant=",
        )),
        (Principal::Tenant(own), None) => Ok(own.clone()),
        (Principal::Tenant(own), Some(t)) if &t == own => Ok(t),
        (Principal::Tenant(own), Some(_)) => Err(Failure::new(
            StatusCode::FORBIDDEN,
            format!("this token acts for tenant {own} only"),
        )),
    }
}

/// The tenant filter of a listing: `None` means all (admin only).
fn list_scope(principal: &Principal, query: Option<TenantId>) -> Result<Option<TenantId>, ()> {
    match (principal, query) {
        (Principal::Admin, q) => Ok(q),
        (Principal::Tenant(own), None) => Ok(Some(own.clone())),
        (Principal::Tenant(own), Some(q)) if &q == own => Ok(Some(q)),
        // Another tenant's listing: nothing is visible.
        (Principal::Tenant(_), Some(_)) => Err(()),
    }
}

fn visible(principal: &Principal, tenant: &TenantId) -> bool {
    match principal {
        Principal::Admin => true,
        Principal::Tenant(own) => own == tenant,
    }
}

/// Whether the principal may see a change on the event stream.
fn sees(principal: &Principal, change: &ChangeEvent) -> bool {
    match principal {
        Principal::Admin => true,
        Principal::Tenant(own) => change.concerns(own),
    }
}

/// Finds the app `name` the principal may see. Whether it is missing or
/// belongs to another tenant, a tenant token gets the same 404.
async fn find_app(
    state: &ApiState,
    principal: &Principal,
    name: AppId,
    query: Option<TenantId>,
) -> Result<App, Failure> {
    let not_found = || Failure::new(StatusCode::NOT_FOUND, format!("no app {name}"));
    let tenant = match (principal, query) {
        (Principal::Tenant(own), Some(q)) if &q != own => return Err(not_found()),
        (Principal::Tenant(own), _) => own.clone(),
        (Principal::Admin, Some(q)) => q,
        (Principal::Admin, None) => {
            let wanted = name.clone();
            let mut apps = blocking(state, |s| s.apps(None)).await?;
            apps.retain(|a| a.name == wanted);
            return match apps.len() {
                0 => Err(not_found()),
                1 => Ok(apps.remove(0)),
                _ => Err(Failure::new(
                    StatusCode::CONFLICT,
                    format!("several tenants have an app {name}: add ?tenant=<tenant>"),
                )
                .details(apps.iter().map(|a| a.tenant.to_string()).collect())),
            };
        }
    };
    let key = AppKey {
        tenant,
        name: name.clone(),
    };
    blocking(state, move |s| s.app(&key))
        .await?
        .ok_or_else(not_found)
}

fn parse_app_name(raw: &str) -> Result<AppId, Failure> {
    AppId::new(raw).map_err(|e| Failure::bad(e.to_string()))
}

fn method_not_allowed(method: &Method, path: &str, allow: &'static str) -> Failure {
    let mut f = Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {path} (allowed: {allow})"),
    );
    f.allow = Some(allow);
    f
}

// ---------------------------------------------------------------------------
// Routes.

async fn handle(
    state: Arc<ApiState>,
    closing: watch::Receiver<bool>,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, Infallible> {
    let span = tracing::debug_span!("request", method = %req.method(), path = %req.uri().path());
    let reply = route(&state, closing, req).instrument(span).await;
    Ok(reply.unwrap_or_else(Failure::into_response))
}

async fn route(state: &ApiState, closing: watch::Receiver<bool>, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if segs.as_slice() == ["healthz"] {
        return match method {
            Method::GET | Method::HEAD => Ok(full(StatusCode::OK, "text/plain", "ok\n")),
            _ => Err(method_not_allowed(&method, &path, "GET")),
        };
    }
    if segs.as_slice() == ["metrics"] {
        if let Some(render) = &state.metrics {
            return match method {
                Method::GET | Method::HEAD => {
                    // OpenMetrics when asked for, else the classic format.
                    let accept = req
                        .headers()
                        .get(hyper::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    let (body, ctype) = corral_proto::exposition::negotiate(render(), accept);
                    Ok(full(StatusCode::OK, ctype, body))
                }
                _ => Err(method_not_allowed(&method, &path, "GET")),
            };
        }
    }
    let who = authenticate(state, &req)?;
    let query = query_tenant(&req)?;
    match (segs.as_slice(), &method) {
        (["v1", "apps"], &Method::GET) => list_apps(state, &who, query).await,
        (["v1", "apps"], &Method::POST) => create_app(state, &who, query, req).await,
        (["v1", "apps"], _) => Err(method_not_allowed(&method, &path, "GET, POST")),
        (["v1", "apps", name], &Method::GET) => {
            let app = find_app(state, &who, parse_app_name(name)?, query).await?;
            Ok(json(StatusCode::OK, &app))
        }
        (["v1", "apps", name], &Method::PATCH) => {
            patch_app(state, &who, parse_app_name(name)?, query, req).await
        }
        (["v1", "apps", name], &Method::DELETE) => {
            delete_app(state, &who, parse_app_name(name)?, query).await
        }
        (["v1", "apps", _], _) => Err(method_not_allowed(&method, &path, "GET, PATCH, DELETE")),
        (["v1", "apps", name, "instances"], &Method::GET) => {
            let app = find_app(state, &who, parse_app_name(name)?, query).await?;
            let mut instances = state.view.instances(&app.key());
            instances.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
            let mut unplaced = state.view.unplaced(&app.key());
            unplaced.sort_by_key(|u| u.index);
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "tenant": app.tenant, "app": app.name, "desired": app.instances,
                    "instances": instances, "unplaced": unplaced,
                }),
            ))
        }
        (["v1", "apps", _, "instances"], _) => Err(method_not_allowed(&method, &path, "GET")),
        (["v1", "tasks"], &Method::GET) => list_tasks(state, &who, query).await,
        (["v1", "tasks"], &Method::POST) => create_task(state, &who, query, req).await,
        (["v1", "tasks"], _) => Err(method_not_allowed(&method, &path, "GET, POST")),
        (["v1", "tasks", id], &Method::GET) => get_task(state, &who, id).await,
        (["v1", "tasks", _], _) => Err(method_not_allowed(&method, &path, "GET")),
        (["v1", "cells"], &Method::GET) => match who {
            Principal::Admin => {
                let mut cells = state.view.cells();
                cells.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(json(StatusCode::OK, &serde_json::json!({ "cells": cells })))
            }
            Principal::Tenant(_) => Err(Failure::new(
                StatusCode::FORBIDDEN,
                "cells are visible to the admin token only",
            )),
        },
        (["v1", "cells"], _) => Err(method_not_allowed(&method, &path, "GET")),
        (["v1", "policies"], &Method::GET) => list_policies(state, &who).await,
        (["v1", "policies"], &Method::POST) => create_policy(state, &who, req).await,
        (["v1", "policies"], &Method::DELETE) => delete_policy(state, &who, req).await,
        (["v1", "policies"], _) => Err(method_not_allowed(&method, &path, "GET, POST, DELETE")),
        (["v1", "events"], &Method::GET) => Ok(events(state, who, closing)),
        (["v1", "events"], _) => Err(method_not_allowed(&method, &path, "GET")),
        _ => Err(Failure::new(
            StatusCode::NOT_FOUND,
            format!("no route for {method} {path}"),
        )),
    }
}

// ---------------------------------------------------------------------------
// Policies: a tenant grants other tenants access to its own instances, so a
// tenant token creates and deletes only policies `to` itself, and sees those
// that name it on either side.

async fn list_policies(state: &ApiState, who: &Principal) -> Reply {
    let all = blocking(state, |s| s.policies()).await?;
    let visible: Vec<StoredPolicy> = all
        .into_iter()
        .filter(|p| match who {
            Principal::Admin => true,
            Principal::Tenant(own) => &p.rule.from == own || &p.rule.to == own,
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "policies": visible }),
    ))
}

/// The rule in a request body, checked: valid, about known tenants, and
/// granted by the tenant it opens (for a tenant token).
async fn policy_body(
    state: &ApiState,
    who: &Principal,
    req: Request<Incoming>,
) -> Result<PolicyRule, Failure> {
    let rule: PolicyRule = read_json(req, "policy").await?;
    rule.validate()
        .map_err(|p| Failure::bad("invalid policy").details(p))?;
    if let Principal::Tenant(own) = who {
        if &rule.to != own {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                format!(
                    "a tenant token grants access only to its own instances: \"to\" must be {own}"
                ),
            ));
        }
    }
    let mut known = state.tokens.tenants();
    let apps = blocking(state, |s| s.apps(None)).await?;
    known.extend(apps.iter().map(|a| a.tenant.clone()));
    let mut unknown: Vec<String> = [&rule.from, &rule.to]
        .into_iter()
        .filter(|t| !known.contains(*t))
        .map(|t| format!("unknown tenant {t}: it has no token and no apps"))
        .collect();
    if let Some(app) = &rule.app {
        if !apps.iter().any(|a| a.tenant == rule.to && &a.name == app) {
            unknown.push(format!(
                "tenant {} has no app {app}: create it first (a policy for one app opens only that app's instances)",
                rule.to
            ));
        }
    }
    if !unknown.is_empty() {
        return Err(Failure::bad("invalid policy").details(unknown));
    }
    Ok(rule)
}

async fn create_policy(state: &ApiState, who: &Principal, req: Request<Incoming>) -> Reply {
    let rule = policy_body(state, who, req).await?;
    let policy = StoredPolicy {
        rule,
        created_at: state.now(),
        revision: 0,
    };
    let stored = policy.clone();
    let revision = blocking(state, move |s| {
        s.commit(vec![Op::PutPolicy {
            policy: stored,
            expect: Expect::Absent,
        }])
    })
    .await?;
    let policy = StoredPolicy { revision, ..policy };
    tracing::info!(policy = %policy.rule, revision, "policy created");
    state.publish(ChangeEvent::PolicyCreated {
        revision,
        policy: policy.clone(),
    });
    Ok(json(StatusCode::CREATED, &policy))
}

async fn delete_policy(state: &ApiState, who: &Principal, req: Request<Incoming>) -> Reply {
    let rule = policy_body(state, who, req).await?;
    let key = rule.clone();
    let (policy, revision) = blocking(state, move |s| {
        let found = s
            .policies()?
            .into_iter()
            .find(|p| p.rule == key)
            .ok_or_else(|| StoreError::NotFound {
                kind: "policy",
                key: key.to_string(),
            })?;
        let rev = s.commit(vec![Op::DeletePolicy {
            rule: key,
            expect: Expect::Revision(found.revision),
        }])?;
        Ok((found, rev))
    })
    .await?;
    tracing::info!(policy = %policy.rule, revision, "policy deleted");
    state.publish(ChangeEvent::PolicyDeleted {
        revision,
        policy: policy.clone(),
    });
    Ok(json(StatusCode::OK, &policy))
}

async fn list_apps(state: &ApiState, who: &Principal, query: Option<TenantId>) -> Reply {
    let apps = match list_scope(who, query) {
        Ok(scope) => blocking(state, move |s| s.apps(scope.as_ref())).await?,
        Err(()) => Vec::new(),
    };
    Ok(json(StatusCode::OK, &serde_json::json!({ "apps": apps })))
}

async fn create_app(
    state: &ApiState,
    who: &Principal,
    query: Option<TenantId>,
    req: Request<Incoming>,
) -> Reply {
    let bytes = read_body(req, "app").await?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return create_apps(state, who, query, &bytes).await;
    }
    let mut body: NewApp =
        serde_json::from_slice(&bytes).map_err(|e| Failure::bad(format!("invalid app: {e}")))?;
    let tenant = acting_tenant(who, body.tenant.take(), query)?;
    let app = body
        .into_app(tenant, state.now())
        .map_err(|p| Failure::bad("invalid app").details(p))?;
    let vips = state.vip_range;
    let app = blocking(state, move |s| s.create_app(app, vips))
        .await
        .map_err(|f| hide_holder(f, who))?;
    tracing::info!(tenant = %app.tenant, app = %app.name, revision = app.revision, "app created");
    state.publish(ChangeEvent::AppCreated {
        revision: app.revision,
        app: app.clone(),
    });
    Ok(json(StatusCode::CREATED, &app))
}

/// `POST /v1/apps` with a list: up to [`MAX_BULK_APPS`] apps, each
/// validated as the single form is (every problem of every app reported
/// at once, each prefixed with its position), created in one store commit
/// or not at all.
async fn create_apps(
    state: &ApiState,
    who: &Principal,
    query: Option<TenantId>,
    bytes: &[u8],
) -> Reply {
    let bodies: Vec<NewApp> =
        serde_json::from_slice(bytes).map_err(|e| Failure::bad(format!("invalid apps: {e}")))?;
    if bodies.is_empty() {
        return Err(Failure::bad("invalid apps: the list is empty"));
    }
    if bodies.len() > MAX_BULK_APPS {
        return Err(Failure::bad(format!(
            "invalid apps: {} apps in one request, at most {MAX_BULK_APPS}: split the list",
            bodies.len()
        )));
    }
    let now = state.now();
    let mut apps = Vec::with_capacity(bodies.len());
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, mut body) in bodies.into_iter().enumerate() {
        let name = body.name.clone();
        let tenant = match acting_tenant(who, body.tenant.take(), query.clone()) {
            Ok(t) => t,
            // A tenant the token may not act for refuses the whole list
            // with that status (403), as the single form would.
            Err(f) if f.status != StatusCode::BAD_REQUEST => return Err(f),
            Err(f) => {
                problems.push(format!("apps[{i}] ({name}): {}", f.message));
                continue;
            }
        };
        if !seen.insert((tenant.clone(), name.clone())) {
            problems.push(format!(
                "apps[{i}] ({name}): app {tenant}/{name} is named twice in the list"
            ));
            continue;
        }
        match body.into_app(tenant, now) {
            Ok(app) => apps.push(app),
            Err(p) => problems.extend(p.into_iter().map(|p| format!("apps[{i}] ({name}): {p}"))),
        }
    }
    if !problems.is_empty() {
        return Err(Failure::bad("invalid apps").details(problems));
    }
    let vips = state.vip_range;
    let apps = blocking(state, move |s| s.create_apps(apps, vips))
        .await
        .map_err(|f| hide_holder(f, who))?;
    for app in &apps {
        tracing::info!(tenant = %app.tenant, app = %app.name, revision = app.revision, "app created");
        state.publish(ChangeEvent::AppCreated {
            revision: app.revision,
            app: app.clone(),
        });
    }
    Ok(json(
        StatusCode::CREATED,
        &serde_json::json!({ "apps": apps }),
    ))
}

async fn patch_app(
    state: &ApiState,
    who: &Principal,
    name: AppId,
    query: Option<TenantId>,
    req: Request<Incoming>,
) -> Reply {
    let patch: AppPatch = read_json(req, "app patch").await?;
    // Compare-and-swap on the revision read; a concurrent change makes us
    // read again and re-apply the patch to the newer app.
    for _ in 0..5 {
        let app = find_app(state, who, name.clone(), query.clone()).await?;
        let Some(new) = patch
            .apply(&app, state.now())
            .map_err(|p| Failure::bad("invalid app patch").details(p))?
        else {
            return Ok(json(StatusCode::OK, &app));
        };
        let expected = app.revision;
        let vips = state.vip_range;
        match blocking(state, move |s| s.replace_app(new, expected, vips))
            .await
            .map_err(|f| hide_holder(f, who))
        {
            Ok(app) => {
                tracing::info!(tenant = %app.tenant, app = %app.name, revision = app.revision, "app updated");
                state.publish(ChangeEvent::AppUpdated {
                    revision: app.revision,
                    app: app.clone(),
                });
                return Ok(json(StatusCode::OK, &app));
            }
            Err(f) if f.status == StatusCode::CONFLICT && f.claimed.is_none() => continue,
            Err(f) => return Err(f),
        }
    }
    Err(Failure::new(
        StatusCode::CONFLICT,
        format!("app {name} keeps changing concurrently: try again"),
    ))
}

async fn delete_app(
    state: &ApiState,
    who: &Principal,
    name: AppId,
    query: Option<TenantId>,
) -> Reply {
    let key = find_app(state, who, name, query).await?.key();
    let (app, revision) = blocking(state, move |s| s.delete_app(&key)).await?;
    tracing::info!(tenant = %app.tenant, app = %app.name, revision, "app deleted");
    state.publish(ChangeEvent::AppDeleted {
        revision,
        tenant: app.tenant.clone(),
        name: app.name.clone(),
    });
    Ok(json(StatusCode::OK, &app))
}

fn entropy() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process and differs per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(system_now().nanos());
    h.finish()
}

async fn create_task(
    state: &ApiState,
    who: &Principal,
    query: Option<TenantId>,
    req: Request<Incoming>,
) -> Reply {
    let mut body: NewTask = read_json(req, "task").await?;
    let tenant = acting_tenant(who, body.tenant.take(), query)?;
    let now = state.now();
    for _ in 0..3 {
        let id = TaskId::from_entropy(entropy()).map_err(|e| {
            Failure::new(StatusCode::INTERNAL_SERVER_ERROR, format!("task id: {e}"))
        })?;
        let task = body
            .clone()
            .into_task(id, tenant.clone(), now)
            .map_err(|p| Failure::bad("invalid task").details(p))?;
        match blocking(state, move |s| s.create_task(task)).await {
            Ok(task) => {
                tracing::info!(tenant = %task.tenant, task = %task.id, revision = task.revision, "task created");
                state.publish(ChangeEvent::TaskCreated {
                    revision: task.revision,
                    task: task.clone(),
                });
                return Ok(json(StatusCode::CREATED, &task));
            }
            // An id collision: draw another.
            Err(f) if f.status == StatusCode::CONFLICT => continue,
            Err(f) => return Err(f),
        }
    }
    Err(Failure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "could not draw an unused task id",
    ))
}

async fn get_task(state: &ApiState, who: &Principal, raw: &str) -> Reply {
    let id = TaskId::new(raw).map_err(|e| Failure::bad(e.to_string()))?;
    let not_found = || Failure::new(StatusCode::NOT_FOUND, format!("no task {raw}"));
    let task: Task = blocking(state, move |s| s.task(&id))
        .await?
        .ok_or_else(not_found)?;
    if !visible(who, &task.tenant) {
        return Err(not_found());
    }
    Ok(json(StatusCode::OK, &task))
}

async fn list_tasks(state: &ApiState, who: &Principal, query: Option<TenantId>) -> Reply {
    let tasks = match list_scope(who, query) {
        Ok(scope) => blocking(state, move |s| s.tasks(scope.as_ref())).await?,
        Err(()) => Vec::new(),
    };
    Ok(json(StatusCode::OK, &serde_json::json!({ "tasks": tasks })))
}

/// One server-sent event.
fn sse_frame(event: &ChangeEvent) -> Bytes {
    match serde_json::to_string(event) {
        Ok(data) => Bytes::from(format!(
            "id: {}\nevent: {}\ndata: {data}\n\n",
            event.revision(),
            event.name()
        )),
        Err(e) => Bytes::from(format!(": cannot encode event: {e}\n\n")),
    }
}

/// `GET /v1/events`: a server-sent event stream of the changes the caller
/// may see, from now on (there is no replay: after connecting, or after a
/// `lagged` event, list the resources again). Ends when the server shuts
/// down.
fn events(
    state: &ApiState,
    who: Principal,
    mut closing: watch::Receiver<bool>,
) -> Response<RespBody> {
    // Subscribed before the response goes out: a client that has seen the
    // headers sees every later change.
    let mut rx = state.events.subscribe();
    let revision = *state.changes.borrow();
    let (tx, body) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let hello = format!("retry: 2000\n: corral brain events after revision {revision}\n\n");
        if tx.send(Bytes::from(hello)).await.is_err() {
            return;
        }
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            if *closing.borrow() {
                break;
            }
            let frame = tokio::select! {
                r = rx.recv() => match r {
                    Ok(ev) if sees(&who, &ev) => sse_frame(&ev),
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(n)) => Bytes::from(format!(
                        "event: lagged\ndata: {{\"missed\":{n}}}\n\n"
                    )),
                    Err(broadcast::error::RecvError::Closed) => break,
                },
                _ = keepalive.tick() => Bytes::from_static(b": keep-alive\n\n"),
                r = closing.changed() => match r {
                    Ok(()) => continue,
                    Err(_) => break,
                },
                () = tx.closed() => break,
            };
            if tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(ChannelBody(body).boxed());
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

// ---------------------------------------------------------------------------
// Serving.

/// Serves the API on `listener` until `shutdown` completes; then stops
/// accepting, ends event streams, lets requests in flight finish and
/// returns once every connection is closed (so the store can be closed).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()>,
) {
    let (closing_tx, closing_rx) = watch::channel(false);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(READ_TIMEOUT);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let state = state.clone();
                    let closing = closing_rx.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        handle(state.clone(), closing.clone(), req)
                    });
                    let conn = graceful.watch(
                        http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                    );
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(%peer, "connection: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accepting an API connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    closing_tx.send_replace(true);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_insufficient_storage_other_store_failures_are_internal() {
        let backend = |errno| StoreError::Backend {
            op: "committing",
            source: redb::Error::Io(std::io::Error::from_raw_os_error(errno)),
        };
        assert_eq!(
            Failure::from(backend(28)).status,
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            Failure::from(backend(5)).status,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    fn t(s: &str) -> TenantId {
        TenantId::new(s).unwrap()
    }

    #[test]
    fn tenants_act_only_for_themselves() {
        let acme = Principal::Tenant(t("acme"));
        assert_eq!(acting_tenant(&acme, None, None).unwrap(), t("acme"));
        assert_eq!(
            acting_tenant(&acme, Some(t("acme")), None).unwrap(),
            t("acme")
        );
        for (body, query) in [(Some(t("beta")), None), (None, Some(t("beta")))] {
            assert_eq!(
                acting_tenant(&acme, body, query).unwrap_err().status,
                StatusCode::FORBIDDEN
            );
        }
        assert_eq!(
            acting_tenant(&Principal::Admin, None, None)
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            acting_tenant(&Principal::Admin, None, Some(t("beta"))).unwrap(),
            t("beta")
        );
        assert_eq!(
            acting_tenant(&Principal::Admin, Some(t("acme")), Some(t("beta")))
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(list_scope(&acme, None), Ok(Some(t("acme"))));
        assert_eq!(list_scope(&acme, Some(t("beta"))), Err(()));
        assert_eq!(list_scope(&Principal::Admin, None), Ok(None));
    }

    #[test]
    fn sse_frames_carry_revision_and_type() {
        let e = ChangeEvent::AppDeleted {
            revision: 9,
            tenant: t("acme"),
            name: AppId::new("web").unwrap(),
        };
        let f = String::from_utf8(sse_frame(&e).to_vec()).unwrap();
        assert!(f.starts_with("id: 9\nevent: app.deleted\ndata: {"), "{f}");
        assert!(f.ends_with("}\n\n"), "{f}");
        assert_eq!(f.matches('\n').count(), 4, "data is one line: {f}");
    }
}
