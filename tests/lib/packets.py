# SPDX-License-Identifier: GPL-2.0-only
"""A scapy-free packet builder for the datapath tests (struct.pack), and a reference ESP
implementation on `cryptography` (RFC 4303 tunnel mode, RFC 7634 rfc7539esp) that the XDP
programs are checked against."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
IPPROTO_ICMP = 1
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ESP = 50
IP_DF = 0x4000
IP_MF = 0x2000


def mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


def csum(data: bytes) -> int:
    """RFC 1071 Internet checksum."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: str, src: str, proto: int = ETH_P_IP) -> bytes:
    return mac(dst) + mac(src) + struct.pack("!H", proto)


def ipv4(
    src: str,
    dst: str,
    proto: int,
    payload: bytes,
    *,
    tos: int = 0,
    ttl: int = 64,
    ident: int = 1,
    frag: int = IP_DF,
    options: bytes = b"",
    tot_len: int | None = None,
    check: int | None = None,
    version: int = 4,
) -> bytes:
    ihl = 5 + len(options) // 4
    total = tot_len if tot_len is not None else ihl * 4 + len(payload)
    hdr = (
        struct.pack(
            "!BBHHHBBH4s4s",
            (version << 4) | ihl,
            tos,
            total,
            ident,
            frag,
            ttl,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + options
    )
    c = csum(hdr) if check is None else check
    return hdr[:10] + struct.pack("!H", c) + hdr[12:] + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    # Checksum 0 (none): the datapath neither reads nor changes it.
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x10, 65535, 0, 0) + payload


def icmp_echo(ident: int, seq: int, payload: bytes = b"", type_: int = 8) -> bytes:
    body = struct.pack("!BBHHH", type_, 0, 0, ident, seq) + payload
    return body[:2] + struct.pack("!H", csum(body)) + body[4:]


def ip_ttl_dec(pkt: bytes) -> bytes:
    """What a router does to an IPv4 packet it forwards: TTL - 1, checksum recomputed."""
    hdr = bytearray(pkt[:20])
    hdr[8] -= 1
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return bytes(hdr) + pkt[20:]


def ip_set_tos(pkt: bytes, tos: int) -> bytes:
    hdr = bytearray(pkt[:20])
    hdr[1] = tos
    hdr[10:12] = b"\0\0"
    hdr[10:12] = struct.pack("!H", csum(bytes(hdr)))
    return bytes(hdr) + pkt[20:]


def esp_padlen(n: int) -> int:
    """esp4.c: payload + pad + 2 aligned to 4 for rfc7539esp."""
    return (4 - ((n + 2) % 4)) % 4


@dataclass
class EspSa:
    """One direction of an rfc7539esp SA, as `cryptography` sees it."""

    spi: int
    key: bytes  # 36 bytes: 32-byte key || 4-byte salt
    esn: bool = False

    def aad(self, seq: int) -> bytes:
        if self.esn:
            return struct.pack("!III", self.spi, seq >> 32, seq & 0xFFFFFFFF)
        return struct.pack("!II", self.spi, seq & 0xFFFFFFFF)

    def seal(
        self,
        seq: int,
        inner: bytes,
        iv: bytes | None = None,
        nexthdr: int = IPPROTO_IPIP,
        pad: bytes | None = None,
    ) -> bytes:
        """ESP header + IV + ciphertext + ICV (what follows the outer IPv4 header)."""
        iv = iv if iv is not None else struct.pack("!Q", seq)
        if pad is None:
            pad = bytes(range(1, esp_padlen(len(inner)) + 1))
        plain = inner + pad + bytes([len(pad), nexthdr])
        ct = ChaCha20Poly1305(self.key[:32]).encrypt(self.key[32:] + iv, plain, self.aad(seq))
        return struct.pack("!II", self.spi, seq & 0xFFFFFFFF) + iv + ct

    def open(self, esp: bytes, seq_hi: int = 0) -> tuple[int, bytes, bytes]:
        """(seq, iv, plaintext) of an ESP payload (raises InvalidTag when it is not authentic)."""
        spi, seql = struct.unpack("!II", esp[:8])
        assert spi == self.spi, f"SPI {spi:#x} is not {self.spi:#x}"
        seq = (seq_hi << 32) | seql
        iv = esp[8:16]
        plain = ChaCha20Poly1305(self.key[:32]).decrypt(self.key[32:] + iv, esp[16:], self.aad(seq))
        return seq, iv, plain
