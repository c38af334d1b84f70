//! `corral-init`, every instance's first process (agent/init/corral-init.c,
//! built static by agent/build.rs and embedded here): it runs the
//! instance's command as its only child, passes signals on to it, reaps
//! orphans, and says on a pipe how the child ended.
//!
//! The agent writes the executable once into its run directory
//! ([`install`]); each shim opens it and hands the open file to the
//! container's first process, which runs it with `fexecve` after entering
//! the container ([`InitExecutor`]). Nothing is mounted into the container
//! and no file of it is needed; all instances share the one copy's pages.

use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use oci_spec::runtime::Spec;
use std::ffi::CString;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// The executable, as built for this agent.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/corral-init"));

/// The name the init runs under (`argv[0]`, what `ps` shows for pid 1).
pub const ARGV0: &str = "corral-init";

/// The file descriptor on which the init says how its child ended.
pub const STATUS_FD: RawFd = 3;

/// Where the agent keeps the executable.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("corral-init")
}

/// Writes the executable to [`path`] unless it is there already, whole
/// (written aside and renamed, so a shim never opens half of it).
pub fn install(run_dir: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dst = path(run_dir);
    if std::fs::read(&dst).is_ok_and(|b| b == BINARY) {
        return Ok(dst);
    }
    std::fs::create_dir_all(run_dir)?;
    let tmp = run_dir.join(format!(".corral-init.{}", std::process::id()));
    std::fs::write(&tmp, BINARY)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, &dst).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(dst)
}

/// How the init's child ended, from the init's status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// Reads the init's status line (`exit N` or `signal N`, one line). Anything
/// else, or nothing (the init was killed before it could say), is `None`:
/// then the init's own wait status stands.
pub fn parse_status(bytes: &[u8]) -> Option<ChildEnd> {
    let text = std::str::from_utf8(bytes).ok()?;
    let line = text.strip_suffix('\n')?;
    if line.contains('\n') {
        return None;
    }
    let (how, n) = line.split_once(' ')?;
    let n: i32 = n.parse().ok()?;
    match how {
        "exit" if (0..=255).contains(&n) => Some(ChildEnd::Exited(n)),
        "signal" if (1..=64).contains(&n) => Some(ChildEnd::Signaled(n)),
        _ => None,
    }
}

/// Runs the instance's command under the init: in the container's first
/// process, after libcontainer has entered the container, it moves the
/// status pipe to [`STATUS_FD`] and `fexecve`s the init with the command
/// as its arguments. The command is checked (found on `PATH`, executable)
/// as the default executor checks it, so a missing command still fails the
/// start rather than becoming an exit.
#[derive(Clone)]
pub struct InitExecutor {
    /// The open executable (close-on-exec).
    pub init: RawFd,
    /// The write end of the status pipe (close-on-exec).
    pub status: RawFd,
}

impl Executor for InitExecutor {
    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let fail = |what: &str, e: nix::Error| {
            ExecutorError::Execution(format!("corral-init: {what}: {e}").into())
        };
        let args = spec
            .process()
            .as_ref()
            .and_then(|p| p.args().as_ref())
            .ok_or(ExecutorError::InvalidArg)?;
        // Every descriptor above 2 is close-on-exec by now (libcontainer),
        // ours included; the status pipe must survive as STATUS_FD, and the
        // executable must not be overwritten by it.
        let mut init = self.init;
        if init == STATUS_FD {
            init = nix::fcntl::fcntl(init, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(STATUS_FD + 1))
                .map_err(|e| fail("moving the executable's descriptor", e))?;
        }
        if self.status == STATUS_FD {
            nix::fcntl::fcntl(
                STATUS_FD,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            )
            .map_err(|e| fail("keeping the status pipe", e))?;
        } else {
            nix::unistd::dup2(self.status, STATUS_FD)
                .map_err(|e| fail("moving the status pipe", e))?;
        }
        let argv: Vec<CString> = std::iter::once(ARGV0)
            .chain(args.iter().map(String::as_str))
            .map(|a| CString::new(a).map_err(|_| ExecutorError::InvalidArg))
            .collect::<Result<_, _>>()?;
        let env: Vec<CString> = std::env::vars_os()
            .filter_map(|(k, v)| {
                use std::os::unix::ffi::OsStrExt;
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        match nix::unistd::fexecve(init, &argv, &env) {
            Ok(never) => match never {},
            Err(e) => Err(fail("fexecve", e)),
        }
    }

    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        DefaultExecutor {}.validate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_is_read_exactly() {
        assert_eq!(parse_status(b"exit 0\n"), Some(ChildEnd::Exited(0)));
        assert_eq!(parse_status(b"exit 255\n"), Some(ChildEnd::Exited(255)));
        assert_eq!(parse_status(b"signal 9\n"), Some(ChildEnd::Signaled(9)));
        assert_eq!(parse_status(b"signal 15\n"), Some(ChildEnd::Signaled(15)));
        for bad in [
            &b""[..],
            b"exit 3",
            b"exit 256\n",
            b"exit -1\n",
            b"signal 0\n",
            b"signal 65\n",
            b"exit 3\nexit 4\n",
            b"exited 3\n",
            b"exit three\n",
            b"\xff\n",
        ] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_binary_is_a_static_executable() {
        // A 64-bit ELF executable without a PT_INTERP program header: an
        // interpreter (the dynamic loader) would have to come from the
        // container's files.
        assert_eq!(&BINARY[..5], b"\x7fELF\x02");
        let u16_at = |o: usize| u16::from_le_bytes([BINARY[o], BINARY[o + 1]]) as usize;
        let u32_at = |o: usize| u32::from_le_bytes(BINARY[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(BINARY[o..o + 8].try_into().unwrap()) as usize;
        let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
        assert!(phnum > 0);
        const PT_INTERP: u32 = 3;
        for i in 0..phnum {
            assert_ne!(
                u32_at(phoff + i * phentsize),
                PT_INTERP,
                "corral-init is dynamically linked"
            );
        }
    }

    #[test]
    fn install_writes_once_and_repairs() {
        let dir = tempfile::tempdir().unwrap();
        let p = install(dir.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), BINARY);
        std::fs::write(&p, b"torn").unwrap();
        install(dir.path()).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), BINARY);
    }
}
