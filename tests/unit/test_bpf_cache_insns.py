# SPDX-License-Identifier: GPL-2.0-only
"""The compile cache's instruction handling (controller/datapath/bpf_cache.py), on hand-made
instructions: which are map references, how they are bound to other fds, what is refused, and
which part of a source is its map prologue."""

from __future__ import annotations

import struct

import pytest

from controller.datapath import bpf_cache as C


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def ld_map(fd: int, src: int = C.BPF_PSEUDO_MAP_FD, dst: int = 1) -> bytes:
    return insn(C.BPF_LD_IMM64, dst, src, imm=fd) + insn(0)


MOV_R0_0 = insn(0xB7)  # r0 = 0
EXIT = insn(0x95)
CALL_LOOKUP = insn(0x85, imm=1)  # bpf_map_lookup_elem


def test_references_are_found_and_bound_to_other_fds() -> None:
    prog = ld_map(7) + CALL_LOOKUP + ld_map(9, C.BPF_PSEUDO_MAP_VALUE, 2) + MOV_R0_0 + EXIT
    refs = C.map_references(prog, {7: "xfp_flows", 9: "xfp_stats"})
    assert refs == [(0, "xfp_flows"), (3, "xfp_stats")]
    bound = C.bind(prog, refs, {"xfp_flows": 40, "xfp_stats": 41})
    assert C.map_references(bound, {40: "xfp_flows", 41: "xfp_stats"}) == refs
    assert bound[8:24] == prog[8:24] and bound[40:] == prog[40:], "nothing else changes"
    assert struct.unpack_from("<i", bound, 4)[0] == 40
    assert struct.unpack_from("<i", bound, 28)[0] == 41
    assert bound[1] == prog[1], "registers and pseudo kind kept"


def test_plain_64_bit_constants_are_not_references() -> None:
    prog = ld_map(0x12345678, src=0) + MOV_R0_0 + EXIT
    assert C.map_references(prog, {}) == []


def test_second_slot_of_a_wide_load_is_never_read_as_an_instruction() -> None:
    # The second slot's code byte is 0 in the kernel's encoding; even if it looked like another
    # BPF_LD_IMM64 it belongs to the first.
    trick = insn(C.BPF_LD_IMM64, 1, C.BPF_PSEUDO_MAP_FD, imm=7) + insn(
        C.BPF_LD_IMM64, 0, C.BPF_PSEUDO_MAP_FD, imm=99
    )
    assert C.map_references(trick + EXIT, {7: "a"}) == [(0, "a")]


@pytest.mark.parametrize(
    ("prog", "why"),
    [
        (ld_map(5) + EXIT, "fd 5, no table"),
        (ld_map(7, src=3) + EXIT, "src_reg 3"),  # BPF_PSEUDO_BTF_ID: not something BCC emits
        (EXIT[:5], "not a multiple"),
    ],
)
def test_what_cannot_be_described_is_uncacheable(prog: bytes, why: str) -> None:
    with pytest.raises(C.Uncacheable, match=why):
        C.map_references(prog, {7: "a"})


def test_bind_refuses_a_reference_that_is_not_a_wide_load() -> None:
    with pytest.raises(ValueError):
        C.bind(MOV_R0_0 + EXIT, [(0, "a")], {"a": 3})


def test_prologue_ends_at_the_maps_include() -> None:
    src = (
        b"/* header */\n#define XFP_MAPS_DATAPATH\n#include <uapi/linux/bpf.h>\n"
        b'#include "maps.h"\n#include "pkt/parsing.h"\nint f(void *c) { return 0; }\n'
    )
    pro = C.maps_prologue(src)
    assert pro.startswith(
        b'/* header */\n#define XFP_MAPS_DATAPATH\n#include <uapi/linux/bpf.h>\n#include "maps.h"\n'
    )
    assert b"parsing.h" not in pro and pro.endswith(C.PROLOGUE_FUNCTION)
    with pytest.raises(C.Uncacheable):
        C.maps_prologue(b"BPF_ARRAY(a, u32, 1);\n")


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(C.ENV, "off")
    assert C.cache_dir() is None
    monkeypatch.setenv(C.ENV, "/var/tmp/x")
    assert str(C.cache_dir()) == "/var/tmp/x"
    monkeypatch.delenv(C.ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/var/cache")
    assert str(C.cache_dir()) == "/var/cache/xfrm-fastpath/bpf"
