# SPDX-License-Identifier: GPL-2.0-only
"""strongSwan IKEv2 with a pre-shared key between gw1 and gw2 negotiates ChaCha20-Poly1305 for
IKE and ESP (RFC 7634), installs the kernel SAs, and carries lan <-> remote traffic."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.bed import Testbed
from testbed.ike import CHILD, have_strongswan, ike_tunnel
from testbed.static_esp import AEAD, parse_xfrm_state_stats

pytestmark = pytest.mark.vm

PINGS = 5


@pytest.fixture(autouse=True)
def _need_strongswan() -> None:
    ok, why = have_strongswan()
    if not ok:
        pytest.fail(why)  # make setup installs it: missing is a set-up defect, not a skip


def test_strongswan_ikev2_psk_chacha20poly1305_carries_traffic(
    bed: Testbed, tmp_path: Path
) -> None:
    with ike_tunnel(bed, tmp_path) as ike:
        sas = ike.gw1.list_sas()
        assert len(sas) == 1, f"gw1 has one IKE_SA: {sas}"
        ike_sa = sas[0]
        assert ike_sa.get("state") == "ESTABLISHED", f"IKE_SA established: {ike_sa}"
        assert ike_sa.get("version") == "2", f"IKEv2: {ike_sa}"
        assert ike_sa.get("encr-alg") == "CHACHA20_POLY1305", f"IKE cipher: {ike_sa}"
        assert ike_sa.get("prf-alg") == "PRF_HMAC_SHA2_256", f"IKE PRF: {ike_sa}"
        assert ike_sa.get("dh-group") == "CURVE_25519", f"IKE key exchange: {ike_sa}"
        children = list(ike_sa.get("child-sas", {}).values())
        assert len(children) == 1, f"one CHILD_SA: {ike_sa}"
        child = children[0]
        assert child.get("name") == CHILD["gw1"], f"the configured CHILD_SA: {child}"
        assert child.get("state") == "INSTALLED", f"CHILD_SA installed: {child}"
        assert child.get("mode") == "TUNNEL" and child.get("protocol") == "ESP", f"{child}"
        assert child.get("encr-alg") == "CHACHA20_POLY1305", f"ESP cipher: {child}"
        # No NAT between the gateways: plain ESP (IP protocol 50), what the XDP datapath parses.
        assert child.get("encap") != "yes", f"ESP not in UDP: {child}"
        spi_out, spi_in = int(child["spi-out"], 16), int(child["spi-in"], 16)

        # The kernel holds what charon negotiated: the same SPIs, with the RFC 7634 AEAD.
        state = bed.ip("gw1", "xfrm", "state").stdout
        assert state.count(AEAD) == 2, f"gw1's kernel has both SAs as {AEAD}: {state}"

        assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=PINGS), "lan reaches remote"

        kernel = parse_xfrm_state_stats(bed.ip("gw1", "-s", "xfrm", "state").stdout)
        assert kernel[spi_out].packets == PINGS, f"{PINGS} requests out via ESP: {kernel}"
        assert kernel[spi_in].packets == PINGS, f"{PINGS} replies in via ESP: {kernel}"
        child = next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))
        assert child.get("packets-out") == str(PINGS), f"charon sees the traffic: {child}"
        assert child.get("packets-in") == str(PINGS), f"charon sees the traffic: {child}"

        peer = ike.gw2.list_sas()
        assert peer and peer[0].get("state") == "ESTABLISHED", f"gw2 agrees: {peer}"
    assert ike.gw1.proc is None and ike.gw2.proc is None, "both daemons stopped"
