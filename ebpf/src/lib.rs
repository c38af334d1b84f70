//! corral's eBPF data plane for instance networking: anti-spoofing, tenant
//! isolation and traffic metering on the host side of every instance veth.
//!
//! The programs are C (`src/bpf/*.bpf.c`), compiled by clang from `build.rs`
//! and embedded in this crate; [`Dataplane`] loads them with aya, pins their
//! maps, attaches them to interfaces and gives typed access to the maps.
//! Every map key and value is defined once, in `src/bpf/corral.h`; [`abi`]
//! mirrors those structs and a unit test proves the layouts agree.
//!
//! # Programs
//!
//! | program | attached at | sees |
//! |---|---|---|
//! | `corral_from_instance` | TC ingress of the host-side veth | packets the instance sends |
//! | `corral_to_instance` | TC egress of the host-side veth | packets about to enter the instance |
//!
//! Both are `SEC("classifier")` programs in direct-action mode, attached as
//! netlink TC filters at priority [`TC_PRIORITY`], handle [`TC_HANDLE`]
//! (`tc filter show dev <veth> ingress`; `bpftool net`).
//!
//! # Verdicts
//!
//! `corral_from_instance`, in order:
//! 1. the interface (`skb->ifindex`) must be in `ifaces` (its slot's entry
//!    names that ifindex), else drop (`unknown_interface`, tenant 0): fail
//!    closed, so set the interface entry before attaching;
//! 2. ARP passes if its sender address is the instance's address or 0.0.0.0
//!    (ARP probes), else drop (`spoof`);
//! 3. IPv6 is dropped (`ipv6`): instances have IPv4 only for now, and letting
//!    IPv6 through would bypass both checks below; other ethertypes,
//!    VLAN-tagged frames included, are dropped (`unsupported`); truncated
//!    headers are dropped (`malformed`);
//! 4. the IPv4 source must be the instance's address, else drop (`spoof`);
//! 5. if the destination is in `endpoints` and belongs to another tenant,
//!    the packet passes only if `policy` allows it (or it is the reply of a
//!    flow a policy allowed, see below), else drop (`policy`);
//! 6. **everything else passes**: destinations not in `endpoints` (the node
//!    itself, other hosts, the internet) are not the business of tenant
//!    isolation. Egress filtering towards the outside, if ever needed, is
//!    another feature.
//!
//! `corral_to_instance` applies 1 and 3, lets ARP in, and applies 5 with
//! the roles swapped: a source in `endpoints` of another tenant needs a
//! policy. The receiving side enforces too because the sender may sit on
//! another cell (or be a host that forges a source address).
//!
//! Allowed packets return `TC_ACT_OK`, dropped ones `TC_ACT_SHOT`.
//!
//! ## Policies and replies
//!
//! A [`Policy`] `(from, to, app, protocol, port)` allows instances of
//! tenant `from` to send to instances of tenant `to` (of its app `app`
//! only, if given). The lookup tries, for the destination's app and then
//! for every app of its tenant, the exact destination port, then port 0
//! (any port of that protocol), then protocol 0 (anything). Traffic within
//! a tenant needs no policy. `policy_pairs` summarises, per tenant pair,
//! which of these six kinds of keys exist, so a pair without policies
//! costs one lookup and only existing kinds are looked up; the crate keeps
//! it in step with `policy` (and rebuilds it at load).
//!
//! Replies travel the other way (`to` → `from`, from the service port) and
//! match no policy. So when a policy lets a packet pass, its 5-tuple is
//! recorded in `conntrack` (an LRU map), and a packet whose reversed tuple
//! is there passes as a reply: for 6 h after the flow's last forward packet
//! for TCP, 60 s for other protocols (`CORRAL_CT_*_TIMEOUT_S` in
//! `corral.h`). Removing a policy stops new packets in the forward direction
//! at once; replies to them stop when the entries expire. Conntrack does not
//! follow TCP state, and later IPv4 fragments (no ports) match only port-0
//! policies.
//!
//! Not checked (yet): the instance's MAC address, IPv6, and ICMP errors
//! about allowed flows crossing tenants.
//!
//! # Maps
//!
//! | name | type | key → value | written by |
//! |---|---|---|---|
//! | `ifaces` | array, 4096 | slot (`ifindex % 4096`) → `corral_iface {ifindex, addr, tenant, instance, app}` | agent |
//! | `endpoints` | hash, 65536 | IPv4 address (network order `u32`) → `corral_endpoint {tenant, instance, app}` | agent, for every instance of the cluster |
//! | `policy` | hash, 16384 | `corral_policy_key {from_tenant, to_tenant, to_app, port, proto}` → `corral_policy_value` (presence allows) | agent |
//! | `policy_pairs` | hash, 16384 | `corral_pair_key {from_tenant, to_tenant}` → `corral_pair {kinds}` (`CORRAL_RULE_*` bits) | agent (derived from `policy`) |
//! | `conntrack` | LRU hash, 65536 | `corral_flow` 5-tuple → `corral_flow_state {last_seen_ns}` | programs |
//! | `instance_stats` | per-CPU array, 8192 | slot × 2 + direction → `corral_counter {packets, bytes}` | programs |
//! | `retired_stats` | hash, 8192 | `corral_counter_key {id: tenant, dir}` → `corral_counter` | agent (the traffic of a tenant's instances that are gone) |
//! | `drop_stats` | per-CPU hash, 8192 | `corral_drop_key {tenant, reason}` → `corral_counter` | programs |
//!
//! ## Slots: arrays on the per-packet path
//!
//! Every packet needs its interface's entry and a counter; hash lookups
//! for both cost ~40 ns each on this VM, array lookups (inlined by the
//! verifier) a few. So interfaces live in *slots*: the veth of ifindex `I`
//! is described by `ifaces[I % 4096]`, whose entry names `I` (a stale or
//! foreign entry never matches), and its counters are
//! `instance_stats[slot * 2 + direction]`. Live veths must not share a
//! slot: the agent creates instance veths with an ifindex from
//! [`Dataplane::reserve_ifindex`] ([`IFINDEX_BASE`] + a free slot, 2^20 +
//! slot; when some other interface already has that index, the next one of
//! the same slot), and [`Dataplane::set_interface`] refuses a slot held by
//! another interface ([`Error::SlotTaken`]). The Rust side keeps a mirror
//! of `ifaces` (only the agent writes it), read back from the pin at load.
//!
//! Tenant and instance numbers ([`TenantNum`], [`InstanceNum`]) are `u32`
//! assigned by the control plane; 0 is reserved for "unknown". Addresses
//! are stored in network byte order, ports and everything else in host byte
//! order.
//!
//! # Counters
//!
//! - `instance_stats` counts the packets that **passed**, per slot and
//!   direction ([`Direction::FromInstance`]: sent by the instance;
//!   [`Direction::ToInstance`]: delivered to it); a tenant's totals are the
//!   sum over its slots plus `retired_stats`, where
//!   [`Dataplane::remove_interface`] folds the counters of a slot it frees
//!   (so tenant counters stay monotonic when instances go);
//! - `drop_stats` counts the dropped ones per tenant and [`DropReason`]:
//!   the sender's tenant for `corral_from_instance`, the receiver's for
//!   `corral_to_instance`, 0 when the interface is unknown;
//! - bytes are `skb->len`: the whole frame, Ethernet header included;
//! - values are per CPU in the kernel (no atomics on the fast path); the
//!   read methods return the sum over CPUs. An instance's counters live as
//!   long as its interface entry; tenant counters until
//!   [`Dataplane::remove_tenant_counters`]. Both survive agent restarts. A
//!   full drop or retired map loses counts, never packets.
//!
//! # Pinning and restarts
//!
//! ```text
//! /sys/fs/bpf/corral/<cell>/        the pin directory given to Dataplane::load
//!     ifaces  endpoints  policy  policy_pairs  conntrack
//!     instance_stats  retired_stats  drop_stats
//! ```
//!
//! [`Dataplane::load`] reuses maps already pinned there and pins the ones it
//! creates, so an agent restart keeps endpoints, policies, conntrack and
//! counters. A pin that does not match this build's map (type, key and value
//! sizes, capacity) stops the load with [`Error::IncompatiblePin`] instead
//! of being replaced behind the operator's back.
//!
//! Programs are not pinned: a netlink TC filter holds its program, so the
//! filters keep running (with the pinned maps) while the agent is down.
//! When the agent comes back, [`Dataplane::attach`] creates the filter at
//! priority [`TC_PRIORITY`] / handle [`TC_HANDLE`] with `NLM_F_EXCL`; if it
//! exists (`EEXIST`) it replaces that filter's program in place (a netlink
//! change without `NLM_F_CREATE`), so there is never a duplicate filter nor
//! a moment without one. [`Dataplane::detach`] removes the filters by
//! program name. Deleting the veth removes everything attached to it.
//!
//! Netlink filters rather than TCX links (kernel ≥ 6.6): they work on older
//! kernels and need no link pins to survive the agent; the price is the
//! fixed priority/handle convention above.
//!
//! # Privileges
//!
//! Loading needs CAP_BPF + CAP_NET_ADMIN (and CAP_SYS_ADMIN on some
//! kernels), a bpffs at the pin directory's mount point, and a kernel with
//! BTF and TC classifier programs; each failure has its own [`Error`]
//! variant with the fix in the message.
#![deny(rust_2018_idioms)]
#![deny(unsafe_code)]

pub mod abi;
mod dataplane;
mod error;
pub mod lb;
pub mod nodeport;
mod types;

pub use dataplane::{
    ifindex, slot_of, Dataplane, Program, IFINDEX_BASE, SLOTS, TC_HANDLE, TC_PRIORITY,
};
pub use error::Error;
pub use types::{
    AppNum, Counter, Counters, Direction, DropReason, Endpoint, InstanceIface, InstanceNum, Policy,
    Protocol, TenantNum,
};
