# SPDX-License-Identifier: GPL-2.0-only
"""Prometheus exposition of `MetricsSnapshot`s: the metric families, a collector and the HTTP
exporter. It only reads: no counter of its own, so two scrapes of one snapshot give the same
figures, and a snapshot it never saw loses nothing.

Naming follows https://prometheus.io/docs/practices/naming/: every metric starts with
`xfrm_fastpath_`, counters end in `_total`, units are base units (bytes, seconds). Labels are
bounded: interface, direction, reason, cause, spi, reqid, backend; never a per-flow label (a
gateway can carry millions of flows; one series each would take the Prometheus server down).
dashboards/ uses these names only (tests/host/test_prometheus.py checks it).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
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

from controller.telemetry.snapshot import MetricsSnapshot, snapshot_to_json

PREFIX = "xfrm_fastpath"


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
    return [*_datapath_families(snap), *_sa_families(snap), *_controller_families(snap)]


def _datapath_families(snap: MetricsSnapshot) -> list[Metric]:
    """What the XDP programs did with packets: carried, handed to the kernel, dropped."""
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

    return [fp_pkts, fp_bytes, k_pkts, k_bytes, drops]


def _sa_families(snap: MetricsSnapshot) -> list[Metric]:
    """One series per offloaded SA (SAs are few: two per tunnel, plus rekeys in flight), with
    the crypto backend that seals or opens it (`backend`: "bpf" or "kernel", from its datapath
    entry); and one per SA of the kernel's, offloaded or not, saying why."""
    sa_labels = ["spi", "reqid", "direction", "backend"]
    sa_pkts = _counter("sa_packets", "Packets the fastpath carried on an SA.", sa_labels)
    sa_bytes = _counter("sa_bytes", "Bytes the fastpath carried on an SA.", sa_labels)
    sa_seq = _gauge(
        "sa_sequence",
        "ESP sequence number used on an SA: last sent (encap), highest accepted (decap).",
        sa_labels,
    )
    for sa in sorted(snap.sas, key=lambda s: (s.direction, s.spi)):
        lv = [sa.spi, str(sa.reqid), sa.direction, sa.backend]
        sa_pkts.add_metric(lv, sa.packets)
        sa_bytes.add_metric(lv, sa.bytes)
        sa_seq.add_metric(lv, sa.sequence)

    # `reason` is the controller's sentence (`xfrm-fastpath sas` prints the same): a handful
    # of values per SA over its life (waiting for traffic, offloaded, or why not).
    offloaded = _gauge(
        "sa_offloaded",
        "1 when the fastpath carries the kernel's SA, 0 when it stays on the kernel path; "
        "backend: who seals and opens it (bpf, kernel) or none; reason: why (not).",
        ["spi", "reqid", "direction", "backend", "reason"],
    )
    for st in sorted(snap.sa_states, key=lambda s: (s.spi, s.reqid, s.direction)):
        offloaded.add_metric(
            [st.spi, str(st.reqid), st.direction, st.backend, st.reason], int(st.offloaded)
        )

    return [sa_pkts, sa_bytes, sa_seq, offloaded]


def _controller_families(snap: MetricsSnapshot) -> list[Metric]:
    """The flow table, learning and the controller's health."""
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
