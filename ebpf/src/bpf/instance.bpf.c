// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Instance networking: TC programs for the host side of each instance veth.
 *
 *   corral_from_instance  TC ingress of the host-side veth: packets the
 *                         instance sends. Anti-spoofing, tenant isolation,
 *                         metering.
 *   corral_to_instance    TC egress of the host-side veth: packets about to
 *                         be delivered into the instance. Tenant isolation
 *                         (the receiving cell enforces too, since the sender
 *                         may sit on another cell), metering.
 *
 * Verdicts (see the crate docs in ebpf/src/lib.rs for the full story):
 *   - a packet on an interface missing from `ifaces` is dropped (fail closed);
 *   - IPv4 from the instance must carry the instance's source address, ARP
 *     its sender address (or 0.0.0.0, as in ARP probes);
 *   - IPv6 and other ethertypes are dropped;
 *   - traffic between two endpoints of different tenants needs a policy, or
 *     must be the reply of a flow a policy allowed (conntrack);
 *   - traffic to/from addresses outside `endpoints` (the node, the world)
 *     is allowed.
 *
 * Map layouts are in corral.h. Headers are read by direct packet access;
 * a header that is not in the skb's linear part is pulled in first.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "corral.h"

#define IP_FRAG_OFFSET_MASK 0x1fff
#define NSEC_PER_SEC 1000000000ULL

/* The fixed part of an ARP header (linux/if_arp.h drags in libc headers). */
struct arp_hdr {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
};
char LICENSE[] SEC("license") = "Dual BSD/GPL";

_Static_assert((CORRAL_MAX_IFACES & (CORRAL_MAX_IFACES - 1)) == 0,
	       "CORRAL_MAX_IFACES must be a power of 2");
_Static_assert(CORRAL_IFINDEX_BASE % CORRAL_MAX_IFACES == 0,
	       "CORRAL_IFINDEX_BASE must be a multiple of CORRAL_MAX_IFACES");

/* Arrays, not hashes, on the path of every packet: an array lookup is
 * inlined by the verifier into a bounds check and an add. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_MAX_IFACES);
	__type(key, __u32); /* slot: ifindex % CORRAL_MAX_IFACES */
	__type(value, struct corral_iface);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ifaces SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_MAX_ENDPOINTS);
	__type(key, __u32); /* IPv4 address, network byte order */
	__type(value, struct corral_endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_MAX_POLICIES);
	__type(key, struct corral_policy_key);
	__type(value, struct corral_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_MAX_POLICY_PAIRS);
	__type(key, struct corral_pair_key);
	__type(value, struct corral_pair);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy_pairs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CORRAL_MAX_FLOWS);
	__type(key, struct corral_flow);
	__type(value, struct corral_flow_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2 * CORRAL_MAX_IFACES);
	__type(key, __u32); /* slot * 2 + enum corral_direction */
	__type(value, struct corral_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} instance_stats SEC(".maps");

/* Written by the agent only (see corral.h); part of the object so that it
 * is created and pinned with the others. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_MAX_RETIRED_STATS);
	__type(key, struct corral_counter_key);
	__type(value, struct corral_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} retired_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, CORRAL_MAX_DROP_STATS);
	__type(key, struct corral_drop_key);
	__type(value, struct corral_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} drop_stats SEC(".maps");

/* What the programs need to know about a packet. */
struct packet {
	__u32 saddr; /* network byte order; for ARP the sender protocol address */
	__u32 daddr;
	__u16 sport; /* host byte order, 0 without ports (or later fragments) */
	__u16 dport;
	__u8 proto;
};

#define PKT_IPV4 1
#define PKT_ARP 2

/* Adds one packet of len bytes to a per-CPU counter, creating it if needed. */
static __always_inline void count(void *map, const void *key, __u64 len)
{
	struct corral_counter *c = bpf_map_lookup_elem(map, key);

	if (!c) {
		struct corral_counter zero = {};

		/* EEXIST when another CPU created it first: fine either way. */
		bpf_map_update_elem(map, key, &zero, BPF_NOEXIST);
		c = bpf_map_lookup_elem(map, key);
		if (!c)
			return; /* map full: the count is lost, not the packet */
	}
	/* Per-CPU value, and TC runs with migration disabled: no atomics. */
	c->packets += 1;
	c->bytes += len;
}

static __always_inline int drop(struct __sk_buff *skb, __u32 tenant, __u32 reason)
{
	struct corral_drop_key key = { .tenant = tenant, .reason = reason };

	count(&drop_stats, &key, skb->len);
	return TC_ACT_SHOT;
}

/* Counts a packet that passed for the instance in `slot`. */
static __always_inline int pass(struct __sk_buff *skb, __u32 slot, __u32 dir)
{
	__u32 idx = slot * 2 + dir;
	struct corral_counter *c = bpf_map_lookup_elem(&instance_stats, &idx);

	/* Per-CPU value, and TC runs with migration disabled: no atomics. */
	if (c) {
		c->packets += 1;
		c->bytes += skb->len;
	}
	return TC_ACT_OK;
}

/* The instance behind the interface the packet is on, and its slot. */
static __always_inline struct corral_iface *iface_of(struct __sk_buff *skb, __u32 *slot)
{
	struct corral_iface *ifc;

	*slot = skb->ifindex & (CORRAL_MAX_IFACES - 1);
	ifc = bpf_map_lookup_elem(&ifaces, slot);
	if (!ifc || ifc->ifindex != skb->ifindex)
		return 0;
	return ifc;
}

/* Headers the programs read, at most: Ethernet, IPv4 with options, ports. */
#define MAX_HEADERS (ETH_HLEN + 60 + 4)
/* parse_linear's answer when a header it needs is not in the linear part. */
#define NEED_PULL 1000

/*
 * Reads the headers by direct packet access. Returns PKT_IPV4 or PKT_ARP,
 * a negated enum corral_drop_reason, or -NEED_PULL when a header is in the
 * packet but not in the skb's linear part.
 */
static __always_inline int parse_linear(struct __sk_buff *skb, struct packet *p)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	/* What a failed bounds check means: truncated, or just not linear. */
#define SHORT(upto) ((upto) - data <= skb->len ? -NEED_PULL : -CORRAL_DROP_MALFORMED)

	if ((void *)(eth + 1) > end)
		return SHORT((void *)(eth + 1));

	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		struct arp_hdr *arp = (void *)(eth + 1);
		/* the sender hardware address (6 bytes), then the protocol one */
		__u8 *spa = (void *)(arp + 1) + ETH_ALEN;

		if ((void *)(spa + 4) > end)
			return SHORT((void *)(spa + 4));
		if (arp->ar_pro != bpf_htons(ETH_P_IP) || arp->ar_hln != ETH_ALEN ||
		    arp->ar_pln != 4)
			return -CORRAL_DROP_UNSUPPORTED;
		/* unaligned in the frame: copy it bytewise */
		__builtin_memcpy(&p->saddr, spa, sizeof(p->saddr));
		return PKT_ARP;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return -CORRAL_DROP_IPV6;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return -CORRAL_DROP_UNSUPPORTED;

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return SHORT((void *)(ip + 1));
	if (ip->version != 4 || ip->ihl < 5)
		return -CORRAL_DROP_MALFORMED;
	p->saddr = ip->saddr;
	p->daddr = ip->daddr;
	p->proto = ip->protocol;
	p->sport = 0;
	p->dport = 0;

	/* Later fragments carry no L4 header: they match port-0 policies only. */
	if (ip->frag_off & bpf_htons(IP_FRAG_OFFSET_MASK))
		return PKT_IPV4;
	if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	    ip->protocol == IPPROTO_SCTP) {
		__be16 *ports = (void *)ip + ip->ihl * 4;

		if ((void *)(ports + 2) > end)
			return SHORT((void *)(ports + 2));
		p->sport = bpf_ntohs(ports[0]);
		p->dport = bpf_ntohs(ports[1]);
	}
	return PKT_IPV4;
#undef SHORT
}

/*
 * Returns PKT_IPV4 or PKT_ARP, or a negated enum corral_drop_reason.
 *
 * The headers are nearly always in the skb's linear part. Only when one is
 * not is it pulled in, and only as far as the headers reach: pulling more
 * (payload) would copy data on every segment of a bulk stream.
 */
static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
	int kind = parse_linear(skb, p);

	if (kind != -NEED_PULL)
		return kind;
	bpf_skb_pull_data(skb, skb->len < MAX_HEADERS ? skb->len : MAX_HEADERS);
	kind = parse_linear(skb, p);
	return kind == -NEED_PULL ? -CORRAL_DROP_MALFORMED : kind;
}

/*
 * Does a policy let p go from tenant `from` to app `to_app` of tenant `to`?
 * The pair's summary says which kinds of rules exist; only those are
 * looked up: for the app, then for every app of the tenant, each by exact
 * port, then any port of the protocol, then any protocol.
 */
static __always_inline int policy_allows(const struct packet *p, __u32 from, __u32 to,
					 __u32 to_app)
{
	struct corral_pair_key pair_key = { .from_tenant = from, .to_tenant = to };
	struct corral_pair *pair = bpf_map_lookup_elem(&policy_pairs, &pair_key);
	struct corral_policy_key key = {
		.from_tenant = from,
		.to_tenant = to,
		.to_app = to_app,
		.port = p->dport,
		.proto = p->proto,
	};
	__u32 kinds;

	if (!pair)
		return 0;
	kinds = pair->kinds;
	if (to_app && (kinds & (CORRAL_RULE_APP_PORT | CORRAL_RULE_APP_PROTO | CORRAL_RULE_APP_ANY))) {
		if ((kinds & CORRAL_RULE_APP_PORT) && bpf_map_lookup_elem(&policy, &key))
			return 1;
		key.port = 0;
		if ((kinds & CORRAL_RULE_APP_PROTO) && bpf_map_lookup_elem(&policy, &key))
			return 1;
		key.proto = 0;
		if ((kinds & CORRAL_RULE_APP_ANY) && bpf_map_lookup_elem(&policy, &key))
			return 1;
	}
	key.to_app = 0;
	key.port = p->dport;
	key.proto = p->proto;
	if ((kinds & CORRAL_RULE_PORT) && bpf_map_lookup_elem(&policy, &key))
		return 1;
	key.port = 0;
	if ((kinds & CORRAL_RULE_PROTO) && bpf_map_lookup_elem(&policy, &key))
		return 1;
	key.proto = 0;
	return (kinds & CORRAL_RULE_ANY) && bpf_map_lookup_elem(&policy, &key);
}

static __always_inline __u64 ct_timeout_ns(__u8 proto)
{
	if (proto == IPPROTO_TCP)
		return CORRAL_CT_TCP_TIMEOUT_S * NSEC_PER_SEC;
	return CORRAL_CT_OTHER_TIMEOUT_S * NSEC_PER_SEC;
}

/*
 * Records (or refreshes) the forward tuple of a policy-allowed flow. An
 * entry younger than CORRAL_CT_REFRESH_NS is left alone and an older one is
 * refreshed in place, so a long flow costs a lookup per packet, not a map
 * update (which, on an LRU map, takes a lock and may evict).
 */
static __always_inline void ct_record(const struct packet *p)
{
	struct corral_flow key = {
		.saddr = p->saddr,
		.daddr = p->daddr,
		.sport = p->sport,
		.dport = p->dport,
		.proto = p->proto,
	};
	struct corral_flow_state *known = bpf_map_lookup_elem(&conntrack, &key);
	__u64 now = bpf_ktime_get_ns();

	if (known) {
		/* Racing CPUs store nearly the same time: no atomics needed. */
		if (now - known->last_seen_ns >= CORRAL_CT_REFRESH_NS)
			known->last_seen_ns = now;
		return;
	}
	struct corral_flow_state state = { .last_seen_ns = now };

	bpf_map_update_elem(&conntrack, &key, &state, BPF_ANY);
}

/* Is p the reply of a recently seen flow that a policy allowed? */
static __always_inline int ct_is_reply(const struct packet *p)
{
	struct corral_flow key = {
		.saddr = p->daddr,
		.daddr = p->saddr,
		.sport = p->dport,
		.dport = p->sport,
		.proto = p->proto,
	};
	struct corral_flow_state *state = bpf_map_lookup_elem(&conntrack, &key);

	return state && bpf_ktime_get_ns() - state->last_seen_ns < ct_timeout_ns(p->proto);
}

/* May p go from an instance of tenant `from` to one of app `to_app` of
 * tenant `to`? */
static __always_inline int tenants_may_talk(const struct packet *p, __u32 from, __u32 to,
					    __u32 to_app)
{
	if (from == to)
		return 1;
	if (policy_allows(p, from, to, to_app)) {
		ct_record(p);
		return 1;
	}
	return ct_is_reply(p);
}

SEC("classifier")
int corral_from_instance(struct __sk_buff *skb)
{
	__u32 slot;
	struct corral_iface *ifc = iface_of(skb, &slot);
	struct corral_endpoint *dst;
	struct packet p = {};
	int kind;

	if (!ifc)
		return drop(skb, 0, CORRAL_DROP_UNKNOWN_IFACE);

	kind = parse(skb, &p);
	if (kind < 0)
		return drop(skb, ifc->tenant, -kind);
	if (kind == PKT_ARP) {
		if (p.saddr != 0 && p.saddr != ifc->addr)
			return drop(skb, ifc->tenant, CORRAL_DROP_SPOOF);
		return pass(skb, slot, CORRAL_DIR_FROM_INSTANCE);
	}
	if (p.saddr != ifc->addr)
		return drop(skb, ifc->tenant, CORRAL_DROP_SPOOF);

	dst = bpf_map_lookup_elem(&endpoints, &p.daddr);
	if (dst && !tenants_may_talk(&p, ifc->tenant, dst->tenant, dst->app))
		return drop(skb, ifc->tenant, CORRAL_DROP_POLICY);
	return pass(skb, slot, CORRAL_DIR_FROM_INSTANCE);
}

SEC("classifier")
int corral_to_instance(struct __sk_buff *skb)
{
	__u32 slot;
	struct corral_iface *ifc = iface_of(skb, &slot);
	struct corral_endpoint *src;
	struct packet p = {};
	int kind;

	if (!ifc)
		return drop(skb, 0, CORRAL_DROP_UNKNOWN_IFACE);

	kind = parse(skb, &p);
	if (kind < 0)
		return drop(skb, ifc->tenant, -kind);
	if (kind == PKT_ARP)
		return pass(skb, slot, CORRAL_DIR_TO_INSTANCE);

	src = bpf_map_lookup_elem(&endpoints, &p.saddr);
	if (src && !tenants_may_talk(&p, src->tenant, ifc->tenant, ifc->app))
		return drop(skb, ifc->tenant, CORRAL_DROP_POLICY);
	return pass(skb, slot, CORRAL_DIR_TO_INSTANCE);
}
