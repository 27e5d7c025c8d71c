/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * ChaCha20-Poly1305 for ESP (RFC 7634 over RFC 8439 §2.8), in place on XDP packet bytes.
 *
 * API (all return 0 on success, -1 on failure):
 *
 *   xfp_aead_seal(ctx, off, len, tag_off, k, iv, aad, aad_len)
 *       ChaCha20-encrypt [off, off+len) in place (block counter from 1), then write the
 *       16-byte Poly1305 tag over aad || pad16 || ciphertext || pad16 || le64(aad_len) ||
 *       le64(len) at [tag_off, tag_off+16). -1 when a bound fails (the payload may then be
 *       partly encrypted: drop the packet).
 *   xfp_aead_verify(ctx, off, len, tag_off, k, iv, aad, aad_len)
 *       Recompute the tag over aad and the ciphertext in the packet and compare it with the
 *       16 bytes at tag_off, without branching on secret data until the final verdict.
 *       Writes nothing to the packet. 0 = authentic.
 *   xfp_aead_peek(ctx, off, len, k, iv, out)
 *       Decrypt the first min(len, 64) bytes at off into out[64] (the rest of out is zeroed);
 *       the packet is untouched. ChaCha20 is a stream cipher, so this costs one block.
 *   xfp_aead_decrypt(ctx, off, len, k, iv)
 *       Decrypt [off, off+len) in place. Call only after xfp_aead_verify returned 0.
 *   xfp_aead_decrypt_peeked(ctx)
 *       xfp_aead_decrypt of what the xfp_aead_peek just before it was given (no other AEAD
 *       call in between): its keystream block 1 is reused, one ChaCha20 block saved.
 *
 * Arguments:
 *   ctx      the XDP context; packet pointers the caller holds are still valid afterwards
 *            (no helper that moves packet data is called), but re-read them anyway.
 *   off,len  payload position in bytes from ctx->data; need off + len <= XFP_MAX_FRAME and
 *            tag_off + 16 <= XFP_MAX_FRAME. Each access is re-checked against data_end.
 *   k        struct xfp_aead_key: key and salt as in the kernel's rfc7539esp template
 *            (crypto/chacha20poly1305.c: the last 4 key bytes are the salt). Must be 4-byte
 *            aligned (map values are 8-byte aligned; the struct carries aligned(4)).
 *   iv       the 8-byte ESP IV (RFC 7634 §2: nonce = salt || IV). Packet pointer (already
 *            bounds-checked by the caller) or 4-byte aligned memory.
 *   aad      8 bytes (SPI || seq) or 12 bytes (SPI || seq_hi || seq_lo, ESN), as RFC 7634 §2.1
 *            builds it, in wire order. Packet pointer or any readable memory. aad_len 8 or 12.
 *   out      64 bytes, 8-byte aligned (BPF stack accesses must be aligned).
 *
 * Scratch state lives in the per-CPU array xfp_crypto_scratch (one entry), declared in maps.h
 * (section XFP_MAPS_AEAD): the ChaCha state and keystream (~130 B) do not belong on a 512 B
 * stack. The including .c file must define xfp_scratch() (4 lines, see below): BCC only
 * rewrites map calls there.
 *
 * Build knobs: -DXFP_MAX_FRAME=N (default 1600) bounds every offset; -DXFP_NATIVE compiles the
 * same code for the host (bench/native_aead.c) with a struct xdp_md of real pointers.
 *
 * Verifier cost at XFP_MAX_FRAME=1600 (BCC 0.26, Linux 6.18, verified_insns): seal ~133k,
 * verify ~33k, decrypt ~98k, peek ~6k; it grows linearly with XFP_MAX_FRAME (one walk per
 * 64-byte block: ~3.6k instructions of ChaCha20 each), so 9000-byte frames cost ~5.6x.
 *
 * Where the time goes (bench/aead_bench.py: seal and open 1.6-1.8x the same C built natively
 * at 64..1400 B on this shared host): ~80% is the ChaCha20 block (~230 ns/64 B against ~130), ~17%
 * Poly1305 (~12 ns/16 B against ~7), the rest setup, the poly key block and the tag. ChaCha20
 * in BPF ISA v1 pays a 3-cycle, 5-instruction rotate (no `rol`, no 32-bit ALU from BCC's
 * clang) on each of its serial add-xor-rotate steps, and 10 registers for 16 state words;
 * see aead/chacha20.h for what was tried. Packet words are moved 8 bytes at a time.
 */
#ifndef XFP_AEAD_H
#define XFP_AEAD_H

#include "aead/chacha20.h"
#include "aead/poly1305.h"

#ifndef XFP_MAX_FRAME
#define XFP_MAX_FRAME 1600
#endif

/* Offsets are masked with the next power of two minus one: a constant bound the verifier
 * can track through pointer arithmetic. */
#if XFP_MAX_FRAME <= 2048
#define XFP_OFF_MASK 0x7ffULL
#elif XFP_MAX_FRAME <= 4096
#define XFP_OFF_MASK 0xfffULL
#elif XFP_MAX_FRAME <= 8192
#define XFP_OFF_MASK 0x1fffULL
#elif XFP_MAX_FRAME <= 16384
#define XFP_OFF_MASK 0x3fffULL
#else
#error "XFP_MAX_FRAME above 16384 is not supported"
#endif

#define XFP_MAX_BLOCKS ((XFP_MAX_FRAME + 63) / 64)

/* 32-byte ChaCha20 key + 4-byte salt: the layout of the kernel's rfc7539esp key blob. */
struct xfp_aead_key {
	__u8 key[32];
	__u8 salt[4];
} __attribute__((aligned(4)));

/* Per-CPU working state of one AEAD operation. */
struct xfp_crypto_scratch {
	__u32 in[16];		   /* ChaCha20 input state (RFC 8439 §2.3) */
	union xfp_chacha_block ks; /* current keystream block */
	struct xfp_poly1305 mac;   /* Poly1305 state */
	__u64 aad_lo, aad_hi;	   /* aad zero-padded to one 16-byte block */
	__u64 off, len, tag_off;   /* operation bounds, reloaded to keep verifier states small */
	__u64 aad_len, pos;	   /* aad length; where the full-block loop stopped */
};

#ifdef XFP_NATIVE
/* Host build: the same code walks a buffer through a context of real pointers. */
struct xdp_md {
	__u8 *data;
	__u8 *data_end;
};
static struct xfp_crypto_scratch xfp_native_scratch;
static __always_inline struct xfp_crypto_scratch *xfp_scratch(void)
{
	return &xfp_native_scratch;
}
#else
/*
 * BCC 0.26 rewrites map calls (`.lookup`) only in the main source file, never in an included
 * header, so each program that includes this header defines the accessor itself, verbatim:
 *
 *   static __always_inline struct xfp_crypto_scratch *xfp_scratch(void)
 *   {
 *           __u32 zero = 0;
 *
 *           return xfp_crypto_scratch.lookup(&zero);
 *   }
 */
static __always_inline struct xfp_crypto_scratch *xfp_scratch(void);
#endif

/* The context whose data/data_end the functions walk: XDP by default; a TC program defines
 * XFP_CTX_SKB before including this header (struct __sk_buff carries data/data_end too, valid
 * after bpf_skb_pull_data()). */
#if defined(XFP_CTX_SKB) && !defined(XFP_NATIVE)
typedef struct __sk_buff xfp_ctx_t;
#else
typedef struct xdp_md xfp_ctx_t;
#endif

/* Hide a value from clang so that it cannot fold the mask that follows into a range check
 * the verifier does not understand. */
#define XFP_OPAQUE(v) asm volatile("" : "+r"(v))

/*
 * True when [q, q + n) lies inside the packet. The end pointer q + n is made opaque so that
 * clang emits exactly "lim = q + n; if lim > end", the shape the verifier learns a range
 * from (clang otherwise turns some of these into end - q or end + 1 forms it rejects).
 */
static __always_inline int xfp_pkt_fits(const __u8 *q, __u64 n, const __u8 *end)
{
	const __u8 *lim = q + n;

	XFP_OPAQUE(lim);
	return lim <= end;
}

static __always_inline __u64 xfp_bound(__u64 v)
{
	XFP_OPAQUE(v);
	return v & XFP_OFF_MASK;
}

/*
 * Little-endian 64-bit packet load/store at any byte offset. BPF: a plain 8-byte access; the
 * verifier allows unaligned packet access where the arch has efficient unaligned access (x86,
 * arm64: no BPF_F_STRICT_ALIGNMENT), and an aligned(1) type would make clang split it into 8
 * byte loads plus 14 shifts/ors (it assumes BPF cannot load unaligned). Native: aligned(1).
 */
#ifdef XFP_NATIVE
typedef __u64 __attribute__((may_alias, aligned(1))) xfp_u64u;
#else
typedef __u64 __attribute__((may_alias)) xfp_u64u;
#endif
#define XFP_LD64(p) (*(const xfp_u64u *)(p))
#define XFP_ST64(p, v) (*(xfp_u64u *)(p) = (v))

/* Bytes [0, n) of a quadword, n in 1..8. */
static __always_inline __u64 xfp_lowmask(__u64 n)
{
	return n >= 8 ? ~0ULL : (1ULL << (n * 8)) - 1;
}

/*
 * Load the state for one operation: key, nonce = salt || iv (RFC 7634 §2), bounds.
 * Returns the scratch entry, or NULL when a bound fails.
 */
static __always_inline struct xfp_crypto_scratch *
xfp_aead_begin(__u32 off, __u32 len, __u32 tag_off, const struct xfp_aead_key *k, const __u8 *iv)
{
	struct xfp_crypto_scratch *s;
	const __u32 *kw = (const __u32 *)k->key;

	if ((__u64)off + len > XFP_MAX_FRAME || (__u64)tag_off + 16 > XFP_MAX_FRAME)
		return 0;
	s = xfp_scratch();
	if (!s)
		return 0;
	xfp_chacha20_setup(s->in, kw, *(const __u32 *)k->salt, *(const __u32 *)iv,
			   *(const __u32 *)(iv + 4));
	s->off = off;
	s->len = len;
	s->tag_off = tag_off;
	return s;
}

/* ChaCha20 (counter from 1, RFC 8439 §2.4) XORed in place over [s->off, s->off + s->len).
 * ks_ready (a constant): s->ks already holds block 1 (xfp_aead_peek() made it), so the loop
 * starts with it instead of computing it again. */
static __always_inline int xfp_chacha20_xor_pkt(xfp_ctx_t *ctx, struct xfp_crypto_scratch *s,
						int ks_ready)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u64 len = xfp_bound(s->len);
	__u64 off = s->off;
	__u32 i;

#pragma clang loop unroll(disable)
	for (i = 0; i < XFP_MAX_BLOCKS; i++) {
		__u64 pos = (__u64)i * 64;
		__u64 rem;
		__u8 *p;

		if (pos >= len)
			break;
		if (i > 0 || !ks_ready) {
			s->in[12] = i + 1;
			xfp_chacha20_block(&s->ks, s->in);
		}
		p = data + xfp_bound(off + pos);
		rem = len - pos;
		if (rem >= 64) {
			if (!xfp_pkt_fits(p, 64, end))
				return -1;
			XFP_ST64(p, XFP_LD64(p) ^ s->ks.q[0]);
			XFP_ST64(p + 8, XFP_LD64(p + 8) ^ s->ks.q[1]);
			XFP_ST64(p + 16, XFP_LD64(p + 16) ^ s->ks.q[2]);
			XFP_ST64(p + 24, XFP_LD64(p + 24) ^ s->ks.q[3]);
			XFP_ST64(p + 32, XFP_LD64(p + 32) ^ s->ks.q[4]);
			XFP_ST64(p + 40, XFP_LD64(p + 40) ^ s->ks.q[5]);
			XFP_ST64(p + 48, XFP_LD64(p + 48) ^ s->ks.q[6]);
			XFP_ST64(p + 56, XFP_LD64(p + 56) ^ s->ks.q[7]);
			continue;
		}
		/* Last, partial block: quadwords with a byte mask while 8 bytes fit before
		 * data_end (bytes outside the mask are rewritten unchanged), else bytes. */
#pragma unroll
		for (int j = 0; j < 8; j++) {
			/* each q re-derived through the mask: else clang rewrites the bound
			 * checks as pointer differences (~p + end), which the verifier rejects */
			__u8 *q = data + xfp_bound(off + pos + j * 8);

			if ((__u64)j * 8 >= rem)
				break;
			if (xfp_pkt_fits(q, 8, end)) {
				__u64 m = xfp_lowmask(rem - j * 8);

				XFP_ST64(q, XFP_LD64(q) ^ (s->ks.q[j] & m));
				continue;
			}
#pragma unroll
			for (int b = 0; b < 8; b++) {
				/* no break: an early exit lets clang drop the constant trip
				 * count, and the verifier then cannot bound the loop */
				if ((__u64)(j * 8 + b) < rem) {
					if (!xfp_pkt_fits(q + b, 1, end))
						return -1;
					q[b] ^= s->ks.b[j * 8 + b];
				}
			}
		}
		break;
	}
	return 0;
}

/*
 * RFC 8439 §2.8: Poly1305 over aad || pad16 || ciphertext [s->off, +s->len) || pad16 ||
 * le64(aad_len) || le64(len), keyed with the first 32 bytes of ChaCha20 block 0.
 * Every block is a padded 16-byte block, so hibit is always 1.
 */
static __always_inline int xfp_aead_mac(xfp_ctx_t *ctx, struct xfp_crypto_scratch *s, __u64 *tag_lo,
					__u64 *tag_hi)
{
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u64 len = xfp_bound(s->len);
	__u64 off = s->off;
	__u64 pos, rem;
	__u8 *p;
	__u32 i;

	s->in[12] = 0;
	xfp_chacha20_block(&s->ks, s->in);
	xfp_poly1305_init(&s->mac, s->ks.q[0], s->ks.q[1], s->ks.q[2], s->ks.q[3]);
	xfp_poly1305_block(&s->mac, s->aad_lo, s->aad_hi, 1);

	s->pos = 0;
#pragma clang loop unroll(disable)
	for (i = 0; i < XFP_MAX_BLOCKS; i++) {
		pos = (__u64)i * 64;
		if (pos + 64 > len)
			break;
		p = data + xfp_bound(off + pos);
		if (!xfp_pkt_fits(p, 64, end))
			return -1;
		xfp_poly1305_block(&s->mac, XFP_LD64(p), XFP_LD64(p + 8), 1);
		xfp_poly1305_block(&s->mac, XFP_LD64(p + 16), XFP_LD64(p + 24), 1);
		xfp_poly1305_block(&s->mac, XFP_LD64(p + 32), XFP_LD64(p + 40), 1);
		xfp_poly1305_block(&s->mac, XFP_LD64(p + 48), XFP_LD64(p + 56), 1);
		s->pos = pos + 64;
	}

	/* Tail of 0..63 bytes, verified once: pos and len come back from the map as unknowns. */
	pos = xfp_bound(s->pos);
	len = xfp_bound(s->len);
	if (pos > len)
		return -1;
	rem = (len - pos) & 63;
	off = s->off;
#pragma unroll
	for (int j = 0; j < 4; j++) {
		__u8 *q = data + xfp_bound(off + pos + j * 16);
		__u64 lo = 0, hi = 0;

		if ((__u64)j * 16 >= rem)
			break;
		if (xfp_pkt_fits(q, 16, end)) {
			__u64 n = rem - j * 16;

			lo = XFP_LD64(q);
			hi = XFP_LD64(q + 8);
			if (n < 16) {
				/* RFC 8439 §2.8 pads the last block with zeros */
				lo &= xfp_lowmask(n);
				hi &= n > 8 ? xfp_lowmask(n - 8) : 0;
			}
		} else {
#pragma unroll
			for (int b = 0; b < 16; b++) {
				if ((__u64)(j * 16 + b) >= rem)
					continue;
				if (!xfp_pkt_fits(q + b, 1, end))
					return -1;
				if (b < 8)
					lo |= (__u64)q[b] << (b * 8);
				else
					hi |= (__u64)q[b] << ((b - 8) * 8);
			}
		}
		xfp_poly1305_block(&s->mac, lo, hi, 1);
	}

	xfp_poly1305_block(&s->mac, s->aad_len, xfp_bound(s->len), 1);
	xfp_poly1305_finish(&s->mac, tag_lo, tag_hi);
	return 0;
}

/* aad (8 or 12 bytes, any memory) zero-padded into one block. */
static __always_inline int xfp_aead_set_aad(struct xfp_crypto_scratch *s, const __u8 *aad,
					    __u32 aad_len)
{
	__u64 lo = 0, hi = 0;

	if (aad_len != 8 && aad_len != 12)
		return -1;
	for (int b = 0; b < 8; b++)
		lo |= (__u64)aad[b] << (b * 8);
	if (aad_len == 12) {
		for (int b = 0; b < 4; b++)
			hi |= (__u64)aad[8 + b] << (b * 8);
	}
	s->aad_lo = lo;
	s->aad_hi = hi;
	s->aad_len = aad_len;
	return 0;
}

static __always_inline int xfp_aead_seal(xfp_ctx_t *ctx, __u32 off, __u32 len, __u32 tag_off,
					 const struct xfp_aead_key *k, const __u8 iv[8],
					 const __u8 *aad, __u32 aad_len)
{
	struct xfp_crypto_scratch *s = xfp_aead_begin(off, len, tag_off, k, iv);
	__u64 lo, hi;
	__u8 *p;

	if (!s || xfp_aead_set_aad(s, aad, aad_len))
		return -1;
	if (xfp_chacha20_xor_pkt(ctx, s, 0))
		return -1;
	if (xfp_aead_mac(ctx, s, &lo, &hi))
		return -1;
	p = (__u8 *)(long)ctx->data + xfp_bound(s->tag_off);
	if (p + 16 > (__u8 *)(long)ctx->data_end)
		return -1;
	XFP_ST64(p, lo);
	XFP_ST64(p + 8, hi);
	return 0;
}

static __always_inline int xfp_aead_verify(xfp_ctx_t *ctx, __u32 off, __u32 len, __u32 tag_off,
					   const struct xfp_aead_key *k, const __u8 iv[8],
					   const __u8 *aad, __u32 aad_len)
{
	struct xfp_crypto_scratch *s = xfp_aead_begin(off, len, tag_off, k, iv);
	__u64 lo, hi, diff;
	__u8 *p;

	if (!s || xfp_aead_set_aad(s, aad, aad_len))
		return -1;
	if (xfp_aead_mac(ctx, s, &lo, &hi))
		return -1;
	p = (__u8 *)(long)ctx->data + xfp_bound(s->tag_off);
	if (p + 16 > (__u8 *)(long)ctx->data_end)
		return -1;
	/* One branch on the OR of all differences: no early exit on the first wrong byte. */
	diff = (XFP_LD64(p) ^ lo) | (XFP_LD64(p + 8) ^ hi);
	return diff ? -1 : 0;
}

static __always_inline int xfp_aead_decrypt(xfp_ctx_t *ctx, __u32 off, __u32 len,
					    const struct xfp_aead_key *k, const __u8 iv[8])
{
	struct xfp_crypto_scratch *s = xfp_aead_begin(off, len, 0, k, iv);

	if (!s)
		return -1;
	return xfp_chacha20_xor_pkt(ctx, s, 0);
}

/* xfp_aead_decrypt() of the span, key and IV the xfp_aead_peek() just before it was given, with
 * no other AEAD operation of this CPU in between: the peek's block 1, still in the per-CPU
 * scratch (s->in, s->ks, s->off, s->len), is used again rather than computed twice. */
static __always_inline int xfp_aead_decrypt_peeked(xfp_ctx_t *ctx)
{
	struct xfp_crypto_scratch *s = xfp_scratch();

	if (!s)
		return -1;
	return xfp_chacha20_xor_pkt(ctx, s, 1);
}

static __always_inline int xfp_aead_peek(xfp_ctx_t *ctx, __u32 off, __u32 len,
					 const struct xfp_aead_key *k, const __u8 iv[8],
					 __u8 out[64])
{
	struct xfp_crypto_scratch *s = xfp_aead_begin(off, len, 0, k, iv);
	__u8 *data = (__u8 *)(long)ctx->data;
	__u8 *end = (__u8 *)(long)ctx->data_end;
	__u64 n, base, *o = (__u64 *)out;

	if (!s)
		return -1;
	n = xfp_bound(s->len);
	if (n > 64)
		n = 64;
	s->in[12] = 1;
	xfp_chacha20_block(&s->ks, s->in);
	base = s->off;
#pragma unroll
	for (int j = 0; j < 8; j++) {
		__u8 *q = data + xfp_bound(base + j * 8);
		__u64 v = 0;

		if ((__u64)j * 8 < n) {
			if (xfp_pkt_fits(q, 8, end)) {
				v = (XFP_LD64(q) ^ s->ks.q[j]) & xfp_lowmask(n - j * 8);
			} else {
#pragma unroll
				for (int b = 0; b < 8; b++) {
					if ((__u64)(j * 8 + b) >= n)
						continue;
					if (!xfp_pkt_fits(q + b, 1, end))
						return -1;
					v |= (__u64)(q[b] ^ s->ks.b[j * 8 + b]) << (b * 8);
				}
			}
		}
		o[j] = v;
	}
	return 0;
}

#endif /* XFP_AEAD_H */
