//! The crash restart policy of a long-running process slot: when a crashed
//! instance is started again.
//!
//! Diego's policy, with its constants in [`BackoffConfig`]: the first three
//! crashes are restarted at once; from the fourth on the slot waits 30 s,
//! doubling with every further crash up to 16 min (30 s, 1 min, 2, 4, 8, 16,
//! 16, …); an instance that has been running for 5 min is considered healthy
//! again, so its next crash counts as the first.
//!
//! Unlike Diego, this policy never gives up (Diego stops restarting after 200
//! crashes): a slot that crashes forever costs one start every 16 min, and an
//! operator looking at the app sees it crashing rather than silently gone.
//!
//! [`CrashBackoff`] is pure: the caller tells it when a crash happened and
//! since when the slot's instance has been running, and it answers when to
//! restart. The reset after a healthy run is applied lazily, on the next
//! crash, so nothing needs a timer.

use crate::model::Time;
use std::time::Duration;

/// The restart policy's constants. Every value is meaningful: a `max_delay`
/// below `initial_delay` caps every delay at `max_delay`, and zero delays
/// mean "restart at once".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// Crashes restarted at once, without delay, before backing off.
    /// Default 3 (Diego).
    pub immediate_restarts: u32,
    /// The delay after the first crash beyond the immediate ones; it doubles
    /// with each further crash. Default 30 s (Diego).
    pub initial_delay: Duration,
    /// The longest delay. Default 16 min (Diego).
    pub max_delay: Duration,
    /// How long an instance must have been running for its slot's crash
    /// count to start again from zero. Default 5 min (Diego).
    pub reset_after: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            immediate_restarts: 3,
            initial_delay: Duration::from_secs(30),
            max_delay: Duration::from_secs(16 * 60),
            reset_after: Duration::from_secs(5 * 60),
        }
    }
}

impl BackoffConfig {
    /// The delay before restarting after the `crash`-th crash in a row
    /// (1-based). Non-decreasing in `crash` and never above `max_delay`.
    pub fn delay_after(&self, crash: u32) -> Duration {
        if crash <= self.immediate_restarts {
            return Duration::ZERO;
        }
        let doublings = crash - self.immediate_restarts - 1;
        let delay = match 1u32.checked_shl(doublings) {
            Some(factor) => self.initial_delay.saturating_mul(factor),
            None => Duration::MAX,
        };
        delay.min(self.max_delay)
    }
}

/// When to start a crashed slot again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart at once.
    Now,
    /// Restart at this time, not before.
    At(Time),
}

impl RestartDecision {
    /// The earliest time the restart may happen, given the time of the crash.
    pub fn time(self, now: Time) -> Time {
        match self {
            Self::Now => now,
            Self::At(t) => t,
        }
    }
}

/// What a [`CrashBackoff`] remembers, for the store to persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CrashState {
    /// Crashes in a row, not yet reset by a healthy run.
    pub crashes: u32,
    /// Since when the slot's current instance has been running, if it is.
    pub running_since: Option<Time>,
    /// When the slot may be started again after its last crash; `None` once
    /// an instance runs again.
    pub restart_at: Option<Time>,
}

/// The crash history of one slot (an app index) and its restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CrashBackoff {
    config: BackoffConfig,
    state: CrashState,
}

impl CrashBackoff {
    /// A slot that has never crashed.
    pub fn new(config: BackoffConfig) -> Self {
        Self::with_state(config, CrashState::default())
    }

    /// A slot restored from the store.
    pub fn with_state(config: BackoffConfig, state: CrashState) -> Self {
        Self { config, state }
    }

    pub fn config(&self) -> &BackoffConfig {
        &self.config
    }

    pub fn state(&self) -> CrashState {
        self.state
    }

    /// The slot's instance has been running since `t`. Called when the
    /// brain learns that an instance of the slot started; replaces any
    /// earlier value (the instance it described is gone).
    pub fn on_running_since(&mut self, t: Time) {
        self.state.running_since = Some(t);
        self.state.restart_at = None;
    }

    /// The slot's instance crashed at `now`: counts the crash and says when
    /// to restart. A crash after a run of at least `reset_after` counts as
    /// the first.
    pub fn on_crash(&mut self, now: Time) -> RestartDecision {
        let crashes = self.crash_count(now).saturating_add(1);
        self.state.crashes = crashes;
        self.state.running_since = None;
        let delay = self.config.delay_after(crashes);
        let decision = if delay.is_zero() {
            RestartDecision::Now
        } else {
            RestartDecision::At(now.plus(delay))
        };
        self.state.restart_at = Some(decision.time(now));
        decision
    }

    /// Crashes in a row as of `now`: zero once the current instance has been
    /// running for `reset_after`.
    pub fn crash_count(&self, now: Time) -> u32 {
        match self.state.running_since {
            Some(since) if now.since(since) >= self.config.reset_after => 0,
            _ => self.state.crashes,
        }
    }

    /// When the slot may be started again, if it is waiting after a crash.
    pub fn restart_at(&self) -> Option<Time> {
        self.state.restart_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn diego_schedule_three_immediate_then_doubling_to_sixteen_minutes() {
        let mut b = CrashBackoff::new(BackoffConfig::default());
        let mut now = Time::from_secs(1000);
        let mut delays = Vec::new();
        for _ in 0..12 {
            let d = b.on_crash(now);
            let restart = d.time(now);
            delays.push(restart.since(now).as_secs());
            // The replacement runs briefly, then crashes again.
            now = restart.plus(secs(1));
            b.on_running_since(now);
            now = now.plus(secs(10));
        }
        assert_eq!(delays, [0, 0, 0, 30, 60, 120, 240, 480, 960, 960, 960, 960]);
        assert_eq!(b.state().crashes, 12);
    }

    #[test]
    fn immediate_restarts_say_now() {
        let mut b = CrashBackoff::new(BackoffConfig::default());
        let now = Time::from_secs(5);
        for _ in 0..3 {
            assert_eq!(b.on_crash(now), RestartDecision::Now);
            assert_eq!(b.restart_at(), Some(now));
        }
        assert_eq!(
            b.on_crash(now),
            RestartDecision::At(Time::from_secs(35)),
            "the fourth crash waits 30 s"
        );
    }

    #[test]
    fn five_minutes_of_running_resets_the_count() {
        let mut b = CrashBackoff::new(BackoffConfig::default());
        let t0 = Time::from_secs(100);
        for _ in 0..6 {
            b.on_crash(t0);
        }
        let started = Time::from_secs(200);
        b.on_running_since(started);
        assert_eq!(b.restart_at(), None, "running again: nothing to wait for");
        // One millisecond short of five minutes: still backing off.
        let five_minutes = started.plus(secs(300));
        let mut short = b;
        let just_before = Time::from_millis(five_minutes.as_millis() - 1);
        assert_eq!(short.crash_count(just_before), 6);
        assert_eq!(
            short.on_crash(just_before),
            RestartDecision::At(just_before.plus(secs(240)))
        );
        // Five minutes exactly: the crash is the first again.
        assert_eq!(b.crash_count(five_minutes), 0);
        assert_eq!(b.on_crash(five_minutes), RestartDecision::Now);
        assert_eq!(b.state().crashes, 1);
    }

    #[test]
    fn a_crash_without_a_run_does_not_reset() {
        let mut b = CrashBackoff::new(BackoffConfig::default());
        for _ in 0..4 {
            b.on_crash(Time::ZERO);
        }
        // An hour later, without ever having run: still the fifth crash.
        assert_eq!(
            b.on_crash(Time::from_secs(3600)),
            RestartDecision::At(Time::from_secs(3660))
        );
    }

    #[test]
    fn custom_constants_are_honoured() {
        let config = BackoffConfig {
            immediate_restarts: 0,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(250),
            reset_after: secs(1),
        };
        let got: Vec<_> = (1..=5).map(|n| config.delay_after(n).as_millis()).collect();
        assert_eq!(got, [100, 200, 250, 250, 250]);
        let inverted = BackoffConfig {
            max_delay: Duration::from_millis(10),
            ..config
        };
        assert_eq!(inverted.delay_after(1), Duration::from_millis(10));
        let zero = BackoffConfig {
            initial_delay: Duration::ZERO,
            ..config
        };
        let mut b = CrashBackoff::new(zero);
        assert_eq!(b.on_crash(Time::from_secs(1)), RestartDecision::Now);
    }

    #[test]
    fn huge_counts_neither_overflow_nor_exceed_the_cap() {
        let config = BackoffConfig::default();
        for n in [31, 32, 33, 64, 1000, u32::MAX] {
            assert_eq!(config.delay_after(n), config.max_delay, "{n}");
        }
        let mut b = CrashBackoff::with_state(
            config,
            CrashState {
                crashes: u32::MAX,
                ..CrashState::default()
            },
        );
        let now = Time::from_millis(u64::MAX - 5);
        assert_eq!(
            b.on_crash(now),
            RestartDecision::At(Time::from_millis(u64::MAX))
        );
        assert_eq!(b.state().crashes, u32::MAX);
    }

    #[test]
    fn state_round_trips_through_the_store() {
        let mut b = CrashBackoff::new(BackoffConfig::default());
        for _ in 0..5 {
            b.on_crash(Time::from_secs(7));
        }
        let restored = CrashBackoff::with_state(BackoffConfig::default(), b.state());
        assert_eq!(restored, b);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// The slot's instance starts running `after` ms after the restart
        /// time, runs for `ran` ms, then crashes.
        RunThenCrash { after: u64, ran: u64 },
        /// The slot crashes again before running (a failed start).
        CrashWithoutRunning { after: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..5_000, 0u64..600_000).prop_map(|(after, ran)| Op::RunThenCrash { after, ran }),
            (0u64..5_000).prop_map(|after| Op::CrashWithoutRunning { after }),
        ]
    }

    fn config() -> impl Strategy<Value = BackoffConfig> {
        (0u32..6, 0u64..60_000, 0u64..2_000_000, 1u64..600_000).prop_map(
            |(immediate_restarts, initial, max, reset)| BackoffConfig {
                immediate_restarts,
                initial_delay: Duration::from_millis(initial),
                max_delay: Duration::from_millis(max),
                reset_after: Duration::from_millis(reset),
            },
        )
    }

    proptest! {
        #[test]
        fn delays_are_monotonic_between_resets_and_bounded(
            config in config(),
            ops in proptest::collection::vec(op(), 1..60),
            start in 0u64..1_000_000,
        ) {
            let mut b = CrashBackoff::new(config);
            let mut now = Time::from_millis(start);
            let mut last_delay = Duration::ZERO;
            for op in ops {
                let reset = match op {
                    Op::RunThenCrash { after, ran } => {
                        let running = now.plus(Duration::from_millis(after));
                        b.on_running_since(running);
                        now = running.plus(Duration::from_millis(ran));
                        Duration::from_millis(ran) >= config.reset_after
                    }
                    Op::CrashWithoutRunning { after } => {
                        now = now.plus(Duration::from_millis(after));
                        false
                    }
                };
                let before = b.state().crashes;
                let decision = b.on_crash(now);
                let restart = decision.time(now);
                let delay = restart.since(now);
                prop_assert!(restart >= now, "never restarts in the past");
                prop_assert!(delay <= config.max_delay, "{delay:?} above the cap");
                prop_assert_eq!(decision == RestartDecision::Now, delay.is_zero());
                if reset {
                    prop_assert_eq!(b.state().crashes, 1);
                    prop_assert_eq!(delay, config.delay_after(1));
                } else {
                    prop_assert_eq!(b.state().crashes, before.saturating_add(1));
                    prop_assert!(delay >= last_delay, "{delay:?} < {last_delay:?}");
                }
                if b.state().crashes <= config.immediate_restarts {
                    prop_assert_eq!(decision, RestartDecision::Now);
                }
                prop_assert_eq!(b.restart_at(), Some(restart));
                last_delay = delay;
                now = restart;
            }
        }

        #[test]
        fn delay_after_is_monotonic_and_capped(config in config(), n in 0u32..200) {
            prop_assert!(config.delay_after(n) <= config.delay_after(n + 1));
            prop_assert!(config.delay_after(n) <= config.max_delay);
        }
    }
}
