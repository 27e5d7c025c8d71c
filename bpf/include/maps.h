/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * maps.h: every map of the XDP datapath, declared once. Both programs (xdp_encap.c on the LAN
 * side, xdp_decap.c on the WAN side) include it; every map is pinned in bpffs under
 * XFP_PIN_DIR (a -D cflag, default /sys/fs/bpf/xfrm-fastpath) so that the two BCC modules and
 * the controller share one instance, and a restarted controller finds them again
 * (BCC reuses a map already pinned at the path, else creates and pins it).
 */
#ifndef XFP_MAPS_H
#define XFP_MAPS_H

#include "xfp_defs.h"

#ifndef XFP_PIN_DIR
#define XFP_PIN_DIR "/sys/fs/bpf/xfrm-fastpath"
#endif

/* Flows: inner 5-tuple (+ ingress device, direction) -> SA, egress, L2 rewrite, counters.
 * Written by the controller (validated flows); the datapath updates last_seen and counters. */
BPF_TABLE_PINNED("lru_hash", struct xfp_flow_key, struct xfp_flow_val, xfp_flows, XFP_FLOWS_MAX,
		 XFP_PIN_DIR "/xfp_flows");

/* Outbound SAs by sa_id: keys, outer header, sequence state, deadline, lifetime counters.
 * Written by the controller; the datapath takes sequence numbers and adds counters. */
BPF_TABLE_PINNED("hash", __u32, struct xfp_sa_out, xfp_sa_out, XFP_SA_MAX,
		 XFP_PIN_DIR "/xfp_sa_out");

/* Inbound SAs by (SPI, outer daddr): keys, replay window, deadline, counters.
 * Written by the controller; the datapath advances the replay window and adds counters. */
BPF_TABLE_PINNED("hash", struct xfp_sa_in_key, struct xfp_sa_in, xfp_sa_in, XFP_SA_MAX,
		 XFP_PIN_DIR "/xfp_sa_in");

/* Watchdog deadlines by sa_id (outbound and inbound ids share one space): the datapath uses
 * an SA only while bpf_ktime_get_ns() <= min(its deadline_ns, this entry); no entry = punt.
 * Written by the controller alone, so refreshing it never races with the datapath's own
 * fields (sequence numbers, replay window) in the SA entries. Read by the datapath. */
BPF_TABLE_PINNED("hash", __u32, __u64, xfp_watchdog, 2 * XFP_SA_MAX, XFP_PIN_DIR "/xfp_watchdog");

/* Liveness: when each SA (by sa_id) next sends one packet through the kernel (bpf_ktime ns).
 * Written by the datapath alone; LRU, so ids of SAs long gone age out by themselves. */
BPF_TABLE_PINNED("lru_hash", __u32, __u64, xfp_liveness, 2 * XFP_SA_MAX,
		 XFP_PIN_DIR "/xfp_liveness");

/* Per-CPU counters, index dir * XFP_R_MAX + reason: packets and bytes. Written by the
 * datapath only; the controller sums the CPUs. */
BPF_TABLE_PINNED("percpu_array", __u32, struct xfp_stat, xfp_stats, XFP_DIR_MAX *XFP_R_MAX,
		 XFP_PIN_DIR "/xfp_stats");

/* Redirect targets: key = egress ifindex, value = the same ifindex. Written by the controller
 * (datapath.py put_tx_port writes it in both programs). Not pinned: BCC 0.26 rewrites
 * .redirect_map() only for its BPF_DEVMAP macro, which cannot pin; the entries are derived from
 * the SA and flow maps, so a restarted controller rebuilds them. */
BPF_DEVMAP(xfp_tx_ports, XFP_DEVMAP_SIZE);

/* Whether this packet of an SA is its liveness packet for the kernel; `next` is the SA's
 * xfp_liveness entry. The first packet XDP sees of an SA only starts the clock. Two CPUs may
 * both see the time come: then two packets go to the kernel, which is harmless. */
static __always_inline int xfp_liveness_due(__u64 *next, __u64 now)
{
	if (now < *next)
		return 0;
	*next = now + XFP_LIVENESS_NS;
	return 1;
}

#endif /* XFP_MAPS_H */
