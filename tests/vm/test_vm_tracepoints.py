# SPDX-License-Identifier: GPL-2.0-only
"""BCC tracepoints in the real kernel see gw1 forward a packet into the ESP tunnel:
`fib:fib_table_lookup` the forwarding decision, `net:net_dev_start_xmit` the ESP frame leaving
on `wan`, with the same sk_buff that `net:netif_receive_skb` saw arrive (clear) on `lan`.

The program is compiled once per session (about 40 s in the VM) and shared by the tests:
tracepoints are global, so it runs in this process and filters on the test bed's addresses
and device names (each test resets its maps)."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterator

import pytest

from testbed.bed import Testbed
from testbed.static_esp import install_static_esp

pytestmark = pytest.mark.vm

PINGS = 5
ICMP_ECHO_LEN = 84  # IPv4 20 + ICMP 8 + 56 data

PROG = r"""
#include <uapi/linux/bpf.h>

struct cfg {
    u32 dst;      /* REMOTE_HOST, network order */
    u32 lan_iif;  /* gw1's `lan` ifindex (in gw1's namespace) */
};
/* Written by the test before the traffic; read by every probe. */
BPF_ARRAY(cfg, struct cfg, 1);
/* 0: forwarding lookups lan -> REMOTE_HOST via wan; 1: skbs received on a `lan` device;
 * 2: frames sent on a `wan` device that were received on `lan` (same skb pointer). */
BPF_ARRAY(counts, u64, 3);
/* Length of each matched `wan` frame -> how many: the ESP overhead shows in it. */
BPF_HASH(xmit_len, u32, u64, 64);
/* skb pointers seen at receive on `lan`, waiting for their transmit. */
BPF_HASH(rx_skbs, u64, u64, 1024);

static __always_inline void bump(int i) {
    u64 *v = counts.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}

static __always_inline int is_dev(const char *name, char a, char b, char c) {
    return name[0] == a && name[1] == b && name[2] == c && name[3] == 0;
}

TRACEPOINT_PROBE(fib, fib_table_lookup) {
    int zero = 0;
    struct cfg *c = cfg.lookup(&zero);
    if (!c || args->err != 0 || args->iif != c->lan_iif)
        return 0;
    u32 dst;
    __builtin_memcpy(&dst, args->dst, 4);
    char name[4];
    __builtin_memcpy(name, args->name, 4);
    if (dst == c->dst && is_dev(name, 'w', 'a', 'n'))
        bump(0);
    return 0;
}

TRACEPOINT_PROBE(net, netif_receive_skb) {
    char name[4] = {};
    TP_DATA_LOC_READ_CONST(name, name, 4);
    if (!is_dev(name, 'l', 'a', 'n'))
        return 0;
    u64 skb = (u64)args->skbaddr, one = 1;
    rx_skbs.update(&skb, &one);
    bump(1);
    return 0;
}

TRACEPOINT_PROBE(net, net_dev_start_xmit) {
    char name[4] = {};
    TP_DATA_LOC_READ_CONST(name, name, 4);
    if (!is_dev(name, 'w', 'a', 'n'))
        return 0;
    u64 skb = (u64)args->skbaddr;
    if (!rx_skbs.lookup(&skb))
        return 0;
    rx_skbs.delete(&skb);
    bump(2);
    u32 len = args->len;
    u64 zero = 0, *n = xmit_len.lookup_or_try_init(&len, &zero);
    if (n)
        __sync_fetch_and_add(n, 1);
    return 0;
}
"""


def esp_frame_len(inner: int, icv: int = 16) -> int:
    """Ethernet frame length of an inner IPv4 packet in ESP tunnel mode with ChaCha20-Poly1305:
    outer IPv4 20 + SPI/seq 8 + IV 8 (RFC 7634 section 2) + inner + padding to 4 bytes
    (RFC 4303 section 2.4; ChaCha20 is a stream cipher, block size 1) + pad length and next
    header 2 + ICV 16."""
    pad = (-(inner + 2)) % 4
    return 14 + 20 + 8 + 8 + inner + pad + 2 + icv


@pytest.fixture(scope="session")
def probe(esp_kernel: None) -> Iterator[object]:
    """The tracepoint program, compiled and attached once for the whole session."""
    # imported here: host runs that skip these tests need no BCC
    from controller.datapath.loader import compile_bpf

    b = compile_bpf(text=PROG)  # its TRACEPOINT_PROBEs are attached as it compiles
    try:
        yield b
    finally:
        b.cleanup()


def arm(probe, bed: Testbed) -> None:
    for name in (b"rx_skbs", b"xmit_len"):
        probe[name].clear()
    counts = probe[b"counts"]
    for i in range(3):
        counts[ctypes.c_int(i)] = ctypes.c_uint64(0)
    dst = int.from_bytes(socket.inet_aton(bed.addr("REMOTE_HOST")), "little")
    c = probe[b"cfg"]
    c[ctypes.c_int(0)] = c.Leaf(dst, bed.ifindex("gw1", "lan"))


def count(probe, i: int) -> int:
    return probe[b"counts"][ctypes.c_int(i)].value


def test_fib_table_lookup_sees_forwarding_decision(probe, bed: Testbed) -> None:
    install_static_esp(bed)
    arm(probe, bed)
    assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=PINGS), "lan reaches remote"
    lookups = count(probe, 0)
    assert lookups >= PINGS, f"fib:fib_table_lookup saw gw1 route {PINGS} packets via wan"
    # One input route lookup per forwarded packet; allow for the kernel looking twice.
    assert lookups <= 2 * PINGS, f"only this test's packets matched: {lookups}"


def test_net_dev_start_xmit_sees_forwarded_skb_leave_as_esp(probe, bed: Testbed) -> None:
    install_static_esp(bed)
    arm(probe, bed)
    assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=PINGS), "lan reaches remote"
    received, matched = count(probe, 1), count(probe, 2)
    # Requests: received on gw1 `lan`, sent on gw1 `wan`; replies the same way through gw2.
    assert received >= 2 * PINGS, f"netif_receive_skb saw both gateways' lan side: {received}"
    assert matched == 2 * PINGS, (
        f"net_dev_start_xmit saw each forwarded skb leave on wan (same skb pointer): {matched}"
    )
    lens = {k.value: v.value for k, v in probe[b"xmit_len"].items()}
    want = esp_frame_len(ICMP_ECHO_LEN)
    assert lens == {want: 2 * PINGS}, f"every such frame is ESP-sized ({want} bytes): {lens}"
