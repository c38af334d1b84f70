//! Readiness checks of an instance: what decides that it may receive
//! load-balanced traffic. Validated here; carried out by the agent.
//!
//! JSON: `{"type": "tcp", "port": 8080}`, `{"type": "http", "port": 8080,
//! "path": "/healthz", "status": 200}` or `{"type": "process"}`, with
//! optional `interval_ms` (default 1000), `timeout_ms` (default 1000),
//! `failure_threshold` (default 3) and `start_timeout_ms` (default 60000).
//!
//! Like Cloud Foundry's, one check serves both purposes: one success makes
//! an instance ready (it receives load-balanced traffic); once it has been
//! ready, `failure_threshold` consecutive failures take it out of the load
//! balancers *and* kill it, so it goes down the crash path (crash count,
//! restart with backoff); an instance whose check has not passed within
//! `start_timeout_ms` of its start is killed the same way (0: no limit).

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
    #[serde(default = "minute")]
    pub start_timeout_ms: u32,
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
fn minute() -> u32 {
    60_000
}

pub const MAX_START_TIMEOUT_MS: u32 = 3_600_000;

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
            start_timeout_ms: minute(),
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
        if self.start_timeout_ms > MAX_START_TIMEOUT_MS {
            p.push(format!(
                "health_check.start_timeout_ms {} is above {MAX_START_TIMEOUT_MS}",
                self.start_timeout_ms
            ));
        }
        if !(1..=MAX_FAILURE_THRESHOLD).contains(&self.failure_threshold) {
            p.push(format!(
                "health_check.failure_threshold {} is outside 1..={MAX_FAILURE_THRESHOLD}",
                self.failure_threshold
            ));
        }
    }
}

/// What one check result changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    None,
    /// It became ready, or stopped being ready.
    Readiness,
    /// It must be killed (and so crash), for this reason; it is not ready.
    Kill(String),
}

/// What a run of check results means (see the module docs). Pure: time
/// is how long the instance has been running, given by the caller.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Readiness {
    pub ready: bool,
    failures: u32,
    /// Whether it ever passed.
    passed_once: bool,
    /// Why it was condemned; it is never condemned twice.
    pub killed: Option<String>,
}

impl Readiness {
    /// Records one result of `check`, `running_ms` after the start.
    pub fn record(&mut self, passed: bool, check: &HealthCheck, running_ms: u64) -> Change {
        if self.killed.is_some() {
            return Change::None;
        }
        let before = self.ready;
        let kill = if passed {
            self.failures = 0;
            self.ready = true;
            self.passed_once = true;
            None
        } else {
            self.failures = self.failures.saturating_add(1);
            let n = self.failures;
            let limit = check.start_timeout_ms;
            if self.passed_once && n >= check.failure_threshold.max(1) {
                Some(format!("health check failed {n} times in a row"))
            } else if !self.passed_once && limit > 0 && running_ms >= u64::from(limit) {
                Some(format!(
                    "health check did not pass within {limit} ms of the start"
                ))
            } else {
                None
            }
        };
        if let Some(why) = kill {
            self.ready = false;
            self.killed = Some(why.clone());
            return Change::Kill(why);
        }
        if before != self.ready {
            Change::Readiness
        } else {
            Change::None
        }
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
    fn one_success_makes_ready_and_the_threshold_of_failures_kills() {
        let c = HealthCheck::tcp(80);
        let mut r = Readiness::default();
        assert_eq!(r.record(false, &c, 10), Change::None);
        assert_eq!(r.record(true, &c, 20), Change::Readiness);
        assert!(r.ready);
        assert_eq!(r.record(false, &c, 30), Change::None);
        assert_eq!(r.record(false, &c, 40), Change::None);
        assert!(r.ready, "two failures of three keep it ready");
        assert_eq!(r.record(true, &c, 50), Change::None);
        r.record(false, &c, 60);
        r.record(false, &c, 70);
        assert_eq!(
            r.record(false, &c, 80),
            Change::Kill("health check failed 3 times in a row".into())
        );
        assert!(!r.ready);
        assert_eq!(r.record(false, &c, 90), Change::None, "condemned once");
        assert_eq!(r.record(true, &c, 100), Change::None, "and for good");
    }

    #[test]
    fn a_check_that_never_passes_kills_after_the_start_timeout() {
        let mut c = HealthCheck::tcp(80);
        c.start_timeout_ms = 1000;
        let mut r = Readiness::default();
        for t in [0, 300, 600, 900] {
            assert_eq!(r.record(false, &c, t), Change::None, "at {t} ms");
        }
        assert!(matches!(r.record(false, &c, 1000), Change::Kill(why) if why.contains("1000 ms")));
        c.start_timeout_ms = 0;
        let mut r = Readiness::default();
        assert_eq!(r.record(false, &c, u64::MAX), Change::None, "no limit");
    }
}
