//! Privileged tests of the eBPF data plane (`corral-ebpf`). As root:
//!
//! ```text
//! cargo test -p corral-tests --test ebpf -- --test-threads=1
//! ```
//!
//! - The programs run on crafted Ethernet frames through `BPF_PROG_TEST_RUN`
//!   (aya's `TestRun`). The kernel runs such packets on the loopback device
//!   (ifindex 1), so the tests point `ifaces[1]` at whichever instance they
//!   want the packet to come from or go to.
//! - One test attaches the programs to a real veth between two private
//!   network namespaces and sends UDP through it, across an agent "restart".
//!
//! Clean-up: pin directories are unique and removed by a guard; when the host
//! has no bpffs at /sys/fs/bpf, the test thread mounts one in a private mount
//! namespace of its own and unmounts it afterwards. Network namespaces are
//! held only by file descriptors (no /run/netns entry, no holder process), so
//! the kernel removes them, veths included, even if the test is killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![allow(unsafe_code)] // namespace and mount syscalls, each with a SAFETY comment

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::{TestRun, TestRunOptions};
use corral_ebpf::{
    slot_of, AppNum, Counter, Dataplane, Direction, DropReason, Endpoint, Error, InstanceIface,
    InstanceNum, Policy, Program, Protocol, TenantNum, IFINDEX_BASE, SLOTS,
};
use support::{require_root, sh, unique, Netns, PinDir};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN runs skb programs on the loopback device.
const LO: u32 = 1;
// ---------------------------------------------------------------------------
// packets

const MAC_INSTANCE: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_HOST: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(14 + payload.len());
    frame.extend_from_slice(&MAC_HOST);
    frame.extend_from_slice(&MAC_INSTANCE);
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let total = u16::try_from(20 + l4.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]); // id, DF, ttl, proto, csum
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let folded = (sum & 0xffff) + (sum >> 16);
    let csum = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap();
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(l4);
    ethernet(0x0800, &ip)
}

fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let mut seg = Vec::new();
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    seg.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
    seg.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // SYN, window
    seg.resize(seg.len() + payload, 0xab);
    ipv4(src, dst, IPPROTO_TCP, &seg)
}

fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, payload: usize) -> Vec<u8> {
    let len = u16::try_from(8 + payload).unwrap();
    let mut dgram = Vec::new();
    dgram.extend_from_slice(&sport.to_be_bytes());
    dgram.extend_from_slice(&dport.to_be_bytes());
    dgram.extend_from_slice(&len.to_be_bytes());
    dgram.extend_from_slice(&[0, 0]);
    dgram.resize(dgram.len() + payload, 0xcd);
    ipv4(src, dst, IPPROTO_UDP, &dgram)
}

fn icmp_echo(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    ipv4(src, dst, IPPROTO_ICMP, &[8, 0, 0, 0, 0, 1, 0, 1])
}

fn arp_request(spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 0x08, 0, 6, 4, 0, 1]; // Ethernet, IPv4, request
    arp.extend_from_slice(&MAC_INSTANCE);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&tpa.octets());
    ethernet(0x0806, &arp)
}

fn ipv6_frame() -> Vec<u8> {
    let mut ip6 = vec![0x60, 0, 0, 0, 0, 0, 59, 64]; // no next header
    ip6.extend_from_slice(&[0xfd; 32]);
    ethernet(0x86dd, &ip6)
}

fn vlan_frame(inner: &[u8]) -> Vec<u8> {
    // 802.1Q tag in front of an IPv4 packet.
    let mut tagged = vec![0, 42];
    tagged.extend_from_slice(&inner[12..]);
    ethernet(0x8100, &tagged)
}

// ---------------------------------------------------------------------------
// fixture: tenants A (two instances) and B (one), all in `endpoints`

fn tenant(n: u32) -> TenantNum {
    TenantNum::new(n).unwrap()
}

fn instance(n: u32) -> InstanceNum {
    InstanceNum::new(n).unwrap()
}

const TENANT_A: u32 = 1;
const TENANT_B: u32 = 2;

fn a1() -> InstanceIface {
    InstanceIface {
        addr: Ipv4Addr::new(10, 1, 0, 1),
        tenant: tenant(TENANT_A),
        instance: instance(11),
        app: app(101),
    }
}

fn a2() -> InstanceIface {
    InstanceIface {
        addr: Ipv4Addr::new(10, 1, 0, 2),
        tenant: tenant(TENANT_A),
        instance: instance(12),
        app: app(102),
    }
}

fn b1() -> InstanceIface {
    InstanceIface {
        addr: Ipv4Addr::new(10, 2, 0, 1),
        tenant: tenant(TENANT_B),
        instance: instance(21),
        app: app(201),
    }
}

/// Tenant B's other app.
fn b2() -> InstanceIface {
    InstanceIface {
        addr: Ipv4Addr::new(10, 2, 0, 2),
        tenant: tenant(TENANT_B),
        instance: instance(22),
        app: app(202),
    }
}

fn app(n: u32) -> AppNum {
    AppNum::new(n).unwrap()
}

struct Fixture {
    // Dropped before the pin directory it lives in.
    dp: Dataplane,
    pins: PinDir,
}

impl Fixture {
    fn new() -> Fixture {
        let pins = PinDir::new();
        let mut dp = Dataplane::load(&pins.path).unwrap();
        assert!(
            !dp.restored(),
            "a fresh pin directory has nothing to restore"
        );
        for who in [a1(), a2(), b1(), b2()] {
            dp.set_endpoint(
                who.addr,
                &Endpoint {
                    tenant: who.tenant,
                    instance: who.instance,
                    app: who.app,
                },
            )
            .unwrap();
        }
        Fixture { dp, pins }
    }

    /// Runs `program` on `packet` as if `who`'s veth were the interface.
    fn run(&mut self, program: Program, who: &InstanceIface, packet: &[u8]) -> u32 {
        self.dp.set_interface(LO, who).unwrap();
        run(&self.dp, program, packet)
    }

    fn from(&mut self, who: &InstanceIface, packet: &[u8]) -> u32 {
        self.run(Program::FromInstance, who, packet)
    }

    fn to(&mut self, who: &InstanceIface, packet: &[u8]) -> u32 {
        self.run(Program::ToInstance, who, packet)
    }

    fn tenant(&self, n: u32, dir: Direction) -> Counter {
        self.dp.tenant_counter(tenant(n), dir).unwrap()
    }

    fn drops(&self, n: u32, reason: DropReason) -> Counter {
        self.dp.drop_counter(TenantNum::new(n), reason).unwrap()
    }
}

fn run(dp: &Dataplane, program: Program, packet: &[u8]) -> u32 {
    let opts = TestRunOptions {
        data_in: Some(packet),
        ..TestRunOptions::default()
    };
    dp.program(program)
        .unwrap()
        .test_run(opts)
        .unwrap()
        .return_value
}

fn counter(packets: u64, bytes: usize) -> Counter {
    Counter {
        packets,
        bytes: bytes as u64,
    }
}

// ---------------------------------------------------------------------------
// BPF_PROG_TEST_RUN tests

#[test]
fn same_tenant_traffic_passes_and_is_metered_exactly() {
    let mut f = Fixture::new();
    let (small, big) = (
        tcp(a1().addr, 40000, a2().addr, 80, 0),
        udp(a1().addr, 5353, a2().addr, 53, 1000),
    );
    assert_eq!(f.from(&a1(), &small), TC_ACT_OK);
    assert_eq!(f.from(&a1(), &big), TC_ACT_OK);
    assert_eq!(f.from(&a1(), &big), TC_ACT_OK);
    let sent = counter(3, small.len() + 2 * big.len());
    assert_eq!(f.tenant(TENANT_A, Direction::FromInstance), sent);
    assert_eq!(
        f.dp.instance_counter(a1().instance, Direction::FromInstance)
            .unwrap(),
        sent
    );

    // The same packet arriving at a2's veth is metered on a2's side.
    assert_eq!(f.to(&a2(), &small), TC_ACT_OK);
    assert_eq!(
        f.tenant(TENANT_A, Direction::ToInstance),
        counter(1, small.len())
    );
    assert_eq!(
        f.dp.instance_counter(a2().instance, Direction::ToInstance)
            .unwrap(),
        counter(1, small.len())
    );
    assert_eq!(
        f.dp.instance_counter(a2().instance, Direction::FromInstance)
            .unwrap(),
        Counter::default()
    );

    // The snapshot a metrics scrape reads holds the same numbers.
    let all = f.dp.counters().unwrap();
    assert!(all
        .tenants
        .contains(&(tenant(TENANT_A), Direction::FromInstance, sent)));
    assert!(all.drops.is_empty(), "{:?}", all.drops);
}

#[test]
fn cross_tenant_traffic_is_dropped_on_both_sides_and_counted() {
    let mut f = Fixture::new();
    let packet = tcp(a1().addr, 40000, b1().addr, 80, 10);

    assert_eq!(f.from(&a1(), &packet), TC_ACT_SHOT);
    assert_eq!(
        f.drops(TENANT_A, DropReason::Policy),
        counter(1, packet.len())
    );
    assert_eq!(
        f.tenant(TENANT_A, Direction::FromInstance),
        Counter::default()
    );

    // A packet that got past the sender (another cell, a forged source) is
    // stopped by the receiving side, and counted under the receiver's tenant.
    assert_eq!(f.to(&b1(), &packet), TC_ACT_SHOT);
    assert_eq!(
        f.drops(TENANT_B, DropReason::Policy),
        counter(1, packet.len())
    );
    assert_eq!(
        f.tenant(TENANT_B, Direction::ToInstance),
        Counter::default()
    );
}

#[test]
fn spoofed_sources_are_dropped_and_counted() {
    let mut f = Fixture::new();
    // a2's address, sent from a1's veth: same tenant, still a spoof.
    let spoofed = tcp(a2().addr, 40000, Ipv4Addr::new(192, 0, 2, 1), 443, 0);
    assert_eq!(f.from(&a1(), &spoofed), TC_ACT_SHOT);
    let outside = udp(Ipv4Addr::new(198, 51, 100, 7), 1, a2().addr, 53, 4);
    assert_eq!(f.from(&a1(), &outside), TC_ACT_SHOT);
    assert_eq!(
        f.drops(TENANT_A, DropReason::Spoof),
        counter(2, spoofed.len() + outside.len())
    );

    // ARP must announce the instance's own address (or none, as probes do).
    let gateway = Ipv4Addr::new(10, 1, 0, 254);
    assert_eq!(f.from(&a1(), &arp_request(a1().addr, gateway)), TC_ACT_OK);
    assert_eq!(
        f.from(&a1(), &arp_request(Ipv4Addr::UNSPECIFIED, gateway)),
        TC_ACT_OK
    );
    assert_eq!(f.from(&a1(), &arp_request(a2().addr, gateway)), TC_ACT_SHOT);
    assert_eq!(f.drops(TENANT_A, DropReason::Spoof).packets, 3);
    assert_eq!(f.tenant(TENANT_A, Direction::FromInstance).packets, 2);
}

#[test]
fn a_policy_allows_cross_tenant_traffic_and_its_replies_until_removed() {
    let mut f = Fixture::new();
    let web = Policy {
        from: tenant(TENANT_A),
        to: tenant(TENANT_B),
        app: None,
        protocol: Protocol::Tcp,
        port: 80,
    };
    f.dp.set_policy(&web).unwrap();
    assert_eq!(f.dp.policies().unwrap(), vec![web]);

    let request = tcp(a1().addr, 40000, b1().addr, 80, 0);
    assert_eq!(f.from(&a1(), &request), TC_ACT_OK);
    assert_eq!(f.to(&b1(), &request), TC_ACT_OK);
    // Only that protocol and port.
    assert_eq!(
        f.from(&a1(), &tcp(a1().addr, 40000, b1().addr, 81, 0)),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.from(&a1(), &udp(a1().addr, 40000, b1().addr, 80, 0)),
        TC_ACT_SHOT
    );
    // Only that direction: B may not open connections to A...
    assert_eq!(
        f.from(&b1(), &tcp(b1().addr, 40001, a1().addr, 22, 0)),
        TC_ACT_SHOT
    );
    // ...but its replies to A's allowed flow pass, on both sides.
    let reply = tcp(b1().addr, 80, a1().addr, 40000, 100);
    assert_eq!(f.from(&b1(), &reply), TC_ACT_OK);
    assert_eq!(f.to(&a1(), &reply), TC_ACT_OK);
    assert!(f.dp.conntrack_len().unwrap() >= 1);
    assert_eq!(f.drops(TENANT_A, DropReason::Policy).packets, 2);
    assert_eq!(f.drops(TENANT_B, DropReason::Policy).packets, 1);

    assert!(f.dp.remove_policy(&web).unwrap());
    assert!(
        !f.dp.remove_policy(&web).unwrap(),
        "removing twice is a no-op"
    );
    assert_eq!(f.from(&a1(), &request), TC_ACT_SHOT);
    assert_eq!(f.to(&b1(), &request), TC_ACT_SHOT);
    assert_eq!(f.drops(TENANT_A, DropReason::Policy).packets, 3);

    // Port 0 allows every port of the protocol; Protocol::Any everything.
    let dns = Policy {
        protocol: Protocol::Udp,
        port: 0,
        ..web
    };
    f.dp.set_policy(&dns).unwrap();
    assert_eq!(
        f.from(&a1(), &udp(a1().addr, 5000, b1().addr, 53, 20)),
        TC_ACT_OK
    );
    assert_eq!(f.from(&a1(), &icmp_echo(a1().addr, b1().addr)), TC_ACT_SHOT);
    let any = Policy {
        protocol: Protocol::Any,
        port: 0,
        ..web
    };
    f.dp.set_policy(&any).unwrap();
    assert_eq!(f.from(&a1(), &icmp_echo(a1().addr, b1().addr)), TC_ACT_OK);
    assert_eq!(
        f.from(&a1(), &tcp(a1().addr, 1, b1().addr, 9999, 0)),
        TC_ACT_OK
    );
}

#[test]
fn a_policy_for_one_app_opens_only_that_apps_instances() {
    let mut f = Fixture::new();
    let b1_web = Policy {
        from: tenant(TENANT_A),
        to: tenant(TENANT_B),
        app: Some(b1().app),
        protocol: Protocol::Tcp,
        port: 80,
    };
    f.dp.set_policy(&b1_web).unwrap();
    let to_b1 = tcp(a1().addr, 40000, b1().addr, 80, 0);
    let to_b2 = tcp(a1().addr, 40000, b2().addr, 80, 0);
    assert_eq!(f.from(&a1(), &to_b1), TC_ACT_OK);
    assert_eq!(f.to(&b1(), &to_b1), TC_ACT_OK);
    assert_eq!(f.from(&a1(), &to_b2), TC_ACT_SHOT);
    assert_eq!(f.to(&b2(), &to_b2), TC_ACT_SHOT);
    // Replies of the allowed flow pass; b2 still cannot open flows to A.
    let reply = tcp(b1().addr, 80, a1().addr, 40000, 10);
    assert_eq!(f.from(&b1(), &reply), TC_ACT_OK);
    assert_eq!(f.to(&a1(), &reply), TC_ACT_OK);
    assert_eq!(f.drops(TENANT_A, DropReason::Policy).packets, 1);
    assert_eq!(f.drops(TENANT_B, DropReason::Policy).packets, 1);

    // Another kind of rule for the pair (every app, any port of UDP) keeps
    // the app rule working, and each rule goes with its own removal.
    let all_dns = Policy {
        app: None,
        protocol: Protocol::Udp,
        port: 0,
        ..b1_web
    };
    f.dp.set_policy(&all_dns).unwrap();
    assert_eq!(
        f.from(&a1(), &udp(a1().addr, 5000, b2().addr, 53, 0)),
        TC_ACT_OK
    );
    assert_eq!(f.from(&a1(), &to_b1), TC_ACT_OK);
    assert!(f.dp.remove_policy(&b1_web).unwrap());
    assert_eq!(
        f.from(&a1(), &tcp(a1().addr, 40001, b1().addr, 80, 0)),
        TC_ACT_SHOT
    );
    assert_eq!(
        f.from(&a1(), &udp(a1().addr, 5000, b2().addr, 53, 0)),
        TC_ACT_OK
    );
    assert!(f.dp.remove_policy(&all_dns).unwrap());
    assert_eq!(
        f.from(&a1(), &udp(a1().addr, 5001, b2().addr, 53, 0)),
        TC_ACT_SHOT
    );
    assert_eq!(f.dp.policies().unwrap(), vec![]);
}

#[test]
fn traffic_with_addresses_outside_the_endpoints_passes() {
    let mut f = Fixture::new();
    let out = tcp(a1().addr, 40000, Ipv4Addr::new(192, 0, 2, 10), 443, 0);
    let back = tcp(Ipv4Addr::new(192, 0, 2, 10), 443, a1().addr, 40000, 0);
    assert_eq!(f.from(&a1(), &out), TC_ACT_OK);
    assert_eq!(f.to(&a1(), &back), TC_ACT_OK);
    // Unknown endpoints are outside too: removing b1 makes it "the world".
    assert!(f.dp.remove_endpoint(b1().addr).unwrap());
    assert_eq!(f.dp.endpoint(b1().addr).unwrap(), None);
    assert_eq!(
        f.from(&a1(), &tcp(a1().addr, 1, b1().addr, 80, 0)),
        TC_ACT_OK
    );
}

#[test]
fn unsupported_malformed_and_unknown_traffic_is_dropped_with_a_reason() {
    let mut f = Fixture::new();
    let v6 = ipv6_frame();
    assert_eq!(f.from(&a1(), &v6), TC_ACT_SHOT);
    assert_eq!(f.to(&a1(), &v6), TC_ACT_SHOT);
    assert_eq!(
        f.drops(TENANT_A, DropReason::Ipv6),
        counter(2, 2 * v6.len())
    );

    let tagged = vlan_frame(&tcp(a1().addr, 1, b1().addr, 80, 0));
    assert_eq!(f.from(&a1(), &tagged), TC_ACT_SHOT);
    assert_eq!(f.drops(TENANT_A, DropReason::Unsupported).packets, 1);

    // The kernel refuses to test-run frames shorter than an IPv4 header, so
    // "malformed" here is a bad header length and a TCP header cut off.
    let mut bad_ihl = tcp(a1().addr, 1, a2().addr, 80, 0);
    bad_ihl[14] = 0x44;
    assert_eq!(f.from(&a1(), &bad_ihl), TC_ACT_SHOT);
    let no_ports = ipv4(a1().addr, a2().addr, IPPROTO_TCP, &[]);
    assert_eq!(f.from(&a1(), &no_ports), TC_ACT_SHOT);
    assert_eq!(f.drops(TENANT_A, DropReason::Malformed).packets, 2);

    // Fail closed on an interface nobody declared.
    f.dp.set_interface(LO, &a1()).unwrap();
    assert!(f.dp.remove_interface(LO).unwrap());
    let fine = tcp(a1().addr, 1, a2().addr, 80, 0);
    assert_eq!(run(&f.dp, Program::FromInstance, &fine), TC_ACT_SHOT);
    assert_eq!(run(&f.dp, Program::ToInstance, &fine), TC_ACT_SHOT);
    assert_eq!(
        f.dp.drop_counter(None, DropReason::UnknownInterface)
            .unwrap(),
        counter(2, 2 * fine.len())
    );
}

#[test]
fn interfaces_live_in_slots_that_never_collide() {
    let mut f = Fixture::new();
    // The fixture declared lo (ifindex 1): slot 1. Another interface of the
    // same slot is refused rather than silently taking over.
    f.dp.set_interface(LO, &a1()).unwrap();
    let err = f.dp.set_interface(LO + SLOTS, &a2()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::SlotTaken {
                slot: 1,
                holder: LO,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(f.dp.interface(LO + SLOTS).unwrap(), None);
    assert_eq!(f.dp.interface(LO).unwrap(), Some(a1()));

    // Reservations hand out free slots only, each once, above IFINDEX_BASE.
    let first = f.dp.reserve_ifindex().unwrap();
    let second = f.dp.reserve_ifindex().unwrap();
    assert_eq!((first, second), (IFINDEX_BASE, IFINDEX_BASE + 2));
    f.dp.unreserve(first);
    assert_eq!(f.dp.reserve_ifindex().unwrap(), IFINDEX_BASE);
    // Declaring a reserved ifindex takes its slot for good.
    f.dp.set_interface(second, &a2()).unwrap();
    assert_eq!(slot_of(second), 2);
    assert_eq!(f.dp.reserve_ifindex().unwrap(), IFINDEX_BASE + 3);
    assert_eq!(f.dp.interfaces().unwrap(), vec![(LO, a1()), (second, a2())]);
}

#[test]
fn a_second_load_on_the_same_pins_sees_the_same_maps() {
    let mut f = Fixture::new();
    let policy = Policy {
        from: tenant(TENANT_A),
        to: tenant(TENANT_B),
        app: None,
        protocol: Protocol::Tcp,
        port: 443,
    };
    f.dp.set_policy(&policy).unwrap();
    let packet = tcp(a1().addr, 40000, b1().addr, 443, 64);
    assert_eq!(f.from(&a1(), &packet), TC_ACT_OK);
    assert_eq!(f.from(&a1(), &ipv6_frame()), TC_ACT_SHOT);

    let endpoints = f.dp.endpoints().unwrap();
    let interfaces = f.dp.interfaces().unwrap();
    let counters = f.dp.counters().unwrap();
    assert_eq!(endpoints.len(), 4);
    assert_eq!(interfaces, vec![(LO, a1())]);
    assert_eq!(f.dp.conntrack_len().unwrap(), 1);

    // The agent restarts: a new Dataplane on the same pin directory.
    let Fixture { dp, pins } = f;
    drop(dp);
    let mut dp = Dataplane::load(&pins.path).unwrap();
    assert!(dp.restored());
    assert_eq!(dp.endpoints().unwrap(), endpoints);
    assert_eq!(dp.interfaces().unwrap(), interfaces);
    assert_eq!(dp.policies().unwrap(), vec![policy]);
    assert_eq!(dp.counters().unwrap(), counters);
    assert_eq!(dp.conntrack_len().unwrap(), 1);

    // The new programs count on from where the old ones stopped.
    assert_eq!(run(&dp, Program::FromInstance, &packet), TC_ACT_OK);
    assert_eq!(
        dp.tenant_counter(tenant(TENANT_A), Direction::FromInstance)
            .unwrap(),
        counter(2, 2 * packet.len())
    );

    // The instance goes: its slot is freed and zeroed, and its traffic
    // stays in its tenant's totals (folded into retired_stats), also across
    // another restart.
    assert!(dp.remove_interface(LO).unwrap());
    assert!(!dp.remove_interface(LO).unwrap());
    assert_eq!(
        dp.instance_counter(a1().instance, Direction::FromInstance)
            .unwrap(),
        Counter::default()
    );
    let folded = counter(2, 2 * packet.len());
    assert_eq!(
        dp.tenant_counter(tenant(TENANT_A), Direction::FromInstance)
            .unwrap(),
        folded
    );
    drop(dp);
    let mut dp = Dataplane::load(&pins.path).unwrap();
    assert_eq!(dp.interfaces().unwrap(), vec![]);
    assert_eq!(
        dp.tenant_counter(tenant(TENANT_A), Direction::FromInstance)
            .unwrap(),
        folded
    );
    // A new instance in the slot starts from zero.
    dp.set_interface(LO, &a2()).unwrap();
    assert_eq!(
        dp.instance_counter(a2().instance, Direction::FromInstance)
            .unwrap(),
        Counter::default()
    );
    drop(dp);
    drop(pins);
}

#[test]
fn an_incompatible_pin_stops_the_load_with_a_fix() {
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let stale = pins.path.join("ifaces");
    let stale = stale.to_str().unwrap();
    sh(
        "bpftool",
        &[
            "map", "create", stale, "type", "hash", "key", "4", "value", "8", "entries", "16",
            "name", "ifaces",
        ],
    );
    let err = Dataplane::load(&pins.path).unwrap_err();
    assert!(matches!(err, Error::IncompatiblePin { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(stale), "{msg}");
    assert!(msg.contains("value 8 B, 16 entries"), "{msg}");
    assert!(msg.contains("remove"), "{msg}");
}

/// The load balancer's maps pinned by a build with the old limits (4,096
/// services, one `__u32` per slot) are refused, not used: the slot
/// arithmetic of this build would read past them.
#[test]
fn a_balancer_pin_from_an_older_build_stops_the_load_with_a_fix() {
    require_root();
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let stale = pins.path.join("lb_slots");
    let stale = stale.to_str().unwrap();
    let entries = (4097 * 256).to_string();
    sh(
        "bpftool",
        &[
            "map", "create", stale, "type", "array", "key", "4", "value", "4", "entries", &entries,
            "name", "lb_slots",
        ],
    );
    let err = corral_ebpf::lb::Balancer::load(&pins.path).unwrap_err();
    assert!(matches!(err, Error::IncompatiblePin { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(stale), "{msg}");
    assert!(msg.contains("value 4 B, 1048832 entries"), "{msg}");
    assert!(msg.contains("value 1024 B, 16385 entries"), "{msg}");
}

// ---------------------------------------------------------------------------
// a real veth

/// The corral filters `bpftool net` lists on `dev`: (attach point, name, id).
fn tc_filters(dev: &str) -> Vec<(String, String, u64)> {
    let json = sh("bpftool", &["-j", "net", "show", "dev", dev]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let mut out = Vec::new();
    for entry in parsed.as_array().unwrap() {
        for tc in entry["tc"].as_array().into_iter().flatten() {
            out.push((
                tc["kind"].as_str().unwrap_or_default().to_owned(),
                tc["name"].as_str().unwrap_or_default().to_owned(),
                tc["id"].as_u64().unwrap_or_default(),
            ));
        }
    }
    out.sort();
    out
}

fn delivered(tx: &UdpSocket, rx: &UdpSocket, to: &str, msg: &[u8]) -> bool {
    tx.send_to(msg, to).unwrap();
    let mut buf = [0u8; 64];
    loop {
        match rx.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == msg => return true,
            Ok(_) => continue, // a late datagram of an earlier step
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

#[test]
fn attached_to_a_real_veth_it_filters_and_survives_a_restart() {
    require_root();
    let node = Netns::new();
    let inst = Netns::new();
    let host_if = unique("crlh");
    let inst_if = unique("crli");
    let (host_ip, inst_ip) = (Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 2));
    {
        let _in = node.enter();
        sh(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                &inst_if,
                "netns",
                &inst.path(),
            ],
        );
        sh("ip", &["addr", "add", "10.200.0.1/24", "dev", &host_if]);
        sh("ip", &["link", "set", &host_if, "up"]);
    }
    {
        let _in = inst.enter();
        sh("ip", &["addr", "add", "10.200.0.2/24", "dev", &inst_if]);
        sh("ip", &["link", "set", &inst_if, "up"]);
    }
    let rx = {
        let _in = node.enter();
        UdpSocket::bind((host_ip, 9999)).unwrap()
    };
    rx.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    let tx = {
        let _in = inst.enter();
        UdpSocket::bind((inst_ip, 0)).unwrap()
    };
    let dst = "10.200.0.1:9999";

    let pins = PinDir::new();
    let mut dp = Dataplane::load(&pins.path).unwrap();
    let me = InstanceIface {
        addr: inst_ip,
        tenant: tenant(7),
        instance: instance(70),
        app: app(700),
    };
    let (ifindex, filters) = {
        let _in = node.enter();
        let ifindex = corral_ebpf::ifindex(&host_if).unwrap();
        dp.set_interface(ifindex, &me).unwrap();
        assert_eq!(dp.attach(&host_if).unwrap(), ifindex);
        (ifindex, tc_filters(&host_if))
    };
    let names: Vec<(&str, &str)> = filters
        .iter()
        .map(|(kind, name, _)| (kind.as_str(), name.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("clsact/egress", "corral_to_instance"),
            ("clsact/ingress", "corral_from_instance"),
        ]
    );

    // Real traffic passes and is metered (ARP and UDP out, ARP reply in).
    assert!(delivered(&tx, &rx, dst, b"hello"));
    let sent = dp
        .tenant_counter(tenant(7), Direction::FromInstance)
        .unwrap();
    assert!(sent.packets >= 2 && sent.bytes > 0, "{sent:?}");
    let received = dp
        .instance_counter(instance(70), Direction::ToInstance)
        .unwrap();
    assert!(received.packets >= 1, "{received:?}");

    // The instance's address changes under it: now its packets are spoofed.
    let moved = InstanceIface {
        addr: Ipv4Addr::new(10, 200, 0, 3),
        ..me
    };
    dp.set_interface(ifindex, &moved).unwrap();
    assert!(!delivered(&tx, &rx, dst, b"spoofed"));
    assert!(
        dp.drop_counter(Some(tenant(7)), DropReason::Spoof)
            .unwrap()
            .packets
            >= 1
    );

    // Agent restart: the filters keep running without it; a new load and
    // attach replaces their programs in place, without duplicates.
    drop(dp);
    assert!(!delivered(&tx, &rx, dst, b"still filtered"));
    let mut dp = Dataplane::load(&pins.path).unwrap();
    assert!(dp.restored());
    assert_eq!(dp.interface(ifindex).unwrap(), Some(moved));
    dp.set_interface(ifindex, &me).unwrap();
    let after = {
        let _in = node.enter();
        dp.attach(&host_if).unwrap();
        tc_filters(&host_if)
    };
    assert_eq!(after.len(), 2, "{after:?}");
    for ((kind, name, id), (kind2, name2, id2)) in filters.iter().zip(&after) {
        assert_eq!((kind, name), (kind2, name2));
        assert_ne!(id, id2, "{name}: the program was not replaced");
    }
    assert!(delivered(&tx, &rx, dst, b"after restart"));

    // Detach: no filter left, so even a "spoofed" packet goes through.
    dp.set_interface(ifindex, &moved).unwrap();
    {
        let _in = node.enter();
        dp.detach(&host_if).unwrap();
        assert_eq!(tc_filters(&host_if), vec![]);
        dp.detach(&host_if).unwrap();
        dp.detach("crl-no-such-if").unwrap();
    }
    assert!(delivered(&tx, &rx, dst, b"unfiltered"));
    drop(dp);
    drop(pins);
    // node and inst go with their descriptors, and the veth with them.
}

// ---------------------------------------------------------------------------
// east-west load balancing (cgroup/connect4 and friends): no BPF_PROG_TEST_RUN
// for these program types, so real sockets in a real cgroup2 directory

const CGROUP2: &str = "/sys/fs/cgroup/unified";

/// A cgroup2 directory this whole test process sits in until the guard
/// drops (then it goes back to where it was and the directory is removed).
struct InCgroup {
    path: PathBuf,
    original: PathBuf,
}

impl InCgroup {
    fn new() -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process has a cgroup2 path");
        let original = Path::new(CGROUP2).join(rel.trim_start_matches('/'));
        let path = Path::new(CGROUP2).join(unique("corral-test-lb-"));
        std::fs::create_dir(&path).unwrap();
        std::fs::write(path.join("cgroup.procs"), std::process::id().to_string()).unwrap();
        InCgroup { path, original }
    }
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let pid = std::process::id().to_string();
        if let Err(e) = std::fs::write(self.original.join("cgroup.procs"), &pid) {
            eprintln!("warning: moving back to {}: {e}", self.original.display());
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("warning: remove {}: {e}", self.path.display());
        }
    }
}

/// Which of `listeners` accepted the connection just made (non-blocking).
fn accepted_by(listeners: &[std::net::TcpListener]) -> Option<usize> {
    for _ in 0..100 {
        for (i, l) in listeners.iter().enumerate() {
            if l.accept().is_ok() {
                return Some(i);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

#[test]
fn connections_to_a_service_address_reach_its_ready_backends_only() {
    use corral_ebpf::lb::{Balancer, LbProtocol, ServiceAddr};
    use std::io::ErrorKind;
    use std::net::{SocketAddr, TcpListener, TcpStream};

    require_root();
    let pins = PinDir::new();
    let ns = Netns::new();
    let _in = ns.enter();
    sh("ip", &["link", "set", "lo", "up"]);
    let lo = Ipv4Addr::LOCALHOST;
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| {
            let l = TcpListener::bind((lo, 0)).unwrap();
            l.set_nonblocking(true).unwrap();
            l
        })
        .collect();
    let udp_backend = UdpSocket::bind((lo, 0)).unwrap();
    udp_backend
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    let cgroup = InCgroup::new();
    let mut lb = Balancer::load(&pins.path).unwrap();
    assert_eq!(lb.attach(&cgroup.path).unwrap(), 4);
    for (i, l) in listeners.iter().enumerate() {
        let port = l.local_addr().unwrap().port();
        lb.set_backend(i as u32 + 1, lo, port).unwrap();
    }
    lb.set_backend(9, lo, udp_backend.local_addr().unwrap().port())
        .unwrap();
    let web = ServiceAddr {
        vip: Ipv4Addr::new(10, 96, 0, 10),
        port: 80,
        protocol: LbProtocol::Tcp,
    };
    let vip: SocketAddr = (web.vip, web.port).into();
    lb.set_service(&web, 1, &[1, 2, 3]).unwrap();

    // Every backend gets connections (60 draws of 1 in 3: all three are hit
    // but for a chance of ~1e-10), and the peer reads as the VIP.
    let mut hits = [0u32; 3];
    for _ in 0..60 {
        let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
        assert_eq!(s.peer_addr().unwrap(), vip);
        hits[accepted_by(&listeners).expect("no backend accepted")] += 1;
    }
    assert!(hits.iter().all(|&n| n > 0), "{hits:?}");

    // UDP: datagrams to the VIP reach the backend; its replies come from the VIP.
    let dns = ServiceAddr {
        port: 53,
        protocol: LbProtocol::Udp,
        ..web
    };
    lb.set_service(&dns, 2, &[9]).unwrap();
    let client = UdpSocket::bind((lo, 0)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    client.send_to(b"query", (dns.vip, dns.port)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = udp_backend.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"query");
    udp_backend.send_to(b"answer", from).unwrap();
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"answer");
    assert_eq!(from, SocketAddr::from((dns.vip, dns.port)));
    assert!(lb.socks_len() >= 2);

    // Fewer backends: only those; none: refused at once, not a hang.
    lb.set_service(&web, 1, &[2]).unwrap();
    for _ in 0..10 {
        let _s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
        assert_eq!(accepted_by(&listeners), Some(1));
    }
    lb.set_service(&web, 1, &[]).unwrap();
    let err = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // The agent restarts: the pinned links keep balancing; a new attach
    // adds nothing.
    lb.set_service(&web, 1, &[3]).unwrap();
    drop(lb);
    let _s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
    assert_eq!(accepted_by(&listeners), Some(2));
    let mut lb = Balancer::load(&pins.path).unwrap();
    assert_eq!(lb.attach(&cgroup.path).unwrap(), 0);

    // No longer a service: the address is left alone (nothing routes it here).
    assert!(lb.remove_service(&web).unwrap());
    assert!(!lb.remove_service(&web).unwrap());
    let err = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap_err();
    assert_ne!(err.kind(), ErrorKind::ConnectionRefused, "{err}");

    // Detached: the VIP is plain again even for a service.
    lb.set_service(&web, 1, &[1]).unwrap();
    lb.detach().unwrap();
    assert!(TcpStream::connect_timeout(&vip, Duration::from_millis(500)).is_err());
    assert_eq!(accepted_by(&listeners), None);
    drop(lb);
    drop(cgroup);
    drop(pins);
}
