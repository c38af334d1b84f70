//! Small pure types shared by the brain's decision logic ([`crate::auction`],
//! [`crate::backoff`], [`crate::converge`]).
//!
//! The brain's logic never reads a clock: the event loop reads its monotonic
//! clock once per event and passes a [`Time`] in. Tests drive that time
//! explicitly.

use crate::desired::AppKey;
use corral_proto::Timestamp;
use std::fmt;
use std::time::Duration;

/// A moment on the brain's monotonic clock, in milliseconds since an epoch the
/// caller chooses (typically the brain's start). Only differences between
/// two `Time`s mean anything; it is not wall-clock time and never goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(u64);

impl Time {
    /// The epoch.
    pub const ZERO: Time = Time(0);

    pub const fn from_millis(millis: u64) -> Self {
        Self(millis)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Self(secs.saturating_mul(1000))
    }

    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// `self + d`, saturating at the end of time; sub-millisecond parts of
    /// `d` are dropped.
    pub fn plus(self, d: Duration) -> Time {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(ms))
    }

    /// How long after `earlier` this is; zero if `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// A wall-clock timestamp as a `Time` whose epoch is the Unix epoch, for
    /// records that must keep their meaning across a brain restart (crash
    /// backoff deadlines). Sub-millisecond parts are dropped.
    pub fn from_timestamp(t: Timestamp) -> Self {
        Self(t.nanos() / 1_000_000)
    }

    /// The inverse of [`Time::from_timestamp`], saturating.
    pub fn to_timestamp(self) -> Timestamp {
        Timestamp::from_nanos(self.0.saturating_mul(1_000_000))
    }
}

impl fmt::Display for Time {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t+{}.{:03}s", self.0 / 1000, self.0 % 1000)
    }
}

/// One desired instance slot of a long-running process: an app (names are
/// unique per tenant, hence [`AppKey`]) and an index, like Diego's
/// `ActualLRPKey`. Each slot should have exactly one running instance; crash
/// counts are kept per slot, not per instance, so that a restarted instance
/// inherits its predecessor's backoff.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LrpKey {
    pub app: AppKey,
    pub index: u32,
}

impl LrpKey {
    pub fn new(app: AppKey, index: u32) -> Self {
        Self { app, index }
    }
}

impl fmt::Display for LrpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.app, self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_and_never_goes_negative() {
        let t = Time::from_secs(10);
        assert_eq!(
            t.plus(Duration::from_millis(1500)),
            Time::from_millis(11_500)
        );
        assert_eq!(
            Time::from_millis(u64::MAX - 1).plus(Duration::from_secs(5)),
            Time::from_millis(u64::MAX)
        );
        assert_eq!(t.plus(Duration::MAX), Time::from_millis(u64::MAX));
        assert_eq!(t.since(Time::from_secs(4)), Duration::from_secs(6));
        assert_eq!(Time::from_secs(4).since(t), Duration::ZERO);
        assert_eq!(Time::from_secs(u64::MAX), Time::from_millis(u64::MAX));
    }

    #[test]
    fn display_reads_as_seconds() {
        assert_eq!(Time::from_millis(12_345).to_string(), "t+12.345s");
        assert_eq!(Time::ZERO.to_string(), "t+0.000s");
        let app = AppKey {
            tenant: corral_proto::TenantId::new("acme").unwrap(),
            name: corral_proto::AppId::new("web").unwrap(),
        };
        assert_eq!(LrpKey::new(app, 3).to_string(), "acme/web/3");
    }

    #[test]
    fn wall_clock_round_trip_drops_only_sub_millisecond_parts() {
        let ts = Timestamp::from_nanos(1_764_000_000_123_456_789);
        let t = Time::from_timestamp(ts);
        assert_eq!(t.as_millis(), 1_764_000_000_123);
        assert_eq!(
            t.to_timestamp(),
            Timestamp::from_nanos(1_764_000_000_123_000_000)
        );
        assert_eq!(
            Time::from_millis(u64::MAX).to_timestamp(),
            Timestamp::from_nanos(u64::MAX)
        );
    }
}
