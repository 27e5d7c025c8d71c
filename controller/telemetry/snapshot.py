# SPDX-License-Identifier: GPL-2.0-only
"""The metrics snapshot: plain data, what the controller knows at one instant, and its JSON form.

Counters in a snapshot are cumulative since the controller started and never go backwards
(`controller.telemetry.collect.MonotonicCounters` sees to that). Keys of its maps are label
values (`controller.telemetry.labels`). Nothing here reads the datapath or serves anything:
`collect` builds snapshots, `exposition` and `status_text` only read them.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from controller.core.state import Direction
from controller.telemetry.labels import direction_label

# Learn latency (first packet seen at the tracepoint -> flow entry written) is a netlink round
# trip or two plus map updates: ~0.1 ms when everything is cached, up to ~1 s when the controller
# is busy or a neighbour must be resolved. Roughly 1-2.5-5 steps per decade over that range.
LEARN_LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


# --------------------------------------------------------------------------------------------
# Histogram (cumulative, Prometheus semantics)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistogramData:
    """A cumulative histogram as Prometheus exposes it.

    `counts[i]` is the number of observations <= `bounds[i]` (cumulative, like the `le` label);
    `count` includes the observations above the last bound (the `+Inf` bucket)."""

    bounds: tuple[float, ...] = LEARN_LATENCY_BUCKETS
    counts: tuple[int, ...] = (0,) * len(LEARN_LATENCY_BUCKETS)
    count: int = 0
    sum: float = 0.0

    def quantile(self, q: float) -> float | None:
        """Estimate the q-quantile the way PromQL's histogram_quantile() does (linear
        interpolation inside the bucket; promql/quantile.go). None when empty."""
        if self.count == 0:
            return None
        rank = q * self.count
        prev_bound, prev_count = 0.0, 0
        for bound, cum in zip(self.bounds, self.counts, strict=True):
            if cum >= rank:
                if cum == prev_count:
                    return bound
                return prev_bound + (bound - prev_bound) * (rank - prev_count) / (cum - prev_count)
            prev_bound, prev_count = bound, cum
        # In the +Inf bucket: Prometheus returns the highest finite bound.
        return self.bounds[-1]


# --------------------------------------------------------------------------------------------
# The snapshot
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaCounters:
    """One offloaded SA as the datapath saw it."""

    spi: str  # spi_label(): "0x0000c001"
    reqid: int
    direction: str  # direction_label()
    packets: int  # packets the fastpath carried on this SA
    bytes: int  # their bytes (the ESP packets on the wire side)
    sequence: int  # ESP sequence number used: last sent (encap), highest accepted (decap)
    backend: str = "bpf"  # backend_label(): who seals/opens it, as its datapath entry says


@dataclass(frozen=True)
class SaState:
    """One of the kernel's SAs as the controller judges it: on the fastpath or not, which
    crypto backend serves it (or would, once traffic comes) and why. `xfrm-fastpath sas`
    says the same (controller/agent/status.py builds both)."""

    spi: str  # spi_label()
    reqid: int
    direction: str  # direction_label() when offloaded, "none" when not
    offloaded: bool
    backend: str  # "bpf" | "kernel" (controller.core.crypto.Backend), "none": neither can
    reason: str  # why (not): "waiting for traffic", "AES-GCM needs the xfp_crypto module ..."


@dataclass(frozen=True)
class MetricsSnapshot:
    """What the controller knows at one instant. Counters are cumulative and monotonic.

    Keys are label values: `direction` from `direction_label`, `reason` from the datapath's
    reason enum (`reason_label`), `cause` from `controller.core.state.Cause`."""

    timestamp: float = 0.0  # time.time() when taken
    # (interface, direction) -> fastpath packets / bytes
    fastpath_packets: Mapping[tuple[str, str], int] = field(default_factory=dict)
    fastpath_bytes: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (direction, reason) -> packets / bytes handed to the kernel (XDP_PASS)
    kernel_packets: Mapping[tuple[str, str], int] = field(default_factory=dict)
    kernel_bytes: Mapping[tuple[str, str], int] = field(default_factory=dict)
    # (direction, reason) -> packets dropped (XDP_DROP)
    drops: Mapping[tuple[str, str], int] = field(default_factory=dict)
    sas: tuple[SaCounters, ...] = ()
    sa_states: tuple[SaState, ...] = ()  # every SA of the kernel's, offloaded or not
    flow_entries: int = 0
    flow_capacity: int = 0
    flow_evictions: int = 0
    learn_events: int = 0
    validation_rejections: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    invalidations: Mapping[str, int] = field(default_factory=dict)  # cause -> count
    # Observations since the previous snapshot, and the cumulative histogram they went into.
    learn_latency_s: tuple[float, ...] = ()
    learn_latency: HistogramData = field(default_factory=HistogramData)
    # Controller health.
    up: bool = False
    bpf_programs_attached: int = 0
    last_netlink_event: float = 0.0  # time.time() of the last netlink event; 0 = none yet
    build_info: Mapping[str, str] = field(default_factory=dict)

    # -- derived figures (status output) -----------------------------------------------------
    def directions(self) -> list[str]:
        seen = {d for _, d in self.fastpath_packets} | {d for d, _ in self.kernel_packets}
        return [d for d in (direction_label(x) for x in Direction) if d in seen]

    def fastpath_packets_by_direction(self, direction: str) -> int:
        return sum(v for (_, d), v in self.fastpath_packets.items() if d == direction)

    def kernel_packets_by_direction(self, direction: str) -> int:
        return sum(v for (d, _), v in self.kernel_packets.items() if d == direction)

    def hit_ratio(self, direction: str) -> float | None:
        """fastpath / (fastpath + kernel) since start, or None without traffic. Drops are left
        out on both sides, as in the recording rule."""
        fp = self.fastpath_packets_by_direction(direction)
        total = fp + self.kernel_packets_by_direction(direction)
        return fp / total if total else None


# --------------------------------------------------------------------------------------------
# JSON (the status file the daemon writes, /status.json, `xfrm-fastpath status`)
# --------------------------------------------------------------------------------------------
def snapshot_to_dict(snap: MetricsSnapshot) -> dict[str, Any]:
    """A JSON-able dict: tuple-keyed maps become lists of records with their label names."""
    h = snap.learn_latency
    return {
        "timestamp": snap.timestamp,
        "fastpath": [
            {
                "interface": i,
                "direction": d,
                "packets": v,
                "bytes": snap.fastpath_bytes.get((i, d), 0),
            }
            for (i, d), v in sorted(snap.fastpath_packets.items())
        ],
        "kernel": [
            {"direction": d, "reason": r, "packets": v, "bytes": snap.kernel_bytes.get((d, r), 0)}
            for (d, r), v in sorted(snap.kernel_packets.items())
        ],
        "drops": [
            {"direction": d, "reason": r, "packets": v} for (d, r), v in sorted(snap.drops.items())
        ],
        "sas": [dataclasses.asdict(sa) for sa in snap.sas],
        "sa_states": [dataclasses.asdict(sa) for sa in snap.sa_states],
        "flow_table": {
            "entries": snap.flow_entries,
            "capacity": snap.flow_capacity,
            "evictions": snap.flow_evictions,
        },
        "learn_events": snap.learn_events,
        "validation_rejections": dict(sorted(snap.validation_rejections.items())),
        "invalidations": dict(sorted(snap.invalidations.items())),
        "learn_latency_s": list(snap.learn_latency_s),
        "learn_latency": {
            "bounds": list(h.bounds),
            "counts": list(h.counts),
            "count": h.count,
            "sum": h.sum,
        },
        "hit_ratio": {d: snap.hit_ratio(d) for d in snap.directions()},
        "up": snap.up,
        "bpf_programs_attached": snap.bpf_programs_attached,
        "last_netlink_event": snap.last_netlink_event,
        "build_info": dict(snap.build_info),
    }


def snapshot_to_json(snap: MetricsSnapshot, indent: int | None = 2) -> str:
    return json.dumps(snapshot_to_dict(snap), indent=indent, sort_keys=False)


def snapshot_from_json(text: str) -> MetricsSnapshot:
    """The inverse of `snapshot_to_json` (derived fields like hit_ratio are recomputed)."""
    doc = json.loads(text)
    h = doc.get("learn_latency") or {}
    bounds = tuple(float(b) for b in h.get("bounds", LEARN_LATENCY_BUCKETS))
    return MetricsSnapshot(
        timestamp=float(doc.get("timestamp", 0.0)),
        fastpath_packets={(r["interface"], r["direction"]): r["packets"] for r in doc["fastpath"]},
        fastpath_bytes={(r["interface"], r["direction"]): r["bytes"] for r in doc["fastpath"]},
        kernel_packets={(r["direction"], r["reason"]): r["packets"] for r in doc["kernel"]},
        kernel_bytes={(r["direction"], r["reason"]): r["bytes"] for r in doc["kernel"]},
        drops={(r["direction"], r["reason"]): r["packets"] for r in doc["drops"]},
        sas=tuple(SaCounters(**sa) for sa in doc["sas"]),
        sa_states=tuple(SaState(**sa) for sa in doc.get("sa_states", ())),
        flow_entries=doc["flow_table"]["entries"],
        flow_capacity=doc["flow_table"]["capacity"],
        flow_evictions=doc["flow_table"]["evictions"],
        learn_events=doc["learn_events"],
        validation_rejections=dict(doc["validation_rejections"]),
        invalidations=dict(doc["invalidations"]),
        learn_latency_s=tuple(doc.get("learn_latency_s", ())),
        learn_latency=HistogramData(
            bounds,
            tuple(int(c) for c in h.get("counts", (0,) * len(bounds))),
            int(h.get("count", 0)),
            float(h.get("sum", 0.0)),
        ),
        up=bool(doc["up"]),
        bpf_programs_attached=int(doc["bpf_programs_attached"]),
        last_netlink_event=float(doc["last_netlink_event"]),
        build_info=dict(doc.get("build_info", {})),
    )
