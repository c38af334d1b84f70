/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * corral.h: the ABI between corral's eBPF programs and the agent.
 *
 * Every map key and value is defined here, once. The Rust loader mirrors
 * each struct #[repr(C)] (ebpf/src/abi.rs) and a unit test compares the two
 * layouts field by field, using offsets measured by a host program compiled
 * from this very header (ebpf/src/bpf/layout.c, run by build.rs).
 *
 * Rules that keep the two sides in step:
 *   - fixed-width types only, no implicit padding: every hole is a named
 *     `pad*` field that both sides set to zero (hash keys are compared
 *     byte by byte, so padding would make lookups miss);
 *   - IPv4 addresses are in network byte order (as they appear in packets);
 *     ports and every other number are in host byte order;
 *   - tenant, app and instance numbers are assigned by the control plane;
 *     0 means "none/unknown" and is never assigned.
 */
#ifndef CORRAL_H
#define CORRAL_H

#include <linux/types.h>

/* Capacities (max_entries). Changing one makes existing pins incompatible. */
#define CORRAL_MAX_IFACES 4096	   /* instance veths on one cell; a power of 2 */
#define CORRAL_MAX_ENDPOINTS 65536 /* instance addresses in the cluster */
#define CORRAL_MAX_POLICIES 16384  /* cross-tenant allow rules */
#define CORRAL_MAX_POLICY_PAIRS 16384 /* (from, to) tenant pairs with rules */
#define CORRAL_MAX_FLOWS 65536	   /* conntrack: policy-allowed flows */
#define CORRAL_MAX_RETIRED_STATS 8192
#define CORRAL_MAX_DROP_STATS 8192

/* Conntrack idle timeouts: replies of a policy-allowed flow pass for this
 * long after the last packet of the flow's forward direction. */
#define CORRAL_CT_TCP_TIMEOUT_S 21600 /* 6 h, like Cilium's established TCP */
#define CORRAL_CT_OTHER_TIMEOUT_S 60
/* A flow's last_seen_ns is refreshed at most this often (1 s): the timeouts
 * above are therefore exact to within a second. */
#define CORRAL_CT_REFRESH_NS 1000000000ULL

/* Direction of a counted packet, seen from the instance. */
enum corral_direction {
	CORRAL_DIR_FROM_INSTANCE = 0, /* sent by the instance (TC ingress) */
	CORRAL_DIR_TO_INSTANCE = 1,   /* delivered to it (TC egress) */
};

/* Why a packet was dropped (key of drop_stats). */
enum corral_drop_reason {
	CORRAL_DROP_SPOOF = 1,	      /* source is not the instance's address */
	CORRAL_DROP_POLICY = 2,	      /* cross-tenant, no policy allows it */
	CORRAL_DROP_UNKNOWN_IFACE = 3, /* interface not in the ifaces map */
	CORRAL_DROP_IPV6 = 4,	      /* IPv6 is not supported yet */
	CORRAL_DROP_UNSUPPORTED = 5,   /* other ethertype (VLAN, ...) */
	CORRAL_DROP_MALFORMED = 6,     /* truncated or invalid headers */
};

/*
 * The host-side veth of ifindex I is described by ifaces[I % CORRAL_MAX_IFACES]
 * (its *slot*); the entry names I, so a stale or foreign entry never matches.
 * The agent gives instance veths ifindexes whose slots are free
 * (CORRAL_IFINDEX_BASE + slot), so live veths never share a slot.
 */
#define CORRAL_IFINDEX_BASE 1048576 /* 1 << 20, a multiple of CORRAL_MAX_IFACES */

/* ifaces: slot (__u32) -> the instance behind the veth in that slot. */
struct corral_iface {
	__u32 ifindex; /* the host-side veth's ifindex; 0: slot free */
	__u32 addr;    /* the instance's IPv4 address, network byte order */
	__u32 tenant;
	__u32 instance;
	__u32 app; /* the instance's app number (0: unknown) */
};

/* endpoints: IPv4 address (__u32, network byte order) -> owner. Holds every
 * instance of the cluster, not only this cell's. */
struct corral_endpoint {
	__u32 tenant;
	__u32 instance;
	__u32 app; /* the instance's app number (0: unknown) */
};

/*
 * policy: presence of a key allows traffic from_tenant -> to_tenant.
 * to_app 0 = every app of to_tenant; proto 0 = any protocol (then port
 * must be 0); port 0 = any port.
 */
struct corral_policy_key {
	__u32 from_tenant;
	__u32 to_tenant;
	__u32 to_app;
	__u16 port; /* destination port, host byte order */
	__u8 proto; /* IPPROTO_* */
	__u8 pad;
};

struct corral_policy_value {
	__u32 flags; /* reserved, 0 */
};

/*
 * policy_pairs: (from_tenant, to_tenant) -> which kinds of policy keys
 * exist for the pair (CORRAL_RULE_* bits), kept by the agent from the
 * policy map. Most cross-tenant packets then cost one lookup: a pair with
 * no rules is one miss, and only the kinds present are looked up.
 */
struct corral_pair_key {
	__u32 from_tenant;
	__u32 to_tenant;
};

struct corral_pair {
	__u32 kinds; /* CORRAL_RULE_* */
};

#define CORRAL_RULE_APP_PORT 0x01  /* to_app, proto, port */
#define CORRAL_RULE_APP_PROTO 0x02 /* to_app, proto, any port */
#define CORRAL_RULE_APP_ANY 0x04   /* to_app, anything */
#define CORRAL_RULE_PORT 0x08	   /* any app, proto, port */
#define CORRAL_RULE_PROTO 0x10	   /* any app, proto, any port */
#define CORRAL_RULE_ANY 0x20	   /* any app, anything */

/* conntrack: forward tuple of a cross-tenant flow a policy allowed. */
struct corral_flow {
	__u32 saddr; /* network byte order */
	__u32 daddr; /* network byte order */
	__u16 sport; /* host byte order; 0 for protocols without ports */
	__u16 dport;
	__u8 proto;
	__u8 pad1;
	__u16 pad2;
};

struct corral_flow_state {
	__u64 last_seen_ns; /* bpf_ktime_get_ns() of the last forward packet */
};

/*
 * instance_stats: a per-CPU array of struct corral_counter indexed by
 * slot * 2 + direction (enum corral_direction): the traffic of the instance
 * in that slot. Tenant totals are summed from them by the agent, which also
 * folds the counters of a slot it frees into retired_stats.
 *
 * retired_stats key: a tenant number and a direction. Written by the agent
 * only: the traffic of the tenant's instances that are gone.
 */
struct corral_counter_key {
	__u32 id;
	__u32 dir;
};

/* drop_stats key: the tenant whose instance sent (from-instance) or would
 * have received (to-instance) the packet, 0 if unknown, and the reason. */
struct corral_drop_key {
	__u32 tenant;
	__u32 reason;
};

/* Value of every stats map. bytes = skb->len, Ethernet included. */
struct corral_counter {
	__u64 packets;
	__u64 bytes;
};

/*
 * East-west service load balancing (lb.bpf.c): cgroup/connect4, sendmsg4,
 * recvmsg4 and getpeername4 programs send a socket aimed at a service
 * address (VIP:port) to one of its backends, chosen at connect (or send)
 * time, and make the backend look like the VIP to the application.
 */
#define CORRAL_LB_MAX_SERVICES 16384
#define CORRAL_LB_MAX_BACKENDS 65536
#define CORRAL_LB_MAX_BACKENDS_PER_SERVICE 256
#define CORRAL_LB_MAX_SOCKS 65536 /* lb_socks: reverse translations */
#define CORRAL_LB_F_PUBLISHED 1

/* lb_services key: a service address (VIP) and port. */
struct corral_lb_service_key {
	__u32 vip;  /* network byte order */
	__u16 port; /* host byte order */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 pad;
};

/*
 * lb_services value. The service's backends are lb_slots[id][i] for
 * i < count (lb_slots: ARRAY of CORRAL_LB_MAX_SERVICES + 1 elements of
 * __u32[CORRAL_LB_MAX_BACKENDS_PER_SERVICE], lb.bpf.c). Writers fill all
 * of lb_slots[id] (the list repeated) before they write the count, so a
 * reader holding an older count still finds a backend in any slot.
 */
struct corral_lb_service {
	__u32 id;	 /* service id, 1 ..= CORRAL_LB_MAX_SERVICES */
	__u32 count;	 /* ready backends; 0: connections are refused */
	__u32 flags;	 /* CORRAL_LB_F_* */
	__u32 ring_gen;	 /* published: the ring is lb_rings[{id, ring_gen}] */
	__u32 ring_size; /* its slots (a prime M); 0: no ring, new flows drop */
};

/* lb_backends: backend id (__u32) -> where it listens. */
struct corral_lb_backend {
	__u32 addr; /* network byte order */
	__u16 port; /* host byte order */
	__u16 pad;
};

/* lb_socks key: a socket (its cookie) and the backend it was sent to; the
 * value is the service address the application asked for, so that replies
 * and getpeername() show the VIP. */
struct corral_lb_sock_key {
	__u64 cookie;
	__u32 addr; /* backend, network byte order */
	__u16 port; /* backend, host byte order */
	__u16 pad;
};

struct corral_lb_sock {
	__u32 vip;  /* network byte order */
	__u16 port; /* host byte order */
	__u16 pad;
};

/*
 * lb_rings: HASH_OF_MAPS, 2 * CORRAL_LB_MAX_SERVICES entries (two
 * generations per service). Each value is an ARRAY of ring_size __u32
 * backend ids (a Maglev table), created with BPF_F_INNER_MAP so that rings
 * of different sizes fit the one outer map.
 */
struct corral_lb_ring_key {
	__u32 service; /* service id */
	__u32 gen;     /* 0 or 1 */
};

/*
 * North-south load balancing (nodeport.bpf.c), on the node's uplink: a
 * flow to one of the node's addresses (np_addrs) and a published port
 * (lb_services[{0, port, proto}] flagged CORRAL_LB_F_PUBLISHED) is sent to
 * a backend picked from the service's Maglev ring and remembered in
 * np_flows; replies get their source restored from np_nats.
 */
#define CORRAL_NP_MAX_ADDRS 64	   /* np_addrs: addresses of this node */
#define CORRAL_NP_MAX_PEERS 4096   /* np_peers: addresses of the other nodes */
#define CORRAL_NP_MAX_FLOWS 262144 /* np_flows and np_nats (LRU) */

/* np_config[0]: the cell's instance subnet (backends in it are local). */
struct corral_np_config {
	__u32 cell_net;	 /* network byte order */
	__u32 cell_mask; /* network byte order; 0: nothing is local */
};

/* np_flows: key struct corral_flow, the 5-tuple as it arrived (client ->
 * node address:published port); value: the backend the flow was sent to.
 * An entry is used only while lb_backends[backend] still holds addr:port
 * (backend ids are reused). */
struct corral_np_conn {
	__u32 backend; /* backend id */
	__u32 addr;    /* network byte order */
	__u16 port;    /* host byte order */
	__u16 pad;
};

/* np_nats: key struct corral_flow, a reply's 5-tuple (backend -> client);
 * value: the node address and published port the client asked for. */
struct corral_np_nat {
	__u32 addr; /* network byte order */
	__u16 port; /* host byte order */
	__u16 pad;
};

/* np_stats: per-CPU array of struct corral_counter, indexed by verdict. */
enum corral_np_verdict {
	CORRAL_NP_LOCAL = 0,	       /* sent to a backend on this node (DNAT) */
	CORRAL_NP_NEW_FLOW = 1,	       /* of those: first packet, ring pick */
	CORRAL_NP_REPLY = 2,	       /* egress: a reply's source restored */
	CORRAL_NP_DROP_NO_BACKEND = 3, /* no ring, no ready backend, ring miss */
	CORRAL_NP_DROP_REMOTE = 4,     /* backend on another node, no route via a peer */
	CORRAL_NP_DROP_FRAGMENT = 5,   /* fragmented datagram to a published port */
	CORRAL_NP_DROP_ERROR = 6,      /* a helper failed (rewrite, encap, decap) */
	CORRAL_NP_FORWARDED = 7,       /* sent in IPIP to the backend's node */
	CORRAL_NP_DECAPSULATED = 8,    /* IPIP from a peer, unwrapped (then counted again) */
	CORRAL_NP_DROP_NOT_LOCAL = 9,  /* from a peer, but the backend is not here */
	CORRAL_NP_DROP_TOO_BIG = 10,   /* would exceed the MTU once encapsulated */
	CORRAL_NP_VERDICTS = 11,
};

#endif /* CORRAL_H */
