# SPDX-License-Identifier: GPL-2.0-only
"""From the controller's live objects to a `MetricsSnapshot`: the only stateful part of telemetry.

- `snapshot_from_datapath` / `datapath_parts`: the datapath's per-CPU counters (summed by
  `controller.datapath.xdp.Datapath.stats`) and its SA entries, as snapshot parts.
- `MonotonicCounters`: absorbs counter resets (a datapath reload recreates its maps at zero).
- `LatencyHistogram`: accumulates the learn latency.
- `MetricsSource`: the daemon owns one, feeds it events, and hands `source.snapshot` to the
  exporter as its provider.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

from controller.core.state import Cause, Direction, FlowState
from controller.datapath import abi
from controller.telemetry.labels import backend_label, direction_label, reason_kind, spi_label
from controller.telemetry.snapshot import (
    LEARN_LATENCY_BUCKETS,
    HistogramData,
    MetricsSnapshot,
    SaCounters,
)


class LatencyHistogram:
    """Accumulates observations into `HistogramData` (thread-safe: the learner observes, the
    exporter's thread reads)."""

    def __init__(self, bounds: Iterable[float] = LEARN_LATENCY_BUCKETS) -> None:
        self.bounds = tuple(sorted(bounds))
        self._buckets = [0] * (len(self.bounds) + 1)  # non-cumulative, last = above all bounds
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"learn latency must be a finite non-negative number: {seconds}")
        with self._lock:
            # bisect_left: an observation equal to a bound belongs in that bound's bucket (le).
            self._buckets[bisect.bisect_left(self.bounds, seconds)] += 1
            self._sum += seconds

    def data(self) -> HistogramData:
        with self._lock:
            cum, counts = 0, []
            for n in self._buckets[:-1]:
                cum += n
                counts.append(cum)
            return HistogramData(self.bounds, tuple(counts), cum + self._buckets[-1], self._sum)


# --------------------------------------------------------------------------------------------
# Counters that never go backwards
# --------------------------------------------------------------------------------------------
class MonotonicCounters:
    """Turns raw readings into counters that never go backwards within this process.

    The per-CPU sums read from a BPF map only grow while the map lives; a datapath reload
    recreates the maps at zero. Prometheus clients promise that a counter resets only when the
    process restarts (its `_created` time changes), so a reading below the previous one is taken
    as a reset and the previous value is carried as an offset. A key that disappears keeps its
    last value when it comes back.
    """

    def __init__(self) -> None:
        self._last: dict[Any, int] = {}
        self._offset: dict[Any, int] = {}
        self._lock = threading.Lock()

    def update(self, key: Any, raw: int) -> int:
        if raw < 0:
            raise ValueError(f"counter {key!r} read negative: {raw}")
        with self._lock:
            last = self._last.get(key)
            if last is not None and raw < last:
                self._offset[key] = self._offset.get(key, 0) + last
            self._last[key] = raw
            return raw + self._offset.get(key, 0)

    def update_all(self, group: str, readings: Mapping[Any, int]) -> dict[Any, int]:
        return {k: self.update((group, k), v) for k, v in readings.items()}


# --------------------------------------------------------------------------------------------
# From the datapath's counters to snapshot parts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatapathParts:
    """The snapshot fields that come from the datapath's counters."""

    fastpath_packets: dict[tuple[str, str], int]
    fastpath_bytes: dict[tuple[str, str], int]
    kernel_packets: dict[tuple[str, str], int]
    kernel_bytes: dict[tuple[str, str], int]
    drops: dict[tuple[str, str], int]
    sas: tuple[SaCounters, ...] = ()
    flow_entries: int | None = None  # None: take the controller's own count (FlowState)
    flow_evictions: int | None = None  # None: the controller's evictions (Cause.EVICTED)


@dataclass(frozen=True)
class SaReading:
    """One SA entry as read from the datapath's SA maps, with the reqid the controller knows."""

    spi: int  # host order
    reqid: int
    direction: Direction
    packets: int
    bytes: int
    sequence: int  # sequence number used (encap: next - 1; decap: seq_top)
    flags: int = 0  # the entry's XFP_SA_F_*: XFP_SA_F_KCRYPTO says the kernel backend


def snapshot_from_datapath(
    stats: Mapping[tuple[int, int], tuple[int, int]],
    interfaces: Mapping[Direction, Iterable[str]],
    sas: Iterable[SaReading] = (),
    reasons: type[enum.IntEnum] | None = None,
) -> DatapathParts:
    """Turn the datapath's summed per-CPU counters into snapshot parts.

    `stats`: (direction, reason) -> (packets, bytes) summed over CPUs, as
    `Datapath.stats()` (controller/datapath/xdp.py) returns it. `reasons`: the
    reason enum (default controller.datapath.abi.Reason, the mirror of enum xfp_reason); its member
    names decide the labels, and every (direction, reason) pair is exported, zero or not, so the
    series exist before the first packet. `interfaces`: the devices each direction's program is
    attached to (config lan -> encap, wan -> decap). The per-CPU counters are not per device, so
    a direction with several devices gets one series labelled "dev1,dev2".
    """
    reasons = reasons or abi.Reason
    by_int = {(int(d), int(r)): v for (d, r), v in stats.items()}
    fp_pkts: dict[tuple[str, str], int] = {}
    fp_bytes: dict[tuple[str, str], int] = {}
    k_pkts: dict[tuple[str, str], int] = {}
    k_bytes: dict[tuple[str, str], int] = {}
    drops: dict[tuple[str, str], int] = {}
    for d in Direction:
        dl = direction_label(d)
        ifname = ",".join(interfaces.get(d, ())) or "none"
        fp_pkts.setdefault((ifname, dl), 0)
        fp_bytes.setdefault((ifname, dl), 0)
        for r in reasons:
            kind, label = reason_kind(r)
            if kind == "none":
                continue
            pkts, nbytes = by_int.get((int(d), int(r)), (0, 0))
            if kind == "fastpath":
                fp_pkts[(ifname, dl)] += pkts
                fp_bytes[(ifname, dl)] += nbytes
            elif kind == "kernel":
                k_pkts[(dl, label)] = k_pkts.get((dl, label), 0) + pkts
                k_bytes[(dl, label)] = k_bytes.get((dl, label), 0) + nbytes
            else:
                drops[(dl, label)] = drops.get((dl, label), 0) + pkts
    sa_counters = tuple(
        SaCounters(
            spi=spi_label(sa.spi),
            reqid=sa.reqid,
            direction=direction_label(sa.direction),
            packets=sa.packets,
            bytes=sa.bytes,
            sequence=sa.sequence,
            backend=backend_label(sa.flags),
        )
        for sa in sas
    )
    return DatapathParts(
        fastpath_packets=fp_pkts,
        fastpath_bytes=fp_bytes,
        kernel_packets=k_pkts,
        kernel_bytes=k_bytes,
        drops=drops,
        sas=sa_counters,
    )


def read_datapath_sas(dp: Any, reqids: Mapping[int, int] | None = None) -> list[SaReading]:
    """Every SA entry of a loaded `controller.datapath.xdp.Datapath` (maps "sa_out", "sa_in"),
    with the reqid the controller knows for it (`reqids`: the entry's sa_id -> reqid, 0 if
    unknown; sa_id, not SPI, because an inbound and an outbound SA may share an SPI value).

    Encap: struct xfp_sa_out's `seq` is the next number to send, so the last used is seq - 1.
    Decap: struct xfp_sa_in's `seq_top` is the highest authenticated number. The entry's flags
    say the backend: XFP_SA_F_KCRYPTO, the xfp_crypto module; otherwise the BPF AEAD."""
    reqids = reqids or {}
    out: list[SaReading] = []
    for direction, handle, used in (
        (Direction.ENCAP, dp.maps["sa_out"], lambda sa: max(0, int(sa.seq) - 1)),
        (Direction.DECAP, dp.maps["sa_in"], lambda sa: int(sa.seq_top)),
    ):
        for key in list(handle.keys()):
            sa = handle.get(key)
            if sa is None:  # deleted while we walked
                continue
            out.append(
                SaReading(
                    abi.from_be32(sa.spi),
                    reqids.get(int(sa.sa_id), 0),
                    direction,
                    int(sa.packets),
                    int(sa.bytes),
                    used(sa),
                    int(sa.flags),
                )
            )
    return out


def datapath_parts(
    dp: Any,
    interfaces: Mapping[Direction, Iterable[str]],
    reqids: Mapping[int, int] | None = None,
) -> DatapathParts:
    """Everything the exporter needs from a loaded `controller.datapath.xdp.Datapath`: its summed
    per-CPU counters and its SA entries. The daemon's `MetricsSource(datapath=...)` callable."""
    return snapshot_from_datapath(dp.stats(), interfaces, read_datapath_sas(dp, reqids))


# --------------------------------------------------------------------------------------------
# The daemon's side: one MetricsSource, whose `snapshot` is the exporter's provider
# --------------------------------------------------------------------------------------------
def default_build_info() -> dict[str, str]:
    """Build info labels: our version, the kernel and the BCC we run on."""
    try:
        ours = version("xfrm-fastpath")
    except Exception:  # not installed as a package (run from a checkout)
        ours = "unknown"
    try:
        import bcc  # optional here: only its version is reported

        bcc_version = getattr(bcc, "__version__", "unknown")
    except Exception:
        bcc_version = "absent"
    return {
        "version": ours,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bcc": str(bcc_version),
    }


class MetricsSource:
    """Builds snapshots from the controller's live objects; the one place that keeps state
    between snapshots (counter offsets across datapath reloads, the latency histogram).

    The daemon creates one, feeds it events, and hands `source.snapshot` to the `Exporter`:

        lan_wan = {Direction.ENCAP: cfg.lan, Direction.DECAP: cfg.wan}
        source = MetricsSource(flows=state, datapath=lambda: datapath_parts(dp, lan_wan, reqids))
        source.set_health(up=True, bpf_programs_attached=2)
        source.observe_learn_latency(rec.learn_latency_s)   # learner, per installed flow
        source.reject("no_policy")                          # validator, per refused candidate
        source.netlink_event()                              # kernel watcher, per message
    """

    def __init__(
        self,
        *,
        flows: FlowState | None = None,
        datapath: Callable[[], DatapathParts] | None = None,
        flow_capacity: int | None = None,
        build_info: Mapping[str, str] | None = None,
    ) -> None:
        self.flows = flows
        self.datapath = datapath
        self.flow_capacity = flow_capacity
        self.build_info = dict(build_info) if build_info is not None else default_build_info()
        self.latency = LatencyHistogram()
        self._lock = threading.Lock()
        self._pending: list[float] = []
        self._counters = MonotonicCounters()
        self._rejections: Counter[str] = Counter()
        self._up = False
        self._programs = 0
        self._last_netlink = 0.0

    # -- events (any thread) -----------------------------------------------------------------
    def observe_learn_latency(self, seconds: float | None) -> None:
        if seconds is None:
            return
        self.latency.observe(seconds)
        with self._lock:
            self._pending.append(seconds)

    def reject(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._rejections[reason] += n

    def netlink_event(self, when: float | None = None) -> None:
        with self._lock:
            self._last_netlink = time.time() if when is None else when

    def set_health(self, *, up: bool, bpf_programs_attached: int) -> None:
        with self._lock:
            self._up = up
            self._programs = bpf_programs_attached

    # -- the provider --------------------------------------------------------------------------
    def snapshot(self) -> MetricsSnapshot:
        """Read everything now. Raises when the datapath cannot be read (the scrape fails, and
        Prometheus says so) rather than serving made-up zeros."""
        parts = self.datapath() if self.datapath is not None else None
        mono = self._counters
        flows = self.flows
        invalidations = {c.value: 0 for c in Cause}
        learned = entries = 0
        if flows is not None:
            invalidations.update({c.value: n for c, n in flows.invalidations.items()})
            learned = flows.learned_total
            entries = len(flows)
        evictions = invalidations.get(Cause.EVICTED.value, 0)
        if parts is not None:
            if parts.flow_entries is not None:
                entries = parts.flow_entries
            if parts.flow_evictions is not None:
                evictions = parts.flow_evictions
        capacity = self.flow_capacity
        if capacity is None:
            capacity = flows.capacity if flows is not None else 0
        with self._lock:
            pending, self._pending = tuple(self._pending), []
            rejections = dict(self._rejections)
            up, programs, last_nl = self._up, self._programs, self._last_netlink
        sas: tuple[SaCounters, ...] = ()
        if parts is not None:
            sas = tuple(
                dataclasses.replace(
                    sa,
                    packets=mono.update(("sa_packets", sa.spi, sa.direction), sa.packets),
                    bytes=mono.update(("sa_bytes", sa.spi, sa.direction), sa.bytes),
                )
                for sa in parts.sas
            )
        return MetricsSnapshot(
            timestamp=time.time(),
            fastpath_packets=mono.update_all("fp_pkts", parts.fastpath_packets if parts else {}),
            fastpath_bytes=mono.update_all("fp_bytes", parts.fastpath_bytes if parts else {}),
            kernel_packets=mono.update_all("k_pkts", parts.kernel_packets if parts else {}),
            kernel_bytes=mono.update_all("k_bytes", parts.kernel_bytes if parts else {}),
            drops=mono.update_all("drops", parts.drops if parts else {}),
            sas=sas,
            flow_entries=entries,
            flow_capacity=capacity,
            flow_evictions=mono.update("evictions", evictions),
            learn_events=mono.update("learned", learned),
            validation_rejections=rejections,
            invalidations=mono.update_all("invalidations", invalidations),
            learn_latency_s=pending,
            learn_latency=self.latency.data(),
            up=up,
            bpf_programs_attached=programs,
            last_netlink_event=last_nl,
            build_info=self.build_info,
        )
