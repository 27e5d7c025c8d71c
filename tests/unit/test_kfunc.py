# SPDX-License-Identifier: GPL-2.0-only
"""controller/datapath/kfunc.py without a kernel: the placeholder-call rewrite, instruction by
instruction, and the BTF reading against the module built for the VM kernel (when built), whose
kfunc ids bpftool must agree with."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from controller.datapath import kcrypto_abi, kfunc

CACHE = Path("/var/cache/xfrm-fastpath/kernel")


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def test_rewrite_turns_placeholder_calls_only() -> None:
    ids = {name: 100_000 + i for i, name in enumerate(kcrypto_abi.KFUNCS.values())}
    prog = [
        insn(0x85, imm=kcrypto_abi.CALL_XDP_SEAL),  # placeholder: rewritten
        insn(0x85, imm=1),  # bpf_map_lookup_elem: a real helper
        insn(0x85, src=1, imm=kcrypto_abi.CALL_XDP_SEAL),  # bpf-to-bpf call: not ours
        insn(0x18, dst=1, imm=kcrypto_abi.CALL_XDP_SEAL),  # ld_imm64 of the same number
        insn(0x00),
        insn(0x85, imm=kcrypto_abi.CALL_SKB_OPEN),  # placeholder: rewritten
        insn(0x95),  # exit
    ]
    out, n = kfunc.rewrite_kfunc_calls(b"".join(prog), kcrypto_abi.KFUNCS, ids)
    assert n == 2, "two placeholder calls rewritten"
    got = [out[i : i + 8] for i in range(0, len(out), 8)]
    want0 = insn(0x85, src=2, off=1, imm=ids["xfp_kc_xdp_seal"])
    assert got[0] == want0, "src_reg BPF_PSEUDO_KFUNC_CALL, off = fd_array index, imm = BTF id"
    assert got[5] == insn(0x85, src=2, off=1, imm=ids["xfp_kc_skb_open"]), "second kfunc call"
    assert got[1:5] + got[6:] == prog[1:5] + prog[6:], "every other instruction unchanged"


def test_rewrite_refuses_a_torn_program() -> None:
    with pytest.raises(kfunc.KfuncError):
        kfunc.rewrite_kfunc_calls(b"\0" * 12, kcrypto_abi.KFUNCS, {})


def test_module_btf_ids_agree_with_bpftool(tmp_path: Path) -> None:
    """The ids kfunc_btf_ids() computes (split BTF numbered after vmlinux's) are bpftool's."""
    abi = (CACHE / "current.env").read_text().split("=", 1)[1].strip() if CACHE.exists() else ""
    ko = CACHE / "kmod" / abi / "xfp_crypto.ko"
    base = CACHE / f"vmlinux-{abi}.btf"
    if not (abi and ko.is_file() and base.is_file()):
        pytest.skip("the module is not built (scripts/build-kmod.sh)")
    if shutil.which("objcopy") is None or shutil.which("bpftool") is None:
        pytest.skip("objcopy or bpftool missing")
    raw = tmp_path / "mod.btf"
    subprocess.run(
        ["objcopy", f"--dump-section=.BTF={raw}", str(ko), str(tmp_path / "ko")], check=True
    )
    vmlinux = kfunc._parse_btf(base.read_bytes())
    mod = kfunc._parse_btf(raw.read_bytes(), vmlinux.str_len)
    ours = {n: vmlinux.n_types + 1 + i for n, i in mod.funcs.items()}
    dump = subprocess.run(
        ["bpftool", "-B", str(base), "btf", "dump", "file", str(ko)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    theirs = {m[1]: int(m[0]) for m in re.findall(r"^\[(\d+)\] FUNC '(\w+)'", dump, re.M)}
    for name in kcrypto_abi.KFUNCS.values():
        assert ours.get(name) == theirs[name], f"BTF id of {name}"
