//! Privileged tests of north-south load balancing (`corral_ebpf::nodeport`)
//! with real namespaces, veths and sockets. As root:
//!
//! ```text
//! cargo test -p corral-tests --test nodeport -- --test-threads=1
//! ```
//!
//! ```text
//!  client ns            node ns                       instance ns (×3, ×4)
//!  c0 192.0.2.2/24 ──── up0 192.0.2.1/24 (programs)
//!                       hI 10.88.I.1/30 ───────────── iI 10.88.I.2/30, default via 10.88.I.1
//!                                                     "inst88-I": TCP :8080 and UDP :5353
//! ```
//!
//! Remote backends (DSR over IPIP) run on two nodes behind a bridge:
//!
//! ```text
//!  client ns            bridge ns          node A ns (programs)           instances 10.88.I.2
//!  c0 192.0.2.2/24 ─── pc ┐                up0 192.0.2.1/24, mtu 1520
//!                          br0 ─ pa ────── 10.89.0.0/16 via 192.0.2.3
//!                             └─ pb ────── node B ns: up0 192.0.2.3/24     instances 10.89.I.2
//!                                          10.88.0.0/16 via 192.0.2.1
//! ```
//!
//! The node links carry 1520 bytes so that a full 1500-byte packet from
//! the client (mtu 1500) still fits once encapsulated.
//!
//! The published ports are services `{0.0.0.0, port, proto}` of a real
//! `corral_router::ServiceTable`, programmed by applying its plans through
//! `Balancer::apply`, as the agent will. Every namespace is held by file
//! descriptors only and every server thread is stopped by a guard, so the
//! kernel removes everything (veths included) even when a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use corral_ebpf::lb::Balancer;
use corral_ebpf::nodeport::{flow_hash, FlowTuple, NodePort, Verdict};
use corral_proto::{AppId, TenantId};
use corral_router::{
    plan, Backend, BackendAddr, Limits, Op, Programmed, Protocol, RingKey, ServiceKey,
    ServiceOwner, ServiceSpec, ServiceTable, Weight,
};
use support::{require_root, setns, sh, Netns, PinDir};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const UPLINK: &str = "up0";
const WEB: u16 = 30080;
const DNS: u16 = 30053;
const EMPTY: u16 = 30081;
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const TIMEOUT: Duration = Duration::from_secs(2);

fn instance_addr(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 88, i, 2)
}

/// An instance's name (what its servers answer): from its address.
fn name_of(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("inst{}-{}", o[1], o[2])
}

// ---------------------------------------------------------------------------
// servers inside instance namespaces

/// A TCP and a UDP server answering every request with the instance's
/// name, on a thread inside the instance's namespace; stopped on drop.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Netns, name: String) -> Server {
        let path = ns.path();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let (ready, started) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            setns(&OwnedFd::from(File::open(&path).unwrap()));
            let tcp = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, TCP_PORT)).unwrap();
            tcp.set_nonblocking(true).unwrap();
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT)).unwrap();
            udp.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            serve(&tcp, &udp, name.as_bytes(), &flag);
        });
        started.recv().unwrap();
        Server {
            stop,
            thread: Some(thread),
        }
    }
}

fn serve(tcp: &std::net::TcpListener, udp: &UdpSocket, name: &[u8], stop: &AtomicBool) {
    let mut conns: Vec<TcpStream> = Vec::new();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((s, _)) = tcp.accept() {
            s.set_nonblocking(true).unwrap();
            conns.push(s);
        }
        conns.retain_mut(|s| match s.read(&mut buf) {
            Ok(0) => false,
            Ok(_) => s.write_all(&[name, b"\n"].concat()).is_ok(),
            Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
        });
        if let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name, from);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------
// the topology

struct Topology {
    client: Netns,
    node: Netns,
    instances: Vec<Netns>,
    servers: Vec<Server>,
}

impl Topology {
    fn new(instances: u8) -> Topology {
        require_root();
        let mut t = Topology {
            client: Netns::new(),
            node: Netns::new(),
            instances: Vec::new(),
            servers: Vec::new(),
        };
        {
            let _in = t.client.enter();
            sh("ip", &["link", "set", "lo", "up"]);
        }
        let _in = t.node.enter();
        sh("ip", &["link", "set", "lo", "up"]);
        sh(
            "ip",
            &["link", "add", UPLINK, "type", "veth", "peer", "name", "c0"],
        );
        sh("ip", &["link", "set", "c0", "netns", &t.client.path()]);
        sh("ip", &["addr", "add", "192.0.2.1/24", "dev", UPLINK]);
        sh("ip", &["link", "set", UPLINK, "up"]);
        make_router();
        drop(_in);
        {
            let _in = t.client.enter();
            sh("ip", &["addr", "add", "192.0.2.2/24", "dev", "c0"]);
            sh("ip", &["link", "set", "c0", "up"]);
        }
        for _ in 0..instances {
            t.add_instance();
        }
        t
    }

    /// Adds instance `I` (1, 2, ...) with its veth and its servers.
    fn add_instance(&mut self) -> Ipv4Addr {
        let i = u8::try_from(self.instances.len() + 1).unwrap();
        let (ns, server, addr) = plug_instance(&self.node, 88, i);
        self.servers.push(server);
        self.instances.push(ns);
        addr
    }
}

/// Instance `i` of the cell `10.<cell>.0.0/16` behind veth `h<i>` of
/// `node`: `10.<cell>.<i>.2/30`, default route via the node's end, its
/// servers started.
fn plug_instance(node: &Netns, cell: u8, i: u8) -> (Netns, Server, Ipv4Addr) {
    let ns = Netns::new();
    let (host, peer) = (format!("h{i}"), format!("i{i}"));
    {
        let _in = node.enter();
        sh(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        sh("ip", &["link", "set", &peer, "netns", &ns.path()]);
        sh(
            "ip",
            &["addr", "add", &format!("10.{cell}.{i}.1/30"), "dev", &host],
        );
        sh("ip", &["link", "set", &host, "up"]);
    }
    {
        let _in = ns.enter();
        sh("ip", &["link", "set", "lo", "up"]);
        sh(
            "ip",
            &["addr", "add", &format!("10.{cell}.{i}.2/30"), "dev", &peer],
        );
        sh("ip", &["link", "set", &peer, "up"]);
        sh(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                &format!("10.{cell}.{i}.1"),
            ],
        );
    }
    let addr = Ipv4Addr::new(10, cell, i, 2);
    let server = Server::start(&ns, name_of(addr));
    (ns, server, addr)
}

/// Lets a node namespace forward, without reverse-path filtering.
fn make_router() {
    for knob in [
        "ipv4/ip_forward",
        "ipv4/conf/all/rp_filter",
        "ipv4/conf/default/rp_filter",
    ] {
        let value = if knob.ends_with("forward") { "1" } else { "0" };
        std::fs::write(format!("/proc/sys/net/{knob}"), value).unwrap();
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Servers first: their threads hold the instance namespaces.
        self.servers.clear();
    }
}

// ---------------------------------------------------------------------------
// the control plane, as the agent will run it

struct Control {
    table: ServiceTable,
    programmed: Programmed,
}

fn owner() -> ServiceOwner {
    ServiceOwner {
        tenant: TenantId::new("acme").unwrap(),
        app: AppId::new("web").unwrap(),
    }
}

fn published(port: u16, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        vip: Ipv4Addr::UNSPECIFIED,
        port,
        protocol,
    }
}

fn backends(addrs: &[Ipv4Addr], port: u16, ready: bool) -> Vec<Backend> {
    addrs
        .iter()
        .map(|a| Backend {
            addr: BackendAddr { addr: *a, port },
            weight: Weight::ONE,
            ready,
        })
        .collect()
}

impl Control {
    fn new() -> Control {
        Control {
            table: ServiceTable::new(Limits::default()).unwrap(),
            programmed: Programmed::new(),
        }
    }

    fn publish(&mut self, lb: &mut Balancer, key: ServiceKey, backends: Vec<Backend>) -> Vec<Op> {
        self.publish_on(&mut [lb], key, backends)
    }

    /// Publishes on several nodes with the same plan (same ids, same rings).
    fn publish_on(
        &mut self,
        lbs: &mut [&mut Balancer],
        key: ServiceKey,
        backends: Vec<Backend>,
    ) -> Vec<Op> {
        let spec = ServiceSpec {
            owner: owner(),
            published: true,
            backends,
        };
        self.table.upsert(key, spec).unwrap();
        self.sync_on(lbs)
    }

    fn sync(&mut self, lb: &mut Balancer) -> Vec<Op> {
        self.sync_on(&mut [lb])
    }

    fn sync_on(&mut self, lbs: &mut [&mut Balancer]) -> Vec<Op> {
        let ops = plan(&self.programmed, &self.table.desired());
        for op in &ops {
            for lb in lbs.iter_mut() {
                lb.apply(op).unwrap_or_else(|e| panic!("{op:?}: {e}"));
            }
            self.programmed.apply(op).unwrap();
        }
        self.table.release(&self.programmed);
        ops
    }

    /// The instance the ring sends a new flow to, by the model of the maps
    /// (checked against the kernel's copy of the ring).
    fn expected(&self, lb: &Balancer, key: &ServiceKey, flow: &FlowTuple) -> String {
        let entry = &self.programmed.services()[key];
        let ring = entry.ring.expect("a published service with a ring");
        let ring_key = RingKey {
            service: entry.id,
            generation: ring.generation,
        };
        let model = &self.programmed.rings()[&ring_key];
        let kernel = lb
            .ring(&ring_key)
            .unwrap()
            .expect("the ring is in lb_rings");
        assert_eq!(kernel.len(), model.len());
        let slot = (flow_hash(flow) % ring.size) as usize;
        assert_eq!(kernel[slot], model[slot].get());
        name_of(self.programmed.backends()[&model[slot]].addr)
    }
}

fn tcp_flow(sport: u16, dport: u16) -> FlowTuple {
    FlowTuple {
        saddr: CLIENT,
        daddr: NODE,
        sport,
        dport,
        proto: 6,
    }
}

/// Sends a request on the connection and returns the instance's name.
fn ask(s: &mut TcpStream) -> String {
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.write_all(b"?").unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while s.read(&mut byte).unwrap() == 1 && byte[0] != b'\n' {
        line.push(byte[0]);
    }
    String::from_utf8(line).unwrap()
}

fn connect(port: u16) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(&SocketAddr::from((NODE, port)), TIMEOUT)
}

fn load(pins: &PinDir) -> (Balancer, NodePort) {
    let lb = Balancer::load(&pins.path).unwrap();
    let mut np = NodePort::load(&pins.path).unwrap();
    np.set_node_addresses(&[NODE]).unwrap();
    np.set_cell_subnet(Ipv4Addr::new(10, 88, 0, 0), 16).unwrap();
    (lb, np)
}

fn count(np: &NodePort, verdict: Verdict) -> u64 {
    np.counter(verdict).unwrap().packets
}

/// Filters on the uplink, as `(direction, program)`.
fn uplink_filters(node: &Netns) -> Vec<(String, String)> {
    let _in = node.enter();
    let mut out = Vec::new();
    for dir in ["ingress", "egress"] {
        let text = sh("tc", &["filter", "show", "dev", UPLINK, dir]);
        for line in text.lines().filter(|l| l.contains("corral_np_")) {
            let prog = line
                .split_whitespace()
                .find(|w| w.starts_with("corral_np_"))
                .unwrap();
            out.push((dir.to_owned(), prog.split(':').next().unwrap().to_owned()));
        }
    }
    out
}

// ---------------------------------------------------------------------------

#[test]
fn published_ports_are_balanced_by_the_ring_and_flows_stick() {
    let pins = PinDir::new();
    let mut topo = Topology::new(3);
    let (mut lb, mut np) = load(&pins);
    {
        let _in = topo.node.enter();
        np.attach(UPLINK).unwrap();
    }
    let mut ctl = Control::new();
    let addrs: Vec<Ipv4Addr> = (1..=3).map(instance_addr).collect();
    let web = published(WEB, Protocol::Tcp);
    let ops = ctl.publish(&mut lb, web, backends(&addrs, TCP_PORT, true));
    assert!(ops.iter().any(|op| matches!(op, Op::CreateRing { .. })));

    let _in = topo.client.enter();

    // Many connections: each reaches exactly the backend the ring names for
    // its tuple, the peer is the node's address and published port (the
    // handshake completed, so the SYN-ACK came back from there), and every
    // backend gets some.
    let mut hits = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let mut s = connect(WEB).unwrap();
        assert_eq!(s.peer_addr().unwrap(), SocketAddr::from((NODE, WEB)));
        let sport = s.local_addr().unwrap().port();
        let got = ask(&mut s);
        assert_eq!(
            got,
            ctl.expected(&lb, &web, &tcp_flow(sport, WEB)),
            "port {sport}"
        );
        *hits.entry(got).or_insert(0) += 1;
    }
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert_eq!(count(&np, Verdict::NewFlow), 60);
    assert!(count(&np, Verdict::Local) >= 60 * 3);
    assert!(count(&np, Verdict::Reply) >= 60 * 2);
    assert_eq!(count(&np, Verdict::DropNoBackend), 0);

    // Long-lived connections keep their backend when the ring changes: a
    // fourth backend takes some of their slots, not their flows.
    let mut long: Vec<(TcpStream, String)> = (0..40)
        .map(|_| {
            let mut s = connect(WEB).unwrap();
            let name = ask(&mut s);
            (s, name)
        })
        .collect();
    let flows_before = np.flows_len().unwrap();
    drop(_in);
    let fourth = topo.add_instance();
    let _in = topo.client.enter();
    let mut all = addrs.clone();
    all.push(fourth);
    let ops = ctl.publish(&mut lb, web, backends(&all, TCP_PORT, true));
    assert!(
        ops.iter().any(|op| matches!(op, Op::PutRingSlots { .. })),
        "same ring size: updated in place"
    );
    let mut moved = 0;
    for (s, name) in &mut long {
        let sport = s.local_addr().unwrap().port();
        if ctl.expected(&lb, &web, &tcp_flow(sport, WEB)) != *name {
            moved += 1;
        }
        assert_eq!(ask(s), *name, "flow from port {sport} changed backend");
    }
    assert!(
        moved > 0,
        "no long-lived flow's slot moved: the test proves nothing"
    );
    assert!(np.flows_len().unwrap() >= flows_before);
    // New flows follow the new ring, the fourth backend included.
    let mut fourth_hit = false;
    for _ in 0..40 {
        let mut s = connect(WEB).unwrap();
        let sport = s.local_addr().unwrap().port();
        let got = ask(&mut s);
        assert_eq!(got, ctl.expected(&lb, &web, &tcp_flow(sport, WEB)));
        fourth_hit |= got == name_of(fourth);
    }
    assert!(fourth_hit);
    drop(long);

    // UDP: datagrams reach the ring's backend, replies come from the node.
    drop(_in);
    let dns = published(DNS, Protocol::Udp);
    ctl.publish(&mut lb, dns, backends(&all, UDP_PORT, true));
    let _in = topo.client.enter();
    for _ in 0..5 {
        let sock = UdpSocket::bind((CLIENT, 0)).unwrap();
        sock.set_read_timeout(Some(TIMEOUT)).unwrap();
        sock.send_to(b"?", (NODE, DNS)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(from, SocketAddr::from((NODE, DNS)));
        let flow = FlowTuple {
            proto: 17,
            ..tcp_flow(sock.local_addr().unwrap().port(), DNS)
        };
        assert_eq!(
            String::from_utf8_lossy(&buf[..n]),
            ctl.expected(&lb, &dns, &flow)
        );
    }

    // A published port without a ready backend drops new flows, counted.
    drop(_in);
    let empty = published(EMPTY, Protocol::Tcp);
    ctl.publish(&mut lb, empty, backends(&addrs, TCP_PORT, false));
    assert_eq!(ctl.programmed.services()[&empty].ring, None);
    let _in = topo.client.enter();
    let drops = count(&np, Verdict::DropNoBackend);
    let err =
        TcpStream::connect_timeout(&SocketAddr::from((NODE, EMPTY)), Duration::from_millis(300))
            .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");
    assert!(count(&np, Verdict::DropNoBackend) > drops);

    // A port that is not published is the node's own business: refused by
    // its kernel, not dropped by the balancer.
    let err = connect(TCP_PORT).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert_eq!(count(&np, Verdict::DropRemote), 0);
    assert_eq!(count(&np, Verdict::DropError), 0);
}

#[test]
fn flows_survive_an_agent_restart_and_a_reattach() {
    let pins = PinDir::new();
    let topo = Topology::new(2);
    let (mut lb, mut np) = load(&pins);
    {
        let _in = topo.node.enter();
        np.attach(UPLINK).unwrap();
    }
    let mut ctl = Control::new();
    let addrs: Vec<Ipv4Addr> = (1..=2).map(instance_addr).collect();
    let web = published(WEB, Protocol::Tcp);
    ctl.publish(&mut lb, web, backends(&addrs, TCP_PORT, true));
    let mut s = {
        let _in = topo.client.enter();
        let mut s = connect(WEB).unwrap();
        ask(&mut s);
        s
    };
    let name = {
        let _in = topo.client.enter();
        ask(&mut s)
    };

    // The agent goes away: the filters keep their programs running.
    drop(np);
    drop(lb);
    {
        let _in = topo.client.enter();
        assert_eq!(ask(&mut s), name);
    }

    // It comes back: the pinned maps hold the addresses, flows, reverse
    // translations and counters; attaching replaces the programs in place.
    let (mut lb, mut np) = load(&pins);
    assert_eq!(np.node_addresses().unwrap(), vec![NODE]);
    // The maps read back (rings included) are exactly what was programmed.
    let mut adopted = Programmed::new();
    for op in lb.dump().unwrap() {
        adopted.apply(&op).unwrap();
    }
    assert_eq!(adopted.services(), ctl.programmed.services());
    assert_eq!(adopted.rings(), ctl.programmed.rings());
    assert_eq!(adopted.backends(), ctl.programmed.backends());
    assert!(np.flows_len().unwrap() >= 1);
    assert!(np.nats_len().unwrap() >= 1);
    assert!(count(&np, Verdict::NewFlow) >= 1);
    let sport = s.local_addr().unwrap().port();
    assert!(np.flow_backend(&tcp_flow(sport, WEB)).unwrap().is_some());
    {
        let _in = topo.node.enter();
        np.attach(UPLINK).unwrap();
    }
    let expected = vec![
        ("ingress".to_owned(), "corral_np_ingress".to_owned()),
        ("egress".to_owned(), "corral_np_egress".to_owned()),
    ];
    assert_eq!(uplink_filters(&topo.node), expected, "one filter per hook");
    {
        let _in = topo.client.enter();
        assert_eq!(ask(&mut s), name);
    }

    // Detached: published ports reach the node itself (nothing listens:
    // refused); the state stays for the next attach.
    {
        let _in = topo.node.enter();
        np.detach(UPLINK).unwrap();
        np.detach(UPLINK).unwrap();
    }
    assert!(uplink_filters(&topo.node).is_empty());
    {
        let _in = topo.client.enter();
        let err = connect(WEB).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    assert!(np.flows_len().unwrap() >= 1);
    {
        let _in = topo.node.enter();
        np.attach(UPLINK).unwrap();
    }
    {
        let _in = topo.client.enter();
        let mut fresh = connect(WEB).unwrap();
        let sport = fresh.local_addr().unwrap().port();
        assert_eq!(
            ask(&mut fresh),
            ctl.expected(&lb, &web, &tcp_flow(sport, WEB))
        );
    }

    // Unpublished: the port is the node's own again.
    ctl.table.remove(&web).unwrap();
    ctl.sync(&mut lb);
    assert!(ctl.programmed.rings().is_empty());
    {
        let _in = topo.client.enter();
        let err = connect(WEB).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    }
    drop(s);
}

// ---------------------------------------------------------------------------
// the rewrite itself, on crafted frames (BPF_PROG_TEST_RUN): checksums are
// complete here (no offload), so the incremental updates are checked exactly

const TC_ACT_OK: u32 = 0;

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum()
}

/// The L4 checksum over the pseudo-header and `l4` (whose checksum field
/// is part of the sum: 0 when the stored checksum is right).
fn l4_check(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> u16 {
    let len = u16::try_from(l4.len()).unwrap();
    let pseudo = [&src[..], &dst[..], &[0, proto], &len.to_be_bytes()[..]].concat();
    fold(sum16(&pseudo) + sum16(l4))
}

/// An Ethernet + IPv4 + TCP/UDP frame with correct checksums.
fn frame(proto: u8, src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), udp_csum: bool) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.1.to_be_bytes());
    l4.extend_from_slice(&dst.1.to_be_bytes());
    let csum_at = if proto == 6 {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        16
    } else {
        l4.extend_from_slice(&[0, 13, 0, 0]);
        6
    };
    l4.extend_from_slice(b"hello");
    if proto == 17 {
        let len = u16::try_from(l4.len()).unwrap();
        l4[4..6].copy_from_slice(&len.to_be_bytes());
    }
    if proto == 6 || udp_csum {
        let c = l4_check(src.0.octets(), dst.0.octets(), proto, &l4);
        l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let total = u16::try_from(20 + l4.len()).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    ip.extend_from_slice(&src.0.octets());
    ip.extend_from_slice(&dst.0.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&l4);
    f
}

/// Runs a program on a frame; returns the verdict and the frame after it.
fn run(np: &NodePort, program: &str, input: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; input.len() + 64];
    let opts = aya::TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..aya::TestRunOptions::default()
    };
    use aya::TestRun as _;
    let result = np.program(program).unwrap().test_run(opts).unwrap();
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Addresses, ports and checksums of a frame: `(src, dst, ip ok, l4 csum)`
/// where `l4 csum` is 0 when the stored checksum is right.
fn inspect(f: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16), bool, u16, u16) {
    let ip = &f[14..34];
    let l4 = &f[34..];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let sport = u16::from_be_bytes([l4[0], l4[1]]);
    let dport = u16::from_be_bytes([l4[2], l4[3]]);
    let stored = if ip[9] == 6 {
        u16::from_be_bytes([l4[16], l4[17]])
    } else {
        u16::from_be_bytes([l4[6], l4[7]])
    };
    let ip_ok = fold(sum16(ip)) == 0;
    let l4_sum = l4_check(
        ip[12..16].try_into().unwrap(),
        ip[16..20].try_into().unwrap(),
        ip[9],
        l4,
    );
    ((src, sport), (dst, dport), ip_ok, l4_sum, stored)
}

#[test]
fn the_rewrite_keeps_every_checksum_right() {
    require_root();
    let pins = PinDir::new();
    let (mut lb, np) = load(&pins);
    let mut ctl = Control::new();
    let backend = Ipv4Addr::new(10, 88, 7, 2);
    let web = published(WEB, Protocol::Tcp);
    ctl.publish(&mut lb, web, backends(&[backend], TCP_PORT, true));
    let dns = published(DNS, Protocol::Udp);
    ctl.publish(&mut lb, dns, backends(&[backend], UDP_PORT, true));
    let client = (Ipv4Addr::new(203, 0, 113, 9), 40_000);

    for (proto, port, to, udp_csum) in [
        (6, WEB, TCP_PORT, true),
        (17, DNS, UDP_PORT, true),
        (17, DNS, UDP_PORT, false),
    ] {
        // In: the destination becomes the backend, checksums stay right.
        let (verdict, out) = run(
            &np,
            "corral_np_ingress",
            &frame(proto, client, (NODE, port), udp_csum),
        );
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst, ip_ok, l4_sum, stored) = inspect(&out);
        assert_eq!((src, dst), (client, (backend, to)));
        assert!(ip_ok, "IPv4 checksum ({proto})");
        if udp_csum {
            assert_eq!(l4_sum, 0, "L4 checksum ({proto})");
        } else {
            assert_eq!(stored, 0, "a UDP datagram without checksum keeps none");
        }

        // Out: the reply's source becomes the node address and published port.
        let reply = frame(proto, (backend, to), client, udp_csum);
        let (verdict, out) = run(&np, "corral_np_egress", &reply);
        assert_eq!(verdict, TC_ACT_OK);
        let (src, dst, ip_ok, l4_sum, stored) = inspect(&out);
        assert_eq!((src, dst), ((NODE, port), client));
        assert!(ip_ok);
        if udp_csum {
            assert_eq!(l4_sum, 0, "L4 checksum of the reply ({proto})");
        } else {
            assert_eq!(stored, 0);
        }
    }

    // Other traffic passes untouched: not the node, not published.
    for f in [
        frame(6, client, (Ipv4Addr::new(192, 0, 2, 77), WEB), true),
        frame(6, client, (NODE, 22), true),
    ] {
        assert_eq!(run(&np, "corral_np_ingress", &f), (TC_ACT_OK, f.clone()));
    }
    assert_eq!(count(&np, Verdict::Local), 3);
    assert_eq!(count(&np, Verdict::Reply), 3);
}

#[test]
fn a_flow_entry_is_ignored_once_its_backend_id_means_another_address() {
    require_root();
    let pins = PinDir::new();
    let (mut lb, np) = load(&pins);
    let mut ctl = Control::new();
    let first = Ipv4Addr::new(10, 88, 7, 2);
    let web = published(WEB, Protocol::Tcp);
    ctl.publish(&mut lb, web, backends(&[first], TCP_PORT, true));
    let client = (Ipv4Addr::new(203, 0, 113, 9), 40_001);
    let syn = frame(6, client, (NODE, WEB), true);
    let flow = FlowTuple {
        saddr: client.0,
        ..tcp_flow(client.1, WEB)
    };

    let (_, out) = run(&np, "corral_np_ingress", &syn);
    assert_eq!(inspect(&out).1, (first, TCP_PORT));
    let id = np
        .flow_backend(&flow)
        .unwrap()
        .expect("the flow is in np_flows");
    let (_, out) = run(&np, "corral_np_ingress", &syn);
    assert_eq!(inspect(&out).1, (first, TCP_PORT));
    assert_eq!(
        count(&np, Verdict::NewFlow),
        1,
        "the second packet is a table hit"
    );

    // The id now names another address (as after the router reused it):
    // the entry no longer holds, the flow is picked from the ring again.
    let other = Ipv4Addr::new(10, 88, 9, 2);
    lb.set_backend(id, other, TCP_PORT).unwrap();
    let (_, out) = run(&np, "corral_np_ingress", &syn);
    assert_eq!(inspect(&out).1, (other, TCP_PORT));
    assert_eq!(count(&np, Verdict::NewFlow), 2);

    // A backend outside the cell's subnet, with no route through a peer
    // node (a namespace with no route at all): dropped, not sent astray.
    lb.set_backend(id, Ipv4Addr::new(10, 99, 0, 2), TCP_PORT)
        .unwrap();
    let empty = Netns::new();
    let _in = empty.enter();
    let (verdict, _) = run(&np, "corral_np_ingress", &syn);
    assert_eq!(verdict, 2, "TC_ACT_SHOT");
    assert_eq!(count(&np, Verdict::DropRemote), 1);
}

// ---------------------------------------------------------------------------
// remote backends: IPIP to the backend's node, direct server return

const NODE_B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 3);
const CELL_A: u8 = 88;
const CELL_B: u8 = 89;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// The node links' MTU: room for a 1500-byte packet and the outer header.
const FABRIC_MTU: &str = "1520";

fn load_node(
    dir: &std::path::Path,
    addr: Ipv4Addr,
    peer: Ipv4Addr,
    cell: u8,
) -> (Balancer, NodePort) {
    let lb = Balancer::load(dir).unwrap();
    let mut np = NodePort::load(dir).unwrap();
    np.set_node_addresses(&[addr]).unwrap();
    np.set_peer_addresses(&[peer]).unwrap();
    np.set_cell_subnet(Ipv4Addr::new(10, cell, 0, 0), 16)
        .unwrap();
    (lb, np)
}

/// An IPv4 header's checksum is right (sums to zero).
fn ip_ok(header: &[u8]) -> bool {
    fold(sum16(header)) == 0
}

/// Wraps an Ethernet frame's IPv4 packet in an outer header from `src` to
/// `dst`, as a peer node does.
fn encapsulate(frame: &[u8], src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let total = u16::try_from(frame.len() - 14 + 20).unwrap();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = fold(sum16(&ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    [&frame[..14], &ip[..], &frame[14..]].concat()
}

#[test]
fn a_remote_backend_gets_the_packet_unmodified_in_ipip_and_its_node_unwraps_it() {
    require_root();
    let pins = PinDir::new();
    let backend = Ipv4Addr::new(10, CELL_B, 1, 2);
    let web = published(WEB, Protocol::Tcp);
    let client = (Ipv4Addr::new(203, 0, 113, 9), 40_002);

    // Node A's routes, in a namespace of its own (test runs use its
    // loopback as the arrival device): B's cell via B.
    let node_a = Netns::new();
    {
        let _in = node_a.enter();
        make_router();
        sh("ip", &["link", "set", "lo", "up"]);
        sh(
            "ip",
            &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
        );
        sh("ip", &["addr", "add", "192.0.2.1/24", "dev", "d0"]);
        sh("ip", &["link", "set", "d1", "up"]);
        sh("ip", &["link", "set", "d0", "up"]);
        sh("ip", &["route", "add", "10.89.0.0/16", "via", "192.0.2.3"]);
    }
    let (mut lb_a, np_a) = load_node(&pins.path.join("a"), NODE, NODE_B, CELL_A);
    let (mut lb_b, mut np_b) = load_node(&pins.path.join("b"), NODE_B, NODE, CELL_B);
    let mut ctl = Control::new();
    ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        web,
        backends(&[backend], TCP_PORT, true),
    );

    // A: the frame leaves redirected, inside an outer header A -> B with
    // a valid checksum, DF, protocol 4; the inner packet byte for byte.
    let syn = frame(6, client, (NODE, WEB), true);
    let (verdict, wrapped) = {
        let _in = node_a.enter();
        run(&np_a, "corral_np_ingress", &syn)
    };
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(wrapped.len(), syn.len() + 20);
    assert_eq!(
        wrapped[..14],
        syn[..14],
        "Ethernet: filled in on the way out"
    );
    let outer = &wrapped[14..34];
    assert_eq!(outer[0], 0x45);
    assert_eq!(
        usize::from(u16::from_be_bytes([outer[2], outer[3]])),
        syn.len() - 14 + 20
    );
    assert_eq!(outer[6] & 0x40, 0x40, "DF");
    assert_eq!(outer[9], 4, "IPIP");
    assert_eq!(outer[12..16], NODE.octets());
    assert_eq!(outer[16..20], NODE_B.octets());
    assert!(ip_ok(outer), "outer IPv4 checksum");
    assert_eq!(wrapped[34..], syn[14..], "the inner packet is untouched");
    assert_eq!(count(&np_a, Verdict::Forwarded), 1);
    assert_eq!(count(&np_a, Verdict::NewFlow), 1);
    assert_eq!(count(&np_a, Verdict::Local), 0);
    assert_eq!(
        np_a.nats_len().unwrap(),
        0,
        "the reply does not come back here"
    );

    // B: unwrapped, DNATed to its local backend, checksums right; the
    // reply's source becomes A's address and the published port.
    let (verdict, out) = run(&np_b, "corral_np_ingress", &wrapped);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out.len(), syn.len());
    let (src, dst, ip_ok_, l4_sum, _) = inspect(&out);
    assert_eq!((src, dst), (client, (backend, TCP_PORT)));
    assert!(ip_ok_);
    assert_eq!(l4_sum, 0);
    assert_eq!(count(&np_b, Verdict::Decapsulated), 1);
    assert_eq!(count(&np_b, Verdict::Local), 1);
    let (verdict, out) = run(
        &np_b,
        "corral_np_egress",
        &frame(6, (backend, TCP_PORT), client, true),
    );
    assert_eq!(verdict, TC_ACT_OK);
    let (src, dst, ip_ok_, l4_sum, _) = inspect(&out);
    assert_eq!((src, dst), ((NODE, WEB), client));
    assert!(ip_ok_);
    assert_eq!(l4_sum, 0);
    assert_eq!(count(&np_b, Verdict::Reply), 1);

    // What B does not take from the tunnel passes untouched: a sender that
    // is not a peer, an inner destination that is not the sender's own
    // address (B would send replies from it), an unpublished port.
    let stranger = Ipv4Addr::new(192, 0, 2, 66);
    for f in [
        encapsulate(&syn, stranger, NODE_B),
        encapsulate(&frame(6, client, (stranger, WEB), true), NODE, NODE_B),
        encapsulate(&frame(6, client, (NODE, 22), true), NODE, NODE_B),
        encapsulate(&syn, NODE, stranger),
    ] {
        assert_eq!(run(&np_b, "corral_np_ingress", &f), (TC_ACT_OK, f.clone()));
    }
    assert_eq!(count(&np_b, Verdict::Decapsulated), 1);

    // B's rings said otherwise (an update in flight): dropped, counted,
    // never sent on.
    np_b.set_cell_subnet(Ipv4Addr::new(10, 90, 0, 0), 16)
        .unwrap();
    let other = encapsulate(
        &frame(6, (client.0, 40_003), (NODE, WEB), true),
        NODE,
        NODE_B,
    );
    assert_eq!(run(&np_b, "corral_np_ingress", &other).0, TC_ACT_SHOT);
    assert_eq!(count(&np_b, Verdict::DropNotLocal), 1);
    assert_eq!(count(&np_b, Verdict::Forwarded), 0);

    // A: too big for the link once wrapped: dropped and counted, until
    // the link carries the 20 bytes more.
    let big = {
        let mut f = frame(17, client, (NODE, DNS), false);
        f.resize(14 + 1500, 0);
        let ip_len = 1500u16.to_be_bytes();
        f[16..18].copy_from_slice(&ip_len);
        f[24..26].copy_from_slice(&[0, 0]);
        let c = fold(sum16(&f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        f[38..40].copy_from_slice(&1480u16.to_be_bytes());
        f
    };
    let dns = published(DNS, Protocol::Udp);
    ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        dns,
        backends(&[backend], UDP_PORT, true),
    );
    let _in = node_a.enter();
    assert_eq!(run(&np_a, "corral_np_ingress", &big).0, TC_ACT_SHOT);
    assert_eq!(count(&np_a, Verdict::DropTooBig), 1);
    sh("ip", &["link", "set", "d0", "mtu", FABRIC_MTU]);
    let (verdict, wrapped) = run(&np_a, "corral_np_ingress", &big);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(wrapped[34..], big[14..]);

    // No route through a peer (the route to B's cell now goes elsewhere):
    // dropped as remote, not sent to a node that would not unwrap it.
    sh(
        "ip",
        &["route", "replace", "10.89.0.0/16", "via", "192.0.2.77"],
    );
    assert_eq!(run(&np_a, "corral_np_ingress", &syn).0, TC_ACT_SHOT);
    assert_eq!(count(&np_a, Verdict::DropRemote), 1);
    assert_eq!(count(&np_a, Verdict::DropError), 0);
    assert_eq!(count(&np_b, Verdict::DropError), 0);
}

/// Two nodes and a client on one bridge (see the module docs), each node
/// with its instances and the route to the other's cell, as the agent
/// installs it.
struct Fabric {
    bridge: Netns,
    client: Netns,
    nodes: [Netns; 2],
    instances: Vec<Netns>,
    servers: Vec<Server>,
    plugged: [u8; 2],
}

/// Node `n`'s address and cell.
const NODES: [(Ipv4Addr, u8); 2] = [(NODE, CELL_A), (NODE_B, CELL_B)];

impl Fabric {
    fn new() -> Fabric {
        require_root();
        let f = Fabric {
            bridge: Netns::new(),
            client: Netns::new(),
            nodes: [Netns::new(), Netns::new()],
            instances: Vec::new(),
            servers: Vec::new(),
            plugged: [0, 0],
        };
        {
            let _in = f.bridge.enter();
            sh("ip", &["link", "add", "br0", "type", "bridge"]);
            sh("ip", &["link", "set", "br0", "up"]);
        }
        let bridge_port = |ns: &Netns, dev: &str, port: &str, mtu: &str| {
            {
                let _in = ns.enter();
                sh("ip", &["link", "set", "lo", "up"]);
                sh(
                    "ip",
                    &[
                        "link", "add", dev, "mtu", mtu, "type", "veth", "peer", "name", port,
                        "mtu", mtu,
                    ],
                );
                sh("ip", &["link", "set", port, "netns", &f.bridge.path()]);
                sh("ip", &["link", "set", dev, "up"]);
            }
            let _in = f.bridge.enter();
            sh("ip", &["link", "set", port, "master", "br0"]);
            sh("ip", &["link", "set", port, "up"]);
        };
        bridge_port(&f.client, "c0", "pc", "1500");
        {
            let _in = f.client.enter();
            sh("ip", &["addr", "add", "192.0.2.2/24", "dev", "c0"]);
        }
        for (n, (addr, _)) in NODES.iter().enumerate() {
            bridge_port(&f.nodes[n], UPLINK, &format!("p{n}"), FABRIC_MTU);
            let (_, other_cell) = NODES[1 - n];
            let other = NODES[1 - n].0.to_string();
            let _in = f.nodes[n].enter();
            make_router();
            sh("ip", &["addr", "add", &format!("{addr}/24"), "dev", UPLINK]);
            sh(
                "ip",
                &[
                    "route",
                    "add",
                    &format!("10.{other_cell}.0.0/16"),
                    "via",
                    &other,
                ],
            );
        }
        f
    }

    /// Adds an instance to node `n`.
    fn add_instance(&mut self, n: usize) -> Ipv4Addr {
        self.plugged[n] += 1;
        let (ns, server, addr) = plug_instance(&self.nodes[n], NODES[n].1, self.plugged[n]);
        self.servers.push(server);
        self.instances.push(ns);
        addr
    }

    /// Loads and attaches both nodes' balancers, each in its own pin
    /// directory under `pins`.
    fn load(&self, pins: &PinDir) -> [(Balancer, NodePort); 2] {
        [0, 1].map(|n| {
            let (addr, cell) = NODES[n];
            let peer = NODES[1 - n].0;
            let (lb, mut np) = load_node(&pins.path.join(format!("node{n}")), addr, peer, cell);
            let _in = self.nodes[n].enter();
            np.attach(UPLINK).unwrap();
            (lb, np)
        })
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        // Servers first: their threads hold the instance namespaces.
        self.servers.clear();
    }
}

fn flow_to(node: Ipv4Addr, sport: u16, dport: u16, proto: u8) -> FlowTuple {
    FlowTuple {
        saddr: CLIENT,
        daddr: node,
        sport,
        dport,
        proto,
    }
}

#[test]
fn backends_on_both_nodes_answer_through_either_node() {
    let pins = PinDir::new();
    let mut fabric = Fabric::new();
    let mut local = Vec::new();
    let mut remote = Vec::new();
    for _ in 0..2 {
        local.push(fabric.add_instance(0));
        remote.push(fabric.add_instance(1));
    }
    let [(mut lb_a, np_a), (mut lb_b, np_b)] = fabric.load(&pins);
    let mut ctl = Control::new();
    let all: Vec<Ipv4Addr> = local.iter().chain(&remote).copied().collect();
    let web = published(WEB, Protocol::Tcp);
    ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        web,
        backends(&all, TCP_PORT, true),
    );

    // Through either node, every backend on both nodes answers the flows
    // the ring gives it; the handshake completing with the node's address
    // and published port as the peer proves the direct return path from
    // the other node.
    let _in = fabric.client.enter();
    for node in [NODE, NODE_B] {
        let mut hits = std::collections::BTreeMap::new();
        for _ in 0..60 {
            let mut s =
                TcpStream::connect_timeout(&SocketAddr::from((node, WEB)), TIMEOUT).unwrap();
            assert_eq!(s.peer_addr().unwrap(), SocketAddr::from((node, WEB)));
            let sport = s.local_addr().unwrap().port();
            let got = ask(&mut s);
            assert_eq!(
                got,
                ctl.expected(&lb_a, &web, &flow_to(node, sport, WEB, 6)),
                "via {node}, port {sport}"
            );
            *hits.entry(got).or_insert(0) += 1;
        }
        assert_eq!(hits.len(), 4, "via {node}: {hits:?}");
    }
    for (np, name) in [(&np_a, "A"), (&np_b, "B")] {
        assert!(count(np, Verdict::Forwarded) > 0, "{name} forwarded none");
        assert!(
            count(np, Verdict::Decapsulated) > 0,
            "{name} unwrapped none"
        );
        assert!(count(np, Verdict::Local) > 0, "{name}");
        assert!(count(np, Verdict::Reply) > 0, "{name}");
        for v in [
            Verdict::DropNotLocal,
            Verdict::DropRemote,
            Verdict::DropTooBig,
            Verdict::DropError,
            Verdict::DropNoBackend,
        ] {
            assert_eq!(count(np, v), 0, "{name}: {}", v.name());
        }
    }
}

#[test]
fn flows_through_a_to_backends_on_b_stick_and_carry_udp() {
    let pins = PinDir::new();
    let mut fabric = Fabric::new();
    let mut addrs = Vec::new();
    for n in [0, 1, 0, 1] {
        addrs.push(fabric.add_instance(n));
    }
    let on_b = |name: &str| name.starts_with(&format!("inst{CELL_B}-"));
    let [(mut lb_a, np_a), (mut lb_b, np_b)] = fabric.load(&pins);
    let mut ctl = Control::new();
    let web = published(WEB, Protocol::Tcp);
    ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        web,
        backends(&addrs, TCP_PORT, true),
    );

    // Long-lived connections through A, about half of them to B's
    // backends, keep their backend when a fifth backend (on A) takes some
    // of their slots, on both nodes' rings.
    let mut long: Vec<(TcpStream, String)> = {
        let _in = fabric.client.enter();
        (0..100)
            .map(|_| {
                let mut s = connect(WEB).unwrap();
                let name = ask(&mut s);
                (s, name)
            })
            .collect()
    };
    assert!(long.iter().filter(|(_, n)| on_b(n)).count() > 20);
    let fifth = fabric.add_instance(0);
    addrs.push(fifth);
    let ops = ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        web,
        backends(&addrs, TCP_PORT, true),
    );
    assert!(ops.iter().any(|op| matches!(op, Op::PutRingSlots { .. })));
    let _in = fabric.client.enter();
    let mut moved_remote = 0;
    for (s, name) in &mut long {
        let sport = s.local_addr().unwrap().port();
        if on_b(name) && ctl.expected(&lb_a, &web, &tcp_flow(sport, WEB)) != *name {
            moved_remote += 1;
        }
        assert_eq!(ask(s), *name, "flow from port {sport} changed backend");
    }
    assert!(
        moved_remote > 0,
        "no flow to a backend on B lost its slot: the test proves nothing"
    );
    drop(long);
    let b_replies = count(&np_b, Verdict::Reply);
    assert!(b_replies > 0, "B answered A's flows directly");

    // UDP through A to a backend on B: the answer comes from A's address
    // and the published port; a full-size datagram too (the node links
    // carry the 20 bytes more), but not once A's link cannot.
    drop(_in);
    let dns = published(DNS, Protocol::Udp);
    ctl.publish_on(
        &mut [&mut lb_a, &mut lb_b],
        dns,
        backends(&addrs, UDP_PORT, true),
    );
    let _in = fabric.client.enter();
    let sock = (0..64)
        .map(|_| UdpSocket::bind((CLIENT, 0)).unwrap())
        .find(|sock| {
            let flow = flow_to(NODE, sock.local_addr().unwrap().port(), DNS, 17);
            on_b(&ctl.expected(&lb_a, &dns, &flow))
        })
        .expect("some source port goes to a backend on B");
    let flow = flow_to(NODE, sock.local_addr().unwrap().port(), DNS, 17);
    let expected = ctl.expected(&lb_a, &dns, &flow);
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let full = [b'?'; 1472];
    for payload in [&b"?"[..], &full[..]] {
        sock.send_to(payload, (NODE, DNS)).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sock.recv_from(&mut buf).unwrap();
        assert_eq!(from, SocketAddr::from((NODE, DNS)));
        assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
    }
    drop(_in);
    {
        let _in = fabric.nodes[0].enter();
        sh("ip", &["link", "set", UPLINK, "mtu", "1500"]);
    }
    let _in = fabric.client.enter();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sock.send_to(&full, (NODE, DNS)).unwrap();
    let mut buf = [0u8; 64];
    assert!(sock.recv_from(&mut buf).is_err(), "too big once wrapped");
    assert_eq!(count(&np_a, Verdict::DropTooBig), 1);
    sock.send_to(b"?", (NODE, DNS)).unwrap();
    sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
    assert_eq!(count(&np_b, Verdict::DropNotLocal), 0);
    assert_eq!(count(&np_a, Verdict::DropError), 0);
    assert_eq!(count(&np_b, Verdict::DropError), 0);
}

#[test]
fn counters_pinned_by_a_build_without_the_remote_path_stop_the_load() {
    let pins = PinDir::new();
    std::fs::create_dir_all(&pins.path).unwrap();
    let stale = pins.path.join("np_stats");
    let stale = stale.to_str().unwrap();
    sh(
        "bpftool",
        &[
            "map",
            "create",
            stale,
            "type",
            "percpu_array",
            "key",
            "4",
            "value",
            "16",
            "entries",
            "7",
            "name",
            "np_stats",
        ],
    );
    let err = NodePort::load(&pins.path).unwrap_err();
    assert!(
        matches!(err, corral_ebpf::Error::IncompatiblePin { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains(stale), "{err}");
}
