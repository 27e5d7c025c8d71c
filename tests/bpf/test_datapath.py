# SPDX-License-Identifier: GPL-2.0-only
"""The XDP datapath through BPF_PROG_TEST_RUN: tables of (description, input frame, expected
verdict, expected output or check), every punt and drop class with its counter, encap output
opened by `cryptography`, ESP sealed by `cryptography` decapsulated by XDP to the exact expected
frame, the anti-replay window (RFC 4303 section 3.4.3 and appendix A), random lengths.

BPF_PROG_TEST_RUN runs in this process's network namespace, where the frame appears to arrive
on the loopback device (net/bpf/test_run.c): flow keys use its ifindex, and redirects go to a
devmap entry for it (nothing is transmitted: the kernel only reports the verdict)."""

from __future__ import annotations

import ctypes
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import packets as P
import pytest
from cryptography.exceptions import InvalidTag

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.bpfsys import prog_test_run
from controller.datapath.xdp import Datapath, InboundSa, OutboundSa, flow_key, flow_val

XDP_DROP, XDP_PASS, XDP_REDIRECT = 1, 2, 4
LO = socket.if_nametoindex("lo")

# Test bed addressing (testbed/addresses.env), MACs of testbed/bed.py.
LAN_HOST, REMOTE_HOST = "10.1.0.2", "10.2.0.2"
GW1_WAN, GW2_WAN = "192.0.2.1", "192.0.2.2"
GW1_LAN_MAC, LAN_HOST_MAC = "02:00:0a:01:00:01", "02:00:0a:01:00:02"
GW1_WAN_MAC, GW2_WAN_MAC = "02:00:c0:00:02:01", "02:00:c0:00:02:02"

KEY_OUT = bytes(range(0x40, 0x40 + 36))
KEY_IN = bytes(range(0x80, 0x80 + 36))
SPI_OUT, SPI_IN = 0x1000, 0x2000
SA_OUT_ID, SA_IN_ID = 1, 2


@pytest.fixture(scope="module")
def dp() -> Iterator[Datapath]:
    d = Datapath(pin_dir=f"/sys/fs/bpf/xfp-test-{os.getpid()}")
    try:
        d.load()
        yield d
    finally:
        d.close()
        d.unpin()


def _clear(d: Datapath) -> None:
    for name in ("flows", "sa_out", "sa_in", "watchdog"):
        for key in list(d.maps[name].keys()):
            d.maps[name].delete(key)


def out_sa(**kw) -> OutboundSa:
    base = dict(
        sa_id=SA_OUT_ID,
        spi=SPI_OUT,
        saddr=GW1_WAN,
        daddr=GW2_WAN,
        key=KEY_OUT,
        egress_ifindex=LO,
        dmac=GW2_WAN_MAC,
        smac=GW1_WAN_MAC,
        mtu=1500,
    )
    base.update(kw)
    return OutboundSa(**base)


def in_sa(**kw) -> InboundSa:
    base = dict(sa_id=SA_IN_ID, spi=SPI_IN, saddr=GW2_WAN, daddr=GW1_WAN, key=KEY_IN)
    base.update(kw)
    return InboundSa(**base)


ENCAP_KEY = dict(proto=P.IPPROTO_UDP, saddr=LAN_HOST, daddr=REMOTE_HOST, sport=1000, dport=2000)
DECAP_KEY = dict(proto=P.IPPROTO_UDP, saddr=REMOTE_HOST, daddr=LAN_HOST, sport=2000, dport=1000)


@pytest.fixture
def env(dp: Datapath) -> Iterator[Datapath]:
    """The datapath with one SA and one flow each way, as a controller would install them."""
    _clear(dp)
    dp.put_tx_port(LO)
    dp.put_outbound_sa(out_sa())
    dp.put_inbound_sa(in_sa())
    dp.put_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY), flow_val(SA_OUT_ID))
    dp.put_flow(
        flow_key(LO, Direction.DECAP, **DECAP_KEY),
        flow_val(SA_IN_ID, egress_ifindex=LO, dmac=LAN_HOST_MAC, smac=GW1_LAN_MAC),
    )
    yield dp
    _clear(dp)


def clear_frame(payload: bytes = b"hello", **ipkw) -> bytes:
    """A LAN frame of the encap flow (lan host -> remote host, UDP 1000 -> 2000)."""
    inner = P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_UDP, P.udp(1000, 2000, payload), **ipkw)
    return P.eth(GW1_LAN_MAC, LAN_HOST_MAC) + inner


def inner_packet(payload: bytes = b"hello", **ipkw) -> bytes:
    """An inner packet of the decap flow (remote host -> lan host, UDP 2000 -> 1000)."""
    return P.ipv4(REMOTE_HOST, LAN_HOST, P.IPPROTO_UDP, P.udp(2000, 1000, payload), **ipkw)


def esp_frame(
    inner: bytes, seq: int, *, sa: P.EspSa | None = None, tos: int = 0, **sealkw
) -> bytes:
    """A WAN frame: ESP of `inner` on the inbound SA, gw2 -> gw1."""
    sa = sa or P.EspSa(SPI_IN, KEY_IN)
    esp = sa.seal(seq, inner, **sealkw)
    outer = P.ipv4(GW2_WAN, GW1_WAN, P.IPPROTO_ESP, esp, tos=tos)
    return P.eth(GW1_WAN_MAC, GW2_WAN_MAC) + outer


class Counters:
    """Counter deltas around a block of test runs."""

    def __init__(self, d: Datapath) -> None:
        self.d = d
        self.before = d.stats()

    def delta(self) -> dict[tuple[Direction, Reason], tuple[int, int]]:
        after = self.d.stats()
        return {
            k: (after[k][0] - self.before[k][0], after[k][1] - self.before[k][1])
            for k in after
            if after[k] != self.before[k]
        }


def run(fd: int, frame: bytes) -> tuple[int, bytes]:
    ret, out, _ = prog_test_run(fd, frame)
    return ret, out


# ---- encap -------------------------------------------------------------------------------------
def check_encap_output(frame_in: bytes, out: bytes, seq: int, iv_mask: int = 0) -> bytes:
    """Every outer field of an encapsulated frame; returns the decrypted inner packet (the
    input's IPv4 packet, up to its total length: an Ethernet trailer is not part of it)."""
    inner_in = frame_in[14 : 14 + struct.unpack("!H", frame_in[16:18])[0]]
    assert out[:14] == P.eth(GW2_WAN_MAC, GW1_WAN_MAC), "L2 rewritten to the SA's next hop"
    ip = out[14:34]
    assert ip[0] == 0x45, "outer IPv4, no options"
    assert struct.unpack("!H", ip[2:4])[0] == len(out) - 14, "outer total length = frame - 14"
    assert P.csum(ip) == 0, "outer header checksum valid"
    assert struct.unpack("!H", ip[4:6])[0] == seq & 0xFFFF, "outer id from the sequence number"
    assert struct.unpack("!H", ip[6:8])[0] == (struct.unpack("!H", inner_in[6:8])[0] & P.IP_DF), (
        "outer DF copied from the inner header, no fragment bits"
    )
    assert ip[8] == 64, "outer TTL 64"
    assert ip[9] == P.IPPROTO_ESP, "outer protocol ESP"
    assert ip[12:16] == socket.inet_aton(GW1_WAN), "outer source = SA saddr"
    assert ip[16:20] == socket.inet_aton(GW2_WAN), "outer destination = SA daddr"
    assert ip[1] == inner_in[1], "outer TOS (DSCP and ECN) copied (RFC 6040 normal mode)"
    sa = P.EspSa(SPI_OUT, KEY_OUT)
    got_seq, iv, plain = sa.open(out[34:])
    assert got_seq == seq, f"ESP sequence number {got_seq} is {seq}"
    assert iv == struct.pack("!Q", seq ^ iv_mask), "IV = seq XOR iv_mask, big endian"
    padlen, nh = plain[-2], plain[-1]
    assert nh == P.IPPROTO_IPIP, "next header 4 (tunnel mode, IPv4)"
    assert padlen == P.esp_padlen(len(inner_in)), "pad as esp4.c (payload + 2 aligned to 4)"
    assert plain[-2 - padlen : -2] == bytes(range(1, padlen + 1)), "pad bytes 1, 2, 3..."
    inner = plain[: -2 - padlen]
    assert inner == P.ip_ttl_dec(inner_in), "inner packet intact, TTL - 1, checksum updated"
    return inner


def test_encap_udp_then_sequence_advances(env: Datapath) -> None:
    c = Counters(env)
    frame = clear_frame(b"x" * 37, tos=0xB8 | 2)  # DSCP EF, ECT(0)
    for seq in (1, 2, 3):
        ret, out = run(env.encap_fd, frame)
        assert ret == XDP_REDIRECT, f"packet {seq} redirected (got {ret})"
        check_encap_output(frame, out, seq)
    sa = env.outbound_sa(SA_OUT_ID)
    assert sa.seq == 4, "next sequence number 4 after three packets"
    assert (sa.packets, sa.bytes) == (3, 3 * (len(frame) - 14)), "SA lifetime counters"
    fv = env.get_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY))
    assert fv.packets == 3 and fv.last_seen_ns > 0, "flow counters and last seen"
    assert c.delta() == {(Direction.ENCAP, Reason.ENCAP_OK): (3, 3 * len(frame))}, (
        "3 encap hits only"
    )


def test_encap_flow_carries_its_outer_next_hop(env: Datapath) -> None:
    """A flow installed with its own outer next hop (as the controller installs them, so a
    neighbour or route change followed by a re-learn takes effect while the SA entry and its
    sequence counter stay) leaves with that L2 header and MTU, not the SA's."""
    other_mac = "02:00:00:00:00:99"
    key = flow_key(LO, Direction.ENCAP, **ENCAP_KEY)
    env.put_flow(key, flow_val(SA_OUT_ID, LO, other_mac, GW1_WAN_MAC, mtu=1500))
    frame = clear_frame(b"next hop")
    ret, out = run(env.encap_fd, frame)
    assert ret == XDP_REDIRECT, "redirected"
    want = P.eth(other_mac, GW1_WAN_MAC)[:12]
    assert out[:12] == want, "the flow's outer next hop, not the SA's"
    env.put_flow(key, flow_val(SA_OUT_ID, LO, other_mac, GW1_WAN_MAC, mtu=60))
    assert run(env.encap_fd, frame) == (XDP_PASS, frame), "the flow's outer MTU applies"


def test_encap_ce_iv_mask_and_ethernet_padding(env: Datapath) -> None:
    env.put_outbound_sa(out_sa(iv_mask=0x0123456789ABCDEF, seq=77))
    frame = clear_frame(b"", tos=3, frag=0)  # CE, no DF; 46-byte frame...
    padded = frame + b"\0" * (60 - len(frame))  # ...padded to the Ethernet minimum
    ret, out = run(env.encap_fd, padded)
    assert ret == XDP_REDIRECT, "redirected"
    check_encap_output(frame, out, 77, iv_mask=0x0123456789ABCDEF)


def test_encap_icmp_and_tcp_flows(env: Datapath) -> None:
    env.put_flow(
        flow_key(LO, Direction.ENCAP, P.IPPROTO_ICMP, LAN_HOST, REMOTE_HOST, 0x4242, 8 << 8),
        flow_val(SA_OUT_ID),
    )
    env.put_flow(
        flow_key(LO, Direction.ENCAP, P.IPPROTO_TCP, LAN_HOST, REMOTE_HOST, 5555, 80),
        flow_val(SA_OUT_ID),
    )
    eth = P.eth(GW1_LAN_MAC, LAN_HOST_MAC)
    ping = eth + P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_ICMP, P.icmp_echo(0x4242, 1, b"p" * 56))
    other_id = eth + P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_ICMP, P.icmp_echo(0x4343, 1))
    syn = eth + P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_TCP, P.tcp(5555, 80))
    assert run(env.encap_fd, ping)[0] == XDP_REDIRECT, "ICMP echo of the flow's identifier"
    assert run(env.encap_fd, other_id) == (XDP_PASS, other_id), "another identifier: punted"
    ret, out = run(env.encap_fd, syn)
    assert ret == XDP_REDIRECT, "TCP flow encapsulated"
    check_encap_output(syn, out, 2)


@dataclass
class Case:
    desc: str
    frame: bytes | Callable[[], bytes]
    reason: Reason
    setup: Callable[[Datapath], None] | None = None


def _frag(frame: bytes) -> bytes:
    return clear_frame(frag=P.IP_MF)


ENCAP_PUNTS = [
    Case(
        "ARP",
        P.eth("ff:ff:ff:ff:ff:ff", LAN_HOST_MAC, P.ETH_P_ARP) + bytes(28),
        Reason.PASS_NOT_IPV4,
    ),
    Case("IPv6", P.eth(GW1_LAN_MAC, LAN_HOST_MAC, P.ETH_P_IPV6) + bytes(60), Reason.PASS_NOT_IPV4),
    Case("IPv4 type, no header", P.eth(GW1_LAN_MAC, LAN_HOST_MAC), Reason.PASS_MALFORMED_IP),
    Case(
        "IPv4 of the flow to the broadcast MAC",
        P.eth("ff:ff:ff:ff:ff:ff", LAN_HOST_MAC) + clear_frame()[14:],
        Reason.PASS_NOT_IPV4,
    ),
    Case(
        "IPv4 of the flow to a multicast MAC",
        P.eth("01:00:5e:00:00:01", LAN_HOST_MAC) + clear_frame()[14:],
        Reason.PASS_NOT_IPV4,
    ),
    Case("truncated IPv4", clear_frame()[:30], Reason.PASS_MALFORMED_IP),
    Case("total length past frame", clear_frame(tot_len=200), Reason.PASS_MALFORMED_IP),
    Case("IP options", clear_frame(options=b"\x01\x01\x01\x00"), Reason.PASS_IP_OPTIONS),
    Case("header checksum wrong", clear_frame(check=0x1234), Reason.PASS_MALFORMED_IP),
    Case("first fragment", clear_frame(frag=P.IP_MF), Reason.PASS_FRAGMENT),
    Case("later fragment", clear_frame(frag=100), Reason.PASS_FRAGMENT),
    Case(
        "unknown flow",
        P.eth(GW1_LAN_MAC, LAN_HOST_MAC)
        + P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_UDP, P.udp(1001, 2000, b"x")),
        Reason.PASS_UNKNOWN_FLOW,
    ),
    Case("TTL 1", clear_frame(ttl=1), Reason.PASS_TTL),
    Case("too big for the MTU", clear_frame(b"x" * 1430), Reason.PASS_MTU),
    Case(
        "SA past its deadline",
        clear_frame(),
        Reason.PASS_SA_EXPIRED,
        lambda d: d.refresh_watchdog(SA_OUT_ID, time.clock_gettime_ns(time.CLOCK_MONOTONIC) - 1),
    ),
    Case(
        "SA without watchdog",
        clear_frame(),
        Reason.PASS_SA_EXPIRED,
        lambda d: d.maps["watchdog"].delete(defs_u32(SA_OUT_ID)),
    ),
    Case(
        "SA not offloaded",
        clear_frame(),
        Reason.PASS_SA_NOT_OFFLOADED,
        lambda d: d.put_outbound_sa(out_sa(offload=False)),
    ),
    Case("no SA entry", clear_frame(), Reason.PASS_NO_SA, lambda d: d.delete_outbound_sa(1)),
    Case(
        "sequence space exhausted (no ESN)",
        clear_frame(),
        Reason.PASS_SEQ_EXHAUSTED,
        lambda d: d.put_outbound_sa(out_sa(seq=1 << 32, seq_limit=1 << 40)),
    ),
    Case(
        "sequence limit reached",
        clear_frame(),
        Reason.PASS_SEQ_EXHAUSTED,
        lambda d: d.put_outbound_sa(out_sa(seq=500, seq_limit=500)),
    ),
    Case(
        "flow disabled",
        clear_frame(),
        Reason.PASS_FLOW_DISABLED,
        lambda d: d.put_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY), flow_val(1, active=False)),
    ),
]


def defs_u32(v: int) -> ctypes.c_uint32:
    return ctypes.c_uint32(v)


@pytest.mark.parametrize("case", ENCAP_PUNTS, ids=lambda c: c.desc)
def test_encap_punts_untouched_and_counted(env: Datapath, case: Case) -> None:
    if case.setup:
        case.setup(env)
    frame = case.frame() if callable(case.frame) else case.frame
    c = Counters(env)
    ret, out = run(env.encap_fd, frame)
    assert ret == XDP_PASS, f"{case.desc}: XDP_PASS (got {ret})"
    assert out == frame, f"{case.desc}: frame untouched"
    assert c.delta() == {(Direction.ENCAP, case.reason): (1, len(frame))}, f"{case.desc}: counter"


def test_encap_exact_mtu_fits(env: Datapath) -> None:
    # 1500 = 36 (outer IPv4, ESP, IV) + inner + pad + 2 + 16: inner 1446 -> pad 0.
    payload = b"m" * (1446 - 28)
    ret, out = run(env.encap_fd, clear_frame(payload))
    assert ret == XDP_REDIRECT and len(out) == 14 + 1500, "a 1500-byte outer packet is sent"
    ret, _ = run(env.encap_fd, clear_frame(payload + b"m"))
    assert ret == XDP_PASS, "one byte more is the kernel's (it fragments or sends ICMP)"


def test_encap_random_lengths_open_with_cryptography(env: Datapath) -> None:
    env.put_outbound_sa(out_sa(mtu=1600))
    rng = random.Random(7)
    lengths = list(range(0, 64)) + [rng.randrange(0, 1501) for _ in range(150)] + [1499, 1500]
    for seq, n in enumerate(lengths, start=1):
        frame = clear_frame(rng.randbytes(n))
        ret, out = run(env.encap_fd, frame)
        assert ret == XDP_REDIRECT, f"payload {n}: redirected"
        check_encap_output(frame, out, seq)


def test_encap_esn_aad_uses_high_bits(env: Datapath) -> None:
    seq = (5 << 32) | 0xFFFFFFFF
    env.put_outbound_sa(out_sa(esn=True, seq=seq, seq_limit=1 << 63))
    frame = clear_frame(b"esn")
    for s in (seq, seq + 1):
        ret, out = run(env.encap_fd, frame)
        assert ret == XDP_REDIRECT, "ESN SA encapsulates past 2^32"
        assert struct.unpack("!I", out[38:42])[0] == s & 0xFFFFFFFF, "low 32 bits on the wire"
        esn = P.EspSa(SPI_OUT, KEY_OUT, esn=True)
        got, _, _ = esn.open(out[34:], seq_hi=s >> 32)
        assert got == s, "AAD = SPI || seq_hi || seq_lo"
        with pytest.raises(InvalidTag):
            P.EspSa(SPI_OUT, KEY_OUT).open(out[34:])  # without the high bits: not authentic


# ---- decap -------------------------------------------------------------------------------------
def expected_decap(inner: bytes) -> bytes:
    return P.eth(LAN_HOST_MAC, GW1_LAN_MAC) + P.ip_ttl_dec(inner)


def test_decap_to_exact_inner_frame(env: Datapath) -> None:
    c = Counters(env)
    inner = inner_packet(b"payload!")
    frame = esp_frame(inner, 1)
    ret, out = run(env.decap_fd, frame)
    assert ret == XDP_REDIRECT, f"redirected (got {ret})"
    assert out == expected_decap(inner), "exactly the inner packet, TTL - 1, new L2"
    sa = env.inbound_sa(SPI_IN, GW1_WAN)
    assert (sa.seq_top, sa.packets) == (1, 1), "window top and SA counter moved"
    assert c.delta() == {(Direction.DECAP, Reason.DECAP_OK): (1, len(frame))}, "one decap hit"


def test_decap_random_lengths_sealed_by_cryptography(env: Datapath) -> None:
    rng = random.Random(11)
    lengths = list(range(0, 64)) + [rng.randrange(0, 1501) for _ in range(150)] + [1499, 1500]
    for seq, n in enumerate(lengths, start=1):
        inner = inner_packet(rng.randbytes(n))
        ret, out = run(env.decap_fd, esp_frame(inner, seq))
        assert ret == XDP_REDIRECT, f"payload {n}: redirected"
        assert out == expected_decap(inner), f"payload {n}: exact inner frame"


def test_decap_long_pad_and_ethernet_trailer(env: Datapath) -> None:
    inner = inner_packet(b"q" * 10)
    for seq, padlen in enumerate((83, 255, 8, 9, 16), start=1):
        pad = bytes(range(1, 1 + padlen))  # a peer may pad more (RFC 4303 section 2.4)
        frame = esp_frame(inner, seq, pad=pad) + b"\0" * 6  # and the link may add a trailer
        ret, out = run(env.decap_fd, frame)
        assert ret == XDP_REDIRECT, f"padding of {padlen} accepted"
        assert out == expected_decap(inner), f"pad of {padlen} and trailer removed"
    for seq, (padlen, bad) in enumerate(((255, 254), (255, 200), (83, 64), (9, 8)), start=10):
        pad = bytearray(range(1, 1 + padlen))
        pad[bad] ^= 0x40
        ret, _ = run(env.decap_fd, esp_frame(inner, seq, pad=bytes(pad)))
        assert ret == XDP_DROP, f"pad of {padlen} with byte {bad} wrong: dropped"


@pytest.mark.parametrize(
    ("outer_tos", "inner_tos", "result"),
    [
        (0, 0, 0),
        (3, 2, 3),  # outer CE over ECT(0): CE
        (3, 1, 3),
        (1, 2, 1),  # outer ECT(1) over ECT(0): ECT(1)
        (2, 1, 1),  # outer ECT(0) over ECT(1): unchanged
        (0, 3, 3),  # inner CE stays
        (0xB8 | 2, 0x28 | 2, 0x28 | 2),  # DSCP of the inner header is kept
        (3, 0, None),  # outer CE over Not-ECT: drop
    ],
)
def test_decap_ecn_rfc6040(env: Datapath, outer_tos: int, inner_tos: int, result) -> None:
    c = Counters(env)
    inner = inner_packet(b"ecn", tos=inner_tos)
    ret, out = run(env.decap_fd, esp_frame(inner, 1, tos=outer_tos))
    if result is None:
        assert ret == XDP_DROP, "RFC 6040 section 4.2: CE over Not-ECT is dropped"
        assert (Direction.DECAP, Reason.DROP_ECN) in c.delta(), "counted as DROP_ECN"
        return
    assert ret == XDP_REDIRECT, "forwarded"
    assert out == expected_decap(P.ip_set_tos(inner, result)), f"inner TOS {result:#x}"


def _bad_icv_frame() -> bytes:
    f = bytearray(esp_frame(inner_packet(), 1))
    f[60] ^= 1
    return bytes(f)


def _short_esp() -> bytes:
    esp = struct.pack("!II", SPI_IN, 1) + bytes(8 + 10 + 16)
    return P.eth(GW1_WAN_MAC, GW2_WAN_MAC) + P.ipv4(GW2_WAN, GW1_WAN, P.IPPROTO_ESP, esp)


def _outer_csum_bad() -> bytes:
    f = bytearray(esp_frame(inner_packet(), 1))
    f[24:26] = b"\x12\x34"  # the outer header checksum (tests/bpf/test_fuzz_datapath.py found it)
    return bytes(f)


def _inner_csum_bad() -> bytes:
    return esp_frame(inner_packet(check=0x1234), 1)


DECAP_CASES = [
    Case(
        "not ESP",
        P.eth(GW1_WAN_MAC, GW2_WAN_MAC)
        + P.ipv4(GW2_WAN, GW1_WAN, P.IPPROTO_UDP, P.udp(4500, 4500, b"x")),
        Reason.PASS_NOT_ESP,
    ),
    Case(
        "unknown SPI",
        lambda: esp_frame(inner_packet(), 1, sa=P.EspSa(0x9999, KEY_IN)),
        Reason.PASS_UNKNOWN_SPI,
    ),
    Case(
        "ESP too short for an SPI",
        P.eth(GW1_WAN_MAC, GW2_WAN_MAC) + P.ipv4(GW2_WAN, GW1_WAN, P.IPPROTO_ESP, b"\0\0\x20"),
        Reason.PASS_MALFORMED_IP,
    ),
    Case("outer header checksum wrong", _outer_csum_bad, Reason.PASS_MALFORMED_IP),
    Case(
        "outer fragment",
        lambda: esp_frame(inner_packet(), 1)[:20] + b"\x20\x00" + esp_frame(inner_packet(), 1)[22:],
        Reason.PASS_FRAGMENT,
    ),
    Case(
        "SA not offloaded",
        lambda: esp_frame(inner_packet(), 1),
        Reason.PASS_SA_NOT_OFFLOADED,
        lambda d: d.put_inbound_sa(in_sa(offload=False)),
    ),
    Case(
        "SA past its deadline",
        lambda: esp_frame(inner_packet(), 1),
        Reason.PASS_SA_EXPIRED,
        lambda d: d.refresh_watchdog(SA_IN_ID, 1),
    ),
    Case(
        "inner flow unknown",
        lambda: esp_frame(
            P.ipv4(REMOTE_HOST, LAN_HOST, P.IPPROTO_UDP, P.udp(2001, 1000, b"z")),
            1,
        ),
        Reason.PASS_INNER_MISS,
    ),
    Case("inner TTL 1", lambda: esp_frame(inner_packet(ttl=1), 1), Reason.PASS_TTL),
    Case("inner fragment", lambda: esp_frame(inner_packet(frag=P.IP_MF), 1), Reason.PASS_FRAGMENT),
    Case(
        "inner IP options",
        lambda: esp_frame(inner_packet(options=b"\x01" * 4), 1),
        Reason.PASS_IP_OPTIONS,
    ),
    Case(
        "inner IPv6",
        lambda: esp_frame(b"\x60" + bytes(47), 1, nexthdr=41),
        Reason.PASS_NOT_IPV4,
    ),
    Case(
        "inner flow of another SA",
        lambda: esp_frame(inner_packet(), 1),
        Reason.PASS_SA_MISMATCH,
        lambda d: d.put_flow(
            flow_key(LO, Direction.DECAP, **DECAP_KEY),
            flow_val(99, egress_ifindex=LO, dmac=LAN_HOST_MAC, smac=GW1_LAN_MAC),
        ),
    ),
    Case(
        "inner too big for the LAN MTU",
        lambda: esp_frame(inner_packet(b"b" * 100), 1),
        Reason.PASS_MTU,
        lambda d: d.put_flow(
            flow_key(LO, Direction.DECAP, **DECAP_KEY),
            flow_val(SA_IN_ID, egress_ifindex=LO, dmac=LAN_HOST_MAC, smac=GW1_LAN_MAC, mtu=100),
        ),
    ),
    Case("bad ICV", _bad_icv_frame, Reason.DROP_BAD_ICV),
    Case(
        "wrong key",
        lambda: esp_frame(inner_packet(), 1, sa=P.EspSa(SPI_IN, KEY_OUT)),
        Reason.DROP_BAD_ICV,
    ),
    Case("replayed sequence 0", lambda: esp_frame(inner_packet(), 0), Reason.DROP_REPLAY),
    Case("payload too short for tunnel mode", _short_esp, Reason.DROP_MALFORMED_ESP),
    Case(
        "next header not 4",
        lambda: esp_frame(inner_packet(), 1, nexthdr=41),
        Reason.DROP_BAD_TRAILER,
    ),
    Case(
        "pad bytes not 1,2,3",
        lambda: esp_frame(inner_packet(b"abc"), 1, pad=b"\x01\x09"),
        Reason.DROP_BAD_TRAILER,
    ),
    Case(
        "pad length disagrees with inner length",
        lambda: esp_frame(inner_packet(b"abcd")[:-4], 1),
        Reason.DROP_BAD_INNER,
    ),
    Case("inner checksum wrong", _inner_csum_bad, Reason.DROP_BAD_INNER),
]


@pytest.mark.parametrize("case", DECAP_CASES, ids=lambda c: c.desc)
def test_decap_punts_and_drops_counted(env: Datapath, case: Case) -> None:
    if case.setup:
        case.setup(env)
    frame = case.frame() if callable(case.frame) else case.frame
    c = Counters(env)
    top_before = env.inbound_sa(SPI_IN, GW1_WAN)
    ret, out = run(env.decap_fd, frame)
    verdict = XDP_DROP if case.reason.name.startswith("DROP_") else XDP_PASS
    assert ret == verdict, f"{case.desc}: verdict {verdict} (got {ret})"
    if verdict == XDP_PASS:
        assert out == frame, f"{case.desc}: the kernel gets the untouched frame"
    assert c.delta() == {(Direction.DECAP, case.reason): (1, len(frame))}, f"{case.desc}: counter"
    if case.reason in (Reason.DROP_BAD_ICV, Reason.DROP_REPLAY) and top_before is not None:
        after = env.inbound_sa(SPI_IN, GW1_WAN)
        assert after.seq_top == top_before.seq_top, f"{case.desc}: window not moved"


# ---- anti-replay ---------------------------------------------------------------------------------
def _decap_seq(d: Datapath, seq: int, sa: P.EspSa | None = None) -> int:
    return run(d.decap_fd, esp_frame(inner_packet(b"r"), seq, sa=sa))[0]


def test_replay_window(env: Datapath) -> None:
    env.put_inbound_sa(in_sa(replay_window=64))
    for seq in (1, 2, 5, 4, 3):
        assert _decap_seq(env, seq) == XDP_REDIRECT, f"seq {seq} (in order / in window) accepted"
    for seq in (1, 4, 5):
        assert _decap_seq(env, seq) == XDP_DROP, f"duplicate seq {seq} dropped"
    assert _decap_seq(env, 100) == XDP_REDIRECT, "ahead of the window: accepted, window moves"
    assert _decap_seq(env, 36) == XDP_DROP, "100 - 36 = 64: left of a 64-packet window"
    assert _decap_seq(env, 37) == XDP_REDIRECT, "100 - 37 = 63: inside the window, unseen"
    assert _decap_seq(env, 37) == XDP_DROP, "37 again: duplicate"
    assert _decap_seq(env, 100_000) == XDP_REDIRECT, "far ahead: accepted"
    assert _decap_seq(env, 99_999) == XDP_REDIRECT, "just behind the new top: unseen, accepted"
    assert _decap_seq(env, 100) == XDP_DROP, "the old top is now far left of the window"
    sa = env.inbound_sa(SPI_IN, GW1_WAN)
    assert sa.seq_top == 100_000, "window top"
    assert sa.replay_drops == 6, "six replays counted on the SA"


def test_replay_window_4096_and_ring_reuse(env: Datapath) -> None:
    env.put_inbound_sa(in_sa(replay_window=4096))
    assert _decap_seq(env, 5000) == XDP_REDIRECT, "top 5000"
    assert _decap_seq(env, 905) == XDP_REDIRECT, "5000 - 905 = 4095: inside a 4096 window"
    assert _decap_seq(env, 904) == XDP_DROP, "5000 - 904 = 4096: outside"
    # 8192 later the ring slot of 5000 is reused: the bit must have been cleared.
    assert _decap_seq(env, 5000 + 8192) == XDP_REDIRECT, "top moves by a whole ring"
    assert _decap_seq(env, 5000 + 8192 - 64) == XDP_REDIRECT, "stale ring bits were cleared"


def test_replay_esn_wrap_of_low_32_bits(env: Datapath) -> None:
    esn = P.EspSa(SPI_IN, KEY_IN, esn=True)
    env.put_inbound_sa(in_sa(esn=True, replay_window=128, seq_top=0xFFFFFFF0))
    assert _decap_seq(env, 0xFFFFFFF8, esn) == XDP_REDIRECT, "ahead, same sub-space"
    assert _decap_seq(env, (1 << 32) + 5, esn) == XDP_REDIRECT, "low bits wrapped: seq_hi 1"
    sa = env.inbound_sa(SPI_IN, GW1_WAN)
    assert sa.seq_top == (1 << 32) + 5, "64-bit top after the wrap"
    assert _decap_seq(env, 0xFFFFFFF9, esn) == XDP_REDIRECT, "in window, previous sub-space"
    assert _decap_seq(env, 0xFFFFFFF8, esn) == XDP_DROP, "duplicate across the wrap"
    assert _decap_seq(env, (1 << 32) + 5, esn) == XDP_DROP, "duplicate after the wrap"
    # Sealed with the wrong high bits: the ICV fails (the high bits are in the AAD only).
    c = Counters(env)
    bad = esn.seal(0x7, inner_packet(b"r"))  # claims seq_hi 0 for low bits 7 -> hi inferred 1
    frame = P.eth(GW1_WAN_MAC, GW2_WAN_MAC) + P.ipv4(GW2_WAN, GW1_WAN, P.IPPROTO_ESP, bad)
    assert run(env.decap_fd, frame)[0] == XDP_DROP, "wrong high bits: not authentic"
    assert c.delta() == {(Direction.DECAP, Reason.DROP_BAD_ICV): (1, len(frame))}, "bad ICV counted"


def test_inner_miss_still_moves_window(env: Datapath) -> None:
    """A punted (inner miss) packet was authenticated: its sequence number is recorded, so a
    replay of it is dropped here rather than reaching the kernel's lagging window."""
    other = P.ipv4(REMOTE_HOST, LAN_HOST, P.IPPROTO_UDP, P.udp(2001, 1000, b"z"))
    frame = esp_frame(other, 7)
    assert run(env.decap_fd, frame) == (XDP_PASS, frame), "inner miss: untouched to the kernel"
    assert run(env.decap_fd, frame)[0] == XDP_DROP, "its replay: dropped"


def test_offload_counts_the_kernels_window_as_seen(env: Datapath) -> None:
    """An inbound SA offloaded after the kernel accepted packets up to seq_top starts with
    every number of the window up to it marked seen: a replay of a packet the kernel path
    accepted before the offload (a flow's first packets) is dropped by XDP too."""
    env.put_inbound_sa(in_sa(replay_window=64, seq_top=1000))
    for seq in (1000, 990, 937):
        assert _decap_seq(env, seq) == XDP_DROP, f"seq {seq}, inside the window: seen"
    assert _decap_seq(env, 936) == XDP_DROP, "left of the window"
    assert _decap_seq(env, 1001) == XDP_REDIRECT, "the next one: accepted"
    sa = env.inbound_sa(SPI_IN, GW1_WAN)
    assert (sa.seq_top, sa.replay_drops) == (1001, 4)


def test_lapsed_sa_still_drops_replays_of_what_xdp_accepted(env: Datapath) -> None:
    """Once XDP stops using an inbound SA (watchdog lapsed: a controller killed, or the SA
    being handed back), its packets go to the kernel untouched; but the kernel's window has
    not seen what XDP accepted, so a replay of such a packet is still dropped here. The check
    only reads the window: a packet passed to the kernel is not marked."""
    for seq in (5, 6):
        assert _decap_seq(env, seq) == XDP_REDIRECT, f"seq {seq} decapsulated by XDP"
    env.refresh_watchdog(SA_IN_ID, 0)
    c = Counters(env)
    replay = esp_frame(inner_packet(), 5)
    assert run(env.decap_fd, replay)[0] == XDP_DROP, "a replay of seq 5: dropped"
    fresh = esp_frame(inner_packet(), 7)
    assert run(env.decap_fd, fresh) == (XDP_PASS, fresh), "seq 7: to the kernel, untouched"
    assert run(env.decap_fd, fresh) == (XDP_PASS, fresh), "seq 7 again: the kernel's to judge"
    sa = env.inbound_sa(SPI_IN, GW1_WAN)
    assert sa.seq_top == 6 and sa.replay_drops == 1, "window read, not moved"
    assert c.delta() == {
        (Direction.DECAP, Reason.DROP_REPLAY): (1, len(replay)),
        (Direction.DECAP, Reason.PASS_SA_EXPIRED): (2, 2 * len(fresh)),
    }, "counted under their reasons"


# ---- encap and decap together -----------------------------------------------------------------
def test_encap_output_decapsulates_on_the_mirror_sa(env: Datapath) -> None:
    """gw1's encap output, fed to a decap configured with the mirror SA (what gw2 runs in the
    redirect test), gives back the original packet (TTL - 2: two routers)."""
    env.put_inbound_sa(InboundSa(sa_id=3, spi=SPI_OUT, saddr=GW1_WAN, daddr=GW2_WAN, key=KEY_OUT))
    env.put_flow(
        flow_key(LO, Direction.DECAP, **ENCAP_KEY),
        flow_val(3, egress_ifindex=LO, dmac="02:00:0a:02:00:02", smac="02:00:0a:02:00:01"),
    )
    frame = clear_frame(b"round trip")
    ret, esp = run(env.encap_fd, frame)
    assert ret == XDP_REDIRECT, "encapsulated"
    ret, out = run(env.decap_fd, esp)
    assert ret == XDP_REDIRECT, "decapsulated"
    want = P.eth("02:00:0a:02:00:02", "02:00:0a:02:00:01") + P.ip_ttl_dec(P.ip_ttl_dec(frame[14:]))
    assert out == want, "the same packet, two hops later"


# ---- several CPUs ------------------------------------------------------------------------------
def _on_each_cpu(work: Callable[[int], list]) -> list[list]:
    """Run work(i) in one thread per CPU (pinned), concurrently: BPF_PROG_TEST_RUN runs the
    program on the calling thread's CPU, and ctypes releases the GIL during the syscall."""
    import threading

    cpus = sorted(os.sched_getaffinity(0))[:4]
    results: list[list] = [[] for _ in cpus]
    errors: list[BaseException] = []
    start = threading.Barrier(len(cpus))

    def body(i: int) -> None:
        try:
            os.sched_setaffinity(0, {cpus[i]})  # pid 0: this thread
            start.wait(timeout=30)
            results[i] = work(i)
        except BaseException as e:  # reported below, with the thread's exception
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(cpus))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, f"worker failed: {errors!r}"
    return results


def test_sequence_numbers_unique_across_cpus(env: Datapath) -> None:
    """docs/design.md section 3, property 1 for XDP alone: CPUs racing on one SA never share a
    sequence number (hence never an IV), and none is skipped."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no race to test")
    n = 1500
    frame = clear_frame(b"race")

    def work(_: int) -> list[int]:
        seqs = []
        for _ in range(n):
            ret, out = run(env.encap_fd, frame)
            assert ret == XDP_REDIRECT, "encapsulated"
            seqs.append(struct.unpack("!I", out[38:42])[0])
        return seqs

    per_cpu = _on_each_cpu(work)
    every = [s for seqs in per_cpu for s in seqs]
    assert sorted(every) == list(range(1, len(every) + 1)), "each number used once, none skipped"
    assert env.outbound_sa(SA_OUT_ID).seq == len(every) + 1, "SA's next sequence number"


def test_replay_window_holds_across_cpus(env: Datapath) -> None:
    """The same 600 authentic packets offered on every CPU at once: each is forwarded exactly
    once, every other copy is dropped as a replay (the window's lock holds)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: no race to test")
    env.put_inbound_sa(in_sa(replay_window=4096))
    frames = [esp_frame(inner_packet(b"r"), seq) for seq in range(1, 601)]
    c = Counters(env)

    def work(_: int) -> list[int]:
        return [run(env.decap_fd, f)[0] for f in frames]

    per_cpu = _on_each_cpu(work)
    forwarded = sum(v.count(XDP_REDIRECT) for v in per_cpu)
    assert forwarded == 600, f"each sequence number forwarded once ({forwarded})"
    d = c.delta()
    assert d[(Direction.DECAP, Reason.DROP_REPLAY)][0] == 600 * (len(per_cpu) - 1), (
        "the rest: replays"
    )


# ---- invalidation at scale ----------------------------------------------------------------------
def test_fenced_sa_sends_its_flows_to_the_kernel_until_rearmed(env: Datapath) -> None:
    """fence_sa: one map write takes every flow of an outbound SA off XDP (the controller
    fences before it removes the flows one by one); refresh_watchdog lifts it."""
    frame = clear_frame()
    assert run(env.encap_fd, frame)[0] == XDP_REDIRECT, "offloaded before the fence"
    armed = env.watchdog(SA_OUT_ID)
    assert armed and armed > time.monotonic_ns(), "a live watchdog"
    c = Counters(env)
    env.fence_sa(SA_OUT_ID)
    assert run(env.encap_fd, frame) == (XDP_PASS, frame), "fenced: untouched, to the kernel"
    assert c.delta() == {(Direction.ENCAP, Reason.PASS_SA_EXPIRED): (1, len(frame))}, "counted"
    seq = env.outbound_sa(SA_OUT_ID).seq
    env.refresh_watchdog(SA_OUT_ID, armed)
    ret, out = run(env.encap_fd, frame)
    assert ret == XDP_REDIRECT, "re-armed: offloaded again"
    check_encap_output(frame, out, seq)  # the fence used no sequence number


def test_batch_delete_skips_absent_flows(env: Datapath) -> None:
    """Datapath.delete_flows: one BPF_MAP_DELETE_BATCH for the lot; keys already gone (here
    one in front, some in the middle, one at the end) are skipped, no other entry is touched."""
    keys = [
        flow_key(
            LO, Direction.ENCAP, P.IPPROTO_UDP, "10.1.0.2", f"10.3.{i >> 8}.{i & 255}", 1000, i
        )
        for i in range(3000)
    ]
    for k in keys:
        env.put_flow(k, flow_val(SA_OUT_ID))
    absent = [
        flow_key(LO, Direction.ENCAP, P.IPPROTO_UDP, "10.1.0.9", "10.3.0.1", 7, j) for j in range(4)
    ]
    doomed = [absent[0], *keys[:1000], absent[1], absent[2], *keys[1000:2000], absent[3]]
    assert env.delete_flows(doomed) == 2000, "every present key deleted, the absent skipped"
    assert env.delete_flows([]) == 0
    left = {bytes(k) for k, _ in env.flows()}
    assert {bytes(k) for k in keys[2000:]} <= left, "the others stay"
    assert not {bytes(k) for k in keys[:2000]} & left, "the deleted are gone"
    assert env.get_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY)) is not None, (
        "the fixture's flow"
    )


# ---- key hygiene ---------------------------------------------------------------------------------
def test_delete_wipes_and_removes_sa(env: Datapath) -> None:
    from controller.datapath.xdp import BPF_F_LOCK

    # The wipe relies on an in-place update (BPF_F_LOCK) being accepted for our value type.
    env.maps["sa_out"].put(defs_u32(SA_OUT_ID), out_sa(key=bytes(36)).to_c(), BPF_F_LOCK)
    assert bytes(env.outbound_sa(SA_OUT_ID).key) == bytes(32), "in-place update took effect"
    assert env.delete_outbound_sa(SA_OUT_ID), "outbound SA deleted"
    assert env.outbound_sa(SA_OUT_ID) is None, "outbound SA gone"
    assert env.maps["watchdog"].get(defs_u32(SA_OUT_ID)) is None, "its watchdog gone"
    assert env.delete_inbound_sa(SPI_IN, GW1_WAN), "inbound SA deleted"
    assert env.inbound_sa(SPI_IN, GW1_WAN) is None, "inbound SA gone"
    assert not env.delete_inbound_sa(SPI_IN, GW1_WAN), "a second delete finds nothing"
    frame = clear_frame()
    assert run(env.encap_fd, frame) == (XDP_PASS, frame), "no SA: punted"


@pytest.mark.bench
def test_datapath_bench_table() -> None:
    """`make bench`: encap/decap ns per packet next to the XDP_TX floor and the AEAD alone."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "datapath_bench.py"
    spec = importlib.util.spec_from_file_location("datapath_bench", path)
    assert spec and spec.loader, "bench/datapath_bench.py is importable"
    bench = importlib.util.module_from_spec(spec)
    sys.modules["datapath_bench"] = bench  # dataclasses look the module up
    spec.loader.exec_module(bench)
    rows = bench.measure()
    print("\n" + bench.table(rows))
    for r in rows:
        assert r.floor < r.encap and r.floor < r.decap, f"{r.size} B: crypto costs more than TX"


def test_pinned_maps_survive_a_reload(env: Datapath) -> None:
    """A restarted controller compiles again and finds the same maps (pinned in bpffs)."""
    pin = Path(str(env.pin_dir))
    for name in ("xfp_flows", "xfp_sa_out", "xfp_sa_in", "xfp_watchdog", "xfp_stats"):
        st = (pin / name).stat()
        assert st.st_mode & 0o777 == 0o600, f"{name} pinned with mode 0600"
    run(env.encap_fd, clear_frame())  # seq 1 taken
    again = Datapath(pin_dir=env.pin_dir).load()
    try:
        sa = again.outbound_sa(SA_OUT_ID)
        assert sa is not None and sa.seq == 2, "the reloaded datapath sees the SA, seq moved"
        assert again.get_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY)) is not None, (
            "and the flow"
        )
        again.put_tx_port(LO)
        ret, out = run(again.encap_fd, clear_frame())
        assert ret == XDP_REDIRECT, "the new program forwards with the old state"
        check_encap_output(clear_frame(), out, 2)
    finally:
        again.close()


# ---- liveness ----------------------------------------------------------------------------------
LIVENESS_MS = 300


@pytest.fixture(scope="module")
def live_dp() -> Iterator[Datapath]:
    """The datapath built as the controller builds it: one packet per SA every LIVENESS_MS
    goes to the kernel (-DXFP_LIVENESS_NS)."""
    d = Datapath(
        pin_dir=f"/sys/fs/bpf/xfp-test-live-{os.getpid()}",
        cflags=(f"-DXFP_LIVENESS_NS={LIVENESS_MS * 1_000_000}ULL",),
    )
    try:
        d.load()
        d.put_tx_port(LO)
        d.put_outbound_sa(out_sa())
        d.put_inbound_sa(in_sa())
        d.put_flow(flow_key(LO, Direction.ENCAP, **ENCAP_KEY), flow_val(SA_OUT_ID))
        d.put_flow(
            flow_key(LO, Direction.DECAP, **DECAP_KEY),
            flow_val(SA_IN_ID, egress_ifindex=LO, dmac=LAN_HOST_MAC, smac=GW1_LAN_MAC),
        )
        yield d
    finally:
        d.close()
        d.unpin()


def test_liveness_packet_takes_the_kernel_path(live_dp: Datapath) -> None:
    """The first packets of an SA start its clock; once LIVENESS_MS has passed, the next one
    goes to the kernel untouched and counted (encap: without taking a sequence number; decap:
    marked in the replay window first, so a replay of it is dropped), then XDP resumes."""
    d = live_dp
    c = Counters(d)
    frame = clear_frame(b"live")
    verdicts = [run(d.encap_fd, frame)[0] for _ in range(2)]
    decaps = [run(d.decap_fd, esp_frame(inner_packet(b"r"), seq))[0] for seq in (1, 2)]
    assert verdicts == decaps == [XDP_REDIRECT] * 2, "before the interval: XDP forwards"
    time.sleep(LIVENESS_MS / 1e3 + 0.05)
    assert run(d.encap_fd, frame) == (XDP_PASS, frame), "the liveness packet: untouched"
    assert d.outbound_sa(SA_OUT_ID).seq == 3, "it took no sequence number (the kernel's TC does)"
    ret, out = run(d.encap_fd, frame)
    assert ret == XDP_REDIRECT, "then XDP again"
    check_encap_output(frame, out, 3)
    live = esp_frame(inner_packet(b"r"), 3)
    assert run(d.decap_fd, live) == (XDP_PASS, live), "inbound liveness packet: ciphertext"
    assert run(d.decap_fd, live)[0] == XDP_DROP, "already in XDP's window: its replay dropped"
    assert run(d.decap_fd, esp_frame(inner_packet(b"r"), 4))[0] == XDP_REDIRECT, "XDP again"
    delta = c.delta()
    assert delta[(Direction.ENCAP, Reason.PASS_LIVENESS)][0] == 1, f"counted: {delta}"
    assert delta[(Direction.DECAP, Reason.PASS_LIVENESS)][0] == 1, f"counted: {delta}"
    assert delta[(Direction.ENCAP, Reason.ENCAP_OK)][0] == 3, f"the rest by XDP: {delta}"
    assert delta[(Direction.DECAP, Reason.DECAP_OK)][0] == 3, f"the rest by XDP: {delta}"
    mode = os.stat(f"{d.pin_dir}/xfp_liveness").st_mode & 0o777
    assert mode == 0o600, f"xfp_liveness pinned root-only, not {oct(mode)}"


def test_batch_put_writes_every_flow_in_order(env: Datapath) -> None:
    """Datapath.put_flows: one BPF_MAP_UPDATE_BATCH writes every entry as put_flow would (a
    key given twice keeps the later value); an empty batch writes nothing."""
    keys = [
        flow_key(LO, Direction.ENCAP, P.IPPROTO_UDP, "10.1.0.2", f"10.4.{i >> 8}.{i & 255}", 9, i)
        for i in range(1500)
    ]
    env.put_flows([(k, flow_val(SA_OUT_ID, mtu=1000 + i % 7)) for i, k in enumerate(keys)])
    env.put_flows(
        [(keys[0], flow_val(SA_OUT_ID, mtu=600)), (keys[0], flow_val(SA_OUT_ID, mtu=700))]
    )
    env.put_flows([])
    for i, k in enumerate(keys):
        got = env.get_flow(k)
        assert got is not None, f"flow {i} written"
        assert got.mtu == (700 if i == 0 else 1000 + i % 7), f"flow {i}: its own value"
    assert env.delete_flows(keys) == 1500, "and the batch delete takes them all back"
