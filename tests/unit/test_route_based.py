# SPDX-License-Identifier: GPL-2.0-only
"""Route-based tunnels (docs/design.md §10): SAs and policies bound to an xfrm interface
(XFRMA_IF_ID, strongSwan's if_id_in/if_id_out) or carrying a mark (VTI). The model's lookup,
validation (accepted only where the kernel's own lookups would pick the same policy and SA),
and the agent: learned through the interface, taken off when the interface goes down or away.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from agent_bed import (
    GW1,
    GW2,
    LAN_HOST,
    LAN_NET,
    REMOTE_HOST,
    REMOTE_NET,
    SPI_IN,
    SPI_OUT,
    WAN_IF,
    AgentBed,
    make_sa,
    one_tunnel,
    tmpl,
)

from controller.core.reasons import RejectReason
from controller.core.state import Direction
from controller.core.validate import (
    NUD_PERMANENT,
    Accepted,
    NeighInfo,
    Rejected,
    RouteInfo,
    Sighting,
    TunnelDev,
    validate_decap,
    validate_encap,
)
from controller.core.xfrm_model import (
    DefaultAction,
    DefaultPolicy,
    Dir,
    Flow,
    Mark,
    Policy,
    Selector,
    policy_lookup,
    resolve_sa,
)

IF_ID = 42
XFRMI_IF = 9  # ipsec0's ifindex
LAN_IF_ = 2
GW2_MAC, LAN_HOST_MAC = "02:00:c0:00:02:02", "02:00:0a:01:00:02"
ANY_MARK = 0xFFFFFFFF
BLOCK_OUT = DefaultPolicy(outbound=DefaultAction.BLOCK)


def route_based_policies(if_id: int = IF_ID, mark: Mark | None = None) -> list[Policy]:
    """What strongSwan installs with if_id_in = if_id_out = if_id (or ip xfrm ... mark)."""
    kw = {"if_id": if_id, "mark": mark}
    return [
        Policy(
            Selector.of(LAN_NET, REMOTE_NET),
            Dir.OUT,
            2000,
            index=1,
            templates=(tmpl(GW1, GW2),),
            **kw,
        ),
        Policy(
            Selector.of(REMOTE_NET, LAN_NET),
            Dir.IN,
            2000,
            index=2,
            templates=(tmpl(GW2, GW1),),
            **kw,
        ),
        Policy(
            Selector.of(REMOTE_NET, LAN_NET),
            Dir.FWD,
            2000,
            index=3,
            templates=(tmpl(GW2, GW1),),
            **kw,
        ),
    ]


SA_OUT = make_sa(SPI_OUT, GW1, GW2, if_id=IF_ID)
SA_IN = make_sa(SPI_IN, GW2, GW1, if_id=IF_ID)
ENCAP = Sighting(
    Direction.ENCAP, LAN_IF_, WAN_IF, LAN_HOST, REMOTE_HOST, 17, 4000, 53, SPI_OUT, GW1, GW2,
    "02:00:c0:00:02:01", GW2_MAC, via=TunnelDev(XFRMI_IF, IF_ID),
)  # fmt: skip
DECAP = Sighting(
    Direction.DECAP, WAN_IF, LAN_IF_, REMOTE_HOST, LAN_HOST, 17, 53, 4000, SPI_IN, GW2, GW1,
    "02:00:0a:01:00:01", LAN_HOST_MAC, via=TunnelDev(XFRMI_IF, IF_ID),
)  # fmt: skip
ROUTE_WAN = RouteInfo(oif=WAN_IF, gateway=None)
ROUTE_LAN = RouteInfo(oif=LAN_IF_, gateway=None)


def enc(s=ENCAP, policies=None, sa=SA_OUT, default=None):
    pols = route_based_policies() if policies is None else policies
    default = default or DefaultPolicy()
    return validate_encap(s, pols, default, sa, ROUTE_WAN, NeighInfo(GW2_MAC, NUD_PERMANENT))


def dec(s=DECAP, policies=None, sa=SA_IN):
    pols = route_based_policies() if policies is None else policies
    neigh = NeighInfo(LAN_HOST_MAC, NUD_PERMANENT)
    return validate_decap(s, pols, DefaultPolicy(), sa, {GW1}, ROUTE_LAN, neigh)


# -- the model's lookup ------------------------------------------------------------------------
def test_policy_lookup_matches_if_id_exactly() -> None:
    pols = route_based_policies()
    flow = Flow.of(LAN_HOST, REMOTE_HOST, 17, 4000, 53)
    assert policy_lookup(pols, flow, Dir.OUT) is None, "if_id 0 does not find an if_id policy"
    got = policy_lookup(pols, replace(flow, if_id=IF_ID), Dir.OUT)
    assert got is not None and got.index == 1, "the interface's if_id finds it"
    assert policy_lookup(pols, replace(flow, if_id=IF_ID + 1), Dir.OUT) is None, "other if_id"


def test_policy_lookup_matches_mark_under_mask() -> None:
    pols = route_based_policies(0, Mark(7, 0xFF))
    flow = Flow.of(LAN_HOST, REMOTE_HOST, 17, 4000, 53)
    assert policy_lookup(pols, flow, Dir.OUT) is None, "mark 0 is not 7"
    assert policy_lookup(pols, replace(flow, mark=0x107), Dir.OUT) is not None, "0x107 & 0xff"
    assert policy_lookup(pols, replace(flow, mark=8), Dir.OUT) is None, "mark 8"


def test_resolve_sa_takes_the_policys_if_id_and_mark() -> None:
    pol = route_based_policies()[0]
    plain = make_sa(SPI_OUT + 1, GW1, GW2)
    assert resolve_sa(pol, [plain, SA_OUT]) is SA_OUT, "only the SA of the policy's if_id"
    assert resolve_sa(pol, [plain]) is None, "an SA without if_id is not the policy's"
    vti = route_based_policies(0, Mark(7, ANY_MARK))[0]
    marked = make_sa(SPI_OUT + 2, GW1, GW2, mark=Mark(7, ANY_MARK))
    other = make_sa(SPI_OUT + 3, GW1, GW2, mark=Mark(8, ANY_MARK))
    assert resolve_sa(vti, [other, marked]) is marked, "the SA with the policy's mark"
    # An SA without a mark (v = m = 0) passes any lookup mark, as in __xfrm_state_lookup.
    assert resolve_sa(vti, [plain]) is plain, "an unmarked SA serves a marked policy too"
    assert resolve_sa(vti, [make_sa(5, GW1, GW2, mark=Mark(8, ANY_MARK))]) is None, "mark 8"


def test_if_id_and_mark_sas_are_served() -> None:
    assert SA_OUT.fastpath_support() == (True, "ok"), "an if_id SA is served"
    assert make_sa(1, GW1, GW2, mark=Mark(7, ANY_MARK)).fastpath_support()[0], "a marked SA"
    ok, why = make_sa(1, GW1, GW2, output_mark=3).fastpath_support()
    assert not ok and "output mark" in why, "an output mark rewrites skb->mark: not served"


# -- validation --------------------------------------------------------------------------------
def test_xfrmi_flows_validate_both_ways() -> None:
    got = enc()
    assert isinstance(got, Accepted), f"encap through ipsec0: {got}"
    assert got.policy.index == 1 and got.via == TunnelDev(XFRMI_IF, IF_ID), "policy and device"
    got = dec()
    assert isinstance(got, Accepted), f"decap out of ipsec0: {got}"
    assert got.policy.index == 3 and got.via is not None, "the FWD policy of the if_id"


@pytest.mark.parametrize(
    ("what", "result", "reason"),
    [
        ("encap not routed into an xfrm interface", lambda: enc(replace(ENCAP, via=None)),
         RejectReason.NOT_PROTECTED),
        ("encap into an interface of another if_id",
         lambda: enc(replace(ENCAP, via=TunnelDev(XFRMI_IF, IF_ID + 1))),
         RejectReason.NOT_PROTECTED),
        ("encap SA of another if_id", lambda: enc(sa=replace(SA_OUT, if_id=IF_ID + 1)),
         RejectReason.SA_NOT_OF_POLICY),
        ("encap SA without if_id", lambda: enc(sa=replace(SA_OUT, if_id=0)),
         RejectReason.SA_NOT_OF_POLICY),
        ("encap blocked by default out before the interface", lambda: enc(default=BLOCK_OUT),
         RejectReason.OUT_POLICY_BLOCKS),
        ("decap without the interface of the SA's if_id", lambda: dec(replace(DECAP, via=None)),
         RejectReason.SA_NOT_OF_POLICY),
        ("decap FWD policy of another if_id", lambda: dec(policies=route_based_policies(7)),
         RejectReason.NOT_PROTECTED),
        ("decap marked SA, packet unmarked", lambda: dec(sa=replace(SA_IN, mark=Mark(7, 0xFF))),
         RejectReason.SA_NOT_OF_POLICY),
    ],
)  # fmt: skip
def test_route_based_refusals(what: str, result, reason: RejectReason) -> None:
    got = result()
    assert isinstance(got, Rejected), f"{what}: refused"
    assert got.reason is reason, f"{what}: {got}"


def test_plain_policy_wins_before_the_interface() -> None:
    """ip_forward's own lookup (if_id 0) runs first: a plain OUT policy protecting the flow
    sends it on its SA, never into the interface; the if_id SA would be the wrong one."""
    plain = Policy(
        Selector.of(LAN_NET, REMOTE_NET), Dir.OUT, 3000, index=9, templates=(tmpl(GW1, GW2),)
    )
    pols = [*route_based_policies(), plain]
    got = enc(policies=pols)
    assert isinstance(got, Rejected) and got.reason is RejectReason.SA_NOT_OF_POLICY, f"{got}"
    got = enc(policies=pols, sa=replace(SA_OUT, if_id=0))
    assert isinstance(got, Accepted) and got.policy.index == 9, f"the plain SA: {got}"


def test_vti_mark_flow_validates_encap() -> None:
    pols = route_based_policies(0, Mark(7, ANY_MARK))
    sa = replace(SA_OUT, if_id=0, mark=Mark(7, ANY_MARK))
    got = enc(replace(ENCAP, via=TunnelDev(XFRMI_IF, 0, 7)), pols, sa)
    assert isinstance(got, Accepted), f"vti0 (key 7) looks up with mark 7: {got}"
    got = enc(replace(ENCAP, via=None), pols, sa)
    assert isinstance(got, Rejected), "without the VTI device no policy matches"


# -- the agent ---------------------------------------------------------------------------------
@pytest.fixture
def bed(tmp_path: Path) -> AgentBed:
    bed = AgentBed(tmp_path, tunnel=False)
    k = bed.kernel
    one_tunnel(k, out_sa=SA_OUT, in_sa=SA_IN)
    for p in list(k.policy_list):
        k.delete_policy(p)
    for p in route_based_policies():
        k.add_policy(p)
    k.routes[REMOTE_NET] = RouteInfo(oif=XFRMI_IF, gateway=None)  # ip route ... dev ipsec0
    k.xfrmi[XFRMI_IF] = IF_ID
    k.take_events()
    bed.agent = bed.start()
    return bed


def test_agent_learns_through_the_xfrm_interface(bed: AgentBed) -> None:
    bed.agent.on_candidate(bed.encap(spi=SPI_OUT))
    bed.agent.on_candidate(bed.decap())
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    recs = list(bed.agent.flows.flows.values())
    assert len(recs) == 2, "both directions offloaded"
    assert all(r.via_ifindex == XFRMI_IF for r in recs), "each flow depends on ipsec0"
    assert all(r.egress_ifindex != XFRMI_IF for r in recs), "the fastpath writes to real links"


@pytest.mark.parametrize("gone", ["down", "deleted"])
def test_xfrm_interface_down_or_gone_takes_its_flows_off(bed: AgentBed, gone: str) -> None:
    bed.agent.on_candidate(bed.encap(spi=SPI_OUT))
    bed.agent.on_candidate(bed.decap())
    assert len(bed.dp.flow_map) == 2, "two flows before"
    ev = bed.kernel.set_xfrmi(XFRMI_IF, "ipsec0", IF_ID, up=False)
    if gone == "deleted":
        ev = replace(ev, action="del")
    bed.agent.on_kernel_event(ev)
    assert not bed.dp.flow_map.elems, f"ipsec0 {gone}: no flow entry left"
    assert not bed.agent.flows.flows, f"ipsec0 {gone}: no flow record left"
    bed.agent.on_candidate(bed.encap(spi=SPI_OUT))
    assert not bed.dp.flow_map.elems, "no xfrm interface: the flow is not learned again"
    assert bed.metrics.rejects, "and the refusal is counted"


def test_agent_without_the_route_into_the_interface_refuses(bed: AgentBed) -> None:
    bed.kernel.routes[REMOTE_NET] = RouteInfo(oif=WAN_IF, gateway=GW2)
    bed.agent.on_candidate(bed.encap(spi=SPI_OUT))
    assert not bed.dp.flow_map.elems, "the kernel would not protect it: not offloaded"
