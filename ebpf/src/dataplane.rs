//! Loading, pinning, attaching, and typed access to the maps.

use std::fmt::Display;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{
    Array, HashMap, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuHashMap, PerCpuValues,
};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle};
use aya::programs::{ProgramError, ProgramType, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};
use nix::errno::Errno;
use nix::sys::statfs::{statfs, BPF_FS_MAGIC};

use crate::abi::{self, c};
use crate::types::{
    Counter, Counters, Direction, DropReason, Endpoint, InstanceIface, InstanceNum, Policy,
    TenantNum,
};
use crate::Error;

/// Priority of corral's TC filters on an instance veth: 1, so that they run
/// before any other filter and isolation cannot be bypassed by another
/// filter's verdict.
pub const TC_PRIORITY: u16 = 1;

/// Handle of corral's TC filters (shown by `tc filter show` as `0xc0a1`).
/// With [`TC_PRIORITY`] it names the filter, so a restarted agent replaces
/// its own filters instead of adding duplicates.
pub const TC_HANDLE: u32 = 0xc0a1;

fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/instance.bpf.o"))
}

/// The two programs of the instance data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Program {
    /// `corral_from_instance`, TC ingress of the host-side veth.
    FromInstance,
    /// `corral_to_instance`, TC egress of the host-side veth.
    ToInstance,
}

impl Program {
    pub const ALL: [Program; 2] = [Program::FromInstance, Program::ToInstance];

    /// The C function name: the name in the object, in `bpftool prog` and
    /// in `tc filter show`.
    pub const fn name(self) -> &'static str {
        match self {
            Program::FromInstance => "corral_from_instance",
            Program::ToInstance => "corral_to_instance",
        }
    }

    pub const fn attach_type(self) -> TcAttachType {
        match self {
            Program::FromInstance => TcAttachType::Ingress,
            Program::ToInstance => TcAttachType::Egress,
        }
    }
}

/// What a map must look like; checked against pins left by an earlier run.
pub(crate) struct MapSpec {
    pub(crate) name: &'static str,
    pub(crate) kind: MapType,
    pub(crate) key_size: usize,
    pub(crate) value_size: usize,
    pub(crate) max_entries: u32,
}

const IFACES: &str = "ifaces";
const ENDPOINTS: &str = "endpoints";
const POLICY: &str = "policy";
const POLICY_PAIRS: &str = "policy_pairs";
const CONNTRACK: &str = "conntrack";
const INSTANCE_STATS: &str = "instance_stats";
const RETIRED_STATS: &str = "retired_stats";
const DROP_STATS: &str = "drop_stats";

fn map_specs() -> [MapSpec; 8] {
    let spec = |name, kind, key_size, value_size, max_entries| MapSpec {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
    };
    [
        spec(
            IFACES,
            MapType::Array,
            size_of::<u32>(),
            size_of::<abi::Iface>(),
            c::CORRAL_MAX_IFACES,
        ),
        spec(
            ENDPOINTS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<abi::Endpoint>(),
            c::CORRAL_MAX_ENDPOINTS,
        ),
        spec(
            POLICY,
            MapType::Hash,
            size_of::<abi::PolicyKey>(),
            size_of::<abi::PolicyValue>(),
            c::CORRAL_MAX_POLICIES,
        ),
        spec(
            POLICY_PAIRS,
            MapType::Hash,
            size_of::<abi::PairKey>(),
            size_of::<abi::Pair>(),
            c::CORRAL_MAX_POLICY_PAIRS,
        ),
        spec(
            CONNTRACK,
            MapType::LruHash,
            size_of::<abi::Flow>(),
            size_of::<abi::FlowState>(),
            c::CORRAL_MAX_FLOWS,
        ),
        spec(
            INSTANCE_STATS,
            MapType::PerCpuArray,
            size_of::<u32>(),
            size_of::<abi::Counter>(),
            2 * c::CORRAL_MAX_IFACES,
        ),
        spec(
            RETIRED_STATS,
            MapType::Hash,
            size_of::<abi::CounterKey>(),
            size_of::<abi::Counter>(),
            c::CORRAL_MAX_RETIRED_STATS,
        ),
        spec(
            DROP_STATS,
            MapType::PerCpuHash,
            size_of::<abi::DropKey>(),
            size_of::<abi::Counter>(),
            c::CORRAL_MAX_DROP_STATS,
        ),
    ]
}

/// The loaded data plane of one cell: both programs (loaded, not yet
/// attached anywhere) and typed handles on the pinned maps.
///
/// Dropping it detaches nothing: filters attached with [`Dataplane::attach`]
/// stay, running with the pinned maps, until [`Dataplane::detach`] or until
/// the interface goes away.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    restored: bool,
    ifaces: Array<MapData, abi::Iface>,
    endpoints: HashMap<MapData, u32, abi::Endpoint>,
    policy: HashMap<MapData, abi::PolicyKey, abi::PolicyValue>,
    policy_pairs: HashMap<MapData, abi::PairKey, abi::Pair>,
    conntrack: HashMap<MapData, abi::Flow, abi::FlowState>,
    instance_stats: PerCpuArray<MapData, Counter>,
    retired_stats: HashMap<MapData, abi::CounterKey, Counter>,
    drop_stats: PerCpuHashMap<MapData, abi::DropKey, Counter>,
    /// What `ifaces` holds, by slot (only the agent writes it).
    slots: BTreeMap<u32, (u32, InstanceIface)>,
    /// Slots handed out by [`Dataplane::reserve_ifindex`], not declared yet.
    reserved: BTreeSet<u32>,
    /// What `policy` holds (only the agent writes it): `policy_pairs` is
    /// derived from it.
    policies: BTreeSet<Policy>,
}

/// Number of interface slots (`CORRAL_MAX_IFACES`).
pub const SLOTS: u32 = c::CORRAL_MAX_IFACES;

/// The first ifindex [`Dataplane::reserve_ifindex`] hands out
/// (`CORRAL_IFINDEX_BASE`).
pub const IFINDEX_BASE: u32 = c::CORRAL_IFINDEX_BASE;

/// The `ifaces` slot of an interface: its entry is `ifaces[slot]`.
pub const fn slot_of(ifindex: u32) -> u32 {
    ifindex % SLOTS
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("pin_dir", &self.pin_dir)
            .field("restored", &self.restored)
            .finish_non_exhaustive()
    }
}

impl Dataplane {
    /// Loads the programs and opens the maps pinned in `pin_dir` (normally
    /// `/sys/fs/bpf/corral/<cell>`), creating and pinning the ones that do
    /// not exist yet. Maps pinned by an earlier run are reused as they are,
    /// so endpoints, policies and counters survive an agent restart; a pin
    /// whose type, key, value or capacity does not fit this build is an
    /// error ([`Error::IncompatiblePin`]), never silently replaced.
    ///
    /// Only one agent may use a pin directory at a time.
    pub fn load(pin_dir: &Path) -> Result<Self, Error> {
        ensure_bpffs(pin_dir)?;
        std::fs::create_dir_all(pin_dir).map_err(|source| Error::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        let specs = map_specs();
        let mut restored = true;
        for spec in &specs {
            restored &= check_pin(pin_dir, spec)?;
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object())
            .map_err(|source| {
                if errno_in(&source) == Some(Errno::EPERM) {
                    Error::PermissionDenied {
                        action: "creating the data plane's maps".to_owned(),
                        source: Box::new(source),
                    }
                } else {
                    Error::Object { source }
                }
            })?;
        for program in Program::ALL {
            let prog = classifier_mut(&mut ebpf, program)?;
            prog.load().map_err(|e| program_load_error(program, e))?;
        }

        let ifaces: Array<MapData, abi::Iface> = take(&mut ebpf, IFACES)?;
        let slots = read_slots(&ifaces)?;
        let policy: HashMap<MapData, abi::PolicyKey, abi::PolicyValue> = take(&mut ebpf, POLICY)?;
        let policies = read_policies(&policy)?;
        let mut dp = Self {
            ifaces,
            endpoints: take(&mut ebpf, ENDPOINTS)?,
            policy,
            policy_pairs: take(&mut ebpf, POLICY_PAIRS)?,
            conntrack: take(&mut ebpf, CONNTRACK)?,
            instance_stats: take(&mut ebpf, INSTANCE_STATS)?,
            retired_stats: take(&mut ebpf, RETIRED_STATS)?,
            drop_stats: take(&mut ebpf, DROP_STATS)?,
            ebpf,
            pin_dir: pin_dir.to_owned(),
            restored,
            slots,
            reserved: BTreeSet::new(),
            policies,
        };
        // An agent that died between writing a policy and its pair's
        // summary left them out of step: derive every summary again.
        let pairs: BTreeSet<abi::PairKey> = dp.policies.iter().map(pair_of).collect();
        for pair in pairs {
            dp.write_pair(pair)?;
        }
        Ok(dp)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Whether every map came from an earlier run's pins (an agent restart)
    /// rather than being created by this load.
    pub fn restored(&self) -> bool {
        self.restored
    }

    /// A loaded program, e.g. for `aya::programs::TestRun` or its
    /// `ProgramInfo`.
    pub fn program(&self, program: Program) -> Result<&SchedClassifier, Error> {
        self.ebpf
            .program(program.name())
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
            .ok_or_else(|| Error::NotInObject {
                what: format!("classifier {}", program.name()),
            })
    }

    /// Attaches both programs to the host-side veth `iface` (in the
    /// caller's network namespace): `corral_from_instance` at TC ingress,
    /// `corral_to_instance` at TC egress, adding the clsact qdisc if needed.
    /// Returns the interface's ifindex, the key of its
    /// [`set_interface`](Self::set_interface) entry; set that entry first,
    /// or the instance's traffic is dropped (`unknown_interface`).
    ///
    /// Idempotent and restart-safe: the filters are netlink TC filters at
    /// priority [`TC_PRIORITY`], handle [`TC_HANDLE`]. They outlive the
    /// process that attached them, so a filter already at that place (ours,
    /// from an earlier run) has its program replaced atomically, with no
    /// moment without a filter and no duplicate.
    pub fn attach(&mut self, iface: &str) -> Result<u32, Error> {
        let ifindex = ifindex(iface)?;
        ensure_clsact(iface)?;
        for program in Program::ALL {
            let prog = classifier_mut(&mut self.ebpf, program)?;
            attach_classifier(prog, program.name(), iface, program.attach_type())?;
        }
        tracing::debug!(iface, ifindex, "data plane attached");
        Ok(ifindex)
    }

    /// Removes corral's filters (found by program name, at any priority)
    /// from `iface`. Nothing attached, or no such interface, is not an error.
    /// The clsact qdisc stays; it goes with the interface.
    pub fn detach(&self, iface: &str) -> Result<(), Error> {
        for program in Program::ALL {
            detach_classifier(iface, program.attach_type(), program.name())?;
        }
        tracing::debug!(iface, "data plane detached");
        Ok(())
    }

    /// Reads `ifaces` back from the kernel. The interface methods work from
    /// a copy of it read at [`load`](Self::load) and kept by this
    /// `Dataplane`'s own writes; a process that only watches maps another
    /// process (the agent) writes calls this to see its changes.
    pub fn refresh(&mut self) -> Result<(), Error> {
        self.slots = read_slots(&self.ifaces)?;
        self.policies = read_policies(&self.policy)?;
        Ok(())
    }

    /// An ifindex for a new instance veth whose slot is free: the lowest
    /// free slot `s` gives [`IFINDEX_BASE`] + `s`. If some other interface
    /// already has that index, [`IFINDEX_BASE`] + `s` + k·[`SLOTS`] shares
    /// the slot. The slot stays reserved until
    /// [`set_interface`](Self::set_interface) declares it or
    /// [`unreserve`](Self::unreserve) gives it back.
    pub fn reserve_ifindex(&mut self) -> Result<u32, Error> {
        let slot = (0..SLOTS)
            .find(|s| !self.slots.contains_key(s) && !self.reserved.contains(s))
            .ok_or_else(|| Error::MapFull {
                map: IFACES,
                max_entries: SLOTS,
                action: "reserve a slot for a new instance interface".to_owned(),
            })?;
        self.reserved.insert(slot);
        Ok(IFINDEX_BASE + slot)
    }

    /// Gives back a slot reserved for `ifindex` and never declared.
    pub fn unreserve(&mut self, ifindex: u32) {
        self.reserved.remove(&slot_of(ifindex));
    }

    /// Declares the instance behind the host-side veth `ifindex`, in the
    /// veth's slot. Fails with [`Error::SlotTaken`] if another interface
    /// holds that slot. The slot's counters start from zero unless it
    /// already holds this instance on this interface (a restarted agent
    /// declaring it again, or the instance's address changing); those of a
    /// different instance that held it are folded into its tenant's first.
    pub fn set_interface(&mut self, ifindex: u32, iface: &InstanceIface) -> Result<(), Error> {
        let slot = slot_of(ifindex);
        let action = || {
            format!(
                "set interface {ifindex} to instance {} ({})",
                iface.instance, iface.addr
            )
        };
        match self.slots.get(&slot).copied() {
            Some((holder, _)) if holder != ifindex => {
                return Err(Error::SlotTaken {
                    ifindex,
                    slot,
                    slots: SLOTS,
                    holder,
                })
            }
            Some((_, old)) if old.instance == iface.instance => {}
            Some((_, old)) => self.retire_slot(slot, old.tenant)?,
            None => self.zero_slot(slot)?,
        }
        self.ifaces
            .set(slot, iface.to_raw(ifindex), 0)
            .map_err(|e| map_error(IFACES, SLOTS, action(), e))?;
        self.slots.insert(slot, (ifindex, *iface));
        self.reserved.remove(&slot);
        Ok(())
    }

    /// Frees the interface's slot; its traffic counters are folded into its
    /// tenant's ([`tenant_counter`](Self::tenant_counter) keeps counting
    /// them). Returns whether there was an entry.
    ///
    /// The entry goes first, so the programs drop (as `unknown_interface`)
    /// anything still arriving on the veth instead of counting it in a
    /// slot being emptied. An agent that dies between the steps loses the
    /// slot's unfolded counts, never counts them twice: a slot is zeroed
    /// when it is declared again.
    pub fn remove_interface(&mut self, ifindex: u32) -> Result<bool, Error> {
        let slot = slot_of(ifindex);
        let Some((_, old)) = self
            .slots
            .get(&slot)
            .copied()
            .filter(|(i, _)| *i == ifindex)
        else {
            return Ok(false);
        };
        self.ifaces
            .set(slot, abi::Iface::default(), 0)
            .map_err(|e| map_error(IFACES, 0, format!("remove interface {ifindex}"), e))?;
        self.slots.remove(&slot);
        self.retire_slot(slot, old.tenant)?;
        Ok(true)
    }

    pub fn interface(&self, ifindex: u32) -> Result<Option<InstanceIface>, Error> {
        Ok(self
            .slots
            .get(&slot_of(ifindex))
            .filter(|(i, _)| *i == ifindex)
            .map(|(_, iface)| *iface))
    }

    /// All entries, sorted by ifindex.
    pub fn interfaces(&self) -> Result<Vec<(u32, InstanceIface)>, Error> {
        let mut all: Vec<_> = self.slots.values().copied().collect();
        all.sort_by_key(|(ifindex, _)| *ifindex);
        Ok(all)
    }

    /// Adds a slot's counters to the tenant's retired totals, then zeroes them.
    fn retire_slot(&mut self, slot: u32, tenant: TenantNum) -> Result<(), Error> {
        for dir in Direction::ALL {
            let gone = self.slot_counter(slot, dir)?;
            if gone == Counter::default() {
                continue;
            }
            let key = abi::CounterKey {
                id: tenant.get(),
                dir: dir.raw(),
            };
            let before = found(self.retired_stats.get(&key, 0), RETIRED_STATS, || {
                format!("read the retired counters of tenant {tenant}")
            })?
            .unwrap_or_default();
            let total = [before, gone].iter().sum::<Counter>();
            self.retired_stats.insert(key, total, 0).map_err(|e| {
                map_error(
                    RETIRED_STATS,
                    c::CORRAL_MAX_RETIRED_STATS,
                    format!("keep the counters of tenant {tenant}"),
                    e,
                )
            })?;
        }
        self.zero_slot(slot)
    }

    fn zero_slot(&mut self, slot: u32) -> Result<(), Error> {
        let cpus = aya::util::nr_cpus().map_err(|(what, source)| Error::Map {
            map: INSTANCE_STATS,
            action: format!("count the CPUs ({what})"),
            source: MapError::from(source),
        })?;
        for dir in Direction::ALL {
            let zeros = PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(|e| {
                map_error(
                    INSTANCE_STATS,
                    0,
                    "zero a slot's counters",
                    MapError::from(e),
                )
            })?;
            self.instance_stats
                .set(slot * 2 + dir.raw(), zeros, 0)
                .map_err(|e| {
                    map_error(
                        INSTANCE_STATS,
                        0,
                        format!("zero the counters of slot {slot}"),
                        e,
                    )
                })?;
        }
        Ok(())
    }

    /// A slot's counter, summed over CPUs.
    fn slot_counter(&self, slot: u32, dir: Direction) -> Result<Counter, Error> {
        let values = self
            .instance_stats
            .get(&(slot * 2 + dir.raw()), 0)
            .map_err(|e| {
                map_error(
                    INSTANCE_STATS,
                    0,
                    format!("read the counters of slot {slot}"),
                    e,
                )
            })?;
        Ok(values.iter().sum())
    }

    /// Declares who owns `addr` (any instance of the cluster, on any cell).
    pub fn set_endpoint(&mut self, addr: Ipv4Addr, endpoint: &Endpoint) -> Result<(), Error> {
        self.endpoints
            .insert(abi::ipv4_to_raw(addr), endpoint.to_raw(), 0)
            .map_err(|e| {
                map_error(
                    ENDPOINTS,
                    c::CORRAL_MAX_ENDPOINTS,
                    format!("set endpoint {addr} (tenant {})", endpoint.tenant),
                    e,
                )
            })
    }

    /// Returns whether there was an entry.
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<bool, Error> {
        removed(
            self.endpoints.remove(&abi::ipv4_to_raw(addr)),
            ENDPOINTS,
            || format!("remove endpoint {addr}"),
        )
    }

    pub fn endpoint(&self, addr: Ipv4Addr) -> Result<Option<Endpoint>, Error> {
        let raw = found(
            self.endpoints.get(&abi::ipv4_to_raw(addr), 0),
            ENDPOINTS,
            || format!("read endpoint {addr}"),
        )?;
        Ok(raw.as_ref().and_then(Endpoint::from_raw))
    }

    /// All entries, sorted by address.
    pub fn endpoints(&self) -> Result<Vec<(Ipv4Addr, Endpoint)>, Error> {
        let mut all = Vec::new();
        for item in self.endpoints.iter() {
            let (addr, raw) = item.map_err(|e| map_error(ENDPOINTS, 0, "list endpoints", e))?;
            all.extend(Endpoint::from_raw(&raw).map(|e| (abi::ipv4_from_raw(addr), e)));
        }
        all.sort_by_key(|(addr, _)| *addr);
        Ok(all)
    }

    /// Allows what `policy` describes; see [`Policy`].
    pub fn set_policy(&mut self, policy: &Policy) -> Result<(), Error> {
        let key = policy.to_key()?;
        self.policy
            .insert(key, abi::PolicyValue::default(), 0)
            .map_err(|e| {
                map_error(
                    POLICY,
                    c::CORRAL_MAX_POLICIES,
                    format!("set policy {policy}"),
                    e,
                )
            })?;
        self.policies.insert(*policy);
        self.write_pair(pair_of(policy))
    }

    /// Returns whether the policy existed. New flows it allowed stop at
    /// once; replies of earlier flows pass until their conntrack entry
    /// expires (see the crate docs).
    pub fn remove_policy(&mut self, policy: &Policy) -> Result<bool, Error> {
        let key = policy.to_key()?;
        let existed = removed(self.policy.remove(&key), POLICY, || {
            format!("remove policy {policy}")
        })?;
        self.policies.remove(policy);
        self.write_pair(pair_of(policy))?;
        Ok(existed)
    }

    /// All policies, sorted.
    pub fn policies(&self) -> Result<Vec<Policy>, Error> {
        Ok(self.policies.iter().copied().collect())
    }

    /// Writes (or removes) the summary of a tenant pair's policies. A new
    /// kind is added to the summary only after its key is in `policy`, and
    /// dropped from it when its last key goes (callers write keys first),
    /// so the summary never hides a key the programs should find.
    fn write_pair(&mut self, pair: abi::PairKey) -> Result<(), Error> {
        let kinds = self
            .policies
            .iter()
            .filter(|p| pair_of(p) == pair)
            .fold(0, |k, p| k | p.kind());
        let action = || {
            format!(
                "summarise the policies from tenant {} to tenant {}",
                pair.from_tenant, pair.to_tenant
            )
        };
        if kinds == 0 {
            removed(self.policy_pairs.remove(&pair), POLICY_PAIRS, action)?;
            return Ok(());
        }
        self.policy_pairs
            .insert(pair, abi::Pair { kinds }, 0)
            .map_err(|e| map_error(POLICY_PAIRS, c::CORRAL_MAX_POLICY_PAIRS, action(), e))
    }

    /// Number of conntrack entries (flows a policy allowed, not yet evicted;
    /// expired entries are counted until the LRU map reuses them).
    pub fn conntrack_len(&self) -> Result<usize, Error> {
        let mut n = 0;
        for key in self.conntrack.keys() {
            key.map_err(|e| map_error(CONNTRACK, 0, "list conntrack entries", e))?;
            n += 1;
        }
        Ok(n)
    }

    /// Packets and bytes of a tenant that passed: its instances here and
    /// those gone, summed over CPUs.
    pub fn tenant_counter(&self, tenant: TenantNum, dir: Direction) -> Result<Counter, Error> {
        let key = abi::CounterKey {
            id: tenant.get(),
            dir: dir.raw(),
        };
        let mut total = found(self.retired_stats.get(&key, 0), RETIRED_STATS, || {
            format!("read the retired counters of tenant {tenant}")
        })?
        .unwrap_or_default();
        for (slot, (_, iface)) in &self.slots {
            if iface.tenant == tenant {
                total = [total, self.slot_counter(*slot, dir)?].iter().sum();
            }
        }
        Ok(total)
    }

    /// Packets and bytes of an instance with an interface here that passed,
    /// summed over CPUs (zero for any other instance).
    pub fn instance_counter(
        &self,
        instance: InstanceNum,
        dir: Direction,
    ) -> Result<Counter, Error> {
        match self.slots.iter().find(|(_, (_, i))| i.instance == instance) {
            Some((slot, _)) => self.slot_counter(*slot, dir),
            None => Ok(Counter::default()),
        }
    }

    /// Dropped packets and bytes, summed over CPUs. `tenant` is `None` for
    /// drops on interfaces missing from `ifaces`.
    pub fn drop_counter(
        &self,
        tenant: Option<TenantNum>,
        reason: DropReason,
    ) -> Result<Counter, Error> {
        let key = abi::DropKey {
            tenant: tenant.map_or(0, TenantNum::get),
            reason: reason.raw(),
        };
        read_counter(&self.drop_stats, &key, DROP_STATS)
    }

    /// Every counter, summed over CPUs (for a metrics scrape).
    pub fn counters(&self) -> Result<Counters, Error> {
        let mut out = Counters::default();
        let mut tenants: BTreeMap<(TenantNum, Direction), Counter> = BTreeMap::new();
        for item in self.retired_stats.iter() {
            let (key, value) = item.map_err(|e| map_error(RETIRED_STATS, 0, "list counters", e))?;
            if let (Some(t), Some(d)) = (TenantNum::new(key.id), Direction::from_raw(key.dir)) {
                tenants.insert((t, d), value);
            }
        }
        for (slot, (_, iface)) in &self.slots {
            for dir in Direction::ALL {
                let c = self.slot_counter(*slot, dir)?;
                let t = tenants.entry((iface.tenant, dir)).or_default();
                *t = [*t, c].iter().sum();
                out.instances.push((iface.instance, dir, c));
            }
        }
        out.tenants = tenants.into_iter().map(|((t, d), c)| (t, d, c)).collect();
        for item in self.drop_stats.iter() {
            let (key, values) = item.map_err(|e| map_error(DROP_STATS, 0, "list counters", e))?;
            if let Some(r) = DropReason::from_raw(key.reason) {
                out.drops
                    .push((TenantNum::new(key.tenant), r, values.iter().sum()));
            }
        }
        out.instances.sort_by_key(|(i, d, _)| (*i, *d));
        out.drops.sort_by_key(|(t, r, _)| (*t, *r));
        Ok(out)
    }

    /// Forgets a tenant's retired traffic and drop counters (those of its
    /// instances still here keep counting).
    pub fn remove_tenant_counters(&mut self, tenant: TenantNum) -> Result<(), Error> {
        let action = || format!("remove counters of tenant {tenant}");
        for dir in Direction::ALL {
            let key = abi::CounterKey {
                id: tenant.get(),
                dir: dir.raw(),
            };
            removed(self.retired_stats.remove(&key), RETIRED_STATS, action)?;
        }
        for reason in DropReason::ALL {
            let key = abi::DropKey {
                tenant: tenant.get(),
                reason: reason.raw(),
            };
            removed(self.drop_stats.remove(&key), DROP_STATS, action)?;
        }
        Ok(())
    }
}

/// Adds the clsact qdisc to `iface` unless it has one.
pub(crate) fn ensure_clsact(iface: &str) -> Result<(), Error> {
    match tc::qdisc_add_clsact(iface) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(Errno::EEXIST as i32) => Ok(()),
        Err(source) => Err(Error::Clsact {
            iface: iface.to_owned(),
            source,
        }),
    }
}

/// Attaches a loaded classifier to `iface` as a netlink TC filter at
/// [`TC_PRIORITY`] / [`TC_HANDLE`]. A filter already there (ours, from an
/// earlier run) gets its program replaced in place: never a duplicate, never
/// a moment without a filter. The filter outlives this process.
pub(crate) fn attach_classifier(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    attach_type: TcAttachType,
) -> Result<(), Error> {
    let attach_error = |source| Error::Attach {
        program: name,
        iface: iface.to_owned(),
        source,
    };
    let handle = TcHandle::from(TC_HANDLE);
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle,
        classid: None,
    });
    let link_id = match prog.attach_with_options(iface, attach_type, options) {
        Ok(id) => id,
        Err(ProgramError::TcError(TcError::NetlinkError(e)))
            if e.raw_os_error() == Some(Errno::EEXIST as i32) =>
        {
            // Our filter from an earlier run: replace its program.
            let existing =
                SchedClassifierLink::attached(iface, attach_type, TC_PRIORITY, handle, None)
                    .map_err(|source| Error::NoInterface {
                        iface: iface.to_owned(),
                        source,
                    })?;
            prog.attach_to_link(existing).map_err(attach_error)?
        }
        Err(e) => return Err(attach_error(e)),
    };
    // aya detaches the links it owns when the program is dropped; the
    // filter must outlive this process, so take it and let it go.
    let link = prog.take_link(link_id).map_err(attach_error)?;
    std::mem::forget(link);
    Ok(())
}

/// Removes the filters running program `name` from `iface`'s `attach_type`
/// hook. Nothing attached, or no such interface, is not an error.
pub(crate) fn detach_classifier(
    iface: &str,
    attach_type: TcAttachType,
    name: &'static str,
) -> Result<(), Error> {
    if ifindex(iface).is_err() {
        return Ok(());
    }
    match tc::qdisc_detach_program(iface, attach_type, name) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // No clsact qdisc: nothing was ever attached.
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(Errno::EINVAL as i32) => Ok(()),
        Err(source) => Err(Error::Detach {
            program: name,
            iface: iface.to_owned(),
            source,
        }),
    }
}

/// The policy's tenant pair.
fn pair_of(p: &Policy) -> abi::PairKey {
    abi::PairKey {
        from_tenant: p.from.get(),
        to_tenant: p.to.get(),
    }
}

/// The policies `policy` holds.
fn read_policies(
    policy: &HashMap<MapData, abi::PolicyKey, abi::PolicyValue>,
) -> Result<BTreeSet<Policy>, Error> {
    let mut all = BTreeSet::new();
    for key in policy.keys() {
        let key = key.map_err(|e| map_error(POLICY, 0, "list policies", e))?;
        all.extend(Policy::from_key(&key));
    }
    Ok(all)
}

/// The declared interfaces of `ifaces`, by slot.
fn read_slots(
    ifaces: &Array<MapData, abi::Iface>,
) -> Result<BTreeMap<u32, (u32, InstanceIface)>, Error> {
    let mut slots = BTreeMap::new();
    for slot in 0..SLOTS {
        let raw = ifaces
            .get(&slot, 0)
            .map_err(|e| map_error(IFACES, 0, format!("read slot {slot}"), e))?;
        if let Some(iface) = InstanceIface::from_raw(&raw) {
            slots.insert(slot, (raw.ifindex, iface));
        }
    }
    Ok(slots)
}

/// The ifindex of `iface` in the caller's network namespace.
pub fn ifindex(iface: &str) -> Result<u32, Error> {
    nix::net::if_::if_nametoindex(iface).map_err(|errno| Error::NoInterface {
        iface: iface.to_owned(),
        source: io::Error::from(errno),
    })
}

/// Fails unless `pin_dir`, or its closest existing ancestor, is on bpffs.
pub(crate) fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or_else(|| Path::new("/"));
    let fs = statfs(existing).map_err(|errno| Error::PinDir {
        path: existing.to_owned(),
        source: io::Error::from(errno),
    })?;
    if fs.filesystem_type() == BPF_FS_MAGIC {
        Ok(())
    } else {
        Err(Error::NotBpffs {
            path: pin_dir.to_owned(),
        })
    }
}

/// Checks a pin left by an earlier run. Returns whether it exists.
pub(crate) fn check_pin(pin_dir: &Path, spec: &MapSpec) -> Result<bool, Error> {
    let path = pin_dir.join(spec.name);
    if !path.exists() {
        return Ok(false);
    }
    let expected = describe(
        format!("{:?}", spec.kind),
        spec.key_size,
        spec.value_size,
        spec.max_entries,
    );
    let incompatible = |found: String| Error::IncompatiblePin {
        path: path.clone(),
        dir: pin_dir.to_owned(),
        found,
        expected: expected.clone(),
    };
    let info = MapInfo::from_pin(&path).map_err(|e| incompatible(format!("not a map: {e}")))?;
    let kind = info
        .map_type()
        .map_or_else(|_| "an unknown map type".to_owned(), |t| format!("{t:?}"));
    let found = describe(
        kind,
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    if found == expected {
        Ok(true)
    } else {
        Err(incompatible(found))
    }
}

fn describe(kind: String, key: usize, value: usize, max_entries: u32) -> String {
    format!("{kind}, key {key} B, value {value} B, {max_entries} entries")
}

fn classifier_mut(ebpf: &mut Ebpf, program: Program) -> Result<&mut SchedClassifier, Error> {
    ebpf.program_mut(program.name())
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .ok_or_else(|| Error::NotInObject {
            what: format!("classifier {}", program.name()),
        })
}

pub(crate) fn take<M: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<M, Error> {
    let map = ebpf.take_map(name).ok_or_else(|| Error::NotInObject {
        what: format!("map {name}"),
    })?;
    M::try_from(map).map_err(|e| map_error(name, 0, "open the map", e))
}

fn program_load_error(program: Program, source: ProgramError) -> Error {
    if errno_in(&source) == Some(Errno::EPERM) {
        return Error::PermissionDenied {
            action: format!("loading program {}", program.name()),
            source: Box::new(source),
        };
    }
    if let Ok(false) = aya::sys::is_program_supported(ProgramType::SchedClassifier) {
        return Error::Unsupported {
            release: kernel_release(),
            what: "TC classifier (BPF_PROG_TYPE_SCHED_CLS) programs",
        };
    }
    Error::ProgramLoad {
        program: program.name(),
        source,
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown release".to_owned(), |s| s.trim().to_owned())
}

/// The errno of the first `io::Error` in an error's chain.
pub(crate) fn errno_in(error: &(dyn std::error::Error + 'static)) -> Option<Errno> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(code) = e
            .downcast_ref::<io::Error>()
            .and_then(io::Error::raw_os_error)
        {
            return Some(Errno::from_raw(code));
        }
        next = e.source();
    }
    None
}

fn is_not_found(error: &MapError) -> bool {
    matches!(error, MapError::KeyNotFound | MapError::ElementNotFound)
        || errno_in(error) == Some(Errno::ENOENT)
}

pub(crate) fn map_error(
    map: &'static str,
    max_entries: u32,
    action: impl Display,
    source: MapError,
) -> Error {
    if max_entries > 0 && errno_in(&source) == Some(Errno::E2BIG) {
        return Error::MapFull {
            map,
            max_entries,
            action: action.to_string(),
        };
    }
    Error::Map {
        map,
        action: action.to_string(),
        source,
    }
}

pub(crate) fn removed(
    result: Result<(), MapError>,
    map: &'static str,
    action: impl Fn() -> String,
) -> Result<bool, Error> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(map_error(map, 0, action(), e)),
    }
}

pub(crate) fn found<V>(
    result: Result<V, MapError>,
    map: &'static str,
    action: impl Fn() -> String,
) -> Result<Option<V>, Error> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(map_error(map, 0, action(), e)),
    }
}

fn read_counter<K: Pod>(
    map: &PerCpuHashMap<MapData, K, Counter>,
    key: &K,
    name: &'static str,
) -> Result<Counter, Error> {
    let per_cpu = found(map.get(key, 0), name, || "read a counter".to_owned())?;
    Ok(per_cpu
        .map(|values| values.iter().sum())
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loading_outside_bpffs_fails_before_touching_anything() {
        let dir = std::env::temp_dir().join(format!("corral-ebpf-test-{}", std::process::id()));
        let err = Dataplane::load(&dir.join("cell")).unwrap_err();
        assert!(matches!(err, Error::NotBpffs { .. }), "{err:?}");
        assert!(
            err.to_string().contains("mount -t bpf bpf /sys/fs/bpf"),
            "{err}"
        );
        assert!(!dir.exists());
    }

    #[test]
    fn map_specs_name_every_map_of_the_object_once() {
        let specs = map_specs();
        let mut names: Vec<&str> = specs.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), specs.len());
        for name in names {
            assert!(
                name.len() <= 15,
                "map name {name} is longer than the kernel keeps"
            );
        }
    }

    #[test]
    fn errno_is_found_through_the_error_chain() {
        let err = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: io::Error::from_raw_os_error(Errno::ENOENT as i32),
        });
        assert!(is_not_found(&err));
        assert!(is_not_found(&MapError::KeyNotFound));
        let full = MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: io::Error::from_raw_os_error(Errno::E2BIG as i32),
        });
        let msg = map_error(ENDPOINTS, 65536, "set endpoint 10.0.0.1", full).to_string();
        assert_eq!(
            msg,
            "map endpoints is full (65536 entries): cannot set endpoint 10.0.0.1"
        );
    }

    #[test]
    fn the_embedded_object_has_every_program_and_map() {
        let obj = object_strings();
        for p in Program::ALL {
            assert!(
                obj.contains(&p.name().to_owned()),
                "no program {}",
                p.name()
            );
        }
        for spec in map_specs() {
            assert!(obj.contains(&spec.name.to_owned()), "no map {}", spec.name);
        }
    }

    /// Symbol names in the embedded ELF object (no kernel needed).
    fn object_strings() -> Vec<String> {
        let obj = object();
        // Every program and map is a NUL-terminated symbol in .strtab.
        obj.split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .map(str::to_owned)
            .collect()
    }
}
