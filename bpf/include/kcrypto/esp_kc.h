/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The kernel crypto backend at the datapath's AEAD call sites (issue 17). An SA entry with
 * XFP_SA_F_KCRYPTO (bpf/include/xfp_defs.h) is sealed or opened by the xfp_crypto module's
 * context kc_id (bpf/include/kcrypto/kcrypto.h) instead of the BPF AEAD; its key fields are
 * zero. Only programs built with -DXFP_KCRYPTO call the kfuncs (and must be loaded through
 * controller/datapath/kfunc.py). In the default build the kfunc branches compile away and an
 * SA carrying the flag is punted (XFP_KC_UNSERVED_*) rather than run with a zero key.
 *
 * In the -DXFP_KCRYPTO build:
 *   decap opens every inbound SA with the kernel: the BPF AEAD does not fit beside the kfunc
 *     path in xdp_decap's 512-byte stack, so an inbound SA without the flag is punted;
 *   encap and the resequencer (bpf/tc_reseq.c) choose per SA: a flagged SA by the kfuncs, any
 *     other by the BPF AEAD (both fit in their programs).
 *
 * The ESP header starts right behind the outer IPv4 header in both programs, so esp_off is
 * XFP_ETH_LEN + XFP_IP_LEN; seq_hi is the high half of the 64-bit sequence number (used only by
 * contexts made with XFP_KC_F_ESN, RFC 4303 section 2.2.1).
 */
#ifndef XFP_ESP_KC_H
#define XFP_ESP_KC_H

#include "kcrypto_defs.h"

#define XFP_KC_ESP_OFF (XFP_ETH_LEN + XFP_IP_LEN)

#ifdef XFP_KCRYPTO
#include "kcrypto.h"
#define XFP_KC_IN(sa) 1
#define XFP_KC_UNSERVED_IN(sa) (!((sa)->flags & XFP_SA_F_KCRYPTO))
#define XFP_KC_OUT(sa) ((sa)->flags & XFP_SA_F_KCRYPTO)
#define XFP_KC_UNSERVED_OUT(sa) 0
#else
#define XFP_KC_IN(sa) 0
#define XFP_KC_UNSERVED_IN(sa) ((sa)->flags & XFP_SA_F_KCRYPTO)
#define XFP_KC_OUT(sa) 0
#define XFP_KC_UNSERVED_OUT(sa) ((sa)->flags & XFP_SA_F_KCRYPTO)
/* Never called (XFP_KC_IN/OUT are 0): they let the call sites compile without #ifdef. */
static __always_inline int xfp_kc_xdp_seal(struct xdp_md *ctx, __u32 id, __u32 esp_off, __u32 len,
					   __u32 seq_hi)
{
	return XFP_KCR_NO_CTX;
}
static __always_inline int xfp_kc_xdp_open(struct xdp_md *ctx, __u32 id, __u32 esp_off, __u32 len,
					   __u32 seq_hi)
{
	return XFP_KCR_NO_CTX;
}
static __always_inline int xfp_kc_skb_seal(struct __sk_buff *ctx, __u32 id, __u32 esp_off,
					   __u32 len, __u32 seq_hi)
{
	return XFP_KCR_NO_CTX;
}
static __always_inline int xfp_kc_skb_open(struct __sk_buff *ctx, __u32 id, __u32 esp_off,
					   __u32 len, __u32 seq_hi)
{
	return XFP_KCR_NO_CTX;
}
#endif

#endif /* XFP_ESP_KC_H */
