/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * xfp_defs.h: THE definitions shared by the datapath (bpf/xdp_encap.c, bpf/xdp_decap.c,
 * bpf/tc_reseq.c) and the controller (controller/datapath/abi.py mirrors every struct, enum and
 * constant here with ctypes; tests/bpf/test_abi.py compiles this header with gcc and checks that
 * sizes, offsets and values agree). Change both sides together.
 *
 * Byte order: fields marked "be" hold network byte order exactly as on the wire; all others
 * are host order. Times are bpf_ktime_get_ns() (CLOCK_MONOTONIC, ns).
 */
#ifndef XFP_DEFS_H
#define XFP_DEFS_H

#if !defined(__bpf__) && !defined(__KERNEL__)
/* User space (the gcc layout check): BPF programs get these from BCC's helpers.h. Not under
 * __KERNEL__: one of BCC's clang passes defines it without __bpf__, and there <linux/bpf.h> is
 * the kernel's own, whose include tree cost about 1 s of CPU per compile natively. */
#include <linux/types.h>
#include <linux/bpf.h> /* struct bpf_spin_lock */
#endif

/* ---- sizes ------------------------------------------------------------------------------ */
#ifndef XFP_FLOWS_MAX	    /* -DXFP_FLOWS_MAX=N: another table size (bench/e2e.py up to 1M) */
#define XFP_FLOWS_MAX 65536 /* LRU: the least recently used flow goes first when full */
#endif
#ifndef XFP_SA_MAX	/* -DXFP_SA_MAX=N: the controller's [tables] sas */
#define XFP_SA_MAX 1024 /* outbound and inbound SA entries, each */
#endif
#define XFP_DEVMAP_SIZE 4096 /* devmap keyed by egress ifindex: ifindex must be below this */

/* Liveness (issue 5): one packet per SA and direction every XFP_LIVENESS_NS takes the kernel
 * path (reason XFP_R_PASS_LIVENESS), so that the kernel's policy use_time, which the IKE
 * daemon reads for its inactivity timeout and dead-peer detection, sees the traffic XDP
 * carries. 0 = never (the default here; the controller passes `[timers] liveness`). */
#ifndef XFP_LIVENESS_NS
#define XFP_LIVENESS_NS 0ULL
#endif

/* Anti-replay ring (RFC 4303 section 3.4.3, kept as in RFC 6479: a ring of 64-bit words that
 * is never shifted, only whole words cleared as the window advances). 128 words = 8192 bits,
 * so a window of up to (128 - 1) * 64 >= 4096 bits is exact. */
#define XFP_REPLAY_WORDS 128
#define XFP_REPLAY_MAX_WINDOW 4096

/* ---- ESP constants (RFC 4303, RFC 7634) ------------------------------------------------- */
#define XFP_ESP_HDR_LEN 8  /* SPI + sequence number (RFC 4303 section 2) */
#define XFP_ESP_IV_LEN 8   /* explicit IV of rfc7539esp (RFC 7634 section 2) */
#define XFP_ESP_ICV_LEN 16 /* Poly1305 tag (RFC 7634 section 2) */
#define XFP_ESP_ALIGN 4	   /* esp4.c: blksize = ALIGN(crypto_aead_blocksize = 1, 4) */
#define XFP_ENCAP_HEAD (20 + XFP_ESP_HDR_LEN + XFP_ESP_IV_LEN) /* outer IPv4 + ESP + IV: 36 */

/* ---- NAT-T (RFC 3948) ------------------------------------------------------------------- */
#define XFP_UDP_LEN 8	   /* the UDP header in front of ESP: the overhead of NAT-T */
#define XFP_NATT_PORT 4500 /* RFC 3948 section 2: IKE and ESP-in-UDP share it (RFC 7296 2.23) */

/* ---- directions and reasons: the per-CPU counters are indexed by dir * XFP_R_MAX + reason */
enum xfp_dir {
	XFP_DIR_ENCAP = 0, /* clear in on the LAN side, ESP out on the WAN side */
	XFP_DIR_DECAP = 1, /* ESP in on the WAN side, clear out on the LAN side */
	XFP_DIR_MAX = 2,
};

enum xfp_reason {
	/* hits: forwarded by XDP (XDP_REDIRECT) */
	XFP_R_ENCAP_OK = 0,
	XFP_R_DECAP_OK = 1,
	/* punts: XDP_PASS with the frame untouched, the kernel does everything */
	XFP_R_PASS_NOT_IPV4 = 2,     /* not unicast Ethernet + IPv4 (ARP, IPv6, VLAN, inner v6..) */
	XFP_R_PASS_MALFORMED_IP = 3, /* IPv4 header, length or checksum bad: the kernel judges */
	XFP_R_PASS_IP_OPTIONS = 4,   /* ihl != 5 (outer, or inner at decap) */
	XFP_R_PASS_FRAGMENT = 5,     /* MF set or fragment offset != 0 */
	XFP_R_PASS_NOT_ESP = 6,	     /* decap: neither ESP nor ESP-in-UDP of a NAT-T SA */
	XFP_R_PASS_UNKNOWN_FLOW = 7, /* encap: no flow entry for the inner 5-tuple */
	XFP_R_PASS_UNKNOWN_SPI = 8,  /* decap: no inbound SA for (SPI, outer daddr) */
	XFP_R_PASS_NO_SA = 9,	     /* encap: the flow names an SA id with no entry */
	XFP_R_PASS_SA_NOT_OFFLOADED = 10, /* SA entry present without XFP_SA_F_OFFLOAD */
	XFP_R_PASS_SA_EXPIRED = 11,	  /* past deadline_ns or the watchdog (or none) */
	XFP_R_PASS_SEQ_EXHAUSTED = 12, /* next sequence would reach seq_limit (or 2^32 w/o ESN) */
	XFP_R_PASS_TTL = 13,	       /* TTL <= 1: the kernel sends ICMP time exceeded */
	XFP_R_PASS_MTU = 14,	       /* too big for the egress MTU: the kernel fragments/ICMPs */
	XFP_R_PASS_INNER_MISS = 15,    /* decap: ICV ok, no flow for the inner 5-tuple */
	XFP_R_PASS_SA_MISMATCH = 16,   /* decap: the inner flow belongs to another SA */
	XFP_R_PASS_FLOW_DISABLED = 17, /* flow entry present without XFP_FLOW_F_ACTIVE */
	XFP_R_PASS_NO_ROOM = 18,       /* bpf_xdp_adjust_head/tail refused: before any write */
	/* drops: XDP_DROP, counted */
	XFP_R_DROP_BAD_ICV = 19,       /* Poly1305 tag mismatch (RFC 4303 section 3.4.4) */
	XFP_R_DROP_REPLAY = 20,	       /* duplicate or left of the window (section 3.4.3) */
	XFP_R_DROP_MALFORMED_ESP = 21, /* known SPI, payload too short for tunnel mode */
	XFP_R_DROP_BAD_TRAILER = 22,   /* pad bytes not 1,2,3..., bad pad length, next hdr != 4 */
	XFP_R_DROP_BAD_INNER = 23,     /* decrypted inner IPv4 header inconsistent */
	XFP_R_DROP_ECN = 24,	       /* RFC 6040 section 4.2: outer CE over inner Not-ECT */
	XFP_R_DROP_ERROR = 25,	       /* an adjust or helper failed after the frame was changed */
	XFP_R_PASS_LIVENESS = 26, /* this SA's periodic packet for the kernel (XFP_LIVENESS_NS) */
	/* -DXFP_KCRYPTO: the xfp_crypto kfunc refused (no SIMD right now, multi-buffer frame, no
	 * context, bounds; bpf/include/kcrypto_defs.h): the frame goes to the kernel as it came */
	XFP_R_PASS_KCRYPTO = 27,
	/* NAT-T (RFC 3948 section 2.2-2.3), decap: UDP to XFP_NATT_PORT carrying IKE (the 4 zero
	 * bytes of the non-ESP marker) or a NAT keepalive (one 0xFF byte): the kernel's */
	XFP_R_PASS_NATT_CTRL = 28,
	/* NAT-T, decap: ESP-in-UDP of a known SA from another peer address or UDP port than the
	 * SA's encap says: the kernel sees the new mapping (XFRM_MSG_MAPPING, esp4.c) */
	XFP_R_PASS_NATT_MAPPING = 29,
	XFP_R_MAX = 30,
};

/* What the TC egress resequencer (bpf/tc_reseq.c) did with a kernel-built ESP frame of an
 * offloaded SA: the index of its per-CPU counters (map xfp_reseq_stats). */
enum xfp_reseq_stat {
	XFP_RESEQ_OK = 0,	 /* renumbered and re-sealed */
	XFP_RESEQ_EXHAUSTED = 1, /* counter at its limit: dropped, never reused */
	XFP_RESEQ_ERROR = 2,	 /* bounds or crypto failure after decrypting: dropped */
	XFP_RESEQ_EXPIRED = 3,	 /* SA past its hard deadline: left as the kernel built it */
	XFP_RESEQ_GSO = 4,	 /* a GSO super-frame: dropped (cannot renumber segments here) */
	XFP_RESEQ_TOO_BIG = 5,	 /* longer than XFP_MAX_FRAME: dropped */
	XFP_RESEQ_FRAGMENT = 6,	 /* the first fragment of a fragmented ESP packet: dropped */
	XFP_RESEQ_MAX = 7,
};

/* One per-CPU counter slot (map xfp_stats, index dir * XFP_R_MAX + reason; map
 * xfp_reseq_stats, index enum xfp_reseq_stat). */
struct xfp_stat {
	__u64 packets;
	__u64 bytes; /* frame length as received */
};

/* ---- flows -------------------------------------------------------------------------------- */
/* Key of the flow table. Encap: the clear packet as received on the LAN side. Decap: the inner
 * packet inside the ESP received on the WAN side (ifindex is then the WAN device). */
struct xfp_flow_key {
	__u32 ifindex; /* ingress device (ctx->ingress_ifindex; 0 in BPF_PROG_TEST_RUN) */
	__u8 dir;      /* enum xfp_dir */
	__u8 proto;    /* inner IP protocol */
	__u16 pad;     /* always 0 */
	__u32 saddr;   /* be: inner source */
	__u32 daddr;   /* be: inner destination */
	__u16 sport;   /* be: TCP/UDP source port; ICMP echo/reply: identifier; else 0 */
	__u16 dport;   /* be: TCP/UDP destination port; ICMP: (type << 8) | code; else 0 */
};

#define XFP_FLOW_F_ACTIVE 0x1 /* the datapath may forward this flow (else punt, counted) */

struct xfp_flow_val {
	__u32 sa_id;	      /* encap: outbound SA id; decap: the inbound SA's sa_id it must use */
	__u32 egress_ifindex; /* device to redirect to (encap: 0 = the SA's egress, L2, MTU) */
	__u8 dmac[6];	      /* L2 rewrite towards the next hop (encap: the outer one) */
	__u8 smac[6];
	__u32 flags;	    /* XFP_FLOW_F_* */
	__u16 mtu;	    /* egress MTU: decap inner, encap outer IPv4 total length; 0 = none */
	__u16 pad;	    /* always 0 */
	__u32 pad1;	    /* always 0 */
	__u64 last_seen_ns; /* written by the datapath on every forwarded packet */
	__u64 packets;	    /* forwarded by XDP (datapath adds, controller reads) */
	__u64 bytes;	    /* inner IPv4 bytes forwarded */
};

/* ---- outbound SAs (key: __u32 sa_id) ----------------------------------------------------- */
#define XFP_SA_F_OFFLOAD 0x1	      /* the datapath may use this SA (else punt, counted) */
#define XFP_SA_F_ESN 0x2	      /* RFC 4303 extended sequence numbers (appendix A) */
#define XFP_SA_F_NOECN 0x4	      /* kernel XFRM_STATE_NOECN: outer ECN 0 */
#define XFP_SA_F_NOPMTUDISC 0x8	      /* kernel XFRM_STATE_NOPMTUDISC: outer DF 0 */
#define XFP_SA_F_DONT_ENCAP_DSCP 0x10 /* kernel XFRM_SA_XFLAG_DONT_ENCAP_DSCP: outer DSCP 0 */
/* Kernel crypto backend (issue 17): the AEAD is the xfp_crypto module's context kc_id, key and
 * salt are zero here (the key lives in the module only). Programs built with -DXFP_KCRYPTO
 * punt an SA without it (XFP_R_PASS_SA_NOT_OFFLOADED); the BPF AEAD build never sees it set. */
#define XFP_SA_F_KCRYPTO 0x20
/* RFC 3948 UDP encapsulation (the SA's XFRMA_ENCAP, UDP_ENCAP_ESPINUDP): ESP after a UDP header
 * with the ports encap_sport/encap_dport (as the kernel's struct xfrm_encap_tmpl: outbound
 * sport ours and dport the peer's; inbound sport the peer's and dport ours). */
#define XFP_SA_F_ESPINUDP 0x40

struct xfp_sa_out {
	struct bpf_spin_lock lock; /* guards seq, packets, bytes (the datapath's; user space
				      never sees it: the kernel zeroes it on lookup) */
	__u32 sa_id;
	__u32 spi;	      /* be */
	__u32 saddr;	      /* be: outer source (our WAN address) */
	__u32 daddr;	      /* be: outer destination (the peer) */
	__u32 flags;	      /* XFP_SA_F_* */
	__u8 key[32];	      /* ChaCha20 key: the first 32 of the 36 bytes of the rfc7539esp key */
	__u8 salt[4];	      /* the last 4: nonce = salt || IV (RFC 7634 section 2) */
	__u32 egress_ifindex; /* WAN device to redirect to */
	__u64 seq;	      /* next sequence number to use (64 bits; low 32 on the wire) */
	__u64 seq_limit;      /* exclusive: the datapath never sends seq >= seq_limit (punts) */
	__u64 iv_mask;	      /* IV on the wire = big-endian(seq XOR iv_mask), as crypto/seqiv.c */
	__u64 deadline_ns;    /* punt once bpf_ktime_get_ns() exceeds it (hard life / watchdog) */
	__u64 packets;	      /* packets sent by XDP (lifetime accounting) */
	__u64 bytes; /* inner IPv4 bytes sent by XDP (the kernel counts the same, esp4.c) */
	__u16 mtu;   /* outer IPv4 total length limit (path MTU) */
	__u8 ttl;    /* outer TTL (0: 64, the kernel's ip4_dst_hoplimit default) */
	__u8 pad0;
	__u8 dmac[6]; /* outer next hop */
	__u8 smac[6];
	__u32 kc_id;	   /* XFP_SA_F_KCRYPTO: the xfp_crypto context that seals */
	__u16 encap_sport; /* be: XFP_SA_F_ESPINUDP: UDP source port (ours) */
	__u16 encap_dport; /* be: XFP_SA_F_ESPINUDP: UDP destination port (the peer's) */
};

/* ---- inbound SAs (key: struct xfp_sa_in_key) ---------------------------------------------- */
struct xfp_sa_in_key {
	__u32 spi;   /* be */
	__u32 daddr; /* be: outer destination (our WAN address), as the kernel's (daddr, spi) */
};

struct xfp_sa_in {
	struct bpf_spin_lock lock; /* guards everything from seq_top to the end */
	__u32 sa_id;
	__u32 spi;   /* be */
	__u32 saddr; /* be: the peer (informational: the kernel does not match it either) */
	__u32 daddr; /* be */
	__u32 flags; /* XFP_SA_F_OFFLOAD, XFP_SA_F_ESN, XFP_SA_F_NOECN */
	__u8 key[32];
	__u8 salt[4];
	__u32 replay_window; /* bits, 0..XFP_REPLAY_MAX_WINDOW; 0 = no replay check (as kernel) */
	__u64 deadline_ns;
	__u64 seq_top; /* highest authenticated sequence number (64 bits with ESN) */
	__u64 packets; /* authenticated packets (forwarded or punted) */
	__u64 bytes;   /* their inner bytes (ESP payload length) */
	__u64 replay_drops;
	__u64 icv_fails;
	__u64 bitmap[XFP_REPLAY_WORDS]; /* bit (s & 63) of word (s >> 6) % WORDS: seq s seen */
	__u32 kc_id;			/* XFP_SA_F_KCRYPTO: the xfp_crypto context that opens */
	__u16 encap_sport; /* be: XFP_SA_F_ESPINUDP: UDP source port (the peer's, behind its NAT) */
	__u16 encap_dport; /* be: XFP_SA_F_ESPINUDP: UDP destination port (ours) */
};

#endif /* XFP_DEFS_H */
