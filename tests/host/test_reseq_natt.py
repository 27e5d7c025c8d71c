# SPDX-License-Identifier: GPL-2.0-only
"""The resequencer (bpf/tc_reseq.c) on NAT-T (RFC 3948): a kernel-built ESP-in-UDP frame of an
offloaded SA with UDP encapsulation is renumbered from the datapath's counter behind its
untouched UDP header (checksum 0), and opens with `cryptography`; UDP that is not the SA's
encapsulation (other ports, or an SA without it) and plain ESP of a NAT-T SA are left alone,
the counter unmoved. The fixture and helpers are tests/host/test_reseq.py's."""

from __future__ import annotations

import ctypes
import struct

import packets as P
import test_reseq as T
from test_reseq import rs  # noqa: F401  (the module's resequencer)

from controller.datapath.bpfsys import prog_test_run
from controller.datapath.reseq import Resequencer

OURS, PEERS = 4500, 4501


def _natt_frame(seq: int, sport: int = OURS, dport: int = PEERS) -> bytes:
    """What esp_output_udp_encap() sends: UDP with checksum 0, then the ESP of esp4_output()."""
    esp = P.EspSa(T.SPI, T.KEY)
    body = esp.seal(seq, T.INNER, iv=struct.pack("!Q", seq ^ 0xDEADBEEF00000000))
    udp = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
    return P.eth(T.GW2_WAN_MAC, T.GW1_WAN_MAC) + P.ipv4(T.GW1_WAN, T.GW2_WAN, P.IPPROTO_UDP, udp)


def _counter(r: Resequencer) -> int:
    return T._sa_map(r).get(ctypes.c_uint32(T.SA_ID)).seq


def test_natt_kernel_frame_is_renumbered_behind_its_udp_header(rs: Resequencer) -> None:  # noqa: F811
    T._install(rs, seq=9000, encap_ports=(OURS, PEERS))
    for n in range(3):
        frame = _natt_frame(seq=40 + n)
        ret, out, _ = prog_test_run(rs.fd, frame)
        assert ret == T.TC_ACT_OK, f"frame {n} passes on (verdict {ret})"
        out = out[: len(frame)]
        assert out[:42] == frame[:42], "Ethernet, IPv4 and UDP headers unchanged (checksum 0)"
        seq, iv, plain = P.EspSa(T.SPI, T.KEY).open(out[42:])
        assert seq == 9000 + n, f"frame {n} took number {9000 + n} from the counter, not {seq}"
        assert iv == struct.pack("!Q", seq ^ T.IV_MASK), "IV = seq XOR the SA's mask"
        assert plain.startswith(T.INNER) and plain[-1] == P.IPPROTO_IPIP, "inner packet intact"
    assert _counter(rs) == 9003, "counter advanced once per frame"


def test_udp_that_is_not_the_sas_encapsulation_is_untouched(rs: Resequencer) -> None:  # noqa: F811
    T._install(rs, seq=300, encap_ports=(OURS, PEERS))
    cases = {
        "other destination port": _natt_frame(5, dport=4999),
        "other source port": _natt_frame(5, sport=4999),
        "plain ESP of a NAT-T SA": T._kernel_frame(5),
    }
    for desc, frame in cases.items():
        ret, out, _ = prog_test_run(rs.fd, frame)
        assert (ret, out[: len(frame)]) == (T.TC_ACT_OK, frame), f"{desc}: left alone"
    T._install(rs, seq=300)
    frame = _natt_frame(5)
    ret, out, _ = prog_test_run(rs.fd, frame)
    assert (ret, out[: len(frame)]) == (T.TC_ACT_OK, frame), "ESP-in-UDP of a plain SA: alone"
    assert _counter(rs) == 300, "no number taken for any of them"
