# SPDX-License-Identifier: GPL-2.0-only
"""bpf/include/xfp_defs.h and controller/datapath/abi.py agree: struct sizes, field offsets and
sizes, enum values and constants, as gcc lays them out for this machine (the BPF target has the same
layout: LP64, natural alignment)."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.datapath import abi as defs

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "xfp_defs.h"


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", f'#include "{HEADER}"', "int main(void){"]
    for cname, cls in defs.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for fname, _ in cls._fields_:
            lines.append(
                f'printf("field {cname}.{fname} %zu %zu\\n", offsetof(struct {cname}, {fname}),'
                f" sizeof(((struct {cname} *)0)->{fname}));"
            )
    for name in defs.CONSTANTS:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    for prefix, en in defs.ENUMS.items():
        for member in en:
            c = f"{prefix}{member.name}"
            lines.append(f'printf("const {c} %lld\\n", (long long)({c}));')
    lines.append("return 0;}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the layout probe")
    d = tmp_path_factory.mktemp("defs")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run(["gcc", "-Wall", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    table: dict[str, tuple[int, ...]] = {}
    for line in out.splitlines():
        kind, name, *nums = line.split()
        table[f"{kind} {name}"] = tuple(int(n) for n in nums)
    return table


@pytest.mark.parametrize("cname", sorted(defs.STRUCTS))
def test_struct_layout_matches(cname: str, c_layout: dict[str, tuple[int, ...]]) -> None:
    cls = defs.STRUCTS[cname]
    assert c_layout[f"size {cname}"] == (ctypes.sizeof(cls),), f"sizeof(struct {cname})"
    covered = 0
    for fname, _ in cls._fields_:
        field = getattr(cls, fname)
        c_off, c_size = c_layout[f"field {cname}.{fname}"]
        assert (field.offset, field.size) == (c_off, c_size), f"{cname}.{fname} offset/size"
        covered += field.size
    # Every C byte that is not padding is mirrored: no field missing on the Python side.
    assert covered == ctypes.sizeof(cls), f"{cname}: Python fields cover the whole C struct"


def test_constants_and_enums_match(c_layout: dict[str, tuple[int, ...]]) -> None:
    for name, value in defs.CONSTANTS.items():
        assert c_layout[f"const {name}"] == (value,), f"#define {name}"
    for prefix, en in defs.ENUMS.items():
        for member in en:
            assert c_layout[f"const {prefix}{member.name}"] == (int(member),), (
                f"{prefix}{member.name}"
            )


def test_every_c_enum_member_is_mirrored() -> None:
    """A reason added to the header without its Python twin fails here (and not silently in
    the metrics, which label by these names)."""
    text = HEADER.read_text()
    for prefix, en in defs.ENUMS.items():
        c_names = set(re.findall(rf"\b{prefix}([A-Z0-9_]+)\s*=", text))
        assert c_names == {m.name for m in en}, f"enum members with prefix {prefix}"


def test_byte_order_helpers() -> None:
    key = defs.FlowKey(saddr=defs.be32("10.1.0.2"), sport=defs.be16(0x1234))
    raw = bytes(key)
    assert raw[8:12] == bytes([10, 1, 0, 2]), "be32 stores the address in wire order"
    assert raw[16:18] == b"\x12\x34", "be16 stores the port in wire order"
    assert defs.ip_of(key.saddr) == "10.1.0.2", "ip_of reverses be32"
    assert defs.from_be32(defs.be32(0xDEADBEEF)) == 0xDEADBEEF, "from_be32 reverses be32"
