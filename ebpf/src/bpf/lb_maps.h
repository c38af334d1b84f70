/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * lb_maps.h: the load-balancing maps that lb.bpf.c (east-west) and
 * nodeport.bpf.c (north-south) share. Both objects declare them identically
 * and pin them by name in the same directory, so whichever loads first
 * creates them and the other reuses the pins. Layouts are in corral.h.
 */
#ifndef CORRAL_LB_MAPS_H
#define CORRAL_LB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "corral.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_LB_MAX_SERVICES);
	__type(key, struct corral_lb_service_key);
	__type(value, struct corral_lb_service);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, CORRAL_LB_MAX_BACKENDS);
	__type(key, __u32); /* backend id */
	__type(value, struct corral_lb_backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} lb_backends SEC(".maps");

/* The template of a ring: the agent creates each ring as an ARRAY of
 * ring_size entries with the same flags (BPF_F_INNER_MAP lets the sizes
 * differ from this template's). */
struct corral_lb_ring {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_INNER_MAP);
	__type(key, __u32);   /* slot */
	__type(value, __u32); /* backend id */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 2 * CORRAL_LB_MAX_SERVICES);
	__type(key, struct corral_lb_ring_key);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct corral_lb_ring); /* last: a flexible array */
} lb_rings SEC(".maps");

#endif /* CORRAL_LB_MAPS_H */
