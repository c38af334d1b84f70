//! Where an instance's files live. One place decides, so the agent, the shim
//! and the clean-up agree.

use corral_proto::InstanceId;
use std::path::{Path, PathBuf};

/// cgroup v1 controllers the agent reads and limits through.
pub const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";
/// The cgroup2 hierarchy on a hybrid host.
pub const CGROUP2_HYBRID: &str = "/sys/fs/cgroup/unified";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub layers_dir: PathBuf,
    pub cgroup_root: String,
}

/// The paths of one instance.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstancePaths {
    /// Durable: spec.json, logs/, layer/.
    pub data: PathBuf,
    /// Runtime: shim record, bundle, container state, rootfs mount point.
    pub run: PathBuf,
    /// The writable layer (overlay upper and work dirs); the mount point of
    /// the instance's own filesystem when disk limits are enforced.
    pub layer: PathBuf,
    /// The cgroup path below each controller mount, e.g. `/corral/web-0`.
    pub cgroup: String,
}

impl Layout {
    pub fn instances_data(&self) -> PathBuf {
        self.data_dir.join("instances")
    }

    pub fn instances_run(&self) -> PathBuf {
        self.run_dir.join("instances")
    }

    /// Present while the cell is evacuating (draining): `{"since": ...}`.
    /// On the data dir, so an agent restart (or a node reboot) keeps
    /// draining until it is cancelled.
    pub fn evacuation(&self) -> PathBuf {
        self.data_dir.join("evacuation.json")
    }

    pub fn instance(&self, id: &InstanceId) -> InstancePaths {
        InstancePaths {
            data: self.instances_data().join(id.as_str()),
            run: self.instances_run().join(id.as_str()),
            layer: self.layers_dir.join(id.as_str()),
            cgroup: format!("/{}/{}", self.cgroup_root, id),
        }
    }

    /// The agent's own cgroup2 directory that holds every instance's cgroup2
    /// directory (cgroup-BPF programs attach here).
    pub fn cgroup2_root(&self) -> PathBuf {
        Path::new(CGROUP2_HYBRID).join(&self.cgroup_root)
    }
}

impl InstancePaths {
    pub fn spec(&self) -> PathBuf {
        self.data.join("spec.json")
    }
    pub fn logs(&self) -> PathBuf {
        self.data.join("logs")
    }
    pub fn log_file(&self) -> PathBuf {
        self.logs().join("output.log")
    }
    /// The sparse filesystem image behind `layer` (when disk limits are enforced).
    pub fn layer_image(&self) -> PathBuf {
        let mut s = self.layer.as_os_str().to_owned();
        s.push(".img");
        PathBuf::from(s)
    }
    pub fn upper(&self) -> PathBuf {
        self.layer.join("upper")
    }
    pub fn work(&self) -> PathBuf {
        self.layer.join("work")
    }
    pub fn shim_log(&self) -> PathBuf {
        self.data.join("shim.log")
    }
    /// What the agent hands the shim.
    pub fn launch(&self) -> PathBuf {
        self.run.join("launch.json")
    }
    /// Locked (`flock`) by the instance's shim from before its first
    /// record until it exits, and briefly by an agent that finds no record:
    /// so a start still under way is told from one that died, and a shim
    /// that comes late finds its start called off.
    pub fn shim_lock(&self) -> PathBuf {
        self.run.join("shim.lock")
    }
    /// What the shim records: its pid, the container's pid, the status.
    pub fn record(&self) -> PathBuf {
        self.run.join("record.json")
    }
    /// Grace period of a requested stop, written before the shim is signalled.
    pub fn stop_request(&self) -> PathBuf {
        self.run.join("stop")
    }
    /// The bind mount pinning the instance's network namespace.
    pub fn netns(&self) -> PathBuf {
        self.run.join("netns")
    }
    /// The instance's network attachment (address, host interface).
    pub fn net(&self) -> PathBuf {
        self.run.join("net.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.run.join("bundle")
    }
    pub fn rootfs_mount(&self) -> PathBuf {
        self.run.join("rootfs")
    }
    /// libcontainer's state root (it adds `<id>/` below).
    pub fn container_state(&self) -> PathBuf {
        self.run.join("container")
    }
    pub fn cgroup_v1(&self, controller: &str) -> PathBuf {
        Path::new(CGROUP_MOUNT)
            .join(controller)
            .join(self.cgroup.trim_start_matches('/'))
    }
    pub fn cgroup2(&self) -> PathBuf {
        Path::new(CGROUP2_HYBRID).join(self.cgroup.trim_start_matches('/'))
    }
}
