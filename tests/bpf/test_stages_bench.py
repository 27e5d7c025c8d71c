# SPDX-License-Identifier: GPL-2.0-only
"""`make bench`: the datapath's per-packet time by stage (bench/stages.py), floor beside it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.mark.bench
def test_stage_breakdown_table() -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "stages.py"
    spec = importlib.util.spec_from_file_location("stages", path)
    assert spec and spec.loader, "bench/stages.py is importable"
    stages = importlib.util.module_from_spec(spec)
    sys.modules["stages"] = stages  # dataclasses look the module up
    spec.loader.exec_module(stages)
    b = stages.measure()
    print("\n" + stages.table(b))
    assert len(b.encap) == len(stages.ENCAP_STAGES), "every encap stage measured"
    assert len(b.decap) == len(stages.DECAP_STAGES), "every decap stage measured"
    assert b.encap[-1].cum > b.floor, "the whole encap program costs more than the floor"
    assert b.decap[-1].cum > b.floor, "the whole decap program costs more than the floor"
