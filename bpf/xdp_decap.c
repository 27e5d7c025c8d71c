/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xdp_decap.c: XDP on the WAN side of the gateway. ESP of an offloaded inbound SA is
 * authenticated (ICV first, nothing written before), checked against the anti-replay window,
 * peeked at (first ChaCha20 block only) for the inner flow; a flow the controller offloaded is
 * decrypted in place, stripped and redirected out of the LAN device; an inner flow we do not
 * know goes to the kernel as the untouched ciphertext (XDP_PASS). Bad ICV, replays and
 * malformed ESP are dropped and counted; everything else is passed untouched and counted.
 *
 * Input frame:
 *   eth(14) | outer IPv4(20) | SPI, seq(8) | IV(8) | inner IPv4 | pad | pad len | nh | ICV(16)
 *                                                  ^ XFP_DEC_OFF (50)
 *
 * NAT-T (RFC 3948): UDP in front of ESP moves everything from the SPI on by 8 (hoff below).
 * UDP to XFP_NATT_PORT that carries IKE (non-ESP marker) or a NAT keepalive is the kernel's,
 * untouched; ESP-in-UDP is decapsulated only for an SA with XFP_SA_F_ESPINUDP whose ports and
 * peer address it matches (anything else the kernel sees, and reports a new mapping for). The
 * UDP checksum is not checked: RFC 3948 section 3.1.2 lets the receiver skip it, and the ESP
 * ICV covers all that follows it.
 */
#define XFP_MAPS_DATAPATH
#define XFP_MAPS_AEAD
#include <uapi/linux/bpf.h>
#include <uapi/linux/udp.h>
#include "maps.h"
#include "pkt/parsing.h"
#include "pkt/csum.h"
#include "esp/esp.h"
#include "aead/aead.h"
#include "kcrypto/esp_kc.h"

#define XFP_DEC_OFF (XFP_ETH_LEN + XFP_ENCAP_HEAD) /* 50: first encrypted byte */

/* Stage breakdown (bench/stages.py): built with -DXFP_STOP_AT=n, the program ends with XDP_DROP
 * right after stage n, so that the time of stage n is the difference of two builds. 0, the
 * default, is the whole program (the tests below compile away); after the last stage come the
 * counters and the redirect. */
#ifndef XFP_STOP_AT
#define XFP_STOP_AT 0
#endif
#define XFP_DEC_STAGE_PARSE 1	/* Ethernet/IPv4/ESP checks */
#define XFP_DEC_STAGE_SA 2	/* SA and watchdog lookups */
#define XFP_DEC_STAGE_REPLAY 3	/* replay check before authentication */
#define XFP_DEC_STAGE_ICV 4	/* AEAD: Poly1305 over the packet, ICV compared */
#define XFP_DEC_STAGE_WINDOW 5	/* replay window moved */
#define XFP_DEC_STAGE_PEEK 6	/* AEAD: first keystream block, inner header checks */
#define XFP_DEC_STAGE_FLOW 7	/* inner flow lookup, liveness */
#define XFP_DEC_STAGE_DECRYPT 8 /* AEAD: ChaCha20 over the packet */
#define XFP_DEC_STAGE_TRAILER 9 /* trailer and pad check */
#define XFP_DEC_STAGE_HDR 10	/* checksum, ECN/TTL, Ethernet header, strip */

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

/* RFC 4303 section 2.4: the receiver checks the pad bytes are 1, 2, 3, ... Needs the payload
 * decrypted; pad starts at packet offset `off`, and the pad length, next header and ICV follow
 * it (18 bytes), so every 8-byte load stays in the packet. Eight bytes per step, compared with
 * the expected run (byte j of step k is 8k + j + 1), the last step masked: a byte loop was
 * "too complex" for the 6.1 verifier (8193 jumps) and costs 8 times more. Returns 0 when the
 * bytes are right. */
static __always_inline int decap_check_pad(struct xdp_md *ctx, __u32 off, __u32 padlen)
{
	__u64 w, want, mask;
	__u32 k, rem;

	for (k = 0; k < 32; k++) {
		if (k * 8 >= padlen)
			break;
		if (bpf_xdp_load_bytes(ctx, off + k * 8, &w, 8))
			return -1;
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
		w = __builtin_bswap64(w);
#endif
		want = 0x0807060504030201ULL + k * 0x0808080808080808ULL;
		rem = padlen - k * 8;
		mask = rem >= 8 ? ~0ULL : (1ULL << (rem * 8)) - 1;
		if ((w ^ want) & mask)
			return -1;
	}
	return 0;
}

/* RFC 4303 sections 2.4-2.6 on the decrypted payload of clen bytes at packet offset off: its
 * last 8 bytes are ... pad | pad length | next header (clen >= 22: all in the payload), read
 * with one direct load. Returns the pad length, -1 when the next header is not IPv4 or a pad
 * byte is wrong (the last 6 are checked from the same load, a longer pad, which only a peer
 * padding beyond the 4-byte alignment sends, by decap_check_pad()), -2 when the bytes are not
 * in the frame. */
static __always_inline int decap_trailer(struct xdp_md *ctx, __u32 off, __u32 clen)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *p = data + xfp_bound(off + clen - 8);
	__u64 w, padlen, shift, run;

	if (!xfp_pkt_fits(p, 8, (__u8 *)(long)ctx->data_end))
		return -2;
	w = XFP_LD64(p);
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
	w = __builtin_bswap64(w);
#endif
	if ((w >> 56) != XFP_NEXTHDR_IPIP)
		return -1;
	padlen = (w >> 48) & 0xff;
	if (padlen > 6)
		return decap_check_pad(ctx, off + clen - 2 - padlen, padlen) ? -1 : (int)padlen;
	/* pad bytes 1, 2, .. padlen end at byte 5 of the quadword */
	shift = 8 * (6 - padlen);
	run = 0x060504030201ULL & xfp_lowmask(padlen);
	if ((w ^ (run << shift)) & (xfp_lowmask(padlen) << shift))
		return -1;
	return padlen;
}

/* RFC 3948 section 2: what UDP to the NAT-T port carries, judged by its first payload bytes
 * (udp points at the UDP header, whose payload of ulen bytes lies in the frame up to end):
 * 0 for ESP (at least an SPI and sequence number), XFP_R_PASS_NATT_CTRL for a NAT keepalive
 * (one 0xFF byte, section 2.3) or IKE (the 4-byte non-ESP marker, zero, section 2.2), and
 * XFP_R_PASS_NOT_ESP for anything else that is too short to be ESP (the kernel's UDP socket
 * gets it, as xfrm4_udp_encap_rcv() decides). */
static __always_inline int decap_natt_kind(const __u8 *udp, const void *end, __u32 ulen)
{
	const __u8 *p = udp + XFP_UDP_LEN;

	if (ulen == 1 && (const void *)(p + 1) <= end && p[0] == 0xff)
		return XFP_R_PASS_NATT_CTRL;
	if (ulen >= 4 && (const void *)(p + 4) <= end && *(const __u32 *)p == 0)
		return XFP_R_PASS_NATT_CTRL;
	/* xfrm4_udp_encap_rcv(): ESP only when longer than the ESP header */
	if (ulen <= XFP_ESP_HDR_LEN || (const void *)(p + XFP_ESP_HDR_LEN) > end)
		return XFP_R_PASS_NOT_ESP;
	return 0;
}

/* The packet's 64-bit sequence number into *seq, and 1 when the window says it is a replay
 * (counted). Reads the window only: it moves after authentication, under the lock again. */
static __always_inline int decap_replay_peek(struct xfp_sa_in *sa, __u32 wire_seq, __u64 *seq)
{
	int r;

	bpf_spin_lock(&sa->lock);
	*seq = xfp_esp_seq64(sa, xfp_ntohl(wire_seq));
	r = xfp_replay_check(sa, *seq);
	if (r)
		sa->replay_drops += 1;
	bpf_spin_unlock(&sa->lock);
	return r;
}

int xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = data_end - data;
	struct xfp_flow_key fk = {};
	struct xfp_sa_in_key sk = {};
	struct xfp_flow_val *fv;
	struct xfp_sa_in *sa;
	__u64 *wd, *lv __attribute__((unused));
	__u32 sa_id;
	struct iphdr *iph;
	struct ethhdr *eth;
	struct xfp_esp_hdr *esp;
	struct udphdr *uh = 0;
	__u16 usport = 0, udport = 0; /* NAT-T: uh's ports, copied while uh is known valid */
	__u8 aad[12] __attribute__((aligned(4)));
	__u8 iv[8] __attribute__((aligned(8)));
	__u8 blk[64] __attribute__((aligned(8)));
	__u32 olen, clen, itot, padlen, aad_len, extra, hoff = 0, ulen, wire_seq;
	__u16 old0, old4, new0, new4, check;
	__u8 outer_tos;
	__u64 seq, now;
	int r, tos, tlen, mapping = 0;
	int opened = 0; /* kernel crypto: the payload is clear in place; re-sealed before a pass */

	r = xfp_parse_eth_ipv4(data, data_end, &iph);
	if (r)
		goto pass;
	olen = xfp_ntohs(iph->tot_len);
	if (iph->protocol == IPPROTO_UDP) {
		/* NAT-T (RFC 3948): UDP whose length is the IPv4 payload's, then ESP */
		uh = (void *)(iph + 1);
		if ((void *)(uh + 1) > data_end || olen < XFP_IP_LEN + XFP_UDP_LEN) {
			r = XFP_R_PASS_MALFORMED_IP;
			goto pass;
		}
		ulen = xfp_ntohs(uh->len);
		usport = uh->source;
		udport = uh->dest;
		if (ulen != olen - XFP_IP_LEN) {
			r = XFP_R_PASS_MALFORMED_IP; /* the kernel's UDP judges */
			goto pass;
		}
		ulen -= XFP_UDP_LEN;
		if (uh->dest == xfp_htons(XFP_NATT_PORT)) {
			r = decap_natt_kind((__u8 *)uh, data_end, ulen);
			if (r)
				goto pass;
		}
		hoff = XFP_UDP_LEN;
	} else if (iph->protocol != IPPROTO_ESP) {
		r = XFP_R_PASS_NOT_ESP;
		goto pass;
	}
	esp = (void *)(iph + 1);
	if (hoff)
		esp = (void *)(uh + 1);
	if (olen < XFP_ENCAP_HEAD + hoff || (void *)(esp + 1) > data_end) {
		/* not even an SPI: the kernel judges (UDP: not ESP-in-UDP then) */
		r = hoff ? XFP_R_PASS_NOT_ESP : XFP_R_PASS_MALFORMED_IP;
		goto pass;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_PARSE)
		return XDP_DROP;
	/* Copied out, so that the two header layouts (ESP, ESP-in-UDP) meet again in one
	 * verifier state: nothing below reads the packet through esp. */
	sk.spi = esp->spi;
	wire_seq = esp->seq;
	__builtin_memcpy(iv, esp->iv, 8);
	sk.daddr = iph->daddr;
	sa = xfp_sa_in.lookup(&sk);
	if (!sa) {
		/* UDP to another port with no SA: ordinary UDP, not ours */
		r = (hoff && udport != xfp_htons(XFP_NATT_PORT)) ? XFP_R_PASS_NOT_ESP
								 : XFP_R_PASS_UNKNOWN_SPI;
		goto pass;
	}
	/* NAT-T: the frame's encapsulation must be the SA's, and come from the peer address and
	 * port the SA names (esp4.c's esp_input_done2() reports any other as a new mapping,
	 * XFRM_MSG_MAPPING, which it can only do for packets it sees). Plain ESP of a NAT-T SA,
	 * or ESP-in-UDP of a plain one, is the kernel's to judge as well. */
	if (sa->flags & XFP_SA_F_ESPINUDP)
		mapping = !hoff || usport != sa->encap_sport || udport != sa->encap_dport ||
			  iph->saddr != sa->saddr;
	else
		mapping = hoff != 0;
	if (!(sa->flags & XFP_SA_F_OFFLOAD) || XFP_KC_UNSERVED_IN(sa)) {
		r = XFP_R_PASS_SA_NOT_OFFLOADED;
		goto pass;
	}
	now = bpf_ktime_get_ns();
	sa_id = sa->sa_id;
	wd = xfp_watchdog.lookup(&sa_id);
	if (!wd || now > *wd || now > sa->deadline_ns) {
		/* The SA is the kernel's alone now (controller gone, or the SA being handed
		 * back), but the kernel's replay window has not seen what XDP accepted: a replay
		 * of such a packet is still dropped here. The check only reads the window:
		 * nothing unauthenticated may move it, and the kernel judges the rest. */
		if (decap_replay_peek(sa, wire_seq, &seq)) {
			r = XFP_R_DROP_REPLAY;
			goto drop;
		}
		r = XFP_R_PASS_SA_EXPIRED;
		goto pass;
	}
	if (mapping) {
		/* The kernel's path, but (as for an expired SA) not for a replay of what XDP
		 * accepted: its window never saw those. */
		if (decap_replay_peek(sa, wire_seq, &seq)) {
			r = XFP_R_DROP_REPLAY;
			goto drop;
		}
		r = XFP_R_PASS_NATT_MAPPING;
		goto pass;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_SA)
		return XDP_DROP;
	/* Tunnel mode carries at least an inner IPv4 header and the 2-byte trailer. */
	if (olen < XFP_ENCAP_HEAD + hoff + XFP_IP_LEN + 2 + XFP_ESP_ICV_LEN) {
		r = XFP_R_DROP_MALFORMED_ESP;
		goto drop;
	}
	clen = olen - XFP_ENCAP_HEAD - hoff - XFP_ESP_ICV_LEN;
	outer_tos = iph->tos;

	/* Anti-replay before the (costly) ICV check, as RFC 4303 section 3.4.3 suggests; again
	 * after it, under the lock, before the window moves. */
	if (decap_replay_peek(sa, wire_seq, &seq)) {
		r = XFP_R_DROP_REPLAY;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_REPLAY)
		return XDP_DROP;
	aad_len = xfp_esp_aad(aad, sk.spi, seq, sa->flags & XFP_SA_F_ESN);
	/* Kernel crypto opens (verifies and decrypts) in one call. A refusal leaves the payload
	 * as it came (no SIMD right now, multi-buffer frame, no context): the kernel's. */
	if (XFP_KC_IN(sa)) {
		r = xfp_kc_xdp_open(ctx, sa->kc_id, XFP_KC_ESP_OFF + hoff, clen, seq >> 32);
		if (r == XFP_KCR_BAD_TAG) {
			__sync_fetch_and_add(&sa->icv_fails, 1);
			r = XFP_R_DROP_BAD_ICV;
			goto drop;
		}
		if (r) {
			r = XFP_R_PASS_KCRYPTO;
			goto pass;
		}
		opened = 1;
	} else if (xfp_aead_verify(ctx, XFP_DEC_OFF + hoff, clen, XFP_DEC_OFF + hoff + clen,
				   (const struct xfp_aead_key *)sa->key, iv, aad, aad_len)) {
		__sync_fetch_and_add(&sa->icv_fails, 1);
		r = XFP_R_DROP_BAD_ICV;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_ICV)
		return XDP_DROP;
	/* Authenticated: only now may the window move (RFC 4303 section 3.4.3). Every
	 * authenticated packet counts, punted or not, so that a replay of a packet XDP forwarded
	 * cannot slip through the kernel's window, which never saw it. */
	bpf_spin_lock(&sa->lock);
	r = xfp_replay_check(sa, seq);
	if (r) {
		sa->replay_drops += 1;
	} else {
		xfp_replay_advance(sa, seq);
		sa->packets += 1;
		sa->bytes += clen;
	}
	bpf_spin_unlock(&sa->lock);
	if (r) {
		r = XFP_R_DROP_REPLAY;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_WINDOW)
		return XDP_DROP;

	/* Peek: ChaCha20 is a stream cipher, so the first block tells the inner header and ports
	 * without writing anything; a packet we do not forward reaches the kernel untouched. */
	if (opened) {
		/* Already clear: the first bytes as the peek gives them. clen >= 22 and the ICV
		 * follows, so 38 bytes are always there, 64 from clen 48 (xfp_l4_ports reads no
		 * further than itot, which is below clen). */
		__builtin_memset(blk, 0, sizeof(blk));
		if (clen >= 48 ? bpf_xdp_load_bytes(ctx, XFP_DEC_OFF + hoff, blk, 64)
			       : bpf_xdp_load_bytes(ctx, XFP_DEC_OFF + hoff, blk, 38)) {
			r = XFP_R_DROP_ERROR;
			goto drop;
		}
	} else if (xfp_aead_peek(ctx, XFP_DEC_OFF + hoff, clen,
				 (const struct xfp_aead_key *)sa->key, iv, blk)) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	if ((blk[0] >> 4) != 4) {
		r = XFP_R_PASS_NOT_IPV4;
		goto pass;
	}
	if ((blk[0] & 0xf) != 5) {
		r = (blk[0] & 0xf) < 5 ? XFP_R_DROP_BAD_INNER : XFP_R_PASS_IP_OPTIONS;
		if (r == XFP_R_DROP_BAD_INNER)
			goto drop;
		goto pass;
	}
	itot = ((__u32)blk[2] << 8) | blk[3];
	if (itot < XFP_IP_LEN || itot + 2 > clen) {
		r = XFP_R_DROP_BAD_INNER;
		goto drop;
	}
	if (*(__u16 *)&blk[6] & xfp_htons(XFP_IP_MF | XFP_IP_OFFSET)) {
		r = XFP_R_PASS_FRAGMENT;
		goto pass;
	}
	if (blk[8] <= 1) {
		r = XFP_R_PASS_TTL;
		goto pass;
	}
	tos = xfp_ecn_decap(outer_tos, blk[1]);
	if (sa->flags & XFP_SA_F_NOECN)
		tos = blk[1]; /* kernel XFRM_STATE_NOECN: no ECN propagation */
	if (tos < 0) {
		r = XFP_R_DROP_ECN;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_PEEK)
		return XDP_DROP;
	fk.dir = XFP_DIR_DECAP;
	fk.proto = blk[9];
	fk.saddr = *(__u32 *)&blk[12];
	fk.daddr = *(__u32 *)&blk[16];
	r = xfp_l4_ports(blk[9], &blk[20], blk + sizeof(blk), itot - XFP_IP_LEN, &fk);
	if (r)
		goto pass;
	fk.ifindex = ctx->ingress_ifindex;
	fv = xfp_flows.lookup(&fk);
	if (!fv) {
		r = XFP_R_PASS_INNER_MISS;
		goto pass;
	}
	if (!(fv->flags & XFP_FLOW_F_ACTIVE)) {
		r = XFP_R_PASS_FLOW_DISABLED;
		goto pass;
	}
	/* The policy check of xfrm4_policy_check(): the flow must arrive on its own SA. */
	if (fv->sa_id != sa->sa_id) {
		r = XFP_R_PASS_SA_MISMATCH;
		goto pass;
	}
	if (fv->mtu && itot > fv->mtu) {
		r = XFP_R_PASS_MTU;
		goto pass;
	}
#if XFP_LIVENESS_NS
	/* One packet of the SA every XFP_LIVENESS_NS goes through the kernel, whose policy
	 * lookup then updates the use_time the IKE daemon watches (inactivity, DPD). Already marked
	 * in the replay window above, it reaches the kernel as untouched ciphertext, like an inner
	 * miss. */
	lv = xfp_liveness.lookup(&sa_id);
	if (!lv) {
		__u64 first = now + XFP_LIVENESS_NS;

		xfp_liveness.update(&sa_id, &first);
	} else if (xfp_liveness_due(lv, now)) {
		r = XFP_R_PASS_LIVENESS;
		goto pass;
	}
#endif
	if (XFP_STOP_AT == XFP_DEC_STAGE_FLOW)
		return XDP_DROP;

	/* The BPF AEAD reuses the peek's keystream block 1: no AEAD call since (aead/aead.h). */
	if (!opened && xfp_aead_decrypt_peeked(ctx)) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	if (XFP_STOP_AT == XFP_DEC_STAGE_DECRYPT)
		return XDP_DROP;
	/* RFC 4303 sections 2.4-2.6: ... pad | pad length | next header, and the pad must make up
	 * exactly what the inner IPv4 total length leaves over. */
	tlen = decap_trailer(ctx, XFP_DEC_OFF + hoff, clen);
	if (tlen == -2) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	if (tlen < 0 || (__u32)tlen + 2 + itot != clen) {
		r = XFP_R_DROP_BAD_TRAILER;
		goto drop;
	}
	padlen = tlen;
	if (XFP_STOP_AT == XFP_DEC_STAGE_TRAILER)
		return XDP_DROP;
	/* The outer headers (and NAT-T's UDP) and the trailer are cut off first, so that the
	 * inner header lies at a fixed offset whatever hoff was; a check failing below drops
	 * the frame all the same. */
	extra = frame_len - XFP_ETH_LEN - olen; /* Ethernet padding behind the outer packet */
	if (bpf_xdp_adjust_head(ctx, (int)(XFP_ENCAP_HEAD + hoff)) ||
	    bpf_xdp_adjust_tail(ctx, -(int)(padlen + 2 + XFP_ESP_ICV_LEN + extra))) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + XFP_ETH_LEN + XFP_IP_LEN > data_end) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	iph = data + XFP_ETH_LEN;
	/* The decrypted header must be the one we peeked at, and a valid one. */
	if (xfp_ipv4_csum(iph) != 0 || iph->version != 4 || iph->ihl != 5 ||
	    xfp_ntohs(iph->tot_len) != itot) {
		r = XFP_R_DROP_BAD_INNER;
		goto drop;
	}
	/* ECN (RFC 6040 section 4.2) and TTL - 1 (ip_forward()), checksum updated per word
	 * (RFC 1624). */
	old0 = *(__u16 *)iph;
	old4 = *(__u16 *)&iph->ttl;
	iph->tos = tos;
	iph->ttl -= 1;
	new0 = *(__u16 *)iph;
	new4 = *(__u16 *)&iph->ttl;
	check = xfp_csum_replace2(iph->check, old0, new0);
	iph->check = xfp_csum_replace2(check, old4, new4);

	/* The new Ethernet header right in front of the inner packet. */
	eth = data;
	__builtin_memcpy(eth->h_dest, fv->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fv->smac, ETH_ALEN);
	eth->h_proto = xfp_htons(ETH_P_IP);
	if (XFP_STOP_AT == XFP_DEC_STAGE_HDR)
		return XDP_DROP;

	fv->last_seen_ns = now;
	__sync_fetch_and_add(&fv->packets, 1);
	__sync_fetch_and_add(&fv->bytes, itot);
	xfp_count(XFP_DIR_DECAP, XFP_R_DECAP_OK, frame_len);
	/* No devmap entry for the egress device: drop rather than pass cleartext up our stack. */
	return xfp_tx_ports.redirect_map(fv->egress_ifindex, XDP_DROP);

pass:
	/* Opened by the kernel crypto but not forwarded: seal it again. Same key, nonce, AAD and
	 * plaintext give the same ciphertext and ICV (RFC 7634 section 2, RFC 4106 section 3), so
	 * the kernel gets the frame byte for byte as it came. */
	if (opened && xfp_kc_xdp_seal(ctx, sa->kc_id, XFP_KC_ESP_OFF + hoff, clen, seq >> 32)) {
		r = XFP_R_DROP_ERROR;
		goto drop;
	}
	xfp_count(XFP_DIR_DECAP, r, frame_len);
	return XDP_PASS;
drop:
	xfp_count(XFP_DIR_DECAP, r, frame_len);
	return XDP_DROP;
}
