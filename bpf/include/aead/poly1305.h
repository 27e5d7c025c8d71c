/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Poly1305, RFC 8439 §2.5, in radix 2^26 (five 26-bit limbs, as poly1305-donna's 32-bit
 * variant and the kernel's lib/crypto/poly1305-donna32.c): BPF has only a 64x64->64 multiply,
 * so products of 26-bit limbs (< 2^55 with the *5 folding) and their sums (< 2^58) fit.
 *
 * Portable C, shared by BPF and the native benchmark (bench/native_aead.c). No BPF helpers.
 * Limbs are kept in __u64 so that BPF ISA v1 needs no zero-extension shifts. Tried and not
 * kept: two blocks per step with r^2 (h = (h + m1) r^2 + m2 r, one carry chain per pair) made
 * no measurable difference in BPF, where the 25 multiplies and their operand loads dominate;
 * nor did forcing the five sums to be computed one after the other (more spills).
 */
#ifndef XFP_POLY1305_H
#define XFP_POLY1305_H

#include "aead/chacha20.h" /* native typedefs, endianness check */

#define XFP_P26 0x3ffffffULL

struct xfp_poly1305 {
	__u64 r0, r1, r2, r3, r4; /* clamped r, radix 2^26 */
	__u64 s1, s2, s3, s4;	  /* 5 * r1..r4: 2^130 = 5 mod p folds the high products */
	__u64 h0, h1, h2, h3, h4; /* accumulator, radix 2^26 */
	__u64 pad_lo, pad_hi;	  /* s, added at the end (RFC 8439 §2.5.1) */
};

/* RFC 8439 §2.5.1: r = le(key[0..15]) clamped, s = le(key[16..31]); h = 0. */
static __always_inline void xfp_poly1305_init(struct xfp_poly1305 *st, __u64 k0, __u64 k1, __u64 k2,
					      __u64 k3)
{
	/* Clamp and split in one step (the donna masks: 0x0ffffffc0ffffffc0ffffffc0fffffff). */
	st->r0 = k0 & 0x3ffffff;
	st->r1 = (k0 >> 26) & 0x3ffff03;
	st->r2 = ((k0 >> 52) | (k1 << 12)) & 0x3ffc0ff;
	st->r3 = (k1 >> 14) & 0x3f03fff;
	st->r4 = (k1 >> 40) & 0x00fffff;
	st->s1 = st->r1 * 5;
	st->s2 = st->r2 * 5;
	st->s3 = st->r3 * 5;
	st->s4 = st->r4 * 5;
	st->h0 = 0;
	st->h1 = 0;
	st->h2 = 0;
	st->h3 = 0;
	st->h4 = 0;
	st->pad_lo = k2;
	st->pad_hi = k3;
}

/*
 * One 16-byte block m = lo | hi << 64 (little-endian words): h = (h + m + hibit*2^128) * r
 * mod 2^130-5. hibit is 1 for every full block (and every AEAD block, which RFC 8439 §2.8
 * pads to 16 bytes), 0 for a raw partial final block that the caller already 0x01-terminated.
 */
static __always_inline void xfp_poly1305_block(struct xfp_poly1305 *st, __u64 lo, __u64 hi,
					       __u64 hibit)
{
	__u64 r0 = st->r0, r1 = st->r1, r2 = st->r2, r3 = st->r3, r4 = st->r4;
	__u64 s1 = st->s1, s2 = st->s2, s3 = st->s3, s4 = st->s4;
	__u64 h0 = st->h0 + (lo & XFP_P26);
	__u64 h1 = st->h1 + ((lo >> 26) & XFP_P26);
	__u64 h2 = st->h2 + (((lo >> 52) | (hi << 12)) & XFP_P26);
	__u64 h3 = st->h3 + ((hi >> 14) & XFP_P26);
	__u64 h4 = st->h4 + ((hi >> 40) | (hibit << 24));
	__u64 d0, d1, d2, d3, d4, c;

	d0 = h0 * r0 + h1 * s4 + h2 * s3 + h3 * s2 + h4 * s1;
	d1 = h0 * r1 + h1 * r0 + h2 * s4 + h3 * s3 + h4 * s2;
	d2 = h0 * r2 + h1 * r1 + h2 * r0 + h3 * s4 + h4 * s3;
	d3 = h0 * r3 + h1 * r2 + h2 * r1 + h3 * r0 + h4 * s4;
	d4 = h0 * r4 + h1 * r3 + h2 * r2 + h3 * r1 + h4 * r0;

	/* Partial carry: limbs end below 2^26 + small, enough headroom for the next block. */
	c = d0 >> 26;
	h0 = d0 & XFP_P26;
	d1 += c;
	c = d1 >> 26;
	h1 = d1 & XFP_P26;
	d2 += c;
	c = d2 >> 26;
	h2 = d2 & XFP_P26;
	d3 += c;
	c = d3 >> 26;
	h3 = d3 & XFP_P26;
	d4 += c;
	c = d4 >> 26;
	h4 = d4 & XFP_P26;
	h0 += c * 5;
	c = h0 >> 26;
	h0 &= XFP_P26;
	h1 += c;

	st->h0 = h0;
	st->h1 = h1;
	st->h2 = h2;
	st->h3 = h3;
	st->h4 = h4;
}

/*
 * RFC 8439 §2.5.1 final step: fully reduce h mod 2^130-5 (constant time: select h or h-p by
 * mask, no branch), then tag = (h + s) mod 2^128 as two little-endian quadwords.
 */
static __always_inline void xfp_poly1305_finish(const struct xfp_poly1305 *st, __u64 *tag_lo,
						__u64 *tag_hi)
{
	__u64 h0 = st->h0, h1 = st->h1, h2 = st->h2, h3 = st->h3, h4 = st->h4;
	__u64 g0, g1, g2, g3, g4, c, mask, lo, hi;

	c = h1 >> 26;
	h1 &= XFP_P26;
	h2 += c;
	c = h2 >> 26;
	h2 &= XFP_P26;
	h3 += c;
	c = h3 >> 26;
	h3 &= XFP_P26;
	h4 += c;
	c = h4 >> 26;
	h4 &= XFP_P26;
	h0 += c * 5;
	c = h0 >> 26;
	h0 &= XFP_P26;
	h1 += c;

	/* g = h + 5 - 2^130; if it does not go negative, h >= p and g is the reduced value. */
	g0 = h0 + 5;
	c = g0 >> 26;
	g0 &= XFP_P26;
	g1 = h1 + c;
	c = g1 >> 26;
	g1 &= XFP_P26;
	g2 = h2 + c;
	c = g2 >> 26;
	g2 &= XFP_P26;
	g3 = h3 + c;
	c = g3 >> 26;
	g3 &= XFP_P26;
	g4 = h4 + c - (1ULL << 26);

	mask = (g4 >> 63) - 1; /* all ones when g4 >= 0, i.e. select g */
	h0 = (h0 & ~mask) | (g0 & mask);
	h1 = (h1 & ~mask) | (g1 & mask);
	h2 = (h2 & ~mask) | (g2 & mask);
	h3 = (h3 & ~mask) | (g3 & mask);
	h4 = (h4 & ~mask) | (g4 & mask);

	lo = h0 | (h1 << 26) | (h2 << 52);
	hi = (h2 >> 12) | (h3 << 14) | (h4 << 40);
	lo += st->pad_lo;
	hi += st->pad_hi + (lo < st->pad_lo);
	*tag_lo = lo;
	*tag_hi = hi;
}

#endif /* XFP_POLY1305_H */
