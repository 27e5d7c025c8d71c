/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The kfuncs of the xfp_crypto module (kmod/xfp_crypto.c), as a BPF program calls them. Each
 * seals or opens the ESP payload at esp_off in place (layout, return codes and the id of a
 * context: bpf/include/kcrypto_defs.h) and checks esp_off and len against the packet's end
 * itself, so the caller needs no bounds proof for them.
 *
 * BCC cannot emit a kfunc call: these are calls to placeholder helper ids
 * (XFP_KC_CALL_*), which controller/datapath/kfunc.py rewrites into BPF_PSEUDO_KFUNC_CALL
 * instructions before it loads the program itself. Load such a program with
 * kfunc.load_with_kfuncs(), never with BCC's load_func (the verifier refuses the unknown helper).
 *
 * XDP: ctx is the program's own context, unmodified. TC: the bytes up to esp_off + 16 + len + 16
 * must be in the skb's linear part and not shared: call bpf_skb_pull_data(skb, that) first.
 */
#ifndef XFP_KCRYPTO_H
#define XFP_KCRYPTO_H

#include "kcrypto_defs.h"

/* seq_hi: the high 32 bits of the 64-bit sequence number, used when the context has
 * XFP_KC_F_ESN (RFC 4303 section 2.2.1); ignored otherwise. Returns enum xfp_kc_ret. */
static int (*xfp_kc_xdp_seal)(struct xdp_md *ctx, __u32 id, __u32 esp_off, __u32 len,
			      __u32 seq_hi) = (void *)XFP_KC_CALL_XDP_SEAL;
static int (*xfp_kc_xdp_open)(struct xdp_md *ctx, __u32 id, __u32 esp_off, __u32 len,
			      __u32 seq_hi) = (void *)XFP_KC_CALL_XDP_OPEN;
static int (*xfp_kc_skb_seal)(struct __sk_buff *ctx, __u32 id, __u32 esp_off, __u32 len,
			      __u32 seq_hi) = (void *)XFP_KC_CALL_SKB_SEAL;
static int (*xfp_kc_skb_open)(struct __sk_buff *ctx, __u32 id, __u32 esp_off, __u32 len,
			      __u32 seq_hi) = (void *)XFP_KC_CALL_SKB_OPEN;

#endif /* XFP_KCRYPTO_H */
