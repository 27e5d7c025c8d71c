# SPDX-License-Identifier: GPL-2.0-only
"""Split the `vm` tests over several VM boots that run at the same time (testbed/vmrun.py).

Why: under qemu TCG a guest is mostly busy on ONE vCPU at a time (BCC's clang compiling a
datapath program, a single-threaded traffic loop), or idle waiting for a lifetime, a rekey or a
DPD timer to fire. One VM therefore leaves most of a 2-CPU machine unused; two VMs side by side
fill it, and the suite's wall time falls towards the longest shard.

How: test files are dealt longest first onto the shard with the least work so far, by the
seconds each file took in a recorded run (testbed/vm_weights.json, written by
`python -m testbed.vmrun vm-only --record-weights`); a file not in the record counts as
DEFAULT_WEIGHT_S. Each shard's pytest writes JUnit XML, from which the per-file times of this run
are printed at the end (and recorded, when asked).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = Path(__file__).resolve().parent / "vm_weights.json"
DEFAULT_WEIGHT_S = 300.0
# `vm`-marked tests outside tests/vm (netlink and packaging tests that need kernel XFRM): one
# unit, run by one shard, named by this label; its files are those that mention the marker
# (collecting every host test module under TCG would cost that shard minutes).
OTHER_TIERS = "tests/unit tests/bpf tests/host"


def other_tier_files(root: Path = ROOT) -> list[str]:
    """Files of the other tiers that use the `vm` marker (pytest -m vm picks their tests)."""
    out = []
    for tier in OTHER_TIERS.split():
        for p in sorted((root / tier).glob("test_*.py")):
            if "mark.vm" in p.read_text(errors="replace"):
                out.append(p.relative_to(root).as_posix())
    return out


def vm_test_files(root: Path = ROOT) -> list[str]:
    """Every unit of work: each tests/vm file, and the other tiers' vm-marked tests as one."""
    files = sorted(p.relative_to(root).as_posix() for p in (root / "tests/vm").glob("test_*.py"))
    return [*files, OTHER_TIERS]


def unit_paths(unit: str, root: Path = ROOT) -> list[str]:
    """The pytest paths of a unit."""
    return other_tier_files(root) if unit == OTHER_TIERS else [unit]


def load_weights(path: Path = WEIGHTS) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.get("seconds", {}).items()}


def partition(units: list[str], weights: dict[str, float], shards: int) -> list[list[str]]:
    """Longest-processing-time-first: each unit, heaviest first, to the lightest shard."""
    bins: list[tuple[float, list[str]]] = [(0.0, []) for _ in range(max(shards, 1))]
    for unit in sorted(units, key=lambda u: (-weights.get(u, DEFAULT_WEIGHT_S), u)):
        i = min(range(len(bins)), key=lambda j: bins[j][0])
        load, members = bins[i]
        bins[i] = (load + weights.get(unit, DEFAULT_WEIGHT_S), [*members, unit])
    return [sorted(m) for _, m in bins if m]


def planned_seconds(shard: list[str], weights: dict[str, float]) -> float:
    return sum(weights.get(u, DEFAULT_WEIGHT_S) for u in shard)


def unit_of(classname: str) -> str:
    """The unit (see vm_test_files) of a JUnit classname ("tests.vm.test_vm_x[.Class]")."""
    parts: list[str] = []
    for part in classname.split("."):
        parts.append(part)
        if part.startswith("test_"):
            break
    path = "/".join(parts) + ".py"
    return path if path.startswith("tests/vm/") else OTHER_TIERS


def _testcases(xml_paths: list[Path]) -> Iterator[ET.Element]:
    """Every testcase element of pytest's JUnit XML files (missing or unreadable ones skipped:
    a shard that died wrote none)."""
    for path in xml_paths:
        try:
            tree = ET.parse(path)
        except (OSError, ET.ParseError):
            continue
        yield from tree.iter("testcase")


def junit_seconds(xml_paths: list[Path]) -> dict[str, float]:
    """Seconds per unit from pytest's JUnit XML (each testcase's time: setup, call and
    teardown; module fixtures are charged to the test that ran them)."""
    seconds: dict[str, float] = defaultdict(float)
    for case in _testcases(xml_paths):
        seconds[unit_of(case.get("classname", ""))] += float(case.get("time", "0") or 0)
    return dict(seconds)


def junit_failures(xml_paths: list[Path]) -> list[str]:
    """One line per failed or erred test in pytest's JUnit XML: its id and the first line of
    pytest's message (printed last by the runner, so that a log's tail names what failed)."""
    lines = []
    for case in _testcases(xml_paths):
        for outcome in case:
            if outcome.tag in ("failure", "error"):
                message = (outcome.get("message") or "").strip().splitlines() or [""]
                test = f"{case.get('classname', '')}::{case.get('name', '')}"
                lines.append(f"{outcome.tag.upper()} {test}: {message[0][:300]}")
    return lines


def record_weights(seconds: dict[str, float], path: Path = WEIGHTS) -> None:
    """Merge this run's per-unit seconds into the record (units not run keep theirs)."""
    old = load_weights(path)
    old.update({k: round(v, 1) for k, v in seconds.items()})
    doc = {
        "about": "seconds per vm test file in one recorded run under qemu TCG; "
        "testbed/vmshards.py deals files onto shards by these",
        "seconds": dict(sorted(old.items())),
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
