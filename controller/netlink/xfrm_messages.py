# SPDX-License-Identifier: GPL-2.0-only
"""XFRM netlink messages (NETLINK_XFRM) on pyroute2's message machinery.

pyroute2 has no XFRM classes, so this module declares them: each C struct of
include/uapi/linux/xfrm.h becomes a `CStruct` (its layout computed with the C alignment rules
of x86-64/arm64, checked against the compiler by tests/host/test_xfrm_netlink.py), and each netlink
message is a pyroute2 `nlmsg` whose `fields` are that layout and whose `nla_map` is the
XFRMA_* attribute table. The typed API (controller/netlink/xfrm.py) sits on top; nothing outside
controller/netlink sees these classes.

Addresses (xfrm_address_t) stay raw 16-byte strings here: the family that gives them meaning
lives elsewhere in each message, so conversion happens in the API layer.
"""

from __future__ import annotations

import struct
from typing import Any, ClassVar

from pyroute2.netlink import NotInitialized, nla_base_string, nlmsg
from pyroute2.netlink.marshal import Marshal

# -- constants: include/uapi/linux/xfrm.h ----------------------------------------------------------
NETLINK_XFRM = 6

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NEWSADINFO = 0x22
XFRM_MSG_GETSADINFO = 0x23
XFRM_MSG_NEWSPDINFO = 0x24
XFRM_MSG_GETSPDINFO = 0x25
XFRM_MSG_MAPPING = 0x26
XFRM_MSG_SETDEFAULT = 0x27
XFRM_MSG_GETDEFAULT = 0x28

MSG_NAMES = {v: k for k, v in globals().items() if k.startswith("XFRM_MSG_")}

# enum xfrm_nlgroups
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
XFRMNLGRP_AEVENTS = 5
XFRMNLGRP_REPORT = 6
XFRMNLGRP_MIGRATE = 7
XFRMNLGRP_MAPPING = 8

XFRM_INF = (1 << 64) - 1

# XFRM_MODE_*
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_MODE_ROUTEOPTIMIZATION = 2
XFRM_MODE_IN_TRIGGER = 3
XFRM_MODE_BEET = 4
XFRM_MODE_IPTFS = 5

# xfrm_usersa_info.flags
XFRM_STATE_NOECN = 1
XFRM_STATE_DECAP_DSCP = 2
XFRM_STATE_NOPMTUDISC = 4
XFRM_STATE_WILDRECV = 8
XFRM_STATE_ICMP = 16
XFRM_STATE_AF_UNSPEC = 32
XFRM_STATE_ALIGN4 = 64
XFRM_STATE_ESN = 128

# XFRMA_SA_EXTRA_FLAGS
XFRM_SA_XFLAG_DONT_ENCAP_DSCP = 1
XFRM_SA_XFLAG_OSEQ_MAY_WRAP = 2

# policy dir / action / flags / type
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
# Per-socket policies (setsockopt IP_XFRM_POLICY, e.g. an IKE daemon's bypass for its own
# sockets) show up in policy dumps with dir = XFRM_POLICY_MAX + their direction.
XFRM_POLICY_MAX = 3
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_LOCALOK = 1
XFRM_POLICY_ICMP = 2
XFRM_POLICY_TYPE_MAIN = 0
XFRM_POLICY_TYPE_SUB = 1

# struct xfrm_userpolicy_default values
XFRM_USERPOLICY_UNSPEC = 0
XFRM_USERPOLICY_BLOCK = 1
XFRM_USERPOLICY_ACCEPT = 2

# enum xfrm_ae_ftype_t
XFRM_AE_RTHR = 1
XFRM_AE_RVAL = 2
XFRM_AE_LVAL = 4
XFRM_AE_ETHR = 8
XFRM_AE_CR = 16
XFRM_AE_CE = 32
XFRM_AE_CU = 64

# include/uapi/linux/udp.h: UDP_ENCAP_ESPINUDP (RFC 3948 NAT-T)
UDP_ENCAP_ESPINUDP_NON_IKE = 1
UDP_ENCAP_ESPINUDP = 2
# include/uapi/linux/in.h
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
IPSEC_PROTO_ANY = 255  # include/uapi/linux/ipsec.h


# -- C struct layout -----------------------------------------------------------------------------
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


ALL_STRUCTS: tuple[type[CStruct], ...] = (
    XfrmAddress,
    XfrmId,
    XfrmSelector,
    XfrmLifetimeCfg,
    XfrmLifetimeCur,
    XfrmStats,
    XfrmReplayState,
    XfrmReplayStateEsn,
    XfrmAlgo,
    XfrmAlgoAuth,
    XfrmAlgoAead,
    XfrmEncapTmpl,
    XfrmUserTmpl,
    XfrmMark,
    XfrmUserpolicyType,
    XfrmUserOffload,
    XfrmAddressFilter,
    XfrmUsersaInfo,
    XfrmUsersaId,
    XfrmAeventId,
    XfrmUserpolicyInfo,
    XfrmUserpolicyId,
    XfrmUserAcquire,
    XfrmUserExpire,
    XfrmUserPolexpire,
    XfrmUsersaFlush,
    XfrmUserpolicyDefault,
    XfrmUserReport,
)


# -- attributes ------------------------------------------------------------------------------------
class _struct_nla(nla_base_string):
    """An NLA whose payload is one C struct (plus its flexible tail); value: a dict."""

    __slots__ = ()
    ctype: ClassVar[type[CStruct]] = CStruct

    def _plain_value(self) -> Any:
        if self.value is not NotInitialized:
            return self.value
        # pyroute2's setvalue() merges a dict value into the NLA itself.
        return {k: v for k, v in self.items() if k not in ("header", "attrs", "value")}

    def encode(self) -> None:
        self["value"] = self.ctype.pack(self._plain_value())
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        self.value = self.ctype.unpack(self["value"])


class _struct_array_nla(_struct_nla):
    """An NLA holding back-to-back structs (XFRMA_TMPL); value: a list of dicts."""

    __slots__ = ()

    def encode(self) -> None:
        items = self._plain_value() or []
        self["value"] = b"".join(self.ctype.pack(i) for i in items)
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        raw, size = self["value"], self.ctype.size
        if len(raw) % size:
            raise ValueError(f"{self.ctype.__name__} array: {len(raw)} bytes, not a multiple")
        self.value = [self.ctype.unpack(raw[i : i + size]) for i in range(0, len(raw), size)]


def _nla_of(ctype: type[CStruct], array: bool = False) -> type[nla_base_string]:
    base = _struct_array_nla if array else _struct_nla
    return type(f"nla_{ctype.__name__}", (base,), {"__slots__": (), "ctype": ctype})


class _xfrm_attrs:
    """The XFRMA_* attribute table (enum xfrm_attr_type_t), shared by every XFRM message."""

    xfrm_algo = _nla_of(XfrmAlgo)
    xfrm_algo_auth = _nla_of(XfrmAlgoAuth)
    xfrm_algo_aead = _nla_of(XfrmAlgoAead)
    xfrm_encap_tmpl = _nla_of(XfrmEncapTmpl)
    xfrm_user_tmpl = _nla_of(XfrmUserTmpl, array=True)
    xfrm_usersa_info = _nla_of(XfrmUsersaInfo)
    xfrm_userpolicy_info = _nla_of(XfrmUserpolicyInfo)
    xfrm_lifetime_cur = _nla_of(XfrmLifetimeCur)
    xfrm_replay_state = _nla_of(XfrmReplayState)
    xfrm_replay_state_esn = _nla_of(XfrmReplayStateEsn)
    xfrm_address = _nla_of(XfrmAddress)
    xfrm_userpolicy_type = _nla_of(XfrmUserpolicyType)
    xfrm_mark = _nla_of(XfrmMark)
    xfrm_address_filter = _nla_of(XfrmAddressFilter)
    xfrm_user_offload = _nla_of(XfrmUserOffload)

    prefix = "XFRMA_"
    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (3, "XFRMA_ALG_COMP", "xfrm_algo"),
        (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (5, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (6, "XFRMA_SA", "xfrm_usersa_info"),
        (7, "XFRMA_POLICY", "xfrm_userpolicy_info"),
        (8, "XFRMA_SEC_CTX", "cdata"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "xfrm_address"),
        (14, "XFRMA_COADDR", "xfrm_address"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (17, "XFRMA_MIGRATE", "cdata"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (19, "XFRMA_KMADDRESS", "cdata"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "xfrm_address_filter"),
        (27, "XFRMA_PAD", "none"),
        (28, "XFRMA_OFFLOAD_DEV", "xfrm_user_offload"),
        (29, "XFRMA_SET_MARK", "uint32"),  # a.k.a. XFRMA_OUTPUT_MARK
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
        (32, "XFRMA_MTIMER_THRESH", "uint32"),
        (33, "XFRMA_SA_DIR", "uint8"),
        (34, "XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
        (35, "XFRMA_SA_PCPU", "uint32"),
        (36, "XFRMA_IPTFS_DROP_TIME", "uint32"),
        (37, "XFRMA_IPTFS_REORDER_WINDOW", "uint16"),
        (38, "XFRMA_IPTFS_DONT_FRAG", "flag"),
        (39, "XFRMA_IPTFS_INIT_DELAY", "uint32"),
        (40, "XFRMA_IPTFS_MAX_QSIZE", "uint32"),
        (41, "XFRMA_IPTFS_PKT_SIZE", "uint32"),
    )


def _msg(name: str, ctype: type[CStruct] | None) -> type[nlmsg]:
    fields = ctype.layout if ctype is not None else ()
    doc = ctype.__doc__ if ctype is not None else "No fixed header: attributes only."
    return type(name, (_xfrm_attrs, nlmsg), {"__slots__": (), "fields": fields, "__doc__": doc})


xfrm_usersa_info = _msg("xfrm_usersa_info", XfrmUsersaInfo)
xfrm_usersa_id = _msg("xfrm_usersa_id", XfrmUsersaId)
xfrm_userpolicy_info = _msg("xfrm_userpolicy_info", XfrmUserpolicyInfo)
xfrm_userpolicy_id = _msg("xfrm_userpolicy_id", XfrmUserpolicyId)
xfrm_user_expire = _msg("xfrm_user_expire", XfrmUserExpire)
xfrm_user_polexpire = _msg("xfrm_user_polexpire", XfrmUserPolexpire)
xfrm_user_acquire = _msg("xfrm_user_acquire", XfrmUserAcquire)
xfrm_aevent_id = _msg("xfrm_aevent_id", XfrmAeventId)
xfrm_usersa_flush = _msg("xfrm_usersa_flush", XfrmUsersaFlush)
xfrm_userpolicy_default = _msg("xfrm_userpolicy_default", XfrmUserpolicyDefault)
xfrm_user_report = _msg("xfrm_user_report", XfrmUserReport)
xfrm_empty = _msg("xfrm_empty", None)

# What the kernel sends (replies and multicast), by message type. DELSA and DELPOLICY carry the
# id struct with the full info in an XFRMA_SA / XFRMA_POLICY attribute (xfrm_notify_sa() and
# xfrm_notify_policy() in net/xfrm/xfrm_user.c).
RECV_CLASSES: dict[int, type[nlmsg]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_ACQUIRE: xfrm_user_acquire,
    XFRM_MSG_EXPIRE: xfrm_user_expire,
    XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
    XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    XFRM_MSG_FLUSHPOLICY: xfrm_empty,
    XFRM_MSG_NEWAE: xfrm_aevent_id,
    XFRM_MSG_GETAE: xfrm_aevent_id,
    XFRM_MSG_REPORT: xfrm_user_report,
    XFRM_MSG_GETDEFAULT: xfrm_userpolicy_default,
    XFRM_MSG_SETDEFAULT: xfrm_userpolicy_default,
}


class MarshalXfrm(Marshal):
    """Decode a buffer of XFRM netlink messages with the classes above."""

    msg_map = dict(RECV_CLASSES)
