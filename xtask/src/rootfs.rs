//! `cargo xtask rootfs`: a minimal busybox root filesystem for tests, the
//! demo and benchmarks, at `target/rootfs/busybox`.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::util::{self, workspace_root};

const BUSYBOX: &str = "/bin/busybox";
/// Written last: its presence means the rootfs is complete. Bump the version
/// when the layout changes so old trees get rebuilt.
const MARKER: &str = ".corral-rootfs-v1";

pub fn run() -> Result<()> {
    let path = ensure()?;
    println!("{}", path.display());
    Ok(())
}

pub fn path() -> PathBuf {
    workspace_root().join("target/rootfs/busybox")
}

/// Builds the rootfs unless a complete one is already there; returns its path.
pub fn ensure() -> Result<PathBuf> {
    let dest = path();
    if dest.join(MARKER).exists() {
        return Ok(dest);
    }
    let parent = dest.parent().unwrap_or(&dest);
    fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;

    // Built beside the destination and renamed into place, so a reader never
    // sees a half-built tree, even if this is interrupted.
    let tmp = parent.join(format!(".busybox.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("remove {}", tmp.display()))?;
    }
    let built = build(&tmp).and_then(|()| {
        if dest.exists() {
            // Incomplete leftover of an older or interrupted build.
            fs::remove_dir_all(&dest).with_context(|| format!("remove {}", dest.display()))?;
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("rename {} to {}", tmp.display(), dest.display()))
    });
    if let Err(e) = built {
        let _ = fs::remove_dir_all(&tmp);
        // Another build may have won the race to the rename.
        if dest.join(MARKER).exists() {
            return Ok(dest);
        }
        return Err(e);
    }
    Ok(dest)
}

fn build(root: &Path) -> Result<()> {
    check_static(Path::new(BUSYBOX))?;

    for (dir, mode) in [
        ("bin", 0o755),
        ("sbin", 0o755),
        ("usr/bin", 0o755),
        ("usr/sbin", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("sys", 0o555),
        ("dev", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("var/tmp", 0o1777),
        ("run", 0o755),
    ] {
        let path = root.join(dir);
        fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        set_mode(&path, mode)?;
    }

    let busybox = root.join("bin/busybox");
    fs::copy(BUSYBOX, &busybox)
        .with_context(|| format!("copy {BUSYBOX} to {}", busybox.display()))?;
    set_mode(&busybox, 0o755)?;

    let applets = util::output(Command::new(BUSYBOX).arg("--list-full"))?;
    let mut count = 0;
    for applet in applets.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let rel = Path::new(applet);
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            bail!("busybox --list-full printed an unexpected path: {applet}");
        }
        if rel == Path::new("bin/busybox") {
            continue;
        }
        let link = root.join(rel);
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        // Relative, so the links resolve both inside the container and when
        // the tree is inspected from the host.
        let depth = rel.components().count() - 1;
        let target = format!("{}bin/busybox", "../".repeat(depth));
        symlink(&target, &link)
            .with_context(|| format!("symlink {} -> {target}", link.display()))?;
        count += 1;
    }
    if count == 0 {
        bail!("busybox --list-full printed no applets");
    }

    for (file, contents) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "corral\n"),
        ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
    ] {
        let path = root.join(file);
        fs::write(&path, contents).with_context(|| format!("write {}", path.display()))?;
    }
    set_mode(root, 0o755)?;

    let marker = root.join(MARKER);
    fs::write(&marker, format!("busybox rootfs with {count} applets\n"))
        .with_context(|| format!("write {}", marker.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    // Set explicitly: create_dir_all is subject to the umask, and tmp needs
    // its sticky bit.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// A dynamically linked busybox would not run inside the rootfs, which has no
/// libc. `file` is not always installed, so read the ELF program headers and
/// look for an interpreter (PT_INTERP).
fn check_static(path: &Path) -> Result<()> {
    let bytes = fs::read(path).with_context(|| {
        format!(
            "read {}: install busybox-static (`cargo xtask deps`)",
            path.display()
        )
    })?;
    match elf_interpreter(&bytes) {
        Ok(false) => Ok(()),
        Ok(true) => bail!(
            "{} is dynamically linked: install busybox-static (`cargo xtask deps`)",
            path.display()
        ),
        Err(why) => bail!("{} is not a usable ELF binary: {why}", path.display()),
    }
}

/// Whether a 64-bit little-endian ELF image asks for an interpreter.
fn elf_interpreter(elf: &[u8]) -> Result<bool, &'static str> {
    const PT_INTERP: u32 = 3;
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err("no ELF magic");
    }
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF");
    }
    let u16_at = |off: usize| -> Result<usize, &'static str> {
        let b = elf.get(off..off + 2).ok_or("truncated header")?;
        Ok(usize::from(u16::from_le_bytes([b[0], b[1]])))
    };
    let phoff = elf
        .get(0x20..0x28)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_le_bytes)
        .and_then(|v| usize::try_from(v).ok())
        .ok_or("truncated header")?;
    let phentsize = u16_at(0x36)?;
    let phnum = u16_at(0x38)?;
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = elf
            .get(off..off + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or("truncated program headers")?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header followed by program headers of the given types.
    fn elf_with(types: &[u32]) -> Vec<u8> {
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for t in types {
            let mut ph = vec![0u8; 56];
            ph[..4].copy_from_slice(&t.to_le_bytes());
            elf.extend(ph);
        }
        elf
    }

    #[test]
    fn finds_interpreter_only_when_present() {
        assert_eq!(elf_interpreter(&elf_with(&[6, 3, 1])), Ok(true));
        assert_eq!(elf_interpreter(&elf_with(&[1, 1, 4])), Ok(false));
        assert_eq!(elf_interpreter(&elf_with(&[])), Ok(false));
    }

    #[test]
    fn rejects_truncated_program_headers() {
        let mut elf = elf_with(&[1, 3]);
        elf.truncate(64 + 56 + 2);
        assert_eq!(elf_interpreter(&elf), Err("truncated program headers"));
    }

    #[test]
    fn rejects_non_elf() {
        assert_eq!(elf_interpreter(b"#!/bin/sh\n"), Err("no ELF magic"));
        assert_eq!(elf_interpreter(b"\x7fELF\x02\x01"), Err("truncated header"));
    }
}
