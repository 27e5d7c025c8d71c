/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * ChaCha20 block function, RFC 8439 §2.3 (state layout) and §2.1 (quarter round).
 *
 * Portable C: compiled by BCC for BPF and by gcc for the native benchmark
 * (bench/native_aead.c), so both run the very same algorithm. No BPF helpers here.
 *
 * BPF note: BCC 0.26 emits BPF ISA v1 (no 32-bit ALU), so every 32-bit rotate is
 * mov/shl/shr/and/or (xfp_chacha_word below) where x86 has one `rol`, and the 16 state words meet
 * 10 BPF registers (~70 spill loads/stores per double round). Tried and measured slower here
 * (bench/aead_bench.py, A/B on 1400 B): a 5-insn mask-free rotate in inline asm (-5%), and quarter
 * rounds in pairs as inline asm, which cut the double round from ~360 to ~285 instructions and the
 * spills to ~50, yet ran 8% slower (two quarter rounds in flight instead of clang's four: the
 * add-xor-rotate chain, with its 3-cycle rotate, then bounds the block); and two blocks interleaved
 * (32 words in flight), 9% slower (spills); the rotate's left shift as a multiply (to spare the two
 * shift ports), 6% slower. Unrolling the double-round loop by 2 gained nothing measurable. What ISA
 * v1 itself costs: this file's block function, compiled from BCC's IR with llc -mcpu=v3 (alu32:
 * 32-bit ops that zero-extend, so a rotate is mov/lsh32/rsh32/or) and loaded with bpftool, ran 225
 * ns/block against 265 for -mcpu=v1 in the same A/B run (native gcc: ~130-145). BCC 0.26 offers no
 * way to pick v3 (its BPF target machine ignores cflags and function target attributes), so the
 * ~16% stays on the table until BCC or the loader changes.
 */
#ifndef XFP_CHACHA20_H
#define XFP_CHACHA20_H

#ifdef XFP_NATIVE
#include <stdint.h>
typedef uint8_t __u8;
typedef uint32_t __u32;
typedef uint64_t __u64;
#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
/* Words are loaded from packets and keys with plain loads: RFC 8439 is little-endian. */
#error "xfrm-fastpath crypto assumes a little-endian target"
#endif

/* RFC 8439 §2.3: "expand 32-byte k" */
#define XFP_CHACHA_C0 0x61707865U
#define XFP_CHACHA_C1 0x3320646eU
#define XFP_CHACHA_C2 0x79622d32U
#define XFP_CHACHA_C3 0x6b206574U

/*
 * A state word while the rounds run. Native: a __u32 (gcc emits one `rol` per rotate).
 * BPF ISA v1 has only 64-bit ALU ops, so a __u32 rotate becomes mov, shl, ld_imm64 of the
 * zero-extension mask (0xffff0000 and the like do not fit a sign-extended imm32), and, shr,
 * or: 6 instructions and a register for the mask. Held in a __u64 whose bits above 31 are
 * don't-care instead: adds and xors leave bits 0..31 exact (carries only move up), the left
 * shift only moves bits up, and the right shift's result is masked to its n valid bits with
 * a small immediate ((1 << n) - 1 fits imm32): mov, shl, shr, and, or, no mask register.
 * Only the final "+ in" (RFC 8439 §2.3.1) truncates to 32 bits. This cut the double round
 * from 364 to 324 BPF instructions (gcc -O2: 107 x86 instructions; stack accesses 69 against
 * 7) but not the wall time (bench/aead_bench.py, within noise): a quarter round is one serial
 * chain of 4 x (add, xor, rotate), the BPF rotate keeps shr, and, or on it where x86 has one
 * `rol`, and a spilled chain word adds a store-to-load round trip; instructions off the chain
 * buy little. alu32 (-mcpu=v3) would shorten the rotate to shr32 (or shl32), then or.
 */
#ifdef XFP_NATIVE
typedef __u32 xfp_chacha_word;
#define XFP_ROTL32(v, n) (((v) << (n)) | ((v) >> (32 - (n))))
#else
typedef __u64 xfp_chacha_word;
#define XFP_ROTL32(v, n) (((v) << (n)) | (((v) >> (32 - (n))) & ((1ULL << (n)) - 1)))
#endif

/* RFC 8439 §2.1 quarter round on four state words (plain statements, no control flow). */
#define XFP_CHACHA_QR(a, b, c, d)                                                                  \
	do {                                                                                       \
		a += b;                                                                            \
		d ^= a;                                                                            \
		d = XFP_ROTL32(d, 16);                                                             \
		c += d;                                                                            \
		b ^= c;                                                                            \
		b = XFP_ROTL32(b, 12);                                                             \
		a += b;                                                                            \
		d ^= a;                                                                            \
		d = XFP_ROTL32(d, 8);                                                              \
		c += d;                                                                            \
		b ^= c;                                                                            \
		b = XFP_ROTL32(b, 7);                                                              \
	} while (0)

/* Keystream as words (computed), quadwords (XORed into packets) or bytes (tails). */
union xfp_chacha_block {
	__u32 w[16];
	__u64 q[8];
	__u8 b[64];
};

/*
 * RFC 8439 §2.3.1: out = in + 20 rounds(in). `in` is the 16-word input state
 * (constants, key, block counter in[12], nonce in[13..15]).
 */
static __always_inline void xfp_chacha20_block(union xfp_chacha_block *out, const __u32 *in)
{
	xfp_chacha_word x0 = in[0], x1 = in[1], x2 = in[2], x3 = in[3];
	xfp_chacha_word x4 = in[4], x5 = in[5], x6 = in[6], x7 = in[7];
	xfp_chacha_word x8 = in[8], x9 = in[9], x10 = in[10], x11 = in[11];
	xfp_chacha_word x12 = in[12], x13 = in[13], x14 = in[14], x15 = in[15];

	/* 10 double rounds: a column round then a diagonal round (RFC 8439 §2.3). Kept as a
	 * loop: unrolled, each inlined block is ~2.5k BPF instructions and a program with a few
	 * call sites overflows the 16-bit jump offsets; the loop branch costs ~1%. */
#pragma clang loop unroll(disable)
	for (int i = 0; i < 10; i++) {
		XFP_CHACHA_QR(x0, x4, x8, x12);
		XFP_CHACHA_QR(x1, x5, x9, x13);
		XFP_CHACHA_QR(x2, x6, x10, x14);
		XFP_CHACHA_QR(x3, x7, x11, x15);
		XFP_CHACHA_QR(x0, x5, x10, x15);
		XFP_CHACHA_QR(x1, x6, x11, x12);
		XFP_CHACHA_QR(x2, x7, x8, x13);
		XFP_CHACHA_QR(x3, x4, x9, x14);
	}
	out->w[0] = (__u32)(x0 + in[0]);
	out->w[1] = (__u32)(x1 + in[1]);
	out->w[2] = (__u32)(x2 + in[2]);
	out->w[3] = (__u32)(x3 + in[3]);
	out->w[4] = (__u32)(x4 + in[4]);
	out->w[5] = (__u32)(x5 + in[5]);
	out->w[6] = (__u32)(x6 + in[6]);
	out->w[7] = (__u32)(x7 + in[7]);
	out->w[8] = (__u32)(x8 + in[8]);
	out->w[9] = (__u32)(x9 + in[9]);
	out->w[10] = (__u32)(x10 + in[10]);
	out->w[11] = (__u32)(x11 + in[11]);
	out->w[12] = (__u32)(x12 + in[12]);
	out->w[13] = (__u32)(x13 + in[13]);
	out->w[14] = (__u32)(x14 + in[14]);
	out->w[15] = (__u32)(x15 + in[15]);
}

/*
 * RFC 8439 §2.3 input state for a 256-bit key (8 LE words) and a 96-bit nonce (3 LE words);
 * the block counter in[12] is set per block by the caller.
 */
static __always_inline void xfp_chacha20_setup(__u32 *in, const __u32 key[8], __u32 n0, __u32 n1,
					       __u32 n2)
{
	in[0] = XFP_CHACHA_C0;
	in[1] = XFP_CHACHA_C1;
	in[2] = XFP_CHACHA_C2;
	in[3] = XFP_CHACHA_C3;
	in[4] = key[0];
	in[5] = key[1];
	in[6] = key[2];
	in[7] = key[3];
	in[8] = key[4];
	in[9] = key[5];
	in[10] = key[6];
	in[11] = key[7];
	in[12] = 0;
	in[13] = n0;
	in[14] = n1;
	in[15] = n2;
}

#endif /* XFP_CHACHA20_H */
