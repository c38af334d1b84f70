//! The agent's configuration file (TOML). Every field has a documented
//! default; [`Config::load`] reports every problem in the file at once.

use corral_proto::wire::{BrainId, Tag, Zone, MAX_TAGS};
use corral_proto::{Capacity, CellId};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Where `corral-brain certs` puts a node's certificates by default.
pub const DEFAULT_CERTS_DIR: &str = "/etc/corral/certs";

/// The file as written; every field optional so that missing ones get defaults
/// and all problems can be collected before giving up.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cell_id: Option<String>,
    zone: Option<String>,
    tags: Option<Vec<String>>,
    data_dir: Option<PathBuf>,
    run_dir: Option<PathBuf>,
    cgroup_root: Option<String>,
    stop_grace_secs: Option<u64>,
    log_level: Option<String>,
    log_format: Option<String>,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    capacity: RawCapacity,
    #[serde(default)]
    logs: RawLogs,
    #[serde(default)]
    disk: RawDisk,
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    shutdown: RawShutdown,
    brain: Option<RawBrain>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain: Option<bool>,
    drain_timeout_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBrain {
    addresses: Option<Vec<String>>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    brain_id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    layers_dir: Option<PathBuf>,
    enforce: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    socket: Option<PathBuf>,
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    subnet: Option<String>,
    dataplane: Option<bool>,
    uplinks: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    memory_mb: Option<u64>,
    disk_mb: Option<u64>,
    max_containers: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLogs {
    max_bytes: Option<u64>,
    keep: Option<u32>,
}

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// This cell's id. Default: the host name.
    pub cell_id: CellId,
    /// Failure domain for placement. Default: "default".
    pub zone: Zone,
    /// Placement tags this cell offers (`ssd`, `gpu`): work that requires
    /// tags is placed only on cells that have them all. Default: none.
    pub tags: BTreeSet<Tag>,
    /// Durable state: instance specs, logs, writable layers. Default: /var/lib/corral.
    pub data_dir: PathBuf,
    /// Runtime state lost at reboot: shim records, container state, rootfs
    /// mounts, the API socket. Default: /run/corral.
    pub run_dir: PathBuf,
    /// Name of the cgroup (under every v1 controller, and under the cgroup2
    /// mount) that holds this agent's instances. Default: "corral".
    pub cgroup_root: String,
    /// Seconds between SIGTERM and SIGKILL when stopping an instance. Default: 10.
    pub stop_grace_secs: u64,
    /// The agent's own log levels, as `RUST_LOG` directives (which win
    /// when set). Default: "info".
    pub log_level: String,
    /// The agent's own log lines as JSON (for journald and shippers)
    /// instead of text; `CORRAL_LOG_FORMAT` wins when set. Default: false.
    pub log_json: bool,
    /// On SIGTERM, drain first: evacuate (the brain starts replacements
    /// elsewhere and stops the instances here) and wait until no LRP
    /// instance is left or `drain_timeout_secs` passed, then exit. Only
    /// with a `[brain]`. Default: false (instances keep running).
    pub drain_on_stop: bool,
    /// Longest wait of a drain on stop. Default: 300.
    pub drain_timeout_secs: u64,
    /// TCP address of the admin API; `None` disables it. Default: off. A
    /// non-loopback address needs `api_token`.
    pub api_listen: Option<SocketAddr>,
    /// Bearer token the TCP API asks for on every route but `/healthz`,
    /// `/readyz` and `/metrics` (the unix socket, root only, never asks).
    /// Default: none (no token asked; allowed on loopback only).
    pub api_token: Option<ApiToken>,
    /// Unix socket of the admin API. Default: `<run_dir>/agent.sock`.
    pub api_socket: PathBuf,
    /// TCP address of `/metrics`; `None` disables it. Default: 127.0.0.1:9800.
    pub metrics_listen: Option<SocketAddr>,
    /// What this cell offers. Defaults: memory = host RAM minus 10 % (at most
    /// 2 GiB reserved), disk = free space of `data_dir`, containers = 250.
    pub capacity: Capacity,
    /// Size at which an instance's log file is rotated. Default: 10 MiB.
    pub log_max_bytes: u64,
    /// Rotated log files kept per instance. Default: 3.
    pub log_keep: u32,
    /// Where instances' writable layers (and their disk images) live.
    /// Default: `<data_dir>/layers`.
    pub layers_dir: PathBuf,
    /// Give each instance a filesystem of its own of `disk_mb` (a sparse ext4
    /// image), so that its disk limit holds. When false, `disk_mb` is only
    /// accounted. Default: true.
    pub disk_enforce: bool,
    /// The cell's instance subnet (e.g. "10.244.1.0/24"). Each instance gets
    /// an address from it on its own veth; the first host address is the
    /// node's. Default: none (instances get a network namespace with only
    /// loopback).
    pub subnet: Option<crate::network::ipam::Subnet>,
    /// Load the eBPF data plane (anti-spoofing, tenant isolation, traffic
    /// counters) on instance veths; needs `subnet`. Maps are pinned under
    /// `/sys/fs/bpf/corral/<cell_id>/`. Default: true.
    pub dataplane: bool,
    /// Interfaces of the node where traffic from outside the cluster
    /// arrives: apps' published ports are balanced there (north-south, TC
    /// programs on each). Needs `subnet` and `dataplane`. Default: none (no
    /// published ports on this cell).
    pub uplinks: Vec<String>,
    /// The brain(s) this cell reports to and takes work from, when the
    /// `[brain]` table is present. Default: none (the cell is driven only
    /// through its local API).
    pub brain: Option<BrainConfig>,
}

/// Shortest accepted `[api] token`.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest accepted `[api] token` (it travels in a header).
pub const MAX_TOKEN_LEN: usize = 4096;

/// The TCP API's bearer token. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    /// Checks length and characters (visible ASCII: it goes in a header).
    /// Errors never echo the value.
    pub fn new(value: String) -> Result<Self, String> {
        if value.len() < MIN_TOKEN_LEN {
            return Err(format!(
                "is {} characters long; it needs at least {MIN_TOKEN_LEN}",
                value.len()
            ));
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err(format!("is longer than {MAX_TOKEN_LEN} characters"));
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("must be visible ASCII characters without spaces".into());
        }
        Ok(Self(value))
    }

    /// Compares in time independent of where the first difference is, so
    /// response times do not reveal a prefix of the token.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let mine = self.0.as_bytes();
        let mut diff = mine.len() ^ presented.len();
        for (i, b) in mine.iter().enumerate() {
            diff |= usize::from(b ^ presented.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// The `[brain]` table: how the cell reaches the brain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrainConfig {
    /// Brain QUIC endpoints, tried in turn: `ip:port`, `[ipv6]:port` or
    /// `host:port` (resolved at each attempt). At least one; no default.
    pub addresses: Vec<BrainAddress>,
    /// The cluster CA certificate (PEM). Default: `/etc/corral/certs/ca.pem`.
    pub ca: PathBuf,
    /// This cell's certificate (PEM), naming `corral://cell/<cell_id>`.
    /// Default: `/etc/corral/certs/cell-<cell_id>.pem`.
    pub cert: PathBuf,
    /// Its private key (PEM). Default: `/etc/corral/certs/cell-<cell_id>-key.pem`.
    pub key: PathBuf,
    /// Accept only a brain whose certificate names this brain. Default: any
    /// brain certificate from the cluster CA.
    pub brain_id: Option<BrainId>,
}

/// One brain endpoint as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrainAddress {
    Socket(SocketAddr),
    /// A host name, resolved when connecting.
    Host {
        name: String,
        port: u16,
    },
}

impl fmt::Display for BrainAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Socket(a) => write!(f, "{a}"),
            Self::Host { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl std::str::FromStr for BrainAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(a) = s.parse::<SocketAddr>() {
            if a.port() == 0 {
                return Err(format!("{s:?} has port 0"));
            }
            return Ok(Self::Socket(a));
        }
        let bad = || format!("{s:?} is not ip:port, [ipv6]:port or host:port");
        let (name, port) = s.rsplit_once(':').ok_or_else(bad)?;
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("{s:?} has port 0"));
        }
        if !is_host_name(name) {
            return Err(bad());
        }
        Ok(Self::Host {
            name: name.to_owned(),
            port,
        })
    }
}

/// A DNS host name: dot-separated labels of letters, digits and inner '-'.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Facts about the host that defaults are derived from; passed in so that
/// validation stays pure and testable.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub hostname: String,
    pub memory_mb: u64,
    pub disk_free_mb: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} has {} problem(s):\n  - {}", .problems.len(), .problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

fn parse_addr(
    what: &str,
    v: Option<&str>,
    default: &str,
    p: &mut Vec<String>,
) -> Option<SocketAddr> {
    let v = v.unwrap_or(default);
    if v.is_empty() || v == "off" {
        return None;
    }
    match v.parse() {
        Ok(a) => Some(a),
        Err(e) => {
            p.push(format!("{what} {v:?} is not an address:port ({e})"));
            None
        }
    }
}

fn check_abs(what: &str, v: &Path, p: &mut Vec<String>) {
    if !v.is_absolute() {
        p.push(format!("{what} {} must be an absolute path", v.display()));
    }
}

impl Config {
    pub fn load(path: &Path, host: &HostFacts) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, host).map_err(|problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and validates; returns every problem found.
    pub fn parse(text: &str, host: &HostFacts) -> Result<Config, Vec<String>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        let mut p = Vec::new();

        let cell_id =
            match CellId::new(raw.cell_id.clone().unwrap_or_else(|| host.hostname.clone())) {
                Ok(c) => Some(c),
                Err(e) => {
                    p.push(format!("cell_id: {e}"));
                    None
                }
            };
        let zone = match Zone::new(raw.zone.unwrap_or_else(|| "default".into())) {
            Ok(z) => Some(z),
            Err(e) => {
                p.push(format!("zone: {e}"));
                None
            }
        };
        let tags = parse_tags(raw.tags.unwrap_or_default(), &mut p);
        let data_dir = raw.data_dir.unwrap_or_else(|| "/var/lib/corral".into());
        check_abs("data_dir", &data_dir, &mut p);
        let run_dir = raw.run_dir.unwrap_or_else(|| "/run/corral".into());
        check_abs("run_dir", &run_dir, &mut p);
        let cgroup_root = raw.cgroup_root.unwrap_or_else(|| "corral".into());
        if corral_proto::InstanceId::new(cgroup_root.as_str()).is_err() {
            p.push(format!(
                "cgroup_root {cgroup_root:?} must be one path component of letters, digits, '.', '_' or '-'"
            ));
        }
        let stop_grace_secs = raw.stop_grace_secs.unwrap_or(10);
        if stop_grace_secs > 3600 {
            p.push(format!(
                "stop_grace_secs {stop_grace_secs} is more than an hour"
            ));
        }
        let log_level = raw.log_level.unwrap_or_else(|| "info".to_owned());
        if let Err(e) = check_log_directives(&log_level) {
            p.push(format!("log_level {log_level:?}: {e}"));
        }
        let log_json = match raw.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                p.push(format!("log_format {other:?} is not \"text\" or \"json\""));
                false
            }
        };
        let drain_on_stop = raw.shutdown.drain.unwrap_or(false);
        let drain_timeout_secs = raw.shutdown.drain_timeout_secs.unwrap_or(300);
        if !(1..=86_400).contains(&drain_timeout_secs) {
            p.push(format!(
                "shutdown.drain_timeout_secs {drain_timeout_secs} is outside 1..=86400"
            ));
        }
        if drain_on_stop && raw.brain.is_none() {
            p.push(
                "shutdown.drain needs a [brain]: without one nothing moves the instances away"
                    .to_owned(),
            );
        }
        let api_listen = parse_addr("api.listen", raw.api.listen.as_deref(), "off", &mut p);
        let api_token = match raw.api.token.map(ApiToken::new) {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                p.push(format!("api.token {e}"));
                None
            }
        };
        match api_listen {
            Some(addr) if !addr.ip().is_loopback() && api_token.is_none() => p.push(format!(
                "api.listen {addr} is not a loopback address and api.token is not set: \
                 anyone who reaches it could run containers on this cell; \
                 set api.token to a long random string or listen on 127.0.0.1"
            )),
            _ => {}
        }
        let api_socket = raw.api.socket.unwrap_or_else(|| run_dir.join("agent.sock"));
        check_abs("api.socket", &api_socket, &mut p);
        let metrics_listen = parse_addr(
            "metrics.listen",
            raw.metrics.listen.as_deref(),
            "127.0.0.1:9800",
            &mut p,
        );
        if api_listen.is_some() && api_listen == metrics_listen {
            p.push("api.listen and metrics.listen must differ".into());
        }

        if let Some(l) = &raw.disk.layers_dir {
            check_abs("disk.layers_dir", l, &mut p);
        }
        let layers_dir = raw
            .disk
            .layers_dir
            .unwrap_or_else(|| data_dir.join("layers"));
        let disk_enforce = raw.disk.enforce.unwrap_or(true);
        let subnet = match raw
            .network
            .subnet
            .as_deref()
            .map(str::parse::<crate::network::ipam::Subnet>)
        {
            None => None,
            Some(Ok(s)) => Some(s),
            Some(Err(e)) => {
                p.push(format!("network.subnet: {e}"));
                None
            }
        };
        let uplinks = raw.network.uplinks.unwrap_or_default();
        for u in &uplinks {
            if u.is_empty() || u.len() > 15 || u.contains(['/', ' ', '\0']) || u == "." || u == ".."
            {
                p.push(format!(
                    "network.uplinks: {u:?} is not an interface name (1 to 15 bytes, no '/' or spaces)"
                ));
            }
        }
        if !uplinks.is_empty() && (subnet.is_none() || raw.network.dataplane == Some(false)) {
            p.push("network.uplinks needs network.subnet and the data plane".to_owned());
        }
        let reserve = (host.memory_mb / 10).min(2048);
        let capacity = Capacity {
            memory_mb: raw
                .capacity
                .memory_mb
                .unwrap_or(host.memory_mb.saturating_sub(reserve)),
            disk_mb: raw.capacity.disk_mb.unwrap_or(host.disk_free_mb),
            containers: raw.capacity.max_containers.unwrap_or(250),
        };
        if capacity.memory_mb == 0 {
            p.push("capacity.memory_mb must be above 0".into());
        } else if capacity.memory_mb > host.memory_mb {
            p.push(format!(
                "capacity.memory_mb {} is more than the host's {} MB",
                capacity.memory_mb, host.memory_mb
            ));
        }
        if capacity.disk_mb == 0 {
            p.push("capacity.disk_mb must be above 0".into());
        }
        if !(1..=10_000).contains(&capacity.containers) {
            p.push(format!(
                "capacity.max_containers {} is outside 1..=10000",
                capacity.containers
            ));
        }
        let log_max_bytes = raw.logs.max_bytes.unwrap_or(10 << 20);
        if !(4096..=1 << 34).contains(&log_max_bytes) {
            p.push(format!(
                "logs.max_bytes {log_max_bytes} is outside 4096..=17179869184"
            ));
        }
        let log_keep = raw.logs.keep.unwrap_or(3);
        if log_keep > 100 {
            p.push(format!("logs.keep {log_keep} is more than 100"));
        }

        let brain = match (raw.brain, &cell_id) {
            (Some(b), Some(cell_id)) => parse_brain(b, cell_id, &mut p),
            _ => None,
        };

        match (cell_id, zone) {
            (Some(cell_id), Some(zone)) if p.is_empty() => Ok(Config {
                cell_id,
                zone,
                tags,
                data_dir,
                run_dir,
                cgroup_root,
                stop_grace_secs,
                log_level,
                log_json,
                drain_on_stop,
                drain_timeout_secs,
                api_listen,
                api_token,
                api_socket,
                metrics_listen,
                capacity,
                log_max_bytes,
                log_keep,
                layers_dir,
                disk_enforce,
                subnet,
                dataplane: raw.network.dataplane.unwrap_or(true),
                uplinks,
                brain,
            }),
            _ => Err(p),
        }
    }
}

fn parse_tags(raw: Vec<String>, p: &mut Vec<String>) -> BTreeSet<Tag> {
    let mut tags = BTreeSet::new();
    if raw.len() > MAX_TAGS {
        p.push(format!(
            "tags has {} entries, more than the {MAX_TAGS} allowed",
            raw.len()
        ));
    }
    for t in raw {
        match Tag::new(t.as_str()) {
            Ok(tag) => {
                if !tags.insert(tag) {
                    p.push(format!("tags lists {t:?} twice"));
                }
            }
            Err(e) => p.push(format!("tags: {e}")),
        }
    }
    tags
}

fn parse_brain(raw: RawBrain, cell_id: &CellId, p: &mut Vec<String>) -> Option<BrainConfig> {
    let before = p.len();
    let raw_addrs = raw.addresses.unwrap_or_default();
    if raw_addrs.is_empty() {
        p.push(
            "brain.addresses must list at least one brain address (ip:port or host:port)".into(),
        );
    }
    let mut addresses = Vec::new();
    for a in &raw_addrs {
        match a.parse::<BrainAddress>() {
            Ok(addr) if addresses.contains(&addr) => {
                p.push(format!("brain.addresses lists {addr} twice"));
            }
            Ok(addr) => addresses.push(addr),
            Err(e) => p.push(format!("brain.addresses: {e}")),
        }
    }
    let dir = Path::new(DEFAULT_CERTS_DIR);
    let stem = format!("cell-{cell_id}");
    let ca = raw.ca.unwrap_or_else(|| dir.join("ca.pem"));
    let cert = raw.cert.unwrap_or_else(|| dir.join(format!("{stem}.pem")));
    let key = raw
        .key
        .unwrap_or_else(|| dir.join(format!("{stem}-key.pem")));
    check_abs("brain.ca", &ca, p);
    check_abs("brain.cert", &cert, p);
    check_abs("brain.key", &key, p);
    let brain_id = match raw.brain_id.map(BrainId::new) {
        None => None,
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            p.push(format!("brain.brain_id: {e}"));
            None
        }
    };
    (p.len() == before).then_some(BrainConfig {
        addresses,
        ca,
        cert,
        key,
        brain_id,
    })
}

impl HostFacts {
    /// Reads the host name, RAM and free space of `data_dir` (or its nearest
    /// existing parent).
    pub fn probe(data_dir_hint: &Path) -> HostFacts {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "cell".into());
        let memory_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .unwrap_or(0);
        let mut dir = data_dir_hint.to_path_buf();
        while !dir.exists() {
            if !dir.pop() {
                break;
            }
        }
        let disk_free_mb = nix::sys::statvfs::statvfs(&dir)
            .map(|s| s.blocks_available() * s.fragment_size() / (1 << 20))
            .unwrap_or(0);
        HostFacts {
            hostname,
            memory_mb,
            disk_free_mb,
        }
    }
}

/// Checks `RUST_LOG`-style directives (`info`, `corral_agent=debug,warn`):
/// comma-separated, each a level, a target, or `target=level`. Span and
/// field filters (`target[span{field}]=level`) are not taken here.
fn check_log_directives(s: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |l: &str| LEVELS.contains(&l.to_ascii_lowercase().as_str());
    let is_target = |t: &str| {
        !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-' | '.'))
    };
    for d in s.split(',').map(str::trim) {
        let ok = match d.split_once('=') {
            None => is_level(d) || is_target(d),
            Some((target, level)) => is_target(target) && is_level(level),
        };
        if !ok {
            return Err(format!(
                "{d:?} is not LEVEL, TARGET or TARGET=LEVEL (levels: trace, debug, info, warn, error, off)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostFacts {
        HostFacts {
            hostname: "node-a".into(),
            memory_mb: 16_000,
            disk_free_mb: 50_000,
        }
    }

    #[test]
    fn empty_file_gets_documented_defaults() {
        let c = Config::parse("", &host()).unwrap();
        assert_eq!(c.cell_id.as_str(), "node-a");
        assert_eq!(c.data_dir, Path::new("/var/lib/corral"));
        assert_eq!(c.api_socket, Path::new("/run/corral/agent.sock"));
        assert_eq!(c.api_listen, None, "the TCP API is off by default");
        assert_eq!(c.api_token, None);
        assert_eq!(
            c.capacity,
            Capacity {
                memory_mb: 14_400,
                disk_mb: 50_000,
                containers: 250
            }
        );
        assert_eq!(c.stop_grace_secs, 10);
    }

    #[test]
    fn full_file_parses() {
        let c = Config::parse(
            r#"
            cell_id = "cell-1"
            zone = "z1"
            data_dir = "/d"
            run_dir = "/r"
            cgroup_root = "corral-test"
            stop_grace_secs = 2
            [api]
            listen = "off"
            socket = "/r/a.sock"
            [metrics]
            listen = "127.0.0.1:9999"
            [capacity]
            memory_mb = 1024
            disk_mb = 2048
            max_containers = 10
            [logs]
            max_bytes = 8192
            keep = 2
            "#,
            &host(),
        )
        .unwrap();
        assert_eq!(c.api_listen, None);
        assert_eq!(c.capacity.containers, 10);
        assert_eq!(c.log_keep, 2);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let problems = Config::parse(
            r#"
            cell_id = "bad/id"
            data_dir = "relative"
            cgroup_root = "../x"
            [api]
            listen = "nonsense"
            [capacity]
            memory_mb = 999999
            max_containers = 0
            "#,
            &host(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 6, "{problems:#?}");
    }

    #[test]
    fn the_tcp_api_beyond_loopback_needs_a_token() {
        let on = |listen: &str, token: Option<&str>| {
            let mut text = format!("[api]\nlisten = {listen:?}\n");
            if let Some(t) = token {
                text.push_str(&format!("token = {t:?}\n"));
            }
            Config::parse(&text, &host())
        };
        let c = on("127.0.0.1:7800", None).unwrap();
        assert_eq!(c.api_listen, Some("127.0.0.1:7800".parse().unwrap()));
        assert_eq!(c.api_token, None);
        on("[::1]:7800", None).unwrap();
        for addr in ["0.0.0.0:7800", "10.0.0.5:7800", "[::]:7800"] {
            let problems = on(addr, None).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(problems[0].contains("api.token"), "{problems:?}");
        }
        let c = on("0.0.0.0:7800", Some("0123456789abcdef-secret")).unwrap();
        let token = c.api_token.unwrap();
        assert!(token.matches(b"0123456789abcdef-secret"));
        assert!(!token.matches(b"0123456789abcdef-secreT"));
        assert!(!token.matches(b"0123456789abcdef-secre"));
        assert!(!token.matches(b""));
        assert_eq!(format!("{token:?}"), "ApiToken(<redacted>)");
        // A bad token is refused without being echoed.
        for bad in ["short", "has a space in it somewhere"] {
            let problems = on("127.0.0.1:7800", Some(bad)).unwrap_err();
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(!problems[0].contains(bad), "{problems:?}");
        }
    }

    #[test]
    fn the_shipped_config_parses_with_the_tcp_api_off() {
        let c = Config::parse(include_str!("../../dist/etc/agent.toml"), &host()).unwrap();
        assert_eq!((c.api_listen, c.api_token), (None, None));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let problems = Config::parse("[api]\nlisten_on = \"x\"\n", &host()).unwrap_err();
        assert!(
            problems[0].contains("unknown field `listen_on`"),
            "{problems:?}"
        );
    }

    #[test]
    fn log_level_and_format() {
        let c = Config::parse(
            "log_level = \"corral_agent=debug,info\"\nlog_format = \"json\"\n",
            &host(),
        )
        .unwrap();
        assert_eq!(c.log_level, "corral_agent=debug,info");
        assert!(c.log_json);
        let problems =
            Config::parse("log_level = \"=[\"\nlog_format = \"xml\"\n", &host()).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        for good in [
            "info",
            "corral_agent=debug,info",
            "corral_agent::shim=TRACE",
            "warn, hyper=off",
        ] {
            assert!(check_log_directives(good).is_ok(), "{good}");
        }
        for bad in ["", "info,", "a=b=c", "x=loud", "a[span]=info", "a b"] {
            assert!(check_log_directives(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_drain_on_stop_needs_a_brain_and_a_sane_timeout() {
        let c = Config::parse("", &host()).unwrap();
        assert!(!c.drain_on_stop);
        assert_eq!(c.drain_timeout_secs, 300);
        let problems = Config::parse(
            "[shutdown]\ndrain = true\ndrain_timeout_secs = 0\n",
            &host(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        let c = Config::parse(
            "[shutdown]\ndrain = true\n[brain]\naddresses = [\"10.0.0.1:7901\"]\n",
            &host(),
        )
        .unwrap();
        assert!(c.drain_on_stop);
    }

    #[test]
    fn uplinks_are_interface_names_and_need_the_data_plane() {
        let c = Config::parse(
            "[network]\nsubnet = \"10.244.1.0/24\"\nuplinks = [\"eth0\", \"bond0\"]\n",
            &host(),
        )
        .unwrap();
        assert_eq!(c.uplinks, ["eth0", "bond0"]);
        let problems = Config::parse(
            "[network]\nuplinks = [\"a/b\", \"\", \"much-too-long-name\"]\n",
            &host(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("needs network.subnet")));
    }

    #[test]
    fn zone_and_tags() {
        let c = Config::parse("zone = \"rack-1\"\ntags = [\"ssd\", \"gpu\"]\n", &host()).unwrap();
        assert_eq!(c.zone.as_str(), "rack-1");
        let tags: Vec<&str> = c.tags.iter().map(Tag::as_str).collect();
        assert_eq!(tags, ["gpu", "ssd"]);
        assert!(c.brain.is_none());
        let problems = Config::parse("zone = \"a b\"\ntags = [\"ssd\", \"ssd\", \"\"]\n", &host())
            .unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(problems.iter().any(|p| p.contains("twice")), "{problems:?}");
    }

    #[test]
    fn brain_table_gets_certificate_defaults() {
        let c = Config::parse(
            "cell_id = \"c1\"\n[brain]\naddresses = [\"10.0.0.1:7900\", \"[::1]:7900\", \"brain-1.example:7900\"]\n",
            &host(),
        )
        .unwrap();
        let b = c.brain.unwrap();
        assert_eq!(
            b.addresses,
            [
                BrainAddress::Socket("10.0.0.1:7900".parse().unwrap()),
                BrainAddress::Socket("[::1]:7900".parse().unwrap()),
                BrainAddress::Host {
                    name: "brain-1.example".into(),
                    port: 7900
                },
            ]
        );
        assert_eq!(b.ca, Path::new("/etc/corral/certs/ca.pem"));
        assert_eq!(b.cert, Path::new("/etc/corral/certs/cell-c1.pem"));
        assert_eq!(b.key, Path::new("/etc/corral/certs/cell-c1-key.pem"));
        assert_eq!(b.brain_id, None);
        assert_eq!(b.addresses[2].to_string(), "brain-1.example:7900");
    }

    #[test]
    fn brain_table_reports_every_problem() {
        let problems = Config::parse(
            r#"
            [brain]
            addresses = ["10.0.0.1", "10.0.0.1:0", "x:y", "-bad-:1", "10.0.0.2:1", "10.0.0.2:1"]
            ca = "relative.pem"
            brain_id = "no/slash"
            "#,
            &host(),
        )
        .unwrap_err();
        assert_eq!(problems.len(), 7, "{problems:#?}");
        let empty = Config::parse("[brain]\n", &host()).unwrap_err();
        assert!(empty[0].contains("at least one"), "{empty:?}");
        let unknown = Config::parse("[brain]\naddress = \"x:1\"\n", &host()).unwrap_err();
        assert!(
            unknown[0].contains("unknown field `address`"),
            "{unknown:?}"
        );
    }
}
