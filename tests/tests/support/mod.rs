//! Helpers shared by the privileged eBPF tests: bpffs pin directories and
//! network namespaces held by file descriptors, each removed by a guard.
#![allow(dead_code)] // each test file uses a different subset

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

pub const BPFFS: &str = "/sys/fs/bpf";
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "the eBPF tests must run as root");
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

pub fn last_os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

// ---------------------------------------------------------------------------
// bpffs and pin directories

pub fn is_bpffs(path: &str) -> bool {
    let path = cstr(path);
    // SAFETY: statfs only writes into the zeroed struct we pass, and `path`
    // is a valid NUL-terminated string for the duration of the call.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

/// A unique pin directory on a bpffs, removed (and the bpffs unmounted, if
/// this guard mounted it) when dropped.
pub struct PinDir {
    pub path: PathBuf,
    mounted: bool,
}

impl PinDir {
    pub fn new() -> PinDir {
        require_root();
        let mut mounted = false;
        if !is_bpffs(BPFFS) {
            // A private mount namespace for this thread only: the mount never
            // shows on the host and cannot outlive the test process.
            let none = std::ptr::null::<libc::c_char>();
            let (root, bpf, target) = (cstr("/"), cstr("bpf"), cstr(BPFFS));
            // SAFETY: unshare and mount take only the valid, NUL-terminated
            // strings above (or null where the kernel allows it); they
            // change this thread's mount namespace and nothing else.
            unsafe {
                assert_eq!(
                    libc::unshare(libc::CLONE_NEWNS),
                    0,
                    "{}",
                    last_os_error("unshare(CLONE_NEWNS)")
                );
                assert_eq!(
                    libc::mount(
                        none,
                        root.as_ptr(),
                        none,
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null()
                    ),
                    0,
                    "{}",
                    last_os_error("make / a slave mount")
                );
                assert_eq!(
                    libc::mount(
                        bpf.as_ptr(),
                        target.as_ptr(),
                        bpf.as_ptr(),
                        0,
                        std::ptr::null()
                    ),
                    0,
                    "{}",
                    last_os_error("mount bpffs")
                );
            }
            mounted = true;
        }
        let path = Path::new(BPFFS).join(unique("corral-test-"));
        assert!(!path.exists(), "{} exists already", path.display());
        PinDir { path, mounted }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists() {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("warning: remove {}: {e}", self.path.display());
            }
        }
        if self.mounted {
            let target = cstr(BPFFS);
            // SAFETY: umount2 on a valid path string; MNT_DETACH cannot
            // block on users of the mount.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

// ---------------------------------------------------------------------------
// network namespaces held by file descriptors

pub struct Netns {
    fd: OwnedFd,
}

impl Netns {
    pub fn new() -> Netns {
        // On a short-lived thread, so that the test thread stays where it is.
        let fd = std::thread::spawn(|| {
            // SAFETY: unshare with a constant flag; it affects only this thread.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "{}", last_os_error("unshare(CLONE_NEWNET)"));
            OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap();
        Netns { fd }
    }

    /// A path naming this namespace for `ip ... netns <path>`.
    pub fn path(&self) -> String {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd())
    }

    /// Moves the calling thread into the namespace until the guard drops.
    pub fn enter(&self) -> Entered {
        let original = OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap());
        setns(&self.fd);
        Entered { original }
    }
}

pub struct Entered {
    original: OwnedFd,
}

impl Drop for Entered {
    fn drop(&mut self) {
        setns(&self.original);
    }
}

pub fn setns(fd: &OwnedFd) {
    // SAFETY: fd is an open network-namespace file; setns changes only the
    // calling thread's network namespace.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "{}", last_os_error("setns"));
}

/// Runs a command (in the calling thread's namespaces) and returns stdout.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
