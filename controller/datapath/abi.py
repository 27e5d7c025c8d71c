# SPDX-License-Identifier: GPL-2.0-only
"""The Python mirror of bpf/include/xfp_defs.h: struct layouts (ctypes), enums and constants of
the datapath (XDP programs and TC resequencer). The C struct is quoted beside each class.

The end of this module is THE registry of everything C and Python share: STRUCTS, CONSTANTS and
ENUMS, this module's, the learner's (controller/datapath/learn_abi.py, the mirror of
bpf/include/learn_defs.h) and the kernel crypto module's (controller/datapath/kcrypto_abi.py,
the mirror of bpf/include/kcrypto_defs.h). tests/bpf/test_abi.py iterates it: gcc compiles the
headers and checks sizes, offsets and values, BCC checks the BPF target's layout, and every
#define and enum member of the headers must have its twin here. Change both sides together.

Fields the header marks "be" hold network byte order: store them with `be32()` / `be16()` (an
int whose in-memory bytes are the wire bytes) and read them back with `from_be32()`.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import struct

from controller.core.state import Direction
from controller.datapath import kcrypto_abi, learn_abi

# ---- sizes ----------------------------------------------------------------------------------
FLOWS_MAX = 65536
SA_MAX = 1024
DEVMAP_SIZE = 4096
REPLAY_WORDS = 128
REPLAY_MAX_WINDOW = 4096

# ---- ESP constants (RFC 4303, RFC 7634) ------------------------------------------------------
ESP_HDR_LEN = 8
ESP_IV_LEN = 8
ESP_ICV_LEN = 16
ESP_ALIGN = 4
ENCAP_HEAD = 20 + ESP_HDR_LEN + ESP_IV_LEN

# ---- NAT-T (RFC 3948) ------------------------------------------------------------------------
UDP_LEN = 8  # the UDP header in front of ESP
NATT_PORT = 4500

# ---- flags -----------------------------------------------------------------------------------
FLOW_F_ACTIVE = 0x1

SA_F_OFFLOAD = 0x1
SA_F_ESN = 0x2
SA_F_NOECN = 0x4
SA_F_NOPMTUDISC = 0x8
SA_F_DONT_ENCAP_DSCP = 0x10
SA_F_KCRYPTO = 0x20  # the AEAD is the xfp_crypto context kc_id; key and salt zero
SA_F_ESPINUDP = 0x40  # RFC 3948: ESP in UDP with the ports encap_sport/encap_dport


# enum xfp_dir is controller.core.state.Direction (ENCAP, DECAP): one direction type for the
# agent, the metrics and the maps. Its count, XFP_DIR_MAX, is a constant here rather than a
# member, so that iterating Direction gives the two directions only.
DIR_MAX = len(Direction)


class Reason(enum.IntEnum):
    """enum xfp_reason: *_OK forwarded by XDP, PASS_* handed to the kernel untouched, DROP_*
    dropped. The per-CPU counter index is dir * Reason.MAX + reason."""

    ENCAP_OK = 0
    DECAP_OK = 1
    PASS_NOT_IPV4 = 2
    PASS_MALFORMED_IP = 3
    PASS_IP_OPTIONS = 4
    PASS_FRAGMENT = 5
    PASS_NOT_ESP = 6
    PASS_UNKNOWN_FLOW = 7
    PASS_UNKNOWN_SPI = 8
    PASS_NO_SA = 9
    PASS_SA_NOT_OFFLOADED = 10
    PASS_SA_EXPIRED = 11
    PASS_SEQ_EXHAUSTED = 12
    PASS_TTL = 13
    PASS_MTU = 14
    PASS_INNER_MISS = 15
    PASS_SA_MISMATCH = 16
    PASS_FLOW_DISABLED = 17
    PASS_NO_ROOM = 18
    DROP_BAD_ICV = 19
    DROP_REPLAY = 20
    DROP_MALFORMED_ESP = 21
    DROP_BAD_TRAILER = 22
    DROP_BAD_INNER = 23
    DROP_ECN = 24
    DROP_ERROR = 25
    PASS_LIVENESS = 26
    PASS_KCRYPTO = 27
    PASS_NATT_CTRL = 28
    PASS_NATT_MAPPING = 29
    MAX = 30


class ReseqStat(enum.IntEnum):
    """enum xfp_reseq_stat: what bpf/tc_reseq.c did with a kernel-built ESP frame of an
    offloaded SA; the index of its per-CPU counters (map xfp_reseq_stats)."""

    OK = 0
    EXHAUSTED = 1
    ERROR = 2
    EXPIRED = 3
    GSO = 4
    TOO_BIG = 5
    FRAGMENT = 6
    MAX = 7


# The resequencer's counter names, by index: ("ok", "exhausted", ..., "fragment").
RESEQ_STATS = tuple(s.name.lower() for s in ReseqStat if s is not ReseqStat.MAX)


def stat_index(direction: Direction | int, reason: Reason | int) -> int:
    """Index of (direction, reason) in the per-CPU counter array xfp_stats."""
    return int(direction) * int(Reason.MAX) + int(reason)


# ---- byte order helpers ------------------------------------------------------------------------
def be32(value: int | str | ipaddress.IPv4Address) -> int:
    """A host int whose in-memory bytes are `value` in network order (an IPv4 address string or
    a number such as an SPI), for the fields marked "be"."""
    if isinstance(value, str | ipaddress.IPv4Address):
        raw = ipaddress.IPv4Address(value).packed
    else:
        raw = int(value).to_bytes(4, "big")
    return struct.unpack("=I", raw)[0]


def be16(value: int) -> int:
    return struct.unpack("=H", int(value).to_bytes(2, "big"))[0]


def from_be32(field: int) -> int:
    """The number a "be" field holds (inverse of be32 for numbers)."""
    return int.from_bytes(struct.pack("=I", field), "big")


def from_be16(field: int) -> int:
    return int.from_bytes(struct.pack("=H", field), "big")


def ip_of(field: int) -> str:
    """The dotted IPv4 address a "be" address field holds."""
    return str(ipaddress.IPv4Address(struct.pack("=I", field)))


def mac_bytes(mac: str | bytes) -> bytes:
    """'02:00:0a:01:00:02' -> 6 bytes."""
    if isinstance(mac, bytes | bytearray):
        if len(mac) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(mac)}")
        return bytes(mac)
    raw = bytes(int(x, 16) for x in mac.split(":"))
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}")
    return raw


Mac = ctypes.c_uint8 * 6


# ---- structs -------------------------------------------------------------------------------------
class Stat(ctypes.Structure):
    """struct xfp_stat { __u64 packets; __u64 bytes; };"""

    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


class FlowKey(ctypes.Structure):
    """struct xfp_flow_key {
        __u32 ifindex; __u8 dir; __u8 proto; __u16 pad;
        __u32 saddr /* be */; __u32 daddr /* be */;
        __u16 sport /* be */; __u16 dport /* be; ICMP: (type << 8) | code */;
    };"""

    _fields_ = [
        ("ifindex", ctypes.c_uint32),
        ("dir", ctypes.c_uint8),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
    ]


class FlowVal(ctypes.Structure):
    """struct xfp_flow_val {
        __u32 sa_id; __u32 egress_ifindex; __u8 dmac[6]; __u8 smac[6]; __u32 flags;
        __u16 mtu; __u16 pad; __u32 pad1; __u64 last_seen_ns; __u64 packets; __u64 bytes;
    };"""

    _fields_ = [
        ("sa_id", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
        ("dmac", Mac),
        ("smac", Mac),
        ("flags", ctypes.c_uint32),
        ("mtu", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("pad1", ctypes.c_uint32),
        ("last_seen_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
    ]


class SaOut(ctypes.Structure):
    """struct xfp_sa_out {
        struct bpf_spin_lock lock; __u32 sa_id; __u32 spi /* be */;
        __u32 saddr /* be */; __u32 daddr /* be */; __u32 flags;
        __u8 key[32]; __u8 salt[4]; __u32 egress_ifindex;
        __u64 seq; __u64 seq_limit; __u64 iv_mask; __u64 deadline_ns;
        __u64 packets; __u64 bytes;
        __u16 mtu; __u8 ttl; __u8 pad0; __u8 dmac[6]; __u8 smac[6];
        __u32 kc_id; __u16 encap_sport /* be */; __u16 encap_dport /* be */;
    };"""

    _fields_ = [
        ("lock", ctypes.c_uint32),
        ("sa_id", ctypes.c_uint32),
        ("spi", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("key", ctypes.c_uint8 * 32),
        ("salt", ctypes.c_uint8 * 4),
        ("egress_ifindex", ctypes.c_uint32),
        ("seq", ctypes.c_uint64),
        ("seq_limit", ctypes.c_uint64),
        ("iv_mask", ctypes.c_uint64),
        ("deadline_ns", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("mtu", ctypes.c_uint16),
        ("ttl", ctypes.c_uint8),
        ("pad0", ctypes.c_uint8),
        ("dmac", Mac),
        ("smac", Mac),
        ("kc_id", ctypes.c_uint32),
        ("encap_sport", ctypes.c_uint16),
        ("encap_dport", ctypes.c_uint16),
    ]


class SaInKey(ctypes.Structure):
    """struct xfp_sa_in_key { __u32 spi /* be */; __u32 daddr /* be */; };"""

    _fields_ = [("spi", ctypes.c_uint32), ("daddr", ctypes.c_uint32)]


class SaIn(ctypes.Structure):
    """struct xfp_sa_in {
        struct bpf_spin_lock lock; __u32 sa_id; __u32 spi /* be */;
        __u32 saddr /* be */; __u32 daddr /* be */; __u32 flags;
        __u8 key[32]; __u8 salt[4]; __u32 replay_window;
        __u64 deadline_ns; __u64 seq_top; __u64 packets; __u64 bytes;
        __u64 replay_drops; __u64 icv_fails; __u64 bitmap[XFP_REPLAY_WORDS];
        __u32 kc_id; __u16 encap_sport /* be */; __u16 encap_dport /* be */;
    };"""

    _fields_ = [
        ("lock", ctypes.c_uint32),
        ("sa_id", ctypes.c_uint32),
        ("spi", ctypes.c_uint32),
        ("saddr", ctypes.c_uint32),
        ("daddr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("key", ctypes.c_uint8 * 32),
        ("salt", ctypes.c_uint8 * 4),
        ("replay_window", ctypes.c_uint32),
        ("deadline_ns", ctypes.c_uint64),
        ("seq_top", ctypes.c_uint64),
        ("packets", ctypes.c_uint64),
        ("bytes", ctypes.c_uint64),
        ("replay_drops", ctypes.c_uint64),
        ("icv_fails", ctypes.c_uint64),
        ("bitmap", ctypes.c_uint64 * REPLAY_WORDS),
        ("kc_id", ctypes.c_uint32),
        ("encap_sport", ctypes.c_uint16),
        ("encap_dport", ctypes.c_uint16),
    ]


# ---- the registry (tests/bpf/test_abi.py) -------------------------------------------------------
# The headers under bpf/include that the registry mirrors, in the order a C file includes them.
HEADERS = ("xfp_defs.h", "learn_defs.h", kcrypto_abi.HEADER)

# #defines of those headers with no Python twin, and why (include guards aside).
UNMIRRORED = {
    "XFP_LIVENESS_NS": "a -D tunable: the controller passes [timers] liveness when it compiles",
}

# C struct name -> ctypes class, for the layout test and for map type checks.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "xfp_stat": Stat,
    "xfp_flow_key": FlowKey,
    "xfp_flow_val": FlowVal,
    "xfp_sa_out": SaOut,
    "xfp_sa_in_key": SaInKey,
    "xfp_sa_in": SaIn,
    **learn_abi.STRUCTS,
    **kcrypto_abi.STRUCTS,
}

# C #define name -> Python value, for the layout test.
CONSTANTS: dict[str, int] = {
    "XFP_FLOWS_MAX": FLOWS_MAX,
    "XFP_SA_MAX": SA_MAX,
    "XFP_DEVMAP_SIZE": DEVMAP_SIZE,
    "XFP_REPLAY_WORDS": REPLAY_WORDS,
    "XFP_REPLAY_MAX_WINDOW": REPLAY_MAX_WINDOW,
    "XFP_ESP_HDR_LEN": ESP_HDR_LEN,
    "XFP_ESP_IV_LEN": ESP_IV_LEN,
    "XFP_ESP_ICV_LEN": ESP_ICV_LEN,
    "XFP_ESP_ALIGN": ESP_ALIGN,
    "XFP_ENCAP_HEAD": ENCAP_HEAD,
    "XFP_FLOW_F_ACTIVE": FLOW_F_ACTIVE,
    "XFP_SA_F_OFFLOAD": SA_F_OFFLOAD,
    "XFP_SA_F_ESN": SA_F_ESN,
    "XFP_SA_F_NOECN": SA_F_NOECN,
    "XFP_SA_F_NOPMTUDISC": SA_F_NOPMTUDISC,
    "XFP_SA_F_DONT_ENCAP_DSCP": SA_F_DONT_ENCAP_DSCP,
    "XFP_SA_F_KCRYPTO": SA_F_KCRYPTO,
    "XFP_SA_F_ESPINUDP": SA_F_ESPINUDP,
    "XFP_UDP_LEN": UDP_LEN,
    "XFP_NATT_PORT": NATT_PORT,
    "XFP_DIR_MAX": DIR_MAX,
    **learn_abi.CONSTANTS,
    **kcrypto_abi.CONSTANTS,
}

# C enum prefix -> Python enum (a member named MAX may be a constant instead: XFP_DIR_MAX).
ENUMS: dict[str, type[enum.IntEnum]] = {
    "XFP_DIR_": Direction,
    "XFP_R_": Reason,
    "XFP_RESEQ_": ReseqStat,
    **kcrypto_abi.ENUMS,
}
