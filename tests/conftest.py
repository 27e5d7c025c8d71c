# SPDX-License-Identifier: GPL-2.0-only
"""Shared fixtures: a test bed per test (unique namespace prefix, always removed)."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bed import Testbed, testbed
from testbed.vmrun import RUNNER_ENV, host_has_esp

UNIT_TIER = Path(__file__).resolve().parent / "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tiers: tests/unit runs anywhere (no root, no BPF, no namespaces); tests/bpf, tests/host
    and tests/vm need root (they load BPF programs and create network namespaces)."""
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: creates network namespaces and loads BPF")
        for item in items:
            if UNIT_TIER not in Path(str(item.path)).parents:
                item.add_marker(skip)


@functools.cache
def _esp_status() -> tuple[bool, str]:
    return host_has_esp()


def skip_without_esp() -> None:
    """`vm` tests need kernel ESP. Outside testbed.vmrun, skip them (saying how to run them)
    on a kernel without it; inside the runner (XFRM_FASTPATH_RUNNER set) they run, and fail."""
    if os.environ.get(RUNNER_ENV):
        return
    ok, why = _esp_status()
    if not ok:
        pytest.skip(
            f"needs kernel ESP ({why}): run `make test` or "
            "`.venv/bin/python -m testbed.vmrun vm-only`, which boot a kernel with ESP"
        )


@pytest.fixture(autouse=True)
def _vm_tests_need_esp(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("vm") is not None:
        skip_without_esp()


@pytest.fixture(scope="session")
def esp_kernel() -> None:
    """Depend on this from session-scoped fixtures of `vm` tests (e.g. a BPF program compiled
    once per session, ~40 s in the VM): they run after the per-test ESP check otherwise."""
    skip_without_esp()


_counter = 0


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A fresh four-namespace test bed, named uniquely, removed even when the test fails."""
    global _counter
    _counter += 1
    with testbed(prefix=f"t{os.getpid()}x{_counter}-") as b:
        yield b
