# SPDX-License-Identifier: GPL-2.0-only
"""Kernel ESP tunnels with static keys between gw1 and gw2 of a test bed (`ip xfrm`).

The reference peer for every real-kernel test: kernel ESP with RFC 7634 ChaCha20-Poly1305
(`rfc7539esp(chacha20,poly1305)`: 32-byte key + 4-byte salt, 8-byte IV, 128-bit ICV) in tunnel
mode, protecting LAN_NET <-> REMOTE_NET between GW1_WAN and GW2_WAN of testbed/addresses.env.
Tests choose their own SPIs and keys, and may install the kernel side on one gateway only (the
other side being the XDP datapath under test).

    tun = install_static_esp(bed)                 # both gateways, random keys
    assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=3)
    tun.counters("gw1")[tun.out_spi].packets      # from `ip -s xfrm state`
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.bed import Testbed

AEAD = "rfc7539esp(chacha20,poly1305)"
KEY_LEN = 36  # 32-byte ChaCha20 key + 4-byte salt (RFC 7634 section 2 and 4)
AES_GCM = "rfc4106(gcm(aes))"  # RFC 4106: 16- or 32-byte AES key + 4-byte salt, ICV 16
KEY_LENS = {AEAD: (KEY_LEN,), AES_GCM: (20, 36)}
ICV_BITS = 128  # RFC 7634 section 2: the Poly1305 tag, 16 bytes


@dataclass(frozen=True)
class StaticSa:
    """One direction of the tunnel: outer addresses, SPI and keying material."""

    src: str
    dst: str
    spi: int
    key: bytes
    aead: str = AEAD  # the kernel's name; every one here has a 128-bit ICV

    def __post_init__(self) -> None:
        if len(self.key) not in KEY_LENS[self.aead]:
            raise ValueError(f"{self.aead} needs {KEY_LENS[self.aead]} bytes of key+salt")
        if not 256 <= self.spi <= 0xFFFFFFFF:
            raise ValueError(f"SPI {self.spi:#x}: 1..255 are reserved (RFC 4303 section 2.1)")


@dataclass(frozen=True)
class SaCounters:
    """Lifetime counters and outbound sequence of one SA, as the kernel reports them."""

    bytes: int
    packets: int
    oseq: int
    seq: int


@dataclass(frozen=True)
class StaticTunnel:
    """Both directions between gw1 and gw2; `out` is gw1 -> gw2, `back` is gw2 -> gw1."""

    bed: Testbed
    out: StaticSa
    back: StaticSa
    reqid: int
    roles: tuple[str, ...]

    @property
    def out_spi(self) -> int:
        return self.out.spi

    @property
    def back_spi(self) -> int:
        return self.back.spi

    def counters(self, role: str) -> dict[int, SaCounters]:
        """SA counters in a gateway's namespace, keyed by SPI (`ip -s xfrm state`)."""
        return parse_xfrm_state_stats(self.bed.ip(role, "-s", "xfrm", "state").stdout)

    def remove(self) -> None:
        """Delete the SAs and policies again (the namespaces may go on being used)."""
        for role in self.roles:
            self.bed.ip(role, "xfrm", "policy", "flush", check=False)
            self.bed.ip(role, "xfrm", "state", "flush", check=False)


def random_sa(
    src: str, dst: str, spi: int | None = None, aead: str = AEAD, key_len: int = KEY_LEN
) -> StaticSa:
    if spi is None:
        spi = 0x1000 + int.from_bytes(os.urandom(3), "big")
    return StaticSa(src, dst, spi, os.urandom(key_len), aead)


def _sa_argv(
    sa: StaticSa, reqid: int, replay_window: int, ports: tuple[int, int] | None = None
) -> list[str]:
    # fmt: off
    argv = [
        "xfrm", "state", "add", "src", sa.src, "dst", sa.dst,
        "proto", "esp", "spi", f"{sa.spi:#010x}", "reqid", str(reqid), "mode", "tunnel",
        "replay-window", str(replay_window),
        "aead", sa.aead, "0x" + sa.key.hex(), str(ICV_BITS),
    ]
    # fmt: on
    if ports is not None:  # RFC 3948 NAT-T: UDP source and destination port of this SA
        argv += ["encap", "espinudp", str(ports[0]), str(ports[1]), "0.0.0.0"]
    return argv


def _policy_argv(
    direction: str, src_net: str, dst_net: str, tmpl: StaticSa, reqid: int
) -> list[str]:
    # fmt: off
    return [
        "xfrm", "policy", "add", "src", src_net, "dst", dst_net, "dir", direction,
        "tmpl", "src", tmpl.src, "dst", tmpl.dst, "proto", "esp", "reqid", str(reqid),
        "mode", "tunnel",
    ]
    # fmt: on


def install_static_esp(
    bed: Testbed,
    *,
    out: StaticSa | None = None,
    back: StaticSa | None = None,
    reqid: int = 1,
    replay_window: int = 32,
    roles: Iterable[str] = ("gw1", "gw2"),
    aead: str = AEAD,
    key_len: int = KEY_LEN,
    encap: tuple[int, int] | None = None,
) -> StaticTunnel:
    """Install SAs (both directions) and policies (out/in/fwd) on the given gateways.

    `encap` = (gw1's UDP port, gw2's UDP port): NAT-T (RFC 3948), every SA with `encap
    espinudp` and the ports of its direction. Receiving ESP-in-UDP also needs a UDP socket
    with UDP_ENCAP on the receiver's port (the IKE daemon's; a test opens its own).

    The forward policy matters on a gateway: decapsulated packets that are forwarded (not
    delivered locally) are checked against a `dir fwd` policy (net/xfrm/xfrm_policy.c,
    __xfrm_policy_check with XFRM_POLICY_FWD from ip_forward), and dropped without one.
    """
    p = bed.plan
    out = out or random_sa(p["GW1_WAN"], p["GW2_WAN"], aead=aead, key_len=key_len)
    back = back or random_sa(p["GW2_WAN"], p["GW1_WAN"], aead=aead, key_len=key_len)
    roles = tuple(roles)
    tun = StaticTunnel(bed, out, back, reqid, roles)
    for role in roles:
        if role == "gw1":
            local_net, peer_net, tx, rx = p["LAN_NET"], p["REMOTE_NET"], out, back
        elif role == "gw2":
            local_net, peer_net, tx, rx = p["REMOTE_NET"], p["LAN_NET"], back, out
        else:
            raise ValueError(f"static ESP runs on gw1 and gw2, not {role!r}")
        ports_out = encap
        ports_back = (encap[1], encap[0]) if encap is not None else None
        tx_ports, rx_ports = (ports_out, ports_back) if role == "gw1" else (ports_back, ports_out)
        bed.ip(role, *_sa_argv(tx, reqid, replay_window, tx_ports))
        bed.ip(role, *_sa_argv(rx, reqid, replay_window, rx_ports))
        bed.ip(role, *_policy_argv("out", local_net, peer_net, tx, reqid))
        bed.ip(role, *_policy_argv("in", peer_net, local_net, rx, reqid))
        bed.ip(role, *_policy_argv("fwd", peer_net, local_net, rx, reqid))
    return tun


_STATE_HEAD = re.compile(r"^src (\S+) dst (\S+)$", re.M)
_SPI = re.compile(r"proto esp spi (0x[0-9a-f]+)")
_CURRENT = re.compile(r"lifetime current:\s*\n\s*(\d+)\(bytes\), (\d+)\(packets\)")
_SEQ = re.compile(r"anti-replay (?:esn )?context:.*?seq (0x[0-9a-f]+), oseq (0x[0-9a-f]+)", re.S)


def parse_xfrm_state_stats(text: str) -> dict[int, SaCounters]:
    """Parse `ip -s xfrm state`: per ESP SPI, lifetime bytes/packets and (o)seq."""
    heads = list(_STATE_HEAD.finditer(text))
    result: dict[int, SaCounters] = {}
    for i, head in enumerate(heads):
        block = text[head.start() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        spi, cur = _SPI.search(block), _CURRENT.search(block)
        if not spi or not cur:
            continue
        seq = _SEQ.search(block)
        result[int(spi.group(1), 16)] = SaCounters(
            bytes=int(cur.group(1)),
            packets=int(cur.group(2)),
            seq=int(seq.group(1), 16) if seq else 0,
            oseq=int(seq.group(2), 16) if seq else 0,
        )
    return result
