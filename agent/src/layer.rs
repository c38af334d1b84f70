//! Instances' writable layers and their disk limits.
//!
//! Each instance writes into an overlay whose upper and work directories
//! live on a filesystem of its own: a sparse ext4 image of `disk_mb` in
//! `<layers_dir>/<id>.img`, without a journal (the layer is scratch space,
//! discarded with the instance), loop-mounted on `<layers_dir>/<id>/`.
//! Images are sparse copies of a per-size template formatted once
//! (`<layers_dir>/.templates/`), and the loop device is bound with
//! `LOOP_CONFIGURE` directly: a start costs a copy of a few hundred KiB of
//! metadata and two ioctls, not a `mkfs` and a `mount` process. A write past the limit fails with ENOSPC inside the
//! instance and nobody else's space is touched. Sparse images take only what
//! is written from the host disk.
//!
//! Why not XFS/ext4 project quotas (Docker's overlay2 way)? The kernels we
//! run on are built without CONFIG_QUOTA ("quota support not available in
//! this kernel"), verified on 2026-11-25. With `[disk] enforce = false` the
//! layer is a plain directory and `disk_mb` is only accounted.

use crate::paths::InstancePaths;
use crate::sys;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Creates the layer (image, filesystem, mount when `enforce`) and the
/// overlay directories in it. Errors name what failed.
pub fn create(p: &InstancePaths, disk_mb: u64, enforce: bool) -> Result<(), String> {
    std::fs::create_dir_all(&p.layer)
        .map_err(|e| format!("cannot create {}: {e}", p.layer.display()))?;
    if enforce {
        let err = |what: &str, path: &Path| {
            let path = path.display().to_string();
            let what = what.to_owned();
            move |e: std::io::Error| format!("{what} {path}: {e}")
        };
        let img = p.layer_image();
        let template = template(p.layer.parent().unwrap_or(Path::new("/")), disk_mb)?;
        {
            let src = std::fs::File::open(&template).map_err(err("cannot open", &template))?;
            let dst = std::fs::File::create(&img).map_err(err("cannot create", &img))?;
            sys::copy_sparse(&src, &dst).map_err(err("cannot copy the disk template to", &img))?;
        }
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&img)
            .map_err(err("cannot open", &img))?;
        let (dev, _dev_file) =
            sys::attach_loop(&f).map_err(err("cannot attach a loop device to", &img))?;
        // The open loop device (and, after the mount, the mount) keep the
        // binding; once both are gone the device clears itself.
        nix::mount::mount(
            Some(&dev),
            &p.layer,
            Some("ext4"),
            nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
            None::<&str>,
        )
        .map_err(|e| {
            format!(
                "cannot mount the instance's disk {} on {}: {e}",
                dev.display(),
                p.layer.display()
            )
        })?;
    }
    for d in [p.upper(), p.work()] {
        std::fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    Ok(())
}

/// A freshly formatted, empty image of `disk_mb`, made once per size and
/// copied (sparsely: only its metadata) for every instance, so a start does
/// not pay for `mkfs`.
fn template(layers_dir: &Path, disk_mb: u64) -> Result<PathBuf, String> {
    let dir = layers_dir.join(".templates");
    let path = dir.join(format!("ext4-{disk_mb}m.img"));
    if path.exists() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Formatted beside its final name and renamed into place, so a reader
    // never sees half an image; a concurrent maker just loses the rename race.
    let tmp = dir.join(format!("ext4-{disk_mb}m.img.{}", std::process::id()));
    let f =
        std::fs::File::create(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    f.set_len(disk_mb << 20)
        .map_err(|e| format!("cannot size {}: {e}", tmp.display()))?;
    drop(f);
    let made = run(
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
            .arg(&tmp),
        "formatting the instance's disk (mkfs.ext4, from e2fsprogs)",
    )
    .and_then(|()| {
        std::fs::rename(&tmp, &path).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    made.map(|()| path)
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
