# SPDX-License-Identifier: GPL-2.0-only
"""The TC egress resequencer (bpf/tc_reseq.c) through BPF_PROG_TEST_RUN: a kernel-built ESP frame
of an offloaded SA leaves with the next number of the datapath's counter, an IV from it, and a
ciphertext and ICV that `cryptography` opens to the same inner packet; everything else passes
untouched; an exhausted counter or an expired SA is handled without reusing a number."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import time
from collections.abc import Iterator

import packets as P
import pytest

from controller.datapath.abi import SaOut
from controller.datapath.bpfsys import prog_test_run
from controller.datapath.reseq import Resequencer
from controller.datapath.xdp import MapHandle, OutboundSa
from controller.netns import in_netns
from testbed.bed import Testbed

TC_ACT_OK, TC_ACT_SHOT = 0, 2
GW1_WAN, GW2_WAN = "192.0.2.1", "192.0.2.2"
GW1_WAN_MAC, GW2_WAN_MAC = "02:00:c0:00:02:01", "02:00:c0:00:02:02"
KEY = bytes(range(0x10, 0x10 + 36))
SPI = 0xC0FFEE01
SA_ID = 7
IV_MASK = 0x1122334455667788  # the kernel's seqiv salt as the controller learned it
INNER = P.ipv4("10.1.0.2", "10.2.0.2", P.IPPROTO_UDP, P.udp(4000, 53, b"resequence me" * 7))


@pytest.fixture(scope="module")
def rs() -> Iterator[Resequencer]:
    pin = f"/sys/fs/bpf/xfp-reseq-{os.getpid()}"
    r = Resequencer(pin_dir=pin)
    try:
        r.load()
        yield r
    finally:
        r.close()
        for name in os.listdir(pin) if os.path.isdir(pin) else []:
            os.unlink(os.path.join(pin, name))
        if os.path.isdir(pin):
            os.rmdir(pin)


def _sa_map(r: Resequencer) -> MapHandle:
    return MapHandle(r.bpf[b"xfp_sa_out"].map_fd, ctypes.c_uint32, SaOut, "xfp_sa_out")


def _install(r: Resequencer, seq: int, **kw) -> None:
    sa = OutboundSa(
        sa_id=SA_ID,
        spi=SPI,
        saddr=GW1_WAN,
        daddr=GW2_WAN,
        key=KEY,
        egress_ifindex=1,
        dmac=GW2_WAN_MAC,
        smac=GW1_WAN_MAC,
        seq=seq,
        iv_mask=IV_MASK,
        **kw,
    )
    _sa_map(r).put(ctypes.c_uint32(SA_ID), sa.to_c())
    r.index_sa(SPI, GW2_WAN, SA_ID)


def _kernel_frame(seq: int, spi: int = SPI, kernel_salt: int = 0xDEADBEEF00000000) -> bytes:
    """What esp4_output() sends: IV = seq XOR the tfm's salt (crypto/seqiv.c)."""
    esp = P.EspSa(spi, KEY)
    iv = struct.pack("!Q", seq ^ kernel_salt)
    body = esp.seal(seq, INNER, iv=iv)
    return P.eth(GW2_WAN_MAC, GW1_WAN_MAC) + P.ipv4(GW1_WAN, GW2_WAN, P.IPPROTO_ESP, body)


def _open(frame: bytes) -> tuple[int, bytes, bytes]:
    return P.EspSa(SPI, KEY).open(frame[34:])


def test_kernel_frame_is_renumbered_from_the_datapath_counter(rs: Resequencer) -> None:
    _install(rs, seq=5000)
    for n in range(3):
        frame = _kernel_frame(seq=17 + n)
        ret, out, _ = prog_test_run(rs.fd, frame)
        assert ret == TC_ACT_OK, f"frame {n} passes on (verdict {ret})"
        out = out[: len(frame)]
        assert out[:34] == frame[:34], "Ethernet and outer IPv4 headers unchanged"
        seq, iv, plain = _open(out)
        assert seq == 5000 + n, f"frame {n} took number {5000 + n} from the counter, not {seq}"
        assert iv == struct.pack("!Q", seq ^ IV_MASK), "IV = seq XOR the SA's mask (seqiv)"
        assert plain.startswith(INNER), "the inner packet is intact under the new keystream"
        assert plain[-1] == P.IPPROTO_IPIP, "trailer intact (next header 4)"
    entry = _sa_map(rs).get(ctypes.c_uint32(SA_ID))
    assert entry.seq == 5003, f"counter advanced once per frame: {entry.seq}"
    assert rs.stats()["ok"][0] >= 3, "renumbered frames counted"


def test_other_traffic_is_untouched(rs: Resequencer) -> None:
    _install(rs, seq=100)
    cases = [
        ("unknown SPI", _kernel_frame(seq=1, spi=0x12345678)),
        (
            "UDP",
            P.eth(GW2_WAN_MAC, GW1_WAN_MAC)
            + P.ipv4(GW1_WAN, GW2_WAN, P.IPPROTO_UDP, P.udp(500, 500, b"ike")),
        ),
        ("ARP", P.eth("ff:ff:ff:ff:ff:ff", GW1_WAN_MAC, P.ETH_P_ARP) + bytes(28)),
        ("truncated ESP", _kernel_frame(seq=1)[:40]),
    ]
    for what, frame in cases:
        ret, out, _ = prog_test_run(rs.fd, frame)
        assert ret == TC_ACT_OK, f"{what}: passes"
        assert out[: len(frame)] == frame, f"{what}: not a byte changed"
    entry = _sa_map(rs).get(ctypes.c_uint32(SA_ID))
    assert entry.seq == 100, f"no number taken for foreign frames: {entry.seq}"


def test_exhausted_counter_drops_instead_of_reusing(rs: Resequencer) -> None:
    _install(rs, seq=0xFFFFFFFF, seq_limit=1 << 32)
    ret, out, _ = prog_test_run(rs.fd, _kernel_frame(seq=3))
    assert ret == TC_ACT_OK, "the last 32-bit number is still used"
    assert _open(out[: len(_kernel_frame(seq=3))])[0] == 0xFFFFFFFF, "numbered 2^32-1"
    before = rs.stats()["exhausted"][0]
    ret, _, _ = prog_test_run(rs.fd, _kernel_frame(seq=4))
    assert ret == TC_ACT_SHOT, "no number left without ESN: dropped, never wrapped"
    assert rs.stats()["exhausted"][0] == before + 1, "counted as exhausted"


def test_expired_sa_is_left_to_the_kernel(rs: Resequencer) -> None:
    _install(rs, seq=42, deadline_ns=time.monotonic_ns() - 1)
    frame = _kernel_frame(seq=9)
    ret, out, _ = prog_test_run(rs.fd, frame)
    assert ret == TC_ACT_OK and out[: len(frame)] == frame, "past the hard deadline: untouched"
    assert _sa_map(rs).get(ctypes.c_uint32(SA_ID)).seq == 42, "no number taken"


def test_fragmented_esp_of_an_offloaded_sa_is_dropped_not_sent_with_the_kernels_number(
    rs: Resequencer,
) -> None:
    """The kernel numbered and then fragmented an ESP packet (outer DF clear, longer than
    the MTU): it cannot be renumbered piecewise, and the peer would drop its kernel number,
    far behind the shared counter, as a replay. The first fragment (it carries the SPI) is
    dropped and counted; a later one, which has no ESP header, is left alone."""
    _install(rs, seq=7000)
    body = P.EspSa(SPI, KEY).seal(12, INNER)
    first = P.eth(GW2_WAN_MAC, GW1_WAN_MAC) + P.ipv4(
        GW1_WAN, GW2_WAN, P.IPPROTO_ESP, body[:48], frag=0x2000
    )  # MF
    later = P.eth(GW2_WAN_MAC, GW1_WAN_MAC) + P.ipv4(
        GW1_WAN, GW2_WAN, P.IPPROTO_ESP, body[48:], frag=6
    )  # offset 6 x 8 B
    before = rs.stats()["fragment"][0]
    assert prog_test_run(rs.fd, first)[0] == TC_ACT_SHOT, "first fragment: dropped"
    assert rs.stats()["fragment"][0] == before + 1, "counted as a fragment"
    ret, out, _ = prog_test_run(rs.fd, later)
    assert ret == TC_ACT_OK and out[: len(later)] == later, "a later fragment: untouched"
    assert _sa_map(rs).get(ctypes.c_uint32(SA_ID)).seq == 7000, "no number taken"


def test_kernel_crypto_sa_is_dropped_by_the_default_build(rs: Resequencer) -> None:
    """An entry naming an xfp_crypto context (XFP_SA_F_KCRYPTO, no key in the map) cannot be
    re-sealed without the kfuncs: the default build drops the frame, counted as an error,
    rather than seal it with the entry's zero key or let the kernel's stale number leave.
    The -DXFP_KCRYPTO build is tests/vm/test_vm_kcrypto_datapath.py's."""
    sa = OutboundSa(
        sa_id=SA_ID,
        spi=SPI,
        saddr=GW1_WAN,
        daddr=GW2_WAN,
        key=b"",
        kc_id=3,
        egress_ifindex=1,
        dmac=GW2_WAN_MAC,
        smac=GW1_WAN_MAC,
        seq=300,
        iv_mask=IV_MASK,
    )
    _sa_map(rs).put(ctypes.c_uint32(SA_ID), sa.to_c())
    rs.index_sa(SPI, GW2_WAN, SA_ID)
    before = rs.stats()["error"][0]
    ret, _, _ = prog_test_run(rs.fd, _kernel_frame(seq=8))
    assert ret == TC_ACT_SHOT, "no kfuncs in this build: dropped"
    assert rs.stats()["error"][0] == before + 1, "counted as an error"
    assert _sa_map(rs).get(ctypes.c_uint32(SA_ID)).seq == 300, "no number taken"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 63, 64, 65, 200, 1000, 1400])
def test_every_length_reseals(rs: Resequencer, size: int) -> None:
    _install(rs, seq=77)
    inner = P.ipv4("10.1.0.2", "10.2.0.2", P.IPPROTO_UDP, P.udp(1, 2, os.urandom(size)))
    esp = P.EspSa(SPI, KEY)
    frame = P.eth(GW2_WAN_MAC, GW1_WAN_MAC) + P.ipv4(
        GW1_WAN, GW2_WAN, P.IPPROTO_ESP, esp.seal(5, inner, iv=os.urandom(8))
    )
    ret, out, _ = prog_test_run(rs.fd, frame)
    assert ret == TC_ACT_OK, f"{size} B: passes"
    seq, _, plain = _open(out[: len(frame)])
    assert seq == 77 and plain.startswith(inner), f"{size} B: renumbered and intact"


def test_frame_with_its_payload_in_page_fragments_is_renumbered(
    rs: Resequencer, bed: Testbed
) -> None:
    """The segments of a GSO skb (a forwarded TCP burst the kernel sealed before its flow was
    learned) carry their payload in page fragments, where direct packet access does not
    reach. Judged by the linear part alone, such a frame once left with the kernel's own
    number, far behind the shared counter, and the peer counted replays. Made here for real
    on the test bed: a raw ESP socket on gw1 sends the first 16 bytes with MSG_MORE and the
    rest in a second call, which the kernel appends in a page fragment on a device with
    scatter-gather (__ip_append_data()); gw2 receives it renumbered and intact."""
    _install(rs, seq=9000)
    body = _kernel_frame(seq=23)[34:]
    with in_netns(bed.ns("gw2")):
        cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    try:
        cap.bind(("wan", 0))
        cap.settimeout(5)
        with in_netns(bed.ns("gw1")):
            rs.attach(["wan"])
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_RAW, P.IPPROTO_ESP) as raw:
                    raw.sendto(body[:16], socket.MSG_MORE, (GW2_WAN, 0))
                    raw.sendto(body[16:], 0, (GW2_WAN, 0))
            finally:
                rs.detach_all()  # here: the ifindex means gw1's wan only in gw1's namespace
        deadline = time.monotonic() + 5
        while True:
            assert time.monotonic() < deadline, "gw2 received the ESP frame"
            frame = cap.recv(4096)
            if frame[23] == P.IPPROTO_ESP and frame[34:38] == struct.pack("!I", SPI):
                break
    finally:
        cap.close()
    seq, iv, plain = _open(frame)
    assert seq == 9000, f"renumbered from the counter (9000), not left with the kernel's {seq}"
    assert iv == struct.pack("!Q", seq ^ IV_MASK), "IV = seq XOR the SA's mask"
    assert plain.startswith(INNER), "the inner packet intact under the new keystream"
    assert _sa_map(rs).get(ctypes.c_uint32(SA_ID)).seq == 9001, "one number taken"
