# SPDX-License-Identifier: GPL-2.0-only
"""bench/results/summary.json, written by `make bench-e2e` from the figures of that run only.

Each name maps to {"value", "target", "better", "unit", "machine", "date"}; a figure the run did
not measure has "value": null and a "why" saying why; a goal the issue does not set has
"target": null and a "target_why". Nothing here is typed in: values come from the host run's
e2e.json (rates, lookups, learn, breakdown) and the VM run's vm-esp.json (ratios, machine).
Targets are issue 16's goals (its Goals table and the targets of its items 2-5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# name -> (target or None, "lower"|"higher", unit, where the target comes from or why none)
GOALS: dict[str, tuple[float | None, str, str, str]] = {
    "esp_instr_ratio_64": (0.5, "lower", "x", "Goals: <= 0.5x at 64 B"),
    "esp_instr_ratio_512": (1.0, "lower", "x", "Goals: <= 1.0x at 512 B"),
    "esp_instr_ratio_1400": (None, "lower", "x", "no goal: 1400 B is the kernel-crypto issue's"),
    "esp_instr_ratio_imix": (None, "lower", "x", "no goal set for IMIX"),
    "clear_cpu_ratio_64": (1.0, "higher", "x", "Goals: fastpath ESP >= kernel clear at 64 B"),
    "non_aead_over_floor": (2.0, "lower", "x", "item 2: at most 2x the floor program"),
    "aead_over_native_64": (1.3, "lower", "x", "item 3: at most 1.3x native"),
    "aead_over_native_1400": (1.3, "lower", "x", "item 3: at most 1.3x native"),
    "one_queue_2cpu_scaling_64": (1.8, "higher", "x", "item 4: 2 CPUs >= 1.8x one"),
    "one_queue_2cpu_scaling_1400": (1.8, "higher", "x", "item 4: 2 CPUs >= 1.8x one"),
    "learn_burst_p99_ms": (10.0, "lower", "ms", "item 5: p99 <= 10 ms"),
    "learn_rate_flows_s": (100_000.0, "higher", "flows/s", "item 5: >= 100k flows/s"),
    "lookup_1m_over_1k": (1.2, "lower", "x", "Goals: 1M vs 1k flows <= 1.2x"),
    # issue 17's goals: the fastpath on the xfp_crypto module's kfuncs / the kernel's ESP
    "kcrypto_chacha_ratio_64": (0.3, "lower", "x", "issue 17 Goals: <= 0.3x"),
    "kcrypto_chacha_ratio_1400": (0.5, "lower", "x", "issue 17 Goals: <= 0.5x"),
    "kcrypto_gcm_ratio_64": (0.3, "lower", "x", "issue 17 Goals: <= 0.3x"),
    "kcrypto_gcm_ratio_1400": (0.5, "lower", "x", "issue 17 Goals: <= 0.5x"),
    "kcrypto_aead_over_kernel_1400": (1.2, "lower", "x", "issue 17 Goals: <= 1.2x"),
}
KC_NAMES = {
    "chacha": "chacha20-poly1305",
    "gcm": "aes128-gcm",
}  # summary name -> bench/e2e.py KC_ALGS
ESP_LABELS = {"64": "64", "512": "512", "1400": "1400", "IMIX": "imix"}


def _machine(m: dict[str, Any] | None, vm: bool = False) -> str:
    if not m:
        return "?"
    s = f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPU, Linux {m.get('kernel', '?')}"
    if vm:
        s = f"VM: {s}, qemu {m.get('qemu_opts') or '(no extra options)'}"
    return s


def entries(host: dict[str, Any] | None, vm: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The summary from the run's own results: `host` is e2e.json's content, `vm` vm-esp.json's
    (either None when that part did not run)."""
    host_m = _machine(host.get("machine") if host else None)
    host_date = (host or {}).get("machine", {}).get("date", "")
    vm_m = _machine(vm.get("machine") if vm else None, vm=True)
    vm_date = (vm or {}).get("machine", {}).get("date", "")
    values: dict[str, tuple[float | None, str, str, str]] = {}  # name -> value, why, machine, date

    # VM: fastpath / kernel ESP, instructions per packet
    ratios = (vm or {}).get("ratios", {})
    icount = (vm or {}).get("machine", {}).get("icount") == "true"
    for label, suffix in ESP_LABELS.items():
        r = ratios.get(label, {}).get("fastpath_over_kernel_esp")
        why = "" if r is not None else "the VM --esp part did not run or measured no ratio here"
        if r is not None and not icount:
            why = "measured without qemu -icount: CPU time, not instructions"
        values[f"esp_instr_ratio_{suffix}"] = (r, why, vm_m, vm_date)

    # VM: the fastpath on kernel crypto / the kernel's ESP, same AEAD (bench/esp_vm.py)
    kc = (vm or {}).get("kcrypto_ratios", {})
    for short, alg in KC_NAMES.items():
        for size in ("64", "1400"):
            r = kc.get(alg, {}).get(size)
            why = "" if r is not None else "the VM --esp part ran no kernel-crypto part here"
            if r is not None and not icount:
                why = "measured without qemu -icount: CPU time, not instructions"
            values[f"kcrypto_{short}_ratio_{size}"] = (r, why, vm_m, vm_date)
    values["kcrypto_aead_over_kernel_1400"] = (
        None,
        "not measured: the bench has no kfunc-AEAD-alone against the kernel's own AEAD on the "
        "same bytes yet",
        vm_m,
        vm_date,
    )

    # host: per CPU time at 64 B, fastpath ESP vs kernel clear (packets per CPU-second)
    refused = (host or {}).get("live_frames_refused")
    rates = {(r["mode"], r["cpus"], r["sizes"]): r for r in (host or {}).get("rates", [])}
    src, k, f = (rates.get((m, 1, "64")) for m in ("source", "kernel", "fastpath"))
    clear, why = None, refused or "the host run measured no 64 B rates"
    if src and k and f:
        per = [1e9 * r["cpu_s"] / r["packets"] if r["packets"] else 0.0 for r in (src, k, f)]
        kp, fp = max(0.0, per[1] - per[0]), max(0.0, per[2] - per[0])
        clear, why = (kp / fp if fp else None), ""
    values["clear_cpu_ratio_64"] = (clear, why, host_m, host_date)

    # host: each program alone (bench/datapath_bench.py rows)
    rows = {r["size"]: r for r in (host or {}).get("breakdown", [])}
    r64 = rows.get(64)
    non_aead, why = None, "the per-program breakdown did not run"
    if r64 and r64.get("floor") and r64.get("bpf_seal") and r64.get("bpf_open"):
        outside = r64["encap"] + r64["decap"] - r64["bpf_seal"] - r64["bpf_open"]
        non_aead, why = outside / (2 * r64["floor"]), ""
    values["non_aead_over_floor"] = (non_aead, why, host_m, host_date)
    for size in (64, 1400):
        r = rows.get(size)
        v, why = None, f"no AEAD figures at {size} B (breakdown or native build missing)"
        if r and all(r.get(x) for x in ("bpf_seal", "bpf_open", "native_seal", "native_open")):
            v = (r["bpf_seal"] + r["bpf_open"]) / (r["native_seal"] + r["native_open"])
            why = ""
        values[f"aead_over_native_{size}"] = (v, why, host_m, host_date)

    for size in ("64", "1400"):
        # The 2-CPU runs feed one RX queue per CPU; one queue spread by a cpumap is item 4's.
        values[f"one_queue_2cpu_scaling_{size}"] = (
            None,
            "not measured: the bench has no one-RX-queue, 2-CPU mode yet (issue 16 item 4)"
            + (f"; and here {refused}" if refused else ""),
            host_m,
            host_date,
        )

    learn = (host or {}).get("learn")
    lwhy = "" if learn and learn.get("learned") else "the learning burst did not run"
    values["learn_burst_p99_ms"] = (learn["p99_ms"] if not lwhy else None, lwhy, host_m, host_date)
    values["learn_rate_flows_s"] = (learn["rate"] if not lwhy else None, lwhy, host_m, host_date)

    lookups = {c["flows"]: c for c in (host or {}).get("lookups", [])}
    lk, why = None, "the lookup cost was not measured at both 1k and 1M flows"
    if 1_000 in lookups and 1_000_000 in lookups:
        big = lookups[1_000_000]
        lk = (
            big["hit_ns"] / big["ref_hit_ns"]
            if big.get("ref_hit_ns")
            else big["hit_ns"] / lookups[1_000]["hit_ns"]
        )
        why = ""
    values["lookup_1m_over_1k"] = (lk, why, host_m, host_date)

    out: dict[str, dict[str, Any]] = {}
    for name, (target, better, unit, source) in GOALS.items():
        value, why, mach, date = values[name]
        e: dict[str, Any] = {
            "value": round(value, 4) if value is not None else None,
            "target": target,
            "better": better,
            "unit": unit,
            "machine": mach,
            "date": date,
        }
        if value is None:
            e["why"] = why or "not measured"
        elif why:
            e["caveat"] = why
        elif name.startswith(("esp_instr_ratio", "kcrypto_")):
            e["note"] = "instructions, not cycles: a vector instruction counts as one"
        if target is None:
            e["target_why"] = source
        out[name] = e
    return out


def write(path: Path, host: dict[str, Any] | None, vm: dict[str, Any] | None) -> dict[str, Any]:
    s = entries(host, vm)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s, indent=1) + "\n")
    return s


def load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
