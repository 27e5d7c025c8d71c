/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xdp_bench.c: the two ends of `make bench-e2e` (bench/e2e.py), never part of the datapath.
 *
 * xdp_bench_gen: the traffic source. Run with BPF_PROG_TEST_RUN and BPF_F_TEST_XDP_LIVE_FRAMES
 * (net/bpf/test_run.c, bpf_test_run_xdp_live()): the kernel hands it frames from a page pool
 * that it recycles, and XDP_TX sends each one out of the ingress device, here the lan host's
 * veth, into gw1. A recycled page holds whatever the path left in it (encrypted, decrypted,
 * TTL decremented, MACs rewritten, resized), so the program rewrites every frame from a
 * template: length (from a size pattern, for IMIX), Ethernet + IPv4 + UDP headers, one of
 * `nflows` source ports (optionally a range per CPU), IPv4 checksum; UDP checksum 0 (RFC 768:
 * none computed).
 *
 * xdp_bench_sink: the traffic sink on the far host (or on gw1 itself to time the source
 * alone): counts frames and inner IPv4 bytes per CPU, then drops them.
 */
#define XFP_MAPS_BENCH
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include "maps.h" /* bench_cfg, bench_seq, bench_count */
#include "pkt/csum.h"
#include "pkt/parsing.h"

int xdp_bench_gen(struct xdp_md *ctx)
{
	__u32 zero = 0, idx, len, sport;
	struct bench_cfg *cfg = bench_cfg.lookup(&zero);
	__u64 *seqp = bench_seq.lookup(&zero);
	void *data, *data_end;
	struct iphdr *iph;
	struct udphdr *udp;
	__u64 i;

	if (!cfg || !seqp || cfg->nsizes == 0 || cfg->nsizes > BENCH_SIZES || cfg->nflows == 0)
		return XDP_ABORTED;
	i = (*seqp)++;
	idx = i % cfg->nsizes;
	asm volatile("" : "+r"(idx)); /* keep the bound check below: the verifier needs it */
	if (idx >= BENCH_SIZES)
		return XDP_ABORTED;
	len = cfg->sizes[idx];
	if (len < XFP_IP_LEN + 8)
		return XDP_ABORTED;
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	/* Grow or shrink to this packet's size: a recycled page may hold another length. */
	if (bpf_xdp_adjust_tail(ctx, (int)(XFP_ETH_LEN + len) - (int)(data_end - data)))
		return XDP_ABORTED;
	data = (void *)(long)ctx->data; /* re-read after adjust_tail */
	data_end = (void *)(long)ctx->data_end;
	if (data + BENCH_HDR_LEN > data_end)
		return XDP_ABORTED;
	__builtin_memcpy(data, cfg->hdr, BENCH_HDR_LEN);
	iph = data + XFP_ETH_LEN;
	udp = data + XFP_ETH_LEN + XFP_IP_LEN;
	iph->tot_len = xfp_htons(len);
	iph->check = 0;
	iph->check = xfp_ipv4_csum(iph);
	udp->len = xfp_htons(len - XFP_IP_LEN);
	udp->check = 0;
	sport = xfp_ntohs(udp->source) + (__u32)(i % cfg->nflows);
	if (cfg->cpu_flows)
		sport += bpf_get_smp_processor_id() * cfg->nflows;
	udp->source = xfp_htons(sport);
	return XDP_TX;
}

int xdp_bench_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 zero = 0;

	xfp_stat_add(bench_count.lookup(&zero), (data_end - data) - XFP_ETH_LEN);
	return XDP_DROP;
}
