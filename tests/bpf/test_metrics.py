# SPDX-License-Identifier: GPL-2.0-only
"""Metrics: counter semantics (per-CPU sums from a real BPF map, counters that never go
backwards), label values derived from the datapath's reason enum, the exporter over HTTP, the
status table and its JSON.

The per-CPU counters are the datapath's own: the map comes from bpf/include/maps.h, the layout
and the reasons from bpf/include/xfp_defs.h. A small XDP program (`CountingDatapath`) counts
under the (direction, reason) written in the packet, as the XDP programs count, and
BPF_PROG_TEST_RUN runs it on a chosen CPU.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import math
import os
import random
import re
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.core.crypto import Backend
from controller.core.state import Cause, Direction, FlowKey, FlowRecord, FlowState, SaRef
from controller.datapath import abi
from controller.datapath.bpfsys import prog_test_run
from controller.telemetry.collect import (
    LatencyHistogram,
    MetricsSource,
    MonotonicCounters,
    SaReading,
    snapshot_from_datapath,
)
from controller.telemetry.exposition import Exporter, exposed_names, render
from controller.telemetry.labels import (
    backend_label,
    direction_label,
    reason_kind,
    reason_labels,
    spi_label,
)
from controller.telemetry.snapshot import (
    LEARN_LATENCY_BUCKETS,
    HistogramData,
    MetricsSnapshot,
    SaCounters,
    SaState,
    snapshot_from_json,
    snapshot_to_json,
)
from controller.telemetry.status_text import format_status

ROOT = Path(__file__).resolve().parents[2]
INCLUDE = ROOT / "bpf" / "include"
HEADER = INCLUDE / "xfp_defs.h"

# Label names the exporter may use. No flow identity (address, port, protocol) among them.
BOUNDED_LABELS = {"interface", "direction", "reason", "cause", "spi", "reqid", "backend", "le"}
BUILD_INFO_LABELS = {"version", "kernel", "python", "bcc"}


# --------------------------------------------------------------------------------------------
# The datapath's enums: controller/datapath/abi.py when it exists, else read from the C header
# itself (the header is the single source; this is not a second list).
# --------------------------------------------------------------------------------------------
def header_enum(name: str, path: Path = HEADER) -> dict[str, int]:
    text = path.read_text()
    m = re.search(rf"enum\s+{name}\s*\{{(.*?)\}};", text, re.S)
    assert m, f"enum {name} not found in {path}"
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    members = dict((k, int(v)) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body))
    assert members, f"enum {name} in {path} has no members with explicit values"
    return members


def reason_enum() -> type[enum.IntEnum]:
    members = header_enum("xfp_reason")
    try:
        from controller.datapath import abi as defs  # type: ignore[attr-defined]
    except ImportError:
        defs = None
    if defs is not None:
        for obj in vars(defs).values():
            if isinstance(obj, type) and issubclass(obj, enum.IntEnum):
                values = {m.value for m in obj}
                if values == set(members.values()) and len(obj) == len(members):
                    return obj
    return enum.IntEnum("XfpReason", members)  # type: ignore[return-value]


REASONS = reason_enum()
R_MAX = header_enum("xfp_reason")["XFP_R_MAX"]
DIR_MAX = header_enum("xfp_dir")["XFP_DIR_MAX"]


def member(kind: str, label: str) -> enum.IntEnum:
    """The enum member of a kind and label, e.g. member("drop", "replay")."""
    for r in REASONS:
        if reason_kind(r) == (kind, label):
            return r
    raise AssertionError(f"no {kind} reason {label!r} in {HEADER}")


# --------------------------------------------------------------------------------------------
# A real per-CPU counter map, moved by a real XDP program
# --------------------------------------------------------------------------------------------
COUNT_PROG = r"""
#include <uapi/linux/bpf.h>
#include "maps.h"

/* Index as documented in xfp_defs.h ("indexed by dir * XFP_R_MAX + reason"), the bump maps.h's
 * xfp_stat_add(): as bpf/xdp_encap.c and bpf/xdp_decap.c count. */
static __always_inline void count(__u32 dir, __u32 reason, __u32 len)
{
	__u32 idx = dir * XFP_R_MAX + reason;

	xfp_stat_add(xfp_stats.lookup(&idx), len);
}

/* Count the frame under the (dir, reason) its first 8 bytes name; XDP_PASS. Frames with an
 * out-of-range pair are aborted, uncounted. */
int xfp_count_test(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 *w = data;

	if ((void *)(w + 2) > data_end)
		return XDP_ABORTED;
	__u32 dir = w[0], reason = w[1];
	if (dir >= XFP_DIR_MAX || reason >= XFP_R_MAX)
		return XDP_ABORTED;
	count(dir, reason, (__u32)(data_end - data));
	return XDP_PASS;
}
"""

XDP_PASS = 2


class CountingDatapath:
    """bpf/include/maps.h's maps (pinned under a private bpffs directory) and a program that
    counts into xfp_stats the way the XDP programs do."""

    def __init__(self) -> None:
        from controller.datapath.loader import Prog, compile_bpf, load_program

        self.pin_dir = Path(f"/sys/fs/bpf/xfp-metrics-test-{os.getpid()}-{id(self):x}")
        self.pin_dir.mkdir()
        try:
            self.bpf = compile_bpf(text=COUNT_PROG, cflags=["-w"], pin_dir=self.pin_dir)
            self.fn = load_program(self.bpf, "xfp_count_test", Prog.XDP)
            self.stats = self.bpf[b"xfp_stats"]
        except BaseException:
            self.close()
            raise

    def send(self, direction: int, reason: int, n: int, size: int = 64, cpu: int | None = None):
        """Run n frames of `size` bytes through the program (on `cpu` when given)."""
        frame = struct.pack("<II", int(direction), int(reason)).ljust(size, b"\0")
        old = os.sched_getaffinity(0)
        try:
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
            retval, _, _ = prog_test_run(self.fn, frame, repeat=n)
        finally:
            os.sched_setaffinity(0, old)
        assert retval == XDP_PASS, f"counting program returned {retval} for ({direction}, {reason})"

    def summed(self) -> dict[tuple[Direction, enum.IntEnum], tuple[int, int]]:
        """(direction, reason) -> (packets, bytes) summed over the CPUs, the shape of
        `Datapath.stats()` (controller/datapath/xdp.py), read from this test's own map."""
        out = {}
        for d in Direction:
            for r in REASONS:
                if reason_kind(r)[0] == "none":
                    continue
                per_cpu = self.stats[self.stats.Key(int(d) * R_MAX + int(r))]
                out[(d, r)] = (sum(v.packets for v in per_cpu), sum(v.bytes for v in per_cpu))
        return out

    def per_cpu(self, index: int) -> list[int]:
        return [v.packets for v in self.stats[self.stats.Key(index)]]

    def reset(self) -> None:
        """What a datapath reload does to the counters: new maps, all zero."""
        zero = self.stats.Leaf()
        for i in range(DIR_MAX * R_MAX):
            self.stats[self.stats.Key(i)] = zero

    def close(self) -> None:
        bpf = getattr(self, "bpf", None)
        if bpf is not None:
            bpf.cleanup()
        if self.pin_dir.exists():
            for p in self.pin_dir.iterdir():
                p.unlink()
            self.pin_dir.rmdir()


@contextlib.contextmanager
def counting_datapath() -> Iterator[CountingDatapath]:
    dp = CountingDatapath()
    try:
        yield dp
    finally:
        dp.close()


@pytest.fixture(scope="module")
def dp() -> Iterator[CountingDatapath]:
    with counting_datapath() as d:
        yield d


IFACES = {Direction.ENCAP: ["lan"], Direction.DECAP: ["wan"]}


def parts_of(dp: CountingDatapath, sas=()):
    return snapshot_from_datapath(dp.summed(), IFACES, sas, REASONS)


# --------------------------------------------------------------------------------------------
# Per-CPU sums
# --------------------------------------------------------------------------------------------
def test_percpu_counters_are_summed_over_cpus(dp: CountingDatapath) -> None:
    ncpu = len(dp.per_cpu(0))
    cpus = sorted(os.sched_getaffinity(0))
    replay = member("drop", "replay")
    index = int(Direction.DECAP) * R_MAX + int(replay)
    before = dp.summed()[(Direction.DECAP, replay)]
    sent = {}
    for i, cpu in enumerate(cpus[:2]):
        sent[cpu] = 3 + 4 * i
        dp.send(Direction.DECAP, replay, sent[cpu], size=100, cpu=cpu)
    per_cpu = dp.per_cpu(index)
    assert len(per_cpu) == ncpu, f"one value per possible CPU: {per_cpu}"
    if len(cpus) >= 2:
        assert all(per_cpu[c] >= sent[c] for c in sent), (
            f"each CPU counted its own frames in its own slot: sent {sent}, map {per_cpu}"
        )
    after = dp.summed()[(Direction.DECAP, replay)]
    total = sum(sent.values())
    assert after == (before[0] + total, before[1] + 100 * total), (
        f"summed (packets, bytes) grew by exactly what was sent: {before} -> {after}, sent {total}"
    )
    assert sum(per_cpu) == after[0], f"the sum is the sum of the CPUs: {per_cpu} vs {after}"


def test_labels_come_from_the_reason_enum(dp: CountingDatapath) -> None:
    parts = parts_of(dp)
    for d in Direction:
        dl = direction_label(d)
        assert [r for (x, r) in parts.kernel_packets if x == dl] == reason_labels(
            REASONS, "kernel"
        ), f"every PASS_* reason exported for {dl}, in enum order, zero or not"
        assert [r for (x, r) in parts.drops if x == dl] == reason_labels(REASONS, "drop"), (
            f"every DROP_* reason exported for {dl}"
        )
    names = {r.name for r in REASONS}
    assert len(reason_labels(REASONS, "kernel")) == sum("PASS_" in n for n in names), (
        "one kernel label per PASS_ member"
    )
    assert "replay" in reason_labels(REASONS, "drop") and "bad_icv" in reason_labels(
        REASONS, "drop"
    ), "the alert rules select reason=~'replay|bad_icv': both must exist in the enum"
    assert "kcrypto" in reason_labels(REASONS, "kernel"), (
        "kernel-crypto refusals (XFP_R_PASS_KCRYPTO) are exported: the dashboard and the "
        "recording rule select reason='kcrypto'"
    )
    assert set(parts.fastpath_packets) == {("lan", "encap"), ("wan", "decap")}, (
        f"fastpath series per (interface, direction): {set(parts.fastpath_packets)}"
    )
    with pytest.raises(ValueError, match="neither"):
        reason_kind("XFP_R_SOMETHING_NEW")


def test_counts_land_under_their_direction_and_reason(dp: CountingDatapath) -> None:
    before = parts_of(dp)
    plan = [
        (Direction.ENCAP, member("fastpath", "encap"), 11, 200),
        (Direction.DECAP, member("fastpath", "decap"), 13, 300),
        (Direction.ENCAP, member("kernel", "unknown_flow"), 5, 90),
        (Direction.DECAP, member("kernel", "unknown_spi"), 2, 120),
        (Direction.DECAP, member("drop", "bad_icv"), 3, 150),
    ]
    for d, r, n, size in plan:
        dp.send(d, r, n, size=size)
    after = parts_of(dp)

    def delta(field: str, key: tuple[str, str]) -> int:
        return getattr(after, field)[key] - getattr(before, field)[key]

    assert delta("fastpath_packets", ("lan", "encap")) == 11, "encap hits counted on lan"
    assert delta("fastpath_bytes", ("lan", "encap")) == 11 * 200, "encap hit bytes"
    assert delta("fastpath_packets", ("wan", "decap")) == 13, "decap hits counted on wan"
    assert delta("kernel_packets", ("encap", "unknown_flow")) == 5, "encap punts by reason"
    assert delta("kernel_bytes", ("encap", "unknown_flow")) == 5 * 90, "punt bytes"
    assert delta("kernel_packets", ("decap", "unknown_spi")) == 2, "decap punts by reason"
    assert delta("drops", ("decap", "bad_icv")) == 3, "ICV drops"
    moved = {
        (f, k)
        for f in ("fastpath_packets", "kernel_packets", "drops")
        for k in getattr(after, f)
        if delta(f, k)
    }
    assert moved == {
        ("fastpath_packets", ("lan", "encap")),
        ("fastpath_packets", ("wan", "decap")),
        ("kernel_packets", ("encap", "unknown_flow")),
        ("kernel_packets", ("decap", "unknown_spi")),
        ("drops", ("decap", "bad_icv")),
    }, f"nothing else moved: {moved}"


# --------------------------------------------------------------------------------------------
# Counters never go backwards
# --------------------------------------------------------------------------------------------
def counter_values(s: MetricsSnapshot) -> dict[tuple, int]:
    out: dict[tuple, int] = {}
    for name in ("fastpath_packets", "fastpath_bytes", "kernel_packets", "kernel_bytes", "drops"):
        for k, v in getattr(s, name).items():
            out[(name, k)] = v
    for sa in s.sas:
        out[("sa_packets", sa.spi, sa.direction)] = sa.packets
        out[("sa_bytes", sa.spi, sa.direction)] = sa.bytes
    for c, v in s.invalidations.items():
        out[("invalidations", c)] = v
    for r, v in s.validation_rejections.items():
        out[("rejections", r)] = v
    out[("evictions",)] = s.flow_evictions
    out[("learn",)] = s.learn_events
    out[("latency_count",)] = s.learn_latency.count
    return out


def test_counters_never_go_backwards_across_snapshots(dp: CountingDatapath) -> None:
    rng = random.Random(6)
    flows = FlowState(capacity=64)
    sa_pkts = [0]

    def sas() -> list[SaReading]:
        return [SaReading(0xC001, 7, Direction.ENCAP, sa_pkts[0], 100 * sa_pkts[0], sa_pkts[0])]

    source = MetricsSource(
        flows=flows,
        datapath=lambda: snapshot_from_datapath(dp.summed(), IFACES, sas(), REASONS),
        build_info={"version": "test"},
    )
    hit = member("fastpath", "encap")
    snaps = [source.snapshot()]
    for step in range(12):
        dp.send(Direction.ENCAP, hit, rng.randint(1, 20))
        sa_pkts[0] += rng.randint(0, 5)
        if step == 5:
            dp.reset()  # a datapath reload: the maps come back at zero
            sa_pkts[0] = 1  # and the SA entry is rewritten with fresh counters
        if step % 3 == 0:
            source.reject("no_policy")
        source.observe_learn_latency(rng.uniform(0.0001, 0.5))
        snaps.append(source.snapshot())
    for prev, cur in itertools.pairwise(snaps):
        pv, cv = counter_values(prev), counter_values(cur)
        for k, v in pv.items():
            assert cv.get(k, v) >= v, f"counter {k} went backwards: {v} -> {cv.get(k)}"
    first, last = counter_values(snaps[0]), counter_values(snaps[-1])
    assert (
        last[("fastpath_packets", ("lan", "encap"))] > first[("fastpath_packets", ("lan", "encap"))]
    ), "the counter moved across the reload"
    assert last[("latency_count",)] == 12, "every latency observation counted once"


def test_monotonic_counters_absorb_resets() -> None:
    m = MonotonicCounters()
    got = [m.update("k", v) for v in (10, 20, 5, 7, 7, 0, 3)]
    assert got == [10, 20, 25, 27, 27, 27, 30], f"resets carried as offsets: {got}"
    rng = random.Random(1)
    raw, prev = 0, 0
    for _ in range(1000):
        raw = 0 if rng.random() < 0.05 else raw + rng.randint(0, 9)
        v = m.update("r", raw)
        assert v >= prev, f"never backwards: {prev} -> {v} (raw {raw})"
        prev = v
    with pytest.raises(ValueError):
        m.update("k", -1)


# --------------------------------------------------------------------------------------------
# Histogram
# --------------------------------------------------------------------------------------------
def test_latency_histogram_buckets_and_quantiles() -> None:
    h = LatencyHistogram()
    assert h.data().quantile(0.5) is None, "no quantile without observations"
    for v in (0.0001, 0.0003, 0.0004, 0.002, 2.0):
        h.observe(v)
    d = h.data()
    cum = dict(zip(d.bounds, d.counts, strict=True))
    assert cum[0.0001] == 1, f"an observation on a bound is in that bound's bucket (le): {cum}"
    assert cum[0.0005] == 3, f"cumulative counts: {cum}"
    assert cum[1.0] == 4 and d.count == 5, f"the +Inf bucket holds 2.0 s: {cum}, count {d.count}"
    assert math.isclose(d.sum, 2.0028), f"sum of observations: {d.sum}"
    # histogram_quantile(0.5): rank 2.5 falls in (0.00025, 0.0005] holding ranks 1..3 -> linear.
    assert math.isclose(d.quantile(0.5), 0.00025 + 0.00025 * (2.5 - 1) / 2), d.quantile(0.5)
    assert d.quantile(0.99) == LEARN_LATENCY_BUCKETS[-1], "+Inf bucket: the last finite bound"
    assert LEARN_LATENCY_BUCKETS[0] <= 0.0001 and LEARN_LATENCY_BUCKETS[-1] >= 1.0, (
        "buckets span 0.1 ms .. 1 s"
    )
    with pytest.raises(ValueError):
        h.observe(-1.0)


# --------------------------------------------------------------------------------------------
# Snapshot from the controller's state
# --------------------------------------------------------------------------------------------
def record(i: int, spi: int = 0xC001) -> FlowRecord:
    key = FlowKey(3, Direction.ENCAP, "10.1.0.2", "10.2.0.2", 17, 1000 + i, 53)
    return FlowRecord(key, SaRef("192.0.2.2", spi, 7), 4, "02:00:00:00:00:01",
                      "02:00:00:00:00:02", 1, (4, "192.0.2.2"), seen_ns=1_000_000,
                      installed_ns=1_000_000 + 400_000 * (i + 1))  # fmt: skip


def test_source_reads_flow_state_and_health() -> None:
    flows = FlowState(capacity=100)
    source = MetricsSource(flows=flows, build_info={"version": "t"})
    for i in range(5):
        rec = record(i)
        flows.add(rec)
        source.observe_learn_latency(rec.learn_latency_s)
    flows.remove(flows.flows_of_spi(0xC001) - {record(0).key}, Cause.SA_REKEYED)
    source.reject("unsupported_algorithm", 2)
    source.netlink_event(1234.5)
    source.set_health(up=True, bpf_programs_attached=2)
    s = source.snapshot()
    assert (s.flow_entries, s.flow_capacity, s.learn_events) == (1, 100, 5), (
        f"entries, capacity, learned: {(s.flow_entries, s.flow_capacity, s.learn_events)}"
    )
    assert set(s.invalidations) == {c.value for c in Cause}, "every cause exported, zero or not"
    assert s.invalidations["sa_rekeyed"] == 4, f"invalidations by cause: {s.invalidations}"
    assert s.validation_rejections == {"unsupported_algorithm": 2}, s.validation_rejections
    assert len(s.learn_latency_s) == 5 and s.learn_latency.count == 5, "latencies observed"
    assert math.isclose(max(s.learn_latency_s), 0.002), f"ns -> s: {s.learn_latency_s}"
    assert (s.up, s.bpf_programs_attached, s.last_netlink_event) == (True, 2, 1234.5), "health"
    s2 = source.snapshot()
    assert s2.learn_latency_s == () and s2.learn_latency.count == 5, (
        "observations are reported once as new, and stay in the cumulative histogram"
    )


# --------------------------------------------------------------------------------------------
# Rendering, HTTP, JSON, status
# --------------------------------------------------------------------------------------------
def full_snapshot(dp: CountingDatapath | None = None) -> MetricsSnapshot:
    h = LatencyHistogram()
    for v in (0.0002, 0.0009, 0.004, 0.03):
        h.observe(v)
    parts = (
        parts_of(dp, [SaReading(0xC001, 7, Direction.ENCAP, 40, 4000, 41)])
        if dp
        else snapshot_from_datapath({}, IFACES, [], REASONS)
    )
    return MetricsSnapshot(
        timestamp=1000.0,
        fastpath_packets={("lan", "encap"): 900, ("wan", "decap"): 800},
        fastpath_bytes={("lan", "encap"): 90000, ("wan", "decap"): 80000},
        kernel_packets={**parts.kernel_packets, ("encap", "unknown_flow"): 100},
        kernel_bytes=parts.kernel_bytes,
        drops={**parts.drops, ("decap", "replay"): 3},
        sas=(
            SaCounters(spi_label(0xC001), 7, "encap", 40, 4000, 41),
            SaCounters(spi_label(0xC002), 7, "decap", 30, 3000, 30, backend="kernel"),
        ),
        sa_states=(
            SaState(spi_label(0xC001), 7, "encap", True, "bpf", "BPF AEAD"),
            SaState(spi_label(0xC002), 7, "decap", True, "kernel", "kernel crypto (xfp_crypto)"),
            SaState(spi_label(0xC005), 9, "none", False, "none", "AES-GCM needs the module"),
        ),
        flow_entries=12,
        flow_capacity=65536,
        flow_evictions=1,
        learn_events=14,
        validation_rejections={"no_policy": 2},
        invalidations={c.value: 0 for c in Cause} | {"idle": 2},
        learn_latency_s=(0.0002,),
        learn_latency=h.data(),
        up=True,
        bpf_programs_attached=2,
        last_netlink_event=990.0,
        build_info={"version": "0.1.0", "kernel": "6.18", "python": "3.11", "bcc": "0.26.0"},
    )


def parse_exposition(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def test_exporter_serves_names_units_and_bounded_labels() -> None:
    snap = full_snapshot()
    with Exporter("127.0.0.1", 0, lambda: snap) as exp:
        assert exp.port > 0, "port 0 picks a free port"
        with urllib.request.urlopen(f"{exp.url}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = parse_exposition(text)
        assert set(samples) <= exposed_names(exp.registry), (
            f"served names are the registry's: {set(samples) - exposed_names(exp.registry)}"
        )
        for name, ss in samples.items():
            assert name.startswith("xfrm_fastpath_"), f"prefix: {name}"
            for s in ss:
                allowed = BUILD_INFO_LABELS if name.endswith("_build_info") else BOUNDED_LABELS
                assert set(s.labels) <= allowed, f"{name} has unbounded labels {s.labels}"
        assert samples["xfrm_fastpath_packets_total"][0].value in (800, 900), "counter value"
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        for fam in fams.values():
            if fam.type == "counter":
                assert all(s.name.endswith("_total") for s in fam.samples), f"{fam.name}: _total"
        lat = fams["xfrm_fastpath_learn_latency_seconds"]
        assert lat.type == "histogram", "learn latency is a real histogram"
        inf = [s for s in lat.samples if s.labels.get("le") == "+Inf"]
        assert inf and inf[0].value == 4, f"+Inf bucket = count: {inf}"
        seq = samples["xfrm_fastpath_sa_sequence"]
        assert {s.labels["spi"] for s in seq} == {"0x0000c001", "0x0000c002"}, "spi as hex"
        backends = {s.labels["spi"]: s.labels["backend"] for s in seq}
        assert backends == {"0x0000c001": "bpf", "0x0000c002": "kernel"}, "per-SA backend"
        offl = {s.labels["spi"]: s for s in samples["xfrm_fastpath_sa_offloaded"]}
        assert set(offl) == {"0x0000c001", "0x0000c002", "0x0000c005"}, "every kernel SA"
        gcm = offl["0x0000c005"]
        assert (gcm.value, gcm.labels["backend"], gcm.labels["direction"]) == (0, "none", "none")
        assert gcm.labels["reason"] == "AES-GCM needs the module", f"and why not: {gcm}"
        assert offl["0x0000c002"].value == 1 and offl["0x0000c002"].labels["backend"] == "kernel"
        # The JSON view the status command reads.
        with urllib.request.urlopen(f"{exp.url}/status.json", timeout=5) as r:
            got = snapshot_from_json(r.read().decode())
        assert got == snap, "status.json round-trips the snapshot"


def test_exported_names_do_not_depend_on_traffic() -> None:
    empty = exposed_names(None)
    registry_names = {
        f"{f.name}{suffix}"
        for f in render(full_snapshot())
        for suffix in {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                       "info": ["_info"]}.get(f.type, [""])
    }  # fmt: skip
    assert empty == registry_names, "every family is rendered even for an empty snapshot"
    expected = {
        "xfrm_fastpath_packets_total",
        "xfrm_fastpath_bytes_total",
        "xfrm_fastpath_kernel_packets_total",
        "xfrm_fastpath_drops_total",
        "xfrm_fastpath_sa_packets_total",
        "xfrm_fastpath_sa_bytes_total",
        "xfrm_fastpath_sa_sequence",
        "xfrm_fastpath_sa_offloaded",
        "xfrm_fastpath_flow_table_entries",
        "xfrm_fastpath_flow_table_capacity",
        "xfrm_fastpath_flow_table_evictions_total",
        "xfrm_fastpath_learn_events_total",
        "xfrm_fastpath_validation_rejections_total",
        "xfrm_fastpath_invalidations_total",
        "xfrm_fastpath_learn_latency_seconds_bucket",
        "xfrm_fastpath_up",
        "xfrm_fastpath_bpf_programs_attached",
        "xfrm_fastpath_last_netlink_event_timestamp_seconds",
        "xfrm_fastpath_build_info",
    }
    assert expected <= empty, f"issue 6's figures are all exported: missing {expected - empty}"


def test_failing_provider_fails_the_scrape() -> None:
    def broken() -> MetricsSnapshot:
        raise RuntimeError("datapath maps unreadable")

    with Exporter("127.0.0.1", 0, broken) as exp:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{exp.url}/metrics", timeout=5)
        assert err.value.code == 500, "Prometheus must see the scrape fail (up == 0)"


def test_status_table_and_json() -> None:
    snap = full_snapshot()
    text = format_status(snap, now=1000.0)
    assert "controller up, 2 BPF programs attached, last netlink event 10.0 s ago" in text, text
    assert re.search(r"encap\s+900\s+100\s+90\.0 %", text), f"encap hit rate row:\n{text}"
    assert re.search(r"decap\s+800\s+0\s+100\.0 %", text), f"decap hit rate row:\n{text}"
    assert "0x0000c001" in text and "0x0000c002" in text, "per-SA rows"
    assert re.search(r"0x0000c002\s+7\s+decap\s+kernel\s", text), f"SA backend:\n{text}"
    assert re.search(r"0x0000c001\s+7\s+encap\s+bpf\s", text), f"SA backend:\n{text}"
    assert "SAs on the kernel path: 1" in text, f"SAs not offloaded counted:\n{text}"
    assert "0x0000c005 reqid 9: AES-GCM needs the module" in text, f"and why:\n{text}"
    assert "Flow table: 12 / 65536 entries" in text, "flow table line"
    assert "replay" in text and "unknown_flow" in text, "drops and punts by reason"
    assert "idle 2" in text and "no_policy 2" in text, "invalidations and rejections"
    assert "p50 " in text and "(4 observed)" in text, "learn latency percentiles"
    assert snapshot_from_json(snapshot_to_json(snap)) == snap, "JSON round trip"
    down = format_status(MetricsSnapshot(), now=0.0)
    assert "controller DOWN" in down and "no netlink event yet" in down, down


def test_status_hit_ratio_matches_counts() -> None:
    snap = full_snapshot()
    assert snap.hit_ratio("encap") == 0.9, "900 / (900 + 100)"
    assert snap.hit_ratio("decap") == 1.0, "no decap punts"
    assert MetricsSnapshot().hit_ratio("encap") is None, "no traffic, no ratio"


def test_backend_label_from_the_entry_flags() -> None:
    """The per-SA `backend` label comes from the SA entry's XFP_SA_F_KCRYPTO flag (what the
    datapath will do, not what the controller meant), and from the Backend enum's values."""
    assert backend_label(abi.SA_F_OFFLOAD) == "bpf", "no KCRYPTO flag: the BPF AEAD"
    assert backend_label(abi.SA_F_OFFLOAD | abi.SA_F_KCRYPTO) == "kernel", "the module"
    assert [backend_label(b) for b in Backend] == [b.value for b in Backend], "enum values"
    assert backend_label(None) == "none", "no backend can serve it"
    readings = [
        SaReading(0xC001, 7, Direction.ENCAP, 1, 100, 1, abi.SA_F_OFFLOAD),
        SaReading(0xC002, 7, Direction.DECAP, 2, 200, 2, abi.SA_F_OFFLOAD | abi.SA_F_KCRYPTO),
    ]
    parts = snapshot_from_datapath({}, IFACES, readings, REASONS)
    assert [(sa.spi, sa.backend) for sa in parts.sas] == [
        ("0x0000c001", "bpf"),
        ("0x0000c002", "kernel"),
    ], f"backend per SA reading: {parts.sas}"


def test_histogram_data_is_prometheus_cumulative() -> None:
    d = HistogramData()
    assert len(d.counts) == len(d.bounds) == len(LEARN_LATENCY_BUCKETS), "one count per bound"
