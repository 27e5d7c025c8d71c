/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Test harness for bpf/include/aead/aead.h, driven by BPF_PROG_TEST_RUN (tests/bpf/test_aead.py,
 * bench/aead_bench.py). Not attached to any interface.
 *
 * The frame starts with struct xfp_aead_test_hdr (64 bytes, little-endian) saying what to do;
 * offsets are from the start of the frame, so the payload usually starts at 64. The program
 * runs the operation in place and returns XDP_TX on success, XDP_DROP when the operation
 * returned -1 (bad tag, failed bound), XDP_ABORTED on a malformed header.
 */
#define XFP_MAPS_AEAD
#include <uapi/linux/bpf.h>

#include "maps.h"
#include "aead/aead.h"

/* aead.h's scratch accessor: BCC rewrites map calls in the main file only (maps.h). */
static __always_inline struct xfp_crypto_scratch *xfp_scratch(void)
{
	__u32 zero = 0;

	return xfp_crypto_scratch.lookup(&zero);
}

enum xfp_aead_test_op {
	XFP_T_SEAL = 1,	     /* xfp_aead_seal: encrypt [off,+len), tag at tag_off */
	XFP_T_VERIFY = 2,    /* xfp_aead_verify only */
	XFP_T_DECRYPT = 3,   /* xfp_aead_decrypt only (raw ChaCha20 from counter 1) */
	XFP_T_OPEN = 4,	     /* verify, then decrypt (the decap order) */
	XFP_T_PEEK = 5,	     /* xfp_aead_peek; the 64 bytes written at tag_off */
	XFP_T_POLY = 6,	     /* raw Poly1305 (RFC 8439 §2.5) of [off,+len) keyed by key[32] */
	XFP_T_OPEN_COST = 7, /* bench: verify, then decrypt whatever verify said, so that a
			      * repeated run on one buffer costs what one open costs */
	XFP_T_NOP = 8,	     /* bench floor: parse the header, XDP_TX */
};

struct xfp_aead_test_hdr {
	__u8 op;
	__u8 aad_len;
	__u16 off;
	__u16 len;
	__u16 tag_off;
	__u8 key[32];
	__u8 salt[4];
	__u8 iv[8];
	__u8 aad[12];
} __attribute__((packed));

/* Raw Poly1305 of up to 128 bytes (RFC 8439 §2.5.2 vector): byte loads, partial last block
 * terminated with 0x01 and hibit 0, as RFC 8439 §2.5.1 specifies outside the AEAD. */
static __always_inline int xfp_test_poly(struct xdp_md *ctx, __u32 off, __u32 len, __u32 tag_off,
					 const struct xfp_aead_key *k)
{
	struct xfp_crypto_scratch *s = xfp_scratch();
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	const __u64 *kq = (const __u64 *)k->key;
	__u64 lo, hi;
	__u8 *p;

	if (!s || len > 128)
		return -1;
	xfp_poly1305_init(&s->mac, kq[0], kq[1], kq[2], kq[3]);
#pragma unroll
	for (int blk = 0; blk < 8; blk++) {
		__u32 base = blk * 16;

		if (base >= len)
			break;
		lo = 0;
		hi = 0;
		p = data + xfp_bound(off + base);
#pragma unroll
		for (int b = 0; b < 16; b++) {
			__u64 v;

			if (base + b >= len) {
				v = 1; /* 0x01 terminator of a partial block */
			} else {
				if (!xfp_pkt_fits(p + b, 1, end))
					return -1;
				v = p[b];
			}
			if (base + b > len)
				v = 0; /* zero padding after the terminator */
			if (b < 8)
				lo |= v << (b * 8);
			else
				hi |= v << ((b - 8) * 8);
		}
		xfp_poly1305_block(&s->mac, lo, hi, len - base >= 16 ? 1 : 0);
	}
	xfp_poly1305_finish(&s->mac, &lo, &hi);
	p = data + xfp_bound(tag_off);
	if (!xfp_pkt_fits(p, 16, end))
		return -1;
	XFP_ST64(p, lo);
	XFP_ST64(p + 8, hi);
	return 0;
}

int xfp_aead_test(struct xdp_md *ctx)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	struct xfp_aead_test_hdr *h = (struct xfp_aead_test_hdr *)data;
	struct xfp_aead_key k __attribute__((aligned(8)));
	__u64 out[8], *kq;
	__u32 off, len, tag_off, aad_len;
	int op, rc;

	if ((__u8 *)(h + 1) > end)
		return XDP_ABORTED;
	op = h->op;
	aad_len = h->aad_len;
	off = h->off;
	len = h->len;
	tag_off = h->tag_off;
	/* quadword copies: memcpy from the packed header would go byte by byte */
	kq = (__u64 *)k.key;
	kq[0] = XFP_LD64(h->key);
	kq[1] = XFP_LD64(h->key + 8);
	kq[2] = XFP_LD64(h->key + 16);
	kq[3] = XFP_LD64(h->key + 24);
	*(__u32 *)k.salt = *(__u32 *)h->salt;

	switch (op) {
	case XFP_T_SEAL:
		rc = xfp_aead_seal(ctx, off, len, tag_off, &k, h->iv, h->aad, aad_len);
		break;
	case XFP_T_VERIFY:
		rc = xfp_aead_verify(ctx, off, len, tag_off, &k, h->iv, h->aad, aad_len);
		break;
	case XFP_T_DECRYPT:
		rc = xfp_aead_decrypt(ctx, off, len, &k, h->iv);
		break;
	case XFP_T_OPEN:
	case XFP_T_OPEN_COST:
		/* one copy of the open path for both ops keeps the verifier's walk short */
		rc = xfp_aead_verify(ctx, off, len, tag_off, &k, h->iv, h->aad, aad_len);
		if (rc && op == XFP_T_OPEN)
			break;
		/* re-read: the verifier forgets packet bounds across the call chain */
		data = (__u8 *)(long)ctx->data;
		end = (__u8 *)(long)ctx->data_end;
		h = (struct xfp_aead_test_hdr *)data;
		if ((__u8 *)(h + 1) > end)
			return XDP_ABORTED;
		rc |= xfp_aead_decrypt(ctx, off, len, &k, h->iv);
		break;
	case XFP_T_PEEK: {
		__u8 *p;

		rc = xfp_aead_peek(ctx, off, len, &k, h->iv, (__u8 *)out);
		if (rc)
			break;
		p = (__u8 *)(long)ctx->data + xfp_bound(tag_off);
		if (p + 64 > (__u8 *)(long)ctx->data_end)
			return XDP_ABORTED;
#pragma unroll
		for (int j = 0; j < 8; j++)
			XFP_ST64(p + j * 8, out[j]);
		break;
	}
	case XFP_T_NOP:
		rc = 0;
		break;
	case XFP_T_POLY:
		rc = xfp_test_poly(ctx, off, len, tag_off, &k);
		break;
	default:
		return XDP_ABORTED;
	}
	return rc ? XDP_DROP : XDP_TX;
}
