//! Start-up checks: the agent refuses to start, naming what is missing and
//! how to fix it, rather than failing later on the first instance.

use caps::Capability;
use std::collections::HashSet;

/// What the checks look at; read by [`Facts::read`], faked in tests.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub effective_caps: HashSet<Capability>,
    pub mountinfo: String,
    pub filesystems: String,
}

const NEEDED: &[(Capability, &str)] = &[
    (Capability::CAP_SYS_ADMIN, "mounts, namespaces and cgroups"),
    (Capability::CAP_NET_ADMIN, "instance network interfaces"),
    (Capability::CAP_KILL, "signalling instances"),
    (Capability::CAP_SETUID, "running instance processes"),
    (Capability::CAP_SETGID, "running instance processes"),
    (Capability::CAP_SETPCAP, "dropping instance capabilities"),
    (
        Capability::CAP_DAC_OVERRIDE,
        "instance state and cgroup files",
    ),
    (Capability::CAP_CHOWN, "preparing instance filesystems"),
    (Capability::CAP_MKNOD, "instance /dev"),
    (
        Capability::CAP_SYS_CHROOT,
        "entering instance root filesystems",
    ),
];

impl Facts {
    pub fn read() -> Facts {
        Facts {
            effective_caps: caps::read(None, caps::CapSet::Effective).unwrap_or_default(),
            mountinfo: std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
            filesystems: std::fs::read_to_string("/proc/filesystems").unwrap_or_default(),
        }
    }
}

/// Mounts bpffs at /sys/fs/bpf when it is not mounted yet, as systemd does
/// on most hosts (and as an `ip netns exec` mount namespace needs).
pub fn ensure_bpffs(mountinfo: &str) -> Result<bool, String> {
    if has_bpffs(mountinfo) {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpf"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("mode=0700"),
    )
    .map(|()| true)
    .map_err(|e| format!("cannot mount bpffs at /sys/fs/bpf: {e}"))
}

pub fn has_bpffs(mountinfo: &str) -> bool {
    mounts(mountinfo)
        .iter()
        .any(|(mp, ty, _)| *mp == "/sys/fs/bpf" && *ty == "bpf")
}

/// (mount point, filesystem type, super options) of each mount.
fn mounts(mountinfo: &str) -> Vec<(&str, &str, &str)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mp = pre.split_whitespace().nth(4)?;
            let mut p = post.split_whitespace();
            let fstype = p.next()?;
            let _source = p.next();
            Some((mp, fstype, p.next().unwrap_or("")))
        })
        .collect()
}

/// Every problem found, each with what to do about it.
pub fn check(f: &Facts) -> Vec<String> {
    let mut p = Vec::new();
    let missing: Vec<String> = NEEDED
        .iter()
        .filter(|(c, _)| !f.effective_caps.contains(c))
        .map(|(c, why)| format!("{c} ({why})"))
        .collect();
    if !missing.is_empty() {
        p.push(format!(
            "missing capabilities: {}; run the agent as root or grant them (AmbientCapabilities= in the unit file)",
            missing.join(", ")
        ));
    }
    if !f.effective_caps.contains(&Capability::CAP_BPF)
        && !f.effective_caps.contains(&Capability::CAP_SYS_ADMIN)
    {
        p.push("missing capability CAP_BPF (or CAP_SYS_ADMIN) for the data plane".into());
    }
    let m = mounts(&f.mountinfo);
    if !has_bpffs(&f.mountinfo) {
        p.push("no bpffs at /sys/fs/bpf: mount it with `mount -t bpf bpf /sys/fs/bpf`".into());
    }
    for ctrl in crate::paths::V1_CONTROLLERS {
        let found = m.iter().any(|(mp, ty, opts)| {
            *ty == "cgroup"
                && mp.starts_with("/sys/fs/cgroup/")
                && opts.split(',').any(|o| o == ctrl)
        });
        if !found {
            p.push(format!(
                "cgroup v1 controller {ctrl:?} is not mounted under /sys/fs/cgroup: corral needs the v1 or hybrid cgroup layout (systemd.unified_cgroup_hierarchy=0)"
            ));
        }
    }
    if !f
        .filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("overlay"))
    {
        p.push("the kernel has no overlay filesystem: load it with `modprobe overlay`".into());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
30 1 0:26 / /sys/fs/bpf rw,nosuid - bpf bpf rw,mode=700
31 1 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 1 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
33 1 0:29 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct
34 1 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
";

    fn good() -> Facts {
        Facts {
            effective_caps: caps::all(),
            mountinfo: MOUNTINFO.into(),
            filesystems: "nodev\tproc\nnodev\toverlay\n".into(),
        }
    }

    #[test]
    fn a_good_host_passes() {
        assert_eq!(check(&good()), Vec::<String>::new());
    }

    #[test]
    fn each_missing_piece_is_named() {
        let mut f = good();
        f.effective_caps.remove(&Capability::CAP_NET_ADMIN);
        f.mountinfo = MOUNTINFO
            .lines()
            .skip(1)
            .filter(|l| !l.contains("pids"))
            .collect::<Vec<_>>()
            .join("\n");
        f.filesystems = "nodev\tproc\n".into();
        let p = check(&f);
        assert_eq!(p.len(), 4, "{p:#?}");
        assert!(p[0].contains("CAP_NET_ADMIN"));
        assert!(p.iter().any(|x| x.contains("bpffs")));
        assert!(p.iter().any(|x| x.contains("\"pids\"")));
        assert!(p.iter().any(|x| x.contains("overlay")));
    }
}
