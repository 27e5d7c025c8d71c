# SPDX-License-Identifier: GPL-2.0-only
"""Learning: a flow the kernel was seen forwarding (a learner candidate) becomes a sighting,
is validated against the kernel's state as it is now (controller/core/validate.py), and only
then is installed: its SA offloaded if it is not yet (controller/agent/offload.py), its flow
entry written. Anything short of a proof refuses the flow, with a reason
(controller/core/reasons.py), and the kernel keeps forwarding it.
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from controller.agent.offload import Offload
from controller.agent.ports import Ports, RoutingPort
from controller.agent.state import AgentState
from controller.config import Config
from controller.core.reasons import RejectReason
from controller.core.state import Direction, FlowKey, FlowRecord, SaRef
from controller.core.validate import (
    Accepted,
    Rejected,
    Sighting,
    TunnelDev,
    validate_decap,
    validate_encap,
)
from controller.core.xfrm_model import Sa
from controller.datapath.entries import flow_key, flow_val

if TYPE_CHECKING:
    from controller.datapath.abi import FlowKey as DpFlowKey
    from controller.datapath.abi import FlowVal
    from controller.datapath.learner import Candidate

log = logging.getLogger("xfrm-fastpath")

DEFAULT_MTU = 1500  # assumed for a link the kernel does not list


def sighting_of(cand: Candidate, direction: Direction) -> Sighting:
    """What validation needs of a candidate."""
    return Sighting(
        direction=direction,
        in_ifindex=cand.in_ifindex,
        out_ifindex=cand.out_ifindex,
        saddr=cand.saddr,
        daddr=cand.daddr,
        proto=cand.proto,
        sport=cand.sport,
        dport=cand.dport,
        spi=cand.spi,
        outer_saddr=cand.outer_saddr,
        outer_daddr=cand.outer_daddr,
        eth_src=cand.eth_src,
        eth_dst=cand.eth_dst,
        mangled=cand.mangled,
        encap_ports=cand.encap_ports,
        wire_seen=cand.wire_seen,
    )


@dataclass
class _Ready:
    """A validated flow whose entry waits for the batch write (Learning._flush)."""

    cand: Candidate
    sighting: Sighting
    ok: Accepted
    dp_key: DpFlowKey
    dp_val: FlowVal
    rec: FlowRecord


class Learning:
    """Candidates in, flow entries out (or a counted refusal)."""

    def __init__(
        self,
        cfg: Config,
        state: AgentState,
        ports: Ports,
        offload: Offload,
        routing: RoutingPort | None = None,
    ):
        self.cfg = cfg
        self.state = state
        self.ports = ports
        self.offload = offload
        # What validation reads routes, neighbours, addresses and links through: the agent
        # passes its event-invalidated cache (routing_cache.py); by default the port itself.
        self.routing = routing if routing is not None else ports.routing
        self._ready: dict[FlowKey, _Ready] = {}  # validated, entry not yet written

    def on_candidate(self, cand: Candidate) -> None:
        self.on_candidates((cand,))

    def on_candidates(self, cands: Iterable[Candidate]) -> None:
        """Every candidate the learner had waiting (the daemon's loop turn), each validated as
        before; the flow entries of those accepted are written together, one
        DatapathPort.put_flows (BPF_MAP_UPDATE_BATCH) instead of one bpf(2) call per flow.
        What must find the earlier flows in place writes the batch first: a second sighting
        of the same flow, an SA offloaded for the first time, the table's last free entries.
        So the outcome (entries, refusals, logs) is that of one candidate at a time."""
        try:
            for cand in cands:
                self._learn(cand)
        finally:
            self._flush()

    def _learn(self, cand: Candidate) -> None:
        st = self.state
        if cand.direction is None:
            return  # clear forwarding (no tunnel): the kernel keeps it
        s = sighting_of(cand, cand.direction)
        key = FlowKey(s.in_ifindex, s.direction, s.saddr, s.daddr, s.proto, s.sport, s.dport)
        if key in self._ready or len(st.flows) + len(self._ready) >= st.flows.capacity:
            self._flush()
        known = st.flows.flows.get(key)
        if known is not None and known.sa.spi == s.spi:
            return  # already on the fastpath: its liveness packet (XFP_LIVENESS_NS), or in flight
        encap = s.direction is Direction.ENCAP
        want_in, want_out = ("lan", "wan") if encap else ("wan", "lan")
        if st.role.get(s.in_ifindex) != want_in or st.role.get(s.out_ifindex) != want_out:
            why = Rejected(RejectReason.WRONG_INTERFACES, "not between our lan/wan")
            return self._refuse(cand, why)
        if st.flows.full():
            return self._refuse(cand, Rejected(RejectReason.TABLE_FULL, "flow table full"))
        try:
            result = self._validate(s)
        except Exception as e:  # netlink error: fail closed, never install on partial facts
            log.warning("validation of %s failed: %s", s.saddr, e)
            result = Rejected(RejectReason.NETLINK_ERROR, str(e))
        if isinstance(result, Rejected):
            return self._refuse(cand, result)
        try:
            self._install(cand, s, result)
        except Exception as e:
            self._install_failed(cand, s, result, e)

    def _install_failed(self, cand: Candidate, s: Sighting, ok: Accepted, e: Exception) -> None:
        if getattr(e, "errno", 0) == errno.E2BIG:  # an SA map is full ([tables] sas)
            why = Rejected(
                RejectReason.SA_TABLE_FULL,
                f"SA table full ({e}; [tables] sas = {self.cfg.sa_table_size}): "
                f"SA 0x{ok.sa.spi:08x} stays on the kernel path",
            )
        else:
            why = Rejected(RejectReason.INSTALL_FAILED, str(e))
        # Once per SA at error level: the flow's next sightings try again (and fail again
        # while the table stays full); the count goes on in the rejections counter.
        ref = SaRef(str(ok.sa.dst), ok.sa.spi, ok.sa.reqid)
        refused = self.state.refused_sas
        level = logging.DEBUG if refused.get(ref) == why.detail else logging.ERROR
        log.log(level, "installing flow %s->%s failed: %s", s.saddr, s.daddr, why.detail)
        refused[ref] = why.detail  # the SA's reason in `xfrm-fastpath sas`
        self._refuse(cand, why)

    def _refuse(self, cand: Candidate, why: Rejected) -> None:
        self.ports.metrics.reject(why.reason)
        log.info(
            "not offloaded: %s %s %s->%s proto %d: %s",
            cand.direction.name.lower() if cand.direction is not None else None,
            why.reason,
            cand.saddr,
            cand.daddr,
            cand.proto,
            why.detail,
        )
        if why.reason is RejectReason.SA_UNSUPPORTED and cand.spi is not None:
            sa = self.state.view.sa_by_spi(cand.spi)
            if sa is not None:
                self.state.refused_sas[SaRef(str(sa.dst), sa.spi, sa.reqid)] = why.detail

    def _via(self, s: Sighting, sa: Sa | None) -> Sighting:
        """The xfrm interface the flow passes (docs/design.md §10), as the kernel has it now:
        encap, the one the route to the inner destination leads into; decap, the one of the
        SA's if_id, which its decrypted packets come out of (xfrmi_rcv_cb)."""
        xfrmi = self.routing.xfrm_interfaces()
        if not xfrmi:
            return s
        if s.direction is Direction.ENCAP:
            inner = self.routing.route(s.daddr)
            if inner is not None and inner.oif in xfrmi:
                return replace(s, via=TunnelDev(inner.oif, xfrmi[inner.oif]))
        elif sa is not None and sa.if_id:
            for ifindex, if_id in sorted(xfrmi.items()):
                if if_id == sa.if_id:
                    return replace(s, via=TunnelDev(ifindex, if_id))
        return s

    def _validate(self, s: Sighting) -> Accepted | Rejected:
        view, routing = self.state.view, self.routing
        view.refresh()
        if s.spi is None:
            return Rejected(RejectReason.NO_SPI, "the sighting carries no SPI")
        if s.direction is Direction.ENCAP:
            sa = view.sa_by_spi(s.spi, s.outer_daddr)
            s = self._via(s, sa)
            route = routing.route(s.outer_daddr)
            hop = route.next_hop(s.outer_daddr) if route else s.outer_daddr
            neigh = routing.neigh(route.oif, hop) if route else None
            crypto = self.state.crypto.backend
            return validate_encap(s, view.policies, view.default, sa, route, neigh, crypto)
        sa = view.sa_by_spi(s.spi)
        s = self._via(s, sa)
        route = routing.route(s.daddr)
        hop = route.next_hop(s.daddr) if route else s.daddr
        neigh = routing.neigh(route.oif, hop) if route else None
        local = routing.local_addrs()
        crypto = self.state.crypto.backend
        return validate_decap(s, view.policies, view.default, sa, local, route, neigh, crypto)

    def _link_mtu(self, ifindex: int) -> int:
        """The link's MTU, remembered with its MAC in link_seen (flow entries are written with
        both; a LinkChanged with other values takes those flows off)."""
        link = self.routing.link(ifindex)
        if link is None:
            return DEFAULT_MTU
        self.state.link_seen[ifindex] = link
        return link[0]

    def _install(self, cand: Candidate, s: Sighting, ok: Accepted) -> None:
        st, sa = self.state, ok.sa
        ref = SaRef(str(sa.dst), sa.spi, sa.reqid)
        now = time.monotonic_ns()
        if (st.sa_out if s.direction is Direction.ENCAP else st.sa_in).get(ref) is None:
            self._flush()  # offloading may remove flows: the earlier ones are in place first
        if s.direction is Direction.ENCAP:
            # The outer next hop as validated now: after a neighbour or route change the
            # flows are learned again with the new one (the SA entry keeps the first).
            off = st.sa_out.get(ref) or self.offload.offload_outbound(
                sa,
                cand.iv_xor_seq,
                s.out_ifindex,
                s.eth_dst,
                s.eth_src,
                self._link_mtu(s.out_ifindex),
                now,
            )
            if off is None:
                return
        else:
            off = st.sa_in.get(ref) or self.offload.offload_inbound(sa, now)
        key = flow_key(s.in_ifindex, s.direction, s.proto, s.saddr, s.daddr, s.sport, s.dport)
        mtu = self._link_mtu(s.out_ifindex)
        val = flow_val(off.sa_id, s.out_ifindex, s.eth_dst, s.eth_src, mtu=mtu)
        rec = FlowRecord(
            key=FlowKey(s.in_ifindex, s.direction, s.saddr, s.daddr, s.proto, s.sport, s.dport),
            sa=ref,
            egress_ifindex=s.out_ifindex,
            src_mac=s.eth_src,
            dst_mac=s.eth_dst,
            policy_index=ok.policy.index,
            neighbour=(ok.route.oif, ok.next_hop),
            seen_ns=cand.ktime_rx,
            installed_ns=0,  # set when the entry is written (_flush)
            dp_key=bytes(key),
            via_ifindex=ok.via.ifindex if ok.via else 0,
        )
        self._ready[rec.key] = _Ready(cand, s, ok, key, val, rec)

    def _flush(self) -> None:
        """Write the waiting flow entries (one batch), then index them. If the batch fails,
        each is written alone, so each failure is the flow's own (_install_failed)."""
        ready = list(self._ready.values())
        self._ready.clear()
        if not ready:
            return
        dp = self.ports.datapath
        try:
            dp.put_flows([(r.dp_key, r.dp_val) for r in ready])
        except Exception:
            for r in ready:
                try:
                    dp.put_flow(r.dp_key, r.dp_val)
                except Exception as e:
                    self._install_failed(r.cand, r.sighting, r.ok, e)
                else:
                    self._written(r.rec)
            return
        for r in ready:
            self._written(r.rec)

    def _written(self, rec: FlowRecord) -> None:
        rec.installed_ns = time.monotonic_ns()
        self.state.flows.add(rec)
        self.ports.metrics.observe_learn_latency(rec.learn_latency_s)
        log.info(
            "offloaded %s via SA 0x%08x (learned in %.2f ms)",
            rec.key,
            rec.sa.spi,
            (rec.learn_latency_s or 0) * 1e3,
        )
