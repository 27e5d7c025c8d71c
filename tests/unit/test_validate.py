# SPDX-License-Identifier: GPL-2.0-only
"""Validation of learned candidates against kernel state (pure): every reason a flow may be
refused, and the two accepted shapes (encap, decap) of a strongSwan-style gateway."""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from controller.core.crypto import Backend, sa_backend
from controller.core.state import Direction
from controller.core.validate import (
    NUD_PERMANENT,
    Accepted,
    NeighInfo,
    Rejected,
    RouteInfo,
    Sighting,
    validate_decap,
    validate_encap,
)
from controller.core.xfrm_model import (
    FASTPATH_AEAD,
    Action,
    Algorithm,
    DefaultAction,
    DefaultPolicy,
    Dir,
    Encap,
    Mode,
    Policy,
    Sa,
    Secret,
    Selector,
    Template,
)

GW1, GW2 = "192.0.2.1", "192.0.2.2"
LAN, REMOTE = "10.1.0.0/24", "10.2.0.0/24"
GW2_MAC, LAN_HOST_MAC = "02:00:c0:00:02:02", "02:00:0a:01:00:02"
LAN_IF, WAN_IF = 2, 3
ip = ipaddress.ip_address


def sa(spi: int, src: str, dst: str, reqid: int = 1, **kw) -> Sa:
    aead = Algorithm("aead", FASTPATH_AEAD, 288, Secret(bytes(36)), 128)
    return Sa(src=ip(src), dst=ip(dst), spi=spi, reqid=reqid, aead=aead, replay_window=32, **kw)


SA_OUT = sa(0x1000, GW1, GW2)
SA_IN = sa(0x2000, GW2, GW1)


def tmpl(src: str, dst: str, reqid: int = 1, optional: bool = False) -> Template:
    return Template(dst=ip(dst), src=ip(src), reqid=reqid, mode=Mode.TUNNEL, optional=optional)


POLICIES = [
    Policy(Selector.of(LAN, REMOTE), Dir.OUT, 2000, index=1, templates=(tmpl(GW1, GW2),)),
    Policy(Selector.of(REMOTE, LAN), Dir.IN, 2000, index=2, templates=(tmpl(GW2, GW1),)),
    Policy(Selector.of(REMOTE, LAN), Dir.FWD, 2000, index=3, templates=(tmpl(GW2, GW1),)),
    # strongSwan's outbound FWD policy: allows the clear LAN packets to be forwarded.
    Policy(
        Selector.of(LAN, REMOTE), Dir.FWD, 2000, index=4, templates=(tmpl(GW1, GW2, optional=True),)
    ),
]
DEFAULT = DefaultPolicy()
ENCAP = Sighting(
    Direction.ENCAP,
    LAN_IF,
    WAN_IF,
    "10.1.0.2",
    "10.2.0.2",
    17,
    4000,
    53,
    0x1000,
    GW1,
    GW2,
    "02:00:c0:00:02:01",
    GW2_MAC,
)
DECAP = Sighting(
    Direction.DECAP,
    WAN_IF,
    LAN_IF,
    "10.2.0.2",
    "10.1.0.2",
    17,
    53,
    4000,
    0x2000,
    "10.2.0.2",
    "10.1.0.2",
    "02:00:0a:01:00:01",
    LAN_HOST_MAC,
)
ROUTE_WAN = RouteInfo(oif=WAN_IF, gateway=None)
ROUTE_LAN = RouteInfo(oif=LAN_IF, gateway=None)
NEIGH_GW2 = NeighInfo(GW2_MAC, NUD_PERMANENT)
NEIGH_LAN = NeighInfo(LAN_HOST_MAC, NUD_PERMANENT)


def enc(
    s=ENCAP, policies=POLICIES, default=DEFAULT, the_sa=SA_OUT, route=ROUTE_WAN, neigh=NEIGH_GW2
):
    return validate_encap(s, policies, default, the_sa, route, neigh)


def dec(
    s=DECAP,
    policies=POLICIES,
    default=DEFAULT,
    the_sa=SA_IN,
    route=ROUTE_LAN,
    neigh=NEIGH_LAN,
    local=frozenset({GW1, "10.1.0.1"}),
):
    return validate_decap(s, policies, default, the_sa, set(local), route, neigh)


def test_accepts_a_gateway_flow_both_ways() -> None:
    a = enc()
    assert isinstance(a, Accepted), f"encap accepted: {a}"
    assert a.sa is SA_OUT and a.policy.index == 1 and a.next_hop == GW2, f"encap proof: {a}"
    d = dec()
    assert isinstance(d, Accepted), f"decap accepted: {d}"
    assert d.sa is SA_IN and d.policy.index == 3 and d.next_hop == "10.1.0.2", f"decap: {d}"


@pytest.mark.parametrize(
    ("what", "result", "reason"),
    [
        ("NAT rewrote it", lambda: enc(s=replace(ENCAP, mangled=True)), "mangled"),
        ("no SA", lambda: enc(the_sa=None), "no_sa"),
        (
            "AES-GCM SA",
            lambda: enc(
                the_sa=replace(
                    SA_OUT, aead=Algorithm("aead", "rfc4106(gcm(aes))", 160, Secret(bytes(20)), 128)
                )
            ),
            "sa_unsupported",
        ),
        (
            "transport mode",
            lambda: enc(the_sa=replace(SA_OUT, mode=Mode.TRANSPORT)),
            "sa_unsupported",
        ),
        (
            "NAT-T SA, plain ESP on the wire",
            lambda: enc(the_sa=replace(SA_OUT, encap=Encap(2, 4500, 4500))),
            "outer_mismatch",
        ),
        (
            "inbound NAT-T SA, plain ESP on the wire",
            lambda: dec(the_sa=replace(SA_IN, encap=Encap(2, 4500, 4500))),
            "outer_mismatch",
        ),
        (
            "inbound NAT-T SA, other UDP ports on the wire",
            lambda: dec(
                s=replace(DECAP, encap_ports=(4501, 4500)),
                the_sa=replace(SA_IN, encap=Encap(2, 4500, 4500)),
            ),
            "outer_mismatch",
        ),
        (
            "plain SA, ESP in UDP on the wire",
            lambda: enc(s=replace(ENCAP, encap_ports=(4500, 4500))),
            "outer_mismatch",
        ),
        (
            "encapsulation ESPINUDP_NON_IKE",
            lambda: enc(
                s=replace(ENCAP, encap_ports=(4500, 4500)),
                the_sa=replace(SA_OUT, encap=Encap(1, 4500, 4500)),
            ),
            "sa_unsupported",
        ),
        ("SA of another reqid", lambda: enc(the_sa=replace(SA_OUT, reqid=9)), "sa_not_of_policy"),
        ("no OUT policy", lambda: enc(policies=POLICIES[1:]), "not_protected"),
        (
            "OUT policy blocks",
            lambda: enc(policies=[replace(POLICIES[0], action=Action.BLOCK), *POLICIES[1:]]),
            "out_policy_blocks",
        ),
        (
            "fwd default block, no FWD policy",
            lambda: enc(policies=POLICIES[:3], default=DefaultPolicy(forward=DefaultAction.BLOCK)),
            "fwd_policy_blocks",
        ),
        (
            "FWD policy demands ESP",
            lambda: enc(
                policies=[*POLICIES[:3], replace(POLICIES[3], templates=(tmpl(GW1, GW2),))]
            ),
            "fwd_policy_blocks",
        ),
        (
            "higher-priority block",
            lambda: enc(
                policies=[
                    Policy(Selector.of("10.1.0.2/32", REMOTE), Dir.FWD, 10, Action.BLOCK, index=9),
                    *POLICIES,
                ]
            ),
            "fwd_policy_blocks",
        ),
        ("no route", lambda: enc(route=None), "no_route"),
        (
            "route elsewhere",
            lambda: enc(route=RouteInfo(oif=LAN_IF, gateway=None)),
            "route_mismatch",
        ),
        ("no neighbour", lambda: enc(neigh=None), "no_neighbour"),
        ("neighbour failed", lambda: enc(neigh=NeighInfo(GW2_MAC, 0x20)), "neighbour_unusable"),
        (
            "neighbour moved",
            lambda: enc(neigh=NeighInfo("02:00:00:00:00:99", NUD_PERMANENT)),
            "neighbour_mismatch",
        ),
        ("decap: SA not ours", lambda: dec(local=frozenset({"198.51.100.1"})), "sa_not_inbound"),
        (
            "decap: no FWD policy",
            lambda: dec(policies=[POLICIES[0], POLICIES[1], POLICIES[3]]),
            "not_protected",
        ),
        (
            "decap: FWD of another reqid",
            lambda: dec(the_sa=replace(SA_IN, reqid=5)),
            "sa_not_of_policy",
        ),
        (
            "decap: default block",
            lambda: dec(policies=[POLICIES[0]], default=DefaultPolicy(forward=DefaultAction.BLOCK)),
            "fwd_policy_blocks",
        ),
        (
            "decap: neighbour moved",
            lambda: dec(neigh=NeighInfo("02:00:00:00:00:98", 0x02)),
            "neighbour_mismatch",
        ),
    ],
)
def test_refusals_name_their_reason(what: str, result, reason: str) -> None:
    r = result()
    assert isinstance(r, Rejected), f"{what}: refused, not {r}"
    assert r.reason == reason, f"{what}: reason {r.reason} ({r.detail}), expected {reason}"


def test_icmp_selector_uses_type_and_code() -> None:
    icmp = replace(ENCAP, proto=1, sport=77, dport=8 << 8)
    only_echo = Policy(
        Selector.of(LAN, REMOTE, proto=1, sport=8),
        Dir.OUT,
        100,
        index=7,
        templates=(tmpl(GW1, GW2),),
    )
    a = enc(s=icmp, policies=[only_echo, *POLICIES])
    assert isinstance(a, Accepted) and a.policy.index == 7, f"ICMP type 8 matched: {a}"
    reply = replace(icmp, dport=0)
    a = enc(s=reply, policies=[only_echo, *POLICIES])
    assert isinstance(a, Accepted) and a.policy.index == 1, f"type 0 falls through: {a}"


def test_natt_flows_validate_on_the_sas_ports_both_ways() -> None:
    """RFC 3948: ESP in UDP with the SA's XFRMA_ENCAP ports is accepted both ways; the
    inbound SA keeps the peer's port (behind its NAT) as sport, as the frame carries it."""
    sa_out = replace(SA_OUT, encap=Encap(2, 4500, 31337))
    sa_in = replace(SA_IN, encap=Encap(2, 31337, 4500))
    a = enc(s=replace(ENCAP, encap_ports=(4500, 31337)), the_sa=sa_out)
    assert isinstance(a, Accepted), f"NAT-T encap accepted: {a}"
    k = validate_encap(
        replace(ENCAP, encap_ports=(4500, 31337)), POLICIES, DEFAULT, sa_out, ROUTE_WAN,
        NEIGH_GW2, Backend.KERNEL,
    )  # fmt: skip
    if sa_backend(sa_out, Backend.KERNEL, True)[0] is Backend.KERNEL:
        assert isinstance(k, Rejected) and k.reason.value == "sa_unsupported", (
            f"outbound NAT-T sealed by the kernel backend stays (the resequencer's kfuncs): {k}"
        )
        assert "resequencer" in k.detail, f"and says why: {k.detail}"
    else:  # the kernel backend leaves outbound SAs on the BPF AEAD: the resequencer serves it
        assert isinstance(k, Accepted), f"outbound NAT-T on the BPF AEAD: {k}"
    d = dec(s=replace(DECAP, encap_ports=(31337, 4500)), the_sa=sa_in)
    assert isinstance(d, Accepted), f"NAT-T decap accepted: {d}"
    r = dec(s=replace(DECAP, encap_ports=(40000, 4500)), the_sa=sa_in)
    assert isinstance(r, Rejected) and r.reason.value == "outer_mismatch", f"new port: {r}"
    u = dec(s=replace(DECAP, encap_ports=None, wire_seen=False), the_sa=sa_in)
    assert isinstance(u, Accepted), f"known by sec_path only: the datapath checks ports: {u}"
