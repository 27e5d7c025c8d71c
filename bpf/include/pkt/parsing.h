/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * parsing.h: Ethernet/IPv4 and L4 port parsing for both XDP programs. Each helper states what
 * it needs checked before it is called; none writes to the packet.
 */
#ifndef XFP_PARSING_H
#define XFP_PARSING_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include "xfp_defs.h"
#include "pkt/csum.h"

#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define xfp_htons(x) ((__u16)__builtin_bswap16((__u16)(x)))
#define xfp_htonl(x) ((__u32)__builtin_bswap32((__u32)(x)))
#define xfp_htonll(x) ((__u64)__builtin_bswap64((__u64)(x)))
#else
#define xfp_htons(x) ((__u16)(x))
#define xfp_htonl(x) ((__u32)(x))
#define xfp_htonll(x) ((__u64)(x))
#endif
#define xfp_ntohs(x) xfp_htons(x)
#define xfp_ntohl(x) xfp_htonl(x)

#define XFP_ETH_LEN 14
#define XFP_IP_LEN 20	 /* IPv4 without options: anything else is punted */
#define XFP_IP_MF 0x2000 /* include/net/ip.h: IP_MF, IP_OFFSET, IP_DF (host order) */
#define XFP_IP_OFFSET 0x1fff
#define XFP_IP_DF 0x4000
#define XFP_ICMP_ECHOREPLY 0 /* uapi/linux/icmp.h */
#define XFP_ICMP_ECHO 8

/* Needs nothing checked. On success returns 0 with *iphp at a 20-byte IPv4 header, right after
 * an Ethernet header, whose total length fits in the frame, which is not a fragment and whose
 * header checksum is right. Else returns the XFP_R_PASS_* reason to punt with. */
static __always_inline int xfp_parse_eth_ipv4(void *data, void *data_end, struct iphdr **iphp)
{
	struct ethhdr *eth = data;
	struct iphdr *iph;
	__u32 tot;

	if ((void *)(eth + 1) > data_end || eth->h_proto != xfp_htons(ETH_P_IP))
		return XFP_R_PASS_NOT_IPV4;
	iph = (void *)(eth + 1);
	if ((void *)(iph + 1) > data_end || iph->version != 4 || iph->ihl < 5)
		return XFP_R_PASS_MALFORMED_IP;
	if (iph->ihl != 5)
		return XFP_R_PASS_IP_OPTIONS;
	tot = xfp_ntohs(iph->tot_len);
	if (tot < XFP_IP_LEN || tot > (__u32)(data_end - (void *)iph))
		return XFP_R_PASS_MALFORMED_IP;
	if (iph->frag_off & xfp_htons(XFP_IP_MF | XFP_IP_OFFSET))
		return XFP_R_PASS_FRAGMENT;
	/* ip_rcv_core() drops a header whose checksum is wrong (RFC 1812 section 5.2.2): the
	 * fastpath must not forward what the kernel would not (encap would seal the corrupt
	 * header; decap would trust a corrupt outer TOS). Punted, the kernel drops and counts it
	 * (InCsumErrors). */
	if (xfp_ipv4_csum(iph) != 0)
		return XFP_R_PASS_MALFORMED_IP;
	*iphp = iph;
	return 0;
}

/* The flow key's ports for protocol `proto`, read from `l4`, the first bytes after the IPv4
 * header: `avail` bytes of them belong to the packet (IPv4 total length) and memory up to `end`
 * is readable (data_end for a packet pointer). Needs nothing checked. Returns 0, or
 * XFP_R_PASS_MALFORMED_IP when a TCP/UDP/ICMP header is cut short (the kernel judges it).
 * ICMP echo: sport = identifier; ICMP: dport = (type << 8) | code (as bpf/tp_learn.c does).
 * Both bounds are tested on one path before any read: the 6.1 verifier does not prune a branch
 * whose range became impossible, so a separate length check before the pointer check fails. */
static __always_inline int xfp_l4_ports(__u8 proto, const __u8 *l4, const void *end, __u32 avail,
					struct xfp_flow_key *fk)
{
	fk->sport = 0;
	fk->dport = 0;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
		return 0;
	if ((const void *)(l4 + 8) > end || avail < 8)
		return XFP_R_PASS_MALFORMED_IP;
	if (proto == IPPROTO_ICMP) {
		fk->dport = xfp_htons(((__u16)l4[0] << 8) | l4[1]);
		if (l4[0] == XFP_ICMP_ECHO || l4[0] == XFP_ICMP_ECHOREPLY)
			fk->sport = *(const __u16 *)(l4 + 4);
		return 0;
	}
	fk->sport = *(const __u16 *)l4;
	fk->dport = *(const __u16 *)(l4 + 2);
	return 0;
}

#endif /* XFP_PARSING_H */
