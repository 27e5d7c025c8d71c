# SPDX-License-Identifier: GPL-2.0-only
"""The dashboards against a real Prometheus (Debian's `prometheus` package).

- promtool accepts the scrape config and the rule files;
- the dashboard, the recording rules and the alert rules name only metrics the exporter serves
  (or the recording rules define, or Prometheus itself makes: `up`);
- a Prometheus server on loopback scrapes the exporter every second while real per-CPU BPF
  counters move (BPF_PROG_TEST_RUN through the datapath's own maps, see test_metrics.py) and
  the controller's state changes; every PromQL expression of the dashboard, the recording rules
  and the alert rules then returns data through the HTTP API. The alerts are made to fire by
  driving the conditions they watch (a hit-rate collapse, replay and ICV drops, a nearly full
  flow table, sequence numbers near 2^32, an unhealthy and then a dead controller).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_metrics import IFACES, REASONS, CountingDatapath, member

from controller.agent.status import kernel_path_why
from controller.core.crypto import AES_GCM_AEAD, Backend
from controller.core.state import Cause, Direction, FlowKey, FlowRecord, FlowState, SaRef
from controller.core.xfrm_model import Algorithm, Sa, Secret
from controller.datapath import abi
from controller.telemetry.collect import (
    MetricsSource,
    SaReading,
    datapath_parts,
    snapshot_from_datapath,
)
from controller.telemetry.exposition import Exporter, exposed_names
from controller.telemetry.snapshot import MetricsSnapshot, SaState

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "dashboards"
DASHBOARD = DASH / "xfrm-fastpath.json"
SCRAPE_CONFIG = DASH / "prometheus.yml"
RULE_FILES = [DASH / "rules" / "recording.yml", DASH / "rules" / "alerts.yml"]
PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# What Grafana substitutes before it sends a query. $__rate_interval is at least four scrape
# intervals (Grafana docs, "Prometheus template variables"); with 1 s scrapes, 10 s holds ~10.
GRAFANA_VARS = {"__rate_interval": "10s", "job": ".+", "instance": ".+"}

needs_prometheus = pytest.mark.skipif(
    not (os.access(PROMETHEUS, os.X_OK) and os.access(PROMTOOL, os.X_OK)),
    reason="Debian's prometheus package (prometheus, promtool) is not installed: make setup",
)


# --------------------------------------------------------------------------------------------
# The expressions
# --------------------------------------------------------------------------------------------
def grafana_expand(expr: str) -> str:
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        assert name in GRAFANA_VARS, f"dashboard uses an unknown variable ${name} in {expr!r}"
        return GRAFANA_VARS[name]

    out = re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", sub, expr)
    assert "$" not in out, f"unexpanded variable in {out!r}"
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, variables expanded.
    label_values(selector, label) becomes the selector: what Grafana asks Prometheus for."""
    dash = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r} {t['refId']}", grafana_expand(t["expr"])))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
        assert m, f"variable {var['name']}: unexpected query {q!r}"
        out.append((f"variable ${var['name']}", grafana_expand(m.group(1))))
    return out


def rule_exprs(kind: str) -> list[tuple[str, str]]:
    out = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    out.append((f"{path.name} {rule[kind]}", rule["expr"]))
    return out


def recorded_names() -> set[str]:
    return {where.split()[1] for where, _ in rule_exprs("record")}


PROMQL_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords,
    label names (inside {} or by/on/... lists) or parts of numbers and durations."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        tok = m.group(0)
        before = s[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 5m, 1h
            continue
        if s[m.end() :].lstrip().startswith("("):  # a function
            continue
        if tok.lower() in PROMQL_KEYWORDS:
            continue
        names.add(tok)
    return names


def all_exprs() -> list[tuple[str, str]]:
    return dashboard_queries() + rule_exprs("record") + rule_exprs("alert")


# --------------------------------------------------------------------------------------------
# Static checks
# --------------------------------------------------------------------------------------------
@needs_prometheus
def test_promtool_checks_config_and_rules() -> None:
    cfg = subprocess.run(
        [PROMTOOL, "check", "config", str(SCRAPE_CONFIG)], capture_output=True, text=True
    )
    assert cfg.returncode == 0, f"promtool check config:\n{cfg.stdout}{cfg.stderr}"
    assert "2 rule files found" in cfg.stdout, f"the config loads both rule files:\n{cfg.stdout}"
    rules = subprocess.run(
        [PROMTOOL, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True
    )
    assert rules.returncode == 0, f"promtool check rules:\n{rules.stdout}{rules.stderr}"


@needs_prometheus
def test_promtool_rule_unit_tests() -> None:
    """dashboards/rules/tests.yml: each alert quiet on a healthy gateway, firing after its
    `for:` time on a faulty one, with its labels and rendered annotations."""
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(DASH / "rules" / "tests.yml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, f"promtool test rules:\n{run.stdout}{run.stderr}"
    tested = set(re.findall(r"alertname: (\w+)", (DASH / "rules" / "tests.yml").read_text()))
    defined = {where.split()[1] for where, _ in rule_exprs("alert")}
    assert defined <= tested, f"alerts without a unit test: {defined - tested}"


def unknown_names(exprs: list[tuple[str, str]], known: set[str]) -> dict[str, set[str]]:
    return {where: bad for where, e in exprs if (bad := promql_metric_names(e) - known)}


def test_dashboard_and_rules_name_only_exported_metrics() -> None:
    known = exposed_names() | recorded_names() | {"up"}  # `up`: Prometheus's own, per target
    exprs = all_exprs()
    assert len(dashboard_queries()) >= 20, "the dashboard's queries were found"
    bad = unknown_names(exprs, known)
    assert not bad, f"expressions name metrics the exporter does not serve: {bad}"
    used = set().union(*(promql_metric_names(e) for _, e in exprs))
    for name in (
        "xfrm_fastpath_packets_total",
        "xfrm_fastpath_kernel_packets_total",
        "xfrm_fastpath_drops_total",
        "xfrm_fastpath_learn_latency_seconds_bucket",
        "xfrm_fastpath_sa_sequence",
        "xfrm_fastpath_flow_table_capacity",
        "direction:xfrm_fastpath_hit_ratio:rate1m",
    ):
        assert name in used, f"{name} is used somewhere (the name parser found it)"
    # The check itself can fail: a misspelt metric and a metric the exporter dropped are caught.
    typo = [("typo", "sum(rate(xfrm_fastpath_pakets_total[5m])) / on (job) group_left up")]
    assert unknown_names(typo, known) == {"typo": {"xfrm_fastpath_pakets_total"}}, (
        "a misspelt name is reported, and only it"
    )
    dropped = known - {"xfrm_fastpath_drops_total"}
    assert any("xfrm_fastpath_drops_total" in b for b in unknown_names(exprs, dropped).values()), (
        "a metric the exporter stopped serving is reported"
    )


def test_dashboard_panels_all_have_queries() -> None:
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p.get("targets"), f"panel {p['title']!r} has no query"
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} has an empty query"
            assert t["datasource"]["uid"] == "${datasource}", f"{p['title']}: datasource variable"


def test_dashboard_layout_is_valid() -> None:
    """Unique panel ids, panels inside the 24-column grid, no two panels on the same cells
    (Grafana would silently push one down), and a stable uid for provisioning."""
    dash = json.loads(DASHBOARD.read_text())
    assert dash.get("uid") == "xfrm-fastpath", "a stable uid (links and provisioning use it)"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), f"panel ids are unique: {ids}"
    taken: dict[tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, f"{p['title']}: {g}"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in taken, f"{p['title']!r} overlaps {taken[(x, y)]!r} at {x},{y}"
                taken[(x, y)] = p["title"]


# --------------------------------------------------------------------------------------------
# A real Prometheus
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(
    what: str, check: Callable[[], Any], timeout: float, interval: float = 0.25
) -> Any:  # fmt: skip
    """Call check() until it returns a true value; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError) as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last}")
        time.sleep(interval)


class Prometheus:
    """A Prometheus server on 127.0.0.1 with its own storage, scraping `target` every second
    with the job, labels and rule files of dashboards/prometheus.yml."""

    def __init__(self, workdir: Path, target: str) -> None:
        cfg = yaml.safe_load(SCRAPE_CONFIG.read_text())
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        cfg["rule_files"] = [str((SCRAPE_CONFIG.parent / f).resolve()) for f in cfg["rule_files"]]
        (job,) = cfg["scrape_configs"]
        job.update(scrape_interval="1s", scrape_timeout="1s")
        job["static_configs"][0]["targets"] = [target]
        self.job = job["job_name"]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(cfg))
        self.storage = workdir / "data"
        self.log = workdir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        for _attempt in range(3):  # the free port may be taken between probe and bind
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            with self.log.open("ab") as log:
                self.proc = subprocess.Popen(
                    [
                        PROMETHEUS,
                        f"--config.file={self.config}",
                        f"--storage.tsdb.path={self.storage}",
                        f"--web.listen-address=127.0.0.1:{port}",
                        "--storage.tsdb.retention.time=1h",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                poll("Prometheus ready", self._ready, timeout=30)
                return
            except AssertionError:
                if self.proc.poll() is None:
                    raise AssertionError(f"Prometheus not ready:\n{self.log_tail()}") from None
        raise AssertionError(f"Prometheus did not start:\n{self.log_tail()}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"Prometheus exited {self.proc.returncode}:\n{self.log_tail()}")
        with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
            return r.status == 200

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        assert doc["status"] == "success", f"{path} {params}: {doc}"
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", f"{expr}: {data['resultType']}"
        return data["result"]

    def finite(self, expr: str) -> list[dict[str, Any]]:
        """The samples of an instant query whose value is a finite number."""
        return [s for s in self.query(expr) if math.isfinite(float(s["value"][1]))]


@contextlib.contextmanager
def prometheus(workdir: Path, target: str) -> Iterator[Prometheus]:
    p = Prometheus(workdir, target)
    try:
        p.start()
        yield p
    finally:
        p.stop()


# --------------------------------------------------------------------------------------------
# Traffic: the real XDP programs, or the counting program of test_metrics.py
# --------------------------------------------------------------------------------------------
LAN_HOST, REMOTE_HOST, GW1_WAN, GW2_WAN = "10.1.0.2", "10.2.0.2", "192.0.2.1", "192.0.2.2"
MAC_A, MAC_B, MAC_C = "02:00:00:00:00:01", "02:00:00:00:00:02", "02:00:00:00:00:03"
SPI_OUT, SPI_IN, SPI_OLD = 0xC001, 0xD001, 0xC003
# An inbound SA on the kernel crypto backend (its entry names an xfp_crypto context; no
# packet runs through it here: this host has no module), and an AES-GCM SA the BPF backend
# leaves to the kernel.
SPI_KC, SPI_GCM = 0xD004, 0xD005
REQIDS = {SPI_OUT: 7, SPI_IN: 7, SPI_OLD: 8, SPI_KC: 9}  # by SPI (CountingTraffic's model)
SA_REQIDS = {1: 7, 2: 7, 3: 8, 4: 9}  # by sa_id, as the daemon passes them to datapath_parts
NEEDS_MODULE = "AES-GCM needs the xfp_crypto module"


@contextlib.contextmanager
def on_cpu(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on one CPU (BPF_PROG_TEST_RUN counts on the CPU it runs on)."""
    old = os.sched_getaffinity(0)
    try:
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, old)


class RealTraffic:
    """bpf/xdp_encap.c and bpf/xdp_decap.c loaded by controller/datapath/xdp.py (maps pinned in a
    private bpffs directory), with an outbound SA + flow and an inbound SA + flow installed;
    frames go through BPF_PROG_TEST_RUN. Hits are real: the encap side encrypts, the decap side
    checks the ICV and the replay window and decrypts."""

    name = "datapath"

    def __init__(self) -> None:
        from packets import IPPROTO_UDP, EspSa, eth, ipv4, udp

        from controller.datapath.xdp import Datapath, InboundSa, OutboundSa, flow_key, flow_val

        self._flow_key, self._flow_val, self._OutboundSa = flow_key, flow_val, OutboundSa
        self.pin = Path(f"/sys/fs/bpf/xfp-prom-test-{os.getpid()}")
        self.dp = Datapath(pin_dir=self.pin)
        try:
            self.dp.load()
        except BaseException:
            self.close()
            raise
        # BPF_PROG_TEST_RUN hands XDP the loopback device's receive queue
        # (net/bpf/test_run.c, bpf_prog_test_run_xdp), so ingress_ifindex is lo's.
        self.ifindex = socket.if_nametoindex("lo")
        key_out, key_in = bytes(range(36)), bytes(range(100, 136))
        self.dp.put_outbound_sa(
            OutboundSa(sa_id=1, spi=SPI_OUT, saddr=GW1_WAN, daddr=GW2_WAN, key=key_out,
                       egress_ifindex=2, dmac=MAC_B, smac=MAC_A)
        )  # fmt: skip
        self.dp.put_flow(
            flow_key(self.ifindex, Direction.ENCAP, IPPROTO_UDP, LAN_HOST, REMOTE_HOST, 1000, 53),
            flow_val(1),
        )
        self.dp.put_inbound_sa(
            InboundSa(sa_id=2, spi=SPI_IN, saddr=GW2_WAN, daddr=GW1_WAN, key=key_in)
        )
        self.dp.put_flow(
            flow_key(self.ifindex, Direction.DECAP, IPPROTO_UDP, REMOTE_HOST, LAN_HOST, 53, 1000),
            flow_val(2, egress_ifindex=3, dmac=MAC_C, smac=MAC_A),
        )
        self.dp.put_inbound_sa(
            InboundSa(sa_id=4, spi=SPI_KC, saddr=GW2_WAN, daddr=GW1_WAN, key=b"", kc_id=5)
        )
        self.esp_in = EspSa(SPI_IN, key_in)
        self.inner = ipv4(REMOTE_HOST, LAN_HOST, IPPROTO_UDP, udp(53, 1000, b"r" * 64))
        self.clear = eth(MAC_A, MAC_C) + ipv4(
            LAN_HOST, REMOTE_HOST, IPPROTO_UDP, udp(1000, 53, b"c" * 64)
        )
        self.clear_old = eth(MAC_A, MAC_C) + ipv4(
            LAN_HOST, REMOTE_HOST, IPPROTO_UDP, udp(1000, 54, b"c" * 64)
        )
        self.no_flow = eth(MAC_A, MAC_C) + ipv4(
            LAN_HOST, "10.2.0.99", IPPROTO_UDP, udp(1000, 53, b"c" * 64)
        )
        self.no_sa = self._esp(EspSa(0xEEEE, key_in).seal(1, self.inner))
        self.next_seq = 1
        self._eth, self._ipv4 = eth, ipv4
        self.old_sa_installed = False

    def _esp(self, esp: bytes) -> bytes:
        from packets import IPPROTO_ESP, eth, ipv4

        return eth(MAC_A, MAC_B) + ipv4(GW2_WAN, GW1_WAN, IPPROTO_ESP, esp)

    def _run(self, fd: int, frame: bytes, n: int = 1) -> None:
        from controller.datapath.bpfsys import prog_test_run

        prog_test_run(fd, frame, repeat=n)

    def hits(self, d: Direction, n: int) -> None:
        # One run per frame: with repeat the kernel would re-run on the frame as the program
        # left it (already ESP, or already decrypted).
        for _ in range(n):
            if d is Direction.ENCAP:
                self._run(self.dp.encap_fd, self.clear)
            else:
                self._run(self.dp.decap_fd, self._esp(self.esp_in.seal(self.next_seq, self.inner)))
                self.next_seq += 1

    def punts(self, d: Direction, n: int) -> None:
        if d is Direction.ENCAP:
            self._run(self.dp.encap_fd, self.no_flow, n)  # PASS_UNKNOWN_FLOW
        else:
            self._run(self.dp.decap_fd, self.no_sa, n)  # PASS_UNKNOWN_SPI

    def replays(self, n: int) -> None:
        self._run(self.dp.decap_fd, self._esp(self.esp_in.seal(1, self.inner)), n)

    def bad_icvs(self, n: int) -> None:
        esp = bytearray(self.esp_in.seal(self.next_seq + 1000, self.inner))
        esp[-1] ^= 0x01
        self._run(self.dp.decap_fd, self._esp(bytes(esp)), n)

    def near_exhaustion(self) -> int:
        """An old outbound SA close to 2^32 (as if it had carried 4 billion packets), used by
        a second flow; returns the hits sent through it."""
        from packets import IPPROTO_UDP

        if not self.old_sa_installed:
            self.dp.put_outbound_sa(
                self._OutboundSa(sa_id=3, spi=SPI_OLD, saddr=GW1_WAN, daddr=GW2_WAN,
                                 key=bytes(36), egress_ifindex=2, dmac=MAC_B, smac=MAC_A,
                                 seq=int(0.95 * 2**32))
            )  # fmt: skip
            self.dp.put_flow(
                self._flow_key(self.ifindex, Direction.ENCAP, IPPROTO_UDP, LAN_HOST,
                               REMOTE_HOST, 1000, 54),
                self._flow_val(3),
            )  # fmt: skip
            self.old_sa_installed = True
        for _ in range(3):
            self._run(self.dp.encap_fd, self.clear_old)
        return 3

    def parts(self):
        return datapath_parts(self.dp, IFACES, SA_REQIDS)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.dp.close()
        with contextlib.suppress(Exception):
            self.dp.unpin()


class CountingTraffic:
    """The counting program of test_metrics.py: the datapath's counter map, moved by a
    program that counts what the frame says; SA entries are modelled here."""

    name = "counting"

    def __init__(self) -> None:
        self.dp = CountingDatapath()
        self.sa = {SPI_OUT: [0, 0], SPI_IN: [0, 0], SPI_KC: [0, 0]}  # spi -> [packets, last seq]

    def hits(self, d: Direction, n: int) -> None:
        self.dp.send(d, member("fastpath", direction_name(d)), n, size=120)
        sa = self.sa[SPI_OUT if d is Direction.ENCAP else SPI_IN]
        sa[0] += n
        sa[1] += n

    def punts(self, d: Direction, n: int) -> None:
        reason = "unknown_flow" if d is Direction.ENCAP else "unknown_spi"
        self.dp.send(d, member("kernel", reason), n, size=100)

    def replays(self, n: int) -> None:
        self.dp.send(Direction.DECAP, member("drop", "replay"), n, size=140)

    def bad_icvs(self, n: int) -> None:
        self.dp.send(Direction.DECAP, member("drop", "bad_icv"), n, size=140)

    def near_exhaustion(self) -> int:
        self.dp.send(Direction.ENCAP, member("fastpath", "encap"), 3, size=120)
        self.sa.setdefault(SPI_OLD, [0, int(0.95 * 2**32) - 1])
        self.sa[SPI_OLD][0] += 3
        self.sa[SPI_OLD][1] += 3
        return 3

    def parts(self):
        sas = [
            SaReading(spi, REQIDS[spi],
                      Direction.DECAP if spi in (SPI_IN, SPI_KC) else Direction.ENCAP,
                      pkts, 100 * pkts, seq,
                      abi.SA_F_OFFLOAD | (abi.SA_F_KCRYPTO if spi == SPI_KC else 0))
            for spi, (pkts, seq) in self.sa.items()
        ]  # fmt: skip
        return snapshot_from_datapath(self.dp.summed(), IFACES, sas, REASONS)

    def close(self) -> None:
        self.dp.close()


# --------------------------------------------------------------------------------------------
# The gateway being watched: traffic through the datapath, controller state changing
# --------------------------------------------------------------------------------------------
def sa_states() -> tuple[SaState, ...]:
    """The kernel's SAs as the agent reports them (controller/agent/status.py sa_states):
    the three offloaded ones on the backends their entries name, and an AES-GCM SA that the
    BPF backend leaves to the kernel, with the agent's own words for why."""
    gcm = Sa(
        src=ipaddress.ip_address(GW2_WAN), dst=ipaddress.ip_address(GW1_WAN), spi=SPI_GCM,
        reqid=10, aead=Algorithm("aead", AES_GCM_AEAD, 160, Secret(bytes(20)), 128),
    )  # fmt: skip
    ok, why = gcm.fastpath_support()
    assert not ok, "the BPF AEAD cannot serve AES-GCM"
    why = kernel_path_why(gcm, why, Backend.BPF, "auto: the xfp_crypto module is not loaded")
    return (
        SaState(f"0x{SPI_OUT:08x}", 7, "encap", True, "bpf", "BPF AEAD"),
        SaState(f"0x{SPI_IN:08x}", 7, "decap", True, "bpf", "BPF AEAD"),
        SaState(f"0x{SPI_KC:08x}", 9, "decap", True, "kernel", "kernel crypto (xfp_crypto)"),
        SaState(f"0x{SPI_GCM:08x}", 10, "none", False, "none", why),
    )


def flow(i: int) -> FlowRecord:
    key = FlowKey(3, Direction.ENCAP, "10.1.0.2", "10.2.0.2", 17, 1024 + i % 60000, 53)
    return FlowRecord(key, SaRef("192.0.2.2", 0xC001, 7), 4, "02:00:00:00:00:01",
                      "02:00:00:00:00:02", 1, (4, "192.0.2.2"))  # fmt: skip


class Gateway:
    """Drives the traffic and the controller state from a background thread, in phases:
    "normal" (mostly fastpath hits, a few punts, flows learned and aged out), "hold" (nothing
    moves) and "fault" (no hits, heavy punting, replay and ICV drops, flow table nearly full,
    an SA near 2^32, controller unhealthy). Bounded: it stops after `max_s` seconds."""

    FLOW_CAPACITY = 64
    HITS = {Direction.ENCAP: 40, Direction.DECAP: 30}  # per tick (5 ticks a second)

    def __init__(self, traffic: RealTraffic | CountingTraffic, max_s: float = 150.0) -> None:
        self.traffic = traffic
        self.rng = random.Random(6)
        self.flows = FlowState(capacity=self.FLOW_CAPACITY)
        self.source = MetricsSource(
            flows=self.flows, datapath=self.read, build_info={"version": "test", "bcc": "0.26"}
        )
        self.source.set_health(up=True, bpf_programs_attached=2)
        self.phase = "normal"
        self.sent_hits = {Direction.ENCAP: 0, Direction.DECAP: 0}
        self.sent_frames = {Direction.ENCAP: 0, Direction.DECAP: 0}
        self.ticks = 0
        self.n_flows = 0
        self.error: BaseException | None = None
        self.holding = threading.Event()  # set once a tick ran in the "hold" phase
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the exporter's thread reads while the feeder writes
        self._max_s = max_s
        self._thread = threading.Thread(target=self._run, name="gateway-feeder", daemon=True)

    def read(self):
        with self._lock:
            return self.traffic.parts()

    def snapshot(self) -> MetricsSnapshot:
        """What the agent's tick does: the source's snapshot with the kernel's SAs added."""
        return dataclasses.replace(self.source.snapshot(), sa_states=sa_states())

    def _tick(self) -> None:
        t, rng = self.traffic, self.rng
        cpus = sorted(os.sched_getaffinity(0))
        cpu = cpus[self.ticks % len(cpus)]
        if self.phase == "hold":
            self.holding.set()
            return
        with self._lock, on_cpu(cpu):
            if self.phase == "normal":
                for d, n in self.HITS.items():
                    t.hits(d, n)
                    t.punts(d, 1)
                    self.sent_hits[d] += n
                    self.sent_frames[d] += n + 1
            else:
                for d in Direction:
                    t.punts(d, 1000)
                    self.sent_frames[d] += 1000
                t.replays(5)
                t.bad_icvs(2)
                self.sent_frames[Direction.DECAP] += 7
                n = t.near_exhaustion()
                self.sent_hits[Direction.ENCAP] += n
                self.sent_frames[Direction.ENCAP] += n
        if self.phase == "normal":
            rec = flow(self.n_flows)
            self.n_flows += 1
            self.flows.add(rec)
            self.source.observe_learn_latency(rng.lognormvariate(math.log(0.002), 1.0))
            if len(self.flows) > 8:
                oldest = min(self.flows.flows.values(), key=lambda r: r.installed_ns)
                self.flows.remove([oldest.key], Cause.IDLE)
            if self.ticks % 3 == 0:
                self.source.reject("no_policy")
            self.source.netlink_event()
        else:
            while len(self.flows) < self.FLOW_CAPACITY - 2:
                self.flows.add(flow(self.n_flows))
                self.n_flows += 1
            self.source.set_health(up=False, bpf_programs_attached=0)

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_s
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                self._tick()
                self.ticks += 1
                self._stop.wait(0.2)  # traffic pacing, not a wait for a condition
        except BaseException as exc:
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the feeder thread stopped"
        assert self.error is None, f"the feeder failed: {self.error!r}"


def direction_name(d: Direction) -> str:
    return d.name.lower()


def make_traffic(kind: str) -> RealTraffic | CountingTraffic:
    if kind == "counting":
        return CountingTraffic()
    try:
        import packets  # noqa: F401  (tests/lib/packets.py: frames and reference ESP)

        import controller.datapath.xdp  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"the datapath's loader or packet helpers are missing: {exc}")
    return RealTraffic()


# --------------------------------------------------------------------------------------------
# The end-to-end test
# --------------------------------------------------------------------------------------------
@needs_prometheus
@pytest.mark.parametrize("traffic_kind", ["datapath", "counting"])
def test_every_dashboard_and_rule_expression_returns_data(
    tmp_path: Path, traffic_kind: str
) -> None:
    traffic = make_traffic(traffic_kind)
    gw = Gateway(traffic)
    exporter = Exporter("127.0.0.1", 0, gw.snapshot)
    try:
        exporter.start()
        gw.start()
        with prometheus(tmp_path, f"127.0.0.1:{exporter.port}") as prom:
            check_expressions(prom, gw, exporter)
    finally:
        gw.stop()
        exporter.stop()
        traffic.close()


def check_expressions(prom: Prometheus, gw: Gateway, exporter: Exporter) -> None:
    job = prom.job
    poll(
        "the exporter's target up",
        lambda: prom.finite(f'up{{job="{job}"}} == 1'),
        timeout=30,
    )

    # Normal traffic: every dashboard query and every recording rule gives a finite figure.
    pending = dict(dashboard_queries() + rule_exprs("record"))
    pending.update({f"recorded {n}": n for n in recorded_names()})

    def none_left() -> bool:
        for where, expr in list(pending.items()):
            if prom.finite(expr):
                del pending[where]
        return not pending

    try:
        poll("every dashboard and recording expression to return data", none_left, timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nstill empty: {json.dumps(pending, indent=1)}") from None

    # The crypto backend of each SA, as its datapath entry says, and why an SA is not offloaded.
    backends = {
        s["metric"]["spi"]: s["metric"]["backend"]
        for s in prom.query("xfrm_fastpath_sa_packets_total")
    }
    assert backends.get(f"0x{SPI_OUT:08x}") == "bpf", f"the BPF AEAD's SA: {backends}"
    assert backends.get(f"0x{SPI_KC:08x}") == "kernel", f"the kernel backend's SA: {backends}"
    kernel_path = prom.query("xfrm_fastpath_sa_offloaded == 0")
    assert [s["metric"]["spi"] for s in kernel_path] == [f"0x{SPI_GCM:08x}"], kernel_path
    assert NEEDS_MODULE in kernel_path[0]["metric"]["reason"], f"and why: {kernel_path}"
    on = prom.query("sum by (backend) (xfrm_fastpath_sa_offloaded)")
    assert {s["metric"]["backend"]: float(s["value"][1]) for s in on} == {
        "bpf": 2, "kernel": 1, "none": 0
    }, f"SAs offloaded per backend: {on}"  # fmt: skip

    hit = prom.finite("direction:xfrm_fastpath_hit_ratio:rate1m")
    ratios = {s["metric"]["direction"]: float(s["value"][1]) for s in hit}
    assert set(ratios) == {"encap", "decap"}, f"a hit ratio per direction: {ratios}"
    assert all(r > 0.9 for r in ratios.values()), f"mostly fastpath in the normal phase: {ratios}"
    buckets = "rate(xfrm_fastpath_learn_latency_seconds_bucket[1m])"
    p99 = prom.finite(f"histogram_quantile(0.99, sum by (le) ({buckets}))")
    assert 0.0001 <= float(p99[0]["value"][1]) <= 1.0, f"learn latency p99 in range: {p99}"

    # A healthy gateway raises no alert: every alert expression is empty in the normal phase.
    firing = {w: prom.query(e) for w, e in rule_exprs("alert")}
    assert not any(firing.values()), f"alerts fire on a healthy gateway: {firing}"

    # The exported counts are what the generator sent, through the per-CPU maps, the exporter
    # and Prometheus: every frame counted once (fastpath, kernel or drop), the hits as fastpath
    # packets, and the SA's own counter. Compared while the generator holds still.
    gw.phase = "hold"
    poll("the feeder to hold", gw.holding.is_set, timeout=10)
    hits = {direction_name(d): n for d, n in gw.sent_hits.items()}
    frames = {direction_name(d): n for d, n in gw.sent_frames.items()}

    def by_direction(expr: str) -> dict[str, int]:
        return {s["metric"]["direction"]: int(float(s["value"][1])) for s in prom.query(expr)}

    every = (
        "sum by (direction) (xfrm_fastpath_packets_total)"
        " + sum by (direction) (xfrm_fastpath_kernel_packets_total)"
        " + sum by (direction) (xfrm_fastpath_drops_total)"
    )
    poll(f"Prometheus to count every frame sent {frames}", lambda: by_direction(every) == frames,
         timeout=15)  # fmt: skip
    fastpath = by_direction("sum by (direction) (xfrm_fastpath_packets_total)")
    assert fastpath == hits, f"fastpath packets exported {fastpath}, hits sent {hits}"
    sa = prom.query(f'xfrm_fastpath_sa_packets_total{{spi="0x{SPI_OUT:08x}"}}')
    assert [int(float(x["value"][1])) for x in sa] == [hits["encap"]], (
        f"the outbound SA's packet counter is the encap hits sent ({hits['encap']}): {sa}"
    )
    assert sa[0]["metric"].get("reqid") == "7", f"the SA carries the controller's reqid: {sa}"

    # Faults: each alert expression must return data (the alert fires).
    gw.phase = "fault"
    alerts = dict(rule_exprs("alert"))
    try:
        poll(
            "every alert expression to return data",
            lambda: not {w for w, e in alerts.items() if not prom.query(e)},
            timeout=90,
        )
    except AssertionError as exc:
        empty = {w: e for w, e in alerts.items() if not prom.query(e)}
        raise AssertionError(f"{exc}\nno data: {json.dumps(empty, indent=1)}") from None
    names = {w.split()[1] for w in alerts}

    def all_active() -> set[str]:
        active = {a["labels"]["alertname"] for a in prom.api("alerts")["alerts"]}
        return names <= active and active

    poll("every alert pending or firing in Prometheus", all_active, timeout=30)

    # A dead controller: the scrape fails, and the down alert fires from `up` alone.
    gw.stop()
    exporter.stop()
    down = dict(rule_exprs("alert"))["alerts.yml XfrmFastpathControllerDown"]
    poll(
        "the controller-down alert from up == 0 with the exporter gone",
        lambda: not prom.query("xfrm_fastpath_up") and prom.query(down),
        timeout=30,
    )


# --------------------------------------------------------------------------------------------
# Real traffic in the namespace test bed
# --------------------------------------------------------------------------------------------
N_KERNEL, N_FAST = 12, 20  # datagrams before and after the flows are installed


@needs_prometheus
def test_tunnel_traffic_counts_through_prometheus(bed, tmp_path: Path) -> None:
    """UDP echo between the lan and remote hosts across gw1 and gw2, both running the XDP
    programs (tests/host/test_datapath_redirect.py's tunnel set-up: this host has no ESP, so only
    XDP can carry the tunnel). First with no flow installed: the kernel carries everything in
    the clear, and XDP counts it as punts. Then with the flows: XDP carries it as ESP. A real
    Prometheus scrapes gw1's exporter throughout, and the exported figures add up: requests
    (encap) fastpath = sent - kernel-carried; replies (decap) = the kernel-path replies plus
    the ESP replies gw2's datapath counted sending; the SA's counter equals the fastpath's."""
    try:
        from test_datapath_redirect import SPI_A, configure, udp_echo
    except ImportError as exc:
        pytest.skip(f"tests/host/test_datapath_redirect.py's tunnel set-up is not available: {exc}")
    from bcc import BPF

    from controller.datapath.loader import Prog, compile_bpf, load_program
    from controller.datapath.xdp import Datapath
    from controller.netns import in_netns

    pid = os.getpid()
    gw1 = Datapath(pin_dir=f"/sys/fs/bpf/xfp-prom-{pid}-gw1")
    gw2 = Datapath(pin_dir=f"/sys/fs/bpf/xfp-prom-{pid}-gw2")
    hosts = [("lan", "eth0"), ("remote", "eth0")]
    attached_hosts: list[str] = []
    source = MetricsSource(
        datapath=lambda: datapath_parts(gw1, IFACES, {1: 7, 2: 7}),
        flow_capacity=1024,
        build_info={"version": "test"},
    )
    exporter = Exporter("127.0.0.1", 0, source.snapshot)
    try:
        gw1.load()
        gw2.load()
        # veth delivers a redirected frame only to a peer that runs XDP: pass-all on the hosts.
        xdp_pass = compile_bpf(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
        fn = load_program(xdp_pass, "xdp_pass", Prog.XDP)
        for role, dev in hosts:
            with in_netns(bed.ns(role)):
                BPF.attach_xdp(dev, fn, 0)
            attached_hosts.append(role)
        gw1.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw1"))
        gw2.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw2"))
        source.set_health(up=True, bpf_programs_attached=len(gw1.attached))
        exporter.start()
        with prometheus(tmp_path, f"127.0.0.1:{exporter.port}") as prom:
            poll("the exporter scraped", lambda: prom.finite("xfrm_fastpath_up == 1"), 30)

            slow = udp_echo(bed, N_KERNEL)  # no flows: the kernel forwards, in the clear
            assert slow == {"ok": N_KERNEL, "bad": []}, f"kernel path echoes: {slow}"
            configure(bed, gw1, "gw1", "gw2")
            configure(bed, gw2, "gw2", "gw1")
            fast = udp_echo(bed, N_FAST)
            # gw2's own counters say how many ESP replies it sent back to gw1: the decap side
            # of gw1 must account for exactly those (whether or not the tunnel round trip
            # works, which is the datapath's test; here the figures must add up).
            replies_sent = gw2.stats()[(Direction.ENCAP, member("fastpath", "encap"))][0]

            def figures() -> dict[tuple[str, str], int]:
                out = {}
                for name, expr in (
                    ("fastpath", "sum by (direction) (xfrm_fastpath_packets_total)"),
                    ("kernel", "sum by (direction) (xfrm_fastpath_kernel_packets_total)"),
                    ("drops", "sum by (direction) (xfrm_fastpath_drops_total)"),
                ):
                    for s in prom.query(expr):
                        out[(name, s["metric"]["direction"])] = int(float(s["value"][1]))
                return out

            want = {
                ("fastpath", "encap"): N_FAST,  # sent - kernel-carried
                ("kernel", "encap"): N_KERNEL,
                ("drops", "encap"): 0,
                ("kernel", "decap"): N_KERNEL,  # the kernel-path replies, in the clear
            }

            def settled() -> dict[tuple[str, str], int] | None:
                f = figures()
                decap = f.get(("fastpath", "decap"), 0) + f.get(("drops", "decap"), 0)
                ok = all(f.get(k) == v for k, v in want.items()) and decap == replies_sent
                return f if ok else None

            try:
                got = poll("Prometheus figures to add up", settled, timeout=20)
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\nwanted {want} and decap fastpath + drops = {replies_sent} (gw2's "
                    f"ESP replies); echo results: kernel path {slow}, XDP {fast}"
                ) from None
            sent = N_KERNEL + N_FAST
            encap_total = got[("fastpath", "encap")] + got[("kernel", "encap")]
            assert encap_total == sent, f"every request counted once at gw1: {got}, sent {sent}"
            punts = {
                (s["metric"]["direction"], s["metric"]["reason"]): int(float(s["value"][1]))
                for s in prom.query("xfrm_fastpath_kernel_packets_total > 0")
            }
            assert punts == {("encap", "unknown_flow"): N_KERNEL, ("decap", "not_esp"): N_KERNEL}, (
                f"the kernel carried the flow's first datagrams, and why: {punts}"
            )
            sa = prom.query(f'xfrm_fastpath_sa_packets_total{{spi="0x{SPI_A:08x}"}}')
            assert [int(float(s["value"][1])) for s in sa] == [N_FAST], (
                f"gw1's outbound SA counted the fastpath's requests: {sa}"
            )
            if fast["ok"] == N_FAST:  # the full round trip worked: the replies came by XDP
                assert got[("fastpath", "decap")] == N_FAST, f"replies decapsulated: {got}"
            hit = poll(
                "the encap hit ratio recorded",
                lambda: prom.finite('direction:xfrm_fastpath_hit_ratio:rate1m{direction="encap"}'),
                timeout=20,
            )
            assert 0 < float(hit[0]["value"][1]) <= 1, f"a hit ratio in (0, 1]: {hit}"
    finally:
        exporter.stop()
        for role, dev in hosts:
            if role in attached_hosts:
                with in_netns(bed.ns(role)):
                    BPF.remove_xdp(dev, 0)
        for d in (gw1, gw2):
            with contextlib.suppress(Exception):
                d.close()
            with contextlib.suppress(Exception):
                d.unpin()
