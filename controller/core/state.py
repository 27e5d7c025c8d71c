# SPDX-License-Identifier: GPL-2.0-only
"""Pure controller state: learned flows, the kernel facts each one relied on, and invalidation.

No BPF, no netlink: this layer is driven by the adapters (learner, kernel watcher, datapath)
and is unit-testable on its own. Every installed flow records the proof it was installed on:
the SA it uses, the XFRM policy that covered it, the egress link and the neighbour it was sent
to. When any piece of that proof changes, the flows that relied on it are handed back for
removal, together with the cause (counted for operators).

Direction: ENCAP flows enter clear on a LAN interface and leave as ESP on a WAN interface;
DECAP flows enter as ESP on a WAN interface and leave clear on a LAN interface.
"""

from __future__ import annotations

import enum
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field


class Direction(enum.IntEnum):
    """Which way a flow crosses the gateway: enum xfp_dir of bpf/include/xfp_defs.h (its
    XFP_DIR_MAX is controller/datapath/abi.py's DIR_MAX), the one direction type of the
    controller. Labels, the status file and the CLI spell it `direction.name.lower()`."""

    ENCAP = 0
    DECAP = 1


class Cause(enum.StrEnum):
    """Why a flow left the fastpath (the label of the invalidation counter)."""

    SA_DELETED = "sa_deleted"
    SA_UPDATED = "sa_updated"
    SA_EXPIRED = "sa_expired"
    SA_REKEYED = "sa_rekeyed"
    NAT_MAPPING = "nat_mapping"  # a NAT-T peer's address or port changed (XFRM_MSG_MAPPING)
    WATCHDOG_LAPSED = "watchdog_lapsed"  # the controller stalled: XDP gave the SA up meanwhile
    POLICY_CHANGED = "policy_changed"
    ROUTE_CHANGED = "route_changed"
    NEIGH_CHANGED = "neigh_changed"
    LINK_CHANGED = "link_changed"
    FIREWALL_CHANGED = "firewall_changed"
    IDLE = "idle"
    EVICTED = "evicted"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, order=True)
class FlowKey:
    """The inner 5-tuple as the datapath keys it, plus where it enters and which way it goes.

    For ICMP, sport carries the echo identifier and dport the type (see xfp_defs.h)."""

    ifindex: int
    direction: Direction
    saddr: str
    daddr: str
    proto: int
    sport: int
    dport: int

    def __str__(self) -> str:
        arrow = "->" if self.direction is Direction.ENCAP else "<-"
        return (
            f"{self.direction.name.lower()} if{self.ifindex} proto {self.proto} "
            f"{self.saddr}:{self.sport} {arrow} {self.daddr}:{self.dport}"
        )


@dataclass(frozen=True)
class SaRef:
    """Identifies an SA the way the kernel does: (daddr, spi, proto), plus its reqid."""

    daddr: str
    spi: int
    reqid: int = 0


@dataclass
class FlowRecord:
    """A flow installed in the datapath and the kernel facts that justified it."""

    key: FlowKey
    sa: SaRef
    egress_ifindex: int
    src_mac: str
    dst_mac: str
    policy_index: int
    neighbour: tuple[int, str]  # (egress ifindex, next-hop IPv4 address)
    seen_ns: int = 0  # CLOCK_MONOTONIC ns when the first packet was seen (tracepoint)
    installed_ns: int = 0  # CLOCK_MONOTONIC ns when the flow entry was written
    last_active_ns: int = 0  # last time the datapath reported traffic for it
    dp_key: bytes = b""  # the datapath's struct xfp_flow_key as written (for batch deletes)
    via_ifindex: int = 0  # the route-based tunnel device (xfrm interface) it passes, if any

    @property
    def learn_latency_s(self) -> float | None:
        if not self.seen_ns or not self.installed_ns:
            return None
        return (self.installed_ns - self.seen_ns) / 1e9


@dataclass
class FlowState:
    """Learned flows, indexed by every fact they depend on."""

    capacity: int = 65536
    flows: dict[FlowKey, FlowRecord] = field(default_factory=dict)
    _by_sa: dict[SaRef, set[FlowKey]] = field(default_factory=lambda: defaultdict(set))
    _by_policy: dict[int, set[FlowKey]] = field(default_factory=lambda: defaultdict(set))
    _by_neigh: dict[tuple[int, str], set[FlowKey]] = field(default_factory=lambda: defaultdict(set))
    _by_link: dict[int, set[FlowKey]] = field(default_factory=lambda: defaultdict(set))
    invalidations: Counter[Cause] = field(default_factory=Counter)
    learned_total: int = 0

    def __len__(self) -> int:
        return len(self.flows)

    def __contains__(self, key: object) -> bool:
        return key in self.flows

    def full(self) -> bool:
        return len(self.flows) >= self.capacity

    def add(self, rec: FlowRecord) -> FlowRecord | None:
        """Index a new flow; return the record it replaced (same key), if any."""
        old = self._unindex(rec.key)
        if not rec.installed_ns:
            rec.installed_ns = time.monotonic_ns()
        if not rec.last_active_ns:
            rec.last_active_ns = rec.installed_ns
        self.flows[rec.key] = rec
        self._by_sa[rec.sa].add(rec.key)
        self._by_policy[rec.policy_index].add(rec.key)
        self._by_neigh[rec.neighbour].add(rec.key)
        self._by_link[rec.key.ifindex].add(rec.key)
        self._by_link[rec.egress_ifindex].add(rec.key)
        if rec.via_ifindex:
            self._by_link[rec.via_ifindex].add(rec.key)
        self.learned_total += 1
        return old

    def _unindex(self, key: FlowKey) -> FlowRecord | None:
        rec = self.flows.pop(key, None)
        if rec is None:
            return None
        for index, fact in (
            (self._by_sa, rec.sa),
            (self._by_policy, rec.policy_index),
            (self._by_neigh, rec.neighbour),
            (self._by_link, rec.key.ifindex),
            (self._by_link, rec.egress_ifindex),
            (self._by_link, rec.via_ifindex),
        ):
            keys = index.get(fact)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del index[fact]
        return rec

    def remove(self, keys: Iterable[FlowKey], cause: Cause) -> list[FlowRecord]:
        """Remove flows, count them under cause, and return the records removed."""
        removed = [rec for key in list(keys) if (rec := self._unindex(key)) is not None]
        if removed:
            self.invalidations[cause] += len(removed)
        return removed

    # -- what depends on what ---------------------------------------------------------------
    def flows_of_sa(self, sa: SaRef) -> set[FlowKey]:
        return set(self._by_sa.get(sa, ()))

    def flows_of_spi(self, spi: int) -> set[FlowKey]:
        return {k for ref, keys in self._by_sa.items() if ref.spi == spi for k in keys}

    def flows_of_policy(self, index: int) -> set[FlowKey]:
        return set(self._by_policy.get(index, ()))

    def flows_of_neigh(self, ifindex: int, addr: str) -> set[FlowKey]:
        return set(self._by_neigh.get((ifindex, addr), ()))

    def flows_of_link(self, ifindex: int) -> set[FlowKey]:
        return set(self._by_link.get(ifindex, ()))

    def idle(self, now_ns: int, timeout_s: float) -> set[FlowKey]:
        limit = now_ns - int(timeout_s * 1e9)
        return {k for k, rec in self.flows.items() if rec.last_active_ns < limit}

    def sas_in_use(self) -> set[SaRef]:
        return {ref for ref, keys in self._by_sa.items() if keys}

    def check_invariants(self) -> None:
        """Raise AssertionError when an index disagrees with the flow table (used by tests and
        the control-plane fuzzer)."""
        for index in (self._by_sa, self._by_policy, self._by_neigh, self._by_link):
            for fact, keys in index.items():
                assert keys, f"empty index entry left behind for {fact}"
                for k in keys:
                    assert k in self.flows, f"index {fact} names a removed flow {k}"
        for k, rec in self.flows.items():
            assert k in self._by_sa.get(rec.sa, ()), f"flow {k} missing from its SA index"
            assert k in self._by_policy.get(rec.policy_index, ()), f"flow {k} not in policy index"
