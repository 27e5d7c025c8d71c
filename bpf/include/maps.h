/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * maps.h: every BPF map of the project, declared once, each with what it holds, who writes it
 * and who reads it.
 *
 * BCC compiles each program alone, and every map declared in what a program includes becomes a
 * map of that program. Sharing is by pinning: the datapath's maps are pinned in bpffs under
 * XFP_PIN_DIR (a -D cflag, default /sys/fs/bpf/xfrm-fastpath), so the BCC modules that include
 * them (xdp_encap.c, xdp_decap.c, tc_reseq.c) and the controller share one instance, and a
 * restarted controller finds them again (BCC reuses a map already pinned at the path, else
 * creates and pins it). An unpinned map is private to the program that instantiates it.
 *
 * A program therefore names the sections it uses, with a #define before including this header:
 *   (none), XFP_MAPS_DATAPATH  the datapath's pinned maps: xdp_encap.c, xdp_decap.c,
 *                              tc_reseq.c (and tests/bpf/test_metrics.py's counter)
 *   XFP_MAPS_RESEQ             the resequencer's own pinned maps: tc_reseq.c
 *   XFP_MAPS_AEAD              the AEAD's private per-CPU scratch: every includer of aead/aead.h
 *   XFP_MAPS_LEARN             the learner's private maps: tp_learn.c
 *   XFP_MAPS_BENCH             the benchmark source and sink's private maps: tests/xdp_bench.c
 * so that no program creates (or pins) a map it does not use.
 *
 * BCC 0.26 rewrites map calls (`.lookup`) in the main source file only, never in an included
 * header (b_frontend_action.cc emits the main file's rewrite buffer alone): the one-line map
 * accessors stay in the programs, and the logic around them lives in the headers.
 */
#ifndef XFP_MAPS_H
#define XFP_MAPS_H

#include "xfp_defs.h"

#if !defined(XFP_MAPS_DATAPATH) && !defined(XFP_MAPS_RESEQ) && !defined(XFP_MAPS_AEAD) &&          \
    !defined(XFP_MAPS_LEARN) && !defined(XFP_MAPS_BENCH)
#define XFP_MAPS_DATAPATH
#endif

#ifndef XFP_PIN_DIR
#define XFP_PIN_DIR "/sys/fs/bpf/xfrm-fastpath"
#endif

/* One frame of len bytes into a per-CPU counter slot (xfp_stats, xfp_reseq_stats,
 * bench_count); st is what the program's lookup returned (NULL: nothing counted). Per-CPU
 * values: no atomics needed. */
static __always_inline void xfp_stat_add(struct xfp_stat *st, __u32 len)
{
	if (st) {
		st->packets += 1;
		st->bytes += len;
	}
}

/* ==== the datapath: pinned, shared by the XDP programs, the resequencer and the controller == */
#ifdef XFP_MAPS_DATAPATH
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

#endif /* XFP_MAPS_DATAPATH */

/* ==== the resequencer (tc_reseq.c): pinned beside the datapath's maps ======================= */
#ifdef XFP_MAPS_RESEQ
/* Outbound SA by (SPI, outer daddr) -> sa_id: the kernel's frame names its SA by SPI only.
 * Written by the controller beside each xfp_sa_out entry (controller/datapath/reseq.py); read
 * by tc_reseq.c. */
BPF_TABLE_PINNED("hash", struct xfp_sa_in_key, __u32, xfp_sa_out_spi, XFP_SA_MAX,
		 XFP_PIN_DIR "/xfp_sa_out_spi");

/* Per-CPU counters of tc_reseq.c by enum xfp_reseq_stat: packets and bytes. Written by
 * tc_reseq.c only; the controller sums the CPUs. */
BPF_TABLE_PINNED("percpu_array", __u32, struct xfp_stat, xfp_reseq_stats, XFP_RESEQ_MAX,
		 XFP_PIN_DIR "/xfp_reseq_stats");
#endif /* XFP_MAPS_RESEQ */

/* ==== the AEAD (aead/aead.h): private to each program, not pinned ========================== */
#if defined(XFP_MAPS_AEAD) && !defined(XFP_NATIVE)
#include "aead/aead.h"
/* Per-CPU working state of one AEAD operation (one entry): the ChaCha state and keystream do
 * not belong on a 512-byte stack. Written and read only by aead/aead.h, through the program's
 * xfp_scratch() accessor; nothing to share, so each program has its own. */
BPF_PERCPU_ARRAY(xfp_crypto_scratch, struct xfp_crypto_scratch, 1);
#endif /* XFP_MAPS_AEAD */

/* ==== the learner (tp_learn.c): private, not pinned (controller/datapath/learner.py holds the
 * module for as long as it learns, and a restart learns afresh) ============================== */
#ifdef XFP_MAPS_LEARN
#include "learn_defs.h"

#ifndef LEARN_SIGHTINGS
#define LEARN_SIGHTINGS 8192 /* skbs in flight between receive and xmit */
#endif
#ifndef LEARN_EMITTED
#define LEARN_EMITTED 16384 /* flows recently reported */
#endif

/* learn_cfg[0]: the gateway's netns inode. Written once by the learner before traffic; read by
 * every hook. */
BPF_ARRAY(learn_cfg, struct learn_cfg, 1);
/* Watched devices of that netns: ifindex -> LEARN_ROLE_*. Written by the learner; read by
 * every hook. */
BPF_HASH(learn_ifaces, u32, u32, 64);
/* skb pointer -> what it looked like when received. Written at receive (netif_receive_skb,
 * fib_table_lookup), taken and deleted at xmit. */
BPF_TABLE("lru_hash", u64, struct learn_sighting, learn_sightings, LEARN_SIGHTINGS);
/* The last sighting stored on this CPU, for the route lookup that follows it. Written at
 * receive, read by fib_table_lookup. */
BPF_PERCPU_ARRAY(learn_last_rx, struct learn_last_rx, 1);
/* Flow (+ SPI) -> ktime of its last event: re-emit suppression. Written and read at xmit. */
BPF_TABLE("lru_hash", struct learn_flow_key, u64, learn_emitted, LEARN_EMITTED);
/* Per-CPU counters, indexed by LEARN_STAT_*. Written by every hook; read by the learner for
 * diagnostics. */
BPF_PERCPU_ARRAY(learn_stats, u64, LEARN_STAT_MAX);
/* Candidate events (struct learn_event): written at xmit, read by the learner. */
BPF_PERF_OUTPUT(learn_events);
#endif /* XFP_MAPS_LEARN */

/* ==== the benchmark's traffic source and sink (tests/xdp_bench.c, bench/e2e.py): private ==== */
#ifdef XFP_MAPS_BENCH
#include "pkt/parsing.h"

#define BENCH_HDR_LEN (XFP_ETH_LEN + XFP_IP_LEN + 8) /* Ethernet + IPv4 + UDP: 42 */
#define BENCH_SIZES 16				     /* size pattern slots (IMIX 7:4:1 = 12) */

struct bench_cfg {
	__u8 hdr[BENCH_HDR_LEN + 6]; /* template; the 6 bytes pad to 48 */
	__u16 sizes[BENCH_SIZES];    /* IPv4 total length of packet i % nsizes */
	__u32 nsizes;
	__u32 nflows;	 /* source port = template's + i % nflows */
	__u32 cpu_flows; /* 1: + CPU * nflows, so that each CPU sends flows of its own */
	__u32 pad;
};

/* Generator configuration, one entry. Written by bench/e2e.py before a run; read by the
 * generator. */
BPF_ARRAY(bench_cfg, struct bench_cfg, 1);
/* Per-CPU packet index of the generator (picks size and flow). Written by the generator. */
BPF_PERCPU_ARRAY(bench_seq, __u64, 1);
/* Per-CPU frames and IPv4 bytes (frame minus Ethernet header) seen by the sink. Written by the
 * sink, summed by bench/e2e.py. */
BPF_PERCPU_ARRAY(bench_count, struct xfp_stat, 1);
#endif /* XFP_MAPS_BENCH */

#endif /* XFP_MAPS_H */
