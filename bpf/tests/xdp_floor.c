/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xdp_floor.c: the floor of `make bench`: parse Ethernet and IPv4 as the datapath does, swap
 * the MAC addresses and bounce the frame (XDP_TX). What any XDP forwarder pays before crypto.
 */
#include <uapi/linux/bpf.h>
#include "pkt/parsing.h"

int xdp_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct iphdr *iph;
	struct ethhdr *eth = data;
	__u8 tmp[ETH_ALEN];

	if (xfp_parse_eth_ipv4(data, data_end, &iph))
		return XDP_PASS;
	__builtin_memcpy(tmp, eth->h_dest, ETH_ALEN);
	__builtin_memcpy(eth->h_dest, eth->h_source, ETH_ALEN);
	__builtin_memcpy(eth->h_source, tmp, ETH_ALEN);
	return XDP_TX;
}
