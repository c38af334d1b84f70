use std::io;
use std::path::PathBuf;

use aya::maps::MapError;
use aya::programs::tc::TcError;
use aya::programs::ProgramError;
use aya::EbpfError;

/// Everything that can go wrong in the data plane. Messages name the object
/// and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} is not on a bpf filesystem: mount one with `mount -t bpf bpf /sys/fs/bpf`")]
    NotBpffs { path: PathBuf },

    #[error("cannot use pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "pinned map {path} does not fit this build ({found}; this build needs {expected}): \
         stop the agent and remove {dir} to start over (its endpoints, policies and counters are lost)"
    )]
    IncompatiblePin {
        path: PathBuf,
        dir: PathBuf,
        found: String,
        expected: String,
    },

    #[error("permission denied while {action}: the agent needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (or root)")]
    PermissionDenied {
        action: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("this kernel ({release}) cannot run {what}: corral's data plane needs a kernel with TC classifier programs and BTF")]
    Unsupported { release: String, what: &'static str },

    #[error("cannot load the eBPF object")]
    Object {
        #[source]
        source: EbpfError,
    },

    #[error("the kernel refused program {program} (the cause has the verifier log)")]
    ProgramLoad {
        program: &'static str,
        #[source]
        source: ProgramError,
    },

    #[error("the embedded eBPF object has no {what}: the object and the loader are out of step")]
    NotInObject { what: String },

    #[error("map {map} is full ({max_entries} entries): cannot {action}")]
    MapFull {
        map: &'static str,
        max_entries: u32,
        action: String,
    },

    #[error(
        "interface {ifindex} cannot be declared: its slot {slot} (ifindex % {slots}) \
         belongs to interface {holder}; give instance veths the ifindexes \
         Dataplane::reserve_ifindex hands out"
    )]
    SlotTaken {
        ifindex: u32,
        slot: u32,
        slots: u32,
        holder: u32,
    },

    #[error("cannot {action} (map {map})")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: MapError,
    },

    #[error("no network interface {iface} in this network namespace")]
    NoInterface {
        iface: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot add the clsact qdisc to {iface}")]
    Clsact {
        iface: String,
        #[source]
        source: TcError,
    },

    #[error("cannot attach {program} to {iface}")]
    Attach {
        program: &'static str,
        iface: String,
        #[source]
        source: ProgramError,
    },

    #[error("cannot detach {program} from {iface}")]
    Detach {
        program: &'static str,
        iface: String,
        #[source]
        source: TcError,
    },

    #[error("invalid policy: {reason}")]
    InvalidPolicy { reason: String },

    #[error("invalid service: {reason}")]
    InvalidService { reason: String },

    #[error("cannot {action}: {reason}")]
    Link { action: String, reason: String },
}
