//! corral's daemons under systemd.
//!
//! - [`notify`]: the notification protocol of `Type=notify` services
//!   (`sd_notify(3)`): one datagram of `KEY=VALUE` lines to the unix socket
//!   named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket);
//! - [`watchdog`]: `WatchdogSec=` support: `WATCHDOG=1` is sent every half
//!   period only while a health check of the daemon passes, so a daemon that
//!   is alive but stuck is restarted by systemd;
//! - [`probe`]: the daemons' self-probe: one HTTP GET over a stream, the
//!   way a monitoring system would ask.
//!
//! Without `$NOTIFY_SOCKET` (not started by systemd) everything here is a
//! no-op; a malformed environment is an error at start-up, before the
//! daemon changes anything.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod notify;
pub mod probe;
pub mod watchdog;

pub use notify::{EnvError, Notifier, State};
pub use watchdog::{Check, Progress, Watchdog};
