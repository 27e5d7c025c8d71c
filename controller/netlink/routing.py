# SPDX-License-Identifier: GPL-2.0-only
"""Routes, neighbours, addresses and links as the kernel has them now: the agent's RoutingPort
(controller/agent/ports.py) over rtnetlink (pyroute2's IPRoute), in the calling process's
network namespace.

Each call asks the kernel afresh: validation must see the state of this instant, not a cache
(a change after it is reported by controller/netlink/watch.py and invalidates the flow).
"""

from __future__ import annotations

import socket

from pyroute2 import IPRoute

from controller.core.validate import NeighInfo, RouteInfo

DEFAULT_MTU = 1500  # a link that reports no IFLA_MTU
IFF_UP = 0x1  # include/uapi/linux/if.h


class Routing:
    """The RoutingPort on one rtnetlink socket. close() releases it."""

    def __init__(self) -> None:
        self.ipr = IPRoute()

    def route(self, dst: str) -> RouteInfo | None:
        """`ip route get dst`: the output device and gateway; None when the lookup fails."""
        try:
            msgs = self.ipr.route("get", dst=dst)
        except Exception:
            return None
        for m in msgs:
            return RouteInfo(
                oif=m.get_attr("RTA_OIF") or 0, gateway=m.get_attr("RTA_GATEWAY"), type=m["type"]
            )
        return None

    def neigh(self, ifindex: int, addr: str) -> NeighInfo | None:
        """The neighbour entry of `addr` on `ifindex` (MAC and NUD state), None without one."""
        try:
            msgs = self.ipr.neigh("dump", ifindex=ifindex, dst=addr)
        except Exception:
            return None
        for m in msgs:
            if m.get_attr("NDA_DST") == addr:
                return NeighInfo(m.get_attr("NDA_LLADDR"), m["state"])
        return None

    def local_addrs(self) -> set[str]:
        """Every IPv4 address of the namespace (a netlink error raises)."""
        return {a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(family=socket.AF_INET)}

    def link(self, ifindex: int) -> tuple[int, str | None] | None:
        """(MTU, MAC) of a link; None when the kernel lists none (a netlink error raises)."""
        for link in self.ipr.get_links(ifindex):
            return int(link.get_attr("IFLA_MTU") or DEFAULT_MTU), link.get_attr("IFLA_ADDRESS")
        return None

    def xfrm_interfaces(self) -> dict[int, int]:
        """{ifindex: if_id} of the xfrm interfaces (kind "xfrm") that are up: the devices a
        route-based tunnel's packets pass (a netlink error raises)."""
        found: dict[int, int] = {}
        for link in self.ipr.get_links():
            info = link.get_attr("IFLA_LINKINFO")
            if info is None or info.get_attr("IFLA_INFO_KIND") != "xfrm":
                continue
            if not link["flags"] & IFF_UP:
                continue
            data = info.get_attr("IFLA_INFO_DATA")
            if_id = data.get_attr("IFLA_XFRM_IF_ID") if data is not None else None
            found[link["index"]] = int(if_id or 0)
        return found

    def close(self) -> None:
        self.ipr.close()
