# SPDX-License-Identifier: GPL-2.0-only
"""Shared fixtures: a test bed per test (unique namespace prefix, always removed)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from controller.testbed import Testbed, testbed


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: creates network namespaces and loads BPF")
        for item in items:
            item.add_marker(skip)


_counter = 0


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """A fresh four-namespace test bed, named uniquely, removed even when the test fails."""
    global _counter
    _counter += 1
    with testbed(prefix=f"t{os.getpid()}x{_counter}-") as b:
        yield b
