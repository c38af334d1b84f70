//! The instance API: what a client asks a cell to run ([`InstanceSpec`]),
//! its validation, and the lifecycle state machine ([`Status`]).

use crate::ids::{AppId, InstanceId, TenantId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Bounds on resource requests; anything outside is refused as absurd.
pub const MIN_MEMORY_MB: u64 = 4;
pub const MAX_MEMORY_MB: u64 = 1 << 20;
pub const MAX_DISK_MB: u64 = 1 << 24;
pub const MAX_CPU_WEIGHT: u32 = 10_000;
pub const MAX_PIDS: u32 = 1 << 20;
pub const MAX_PORTS: usize = 64;
pub const MAX_ARGS: usize = 4096;
pub const MAX_ENV: usize = 4096;
pub const MAX_INDEX: u32 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    /// A long-running process: any exit of its own is a crash.
    Lrp,
    /// A one-off task: runs to completion and keeps its exit code.
    Task,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit in MiB (memory + swap); the container is OOM-killed above it.
    pub memory_mb: u64,
    /// Size of the instance's writable layer in MiB. Default 1024.
    #[serde(default = "default_disk_mb")]
    pub disk_mb: u64,
    /// Relative CPU weight, 1..=10000 (cgroup v2 `cpu.weight` scale). Default 100.
    #[serde(default = "default_cpu_weight")]
    pub cpu_weight: u32,
    /// Maximum number of processes/threads. Default 1024.
    #[serde(default = "default_max_pids")]
    pub max_pids: u32,
}

fn default_disk_mb() -> u64 {
    1024
}
fn default_cpu_weight() -> u32 {
    100
}
fn default_max_pids() -> u32 {
    1024
}

/// What a client asks a cell to run. Unknown fields are refused so that a
/// typo never silently changes the meaning of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub tenant: TenantId,
    pub app: AppId,
    #[serde(default)]
    pub index: u32,
    pub kind: InstanceKind,
    /// Absolute path of a root filesystem directory on the cell, used read-only.
    pub rootfs: String,
    #[serde(deserialize_with = "crate::wire::serde_util::capped_vec")]
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub resources: Resources,
    #[serde(default, deserialize_with = "crate::wire::serde_util::capped_vec")]
    pub ports: Vec<u16>,
    /// What makes the instance ready for traffic; absent: running is ready.
    #[serde(default)]
    pub health_check: Option<crate::health::HealthCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid instance spec: {}", .problems.join("; "))]
pub struct SpecError {
    pub problems: Vec<String>,
}

impl InstanceSpec {
    /// Checks everything that can be checked without touching the cell and
    /// reports every problem at once.
    pub fn validate(&self) -> Result<(), SpecError> {
        let mut p = Vec::new();
        if self.index > MAX_INDEX {
            p.push(format!("index {} is above {MAX_INDEX}", self.index));
        }
        check_rootfs(&self.rootfs, &mut p);
        if self.command.is_empty() || self.command[0].is_empty() {
            p.push("command must name a program".into());
        }
        if self.command.len() > MAX_ARGS {
            p.push(format!(
                "command has {} arguments, more than {MAX_ARGS}",
                self.command.len()
            ));
        }
        if self.command.iter().any(|a| a.contains('\0')) {
            p.push("command arguments must not contain NUL bytes".into());
        }
        if self.env.len() > MAX_ENV {
            p.push(format!(
                "env has {} entries, more than {MAX_ENV}",
                self.env.len()
            ));
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                p.push(format!(
                    "env name {k:?} must be non-empty without '=' or NUL"
                ));
            }
            if v.contains('\0') {
                p.push(format!("env value of {k:?} must not contain NUL"));
            }
        }
        let r = &self.resources;
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&r.memory_mb) {
            p.push(format!(
                "resources.memory_mb {} is outside {MIN_MEMORY_MB}..={MAX_MEMORY_MB}",
                r.memory_mb
            ));
        }
        if !(1..=MAX_DISK_MB).contains(&r.disk_mb) {
            p.push(format!(
                "resources.disk_mb {} is outside 1..={MAX_DISK_MB}",
                r.disk_mb
            ));
        }
        if !(1..=MAX_CPU_WEIGHT).contains(&r.cpu_weight) {
            p.push(format!(
                "resources.cpu_weight {} is outside 1..={MAX_CPU_WEIGHT}",
                r.cpu_weight
            ));
        }
        if !(1..=MAX_PIDS).contains(&r.max_pids) {
            p.push(format!(
                "resources.max_pids {} is outside 1..={MAX_PIDS}",
                r.max_pids
            ));
        }
        if self.ports.len() > MAX_PORTS {
            p.push(format!("{} ports, more than {MAX_PORTS}", self.ports.len()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for port in &self.ports {
            if *port == 0 {
                p.push("port 0 is not a port".into());
            } else if !seen.insert(port) {
                p.push(format!("port {port} is listed twice"));
            }
        }
        if let Some(c) = &self.health_check {
            c.check(&mut p);
        }
        if p.is_empty() {
            Ok(())
        } else {
            Err(SpecError { problems: p })
        }
    }
}

fn check_rootfs(rootfs: &str, p: &mut Vec<String>) {
    let path = Path::new(rootfs);
    if rootfs.contains('\0') {
        p.push("rootfs must not contain NUL".into());
    } else if !path.is_absolute() {
        p.push(format!("rootfs {rootfs:?} must be an absolute path"));
    } else if rootfs.split('/').any(|c| c == "." || c == "..") {
        p.push(format!("rootfs {rootfs:?} must not contain '.' or '..'"));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Starting,
    Running,
    /// Ended on its own (a task), or was stopped on request.
    Exited,
    /// Failed to start, was OOM-killed, died of a signal, or an LRP exited.
    Crashed,
    Stopping,
}

impl InstanceState {
    pub const ALL: [InstanceState; 5] = [
        Self::Starting,
        Self::Running,
        Self::Exited,
        Self::Crashed,
        Self::Stopping,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Exited => "exited",
            Self::Crashed => "crashed",
            Self::Stopping => "stopping",
        }
    }

    /// Whether the instance has ended and holds no container any more.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Exited | Self::Crashed)
    }
}

/// Something that happened to an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Started {
        pid: u32,
        at: Timestamp,
    },
    StartFailed {
        reason: String,
        at: Timestamp,
    },
    StopRequested,
    /// The container's init ended. `code` is set for a normal exit, `signal`
    /// when it was killed by one.
    Exited {
        code: Option<i32>,
        signal: Option<i32>,
        oom_killed: bool,
        at: Timestamp,
    },
    /// The instance vanished without a recorded exit (e.g. the node rebooted).
    Lost {
        reason: String,
        at: Timestamp,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event {event} is not valid in state {state}")]
pub struct TransitionError {
    pub state: &'static str,
    pub event: &'static str,
}

/// The lifecycle of one instance. Only [`Status::apply`] changes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub reason: Option<String>,
    /// Ended by [`Event::Lost`]: the agent lost track of the instance (its
    /// start was interrupted, its shim died, the node restarted), which is
    /// not the workload's doing.
    #[serde(default)]
    pub lost: bool,
}

impl Default for Status {
    fn default() -> Self {
        Self::new()
    }
}

impl Status {
    pub fn new() -> Self {
        Self {
            state: InstanceState::Starting,
            pid: None,
            exit_code: None,
            signal: None,
            oom_killed: false,
            started_at: None,
            finished_at: None,
            reason: None,
            lost: false,
        }
    }

    pub fn apply(&mut self, kind: InstanceKind, event: Event) -> Result<(), TransitionError> {
        use InstanceState as S;
        let refuse = |state: S, event: &Event| TransitionError {
            state: state.as_str(),
            event: match event {
                Event::Started { .. } => "started",
                Event::StartFailed { .. } => "start-failed",
                Event::StopRequested => "stop-requested",
                Event::Exited { .. } => "exited",
                Event::Lost { .. } => "lost",
            },
        };
        match (self.state, event) {
            (S::Starting, Event::Started { pid, at }) => {
                self.state = S::Running;
                self.pid = Some(pid);
                self.started_at = Some(at);
            }
            (S::Starting, Event::StartFailed { reason, at }) => {
                self.state = S::Crashed;
                self.finished_at = Some(at);
                self.reason = Some(reason);
                self.lost = true;
            }
            (S::Starting | S::Running, Event::StopRequested) => self.state = S::Stopping,
            (S::Stopping, Event::StopRequested) => {}
            (
                S::Starting | S::Running | S::Stopping,
                Event::Exited {
                    code,
                    signal,
                    oom_killed,
                    at,
                },
            ) => {
                let stopping = self.state == S::Stopping;
                self.exit_code = code;
                self.signal = signal;
                self.oom_killed = oom_killed;
                self.finished_at = Some(at);
                let how = match (code, signal) {
                    (_, Some(sig)) => format!("killed by signal {sig}"),
                    (Some(c), None) => format!("exited with code {c}"),
                    (None, None) => "ended".to_owned(),
                };
                (self.state, self.reason) = if oom_killed {
                    (S::Crashed, Some(format!("out of memory: {how}")))
                } else if stopping {
                    (S::Exited, Some(format!("stopped on request: {how}")))
                } else {
                    match kind {
                        InstanceKind::Task if signal.is_none() => (S::Exited, Some(how)),
                        InstanceKind::Task => (S::Crashed, Some(how)),
                        InstanceKind::Lrp => {
                            (S::Crashed, Some(format!("long-running process {how}")))
                        }
                    }
                };
            }
            (S::Starting | S::Running | S::Stopping, Event::Lost { reason, at }) => {
                self.state = S::Crashed;
                self.finished_at = Some(at);
                self.reason = Some(reason);
                self.lost = true;
            }
            (state, event) => return Err(refuse(state, &event)),
        }
        Ok(())
    }
}

/// An instance as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: InstanceId,
    pub tenant: TenantId,
    pub app: AppId,
    pub index: u32,
    pub kind: InstanceKind,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    pub started_at: Option<Timestamp>,
    pub finished_at: Option<Timestamp>,
    pub reason: Option<String>,
    pub resources: Resources,
    #[serde(deserialize_with = "crate::wire::serde_util::capped_vec")]
    pub ports: Vec<u16>,
    /// The instance's IPv4 address on the cell network, once wired up.
    #[serde(default)]
    pub address: Option<std::net::Ipv4Addr>,
    /// Running and passing its readiness check (its TCP ports accept
    /// connections): only ready instances receive load-balanced traffic.
    #[serde(default)]
    pub ready: bool,
    /// Crashed because the agent lost track of it (see [`Status::lost`]),
    /// not by the workload's doing: the brain restarts it without counting
    /// a crash against its slot.
    #[serde(default)]
    pub lost: bool,
}

impl InstanceInfo {
    pub fn new(id: &InstanceId, spec: &InstanceSpec, status: &Status) -> Self {
        Self {
            id: id.clone(),
            tenant: spec.tenant.clone(),
            app: spec.app.clone(),
            index: spec.index,
            kind: spec.kind,
            state: status.state,
            pid: status.pid,
            exit_code: status.exit_code,
            signal: status.signal,
            oom_killed: status.oom_killed,
            started_at: status.started_at,
            finished_at: status.finished_at,
            reason: status.reason.clone(),
            resources: spec.resources.clone(),
            ports: spec.ports.clone(),
            address: None,
            ready: false,
            lost: status.lost,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> InstanceSpec {
        serde_json::from_str(
            r#"{"tenant":"acme","app":"web","index":0,"kind":"lrp","rootfs":"/srv/rootfs",
                "command":["/bin/sleep","100"],"env":{"A":"1"},
                "resources":{"memory_mb":64,"disk_mb":100,"cpu_weight":100,"max_pids":32},
                "ports":[8080]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_good_spec_passes_and_defaults_apply() {
        spec().validate().unwrap();
        let s: InstanceSpec = serde_json::from_str(
            r#"{"tenant":"a","app":"b","kind":"task","rootfs":"/r","command":["x"],"resources":{"memory_mb":8}}"#,
        )
        .unwrap();
        s.validate().unwrap();
        assert_eq!(s.resources.cpu_weight, 100);
        assert_eq!(s.resources.max_pids, 1024);
    }

    #[test]
    fn unknown_fields_and_bad_ids_are_refused() {
        let mut v: serde_json::Value = serde_json::to_value(spec()).unwrap();
        v["colour"] = "blue".into();
        let err = serde_json::from_value::<InstanceSpec>(v)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `colour`"), "{err}");
        let mut v: serde_json::Value = serde_json::to_value(spec()).unwrap();
        v["tenant"] = "../x".into();
        assert!(serde_json::from_value::<InstanceSpec>(v).is_err());
        let mut v: serde_json::Value = serde_json::to_value(spec()).unwrap();
        v["resources"]["memory_gb"] = 1.into();
        assert!(serde_json::from_value::<InstanceSpec>(v).is_err());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = spec();
        s.rootfs = "relative/path".into();
        s.command = vec![];
        s.resources.memory_mb = 0;
        s.resources.cpu_weight = 0;
        s.resources.max_pids = u32::MAX;
        s.resources.disk_mb = 0;
        s.ports = vec![80, 80, 0];
        s.env.insert("A=B".into(), "x".into());
        let e = s.validate().unwrap_err();
        assert_eq!(e.problems.len(), 9, "{e}");
    }

    #[test]
    fn rootfs_must_be_clean_absolute() {
        for bad in ["/a/../etc", "rel", "/a/./b", ""] {
            let mut s = spec();
            s.rootfs = bad.into();
            assert!(s.validate().is_err(), "{bad}");
        }
    }

    fn at(n: u64) -> Timestamp {
        Timestamp(n)
    }

    #[test]
    fn lrp_lifecycle() {
        let mut st = Status::new();
        st.apply(InstanceKind::Lrp, Event::Started { pid: 42, at: at(1) })
            .unwrap();
        assert_eq!((st.state, st.pid), (InstanceState::Running, Some(42)));
        st.apply(
            InstanceKind::Lrp,
            Event::Exited {
                code: Some(0),
                signal: None,
                oom_killed: false,
                at: at(2),
            },
        )
        .unwrap();
        assert_eq!(
            st.state,
            InstanceState::Crashed,
            "an LRP that exits has crashed"
        );
        assert!(st
            .apply(InstanceKind::Lrp, Event::Started { pid: 1, at: at(3) })
            .is_err());
    }

    #[test]
    fn task_exit_codes_and_signals() {
        let mut st = Status::new();
        st.apply(InstanceKind::Task, Event::Started { pid: 1, at: at(1) })
            .unwrap();
        st.apply(
            InstanceKind::Task,
            Event::Exited {
                code: Some(3),
                signal: None,
                oom_killed: false,
                at: at(2),
            },
        )
        .unwrap();
        assert_eq!((st.state, st.exit_code), (InstanceState::Exited, Some(3)));
        assert_eq!(st.reason.as_deref(), Some("exited with code 3"));

        let mut st = Status::new();
        st.apply(InstanceKind::Task, Event::Started { pid: 1, at: at(1) })
            .unwrap();
        st.apply(
            InstanceKind::Task,
            Event::Exited {
                code: None,
                signal: Some(9),
                oom_killed: true,
                at: at(2),
            },
        )
        .unwrap();
        assert_eq!(st.state, InstanceState::Crashed);
        assert!(st.oom_killed);
        assert!(st.reason.unwrap().starts_with("out of memory"));
    }

    #[test]
    fn stop_then_exit_is_not_a_crash_and_start_failure_is() {
        let mut st = Status::new();
        st.apply(InstanceKind::Lrp, Event::Started { pid: 1, at: at(1) })
            .unwrap();
        st.apply(InstanceKind::Lrp, Event::StopRequested).unwrap();
        st.apply(InstanceKind::Lrp, Event::StopRequested).unwrap();
        st.apply(
            InstanceKind::Lrp,
            Event::Exited {
                code: None,
                signal: Some(15),
                oom_killed: false,
                at: at(2),
            },
        )
        .unwrap();
        assert_eq!(st.state, InstanceState::Exited);

        let mut st = Status::new();
        st.apply(
            InstanceKind::Lrp,
            Event::StartFailed {
                reason: "no such file".into(),
                at: at(1),
            },
        )
        .unwrap();
        assert_eq!(st.state, InstanceState::Crashed);
        assert!(st.apply(InstanceKind::Lrp, Event::StopRequested).is_err());
    }
}
