/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * esp.h: the ESP rules both programs share: trailer padding (RFC 4303 section 2.4), the
 * associated data of RFC 7634 section 2.1, sequence numbers with and without ESN (RFC 4303
 * section 2.2.1 and appendix A), the anti-replay window (section 3.4.3) and ECN at the tunnel
 * egress (RFC 6040 section 4.2).
 */
#ifndef XFP_ESP_H
#define XFP_ESP_H

#include "xfp_defs.h"
#include "pkt/parsing.h"

#define XFP_NEXTHDR_IPIP 4 /* tunnel mode, inner IPv4 (RFC 4303 section 2.6) */

/* ESP header as on the wire (RFC 4303 section 2). */
struct xfp_esp_hdr {
	__u32 spi;  /* be */
	__u32 seq;  /* be: low 32 bits */
	__u8 iv[8]; /* RFC 7634 section 2: the explicit IV */
};

/* Pad length for a payload of len bytes: esp4.c pads payload + pad + 2 to blksize, which is
 * ALIGN(crypto_aead_blocksize(aead), 4) = 4 for rfc7539esp (ChaCha20 is a stream cipher,
 * block size 1). RFC 4303 section 2.4: pad bytes are 1, 2, 3, ... */
static __always_inline __u32 xfp_esp_padlen(__u32 len)
{
	return (XFP_ESP_ALIGN - ((len + 2) & (XFP_ESP_ALIGN - 1))) & (XFP_ESP_ALIGN - 1);
}

/* The ESP trailer for plen (0..3) pad bytes as 8 bytes in memory order: 1, 2, .. plen, then the
 * pad length, then next header 4 (RFC 4303 sections 2.4-2.6); the bytes after are don't-care.
 * Built arithmetically because a variable index into a stack array defeats the verifier. */
static __always_inline __u64 xfp_esp_trailer(__u32 plen)
{
	__u64 shift = 8 * (plen & 3);
	__u64 t = 0x030201ULL & ((1ULL << shift) - 1);

	t |= (__u64)(plen & 3) << shift;
	t |= (__u64)XFP_NEXTHDR_IPIP << (shift + 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return t;
#else
	return __builtin_bswap64(t);
#endif
}

/* RFC 7634 section 2.1 / RFC 4303 section 2.2.1: AAD = SPI || seq (8 bytes), or with ESN
 * SPI || seq high || seq low (12 bytes). spi is be; seq is the 64-bit host-order value.
 * Returns the AAD length. */
static __always_inline __u32 xfp_esp_aad(__u8 aad[12], __u32 spi, __u64 seq, int esn)
{
	__u32 *w = (__u32 *)aad;

	w[0] = spi;
	if (esn) {
		w[1] = xfp_htonl(seq >> 32);
		w[2] = xfp_htonl(seq & 0xffffffff);
		return 12;
	}
	w[1] = xfp_htonl(seq & 0xffffffff);
	w[2] = 0;
	return 8;
}

/* The next outbound sequence number of an SA, or 0 when the SA may send no more: seq_limit
 * reached, or 2^32 without ESN (the kernel's xfrm_replay_overflow() refuses to wrap 32 bits
 * without ESN as well). RFC 4303 section 3.3.3: the first packet carries 1. One number per
 * packet, never shared between CPUs or with the resequencer: needs sa->lock held. */
static __always_inline __u64 xfp_esp_seq_take(struct xfp_sa_out *sa)
{
	__u64 seq = sa->seq;

	if (seq == 0)
		seq = 1;
	if (seq >= sa->seq_limit || (!(sa->flags & XFP_SA_F_ESN) && seq > 0xffffffffULL))
		return 0;
	sa->seq = seq + 1;
	return seq;
}

/* Write seq and the IV into an ESP header: RFC 4303 section 2.2, the low 32 bits on the wire;
 * the IV as crypto/seqiv.c makes it, the 64-bit sequence number, big endian, XOR a per-SA mask
 * (unique because seq is). iv receives a copy for the AEAD nonce. Needs esp bounds-checked for
 * sizeof(struct xfp_esp_hdr). */
static __always_inline void xfp_esp_set_seq_iv(struct xfp_esp_hdr *esp, __u8 iv[8], __u64 seq,
					       __u64 iv_mask)
{
	esp->seq = xfp_htonl(seq & 0xffffffff);
	*(__u64 *)iv = xfp_htonll(seq ^ iv_mask);
	__builtin_memcpy(esp->iv, iv, 8);
}

/* RFC 4303 appendix A2.1: the full 64-bit sequence number of a packet that carries only the
 * low 32 bits `seql`, given the highest authenticated number `top` and the window size.
 * Returns 0 (never a valid number) when it would lie before the start of the sequence space. */
static __always_inline __u64 xfp_esn_infer(__u64 top, __u32 seql, __u32 window)
{
	__u64 tl = top & 0xffffffff, th = top >> 32, sl = seql;
	__u64 w = window ? window : 1;

	if (tl >= w - 1) {
		/* Case A: the window lies within one sub-space. */
		if (sl >= tl - w + 1)
			return (th << 32) | sl;
		return ((th + 1) << 32) | sl;
	}
	/* Case B: the window spans two sub-spaces; its bottom is in sub-space th - 1. */
	if (sl >= tl - w + 1 + 0x100000000ULL) {
		if (th == 0)
			return 0;
		return ((th - 1) << 32) | sl;
	}
	return (th << 32) | sl;
}

/* The 64-bit sequence number of a received packet (low 32 bits from the wire, host order).
 * Needs the SA's lock held (reads seq_top). */
static __always_inline __u64 xfp_esp_seq64(const struct xfp_sa_in *sa, __u32 seql)
{
	if (sa->flags & XFP_SA_F_ESN)
		return xfp_esn_infer(sa->seq_top, seql, sa->replay_window);
	return seql;
}

/* RFC 4303 section 3.4.3: 0 when `seq` may be accepted, 1 when it is a replay (duplicate,
 * left of the window, or 0). The bitmap is the ring of RFC 6479: bit (seq & 63) of word
 * (seq >> 6) % XFP_REPLAY_WORDS. Needs the SA's lock held. */
static __always_inline int xfp_replay_check(const struct xfp_sa_in *sa, __u64 seq)
{
	__u64 w = sa->replay_window;
	__u64 top = sa->seq_top;

	if (seq == 0)
		return 1; /* never sent (RFC 4303 section 3.3.3: the first packet has seq 1) */
	if (w == 0 || seq > top)
		return 0; /* window 0: no check, as xfrm_replay_check() */
	if (w > XFP_REPLAY_MAX_WINDOW)
		w = XFP_REPLAY_MAX_WINDOW;
	if (top - seq >= w)
		return 1;
	return (sa->bitmap[(seq >> 6) & (XFP_REPLAY_WORDS - 1)] >> (seq & 63)) & 1;
}

/* Record `seq` (authenticated, and accepted by xfp_replay_check under the same lock): clear
 * the words the window moved over (RFC 6479 section 3), then set its bit. */
static __always_inline void xfp_replay_advance(struct xfp_sa_in *sa, __u64 seq)
{
	__u64 top = sa->seq_top;

	if (seq > top) {
		__u64 diff = (seq >> 6) - (top >> 6);
		__u64 base = top >> 6;
		__u32 i;

		for (i = 1; i <= XFP_REPLAY_WORDS; i++) {
			if (i > diff)
				break;
			sa->bitmap[(base + i) & (XFP_REPLAY_WORDS - 1)] = 0;
		}
		sa->seq_top = seq;
	}
	sa->bitmap[(seq >> 6) & (XFP_REPLAY_WORDS - 1)] |= 1ULL << (seq & 63);
}

/* RFC 6040 section 4.2 (default tunnel egress), for the inner TOS byte given the outer one.
 * Returns the new inner TOS, or -1 when the packet must be dropped (outer CE over inner
 * Not-ECT). Inner CE stays CE; outer CE marks the inner CE; outer ECT(1) over inner ECT(0)
 * gives ECT(1); everything else leaves the inner field as it was. */
#define XFP_ECN_MASK 3
#define XFP_ECN_NOT_ECT 0
#define XFP_ECN_ECT_1 1
#define XFP_ECN_ECT_0 2
#define XFP_ECN_CE 3
static __always_inline int xfp_ecn_decap(__u8 outer_tos, __u8 inner_tos)
{
	__u8 o = outer_tos & XFP_ECN_MASK, i = inner_tos & XFP_ECN_MASK;

	if (o == XFP_ECN_CE) {
		if (i == XFP_ECN_NOT_ECT)
			return -1;
		return (inner_tos & ~XFP_ECN_MASK) | XFP_ECN_CE;
	}
	if (o == XFP_ECN_ECT_1 && i == XFP_ECN_ECT_0)
		return (inner_tos & ~XFP_ECN_MASK) | XFP_ECN_ECT_1;
	return inner_tos;
}

#endif /* XFP_ESP_H */
