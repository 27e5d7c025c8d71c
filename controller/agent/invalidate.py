# SPDX-License-Identifier: GPL-2.0-only
"""Invalidation: a flow leaves the fastpath as soon as anything it was installed on changes.

Kernel events (controller/netlink/watch.py, controller/core/xfrm_model.py) name what changed:
an SA (its flows go, and the SA is released), a policy, a route or rule, an address or the
firewall (every flow goes), a neighbour or a link (the flows sent through it go). Idle flows
and flows the datapath's LRU evicted go at the housekeeping tick.

Removal is one batch delete from the flow map, then the learner is told to report the flows
again: the next packet is forwarded by the kernel, whose state decides afresh.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable

from controller.agent.offload import Offload
from controller.agent.ports import Ports
from controller.agent.state import AgentState, OffloadedSa
from controller.core.state import Cause, Direction, FlowKey
from controller.core.xfrm_model import (
    DefaultPolicyChanged,
    Flushed,
    Overrun,
    PolicyAdded,
    PolicyDeleted,
    PolicyExpired,
    PolicyUpdated,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaMapping,
    SaUpdated,
    XfrmEvent,
)
from controller.datapath import abi as defs
from controller.datapath.entries import flow_key
from controller.netlink.watch import (
    AddrChanged,
    LinkChanged,
    NeighChanged,
    NftChanged,
    NftGeneration,
    RouteChanged,
    RuleChanged,
)

log = logging.getLogger("xfrm-fastpath")


def dp_flow_key(k: FlowKey) -> bytes:
    """The datapath's struct xfp_flow_key for a flow, as bytes."""
    return bytes(flow_key(k.ifindex, k.direction, k.proto, k.saddr, k.daddr, k.sport, k.dport))


class Remover:
    """Takes flows out of the state and the datapath, and lets the learner see them again."""

    def __init__(self, state: AgentState, ports: Ports) -> None:
        self.state = state
        self.ports = ports

    def remove(self, keys: Iterable[FlowKey], cause: Cause) -> int:
        st, dp, learner = self.state, self.ports.datapath, self.ports.learner
        recs = st.flows.remove(keys, cause)
        # The datapath first: once the entries are gone no packet of these flows takes XDP.
        dks = [rec.dp_key or dp_flow_key(rec.key) for rec in recs]
        try:
            dp.delete_flows(dks)  # one bpf(2) call for the lot
        except Exception as e:
            log.warning("batch delete of %d flow(s) failed (%s): one at a time", len(dks), e)
            for dk in dks:
                with contextlib.suppress(Exception):
                    dp.delete_flow(defs.FlowKey.from_buffer_copy(dk))
        done_ns = time.monotonic_ns()
        # Then let the learner report them again (one map operation each: the SPI is known).
        if learner is not None:
            for rec in recs:
                k = rec.key
                with contextlib.suppress(Exception):
                    learner.forget(
                        (k.direction.name.lower(), k.saddr, k.daddr, k.proto, k.sport, k.dport),
                        rec.sa.spi,
                    )
        if recs:
            event_ns = st.event_ns
            took = f" {(done_ns - event_ns) / 1e6:.1f} ms after the event" if event_ns else ""
            log.info("removed %d flow(s): %s%s", len(recs), cause.value, took)
            st.recent_invalidations.append(
                {
                    "cause": cause.value,
                    "flows": len(recs),
                    "event_ns": event_ns,
                    "removed_ns": done_ns,
                }
            )
        return len(recs)


class Invalidator:
    """Kernel events in, flows (and SAs) out."""

    def __init__(self, state: AgentState, ports: Ports, remover: Remover, offload: Offload):
        self.state = state
        self.ports = ports
        self.remover = remover
        self.offload = offload

    # -- kernel events -----------------------------------------------------------------------------
    def on_kernel_event(self, ev: object) -> None:
        self.ports.metrics.netlink_event()
        self.state.event_ns = getattr(ev, "ts_ns", None)
        try:
            self._dispatch(ev)
        finally:
            self.state.event_ns = None

    def _dispatch(self, ev: object) -> None:
        st, remove = self.state, self.remover.remove
        if isinstance(ev, XfrmEvent):
            st.view.dirty = True
            self._on_xfrm(ev)
        elif isinstance(ev, NftChanged | NftGeneration):
            self.drop_all(Cause.FIREWALL_CHANGED)
        elif isinstance(ev, RouteChanged | RuleChanged):
            self.drop_all(Cause.ROUTE_CHANGED)
        elif isinstance(ev, NeighChanged):
            if ev.dst:
                remove(st.flows.flows_of_neigh(ev.ifindex, ev.dst), Cause.NEIGH_CHANGED)
        elif isinstance(ev, LinkChanged):
            seen = st.link_seen.get(ev.ifindex)
            down = ev.action == "del" or not ev.up or not ev.lower_up
            if down or (seen is not None and seen != (ev.mtu, ev.mac)):
                st.link_seen.pop(ev.ifindex, None)
                remove(st.flows.flows_of_link(ev.ifindex), Cause.LINK_CHANGED)
        elif isinstance(ev, AddrChanged):
            self.drop_all(Cause.ROUTE_CHANGED)

    def _on_xfrm(self, ev: XfrmEvent) -> None:
        st = self.state
        if isinstance(ev, SaDeleted):
            self.drop_sa(ev.sa_id.spi, str(ev.sa_id.dst), Cause.SA_DELETED, gone=True)
        elif isinstance(ev, SaUpdated):
            self.drop_sa(ev.sa.spi, str(ev.sa.dst), Cause.SA_UPDATED)
        elif isinstance(ev, SaMapping):
            self.on_mapping(ev)
        elif isinstance(ev, SaExpired):
            if ev.hard:  # the kernel deletes a hard-expired SA: nothing to hand back
                self.drop_sa(ev.sa.spi, str(ev.sa.dst), Cause.SA_EXPIRED, gone=True)
            # soft: the IKE daemon rekeys; flows move when the new SA's first packets are seen
        elif isinstance(ev, SaAdded):
            # A rekey installs a new SA with the same reqid: the kernel switches to it for new
            # packets, so flows on the old one are re-learned onto the new one.
            for off in list(st.sa_out.values()):
                if off.sa.reqid and off.sa.reqid == ev.sa.reqid and ev.sa.src == off.sa.src:
                    self.remover.remove(st.flows.flows_of_sa(off.ref), Cause.SA_REKEYED)
        elif isinstance(ev, PolicyAdded | PolicyUpdated | PolicyDeleted | PolicyExpired):
            self.drop_all(Cause.POLICY_CHANGED)
        elif isinstance(ev, Flushed):
            if ev.what == "sa":
                for off in st.offloaded():
                    self.remover.remove(st.flows.flows_of_sa(off.ref), Cause.SA_DELETED)
                    self.offload.release_sa(off, gone=True)
            else:
                self.drop_all(Cause.POLICY_CHANGED)
        elif isinstance(ev, Overrun):
            log.warning("netlink overrun: dropping every flow and re-reading state")
            self.drop_all(Cause.POLICY_CHANGED)
        elif isinstance(ev, DefaultPolicyChanged):
            self.drop_all(Cause.POLICY_CHANGED)

    # -- taking SAs and flows off ---------------------------------------------------------------
    def fence(self, off: OffloadedSa) -> None:
        """XDP stops encrypting with an outbound SA now (one map write), before its flows are
        removed one by one: a packet of a flow not yet removed goes to the kernel, which
        decides (and whose ESP packets the TC program still numbers from XDP's counter).
        Inbound SAs are not fenced: the kernel's replay window lags XDP's until the hand-back,
        whereas XDP checks and marks the window before its flow lookup, so an inbound packet
        of a removed flow reaches the kernel already marked."""
        if off.direction is not Direction.ENCAP:
            return
        try:
            self.ports.datapath.fence_sa(off.sa_id)
        except Exception as e:
            log.error("SA 0x%08x: fencing it off failed: %s", off.sa.spi, e)

    def drop_sa(self, spi: int, dst: str | None, cause: Cause, *, gone: bool = False) -> None:
        """Every offloaded SA with this SPI (and destination): fenced, its flows removed
        (counted under `cause`), then released (`gone`: the kernel no longer has it)."""
        matching = [
            o
            for o in self.state.offloaded()
            if o.sa.spi == spi and (dst is None or str(o.sa.dst) == dst)
        ]
        for off in matching:
            self.fence(off)
            self.remover.remove(self.state.flows.flows_of_sa(off.ref), cause)
            self.offload.release_sa(off, gone=gone)

    def on_mapping(self, ev: SaMapping) -> None:
        """A NAT-T peer moved (XFRM_MSG_MAPPING names its inbound SA): that SA and the
        outbound SAs of the same reqid towards its old address are fenced and released, their
        flows removed, before the IKE daemon updates them (UPDSA or a new SA, each its own
        event). Until then XDP already passes the moved peer's packets to the kernel
        (PASS_NATT_MAPPING), and no packet of ours goes on to the old mapping from XDP."""
        self.drop_sa(ev.sa_id.spi, str(ev.sa_id.dst), Cause.NAT_MAPPING)
        if not ev.reqid:
            return
        for off in list(self.state.sa_out.values()):
            if off.sa.reqid == ev.reqid and off.sa.dst == ev.old_saddr:
                self.drop_sa(off.sa.spi, str(off.sa.dst), Cause.NAT_MAPPING)

    def drop_all(self, cause: Cause) -> None:
        """Every flow goes (a firewall, route or policy change). The SAs stay, but the
        outbound ones are fenced while the flows are removed, so that no packet is encrypted
        by XDP on a proof that no longer holds, however many flows there are; then each
        fenced SA's watchdog is put back as it was."""
        st, dp = self.state, self.ports.datapath
        if not st.flows.flows:
            return
        armed: list[tuple[OffloadedSa, int]] = []
        for off in list(st.sa_out.values()):
            with contextlib.suppress(Exception):
                wd = dp.watchdog(off.sa_id)
                if wd:
                    armed.append((off, wd))
            self.fence(off)
        try:
            self.remover.remove(list(st.flows.flows), cause)
        finally:
            for off, wd in armed:
                try:
                    dp.refresh_watchdog(off.sa_id, wd)
                except Exception as e:
                    log.error("SA 0x%08x: re-arming its watchdog failed: %s", off.sa.spi, e)

    def sweep_idle(self, now: int, idle_timeout: float) -> None:
        """Fold the datapath's per-flow last_seen into the state, then remove quiet flows."""
        flows = self.state.flows
        for rec in flows.flows.values():
            k = rec.key
            val = self.ports.datapath.get_flow(
                flow_key(k.ifindex, k.direction, k.proto, k.saddr, k.daddr, k.sport, k.dport)
            )
            if val is None:
                rec.last_active_ns = 0  # evicted by the LRU: let the sweep drop it
            elif val.last_seen_ns > rec.last_active_ns:
                rec.last_active_ns = val.last_seen_ns
        idle = flows.idle(now, idle_timeout)
        gone = {k for k in idle if flows.flows[k].last_active_ns == 0}
        self.remover.remove(gone, Cause.EVICTED)
        self.remover.remove(idle - gone, Cause.IDLE)
