# SPDX-License-Identifier: GPL-2.0-only
"""NAT-T (RFC 3948) in the control plane, pure: which encapsulations the datapath serves,
XFRM_MSG_MAPPING decoded from the kernel's bytes, a mapping change taking the peer's flows and
SAs off the fastpath before the next packet, and the SA entries carrying the SA's UDP ports."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import replace
from pathlib import Path

import pytest
from agent_bed import GW1, GW2, SPI_IN, SPI_OUT, AgentBed

from controller.core.state import Cause
from controller.core.xfrm_model import (
    FASTPATH_AEAD,
    Algorithm,
    Encap,
    Sa,
    SaId,
    SaMapping,
    Secret,
)
from controller.datapath import abi
from controller.datapath.entries import InboundSa, OutboundSa
from controller.netlink import xfrm_messages as m
from controller.netlink.xfrm import DEFAULT_GROUPS
from controller.netlink.xfrm_codec import decode, event_from

ip = ipaddress.ip_address


def _sa(**kw) -> Sa:
    aead = Algorithm("aead", FASTPATH_AEAD, 288, Secret(bytes(36)), 128)
    return Sa(src=ip(GW1), dst=ip(GW2), spi=SPI_OUT, reqid=1, aead=aead, **kw)


@pytest.mark.parametrize(
    "encap,ok,why",
    [
        (None, True, "ok"),
        (Encap(2, 4500, 4500), True, "ok"),
        (Encap(2, 4500, 31337), True, "ok"),
        (Encap(1, 4500, 4500), False, "encapsulation type 1"),
        (Encap(7, 4500, 4500), False, "encapsulation type 7"),  # TCP (RFC 8229)
        (Encap(2, 0, 4500), False, "without both UDP ports"),
    ],
)
def test_fastpath_serves_esp_in_udp_only(encap: Encap | None, ok: bool, why: str) -> None:
    got_ok, got_why = _sa(encap=encap).fastpath_support()
    assert got_ok is ok and why in got_why, f"{encap}: {got_ok}, {got_why!r}"


def test_mapping_group_joined_by_default() -> None:
    assert m.XFRMNLGRP_MAPPING in DEFAULT_GROUPS, "the monitor hears XFRM_MSG_MAPPING"


def _mapping_bytes() -> bytes:
    """XFRM_MSG_MAPPING as xfrm_send_mapping() (net/xfrm/xfrm_user.c) builds it: struct
    xfrm_user_mapping (64 bytes, ports big endian), no attributes."""
    sa_id = struct.pack(
        "=16s4sHBx", socket.inet_aton(GW1) + bytes(12), struct.pack("!I", SPI_IN), 2, 50
    )
    body = (
        sa_id
        + struct.pack("=I", 7)
        + socket.inet_aton(GW2)
        + bytes(12)
        + socket.inet_aton("198.51.100.9")
        + bytes(12)
        + struct.pack("!HH", 4500, 31337)
    )
    assert len(body) == 64, "sizeof(struct xfrm_user_mapping)"
    return struct.pack("=IHHII", 16 + len(body), m.XFRM_MSG_MAPPING, 0, 0, 0) + body


def test_mapping_message_decodes() -> None:
    mtype, msg = decode(_mapping_bytes())
    ev = event_from(mtype, msg, 123)
    assert ev == SaMapping(
        123,
        sa_id=SaId(ip(GW1), SPI_IN),
        reqid=7,
        old_saddr=ip(GW2),
        new_saddr=ip("198.51.100.9"),
        old_sport=4500,
        new_sport=31337,
    ), f"decoded: {ev}"


@pytest.fixture
def bed(tmp_path: Path) -> AgentBed:
    return AgentBed(tmp_path)


def test_mapping_takes_the_peers_sas_and_flows_off(bed: AgentBed) -> None:
    """The inbound SA the kernel names and the outbound SA of the same reqid to the old
    address go, flows first, counted as nat_mapping, before any further packet."""
    bed.agent.on_candidate(bed.encap())
    bed.agent.on_candidate(bed.decap())
    assert len(bed.dp.flow_map) == 2, "both flows installed"
    assert bed.dp.sa_out_map.elems and bed.dp.sa_in_map.elems, "both SAs offloaded"
    ev = SaMapping(1, SaId(ip(GW1), SPI_IN), 1, ip(GW2), ip(GW2), 4500, 31337)
    bed.agent.on_kernel_event(ev)
    assert not bed.dp.flow_map.elems, "every flow of the peer left the datapath"
    assert not bed.dp.sa_out_map.elems, "the outbound SA of the reqid left"
    assert not bed.dp.sa_in_map.elems, "the inbound SA the mapping names left"
    causes = [r["cause"] for r in bed.agent.state.recent_invalidations]
    assert Cause.NAT_MAPPING.value in causes, f"counted as nat_mapping: {causes}"


def test_mapping_of_another_reqid_leaves_the_outbound_sa(bed: AgentBed) -> None:
    bed.agent.on_candidate(bed.encap())
    ev = SaMapping(1, SaId(ip(GW1), 0x9999), 9, ip(GW2), ip(GW2), 4500, 31337)
    bed.agent.on_kernel_event(ev)
    assert len(bed.dp.flow_map) == 1 and bed.dp.sa_out_map.elems, "another peer's SA: kept"


def test_sa_entries_carry_the_encap_ports() -> None:
    key = bytes(36)
    out = OutboundSa(1, SPI_OUT, GW1, GW2, key, 3, bytes(6), bytes(6), encap_ports=(4500, 31337))
    c = out.to_c()
    assert c.flags & abi.SA_F_ESPINUDP, "outbound: ESPINUDP flag"
    assert bytes(c)[-4:] == struct.pack("!HH", 4500, 31337), "ports as on the wire (be)"
    plain = replace(out, encap_ports=None).to_c()
    assert not plain.flags & abi.SA_F_ESPINUDP and bytes(plain)[-4:] == bytes(4), "plain: zero"
    _, cin = InboundSa(2, SPI_IN, GW2, GW1, key, encap_ports=(31337, 4500)).to_c()
    assert cin.flags & abi.SA_F_ESPINUDP, "inbound: ESPINUDP flag"
    assert bytes(cin)[-4:] == struct.pack("!HH", 31337, 4500), "inbound ports (be)"
    with pytest.raises(ValueError):
        replace(out, encap_ports=(0, 4500)).to_c()
