//! Readiness checks of an instance: what decides that it may receive
//! load-balanced traffic. Validated here; carried out by the agent.
//!
//! JSON: `{"type": "tcp", "port": 8080}`, `{"type": "http", "port": 8080,
//! "path": "/healthz", "status": 200}` or `{"type": "process"}`, with
//! optional `interval_ms` (default 1000), `timeout_ms` (default 1000) and
//! `failure_threshold` (default 3: consecutive failures before a ready
//! instance is taken out). One success makes an instance ready.

use serde::{Deserialize, Serialize};

pub const MIN_INTERVAL_MS: u32 = 100;
pub const MAX_INTERVAL_MS: u32 = 600_000;
pub const MAX_FAILURE_THRESHOLD: u32 = 100;
pub const MAX_PATH_LEN: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// Ready while the process runs.
    Process,
    /// Ready while `port` accepts TCP connections.
    Tcp,
    /// Ready while `GET path` on `port` answers `status`.
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type")]
    pub kind: CheckKind,
    #[serde(default)]
    pub port: u16,
    #[serde(default = "root")]
    pub path: String,
    #[serde(default = "ok")]
    pub status: u16,
    #[serde(default = "second")]
    pub interval_ms: u32,
    #[serde(default = "second")]
    pub timeout_ms: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
}

fn root() -> String {
    "/".to_owned()
}
fn ok() -> u16 {
    200
}
fn second() -> u32 {
    1000
}
fn three() -> u32 {
    3
}

impl HealthCheck {
    /// A TCP check of `port` with the default timings.
    pub fn tcp(port: u16) -> Self {
        Self {
            kind: CheckKind::Tcp,
            port,
            path: root(),
            status: ok(),
            interval_ms: second(),
            timeout_ms: second(),
            failure_threshold: three(),
        }
    }

    /// Every problem, appended to `p`.
    pub fn check(&self, p: &mut Vec<String>) {
        let net = matches!(self.kind, CheckKind::Tcp | CheckKind::Http);
        if net && self.port == 0 {
            p.push("health_check.port is required for tcp and http checks".into());
        }
        if self.kind == CheckKind::Http {
            if !self.path.starts_with('/') || self.path.len() > MAX_PATH_LEN {
                p.push(format!(
                    "health_check.path {:?} must start with '/' and be at most {MAX_PATH_LEN} bytes",
                    self.path
                ));
            }
            if self.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                p.push("health_check.path must not contain spaces or control characters".into());
            }
            if !(100..=599).contains(&self.status) {
                p.push(format!(
                    "health_check.status {} is not an HTTP status",
                    self.status
                ));
            }
        }
        for (name, v) in [
            ("interval_ms", self.interval_ms),
            ("timeout_ms", self.timeout_ms),
        ] {
            if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&v) {
                p.push(format!(
                    "health_check.{name} {v} is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS}"
                ));
            }
        }
        if !(1..=MAX_FAILURE_THRESHOLD).contains(&self.failure_threshold) {
            p.push(format!(
                "health_check.failure_threshold {} is outside 1..={MAX_FAILURE_THRESHOLD}",
                self.failure_threshold
            ));
        }
    }
}

/// What a run of check results means: one success makes an instance ready,
/// `failure_threshold` consecutive failures make it not ready. Pure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Readiness {
    pub ready: bool,
    failures: u32,
}

impl Readiness {
    /// Records one result; returns whether readiness changed.
    pub fn record(&mut self, passed: bool, failure_threshold: u32) -> bool {
        let before = self.ready;
        if passed {
            self.failures = 0;
            self.ready = true;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= failure_threshold.max(1) {
                self.ready = false;
            }
        }
        before != self.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_read_with_defaults_and_bad_ones_list_every_problem() {
        let c: HealthCheck = serde_json::from_str(r#"{"type": "tcp", "port": 8080}"#).unwrap();
        assert_eq!(c, HealthCheck::tcp(8080));
        let mut p = Vec::new();
        c.check(&mut p);
        assert!(p.is_empty(), "{p:?}");
        let bad: HealthCheck = serde_json::from_str(
            r#"{"type": "http", "path": "x y", "status": 42, "interval_ms": 1, "failure_threshold": 0}"#,
        )
        .unwrap();
        bad.check(&mut p);
        assert_eq!(p.len(), 6, "{p:?}");
        assert!(serde_json::from_str::<HealthCheck>(r#"{"type": "tcp", "prot": 1}"#).is_err());
        assert!(serde_json::from_str::<HealthCheck>(r#"{"type": "exec"}"#).is_err());
    }

    #[test]
    fn one_success_makes_ready_and_the_threshold_of_failures_unready() {
        let mut r = Readiness::default();
        assert!(!r.record(false, 3));
        assert!(r.record(true, 3));
        assert!(r.ready);
        assert!(!r.record(false, 3));
        assert!(!r.record(false, 3));
        assert!(r.ready, "two failures of three keep it ready");
        assert!(!r.record(true, 3));
        assert!(!r.record(false, 3) && !r.record(false, 3));
        assert!(r.record(false, 3));
        assert!(!r.ready);
    }
}
