# SPDX-License-Identifier: GPL-2.0-only
"""What the agent keeps between events, shared by its concerns (learn, offload, invalidate,
status): the learned flows (controller/core/state.py), the SAs written into the datapath, the
SAs it had to refuse, the links flow entries were written for, and its cached view of XFRM.

Plain data; the concerns change it, the status reads it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from controller.core.crypto import Backend, CryptoChoice
from controller.core.state import Direction, FlowState, SaRef
from controller.core.xfrm_model import DefaultPolicy, Policy, Sa

if TYPE_CHECKING:
    from controller.agent.ports import XfrmPort

RECENT_INVALIDATIONS = 64  # removals kept in the status file, newest last
NEVER = (1 << 64) - 1  # a deadline that never comes (CLOCK_MONOTONIC ns)


@dataclass
class OffloadedSa:
    """An SA written into the datapath, and what the agent keeps to look after it."""

    sa: Sa
    sa_id: int
    direction: Direction
    hard_deadline_ns: int  # CLOCK_MONOTONIC; NEVER when the SA has no hard time limit
    synced_packets: int = 0  # datapath counters already added to the kernel's lifetime
    synced_bytes: int = 0
    soft_expire_sent: bool = False
    # Who seals/opens it (controller/core/crypto.py) and why; kc_id: its xfp_crypto context
    # (kernel backend), destroyed when the entry goes.
    crypto: Backend = Backend.BPF
    crypto_why: str = "BPF AEAD"
    kc_id: int | None = None

    @property
    def ref(self) -> SaRef:
        return SaRef(str(self.sa.dst), self.sa.spi, self.sa.reqid)


@dataclass
class KernelView:
    """XFRM state cached between events: re-read after any XFRM event (dirty flag)."""

    xfrm: XfrmPort
    dirty: bool = True
    policies: list[Policy] = field(default_factory=list)
    default: DefaultPolicy = field(default_factory=DefaultPolicy)
    sas: list[Sa] = field(default_factory=list)

    def refresh(self) -> None:
        if not self.dirty:
            return
        self.policies = self.xfrm.policies()
        self.default = self.xfrm.get_default_policy()
        self.sas = self.xfrm.sas()
        self.dirty = False

    def sa_by_spi(self, spi: int, daddr: str | None = None) -> Sa | None:
        for sa in self.sas:
            if sa.spi == spi and sa.proto == 50 and (daddr is None or str(sa.dst) == daddr):
                return sa
        return None


@dataclass
class AgentState:
    """The agent's state for one gateway namespace."""

    flows: FlowState
    view: KernelView
    # ifindex -> "lan" | "wan": the configured interfaces, the only ones flows may use.
    role: dict[int, str] = field(default_factory=dict)
    sa_out: dict[SaRef, OffloadedSa] = field(default_factory=dict)
    sa_in: dict[SaRef, OffloadedSa] = field(default_factory=dict)
    # Why an SA stays on the kernel path (shown by `xfrm-fastpath sas`).
    refused_sas: dict[SaRef, str] = field(default_factory=dict)
    # (MTU, MAC) of each egress link as flow entries were written with them: a change of
    # either makes those entries wrong (frames too big, or a stale source MAC).
    link_seen: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    # When the kernel event being handled was read (CLOCK_MONOTONIC ns), and the last
    # removals with their timings: how fast the fastpath let go (status "invalidations").
    event_ns: int | None = None
    recent_invalidations: deque[dict[str, object]] = field(
        default_factory=lambda: deque(maxlen=RECENT_INVALIDATIONS)
    )
    next_sa_id: int = 1
    # The crypto backend chosen at start (controller/core/crypto.py; the daemon probes the
    # module), and the next xfp_crypto context id to try (ids go round, so an id just
    # destroyed is not reused at once: a program that read it a moment ago finds no context,
    # and punts, rather than another SA's key).
    crypto: CryptoChoice = field(default_factory=CryptoChoice)
    next_kc_id: int = 0

    def offloaded(self) -> list[OffloadedSa]:
        """Every offloaded SA, outbound first (a copy: callers may release as they go)."""
        return [*self.sa_out.values(), *self.sa_in.values()]

    def alloc_sa_id(self) -> int:
        sa_id = self.next_sa_id
        self.next_sa_id += 1
        return sa_id

    def alloc_kc_id(self, limit: int) -> int:
        """A free xfp_crypto context id below `limit`, round robin."""
        used = {o.kc_id for o in self.offloaded()}
        for i in range(limit):
            kc_id = (self.next_kc_id + i) % limit
            if kc_id not in used:
                self.next_kc_id = (kc_id + 1) % limit
                return kc_id
        raise RuntimeError(f"all {limit} kernel crypto contexts in use")

    def reqids(self) -> dict[int, int]:
        """sa_id -> reqid of every offloaded SA (the metrics label SAs by reqid)."""
        return {o.sa_id: o.sa.reqid for o in self.offloaded()}
