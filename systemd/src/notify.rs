//! The service notification protocol of `Type=notify` units (`sd_notify(3)`).
//!
//! systemd passes the address of its notification socket in `$NOTIFY_SOCKET`
//! (an absolute path, or `@name` for a socket in the abstract namespace) and,
//! with `WatchdogSec=`, the watchdog timeout in `$WATCHDOG_USEC` (and the pid
//! it is meant for in `$WATCHDOG_PID`). A daemon sends one datagram of
//! newline-separated `KEY=VALUE` assignments per state change.
//!
//! Parsing the environment and formatting messages are pure functions; only
//! [`Notifier`] touches a socket.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The environment variables this module reads.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID: &str = "WATCHDOG_PID";

/// One thing told to systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Start-up is complete (`READY=1`): `systemctl start` returns, units
    /// ordered after this one start, and the watchdog begins to count.
    Ready,
    /// The daemon is shutting down (`STOPPING=1`).
    Stopping,
    /// A watchdog keep-alive (`WATCHDOG=1`).
    Watchdog,
    /// A one-line status for `systemctl status` (`STATUS=...`).
    Status(String),
    /// More time for the current start-up or shut-down step
    /// (`EXTEND_TIMEOUT_USEC=...`, counted from now).
    ExtendTimeout(Duration),
}

impl State {
    fn assignment(&self) -> String {
        match self {
            State::Ready => "READY=1".to_owned(),
            State::Stopping => "STOPPING=1".to_owned(),
            State::Watchdog => "WATCHDOG=1".to_owned(),
            // A newline would end the assignment and start a bogus one.
            State::Status(s) => format!("STATUS={}", s.replace(['\n', '\r'], " ")),
            State::ExtendTimeout(d) => format!("EXTEND_TIMEOUT_USEC={}", d.as_micros()),
        }
    }
}

/// The datagram that tells systemd these states.
pub fn message(states: &[State]) -> String {
    let mut m = states
        .iter()
        .map(State::assignment)
        .collect::<Vec<_>>()
        .join("\n");
    m.push('\n');
    m
}

/// Where the notification socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Path(PathBuf),
    /// A name in the abstract namespace (`@name`; the name without the `@`).
    Abstract(Vec<u8>),
}

/// A malformed systemd environment: the unit (or whoever started the
/// daemon) set something the daemon cannot honour.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error(
        "NOTIFY_SOCKET={value:?} is neither an absolute path nor an abstract socket name (@name)"
    )]
    BadSocket { value: OsString },
    #[error("WATCHDOG_USEC={value:?} is not a positive number of microseconds")]
    BadWatchdogUsec { value: OsString },
    #[error("WATCHDOG_PID={value:?} is not a process id")]
    BadWatchdogPid { value: OsString },
    #[error("WatchdogSec={timeout:?} is too short for {daemon}: it proves its health before every keep-alive (every half period) and that can take a second; use WatchdogSec={min_secs} or more, or 0 to disable the watchdog",
        min_secs = min.as_secs().max(1))]
    WatchdogTooShort {
        daemon: &'static str,
        timeout: Duration,
        min: Duration,
    },
}

/// Parses `$NOTIFY_SOCKET`.
pub fn parse_address(value: &OsStr) -> Result<Address, EnvError> {
    let bytes = value.as_bytes();
    let bad = || EnvError::BadSocket {
        value: value.to_owned(),
    };
    match bytes.first() {
        Some(b'/') => Ok(Address::Path(PathBuf::from(value))),
        Some(b'@') if bytes.len() > 1 => Ok(Address::Abstract(bytes[1..].to_vec())),
        _ => Err(bad()),
    }
}

/// The watchdog timeout meant for the process `own_pid`, from
/// `$WATCHDOG_USEC` and `$WATCHDOG_PID`. `None`: no watchdog, or one meant
/// for another process (a `WATCHDOG_PID` inherited from a parent).
pub fn watchdog_timeout(
    usec: Option<&OsStr>,
    pid: Option<&OsStr>,
    own_pid: u32,
) -> Result<Option<Duration>, EnvError> {
    let Some(usec) = usec else {
        return Ok(None);
    };
    let micros = usec
        .to_str()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&m| m > 0)
        .ok_or_else(|| EnvError::BadWatchdogUsec {
            value: usec.to_owned(),
        })?;
    if let Some(pid) = pid {
        let pid = pid
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
            .ok_or_else(|| EnvError::BadWatchdogPid {
                value: pid.to_owned(),
            })?;
        if pid != own_pid {
            return Ok(None);
        }
    }
    Ok(Some(Duration::from_micros(micros)))
}

/// Refuses a watchdog timeout the daemon cannot keep up with.
pub fn check_watchdog(
    daemon: &'static str,
    timeout: Option<Duration>,
    min: Duration,
) -> Result<(), EnvError> {
    match timeout {
        Some(timeout) if timeout < min => Err(EnvError::WatchdogTooShort {
            daemon,
            timeout,
            min,
        }),
        _ => Ok(()),
    }
}

/// Sends notifications to systemd. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Notifier {
    socket: Arc<UnixDatagram>,
    addr: Arc<SocketAddr>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// The notifier systemd asked for through the environment, if any.
    /// Also removes the variables from the environment so that processes
    /// the daemon starts (shims, helpers) do not talk to systemd as if
    /// they were the service: call it before any other thread exists.
    pub fn take_from_env(
        daemon: &'static str,
        min_watchdog: Duration,
    ) -> Result<Option<Notifier>, io::Error> {
        let socket = std::env::var_os(NOTIFY_SOCKET);
        let usec = std::env::var_os(WATCHDOG_USEC);
        let pid = std::env::var_os(WATCHDOG_PID);
        for v in [NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID] {
            std::env::remove_var(v);
        }
        let Some(socket) = socket else {
            return Ok(None);
        };
        let invalid = |e: EnvError| io::Error::new(io::ErrorKind::InvalidInput, e);
        let addr = parse_address(&socket).map_err(invalid)?;
        let watchdog = watchdog_timeout(usec.as_deref(), pid.as_deref(), std::process::id())
            .map_err(invalid)?;
        check_watchdog(daemon, watchdog, min_watchdog).map_err(invalid)?;
        Notifier::new(&addr, watchdog).map(Some)
    }

    /// A notifier for the socket at `addr`.
    pub fn new(addr: &Address, watchdog: Option<Duration>) -> io::Result<Notifier> {
        let addr = match addr {
            Address::Path(p) => SocketAddr::from_pathname(p)?,
            Address::Abstract(name) => SocketAddr::from_abstract_name(name)?,
        };
        let socket = UnixDatagram::unbound()?;
        // A notification must never stall the daemon: a full queue drops it.
        socket.set_nonblocking(true)?;
        Ok(Notifier {
            socket: Arc::new(socket),
            addr: Arc::new(addr),
            watchdog,
        })
    }

    /// The watchdog timeout (`WatchdogSec=`) when systemd expects keep-alives.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends these states in one datagram.
    pub fn notify(&self, states: &[State]) -> io::Result<()> {
        let m = message(states);
        self.socket
            .send_to_addr(m.as_bytes(), &self.addr)
            .map(|_| ())
    }

    /// Sends and logs a failure: systemd missing a notification shows up
    /// as a start-up timeout or a watchdog restart, so say why here.
    pub fn send(&self, states: &[State]) {
        if let Err(e) = self.notify(states) {
            tracing::warn!(
                "cannot notify systemd ({}): {e}",
                message(states).trim_end()
            );
        }
    }
}

/// Sends when there is a notifier; does nothing otherwise.
pub fn send(notifier: Option<&Notifier>, states: &[State]) {
    if let Some(n) = notifier {
        n.send(states);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn messages_are_newline_separated_assignments() {
        assert_eq!(message(&[State::Ready]), "READY=1\n");
        assert_eq!(
            message(&[
                State::Ready,
                State::Status("3 instances\nre-adopted".into())
            ]),
            "READY=1\nSTATUS=3 instances re-adopted\n"
        );
        assert_eq!(
            message(&[State::Stopping, State::Watchdog]),
            "STOPPING=1\nWATCHDOG=1\n"
        );
        assert_eq!(
            message(&[State::ExtendTimeout(Duration::from_secs(2))]),
            "EXTEND_TIMEOUT_USEC=2000000\n"
        );
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(
            parse_address(OsStr::new("/run/systemd/notify")),
            Ok(Address::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            parse_address(OsStr::new("@sd-notify/1")),
            Ok(Address::Abstract(b"sd-notify/1".to_vec()))
        );
        for bad in ["", "@", "relative/path", "vsock:2:999"] {
            let e = parse_address(OsStr::new(bad)).unwrap_err();
            assert!(e.to_string().contains("NOTIFY_SOCKET"), "{e}");
        }
    }

    #[test]
    fn watchdog_environment() {
        let s = |v: &'static str| Some(OsStr::new(v));
        assert_eq!(watchdog_timeout(None, None, 7), Ok(None));
        assert_eq!(
            watchdog_timeout(s("30000000"), None, 7),
            Ok(Some(Duration::from_secs(30)))
        );
        assert_eq!(
            watchdog_timeout(s("30000000"), s("7"), 7),
            Ok(Some(Duration::from_secs(30)))
        );
        // Inherited from a parent service: not ours to keep alive.
        assert_eq!(watchdog_timeout(s("30000000"), s("8"), 7), Ok(None));
        for bad in ["0", "-1", "30s", ""] {
            assert!(matches!(
                watchdog_timeout(s(bad), None, 7),
                Err(EnvError::BadWatchdogUsec { .. })
            ));
        }
        assert!(matches!(
            watchdog_timeout(s("1"), s("x"), 7),
            Err(EnvError::BadWatchdogPid { .. })
        ));
    }

    #[test]
    fn a_too_short_watchdog_is_refused_with_the_setting_to_use() {
        let min = Duration::from_secs(4);
        assert!(check_watchdog("corral-agent", None, min).is_ok());
        assert!(check_watchdog("corral-agent", Some(min), min).is_ok());
        let e = check_watchdog("corral-agent", Some(Duration::from_millis(500)), min)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("WatchdogSec=500ms is too short for corral-agent"),
            "{e}"
        );
        assert!(e.contains("WatchdogSec=4 or more"), "{e}");
    }

    fn receive(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn notifies_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(&Address::Path(path), None).unwrap();
        n.notify(&[State::Ready, State::Status("up".into())])
            .unwrap();
        assert_eq!(receive(&server), "READY=1\nSTATUS=up\n");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        let name = format!("corral-systemd-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let addr = parse_address(OsStr::new(&format!("@{name}"))).unwrap();
        let n = Notifier::new(&addr, Some(Duration::from_secs(1))).unwrap();
        assert_eq!(n.watchdog_timeout(), Some(Duration::from_secs(1)));
        n.notify(&[State::Stopping]).unwrap();
        assert_eq!(receive(&server), "STOPPING=1\n");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(&Address::Path(dir.path().join("gone")), None).unwrap();
        assert!(n.notify(&[State::Ready]).is_err());
        n.send(&[State::Ready]); // logged, not fatal
    }
}
