//! `WatchdogSec=`: keep-alives that mean "healthy", not "still running".
//!
//! Every half watchdog period the daemon runs a health check of its own
//! runtime (its API answers, its tables are not stuck, its data plane is
//! reachable...). `WATCHDOG=1` is sent only when the check passes within
//! its deadline; otherwise the status says why and the keep-alives stop,
//! so systemd restarts the daemon once the period runs out, as if it had
//! hung. A daemon that recovers before that resumes the keep-alives.
//!
//! [`Watchdog`] and [`Progress`] are pure; [`run`] carries them out.

use crate::notify::{Notifier, State};
use std::future::Future;
use std::time::{Duration, Instant};

/// A health check's outcome: `Err` says what is wrong, for the status line
/// and the log.
pub type Check = Result<(), String>;

/// How often keep-alives are due: half the timeout, as `sd_watchdog_enabled(3)`
/// recommends, so one late check does not cost a restart.
pub fn ping_period(timeout: Duration) -> Duration {
    timeout / 2
}

/// How long one health check may take: half a ping period, so the
/// keep-alive after a slow but passing check still arrives within the
/// timeout (at most 1.5 periods after the previous one).
pub fn check_deadline(timeout: Duration) -> Duration {
    ping_period(timeout) / 2
}

/// What to do after a health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Send these (empty: nothing).
    pub send: Vec<State>,
    /// The health changed: log this (`Ok`: recovered, `Err`: the reason).
    pub changed: Option<Check>,
}

/// The keep-alive decisions: a ping after every passing check, a status on
/// every change of health (or of the reason for being unhealthy).
#[derive(Debug, Default)]
pub struct Watchdog {
    last: Option<Check>,
}

impl Watchdog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, check: Check) -> Decision {
        let changed = self.last.as_ref() != Some(&check);
        let was_unhealthy = matches!(self.last, Some(Err(_)));
        let mut send = Vec::new();
        match &check {
            Ok(()) => {
                send.push(State::Watchdog);
                if was_unhealthy {
                    send.push(State::Status("healthy again".into()));
                }
            }
            Err(reason) if changed => send.push(State::Status(format!("unhealthy: {reason}"))),
            Err(_) => {}
        }
        // The first passing check is the normal case, not news.
        let news = changed && (was_unhealthy || check.is_err());
        self.last = Some(check.clone());
        Decision {
            send,
            changed: news.then_some(check),
        }
    }
}

/// A counter that must keep moving: healthy while it has changed within
/// `stall` (for example a loop's pass counter that a periodic sweep
/// increments even when idle).
#[derive(Debug)]
pub struct Progress {
    what: &'static str,
    stall: Duration,
    last: Option<(u64, Instant)>,
}

impl Progress {
    pub fn new(what: &'static str, stall: Duration) -> Self {
        Self {
            what,
            stall,
            last: None,
        }
    }

    /// The counter read `value` at `now`.
    pub fn observe(&mut self, value: u64, now: Instant) -> Check {
        match self.last {
            Some((v, since)) if v == value => {
                let idle = now.saturating_duration_since(since);
                if idle > self.stall {
                    return Err(format!(
                        "{} has not advanced for {}s (stuck at {value})",
                        self.what,
                        idle.as_secs()
                    ));
                }
            }
            _ => self.last = Some((value, now)),
        }
        Ok(())
    }
}

/// Sends keep-alives for as long as it runs, every [`ping_period`], each
/// after `check` passed within [`check_deadline`]. Returns at once when
/// systemd expects no keep-alives.
pub async fn run<F, Fut>(notifier: Notifier, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Check>,
{
    let Some(timeout) = notifier.watchdog_timeout() else {
        return;
    };
    let deadline = check_deadline(timeout);
    let mut tick = tokio::time::interval(ping_period(timeout));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut watchdog = Watchdog::new();
    tracing::info!(
        ?timeout,
        "systemd watchdog: keep-alives follow the health check"
    );
    loop {
        tick.tick().await;
        let outcome = match tokio::time::timeout(deadline, check()).await {
            Ok(c) => c,
            Err(_) => Err(format!(
                "the health check did not answer within {deadline:?}"
            )),
        };
        let d = watchdog.observe(outcome);
        match d.changed {
            Some(Ok(())) => tracing::info!("healthy again: systemd watchdog keep-alives resume"),
            Some(Err(reason)) => tracing::error!(
                "unhealthy: {reason}; systemd watchdog keep-alives stop (restart in {timeout:?} unless it recovers)"
            ),
            None => {}
        }
        if !d.send.is_empty() {
            notifier.send(&d.send);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::notify::Address;
    use std::os::unix::net::UnixDatagram;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn periods() {
        assert_eq!(
            ping_period(Duration::from_secs(30)),
            Duration::from_secs(15)
        );
        assert_eq!(
            check_deadline(Duration::from_secs(30)),
            Duration::from_millis(7500)
        );
    }

    #[test]
    fn pings_only_while_healthy_and_reports_changes() {
        let mut w = Watchdog::new();
        let d = w.observe(Ok(()));
        assert_eq!(d.send, vec![State::Watchdog]);
        assert_eq!(d.changed, None);
        assert_eq!(w.observe(Ok(())).send, vec![State::Watchdog]);

        let d = w.observe(Err("api: connection refused".into()));
        assert_eq!(
            d.send,
            vec![State::Status("unhealthy: api: connection refused".into())]
        );
        assert_eq!(d.changed, Some(Err("api: connection refused".into())));
        // Still unhealthy, same reason: nothing at all.
        let d = w.observe(Err("api: connection refused".into()));
        assert!(d.send.is_empty() && d.changed.is_none());
        // Another reason: a new status, still no keep-alive.
        let d = w.observe(Err("data plane: map gone".into()));
        assert_eq!(
            d.send,
            vec![State::Status("unhealthy: data plane: map gone".into())]
        );

        let d = w.observe(Ok(()));
        assert_eq!(
            d.send,
            vec![State::Watchdog, State::Status("healthy again".into())]
        );
        assert_eq!(d.changed, Some(Ok(())));
    }

    #[test]
    fn unhealthy_from_the_first_check() {
        let mut w = Watchdog::new();
        let d = w.observe(Err("x".into()));
        assert_eq!(d.send, vec![State::Status("unhealthy: x".into())]);
        assert_eq!(d.changed, Some(Err("x".into())));
    }

    #[test]
    fn progress_must_move_within_the_stall_time() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut p = Progress::new("convergence", s(60));
        assert_eq!(p.observe(5, t0), Ok(()));
        assert_eq!(p.observe(5, t0 + s(60)), Ok(()));
        let e = p.observe(5, t0 + s(61)).unwrap_err();
        assert!(e.contains("convergence has not advanced for 61s"), "{e}");
        // Moving again: healthy, and the clock restarts from there.
        assert_eq!(p.observe(6, t0 + s(62)), Ok(()));
        assert_eq!(p.observe(6, t0 + s(100)), Ok(()));
        assert!(p.observe(6, t0 + s(123)).is_err());
    }

    /// The next datagram within `within`, read off the runtime's thread.
    async fn next(server: &UnixDatagram, within: Duration) -> Option<String> {
        let s = server.try_clone().unwrap();
        tokio::task::spawn_blocking(move || {
            s.set_read_timeout(Some(within)).unwrap();
            let mut buf = [0u8; 512];
            s.recv(&mut buf)
                .ok()
                .map(|k| String::from_utf8_lossy(&buf[..k]).into_owned())
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn keep_alives_stop_while_the_check_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(&Address::Path(path), Some(Duration::from_millis(400))).unwrap();
        let healthy = Arc::new(AtomicBool::new(true));
        let h = healthy.clone();
        let task = tokio::spawn(run(n, move || {
            let ok = h.load(Ordering::SeqCst);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("sick".to_owned())
                }
            }
        }));
        let s5 = Duration::from_secs(5);
        assert_eq!(next(&server, s5).await.as_deref(), Some("WATCHDOG=1\n"));
        healthy.store(false, Ordering::SeqCst);
        // Keep-alives already due may arrive; then the status, then silence
        // for longer than the timeout.
        loop {
            let m = next(&server, s5).await.unwrap();
            if m != "WATCHDOG=1\n" {
                assert_eq!(m, "STATUS=unhealthy: sick\n");
                break;
            }
        }
        assert_eq!(next(&server, Duration::from_millis(600)).await, None);
        healthy.store(true, Ordering::SeqCst);
        assert_eq!(
            next(&server, s5).await.as_deref(),
            Some("WATCHDOG=1\nSTATUS=healthy again\n")
        );
        task.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_watchdog_it_returns() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(&Address::Path(dir.path().join("x")), None).unwrap();
        run(n, || async { Ok(()) }).await;
    }
}
