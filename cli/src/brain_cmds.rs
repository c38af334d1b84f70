//! The commands that talk to the brain's management API: apps, tasks,
//! cells and the event stream. What they send and how they show answers
//! lives in `corral_cli::brain`; this is argument parsing and the calls.

use crate::{print, Cli, Fail, Output};
use clap::{Args, Subcommand};
use corral_cli::brain::{self, Fields};
use corral_cli::client::{Client, ClientError, Response};
use corral_cli::sse;
use corral_proto::{AppId, InstanceId, TenantId};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

/// Longest silence on the event stream before we give up on the brain; it
/// sends a keep-alive every 15 s.
const EVENTS_IDLE: Duration = Duration::from_secs(60);

#[derive(Subcommand)]
pub(crate) enum BrainCmd {
    /// Creates an app on the brain, or updates it if it exists: given flags
    /// replace what the app has, others stay (a repeated push is a no-op).
    Push(Box<PushArgs>),
    /// Lists the apps on the brain.
    Apps {
        /// Only this tenant's (admin token).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Shows an app and its instances.
    App {
        name: String,
        /// The app's tenant, when several have one of that name (admin token).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Sets how many instances of an app should run.
    Scale {
        name: String,
        instances: u32,
        /// The app's tenant (admin token).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Deletes an app from the brain; its instances are stopped.
    DeleteApp {
        name: String,
        /// The app's tenant (admin token).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// One-off tasks on the brain.
    Task {
        #[command(subcommand)]
        cmd: TaskCmd,
    },
    /// Lists the tasks on the brain.
    Tasks {
        /// Only this tenant's (admin token).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lists the cells the brain knows (admin token).
    Cells,
    /// Follows the brain's changes as they happen, one line each (-o json:
    /// one JSON object each).
    Events,
    /// Lists the network policies between tenants (a tenant token sees
    /// those that name its tenant).
    Policies,
    /// Network policies: allow, or stop allowing, one tenant's instances
    /// to reach another's.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
}

#[derive(Subcommand)]
pub(crate) enum PolicyCmd {
    /// Lets instances of FROM open connections to instances of TO (a
    /// tenant token may only open its own instances: TO is its tenant).
    Add(PolicyArgs),
    /// Removes a policy (the same FROM, TO, app, protocol and port).
    Delete(PolicyArgs),
}

#[derive(Args)]
pub(crate) struct PolicyArgs {
    /// The tenant whose instances may connect.
    from: String,
    /// The tenant whose instances they may reach.
    to: String,
    /// Only this app of TO (default: all of its apps).
    #[arg(long)]
    app: Option<String>,
    /// any, icmp, tcp, udp or sctp.
    #[arg(long, default_value = "any")]
    protocol: String,
    /// Destination port (0: any; needs tcp, udp or sctp).
    #[arg(long, default_value_t = 0)]
    port: u16,
}

impl PolicyArgs {
    fn body(&self) -> Result<Value, Fail> {
        for t in [&self.from, &self.to] {
            TenantId::new(t.as_str()).map_err(|e| Fail::Usage(e.to_string()))?;
        }
        if let Some(app) = &self.app {
            corral_proto::AppId::new(app.as_str()).map_err(|e| Fail::Usage(e.to_string()))?;
        }
        if !["any", "icmp", "tcp", "udp", "sctp"].contains(&self.protocol.as_str()) {
            return Err(Fail::Usage(format!(
                "unknown protocol {:?}: use any, icmp, tcp, udp or sctp",
                self.protocol
            )));
        }
        Ok(json!({
            "from": self.from, "to": self.to, "app": self.app,
            "protocol": self.protocol, "port": self.port,
        }))
    }
}

fn policy_line(p: &Value) -> String {
    let port = match p["port"].as_u64() {
        Some(0) | None => String::new(),
        Some(n) => format!("/{n}"),
    };
    let app = match p["app"].as_str() {
        Some(a) => format!("/{a}"),
        None => String::new(),
    };
    format!(
        "{} -> {}{app} {}{port}",
        brain::text(&p["from"]),
        brain::text(&p["to"]),
        brain::text(&p["protocol"])
    )
}

#[derive(Subcommand)]
pub(crate) enum TaskCmd {
    /// Starts a one-off task: corral task run --rootfs R --memory MB -- CMD...
    Run(TaskRunArgs),
    /// Shows a task.
    Get { id: String },
}

/// What an app's or a task's instance runs.
#[derive(Args)]
pub(crate) struct SpecArgs {
    /// Root filesystem (required to create).
    #[arg(long)]
    rootfs: Option<String>,
    /// Memory limit in MB (required to create).
    #[arg(long, value_name = "MB")]
    memory: Option<u64>,
    /// Writable disk in MB (brain's default: 1024).
    #[arg(long, value_name = "MB")]
    disk: Option<u64>,
    /// Relative CPU weight, 1..=10000 (brain's default: 100).
    #[arg(long, value_name = "WEIGHT")]
    cpu_weight: Option<u32>,
    /// Most processes and threads (brain's default: 1024).
    #[arg(long, value_name = "N")]
    max_pids: Option<u32>,
    /// An environment variable (repeatable; on update, replaces them all).
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// A placement tag the cell must have (repeatable; on update, replaces them all).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// The tenant to act for (admin token only; a tenant token acts for its own).
    #[arg(long)]
    tenant: Option<String>,
    /// The command, after `--` (required to create).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
pub(crate) struct PushArgs {
    /// The app's name (unique within its tenant).
    name: String,
    /// How many instances should run (brain's default on create: 1).
    #[arg(long, value_name = "N")]
    instances: Option<u32>,
    /// A port the app listens on: PORT, PORT/udp, PORT:PUBLISHED (published
    /// on every node; repeatable; on update, replaces them all).
    #[arg(long = "port", value_name = "PORT[/PROTO][:PUBLISHED]", value_parser = brain::parse_port)]
    ports: Vec<corral_proto::service::PortSpec>,
    /// What makes an instance ready (and alive): process, tcp:PORT or
    /// http:PORT/PATH, with optional ,start=SECS and ,failures=N (default: a
    /// TCP check of the first TCP port).
    #[arg(long, value_name = "CHECK", value_parser = brain::parse_health_check)]
    health_check: Option<serde_json::Value>,
    #[command(flatten)]
    spec: SpecArgs,
}

#[derive(Args)]
pub(crate) struct TaskRunArgs {
    /// A label grouping tasks, such as the app it belongs to (default: the task's id).
    #[arg(long)]
    app: Option<String>,
    #[command(flatten)]
    spec: SpecArgs,
}

impl SpecArgs {
    fn fields(&self) -> Result<Fields, Fail> {
        let env = brain::parse_env(&self.env)
            .map_err(|p| Fail::Usage(format!("bad --env:\n  - {}", p.join("\n  - "))))?;
        Ok(Fields {
            rootfs: self.rootfs.clone(),
            command: self.command.clone(),
            memory_mb: self.memory,
            disk_mb: self.disk,
            cpu_weight: self.cpu_weight,
            max_pids: self.max_pids,
            env,
            tags: self.tags.clone(),
            ..Fields::default()
        })
    }
}

fn check_app(name: &str) -> Result<(), Fail> {
    AppId::new(name)
        .map(drop)
        .map_err(|e| Fail::Usage(e.to_string()))
}

fn check_tenant(tenant: Option<&String>) -> Result<Option<&str>, Fail> {
    match tenant {
        None => Ok(None),
        Some(t) => TenantId::new(t.as_str())
            .map(|_| Some(t.as_str()))
            .map_err(|e| Fail::Usage(e.to_string())),
    }
}

fn connect(cli: &Cli) -> Result<Client, Fail> {
    let endpoint = brain::parse_brain_url(&cli.brain).map_err(Fail::Usage)?;
    let token = cli.token.clone().ok_or_else(|| {
        Fail::Usage(
            "no token for the brain: set --token or CORRAL_TOKEN (the admin token or a tenant's, from the brain's config)"
                .into(),
        )
    })?;
    brain::check_token(&token).map_err(Fail::Usage)?;
    Ok(Client::new(endpoint).with_token(Some(token)))
}

/// A 2xx answer's JSON; anything else is a refusal.
fn call(r: Result<Response, ClientError>) -> Result<Value, Fail> {
    let r = r.map_err(Fail::BrainUnreachable)?;
    if !r.is_success() {
        return Err(Fail::BrainRefused(r));
    }
    r.json()
        .map_err(|e| Fail::Failed(format!("the brain sent invalid JSON: {e}")))
}

/// Like [`call`], with 404 as `None`.
fn call_opt(r: Result<Response, ClientError>) -> Result<Option<Value>, Fail> {
    match r {
        Ok(r) if r.status == 404 => Ok(None),
        r => call(r).map(Some),
    }
}

pub(crate) fn run(cli: &Cli, cmd: &BrainCmd) -> Result<(), Fail> {
    let out = cli.output;
    match cmd {
        BrainCmd::Push(args) => push(&connect(cli)?, out, args),
        BrainCmd::Apps { tenant } => {
            let q = brain::tenant_query(check_tenant(tenant.as_ref())?);
            let v = call(connect(cli)?.get(&format!("/v1/apps{q}")))?;
            print(out, &v, |v| print!("{}", brain::apps_table(&v["apps"])));
            Ok(())
        }
        BrainCmd::App { name, tenant } => {
            check_app(name)?;
            let c = connect(cli)?;
            let q = brain::tenant_query(check_tenant(tenant.as_ref())?);
            let app = call(c.get(&format!("/v1/apps/{name}{q}")))?;
            // The tenant of the app found, so both answers are about one app.
            let q = brain::tenant_query(app["tenant"].as_str());
            let inst = call(c.get(&format!("/v1/apps/{name}/instances{q}")))?;
            let v = json!({
                "app": app, "instances": inst["instances"], "unplaced": inst["unplaced"],
            });
            print(out, &v, |v| {
                print!("{}", brain::app_details(&v["app"]));
                let n = v["instances"].as_array().map_or(0, Vec::len);
                println!(
                    "\n{n} of {} instances reported{}",
                    brain::text(&v["app"]["instances"]),
                    if n == 0 { " (no cell runs it yet)" } else { "" }
                );
                print!("{}", brain::instances_table(&v["instances"]));
                for u in v["unplaced"].as_array().into_iter().flatten() {
                    println!(
                        "index {} is not placed: {}",
                        brain::text(&u["index"]),
                        brain::text(&u["reason"])
                    );
                }
            });
            Ok(())
        }
        BrainCmd::Scale {
            name,
            instances,
            tenant,
        } => {
            check_app(name)?;
            let q = brain::tenant_query(check_tenant(tenant.as_ref())?);
            let body = json!({ "instances": instances });
            let v = call(connect(cli)?.patch_json(&format!("/v1/apps/{name}{q}"), &body))?;
            print(out, &v, |v| {
                println!(
                    "scaled app {} to {} instances (version {})",
                    brain::app_label(v),
                    brain::text(&v["instances"]),
                    brain::text(&v["version"])
                );
            });
            Ok(())
        }
        BrainCmd::DeleteApp { name, tenant } => {
            check_app(name)?;
            let q = brain::tenant_query(check_tenant(tenant.as_ref())?);
            let v = call(connect(cli)?.delete(&format!("/v1/apps/{name}{q}")))?;
            print(out, &v, |v| {
                println!(
                    "deleted app {}: its instances will be stopped",
                    brain::app_label(v)
                );
            });
            Ok(())
        }
        BrainCmd::Task {
            cmd: TaskCmd::Run(args),
        } => {
            if let Some(a) = &args.app {
                check_app(a)?;
            }
            let tenant = check_tenant(args.spec.tenant.as_ref())?;
            let body = args
                .spec
                .fields()?
                .new_task(args.app.as_deref(), tenant)
                .map_err(|missing| Fail::Usage(format!("a task needs {}", missing.join(", "))))?;
            let v = call(connect(cli)?.post_json("/v1/tasks", &body))?;
            print(out, &v, |v| {
                let id = brain::text(&v["id"]);
                println!(
                    "created task {id} for tenant {} ({})\n  see it with: corral task get {id}",
                    brain::text(&v["tenant"]),
                    brain::text(&v["state"])
                );
            });
            Ok(())
        }
        BrainCmd::Task {
            cmd: TaskCmd::Get { id },
        } => {
            InstanceId::new(id.as_str()).map_err(|e| Fail::Usage(format!("task id: {e}")))?;
            let v = call(connect(cli)?.get(&format!("/v1/tasks/{id}")))?;
            print(out, &v, |v| print!("{}", brain::task_details(v)));
            Ok(())
        }
        BrainCmd::Tasks { tenant } => {
            let q = brain::tenant_query(check_tenant(tenant.as_ref())?);
            let v = call(connect(cli)?.get(&format!("/v1/tasks{q}")))?;
            print(out, &v, |v| print!("{}", brain::tasks_table(&v["tasks"])));
            Ok(())
        }
        BrainCmd::Cells => {
            let v = call(connect(cli)?.get("/v1/cells"))?;
            print(out, &v, |v| print!("{}", brain::cells_table(&v["cells"])));
            Ok(())
        }
        BrainCmd::Events => events(connect(cli)?, out),
        BrainCmd::Policies => {
            let v = call(connect(cli)?.get("/v1/policies"))?;
            print(out, &v, |v| {
                let list = v["policies"].as_array().cloned().unwrap_or_default();
                if list.is_empty() {
                    println!("no policies: tenants reach only their own instances");
                }
                for p in &list {
                    println!("{}", policy_line(p));
                }
            });
            Ok(())
        }
        BrainCmd::Policy { cmd } => {
            let (method, args, done) = match cmd {
                PolicyCmd::Add(a) => ("POST", a, "added policy"),
                PolicyCmd::Delete(a) => ("DELETE", a, "deleted policy"),
            };
            let body = args.body()?.to_string();
            let v = call(connect(cli)?.request(method, "/v1/policies", Some(body.as_bytes())))?;
            print(out, &v, |v| println!("{done} {}", policy_line(v)));
            Ok(())
        }
    }
}

/// Creates the app, or patches it with what was given if it exists.
fn push(c: &Client, out: Output, args: &PushArgs) -> Result<(), Fail> {
    let name = &args.name;
    check_app(name)?;
    let tenant = check_tenant(args.spec.tenant.as_ref())?;
    let mut fields = args.spec.fields()?;
    fields.instances = args.instances;
    fields.ports.clone_from(&args.ports);
    fields.health_check.clone_from(&args.health_check);
    let q = brain::tenant_query(tenant);
    let before = call_opt(c.get(&format!("/v1/apps/{name}{q}")))?;
    let after = match &before {
        None => {
            let body = fields.new_app(name, tenant).map_err(|missing| {
                Fail::Usage(format!(
                    "there is no app {name} yet: to create it, give {}",
                    missing.join(", ")
                ))
            })?;
            call(c.post_json("/v1/apps", &body))?
        }
        Some(app) => {
            // The tenant of the app found: patch exactly that one.
            let q = brain::tenant_query(app["tenant"].as_str());
            call(c.patch_json(&format!("/v1/apps/{name}{q}"), &fields.app_patch()))?
        }
    };
    print(out, &after, |a| {
        println!("{}", brain::push_summary(before.as_ref(), a));
    });
    Ok(())
}

/// Follows `GET /v1/events` until the brain ends it or stdout closes.
fn events(c: Client, out: Output) -> Result<(), Fail> {
    let c = c.with_timeout(Some(EVENTS_IDLE));
    let mut stream = c
        .open("GET", "/v1/events", None)
        .map_err(Fail::BrainUnreachable)?;
    let status = stream.status();
    if !(200..300).contains(&status) {
        let mut body = Vec::new();
        while let Some(chunk) = stream.next_chunk().map_err(Fail::BrainUnreachable)? {
            body.extend_from_slice(&chunk);
            if body.len() > 1 << 16 {
                break;
            }
        }
        return Err(Fail::BrainRefused(Response { status, body }));
    }
    // The brain subscribes before it answers: from here on nothing is missed.
    eprintln!(
        "corral: following events from {} (interrupt to stop)",
        c.endpoint()
    );
    let mut parser = sse::Parser::new();
    let mut stdout = std::io::stdout().lock();
    while let Some(chunk) = stream.next_chunk().map_err(Fail::BrainUnreachable)? {
        for ev in parser.push(&chunk) {
            let line = match out {
                Output::Json => brain::event_json(&ev),
                Output::Table => brain::event_line(&ev),
            };
            if writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // Whoever read our output has gone: nothing left to do.
                return Ok(());
            }
        }
    }
    Err(Fail::Ended(format!(
        "the brain at {} ended the event stream (restarting or shutting down?): run 'corral events' again",
        c.endpoint()
    )))
}
