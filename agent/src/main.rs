//! corral-agent: the cell daemon, and (hidden) its per-instance shim and
//! clean-up helper, which are the same binary re-executed.

use anyhow::Context;
use clap::{Parser, Subcommand};
use corral_agent::cell_link::{self, LinkSettings};
use corral_agent::config::{Config, HostFacts};
use corral_agent::executor::{CleanupArgs, Executor};
use corral_agent::metrics::Metrics;
use corral_agent::network::ipam::check_no_overlap;
use corral_agent::network::plane::Plane;
use corral_agent::network::services::Lb;
use corral_agent::network::Network;
use corral_agent::selfcheck::SelfCheck;
use corral_agent::{api, cgroups, health, preflight, shim};
use corral_systemd::notify::{self, Notifier, State};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "corral-agent",
    version,
    about = "corral cell agent: runs application instances as containers"
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/corral/agent.toml")]
    config: PathBuf,
    /// Only validate the configuration and the host, then exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Per-instance supervisor (started by the agent).
    #[command(hide = true)]
    Shim { launch: PathBuf },
    /// Releases an instance's resources after its shim died (started by the agent).
    #[command(hide = true)]
    Cleanup { args: String },
}

/// Drains the cell before it stops: evacuates, then waits until no LRP
/// instance is left (the brain has started their replacements elsewhere
/// and stopped them here), `timeout_secs` passed, or another SIGTERM or
/// Ctrl-C says to stop at once. Keeps systemd's stop timeout extended
/// meanwhile. Returns whether this drain started the evacuation.
async fn drain_before_stop(
    exec: &std::sync::Arc<Executor>,
    sd: Option<&notify::Notifier>,
    term: &mut tokio::signal::unix::Signal,
    timeout_secs: u64,
) -> bool {
    let started = match exec.set_evacuating(true) {
        Ok(changed) => changed,
        Err(e) => {
            tracing::error!("cannot drain before stopping: {e}; stopping now");
            return false;
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(timeout_secs);
    let mut changes = exec.changes();
    loop {
        let left = exec.live_lrps();
        if left == 0 {
            tracing::info!("drained: no LRP instance left on this cell");
            break;
        }
        notify::send(
            sd,
            &[
                State::ExtendTimeout(std::time::Duration::from_secs(30)),
                State::Status(format!("draining before stop: {left} LRP instance(s) left")),
            ],
        );
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(left, "drain before stop timed out after {timeout_secs} s: stopping with instances running");
                break;
            }
            _ = term.recv() => {
                tracing::warn!(left, "second SIGTERM: stopping without waiting for the drain");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::warn!(left, "interrupted: stopping without waiting for the drain");
                break;
            }
        }
    }
    started
}

fn main() {
    // The shim's monitor half is kept as lean as possible: no argument parser,
    // no runtime, no logging set-up.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "shim-monitor") {
        shim::monitor_main(&args[2..]);
    }
    let cli = Cli::parse();
    match cli.cmd {
        // The shim and the helper stay single-threaded: no runtime is built.
        Some(Cmd::Shim { launch }) => shim::main(&launch),
        Some(Cmd::Cleanup { args }) => {
            let code = match serde_json::from_str::<CleanupArgs>(&args) {
                Ok(a) => {
                    shim::cleanup(&a.id, &a.paths, a.cgroup2);
                    0
                }
                Err(e) => {
                    eprintln!("corral-agent cleanup: bad arguments: {e}");
                    2
                }
            };
            std::process::exit(code)
        }
        None => {}
    }
    // Read (and removed from the environment, so shims do not inherit it)
    // while this process is still single-threaded; a unit that asks for
    // something impossible stops the start here, before anything changes.
    let notifier = match Notifier::take_from_env("corral-agent", MIN_WATCHDOG) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("corral-agent: {e}");
            std::process::exit(2);
        }
    };
    let host = HostFacts::probe(std::path::Path::new("/var/lib/corral"));
    let cfg = match Config::load(&cli.config, &host) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("corral-agent: {e}");
            std::process::exit(2);
        }
    };
    init_tracing(&cfg);
    // The brain credentials are part of the configuration: a certificate
    // that does not load or names another cell stops the start, as a bad
    // config file does.
    let creds = match &cfg.brain {
        None => None,
        Some(b) => match cell_link::load_credentials(b, &cfg.cell_id) {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("corral-agent: {e}");
                std::process::exit(2);
            }
        },
    };
    // --check changes nothing on the host: a missing bpffs, which the agent
    // mounts itself at start, is only a note there.
    let mut notes = Vec::new();
    if cli.check {
        if !preflight::has_bpffs(&preflight::Facts::read().mountinfo) {
            notes.push("bpffs is not mounted at /sys/fs/bpf; the agent will mount it at start");
        }
    } else if let Err(e) = preflight::ensure_bpffs(&preflight::Facts::read().mountinfo) {
        tracing::warn!("{e}");
    }
    let problems: Vec<String> = preflight::check(&preflight::Facts::read())
        .into_iter()
        .filter(|p| !(cli.check && p.contains("bpffs")))
        .collect();
    if !problems.is_empty() {
        eprintln!("corral-agent: this host cannot run instances:");
        for p in &problems {
            eprintln!("  - {p}");
        }
        std::process::exit(1);
    }
    if cli.check {
        for n in notes {
            println!("note: {n}");
        }
        if let Some(b) = &cfg.brain {
            println!(
                "brain credentials {} name this cell ({})",
                b.cert.display(),
                cfg.cell_id
            );
        }
        println!("configuration {} and host are fine", cli.config.display());
        return;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("corral-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(cfg, creds, notifier)) {
        tracing::error!("{e:#}");
        eprintln!("corral-agent: {e:#}");
        std::process::exit(1);
    }
}

/// The shortest `WatchdogSec=` accepted: keep-alives go every half period,
/// each after a health check that may take a quarter period (1 s here).
const MIN_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(4);

/// The agent's own log: levels from `RUST_LOG`, else the config's
/// `log_level`; JSON when `CORRAL_LOG_FORMAT` says so, else as the config's
/// `log_format` says.
fn init_tracing(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(cfg.log_level.as_str()));
    let json = match std::env::var("CORRAL_LOG_FORMAT") {
        Ok(v) => v == "json",
        Err(_) => cfg.log_json,
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(
    cfg: Config,
    creds: Option<corral_link::tls::Credentials>,
    notifier: Option<Notifier>,
) -> anyhow::Result<()> {
    let sd = notifier.as_ref();
    let exe = std::env::current_exe().context("cannot find the agent's own executable")?;
    for d in [&cfg.data_dir, &cfg.run_dir] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::create_dir_all(&cfg.layers_dir)
        .with_context(|| format!("creating {}", cfg.layers_dir.display()))?;
    let metrics = Arc::new(Metrics::new());
    let network = match cfg.subnet {
        None => None,
        Some(subnet) => {
            let n = Network::open().context("opening netlink for the cell network")?;
            let node = n
                .node_networks()
                .await
                .context("reading the node's addresses")?;
            check_no_overlap(subnet, &node).context("checking [network] subnet")?;
            tracing::info!(%subnet, "cell network");
            let plane = if cfg.dataplane {
                notify::send(sd, &[State::Status("loading the data plane".into())]);
                let pins = std::path::Path::new("/sys/fs/bpf/corral").join(cfg.cell_id.as_str());
                Some(Plane::load(&pins).context("loading the eBPF data plane")?)
            } else {
                tracing::warn!(
                    "the eBPF data plane is disabled: no tenant isolation or traffic counters"
                );
                None
            };
            Some((n, plane))
        }
    };
    // Service load balancing needs the data plane and a cgroup2 directory
    // for the instances (its programs attach there).
    let cgroup2 = std::path::Path::new(corral_agent::paths::CGROUP2_HYBRID).join("cgroup.procs");
    let lb = match &network {
        Some((_, Some(_))) if cgroup2.exists() => {
            let pins = std::path::Path::new("/sys/fs/bpf/corral").join(cfg.cell_id.as_str());
            Some(Lb::load(&pins).map_err(|e| anyhow::anyhow!(e))?)
        }
        Some((_, Some(_))) => {
            tracing::warn!(
                "no cgroup2 hierarchy at {}: no service load balancing",
                corral_agent::paths::CGROUP2_HYBRID
            );
            None
        }
        _ => None,
    };
    let exec = Executor::new(cfg.clone(), exe, metrics.clone(), network, lb);
    cgroups::ensure_roots(&cfg.cgroup_root, exec.cgroup2_root())
        .with_context(|| format!("creating the agent's cgroups {:?}", cfg.cgroup_root))?;
    if let (Some(lb), Some(root)) = (exec.lb(), exec.cgroup2_root()) {
        let created = lb.attach(root).map_err(|e| anyhow::anyhow!(e))?;
        tracing::info!(cgroup = %root.display(), created, "service load balancer attached");
        if let (false, Some(subnet)) = (cfg.uplinks.is_empty(), cfg.subnet) {
            let pins = std::path::Path::new("/sys/fs/bpf/corral").join(cfg.cell_id.as_str());
            let node = Network::open()
                .context("opening netlink")?
                .node_networks()
                .await
                .context("reading the node's addresses")?;
            let addrs: Vec<std::net::Ipv4Addr> = node.iter().map(|(a, _)| *a).collect();
            lb.enable_north_south(
                &pins,
                &cfg.uplinks,
                &addrs,
                (subnet.network(), subnet.prefix()),
            )
            .map_err(|e| anyhow::anyhow!(e))?;
            tracing::info!(uplinks = ?cfg.uplinks, addresses = ?addrs, "published ports balanced on the uplinks");
        }
    }
    let registry = metrics.registry(Arc::downgrade(&exec));
    let state = Arc::new(api::ApiState {
        exec: exec.clone(),
        registry,
        ready: false.into(),
        token: cfg.api_token.clone(),
    });

    if let Some(parent) = cfg.api_socket.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::remove_file(&cfg.api_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("removing stale socket {}", cfg.api_socket.display()))
        }
    }
    let unix = tokio::net::UnixListener::bind(&cfg.api_socket)
        .with_context(|| format!("binding {}", cfg.api_socket.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&cfg.api_socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", cfg.api_socket.display()))?;
    }
    tokio::spawn(api::serve_unix(state.clone(), unix));
    if let Some(addr) = cfg.api_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding api.listen {addr}"))?;
        tokio::spawn(api::serve_tcp(state.clone(), l, api::Listener::Tcp));
    }
    if let Some(addr) = cfg.metrics_listen {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics.listen {addr}"))?;
        tokio::spawn(api::serve_tcp(state.clone(), l, api::Listener::Metrics));
    }

    if !exec.disk_quota() {
        tracing::warn!(
            "disk limits are not enforced ([disk] enforce = false): disk_mb is only accounted"
        );
    }
    notify::send(sd, &[State::Status("re-adopting instances".into())]);
    let adopted = exec.adopt().await.context("re-adopting instances")?;
    state.ready.store(true, Ordering::Release);
    // Ready for systemd only now: the data plane is loaded (above) and every
    // instance that was running is in the table, so units ordered after this
    // one, and the brain, see the whole cell.
    notify::send(
        sd,
        &[
            State::Ready,
            State::Status(format!(
                "ready: cell {}, {adopted} instance(s) re-adopted",
                cfg.cell_id
            )),
        ],
    );
    if let Some(n) = notifier.clone() {
        let check = SelfCheck {
            socket: cfg.api_socket.clone(),
            exec: exec.clone(),
        };
        tokio::spawn(corral_systemd::watchdog::run(n, move || {
            check.clone().run()
        }));
    }
    tracing::info!(
        cell = %cfg.cell_id,
        adopted,
        socket = %cfg.api_socket.display(),
        api = ?cfg.api_listen,
        metrics = ?cfg.metrics_listen,
        "agent ready"
    );

    // One round of readiness checks before the brain hears from this cell,
    // so that re-adopted instances do not leave their services for a moment
    // after a restart; then checks on their intervals.
    health::check_all_once(&exec).await;
    tokio::spawn(health::run(exec.clone()));

    // After re-adoption, like the API: the first snapshot the brain gets
    // holds every instance this cell has.
    let link = match (LinkSettings::from_config(&cfg), creds) {
        (Some(settings), Some(creds)) => {
            let addresses: Vec<String> = settings.addresses.iter().map(|a| a.to_string()).collect();
            match cell_link::spawn(settings, creds, exec.clone(), metrics.clone()) {
                Ok(link) => {
                    tracing::info!(brain = ?addresses, "brain link started");
                    Some(link)
                }
                // Validated at start-up, so not expected; the cell still
                // serves its local API.
                Err(e) => {
                    tracing::error!("cannot start the brain link: {e}");
                    None
                }
            }
        }
        _ => None,
    };

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // A drain this stop started is cancelled before exiting, so the next
    // start takes work again; one an operator started stays.
    let drained = if cfg.drain_on_stop && link.is_some() {
        drain_before_stop(&exec, sd, &mut term, cfg.drain_timeout_secs).await
    } else {
        false
    };
    notify::send(
        sd,
        &[
            State::Stopping,
            State::Status("stopping; instances keep running".into()),
        ],
    );
    if let Some(link) = link {
        link.shutdown().await;
    }
    if drained {
        if let Err(e) = exec.set_evacuating(false) {
            tracing::error!("cannot clear the drain of this stop: {e}");
        }
    }
    let running = exec
        .snapshot()
        .iter()
        .filter(|s| !s.info.state.is_final())
        .count();
    tracing::info!(running, "agent stopping; instances keep running");
    let _ = std::fs::remove_file(&cfg.api_socket);
    Ok(())
}
