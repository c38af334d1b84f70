//! North-south load balancing on the node's uplink (`nodeport.bpf.c`).
//!
//! An app may publish a port on the node. Traffic from outside to one of
//! the node's addresses and a published port is balanced at **TC ingress
//! of the uplink** over the service's ready backends with Maglev
//! consistent hashing, behind an LRU connection table.
//!
//! | program | hook | does |
//! |---|---|---|
//! | `corral_np_ingress` | TC ingress of the uplink | picks the backend of a flow to `node address:published port`, DNATs it to a backend in this cell or sends it in IPIP to the backend's node; unwraps what peers send it |
//! | `corral_np_egress` | TC egress of the uplink | gives a backend's reply the node address and published port as its source |
//!
//! # What a packet meets (ingress)
//!
//! 1. IPv4 TCP or UDP (not a later fragment) whose destination is in
//!    `np_addrs` ([`NodePort::set_node_addresses`]), else it passes. (IPv4
//!    protocol 4, IPIP, is a peer's forwarded flow: see "Backends on other
//!    nodes".)
//! 2. `lb_services[{vip: 0, port: dport, proto}]` with
//!    `CORRAL_LB_F_PUBLISHED`, else it passes (the node's own services,
//!    ssh, the agent's API, are never touched). A first fragment of such a
//!    datagram is dropped ([`Verdict::DropFragment`]): its later fragments
//!    carry no ports to balance by.
//! 3. The backend: the flow's `np_flows` entry (key: the 5-tuple as it
//!    arrived), used only while `lb_backends[entry.backend]` still holds
//!    the address and port the flow was sent to (ids are reused); else
//!    `lb_rings[{service, ring_gen}][flow_hash % ring_size]`, written into
//!    `np_flows` ([`Verdict::NewFlow`]). No ring (`ring_size == 0`: no
//!    ready backend), a missing ring, slot or backend: dropped
//!    ([`Verdict::DropNoBackend`]).
//! 4. A backend in this cell's instance subnet
//!    ([`NodePort::set_cell_subnet`]): `np_nats` learns the reply's tuple,
//!    the destination address and port are rewritten (IPv4 and TCP/UDP
//!    checksums fixed incrementally) and the packet goes on
//!    ([`Verdict::Local`]): the node's kernel routes it to the instance's
//!    veth (the node must forward: `net.ipv4.ip_forward = 1`).
//!    A backend elsewhere is sent to its node (see below,
//!    [`Verdict::Forwarded`]).
//!
//! Flows stick: a flow keeps its backend while the ring changes (a backend
//! added, removed from the ready set) for as long as its `np_flows` entry
//! lives and the backend stays in `lb_backends`. An unready backend stays
//! in `lb_backends` while its service lists it, so its established flows
//! drain instead of breaking; once the router deletes it, its flows are
//! re-picked from the ring (and a TCP flow then gets a reset from the new
//! backend, as with any backend loss). Entries are not removed on FIN/RST;
//! the LRU evicts the least recently used when `CORRAL_NP_MAX_FLOWS` is
//! reached (the lookup refreshes an entry's recency on every packet).
//!
//! # The return path
//!
//! The backend sees the client's own address (no SNAT), so the node must
//! be the client's way back, which it is for a local backend: the instance's
//! default route is its veth to the node, and the node routes the reply
//! out of the uplink toward the client. At TC egress of the uplink,
//! `corral_np_egress` looks the reply's tuple `{backend addr:port →
//! client addr:port}` up in `np_nats` (only for sources in the cell subnet,
//! so the node's own traffic costs one compare) and rewrites the source to
//! the node address and published port the client used, checksums fixed
//! ([`Verdict::Reply`]). The client sees its own connection, end to end:
//! a TCP handshake completes only if this works. The ingress program
//! re-creates a missing `np_nats` entry on every packet of its flow, so the
//! LRU cannot evict it from under a live flow for long.
//!
//! Replies leave through the uplink that carries the programs: with several
//! uplinks, attach to each. ICMP errors a backend sends about a flow are
//! not translated.
//!
//! # Backends on other nodes: IPIP and direct server return
//!
//! Every node computes the same ring from the same backends (Maglev over
//! stable keys, `router/`), so any node picks the same backend for a flow.
//! The node the client chose (A) does not translate a flow whose backend
//! is on another node (B): it sends the **original packet, unmodified**,
//! inside an IPIP header, and B balances the inner packet as if it had
//! arrived directly. B's reply then goes straight to the client with A's
//! address as its source: nothing needs to carry the published port, and
//! the return path never crosses A.
//!
//! On A (`forward` in nodeport.bpf.c):
//!
//! - `bpf_fib_lookup` (a forwarding lookup from the uplink, neighbour
//!   left to `bpf_redirect_neigh`) on the backend's address. The agent
//!   routes each other cell's subnet `via <that cell's node>`, so the
//!   lookup's next hop (`params.ipv4_dst`, the route's gateway) is B. The
//!   next hop must be a peer ([`NodePort::set_peer_addresses`]): a route
//!   with no gateway, a gateway that is no node of the cluster (a default
//!   route, the agent's route not installed yet) or no route at all is
//!   [`Verdict::DropRemote`], never a packet sent where nobody unwraps it.
//! - The outer header: source = the node address the client used (the
//!   inner destination), destination = B, protocol 4, TTL 64, DF (B's
//!   program sees packets before reassembly, so they must not be
//!   fragmented on the way), the inner DSCP without its ECN bits (RFC 6040
//!   compatibility mode: a router on the way drops rather than marks, and
//!   nothing has to be propagated at decapsulation), checksum computed.
//!   `bpf_skb_adjust_room(+20, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)`
//!   makes the room (and keeps GSO packets segmentable), then
//!   `bpf_redirect_neigh` sends it out of the route's device with the
//!   next hop's MAC address, resolving it if needed.
//! - The connection table works as for local backends: the flow's entry
//!   holds its backend, so a flow sticks to a backend on B while the ring
//!   changes. No `np_nats` entry: the replies do not come back through A.
//!
//! On B (`from_peer`): an IPIP packet is B's only when its outer
//! destination is one of B's addresses (`np_addrs`), its outer source is a
//! peer (`np_peers`), the outer header has no options and is not a
//! fragment, the inner packet is TCP or UDP to a published port, **and
//! the inner destination is the outer source**. The last rule matters: B
//! will send the replies *from* the inner destination, so it must be a
//! peer's own address, not any address a sender put there; a node
//! therefore wraps with the address the client used as the outer source
//! (not the address of the route's device), and the peer set must hold
//! every address the peers balance on, as their `np_addrs` do. Anything
//! else is left to the kernel untouched (a host may run tunnels of its
//! own). B's packet is unwrapped
//! (`bpf_skb_adjust_room(−20, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)`,
//! [`Verdict::Decapsulated`]) and goes through steps 3 and 4 above with
//! one difference: its backend must be local. The two nodes' rings differ
//! only while an update reaches them one after the other; a packet whose
//! backend B thinks is elsewhere is dropped ([`Verdict::DropNotLocal`]),
//! never forwarded again, so no packet loops. B keeps its own `np_flows`
//! entry for the flow (key: the inner tuple, client → A), so the flow
//! sticks on B too; its `np_nats` entry records A's address and the
//! published port, and B's egress program gives the reply that source.
//! (B's entry lives as long as A's: both are refreshed by every packet of
//! the flow. Should B's LRU evict it while the ring has moved the flow's
//! slot to a backend off B, the flow is dropped as not local, as a flow
//! whose backend is deleted is reset.)
//!
//! What this asks of the network and the nodes:
//!
//! - **MTU.** The outer header adds 20 bytes. The links between nodes must
//!   carry the largest packet clients send plus 20 (e.g. 1520 for clients
//!   at 1500; the tests raise the node links to 1520), or the uplink's TCP
//!   MSS must be clamped 20 below the path's. A packet that would not fit
//!   the next hop's device once wrapped (`bpf_check_mtu`) is dropped and
//!   counted ([`Verdict::DropTooBig`]); no ICMP "fragmentation needed" is
//!   sent back, so path-MTU discovery does not repair it. GSO packets
//!   (merged by GRO) are re-segmented on the way out with their MSS
//!   lowered by 20, so they fit wherever their original segments did.
//! - **Source addresses.** B sends replies with A's address as source
//!   (direct server return): the fabric between the nodes and the clients
//!   must not drop packets whose source belongs to another node (cloud
//!   networks' source/destination checks do).
//! - **Peers.** [`NodePort::set_peer_addresses`] lists the other nodes'
//!   addresses (the gateways of the agent's cell routes, and any other
//!   address a peer balances on). Anyone who can send packets with a
//!   peer's source address can reach B's published ports through the
//!   tunnel, which they can already do directly; they cannot make B reply
//!   from an address that is not a peer's.
//! - ICMP errors about a forwarded flow are not translated.
//!
//! # Maps
//!
//! Pinned in the same directory as [`crate::Dataplane`]'s and
//! [`crate::lb::Balancer`]'s maps, by name:
//!
//! | name | type | key → value | written by |
//! |---|---|---|---|
//! | `lb_services` | hash, 16384 | `{vip: 0, port, proto}` → `corral_lb_service {…, flags, ring_gen, ring_size}` | agent ([`crate::lb::Balancer::apply`]) |
//! | `lb_backends` | hash, 65536 | backend id → `{addr, port}` | agent (`Balancer`) |
//! | `lb_rings` | hash of maps, 32768 | `{service, gen}` → array of `ring_size` backend ids | agent (`Balancer`) |
//! | `np_addrs` | hash, 64 | node address → 0 | agent ([`NodePort::set_node_addresses`]) |
//! | `np_peers` | hash, 4096 | other nodes' addresses → 0 | agent ([`NodePort::set_peer_addresses`]) |
//! | `np_config` | array, 1 | 0 → `{cell_net, cell_mask}` | agent ([`NodePort::set_cell_subnet`]) |
//! | `np_flows` | LRU hash, 262144 | arriving 5-tuple → `{backend id, addr, port}` | ingress |
//! | `np_nats` | LRU hash, 262144 | reply 5-tuple → `{node addr, published port}` | ingress (read by egress) |
//! | `np_stats` | per-CPU array, 11 | [`Verdict`] → `{packets, bytes}` | both programs |
//!
//! `np_stats` grew from 7 to 11 entries with the remote path (new verdicts
//! were appended, the old indices keep their meaning); like any capacity
//! change it makes pins of an older build incompatible, and
//! [`NodePort::load`] says so ([`Error::IncompatiblePin`]) instead of
//! reusing them: remove the pin directory (agent stopped) when upgrading
//! across it.
//!
//! # Restarts, detach, reload
//!
//! Like the instance programs: netlink TC filters at priority
//! [`crate::TC_PRIORITY`] / handle [`crate::TC_HANDLE`] hold their programs,
//! so traffic keeps flowing while the agent is down, and a new
//! [`NodePort::attach`] replaces the programs in place. All state is in the
//! pinned maps: a reload keeps the node and peer addresses, the connection table,
//! the reverse translations and the counters. [`NodePort::detach`] only
//! removes the filters (published ports then reach the node itself, which
//! normally refuses them); a later attach resumes every flow it knew.
//! Removing the pin directory (with the agent stopped) clears everything.
//!
//! # Published ports and the node's own sockets
//!
//! A reply to a connection the node itself opened *from* a published port
//! would be taken for a new flow: published ports must lie outside the
//! node's ephemeral range (`net.ipv4.ip_local_port_range`) and must not be
//! used by the node's own services.

use std::collections::BTreeSet;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, MapData, MapType, PerCpuArray};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};

use crate::abi::{self, c};
use crate::dataplane::{
    attach_classifier, check_pin, detach_classifier, ensure_bpffs, ensure_clsact, ifindex,
    map_error, take, MapSpec,
};
use crate::types::Counter;
use crate::Error;

fn object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/nodeport.bpf.o"))
}

const ADDRS: &str = "np_addrs";
const PEERS: &str = "np_peers";
const CONFIG: &str = "np_config";
const FLOWS: &str = "np_flows";
const NATS: &str = "np_nats";
const STATS: &str = "np_stats";

/// The maps this module owns, as pins left by an earlier run must be.
fn map_specs() -> [MapSpec; 6] {
    let addr_set = |name, max_entries| MapSpec {
        name,
        kind: MapType::Hash,
        key_size: size_of::<u32>(),
        value_size: size_of::<u32>(),
        max_entries,
    };
    let flow_table = |name, value_size| MapSpec {
        name,
        kind: MapType::LruHash,
        key_size: size_of::<abi::Flow>(),
        value_size,
        max_entries: c::CORRAL_NP_MAX_FLOWS,
    };
    [
        addr_set(ADDRS, c::CORRAL_NP_MAX_ADDRS),
        addr_set(PEERS, c::CORRAL_NP_MAX_PEERS),
        MapSpec {
            name: CONFIG,
            kind: MapType::Array,
            key_size: size_of::<u32>(),
            value_size: size_of::<abi::NpConfig>(),
            max_entries: 1,
        },
        flow_table(FLOWS, size_of::<abi::NpConn>()),
        flow_table(NATS, size_of::<abi::NpNat>()),
        MapSpec {
            name: STATS,
            kind: MapType::PerCpuArray,
            key_size: size_of::<u32>(),
            value_size: size_of::<Counter>(),
            max_entries: c::CORRAL_NP_VERDICTS,
        },
    ]
}

/// The two programs, by C function name, and where they run.
pub const NODEPORT_PROGRAMS: [(&str, TcAttachType); 2] = [
    ("corral_np_ingress", TcAttachType::Ingress),
    ("corral_np_egress", TcAttachType::Egress),
];

/// What the programs did with a packet (index of `np_stats`,
/// `enum corral_np_verdict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    /// Sent to a backend in this cell (DNAT), new flow or known.
    Local,
    /// A flow's first packet here: its backend was picked from the ring
    /// (also counted under its outcome).
    NewFlow,
    /// Egress: a backend's reply got the node address and published port back.
    Reply,
    /// A published port with no ring (no ready backend), or a ring, slot or
    /// backend missing.
    DropNoBackend,
    /// The backend is on another node, but the route to it does not go
    /// through a peer node ([`NodePort::set_peer_addresses`]), or there is
    /// no route.
    DropRemote,
    /// A fragmented datagram to a published port.
    DropFragment,
    /// A packet rewrite, encapsulation or decapsulation failed.
    DropError,
    /// Sent, unmodified, in an IPIP header to the backend's node (new flow
    /// or known).
    Forwarded,
    /// An IPIP packet from a peer node, unwrapped here (also counted under
    /// its outcome: [`Verdict::Local`] or a drop).
    Decapsulated,
    /// Came from a peer node, but its backend is not on this node (the two
    /// nodes' rings differed, as during an update): dropped, never sent on.
    DropNotLocal,
    /// Would exceed the MTU of the way to the backend's node once
    /// encapsulated (20 bytes more).
    DropTooBig,
}

impl Verdict {
    pub const ALL: [Verdict; 11] = [
        Verdict::Local,
        Verdict::NewFlow,
        Verdict::Reply,
        Verdict::DropNoBackend,
        Verdict::DropRemote,
        Verdict::DropFragment,
        Verdict::DropError,
        Verdict::Forwarded,
        Verdict::Decapsulated,
        Verdict::DropNotLocal,
        Verdict::DropTooBig,
    ];

    /// The `np_stats` index.
    pub const fn raw(self) -> u32 {
        match self {
            Verdict::Local => c::CORRAL_NP_LOCAL,
            Verdict::NewFlow => c::CORRAL_NP_NEW_FLOW,
            Verdict::Reply => c::CORRAL_NP_REPLY,
            Verdict::DropNoBackend => c::CORRAL_NP_DROP_NO_BACKEND,
            Verdict::DropRemote => c::CORRAL_NP_DROP_REMOTE,
            Verdict::DropFragment => c::CORRAL_NP_DROP_FRAGMENT,
            Verdict::DropError => c::CORRAL_NP_DROP_ERROR,
            Verdict::Forwarded => c::CORRAL_NP_FORWARDED,
            Verdict::Decapsulated => c::CORRAL_NP_DECAPSULATED,
            Verdict::DropNotLocal => c::CORRAL_NP_DROP_NOT_LOCAL,
            Verdict::DropTooBig => c::CORRAL_NP_DROP_TOO_BIG,
        }
    }

    /// A name for metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Local => "local",
            Verdict::NewFlow => "new_flow",
            Verdict::Reply => "reply",
            Verdict::DropNoBackend => "drop_no_backend",
            Verdict::DropRemote => "drop_remote",
            Verdict::DropFragment => "drop_fragment",
            Verdict::DropError => "drop_error",
            Verdict::Forwarded => "forwarded",
            Verdict::Decapsulated => "decapsulated",
            Verdict::DropNotLocal => "drop_not_local",
            Verdict::DropTooBig => "drop_too_big",
        }
    }
}

/// A flow as the ingress program hashes it: addresses as they are on the
/// wire, ports in host order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    pub saddr: Ipv4Addr,
    pub daddr: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// `IPPROTO_TCP` (6) or `IPPROTO_UDP` (17).
    pub proto: u8,
}

fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The hash `corral_np_ingress` computes for a flow (`flow_hash` in
/// nodeport.bpf.c, kept in step by the tests): a new flow goes to
/// `ring[flow_hash(flow) % ring_size]`.
pub fn flow_hash(flow: &FlowTuple) -> u32 {
    let mut h = mix(0x636f_7272 ^ u32::from(flow.proto));
    h = mix(h ^ abi::ipv4_to_raw(flow.saddr));
    h = mix(h ^ abi::ipv4_to_raw(flow.daddr));
    mix(h ^ ((u32::from(flow.sport) << 16) | u32::from(flow.dport)))
}

/// The north-south load balancer of one node: programs loaded, maps pinned.
///
/// Its service, backend and ring maps are programmed through
/// [`crate::lb::Balancer::apply`] (load both from the same pin directory);
/// this type owns the node's side: addresses, subnet, attachment, counters.
/// Dropping it detaches nothing.
pub struct NodePort {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    addrs: HashMap<MapData, u32, u32>,
    peers: HashMap<MapData, u32, u32>,
    config: Array<MapData, abi::NpConfig>,
    flows: HashMap<MapData, abi::Flow, abi::NpConn>,
    nats: HashMap<MapData, abi::Flow, abi::NpNat>,
    stats: PerCpuArray<MapData, Counter>,
}

impl std::fmt::Debug for NodePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePort")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl NodePort {
    /// Loads both programs, reusing the maps pinned in `pin_dir` (the
    /// directory given to [`crate::Dataplane::load`] and
    /// [`crate::lb::Balancer::load`]) and pinning the ones it creates. A
    /// pin of this module whose type, key, value or capacity does not fit
    /// this build (as `np_stats` of a build before the remote path) is an
    /// error ([`Error::IncompatiblePin`]), never silently reused.
    pub fn load(pin_dir: &Path) -> Result<Self, Error> {
        ensure_bpffs(pin_dir)?;
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
        for (name, _) in NODEPORT_PROGRAMS {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| Error::ProgramLoad {
                    program: name,
                    source,
                })?;
        }
        Ok(Self {
            addrs: take(&mut ebpf, ADDRS)?,
            peers: take(&mut ebpf, PEERS)?,
            config: take(&mut ebpf, CONFIG)?,
            flows: take(&mut ebpf, FLOWS)?,
            nats: take(&mut ebpf, NATS)?,
            stats: take(&mut ebpf, STATS)?,
            ebpf,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// A loaded program by C function name (for `aya::programs::TestRun`).
    pub fn program(&self, name: &str) -> Option<&SchedClassifier> {
        self.ebpf
            .program(name)
            .and_then(|p| <&SchedClassifier>::try_from(p).ok())
    }

    /// Attaches `corral_np_ingress` (TC ingress) and `corral_np_egress` (TC
    /// egress) to the uplink `iface` in the caller's network namespace.
    /// Restart-safe like [`crate::Dataplane::attach`]: an earlier run's
    /// filters get their programs replaced in place. Returns the ifindex.
    pub fn attach(&mut self, iface: &str) -> Result<u32, Error> {
        let index = ifindex(iface)?;
        ensure_clsact(iface)?;
        for (name, hook) in NODEPORT_PROGRAMS {
            attach_classifier(classifier(&mut self.ebpf, name)?, name, iface, hook)?;
        }
        tracing::debug!(iface, ifindex = index, "north-south balancer attached");
        Ok(index)
    }

    /// Removes both filters from `iface` (no filter or no interface is not
    /// an error). The maps, and so every flow, stay.
    pub fn detach(&self, iface: &str) -> Result<(), Error> {
        for (name, hook) in NODEPORT_PROGRAMS {
            detach_classifier(iface, hook, name)?;
        }
        tracing::debug!(iface, "north-south balancer detached");
        Ok(())
    }

    /// Makes `addrs` the node's addresses (the destinations balanced, and
    /// the outer destinations at which peers' encapsulated flows are
    /// accepted), replacing the previous set.
    pub fn set_node_addresses(&mut self, addrs: &[Ipv4Addr]) -> Result<(), Error> {
        replace_set(&mut self.addrs, ADDRS, c::CORRAL_NP_MAX_ADDRS, addrs)
    }

    /// The node's addresses, as the kernel holds them.
    pub fn node_addresses(&self) -> Result<Vec<Ipv4Addr>, Error> {
        read_set(&self.addrs, ADDRS)
    }

    /// Makes `addrs` the peer nodes' addresses, replacing the previous
    /// set: every address at which another node of the cluster balances
    /// published ports (its [`NodePort::set_node_addresses`]), which
    /// includes the gateway of each `<cell subnet> via <node>` route. A
    /// remote backend is forwarded only when the route to it goes through
    /// a peer, and an encapsulated flow is accepted only from one.
    pub fn set_peer_addresses(&mut self, addrs: &[Ipv4Addr]) -> Result<(), Error> {
        replace_set(&mut self.peers, PEERS, c::CORRAL_NP_MAX_PEERS, addrs)
    }

    /// The peer nodes' addresses, as the kernel holds them.
    pub fn peer_addresses(&self) -> Result<Vec<Ipv4Addr>, Error> {
        read_set(&self.peers, PEERS)
    }

    /// Declares this cell's instance subnet: backends in it are local.
    pub fn set_cell_subnet(&mut self, net: Ipv4Addr, prefix_len: u8) -> Result<(), Error> {
        if prefix_len > 32 {
            return Err(Error::InvalidService {
                reason: format!("cell subnet {net}/{prefix_len}: the prefix is at most 32"),
            });
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        let value = abi::NpConfig {
            cell_net: (u32::from(net) & mask).to_be(),
            cell_mask: mask.to_be(),
        };
        self.config
            .set(0, value, 0)
            .map_err(|e| map_error(CONFIG, 0, format!("set cell subnet {net}/{prefix_len}"), e))
    }

    /// Packets and bytes per verdict, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Verdict, Counter)>, Error> {
        Verdict::ALL
            .iter()
            .map(|v| Ok((*v, self.counter(*v)?)))
            .collect()
    }

    /// Packets and bytes of one verdict, summed over CPUs.
    pub fn counter(&self, verdict: Verdict) -> Result<Counter, Error> {
        let values = self
            .stats
            .get(&verdict.raw(), 0)
            .map_err(|e| map_error(STATS, 0, format!("read counter {}", verdict.name()), e))?;
        Ok(values.iter().sum())
    }

    /// Entries of the connection table (flows seen, not yet evicted).
    pub fn flows_len(&self) -> Result<usize, Error> {
        count_keys(&self.flows, FLOWS)
    }

    /// Entries of the reverse-translation table.
    pub fn nats_len(&self) -> Result<usize, Error> {
        count_keys(&self.nats, NATS)
    }

    /// The backend id the connection table holds for a flow (as it arrives
    /// at the node), if any.
    pub fn flow_backend(&self, flow: &FlowTuple) -> Result<Option<u32>, Error> {
        let key = abi::Flow {
            saddr: abi::ipv4_to_raw(flow.saddr),
            daddr: abi::ipv4_to_raw(flow.daddr),
            sport: flow.sport,
            dport: flow.dport,
            proto: flow.proto,
            pad1: 0,
            pad2: 0,
        };
        let found = crate::dataplane::found(self.flows.get(&key, 0), FLOWS, || {
            "read a connection table entry".to_owned()
        })?;
        Ok(found.map(|conn| conn.backend))
    }
}

/// Makes the keys of an address set `wanted`: adds the missing, removes
/// the others (what is already right is not touched, so a packet never
/// sees the set empty while it is replaced).
fn replace_set(
    map: &mut HashMap<MapData, u32, u32>,
    name: &'static str,
    max_entries: u32,
    addrs: &[Ipv4Addr],
) -> Result<(), Error> {
    let wanted: BTreeSet<u32> = addrs.iter().map(|a| abi::ipv4_to_raw(*a)).collect();
    if wanted.len() > max_entries as usize {
        return Err(Error::MapFull {
            map: name,
            max_entries,
            action: format!("set {} addresses", wanted.len()),
        });
    }
    let held = raw_set(map, name)?;
    for raw in wanted.difference(&held) {
        map.insert(raw, 0, 0).map_err(|e| {
            map_error(
                name,
                max_entries,
                format!("add address {}", abi::ipv4_from_raw(*raw)),
                e,
            )
        })?;
    }
    for raw in held.difference(&wanted) {
        crate::dataplane::removed(map.remove(raw), name, || {
            format!("remove address {}", abi::ipv4_from_raw(*raw))
        })?;
    }
    Ok(())
}

fn read_set(map: &HashMap<MapData, u32, u32>, name: &'static str) -> Result<Vec<Ipv4Addr>, Error> {
    Ok(raw_set(map, name)?
        .into_iter()
        .map(abi::ipv4_from_raw)
        .collect())
}

fn raw_set(map: &HashMap<MapData, u32, u32>, name: &'static str) -> Result<BTreeSet<u32>, Error> {
    map.keys()
        .collect::<Result<_, _>>()
        .map_err(|e| map_error(name, 0, "list addresses", e))
}

fn count_keys<V: aya::Pod>(
    map: &HashMap<MapData, abi::Flow, V>,
    name: &'static str,
) -> Result<usize, Error> {
    let mut n = 0;
    for key in map.keys() {
        key.map_err(|e| map_error(name, 0, "list entries", e))?;
        n += 1;
    }
    Ok(n)
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, Error> {
    ebpf.program_mut(name)
        .and_then(|p| <&mut SchedClassifier>::try_from(p).ok())
        .ok_or_else(|| Error::NotInObject {
            what: format!("classifier {name}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_the_c_enum() {
        let raws: Vec<u32> = Verdict::ALL.iter().map(|v| v.raw()).collect();
        assert_eq!(raws, (0..c::CORRAL_NP_VERDICTS).collect::<Vec<_>>());
    }

    #[test]
    fn the_flow_hash_spreads_ports() {
        let flow = |sport| FlowTuple {
            saddr: Ipv4Addr::new(192, 0, 2, 1),
            daddr: Ipv4Addr::new(198, 51, 100, 1),
            sport,
            dport: 30080,
            proto: 6,
        };
        let mut buckets = [0u32; 7];
        for sport in 32768..33768 {
            buckets[(flow_hash(&flow(sport)) % 7) as usize] += 1;
        }
        // 1000 flows into 7 buckets: each near 143.
        assert!(
            buckets.iter().all(|&n| (100..190).contains(&n)),
            "{buckets:?}"
        );
        assert_ne!(
            flow_hash(&flow(1)),
            flow_hash(&FlowTuple {
                proto: 17,
                ..flow(1)
            })
        );
    }
}
