# SPDX-License-Identifier: GPL-2.0-only
"""Parsers the vm tests and the demo rely on, checked on the host: `ip -s xfrm state` and
swanctl's `--raw` vici dump (formats of iproute2 ip/ipxfrm.c and strongSwan vici_message.c)."""

from __future__ import annotations

from testbed.ike import parse_vici_raw
from testbed.static_esp import parse_xfrm_state_stats

XFRM_STATE = """\
src 192.0.2.1 dst 192.0.2.2
\tproto esp spi 0x00001234 reqid 1 mode tunnel
\treplay-window 32 flag af-unspec
\taead rfc7539esp(chacha20,poly1305) 0x00 128
\tanti-replay context: seq 0x0, oseq 0x5, bitmap 0x00000000
\tlifetime config:
\t  limit: soft (INF)(bytes), hard (INF)(bytes)
\t  limit: soft (INF)(packets), hard (INF)(packets)
\t  expire add: soft 0(sec), hard 0(sec)
\t  expire use: soft 0(sec), hard 0(sec)
\tlifetime current:
\t  420(bytes), 5(packets)
\t  add 2026-11-22 05:00:00 use 2026-11-22 05:00:01
\tstats:
\t  replay-window 0 replay 0 failed 0
src 192.0.2.2 dst 192.0.2.1
\tproto esp spi 0xc0ffee01 reqid 1 mode tunnel
\treplay-window 32 flag af-unspec
\taead rfc7539esp(chacha20,poly1305) 0x00 128
\tanti-replay context: seq 0x3, oseq 0x0, bitmap 0x00000007
\tlifetime current:
\t  252(bytes), 3(packets)
\t  add 2026-11-22 05:00:00 use 2026-11-22 05:00:01
"""


def test_parse_xfrm_state_stats() -> None:
    got = parse_xfrm_state_stats(XFRM_STATE)
    assert set(got) == {0x1234, 0xC0FFEE01}, f"both SAs by SPI: {got}"
    assert (got[0x1234].packets, got[0x1234].bytes, got[0x1234].oseq) == (5, 420, 5), f"{got}"
    assert (got[0xC0FFEE01].packets, got[0xC0FFEE01].seq) == (3, 3), f"{got}"


RAW = (
    "list-sa event {gw1-gw2 {uniqueid=1 version=2 state=ESTABLISHED local-host=192.0.2.1 "
    "local-port=500 initiator=yes encr-alg=CHACHA20_POLY1305 encr-keysize=256 "
    "prf-alg=PRF_HMAC_SHA2_256 dh-group=CURVE_25519 local-vips=[] "
    "child-sas {lan-remote-1 {name=lan-remote uniqueid=1 reqid=1 state=INSTALLED mode=TUNNEL "
    "protocol=ESP spi-in=c1234567 spi-out=c7654321 bytes-in=420 packets-in=5 "
    "local-ts=[10.1.0.0/24] remote-ts=[10.2.0.0/24 10.3.0.0/24]}}}}\n"
    "list-sas reply {}\n"
)


def test_parse_vici_raw() -> None:
    msgs = parse_vici_raw(RAW)
    assert len(msgs) == 2, f"one event and the (empty) reply: {msgs}"
    ike = msgs[0]["gw1-gw2"]
    assert ike["state"] == "ESTABLISHED" and ike["dh-group"] == "CURVE_25519", f"{ike}"
    assert ike["local-vips"] == [], f"empty list: {ike}"
    child = ike["child-sas"]["lan-remote-1"]
    assert child["spi-out"] == "c7654321" and child["packets-in"] == "5", f"{child}"
    assert child["remote-ts"] == ["10.2.0.0/24", "10.3.0.0/24"], f"list of two: {child}"
    assert msgs[1] == {}, f"empty reply section: {msgs[1]}"
