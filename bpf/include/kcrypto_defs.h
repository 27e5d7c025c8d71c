/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Definitions shared by the kernel crypto module (kmod/xfp_crypto.c), the BPF programs that call
 * its kfuncs (bpf/include/kcrypto/kcrypto.h) and controller/datapath/kcrypto_abi.py (ctypes
 * mirror; tests/bpf/test_abi.py checks that sizes, offsets and values agree).
 *
 * The kfuncs seal and open one ESP payload in place (RFC 4303 section 2). The packet holds, from
 * esp_off: SPI (4) || sequence number (4) || IV (8) || payload (len bytes: the ciphertext, which
 * includes padding, pad length and next header) || ICV (16). The AAD is SPI || seq, or
 * SPI || seq_hi || seq_lo with extended sequence numbers (RFC 4303 section 2.2.1; RFC 7634
 * section 2.1; RFC 4106 section 5); the nonce is the 4-byte salt of the key || the IV.
 */
#ifndef KCRYPTO_DEFS_H
#define KCRYPTO_DEFS_H

#if !defined(__bpf__) && !defined(__KERNEL__)
/* User space (the gcc layout check); the kernel and BCC have these types already. */
#include <linux/types.h>
#include <linux/ioctl.h>
#endif

/* Context ids run from 0 to XFP_KC_CTX_MAX - 1; the controller chooses them (one per SA). */
#define XFP_KC_CTX_MAX 4096
/* Bytes of struct xfp_kc_create.key: key || 4-byte salt, as XFRM holds it. */
#define XFP_KC_KEY_MAX 64
/* The ICV every context uses (RFC 7634 section 2 fixes 16; RFC 4106 ICV16 only here). */
#define XFP_KC_ICV_LEN 16
/* Bytes from esp_off to the payload: SPI, sequence number, IV. */
#define XFP_KC_PAYLOAD_OFF 16

/* struct xfp_kc_create.flags */
#define XFP_KC_F_ESN 0x1 /* extended sequence numbers: the AAD carries seq_hi */

/* What a context does (struct xfp_kc_create.alg). */
enum xfp_kc_alg {
	XFP_KCA_CHACHA20_POLY1305 = 1, /* RFC 7634: key 32 + salt 4 */
	XFP_KCA_AES_GCM = 2,	       /* RFC 4106: key 16 or 32 + salt 4 */
};

/* What a kfunc returns. Anything but OK leaves the packet to the caller's policy: NO_SIMD,
 * FRAGS and SHARED say "give this packet to the kernel untouched" (the payload is unchanged),
 * BAD_TAG says "drop" (after a failed open the payload bytes are unspecified: AES-GCM decrypts
 * before it compares). */
enum xfp_kc_ret {
	XFP_KCR_OK = 0,
	XFP_KCR_BAD_TAG = 1, /* open: the ICV does not match */
	XFP_KCR_NO_CTX = 2,  /* no context with that id (never made, or destroyed) */
	XFP_KCR_BOUNDS = 3,  /* esp_off/len reach past the end of the packet */
	XFP_KCR_FRAGS = 4,   /* multi-buffer XDP frame, or the range is in an skb's fragments */
	XFP_KCR_SHARED = 5,  /* TC: the skb's data is shared (cloned); bpf_skb_pull_data() first */
	XFP_KCR_NO_SIMD = 6, /* the FPU is not usable in this context right now */
	XFP_KCR_CRYPTO = 7,  /* the crypto API failed otherwise (should not happen) */
	XFP_KCR_MAX = 8,
};

/* XFP_KC_IOC_CREATE: make context `id`. Errors (errno): EEXIST id in use, ERANGE id too large,
 * EOPNOTSUPP unknown alg, EINVAL key_len wrong for alg or unknown flags, ENODEV no synchronous
 * SIMD implementation of the algorithm in this kernel (AES-GCM without aesni-intel), EPERM
 * without CAP_NET_ADMIN. 80 bytes. */
struct xfp_kc_create {
	__u32 id;
	__u32 alg;     /* enum xfp_kc_alg */
	__u32 flags;   /* XFP_KC_F_* */
	__u32 key_len; /* bytes of key used: key || salt */
	__u8 key[XFP_KC_KEY_MAX];
};

/* ioctls of /dev/xfp_crypto. DESTROY takes a __u32 id (ENOENT when there is none); the key is
 * zeroized before it returns. FLUSH destroys every context. */
#define XFP_KC_IOC_CREATE _IOW('X', 1, struct xfp_kc_create)
#define XFP_KC_IOC_DESTROY _IOW('X', 2, __u32)
#define XFP_KC_IOC_FLUSH _IO('X', 3)

/* BCC cannot emit kfunc calls: a program calls these helper ids instead, which no kernel has
 * (helper ids are below 256), and controller/datapath/kfunc.py rewrites each such call into a
 * BPF_PSEUDO_KFUNC_CALL of the kfunc of that name before loading. An unrewritten call fails in
 * the verifier ("invalid func unknown#65537"), never silently. */
#define XFP_KC_CALL_XDP_SEAL 0x10001 /* xfp_kc_xdp_seal */
#define XFP_KC_CALL_XDP_OPEN 0x10002 /* xfp_kc_xdp_open */
#define XFP_KC_CALL_SKB_SEAL 0x10003 /* xfp_kc_skb_seal */
#define XFP_KC_CALL_SKB_OPEN 0x10004 /* xfp_kc_skb_open */

#endif /* KCRYPTO_DEFS_H */
