# SPDX-License-Identifier: GPL-2.0-only
"""The C structs of include/uapi/linux/xfrm.h, laid out by the C rules.

Each struct becomes a `CStruct`: its layout (members, padding, size, alignment) is computed with
the C alignment rules of x86-64/arm64 and checked against the compiler by
tests/host/test_xfrm_netlink.py. A `CStruct` is both a pyroute2 field type (`decode_from`/
`encode_into`, used by the message classes of controller/netlink/xfrm_messages.py) and a packer
for attribute payloads (`pack`/`unpack`).

Addresses (xfrm_address_t) stay raw 16-byte strings here: the family that gives them meaning
lives elsewhere in each message, so conversion happens in controller/netlink/xfrm_codec.py.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar


def _prim_align(fmt: str) -> int:
    """Natural alignment of a one-item struct format ('I', '>H', '16s', '3x')."""
    code = fmt.lstrip("<>!=@")[-1]
    return 1 if code in "sxBbc?" else struct.calcsize(code)


class CStruct:
    """A C struct as a pyroute2 field type (`decode_from`/`encode_into`) and a packer.

    Subclasses list `members` as (name, format) where format is a one-item struct format or
    another CStruct; padding is inserted with the C rules (each member at a multiple of its
    alignment, the size a multiple of the largest alignment). `tail` names a flexible array
    member (`char alg_key[]`): its bytes follow the fixed part and run to the end of the NLA.
    Decoded values are dicts; padding members never appear in them.
    """

    members: ClassVar[tuple[tuple[str, Any], ...]] = ()
    tail: ClassVar[str | None] = None
    align: ClassVar[int] = 1
    size: ClassVar[int] = 0
    layout: ClassVar[tuple[tuple[str, Any], ...]] = ()  # members and "__padN" fillers

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if "members" not in cls.__dict__:
            return
        offset, align, layout, npad = 0, 1, [], 0
        for name, fmt in cls.members:
            if isinstance(fmt, str):
                a, size = _prim_align(fmt), struct.calcsize(fmt.lstrip("<>!=@"))
            else:
                a, size = fmt.align, fmt.size
            if offset % a:
                pad = a - offset % a
                layout.append((f"__pad{npad}", f"{pad}x"))
                npad += 1
                offset += pad
            layout.append((name, fmt))
            offset += size
            align = max(align, a)
        if offset % align:
            pad = align - offset % align
            layout.append((f"__pad{npad}", f"{pad}x"))
            offset += pad
        cls.size, cls.align, cls.layout = offset, align, tuple(layout)

    @classmethod
    def decode_from(cls, data: bytes | bytearray, offset: int) -> tuple[dict[str, Any], int]:
        out: dict[str, Any] = {}
        for name, fmt in cls.layout:
            if isinstance(fmt, str):
                if fmt.endswith("x"):
                    offset += struct.calcsize(fmt)
                    continue
                (out[name],) = struct.unpack_from(fmt, data, offset)
                offset += struct.calcsize(fmt)
            else:
                out[name], offset = fmt.decode_from(data, offset)
        return out, offset

    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: Any) -> int:
        """Append the struct at `offset` (== len(data), as pyroute2's encoder expects)."""
        value = value if isinstance(value, dict) else {}
        data.extend(b"\0" * cls.size)
        for name, fmt in cls.layout:
            if isinstance(fmt, str):
                if not fmt.endswith("x"):
                    struct.pack_into(fmt, data, offset, value.get(name, 0) or 0)
                offset += struct.calcsize(fmt)
            else:
                sub = bytearray()
                fmt.encode_into(sub, 0, value.get(name))
                data[offset : offset + fmt.size] = sub
                offset += fmt.size
        return offset

    @classmethod
    def pack(cls, value: dict[str, Any]) -> bytes:
        buf = bytearray()
        cls.encode_into(buf, 0, value)
        if cls.tail:
            buf += bytes(value.get(cls.tail, b""))
        return bytes(buf)

    @classmethod
    def unpack(cls, data: bytes) -> dict[str, Any]:
        if len(data) < cls.size:
            raise ValueError(f"{cls.__name__}: {len(data)} bytes, need {cls.size}")
        out, offset = cls.decode_from(data, 0)
        if cls.tail:
            out[cls.tail] = bytes(data[offset:])
        return out


class XfrmAddress(CStruct):
    """typedef union { __be32 a4; __be32 a6[4]; struct in6_addr in6; } xfrm_address_t;

    16 raw bytes (IPv4 in the first four), aligned like __be32."""

    align, size = 4, 16

    @classmethod
    def decode_from(cls, data: bytes | bytearray, offset: int) -> tuple[bytes, int]:  # type: ignore[override]
        return bytes(data[offset : offset + 16]), offset + 16

    @classmethod
    def encode_into(cls, data: bytearray, offset: int, value: Any) -> int:
        raw = bytes(value or b"").ljust(16, b"\0")[:16]
        data.extend(raw)
        return offset + 16

    @classmethod
    def pack(cls, value: Any) -> bytes:  # type: ignore[override]
        return bytes(value or b"").ljust(16, b"\0")[:16]

    @classmethod
    def unpack(cls, data: bytes) -> bytes:  # type: ignore[override]
        return bytes(data[:16]).ljust(16, b"\0")


class XfrmId(CStruct):
    """struct xfrm_id { xfrm_address_t daddr; __be32 spi; __u8 proto; };"""

    members = (("daddr", XfrmAddress), ("spi", ">I"), ("proto", "B"))


class XfrmSelector(CStruct):
    """struct xfrm_selector {
    xfrm_address_t daddr; xfrm_address_t saddr;
    __be16 dport; __be16 dport_mask; __be16 sport; __be16 sport_mask;
    __u16 family; __u8 prefixlen_d; __u8 prefixlen_s; __u8 proto;
    int ifindex; __kernel_uid32_t user; };"""

    members = (
        ("daddr", XfrmAddress),
        ("saddr", XfrmAddress),
        ("dport", ">H"),
        ("dport_mask", ">H"),
        ("sport", ">H"),
        ("sport_mask", ">H"),
        ("family", "H"),
        ("prefixlen_d", "B"),
        ("prefixlen_s", "B"),
        ("proto", "B"),
        ("ifindex", "i"),
        ("user", "I"),
    )


class XfrmLifetimeCfg(CStruct):
    """struct xfrm_lifetime_cfg { __u64 soft_byte_limit, hard_byte_limit, soft_packet_limit,
    hard_packet_limit, soft_add_expires_seconds, hard_add_expires_seconds,
    soft_use_expires_seconds, hard_use_expires_seconds; };"""

    members = (
        ("soft_byte_limit", "Q"),
        ("hard_byte_limit", "Q"),
        ("soft_packet_limit", "Q"),
        ("hard_packet_limit", "Q"),
        ("soft_add_expires_seconds", "Q"),
        ("hard_add_expires_seconds", "Q"),
        ("soft_use_expires_seconds", "Q"),
        ("hard_use_expires_seconds", "Q"),
    )


class XfrmLifetimeCur(CStruct):
    """struct xfrm_lifetime_cur { __u64 bytes; __u64 packets; __u64 add_time; __u64 use_time; };"""

    members = (("bytes", "Q"), ("packets", "Q"), ("add_time", "Q"), ("use_time", "Q"))


class XfrmStats(CStruct):
    """struct xfrm_stats { __u32 replay_window; __u32 replay; __u32 integrity_failed; };"""

    members = (("replay_window", "I"), ("replay", "I"), ("integrity_failed", "I"))


class XfrmReplayState(CStruct):
    """struct xfrm_replay_state { __u32 oseq; __u32 seq; __u32 bitmap; };"""

    members = (("oseq", "I"), ("seq", "I"), ("bitmap", "I"))


class XfrmReplayStateEsn(CStruct):
    """struct xfrm_replay_state_esn { unsigned int bmp_len; __u32 oseq; __u32 seq;
    __u32 oseq_hi; __u32 seq_hi; __u32 replay_window; __u32 bmp[]; };

    bmp_len counts 32-bit words of bmp (XFRMA_REPLAY_ESN_MAX = 4096 bits)."""

    members = (
        ("bmp_len", "I"),
        ("oseq", "I"),
        ("seq", "I"),
        ("oseq_hi", "I"),
        ("seq_hi", "I"),
        ("replay_window", "I"),
    )
    tail = "bmp"


class XfrmAlgo(CStruct):
    """struct xfrm_algo { char alg_name[64]; unsigned int alg_key_len; /* bits */
    char alg_key[]; };"""

    members = (("alg_name", "64s"), ("alg_key_len", "I"))
    tail = "alg_key"


class XfrmAlgoAuth(CStruct):
    """struct xfrm_algo_auth { char alg_name[64]; unsigned int alg_key_len; /* bits */
    unsigned int alg_trunc_len; /* bits */ char alg_key[]; };"""

    members = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_trunc_len", "I"))
    tail = "alg_key"


class XfrmAlgoAead(CStruct):
    """struct xfrm_algo_aead { char alg_name[64]; unsigned int alg_key_len; /* bits */
    unsigned int alg_icv_len; /* bits */ char alg_key[]; };"""

    members = (("alg_name", "64s"), ("alg_key_len", "I"), ("alg_icv_len", "I"))
    tail = "alg_key"


class XfrmEncapTmpl(CStruct):
    """struct xfrm_encap_tmpl { __u16 encap_type; __be16 encap_sport; __be16 encap_dport;
    xfrm_address_t encap_oa; };"""

    members = (
        ("encap_type", "H"),
        ("encap_sport", ">H"),
        ("encap_dport", ">H"),
        ("encap_oa", XfrmAddress),
    )


class XfrmUserTmpl(CStruct):
    """struct xfrm_user_tmpl { struct xfrm_id id; __u16 family; xfrm_address_t saddr;
    __u32 reqid; __u8 mode; __u8 share; __u8 optional; __u32 aalgos; __u32 ealgos;
    __u32 calgos; };"""

    members = (
        ("id", XfrmId),
        ("family", "H"),
        ("saddr", XfrmAddress),
        ("reqid", "I"),
        ("mode", "B"),
        ("share", "B"),
        ("optional", "B"),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
    )


class XfrmMark(CStruct):
    """struct xfrm_mark { __u32 v; /* value */ __u32 m; /* mask */ };"""

    members = (("v", "I"), ("m", "I"))


class XfrmUserpolicyType(CStruct):
    """struct xfrm_userpolicy_type { __u8 type; __u16 reserved1; __u8 reserved2; };"""

    members = (("type", "B"), ("reserved1", "H"), ("reserved2", "B"))


class XfrmUserOffload(CStruct):
    """struct xfrm_user_offload { int ifindex; __u8 flags; };"""

    members = (("ifindex", "i"), ("flags", "B"))


class XfrmAddressFilter(CStruct):
    """struct xfrm_address_filter { xfrm_address_t saddr; xfrm_address_t daddr;
    __u16 family; __u8 splen; __u8 dplen; };"""

    members = (
        ("saddr", XfrmAddress),
        ("daddr", XfrmAddress),
        ("family", "H"),
        ("splen", "B"),
        ("dplen", "B"),
    )


class XfrmUsersaInfo(CStruct):
    """struct xfrm_usersa_info { struct xfrm_selector sel; struct xfrm_id id;
    xfrm_address_t saddr; struct xfrm_lifetime_cfg lft; struct xfrm_lifetime_cur curlft;
    struct xfrm_stats stats; __u32 seq; __u32 reqid; __u16 family;
    __u8 mode; /* XFRM_MODE_xxx */ __u8 replay_window; __u8 flags; };"""

    members = (
        ("sel", XfrmSelector),
        ("id", XfrmId),
        ("saddr", XfrmAddress),
        ("lft", XfrmLifetimeCfg),
        ("curlft", XfrmLifetimeCur),
        ("stats", XfrmStats),
        ("seq", "I"),
        ("reqid", "I"),
        ("family", "H"),
        ("mode", "B"),
        ("replay_window", "B"),
        ("flags", "B"),
    )


class XfrmUsersaId(CStruct):
    """struct xfrm_usersa_id { xfrm_address_t daddr; __be32 spi; __u16 family; __u8 proto; };"""

    members = (("daddr", XfrmAddress), ("spi", ">I"), ("family", "H"), ("proto", "B"))


class XfrmAeventId(CStruct):
    """struct xfrm_aevent_id { struct xfrm_usersa_id sa_id; xfrm_address_t saddr;
    __u32 flags; __u32 reqid; };"""

    members = (("sa_id", XfrmUsersaId), ("saddr", XfrmAddress), ("flags", "I"), ("reqid", "I"))


class XfrmUserMapping(CStruct):
    """struct xfrm_user_mapping { struct xfrm_usersa_id id; __u32 reqid;
    xfrm_address_t old_saddr; xfrm_address_t new_saddr; __be16 old_sport; __be16 new_sport; };
    (XFRM_MSG_MAPPING, include/uapi/linux/xfrm.h)"""

    members = (
        ("id", XfrmUsersaId),
        ("reqid", "I"),
        ("old_saddr", XfrmAddress),
        ("new_saddr", XfrmAddress),
        ("old_sport", ">H"),
        ("new_sport", ">H"),
    )


class XfrmUserpolicyInfo(CStruct):
    """struct xfrm_userpolicy_info { struct xfrm_selector sel; struct xfrm_lifetime_cfg lft;
    struct xfrm_lifetime_cur curlft; __u32 priority; __u32 index; __u8 dir;
    __u8 action; /* XFRM_POLICY_ALLOW 0, XFRM_POLICY_BLOCK 1 */
    __u8 flags; /* XFRM_POLICY_LOCALOK 1, XFRM_POLICY_ICMP 2 */ __u8 share; };"""

    members = (
        ("sel", XfrmSelector),
        ("lft", XfrmLifetimeCfg),
        ("curlft", XfrmLifetimeCur),
        ("priority", "I"),
        ("index", "I"),
        ("dir", "B"),
        ("action", "B"),
        ("flags", "B"),
        ("share", "B"),
    )


class XfrmUserpolicyId(CStruct):
    """struct xfrm_userpolicy_id { struct xfrm_selector sel; __u32 index; __u8 dir; };"""

    members = (("sel", XfrmSelector), ("index", "I"), ("dir", "B"))


class XfrmUserAcquire(CStruct):
    """struct xfrm_user_acquire { struct xfrm_id id; xfrm_address_t saddr;
    struct xfrm_selector sel; struct xfrm_userpolicy_info policy; __u32 aalgos;
    __u32 ealgos; __u32 calgos; __u32 seq; };"""

    members = (
        ("id", XfrmId),
        ("saddr", XfrmAddress),
        ("sel", XfrmSelector),
        ("policy", XfrmUserpolicyInfo),
        ("aalgos", "I"),
        ("ealgos", "I"),
        ("calgos", "I"),
        ("seq", "I"),
    )


class XfrmUserExpire(CStruct):
    """struct xfrm_user_expire { struct xfrm_usersa_info state; __u8 hard; };"""

    members = (("state", XfrmUsersaInfo), ("hard", "B"))


class XfrmUserPolexpire(CStruct):
    """struct xfrm_user_polexpire { struct xfrm_userpolicy_info pol; __u8 hard; };"""

    members = (("pol", XfrmUserpolicyInfo), ("hard", "B"))


class XfrmUsersaFlush(CStruct):
    """struct xfrm_usersa_flush { __u8 proto; };"""

    members = (("proto", "B"),)


class XfrmUserpolicyDefault(CStruct):
    """struct xfrm_userpolicy_default { __u8 in; __u8 fwd; __u8 out; };
    values XFRM_USERPOLICY_UNSPEC 0 (leave unchanged), _BLOCK 1, _ACCEPT 2."""

    members = (("in", "B"), ("fwd", "B"), ("out", "B"))


class XfrmUserReport(CStruct):
    """struct xfrm_user_report { __u8 proto; struct xfrm_selector sel; };"""

    members = (("proto", "B"), ("sel", XfrmSelector))
