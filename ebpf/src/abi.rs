//! `#[repr(C)]` mirrors of the map keys and values in `src/bpf/corral.h`.
//!
//! These are the exact bytes the kernel stores. The friendlier types of the
//! crate root ([`InstanceIface`](crate::InstanceIface), [`Policy`](crate::Policy),
//! ...) convert to and from them. Field names match the C names, so
//! `bpftool map dump` output reads the same as this module.
//!
//! The layout test at the bottom compares every struct, field by field
//! (name, offset, size, order) and by size and alignment, with what clang
//! measured from the header at build time (see `build.rs` and
//! `src/bpf/layout.c`), and fails if a struct in the header has no mirror.
#![allow(unsafe_code)] // `Pod` impls only; each carries a SAFETY comment

use std::net::Ipv4Addr;

use aya::Pod;

/// Constants and the struct table measured from `corral.h` by `build.rs`.
pub(crate) mod c {
    #![allow(dead_code)] // not every constant is used outside the tests

    /// A struct as the C compiler laid it out.
    #[derive(Debug)]
    pub(crate) struct CStruct {
        pub(crate) name: &'static str,
        pub(crate) size: usize,
        pub(crate) align: usize,
        pub(crate) fields: &'static [CField],
    }

    /// A field as the C compiler laid it out.
    #[derive(Debug)]
    pub(crate) struct CField {
        pub(crate) name: &'static str,
        pub(crate) offset: usize,
        pub(crate) size: usize,
    }

    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}

/// `struct corral_iface`: value of `ifaces` (key: the slot, `ifindex %
/// CORRAL_MAX_IFACES`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Iface {
    /// The host-side veth's ifindex; 0: the slot is free.
    pub ifindex: u32,
    /// The instance's IPv4 address, network byte order (see [`ipv4_to_raw`]).
    pub addr: u32,
    pub tenant: u32,
    pub instance: u32,
    pub app: u32,
}

/// `struct corral_endpoint`: value of `endpoints` (key: IPv4 address as [`ipv4_to_raw`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub tenant: u32,
    pub instance: u32,
    pub app: u32,
}

/// `struct corral_policy_key`: key of `policy`; presence allows.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub from_tenant: u32,
    pub to_tenant: u32,
    /// App number; 0 = every app of `to_tenant`.
    pub to_app: u32,
    /// Destination port, host byte order; 0 = any.
    pub port: u16,
    /// `IPPROTO_*`; 0 = any (then `port` is 0).
    pub proto: u8,
    pub pad: u8,
}

/// `struct corral_policy_value`: value of `policy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    /// Reserved, 0.
    pub flags: u32,
}

/// `struct corral_pair_key`: key of `policy_pairs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    pub from_tenant: u32,
    pub to_tenant: u32,
}

/// `struct corral_pair`: value of `policy_pairs`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Pair {
    /// `CORRAL_RULE_*` bits: the kinds of `policy` keys the pair has.
    pub kinds: u32,
}

/// `struct corral_flow`: key of `conntrack`, the forward tuple of a
/// cross-tenant flow a policy allowed.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub pad1: u8,
    pub pad2: u16,
}

/// `struct corral_flow_state`: value of `conntrack`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowState {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the flow's last forward packet.
    pub last_seen_ns: u64,
}

/// `struct corral_counter_key`: key of `retired_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CounterKey {
    /// Tenant number.
    pub id: u32,
    /// `enum corral_direction`.
    pub dir: u32,
}

/// `struct corral_drop_key`: key of `drop_stats`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// 0 when the tenant is unknown (packet on an interface missing from `ifaces`).
    pub tenant: u32,
    /// `enum corral_drop_reason`.
    pub reason: u32,
}

/// `struct corral_counter`: value of every stats map (one per CPU in the
/// per-CPU ones; the crate hands out the sum over CPUs).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Counter {
    pub packets: u64,
    /// `skb->len`: the whole frame, Ethernet header included.
    pub bytes: u64,
}

/// `struct corral_lb_service_key`: key of `lb_services`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceKey {
    /// The VIP, network byte order (see [`ipv4_to_raw`]).
    pub vip: u32,
    /// Host byte order.
    pub port: u16,
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    pub pad: u8,
}

/// `struct corral_lb_service`: value of `lb_services`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LbService {
    /// 1 ..= `CORRAL_LB_MAX_SERVICES`; its backends are `lb_slots[id][i]`, `i < count`.
    pub id: u32,
    /// Ready backends; 0: connections are refused.
    pub count: u32,
    /// `CORRAL_LB_F_*`.
    pub flags: u32,
    /// Published services: the ring is `lb_rings[{id, ring_gen}]`.
    pub ring_gen: u32,
    /// The ring's slots (a prime); 0: no ring, new north-south flows drop.
    pub ring_size: u32,
}

/// `struct corral_lb_backend`: value of `lb_backends` (key: backend id).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LbBackend {
    /// Network byte order.
    pub addr: u32,
    /// Host byte order.
    pub port: u16,
    pub pad: u16,
}

/// `struct corral_lb_sock_key`: key of `lb_socks`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LbSockKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct corral_lb_sock`: value of `lb_socks`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct LbSock {
    pub vip: u32,
    pub port: u16,
    pub pad: u16,
}

/// `struct corral_lb_ring_key`: key of `lb_rings`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbRingKey {
    /// Service id.
    pub service: u32,
    /// Generation, 0 or 1.
    pub gen: u32,
}

/// `struct corral_np_config`: `np_config[0]`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NpConfig {
    /// The cell's instance subnet, network byte order.
    pub cell_net: u32,
    /// Its mask, network byte order; 0: no backend is local.
    pub cell_mask: u32,
}

/// `struct corral_np_conn`: value of `np_flows` (key: [`Flow`] as it arrived).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NpConn {
    /// Backend id.
    pub backend: u32,
    /// The backend's address when the flow was sent to it, network byte order.
    pub addr: u32,
    /// Its port, host byte order.
    pub port: u16,
    pub pad: u16,
}

/// `struct corral_np_nat`: value of `np_nats` (key: a reply's [`Flow`]).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NpNat {
    /// The node address the client asked for, network byte order.
    pub addr: u32,
    /// The published port, host byte order.
    pub port: u16,
    pub pad: u16,
}

// SAFETY (all impls below): each type is `#[repr(C)]`, `Copy`, made only of
// unsigned integers, and has no padding (the layout test checks that the
// field sizes add up to the struct size, on the C side and on this one), so
// every byte is initialised and every bit pattern the kernel hands back is a
// valid value.
unsafe impl Pod for Iface {}
// SAFETY: see above.
unsafe impl Pod for Endpoint {}
// SAFETY: see above.
unsafe impl Pod for PolicyKey {}
// SAFETY: see above.
unsafe impl Pod for PolicyValue {}
// SAFETY: see above.
unsafe impl Pod for PairKey {}
// SAFETY: see above.
unsafe impl Pod for Pair {}
// SAFETY: see above.
unsafe impl Pod for Flow {}
// SAFETY: see above.
unsafe impl Pod for FlowState {}
// SAFETY: see above.
unsafe impl Pod for CounterKey {}
// SAFETY: see above.
unsafe impl Pod for DropKey {}
// SAFETY: see above.
unsafe impl Pod for Counter {}
// SAFETY: see above.
unsafe impl Pod for LbServiceKey {}
// SAFETY: see above.
unsafe impl Pod for LbService {}
// SAFETY: see above.
unsafe impl Pod for LbBackend {}
// SAFETY: see above.
unsafe impl Pod for LbSockKey {}
// SAFETY: see above.
unsafe impl Pod for LbSock {}
// SAFETY: see above.
unsafe impl Pod for LbRingKey {}
// SAFETY: see above.
unsafe impl Pod for NpConfig {}
// SAFETY: see above.
unsafe impl Pod for NpConn {}
// SAFETY: see above.
unsafe impl Pod for NpNat {}

/// An IPv4 address as the maps store it: the four bytes in packet (network)
/// order, read as a native `u32`.
pub fn ipv4_to_raw(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

/// Inverse of [`ipv4_to_raw`].
pub fn ipv4_from_raw(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::c::C_STRUCTS;
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    fn field_size<S, F>(_: fn(&S) -> &F) -> usize {
        size_of::<F>()
    }

    /// Compares one Rust mirror with the C layout. The destructuring pattern
    /// makes this fail to compile if the field list misses a Rust field.
    macro_rules! check {
        ($checked:ident, $rust:ident, $c:literal { $($field:ident),+ $(,)? }) => {{
            #[allow(clippy::unused_unit)]
            let _exhaustive = |v: $rust| {
                let $rust { $($field: _),+ } = v;
            };
            let c = C_STRUCTS
                .iter()
                .find(|s| s.name == $c)
                .unwrap_or_else(|| panic!("struct {} is not in corral.h", $c));
            let rust: Vec<(&str, usize, usize)> = vec![$(
                (stringify!($field), offset_of!($rust, $field), field_size(|s: &$rust| &s.$field)),
            )+];
            let cf: Vec<(&str, usize, usize)> =
                c.fields.iter().map(|f| (f.name, f.offset, f.size)).collect();
            assert_eq!(rust, cf, "fields (name, offset, size) of {} vs {}", stringify!($rust), $c);
            assert_eq!(size_of::<$rust>(), c.size, "size of {} vs {}", stringify!($rust), $c);
            assert_eq!(align_of::<$rust>(), c.align, "align of {} vs {}", stringify!($rust), $c);
            let sum: usize = cf.iter().map(|f| f.2).sum();
            assert_eq!(sum, c.size, "{} has implicit padding: name it", $c);
            $checked.push($c);
        }};
    }

    #[test]
    fn rust_mirrors_match_the_c_layout() {
        let mut checked = Vec::new();
        check!(checked, Iface, "corral_iface" { ifindex, addr, tenant, instance, app });
        check!(checked, Endpoint, "corral_endpoint" { tenant, instance, app });
        check!(checked, PolicyKey, "corral_policy_key" { from_tenant, to_tenant, to_app, port, proto, pad });
        check!(checked, PairKey, "corral_pair_key" { from_tenant, to_tenant });
        check!(checked, Pair, "corral_pair" { kinds });
        check!(checked, PolicyValue, "corral_policy_value" { flags });
        check!(checked, Flow, "corral_flow" { saddr, daddr, sport, dport, proto, pad1, pad2 });
        check!(checked, FlowState, "corral_flow_state" { last_seen_ns });
        check!(checked, CounterKey, "corral_counter_key" { id, dir });
        check!(checked, DropKey, "corral_drop_key" { tenant, reason });
        check!(checked, Counter, "corral_counter" { packets, bytes });
        check!(checked, LbServiceKey, "corral_lb_service_key" { vip, port, proto, pad });
        check!(checked, LbService, "corral_lb_service" { id, count, flags, ring_gen, ring_size });
        check!(checked, LbBackend, "corral_lb_backend" { addr, port, pad });
        check!(checked, LbSockKey, "corral_lb_sock_key" { cookie, addr, port, pad });
        check!(checked, LbSock, "corral_lb_sock" { vip, port, pad });
        check!(checked, LbRingKey, "corral_lb_ring_key" { service, gen });
        check!(checked, NpConfig, "corral_np_config" { cell_net, cell_mask });
        check!(checked, NpConn, "corral_np_conn" { backend, addr, port, pad });
        check!(checked, NpNat, "corral_np_nat" { addr, port, pad });
        for s in C_STRUCTS {
            assert!(
                checked.contains(&s.name),
                "struct {} in corral.h has no Rust mirror in abi.rs",
                s.name
            );
        }
    }

    #[test]
    fn addresses_are_stored_in_packet_byte_order() {
        let addr = Ipv4Addr::new(10, 1, 2, 3);
        let raw = ipv4_to_raw(addr);
        assert_eq!(raw.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(ipv4_from_raw(raw), addr);
    }
}
