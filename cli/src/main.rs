//! `corral`: the command line for users and operators. Instance and cell
//! commands talk to a cell agent's local API (unix socket by default); app,
//! task, cells and events commands talk to the brain's management API with
//! a bearer token.
//!
//! Exit codes: 0 success, 1 the agent or the brain refused the request
//! (4xx/5xx) or failed, 2 bad usage or input, 3 the agent or the brain
//! could not be reached (or ended an event stream).

mod brain_cmds;
mod cell_cmds;

use clap::{Parser, Subcommand, ValueEnum};
use corral_cli::client::{Client, ClientError, Endpoint, Response};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "corral",
    version,
    about = "corral command line",
    after_help = "Instance and 'cell' commands talk to a cell agent (--agent); \
                  push, apps, app, scale, delete-app, task(s), cells and events talk to \
                  the brain (--brain, --token)."
)]
struct Cli {
    /// The agent's unix socket.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        default_value = "/run/corral/agent.sock",
        env = "CORRAL_AGENT_SOCKET"
    )]
    agent: PathBuf,
    /// The agent's TCP API address (host:port); overrides --agent.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CORRAL_AGENT_ADDR"
    )]
    agent_addr: Option<std::net::SocketAddr>,
    /// Bearer token for the agent's TCP API (its `[api] token`); the unix
    /// socket needs none.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CORRAL_AGENT_TOKEN",
        hide_env_values = true
    )]
    agent_token: Option<String>,
    /// The brain's management API (http://HOST:PORT).
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        value_name = "URL",
        env = "CORRAL_BRAIN",
        default_value = corral_cli::brain::DEFAULT_BRAIN
    )]
    brain: String,
    /// Bearer token for the brain: the admin token or a tenant's.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CORRAL_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Output format.
    #[arg(
        long,
        short,
        global = true,
        help_heading = "Global options",
        value_enum,
        default_value_t = Output::Table
    )]
    output: Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Lists the instances on the cell.
    Instances,
    /// Shows one instance.
    Get { id: String },
    /// Starts an instance from a JSON spec file ('-' for stdin).
    Run {
        id: String,
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Stops and removes an instance.
    Delete {
        id: String,
        /// Seconds between SIGTERM and SIGKILL (default: the agent's).
        #[arg(long)]
        grace: Option<u64>,
    },
    /// Prints an instance's logs.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long)]
        tail: Option<usize>,
    },
    /// The local cell: status, drain, undrain.
    Cell {
        #[command(subcommand)]
        cmd: cell_cmds::CellCmd,
    },
    #[command(flatten)]
    Brain(brain_cmds::BrainCmd),
    /// Prints a shell completion script: `corral completions bash >
    /// /etc/bash_completion.d/corral` (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

enum Fail {
    Usage(String),
    Refused(Response),
    Unreachable(ClientError),
    BrainRefused(Response),
    BrainUnreachable(ClientError),
    /// Anything else that went wrong (exit 1).
    Failed(String),
    /// The brain ended a stream we follow (exit 3).
    Ended(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "corral", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let (endpoint, token) = match cli.agent_addr {
        Some(a) => (Endpoint::Tcp(a), cli.agent_token.clone()),
        None => (Endpoint::Unix(cli.agent.clone()), None),
    };
    match run(&cli, Client::new(endpoint).with_token(token)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail::Usage(m)) => {
            eprintln!("corral: {m}");
            ExitCode::from(2)
        }
        Err(Fail::Refused(r)) => {
            let msg = r
                .json()
                .ok()
                .and_then(|v| {
                    let mut m = v.get("error")?.as_str()?.to_owned();
                    if let Some(d) = v.get("details").and_then(|d| d.as_array()) {
                        for x in d {
                            m.push_str(&format!("\n  - {}", x.as_str().unwrap_or_default()));
                        }
                    }
                    Some(m)
                })
                .unwrap_or_else(|| r.text());
            eprintln!("corral: the agent refused ({}): {msg}", r.status);
            ExitCode::from(1)
        }
        Err(Fail::Unreachable(e)) => {
            eprintln!("corral: {e}\n  is corral-agent running? (systemctl status corral-agent; or pass --agent/--agent-addr)");
            ExitCode::from(3)
        }
        Err(Fail::BrainRefused(r)) => {
            eprintln!("corral: {}", corral_cli::brain::refusal(r.status, &r.body));
            ExitCode::from(1)
        }
        Err(Fail::BrainUnreachable(e)) => {
            eprintln!("corral: {e}\n  is corral-brain running and serving its API there? (pass --brain URL or set CORRAL_BRAIN)");
            ExitCode::from(3)
        }
        Err(Fail::Failed(m)) => {
            eprintln!("corral: {m}");
            ExitCode::from(1)
        }
        Err(Fail::Ended(m)) => {
            eprintln!("corral: {m}");
            ExitCode::from(3)
        }
    }
}

fn call(r: Result<Response, ClientError>) -> Result<serde_json::Value, Fail> {
    let r = r.map_err(Fail::Unreachable)?;
    if !r.is_success() {
        return Err(Fail::Refused(r));
    }
    r.json()
        .map_err(|e| Fail::Usage(format!("the agent sent invalid JSON: {e}")))
}

fn s(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        None | Some(serde_json::Value::Null) => "-".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(x) => x.to_string(),
    }
}

fn table(instances: &[serde_json::Value]) {
    println!(
        "{:<20} {:<12} {:<12} {:>5} {:<5} {:<9} {:>8} {:>5}  REASON",
        "ID", "TENANT", "APP", "INDEX", "KIND", "STATE", "PID", "EXIT"
    );
    for i in instances {
        println!(
            "{:<20} {:<12} {:<12} {:>5} {:<5} {:<9} {:>8} {:>5}  {}",
            s(i, "id"),
            s(i, "tenant"),
            s(i, "app"),
            s(i, "index"),
            s(i, "kind"),
            s(i, "state"),
            s(i, "pid"),
            s(i, "exit_code"),
            if s(i, "reason") == "-" {
                String::new()
            } else {
                s(i, "reason")
            }
        );
    }
}

fn print(out: Output, v: &serde_json::Value, f: impl FnOnce(&serde_json::Value)) {
    if out == Output::Json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        f(v);
    }
}

fn run(cli: &Cli, c: Client) -> Result<(), Fail> {
    let check_id =
        |id: &str| corral_proto::InstanceId::new(id).map_err(|e| Fail::Usage(e.to_string()));
    match &cli.cmd {
        Cmd::Instances => {
            let v = call(c.get("/v1/instances"))?;
            print(cli.output, &v, |v| {
                table(
                    v["instances"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                )
            });
        }
        Cmd::Get { id } => {
            check_id(id)?;
            let v = call(c.get(&format!("/v1/instances/{id}")))?;
            print(cli.output, &v, |v| table(std::slice::from_ref(v)));
        }
        Cmd::Run { id, file } => {
            check_id(id)?;
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                    .map_err(|e| Fail::Usage(e.to_string()))?;
                s
            } else {
                std::fs::read_to_string(file)
                    .map_err(|e| Fail::Usage(format!("cannot read {}: {e}", file.display())))?
            };
            let spec: corral_proto::InstanceSpec = serde_json::from_str(&text)
                .map_err(|e| Fail::Usage(format!("invalid spec: {e}")))?;
            spec.validate().map_err(|e| Fail::Usage(e.to_string()))?;
            let body = serde_json::to_value(&spec).map_err(|e| Fail::Usage(e.to_string()))?;
            let v = call(c.put_json(&format!("/v1/instances/{id}"), &body))?;
            print(cli.output, &v, |v| table(std::slice::from_ref(v)));
        }
        Cmd::Delete { id, grace } => {
            check_id(id)?;
            let q = grace
                .map(|g| format!("?grace_secs={g}"))
                .unwrap_or_default();
            let v = call(c.delete(&format!("/v1/instances/{id}{q}")))?;
            print(cli.output, &v, |v| table(std::slice::from_ref(v)));
        }
        Cmd::Logs { id, follow, tail } => {
            check_id(id)?;
            let mut q = vec![];
            if *follow {
                q.push("follow=true".to_owned());
            }
            if let Some(t) = tail {
                q.push(format!("tail={t}"));
            }
            let path = format!("/v1/instances/{id}/logs?{}", q.join("&"));
            let c = if *follow { c.with_timeout(None) } else { c };
            let mut out = std::io::stdout();
            let mut err_body = Vec::new();
            let status = c
                .stream("GET", &path, None, |chunk| {
                    err_body.extend_from_slice(chunk);
                    if err_body.len() > 1 << 16 {
                        err_body.clear();
                    }
                    out.write_all(chunk).and_then(|()| out.flush()).is_ok()
                })
                .map_err(Fail::Unreachable)?;
            if !(200..300).contains(&status) {
                return Err(Fail::Refused(Response {
                    status,
                    body: err_body,
                }));
            }
        }
        Cmd::Brain(cmd) => brain_cmds::run(cli, cmd)?,
        Cmd::Cell { cmd } => cell_cmds::run(cli, c, cmd)?,
        // Answered in main, before any client exists.
        Cmd::Completions { .. } => {}
    }
    Ok(())
}
