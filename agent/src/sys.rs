//! The few raw syscalls the agent needs that nix does not wrap. Every
//! `unsafe` block of the agent lives here.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Start time of a process in clock ticks since boot (/proc/<pid>/stat field
/// 22). Together with the pid it names one process, even after pid reuse.
pub fn start_time(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/<pid>/stat"))
}

/// Field 22 of a /proc/<pid>/stat line. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted after the last ')'.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After ')' come fields 3.. ; field 22 is the 20th of them.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Opens a pidfd for `pid` and checks that it is still the process that
/// started at `start`. `Ok(None)` when that process is gone.
pub fn pidfd_for(pid: u32, start: u64) -> io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(None)
        } else {
            Err(e)
        };
    }
    // SAFETY: the kernel just returned this fd to us and nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // Checked after opening: the pidfd pins the process, so a match now means
    // the fd refers to the process we recorded, not a reuse of its pid.
    match start_time(pid) {
        Ok(s) if s == start => Ok(Some(fd)),
        _ => Ok(None),
    }
}

/// Sends `sig` through a pidfd; `Ok(false)` when the process has already exited.
pub fn pidfd_signal(fd: &OwnedFd, sig: i32) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ESRCH) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Marks the calling process a child subreaper: orphaned descendants (the
/// container's init once libcontainer's intermediate process exits) are
/// re-parented to it, so it can wait for them.
pub fn set_child_subreaper() -> io::Result<()> {
    // SAFETY: prctl with an integer option and argument.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes ownership of an inherited descriptor number (`-1`: none).
pub fn owned_fd(fd: i32) -> Option<OwnedFd> {
    // SAFETY: only called with descriptors handed over across execve by the
    // shim itself; nothing else in the process owns them.
    (fd >= 0 && unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers an owned fd (a pidfd) with tokio's reactor for readiness.
pub fn async_fd(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, so the descriptor
    // stays open and unchanged for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_survives_odd_command_names() {
        let stat =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn own_start_time_is_readable_and_pidfd_matches() {
        let me = std::process::id();
        let st = start_time(me).unwrap();
        assert!(pidfd_for(me, st).unwrap().is_some());
        assert!(pidfd_for(me, st + 1).unwrap().is_none());
    }
}
