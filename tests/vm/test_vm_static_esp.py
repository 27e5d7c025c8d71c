# SPDX-License-Identifier: GPL-2.0-only
"""Kernel ESP with static keys between gw1 and gw2: rfc7539esp(chacha20,poly1305), tunnel
mode, carries lan <-> remote traffic, and the SA counters show every packet crossing it."""

from __future__ import annotations

import pytest

from testbed.bed import Testbed
from testbed.static_esp import AEAD, install_static_esp, random_sa

pytestmark = pytest.mark.vm

PINGS = 5
ICMP_ECHO_LEN = 84  # IPv4 20 + ICMP 8 + ping's default 56 data bytes


def xfrm_stat(bed: Testbed, role: str) -> dict[str, int]:
    """The namespace's XFRM error counters (/proc/net/xfrm_stat, Documentation/networking/
    xfrm_proc.rst)."""
    out = bed.cmd(role, ["cat", "/proc/net/xfrm_stat"]).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def test_static_esp_tunnel_carries_lan_remote_traffic(bed: Testbed) -> None:
    tun = install_static_esp(bed)
    state = bed.ip("gw1", "xfrm", "state").stdout
    assert AEAD in state and "mode tunnel" in state, f"gw1 holds the AEAD tunnel SAs: {state}"
    for role in ("gw1", "gw2"):
        zero = tun.counters(role)
        assert {s.packets for s in zero.values()} == {0}, f"{role}: SAs start unused: {zero}"

    assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=PINGS), "lan reaches remote via ESP"

    gw1, gw2 = tun.counters("gw1"), tun.counters("gw2")
    # Echo requests go out on SA `out` (gw1 -> gw2) and replies come back on `back`: exactly
    # PINGS each, at both ends (IPv6 is off and neighbours are pinned: nothing else flows).
    for role, counters in (("gw1", gw1), ("gw2", gw2)):
        for spi in (tun.out_spi, tun.back_spi):
            got = counters[spi]
            assert got.packets == PINGS, f"{role} SA {spi:#x} counted {PINGS} packets: {got}"
            assert got.bytes >= PINGS * ICMP_ECHO_LEN, f"{role} SA {spi:#x} bytes: {got}"
    assert gw1[tun.out_spi].oseq == PINGS, f"gw1 sent sequence numbers 1..{PINGS}: {gw1}"
    assert gw2[tun.back_spi].oseq == PINGS, f"gw2 sent sequence numbers 1..{PINGS}: {gw2}"


def test_static_esp_wrong_key_fails_authentication(bed: Testbed) -> None:
    """Keys matter: gw2 holding another key for gw1's SA drops every packet on its ICV check
    (XfrmInStateProtoError), so the ping fails. Proves the tunnel test above is not vacuous."""
    p = bed.plan
    out = random_sa(p["GW1_WAN"], p["GW2_WAN"])
    back = random_sa(p["GW2_WAN"], p["GW1_WAN"])
    install_static_esp(bed, out=out, back=back, roles=("gw1",))
    wrong = random_sa(out.src, out.dst, spi=out.spi)
    install_static_esp(bed, out=wrong, back=back, roles=("gw2",))
    before = xfrm_stat(bed, "gw2")["XfrmInStateProtoError"]

    assert not bed.ping("lan", bed.addr("REMOTE_HOST"), count=2, timeout=1.0), (
        "no echo gets through a tunnel whose keys differ"
    )
    after = xfrm_stat(bed, "gw2")["XfrmInStateProtoError"]
    assert after - before == 2, f"gw2 rejected both packets on the ICV: {before} -> {after}"
