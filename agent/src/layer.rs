//! Instances' writable layers and their disk limits.
//!
//! Each instance writes into an overlay whose upper and work directories
//! live on a filesystem of its own: a sparse ext4 image of `disk_mb` in
//! `<layers_dir>/<id>.img`, formatted without a journal (the layer is
//! scratch space, discarded with the instance) and loop-mounted on
//! `<layers_dir>/<id>/`. A write past the limit fails with ENOSPC inside the
//! instance and nobody else's space is touched. Sparse images take only what
//! is written from the host disk.
//!
//! Why not XFS/ext4 project quotas (Docker's overlay2 way)? The kernels we
//! run on are built without CONFIG_QUOTA ("quota support not available in
//! this kernel"), verified on 2026-11-25. With `[disk] enforce = false` the
//! layer is a plain directory and `disk_mb` is only accounted.

use crate::paths::InstancePaths;
use std::process::Command;

/// Creates the layer (image, filesystem, mount when `enforce`) and the
/// overlay directories in it. Errors name what failed.
pub fn create(p: &InstancePaths, disk_mb: u64, enforce: bool) -> Result<(), String> {
    std::fs::create_dir_all(&p.layer)
        .map_err(|e| format!("cannot create {}: {e}", p.layer.display()))?;
    if enforce {
        let img = p.layer_image();
        let f = std::fs::File::create(&img)
            .map_err(|e| format!("cannot create {}: {e}", img.display()))?;
        f.set_len(disk_mb << 20)
            .map_err(|e| format!("cannot size {}: {e}", img.display()))?;
        drop(f);
        run(
            Command::new("mkfs.ext4")
                .args([
                    "-q",
                    "-F",
                    "-O",
                    "^has_journal",
                    "-E",
                    "nodiscard,lazy_itable_init=1",
                    "-m",
                    "0",
                ])
                .arg(&img),
            "formatting the instance's disk (mkfs.ext4, from e2fsprogs)",
        )?;
        run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nodev,nosuid"])
                .arg(&img)
                .arg(&p.layer),
            "mounting the instance's disk",
        )?;
    }
    for d in [p.upper(), p.work()] {
        std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    Ok(())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Unmounts and removes the layer and its image. Idempotent.
pub fn remove(p: &InstancePaths) {
    // Lazy: the loop device is released (autoclear) once the last user of
    // the filesystem is gone.
    let _ = nix::mount::umount2(&p.layer, nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&p.layer);
    let _ = std::fs::remove_file(p.layer_image());
}

/// Bytes used on the instance's own disk, when it has one.
pub fn usage(p: &InstancePaths) -> Option<u64> {
    std::fs::metadata(p.layer_image()).ok()?;
    let s = nix::sys::statvfs::statvfs(&p.layer).ok()?;
    Some((s.blocks() - s.blocks_free()) as u64 * s.fragment_size() as u64)
}
