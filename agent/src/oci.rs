//! Turns an [`InstanceSpec`] into the OCI runtime spec libcontainer runs.
//! Pure: no I/O, so the security defaults are unit-tested.

use corral_proto::{InstanceId, InstanceSpec};
use oci_spec::runtime::{
    Arch, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompBuilder, LinuxSyscallBuilder, ProcessBuilder, RootBuilder, Spec,
};
use std::collections::HashSet;
use std::path::Path;

/// The capabilities every instance gets: enough to bind low ports, signal its
/// own processes and write audit records; nothing that reaches the host.
pub const DEFAULT_CAPS: [Capability; 3] = [
    Capability::AuditWrite,
    Capability::Kill,
    Capability::NetBindService,
];

/// Syscalls refused with EPERM: they change the host (time, modules, swap,
/// reboot, kernel keyring), escape or manipulate namespaces and mounts, or
/// widen the kernel attack surface (bpf, perf, userfaultfd). The rest is allowed.
pub const DENIED_SYSCALLS: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mount",
    "mount_setattr",
    "move_mount",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "quotactl",
    "quotactl_fd",
    "reboot",
    "request_key",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "syslog",
    "umount",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "vhangup",
];

#[derive(Debug, thiserror::Error)]
#[error("cannot build the OCI spec: {0}")]
pub struct OciError(String);

fn err(e: impl std::fmt::Display) -> OciError {
    OciError(e.to_string())
}

/// cgroup v2 `cpu.weight` (1..=10000) to cgroup v1 `cpu.shares` (2..=262144),
/// the inverse of the mapping runc and crun use the other way round.
pub fn weight_to_shares(weight: u32) -> u64 {
    let w = u64::from(weight.clamp(1, 10_000));
    2 + ((w - 1) * 262_142) / 9_999
}

pub fn seccomp_profile() -> Result<LinuxSeccomp, OciError> {
    let deny = LinuxSyscallBuilder::default()
        .names(
            DENIED_SYSCALLS
                .iter()
                .map(|s| (*s).to_owned())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::EPERM as u32)
        .build()
        .map_err(err)?;
    // Only the native ABI: a 32-bit syscall from an x86_64 process is killed
    // (libseccomp's bad-arch action) instead of bypassing the list.
    LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![Arch::ScmpArchX86_64])
        .syscalls(vec![deny])
        .build()
        .map_err(err)
}

/// Builds the runtime spec. `rootfs` is the instance's merged (overlay) root.
pub fn build(
    id: &InstanceId,
    spec: &InstanceSpec,
    rootfs: &Path,
    cgroup: &str,
    netns: Option<&Path>,
) -> Result<Spec, OciError> {
    let mut oci = Spec::default();

    let mut env: Vec<String> = vec![
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        format!("CORRAL_INSTANCE_ID={id}"),
        format!("CORRAL_INSTANCE_INDEX={}", spec.index),
        format!("CORRAL_APP={}", spec.app),
        format!("CORRAL_TENANT={}", spec.tenant),
    ];
    if let Some(port) = spec.ports.first() {
        env.push(format!("PORT={port}"));
    }
    // The spec's own env wins over the defaults above.
    env.retain(|e| {
        let name = e.split('=').next().unwrap_or_default();
        !spec.env.contains_key(name)
    });
    env.extend(spec.env.iter().map(|(k, v)| format!("{k}={v}")));

    let caps: HashSet<Capability> = DEFAULT_CAPS.into_iter().collect();
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(err)?;
    let mut process = ProcessBuilder::default()
        .terminal(false)
        .args(spec.command.clone())
        .env(env)
        .cwd("/")
        .no_new_privileges(true)
        .capabilities(capabilities)
        .build()
        .map_err(err)?;
    process.set_user(Default::default());
    oci.set_process(Some(process));

    oci.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(false)
            .build()
            .map_err(err)?,
    ));
    oci.set_hostname(Some(id.to_string()));

    let mem = (spec.resources.memory_mb * 1024 * 1024) as i64;
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(mem)
                .swap(mem)
                .build()
                .map_err(err)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .shares(weight_to_shares(spec.resources.cpu_weight))
                .build()
                .map_err(err)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(spec.resources.max_pids))
                .build()
                .map_err(err)?,
        )
        .build()
        .map_err(err)?;

    // Start from the default Linux section (namespaces incl. a new network
    // namespace, masked and read-only /proc and /sys paths) and add ours.
    let default_linux = oci.linux().clone().unwrap_or_default();
    let mut namespaces = default_linux.namespaces().clone().unwrap_or_default();
    if let Some(path) = netns {
        // Join the namespace the agent wired up instead of a new, empty one.
        for ns in namespaces
            .iter_mut()
            .filter(|n| n.typ() == LinuxNamespaceType::Network)
        {
            ns.set_path(Some(path.to_owned()));
        }
    }
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .masked_paths(default_linux.masked_paths().clone().unwrap_or_default())
        .readonly_paths(default_linux.readonly_paths().clone().unwrap_or_default())
        .devices(default_linux.devices().clone().unwrap_or_default())
        .resources(resources)
        .cgroups_path(cgroup)
        .seccomp(seccomp_profile()?)
        .build()
        .map_err(err)?;
    oci.set_linux(Some(linux));
    Ok(oci)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        serde_json::from_str(
            r#"{"tenant":"acme","app":"web","kind":"lrp","rootfs":"/srv/rootfs",
                "command":["/bin/sh","-c","echo hi"],"env":{"PORT":"9000","X":"y"},
                "resources":{"memory_mb":64,"cpu_weight":100,"max_pids":32},"ports":[8080]}"#,
        )
        .unwrap()
    }

    #[test]
    fn secure_defaults() {
        let id = InstanceId::new("web-0").unwrap();
        let oci = build(
            &id,
            &spec(),
            Path::new("/run/x/rootfs"),
            "/corral/web-0",
            None,
        )
        .unwrap();
        let p = oci.process().as_ref().unwrap();
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        assert_eq!(caps.effective().as_ref().unwrap().len(), 3);
        assert!(!caps
            .bounding()
            .as_ref()
            .unwrap()
            .contains(&Capability::SysAdmin));
        let linux = oci.linux().as_ref().unwrap();
        let sc = linux.seccomp().as_ref().unwrap();
        let denied = sc.syscalls().as_ref().unwrap()[0].names();
        for s in ["mount", "init_module", "bpf", "unshare", "setns"] {
            assert!(denied.iter().any(|d| d == s), "{s} must be denied");
        }
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        for t in [
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Mount,
        ] {
            assert!(ns.contains(&t), "{t:?}");
        }
        assert!(!linux.masked_paths().as_ref().unwrap().is_empty());
        assert!(!linux.readonly_paths().as_ref().unwrap().is_empty());
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/corral/web-0"))
        );
    }

    #[test]
    fn limits_and_env() {
        let id = InstanceId::new("web-0").unwrap();
        let oci = build(
            &id,
            &spec(),
            Path::new("/r"),
            "/c/web-0",
            Some(Path::new("/run/ns/web-0")),
        )
        .unwrap();
        let r = oci.linux().as_ref().unwrap().resources().as_ref().unwrap();
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(64 << 20));
        assert_eq!(r.pids().as_ref().unwrap().limit(), 32);
        let net = oci
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .unwrap()
            .clone();
        assert_eq!(net.path().as_deref(), Some(Path::new("/run/ns/web-0")));
        assert_eq!(
            r.cpu().as_ref().unwrap().shares(),
            Some(weight_to_shares(100))
        );
        let env = oci.process().as_ref().unwrap().env().clone().unwrap();
        assert!(
            env.contains(&"PORT=9000".to_owned()),
            "spec env overrides the default PORT"
        );
        assert!(!env.contains(&"PORT=8080".to_owned()));
        assert!(env.contains(&"CORRAL_INSTANCE_ID=web-0".to_owned()));
    }

    #[test]
    fn weight_mapping_is_monotonic_and_bounded() {
        assert_eq!(weight_to_shares(1), 2);
        assert_eq!(weight_to_shares(10_000), 262_144);
        let mut last = 0;
        for w in (1..=10_000).step_by(97) {
            let s = weight_to_shares(w);
            assert!(s >= last);
            last = s;
        }
    }
}
