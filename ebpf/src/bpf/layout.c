// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Host program run by build.rs: prints the layout of every struct and the
 * value of every constant in corral.h, as the C compiler sees them. build.rs
 * turns the output into a Rust table that the layout test compares with the
 * #[repr(C)] mirrors.
 *
 * Fields are found by __builtin_dump_struct, so a field added to corral.h is
 * measured without touching this file. Each struct is filled with the byte
 * pattern 0, 1, 2, ... before it is dumped: the low byte of a field's value
 * is then its offset. A struct added to corral.h must be added below;
 * build.rs fails if one is missing.
 */
#include <stdio.h>

#include "corral.h"

#define CONST(name) printf("const %s %llu\n", #name, (unsigned long long)(name))

#define STRUCT(name)                                                        \
	do {                                                                \
		struct name v;                                              \
		unsigned char *b = (unsigned char *)&v;                     \
		for (unsigned long i = 0; i < sizeof(v); i++)               \
			b[i] = (unsigned char)i;                            \
		printf("layout %s %zu %zu\n", #name, sizeof(struct name),   \
		       _Alignof(struct name));                              \
		__builtin_dump_struct(&v, printf);                          \
	} while (0)

int main(void)
{
	CONST(CORRAL_MAX_IFACES);
	CONST(CORRAL_MAX_ENDPOINTS);
	CONST(CORRAL_MAX_POLICIES);
	CONST(CORRAL_MAX_POLICY_PAIRS);
	CONST(CORRAL_RULE_APP_PORT);
	CONST(CORRAL_RULE_APP_PROTO);
	CONST(CORRAL_RULE_APP_ANY);
	CONST(CORRAL_RULE_PORT);
	CONST(CORRAL_RULE_PROTO);
	CONST(CORRAL_RULE_ANY);
	CONST(CORRAL_MAX_FLOWS);
	CONST(CORRAL_MAX_RETIRED_STATS);
	CONST(CORRAL_IFINDEX_BASE);
	CONST(CORRAL_MAX_DROP_STATS);
	CONST(CORRAL_CT_TCP_TIMEOUT_S);
	CONST(CORRAL_CT_OTHER_TIMEOUT_S);
	CONST(CORRAL_CT_REFRESH_NS);
	CONST(CORRAL_DIR_FROM_INSTANCE);
	CONST(CORRAL_DIR_TO_INSTANCE);
	CONST(CORRAL_DROP_SPOOF);
	CONST(CORRAL_DROP_POLICY);
	CONST(CORRAL_DROP_UNKNOWN_IFACE);
	CONST(CORRAL_DROP_IPV6);
	CONST(CORRAL_DROP_UNSUPPORTED);
	CONST(CORRAL_DROP_MALFORMED);
	CONST(CORRAL_LB_MAX_SERVICES);
	CONST(CORRAL_LB_MAX_BACKENDS);
	CONST(CORRAL_LB_MAX_BACKENDS_PER_SERVICE);
	CONST(CORRAL_LB_MAX_SOCKS);
	CONST(CORRAL_LB_F_PUBLISHED);
	CONST(CORRAL_NP_MAX_ADDRS);
	CONST(CORRAL_NP_MAX_PEERS);
	CONST(CORRAL_NP_MAX_FLOWS);
	CONST(CORRAL_NP_LOCAL);
	CONST(CORRAL_NP_NEW_FLOW);
	CONST(CORRAL_NP_REPLY);
	CONST(CORRAL_NP_DROP_NO_BACKEND);
	CONST(CORRAL_NP_DROP_REMOTE);
	CONST(CORRAL_NP_DROP_FRAGMENT);
	CONST(CORRAL_NP_DROP_ERROR);
	CONST(CORRAL_NP_FORWARDED);
	CONST(CORRAL_NP_DECAPSULATED);
	CONST(CORRAL_NP_DROP_NOT_LOCAL);
	CONST(CORRAL_NP_DROP_TOO_BIG);
	CONST(CORRAL_NP_VERDICTS);

	STRUCT(corral_iface);
	STRUCT(corral_endpoint);
	STRUCT(corral_policy_key);
	STRUCT(corral_policy_value);
	STRUCT(corral_pair_key);
	STRUCT(corral_pair);
	STRUCT(corral_flow);
	STRUCT(corral_flow_state);
	STRUCT(corral_counter_key);
	STRUCT(corral_drop_key);
	STRUCT(corral_counter);
	STRUCT(corral_lb_service_key);
	STRUCT(corral_lb_service);
	STRUCT(corral_lb_backend);
	STRUCT(corral_lb_sock_key);
	STRUCT(corral_lb_sock);
	STRUCT(corral_lb_ring_key);
	STRUCT(corral_np_config);
	STRUCT(corral_np_conn);
	STRUCT(corral_np_nat);
	return 0;
}
