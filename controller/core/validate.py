# SPDX-License-Identifier: GPL-2.0-only
"""Validation of a learned candidate against the kernel's own state. Pure: no sockets.

A tracepoint sighting says the kernel forwarded one packet. Before the flow may take the
fastpath, the kernel's current state must say the same thing for every later packet of it:

- encap (clear in on a LAN device, ESP out on a WAN device): the forward policy decision for
  the clear flow allows it (a matching FWD policy that allows, or none and default forward
  accept); the OUT policy that covers it allows and protects it with a tunnel template; that
  template resolves to the very SA whose SPI was on the wire; the SA is one the datapath can
  serve; the outer route leaves by the device the packet left by; the next hop's neighbour is
  valid and has the MAC the frame was sent to.
- decap (ESP in on a WAN device, clear out on a LAN device): the SA in the packet's sec_path
  exists, is inbound to one of our addresses and can be served; the FWD policy for the inner
  flow allows it and its template covers that SA (the kernel's __xfrm_policy_check()); the
  inner route leaves by the device the packet left by; the neighbour is valid with the MAC seen.

Route-based tunnels (docs/design.md §10): a sighting routed into an xfrm interface (or out of
one, decap) carries that device's if_id, a VTI device its key as the mark (Sighting.via); the
policy and SA lookups match if_id and mark as the kernel's do (xfrm_model.policy_matches,
sa_fits_policy).

Anything else is rejected with a reason (RejectReason, controller/core/reasons.py: a label of
the rejections counter). The netfilter verdict is not re-derived: the sighting proves the
ruleset forwarded the packet, and any later ruleset change flushes every learned flow
(controller/agent/invalidate.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace

from controller.core.crypto import Backend, sa_backend
from controller.core.reasons import RejectReason
from controller.core.state import Direction
from controller.core.xfrm_model import (
    DefaultPolicy,
    Dir,
    Flow,
    Mode,
    Policy,
    Sa,
    mark_ok,
    policy_decision,
    sa_fits_policy,
)

PROTO_ICMP = 1
# Outbound NAT-T: the kernel keeps sending some packets of an offloaded SA (first packets,
# liveness), which bpf/tc_reseq.c renumbers from the datapath's counter. It renumbers
# ESP-in-UDP on the BPF AEAD; its kernel-crypto path takes plain ESP only and drops the rest
# (a kernel-built packet with the kernel's own, lagging, number would repeat a nonce XDP
# used), so outbound NAT-T SAs on the kernel backend stay on the kernel path.
NATT_OUT_KERNEL_WHY = (
    "outbound NAT-T on the kernel crypto backend: the resequencer's kfunc path does not "
    "renumber ESP-in-UDP yet"
)
# include/uapi/linux/neighbour.h: states in which a neighbour entry's MAC can be used.
NUD_REACHABLE, NUD_STALE, NUD_DELAY, NUD_PROBE = 0x02, 0x04, 0x08, 0x10
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80
NUD_USABLE = NUD_REACHABLE | NUD_STALE | NUD_DELAY | NUD_PROBE | NUD_NOARP | NUD_PERMANENT


@dataclass(frozen=True)
class RouteInfo:
    """What `ip route get` says for a destination: output device and next hop."""

    oif: int
    gateway: str | None
    type: int = 1  # RTN_UNICAST

    def next_hop(self, dst: str) -> str:
        return self.gateway or dst


@dataclass(frozen=True)
class NeighInfo:
    lladdr: str | None
    state: int


@dataclass(frozen=True)
class TunnelDev:
    """The route-based tunnel device a flow passes: an xfrm interface (its IFLA_XFRM_IF_ID)
    or a VTI (its key, which the kernel uses as the lookup's mark)."""

    ifindex: int
    if_id: int = 0
    mark: int = 0


@dataclass(frozen=True)
class Sighting:
    """The parts of a learner candidate that validation needs (host byte order)."""

    direction: Direction
    in_ifindex: int
    out_ifindex: int
    saddr: str
    daddr: str
    proto: int
    sport: int  # ICMP: echo identifier
    dport: int  # ICMP: (type << 8) | code
    spi: int | None
    outer_saddr: str
    outer_daddr: str
    eth_src: str
    eth_dst: str
    mangled: bool = False
    # RFC 3948 NAT-T: the UDP (source, destination) ports around ESP on the wire, None for
    # plain ESP; `wire_seen` False when no ESP frame of the packet was seen (decap known by
    # its sec_path only), so the wire's encapsulation is unknown.
    encap_ports: tuple[int, int] | None = None
    wire_seen: bool = True
    via: TunnelDev | None = None  # encap: the route's device; decap: the one it came out of

    def xfrm_flow(self) -> Flow:
        """The flow as the kernel's policy lookup sees it (struct flowi4): for ICMP the
        selector's "ports" are type and code (xfrm_flowi_sport/dport, include/net/xfrm.h)."""
        if self.proto == PROTO_ICMP:
            return Flow.of(self.saddr, self.daddr, self.proto, self.dport >> 8, self.dport & 0xFF)
        return Flow.of(self.saddr, self.daddr, self.proto, self.sport, self.dport)


@dataclass(frozen=True)
class Accepted:
    sa: Sa
    policy: Policy  # the policy whose change must invalidate the flow (OUT or FWD)
    next_hop: str
    route: RouteInfo
    via: TunnelDev | None = None  # the xfrm interface whose removal must invalidate the flow


@dataclass(frozen=True)
class Rejected:
    reason: RejectReason  # counted in xfrm_fastpath_validation_rejections_total
    detail: str  # for the log


def _reject(reason: RejectReason, detail: str) -> Rejected:
    return Rejected(reason, detail)


def check_sa(
    sa: Sa | None, spi: int | None, crypto: Backend = Backend.BPF, outbound: bool = False
) -> Rejected | None:
    """The SA exists and the crypto backend can serve it in this direction
    (controller/core/crypto.py)."""
    if sa is None:
        return _reject(RejectReason.NO_SA, f"no SA with SPI 0x{spi or 0:08x} in the kernel")
    backend, why = sa_backend(sa, crypto, outbound)
    if backend is None:
        return _reject(RejectReason.SA_UNSUPPORTED, f"SA {sa}: {why}")
    return None


def check_encap_ports(sa: Sa, s: Sighting) -> Rejected | None:
    """The wire's encapsulation is the SA's: UDP with the ports of its XFRMA_ENCAP (NAT-T,
    RFC 3948; both directions keep them as the frame carries them: source, destination), or
    plain ESP for an SA without one. The datapath builds (and accepts) exactly that."""
    if not s.wire_seen:
        return None
    want = (sa.encap.sport, sa.encap.dport) if sa.encap is not None else None
    if s.encap_ports != want:
        return _reject(
            RejectReason.OUTER_MISMATCH,
            f"SA {sa} encapsulation {_encap_text(want)}, wire {_encap_text(s.encap_ports)}",
        )
    return None


def _encap_text(ports: tuple[int, int] | None) -> str:
    return f"UDP {ports[0]}->{ports[1]}" if ports else "plain ESP"


def check_l2(
    route: RouteInfo | None, neigh: NeighInfo | None, want_oif: int, want_mac: str, dst: str
) -> Rejected | None:
    if route is None:
        return _reject(RejectReason.NO_ROUTE, f"no route to {dst}")
    if route.type != 1:
        return _reject(RejectReason.ROUTE_NOT_UNICAST, f"route to {dst} has type {route.type}")
    if route.oif != want_oif:
        return _reject(
            RejectReason.ROUTE_MISMATCH,
            f"route to {dst} leaves by if{route.oif}, packet left by if{want_oif}",
        )
    hop = route.next_hop(dst)
    if neigh is None or not neigh.lladdr:
        return _reject(RejectReason.NO_NEIGHBOUR, f"no neighbour entry for {hop}")
    if not neigh.state & NUD_USABLE:
        return _reject(
            RejectReason.NEIGHBOUR_UNUSABLE, f"neighbour {hop} in state 0x{neigh.state:x}"
        )
    if neigh.lladdr.lower() != want_mac.lower():
        return _reject(
            RejectReason.NEIGHBOUR_MISMATCH,
            f"neighbour {hop} is {neigh.lladdr}, frame went to {want_mac}",
        )
    return None


def validate_encap(
    s: Sighting,
    policies: Sequence[Policy],
    default: DefaultPolicy,
    sa: Sa | None,
    route: RouteInfo | None,
    neigh: NeighInfo | None,
    crypto: Backend = Backend.BPF,
) -> Accepted | Rejected:
    """`sa` is the kernel's SA (outer daddr, spi) as seen on the wire; `route`/`neigh` are the
    route to the SA's outer destination and the neighbour of its next hop; `crypto` the
    controller's crypto backend."""
    if s.mangled:
        return _reject(RejectReason.MANGLED, "the packet was rewritten (NAT) on its way through")
    flow = s.xfrm_flow()
    fwd = policy_decision(policies, default, flow, Dir.FWD)
    if not fwd.allowed:
        return _reject(RejectReason.FWD_POLICY_BLOCKS, fwd.reason)
    if fwd.policy is not None and any(not t.optional for t in fwd.policy.templates):
        # A FWD policy with mandatory templates admits only packets that were decrypted by
        # a matching SA: a clear packet from the LAN cannot satisfy it.
        return _reject(RejectReason.FWD_POLICY_BLOCKS, f"{fwd.policy} needs a secured packet")
    out = policy_decision(policies, default, flow, Dir.OUT)
    if out.allowed and not out.protected and s.via is not None:
        # ip_forward's lookup (if_id 0, mark 0) left the packet clear; the tunnel device's
        # transmit looks again with its own: xfrmi_xmit2 (fl->flowi_xfrm.if_id, then
        # xfrm_lookup_with_ifid), vti_tunnel_xmit (flowi_mark = o_key).
        dev_flow = replace(flow, if_id=s.via.if_id, mark=s.via.mark)
        out = policy_decision(policies, default, dev_flow, Dir.OUT)
    if not out.allowed:
        return _reject(RejectReason.OUT_POLICY_BLOCKS, out.reason)
    if out.policy is None or not out.policy.templates:
        return _reject(RejectReason.NOT_PROTECTED, f"no OUT policy protects {flow.src}->{flow.dst}")
    if len(out.policy.templates) != 1:
        return _reject(
            RejectReason.BUNDLE, f"{out.policy} has {len(out.policy.templates)} templates"
        )
    bad = check_sa(sa, s.spi, crypto, outbound=True)
    if bad is not None:
        return bad
    assert sa is not None
    if sa.encap is not None and sa_backend(sa, crypto, True)[0] is Backend.KERNEL:
        return _reject(RejectReason.SA_UNSUPPORTED, f"SA {sa}: {NATT_OUT_KERNEL_WHY}")
    tmpl = out.policy.templates[0]
    if tmpl.mode != Mode.TUNNEL or not tmpl.covers(sa) or not sa_fits_policy(sa, out.policy):
        return _reject(
            RejectReason.SA_NOT_OF_POLICY, f"SA {sa} does not satisfy {out.policy}'s template"
        )
    if str(sa.dst) != s.outer_daddr or str(sa.src) != s.outer_saddr:
        return _reject(
            RejectReason.OUTER_MISMATCH, f"SA {sa} vs wire {s.outer_saddr}->{s.outer_daddr}"
        )
    bad = check_encap_ports(sa, s)
    if bad is not None:
        return bad
    bad = check_l2(route, neigh, s.out_ifindex, s.eth_dst, str(sa.dst))
    if bad is not None:
        return bad
    assert route is not None
    return Accepted(sa, out.policy, route.next_hop(str(sa.dst)), route, s.via)


def validate_decap(
    s: Sighting,
    policies: Sequence[Policy],
    default: DefaultPolicy,
    sa: Sa | None,
    local_addrs: set[str],
    route: RouteInfo | None,
    neigh: NeighInfo | None,
    crypto: Backend = Backend.BPF,
) -> Accepted | Rejected:
    """`sa` is the inbound SA named by the packet's sec_path; `route`/`neigh` are the route to
    the inner destination and the neighbour of its next hop; `crypto` the controller's crypto
    backend."""
    if s.mangled:
        return _reject(RejectReason.MANGLED, "the packet was rewritten (NAT) on its way through")
    bad = check_sa(sa, s.spi, crypto)
    if bad is not None:
        return bad
    assert sa is not None
    if str(sa.dst) not in local_addrs:
        return _reject(RejectReason.SA_NOT_INBOUND, f"SA {sa} is not addressed to this gateway")
    if not mark_ok(sa.mark, s.via.mark if s.via else 0):
        # xfrm_input's SA lookup uses skb->mark (a VTI's i_key): this SA is not found for it.
        return _reject(RejectReason.SA_NOT_OF_POLICY, f"SA {sa}: its mark does not match")
    if sa.if_id and (s.via is None or s.via.if_id != sa.if_id):
        # xfrmi_rcv_cb: an if_id SA's packets come out of the xfrm interface of that if_id.
        return _reject(RejectReason.SA_NOT_OF_POLICY, f"SA {sa}: no xfrm interface for if_id")
    bad = check_encap_ports(sa, s)
    if bad is not None:
        return bad
    # __xfrm_policy_check: a secured packet received on an xfrm interface is checked with the
    # interface's if_id (xfrmi_decode_session), and its SA must carry it (xfrm_state_ok).
    flow = replace(s.xfrm_flow(), if_id=s.via.if_id if s.via else 0)
    fwd = policy_decision(policies, default, flow, Dir.FWD)
    if not fwd.allowed:
        return _reject(RejectReason.FWD_POLICY_BLOCKS, fwd.reason)
    if fwd.policy is None or not fwd.policy.templates:
        return _reject(
            RejectReason.NOT_PROTECTED, f"no FWD policy requires ESP for {flow.src}->{flow.dst}"
        )
    if not any(t.covers(sa) for t in fwd.policy.templates):
        return _reject(RejectReason.SA_NOT_OF_POLICY, f"SA {sa} does not satisfy {fwd.policy}")
    if len(fwd.policy.templates) != 1:
        return _reject(
            RejectReason.BUNDLE, f"{fwd.policy} has {len(fwd.policy.templates)} templates"
        )
    if not sa.selector.matches(flow) and sa.selector.src.prefixlen + sa.selector.dst.prefixlen:
        return _reject(
            RejectReason.SA_SELECTOR, f"SA {sa} selector does not cover {flow.src}->{flow.dst}"
        )
    bad = check_l2(route, neigh, s.out_ifindex, s.eth_dst, s.daddr)
    if bad is not None:
        return bad
    assert route is not None
    return Accepted(sa, fwd.policy, route.next_hop(s.daddr), route, s.via)


def is_local(addr: str, local_addrs: set[str]) -> bool:
    return str(ipaddress.ip_address(addr)) in local_addrs
