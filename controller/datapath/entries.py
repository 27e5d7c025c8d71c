# SPDX-License-Identifier: GPL-2.0-only
"""What the controller writes into the datapath's flow and SA maps, built as the ctypes structs
of controller/datapath/abi.py (struct xfp_flow_key, xfp_flow_val, xfp_sa_out, xfp_sa_in_key,
xfp_sa_in of bpf/include/xfp_defs.h). Pure: no bcc, no map access; controller/datapath/xdp.py
writes them, and the agent's in-memory test backend (tests/lib) keeps them as they are.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

from controller.core.state import Direction
from controller.datapath import abi as defs
from controller.datapath import kcrypto_abi
from controller.datapath.abi import FlowKey, FlowVal, SaIn, SaInKey, SaOut

# Outbound sequence limit without ESN: the kernel's xfrm_replay_overflow() refuses to wrap the
# 32-bit counter, so 0xffffffff is the last number; the datapath punts at seq >= seq_limit.
SEQ_LIMIT_32 = 1 << 32
NEVER = (1 << 64) - 1


@dataclass
class OutboundSa:
    """What the controller knows of an outbound SA, turned into struct xfp_sa_out by
    `to_c()`. `key` is the 36-byte rfc7539esp key blob (32-byte key || 4-byte salt) exactly
    as XFRM carries it (XFRMA_ALG_AEAD)."""

    sa_id: int
    spi: int
    saddr: str
    daddr: str
    key: bytes
    egress_ifindex: int
    dmac: str | bytes
    smac: str | bytes
    mtu: int = 1500
    seq: int = 1  # next sequence number to send
    seq_limit: int = SEQ_LIMIT_32
    iv_mask: int = 0
    esn: bool = False
    deadline_ns: int = NEVER
    ttl: int = 64
    offload: bool = True
    extra_flags: int = 0  # defs.SA_F_NOECN | SA_F_NOPMTUDISC | SA_F_DONT_ENCAP_DSCP
    # Kernel crypto backend: the xfp_crypto context that seals (SA_F_KCRYPTO); `key` is then
    # empty and the entry's key and salt stay zero, the key lives in the module only.
    kc_id: int | None = None
    # RFC 3948 NAT-T: (source, destination) UDP ports, host order, as the SA's XFRMA_ENCAP
    # (ours, the peer's); None: plain ESP.
    encap_ports: tuple[int, int] | None = None

    def to_c(self) -> SaOut:
        _check_key(self.key, self.kc_id)
        c = SaOut()
        c.sa_id = self.sa_id
        c.spi = defs.be32(self.spi)
        c.saddr = defs.be32(self.saddr)
        c.daddr = defs.be32(self.daddr)
        c.flags = (
            (defs.SA_F_OFFLOAD if self.offload else 0)
            | (defs.SA_F_ESN if self.esn else 0)
            | self.extra_flags
        )
        _put_key(c, self.key, self.kc_id)
        _put_encap(c, self.encap_ports)
        c.egress_ifindex = self.egress_ifindex
        c.seq = self.seq
        c.seq_limit = self.seq_limit
        c.iv_mask = self.iv_mask
        c.deadline_ns = self.deadline_ns
        c.mtu = self.mtu
        c.ttl = self.ttl
        c.dmac[:] = defs.mac_bytes(self.dmac)
        c.smac[:] = defs.mac_bytes(self.smac)
        return c


@dataclass
class InboundSa:
    """An inbound SA, turned into (struct xfp_sa_in_key, struct xfp_sa_in) by `to_c()`."""

    sa_id: int
    spi: int
    saddr: str  # the peer
    daddr: str  # our address: with spi, the map key (as the kernel's (daddr, spi, proto))
    key: bytes
    replay_window: int = 64
    esn: bool = False
    deadline_ns: int = NEVER
    # Highest sequence number already seen (0: none). Every number in the window below it
    # counts as seen too: the kernel's path may have accepted any of them before the offload
    # (conservative, like the hand-back: a delayed packet inside the window is dropped).
    seq_top: int = 0
    offload: bool = True
    extra_flags: int = 0  # defs.SA_F_NOECN
    kc_id: int | None = None  # as OutboundSa.kc_id: the context that opens
    # NAT-T: (source, destination) UDP ports as the SA's XFRMA_ENCAP (the peer's, ours).
    encap_ports: tuple[int, int] | None = None

    def c_key(self) -> SaInKey:
        return SaInKey(spi=defs.be32(self.spi), daddr=defs.be32(self.daddr))

    def to_c(self) -> tuple[SaInKey, SaIn]:
        _check_key(self.key, self.kc_id)
        if not 0 <= self.replay_window <= defs.REPLAY_MAX_WINDOW:
            raise ValueError(
                f"replay window {self.replay_window} not in 0..{defs.REPLAY_MAX_WINDOW}"
            )
        c = SaIn()
        c.sa_id = self.sa_id
        c.spi = defs.be32(self.spi)
        c.saddr = defs.be32(self.saddr)
        c.daddr = defs.be32(self.daddr)
        c.flags = (
            (defs.SA_F_OFFLOAD if self.offload else 0)
            | (defs.SA_F_ESN if self.esn else 0)
            | self.extra_flags
        )
        _put_key(c, self.key, self.kc_id)
        _put_encap(c, self.encap_ports)
        c.replay_window = self.replay_window
        c.deadline_ns = self.deadline_ns
        c.seq_top = self.seq_top
        if self.seq_top and self.replay_window:
            # bpf/include/esp/esp.h's ring (RFC 6479): bit (s & 63) of word (s >> 6) % WORDS
            for seq in range(max(1, self.seq_top - self.replay_window + 1), self.seq_top + 1):
                c.bitmap[(seq >> 6) % defs.REPLAY_WORDS] |= 1 << (seq & 63)
        return self.c_key(), c


def _check_key(key: bytes, kc_id: int | None) -> None:
    if kc_id is None and len(key) != 36:
        raise ValueError(f"rfc7539esp key is 32 + 4 bytes, not {len(key)}")
    if kc_id is not None and (key or not 0 <= kc_id < kcrypto_abi.CTX_MAX):
        raise ValueError(f"kernel crypto context {kc_id}: no key in the entry, id below CTX_MAX")


def _put_key(c: SaOut | SaIn, key: bytes, kc_id: int | None) -> None:
    """The BPF AEAD's key and salt, or (kernel backend) the context id and SA_F_KCRYPTO."""
    if kc_id is not None:
        c.flags |= defs.SA_F_KCRYPTO
        c.kc_id = kc_id
        return
    ctypes.memmove(c.key, key[:32], 32)
    ctypes.memmove(c.salt, key[32:], 4)


def _put_encap(c: SaOut | SaIn, ports: tuple[int, int] | None) -> None:
    """RFC 3948 UDP encapsulation: SA_F_ESPINUDP and the ports (fields marked "be")."""
    if ports is None:
        return
    sport, dport = ports
    if not (0 < sport < 65536 and 0 < dport < 65536):
        raise ValueError(f"NAT-T ports {sport}, {dport} not in 1..65535")
    c.flags |= defs.SA_F_ESPINUDP
    c.encap_sport = defs.be16(sport)
    c.encap_dport = defs.be16(dport)


def flow_key(
    ifindex: int,
    direction: Direction,
    proto: int,
    saddr: str,
    daddr: str,
    sport: int = 0,
    dport: int = 0,
) -> FlowKey:
    """struct xfp_flow_key from host-order values. ICMP: sport = echo identifier,
    dport = (type << 8) | code."""
    return FlowKey(
        ifindex=ifindex,
        dir=int(direction),
        proto=proto,
        saddr=_be32_addr(saddr),
        daddr=_be32_addr(daddr),
        sport=socket.htons(sport),  # defs.be16, without its int -> bytes -> int round trip
        dport=socket.htons(dport),
    )


_U32 = struct.Struct("=I")


def _be32_addr(addr: str) -> int:
    """defs.be32 of a dotted quad through inet_pton (C, strict like ipaddress: about 0.5 us
    against 2 us; the learner builds a key per learned flow); anything else through be32."""
    try:
        return _U32.unpack(socket.inet_pton(socket.AF_INET, addr))[0]
    except (OSError, TypeError):
        return defs.be32(addr)


def flow_val(
    sa_id: int,
    egress_ifindex: int = 0,
    dmac: str | bytes = b"\0" * 6,
    smac: str | bytes = b"\0" * 6,
    mtu: int = 0,
    active: bool = True,
) -> FlowVal:
    """struct xfp_flow_val. Encap flows name the outbound SA and, as the controller installs
    them, the outer next hop validated for the flow (WAN egress, L2, MTU; without an egress
    the SA's are used); decap flows name the inbound SA's sa_id and carry the LAN egress and
    L2 rewrite."""
    v = FlowVal(sa_id=sa_id, egress_ifindex=egress_ifindex, mtu=mtu)
    v.flags = defs.FLOW_F_ACTIVE if active else 0
    v.dmac[:] = defs.mac_bytes(dmac)
    v.smac[:] = defs.mac_bytes(smac)
    return v
