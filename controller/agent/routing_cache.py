# SPDX-License-Identifier: GPL-2.0-only
"""The routing facts validation reads, cached between the kernel events that change them.

Validating a candidate asks the kernel for the route to a destination, the neighbour entry of
the next hop, the local addresses and the egress link's MTU and MAC: one or two netlink round
trips each (controller/netlink/routing.py; the neighbour is a filtered dump). In a burst of new
flows most candidates ask the same questions (one SA, one next hop), so the answers are kept,
by key, until an event of the kind that could change them is handled:

    RouteChanged, RuleChanged, AddrChanged, LinkChanged   every answer dropped (a route, rule,
                                                          address or link change can move any
                                                          lookup; a link going down flushes
                                                          its neighbours)
    NeighChanged(ifindex, dst)                            that neighbour's answer dropped (all
                                                          of them when the event names none)
    Overrun (a netlink socket lost events)                every answer dropped
    any other kind not named below                        every answer dropped
    XFRM events, nftables events                          nothing (routes, neighbours,
                                                          addresses and links do not depend on
                                                          them; the XFRM view has its own
                                                          dirty flag, state.KernelView)

An answer is therefore never served after the event that changes it has been handled. A change
whose event is still unread when a flow is validated gives the flow the answer from before it,
as an uncached read just before the change would have: the event, handled at the next loop
turn, takes that flow off as it takes off every flow that relied on the old state
(invalidate.py). Errors are not cached: a failed read fails closed each time it is tried.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from controller.core.xfrm_model import Overrun, XfrmEvent
from controller.netlink.watch import (
    AddrChanged,
    LinkChanged,
    NeighChanged,
    NftChanged,
    NftGeneration,
    RouteChanged,
    RuleChanged,
)

if TYPE_CHECKING:
    from controller.agent.ports import RoutingPort
    from controller.core.validate import NeighInfo, RouteInfo

_MISSING = object()


class CachedRouting:
    """A RoutingPort that remembers the answers of another until on_event() drops them."""

    def __init__(self, inner: RoutingPort) -> None:
        self.inner = inner
        self._routes: dict[str, RouteInfo | None] = {}
        self._neighs: dict[tuple[int, str], NeighInfo | None] = {}
        self._links: dict[int, tuple[int, str | None] | None] = {}
        self._local: set[str] | None = None
        self._xfrmi: dict[int, int] | None = None
        self.hits = self.misses = 0

    # -- RoutingPort ------------------------------------------------------------------------------
    def route(self, dst: str) -> RouteInfo | None:
        got = self._routes.get(dst, _MISSING)
        if got is _MISSING:
            self.misses += 1
            got = self._routes[dst] = self.inner.route(dst)
        else:
            self.hits += 1
        return got  # type: ignore[return-value]

    def neigh(self, ifindex: int, addr: str) -> NeighInfo | None:
        got = self._neighs.get((ifindex, addr), _MISSING)
        if got is _MISSING:
            self.misses += 1
            got = self._neighs[(ifindex, addr)] = self.inner.neigh(ifindex, addr)
        else:
            self.hits += 1
        return got  # type: ignore[return-value]

    def local_addrs(self) -> set[str]:
        if self._local is None:
            self.misses += 1
            self._local = self.inner.local_addrs()
        else:
            self.hits += 1
        return set(self._local)  # a copy: the caller may change its set

    def link(self, ifindex: int) -> tuple[int, str | None] | None:
        got = self._links.get(ifindex, _MISSING)
        if got is _MISSING:
            self.misses += 1
            got = self._links[ifindex] = self.inner.link(ifindex)
        else:
            self.hits += 1
        return got  # type: ignore[return-value]

    def xfrm_interfaces(self) -> dict[int, int]:
        if self._xfrmi is None:
            self.misses += 1
            self._xfrmi = self.inner.xfrm_interfaces()
        else:
            self.hits += 1
        return dict(self._xfrmi)

    # -- invalidation -----------------------------------------------------------------------------
    def on_event(self, ev: object) -> None:
        """Drop what `ev` may have changed (the table in the module docstring)."""
        if isinstance(ev, NeighChanged):
            if ev.dst is None:
                self._neighs.clear()
            else:
                self._neighs.pop((ev.ifindex, ev.dst), None)
        elif isinstance(ev, Overrun):
            self.clear()
        elif isinstance(ev, XfrmEvent | NftChanged | NftGeneration):
            pass
        elif isinstance(ev, RouteChanged | RuleChanged | AddrChanged | LinkChanged):
            self.clear()
        else:
            self.clear()  # a kind this table does not know: nothing kept is trusted

    def clear(self) -> None:
        self._routes.clear()
        self._neighs.clear()
        self._links.clear()
        self._local = None
        self._xfrmi = None
