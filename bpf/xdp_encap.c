/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xdp_encap.c: XDP on the LAN side of the gateway. A clear IPv4 packet of a flow the controller
 * offloaded leaves as RFC 4303 tunnel-mode ESP with rfc7539esp (RFC 7634), redirected out of
 * the WAN device; everything else goes to the kernel untouched (XDP_PASS), counted by reason.
 *
 * Output frame, built in place (the inner packet does not move):
 *   eth(14) | outer IPv4(20) | SPI, seq(8) | IV(8) | inner IPv4 | pad 1,2,.. | pad len | 4 |
 * ICV(16) ^ data (after adjust_head(-36))                 ^ XFP_ENC_OFF (50): encrypted from here
 *
 * An SA with UDP encapsulation (NAT-T, RFC 3948 section 2.1, XFP_SA_F_ESPINUDP) puts a UDP
 * header with the SA's ports and checksum 0 between the outer IPv4 header and ESP: everything
 * from the ESP header on lies XFP_UDP_LEN (8) further (hoff below), the outer protocol is UDP.
 */
#define XFP_MAPS_DATAPATH
#define XFP_MAPS_AEAD
#include <uapi/linux/bpf.h>
#include "maps.h"
#include "pkt/parsing.h"
#include "pkt/csum.h"
#include "esp/esp.h"
#include "aead/aead.h"
#include "kcrypto/esp_kc.h"

/* The map accessors: BCC rewrites map calls in the main file only (maps.h). */
static __always_inline struct xfp_crypto_scratch *xfp_scratch(void)
{
	__u32 zero = 0;

	return xfp_crypto_scratch.lookup(&zero);
}

/* Count one frame under (dir, reason); len is the frame length as received. */
static __always_inline void xfp_count(__u32 dir, __u32 reason, __u32 len)
{
	__u32 idx = dir * XFP_R_MAX + reason;

	xfp_stat_add(xfp_stats.lookup(&idx), len);
}

#define XFP_ENC_OFF (XFP_ETH_LEN + XFP_ENCAP_HEAD) /* 50: first encrypted byte */

/* Stage breakdown (bench/stages.py): built with -DXFP_STOP_AT=n, the program ends with XDP_DROP
 * right after stage n, so that the time of stage n is the difference of two builds. 0, the
 * default, is the whole program (the tests below compile away). */
#ifndef XFP_STOP_AT
#define XFP_STOP_AT 0
#endif
#define XFP_ENC_STAGE_PARSE 1 /* Ethernet/IPv4 checks, flow key */
#define XFP_ENC_STAGE_FLOW 2  /* flow lookup */
#define XFP_ENC_STAGE_SA 3    /* SA and watchdog lookups, TTL, MTU, liveness */
#define XFP_ENC_STAGE_SEQ 4   /* sequence number */
#define XFP_ENC_STAGE_HDR 5   /* room, outer headers and checksum, ESP header, trailer */
#define XFP_ENC_STAGE_AEAD 6  /* seal; after it: counters and redirect */

/* The flow key of a clear packet. Needs iph from xfp_parse_eth_ipv4(). */
static __always_inline int encap_flow_key(struct iphdr *iph, void *data_end,
					  struct xfp_flow_key *fk)
{
	__u8 *l4 = (__u8 *)(iph + 1);
	__u32 avail = xfp_ntohs(iph->tot_len) - XFP_IP_LEN;

	fk->dir = XFP_DIR_ENCAP;
	fk->proto = iph->protocol;
	fk->saddr = iph->saddr;
	fk->daddr = iph->daddr;
	return xfp_l4_ports(iph->protocol, l4, data_end, avail, fk);
}

/* The UDP header of RFC 3948 section 2.1 in front of ESP: the SA's ports, length udp_len,
 * checksum 0 ("SHOULD be transmitted as a zero value"), as the kernel's esp4.c sends it. */
struct encap_udp {
	__u16 source; /* be */
	__u16 dest;   /* be */
	__u16 len;    /* be */
	__u16 check;
};

/* n bytes from packet offset src to dst through buf; n must be a constant after inlining. */
static __always_inline int encap_copy(struct xdp_md *ctx, __u32 src, __u32 dst, __u8 *buf, __u32 n)
{
	if (bpf_xdp_load_bytes(ctx, src, buf, n) || bpf_xdp_store_bytes(ctx, dst, buf, n))
		return -1;
	return 0;
}

/* Copy len bytes of the packet from offset src down to dst (dst < src, so a forward copy never
 * overwrites bytes still to be read), in 64-byte chunks and then 32, 16, .., 1: the helpers take
 * a constant length. Returns 0, or -1 when an offset is out of the packet. */
static __always_inline int encap_slide(struct xdp_md *ctx, __u32 src, __u32 dst, __u32 len)
{
	__u8 buf[64] __attribute__((aligned(8)));
	__u32 done = 0, rem, i;

	for (i = 0; i < XFP_MAX_FRAME / 64 + 1; i++) {
		if (done + 64 > len)
			break;
		if (encap_copy(ctx, src + done, dst + done, buf, 64))
			return -1;
		done += 64;
	}
	rem = len - done;
	if ((rem & 32) && encap_copy(ctx, src + done, dst + done, buf, 32))
		return -1;
	done += rem & 32;
	if ((rem & 16) && encap_copy(ctx, src + done, dst + done, buf, 16))
		return -1;
	done += rem & 16;
	if ((rem & 8) && encap_copy(ctx, src + done, dst + done, buf, 8))
		return -1;
	done += rem & 8;
	if ((rem & 4) && encap_copy(ctx, src + done, dst + done, buf, 4))
		return -1;
	done += rem & 4;
	if ((rem & 2) && encap_copy(ctx, src + done, dst + done, buf, 2))
		return -1;
	done += rem & 2;
	if ((rem & 1) && encap_copy(ctx, src + done, dst + done, buf, 1))
		return -1;
	return 0;
}

int xdp_encap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;
	struct xfp_flow_key fk = {};
	struct xfp_flow_val *fv;
	struct xfp_sa_out *sa;
	__u64 *wd, *lv __attribute__((unused));
	struct iphdr *iph, *outer;
	struct ethhdr *eth;
	struct xfp_esp_hdr esp;
	struct encap_udp uh;
	__u8 aad[12] __attribute__((aligned(4)));
	__u8 iv[8] __attribute__((aligned(8)));
	__u32 sa_id, ilen, plen, clen, olen, aad_len, extra, mtu, egress, hoff, head;
	__u8 dmac[ETH_ALEN], smac[ETH_ALEN];
	__u64 seq, now, trailer;
	__u16 df, ttl_word[2];
	__u8 tos, ttl;
	int r, tail;

	r = xfp_parse_eth_ipv4(data, data_end, &iph);
	if (r)
		goto pass;
	/* ip_forward() forwards only frames sent to this host (PACKET_HOST): one to a broadcast
	 * or multicast MAC (the group bit, IEEE 802 first octet bit 0) is the kernel's, which
	 * drops it. */
	eth = data;
	if (eth->h_dest[0] & 1) {
		r = XFP_R_PASS_NOT_IPV4;
		goto pass;
	}
	r = encap_flow_key(iph, data_end, &fk);
	if (r)
		goto pass;
	fk.ifindex = ctx->ingress_ifindex;
	if (XFP_STOP_AT == XFP_ENC_STAGE_PARSE)
		return XDP_DROP;
	fv = xfp_flows.lookup(&fk);
	if (!fv) {
		r = XFP_R_PASS_UNKNOWN_FLOW;
		goto pass;
	}
	if (!(fv->flags & XFP_FLOW_F_ACTIVE)) {
		r = XFP_R_PASS_FLOW_DISABLED;
		goto pass;
	}
	if (XFP_STOP_AT == XFP_ENC_STAGE_FLOW)
		return XDP_DROP;
	sa_id = fv->sa_id;
	sa = xfp_sa_out.lookup(&sa_id);
	if (!sa) {
		r = XFP_R_PASS_NO_SA;
		goto pass;
	}
	if (!(sa->flags & XFP_SA_F_OFFLOAD) || XFP_KC_UNSERVED_OUT(sa)) {
		r = XFP_R_PASS_SA_NOT_OFFLOADED;
		goto pass;
	}
	now = bpf_ktime_get_ns();
	wd = xfp_watchdog.lookup(&sa_id);
	if (!wd || now > *wd || now > sa->deadline_ns) {
		r = XFP_R_PASS_SA_EXPIRED;
		goto pass;
	}
	/* ip_forward(): a packet that would leave with TTL 0 is the kernel's (ICMP time exceeded).
	 */
	if (iph->ttl <= 1) {
		r = XFP_R_PASS_TTL;
		goto pass;
	}
	ilen = xfp_ntohs(iph->tot_len);
	plen = xfp_esp_padlen(ilen);
	clen = ilen + plen + 2;
	/* NAT-T: the UDP header moves ESP and everything behind it by 8 (0 or 8, as a mask, so
	 * that the verifier sees the range). */
	hoff = (sa->flags & XFP_SA_F_ESPINUDP) ? XFP_UDP_LEN : 0;
	hoff &= XFP_UDP_LEN;
	head = XFP_ENCAP_HEAD + hoff;
	olen = head + clen + XFP_ESP_ICV_LEN;
	/* The outer next hop as validated for this flow: a neighbour or route change takes the
	 * flows off and they are learned again with the new one, while the SA entry (its
	 * sequence counter) stays. A flow without one (egress 0) uses the SA's. */
	if (fv->egress_ifindex) {
		egress = fv->egress_ifindex;
		__builtin_memcpy(dmac, fv->dmac, ETH_ALEN);
		__builtin_memcpy(smac, fv->smac, ETH_ALEN);
		mtu = fv->mtu ? fv->mtu : sa->mtu;
	} else {
		egress = sa->egress_ifindex;
		__builtin_memcpy(dmac, sa->dmac, ETH_ALEN);
		__builtin_memcpy(smac, sa->smac, ETH_ALEN);
		mtu = sa->mtu;
	}
	if (olen > mtu) {
		r = XFP_R_PASS_MTU;
		goto pass;
	}
#if XFP_LIVENESS_NS
	/* One packet of the SA every XFP_LIVENESS_NS goes through the kernel, whose policy
	 * lookup then updates the use_time the IKE daemon watches (inactivity, DPD). It takes
	 * no sequence number here: the kernel builds it and bpf/tc_reseq.c numbers it. */
	lv = xfp_liveness.lookup(&sa_id);
	if (!lv) {
		__u64 first = now + XFP_LIVENESS_NS;

		xfp_liveness.update(&sa_id, &first);
	} else if (xfp_liveness_due(lv, now)) {
		r = XFP_R_PASS_LIVENESS;
		goto pass;
	}
#endif
	if (XFP_STOP_AT == XFP_ENC_STAGE_SA)
		return XDP_DROP;

	/* One sequence number per packet, never past seq_limit (esp/esp.h). */
	bpf_spin_lock(&sa->lock);
	seq = xfp_esp_seq_take(sa);
	if (seq) {
		sa->packets += 1;
		sa->bytes += ilen;
	}
	bpf_spin_unlock(&sa->lock);
	if (!seq) {
		r = XFP_R_PASS_SEQ_EXHAUSTED;
		goto pass;
	}
	if (XFP_STOP_AT == XFP_ENC_STAGE_SEQ)
		return XDP_DROP;

	/* Read the inner header before the frame moves (RFC 4301 section 5.1.2.1 / the kernel's
	 * xfrm4_tunnel_encap_add(): outer DSCP and DF from the inner header unless the SA says
	 * otherwise; ECN copied as RFC 6040 section 4.1 normal mode says, CE included -- the
	 * kernel's INET_ECN_encapsulate() turns CE into ECT(0) instead, which a decapsulator treats
	 * alike). */
	tos = iph->tos;
	if (sa->flags & XFP_SA_F_DONT_ENCAP_DSCP)
		tos &= XFP_ECN_MASK;
	if (sa->flags & XFP_SA_F_NOECN)
		tos &= ~XFP_ECN_MASK;
	df = (sa->flags & XFP_SA_F_NOPMTUDISC) ? 0 : (iph->frag_off & xfp_htons(XFP_IP_DF));
	ttl = sa->ttl ? sa->ttl : 64;
	/* ip_decrease_ttl(): TTL - 1, checksum updated incrementally (RFC 1624); the inner
	 * header's bytes 8..11 (ttl, protocol, check) are stored once the frame has its room. */
	ttl_word[0] = *(__u16 *)&iph->ttl;
	((__u8 *)ttl_word)[0] = iph->ttl - 1;
	ttl_word[1] = xfp_csum_replace2(iph->check, *(__u16 *)&iph->ttl, ttl_word[0]);

	/* Room first, writes after: a refused adjust leaves the frame as it came (punt). */
	extra = frame_len - XFP_ETH_LEN - ilen; /* Ethernet padding behind the IPv4 packet */
	tail = (int)(plen + 2 + XFP_ESP_ICV_LEN) - (int)extra;
	if (bpf_xdp_adjust_head(ctx, -(int)head)) {
		r = XFP_R_PASS_NO_ROOM;
		goto pass;
	}
	if (tail > 0 && bpf_xdp_adjust_tail(ctx, tail)) {
		/* No tailroom (veth gives XDP a buffer cut to the frame's size, rounded to 64):
		 * take the trailer's room in front as well and slide the inner packet down. */
		if (bpf_xdp_adjust_head(ctx, -tail)) {
			if (bpf_xdp_adjust_head(ctx, (int)head)) {
				r = XFP_R_DROP_ERROR;
				goto drop;
			}
			r = XFP_R_PASS_NO_ROOM;
			goto pass;
		}
		if (encap_slide(ctx, XFP_ENC_OFF + hoff + tail, XFP_ENC_OFF + hoff, ilen)) {
			r = XFP_R_DROP_ERROR;
			goto drop;
		}
	} else if (tail <= 0 && bpf_xdp_adjust_tail(ctx, tail)) {
		r = XFP_R_DROP_ERROR; /* shrinking cannot fail; the head moved already */
		goto drop;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + XFP_ENC_OFF + XFP_IP_LEN > data_end) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	eth = data;
	outer = data + XFP_ETH_LEN;

	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	eth->h_proto = xfp_htons(ETH_P_IP);

	outer->version = 4;
	outer->ihl = 5;
	outer->tos = tos;
	outer->tot_len = xfp_htons(olen);
	outer->id = xfp_htons(seq & 0xffff); /* unique per SA over 2^16 packets (RFC 6864) */
	outer->frag_off = df;
	outer->ttl = ttl;
	outer->protocol = hoff ? IPPROTO_UDP : IPPROTO_ESP;
	outer->check = 0;
	outer->saddr = sa->saddr;
	outer->daddr = sa->daddr;
	outer->check = xfp_ipv4_csum(outer);

	/* ESP (and NAT-T's UDP) header and the inner TTL through the store helper: their offsets
	 * depend on hoff, which direct packet access would have to prove again for each. */
	if (hoff) {
		uh.source = sa->encap_sport;
		uh.dest = sa->encap_dport;
		uh.len = xfp_htons(olen - XFP_IP_LEN);
		uh.check = 0;
		if (bpf_xdp_store_bytes(ctx, XFP_ETH_LEN + XFP_IP_LEN, &uh, sizeof(uh))) {
			r = XFP_R_DROP_ERROR;
			goto drop;
		}
	}
	esp.spi = sa->spi;
	xfp_esp_set_seq_iv(&esp, iv, seq, sa->iv_mask);
	if (bpf_xdp_store_bytes(ctx, XFP_ETH_LEN + XFP_IP_LEN + hoff, &esp, sizeof(esp)) ||
	    bpf_xdp_store_bytes(ctx, XFP_ENC_OFF + hoff + 8, ttl_word, sizeof(ttl_word))) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}

	/* RFC 4303 section 2.4/2.6: pad 1, 2, .. plen, then pad length, then next header. The 8
	 * stored bytes run at most 6 bytes into the ICV room, which the seal overwrites. */
	plen &= 3;
	trailer = xfp_esp_trailer(plen);
	if (bpf_xdp_store_bytes(ctx, XFP_ENC_OFF + hoff + ilen, &trailer, sizeof(trailer))) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_ENC_STAGE_HDR)
		return XDP_DROP;
	aad_len = xfp_esp_aad(aad, sa->spi, seq, sa->flags & XFP_SA_F_ESN);
	/* Kernel crypto: the frame is built already, so a refusal (no SIMD now) cannot hand it
	 * back as it came: an error after the frame changed, dropped and counted. */
	if (XFP_KC_OUT(sa)) {
		if (xfp_kc_xdp_seal(ctx, sa->kc_id, XFP_KC_ESP_OFF + hoff, clen, seq >> 32)) {
			r = XFP_R_DROP_ERROR;
			goto drop;
		}
	} else if (xfp_aead_seal(ctx, XFP_ENC_OFF + hoff, clen, XFP_ENC_OFF + hoff + clen,
				 (const struct xfp_aead_key *)sa->key, iv, aad, aad_len)) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_ENC_STAGE_AEAD)
		return XDP_DROP;

	fv->last_seen_ns = now;
	__sync_fetch_and_add(&fv->packets, 1);
	__sync_fetch_and_add(&fv->bytes, ilen);
	xfp_count(XFP_DIR_ENCAP, XFP_R_ENCAP_OK, frame_len);
	/* No devmap entry for the egress device: drop rather than hand ESP to our own stack. */
	return xfp_tx_ports.redirect_map(egress, XDP_DROP);

pass:
	xfp_count(XFP_DIR_ENCAP, r, frame_len);
	return XDP_PASS;
drop:
	xfp_count(XFP_DIR_ENCAP, r, frame_len);
	return XDP_DROP;
}
