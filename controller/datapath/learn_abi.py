# SPDX-License-Identifier: GPL-2.0-only
"""ctypes mirror of bpf/include/learn_defs.h (the learner's event and map layouts).

The C header is the source of truth. STRUCTS and CONSTANTS below join the registry in
controller/datapath/abi.py, which tests/bpf/test_abi.py checks against the header (gcc) and the
BPF target's layout (BCC); tp_learn.c has _Static_asserts on the two sizes that matter most.
"""

from __future__ import annotations

import ctypes as ct
from pathlib import Path

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "learn_defs.h"

LEARN_ROLE_LAN = 1
LEARN_ROLE_WAN = 2
LEARN_ROLE_XFRMI = 3  # an xfrm interface (route-based tunnel)

LEARN_DIR_ENCAP = 1
LEARN_DIR_DECAP = 2
LEARN_DIR_CLEAR_OUT = 3
LEARN_DIR_CLEAR_IN = 4

LEARN_F_ESP_RX = 0x01
LEARN_F_ESP_TX = 0x02
LEARN_F_SECPATH = 0x04
LEARN_F_FIB = 0x08
LEARN_F_MANGLED = 0x10
LEARN_F_IP_OPTS = 0x20
LEARN_F_UDP_ENCAP = 0x40  # the wire's ESP was in UDP (NAT-T): encap_sport/encap_dport valid

LEARN_STAT_RX = 0
LEARN_STAT_RX_ESP = 1
LEARN_STAT_RX_DECRYPTED = 2
LEARN_STAT_FIB_MATCH = 3
LEARN_STAT_TX_SIGHTED = 4
LEARN_STAT_TX_IIF_MISMATCH = 5
LEARN_STAT_TX_STALE = 6
LEARN_STAT_TX_UNPARSED = 7
LEARN_STAT_TX_NOT_FORWARD = 8
LEARN_STAT_SUPPRESSED = 9
LEARN_STAT_EMITTED = 10
LEARN_STAT_PERF_FAIL = 11
LEARN_STAT_TX_UNSIGHTED = 12
LEARN_STAT_MAX = 13

STAT_NAMES = {
    v: k.removeprefix("LEARN_STAT_").lower()
    for k, v in dict(globals()).items()
    if k.startswith("LEARN_STAT_") and k != "LEARN_STAT_MAX"
}


class LearnEvent(ct.Structure):
    """struct learn_event (112 bytes); "be" fields are network byte order."""

    _fields_ = (
        ("ktime_rx", ct.c_uint64),
        ("ktime_tx", ct.c_uint64),
        ("skbaddr", ct.c_uint64),
        ("netns_ino", ct.c_uint32),
        ("in_ifindex", ct.c_uint32),
        ("out_ifindex", ct.c_uint32),
        ("tx_len", ct.c_uint32),
        ("saddr", ct.c_uint32),  # be
        ("daddr", ct.c_uint32),  # be
        ("sport", ct.c_uint16),  # be
        ("dport", ct.c_uint16),  # be
        ("proto", ct.c_uint8),
        ("direction", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("sp_len", ct.c_uint8),
        ("esp_spi", ct.c_uint32),  # be
        ("esp_seq", ct.c_uint32),  # be
        ("esp_iv", ct.c_uint8 * 8),
        ("sp_spi", ct.c_uint32),  # be
        ("outer_saddr", ct.c_uint32),  # be
        ("outer_daddr", ct.c_uint32),  # be
        ("eth_dst", ct.c_uint8 * 6),
        ("eth_src", ct.c_uint8 * 6),
        ("outer_proto", ct.c_uint8),
        ("pad0", ct.c_uint8 * 3),
        ("fib_tb_id", ct.c_uint32),
        ("fib_gw4", ct.c_uint32),  # be
        ("encap_sport", ct.c_uint16),  # be
        ("encap_dport", ct.c_uint16),  # be
    )


class LearnSighting(ct.Structure):
    """struct learn_sighting (56 bytes)."""

    _fields_ = (
        ("ktime", ct.c_uint64),
        ("ifindex", ct.c_uint32),
        ("saddr", ct.c_uint32),
        ("daddr", ct.c_uint32),
        ("sport", ct.c_uint16),
        ("dport", ct.c_uint16),
        ("proto", ct.c_uint8),
        ("flags", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("esp_spi", ct.c_uint32),
        ("esp_seq", ct.c_uint32),
        ("fib_tb_id", ct.c_uint32),
        ("fib_gw4", ct.c_uint32),
        ("encap_sport", ct.c_uint16),  # be
        ("encap_dport", ct.c_uint16),  # be
        ("via_ifindex", ct.c_uint32),
        ("pad1", ct.c_uint32),
    )


class LearnCfg(ct.Structure):
    """struct learn_cfg."""

    _fields_ = (("netns_ino", ct.c_uint32), ("pad", ct.c_uint32))


# The registry entries (controller/datapath/abi.py): C struct name -> ctypes class, and every
# LEARN_* #define of the header -> its value here.
STRUCTS: dict[str, type[ct.Structure]] = {
    "learn_event": LearnEvent,
    "learn_sighting": LearnSighting,
    "learn_cfg": LearnCfg,
}
CONSTANTS: dict[str, int] = {
    k: v for k, v in dict(globals()).items() if k.startswith("LEARN_") and isinstance(v, int)
}
