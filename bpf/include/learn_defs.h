/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Definitions shared by bpf/tp_learn.c and controller/datapath/learn_abi.py (ctypes mirror;
 * tests/bpf/test_abi.py checks that sizes, offsets and values agree). Every multi-byte field
 * marked "be" is in network byte order, exactly as read from the packet; the others are host
 * order.
 */
#ifndef LEARN_DEFS_H
#define LEARN_DEFS_H

#if !defined(__bpf__) && !defined(__KERNEL__)
/* User space (the gcc layout check): BPF programs get these from BCC's helpers.h (not under
 * __KERNEL__, which one of BCC's passes defines without __bpf__: see xfp_defs.h). */
#include <linux/types.h>
#endif

/* Role of a watched device, the value in the learn_ifaces map. */
#define LEARN_ROLE_LAN 1 /* clear side */
#define LEARN_ROLE_WAN 2 /* ESP side */
/* An xfrm interface (route-based tunnel, docs/design.md §10): encap packets are routed into it
 * before their ESP leaves by a WAN device; decrypted packets of its if_id come out of it. */
#define LEARN_ROLE_XFRMI 3

/* Direction of a candidate, decided by the roles of the in and out devices and by what the
 * packet looked like on each. */
#define LEARN_DIR_ENCAP 1     /* clear in on LAN, ESP out on WAN */
#define LEARN_DIR_DECAP 2     /* ESP in on WAN (or sec_path at xmit), clear out on LAN */
#define LEARN_DIR_CLEAR_OUT 3 /* LAN -> WAN, no ESP on the wire (host without ESP, or no SA) */
#define LEARN_DIR_CLEAR_IN 4  /* WAN -> LAN, no ESP seen */

/* learn_event.flags */
#define LEARN_F_ESP_RX 0x01    /* the skb arrived as ESP (esp_spi/esp_seq from the wire) */
#define LEARN_F_ESP_TX 0x02    /* the skb left as ESP (esp_spi/esp_seq/esp_iv from the wire) */
#define LEARN_F_SECPATH 0x04   /* the skb carried a sec_path at xmit (sp_spi, sp_len valid) */
#define LEARN_F_FIB 0x08       /* a matching fib_table_lookup was seen (fib_* valid) */
#define LEARN_F_MANGLED 0x10   /* clear out != clear in (NAT): the fastpath must not take it */
#define LEARN_F_IP_OPTS 0x20   /* the inner IPv4 header carried options */
#define LEARN_F_UDP_ENCAP 0x40 /* the wire's ESP was in UDP (NAT-T): encap_* valid */

/* One forwarded packet, seen entering and leaving the gateway's namespace. 112 bytes. */
struct learn_event {
	__u64 ktime_rx;	  /* bpf_ktime_get_ns() at the first receive (CLOCK_MONOTONIC) */
	__u64 ktime_tx;	  /* ... at net_dev_start_xmit */
	__u64 skbaddr;	  /* for diagnostics only */
	__u32 netns_ino;  /* the gateway's netns inode (the filter) */
	__u32 in_ifindex; /* skb_iif at xmit: the device it was (last) received on */
	__u32 out_ifindex;
	__u32 tx_len;	   /* skb->len at xmit: the L2 frame */
	__u32 saddr;	   /* be: inner (clear) IPv4 source, as received */
	__u32 daddr;	   /* be */
	__u16 sport;	   /* be: TCP/UDP source port; ICMP echo/reply: identifier, else 0 */
	__u16 dport;	   /* be: TCP/UDP destination port; ICMP: (type << 8) | code */
	__u8 proto;	   /* inner IP protocol */
	__u8 direction;	   /* LEARN_DIR_* */
	__u8 flags;	   /* LEARN_F_* */
	__u8 sp_len;	   /* sec_path depth at xmit (1 for one tunnel SA) */
	__u32 esp_spi;	   /* be: from the ESP header on the wire (rx for decap, tx for encap) */
	__u32 esp_seq;	   /* be: low 32 bits of the sequence number (RFC 4303 section 2.2) */
	__u8 esp_iv[8];	   /* the 8-byte explicit IV that follows (RFC 7634 section 2), encap */
	__u32 sp_spi;	   /* be: xfrm_state.id.spi of sec_path->xvec[0] at xmit, decap */
	__u32 outer_saddr; /* be: IPv4 source of the frame as transmitted */
	__u32 outer_daddr; /* be */
	__u8 eth_dst[6];   /* L2 header of the frame as transmitted: the datapath rewrites to it */
	__u8 eth_src[6];
	__u8 outer_proto; /* IP protocol of the frame as transmitted (50 for ESP) */
	__u8 pad0[3];
	__u32 fib_tb_id;   /* fib_table_lookup of this packet on input: table id */
	__u32 fib_gw4;	   /* be: next-hop gateway; unset (garbage) for a nexthop without an IPv4
			      gateway (include/trace/events/fib.h): do not trust it alone */
	__u16 encap_sport; /* be: LEARN_F_UDP_ENCAP: the UDP ports around the wire's ESP */
	__u16 encap_dport; /* be */
};

/* Indexes of the per-CPU learn_stats counters (why a sighting did or did not become an event). */
#define LEARN_STAT_RX 0		     /* IPv4 receive on a watched device, sighting stored */
#define LEARN_STAT_RX_ESP 1	     /* ... of which ESP */
#define LEARN_STAT_RX_DECRYPTED 2    /* clear re-receive with a sec_path merged into an ESP one */
#define LEARN_STAT_FIB_MATCH 3	     /* a forward route lookup matched a sighting */
#define LEARN_STAT_TX_SIGHTED 4	     /* xmit on a watched device of an skb with a sighting */
#define LEARN_STAT_TX_IIF_MISMATCH 5 /* ... but skb_iif disagrees: a reused skb address */
#define LEARN_STAT_TX_STALE 6	     /* ... but older than LEARN_MAX_AGE_NS */
#define LEARN_STAT_TX_UNPARSED 7     /* ... but the frame or the inner header was not IPv4 */
#define LEARN_STAT_TX_NOT_FORWARD 8  /* ... but the roles are not LAN<->WAN */
#define LEARN_STAT_SUPPRESSED 9	     /* the flow was emitted less than LEARN_REEMIT_NS ago */
#define LEARN_STAT_EMITTED 10	     /* an event went to the perf buffer */
#define LEARN_STAT_PERF_FAIL 11	     /* perf_submit failed (buffer full) */
#define LEARN_STAT_TX_UNSIGHTED 12   /* xmit on a watched device, no sighting (local, or new skb) */
#define LEARN_STAT_MAX 13

/* Partial sighting of an skb received on a watched device, keyed by the skb pointer. */
struct learn_sighting {
	__u64 ktime;   /* first receive in the gateway's namespace */
	__u32 ifindex; /* receive device */
	__u32 saddr;   /* be: clear IPv4 header, when parsed */
	__u32 daddr;   /* be */
	__u16 sport;   /* be */
	__u16 dport;   /* be */
	__u8 proto;    /* 0: no clear header parsed yet */
	__u8 flags;    /* LEARN_F_ESP_RX, LEARN_F_SECPATH (at the clear re-receive),
			  LEARN_F_FIB, LEARN_F_IP_OPTS */
	__u8 pad[2];
	__u32 esp_spi;	   /* be */
	__u32 esp_seq;	   /* be */
	__u32 fib_tb_id;   /* host order */
	__u32 fib_gw4;	   /* be */
	__u16 encap_sport; /* be: LEARN_F_UDP_ENCAP (with LEARN_F_ESP_RX): NAT-T's UDP ports */
	__u16 encap_dport; /* be */
	__u32 via_ifindex; /* the xfrm interface (LEARN_ROLE_XFRMI) the packet passed, or 0 */
	__u32 pad1;
};

/* The last sighting made on this CPU: fib_table_lookup carries no skb pointer, but the input
 * route lookup runs synchronously inside netif_receive_skb (ip_rcv_finish ->
 * ip_route_input_noref -> fib_lookup, net/ipv4/route.c), on the same CPU. */
struct learn_last_rx {
	__u64 skbaddr;
	__u64 ktime;
};

/* The one entry of the learn_cfg array. */
struct learn_cfg {
	__u32 netns_ino; /* only devices of this netns are watched; 0: learner disabled */
	__u32 pad;
};

/* Key of the re-emit suppression map: the flow as the datapath will key it, plus the SPI. */
struct learn_flow_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 direction;
	__u8 pad[2];
	__u32 spi;
};

#endif /* LEARN_DEFS_H */
