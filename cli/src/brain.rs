//! What the `corral` commands for the brain need besides HTTP: parsing
//! their arguments into request bodies, and turning the brain's JSON into
//! tables, summaries and error messages. Pure: no I/O.

use crate::client::Endpoint;
use crate::sse;
use corral_proto::service::{PortSpec, Transport};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The brain's API address when none is given (its config's default).
pub const DEFAULT_BRAIN: &str = "http://127.0.0.1:7900";

/// `http://HOST:PORT` (or `HOST:PORT`) as an endpoint. Only plain HTTP: the
/// brain's API serves no TLS.
pub fn parse_brain_url(url: &str) -> Result<Endpoint, String> {
    let bad = |why: &str| format!("invalid brain URL {url:?}: {why} (expected http://HOST:PORT)");
    let rest = if let Some(r) = url.strip_prefix("http://") {
        r
    } else if url.starts_with("https://") {
        return Err(bad("the brain's API speaks plain HTTP, not https"));
    } else if url.contains("://") {
        return Err(bad("only http:// is supported"));
    } else {
        url
    };
    let hostport = rest.strip_suffix('/').unwrap_or(rest);
    if hostport.is_empty() {
        return Err(bad("no host"));
    }
    if hostport.contains(['/', '?', '#', '@']) {
        return Err(bad("a path, query or user is not supported"));
    }
    if let Ok(a) = hostport.parse() {
        return Ok(Endpoint::Tcp(a));
    }
    // A bare IPv6 address or a host name: add the default HTTP port when
    // none is given.
    let has_port = match hostport.rsplit_once(':') {
        Some((h, p)) => !h.is_empty() && p.parse::<u16>().is_ok(),
        None => false,
    };
    if hostport.starts_with('[') && !has_port {
        return match format!("{hostport}:80").parse() {
            Ok(a) => Ok(Endpoint::Tcp(a)),
            Err(_) => Err(bad("bad IPv6 address")),
        };
    }
    if hostport.contains(':') && !has_port {
        return Err(bad("bad port"));
    }
    let host = hostport.split(':').next().unwrap_or_default();
    if !host
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
    {
        return Err(bad("bad host name"));
    }
    Ok(Endpoint::Host(if has_port {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    }))
}

/// Checks a token before it goes into a header: the brain's own rule
/// (visible ASCII, no spaces). The message never shows the token.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty: set --token or CORRAL_TOKEN".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the token must be visible ASCII characters without spaces: check --token or CORRAL_TOKEN"
                .into(),
        );
    }
    Ok(())
}

/// `K=V` pairs into a map; every bad or repeated one is reported.
pub fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>, Vec<String>> {
    let mut env = BTreeMap::new();
    let mut problems = Vec::new();
    for p in pairs {
        match p.split_once('=') {
            Some(("", _)) => problems.push(format!("--env {p:?}: the name is empty")),
            Some((k, v)) => {
                if env.insert(k.to_owned(), v.to_owned()).is_some() {
                    problems.push(format!("--env {k} is given twice"));
                }
            }
            None => problems.push(format!("--env {p:?} is not NAME=VALUE")),
        }
    }
    if problems.is_empty() {
        Ok(env)
    } else {
        Err(problems)
    }
}

/// `?tenant=T` or nothing.
pub fn tenant_query(tenant: Option<&str>) -> String {
    tenant.map(|t| format!("?tenant={t}")).unwrap_or_default()
}

/// What a push or a task run asks for; every field is optional so that a
/// push of an existing app can change only some.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fields {
    pub instances: Option<u32>,
    pub rootfs: Option<String>,
    pub command: Vec<String>,
    pub memory_mb: Option<u64>,
    pub disk_mb: Option<u64>,
    pub cpu_weight: Option<u32>,
    pub max_pids: Option<u32>,
    pub ports: Vec<PortSpec>,
    pub env: BTreeMap<String, String>,
    pub tags: Vec<String>,
    /// The app's `health_check`, as JSON.
    pub health_check: Option<Value>,
}

impl Fields {
    fn resources(&self) -> Map<String, Value> {
        let mut r = Map::new();
        if let Some(m) = self.memory_mb {
            r.insert("memory_mb".into(), m.into());
        }
        if let Some(d) = self.disk_mb {
            r.insert("disk_mb".into(), d.into());
        }
        if let Some(c) = self.cpu_weight {
            r.insert("cpu_weight".into(), c.into());
        }
        if let Some(p) = self.max_pids {
            r.insert("max_pids".into(), p.into());
        }
        r
    }

    /// What creating needs but is missing, as flags to give.
    fn missing_for_create(&self) -> Vec<String> {
        let mut m = Vec::new();
        if self.rootfs.is_none() {
            m.push("--rootfs".to_owned());
        }
        if self.memory_mb.is_none() {
            m.push("--memory".to_owned());
        }
        if self.command.is_empty() {
            m.push("the command after --".to_owned());
        }
        m
    }

    /// The body of `POST /v1/apps`, or the flags it lacks.
    pub fn new_app(&self, name: &str, tenant: Option<&str>) -> Result<Value, Vec<String>> {
        let missing = self.missing_for_create();
        if !missing.is_empty() {
            return Err(missing);
        }
        let mut b = json!({
            "name": name,
            "rootfs": self.rootfs,
            "command": self.command,
            "resources": self.resources(),
            "env": self.env,
            "ports": ports_json(&self.ports),
            "tags": self.tags,
        });
        if let Some(c) = &self.health_check {
            b["health_check"] = c.clone();
        }
        if let Some(n) = self.instances {
            b["instances"] = n.into();
        }
        if let Some(t) = tenant {
            b["tenant"] = t.into();
        }
        Ok(b)
    }

    /// The body of `PATCH /v1/apps/{name}`: only what was given. Lists
    /// (command, env, ports, tags) replace the app's whole list.
    pub fn app_patch(&self) -> Value {
        let mut b = Map::new();
        if let Some(n) = self.instances {
            b.insert("instances".into(), n.into());
        }
        if let Some(r) = &self.rootfs {
            b.insert("rootfs".into(), r.clone().into());
        }
        if !self.command.is_empty() {
            b.insert("command".into(), json!(self.command));
        }
        let r = self.resources();
        if !r.is_empty() {
            b.insert("resources".into(), r.into());
        }
        if !self.env.is_empty() {
            b.insert("env".into(), json!(self.env));
        }
        if !self.ports.is_empty() {
            b.insert("ports".into(), ports_json(&self.ports));
        }
        if !self.tags.is_empty() {
            b.insert("tags".into(), json!(self.tags));
        }
        if let Some(c) = &self.health_check {
            b.insert("health_check".into(), c.clone());
        }
        Value::Object(b)
    }

    /// The body of `POST /v1/tasks`, or the flags it lacks.
    pub fn new_task(
        &self,
        label: Option<&str>,
        tenant: Option<&str>,
    ) -> Result<Value, Vec<String>> {
        let missing = self.missing_for_create();
        if !missing.is_empty() {
            return Err(missing);
        }
        let mut b = json!({
            "rootfs": self.rootfs,
            "command": self.command,
            "resources": self.resources(),
            "env": self.env,
            "tags": self.tags,
        });
        if let Some(a) = label {
            b["app"] = a.into();
        }
        if let Some(t) = tenant {
            b["tenant"] = t.into();
        }
        Ok(b)
    }
}

// ---------------------------------------------------------------------------
// Errors.

/// The brain's refusal as lines for a person: what happened, the brain's
/// message and details (`{"error": …, "details": […]}`), and what to do.
pub fn refusal(status: u16, body: &[u8]) -> String {
    let (message, details) = match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("error").and_then(Value::as_str).is_some() => (
            v["error"].as_str().unwrap_or_default().to_owned(),
            v.get("details")
                .and_then(Value::as_array)
                .map(|d| d.iter().map(text).collect::<Vec<_>>())
                .unwrap_or_default(),
        ),
        _ => (String::from_utf8_lossy(body).trim().to_owned(), Vec::new()),
    };
    let what = match status {
        401 => "the brain refused the token",
        403 => "the brain refused: this token may not do that",
        500..=599 => "the brain failed",
        _ => "the brain refused",
    };
    let mut out = format!("{what} ({status}): {message}");
    for d in details {
        let _ = write!(out, "\n  - {d}");
    }
    if let Some(h) = hint(status, &message) {
        let _ = write!(out, "\n  {h}");
    }
    out
}

fn hint(status: u16, message: &str) -> Option<&'static str> {
    Some(match status {
        401 => "set --token or CORRAL_TOKEN to a token from the brain's config ([tokens])",
        403 if message.contains("admin") => "this needs the admin token",
        403 => "a tenant token acts for its own tenant only: leave out --tenant or use the admin token",
        404 if message.starts_with("no route") => {
            "this brain does not know the request: is it older than this corral?"
        }
        404 => "check the name with 'corral apps' or 'corral tasks' (a token sees its own tenant's only)",
        400 | 409 if message.contains("tenant") => "name the tenant with --tenant",
        500..=599 => "see the brain's log for the cause",
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// Formatting.

/// A JSON value as a table cell: strings bare, null or missing as "-".
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        x => x.to_string(),
    }
}

fn field(v: &Value, k: &str) -> String {
    text(v.get(k).unwrap_or(&Value::Null))
}

/// Columns padded to their widest cell, two spaces apart; the last column
/// is not padded.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for r in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(c);
            if i + 1 < r.len() {
                line.extend(std::iter::repeat_n(' ', w - c.chars().count()));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A timestamp to the second: `2023-11-14T22:13:20.000000000Z` →
/// `2023-11-14T22:13:20Z`.
pub fn short_time(t: &str) -> String {
    match t.split_once('.') {
        Some((s, rest)) if rest.ends_with('Z') => format!("{s}Z"),
        _ => t.to_owned(),
    }
}

/// A command line as a shell would read it back.
pub fn shell_join(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().map(text).collect())
        .unwrap_or_default()
}

/// A `--port`: `PORT`, `PORT/udp`, `PORT:PUBLISHED` or
/// `PORT/tcp:PUBLISHED` (published: the port on every node that reaches
/// the app from outside the cluster).
pub fn parse_port(s: &str) -> Result<PortSpec, String> {
    let bad = || format!("{s:?} is not PORT[/tcp|/udp][:PUBLISHED], e.g. 8080, 53/udp, 80:30080");
    let (rest, published) = match s.split_once(':') {
        Some((r, p)) => (r, Some(p.parse::<u16>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let (port, protocol) = match rest.split_once('/') {
        Some((p, "tcp")) => (p, Transport::Tcp),
        Some((p, "udp")) => (p, Transport::Udp),
        Some(_) => return Err(bad()),
        None => (rest, Transport::Tcp),
    };
    Ok(PortSpec {
        port: port.parse().map_err(|_| bad())?,
        protocol,
        published,
    })
}

/// `--health-check`: `process`, `tcp:PORT` or `http:PORT/PATH`, optionally
/// followed by `,start=SECS` (start timeout) and `,failures=N` (failure
/// threshold); the JSON the brain takes.
pub fn parse_health_check(s: &str) -> Result<Value, String> {
    let bad = |why: &str| {
        format!("{s:?}: {why}; use process, tcp:PORT or http:PORT/PATH, optionally with ,start=SECS ,failures=N")
    };
    let mut parts = s.split(',');
    let kind = parts.next().unwrap_or_default();
    let mut c = match kind.split_once(':') {
        None if kind == "process" => json!({"type": "process"}),
        Some(("tcp", port)) => {
            json!({"type": "tcp", "port": port.parse::<u16>().map_err(|_| bad("bad port"))?})
        }
        Some(("http", rest)) => {
            let (port, path) = match rest.find('/') {
                Some(i) => (&rest[..i], &rest[i..]),
                None => (rest, "/"),
            };
            json!({"type": "http", "port": port.parse::<u16>().map_err(|_| bad("bad port"))?, "path": path})
        }
        _ => return Err(bad("unknown check")),
    };
    for opt in parts {
        match opt.split_once('=') {
            Some(("start", v)) => {
                let secs: u32 = v.parse().map_err(|_| bad("bad start"))?;
                c["start_timeout_ms"] = secs.saturating_mul(1000).into();
            }
            Some(("failures", v)) => {
                c["failure_threshold"] = v.parse::<u32>().map_err(|_| bad("bad failures"))?.into();
            }
            _ => return Err(bad(&format!("unknown option {opt:?}"))),
        }
    }
    Ok(c)
}

/// Ports as the brain reads them: a bare number where that says it all.
fn ports_json(ports: &[PortSpec]) -> Value {
    ports
        .iter()
        .map(|p| match (p.protocol, p.published) {
            (Transport::Tcp, None) => json!(p.port),
            _ => json!(p),
        })
        .collect()
}

/// A port of an app's JSON (a number or `{"port", "protocol",
/// "published"}`) as `8080/tcp`, `53/udp`, `80/tcp→30080`.
fn port_label(v: &Value) -> String {
    if let Some(n) = v.as_u64() {
        return format!("{n}/tcp");
    }
    let mut s = format!(
        "{}/{}",
        text(&v["port"]),
        v["protocol"].as_str().unwrap_or("tcp")
    );
    if let Some(p) = v["published"].as_u64() {
        let _ = write!(s, "→{p}");
    }
    s
}

fn ports_or_dash(v: &Value) -> String {
    let s: Vec<String> = rows(v).iter().map(port_label).collect();
    if s.is_empty() {
        "-".into()
    } else {
        s.join(", ")
    }
}

fn list_or_dash(v: &Value) -> String {
    let s = strings(v);
    if s.is_empty() {
        "-".into()
    } else {
        s.join(", ")
    }
}

fn mb(v: &Value) -> String {
    match v.as_u64() {
        Some(n) => format!("{n} MB"),
        None => "-".into(),
    }
}

/// `tenant/name`.
pub fn app_label(app: &Value) -> String {
    format!("{}/{}", field(app, "tenant"), field(app, "name"))
}

fn rows(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// `GET /v1/apps` as a table.
pub fn apps_table(apps: &Value) -> String {
    let rows: Vec<Vec<String>> = rows(apps)
        .iter()
        .map(|a| {
            vec![
                field(a, "tenant"),
                field(a, "name"),
                field(a, "instances"),
                field(a, "version"),
                mb(&a["resources"]["memory_mb"]),
                field(a, "vip"),
                ports_or_dash(&a["ports"]),
                field(a, "rootfs"),
                shell_join(&strings(&a["command"])),
            ]
        })
        .collect();
    render_table(
        &[
            "TENANT",
            "NAME",
            "INSTANCES",
            "VERSION",
            "MEMORY",
            "VIP",
            "PORTS",
            "ROOTFS",
            "COMMAND",
        ],
        &rows,
    )
}

/// One app, as `key  value` lines.
pub fn app_details(app: &Value) -> String {
    let r = &app["resources"];
    let env: Vec<String> = app["env"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={}", text(v))).collect())
        .unwrap_or_default();
    let lines = [
        ("tenant", field(app, "tenant")),
        (
            "version",
            format!(
                "{} (revision {})",
                field(app, "version"),
                field(app, "revision")
            ),
        ),
        ("instances", field(app, "instances")),
        ("rootfs", field(app, "rootfs")),
        ("command", shell_join(&strings(&app["command"]))),
        (
            "resources",
            format!(
                "memory {}, disk {}, cpu weight {}, max pids {}",
                mb(&r["memory_mb"]),
                mb(&r["disk_mb"]),
                field(r, "cpu_weight"),
                field(r, "max_pids")
            ),
        ),
        ("vip", field(app, "vip")),
        ("ports", ports_or_dash(&app["ports"])),
        ("tags", list_or_dash(&app["tags"])),
        (
            "env",
            if env.is_empty() {
                "-".into()
            } else {
                env.join(&format!("\n{:13}", ""))
            },
        ),
        ("created", short_time(&field(app, "created_at"))),
        ("updated", short_time(&field(app, "updated_at"))),
    ];
    let mut out = format!("app {}\n", field(app, "name"));
    for (k, v) in lines {
        let _ = writeln!(out, "  {k:<10} {v}");
    }
    out
}

/// `GET /v1/apps/{name}/instances`' list as a table.
pub fn instances_table(instances: &Value) -> String {
    let rows: Vec<Vec<String>> = rows(instances)
        .iter()
        .map(|i| {
            vec![
                field(i, "index"),
                field(i, "state"),
                field(i, "cell"),
                field(i, "address"),
                short_time(&field(i, "since")),
                field(i, "id"),
                match field(i, "reason") {
                    r if r == "-" => String::new(),
                    r => r,
                },
            ]
        })
        .collect();
    render_table(
        &["INDEX", "STATE", "CELL", "ADDRESS", "SINCE", "ID", "REASON"],
        &rows,
    )
}

/// `GET /v1/cells` as a table; capacity as available/total.
pub fn cells_table(cells: &Value) -> String {
    let of =
        |c: &Value, k: &str| format!("{}/{}", field(&c["available"], k), field(&c["total"], k));
    let rows: Vec<Vec<String>> = rows(cells)
        .iter()
        .map(|c| {
            vec![
                field(c, "id"),
                field(c, "zone"),
                field(c, "state"),
                field(c, "instances"),
                of(c, "memory_mb"),
                of(c, "disk_mb"),
                of(c, "containers"),
                list_or_dash(&c["tags"]),
                short_time(&field(c, "since")),
            ]
        })
        .collect();
    render_table(
        &[
            "ID",
            "ZONE",
            "STATE",
            "INSTANCES",
            "MEMORY MB",
            "DISK MB",
            "CONTAINERS",
            "TAGS",
            "SINCE",
        ],
        &rows,
    )
}

fn task_outcome(t: &Value) -> String {
    let r = &t["result"];
    if r.is_null() {
        return String::new();
    }
    match (r["exit_code"].as_i64(), r["reason"].as_str()) {
        (Some(c), Some(why)) => format!("exit {c}: {why}"),
        (Some(c), None) => format!("exit {c}"),
        (None, Some(why)) => why.to_owned(),
        (None, None) => String::new(),
    }
}

/// `GET /v1/tasks` as a table.
pub fn tasks_table(tasks: &Value) -> String {
    let rows: Vec<Vec<String>> = rows(tasks)
        .iter()
        .map(|t| {
            vec![
                field(t, "id"),
                field(t, "tenant"),
                field(t, "app"),
                field(t, "state"),
                field(t, "cell"),
                short_time(&field(t, "created_at")),
                task_outcome(t),
            ]
        })
        .collect();
    render_table(
        &["ID", "TENANT", "APP", "STATE", "CELL", "CREATED", "RESULT"],
        &rows,
    )
}

/// One task, as `key  value` lines.
pub fn task_details(t: &Value) -> String {
    let s = &t["spec"];
    let r = &s["resources"];
    let outcome = task_outcome(t);
    let lines = [
        ("tenant", field(t, "tenant")),
        ("app", field(t, "app")),
        ("state", field(t, "state")),
        ("cell", field(t, "cell")),
        (
            "result",
            if outcome.is_empty() {
                "-".into()
            } else {
                outcome
            },
        ),
        ("rootfs", field(s, "rootfs")),
        ("command", shell_join(&strings(&s["command"]))),
        (
            "resources",
            format!(
                "memory {}, disk {}, cpu weight {}, max pids {}",
                mb(&r["memory_mb"]),
                mb(&r["disk_mb"]),
                field(r, "cpu_weight"),
                field(r, "max_pids")
            ),
        ),
        ("created", short_time(&field(t, "created_at"))),
        ("updated", short_time(&field(t, "updated_at"))),
    ];
    let mut out = format!("task {}\n", field(t, "id"));
    for (k, v) in lines {
        let _ = writeln!(out, "  {k:<10} {v}");
    }
    out
}

/// What a push changed, field by field (`instances 2 -> 3`, `command`).
pub fn app_changes(before: &Value, after: &Value) -> Vec<String> {
    let mut changed = Vec::new();
    if before["instances"] != after["instances"] {
        changed.push(format!(
            "instances {} -> {}",
            field(before, "instances"),
            field(after, "instances")
        ));
    }
    for k in ["rootfs", "command", "env", "ports", "tags"] {
        if before[k] != after[k] {
            changed.push(k.to_owned());
        }
    }
    for (k, name) in [
        ("memory_mb", "memory"),
        ("disk_mb", "disk"),
        ("cpu_weight", "cpu weight"),
        ("max_pids", "max pids"),
    ] {
        let (b, a) = (&before["resources"][k], &after["resources"][k]);
        if b != a {
            changed.push(format!("{name} {} -> {}", text(b), text(a)));
        }
    }
    changed
}

/// One line on what a push did: created, updated (and what changed), or
/// nothing.
pub fn push_summary(before: Option<&Value>, after: &Value) -> String {
    let now = format!(
        "version {}, {} instance{}",
        field(after, "version"),
        field(after, "instances"),
        if after["instances"] == 1 { "" } else { "s" }
    );
    let label = app_label(after);
    match before {
        None => format!("created app {label} ({now})"),
        Some(b) => {
            let changes = app_changes(b, after);
            if changes.is_empty() {
                format!("app {label} is unchanged ({now})")
            } else {
                format!("updated app {label} ({now}): {}", changes.join(", "))
            }
        }
    }
}

/// One line for an event from `GET /v1/events`.
pub fn event_line(ev: &sse::Event) -> String {
    let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
    let rev = ev.id.clone().unwrap_or_else(|| "-".into());
    let (subject, detail) = match ev.name.as_str() {
        "app.created" | "app.updated" => {
            let a = &v["app"];
            (
                app_label(a),
                format!(
                    "version {}, {} instances",
                    field(a, "version"),
                    field(a, "instances")
                ),
            )
        }
        "app.deleted" => (
            format!("{}/{}", field(&v, "tenant"), field(&v, "name")),
            String::new(),
        ),
        "task.created" | "task.updated" => {
            let t = &v["task"];
            let mut d = field(t, "state");
            if !t["cell"].is_null() {
                let _ = write!(d, " on {}", field(t, "cell"));
            }
            let o = task_outcome(t);
            if !o.is_empty() {
                let _ = write!(d, " ({o})");
            }
            (format!("{}/{}", field(t, "tenant"), field(t, "id")), d)
        }
        "lagged" => (
            format!("missed {} events", field(&v, "missed")),
            "list again to catch up".into(),
        ),
        _ => (String::new(), ev.data.clone()),
    };
    format!("{rev:>6}  {:<13} {subject}  {detail}", ev.name)
        .trim_end()
        .to_owned()
}

/// One line of JSON for an event: its data, which names its `type`
/// (added for events whose data does not, such as `lagged`).
pub fn event_json(ev: &sse::Event) -> String {
    match serde_json::from_str::<Value>(&ev.data) {
        Ok(Value::Object(mut m)) => {
            m.entry("type").or_insert_with(|| ev.name.clone().into());
            Value::Object(m).to_string()
        }
        _ => json!({"type": ev.name, "data": ev.data}).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brain_urls() {
        let tcp = |s: &str| match parse_brain_url(s) {
            Ok(Endpoint::Tcp(a)) => a.to_string(),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(tcp("http://127.0.0.1:7900"), "127.0.0.1:7900");
        assert_eq!(tcp("http://127.0.0.1:7900/"), "127.0.0.1:7900");
        assert_eq!(tcp("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(tcp("http://[::1]:7900"), "[::1]:7900");
        assert_eq!(tcp("http://[::1]"), "[::1]:80");
        let host = |s: &str| match parse_brain_url(s) {
            Ok(Endpoint::Host(h)) => h,
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(host("http://brain.example:7900"), "brain.example:7900");
        assert_eq!(host("localhost"), "localhost:80");
        for bad in [
            "https://brain:7900",
            "ftp://x",
            "http://",
            "http://brain:7900/api",
            "http://brain:notaport",
            "http://bra in:1",
            "http://user@brain:1",
        ] {
            let e = parse_brain_url(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(parse_brain_url("https://b:1")
            .unwrap_err()
            .contains("plain HTTP"));
    }

    #[test]
    fn tokens_are_checked_without_being_shown() {
        assert!(check_token("abcdefghijklmnop").is_ok());
        let e = check_token("secret with space").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(check_token("a\r\nX-Evil: 1").is_err());
        assert!(check_token("").unwrap_err().contains("CORRAL_TOKEN"));
    }

    #[test]
    fn env_pairs() {
        let v = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        let env = parse_env(&v(&["A=1", "B=x=y", "C="])).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert_eq!(env["C"], "");
        let p = parse_env(&v(&["A", "=1", "B=1", "B=2"])).unwrap_err();
        assert_eq!(p.len(), 3, "{p:?}");
    }

    fn fields() -> Fields {
        Fields {
            instances: Some(2),
            rootfs: Some("busybox".into()),
            command: vec!["sleep".into(), "100".into()],
            memory_mb: Some(64),
            ports: vec![PortSpec::tcp(8080), parse_port("53/udp:30053").unwrap()],
            tags: vec!["ssd".into()],
            ..Fields::default()
        }
    }

    #[test]
    fn push_bodies() {
        let b = fields().new_app("web", Some("acme")).unwrap();
        assert_eq!(
            b,
            json!({
                "name": "web", "tenant": "acme", "instances": 2, "rootfs": "busybox",
                "command": ["sleep", "100"], "resources": {"memory_mb": 64},
                "env": {}, "ports": [8080, {"port": 53, "protocol": "udp", "published": 30053}],
                "tags": ["ssd"],
            })
        );
        let missing = Fields::default().new_app("web", None).unwrap_err();
        assert_eq!(missing, ["--rootfs", "--memory", "the command after --"]);
        // A patch carries only what was given.
        let p = Fields {
            instances: Some(3),
            cpu_weight: Some(200),
            ..Fields::default()
        }
        .app_patch();
        assert_eq!(p, json!({"instances": 3, "resources": {"cpu_weight": 200}}));
        assert_eq!(Fields::default().app_patch(), json!({}));
        let t = fields().new_task(Some("web"), None).unwrap();
        assert_eq!(t["app"], "web");
        assert!(t.get("ports").is_none() && t.get("instances").is_none());
    }

    #[test]
    fn ports_parse_and_show_with_protocol_and_published_port() {
        let p = |s: &str| parse_port(s);
        assert_eq!(p("8080"), Ok(PortSpec::tcp(8080)));
        assert_eq!(p("53/udp").unwrap().protocol, Transport::Udp);
        assert_eq!(p("80:30080").unwrap().published, Some(30080));
        assert_eq!(p("80/tcp:30080"), p("80:30080"));
        for bad in ["", "x", "80/sctp", "80:", "70000", "80:x/udp"] {
            assert!(p(bad).unwrap_err().contains("PORT[/tcp|/udp]"), "{bad}");
        }
        let shown = ports_or_dash(&json!([
            8080,
            {"port": 53, "protocol": "udp", "published": null},
            {"port": 80, "protocol": "tcp", "published": 30080},
        ]));
        assert_eq!(shown, "8080/tcp, 53/udp, 80/tcp→30080");
        assert_eq!(ports_or_dash(&json!([])), "-");
    }

    #[test]
    fn refusals_say_what_to_do() {
        let r = refusal(401, br#"{"error": "invalid bearer token"}"#);
        assert!(
            r.starts_with("the brain refused the token (401): invalid bearer token"),
            "{r}"
        );
        assert!(r.contains("--token or CORRAL_TOKEN"), "{r}");
        let r = refusal(
            400,
            br#"{"error": "invalid app", "details": ["memory_mb is 0", "command is empty"]}"#,
        );
        assert_eq!(
            r,
            "the brain refused (400): invalid app\n  - memory_mb is 0\n  - command is empty"
        );
        let r = refusal(404, br#"{"error": "no app web"}"#);
        assert!(r.contains("corral apps"), "{r}");
        let r = refusal(
            403,
            br#"{"error": "cells are visible to the admin token only"}"#,
        );
        assert!(r.ends_with("this needs the admin token"), "{r}");
        let r = refusal(409, br#"{"error": "several tenants have an app web: add ?tenant=<tenant>", "details": ["acme", "beta"]}"#);
        assert!(
            r.ends_with("  - beta\n  name the tenant with --tenant"),
            "{r}"
        );
        // Not JSON: the body as it is.
        assert_eq!(
            refusal(502, b"bad gateway\n").lines().next(),
            Some("the brain failed (502): bad gateway")
        );
    }

    #[test]
    fn tables_align_columns() {
        let t = render_table(
            &["A", "LONGER", "C"],
            &[
                vec!["xyz".into(), "1".into(), "last".into()],
                vec!["q".into(), "".into(), "".into()],
            ],
        );
        assert_eq!(t, "A    LONGER  C\nxyz  1       last\nq\n");
    }

    #[test]
    fn small_formats() {
        assert_eq!(
            short_time("2023-11-14T22:13:20.000000000Z"),
            "2023-11-14T22:13:20Z"
        );
        assert_eq!(short_time("-"), "-");
        let args = |s: &[&str]| s.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            shell_join(&args(&["/bin/sh", "-c", "echo 'hi' there", ""])),
            r#"/bin/sh -c 'echo '\''hi'\'' there' ''"#
        );
        assert_eq!(text(&json!(null)), "-");
        assert_eq!(text(&json!(3)), "3");
    }

    fn app(instances: u32, version: u32, command: &[&str]) -> Value {
        json!({
            "name": "web", "tenant": "acme", "instances": instances, "version": version,
            "rootfs": "busybox", "command": command, "env": {"A": "1"},
            "resources": {"memory_mb": 64, "disk_mb": 1024, "cpu_weight": 100, "max_pids": 1024},
            "ports": [{"port": 8080, "protocol": "tcp", "published": null}], "tags": [],
            "vip": "10.96.0.1", "revision": 4,
            "created_at": "2023-11-14T22:13:20.000000000Z",
            "updated_at": "2023-11-14T22:13:21.500000000Z",
        })
    }

    #[test]
    fn push_summaries() {
        let a = app(2, 1, &["sleep", "1"]);
        assert_eq!(
            push_summary(None, &a),
            "created app acme/web (version 1, 2 instances)"
        );
        assert_eq!(
            push_summary(Some(&a), &a),
            "app acme/web is unchanged (version 1, 2 instances)"
        );
        let mut b = app(1, 2, &["sleep", "2"]);
        b["resources"]["memory_mb"] = 128.into();
        assert_eq!(
            push_summary(Some(&a), &b),
            "updated app acme/web (version 2, 1 instance): instances 2 -> 1, command, memory 64 -> 128"
        );
    }

    #[test]
    fn app_and_instances() {
        let d = app_details(&app(2, 3, &["sh", "-c", "sleep 9"]));
        assert!(
            d.starts_with("app web\n  tenant     acme\n  version    3 (revision 4)\n"),
            "{d}"
        );
        assert!(d.contains("  command    sh -c 'sleep 9'\n"), "{d}");
        assert!(
            d.contains("memory 64 MB, disk 1024 MB, cpu weight 100, max pids 1024"),
            "{d}"
        );
        assert!(d.contains("  updated    2023-11-14T22:13:21Z\n"), "{d}");
        assert!(
            d.contains("  vip        10.96.0.1\n  ports      8080/tcp\n"),
            "{d}"
        );
        let t = instances_table(&json!([{
            "id": "acme-web-0", "tenant": "acme", "app": "web", "index": 0, "cell": "cell-1",
            "state": "running", "address": "10.244.1.5", "since": "2023-11-14T22:13:20.000000000Z",
        }]));
        assert_eq!(
            t,
            "INDEX  STATE    CELL    ADDRESS     SINCE                 ID          REASON\n\
             0      running  cell-1  10.244.1.5  2023-11-14T22:13:20Z  acme-web-0\n"
        );
        let apps = apps_table(&json!([app(2, 1, &["sleep", "1"])]));
        assert_eq!(
            apps.lines().nth(1),
            Some("acme    web   2          1        64 MB   10.96.0.1  8080/tcp  busybox  sleep 1")
        );
    }

    #[test]
    fn event_lines() {
        let ev = |name: &str, data: Value| sse::Event {
            name: name.into(),
            data: data.to_string(),
            id: Some("7".into()),
        };
        let created = ev(
            "app.created",
            json!({"type": "app.created", "revision": 7, "app": app(2, 1, &["x"])}),
        );
        assert_eq!(
            event_line(&created),
            "     7  app.created   acme/web  version 1, 2 instances"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&event_json(&created)).unwrap()["app"]["name"],
            "web"
        );
        let deleted = ev(
            "app.deleted",
            json!({"type": "app.deleted", "revision": 7, "tenant": "acme", "name": "web"}),
        );
        assert_eq!(event_line(&deleted), "     7  app.deleted   acme/web");
        let task = ev(
            "task.updated",
            json!({"type": "task.updated", "task": {
            "id": "task-1", "tenant": "acme", "state": "failed", "cell": "cell-1",
            "result": {"exit_code": 2, "reason": null, "finished_at": "x"}}}),
        );
        assert_eq!(
            event_line(&task),
            "     7  task.updated  acme/task-1  failed on cell-1 (exit 2)"
        );
        let lagged = sse::Event {
            name: "lagged".into(),
            data: r#"{"missed":3}"#.into(),
            id: None,
        };
        assert_eq!(
            event_line(&lagged),
            "     -  lagged        missed 3 events  list again to catch up"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&event_json(&lagged)).unwrap(),
            json!({"type": "lagged", "missed": 3})
        );
    }
}

#[cfg(test)]
mod health_check_tests {
    use super::*;

    #[test]
    fn health_checks_read_as_the_brain_takes_them() {
        assert_eq!(
            parse_health_check("process").unwrap(),
            json!({"type": "process"})
        );
        assert_eq!(
            parse_health_check("tcp:8080,failures=5").unwrap(),
            json!({"type": "tcp", "port": 8080, "failure_threshold": 5})
        );
        assert_eq!(
            parse_health_check("http:8080/healthz,start=30").unwrap(),
            json!({"type": "http", "port": 8080, "path": "/healthz", "start_timeout_ms": 30000})
        );
        assert_eq!(
            parse_health_check("http:80").unwrap(),
            json!({"type": "http", "port": 80, "path": "/"})
        );
        for bad in ["exec", "tcp:x", "http:8080/,slow=1", "tcp:1,start=-1", ""] {
            assert!(parse_health_check(bad).is_err(), "{bad}");
        }
    }
}
