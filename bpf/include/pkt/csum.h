/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * csum.h: Internet checksum helpers (RFC 1071, incremental update RFC 1624). Sums are carried
 * in 64-bit registers: BCC 0.26 emits BPF ISA v1, where 32-bit wrap-around is not free.
 */
#ifndef XFP_CSUM_H
#define XFP_CSUM_H

#include <uapi/linux/ip.h>

static __always_inline __u16 xfp_csum_fold(__u64 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)(~sum & 0xffff);
}

/* Checksum of a 20-byte IPv4 header (its check field included: 0 when valid, and the value to
 * store when the field was zeroed first). Needs 20 readable bytes at iph. */
static __always_inline __u16 xfp_ipv4_csum(const void *iph)
{
	const __u16 *w = iph;
	__u64 sum = 0;

	sum += w[0];
	sum += w[1];
	sum += w[2];
	sum += w[3];
	sum += w[4];
	sum += w[5];
	sum += w[6];
	sum += w[7];
	sum += w[8];
	sum += w[9];
	return xfp_csum_fold(sum);
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for one 16-bit word m -> m' (any byte order, as
 * long as all three share it). */
static __always_inline __u16 xfp_csum_replace2(__u16 check, __u16 old, __u16 new)
{
	__u64 sum = (~check & 0xffff) + (~old & 0xffff) + new;

	return xfp_csum_fold(sum);
}

#endif /* XFP_CSUM_H */
