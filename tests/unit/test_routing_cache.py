# SPDX-License-Identifier: GPL-2.0-only
"""The agent's routing cache (controller/agent/routing_cache.py): validation asks the kernel
once per route, neighbour, address list and link until an event that may change the answer is
handled; after it, the kernel is asked again, so no stale answer is ever served."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_bed import (
    GW1,
    GW2,
    GW2_MAC,
    LAN_IF,
    MTU,
    REMOTE_HOST,
    WAN_IF,
    AgentBed,
    make_sa,
    one_tunnel,
)
from fake_kernel import FakeKernel

from controller.agent.routing_cache import CachedRouting
from controller.core.reasons import RejectReason
from controller.core.validate import NUD_PERMANENT, NeighInfo, RouteInfo
from controller.core.xfrm_model import Overrun, SaAdded
from controller.netlink.watch import (
    AddrChanged,
    NeighChanged,
    NftGeneration,
    RuleChanged,
)

NEW_MAC = "02:00:00:00:00:99"


@pytest.fixture
def kernel() -> FakeKernel:
    k = FakeKernel()
    one_tunnel(k)
    return k


def ask_all(c: CachedRouting) -> tuple[object, ...]:
    """Every question validation asks, once."""
    return (c.route(REMOTE_HOST), c.neigh(WAN_IF, GW2), c.local_addrs(), c.link(WAN_IF))


def kernel_reads(k: FakeKernel) -> int:
    return sum(1 for name in k.calls if name in ("route", "neigh", "local_addrs", "link"))


def test_answers_are_cached_until_an_event(kernel: FakeKernel) -> None:
    c = CachedRouting(kernel)
    first = ask_all(c)
    n = kernel_reads(kernel)
    assert n == 4, "each question asked of the kernel once"
    for _ in range(100):
        assert ask_all(c) == first, "the same answers"
    assert kernel_reads(kernel) == n, "from the cache"
    got = c.local_addrs()
    got.add("203.0.113.9")
    assert "203.0.113.9" not in c.local_addrs(), "a caller cannot change the cached set"


def _route_change(k: FakeKernel) -> object:
    return k.set_route("0.0.0.0/0", RouteInfo(oif=LAN_IF, gateway=None))


def _rule_change(k: FakeKernel) -> object:
    return RuleChanged(1, "new", 2, 100, 10)


def _addr_change(k: FakeKernel) -> object:
    k.addrs.add("192.0.2.77")
    return AddrChanged(1, "new", WAN_IF, 2, "192.0.2.77", 24)


def _link_change(k: FakeKernel) -> object:
    return k.set_link(WAN_IF, "wan", 1400, "02:00:c0:00:02:01")


def _overrun(k: FakeKernel) -> object:
    return Overrun(1, "rtnl")


def _unknown(k: FakeKernel) -> object:
    return object()


@pytest.mark.parametrize(
    "change", [_route_change, _rule_change, _addr_change, _link_change, _overrun, _unknown]
)
def test_these_events_drop_every_answer(kernel: FakeKernel, change) -> None:  # type: ignore[no-untyped-def]
    c = CachedRouting(kernel)
    ask_all(c)
    n = kernel_reads(kernel)
    c.on_event(change(kernel))
    after = ask_all(c)
    assert kernel_reads(kernel) == n + 4, f"{change.__name__}: every question asked again"
    assert after == (
        kernel.route(REMOTE_HOST),
        kernel.neigh(WAN_IF, GW2),
        kernel.local_addrs(),
        kernel.link(WAN_IF),
    ), f"{change.__name__}: the kernel's answers now"


def test_a_neighbour_event_drops_that_neighbour(kernel: FakeKernel) -> None:
    c = CachedRouting(kernel)
    ask_all(c)
    c.neigh(LAN_IF, "10.1.0.2")
    kernel.calls.clear()
    c.on_event(kernel.set_neigh(WAN_IF, GW2, NeighInfo(NEW_MAC, NUD_PERMANENT)))
    assert c.neigh(WAN_IF, GW2) == NeighInfo(NEW_MAC, NUD_PERMANENT), "the new entry"
    ask_all(c)
    c.neigh(LAN_IF, "10.1.0.2")
    assert kernel.calls == ["neigh"], f"only that neighbour asked again: {kernel.calls}"
    c.on_event(kernel.set_neigh(WAN_IF, GW2, None))
    assert c.neigh(WAN_IF, GW2) is None, "gone: the deletion is seen"
    c.on_event(NeighChanged(1, "new", WAN_IF, 2, None, None, 0, ""))
    kernel.calls.clear()
    c.neigh(LAN_IF, "10.1.0.2")
    assert kernel.calls == ["neigh"], "an event naming no neighbour drops them all"


def test_xfrm_and_nftables_events_keep_the_answers(kernel: FakeKernel) -> None:
    c = CachedRouting(kernel)
    ask_all(c)
    n = kernel_reads(kernel)
    c.on_event(SaAdded(1, make_sa(0x999, GW1, GW2)))
    c.on_event(NftGeneration(1, 7))
    ask_all(c)
    assert kernel_reads(kernel) == n, "routes, neighbours, addresses, links are unaffected"


def test_errors_are_not_cached(kernel: FakeKernel) -> None:
    c = CachedRouting(kernel)
    kernel.fail["route"] = OSError(105, "no buffer space")
    with pytest.raises(OSError):
        c.route(REMOTE_HOST)
    del kernel.fail["route"]
    assert c.route(REMOTE_HOST) == kernel.route(REMOTE_HOST), "asked again, answered"


def test_a_burst_behind_one_next_hop_asks_the_kernel_once(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path)
    bed.kernel.calls.clear()
    bed.agent.on_candidates([bed.encap(6000 + i) for i in range(100)])
    assert len(bed.dp.flow_map) == 100, "the burst installed"
    for q in ("route", "neigh", "link"):
        assert bed.kernel.calls.count(q) == 1, f"{q}: once for the burst ({bed.kernel.calls})"


def test_the_agent_validates_against_the_state_after_an_event(tmp_path: Path) -> None:
    """A neighbour's MAC changes: once its event is handled, the next candidate is checked
    against the new entry (the frame went to the old MAC: refused), not the cached one."""
    bed = AgentBed(tmp_path)
    bed.agent.on_candidate(bed.encap(7000))
    assert len(bed.dp.flow_map) == 1
    bed.agent.on_kernel_event(bed.kernel.set_neigh(WAN_IF, GW2, NeighInfo(NEW_MAC, NUD_PERMANENT)))
    bed.agent.on_candidate(bed.encap(7001))
    assert bed.metrics.rejects == {RejectReason.NEIGHBOUR_MISMATCH: 1}, "the new MAC seen"
    bed.agent.on_kernel_event(bed.kernel.set_neigh(WAN_IF, GW2, NeighInfo(GW2_MAC, NUD_PERMANENT)))
    bed.agent.on_kernel_event(bed.kernel.set_link(WAN_IF, "wan", MTU - 100, None))
    bed.agent.on_candidate(bed.encap(7002))
    flow = bed.dp.get_flow(bed.dp_key(bed.encap(7002)))
    assert flow is not None and flow.mtu == MTU - 100, "the new link MTU, not the cached one"
