/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * tc_reseq.c: TC egress on the WAN side. Renumbers the ESP packets the KERNEL builds for an SA
 * the fastpath has taken over, so that the SA has one sequence space with one owner
 * (docs/design.md §3.1, issue 5).
 *
 * Why: once an outbound SA is offloaded, XDP sends most of its packets with numbers from the
 * SA entry's counter, which starts above the kernel's output sequence. The kernel still sends
 * some (the first packet of each new flow, traffic of the gateway itself), numbered from its
 * own lagging x->replay.oseq: the peer would drop them as replays (RFC 4303 section 3.4.3),
 * and their IVs (crypto/seqiv.c: IV = seq XOR a per-SA salt) could repeat ours. Here each such
 * packet takes the next number from the same counter, a fresh IV from it, and is re-encrypted
 * and re-authenticated (RFC 7634: the IV feeds the nonce and the sequence number the AAD).
 *
 * Frames XDP redirects never pass TC egress (they go straight to the driver's ndo_xdp_xmit),
 * so every ESP frame seen here was built by the kernel's esp4_output().
 *
 * Crypto: the BPF ChaCha20-Poly1305 (bpf/include/aead/) with the key in the SA entry; or, built
 * with -DXFP_KCRYPTO (loaded through controller/datapath/kfunc.py), for an SA flagged
 * XFP_SA_F_KCRYPTO, the xfp_crypto module's kfuncs (bpf/include/kcrypto/esp_kc.h): ChaCha20-
 * Poly1305 or AES-GCM, opened with the kernel's number (its ICV checked) and sealed anew. Both
 * fit in one program, so the -DXFP_KCRYPTO build serves SAs of either backend.
 *
 * Input:  eth | IPv4 (no options, not a fragment) | SPI, seq | IV | ciphertext | ICV(16), linear
 *         or not (the segments of a GSO skb carry their payload in page fragments)
 * Output: the same frame, new seq, new IV, new ciphertext and ICV; or TC_ACT_SHOT when the
 *         counter is exhausted, an error left the payload half-processed or the open failed
 *         (no plaintext leaves), or the SA's crypto is not in this build. SAs not in the
 *         map, other traffic: untouched (TC_ACT_OK).
 *
 * The SA's watchdog is NOT checked: after the controller dies, renumbering must go on for as
 * long as the kernel uses the SA (until its hard deadline), or the sequence would go backwards.
 */
#define XFP_CTX_SKB 1
#define XFP_MAPS_DATAPATH
#define XFP_MAPS_RESEQ
#define XFP_MAPS_AEAD
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include "maps.h"
#include "pkt/parsing.h"
#include "esp/esp.h"
#include "aead/aead.h"
#include "kcrypto/esp_kc.h"

/* The map accessors: BCC rewrites map calls in the main file only (maps.h). */
static __always_inline struct xfp_crypto_scratch *xfp_scratch(void)
{
	__u32 zero = 0;

	return xfp_crypto_scratch.lookup(&zero);
}

/* Count one frame under enum xfp_reseq_stat (xfp_defs.h). */
static __always_inline void reseq_count(__u32 what, __u32 len)
{
	xfp_stat_add(xfp_reseq_stats.lookup(&what), len);
}

#define RESEQ_ENC_OFF (XFP_ETH_LEN + XFP_ENCAP_HEAD) /* 50: first encrypted byte */

/* Ethernet, IPv4 without options, and ESP's SPI and sequence number: what decides whether a
 * frame is ours. Read with bpf_skb_load_bytes() into a buffer offset by 2 so that the IPv4
 * header is 4-byte aligned. */
#define RESEQ_HDR_LEN (XFP_ETH_LEN + XFP_IP_LEN + 8)

int tc_reseq(struct __sk_buff *skb)
{
	struct xfp_sa_in_key k = {};
	struct xfp_sa_out *sa;
	struct xfp_esp_hdr *esp;
	struct iphdr *iph;
	__u8 hdr[RESEQ_HDR_LEN + XFP_UDP_LEN + 2] __attribute__((aligned(4)));
	struct xfp_esp_hdr eh;
	__u8 aad[12] __attribute__((aligned(4)));
	__u8 iv[8] __attribute__((aligned(8)));
	__u8 old_iv[8] __attribute__((aligned(8)));
	__u32 *sa_id, len = skb->len, ilen, clen, aad_len, old_hi;
	__u16 frag_off;
	__u32 hoff = 0; /* NAT-T (RFC 3948): the UDP header in front of ESP, 0 or 8 */
	__u64 seq;
	void *data, *data_end;

	if (skb->protocol != xfp_htons(ETH_P_IP) || len < RESEQ_HDR_LEN)
		return TC_ACT_OK;
	/* Not direct packet access: the kernel's frames may hold most of their bytes in page
	 * fragments (the segments of a GSO skb do), where data_end ends the linear part only.
	 * Judged by that part, such a frame would leave with the kernel's own number, far behind
	 * the shared counter, and the peer would count a replay. */
	if (bpf_skb_load_bytes(skb, 0, hdr + 2, RESEQ_HDR_LEN))
		return TC_ACT_OK;
	iph = (struct iphdr *)(hdr + 2 + XFP_ETH_LEN);
	if (*(__u16 *)(hdr + 2 + 12) != xfp_htons(ETH_P_IP) || iph->version != 4 || iph->ihl != 5 ||
	    (iph->protocol != IPPROTO_ESP && iph->protocol != IPPROTO_UDP))
		return TC_ACT_OK;
	/* A later fragment has no ESP header to say its SA: left alone (without its first
	 * fragment, which is judged below, the peer cannot reassemble it). */
	frag_off = iph->frag_off;
	if (frag_off & xfp_htons(XFP_IP_OFFSET))
		return TC_ACT_OK;
	esp = (struct xfp_esp_hdr *)(hdr + 2 + XFP_ETH_LEN + XFP_IP_LEN);
	k.spi = esp->spi;
	if (iph->protocol == IPPROTO_UDP) {
		/* NAT-T: esp_output_udp_encap() put UDP (checksum 0) in front of ESP: the 8 bytes
		 * read so far are its header, the SPI follows. Whether it is ESP at all is decided
		 * by the SA found below (its UDP encapsulation and ports). */
		hoff = XFP_UDP_LEN;
		if (len < RESEQ_HDR_LEN + XFP_UDP_LEN ||
		    bpf_skb_load_bytes(skb, RESEQ_HDR_LEN, hdr + 2 + RESEQ_HDR_LEN, XFP_UDP_LEN))
			return TC_ACT_OK;
		k.spi = *(__u32 *)(hdr + 2 + RESEQ_HDR_LEN);
	}
	k.daddr = iph->daddr;
	sa_id = xfp_sa_out_spi.lookup(&k);
	if (!sa_id)
		return TC_ACT_OK;
	{
		__u32 id = *sa_id;

		sa = xfp_sa_out.lookup(&id);
	}
	if (!sa || !(sa->flags & XFP_SA_F_OFFLOAD))
		return TC_ACT_OK;
	/* The frame's encapsulation must be the SA's: ESP in UDP with its ports (source ours,
	 * destination the peer's), or plain ESP. Other UDP that looks alike is not ours. */
	if (hoff ? !(sa->flags & XFP_SA_F_ESPINUDP) ||
		       *(__u16 *)(hdr + 2 + XFP_ETH_LEN + XFP_IP_LEN) != sa->encap_sport ||
		       *(__u16 *)(hdr + 2 + XFP_ETH_LEN + XFP_IP_LEN + 2) != sa->encap_dport
		 : (sa->flags & XFP_SA_F_ESPINUDP) != 0)
		return TC_ACT_OK;
	if (bpf_ktime_get_ns() > sa->deadline_ns) {
		reseq_count(XFP_RESEQ_EXPIRED, len);
		return TC_ACT_OK;
	}
	/* The kernel fragmented the ESP packet after numbering it (outer DF clear, longer than
	 * the MTU). It cannot be renumbered piecewise, and with the kernel's number, far behind
	 * the shared counter, the peer would drop it as a replay: drop it here, counted. */
	if (frag_off & xfp_htons(XFP_IP_MF)) {
		reseq_count(XFP_RESEQ_FRAGMENT, len);
		return TC_ACT_SHOT;
	}
	if (skb->gso_segs > 1) {
		reseq_count(XFP_RESEQ_GSO, len);
		return TC_ACT_SHOT;
	}
	if (len > XFP_MAX_FRAME) {
		reseq_count(XFP_RESEQ_TOO_BIG, len);
		return TC_ACT_SHOT;
	}
	/* The AEAD walks data..data_end: make the whole frame linear first. */
	if (bpf_skb_pull_data(skb, len))
		return TC_ACT_SHOT;
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	if (data + RESEQ_ENC_OFF > data_end)
		return TC_ACT_SHOT;
	iph = data + XFP_ETH_LEN;
	esp = data + XFP_ETH_LEN + XFP_IP_LEN;
	ilen = xfp_ntohs(iph->tot_len);
	if (ilen < XFP_ENCAP_HEAD + hoff + XFP_ESP_ICV_LEN + 4 || XFP_ETH_LEN + ilen > len)
		return TC_ACT_OK; /* not a frame esp4_output() makes: leave it to the peer */
	clen = ilen - XFP_ENCAP_HEAD - hoff - XFP_ESP_ICV_LEN;
	if (bpf_skb_load_bytes(skb, XFP_ETH_LEN + XFP_IP_LEN + hoff + XFP_ESP_HDR_LEN, old_iv, 8))
		return TC_ACT_SHOT;
	/* NAT-T under kernel crypto is not renumbered yet (the kfunc path takes the plain
	 * ESP offset): dropped, counted, never sent with the kernel's number. */
	if (hoff && (sa->flags & XFP_SA_F_KCRYPTO)) {
		reseq_count(XFP_RESEQ_ERROR, len);
		return TC_ACT_SHOT;
	}
	/* The key of a kernel-crypto SA is in the xfp_crypto module, and this build cannot call
	 * it: the entry's key fields are zero. Left with the kernel's number, the packet would be
	 * a replay at the peer: dropped, counted. */
	if (XFP_KC_UNSERVED_OUT(sa)) {
		reseq_count(XFP_RESEQ_ERROR, len);
		return TC_ACT_SHOT;
	}

	/* Take the next number under the same lock XDP takes it (xdp_encap.c). */
	bpf_spin_lock(&sa->lock);
	seq = xfp_esp_seq_take(sa);
	bpf_spin_unlock(&sa->lock);
	if (!seq) {
		reseq_count(XFP_RESEQ_EXHAUSTED, len);
		return TC_ACT_SHOT;
	}

	if (XFP_KC_OUT(sa)) {
		/* Kernel crypto (esp_kc.h): open the packet as esp4_output() sealed it, which also
		 * checks the kernel's ICV over its SPI, seq and IV. With ESN the AAD holds the high
		 * half of the kernel's number, which the packet does not carry but its IV does:
		 * crypto/seqiv.c made it as the 64-bit number XOR the SA's mask (iv_mask, learnt
		 * from a packet of the kernel's, controller/datapath/learner.py: right in its high
		 * half while the kernel's number was below 2^32 then; otherwise the open fails and
		 * the packet is dropped, counted). The kfuncs check the bounds themselves, on the
		 * linear part that bpf_skb_pull_data() made whole. */
		old_hi = (xfp_htonll(*(__u64 *)old_iv) ^ sa->iv_mask) >> 32;
		if (xfp_kc_skb_open(skb, sa->kc_id, XFP_KC_ESP_OFF, clen, old_hi))
			goto shot;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (data + RESEQ_ENC_OFF > data_end)
			goto shot;
		esp = data + XFP_ETH_LEN + XFP_IP_LEN;
		xfp_esp_set_seq_iv(esp, iv, seq, sa->iv_mask);
		if (xfp_kc_skb_seal(skb, sa->kc_id, XFP_KC_ESP_OFF, clen, seq >> 32))
			goto shot;
		reseq_count(XFP_RESEQ_OK, len);
		return TC_ACT_OK;
	}
	/* ChaCha20 is a stream cipher: strip the kernel's keystream, then apply ours. The
	 * kernel's ICV is not checked: this gateway built the packet a moment ago. */
	if (xfp_aead_decrypt(skb, RESEQ_ENC_OFF + hoff, clen, (const struct xfp_aead_key *)sa->key,
			     old_iv))
		goto shot;
	/* The new number and IV through the store helper: the ESP header's offset depends on
	 * hoff (NAT-T). The UDP checksum stays 0, the IPv4 header unchanged. */
	eh.spi = sa->spi;
	xfp_esp_set_seq_iv(&eh, iv, seq, sa->iv_mask);
	if (bpf_skb_store_bytes(skb, XFP_ETH_LEN + XFP_IP_LEN + hoff, &eh, sizeof(eh), 0))
		goto shot;
	aad_len = xfp_esp_aad(aad, sa->spi, seq, sa->flags & XFP_SA_F_ESN);
	if (xfp_aead_seal(skb, RESEQ_ENC_OFF + hoff, clen, RESEQ_ENC_OFF + hoff + clen,
			  (const struct xfp_aead_key *)sa->key, iv, aad, aad_len))
		goto shot;
	reseq_count(XFP_RESEQ_OK, len);
	return TC_ACT_OK;

shot:
	/* The payload may be clear now: it must not leave. */
	reseq_count(XFP_RESEQ_ERROR, len);
	return TC_ACT_SHOT;
}
