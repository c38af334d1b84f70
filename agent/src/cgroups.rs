//! Reading an instance's usage from its cgroups, and removing them. Thin
//! file access; the paths come from [`InstancePaths`].

use crate::paths::{InstancePaths, CGROUP_MOUNT};
use std::path::Path;

/// Every v1 controller libcontainer may have made a directory under.
const ALL_V1: [&str; 13] = [
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "blkio",
    "pids",
    "net_cls",
    "net_prio",
    "hugetlb",
    "perf_event",
    "rdma",
];

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub cpu_ns: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub oom_kills: Option<u64>,
    pub pids: Option<u64>,
    /// Filled in from the instance's disk, not its cgroups.
    pub disk_bytes: Option<u64>,
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Parses the `oom_kill N` line of v1 `memory.oom_control`.
pub fn parse_oom_kills(oom_control: &str) -> Option<u64> {
    oom_control
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

pub fn read_v1(p: &InstancePaths) -> Usage {
    let mem = p.cgroup_v1("memory");
    Usage {
        cpu_ns: read_u64(&p.cgroup_v1("cpuacct").join("cpuacct.usage")),
        memory_bytes: read_u64(&mem.join("memory.usage_in_bytes")),
        memory_limit_bytes: read_u64(&mem.join("memory.limit_in_bytes")),
        oom_kills: std::fs::read_to_string(mem.join("memory.oom_control"))
            .ok()
            .and_then(|s| parse_oom_kills(&s)),
        pids: read_u64(&p.cgroup_v1("pids").join("pids.current")),
        disk_bytes: None,
    }
}

/// Removes the instance's cgroup directories (v1 controllers and, when
/// `cgroup2`, its cgroup2 directory). Directories still holding processes
/// stay (rmdir fails with EBUSY) and are reported.
pub fn remove(p: &InstancePaths, cgroup2: bool) {
    let mut dirs: Vec<_> = ALL_V1.iter().map(|c| p.cgroup_v1(c)).collect();
    if cgroup2 {
        dirs.push(p.cgroup2());
    }
    for d in dirs {
        match std::fs::remove_dir(&d) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("cannot remove cgroup {}: {e}", d.display()),
        }
    }
}

/// Creates the agent's parent cgroups (v1 controllers it limits through and
/// the cgroup2 directory) so that instance cgroups can be made below them.
pub fn ensure_roots(cgroup_root: &str, cgroup2_root: Option<&Path>) -> std::io::Result<()> {
    for c in crate::paths::V1_CONTROLLERS {
        let d = Path::new(CGROUP_MOUNT).join(c).join(cgroup_root);
        std::fs::create_dir_all(&d)?;
    }
    if let Some(d) = cgroup2_root {
        std::fs::create_dir_all(d)?;
    }
    Ok(())
}

/// Removes the agent's parent cgroups if they are empty (used by tests and
/// the demo to leave nothing behind).
pub fn remove_roots(cgroup_root: &str, cgroup2_root: Option<&Path>) {
    for c in ALL_V1 {
        let _ = std::fs::remove_dir(Path::new(CGROUP_MOUNT).join(c).join(cgroup_root));
    }
    if let Some(d) = cgroup2_root {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_control_parsing() {
        let s = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(parse_oom_kills(s), Some(2));
        assert_eq!(parse_oom_kills("oom_kill_disable 0\n"), None);
    }
}
