# SPDX-License-Identifier: GPL-2.0-only
"""The plumbing of `make bench-e2e` (bench/e2e.py) at a tiny size, so that it cannot rot: the
live-frame generator feeds the test bed, frames go through the XDP encap on gw1 and decap on
gw2 (and through the kernel in clear), the sink counts them, the scale helpers run, and the
report renders. Nothing here times anything: the figures are the benchmark's, not a test's.

Where the kernel refuses live frames (EPERM/EOPNOTSUPP/EINVAL from bench/e2e.py's probe, e.g. on
a VM kernel that forbids them), the live-frame test skips with the kernel's answer and the rest
(learning, lookup cost, invalidation, the report without throughput tables) still runs, as the
benchmark itself does there."""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_e2e", ROOT / "bench" / "e2e.py")
    assert spec and spec.loader, "bench/e2e.py is importable"
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = mod
    spec.loader.exec_module(mod)
    return mod


def _kernel_at_least(major: int, minor: int) -> bool:
    parts = platform.release().split(".")
    return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)


@pytest.fixture(scope="module")
def e2e():
    return _bench()


@pytest.fixture(scope="module")
def refused(e2e) -> str | None:
    """The probe's refusal line, or None where live frames run (other errors fail here)."""
    if not _kernel_at_least(5, 18):
        return "BPF_F_TEST_XDP_LIVE_FRAMES needs Linux 5.18"
    return e2e.live_frames_refusal()


@pytest.fixture(scope="module")
def cpus() -> int:
    return min(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def bed(e2e, cpus):
    with e2e.E2EBed(cpus=cpus, flows=4) as b:
        yield b


def test_live_frames_cross_the_fastpath_pair_and_the_kernel(
    e2e, refused, cpus, bed, tmp_path: Path
) -> None:
    if refused:
        pytest.skip(refused)
    rates = {}
    for mode in ("source", "kernel", "fastpath"):
        r = bed.measure(mode, "64", (64,), 1, 0.02)
        rates[(mode, 1, "64")] = r
        assert r.packets == r.sent, f"{mode}: every generated frame reached the sink {r}"
        assert r.bytes == 64 * r.packets, f"{mode}: 64-byte IPv4 packets counted {r}"
        assert r.punts == {}, f"{mode}: nothing punted or dropped by the datapath {r.punts}"
    r = bed.measure("fastpath", "IMIX", e2e.IMIX, 1, 0.02)
    assert r.packets == r.sent and not r.punts, f"IMIX through the fastpath {r}"
    assert 64 * r.packets < r.bytes < 1400 * r.packets, f"IMIX sizes mixed {r}"
    if cpus >= 2:
        r = bed.measure("fastpath", "64", (64,), 2, 0.02, variant="cpu-sa")
        assert r.packets > 0 and not r.punts, f"2 generator threads, one SA per CPU {r}"
        rates[(r.mode, 2, "64")] = r
    text = e2e.report(rates, cpus, [], None, None, 0.02, 4)
    assert "| 64 |" in text and "Goals:" in text, f"the report renders:\n{text}"
    made = e2e.plots(tmp_path, rates, [])
    assert all((tmp_path / m).stat().st_size > 0 for m in made), "plots written when possible"


def test_learning_lookup_invalidation_and_report(e2e, refused, cpus, bed, tmp_path: Path) -> None:
    learn = e2e.learn_burst(bed, 20, single=5)
    assert learn.learned == 20, f"every flow of the burst learned {learn}"
    assert learn.single_flows == 5, f"every flow sent alone learned {learn}"
    with e2e.scale_datapath(4096) as dp:
        lookups = e2e.lookup_cost(dp, (100, 200), probes=20)
        inval = e2e.invalidation(dp, 1000)
    assert [c.flows for c in lookups] == [100, 200], "lookup cost at each flow count"
    assert inval.flows == 1000, "an SA's 1000 flows invalidated"
    text = e2e.report({}, cpus, lookups, learn, inval, 0.02, 4, refused=refused)
    assert "| 200 |" in text and "Goals:" in text, f"the report renders:\n{text}"
    if refused:
        assert refused in text, f"the report says why there is no throughput table:\n{text}"
    made = e2e.plots(tmp_path, {}, lookups)
    assert all((tmp_path / m).stat().st_size > 0 for m in made), "plots written when possible"
