# SPDX-License-Identifier: GPL-2.0-only
"""The house rules that the layout states, checked on the source (no root, nothing imported):

- controller/ is what runs on a gateway: nothing in it imports the test beds (testbed/) or test
  code (tests/), so scripts/install-gateway.sh can ship controller/ alone;
- controller/core/ is pure: no BPF, netlink, socket or file-system I/O imports, and nothing
  from the adapter layers (datapath, netlink, telemetry, agent);
- sizes a newcomer can read: no module over 700 lines, no class over 300, no function over 80.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONTROLLER = ROOT / "controller"

MAX_MODULE_LINES = 700
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80

# What the pure core may not import (top-level package names and project packages).
CORE_FORBIDDEN = (
    "bcc",
    "pyroute2",
    "socket",
    "select",
    "subprocess",
    "ctypes",
    "prometheus_client",
    "controller.datapath",
    "controller.netlink",
    "controller.telemetry",
    "controller.agent",
    "testbed",
    "tests",
)


def _sources(top: Path) -> list[Path]:
    return sorted(p for p in top.rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a file, function-local ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _hits(module: str, banned: tuple[str, ...]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def test_controller_imports_no_testbed_or_test_code() -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in _sources(CONTROLLER)
        for line, mod in _imports(p)
        if _hits(mod, ("testbed", "tests", "conftest", "packets", "learner_util"))
    ]
    assert not bad, "controller/ must not import the test beds or tests:\n" + "\n".join(bad)


def test_core_is_pure() -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{line} imports {mod}"
        for p in _sources(CONTROLLER / "core")
        for line, mod in _imports(p)
        if _hits(mod, CORE_FORBIDDEN)
    ]
    assert not bad, "controller/core/ imports I/O or adapter layers:\n" + "\n".join(bad)


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The scan above cannot pass vacuously: it finds a function-local import of testbed."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from testbed.bed import Testbed\n    return Testbed\n")
    assert [m for _, m in _imports(sample) if _hits(m, ("testbed",))] == ["testbed.bed"]


def _spans(path: Path) -> Iterator[tuple[str, str, int]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            yield "class", node.name, node.end_lineno - node.lineno + 1
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield "function", node.name, node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("path", _sources(CONTROLLER), ids=lambda p: str(p.relative_to(ROOT)))
def test_sizes_a_reader_can_hold(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"
    limits = {"class": MAX_CLASS_LINES, "function": MAX_FUNCTION_LINES}
    over = [f"{kind} {name}: {n} lines" for kind, name, n in _spans(path) if n > limits[kind]]
    assert not over, f"{path.relative_to(ROOT)}: " + "; ".join(over)
