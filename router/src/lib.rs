//! corral's service load balancing, as pure logic: the service table, Maglev
//! consistent hashing, and the plan of map operations that programs the eBPF
//! data plane. No I/O: the agent feeds changes in and carries the returned
//! operations out (the maps themselves belong to `corral-ebpf`).
//!
//! ```text
//!  upsert / remove / set_backends / set_ready
//!        │
//!        ▼
//!  ServiceTable ──(what changed)── plan_changes() ──▶ [Op] ──▶ agent: kernel map, then model.apply(op)
//!        ▲                              ▲                                          │
//!        └──────release(&model)──── Programmed (model of the maps) ◀───────────────┘
//! ```
//!
//! # Incremental planning
//!
//! The table remembers which keys and backend ids changed since the maps
//! last matched them, and [`plan_changes`] plans those alone: one
//! service's change costs `O(that service)` (and a `log` of the number of
//! services), whatever the number of services. [`ServiceTable::release`]
//! forgets a change once the model shows it programmed, so a plan cut
//! short is finished by the next one. The full [`plan()`] of
//! [`ServiceTable::desired`] (every service, `O(services)`) is the
//! reference: the property tests check that both produce the same
//! operations at every step, through cut-short plans and restarts. An
//! adopted table ([`ServiceTable::adopt`]) counts everything the adopted
//! maps hold as changed, so its first incremental plan is the full one.
//!
//! # Two lookups
//!
//! - **East-west** (instance → service VIP, `cgroup/connect4` and
//!   `sendmsg4`): the backend is chosen once per connection, at random, from
//!   the service entry's backend array (`backends[random % count]`). No
//!   per-packet state, so no consistency across nodes is needed and a plain
//!   array is the cheapest choice.
//! - **North-south** (traffic from outside to a published port, TC on the
//!   node's uplink): packets of one flow may arrive on any node (ECMP) and
//!   the set of backends changes under running flows, so the choice must be
//!   a *consistent* function of the flow hash: a Maglev ring per published
//!   service, `ring[hash % M]`, behind an LRU connection table (Katran,
//!   Cilium).
//!
//! # Why Maglev
//!
//! Maglev ([`maglev`]) spreads load almost perfectly evenly (each backend
//! within one slot of `M/N`) and, when a backend comes or goes, moves a
//! small multiple of that backend's share of the slots (typically 1.1× for
//! 12 backends, 2.3× for 100; measured in [`maglev`]), so most flows whose
//! connection entry was lost (another node, an LRU eviction) still reach the
//! same backend. A ring hash moves exactly the minimum but balances much
//! worse; rendezvous hashing costs `O(N)` per packet. Lookup is one array
//! read. Weights change how many turns a backend gets while the table is
//! filled. The table depends only on the set of (address, port, weight) and
//! `M`, never on ids or order, so every cell builds the same one.
//!
//! # Table size
//!
//! `M` is prime (the preference lists must be permutations): 16,381 up to
//! 163 ready backends, then the smallest prime `≥ 100·N`, capped at 131,071
//! ([`maglev::table_size_for`]). It is a function of `N` alone (no
//! hysteresis): cells with the same backends must agree. When `N` crosses a
//! threshold the ring is rebuilt at its new size under its other
//! generation and the service entry switched to it in one write.
//!
//! # Ids and their reuse
//!
//! Services and backend addresses get small ids (`1..=limit`, 0 = none) from
//! the [`ServiceTable`], stable for as long as the service or address stays.
//! A removed id is *pending* until [`ServiceTable::release`] sees a
//! programmed state that no longer holds it; only then may it be handed
//! out, oldest-freed first (so a stale connection-table entry is as old as
//! possible before its backend id means something else). Pending ids count
//! against the [`Limits`], which equal the kernel maps' `max_entries`:
//! since a plan writes before it deletes, the maps briefly hold the old and
//! the new entries together, and this accounting is what keeps that union
//! within the maps' size (`lb_rings` needs `2 × max_services`: at most two
//! generations per service id). Rings are also limited in number
//! ([`Limits::max_published_services`], default 1,024), as a guard on
//! memory: a ring is 64 KiB at the default size, in the kernel and in the
//! agent's model. A full table is a typed [`Error`] at `upsert`,
//! never a failed write half-way through a plan, and never affects other
//! services. A key or address that returns while its old id is pending
//! gets that id back (its entries may still be in the maps).
//!
//! # Operation order
//!
//! [`plan()`] writes what is pointed to before what points to it, and deletes
//! in the reverse order: backends, rings, service entries, then deleted
//! service entries, unused rings, unused backends (details in the [`mod@plan`]
//! module). A ring that keeps its size is updated in place, slot by slot:
//! during the update some slots are old and some new, all of them valid
//! backends. [`Programmed`] checks every operation and refuses dangling
//! references, which the tests use to prove every prefix of every plan is
//! safe.
//!
//! # Kernel map layout
//!
//! The layout the operations follow (`ebpf/src/bpf/corral.h`, `lb_maps.h`
//! and `lb.bpf.c`; byte order as in that header: addresses in network
//! order, ports and everything else in host order):
//!
//! ```c
//! #define CORRAL_LB_MAX_SERVICES 16384             /* Limits::max_services */
//! #define CORRAL_LB_MAX_BACKENDS 65536             /* Limits::max_backends */
//! #define CORRAL_LB_MAX_BACKENDS_PER_SERVICE 256   /* MAX_BACKENDS_PER_SERVICE */
//! #define CORRAL_LB_F_PUBLISHED 1                  /* FLAG_PUBLISHED */
//!
//! /* lb_services: HASH, CORRAL_LB_MAX_SERVICES entries */
//! struct corral_lb_service_key {
//!     __u32 vip;   /* network byte order */
//!     __u16 port;  /* host byte order */
//!     __u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
//!     __u8 pad;
//! };
//! struct corral_lb_service {
//!     __u32 id;        /* ServiceId */
//!     __u32 count;     /* used slots of lb_slots[id]; 0 = no ready backend */
//!     __u32 flags;     /* CORRAL_LB_F_* */
//!     __u32 ring_gen;  /* ring at {id, ring_gen} when ring_size != 0 */
//!     __u32 ring_size; /* M; 0 = no ring */
//! };
//!
//! /* lb_slots: ARRAY, CORRAL_LB_MAX_SERVICES + 1 entries, key ServiceId,
//!  * value __u32[CORRAL_LB_MAX_BACKENDS_PER_SERVICE]: the east-west list
//!  * (BackendIds), repeated over every slot */
//!
//! /* lb_backends: HASH, CORRAL_LB_MAX_BACKENDS entries, key __u32 BackendId */
//! struct corral_lb_backend {
//!     __u32 addr;  /* network byte order */
//!     __u16 port;  /* host byte order */
//!     __u16 pad;
//! };
//!
//! /* lb_rings: HASH_OF_MAPS, 2 * CORRAL_LB_MAX_SERVICES entries;
//!  * inner: ARRAY of ring_size __u32 BackendIds, declared BPF_F_INNER_MAP
//!  * so inner arrays of different sizes are accepted (kernel >= 5.10) */
//! struct corral_lb_ring_key {
//!     __u32 service; /* ServiceId */
//!     __u32 gen;     /* 0 or 1 */
//! };
//! ```
//!
//! Readers:
//! - connect4: `s = lb_services[{dst, dport, proto}]`; none → not a VIP, let
//!   it be; `count == 0` → refuse (`ECONNREFUSED`); else
//!   `b = lb_backends[lb_slots[s->id][rand % count]]` and rewrite the
//!   destination. The list is written (repeated over all 256 slots)
//!   before the entry with its count, so any slot a reader picks, with the
//!   old count or the new, holds a backend.
//! - north-south: `s = lb_services[...]`, needs `CORRAL_LB_F_PUBLISHED`;
//!   a connection-table hit wins if it is still valid (keep the backend's
//!   id *and* address in the entry and use it only while
//!   `lb_backends[id]` still holds that address: ids are reused, late but
//!   eventually); else
//!   `ring = lb_rings[{s->id, s->ring_gen}]`, `b = ring[hash % s->ring_size]`;
//!   `ring_size == 0` or any miss → drop.
//!
//! Why this shape: one `lb_services` lookup answers "is this a VIP", and
//! its small value (20 bytes) is replaced whole. The lists are a
//! preallocated array, one 1 KiB element per service id (16 MiB at the
//! default 16,384 services; the memory is discussed in `corral_ebpf::lb`):
//! preallocated, an update never fails for lack of memory, so the
//! [`Limits`] are the only capacity there is. Rings are separate because
//! they are big and only published services need them; map-in-map lets
//! them differ in size and be built aside and published with one
//! outer-map update. Two generations per service let a resize switch
//! atomically, and bound the outer map at `2 × max_services`.
//!
//! | [`Op`] | kernel |
//! |---|---|
//! | `PutBackend{id, addr}` | `lb_backends` update (`BPF_ANY`) |
//! | `CreateRing{ring, slots}` | create an inner array of `slots.len()` entries, write every slot, then `lb_rings` update with its fd (aya 0.14: `Array::<MapData, u32>::create(size, 0)`, `set` each slot, `HashOfMaps::insert`) |
//! | `PutRingSlots{ring, slots}` | look up the inner map of `lb_rings[ring]`, update each `(slot, id)` |
//! | `PutService{key, entry}` | `lb_slots[id]` update with the list repeated, then `lb_services` update (`count = entry.backends.len()`) |
//! | `DeleteService{key}` / `DeleteRing{ring}` / `DeleteBackend{id}` | delete from `lb_services` / `lb_rings` / `lb_backends` (a list stays in `lb_slots` until its id is reused) |
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod ids;
pub mod maglev;
pub mod plan;
pub mod service;

pub use ids::{BackendId, ServiceId};

#[cfg(test)]
mod testing;
pub use maglev::Weight;
pub use plan::{
    plan, plan_changes, Desired, DesiredService, ModelError, Op, Programmed, RingKey, RingRef,
    ServiceEntry, FLAG_PUBLISHED,
};
pub use service::{
    Backend, BackendAddr, Error, Limits, Protocol, ServiceKey, ServiceOwner, ServiceSpec,
    ServiceTable, MAX_BACKENDS_PER_SERVICE,
};
