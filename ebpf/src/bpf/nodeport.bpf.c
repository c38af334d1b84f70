// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * North-south load balancing on the node's uplink (TC):
 *
 *   corral_np_ingress  TC ingress: IPv4 TCP/UDP to one of the node's
 *                      addresses (np_addrs) and a published port
 *                      (lb_services[{0, dport, proto}] with
 *                      CORRAL_LB_F_PUBLISHED) goes to a backend: the flow's
 *                      np_flows entry while it is valid, else
 *                      ring[hash(5-tuple) % ring_size] (Maglev, computed by
 *                      router/), remembered in np_flows. A backend in this
 *                      cell's subnet gets the packet by DNAT (destination
 *                      address and port rewritten, checksums fixed; the
 *                      kernel then routes it to the instance's veth), and
 *                      np_nats learns how to restore the reply's source.
 *                      A backend elsewhere gets the packet, unmodified, in
 *                      an IPIP header to its node (the route's gateway,
 *                      which must be in np_peers). An IPIP packet from a
 *                      peer (np_peers) to this node is decapsulated and
 *                      balanced like a direct one, but never forwarded
 *                      again: its backend must be local.
 *   corral_np_egress   TC egress: a reply from a backend to a client that
 *                      np_nats knows leaves with the node address and
 *                      published port as its source (for a flow that came
 *                      from a peer: the peer's address, so the reply goes
 *                      straight to the client).
 *
 * Everything else passes untouched. Verdicts are counted in np_stats
 * (enum corral_np_verdict). Map layouts are in corral.h; the Rust side's
 * module docs (ebpf/src/nodeport.rs) tell the whole story.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "corral.h"
#include "lb_maps.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff
#define TCP_CSUM_OFF 16
#define UDP_CSUM_OFF 6
#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SADDR_OFF (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DADDR_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP_DF 0x4000
#define IPIP_HLEN ((int)sizeof(struct iphdr)) /* the outer header, no options */
#define IPIP_TTL 64
#define ECN_MASK 0x03

#ifndef AF_INET
#define AF_INET 2
#endif
/* Kernel 6.3+; the installed UAPI headers may predate it. */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_NP_MAX_ADDRS);
	__type(key, __u32);   /* an address of this node, network byte order */
	__type(value, __u32); /* reserved, 0 */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_addrs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_NP_MAX_PEERS);
	__type(key, __u32);   /* an address of another node, network byte order */
	__type(value, __u32); /* reserved, 0 */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct corral_np_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CORRAL_NP_MAX_FLOWS);
	__type(key, struct corral_flow);
	__type(value, struct corral_np_conn);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CORRAL_NP_MAX_FLOWS);
	__type(key, struct corral_flow);
	__type(value, struct corral_np_nat);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_nats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, CORRAL_NP_VERDICTS);
	__type(key, __u32); /* enum corral_np_verdict */
	__type(value, struct corral_counter);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} np_stats SEC(".maps");

static __always_inline void count(struct __sk_buff *skb, __u32 verdict)
{
	struct corral_counter *c = bpf_map_lookup_elem(&np_stats, &verdict);

	if (c) {
		c->packets++;
		c->bytes += skb->len;
	}
}

/* The flow hash; ebpf/src/nodeport.rs (flow_hash) computes the same, so
 * tests can predict every pick. A 32-bit finaliser (Wang/Mueller style)
 * folded over the tuple's words. */
static __always_inline __u32 mix(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352d;
	h ^= h >> 15;
	h *= 0x846ca68b;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct corral_flow *f)
{
	__u32 h = mix(0x636f7272 ^ f->proto); /* "corr" */

	h = mix(h ^ f->saddr);
	h = mix(h ^ f->daddr);
	h = mix(h ^ (((__u32)f->sport << 16) | f->dport));
	return h;
}

/*
 * Reads the IPv4 TCP/UDP 5-tuple of the IPv4 header at nhoff. Returns 1
 * when the packet has one, 0 when it is something else (other protocol, a
 * later fragment: no ports to read). *more is set for a first fragment.
 */
static __always_inline int parse_at(struct __sk_buff *skb, __u32 nhoff, struct corral_flow *f,
				    __u32 *l4off, int *more)
{
	struct iphdr ip;
	__be16 ports[2];

	if (bpf_skb_load_bytes(skb, nhoff, &ip, sizeof(ip)) < 0)
		return 0;
	if (ip.version != 4 || ip.ihl < 5)
		return 0;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP)
		return 0;
	if (ip.frag_off & bpf_htons(IP_OFFSET))
		return 0;
	*l4off = nhoff + ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, *l4off, ports, sizeof(ports)) < 0)
		return 0;
	*more = (ip.frag_off & bpf_htons(IP_MF)) != 0;
	f->saddr = ip.saddr;
	f->daddr = ip.daddr;
	f->sport = bpf_ntohs(ports[0]);
	f->dport = bpf_ntohs(ports[1]);
	f->proto = ip.protocol;
	f->pad1 = 0;
	f->pad2 = 0;
	return 1;
}

/* parse_at for a packet that is IPv4 right after its Ethernet header. */
static __always_inline int parse(struct __sk_buff *skb, struct corral_flow *f, __u32 *l4off,
				 int *more)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	return parse_at(skb, ETH_HLEN, f, l4off, more);
}

/*
 * Rewrites the destination (dst = 1) or source address and port, fixing the
 * IPv4 and the TCP/UDP checksums (the pseudo-header includes the
 * addresses). UDP without a checksum (0) keeps none: BPF_F_MARK_MANGLED_0.
 * Returns 0 or a negative error.
 */
static __always_inline int rewrite(struct __sk_buff *skb, __u32 l4off, __u8 proto, int dst,
				   __u32 old_addr, __u32 new_addr, __u16 old_port, __u16 new_port)
{
	__u32 csum_off = l4off + (proto == IPPROTO_TCP ? TCP_CSUM_OFF : UDP_CSUM_OFF);
	__u64 l4flags = proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	__be16 old_p = bpf_htons(old_port), new_p = bpf_htons(new_port);
	int err;

	err = bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
				  l4flags | BPF_F_PSEUDO_HDR | sizeof(new_addr));
	if (err)
		return err;
	err = bpf_l4_csum_replace(skb, csum_off, old_p, new_p, l4flags | sizeof(new_p));
	if (err)
		return err;
	err = bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr));
	if (err)
		return err;
	err = bpf_skb_store_bytes(skb, dst ? IP_DADDR_OFF : IP_SADDR_OFF, &new_addr,
				  sizeof(new_addr), 0);
	if (err)
		return err;
	return bpf_skb_store_bytes(skb, l4off + (dst ? 2 : 0), &new_p, sizeof(new_p), 0);
}

/* The backend of a flow the connection table knows, if still valid:
 * lb_backends[id] must still hold the address and port it was sent to. */
static __always_inline struct corral_lb_backend *known(struct corral_np_conn *conn)
{
	struct corral_lb_backend *be = bpf_map_lookup_elem(&lb_backends, &conn->backend);

	if (!be || be->addr != conn->addr || be->port != conn->port)
		return NULL;
	return be;
}

/* A backend from the service's Maglev ring, or NULL. */
static __always_inline struct corral_lb_backend *pick(struct corral_lb_service *svc,
						      const struct corral_flow *f, __u32 *id)
{
	struct corral_lb_ring_key rk = { .service = svc->id, .gen = svc->ring_gen };
	__u32 size = svc->ring_size, slot;
	__u32 *slot_id;
	void *ring;

	if (size == 0)
		return NULL;
	ring = bpf_map_lookup_elem(&lb_rings, &rk);
	if (!ring)
		return NULL;
	slot = flow_hash(f) % size;
	slot_id = bpf_map_lookup_elem(ring, &slot);
	if (!slot_id || *slot_id == 0)
		return NULL;
	*id = *slot_id;
	return bpf_map_lookup_elem(&lb_backends, id);
}

/* The published service a flow is for, or NULL (then it is not ours). */
static __always_inline struct corral_lb_service *published(const struct corral_flow *f)
{
	struct corral_lb_service_key sk = { .port = f->dport, .proto = f->proto };
	struct corral_lb_service *svc = bpf_map_lookup_elem(&lb_services, &sk);

	if (!svc || !(svc->flags & CORRAL_LB_F_PUBLISHED))
		return NULL;
	return svc;
}

static __always_inline __u16 csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Sends the packet, unmodified, to the node of its backend inside an IPIP
 * header: outer source = the node address the client used (f->daddr), so
 * that the receiver can check it is a peer's before it sends replies from
 * it; outer destination = the gateway of the route to the backend, which
 * must be a peer. The outer header gets DF (the receiver's TC program sees
 * packets before reassembly) and the inner DSCP without ECN (RFC 6040
 * compatibility mode: nothing to propagate at decapsulation).
 */
static __always_inline int forward(struct __sk_buff *skb, const struct corral_flow *f,
				   const struct corral_lb_backend *be)
{
	struct bpf_fib_lookup fib = {};
	struct bpf_redir_neigh nh = {};
	struct iphdr inner, outer = {};
	__u32 mtu = 0, len;
	long rc;

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &inner, sizeof(inner)) < 0) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	fib.family = AF_INET;
	fib.l4_protocol = IPPROTO_IPIP;
	fib.tos = inner.tos & ~ECN_MASK;
	fib.ifindex = skb->ifindex;
	fib.ipv4_src = f->daddr;
	fib.ipv4_dst = be->addr;
	/* A forwarding lookup, as for a packet arriving on the uplink; the
	 * neighbour is left to bpf_redirect_neigh. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_SKIP_NEIGH);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) {
		count(skb, CORRAL_NP_DROP_TOO_BIG);
		return TC_ACT_SHOT;
	}
	/* ipv4_dst is now the route's gateway, or still the backend when the
	 * route has none: only a peer node decapsulates. */
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) ||
	    !bpf_map_lookup_elem(&np_peers, &fib.ipv4_dst)) {
		count(skb, CORRAL_NP_DROP_REMOTE);
		return TC_ACT_SHOT;
	}
	len = bpf_ntohs(inner.tot_len) + IPIP_HLEN;
	rc = bpf_check_mtu(skb, fib.ifindex, &mtu, IPIP_HLEN, 0);
	if (rc != BPF_MTU_CHK_RET_SUCCESS || len > 0xffff) {
		count(skb, rc < 0 ? CORRAL_NP_DROP_ERROR : CORRAL_NP_DROP_TOO_BIG);
		return TC_ACT_SHOT;
	}

	outer.version = 4;
	outer.ihl = 5;
	outer.tos = inner.tos & ~ECN_MASK;
	outer.tot_len = bpf_htons(len);
	outer.frag_off = bpf_htons(IP_DF);
	outer.ttl = IPIP_TTL;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = f->daddr;
	outer.daddr = fib.ipv4_dst;
	rc = bpf_csum_diff(NULL, 0, (__be32 *)&outer, sizeof(outer), 0);
	if (rc < 0) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	outer.check = csum_fold(rc);
	if (bpf_skb_adjust_room(skb, IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) ||
	    bpf_skb_store_bytes(skb, ETH_HLEN, &outer, sizeof(outer), BPF_F_RECOMPUTE_CSUM)) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	count(skb, CORRAL_NP_FORWARDED);
	nh.nh_family = AF_INET;
	nh.ipv4_nh = fib.ipv4_dst;
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

/*
 * Sends a flow to a published service's backend: the connection table's,
 * else the ring's. A local backend gets it by DNAT; a remote one by
 * forward(), unless the packet came from a peer already (from_peer): rings
 * differ only briefly, during an update, and a packet is never forwarded
 * twice.
 */
static __always_inline int deliver(struct __sk_buff *skb, struct corral_flow *f, __u32 l4off,
				   int more, struct corral_lb_service *svc, int from_peer)
{
	struct corral_lb_backend *be = NULL;
	struct corral_np_config *cfg;
	struct corral_np_conn *conn;
	struct corral_np_nat nat = {};
	struct corral_flow reply;
	__u32 zero = 0, id = 0;

	if (more) {
		/* Its later fragments would carry no ports to balance by. */
		count(skb, CORRAL_NP_DROP_FRAGMENT);
		return TC_ACT_SHOT;
	}

	conn = bpf_map_lookup_elem(&np_flows, f);
	if (conn) {
		id = conn->backend;
		be = known(conn);
	}
	if (!be) {
		struct corral_np_conn fresh = {};

		be = pick(svc, f, &id);
		if (!be) {
			count(skb, CORRAL_NP_DROP_NO_BACKEND);
			return TC_ACT_SHOT;
		}
		fresh.backend = id;
		fresh.addr = be->addr;
		fresh.port = be->port;
		bpf_map_update_elem(&np_flows, f, &fresh, BPF_ANY);
		count(skb, CORRAL_NP_NEW_FLOW);
	}

	cfg = bpf_map_lookup_elem(&np_config, &zero);
	if (!cfg || cfg->cell_mask == 0 || (be->addr & cfg->cell_mask) != cfg->cell_net) {
		if (from_peer) {
			count(skb, CORRAL_NP_DROP_NOT_LOCAL);
			return TC_ACT_SHOT;
		}
		return forward(skb, f, be);
	}

	/* The reply's tuple; refreshed while the flow lives so that the LRU
	 * never evicts it before the flow's own entry. */
	reply = (struct corral_flow){
		.saddr = be->addr,
		.daddr = f->saddr,
		.sport = be->port,
		.dport = f->sport,
		.proto = f->proto,
	};
	if (!bpf_map_lookup_elem(&np_nats, &reply)) {
		nat.addr = f->daddr;
		nat.port = f->dport;
		bpf_map_update_elem(&np_nats, &reply, &nat, BPF_ANY);
	}

	if (rewrite(skb, l4off, f->proto, 1, f->daddr, be->addr, f->dport, be->port) < 0) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	count(skb, CORRAL_NP_LOCAL);
	return TC_ACT_OK;
}

/*
 * An IPIP packet to this node. Ours only when it comes from a peer
 * (np_peers), its inner packet is a flow to a published port and the
 * inner destination is the outer source (the peer's own address, which
 * the reply will carry); anything else passes to the kernel untouched.
 * Ours is decapsulated and delivered; its backend must be local.
 */
static __always_inline int from_peer(struct __sk_buff *skb, const struct iphdr *outer)
{
	struct corral_lb_service *svc;
	struct corral_flow f;
	__u32 l4off = 0;
	int more = 0;

	if (outer->ihl != 5 || (outer->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&np_addrs, &outer->daddr) ||
	    !bpf_map_lookup_elem(&np_peers, &outer->saddr))
		return TC_ACT_OK;
	if (!parse_at(skb, ETH_HLEN + IPIP_HLEN, &f, &l4off, &more) || f.daddr != outer->saddr)
		return TC_ACT_OK;
	svc = published(&f);
	if (!svc)
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, -IPIP_HLEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	count(skb, CORRAL_NP_DECAPSULATED);
	return deliver(skb, &f, l4off - IPIP_HLEN, more, svc, 1);
}

SEC("classifier")
int corral_np_ingress(struct __sk_buff *skb)
{
	struct corral_lb_service *svc;
	struct corral_flow f;
	struct iphdr ip;
	__u32 l4off = 0;
	int more = 0;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0 || ip.version != 4)
		return TC_ACT_OK;
	if (ip.protocol == IPPROTO_IPIP)
		return from_peer(skb, &ip);
	if (!parse_at(skb, ETH_HLEN, &f, &l4off, &more))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&np_addrs, &f.daddr))
		return TC_ACT_OK;
	svc = published(&f);
	if (!svc)
		return TC_ACT_OK;
	return deliver(skb, &f, l4off, more, svc, 0);
}

SEC("classifier")
int corral_np_egress(struct __sk_buff *skb)
{
	struct corral_np_config *cfg;
	struct corral_np_nat *nat;
	struct corral_flow f;
	__u32 l4off = 0, zero = 0;
	int more = 0;

	if (!parse(skb, &f, &l4off, &more))
		return TC_ACT_OK;
	cfg = bpf_map_lookup_elem(&np_config, &zero);
	if (!cfg || cfg->cell_mask == 0 || (f.saddr & cfg->cell_mask) != cfg->cell_net)
		return TC_ACT_OK;
	nat = bpf_map_lookup_elem(&np_nats, &f);
	if (!nat)
		return TC_ACT_OK;
	if (rewrite(skb, l4off, f.proto, 0, f.saddr, nat->addr, f.sport, nat->port) < 0) {
		count(skb, CORRAL_NP_DROP_ERROR);
		return TC_ACT_SHOT;
	}
	count(skb, CORRAL_NP_REPLY);
	return TC_ACT_OK;
}
