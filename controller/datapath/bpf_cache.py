# SPDX-License-Identifier: GPL-2.0-only
"""Compiled-program cache: BCC's instructions kept across processes, maps still made by BCC.

BCC compiles each module from C every time it is loaded: clang parses it two or three times and
LLVM inlines and generates the whole datapath, about 3 s of CPU per datapath program natively
(`-ftime-report`: ~1.8 s in the optimiser, ~0.7 s generating code, the rest in the front end),
minutes in a TCG guest, and a controller start compiles four. The instructions it produces
depend only on the source, the -D flags, the kernel and BCC, so they are kept here.

What an entry holds (one JSON file per key, the key a SHA-256 over: this format's version, the
source text, every file under bpf/, the flags except -DXFP_PIN_DIR (which names where maps are
pinned and reaches no instruction) and the table sizes of SIZE_MACROS (while only the map
declarations use them), the kernel's release and version strings, BCC's library, and
the kernel headers BCC compiles against):
- each function's instructions, with every map reference (BPF_LD_IMM64 with src_reg
  BPF_PSEUDO_MAP_FD or BPF_PSEUDO_MAP_VALUE, include/uapi/linux/bpf.h) recorded as the map's
  name in place of the fd it had in the compiling process;
- the module's license and kernel version (what BCC's load_func passes);
- every table's spec: type, key and leaf size, max entries, flags, key and leaf layout.

A hit still lets BCC make the maps: it compiles the source's map prologue, the text up to and
including `#include "maps.h"` (bpf/include/maps.h declares every map, selected by the XFP_MAPS_*
defines above that line), with the caller's flags. That makes the same tables the whole source does
(pinned ones opened or pinned, BTF for the spin locks in their values, perf arrays sized per CPU)
and gives the same BCC Table objects, without generating any program code. An entry is written only
when the prologue's tables equal the whole module's, spec for spec, and the specs are compared again
on every hit (sizes aside); then each function's map references are bound to this module's fds, and
it is loaded through BCC's own bcc_func_load, the verifier's full check included. Anything that does
not fit (a module with kprobes or other autoloaded sections, a map reference to a fd that is no
table of the module, an unreadable or mismatched entry) compiles the usual way, and the outcome is
counted in STATS and logged.

The directory: $XFP_BPF_CACHE, else $XDG_CACHE_HOME/xfrm-fastpath/bpf (the service sets
XDG_CACHE_HOME=/var/cache; its CacheDirectory). XFP_BPF_CACHE=off turns the cache off. Programs
loaded from it run as root, so a directory this user does not own, or that others may write to,
is not used (a warning says so).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from collections import Counter
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from controller.datapath.bpfsys import map_info

log = logging.getLogger(__name__)

FORMAT = 1
ENV = "XFP_BPF_CACHE"
OFF = ("", "off", "0")  # values of ENV that turn the cache off
MAX_ENTRIES = 256  # oldest entries go beyond this many
PIN_FLAG = "-DXFP_PIN_DIR="
# Table sizes ([tables] sas and flows, bench sizes): macros that bpf/ uses only to declare maps
# (SIZE_DECLARED_IN), so they size the maps the prologue makes and reach no instruction. Their
# flags stay out of the key while that holds; a tree or source that uses one elsewhere keys by it.
SIZE_MACROS = ("XFP_SA_MAX", "XFP_FLOWS_MAX")
SIZE_DECLARED_IN = ("include/maps.h", "include/xfp_defs.h")
SPEC_MAX_ENTRIES = 3  # index of max_entries in a table spec (table_specs)
MAPS_INCLUDE = re.compile(rb'^[ \t]*#[ \t]*include[ \t]+"maps\.h"[^\n]*\n', re.MULTILINE)

# include/uapi/linux/bpf.h
BPF_LD_IMM64 = 0x18  # BPF_LD | BPF_DW | BPF_IMM: two instruction slots
BPF_PSEUDO_MAP_FD = 1
BPF_PSEUDO_MAP_VALUE = 2
INSN = 8
AUTOLOADED = (b"kprobe__", b"kretprobe__", b"raw_tracepoint__", b"kfunc__", b"kretfunc__", b"lsm__")
TRACEPOINT = b"tracepoint__"

# hit, miss, stored, uncacheable, refused (a cache directory not safe to use), stale (an entry
# whose tables no longer match), unreadable
STATS: Counter[str] = Counter()


class Uncacheable(Exception):
    """This module's instructions cannot be kept (the reason is the message)."""


# -- key and directory ---------------------------------------------------------------------------
def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off."""
    env = os.environ.get(ENV)
    if env is not None:
        return None if env in OFF else Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xfrm-fastpath" / "bpf"


def usable(d: Path) -> bool:
    """Make `d` (mode 0700) when absent; True when it is ours and nobody else may write to it."""
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError as e:
        log.debug("BPF compile cache %s not usable: %s", d, e)
        return False
    if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        STATS["refused"] += 1
        log.warning(
            "BPF compile cache %s not used: owned by uid %d, mode %o (want ours, not group- or "
            "world-writable)", d, st.st_uid, stat.S_IMODE(st.st_mode),
        )  # fmt: skip
        return False
    return True


@cache
def _environment_digest() -> bytes:
    """What, beside source and flags, shapes BCC's output: kernel, BCC, the headers it uses."""
    u = os.uname()
    h = hashlib.sha256(f"{FORMAT}\0{u.release}\0{u.version}\0{u.machine}".encode())
    from bcc.libbcc import lib

    for p in (getattr(lib, "_name", "libbcc.so.0"), f"/lib/modules/{u.release}/build"):
        real = os.path.realpath(p) if os.path.isabs(p) else p
        try:
            st = os.stat(real)
            h.update(f"\0{real}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\0{real}\0-".encode())
    h.update(os.environ.get("BCC_KERNEL_SOURCE", "").encode())
    return h.digest()


def _tree_digest(bpf_dir: Path) -> tuple[bytes, set[str]]:
    """The digest of every .c and .h under bpf_dir, and the SIZE_MACROS some file other than
    SIZE_DECLARED_IN names (those may reach instructions)."""
    h = hashlib.sha256()
    used = set()
    for p in sorted(bpf_dir.rglob("*")):
        if p.suffix in (".c", ".h") and p.is_file():
            rel, body = p.relative_to(bpf_dir).as_posix(), p.read_bytes()
            h.update(rel.encode() + b"\0" + body + b"\0")
            if rel not in SIZE_DECLARED_IN:
                used |= {m for m in SIZE_MACROS if m.encode() in body}
    return h.digest(), used


def key_flags(flags: Sequence[str], used: set[str]) -> list[str]:
    """The flags that reach the key: not the pin directory, not a table size no code uses."""
    free = tuple(f"-D{m}=" for m in SIZE_MACROS if m not in used)
    return [f for f in flags if not f.startswith((PIN_FLAG, *free))]


def cache_key(text: bytes, flags: Sequence[str], bpf_dir: Path) -> str:
    h = hashlib.sha256(_environment_digest())
    tree, used = _tree_digest(bpf_dir)
    used |= {m for m in SIZE_MACROS if m.encode() in text}
    h.update(tree)
    h.update(b"\0".join(f.encode() for f in key_flags(flags, used)) + b"\0\0")
    h.update(text)
    return h.hexdigest()


def same_tables(a: dict[str, list], b: dict[str, list]) -> bool:
    """Table specs alike but for max_entries: what the key leaves out (SIZE_MACROS) sizes the
    maps the prologue makes and nothing else."""

    def unsized(specs: dict[str, list]) -> dict[str, list]:
        return {k: v[:SPEC_MAX_ENTRIES] + v[SPEC_MAX_ENTRIES + 1 :] for k, v in specs.items()}

    return unsized(a) == unsized(b)


# BCC attaches BTF to the maps it creates (needed for the bpf_spin_lock in SA values) only when
# the module has a function: the prologue gets this one, never loaded.
PROLOGUE_FUNCTION = b"\nint xfp_cache_prologue(void *ctx) { return 0; }\n"


def maps_prologue(text: bytes) -> bytes:
    """The source up to and including its `#include "maps.h"` line (what declares its maps),
    and PROLOGUE_FUNCTION. A source without that line declares its maps itself: Uncacheable."""
    m = MAPS_INCLUDE.search(text)
    if m is None:
        raise Uncacheable('no #include "maps.h": the maps are declared elsewhere')
    return text[: m.end()] + PROLOGUE_FUNCTION


# -- instructions --------------------------------------------------------------------------------
def map_references(insns: bytes, names_by_fd: dict[int, str]) -> list[tuple[int, str]]:
    """(instruction index, map name) of every map reference in `insns`."""
    if len(insns) % INSN:
        raise Uncacheable(f"instructions of {len(insns)} bytes: not a multiple of {INSN}")
    refs = []
    i, n = 0, len(insns) // INSN
    while i < n:
        code, regs = insns[i * INSN], insns[i * INSN + 1]
        if code == BPF_LD_IMM64:
            if regs >> 4 in (BPF_PSEUDO_MAP_FD, BPF_PSEUDO_MAP_VALUE):
                fd = int.from_bytes(insns[i * INSN + 4 : i * INSN + 8], "little", signed=True)
                if fd not in names_by_fd:
                    raise Uncacheable(f"instruction {i} refers to fd {fd}, no table of the module")
                refs.append((i, names_by_fd[fd]))
            elif regs >> 4:
                raise Uncacheable(f"instruction {i}: BPF_LD_IMM64 with src_reg {regs >> 4}")
            i += 2
        else:
            i += 1
    return refs


def bind(insns: bytes, refs: Sequence[Sequence], fds: dict[str, int]) -> bytes:
    """`insns` with each reference's immediate set to the fd of its map in `fds`."""
    out = bytearray(insns)
    for i, name in refs:
        if i * INSN + 8 > len(out) or out[i * INSN] != BPF_LD_IMM64:
            raise ValueError(f"reference at {i} is not a BPF_LD_IMM64")
        out[i * INSN + 4 : i * INSN + 8] = fds[name].to_bytes(4, "little", signed=True)
    return bytes(out)


# -- BCC modules ---------------------------------------------------------------------------------
@cache
def _lib():
    from bcc.libbcc import lib

    size_t, vp = ctypes.c_size_t, ctypes.c_void_p
    for fn, res, args in (
        ("bpf_num_tables", size_t, [vp]),
        ("bpf_table_name", ctypes.c_char_p, [vp, size_t]),
        ("bpf_table_fd_id", ctypes.c_int, [vp, size_t]),
        ("bpf_table_key_size_id", size_t, [vp, size_t]),
        ("bpf_table_leaf_size_id", size_t, [vp, size_t]),
        ("bpf_table_key_desc_id", ctypes.c_char_p, [vp, size_t]),
        ("bpf_table_leaf_desc_id", ctypes.c_char_p, [vp, size_t]),
    ):
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    return lib


def table_specs(module: int) -> dict[str, list]:
    """name -> [type, key size, leaf size, max entries, flags, key layout, leaf layout, whether
    the kernel's map has BTF]."""
    lib = _lib()
    specs = {}
    for i in range(lib.bpf_num_tables(module)):
        name = lib.bpf_table_name(module, i).decode()
        fd = lib.bpf_table_fd_id(module, i)
        specs[name] = [
            lib.bpf_table_type_id(module, i),
            lib.bpf_table_key_size_id(module, i),
            lib.bpf_table_leaf_size_id(module, i),
            lib.bpf_table_max_entries_id(module, i),
            lib.bpf_table_flags_id(module, i),
            (lib.bpf_table_key_desc_id(module, i) or b"").decode(),
            (lib.bpf_table_leaf_desc_id(module, i) or b"").decode(),
            fd >= 0 and map_info(fd)["btf_id"] != 0,
        ]
    return specs


def table_fds(module: int) -> dict[str, int]:
    lib = _lib()
    return {
        lib.bpf_table_name(module, i).decode(): lib.bpf_table_fd_id(module, i)
        for i in range(lib.bpf_num_tables(module))
    }


def entry_of(bpf, prologue_bpf) -> dict:
    """The cache entry for a whole compiled module `bpf`, given its prologue compiled beside it.
    Uncacheable when the prologue's tables differ or an instruction cannot be described."""
    lib = _lib()
    specs = table_specs(bpf.module)
    if table_specs(prologue_bpf.module) != specs:
        raise Uncacheable("the maps.h prologue declares other tables than the whole source")
    names_by_fd = {fd: name for name, fd in table_fds(bpf.module).items()}
    functions = {}
    for i in range(lib.bpf_num_functions(bpf.module)):
        name = lib.bpf_function_name(bpf.module, i)
        if name == b"xfp_cache_prologue":
            raise Uncacheable("a function is named like the prologue's")
        if name.startswith(AUTOLOADED):
            raise Uncacheable(f"{name.decode()} is attached by BCC as it compiles")
        insns = bpf.dump_func(name)
        functions[name.decode()] = {
            "insns": base64.b64encode(insns).decode(),
            "maps": map_references(insns, names_by_fd),
        }
    return {
        "format": FORMAT,
        "license": (lib.bpf_module_license(bpf.module) or b"GPL").decode(),
        "kern_version": lib.bpf_module_kern_version(bpf.module),
        "tables": specs,
        "functions": functions,
    }


@cache
def cached_bpf_class():
    """bcc.BPF whose functions come from a cache entry (made on first use: bcc is imported
    lazily, as everywhere in the controller)."""
    from bcc import BPF
    from bcc.libbcc import lib

    class CachedBPF(BPF):
        """A BCC module compiled from a source's map prologue, its functions from the cache:
        load_func and dump_func serve those; everything else is BCC's."""

        xfp_insns: dict[bytes, bytes] = {}
        xfp_license = b"GPL"
        xfp_kern_version = 0

        def bind_entry(self, entry: dict) -> None:
            if not same_tables(table_specs(self.module), entry["tables"]):
                raise Uncacheable("the prologue's tables no longer match the entry's")
            fds = table_fds(self.module)
            self.xfp_insns = {
                name.encode(): bind(base64.b64decode(f["insns"]), f["maps"], fds)
                for name, f in entry["functions"].items()
            }
            self.xfp_license = entry["license"].encode()
            self.xfp_kern_version = int(entry["kern_version"])

        def autoload_tracepoints(self) -> None:
            """What BCC's _trace_autoload does for tracepoint__CATEGORY__NAME functions."""
            for name in self.xfp_insns:
                if name.startswith(TRACEPOINT):
                    fn = self.load_func(name, BPF.TRACEPOINT)
                    tp = name[len(TRACEPOINT) :].replace(b"__", b":")
                    self.attach_tracepoint(tp=tp, fn_name=fn.name)

        def load_func(self, func_name, prog_type, device=None, attach_type=-1):
            name = func_name.encode() if isinstance(func_name, str) else func_name
            if name in self.funcs or name not in self.xfp_insns:
                return super().load_func(name, prog_type, device, attach_type)
            insns = self.xfp_insns[name]
            buf = ctypes.create_string_buffer(insns, len(insns))
            fd = lib.bcc_func_load(
                self.module, prog_type, name, buf, len(insns), self.xfp_license,
                self.xfp_kern_version, 0, None, 0, device, attach_type,
            )  # fmt: skip
            if fd < 0:
                err = ctypes.get_errno()
                if err == errno.EPERM:
                    raise Exception("Need super-user privileges to run")
                raise Exception(f"Failed to load BPF program {name}: {os.strerror(err)}")
            fn = BPF.Function(self, name, fd)
            self.funcs[name] = fn
            return fn

        def dump_func(self, func_name):
            name = func_name.encode() if isinstance(func_name, str) else func_name
            if name in self.xfp_insns:
                return self.xfp_insns[name]
            return super().dump_func(name)

    return CachedBPF


# -- entries on disk -----------------------------------------------------------------------------
def read_entry(d: Path, key: str) -> dict | None:
    path = d / f"{key}.json"
    try:
        entry = json.loads(path.read_bytes())
        if entry.get("format") != FORMAT or not isinstance(entry.get("functions"), dict):
            raise ValueError("not an entry of this format")
        return entry
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        STATS["unreadable"] += 1
        log.warning("BPF compile cache entry %s unreadable (%s): compiling", path, e)
        return None


def write_entry(d: Path, key: str, entry: dict) -> None:
    """Atomically (a reader sees the old entry, the new one, or none), mode 0600; then the
    oldest entries beyond MAX_ENTRIES go."""
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f)
        os.replace(tmp, d / f"{key}.json")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    entries = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
    for old in entries[: max(0, len(entries) - MAX_ENTRIES)]:
        with contextlib.suppress(OSError):
            old.unlink()
