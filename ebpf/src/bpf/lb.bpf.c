// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * East-west service load balancing at the socket layer, attached to the
 * cgroup2 directory that holds the instances:
 *
 *   corral_lb_connect4      connect() to a VIP:port goes to one backend,
 *                           chosen at random among the service's ready ones;
 *                           a service without one refuses (ECONNREFUSED)
 *   corral_lb_sendmsg4      the same for each unconnected UDP sendto()
 *   corral_lb_recvmsg4      a datagram from a backend reads as from the VIP
 *   corral_lb_getpeername4  so does the peer of a connected socket
 *
 * Translation happens once per connection (per datagram for unconnected
 * UDP), not per packet: packets carry the backend's address on the wire,
 * so the tenant isolation programs at the veths see the real endpoints.
 * Map layouts are in corral.h.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "corral.h"
#include "lb_maps.h"

#define ECONNREFUSED 111

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* One list of backend ids per service id: an array element holds a whole
 * list, because the kernel rounds every array value up to 8 bytes (a
 * __u32 per element would cost twice the memory) and a list is then one
 * write. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, CORRAL_LB_MAX_SERVICES + 1);
	__type(key, __u32); /* service id */
	__type(value, __u32[CORRAL_LB_MAX_BACKENDS_PER_SERVICE]); /* backend ids */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, CORRAL_LB_MAX_SOCKS);
	__type(key, struct corral_lb_sock_key);
	__type(value, struct corral_lb_sock);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_socks SEC(".maps");

/* 1: not a service, or sent to a backend; 0: refused (retval set). */
static __always_inline int balance(struct bpf_sock_addr *ctx)
{
	struct corral_lb_service_key key = {
		.vip = ctx->user_ip4,
		.port = bpf_ntohs((__u16)ctx->user_port),
		.proto = (__u8)ctx->protocol,
	};
	struct corral_lb_service *svc;
	struct corral_lb_backend *be;
	struct corral_lb_sock_key rev;
	struct corral_lb_sock vip;
	__u32 *list;
	__u64 idx;

	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return 1;
	/* vip 0 keys published ports (nodeport.bpf.c); a connect() to
	 * 0.0.0.0 means this host and is never a service. */
	if (key.vip == 0)
		return 1;
	svc = bpf_map_lookup_elem(&lb_services, &key);
	if (!svc || (svc->flags & CORRAL_LB_F_PUBLISHED))
		return 1;
	if (svc->count == 0 || svc->count > CORRAL_LB_MAX_BACKENDS_PER_SERVICE ||
	    svc->id > CORRAL_LB_MAX_SERVICES)
		goto refuse;
	list = bpf_map_lookup_elem(&lb_slots, &svc->id);
	if (!list)
		goto refuse;
	idx = bpf_get_prandom_u32() % svc->count;
	/* The verifier does not know that a 32-bit modulo clears the upper
	 * half: hide where idx comes from, so that clang checks the bound on
	 * all 64 bits and the verifier can bound the pointer below. */
	asm volatile("" : "+r"(idx));
	if (idx >= CORRAL_LB_MAX_BACKENDS_PER_SERVICE)
		goto refuse;
	be = bpf_map_lookup_elem(&lb_backends, &list[idx]);
	if (!be)
		goto refuse;

	rev = (struct corral_lb_sock_key){
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = be->addr,
		.port = be->port,
	};
	vip = (struct corral_lb_sock){ .vip = key.vip, .port = key.port };
	bpf_map_update_elem(&lb_socks, &rev, &vip, BPF_ANY);
	ctx->user_ip4 = be->addr;
	ctx->user_port = bpf_htons(be->port);
	return 1;

refuse:
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* Shows the VIP instead of the backend the socket was sent to. */
static __always_inline int unbalance(struct bpf_sock_addr *ctx)
{
	struct corral_lb_sock_key rev = {
		.cookie = bpf_get_socket_cookie(ctx),
		.addr = ctx->user_ip4,
		.port = bpf_ntohs((__u16)ctx->user_port),
	};
	struct corral_lb_sock *vip = bpf_map_lookup_elem(&lb_socks, &rev);

	if (vip) {
		ctx->user_ip4 = vip->vip;
		ctx->user_port = bpf_htons(vip->port);
	}
	return 1;
}

SEC("cgroup/connect4")
int corral_lb_connect4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

SEC("cgroup/sendmsg4")
int corral_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
	return balance(ctx);
}

SEC("cgroup/recvmsg4")
int corral_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
	return unbalance(ctx);
}

SEC("cgroup/getpeername4")
int corral_lb_getpeername4(struct bpf_sock_addr *ctx)
{
	return unbalance(ctx);
}
