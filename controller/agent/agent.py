# SPDX-License-Identifier: GPL-2.0-only
"""The agent for one gateway namespace: its state and its concerns, driven by the process
(controller/agent/daemon.py) or directly by a test (tests/unit), through the ports of
controller/agent/ports.py only.

    learner ──candidate──▶ learn: validate against the kernel, offload the SA, write the flow
    kernel  ──event──────▶ invalidate: remove what relied on what changed, release SAs
    tick    ─────────────▶ idle sweep, SA upkeep (lifetimes, watchdogs), status file

Concerns, each its own module: learn.py, offload.py, invalidate.py, status.py; the state they
share is state.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.agent import status as status_file
from controller.agent.invalidate import Invalidator, Remover
from controller.agent.learn import Learning
from controller.agent.offload import Offload, recover_pinned_state
from controller.agent.ports import Ports
from controller.agent.routing_cache import CachedRouting
from controller.agent.state import AgentState, KernelView
from controller.config import Config, check_interfaces
from controller.core.reasons import RejectReason
from controller.core.state import Cause, Direction, FlowState

if TYPE_CHECKING:
    from controller.datapath.learner import Candidate
    from controller.telemetry import MetricsSnapshot

log = logging.getLogger("xfrm-fastpath")

# How often what XDP carried is added to the kernel's SA lifetime counters: bounds how far
# fastpath traffic may run past a byte/packet limit before the kernel and the IKE daemon see it.
LIFETIME_SYNC_S = 1.0


class Agent:
    """Learn, offload, invalidate, report, for the interfaces of `cfg`.

    `ifindex` maps the configured interface names to their ifindexes; by default they are
    looked up in the calling process's network namespace (a missing one raises ConfigError).
    """

    def __init__(
        self,
        cfg: Config,
        ports: Ports,
        *,
        run_dir: Path,
        ifindex: Mapping[str, int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.ports = ports
        self.run_dir = run_dir
        names = dict(ifindex) if ifindex is not None else check_interfaces(cfg)
        role = {names[n]: "lan" for n in cfg.lan}
        role.update({names[n]: "wan" for n in cfg.wan})
        self.state = AgentState(
            flows=FlowState(capacity=cfg.flow_table_size), view=KernelView(ports.xfrm), role=role
        )
        self.remover = Remover(self.state, ports)
        self.offload = Offload(cfg, self.state, ports, self.remover)
        self.invalidate = Invalidator(self.state, ports, self.remover, self.offload)
        # Routes, neighbours, addresses and links as validation last read them, dropped by the
        # kernel events that change them (on_kernel_event): a burst of new flows behind one
        # next hop asks the kernel once.
        self.routing = CachedRouting(ports.routing)
        self.learn = Learning(cfg, self.state, ports, self.offload, routing=self.routing)
        self.started = time.time()
        self.loop_stalls = 0  # main-loop steps that took STALL_S or longer (the daemon counts)
        self.snapshot: MetricsSnapshot | None = None  # the metrics as of the last tick
        self._next_lifetime_sync = 0
        self._shed_seen = 0  # the learner's shed count already reported

    @property
    def flows(self) -> FlowState:
        return self.state.flows

    def reqids(self) -> dict[int, int]:
        return self.state.reqids()

    # -- events ------------------------------------------------------------------------------
    def on_candidate(self, cand: Candidate) -> None:
        self.learn.on_candidate(cand)

    def on_candidates(self, cands: Iterable[Candidate]) -> None:
        """Every candidate waiting, their flow entries written in one batch (learn.py)."""
        self.learn.on_candidates(cands)

    def learner_shed(self, total: int) -> None:
        """The learner's running count of first packets it had no room for (Learner.shed plus
        lost perf samples): what it grew by is counted as rejections{reason=learn_shed}."""
        if total > self._shed_seen:
            self.ports.metrics.reject(RejectReason.LEARN_SHED, total - self._shed_seen)
        self._shed_seen = total

    def on_kernel_event(self, ev: object) -> None:
        self.routing.on_event(ev)  # first: nothing validated from here on uses a stale answer
        self.invalidate.on_kernel_event(ev)

    def tick(self) -> None:
        """Housekeeping: idle flows out, each SA's time limit, watchdog and lifetime counters
        looked after, the kernel view re-read if XFRM changed, metrics and status refreshed."""
        now = time.monotonic_ns()
        self.invalidate.sweep_idle(now, self.cfg.idle_timeout)
        sync = now >= self._next_lifetime_sync
        if sync:
            self._next_lifetime_sync = now + int(LIFETIME_SYNC_S * 1e9)
        for off in self.state.offloaded():
            if now >= off.hard_deadline_ns:
                self.invalidate.drop_sa(off.sa.spi, str(off.sa.dst), Cause.SA_EXPIRED)
                continue
            if off.direction is Direction.DECAP and self.offload.watchdog_lapsed(off, now):
                self.invalidate.drop_sa(off.sa.spi, str(off.sa.dst), Cause.WATCHDOG_LAPSED)
                continue
            if sync and not self.offload.sync_lifetime(off):
                continue
            self.offload.refresh_watchdog(off, now)
        view = self.state.view
        if view.dirty:
            # XFRM changed since the last look: `xfrm-fastpath sas` shows the kernel's SAs now,
            # not at the next learn event.
            try:
                view.refresh()
            except Exception as e:
                log.warning("kernel view refresh: %s", e)
        snap = self.ports.metrics.snapshot()
        if snap is not None:  # the kernel's SAs, offloaded or not, and why: the agent's to say
            snap = dataclasses.replace(snap, sa_states=status_file.sa_states(self.state))
        self.snapshot = snap
        status_file.write_status(self.run_dir, self.status)

    # -- start and stop ----------------------------------------------------------------------
    def recover_pinned_state(self) -> None:
        """Hand back what a previous controller left in pinned maps, then start clean."""
        recover_pinned_state(self.ports.datapath, self.ports.reseq, self.ports.xfrm)

    def release_all(self) -> None:
        """What shutdown does to the fastpath: every flow removed, every SA released (its
        sequence and replay state handed back to the kernel, its key wiped)."""
        self.remover.remove(list(self.state.flows.flows), Cause.SHUTDOWN)
        for off in self.state.offloaded():
            with contextlib.suppress(Exception):
                self.offload.release_sa(off)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return status_file.status(
            self.cfg,
            self.state,
            self.ports,
            started=self.started,
            snapshot=self.snapshot,
            loop_stalls=self.loop_stalls,
        )
