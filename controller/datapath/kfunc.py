# SPDX-License-Identifier: GPL-2.0-only
"""Load BCC-compiled programs that call kernel functions (kfuncs) of a module.

BCC cannot emit a kfunc call. A program calls a placeholder helper id instead (a number no
kernel uses for a helper; bpf/include/kcrypto/kcrypto.h declares them, kcrypto_abi.KFUNCS names
the kfunc behind each), and this module, after BCC has compiled it:

1. takes the function's instructions from BCC (`BPF.dump_func`: bpf_function_start/size; map
   references are already resolved to map fds, which stay valid while the BPF object lives);
2. finds the module's BTF object (BPF_BTF_GET_NEXT_ID, BPF_OBJ_GET_INFO_BY_FD: the kernel BTF
   object named after the module) and each kfunc's BTF type id in it (/sys/kernel/btf/MODULE,
   split BTF on top of /sys/kernel/btf/vmlinux);
3. rewrites every `call PLACEHOLDER` (BPF_JMP|BPF_CALL, src_reg 0) into a kfunc call:
   src_reg = BPF_PSEUDO_KFUNC_CALL (2), imm = the kfunc's BTF id, off = 1, the index in fd_array
   of the module's BTF fd (index 0 would mean vmlinux; kernel/bpf/verifier.c,
   __find_kfunc_desc_btf());
4. loads the result with its own BPF_PROG_LOAD (license GPL: kfuncs require it), passing
   fd_array = [0, module BTF fd].

The loaded program holds a reference on the module (btf_try_get_module() in the verifier), so
`rmmod` is refused while it exists. The same step can later carry other instruction rewrites.

    b = compile_bpf("tests/kcrypto_test.c")                    # controller/datapath/loader.py
    prog = load_with_kfuncs(b, "xfp_kc_test_xdp", Prog.XDP)   # prog.fd, prog.close()
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from controller.datapath import bpfsys, kcrypto_abi
from controller.datapath.program import LoaderError, Prog

SYS_BTF = Path("/sys/kernel/btf")

# include/uapi/linux/bpf.h: enum bpf_cmd, enum bpf_prog_type, pseudo call kinds.
BPF_PROG_LOAD = 5
BPF_BTF_GET_FD_BY_ID = 19
BPF_BTF_GET_NEXT_ID = 23
PROG_TYPES = {Prog.XDP: 6, Prog.SCHED_CLS: 3}
BPF_JMP_CALL = 0x85  # BPF_JMP | BPF_CALL
BPF_PSEUDO_KFUNC_CALL = 2
MODULE_BTF_FD_INDEX = 1  # fd_array[0] stays 0 (vmlinux)
BPF_F_XDP_HAS_FRAGS = 1 << 5  # the program accepts multi-buffer frames

# include/uapi/linux/btf.h: BTF_KIND_FUNC, and the bytes each kind carries after struct
# btf_type (12 bytes), as a function of vlen.
BTF_KIND_FUNC = 12
_BTF_EXTRA = {
    1: lambda v: 4,  # INT
    3: lambda v: 12,  # ARRAY
    4: lambda v: 12 * v,  # STRUCT
    5: lambda v: 12 * v,  # UNION
    6: lambda v: 8 * v,  # ENUM
    13: lambda v: 8 * v,  # FUNC_PROTO
    14: lambda v: 4,  # VAR
    15: lambda v: 12 * v,  # DATASEC
    17: lambda v: 4,  # DECL_TAG
    19: lambda v: 12 * v,  # ENUM64
}


class KfuncError(LoaderError):
    """The module, its BTF or a kfunc is missing, or the kernel refused the program; the
    message says which (with the verifier's log when it has one)."""


# ---- BTF ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _BtfBlob:
    n_types: int  # types in this blob (ids 1..n in a base, start..start+n-1 in a split)
    str_len: int
    funcs: dict[str, int]  # FUNC name -> index of the type in this blob (0-based)


def _parse_btf(raw: bytes, base_str_len: int = 0) -> _BtfBlob:
    """struct btf_header, then the type section (only FUNC names are collected) and the string
    section. In split BTF a name offset at or above the base's string length points into this
    blob's own strings (tools/lib/bpf/btf.c, btf__str_by_offset())."""
    magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
        "<HBBIIIII", raw
    )
    if magic != 0xEB9F:
        raise KfuncError(f"not BTF (magic {magic:#x})")
    types = hdr_len + type_off
    strings = hdr_len + str_off
    pos, end, n = types, types + type_len, 0
    funcs: dict[str, int] = {}
    while pos < end:
        name_off, info, _ = struct.unpack_from("<III", raw, pos)
        kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
        if kind == BTF_KIND_FUNC and name_off >= base_str_len:
            s = strings + name_off - base_str_len
            funcs[raw[s : raw.index(b"\0", s)].decode()] = n
        pos += 12 + _BTF_EXTRA.get(kind, lambda v: 0)(vlen)
        n += 1
    return _BtfBlob(n, str_len, funcs)


def kfunc_btf_ids(module: str, names: list[str] | None = None) -> dict[str, int]:
    """BTF type ids of the module's functions (all FUNCs, or `names`), as the running kernel
    numbers them: a module's BTF continues the ids of vmlinux's."""
    try:
        base = _parse_btf((SYS_BTF / "vmlinux").read_bytes())
        raw = (SYS_BTF / module).read_bytes()
    except FileNotFoundError as e:
        raise KfuncError(
            f"no BTF for {module} ({e.filename}): is the module loaded, and was it built with "
            "BTF (scripts/build-kmod.sh)?"
        ) from e
    blob = _parse_btf(raw, base.str_len)
    ids = {name: base.n_types + 1 + i for name, i in blob.funcs.items()}
    if names is None:
        return ids
    missing = [n for n in names if n not in ids]
    if missing:
        raise KfuncError(f"module {module} has no kfunc {', '.join(missing)} in its BTF")
    return {n: ids[n] for n in names}


class _IdAttr(ctypes.Structure):
    """union bpf_attr for BPF_*_GET_NEXT_ID / BPF_BTF_GET_FD_BY_ID."""

    _fields_ = [("id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class _BtfInfo(ctypes.Structure):
    """struct bpf_btf_info (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("name", ctypes.c_uint64),
        ("name_len", ctypes.c_uint32),
        ("kernel_btf", ctypes.c_uint32),
    ]


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    ret = bpfsys._libc.syscall(
        ctypes.c_long(bpfsys._nr_bpf()),
        ctypes.c_long(cmd),
        ctypes.byref(attr),
        ctypes.c_uint(ctypes.sizeof(attr)),
    )
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def module_btf_fd(module: str) -> int:
    """An fd of the kernel BTF object named `module` (the caller closes it)."""
    attr = _IdAttr(id=0)
    while True:
        try:
            _sys_bpf(BPF_BTF_GET_NEXT_ID, attr)
        except OSError as e:
            raise KfuncError(f"no BTF object for module {module}: is it loaded?") from e
        fd = _sys_bpf(BPF_BTF_GET_FD_BY_ID, _IdAttr(id=attr.next_id))
        name = ctypes.create_string_buffer(64)
        info = _BtfInfo(name=ctypes.addressof(name), name_len=64)
        ia = bpfsys._InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
        try:
            _sys_bpf(bpfsys.BPF_OBJ_GET_INFO_BY_FD, ia)
        except OSError:
            os.close(fd)
            raise
        if info.kernel_btf and name.value.decode() == module:
            return fd
        os.close(fd)
        attr.id = attr.next_id


# ---- rewrite and load ---------------------------------------------------------------------------
def rewrite_kfunc_calls(
    insns: bytes, placeholders: Mapping[int, str], btf_ids: Mapping[str, int]
) -> tuple[bytes, int]:
    """Each `call PLACEHOLDER` of `placeholders` becomes a kfunc call of the named function;
    returns the new instructions and how many calls were rewritten. struct bpf_insn: code (u8),
    dst_reg:4 | src_reg:4 (u8, little-endian bitfield: dst in the low nibble), off (s16),
    imm (s32)."""
    if len(insns) % 8:
        raise KfuncError(f"instructions are {len(insns)} bytes, not a multiple of 8")
    out = bytearray(insns)
    n = 0
    for pos in range(0, len(out), 8):
        code, regs, _off, imm = struct.unpack_from("<BBhi", out, pos)
        if code != BPF_JMP_CALL or regs >> 4 != 0 or imm not in placeholders:
            continue
        regs = (regs & 0x0F) | (BPF_PSEUDO_KFUNC_CALL << 4)
        struct.pack_into(
            "<BBhi", out, pos, code, regs, MODULE_BTF_FD_INDEX, btf_ids[placeholders[imm]]
        )
        n += 1
    return bytes(out), n


class _ProgLoadAttr(ctypes.Structure):
    """The BPF_PROG_LOAD member of union bpf_attr (include/uapi/linux/bpf.h, as of 6.1)."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("line_info_cnt", ctypes.c_uint32),
        ("attach_btf_id", ctypes.c_uint32),
        ("attach_prog_fd", ctypes.c_uint32),
        ("core_relo_cnt", ctypes.c_uint32),
        ("fd_array", ctypes.c_uint64),
        ("core_relos", ctypes.c_uint64),
        ("core_relo_rec_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


class KfuncProgram:
    """A program loaded here: `.fd` (what prog_test_run and BCC's attach_xdp take), `.name`;
    close() releases it (and with the last one, the module reference)."""

    def __init__(self, fd: int, name: str, kfunc_calls: int) -> None:
        self.fd = fd
        self.name = name
        self.kfunc_calls = kfunc_calls

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    cleanup = close  # as BCC's module object spells it (Loader.close() calls it)

    def __enter__(self) -> KfuncProgram:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def prog_load(
    prog: Prog,
    insns: bytes,
    name: str,
    fd_array: list[int],
    prog_flags: int = 0,
    log_size: int = 1 << 22,
) -> int:
    """BPF_PROG_LOAD with fd_array (and BPF_F_* `prog_flags`); on refusal, again with the
    verifier's log for the error."""
    buf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    fds = (ctypes.c_int32 * len(fd_array))(*fd_array)
    attr = _ProgLoadAttr(
        prog_type=PROG_TYPES[prog],
        insn_cnt=len(insns) // 8,
        insns=ctypes.addressof(buf),
        license=ctypes.addressof(lic),
        prog_name=name.encode()[:15],
        prog_flags=prog_flags,
        fd_array=ctypes.addressof(fds),
    )
    try:
        return _sys_bpf(BPF_PROG_LOAD, attr)
    except OSError as first:
        log = ctypes.create_string_buffer(log_size)
        attr.log_level, attr.log_size, attr.log_buf = 1, log_size, ctypes.addressof(log)
        try:
            return _sys_bpf(BPF_PROG_LOAD, attr)  # a verifier that passes with a log: fine
        except OSError as e:
            tail = log.value.decode(errors="replace").strip().splitlines()[-25:]
            raise KfuncError(
                f"loading {name}: {os.strerror(e.errno)}\n" + "\n".join(tail), errno=e.errno
            ) from first


def load_with_kfuncs(
    bpf,
    name: str,
    prog: Prog,
    module: str = "xfp_crypto",
    placeholders: Mapping[int, str] = kcrypto_abi.KFUNCS,
    prog_flags: int = 0,
) -> KfuncProgram:
    """Load function `name` of BCC module `bpf` as a `prog` program, its placeholder calls
    turned into calls of `module`'s kfuncs (see the module docstring). `prog_flags`: BPF_F_*
    load flags (e.g. BPF_F_XDP_HAS_FRAGS for a multi-buffer XDP program)."""
    if prog not in PROG_TYPES:
        raise KfuncError(f"kfunc programs are XDP or SCHED_CLS, not {prog.value}")
    try:
        insns = bpf.dump_func(name.encode())
    except Exception as e:  # BCC raises bare Exception
        raise KfuncError(f"loading {name}: {e}") from e
    btf_ids = kfunc_btf_ids(module, sorted(set(placeholders.values())))
    insns, n = rewrite_kfunc_calls(insns, placeholders, btf_ids)
    btf_fd = module_btf_fd(module)
    try:
        fd = prog_load(prog, insns, name, [0, btf_fd], prog_flags)
    finally:
        os.close(btf_fd)  # the program holds its own reference on the BTF and the module
    return KfuncProgram(fd, name, n)
