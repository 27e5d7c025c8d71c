# SPDX-License-Identifier: GPL-2.0-only
"""XFRM (IPsec SAs and policies) over netlink, typed.

- controller.xfrm.model: dataclasses (Sa, Policy, DefaultPolicy, events), policy_lookup();
  pure, importable without sockets.
- controller.xfrm.messages: the netlink message classes (pyroute2 nlmsg), C structs quoted.
- controller.xfrm.api: XfrmSocket (requests) and XfrmMonitor (multicast events).
"""

from controller.xfrm.api import AeState, XfrmMonitor, XfrmSocket
from controller.xfrm.model import *  # noqa: F403
from controller.xfrm.nlsock import NetlinkError

__all__ = ["AeState", "NetlinkError", "XfrmMonitor", "XfrmSocket"]
