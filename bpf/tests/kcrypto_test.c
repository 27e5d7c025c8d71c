/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Test harness for the xfp_crypto kfuncs (kmod/xfp_crypto.c), driven by BPF_PROG_TEST_RUN
 * (tests/vm/test_vm_kcrypto.py). Not attached to any interface. Loaded through
 * controller/datapath/kfunc.py, which turns the placeholder calls into kfunc calls.
 *
 * The frame starts with struct xfp_kc_test_hdr saying what to do; esp_off is from the start of
 * the frame. The program calls the kfunc, writes its return code into hdr.ret and returns
 * XDP_TX (TC: TC_ACT_OK); XDP_ABORTED (TC: TC_ACT_SHOT) on a malformed header.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "kcrypto/kcrypto.h"

enum xfp_kc_test_op {
	XFP_KC_T_SEAL = 1,
	XFP_KC_T_OPEN = 2,
};

struct xfp_kc_test_hdr {
	__u32 op; /* enum xfp_kc_test_op */
	__u32 id;
	__u32 esp_off;
	__u32 len;
	__u32 seq_hi;
	__s32 ret; /* out: enum xfp_kc_ret */
	__u8 pad[8];
} __attribute__((packed));

int xfp_kc_test_xdp(struct xdp_md *ctx)
{
	struct xfp_kc_test_hdr *h = (void *)(long)ctx->data;
	int ret;

	if ((void *)(h + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	if (h->op == XFP_KC_T_SEAL)
		ret = xfp_kc_xdp_seal(ctx, h->id, h->esp_off, h->len, h->seq_hi);
	else if (h->op == XFP_KC_T_OPEN)
		ret = xfp_kc_xdp_open(ctx, h->id, h->esp_off, h->len, h->seq_hi);
	else
		return XDP_ABORTED;
	/* The kfunc does not move the packet, but re-read the pointers anyway, as after any call
	 * that writes to it. */
	h = (void *)(long)ctx->data;
	if ((void *)(h + 1) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	h->ret = ret;
	return XDP_TX;
}

int xfp_kc_test_tc(struct __sk_buff *skb)
{
	struct xfp_kc_test_hdr *h = (void *)(long)skb->data;
	int ret;

	if ((void *)(h + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	if (h->op == XFP_KC_T_SEAL)
		ret = xfp_kc_skb_seal(skb, h->id, h->esp_off, h->len, h->seq_hi);
	else if (h->op == XFP_KC_T_OPEN)
		ret = xfp_kc_skb_open(skb, h->id, h->esp_off, h->len, h->seq_hi);
	else
		return TC_ACT_SHOT;
	h = (void *)(long)skb->data;
	if ((void *)(h + 1) > (void *)(long)skb->data_end)
		return TC_ACT_SHOT;
	h->ret = ret;
	return TC_ACT_OK;
}
