# SPDX-License-Identifier: GPL-2.0-only
"""What the controller can tell an operator: a snapshot of its figures, a Prometheus exporter that
serves it, and the same figures as a terminal table or JSON (`xfrm-fastpath status`).

Layers, each readable alone:

- `MetricsSnapshot`: plain data, what the controller knows at one instant. Counters in it are
  cumulative since the controller started and never go backwards (see `MonotonicCounters`).
- `MetricsSource`: the only stateful piece. The daemon owns one; it turns the datapath's per-CPU
  counters (summed), the flow state and the controller's health into a snapshot, absorbs counter
  resets (a datapath reload recreates its maps at zero) and accumulates the learn latency
  histogram. `MetricsSource.snapshot` is the provider the exporter calls.
- `Exporter`: an HTTP server (prometheus-client) whose custom collector calls the provider at
  every scrape and renders the snapshot. It only reads: no counter of its own, so two scrapes of
  one snapshot give the same figures, and a snapshot it never saw loses nothing.

Naming follows https://prometheus.io/docs/practices/naming/: every metric starts with
`xfrm_fastpath_`, counters end in `_total`, units are base units (bytes, seconds). Labels are
bounded: interface, direction, reason, cause, spi, reqid; never a per-flow label (a gateway can
carry millions of flows; one series each would take the Prometheus server down).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import json
import math
import platform
import socket
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from controller.core.state import Cause, Direction, FlowState

PREFIX = "xfrm_fastpath"

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


def direction_label(direction: Direction | int | str) -> str:
    """The `direction` label value: the enum name in lower case ("encap", "decap")."""
    if isinstance(direction, str):
        return Direction[direction.upper()].name.lower()
    return Direction(direction).name.lower()


def spi_label(spi: int) -> str:
    """The `spi` label value: 8 hex digits, as `ip xfrm state` prints it (0x%08x)."""
    return f"0x{spi & 0xFFFFFFFF:08x}"


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


def default_build_info() -> dict[str, str]:
    """Build info labels: our version, the kernel and the BCC we run on."""
    try:
        from importlib.metadata import version

        ours = version("xfrm-fastpath")
    except Exception:
        ours = "unknown"
    try:
        import bcc

        bcc_version = getattr(bcc, "__version__", "unknown")
    except Exception:
        bcc_version = "absent"
    return {
        "version": ours,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "bcc": str(bcc_version),
    }


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
def sum_percpu(values: Iterable[Any], attr: str | None = None) -> int:
    """Sum one per-CPU counter: BCC gives a list with one value per possible CPU, either ints
    or ctypes structs (then `attr` names the field)."""
    total = 0
    for v in values:
        total += int(getattr(v, attr) if attr else v)
    return total


# The datapath's reason enum (enum xfp_reason in bpf/include/xfp_defs.h, mirrored in
# controller/datapath/abi.py) says by its member names what a verdict was: *_OK = forwarded by XDP,
# PASS_* = handed to the kernel, DROP_* = dropped. Label values are derived from those names, so
# a reason added to the header shows up here without a second list to keep in step.
_ENUM_PREFIXES = ("XFP_R_", "XFP_REASON_", "R_")


def _bare(name: str) -> str:
    for prefix in _ENUM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def reason_kind(reason: enum.Enum | str) -> tuple[str, str]:
    """(kind, label) of a datapath reason: kind is "fastpath", "kernel", "drop" or "none" (the
    enum's MAX sentinel); label is the reason without its prefixes, in lower case
    (XFP_R_DROP_BAD_ICV -> ("drop", "bad_icv")). An unclassifiable name raises: a new kind of
    verdict needs a decision on how to export it."""
    name = _bare(reason if isinstance(reason, str) else reason.name)
    if name == "MAX":
        return "none", ""
    if name.startswith("PASS_"):
        return "kernel", name[len("PASS_") :].lower()
    if name.startswith("DROP_"):
        return "drop", name[len("DROP_") :].lower()
    if name.endswith("_OK"):
        return "fastpath", name[: -len("_OK")].lower()
    raise ValueError(f"datapath reason {name!r} is neither *_OK, PASS_* nor DROP_*")


def reason_label(reason: enum.Enum | str) -> str:
    """A datapath reason as a `reason` label value (see `reason_kind`)."""
    return reason_kind(reason)[1]


def reason_labels(reasons: Iterable[enum.Enum], kind: str) -> list[str]:
    """Every label value of one kind, in enum order (the exporter zero-fills these)."""
    return [lbl for r in reasons for k, lbl in [reason_kind(r)] if k == kind]


def sum_percpu_stats(
    table: Any, reasons: type[enum.IntEnum] | None = None
) -> dict[tuple[Direction, enum.IntEnum], tuple[int, int]]:
    """Read a BCC per-CPU array of `struct xfp_stat` (packets, bytes), index dir * R_MAX +
    reason, and sum the CPUs: (direction, reason) -> (packets, bytes), the shape of
    `controller.datapath.xdp.Datapath.stats()`. One lookup per index (dirs x reasons: a few
    dozen)."""
    reasons = reasons or _default_reasons()
    r_max = _r_max(reasons)
    out: dict[tuple[Direction, enum.IntEnum], tuple[int, int]] = {}
    for d in Direction:
        for r in reasons:
            if reason_kind(r)[0] == "none":
                continue
            per_cpu = table[table.Key(int(d) * r_max + int(r))]
            out[(d, r)] = (sum_percpu(per_cpu, "packets"), sum_percpu(per_cpu, "bytes"))
    return out


def _default_reasons() -> type[enum.IntEnum]:
    from controller.datapath import abi as defs

    return defs.Reason


def _r_max(reasons: type[enum.IntEnum]) -> int:
    return max(int(r) for r in reasons if reason_kind(r)[0] != "none") + 1


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


def snapshot_from_datapath(
    stats: Mapping[tuple[int, int], tuple[int, int]],
    interfaces: Mapping[Direction, Iterable[str]],
    sas: Iterable[SaReading] = (),
    reasons: type[enum.IntEnum] | None = None,
) -> DatapathParts:
    """Turn the datapath's summed per-CPU counters into snapshot parts.

    `stats`: (direction, reason) -> (packets, bytes) summed over CPUs, as
    `Datapath.stats()` (controller/datapath/xdp.py) or `sum_percpu_stats` return it. `reasons`: the
    reason enum (default controller.datapath.abi.Reason, the mirror of enum xfp_reason); its member
    names decide the labels, and every (direction, reason) pair is exported, zero or not, so the
    series exist before the first packet. `interfaces`: the devices each direction's program is
    attached to (config lan -> encap, wan -> decap). The per-CPU counters are not per device, so
    a direction with several devices gets one series labelled "dev1,dev2".
    """
    reasons = reasons or _default_reasons()
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
    Decap: struct xfp_sa_in's `seq_top` is the highest authenticated number."""
    from controller.datapath import abi as defs

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
                    defs.from_be32(sa.spi),
                    reqids.get(int(sa.sa_id), 0),
                    direction,
                    int(sa.packets),
                    int(sa.bytes),
                    used(sa),
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
# Rendering for Prometheus
# --------------------------------------------------------------------------------------------
def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    # CounterMetricFamily appends `_total` to the sample name.
    return CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=labels or [])


def render(snap: MetricsSnapshot) -> list[Metric]:
    """Every metric family the exporter serves, in order. Every family is always present (with
    no samples when there is nothing to say), so the set of names does not depend on traffic."""
    fp_pkts = _counter(
        "packets", "Packets carried by the XDP fastpath.", ["interface", "direction"]
    )
    fp_bytes = _counter(
        "bytes", "Bytes carried by the XDP fastpath (as received).", ["interface", "direction"]
    )
    for (ifname, d), v in sorted(snap.fastpath_packets.items()):
        fp_pkts.add_metric([ifname, d], v)
    for (ifname, d), v in sorted(snap.fastpath_bytes.items()):
        fp_bytes.add_metric([ifname, d], v)

    k_pkts = _counter(
        "kernel_packets",
        "Packets the XDP programs handed to the kernel (XDP_PASS), by reason.",
        ["direction", "reason"],
    )
    k_bytes = _counter(
        "kernel_bytes",
        "Bytes the XDP programs handed to the kernel (XDP_PASS), by reason.",
        ["direction", "reason"],
    )
    drops = _counter(
        "drops", "Packets the XDP programs dropped (XDP_DROP), by reason.", ["direction", "reason"]
    )
    for (d, r), v in sorted(snap.kernel_packets.items()):
        k_pkts.add_metric([d, r], v)
    for (d, r), v in sorted(snap.kernel_bytes.items()):
        k_bytes.add_metric([d, r], v)
    for (d, r), v in sorted(snap.drops.items()):
        drops.add_metric([d, r], v)

    sa_labels = ["spi", "reqid", "direction"]
    sa_pkts = _counter("sa_packets", "Packets the fastpath carried on an SA.", sa_labels)
    sa_bytes = _counter("sa_bytes", "Bytes the fastpath carried on an SA.", sa_labels)
    sa_seq = _gauge(
        "sa_sequence",
        "ESP sequence number used on an SA: last sent (encap), highest accepted (decap).",
        sa_labels,
    )
    for sa in sorted(snap.sas, key=lambda s: (s.direction, s.spi)):
        lv = [sa.spi, str(sa.reqid), sa.direction]
        sa_pkts.add_metric(lv, sa.packets)
        sa_bytes.add_metric(lv, sa.bytes)
        sa_seq.add_metric(lv, sa.sequence)

    entries = _gauge("flow_table_entries", "Flows installed in the XDP flow table.")
    entries.add_metric([], snap.flow_entries)
    capacity = _gauge("flow_table_capacity", "Size of the XDP flow table (entries).")
    capacity.add_metric([], snap.flow_capacity)
    evictions = _counter(
        "flow_table_evictions", "Flows removed from the flow table to make room.", []
    )
    evictions.add_metric([], snap.flow_evictions)

    learn = _counter("learn_events", "Flows learned and installed in the fastpath.", [])
    learn.add_metric([], snap.learn_events)
    rejections = _counter(
        "validation_rejections",
        "Flow candidates the controller refused after checking the kernel's state, by reason.",
        ["reason"],
    )
    for r, v in sorted(snap.validation_rejections.items()):
        rejections.add_metric([r], v)
    inval = _counter("invalidations", "Flows removed from the fastpath, by cause.", ["cause"])
    for c, v in sorted(snap.invalidations.items()):
        inval.add_metric([c], v)

    h = snap.learn_latency
    latency = HistogramMetricFamily(
        f"{PREFIX}_learn_latency_seconds",
        "Time from a flow's first packet (tracepoint) to its flow entry being written.",
        labels=[],
    )
    buckets = [(_le(b), c) for b, c in zip(h.bounds, h.counts, strict=True)]
    buckets.append(("+Inf", h.count))
    latency.add_metric([], buckets, sum_value=h.sum)

    up = _gauge("up", "1 when the controller runs with its datapath attached and watchers alive.")
    up.add_metric([], 1 if snap.up else 0)
    progs = _gauge("bpf_programs_attached", "BPF programs the controller has attached.")
    progs.add_metric([], snap.bpf_programs_attached)
    last_nl = _gauge(
        "last_netlink_event_timestamp_seconds",
        "Unix time of the last netlink event the controller processed (0: none yet).",
    )
    last_nl.add_metric([], snap.last_netlink_event)
    info_labels = dict(sorted(snap.build_info.items()))
    build = InfoMetricFamily(f"{PREFIX}_build", "Build information.", labels=list(info_labels))
    build.add_metric(list(info_labels.values()), {})

    return [
        fp_pkts,
        fp_bytes,
        k_pkts,
        k_bytes,
        drops,
        sa_pkts,
        sa_bytes,
        sa_seq,
        entries,
        capacity,
        evictions,
        learn,
        rejections,
        inval,
        latency,
        up,
        progs,
        last_nl,
        build,
    ]


def _le(bound: float) -> str:
    # The `le` label value as prometheus_client's own Histogram writes it (floatToGoString).
    return repr(float(bound))


def exposed_names(registry: CollectorRegistry | None = None) -> set[str]:
    """Every sample name the exporter can serve (e.g. `xfrm_fastpath_packets_total`,
    `xfrm_fastpath_learn_latency_seconds_bucket`), independent of traffic."""
    fams = list(registry.collect()) if registry is not None else render(MetricsSnapshot())
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "info": ("_info",),
        "gauge": ("",),
    }
    return {f"{fam.name}{s}" for fam in fams for s in suffixes.get(fam.type, ("",))}


class SnapshotCollector(Collector):
    """A prometheus-client collector that renders whatever the provider returns, at each scrape.

    A provider that raises makes the scrape fail (HTTP 500): Prometheus then records `up == 0`
    for the target, which is what the controller-down alert watches. Serving stale figures
    instead would hide a dead controller."""

    def __init__(self, provider: Callable[[], MetricsSnapshot]) -> None:
        self._provider = provider

    def collect(self) -> Iterator[Metric]:
        yield from render(self._provider())

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering does not call the provider.
        yield from render(MetricsSnapshot())


# --------------------------------------------------------------------------------------------
# The exporter
# --------------------------------------------------------------------------------------------
class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Exporter:
    """Serves the provider's snapshots on http://HOST:PORT/metrics (Prometheus text format) and
    /status.json (`snapshot_to_json`, for `xfrm-fastpath status`).

        exporter = Exporter(cfg.metrics_host, cfg.metrics_port, source.snapshot)
        exporter.start()       # returns once listening; port 0 picks a free port (.port)
        ...
        exporter.stop()
    """

    def __init__(self, host: str, port: int, provider: Callable[[], MetricsSnapshot]) -> None:
        self.host = host
        self.port = port
        self.provider = provider
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(SnapshotCollector(provider))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def _app(self) -> Callable[..., Any]:
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if environ.get("PATH_INFO") == "/status.json":
                try:
                    body = snapshot_to_json(self.provider()).encode()
                except Exception as exc:
                    start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
                    return [f"snapshot failed: {exc}\n".encode()]
                start_response(
                    "200 OK",
                    [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
                )
                return [body]
            return metrics_app(environ, start_response)

        return app

    def start(self) -> None:
        if self._server is not None:
            return
        server_class = _ThreadingWSGIServer
        if ":" in self.host:
            server_class = type(
                "_V6Server", (_ThreadingWSGIServer,), {"address_family": socket.AF_INET6}
            )
        self._server = make_server(
            self.host, self.port, self._app(), server_class, handler_class=_QuietHandler
        )
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-exporter",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> Exporter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# The daemon's side: one MetricsSource, whose `snapshot` is the exporter's provider
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# JSON and the terminal table
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


def fetch_snapshot(address: str, timeout: float = 3.0) -> MetricsSnapshot:
    """Read the running controller's snapshot from its exporter (HOST:PORT), for
    `xfrm-fastpath status`."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{port}/status.json", timeout=timeout) as r:
        return snapshot_from_json(r.read().decode())


def _si(n: float) -> str:
    """1234567 -> '1.23M' (status table: fixed width, readable at a glance)."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1e3:.2f} ms"


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        # First column left-aligned (names), the others right-aligned (figures).
        out = [cells[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)
        ]
        return (indent + "  ".join(out)).rstrip()

    return [line(headers)] + [line(r) for r in rows]


def format_status(snap: MetricsSnapshot, now: float | None = None) -> str:
    """The snapshot as a terminal report: the figures the dashboard shows, since start."""
    now = time.time() if now is None else now
    out: list[str] = []
    state = "up" if snap.up else "DOWN"
    if snap.last_netlink_event:
        nl = f"last netlink event {max(0.0, now - snap.last_netlink_event):.1f} s ago"
    else:
        nl = "no netlink event yet"
    version = snap.build_info.get("version", "?")
    out.append(
        f"xfrm-fastpath {version}: controller {state}, "
        f"{snap.bpf_programs_attached} BPF programs attached, {nl}"
    )

    out.append("")
    out.append("Hit rate (fastpath / (fastpath + kernel), packets since start)")
    rows = []
    for d in snap.directions():
        ratio = snap.hit_ratio(d)
        rows.append(
            [
                d,
                _si(snap.fastpath_packets_by_direction(d)),
                _si(snap.kernel_packets_by_direction(d)),
                "-" if ratio is None else f"{ratio * 100:.1f} %",
            ]
        )
    out += _table(["direction", "fastpath", "kernel", "hit rate"], rows)

    out.append("")
    out.append("Fastpath")
    rows = [
        [f"{i} {d}", _si(v), _bytes(snap.fastpath_bytes.get((i, d), 0))]
        for (i, d), v in sorted(snap.fastpath_packets.items())
    ]
    out += _table(["interface", "packets", "bytes"], rows)

    out.append("")
    out.append("Handed to the kernel")
    rows = [
        [f"{d} {r}", _si(v), _bytes(snap.kernel_bytes.get((d, r), 0))]
        for (d, r), v in sorted(snap.kernel_packets.items())
        if v
    ]
    out += _table(["reason", "packets", "bytes"], rows) if rows else ["  none"]

    out.append("")
    out.append("Dropped")
    rows = [[f"{d} {r}", _si(v)] for (d, r), v in sorted(snap.drops.items()) if v]
    out += _table(["reason", "packets"], rows) if rows else ["  none"]

    out.append("")
    out.append(f"SAs on the fastpath: {len(snap.sas)}")
    rows = [
        [sa.spi, str(sa.reqid), sa.direction, _si(sa.packets), _bytes(sa.bytes), str(sa.sequence)]
        for sa in sorted(snap.sas, key=lambda s: (s.direction != "encap", s.spi))
    ]
    if rows:
        out += _table(["spi", "reqid", "direction", "packets", "bytes", "sequence"], rows)

    out.append("")
    use = snap.flow_entries / snap.flow_capacity * 100 if snap.flow_capacity else 0.0
    out.append(
        f"Flow table: {snap.flow_entries} / {snap.flow_capacity} entries ({use:.1f} %), "
        f"{snap.flow_evictions} evictions"
    )
    h = snap.learn_latency
    out.append(
        f"Learning: {snap.learn_events} flows learned; latency p50 {_ms(h.quantile(0.5))}, "
        f"p90 {_ms(h.quantile(0.9))}, p99 {_ms(h.quantile(0.99))} ({h.count} observed)"
    )
    rej = ", ".join(f"{r} {v}" for r, v in sorted(snap.validation_rejections.items()) if v)
    out.append(f"Validation rejections: {rej or 'none'}")
    inv = ", ".join(f"{c} {v}" for c, v in sorted(snap.invalidations.items()) if v)
    out.append(f"Invalidations: {inv or 'none'}")
    return "\n".join(out) + "\n"


__all__ = [
    "LEARN_LATENCY_BUCKETS",
    "Cause",
    "DatapathParts",
    "Exporter",
    "HistogramData",
    "LatencyHistogram",
    "MetricsSnapshot",
    "MetricsSource",
    "MonotonicCounters",
    "SaCounters",
    "SaReading",
    "datapath_parts",
    "default_build_info",
    "direction_label",
    "exposed_names",
    "fetch_snapshot",
    "format_status",
    "read_datapath_sas",
    "reason_kind",
    "reason_label",
    "reason_labels",
    "render",
    "snapshot_from_datapath",
    "snapshot_from_json",
    "snapshot_to_json",
    "spi_label",
    "sum_percpu",
    "sum_percpu_stats",
]
