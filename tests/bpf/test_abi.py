# SPDX-License-Identifier: GPL-2.0-only
"""The one ABI test: every struct, enum and constant shared between C and Python agrees on both
sides. The registry is controller/datapath/abi.py (STRUCTS, CONSTANTS, ENUMS: the datapath's and
the resequencer's from bpf/include/xfp_defs.h, the learner's from bpf/include/learn_defs.h through
controller/datapath/learn_abi.py).

- gcc compiles the headers and prints sizeof/offsetof and every value (this machine's layout);
- BCC compiles the same structs for the BPF target and hands back its own ctypes layout, as it
  does for the programs' maps (root only);
- every #define and enum member of the headers has its Python twin (abi.UNMIRRORED says why
  the few that do not)."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from controller.datapath import abi

INCLUDE = Path(__file__).resolve().parents[2] / "bpf" / "include"
HEADERS = [INCLUDE / h for h in abi.HEADERS]


def _probe_source() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>"]
    lines += [f'#include "{h}"' for h in HEADERS]
    lines.append("int main(void){")
    for cname, cls in abi.STRUCTS.items():
        lines.append(f'printf("size {cname} %zu\\n", sizeof(struct {cname}));')
        for fname, _ in cls._fields_:
            lines.append(
                f'printf("field {cname}.{fname} %zu %zu\\n", offsetof(struct {cname}, {fname}),'
                f" sizeof(((struct {cname} *)0)->{fname}));"
            )
    for name in abi.CONSTANTS:
        lines.append(f'printf("const {name} %lld\\n", (long long)({name}));')
    for prefix, en in abi.ENUMS.items():
        for member in en:
            c = f"{prefix}{member.name}"
            lines.append(f'printf("const {c} %lld\\n", (long long)({c}));')
    lines.append("return 0;}")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, ...]]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed: cannot compile the layout probe")
    d = tmp_path_factory.mktemp("abi")
    (d / "probe.c").write_text(_probe_source())
    subprocess.run(["gcc", "-Wall", "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    table: dict[str, tuple[int, ...]] = {}
    for line in out.splitlines():
        kind, name, *nums = line.split()
        table[f"{kind} {name}"] = tuple(int(n) for n in nums)
    return table


@pytest.mark.parametrize("cname", sorted(abi.STRUCTS))
def test_struct_layout_matches(cname: str, c_layout: dict[str, tuple[int, ...]]) -> None:
    cls = abi.STRUCTS[cname]
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
    for name, value in abi.CONSTANTS.items():
        assert c_layout[f"const {name}"] == (value,), f"#define {name}"
    for prefix, en in abi.ENUMS.items():
        for member in en:
            assert c_layout[f"const {prefix}{member.name}"] == (int(member),), (
                f"{prefix}{member.name}"
            )


def test_every_c_enum_member_is_mirrored() -> None:
    """A reason added to the header without its Python twin fails here (and not silently in
    the metrics, which label by these names)."""
    text = "\n".join(h.read_text() for h in HEADERS)
    for prefix, en in abi.ENUMS.items():
        c_names = set(re.findall(rf"\b{prefix}([A-Z0-9_]+)\s*=", text))
        # A count (XFP_DIR_MAX) may be mirrored as a constant rather than as a member.
        counts = {n.removeprefix(prefix) for n in abi.CONSTANTS if n.startswith(prefix)}
        assert c_names - counts == {m.name for m in en}, f"enum members with prefix {prefix}"
    c_enums = set(re.findall(r"^enum (\w+) \{", text, re.M))
    assert len(c_enums) == len(abi.ENUMS), f"every enum of the headers is mirrored: {c_enums}"


@pytest.mark.parametrize("header", abi.HEADERS)
def test_every_c_define_is_mirrored(header: str) -> None:
    """Every value #define of the shared headers has its twin in the registry (include guards and
    abi.UNMIRRORED aside): a constant cannot be added on one side only."""
    text = (INCLUDE / header).read_text()
    names = set(re.findall(r"^[ \t]*#define ([A-Z][A-Z0-9_]*)[ \t]+\S", text, re.M))
    assert names, f"{header}: the #defines were parsed"
    missing = names - set(abi.CONSTANTS) - set(abi.UNMIRRORED)
    assert not missing, f"{header}: #defines without a Python twin in abi.CONSTANTS: {missing}"


@pytest.mark.skipif(os.geteuid() != 0, reason="BCC needs root to create the maps")
def test_bpf_target_layout_matches() -> None:
    """BCC compiles each registry struct for the BPF target, as a map leaf, and derives its ctypes
    layout from that compile (as for the programs' own maps): it must be ours, field by field."""
    bcc = pytest.importorskip("bcc")
    src = ["#include <uapi/linux/bpf.h>", *[f'#include "{h.name}"' for h in HEADERS]]
    names = sorted(abi.STRUCTS)
    src += [f"BPF_ARRAY(abi_{i}, struct {c}, 1);" for i, c in enumerate(names)]
    b = bcc.BPF(text="\n".join(src).encode(), cflags=[f"-I{INCLUDE}"])
    try:
        for i, cname in enumerate(names):
            theirs, ours = b[f"abi_{i}".encode()].Leaf, abi.STRUCTS[cname]
            assert ctypes.sizeof(theirs) == ctypes.sizeof(ours), f"sizeof(struct {cname}), BPF"
            for fname, _ in ours._fields_:
                t, o = getattr(theirs, fname), getattr(ours, fname)
                assert (t.offset, t.size) == (o.offset, o.size), f"{cname}.{fname}, BPF target"
    finally:
        b.cleanup()


def test_derived_names_follow_the_enums() -> None:
    assert abi.RESEQ_STATS[abi.ReseqStat.FRAGMENT] == "fragment", "resequencer counter names"
    assert len(abi.RESEQ_STATS) == abi.ReseqStat.MAX, "one name per resequencer counter"
    assert abi.stat_index(1, 0) == abi.Reason.MAX, "xfp_stats index: dir * XFP_R_MAX + reason"


def test_byte_order_helpers() -> None:
    key = abi.FlowKey(saddr=abi.be32("10.1.0.2"), sport=abi.be16(0x1234))
    raw = bytes(key)
    assert raw[8:12] == bytes([10, 1, 0, 2]), "be32 stores the address in wire order"
    assert raw[16:18] == b"\x12\x34", "be16 stores the port in wire order"
    assert abi.ip_of(key.saddr) == "10.1.0.2", "ip_of reverses be32"
    assert abi.from_be32(abi.be32(0xDEADBEEF)) == 0xDEADBEEF, "from_be32 reverses be32"
