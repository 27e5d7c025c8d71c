# SPDX-License-Identifier: GPL-2.0-only
"""NAT-T (RFC 3948) XDP-to-XDP in the namespace test bed: both gateways' SAs carry UDP
encapsulation (gw1 port 4500, gw2 port 4501), so lan <-> remote UDP only gets through when both
gateways build and take ESP in UDP over real veth devices (no tailroom: the slide path), with
every frame counted as a hit. The set-up is tests/host/test_datapath_redirect.py's."""

from __future__ import annotations

import test_datapath_redirect as R
from test_datapath_redirect import gateways, xdp_pass  # noqa: F401  (module fixtures)

from controller.datapath.xdp import Datapath, InboundSa, OutboundSa
from testbed.bed import Testbed

PORTS = {"gw1": 4500, "gw2": 4501}


def _natt(bed: Testbed, d: Datapath, me: str, peer: str) -> None:
    """test_datapath_redirect's SAs again, with UDP encapsulation (XFRMA_ENCAP's ports)."""
    R.configure(bed, d, me, peer)
    my_wan, peer_wan = bed.iface(me, "wan"), bed.iface(peer, "wan")
    a = me == "gw1"
    d.put_outbound_sa(
        OutboundSa(
            sa_id=1,
            spi=R.SPI_A if a else R.SPI_B,
            saddr=my_wan.addr,
            daddr=peer_wan.addr,
            key=R.KEY_A if a else R.KEY_B,
            egress_ifindex=bed.ifindex(me, "wan"),
            dmac=peer_wan.mac,
            smac=my_wan.mac,
            mtu=1500,
            encap_ports=(PORTS[me], PORTS[peer]),
        )
    )
    d.put_inbound_sa(
        InboundSa(
            sa_id=2,
            spi=R.SPI_B if a else R.SPI_A,
            saddr=peer_wan.addr,
            daddr=my_wan.addr,
            key=R.KEY_B if a else R.KEY_A,
            encap_ports=(PORTS[peer], PORTS[me]),
        )
    )


def test_xdp_to_xdp_natt_tunnel_carries_udp_both_ways(
    bed: Testbed,
    gateways: tuple[Datapath, Datapath],  # noqa: F811
    xdp_pass,  # noqa: F811
) -> None:
    from bcc import BPF

    from controller.netns import in_netns

    gw1, gw2 = gateways
    _natt(bed, gw1, "gw1", "gw2")
    _natt(bed, gw2, "gw2", "gw1")
    hosts = [("lan", "eth0"), ("remote", "eth0")]
    try:
        gw1.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw1"))
        gw2.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw2"))
        for role, dev in hosts:
            with in_netns(bed.ns(role)):
                BPF.attach_xdp(dev.encode(), xdp_pass, 0)
        before = (gw1.stats(), gw2.stats())
        result = R.udp_echo(bed, R.N_PACKETS)
        after = (gw1.stats(), gw2.stats())
    finally:
        for role, dev in hosts:
            with in_netns(bed.ns(role)):
                BPF.remove_xdp(dev.encode(), 0)
        gw1.detach_all()
        gw2.detach_all()
    deltas = [
        {f"{d.name}/{r.name}": after[i][(d, r)][0] - before[i][(d, r)][0]
         for (d, r) in after[i] if after[i][(d, r)] != before[i][(d, r)]}
        for i in (0, 1)
    ]  # fmt: skip
    assert result == {"ok": R.N_PACKETS, "bad": []}, f"every datagram echoed: {result} {deltas}"
    for i, name in enumerate(("gw1", "gw2")):
        assert deltas[i].get("ENCAP/ENCAP_OK") == R.N_PACKETS, f"{name}: NAT-T encap {deltas}"
        assert deltas[i].get("DECAP/DECAP_OK") == R.N_PACKETS, f"{name}: NAT-T decap {deltas}"
        assert not deltas[i].get("ENCAP/PASS_NO_ROOM"), f"{name}: no punt for room {deltas}"
