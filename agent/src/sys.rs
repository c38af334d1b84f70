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

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// struct loop_info64 from <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// struct loop_config from <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// Binds `file` to a free loop device (auto-cleared once unused) and
/// returns the open device; what `mount -o loop` does, without the process.
pub fn attach_loop(file: &std::fs::File) -> io::Result<(std::path::PathBuf, std::fs::File)> {
    use std::os::fd::AsRawFd;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let path = std::path::PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        let cfg = LoopConfig {
            fd: file.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_AUTOCLEAR,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, mirrored above.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) } == 0 {
            return Ok((path, dev));
        }
        let e = io::Error::last_os_error();
        // Another process took the device between the two calls: try again.
        if e.raw_os_error() != Some(libc::EBUSY) {
            return Err(e);
        }
    }
    Err(io::Error::other("no free loop device after 16 tries"))
}

/// Copies `from` to `to` keeping holes: only the data extents are written,
/// so a mostly empty filesystem image costs what its metadata takes.
pub fn copy_sparse(from: &std::fs::File, to: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let len = from.metadata()?.len();
    to.set_len(len)?;
    let mut pos: i64 = 0;
    let mut buf = vec![0u8; 1 << 20];
    while (pos as u64) < len {
        // SAFETY: lseek on an open file with SEEK_DATA/SEEK_HOLE.
        let data = unsafe { libc::lseek(from.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data after pos.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(from.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut off = data as u64;
        while off < hole as u64 {
            let n = ((hole as u64 - off) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], off)?;
            to.write_all_at(&buf[..n], off)?;
            off += n as u64;
        }
        pos = hole;
    }
    Ok(())
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
    fn loop_structs_match_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn sparse_copy_keeps_data_and_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let a = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("a"))
            .unwrap();
        a.set_len(64 << 20).unwrap();
        a.write_all_at(b"head", 0).unwrap();
        a.write_all_at(b"middle", 32 << 20).unwrap();
        let b = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("b"))
            .unwrap();
        copy_sparse(&a, &b).unwrap();
        let mut buf = [0u8; 6];
        b.read_exact_at(&mut buf, 32 << 20).unwrap();
        assert_eq!(&buf, b"middle");
        b.read_exact_at(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], b"head");
        let m = b.metadata().unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "the copy is not sparse: {} blocks",
            m.blocks()
        );
    }

    #[test]
    fn own_start_time_is_readable_and_pidfd_matches() {
        let me = std::process::id();
        let st = start_time(me).unwrap();
        assert!(pidfd_for(me, st).unwrap().is_some());
        assert!(pidfd_for(me, st + 1).unwrap().is_none());
    }
}
