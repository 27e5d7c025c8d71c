/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * First-packet learning: watch the kernel forward a packet through the gateway's namespace and
 * report it as a candidate flow (docs/design.md §2).
 *
 *   net:netif_receive_skb    an skb enters a watched device: store a sighting keyed by the skb
 *                            pointer (inner 5-tuple if clear, SPI/seq if ESP). After ESP
 *                            decryption the kernel hands the same skb to netif_receive_skb
 *                            again (xfrm_input -> gro_cells_receive, net/xfrm/xfrm_input.c):
 *                            the clear header is merged into the ESP sighting.
 *   fib:fib_table_lookup     the input route lookup of that packet (no skb pointer here: matched
 *                            through the last sighting made on this CPU, see learn_last_rx).
 *   net:net_dev_start_xmit   the skb leaves on a watched device of the other role: the frame
 *                            as transmitted gives the L2 header, the ESP header (encap) and the
 *                            sec_path (decap). One perf event per flow and LEARN_REEMIT_NS.
 *
 * Only forwarded packets become events: a packet for the gateway itself is consumed by a local
 * socket and never reaches xmit; a packet dropped by netfilter never reaches xmit either.
 * A freed skb's address may be reused by a later skb; a sighting is therefore only trusted when
 * skb->skb_iif at xmit equals the sighting's device (a locally generated skb has skb_iif 0, a
 * received one overwrote the sighting at its own receive) and it is younger than
 * LEARN_MAX_AGE_NS.
 *
 * Where the pointer does not survive, the packet is simply not learned (fail closed): seen in the
 * 6.1 VM, a GSO skb (TCP from a veth peer with TSO) is segmented by xfrm_output_gso
 * (net/xfrm/xfrm_output.c) into new skbs, so those leave on WAN unsighted (LEARN_STAT_TX_
 * UNSIGHTED). A flow's first packet (SYN, first datagram) is not GSO in practice; a UDP_SEGMENT
 * sender whose every packet is GSO stays on the kernel path. Synchronous ESP (the generic
 * chacha20poly1305) keeps the pointer in both directions; async crypto completes on the same skb
 * (esp_output_done -> xfrm_output_resume), possibly on another CPU, which the global sighting
 * map allows for.
 *
 * Tracepoints fire for every namespace, and veth hands the same skb to the peer namespace, so
 * every hook first checks the device's netns inode (skb->dev->nd_net.net->ns.inum).
 *
 * Kernel struct offsets (SKB_*_OFF, DEV_*_OFF, ...) come as -D flags from the running kernel's
 * BTF (controller/datapath/btf_offsets.py): no kernel-internal header is included. Packet bytes
 * are read with bpf_probe_read_kernel from the linear part of the skb only (len - data_len).
 */
#define XFP_MAPS_LEARN
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "learn_defs.h"
#include "maps.h"

#ifndef SKB_HEAD_OFF
#error "kernel offsets missing: build through controller/datapath/learner.py (btf_offsets.cflags())"
#endif
#ifndef HAVE_SECPATH
#define HAVE_SECPATH 0
#endif
#ifndef LEARN_REEMIT_NS
#define LEARN_REEMIT_NS 100000000ULL /* 100 ms: one event per flow and window, not per packet */
#endif
#ifndef LEARN_MAX_AGE_NS
#define LEARN_MAX_AGE_NS 1000000000ULL /* 1 s from receive to xmit: generous for qemu TCG */
#endif
#ifndef LEARN_FIB_WINDOW_NS
#define LEARN_FIB_WINDOW_NS 10000000ULL /* route lookup within 10 ms of its receive, same CPU */
#endif

/* SPI, seq (RFC 4303 section 2), 8-byte IV (RFC 7634 section 2): 16 */
#define ESP_HDR_IV_LEN (XFP_ESP_HDR_LEN + XFP_ESP_IV_LEN)
/* NAT-T (RFC 3948 section 2.1): UDP header, then the same 16 bytes */
#define UDP_ESP_LEN (XFP_UDP_LEN + ESP_HDR_IV_LEN)

/* The sizes of the fields read as fixed-width integers below. */
_Static_assert(SKB_LEN_SZ == 4 && SKB_DATA_LEN_SZ == 4 && SKB_IIF_SZ == 4, "u32 skb fields");
_Static_assert(SKB_PROTOCOL_SZ == 2, "skb->protocol is __be16");
_Static_assert(DEV_IFINDEX_SZ == 4 && NET_NS_INUM_SZ == 4, "u32 ifindex, inum");
_Static_assert(sizeof(struct learn_event) == 112, "learn_event layout (learn_abi.py)");
_Static_assert(sizeof(struct learn_sighting) == 56, "learn_sighting layout");

/* The maps (learn_cfg, learn_ifaces, learn_sightings, learn_last_rx, learn_emitted,
 * learn_stats, learn_events) are in maps.h, section XFP_MAPS_LEARN. */

struct tuple {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 flags; /* LEARN_F_IP_OPTS */
	__u8 ttl;
	__u8 l4_ok;
	__u32 esp_spi; /* ESP: from the 8 bytes after the IP header (NAT-T: after UDP) */
	__u32 esp_seq;
	__u8 esp_iv[8];
	__u8 udp_esp; /* UDP to or from XFP_NATT_PORT that can be ESP-in-UDP: esp_* valid */
};

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = learn_stats.lookup(&idx);
	if (v)
		*v += 1; /* per-CPU: no atomics needed */
}

/* The device an skb is on, and that device's netns inode. Returns 0 on success. */
static __always_inline int skb_dev(void *skb, __u32 *ifindex, __u32 *ino)
{
	void *dev = NULL, *net = NULL;

	if (bpf_probe_read_kernel(&dev, sizeof(dev), skb + SKB_DEV_OFF) || !dev)
		return -1;
	if (bpf_probe_read_kernel(ifindex, sizeof(*ifindex), dev + DEV_IFINDEX_OFF))
		return -1;
	if (bpf_probe_read_kernel(&net, sizeof(net), dev + DEV_ND_NET_OFF) || !net)
		return -1;
	if (bpf_probe_read_kernel(ino, sizeof(*ino), net + NET_NS_INUM_OFF))
		return -1;
	return 0;
}

/* LEARN_ROLE_* of the device, or 0 when it is not watched (wrong netns or not configured). */
static __always_inline __u32 watched_role(__u32 ifindex, __u32 ino)
{
	__u32 zero = 0;
	struct learn_cfg *cfg = learn_cfg.lookup(&zero);
	if (!cfg || !cfg->netns_ino || cfg->netns_ino != ino)
		return 0;
	__u32 *role = learn_ifaces.lookup(&ifindex);
	return role ? *role : 0;
}

/* Linear bytes from skb->data: len - data_len (include/linux/skbuff.h, skb_headlen()). */
static __always_inline int skb_linear(void *skb, void **data, __u32 *headlen)
{
	__u32 len = 0, data_len = 0;

	if (bpf_probe_read_kernel(data, sizeof(*data), skb + SKB_DATA_OFF) || !*data)
		return -1;
	if (bpf_probe_read_kernel(&len, sizeof(len), skb + SKB_LEN_OFF))
		return -1;
	if (bpf_probe_read_kernel(&data_len, sizeof(data_len), skb + SKB_DATA_LEN_OFF))
		return -1;
	if (data_len > len)
		return -1;
	*headlen = len - data_len;
	return 0;
}

/*
 * Parse an IPv4 header at l3 with avail linear bytes: addresses, protocol and, when the packet
 * is not a fragment, the first 8 (TCP/UDP/ICMP) or 16 (ESP) bytes after the header. The caller
 * has checked nothing; every read is bounded by avail.
 */
static __always_inline int parse_ipv4(void *l3, __u32 avail, struct tuple *t)
{
	struct iphdr ip = {};
	__u8 l4[UDP_ESP_LEN] = {};

	if (avail < sizeof(ip) || bpf_probe_read_kernel(&ip, sizeof(ip), l3))
		return -1;
	if (ip.version != 4 || ip.ihl < 5)
		return -1;
	__u32 hlen = ip.ihl * 4;
	t->saddr = ip.saddr;
	t->daddr = ip.daddr;
	t->proto = ip.protocol;
	t->ttl = ip.ttl;
	if (hlen > sizeof(ip))
		t->flags |= LEARN_F_IP_OPTS;
	/* A non-first fragment has no L4 header; a first fragment's flow is not learned either,
	 * since the datapath could not key its later fragments. */
	if (ip.frag_off & bpf_htons(0x3fff))
		return 0;
	__u32 need = ip.protocol == IPPROTO_ESP ? ESP_HDR_IV_LEN : 8;
	if (ip.protocol != IPPROTO_TCP && ip.protocol != IPPROTO_UDP &&
	    ip.protocol != IPPROTO_ICMP && ip.protocol != IPPROTO_ESP)
		return 0;
	if (hlen > 60 || avail < hlen + need)
		return 0;
	if (bpf_probe_read_kernel(l4, ESP_HDR_IV_LEN, l3 + hlen))
		return 0;
	/* RFC 3948: UDP with the NAT-T port on either side whose payload is longer than an ESP
	 * header and does not start with the non-ESP marker (zero) is ESP-in-UDP, as
	 * xfrm4_udp_encap_rcv() decides; the SA's own ports are checked by the controller
	 * (controller/core/validate.py). Other NAT-T ports are not recognised here. */
	if (ip.protocol == IPPROTO_UDP && avail >= hlen + UDP_ESP_LEN &&
	    (*(__u16 *)&l4[0] == bpf_htons(XFP_NATT_PORT) ||
	     *(__u16 *)&l4[2] == bpf_htons(XFP_NATT_PORT)) &&
	    bpf_ntohs(*(__u16 *)&l4[4]) > XFP_UDP_LEN + XFP_ESP_HDR_LEN &&
	    !bpf_probe_read_kernel(l4 + XFP_UDP_LEN, ESP_HDR_IV_LEN, l3 + hlen + XFP_UDP_LEN) &&
	    *(__u32 *)&l4[XFP_UDP_LEN] != 0) {
		__builtin_memcpy(&t->esp_spi, &l4[XFP_UDP_LEN], 4);
		__builtin_memcpy(&t->esp_seq, &l4[XFP_UDP_LEN + 4], 4);
		__builtin_memcpy(t->esp_iv, &l4[XFP_UDP_LEN + 8], 8);
		t->udp_esp = 1;
	}
	if (ip.protocol == IPPROTO_ESP) {
		__builtin_memcpy(&t->esp_spi, &l4[0], 4);
		__builtin_memcpy(&t->esp_seq, &l4[4], 4);
		__builtin_memcpy(t->esp_iv, &l4[8], 8);
	} else if (ip.protocol == IPPROTO_ICMP) {
		/* RFC 792: type, code, checksum, then for echo (8) and echo reply (0) the
		 * identifier: id as "sport", type/code as "dport", 0 for other types: the key
		 * bpf/include/pkt/parsing.h (xfp_l4_ports) builds for the datapath's flow table. */
		if (l4[0] == 8 || l4[0] == 0)
			__builtin_memcpy(&t->sport, &l4[4], 2);
		__builtin_memcpy(&t->dport, &l4[0], 2);
	} else {
		__builtin_memcpy(&t->sport, &l4[0], 2);
		__builtin_memcpy(&t->dport, &l4[2], 2);
	}
	t->l4_ok = 1;
	return 0;
}

/*
 * The SPI of the outermost SA in the skb's sec_path, and the path's depth (include/net/xfrm.h:
 * struct sec_path; the chunk is at ext + ext->offset[SKB_EXT_SEC_PATH] * 8, skb_ext_get_ptr()
 * in include/linux/skbuff.h). Returns the depth, 0 when there is no sec_path.
 */
static __always_inline __u32 skb_secpath(void *skb, __u32 *spi)
{
#if HAVE_SECPATH
	__u8 active = 0, off = 0;
	void *ext = NULL, *x = NULL;
	int len = 0;

	if (bpf_probe_read_kernel(&active, 1, skb + SKB_ACTIVE_EXT_OFF))
		return 0;
	if (!(active & (1 << SKB_EXT_SEC_PATH_ID)))
		return 0;
	if (bpf_probe_read_kernel(&ext, sizeof(ext), skb + SKB_EXTENSIONS_OFF) || !ext)
		return 0;
	if (bpf_probe_read_kernel(&off, 1, ext + SKB_EXT_OFFSET_OFF + SKB_EXT_SEC_PATH_ID))
		return 0;
	void *sp = ext + ((__u32)off << 3);
	if (bpf_probe_read_kernel(&len, sizeof(len), sp + SEC_PATH_LEN_OFF) || len <= 0)
		return 0;
	if (bpf_probe_read_kernel(&x, sizeof(x), sp + SEC_PATH_XVEC_OFF) || !x)
		return 0;
	bpf_probe_read_kernel(spi, sizeof(*spi), x + XFRM_STATE_SPI_OFF);
	return len > 255 ? 255 : len;
#else
	return 0;
#endif
}

TRACEPOINT_PROBE(net, netif_receive_skb)
{
	void *skb = args->skbaddr;
	__u64 key = (__u64)skb;
	__u32 ifindex = 0, ino = 0, role;

	if (skb_dev(skb, &ifindex, &ino))
		return 0;
	role = watched_role(ifindex, ino);
	if (!role)
		return 0;

	__u32 via = 0;
	if (role == LEARN_ROLE_XFRMI) {
		/* Decrypted by an SA of an xfrm interface: xfrmi_rcv_cb
		 * (net/xfrm/xfrm_interface*.c) moved the skb to that device. The sighting stays the
		 * ESP one's, noting the device. */
		struct learn_sighting *esp = learn_sightings.lookup(&key);
		if (!esp || !(esp->flags & LEARN_F_ESP_RX))
			return 0;
		via = ifindex;
		ifindex = esp->ifindex;
	}

	__be16 proto = 0;
	void *data = NULL;
	__u32 headlen = 0;
	struct tuple t = {};
	bpf_probe_read_kernel(&proto, sizeof(proto), skb + SKB_PROTOCOL_OFF);
	/* Here skb->data is at the network header: the driver (veth: __dev_forward_skb ->
	 * eth_type_trans) pulled the Ethernet header, and xfrm decap left data at the inner one. */
	if (proto != bpf_htons(ETH_P_IP) || skb_linear(skb, &data, &headlen) ||
	    parse_ipv4(data, headlen, &t)) {
		/* Not ours to learn; make sure no stale sighting under this address survives. */
		learn_sightings.delete(&key);
		return 0;
	}

	__u64 now = bpf_ktime_get_ns();
	struct learn_sighting s = {};
	s.ktime = now;
	s.ifindex = ifindex;
	s.via_ifindex = via;
	s.flags = t.flags;
	/* ESP-in-UDP (NAT-T) counts as ESP on the WAN side only: from the LAN it is a host's own
	 * NAT-T traffic, which this gateway merely forwards. */
	if (t.proto == IPPROTO_ESP || (t.udp_esp && role == LEARN_ROLE_WAN)) {
		if (!t.l4_ok) {
			learn_sightings.delete(&key);
			return 0;
		}
		s.flags |= LEARN_F_ESP_RX;
		s.esp_spi = t.esp_spi;
		s.esp_seq = t.esp_seq;
		if (t.proto == IPPROTO_UDP) {
			s.flags |= LEARN_F_UDP_ENCAP;
			s.encap_sport = t.sport;
			s.encap_dport = t.dport;
		}
		stat_inc(LEARN_STAT_RX_ESP);
	} else {
		s.saddr = t.saddr;
		s.daddr = t.daddr;
		s.sport = t.sport;
		s.dport = t.dport;
		s.proto = t.l4_ok ? t.proto : 0;
		__u32 spi = 0;
		if (skb_secpath(skb, &spi)) {
			/* Decrypted: keep the ESP facts and the first-receive time of the same skb.
			 */
			struct learn_sighting *prev = learn_sightings.lookup(&key);
			if (prev && (prev->flags & LEARN_F_ESP_RX) && prev->ifindex == ifindex &&
			    now - prev->ktime < LEARN_MAX_AGE_NS) {
				s.ktime = prev->ktime;
				s.esp_spi = prev->esp_spi;
				s.esp_seq = prev->esp_seq;
				s.encap_sport = prev->encap_sport;
				s.encap_dport = prev->encap_dport;
				s.flags |= prev->flags & (LEARN_F_ESP_RX | LEARN_F_UDP_ENCAP);
				stat_inc(LEARN_STAT_RX_DECRYPTED);
			}
			s.flags |= LEARN_F_SECPATH;
		}
	}
	learn_sightings.update(&key, &s);
	stat_inc(LEARN_STAT_RX);

	__u32 zero = 0;
	struct learn_last_rx *last = learn_last_rx.lookup(&zero);
	if (last) {
		last->skbaddr = key;
		last->ktime = now;
	}
	return 0;
}

TRACEPOINT_PROBE(fib, fib_table_lookup)
{
	__u32 zero = 0;

	if (args->err != 0)
		return 0;
	struct learn_last_rx *last = learn_last_rx.lookup(&zero);
	if (!last || !last->skbaddr || bpf_ktime_get_ns() - last->ktime > LEARN_FIB_WINDOW_NS)
		return 0;
	__u64 key = last->skbaddr;
	struct learn_sighting *s = learn_sightings.lookup(&key);
	/* First matching lookup only: the same packet is looked up again in the next namespace
	 * (veth), possibly on this CPU within the window. */
	if (!s || !s->proto || (s->flags & LEARN_F_FIB))
		return 0;
	if ((__u32)args->iif != s->ifindex &&
	    (!s->via_ifindex || (__u32)args->iif != s->via_ifindex))
		return 0;
	__u32 src = 0, dst = 0, gw = 0;
	__builtin_memcpy(&src, args->src, 4);
	__builtin_memcpy(&dst, args->dst, 4);
	__builtin_memcpy(&gw, args->gw4, 4);
	if (src != s->saddr || dst != s->daddr)
		return 0;
	/* The flow's protocol is only in the key when fib rules need it (fib4_rules_early_flow_
	 * dissect, net/ipv4/fib_rules.c): compare it when present. */
	if (args->proto && args->proto != s->proto)
		return 0;
	s->fib_tb_id = args->tb_id;
	s->fib_gw4 = gw;
	s->flags |= LEARN_F_FIB;
	stat_inc(LEARN_STAT_FIB_MATCH);
	return 0;
}

TRACEPOINT_PROBE(net, net_dev_start_xmit)
{
	void *skb = (void *)args->skbaddr;
	__u64 key = (__u64)skb;
	__u32 out_ifindex = 0, ino = 0;

	if (skb_dev(skb, &out_ifindex, &ino))
		return 0;
	__u32 out_role = watched_role(out_ifindex, ino);
	if (!out_role)
		return 0;
	struct learn_sighting *sp = learn_sightings.lookup(&key);
	if (!sp) {
		stat_inc(LEARN_STAT_TX_UNSIGHTED);
		return 0;
	}
	__u32 iif = 0;
	bpf_probe_read_kernel(&iif, sizeof(iif), skb + SKB_IIF_OFF);
	if (out_role == LEARN_ROLE_XFRMI) {
		/* Routed into an xfrm interface: xfrmi_xmit2 (net/xfrm/xfrm_interface*.c) clears
		 * skb_iif (xfrmi_scrub_packet) and sends the ESP by a WAN device next. Note the
		 * device and keep the sighting for that transmit. */
		if (iif == sp->ifindex)
			sp->via_ifindex = out_ifindex;
		return 0;
	}
	struct learn_sighting s = *sp;
	/* The skb leaves the namespace: whatever happens next is not this sighting any more. */
	learn_sightings.delete(&key);
	stat_inc(LEARN_STAT_TX_SIGHTED);

	__u64 now = bpf_ktime_get_ns();
	/* Through an xfrm interface skb_iif is 0 (encap: scrubbed on its transmit) or the
	 * interface (decap: received on it); the sighting's own device is the one to report. */
	if (iif != s.ifindex && !(s.via_ifindex && (iif == 0 || iif == s.via_ifindex))) {
		stat_inc(LEARN_STAT_TX_IIF_MISMATCH);
		return 0;
	}
	iif = s.ifindex;
	if (now - s.ktime > LEARN_MAX_AGE_NS) {
		stat_inc(LEARN_STAT_TX_STALE);
		return 0;
	}
	__u32 *in_rolep = learn_ifaces.lookup(&iif);
	__u32 in_role = in_rolep ? *in_rolep : 0;
	if (!((in_role == LEARN_ROLE_LAN && out_role == LEARN_ROLE_WAN) ||
	      (in_role == LEARN_ROLE_WAN && out_role == LEARN_ROLE_LAN))) {
		stat_inc(LEARN_STAT_TX_NOT_FORWARD);
		return 0;
	}

	/* At xmit skb->data is at the Ethernet header (neigh_output -> neigh_hh_output pushed it,
	 * include/net/neighbour.h). */
	void *data = NULL;
	__u32 headlen = 0;
	struct ethhdr eth = {};
	struct tuple tx = {};
	if (skb_linear(skb, &data, &headlen) || headlen < sizeof(eth) ||
	    bpf_probe_read_kernel(&eth, sizeof(eth), data) || eth.h_proto != bpf_htons(ETH_P_IP) ||
	    parse_ipv4(data + sizeof(eth), headlen - sizeof(eth), &tx)) {
		stat_inc(LEARN_STAT_TX_UNPARSED);
		return 0;
	}

	struct learn_event ev = {};
	ev.ktime_rx = s.ktime;
	ev.ktime_tx = now;
	ev.skbaddr = key;
	ev.netns_ino = ino;
	ev.in_ifindex = iif;
	ev.out_ifindex = out_ifindex;
	bpf_probe_read_kernel(&ev.tx_len, sizeof(ev.tx_len), skb + SKB_LEN_OFF);
	ev.flags = s.flags & (LEARN_F_ESP_RX | LEARN_F_FIB | LEARN_F_IP_OPTS | LEARN_F_UDP_ENCAP);
	ev.encap_sport = s.encap_sport;
	ev.encap_dport = s.encap_dport;
	ev.outer_saddr = tx.saddr;
	ev.outer_daddr = tx.daddr;
	ev.outer_proto = tx.proto;
	__builtin_memcpy(ev.eth_dst, eth.h_dest, ETH_ALEN);
	__builtin_memcpy(ev.eth_src, eth.h_source, ETH_ALEN);
	ev.fib_tb_id = s.fib_tb_id;
	ev.fib_gw4 = s.fib_gw4;
	ev.sp_len = skb_secpath(skb, &ev.sp_spi);
	if (ev.sp_len)
		ev.flags |= LEARN_F_SECPATH;

	/* The inner flow: as it was received in clear (encap: the only place it is readable). */
	if (s.proto) {
		ev.saddr = s.saddr;
		ev.daddr = s.daddr;
		ev.sport = s.sport;
		ev.dport = s.dport;
		ev.proto = s.proto;
	} else if (in_role == LEARN_ROLE_WAN && tx.proto != IPPROTO_ESP && tx.l4_ok) {
		/* Decap whose clear re-receive was not seen: the frame sent is the inner packet. */
		ev.saddr = tx.saddr;
		ev.daddr = tx.daddr;
		ev.sport = tx.sport;
		ev.dport = tx.dport;
		ev.proto = tx.proto;
	} else {
		stat_inc(LEARN_STAT_TX_UNPARSED);
		return 0;
	}

	__u32 spi = 0;
	if (in_role == LEARN_ROLE_LAN) {
		if ((tx.proto == IPPROTO_ESP || tx.udp_esp) && tx.l4_ok) {
			ev.direction = LEARN_DIR_ENCAP;
			ev.flags |= LEARN_F_ESP_TX;
			if (tx.udp_esp) { /* NAT-T: the SA's ports, checked by the controller */
				ev.flags |= LEARN_F_UDP_ENCAP;
				ev.encap_sport = tx.sport;
				ev.encap_dport = tx.dport;
			}
			ev.esp_spi = tx.esp_spi;
			ev.esp_seq = tx.esp_seq;
			__builtin_memcpy(ev.esp_iv, tx.esp_iv, 8);
			spi = tx.esp_spi;
		} else {
			ev.direction = LEARN_DIR_CLEAR_OUT;
		}
	} else {
		if (tx.proto == IPPROTO_ESP ||
		    tx.udp_esp) { /* ESP in, ESP out: transit, not ours */
			stat_inc(LEARN_STAT_TX_NOT_FORWARD);
			return 0;
		}
		if (s.flags & LEARN_F_ESP_RX) {
			ev.esp_spi = s.esp_spi;
			ev.esp_seq = s.esp_seq;
		}
		if (ev.flags & (LEARN_F_ESP_RX | LEARN_F_SECPATH)) {
			ev.direction = LEARN_DIR_DECAP;
			spi = ev.sp_len ? ev.sp_spi : ev.esp_spi;
		} else {
			ev.direction = LEARN_DIR_CLEAR_IN;
		}
	}
	/* A clear frame that left different from how it came (SNAT/DNAT, port rewrite): the
	 * fastpath bypasses netfilter and could not reproduce it. */
	if (ev.direction != LEARN_DIR_ENCAP &&
	    (!tx.l4_ok || tx.saddr != ev.saddr || tx.daddr != ev.daddr || tx.proto != ev.proto ||
	     tx.sport != ev.sport || tx.dport != ev.dport))
		ev.flags |= LEARN_F_MANGLED;

	struct learn_flow_key fk = {};
	fk.saddr = ev.saddr;
	fk.daddr = ev.daddr;
	fk.sport = ev.sport;
	fk.dport = ev.dport;
	fk.proto = ev.proto;
	fk.direction = ev.direction;
	fk.spi = spi;
	__u64 *last = learn_emitted.lookup(&fk);
	if (last && now - *last < LEARN_REEMIT_NS) {
		stat_inc(LEARN_STAT_SUPPRESSED);
		return 0;
	}
	learn_emitted.update(&fk, &now);
	if (learn_events.perf_submit(args, &ev, sizeof(ev)) == 0)
		stat_inc(LEARN_STAT_EMITTED);
	else
		stat_inc(LEARN_STAT_PERF_FAIL);
	return 0;
}
