# SPDX-License-Identifier: GPL-2.0-only
"""ctypes mirror of bpf/include/kcrypto_defs.h: the xfp_crypto module's ioctls, algorithms,
kfunc return codes and the placeholder helper ids that controller/datapath/kfunc.py rewrites
into kfunc calls.

The C header is the source of truth. STRUCTS, CONSTANTS and ENUMS below join the registry in
controller/datapath/abi.py, which tests/bpf/test_abi.py checks against the header (gcc) and the
BPF target's layout (BCC).
"""

from __future__ import annotations

import ctypes as ct
import enum

CTX_MAX = 4096
KEY_MAX = 64
ICV_LEN = 16
PAYLOAD_OFF = 16  # SPI, sequence number, IV
SALT_LEN = 4

F_ESN = 0x1


class Alg(enum.IntEnum):
    """enum xfp_kc_alg: what a context does."""

    CHACHA20_POLY1305 = 1  # RFC 7634: key 32 + salt 4
    AES_GCM = 2  # RFC 4106: key 16 or 32 + salt 4


class KcRet(enum.IntEnum):
    """enum xfp_kc_ret: what a kfunc returns (bpf/include/kcrypto_defs.h says what each asks
    the program to do)."""

    OK = 0
    BAD_TAG = 1
    NO_CTX = 2
    BOUNDS = 3
    FRAGS = 4
    SHARED = 5
    NO_SIMD = 6
    CRYPTO = 7
    MAX = 8


class KcCreate(ct.Structure):
    """struct xfp_kc_create (80 bytes):

    struct xfp_kc_create { __u32 id; __u32 alg; __u32 flags; __u32 key_len;
                           __u8 key[XFP_KC_KEY_MAX]; };
    """

    _fields_ = (
        ("id", ct.c_uint32),
        ("alg", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("key_len", ct.c_uint32),
        ("key", ct.c_uint8 * KEY_MAX),
    )


# include/uapi/asm-generic/ioctl.h: _IOC(dir, type, nr, size), dir WRITE = 1, NONE = 0.
def _ioc(direction: int, kind: str, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | nr


IOC_CREATE = _ioc(1, "X", 1, ct.sizeof(KcCreate))
IOC_DESTROY = _ioc(1, "X", 2, 4)
IOC_FLUSH = _ioc(0, "X", 3, 0)

# Placeholder helper id -> the kfunc a call to it becomes (bpf/include/kcrypto/kcrypto.h).
CALL_XDP_SEAL = 0x10001
CALL_XDP_OPEN = 0x10002
CALL_SKB_SEAL = 0x10003
CALL_SKB_OPEN = 0x10004
KFUNCS: dict[int, str] = {
    CALL_XDP_SEAL: "xfp_kc_xdp_seal",
    CALL_XDP_OPEN: "xfp_kc_xdp_open",
    CALL_SKB_SEAL: "xfp_kc_skb_seal",
    CALL_SKB_OPEN: "xfp_kc_skb_open",
}

HEADER = "kcrypto_defs.h"
STRUCTS: dict[str, type[ct.Structure]] = {"xfp_kc_create": KcCreate}
CONSTANTS: dict[str, int] = {
    "XFP_KC_CTX_MAX": CTX_MAX,
    "XFP_KC_KEY_MAX": KEY_MAX,
    "XFP_KC_ICV_LEN": ICV_LEN,
    "XFP_KC_PAYLOAD_OFF": PAYLOAD_OFF,
    "XFP_KC_F_ESN": F_ESN,
    "XFP_KC_IOC_CREATE": IOC_CREATE,
    "XFP_KC_IOC_DESTROY": IOC_DESTROY,
    "XFP_KC_IOC_FLUSH": IOC_FLUSH,
    "XFP_KC_CALL_XDP_SEAL": CALL_XDP_SEAL,
    "XFP_KC_CALL_XDP_OPEN": CALL_XDP_OPEN,
    "XFP_KC_CALL_SKB_SEAL": CALL_SKB_SEAL,
    "XFP_KC_CALL_SKB_OPEN": CALL_SKB_OPEN,
}
ENUMS: dict[str, type[enum.IntEnum]] = {"XFP_KCA_": Alg, "XFP_KCR_": KcRet}
