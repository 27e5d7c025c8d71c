# SPDX-License-Identifier: GPL-2.0-only
"""Which crypto backend each SA uses, and why, everywhere an operator looks (issue 17): the
`sas` rows of the status, the metrics snapshot the agent takes at each tick, and the
Prometheus exposition scraped over HTTP from a running exporter. The agent runs in-process on
the XFRM model and the in-memory maps (tests/lib, as tests/unit/test_agent_crypto.py); the
metrics are read from those maps' SA entries by controller/telemetry's own reader, so the
`backend` label says what the entry says (XFP_SA_F_KCRYPTO), not what the test meant."""

from __future__ import annotations

import urllib.request
from pathlib import Path
from typing import Any

from agent_bed import GW1, GW2, SPI_IN, SPI_OUT, AgentBed, make_sa, one_tunnel
from prometheus_client.parser import text_string_to_metric_families

from controller.core.crypto import AES_GCM_AEAD, Backend
from controller.core.state import Direction
from controller.core.xfrm_model import Algorithm, Secret
from controller.datapath import abi
from controller.telemetry import Exporter, MetricsSource, datapath_parts
from controller.telemetry.labels import spi_label

GCM_KEY = Secret(bytes(range(36)))  # AES-256 key || 4-byte salt (RFC 4106 section 8.1)
LAN_WAN = {Direction.ENCAP: ["lan"], Direction.DECAP: ["wan"]}
NEEDS_MODULE = "AES-GCM needs the xfp_crypto module"


def gcm() -> Algorithm:
    return Algorithm("aead", AES_GCM_AEAD, 288, GCM_KEY, 128)


class _MapView:
    """An in-memory map as controller/telemetry/collect.read_datapath_sas reads a BCC table."""

    def __init__(self, m: Any) -> None:
        self.m = m

    def keys(self) -> list[bytes]:
        return list(self.m.elems)

    def get(self, key: bytes) -> Any:
        return self.m.get(key)


class _DatapathView:
    """The in-memory datapath as `datapath_parts` reads a loaded Datapath: its SA maps and
    its per-CPU counters (none here: no packets run through memory)."""

    def __init__(self, bed: AgentBed) -> None:
        self.maps = {"sa_out": _MapView(bed.dp.sa_out_map), "sa_in": _MapView(bed.dp.sa_in_map)}

    def stats(self) -> dict[tuple[int, int], tuple[int, int]]:
        return {}


def with_metrics(bed: AgentBed) -> MetricsSource:
    """The daemon's wiring (controller/agent/daemon.py _start_agent) on the in-memory maps."""
    source = MetricsSource(
        datapath=lambda: datapath_parts(_DatapathView(bed), LAN_WAN, bed.agent.reqids()),
        build_info={"version": "test"},
    )
    bed.agent.ports.metrics = source
    return source


def scrape(bed: AgentBed) -> dict[str, list[Any]]:
    """One tick (the agent takes its snapshot), then a real HTTP scrape of the exporter the
    daemon runs on that snapshot, parsed by prometheus_client's own parser."""
    bed.agent.tick()
    snap = bed.agent.snapshot
    assert snap is not None, "the tick took a snapshot"
    with (
        Exporter("127.0.0.1", 0, lambda: snap) as exp,
        urllib.request.urlopen(f"{exp.url}/metrics", timeout=5) as r,
    ):
        text = r.read().decode()
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def by_spi(samples: list[Any]) -> dict[str, Any]:
    return {s.labels["spi"]: s for s in samples}


def test_bpf_backend_aes_gcm_says_it_needs_the_module(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, tunnel=False)
    one_tunnel(bed.kernel, in_sa=make_sa(SPI_IN, GW2, GW1, aead=gcm()))
    with_metrics(bed)
    bed.agent.state.view.refresh()
    sas = {s["spi"]: s for s in bed.agent.status()["sas"]}
    gcm_row, chacha_row = sas[spi_label(SPI_IN)], sas[spi_label(SPI_OUT)]
    assert NEEDS_MODULE in gcm_row["reason"], f"before any traffic: {gcm_row['reason']}"
    assert "now bpf: chosen by the test" in gcm_row["reason"], "and why the module is not used"
    assert NEEDS_MODULE not in chacha_row["reason"], f"ChaCha20 needs no module: {chacha_row}"

    bed.agent.on_candidate(bed.decap())  # refused: the refusal's words, and the hint still
    sas = {s["spi"]: s for s in bed.agent.status()["sas"]}
    assert NEEDS_MODULE in sas[spi_label(SPI_IN)]["reason"], sas[spi_label(SPI_IN)]
    bed.agent.on_candidate(bed.encap())  # ChaCha20 outbound: offloaded on the BPF AEAD

    got = scrape(bed)
    offl = by_spi(got["xfrm_fastpath_sa_offloaded"])
    g = offl[spi_label(SPI_IN)]
    assert (g.value, g.labels["backend"], g.labels["direction"]) == (0, "none", "none"), g
    assert NEEDS_MODULE in g.labels["reason"], f"the metric says why not: {g.labels}"
    c = offl[spi_label(SPI_OUT)]
    assert (c.value, c.labels["backend"], c.labels["direction"]) == (1, "bpf", "encap"), c
    pkts = by_spi(got["xfrm_fastpath_sa_packets_total"])
    assert set(pkts) == {spi_label(SPI_OUT)}, f"only the offloaded SA has counters: {pkts}"
    assert pkts[spi_label(SPI_OUT)].labels["backend"] == "bpf", pkts


def test_kernel_backend_labels_follow_the_entries(tmp_path: Path) -> None:
    """Inbound AES-GCM on the module: `backend="kernel"` on its counters and its state. The
    outbound ChaCha20 SA's label is whatever its entry says (the BPF AEAD while the
    resequencer has no kernel-crypto build, the module once it has): the label and `sas`
    agree with the entry either way."""
    bed = AgentBed(tmp_path, tunnel=False, crypto_backend=Backend.KERNEL)
    one_tunnel(bed.kernel, in_sa=make_sa(SPI_IN, GW2, GW1, aead=gcm()))
    with_metrics(bed)
    bed.agent.on_candidate(bed.decap())
    bed.agent.on_candidate(bed.encap())
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    e_in = bed.dp.inbound_sa(SPI_IN, GW1)
    (_, e_out), *_ = bed.dp.outbound_sa_entries()
    assert e_in is not None and e_in.flags & abi.SA_F_KCRYPTO, "AES-GCM inbound on the module"
    want = {
        spi_label(SPI_IN): "kernel",
        spi_label(SPI_OUT): "kernel" if e_out.flags & abi.SA_F_KCRYPTO else "bpf",
    }

    got = scrape(bed)
    for name in ("sa_packets_total", "sa_bytes_total", "sa_sequence"):
        labels = {k: s.labels["backend"] for k, s in by_spi(got[f"xfrm_fastpath_{name}"]).items()}
        assert labels == want, f"{name}: backend per SA from its entry: {labels}, want {want}"
    offl = by_spi(got["xfrm_fastpath_sa_offloaded"])
    assert {k: (s.value, s.labels["backend"]) for k, s in offl.items()} == {
        k: (1, b) for k, b in want.items()
    }, f"both offloaded, on their entries' backends: {offl}"
    assert offl[spi_label(SPI_IN)].labels["reason"] == "kernel crypto (xfp_crypto)", offl
    sas = {s["spi"]: s["crypto"] for s in bed.agent.status()["sas"]}
    assert sas == want, f"`sas` says the same backends as the metrics: {sas}"
    text = bed.agent.status()["metrics"]
    assert {s["spi"]: s["backend"] for s in text["sas"]} == want, "status --json: the same"
    assert all(s["offloaded"] for s in text["sa_states"]), text["sa_states"]
