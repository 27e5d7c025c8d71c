# SPDX-License-Identifier: GPL-2.0-only
"""NAT-T (RFC 3948, UDP-encapsulated ESP) through the XDP datapath with BPF_PROG_TEST_RUN:
encap output opened by `cryptography` behind the UDP header (the SA's ports, checksum 0, the
MTU taking the 8 bytes), ESP-in-UDP sealed by `cryptography` decapsulated to the exact inner
frame (any UDP checksum accepted), IKE (non-ESP marker) and NAT keepalives on 4500 passed
untouched and counted, frames whose encapsulation or source is not the SA's passed to the
kernel (which reports the new mapping) but replays of them still dropped, malformed UDP.

The fixtures and helpers are tests/bpf/test_datapath.py's (same SAs, flows and addresses)."""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator

import packets as P
import pytest
import test_datapath as T
from test_datapath import LO, Counters, dp, run  # noqa: F401  (dp: the module's datapath)

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.xdp import Datapath, flow_key, flow_val

XDP_DROP, XDP_PASS, XDP_REDIRECT = T.XDP_DROP, T.XDP_PASS, T.XDP_REDIRECT
NATT = 4500
GW1_NAT_PORT, GW2_NAT_PORT = 4500, 31337  # gw2 seen behind a NAT that took another port


@pytest.fixture
def env(dp: Datapath) -> Iterator[Datapath]:  # noqa: F811
    """test_datapath's SAs and flows, both SAs with UDP encapsulation as XFRMA_ENCAP says:
    outbound (ours, the peer's), inbound (the peer's, ours)."""
    T._clear(dp)
    dp.put_tx_port(LO)
    dp.put_outbound_sa(T.out_sa(encap_ports=(GW1_NAT_PORT, GW2_NAT_PORT)))
    dp.put_inbound_sa(T.in_sa(encap_ports=(GW2_NAT_PORT, GW1_NAT_PORT)))
    dp.put_flow(flow_key(LO, Direction.ENCAP, **T.ENCAP_KEY), flow_val(T.SA_OUT_ID))
    dp.put_flow(
        flow_key(LO, Direction.DECAP, **T.DECAP_KEY),
        flow_val(T.SA_IN_ID, egress_ifindex=LO, dmac=T.LAN_HOST_MAC, smac=T.GW1_LAN_MAC),
    )
    yield dp
    T._clear(dp)


def udp_frame(
    payload: bytes,
    *,
    sport: int = GW2_NAT_PORT,
    dport: int = NATT,
    src: str = T.GW2_WAN,
    check: int = 0,
    ulen: int | None = None,
) -> bytes:
    """A WAN frame gw2 -> gw1: UDP (sport -> dport) carrying `payload`."""
    length = 8 + len(payload) if ulen is None else ulen
    uh = struct.pack("!HHHH", sport, dport, length, check)
    return P.eth(T.GW1_WAN_MAC, T.GW2_WAN_MAC) + P.ipv4(src, T.GW1_WAN, P.IPPROTO_UDP, uh + payload)


def natt_frame(inner: bytes, seq: int, *, sa: P.EspSa | None = None, **udpkw) -> bytes:
    """ESP-in-UDP of `inner` on the inbound SA (RFC 3948 section 2.1)."""
    sa = sa or P.EspSa(T.SPI_IN, T.KEY_IN)
    return udp_frame(sa.seal(seq, inner), **udpkw)


# ---- encap -------------------------------------------------------------------------------------
def check_natt_output(frame_in: bytes, out: bytes, seq: int) -> None:
    """The UDP header of RFC 3948 section 2.1 between the outer IPv4 header and an ESP packet
    that test_datapath's checks accept once the UDP header is taken out."""
    ip = out[14:34]
    assert ip[9] == P.IPPROTO_UDP, "outer protocol UDP"
    assert P.csum(ip) == 0, "outer header checksum valid"
    assert struct.unpack("!H", ip[2:4])[0] == len(out) - 14, "outer total length = frame - 14"
    sport, dport, ulen, check = struct.unpack("!HHHH", out[34:42])
    assert (sport, dport) == (GW1_NAT_PORT, GW2_NAT_PORT), "UDP ports of the SA's encap"
    assert ulen == len(out) - 34, "UDP length = UDP header + ESP"
    assert check == 0, "UDP checksum 0 (RFC 3948 section 2.1)"
    # Without the UDP header the frame is plain ESP: test_datapath's every outer/ESP check.
    plain = bytearray(out[:34] + out[42:])
    plain[14 + 9] = P.IPPROTO_ESP
    plain[16:18] = struct.pack("!H", len(plain) - 14)
    plain[24:26] = b"\0\0"
    plain[24:26] = struct.pack("!H", P.csum(bytes(plain[14:34])))
    T.check_encap_output(frame_in, bytes(plain), seq)


def test_natt_encap_udp_header_and_esp_open_with_cryptography(env: Datapath) -> None:
    c = Counters(env)
    rng = random.Random(3948)
    lengths = list(range(0, 40)) + [rng.randrange(0, 1400) for _ in range(30)]
    for seq, n in enumerate(lengths, start=1):
        frame = T.clear_frame(rng.randbytes(n))
        ret, out = run(env.encap_fd, frame)
        assert ret == XDP_REDIRECT, f"payload {n}: redirected (got {ret})"
        assert len(out) == len(frame) + 36 + 8 + P.esp_padlen(len(frame) - 14) + 2 + 16, (
            f"payload {n}: 8 bytes more than plain ESP"
        )
        check_natt_output(frame, out, seq)
    assert env.outbound_sa(T.SA_OUT_ID).seq == len(lengths) + 1, "one number per packet"
    assert set(c.delta()) == {(Direction.ENCAP, Reason.ENCAP_OK)}, "encap hits only"


def test_natt_encap_ethernet_padding(env: Datapath) -> None:
    frame = T.clear_frame(b"", frag=0)
    ret, out = run(env.encap_fd, frame + b"\0" * (60 - len(frame)))
    assert ret == XDP_REDIRECT, "redirected"
    check_natt_output(frame, out, 1)


def test_natt_encap_mtu_counts_the_udp_header(env: Datapath) -> None:
    """A packet that fits the MTU as plain ESP but not with the 8 bytes of UDP goes to the
    kernel; one 8 bytes shorter fits."""
    inner_len = 1500 - 36 - 8 - 16 - 2  # 1438: olen with UDP exactly 1500
    fits = T.clear_frame(b"x" * (inner_len - 28))
    assert run(env.encap_fd, fits)[0] == XDP_REDIRECT, "exactly the MTU with UDP: forwarded"
    big = T.clear_frame(b"x" * (inner_len - 28 + 4))
    c = Counters(env)
    assert run(env.encap_fd, big) == (XDP_PASS, big), "over the MTU by the UDP header: punted"
    assert c.delta() == {(Direction.ENCAP, Reason.PASS_MTU): (1, len(big))}, "counted as MTU"


# ---- decap -------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", [0, 0x1234], ids=["udp-csum-0", "udp-csum-any"])
def test_natt_decap_to_exact_inner_frame(env: Datapath, check: int) -> None:
    c = Counters(env)
    rng = random.Random(check)
    lengths = list(range(0, 24)) + [rng.randrange(0, 1400) for _ in range(20)] + [1400]
    total = 0
    for seq, n in enumerate(lengths, start=1):
        inner = T.inner_packet(rng.randbytes(n))
        frame = natt_frame(inner, seq, check=check)
        total += len(frame)
        ret, out = run(env.decap_fd, frame)
        assert ret == XDP_REDIRECT, f"payload {n}: redirected (got {ret})"
        assert out == T.expected_decap(inner), f"payload {n}: exactly the inner packet"
    sa = env.inbound_sa(T.SPI_IN, T.GW1_WAN)
    assert sa.seq_top == len(lengths), "window top moved"
    assert c.delta() == {(Direction.DECAP, Reason.DECAP_OK): (len(lengths), total)}, "hits"


def test_natt_encap_output_decapsulates_on_the_mirror_sa(env: Datapath) -> None:
    """Our own NAT-T output, fed back as if from the peer on the mirror SA, comes out as the
    packet that went in (encap and decap agree on the layout)."""
    env.put_inbound_sa(
        T.in_sa(spi=T.SPI_OUT, key=T.KEY_OUT, saddr=T.GW1_WAN, daddr=T.GW2_WAN,
                encap_ports=(GW1_NAT_PORT, GW2_NAT_PORT))
    )  # fmt: skip
    inner = P.ipv4(T.REMOTE_HOST, T.LAN_HOST, P.IPPROTO_UDP, P.udp(2000, 1000, b"mirror"))
    env.put_flow(
        flow_key(LO, Direction.ENCAP, P.IPPROTO_UDP, T.REMOTE_HOST, T.LAN_HOST, 2000, 1000),
        flow_val(T.SA_OUT_ID),
    )
    ret, out = run(env.encap_fd, P.eth(T.GW1_LAN_MAC, T.LAN_HOST_MAC) + inner)
    assert ret == XDP_REDIRECT, "encapsulated"
    ret, back = run(env.decap_fd, out)
    assert ret == XDP_REDIRECT, f"decapsulated (got {ret})"
    assert back[14:] == P.ip_ttl_dec(P.ip_ttl_dec(inner)), "the inner packet, two hops on"


@pytest.mark.parametrize(
    "desc,payload",
    [
        ("keepalive", b"\xff"),
        ("IKE_SA_INIT behind the non-ESP marker", b"\0\0\0\0" + bytes(range(28))),
        ("marker only", b"\0\0\0\0"),
    ],
)
def test_natt_control_on_4500_untouched_and_counted(env: Datapath, desc: str, payload) -> None:
    c = Counters(env)
    frame = udp_frame(payload)
    assert run(env.decap_fd, frame) == (XDP_PASS, frame), f"{desc}: the kernel's, untouched"
    assert c.delta() == {(Direction.DECAP, Reason.PASS_NATT_CTRL): (1, len(frame))}, desc


def _counted(env: Datapath, frame: bytes, verdict: int, reason: Reason, desc: str) -> None:
    c = Counters(env)
    ret, out = run(env.decap_fd, frame)
    assert ret == verdict, f"{desc}: verdict {ret}, want {verdict}"
    if verdict == XDP_PASS:
        assert out == frame, f"{desc}: passed untouched"
    assert c.delta() == {(Direction.DECAP, reason): (1, len(frame))}, f"{desc}: {reason.name}"


def test_natt_mapping_changes_go_to_the_kernel(env: Datapath) -> None:
    """esp4.c reports a new mapping (XFRM_MSG_MAPPING) only for packets it sees: from another
    port or address, or in the other encapsulation, the frame is the kernel's."""
    inner = T.inner_packet(b"moved")
    for desc, frame in (
        ("new source port", natt_frame(inner, 1, sport=40000)),
        ("new source address", natt_frame(inner, 1, src="198.51.100.7")),
        ("another destination port", natt_frame(inner, 1, dport=4501)),
        (
            "plain ESP on a NAT-T SA",
            T.esp_frame(inner, 1),
        ),
    ):
        _counted(env, frame, XDP_PASS, Reason.PASS_NATT_MAPPING, desc)
    env.put_inbound_sa(T.in_sa())
    _counted(env, natt_frame(inner, 1), XDP_PASS, Reason.PASS_NATT_MAPPING, "ESP-in-UDP, plain SA")
    sa = env.inbound_sa(T.SPI_IN, T.GW1_WAN)
    assert sa.seq_top == 0, "nothing the kernel judges moved the window"


def test_natt_replay_from_a_new_mapping_still_dropped(env: Datapath) -> None:
    """A packet XDP accepted, replayed from another port: the kernel's window never saw it."""
    inner = T.inner_packet(b"once")
    assert run(env.decap_fd, natt_frame(inner, 5))[0] == XDP_REDIRECT, "accepted once"
    _counted(env, natt_frame(inner, 5, sport=40000), XDP_DROP, Reason.DROP_REPLAY, "replayed")
    _counted(env, natt_frame(inner, 6, sport=40000), XDP_PASS, Reason.PASS_NATT_MAPPING, "new")


def test_natt_malformed_udp_and_esp(env: Datapath) -> None:
    inner = T.inner_packet(b"x")
    good = natt_frame(inner, 1)
    esp = good[42:]
    cases = [
        ("UDP length past the packet", udp_frame(esp, ulen=len(esp) + 9), XDP_PASS,
         Reason.PASS_MALFORMED_IP),
        ("UDP length short of the packet", udp_frame(esp, ulen=len(esp)), XDP_PASS,
         Reason.PASS_MALFORMED_IP),
        ("UDP length below the header", udp_frame(b"", ulen=4), XDP_PASS,
         Reason.PASS_MALFORMED_IP),
        ("UDP header cut", P.eth(T.GW1_WAN_MAC, T.GW2_WAN_MAC)
         + P.ipv4(T.GW2_WAN, T.GW1_WAN, P.IPPROTO_UDP, b"\x11\x94\x11"), XDP_PASS,
         Reason.PASS_MALFORMED_IP),
        ("3 bytes to 4500", udp_frame(b"abc"), XDP_PASS, Reason.PASS_NOT_ESP),
        ("keepalive of another byte", udp_frame(b"\xfe"), XDP_PASS, Reason.PASS_NOT_ESP),
        ("ESP header only", udp_frame(esp[:8]), XDP_PASS, Reason.PASS_NOT_ESP),
        ("unknown SPI to 4500", udp_frame(b"\0\0\0\x09" + esp[4:]), XDP_PASS,
         Reason.PASS_UNKNOWN_SPI),
        ("DNS to another port", udp_frame(b"\x12\x34\x01\x00" + bytes(30), sport=53,
         dport=5353), XDP_PASS, Reason.PASS_NOT_ESP),
        ("known SPI, too short for tunnel mode", udp_frame(esp[:40]), XDP_DROP,
         Reason.DROP_MALFORMED_ESP),
        ("ICV wrong", udp_frame(esp[:-1] + bytes([esp[-1] ^ 1])), XDP_DROP,
         Reason.DROP_BAD_ICV),
    ]  # fmt: skip
    for desc, frame, verdict, reason in cases:
        _counted(env, frame, verdict, reason, desc)
    assert run(env.decap_fd, good)[0] == XDP_REDIRECT, "the good frame still decapsulates"
