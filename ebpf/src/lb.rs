//! East-west service load balancing at the socket layer (`lb.bpf.c`).
//!
//! Four `cgroup/*4` programs, attached to the cgroup2 directory that holds
//! the instances, send a socket aimed at a service address (VIP:port) to
//! one of the service's ready backends and make that backend look like the
//! VIP to the application:
//!
//! | program | hook | does |
//! |---|---|---|
//! | `corral_lb_connect4` | `connect()` | picks a backend at random, rewrites the destination; no ready backend: `ECONNREFUSED` at once |
//! | `corral_lb_sendmsg4` | unconnected UDP `sendto()` | the same, per datagram |
//! | `corral_lb_recvmsg4` | UDP `recvfrom()` | the backend's address reads as the VIP |
//! | `corral_lb_getpeername4` | `getpeername()` | the same |
//!
//! The choice happens once per connection, so packets on the wire carry the
//! backend's address: the tenant isolation programs at the veths see real
//! endpoints and need no knowledge of services.
//!
//! # Maps (pinned beside the instance maps)
//!
//! | name | type | key → value |
//! |---|---|---|
//! | `lb_services` | hash, 16384 | `corral_lb_service_key {vip, port, proto}` → `corral_lb_service {id, count, flags, ring_gen, ring_size}` |
//! | `lb_slots` | array, 16385 | service id → `__u32[256]`, its backend ids (the first `count` are the list) |
//! | `lb_backends` | hash, 65536 | backend id → `corral_lb_backend {addr, port}` |
//! | `lb_socks` | LRU hash, 65536 | `corral_lb_sock_key {cookie, backend addr, port}` → `corral_lb_sock {vip, port}` |
//! | `lb_rings` | hash of maps, 32768 | `corral_lb_ring_key {service, gen}` → array of `ring_size` backend ids (Maglev) |
//!
//! A pin whose type, key, value or size differs from these (left by a
//! build with other limits) stops [`Balancer::load`] with
//! [`Error::IncompatiblePin`].
//!
//! ## Memory
//!
//! `lb_slots` dominates: it is preallocated, one 1 KiB list per service id,
//! 16 MiB for 16,384 services (`memlock` as the kernel reports it, 6.18).
//! The list is one array element on purpose: the kernel rounds every
//! array value up to 8 bytes, so the earlier layout (one `__u32` element
//! per slot, `id * 256 + i`) cost 2 KiB per service id: 8 MiB at 4,096
//! services, 32 MiB at 16,384. The other maps at these limits:
//! `lb_services` 1.5 MiB, `lb_rings` 2.5 MiB (outer map; each ring is
//! `M × 4` bytes more), `lb_backends` 5 MiB, `lb_socks` (LRU) about 6 MiB.
//! Rejected: a hash of `(id, index)` (Cilium's layout) or a
//! `BPF_F_NO_PREALLOC` hash of lists would cost memory only for what is
//! used, but the first needs a budget of slots that the router would have
//! to account for (its bucket array alone is 16 B per possible entry), and
//! both can fail with `ENOMEM` when an update allocates, where the
//! preallocated array never does: the router's promise that a plan never
//! meets a full map holds only for preallocated maps.
//!
//! `lb_services`, `lb_backends` and `lb_rings` are shared with the
//! north-south programs ([`crate::nodeport`]; both objects declare them in
//! `lb_maps.h` and pin them by name). A published port is the entry
//! `{vip: 0.0.0.0, port, proto}` flagged `CORRAL_LB_F_PUBLISHED`; the
//! socket programs ignore a destination of 0.0.0.0 and every published
//! entry, so they never rewrite a `connect()` to one.
//!
//! # Rings
//!
//! [`Balancer::apply`] carries out every [`Op`] of a router plan. A
//! `CreateRing` builds an array of the ring's size (flag
//! `BPF_F_INNER_MAP`, as the template in `lb_maps.h`, so rings of any size
//! fit the one outer map), fills every slot, and only then inserts it into
//! `lb_rings`: readers never see a half-filled ring. aya 0.14 creates the
//! outer map from the BTF `__array(values, ...)` definition and can create
//! standalone arrays and insert their fds, so no workaround was needed.
//! `PutRingSlots` opens the ring by the id `lb_rings` returns and updates
//! the slots in place; `DeleteRing` removes the outer entry (the kernel
//! frees the array once no program holds it).
//!
//! [`Balancer::set_service`] writes the service's whole list (two
//! syscalls per service entry: the list, then the entry) and keeps every
//! slot valid while a service changes: the list is repeated over all 256
//! slots and written before the count, so a reader that loaded the entry
//! before the change, with the old count, still reads a backend of the
//! new list. The kernel copies the list into the array element in place,
//! while programs may read it: a slot is an aligned `__u32`, and the
//! kernel's `memcpy` on x86-64 and arm64 moves aligned words whole in
//! practice (not an architectural promise for `rep movs`), so a reader
//! sees a slot's old or new id. Backends must exist
//! before a service names them and outlive it (the order `router::plan`
//! produces).
//!
//! # Attachment and restarts
//!
//! [`Balancer::attach`] creates BPF links on the cgroup and pins them in
//! the pin directory (`lb_link_<program>`), so they outlive the agent; a
//! later attach finds the pins and leaves the running links (and their
//! programs, which read the same pinned maps) in place.

use std::fs::File;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, HashOfMaps, MapData, MapType};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::CgroupSockAddr;
use aya::{Ebpf, EbpfLoader};

use corral_router::{
    BackendAddr, BackendId, Op, Protocol, RingKey, RingRef, ServiceEntry, ServiceId, ServiceKey,
};

use crate::abi::{self, c};
use crate::dataplane::{check_pin, map_error, removed, take, MapSpec};
use crate::Error;

/// The programs, by C function name.
pub const LB_PROGRAMS: [&str; 4] = [
    "corral_lb_connect4",
    "corral_lb_sendmsg4",
    "corral_lb_recvmsg4",
    "corral_lb_getpeername4",
];

const SERVICES: &str = "lb_services";
const SLOTS: &str = "lb_slots";
const BACKENDS: &str = "lb_backends";
const SOCKS: &str = "lb_socks";
const RINGS: &str = "lb_rings";

/// `BPF_F_INNER_MAP`: every ring is created with it, like the template in
/// `lb_maps.h`, so rings of any size fit `lb_rings`.
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// The largest ring accepted (the router's cap on Maglev table sizes).
pub const MAX_RING_SIZE: u32 = 131_071;

/// Backends one service can have (`CORRAL_LB_MAX_BACKENDS_PER_SERVICE`).
pub const MAX_BACKENDS_PER_SERVICE: usize = c::CORRAL_LB_MAX_BACKENDS_PER_SERVICE as usize;

/// The highest service id (`CORRAL_LB_MAX_SERVICES`); ids start at 1.
pub const MAX_SERVICE_ID: u32 = c::CORRAL_LB_MAX_SERVICES;

/// A value of `lb_slots`: one service's backend ids.
type List = [u32; MAX_BACKENDS_PER_SERVICE];

/// What the maps must look like; checked against pins left by an earlier
/// run (a build with other sizes).
fn map_specs() -> [MapSpec; 5] {
    let spec = |name, kind, key_size, value_size, max_entries| MapSpec {
        name,
        kind,
        key_size,
        value_size,
        max_entries,
    };
    [
        spec(
            SERVICES,
            MapType::Hash,
            size_of::<abi::LbServiceKey>(),
            size_of::<abi::LbService>(),
            MAX_SERVICE_ID,
        ),
        spec(
            SLOTS,
            MapType::Array,
            size_of::<u32>(),
            size_of::<List>(),
            MAX_SERVICE_ID + 1,
        ),
        spec(
            BACKENDS,
            MapType::Hash,
            size_of::<u32>(),
            size_of::<abi::LbBackend>(),
            c::CORRAL_LB_MAX_BACKENDS,
        ),
        spec(
            SOCKS,
            MapType::LruHash,
            size_of::<abi::LbSockKey>(),
            size_of::<abi::LbSock>(),
            c::CORRAL_LB_MAX_SOCKS,
        ),
        // The outer map's values are map fds.
        spec(
            RINGS,
            MapType::HashOfMaps,
            size_of::<abi::LbRingKey>(),
            size_of::<u32>(),
            2 * MAX_SERVICE_ID,
        ),
    ]
}

fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.bpf.o"))
}

/// The transport of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LbProtocol {
    Tcp,
    Udp,
}

impl LbProtocol {
    fn number(self) -> u8 {
        match self {
            LbProtocol::Tcp => 6,
            LbProtocol::Udp => 17,
        }
    }
}

/// A service address: what applications connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAddr {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: LbProtocol,
}

impl ServiceAddr {
    /// The address of a router service key.
    pub fn of(key: &ServiceKey) -> ServiceAddr {
        ServiceAddr {
            vip: key.vip,
            port: key.port,
            protocol: match key.protocol {
                Protocol::Tcp => LbProtocol::Tcp,
                Protocol::Udp => LbProtocol::Udp,
            },
        }
    }

    fn key(&self) -> abi::LbServiceKey {
        abi::LbServiceKey {
            vip: abi::ipv4_to_raw(self.vip),
            port: self.port,
            proto: self.protocol.number(),
            pad: 0,
        }
    }
}

/// The socket-layer load balancer of one cell: programs loaded, maps pinned.
pub struct Balancer {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    services: HashMap<MapData, abi::LbServiceKey, abi::LbService>,
    slots: Array<MapData, List>,
    backends: HashMap<MapData, u32, abi::LbBackend>,
    socks: HashMap<MapData, abi::LbSockKey, abi::LbSock>,
    rings: HashOfMaps<MapData, abi::LbRingKey, Array<MapData, u32>>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Loads the programs, reusing the maps pinned in `pin_dir` (the same
    /// directory as [`crate::Dataplane::load`]'s) and pinning new ones. A
    /// pinned map whose type, key, value or capacity does not fit this
    /// build (pinned by a build with other limits) is an error
    /// ([`Error::IncompatiblePin`]), never used or replaced.
    pub fn load(pin_dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(pin_dir).map_err(|source| Error::PinDir {
            path: pin_dir.to_owned(),
            source,
        })?;
        for spec in &map_specs() {
            check_pin(pin_dir, spec)?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(object())
            .map_err(|source| Error::Object { source })?;
        for name in LB_PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::ProgramLoad {
                    program: name,
                    source,
                })?;
        }
        Ok(Self {
            services: take(&mut ebpf, SERVICES)?,
            slots: take(&mut ebpf, SLOTS)?,
            backends: take(&mut ebpf, BACKENDS)?,
            socks: take(&mut ebpf, SOCKS)?,
            rings: take(&mut ebpf, RINGS)?,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// Attaches every program to the cgroup2 directory `cgroup` (once:
    /// links pinned by an earlier run are kept). Returns how many links
    /// were created.
    pub fn attach(&mut self, cgroup: &Path) -> Result<usize, Error> {
        let dir = File::open(cgroup).map_err(|source| Error::PinDir {
            path: cgroup.to_owned(),
            source,
        })?;
        let mut created = 0;
        for name in LB_PROGRAMS {
            let pin = self.link_pin(name);
            if PinnedLink::from_pin(&pin).is_ok() {
                continue;
            }
            let prog = program(&mut self.ebpf, name)?;
            let attach_error = |source| Error::Attach {
                program: name,
                iface: cgroup.display().to_string(),
                source,
            };
            let id = prog
                .attach(&dir, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            let link: FdLink = prog
                .take_link(id)
                .map_err(attach_error)?
                .try_into()
                .map_err(|e| Error::Link {
                    action: format!("take the link of {name}"),
                    reason: format!("{e}"),
                })?;
            link.pin(&pin).map_err(|e| Error::Link {
                action: format!("pin the link of {name} at {}", pin.display()),
                reason: e.to_string(),
            })?;
            created += 1;
        }
        Ok(created)
    }

    /// Detaches: removes the pinned links (the programs stop at once).
    pub fn detach(&self) -> Result<(), Error> {
        for name in LB_PROGRAMS {
            let pin = self.link_pin(name);
            if let Ok(link) = PinnedLink::from_pin(&pin) {
                // Unpinning drops the last reference: the link goes.
                link.unpin()
                    .map_err(|source| Error::PinDir { path: pin, source })?;
            }
        }
        Ok(())
    }

    fn link_pin(&self, program: &str) -> PathBuf {
        self.pin_dir.join(format!(
            "lb_link_{}",
            program.trim_start_matches("corral_lb_")
        ))
    }

    /// Declares where backend `id` listens.
    pub fn set_backend(&mut self, id: u32, addr: Ipv4Addr, port: u16) -> Result<(), Error> {
        let value = abi::LbBackend {
            addr: abi::ipv4_to_raw(addr),
            port,
            pad: 0,
        };
        self.backends.insert(id, value, 0).map_err(|e| {
            map_error(
                BACKENDS,
                c::CORRAL_LB_MAX_BACKENDS,
                format!("set backend {id}"),
                e,
            )
        })
    }

    /// Returns whether it existed.
    pub fn remove_backend(&mut self, id: u32) -> Result<bool, Error> {
        removed(self.backends.remove(&id), BACKENDS, || {
            format!("remove backend {id}")
        })
    }

    /// Makes `addr` a service with id `id` balanced over `backends`
    /// (backend ids, set first). An empty list keeps the address a service
    /// whose connections are refused.
    pub fn set_service(
        &mut self,
        addr: &ServiceAddr,
        id: u32,
        backends: &[u32],
    ) -> Result<(), Error> {
        self.write_service(addr, id, backends, 0, None)
    }

    /// Writes a service entry: `flags` (`CORRAL_LB_F_*`) and, for a
    /// published service, its ring `(generation, size)`, which must exist.
    fn write_service(
        &mut self,
        addr: &ServiceAddr,
        id: u32,
        backends: &[u32],
        flags: u32,
        ring: Option<(u32, u32)>,
    ) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidService { reason };
        if id == 0 || id > MAX_SERVICE_ID {
            return Err(invalid(format!(
                "service id {id} is not in 1..={MAX_SERVICE_ID}"
            )));
        }
        if backends.len() > MAX_BACKENDS_PER_SERVICE {
            return Err(invalid(format!(
                "{} backends for one service: at most {MAX_BACKENDS_PER_SERVICE}",
                backends.len()
            )));
        }
        let key = addr.key();
        let count = backends.len() as u32;
        let (ring_gen, ring_size) = ring.unwrap_or((0, 0));
        let value = abi::LbService {
            id,
            count,
            flags,
            ring_gen,
            ring_size,
        };
        let action = || format!("set service {}:{} ({id})", addr.vip, addr.port);
        // The list repeated over every slot: a reader that loaded the
        // entry before this write, with another count, still finds one of
        // the new backends wherever it looks.
        let mut list: List = [0; MAX_BACKENDS_PER_SERVICE];
        for (slot, backend) in list.iter_mut().zip(backends.iter().cycle()) {
            *slot = *backend;
        }
        self.slots
            .set(id, list, 0)
            .map_err(|e| map_error(SLOTS, 0, action(), e))?;
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_error(SERVICES, c::CORRAL_LB_MAX_SERVICES, action(), e))
    }

    /// Returns whether it existed; connections to the address are then
    /// left alone.
    pub fn remove_service(&mut self, addr: &ServiceAddr) -> Result<bool, Error> {
        removed(self.services.remove(&addr.key()), SERVICES, || {
            format!("remove service {}:{}", addr.vip, addr.port)
        })
    }

    /// Carries out one operation of a [`corral_router::plan()`] (in plan
    /// order), east-west and north-south alike: backends, service entries
    /// (with their flags and ring reference) and Maglev rings.
    pub fn apply(&mut self, op: &Op) -> Result<(), Error> {
        match op {
            Op::PutBackend { id, addr } => self.set_backend(id.get(), addr.addr, addr.port),
            Op::DeleteBackend { id } => self.remove_backend(id.get()).map(drop),
            Op::PutService { key, entry } => self.put_entry(key, entry),
            Op::DeleteService { key } => self.remove_service(&ServiceAddr::of(key)).map(drop),
            Op::CreateRing { ring, slots } => {
                let ids: Vec<u32> = slots.iter().map(|b| b.get()).collect();
                self.create_ring(ring, &ids)
            }
            Op::PutRingSlots { ring, slots } => {
                let pairs: Vec<(u32, u32)> = slots.iter().map(|(s, b)| (*s, b.get())).collect();
                self.put_ring_slots(ring, &pairs)
            }
            Op::DeleteRing { ring } => self.remove_ring(ring).map(drop),
        }
    }

    fn put_entry(&mut self, key: &ServiceKey, entry: &ServiceEntry) -> Result<(), Error> {
        let ids: Vec<u32> = entry.backends.iter().map(|b| b.get()).collect();
        let ring = entry.ring.map(|r| (r.generation, r.size));
        if let Some((generation, size)) = ring {
            if generation > 1 || size == 0 || size > MAX_RING_SIZE {
                return Err(Error::InvalidService {
                    reason: format!(
                        "service {key}: ring generation {generation} of {size} slots \
                         (generation 0 or 1, 1..={MAX_RING_SIZE} slots)"
                    ),
                });
            }
        }
        self.write_service(
            &ServiceAddr::of(key),
            entry.id.get(),
            &ids,
            entry.flags(),
            ring,
        )
    }

    /// Builds a ring aside (an array of `slots.len()` backend ids, filled
    /// completely) and then publishes it as `lb_rings[ring]` in one update,
    /// replacing a leftover under that key: no reader ever sees a ring
    /// half-filled.
    pub fn create_ring(&mut self, ring: &RingKey, slots: &[u32]) -> Result<(), Error> {
        let action = || {
            format!(
                "create ring {}/{} of {} slots",
                ring.service,
                ring.generation,
                slots.len()
            )
        };
        let size = u32::try_from(slots.len())
            .ok()
            .filter(|n| (1..=MAX_RING_SIZE).contains(n))
            .ok_or_else(|| Error::InvalidService {
                reason: format!("{}: a ring has 1..={MAX_RING_SIZE} slots", action()),
            })?;
        let mut array = Array::<MapData, u32>::create(size, BPF_F_INNER_MAP)
            .map_err(|e| map_error(RINGS, 0, action(), e))?;
        for (slot, id) in (0..size).zip(slots) {
            array
                .set(slot, id, 0)
                .map_err(|e| map_error(RINGS, 0, action(), e))?;
        }
        self.rings
            .insert(ring_key(ring), &array, 0)
            .map_err(|e| map_error(RINGS, 2 * c::CORRAL_LB_MAX_SERVICES, action(), e))
    }

    /// Sets `ring[slot] = backend` for each pair, in the ring in place.
    pub fn put_ring_slots(&mut self, ring: &RingKey, slots: &[(u32, u32)]) -> Result<(), Error> {
        let action = || format!("update ring {}/{}", ring.service, ring.generation);
        let mut array = self
            .rings
            .get(&ring_key(ring), 0)
            .map_err(|e| map_error(RINGS, 0, action(), e))?;
        for (slot, id) in slots {
            array
                .set(*slot, id, 0)
                .map_err(|e| map_error(RINGS, 0, action(), e))?;
        }
        Ok(())
    }

    /// Returns whether it existed.
    pub fn remove_ring(&mut self, ring: &RingKey) -> Result<bool, Error> {
        removed(self.rings.remove(&ring_key(ring)), RINGS, || {
            format!("remove ring {}/{}", ring.service, ring.generation)
        })
    }

    /// The slots of `lb_rings[ring]`, read back from the kernel (`None`:
    /// no such ring).
    pub fn ring(&self, ring: &RingKey) -> Result<Option<Vec<u32>>, Error> {
        let action = || format!("read ring {}/{}", ring.service, ring.generation);
        let array = match self.rings.get(&ring_key(ring), 0) {
            Ok(array) => array,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(map_error(RINGS, 0, action(), e)),
        };
        array
            .iter()
            .collect::<Result<Vec<u32>, _>>()
            .map(Some)
            .map_err(|e| map_error(RINGS, 0, action(), e))
    }

    /// What the maps hold, as router operations that rebuild it in a
    /// fresh model (backends first), so that a restarted agent can adopt
    /// the ids a previous run programmed: `corral_router::Programmed` from
    /// these, then `ServiceTable::adopt`. A published service's ring comes
    /// back as a `CreateRing` before its entry.
    pub fn dump(&self) -> Result<Vec<Op>, Error> {
        let read = |map: &'static str| move |e| map_error(map, 0, format!("read {map}"), e);
        let mut ops = Vec::new();
        for item in self.backends.iter() {
            let (id, b) = item.map_err(read(BACKENDS))?;
            let Some(id) = BackendId::new(id) else {
                continue;
            };
            ops.push(Op::PutBackend {
                id,
                addr: BackendAddr {
                    addr: abi::ipv4_from_raw(b.addr),
                    port: b.port,
                },
            });
        }
        for item in self.services.iter() {
            let (key, svc) = item.map_err(read(SERVICES))?;
            let (Some(id), Some(protocol)) =
                (ServiceId::new(svc.id), Protocol::from_number(key.proto))
            else {
                continue;
            };
            let list = self.slots.get(&id.get(), 0).map_err(read(SLOTS))?;
            let count = (svc.count as usize).min(MAX_BACKENDS_PER_SERVICE);
            let backends = list[..count]
                .iter()
                .filter_map(|&b| BackendId::new(b))
                .collect();
            let mut ring = None;
            if svc.ring_size != 0 {
                let ring_key = RingKey {
                    service: id,
                    generation: svc.ring_gen,
                };
                if let Some(slots) = self.ring(&ring_key)? {
                    let slots: Option<Vec<BackendId>> =
                        slots.into_iter().map(BackendId::new).collect();
                    if let Some(slots) = slots.filter(|s| s.len() == svc.ring_size as usize) {
                        ops.push(Op::CreateRing {
                            ring: ring_key,
                            slots: slots.into(),
                        });
                        ring = Some(RingRef {
                            generation: svc.ring_gen,
                            size: svc.ring_size,
                        });
                    }
                }
            }
            ops.push(Op::PutService {
                key: ServiceKey {
                    vip: abi::ipv4_from_raw(key.vip),
                    port: key.port,
                    protocol,
                },
                entry: ServiceEntry {
                    id,
                    published: svc.flags & c::CORRAL_LB_F_PUBLISHED != 0,
                    ring,
                    backends,
                },
            });
        }
        Ok(ops)
    }

    /// Reverse translations held (sockets sent to a backend, not yet
    /// evicted).
    pub fn socks_len(&self) -> usize {
        self.socks.keys().filter(Result::is_ok).count()
    }
}

fn ring_key(ring: &RingKey) -> abi::LbRingKey {
    abi::LbRingKey {
        service: ring.service.get(),
        gen: ring.generation,
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSockAddr, Error> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
        .ok_or_else(|| Error::NotInObject {
            what: format!("program {name}"),
        })
}
