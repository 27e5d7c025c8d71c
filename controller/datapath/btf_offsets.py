# SPDX-License-Identifier: GPL-2.0-only
"""Kernel struct field offsets from the running kernel's BTF, for BPF programs that must read
`struct sk_buff` and friends without the kernel's headers.

The headers installed on a machine may belong to another kernel (here: 6.1 headers, 6.18
kernel), and struct sk_buff moves between versions and configs. The kernel describes its own
layout in /sys/kernel/btf/vmlinux (CONFIG_DEBUG_INFO_BTF). This module parses that raw BTF
(format: Documentation/bpf/btf.rst, include/uapi/linux/btf.h), which takes well under a second
and avoids `bpftool -j btf dump`'s 100 MB of JSON, resolves the few fields the learner needs
(through anonymous unions and struct_groups), and returns them as `-D` compiler flags. Results
are cached per kernel build (keyed by the BTF blob's hash).

    python -m controller.datapath.btf_offsets            # print the flags for the running kernel
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
BTF_MAGIC = 0xEB9F
CACHE_VERSION = 1

# BTF kinds (include/uapi/linux/btf.h).
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_FWD = 1, 2, 3, 4, 5, 6, 7
KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

# Bytes that follow struct btf_type, per kind: fixed part and per-vlen part.
_EXTRA = {
    KIND_INT: (4, 0),
    KIND_ARRAY: (12, 0),
    KIND_STRUCT: (0, 12),
    KIND_UNION: (0, 12),
    KIND_ENUM: (0, 8),
    KIND_FUNC_PROTO: (0, 8),
    KIND_VAR: (4, 0),
    KIND_DATASEC: (0, 12),
    KIND_DECL_TAG: (4, 0),
    KIND_ENUM64: (0, 12),
}
_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)


class BTFError(RuntimeError):
    """The BTF is missing, malformed, or lacks a field the BPF program needs."""


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int


@dataclass
class BType:
    kind: int
    name: str
    size_or_type: int
    members: list[Member] | None = None  # struct/union
    enumerators: list[tuple[str, int]] | None = None  # enum/enum64
    array: tuple[int, int] | None = None  # (elem type, nelems)


class BTF:
    """The types of one BTF blob, indexed by id, with struct/union/enum lookup by name."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) < 24:
            raise BTFError("BTF blob too short")
        magic, _version, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != BTF_MAGIC:
            raise BTFError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._strings = blob[hdr_len + str_off : hdr_len + str_off + str_len]
        self.types: list[BType | None] = [None]  # id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        self._parse(blob, hdr_len + type_off, hdr_len + type_off + type_len)

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off:end].decode()

    def _parse(self, blob: bytes, pos: int, end: int) -> None:
        unpack = struct.unpack_from
        while pos < end:
            name_off, info, size_or_type = unpack("<III", blob, pos)
            pos += 12
            vlen = info & 0xFFFF
            kind = (info >> 24) & 0x1F
            kflag = info >> 31
            bt = BType(kind, "", size_or_type)
            if kind in (KIND_STRUCT, KIND_UNION):
                bt.members = []
                for i in range(vlen):
                    m_name, m_type, m_off = unpack("<III", blob, pos + 12 * i)
                    if kflag:
                        bt.members.append(
                            Member(self._str(m_name), m_type, m_off & 0xFFFFFF, m_off >> 24)
                        )
                    else:
                        bt.members.append(Member(self._str(m_name), m_type, m_off, 0))
            elif kind == KIND_ENUM:
                bt.enumerators = [
                    (self._str(n), v)
                    for n, v in (unpack("<Ii", blob, pos + 8 * i) for i in range(vlen))
                ]
            elif kind == KIND_ENUM64:
                bt.enumerators = []
                for i in range(vlen):
                    n, lo, hi = unpack("<III", blob, pos + 12 * i)
                    bt.enumerators.append((self._str(n), lo | (hi << 32)))
            elif kind == KIND_ARRAY:
                elem, _index, nelems = unpack("<III", blob, pos)
                bt.array = (elem, nelems)
            fixed, per = _EXTRA.get(kind, (0, 0))
            if kind > KIND_ENUM64 or kind == 0:
                raise BTFError(f"unknown BTF kind {kind} at type {len(self.types)}")
            pos += fixed + per * vlen
            if name_off and kind in (KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64):
                bt.name = self._str(name_off)
                # The first definition wins: vmlinux BTF is deduplicated, one per name.
                self._by_name.setdefault((kind, bt.name), len(self.types))
            self.types.append(bt)

    # -- queries ---------------------------------------------------------------------------------
    def struct(self, name: str) -> int:
        tid = self._by_name.get((KIND_STRUCT, name))
        if tid is None:
            raise BTFError(f"struct {name} not in BTF")
        return tid

    def resolve(self, tid: int) -> int:
        """Strip typedefs and qualifiers."""
        for _ in range(64):
            t = self.types[tid]
            if t is None or t.kind not in _MODIFIERS:
                return tid
            tid = t.size_or_type
        raise BTFError(f"type {tid}: modifier chain too long")

    def size(self, tid: int) -> int:
        tid = self.resolve(tid)
        t = self.types[tid]
        if t is None:
            raise BTFError("void has no size")
        if t.kind == KIND_PTR:
            return 8
        if t.kind == KIND_ARRAY:
            assert t.array is not None
            return self.size(t.array[0]) * t.array[1]
        return t.size_or_type

    def member(self, tid: int, name: str) -> tuple[int, Member] | None:
        """Find `name` in a struct/union, descending into anonymous members (unions,
        struct_group()s). Returns (bit offset from the start of tid, member)."""
        t = self.types[self.resolve(tid)]
        if t is None or t.members is None:
            return None
        for m in t.members:
            if m.name == name:
                return m.bit_offset, m
        for m in t.members:
            if m.name == "":
                found = self.member(m.type_id, name)
                if found is not None:
                    return m.bit_offset + found[0], found[1]
        return None

    def field(self, struct_name: str, path: str) -> tuple[int, int]:
        """(byte offset, byte size) of a dotted field path, e.g. field('net', 'ns.inum')."""
        tid = self.struct(struct_name)
        bits = 0
        m: Member | None = None
        for part in path.split("."):
            if m is not None:
                tid = m.type_id
            found = self.member(tid, part)
            if found is None:
                raise BTFError(f"struct {struct_name} has no field {path} (at {part!r})")
            off, m = found
            bits += off
        assert m is not None
        if m.bitfield_size or bits % 8:
            raise BTFError(f"{struct_name}.{path} is a bitfield; read it some other way")
        return bits // 8, self.size(m.type_id)

    def enum_value(self, enum_name: str, enumerator: str) -> int:
        for kind in (KIND_ENUM, KIND_ENUM64):
            tid = self._by_name.get((kind, enum_name))
            if tid is not None:
                t = self.types[tid]
                assert t is not None and t.enumerators is not None
                for n, v in t.enumerators:
                    if n == enumerator:
                        return v
        raise BTFError(f"enum {enum_name} has no {enumerator}")


# The fields tp_learn.c reads: macro name -> (struct, dotted path). Each macro gets _OFF (byte
# offset) and _SZ (byte size); the C side checks the sizes it depends on with _Static_assert.
FIELDS: dict[str, tuple[str, str]] = {
    "SKB_HEAD": ("sk_buff", "head"),
    "SKB_DATA": ("sk_buff", "data"),
    "SKB_LEN": ("sk_buff", "len"),
    "SKB_DATA_LEN": ("sk_buff", "data_len"),
    "SKB_DEV": ("sk_buff", "dev"),
    "SKB_PROTOCOL": ("sk_buff", "protocol"),
    "SKB_NETWORK_HEADER": ("sk_buff", "network_header"),
    "SKB_MAC_HEADER": ("sk_buff", "mac_header"),
    "SKB_IIF": ("sk_buff", "skb_iif"),
    "DEV_IFINDEX": ("net_device", "ifindex"),
    "DEV_ND_NET": ("net_device", "nd_net"),
    "NET_NS_INUM": ("net", "ns.inum"),
}
# sk_buff extensions and the XFRM sec_path: present with CONFIG_SKB_EXTENSIONS and CONFIG_XFRM.
# Without them the learner still sees clear forwarding, and decap candidates carry no SA.
SECPATH_FIELDS: dict[str, tuple[str, str]] = {
    "SKB_ACTIVE_EXT": ("sk_buff", "active_extensions"),
    "SKB_EXTENSIONS": ("sk_buff", "extensions"),
    "SKB_EXT_OFFSET": ("skb_ext", "offset"),
    "SKB_EXT_DATA": ("skb_ext", "data"),
    "SEC_PATH_LEN": ("sec_path", "len"),
    "SEC_PATH_XVEC": ("sec_path", "xvec"),
    "XFRM_STATE_SPI": ("xfrm_state", "id.spi"),
}


def compute(btf: BTF) -> dict[str, int]:
    """The macro values for one kernel: NAME_OFF/NAME_SZ per field, plus HAVE_SECPATH."""
    out: dict[str, int] = {}
    for macro, (sname, path) in FIELDS.items():
        out[f"{macro}_OFF"], out[f"{macro}_SZ"] = btf.field(sname, path)
    try:
        sec: dict[str, int] = {}
        for macro, (sname, path) in SECPATH_FIELDS.items():
            sec[f"{macro}_OFF"], sec[f"{macro}_SZ"] = btf.field(sname, path)
        # include/linux/skbuff.h: enum skb_ext_id; the sec_path chunk is at
        # ext + ext->offset[SKB_EXT_SEC_PATH] * 8 (skb_ext_get_ptr()).
        sec["SKB_EXT_SEC_PATH_ID"] = btf.enum_value("skb_ext_id", "SKB_EXT_SEC_PATH")
        out.update(sec)
        out["HAVE_SECPATH"] = 1
    except BTFError:
        out["HAVE_SECPATH"] = 0
    return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xfrm-fastpath"


@cache
def offsets(btf_path: Path = VMLINUX_BTF) -> dict[str, int]:
    """Offsets for the kernel whose BTF is at btf_path, cached in memory and on disk (per
    BTF hash: a rebuilt kernel with the same release string still gets fresh offsets)."""
    try:
        blob = btf_path.read_bytes()
    except OSError as e:
        raise BTFError(f"cannot read {btf_path}: {e} (kernel built without BTF?)") from e
    digest = hashlib.sha256(blob).hexdigest()[:24]
    cache_file = _cache_dir() / f"btf-offsets-{digest}.json"
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("version") == CACHE_VERSION:
            return dict(cached["offsets"])
    except (OSError, ValueError, KeyError):
        pass
    result = compute(BTF(blob))
    try:  # a read-only root (the VM shares it over 9p) just means no disk cache
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "offsets": result}))
        tmp.replace(cache_file)
    except OSError:
        pass
    return result


def cflags(btf_path: Path = VMLINUX_BTF) -> list[str]:
    """The offsets as -D flags for BCC's cflags."""
    return [f"-D{k}={v}" for k, v in sorted(offsets(btf_path).items())]


if __name__ == "__main__":
    print("\n".join(cflags(Path(sys.argv[1]) if len(sys.argv) > 1 else VMLINUX_BTF)))
