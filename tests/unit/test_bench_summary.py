# SPDX-License-Identifier: GPL-2.0-only
"""bench/summary.py, the writer of bench/results/summary.json: every name issue 16 asks for, each
with the same fields; with no results every value is null and says why (nothing typed in); with
results each value is computed from them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NAMES = {
    "esp_instr_ratio_64", "esp_instr_ratio_512", "esp_instr_ratio_1400", "esp_instr_ratio_imix",
    "clear_cpu_ratio_64", "non_aead_over_floor", "aead_over_native_64", "aead_over_native_1400",
    "one_queue_2cpu_scaling_64", "one_queue_2cpu_scaling_1400", "learn_burst_p99_ms",
    "learn_rate_flows_s", "lookup_1m_over_1k",
    # issue 17
    "kcrypto_chacha_ratio_64", "kcrypto_chacha_ratio_1400", "kcrypto_gcm_ratio_64",
    "kcrypto_gcm_ratio_1400", "kcrypto_aead_over_kernel_1400",
}  # fmt: skip
FIELDS = {"value", "target", "better", "unit", "machine", "date"}


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("bench_summary", ROOT / "bench" / "summary.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_summary"] = mod
    spec.loader.exec_module(mod)
    return mod


def _host() -> dict:
    m = {"cpu": "Test CPU", "cpus": "2", "kernel": "6.1", "date": "2026-12-07 12:00 UTC"}
    rate = {"cpus": 1, "sizes": "64", "packets": 1000}
    return {
        "machine": m,
        "live_frames_refused": None,
        "rates": [
            rate | {"mode": "source", "cpu_s": 100e-6},  # 100 ns per frame
            rate | {"mode": "kernel", "cpu_s": 400e-6},  # path 300 ns
            rate | {"mode": "fastpath", "cpu_s": 700e-6},  # path 600 ns
        ],
        "breakdown": [
            {
                "size": 64,
                "floor": 100.0,
                "encap": 700.0,
                "decap": 900.0,
                "bpf_seal": 500.0,
                "bpf_open": 600.0,
                "native_seal": 250.0,
                "native_open": 250.0,
            },
            {
                "size": 1400,
                "floor": 100.0,
                "encap": 7000.0,
                "decap": 9000.0,
                "bpf_seal": 6000.0,
                "bpf_open": 6000.0,
                "native_seal": 4000.0,
                "native_open": 4000.0,
            },
        ],
        "learn": {"learned": 1000, "p99_ms": 12.5, "rate": 20000.0},
        "lookups": [
            {"flows": 1000, "hit_ns": 1000.0, "ref_hit_ns": 1000.0},
            {"flows": 1_000_000, "hit_ns": 1300.0, "ref_hit_ns": 1000.0},
        ],
    }


def _vm() -> dict:
    m = {"cpu": "QEMU", "cpus": "1", "kernel": "6.1.0", "qemu_opts": "-cpu max -icount shift=0",
         "icount": "true", "date": "2026-12-07 12:30 UTC"}  # fmt: skip
    return {"machine": m, "ratios": {
        label: {"fastpath_over_kernel_esp": r} for label, r in
        (("64", 0.9), ("512", 2.0), ("1400", 4.0), ("IMIX", 1.5))},
        "kcrypto_ratios": {"chacha20-poly1305": {"64": 0.4, "1400": 0.6},
                           "aes128-gcm": {"64": 0.35}}}  # fmt: skip


def _check_shape(s: dict) -> None:
    assert set(s) == NAMES
    for name, e in s.items():
        assert set(e) >= FIELDS, name
        assert e["better"] in ("lower", "higher"), name
        assert isinstance(e["unit"], str) and isinstance(e["machine"], str), name
        assert e["target"] is None or isinstance(e["target"], float | int), name
        if e["target"] is None:
            assert e["target_why"], name
        if e["value"] is None:
            assert e["why"], name
        else:
            assert isinstance(e["value"], float | int), name


def test_nothing_measured_nothing_typed_in(summary, tmp_path):
    s = summary.write(tmp_path / "summary.json", None, None)
    _check_shape(s)
    assert all(e["value"] is None for e in s.values())
    assert json.loads((tmp_path / "summary.json").read_text()) == s


def test_values_come_from_the_results(summary):
    s = summary.entries(_host(), _vm())
    _check_shape(s)
    v = {name: e["value"] for name, e in s.items()}
    assert v["esp_instr_ratio_64"] == 0.9 and v["esp_instr_ratio_imix"] == 1.5
    assert v["clear_cpu_ratio_64"] == pytest.approx(0.5)  # 300 ns / 600 ns
    assert v["non_aead_over_floor"] == pytest.approx((1600 - 1100) / 200)
    assert v["aead_over_native_64"] == pytest.approx(1100 / 500)
    assert v["aead_over_native_1400"] == pytest.approx(12000 / 8000)
    assert v["learn_burst_p99_ms"] == 12.5 and v["learn_rate_flows_s"] == 20000.0
    assert v["lookup_1m_over_1k"] == pytest.approx(1.3)
    assert v["one_queue_2cpu_scaling_64"] is None  # no such mode in the bench yet
    assert s["esp_instr_ratio_64"]["machine"].startswith("VM: QEMU")
    assert "a vector instruction counts as one" in s["esp_instr_ratio_64"]["note"]
    assert s["clear_cpu_ratio_64"]["date"] == "2026-12-07 12:00 UTC"
    assert v["kcrypto_chacha_ratio_64"] == 0.4 and v["kcrypto_chacha_ratio_1400"] == 0.6
    assert v["kcrypto_gcm_ratio_64"] == 0.35
    assert v["kcrypto_gcm_ratio_1400"] is None and s["kcrypto_gcm_ratio_1400"]["why"]
    assert s["kcrypto_chacha_ratio_64"]["target"] == 0.3
    assert "a vector instruction counts as one" in s["kcrypto_gcm_ratio_64"]["note"]


def test_refused_live_frames_say_so(summary):
    host = _host() | {"rates": [], "live_frames_refused": "live frames refused: EPERM"}
    e = summary.entries(host, None)["clear_cpu_ratio_64"]
    assert e["value"] is None and "EPERM" in e["why"]
    vm = _vm()
    vm["machine"]["icount"] = "false"
    assert "without qemu -icount" in summary.entries(None, vm)["esp_instr_ratio_64"]["caveat"]
