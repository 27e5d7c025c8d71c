# SPDX-License-Identifier: GPL-2.0-only
"""Fuzzing the XDP datapath through BPF_PROG_TEST_RUN (issue 9): structure-aware mutations of
valid frames, and random bytes, through bpf/xdp_encap.c (clear LAN frames of a known flow) and
bpf/xdp_decap.c (ESP of a known inbound SA, sealed by the `cryptography` reference).

Invariants, for every frame:
- the verdict is XDP_PASS, XDP_DROP or XDP_REDIRECT (never XDP_ABORTED, never anything else);
- a passed frame comes back byte for byte as it went in (the kernel gets it untouched);
- encap: a redirected frame opens with the reference to exactly the original inner packet
  (TTL - 1) under a correct outer IPv4 header, with the next sequence number of the SA;
- decap: a redirected frame is exactly what the reference decrypts (authentic, pad 1, 2, ..,
  next header 4), a well-formed inner IPv4 packet of the offloaded flow (TTL - 1, ECN per
  RFC 6040), and its sequence number was never accepted before; a replay of a frame the
  program forwarded is dropped;
and for every batch of frames: the per-reason counters (Datapath.stats()) moved by exactly one
per frame and by its length in bytes, forwarded / punted / dropped reasons matching the
verdicts (every drop counted under a reason), and the SA's own counters agree.

Volume: FRAMES frames per program with the fixed SEED in `make test`; the campaign (docs/results.md)
sets XFP_FUZZ_FRAMES (`make fuzz`: 1,000,000 per program) and prints the figures
(run pytest with -s to see them). Frames shorter than an Ethernet header are refused by the
kernel's test run (EINVAL, net/bpf/test_run.c): they are counted apart, never run.
"""

from __future__ import annotations

import ctypes
import os
import random
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import packets as P
import pytest
import test_datapath as T
from cryptography.exceptions import InvalidTag
from test_datapath import LO, XDP_DROP, XDP_PASS, XDP_REDIRECT, dp  # noqa: F401 (fixture)

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.bpfsys import BpfTestRunError, prog_test_run
from controller.datapath.xdp import PINNED_MAPS, Datapath, flow_key, flow_val

SEED = 0x9F0209
FRAMES = int(os.environ.get("XFP_FUZZ_FRAMES", "0")) or 50_000
BATCH = 256  # frames between two counter reads (a read of every counter costs ~0.2 ms)
ETH_HLEN = 14
MAX_FRAME = 2048  # longer than XFP_MAX_FRAME (1600): the datapath must refuse those too
VERDICTS = {XDP_DROP: "XDP_DROP", XDP_PASS: "XDP_PASS", XDP_REDIRECT: "XDP_REDIRECT"}
REPLAY_WINDOW = 128
TCP_KEY = dict(proto=P.IPPROTO_TCP, saddr=T.LAN_HOST, daddr=T.REMOTE_HOST, sport=5555, dport=80)
ICMP_ID = 0x4242
ICMP_KEY = dict(
    proto=P.IPPROTO_ICMP, saddr=T.LAN_HOST, daddr=T.REMOTE_HOST, sport=ICMP_ID, dport=8 << 8
)


class Violation(AssertionError):
    """An invariant a frame broke (the message says which)."""


def expect(cond: object, what: str) -> None:
    if not cond:
        raise Violation(what)


# ---- field mutations, shared by the clear frames and the inner packets ------------------------
def fix_ip_csum(pkt: bytearray, off: int) -> None:
    """Recompute the checksum of the 20-byte IPv4 header at `off` (options not covered)."""
    if len(pkt) >= off + 20:
        pkt[off + 10 : off + 12] = b"\0\0"
        pkt[off + 10 : off + 12] = struct.pack("!H", P.csum(bytes(pkt[off : off + 20])))


def _set16(pkt: bytearray, at: int, v: int) -> None:
    pkt[at : at + 2] = struct.pack("!H", v & 0xFFFF)


def mutate_ip(rng: random.Random, pkt: bytearray, off: int) -> str:
    """One IPv4 header field of the packet at `off` set to an edge or random value; the
    checksum made valid again most of the time (what a sender would do), so that the checks
    behind the checksum are reached. Returns the field's name."""
    if len(pkt) < off + 20:
        return "none"  # cut short by an earlier mutation
    tot = struct.unpack("!H", pkt[off + 2 : off + 4])[0]
    name = rng.choice(
        ("version", "ihl", "tot_len", "frag", "ttl", "proto", "check", "tos", "addr", "id")
    )
    if name == "version":
        pkt[off] = (rng.choice((0, 5, 6, 15, rng.randrange(16))) << 4) | (pkt[off] & 0xF)
    elif name == "ihl":
        ihl = rng.choice((0, 4, 6, 15, rng.randrange(16)))
        pkt[off] = (pkt[off] & 0xF0) | ihl
        if ihl > 5 and rng.random() < 0.5:  # with option bytes really there (NOPs, EOL)
            opts = b"\x01" * ((ihl - 5) * 4 - 1) + b"\0"
            pkt[off + 20 : off + 20] = opts
            _set16(pkt, off + 2, tot + len(opts))
    elif name == "tot_len":
        _set16(
            pkt,
            off + 2,
            rng.choice((0, 19, 20, 27, 28, tot - 1, tot + 1, tot + rng.randrange(1, 80), 0xFFFF))
            if rng.random() < 0.8
            else rng.randrange(0x10000),
        )
    elif name == "frag":
        flags = rng.choice(
            (P.IP_MF, 1, 0x1FFF, P.IP_DF, 0x8000, P.IP_DF | 1, rng.randrange(1 << 16))
        )
        _set16(pkt, off + 6, flags)
    elif name == "ttl":
        pkt[off + 8] = rng.choice((0, 1, 2, 255, rng.randrange(256)))
    elif name == "proto":
        pkt[off + 9] = rng.choice((0, 1, 4, 6, 17, 41, 47, 50, 51, 132, rng.randrange(256)))
    elif name == "check":
        _set16(pkt, off + 10, rng.randrange(0x10000))
        return name  # left wrong (or, 1 in 65536, right)
    elif name == "tos":
        pkt[off + 1] = rng.randrange(256)
    elif name == "addr":
        pkt[off + rng.randrange(12, 20)] ^= 1 << rng.randrange(8)
    else:
        _set16(pkt, off + 4, rng.randrange(0x10000))
    if rng.random() < 0.85:
        fix_ip_csum(pkt, off)
    return name


def mutate_l4(rng: random.Random, pkt: bytearray, off: int) -> str:
    """Ports (or ICMP type, code, identifier) of the L4 header at `off`."""
    at = off + rng.choice((0, 2, 4)) if len(pkt) >= off + 6 else off
    if len(pkt) < at + 2:
        return "l4_none"
    v = struct.unpack("!H", pkt[at : at + 2])[0]
    _set16(pkt, at, rng.choice((v + 1, v - 1, v ^ 0x100, 0, 0xFFFF, rng.randrange(0x10000))))
    return "l4_ports"


def truncate(rng: random.Random, frame: bytes) -> bytes:
    return frame[: rng.randrange(len(frame))] if frame else frame


def extend(rng: random.Random, frame: bytes) -> bytes:
    """Bytes past the IP length: an Ethernet trailer or padding (zeros or anything)."""
    n = rng.choice((1, 2, 6, 46, rng.randrange(1, 200)))
    return frame + (bytes(n) if rng.random() < 0.5 else rng.randbytes(n))


def bitflips(rng: random.Random, frame: bytes) -> bytes:
    f = bytearray(frame)
    for _ in range(rng.randrange(1, 9)):
        if f:
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
    return bytes(f)


def random_frame(rng: random.Random) -> bytes:
    n = rng.choice((rng.randrange(0, 64), rng.randrange(0, 600), rng.randrange(0, MAX_FRAME)))
    return rng.randbytes(n)


def payload_len(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.randrange(0, 128)
    if r < 0.9:
        return rng.randrange(128, 1400)
    return rng.randrange(1400, 1600)  # around and past the MTU


# ---- reports ------------------------------------------------------------------------------------
@dataclass
class Report:
    """What one program went through: frames run, verdicts, counter deltas, violations."""

    program: str
    frames: int = 0
    refused: int = 0  # shorter than an Ethernet header: EINVAL from the kernel, not run
    verdicts: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    mutations: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    violation_count: int = 0
    seconds: float = 0.0

    def violation(self, what: str, frame: bytes, msg: str) -> None:
        self.violation_count += 1
        if len(self.violations) < 20:
            self.violations.append(f"[{what}] {msg}\n    frame {frame.hex()}")

    def summary(self) -> str:
        rate = self.frames / self.seconds if self.seconds else 0.0
        lines = [
            f"{self.program}: {self.frames} frames ({self.refused} shorter than 14 B not run) "
            f"in {self.seconds:.1f} s, {rate:.0f} frames/s, "
            f"{self.violation_count} invariant violations",
            "  verdicts: "
            + ", ".join(f"{VERDICTS.get(k, k)} {v}" for k, v in sorted(self.verdicts.items())),
            "  reasons: " + ", ".join(f"{k} {v}" for k, v in self.reasons.most_common()),
            "  mutations: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.mutations.items()))
            + f" ({self.mutations.total()} in all, a frame may carry several)",
        ]
        return "\n".join(lines + self.violations)


def reason_class(r: Reason) -> int:
    if r.name.endswith("_OK"):
        return XDP_REDIRECT
    return XDP_DROP if r.name.startswith("DROP_") else XDP_PASS


def check_counters(
    before: dict, after: dict, direction: Direction, verdicts: Counter, nbytes: int, rep: Report
) -> None:
    """Counter deltas of one batch against its verdicts: one count per frame, under a reason
    of the verdict's class, in this direction only; bytes = the frames' lengths."""
    frames = sum(verdicts.values())
    by_class: Counter = Counter()
    pkts = byts = 0
    for (d, r), (p, b) in after.items():
        dp_, db = p - before[(d, r)][0], b - before[(d, r)][1]
        if not dp_ and not db:
            continue
        if d != direction:
            rep.violation("counters", b"", f"{d.name}/{r.name} moved by {dp_} on {direction.name}")
            continue
        rep.reasons[r.name] += dp_
        by_class[reason_class(r)] += dp_
        pkts += dp_
        byts += db
    if pkts != frames or byts != nbytes:
        rep.violation("counters", b"", f"{pkts} counts, {byts} B for {frames} frames, {nbytes} B")
    for v in (XDP_PASS, XDP_DROP, XDP_REDIRECT):
        if by_class[v] != verdicts[v]:
            rep.violation(
                "counters", b"", f"{by_class[v]} counted as {VERDICTS[v]}, {verdicts[v]} returned"
            )


def run_campaign(d: Datapath, fuzzer: Fuzzer, n: int, batch: int = BATCH) -> Report:
    """n frames from `fuzzer` run through its program (frames the kernel refuses to run are
    extra), each checked, the counters every `batch` frames."""
    rep = Report(fuzzer.program)
    before = d.stats()
    verdicts: Counter = Counter()
    nbytes = 0
    start = time.monotonic()
    while rep.frames < n:
        what, frame = fuzzer.next()
        rep.mutations.update(what.split("+"))
        if len(frame) < ETH_HLEN:
            try:
                prog_test_run(fuzzer.fd, frame)
                rep.violation(what, frame, "a frame shorter than 14 B was run")
            except BpfTestRunError:
                rep.refused += 1
            continue
        try:
            ret, out, _ = prog_test_run(fuzzer.fd, frame)
        except BpfTestRunError as e:
            rep.violation(what, frame, f"test run refused: {e}")
            if rep.violation_count > 1000:
                break  # the kernel refuses everything: the report says so
            continue
        rep.frames += 1
        rep.verdicts[ret] += 1
        verdicts[ret] += 1
        nbytes += len(frame)
        try:
            expect(ret in VERDICTS, f"verdict {ret} (0 is XDP_ABORTED)")
            if ret == XDP_PASS:
                expect(out == frame, "passed frame changed")
            fuzzer.check(what, frame, ret, out)
        except (Violation, AssertionError, InvalidTag) as e:
            rep.violation(what, frame, f"{type(e).__name__}: {e}")
            fuzzer.resync()
        if rep.frames % batch == 0 or rep.frames == n:
            after = d.stats()
            check_counters(before, after, fuzzer.direction, verdicts, nbytes, rep)
            try:
                fuzzer.batch_check()
            except Violation as e:
                rep.violation("sa", b"", str(e))
                fuzzer.resync()
            before, verdicts, nbytes = after, Counter(), 0
    rep.seconds = time.monotonic() - start
    return rep


class Fuzzer:
    program: str
    direction: Direction
    fd: int

    def next(self) -> tuple[str, bytes]:
        raise NotImplementedError

    def check(self, what: str, frame: bytes, ret: int, out: bytes) -> None:
        raise NotImplementedError

    def batch_check(self) -> None:
        """State checks once per batch (SA counters)."""

    def resync(self) -> None:
        """Take the SA state from the map again after a violation (keep going)."""


# ---- encap ------------------------------------------------------------------------------------
def _flow(key: dict) -> tuple:
    return (key["proto"], key["saddr"], key["daddr"], key["sport"], key["dport"])


ENCAP_FLOWS = {_flow(T.ENCAP_KEY), _flow(TCP_KEY), _flow(ICMP_KEY)}


def encap_flow_of(frame: bytes) -> tuple:
    """The (proto, saddr, daddr, sport, dport) of a clear frame, as bpf/include/pkt/parsing.h
    keys it: ICMP echo (request or reply): identifier and (type << 8) | code."""
    ip, l4 = frame[14:34], frame[34:42]
    proto, saddr, daddr = ip[9], socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    if proto == P.IPPROTO_ICMP:
        sport = struct.unpack("!H", l4[4:6])[0] if l4[0] in (0, 8) else 0
        return (proto, saddr, daddr, sport, (l4[0] << 8) | l4[1])
    if proto in (P.IPPROTO_TCP, P.IPPROTO_UDP):
        return (proto, saddr, daddr, *struct.unpack("!HH", l4[:4]))
    return (proto, saddr, daddr, 0, 0)


class EncapFuzzer(Fuzzer):
    """Clear LAN frames of the three offloaded flows (UDP, TCP, ICMP echo), mutated."""

    program, direction = "xdp_encap", Direction.ENCAP

    def __init__(self, d: Datapath, rng: random.Random) -> None:
        self.d, self.rng, self.fd = d, rng, d.encap_fd
        self.resync()
        self.mutations: list[tuple[str, int, Callable[[bytearray], str | bytes]]] = [
            ("valid", 30, lambda f: bytes(f)),
            ("eth_type", 3, self._eth_type),
            ("eth_dst", 2, self._eth_dst),
            ("ip_field", 25, lambda f: mutate_ip(self.rng, f, ETH_HLEN)),
            ("l4", 6, lambda f: mutate_l4(self.rng, f, ETH_HLEN + 20)),
            ("truncate", 8, lambda f: truncate(self.rng, bytes(f))),
            ("extend", 6, lambda f: extend(self.rng, bytes(f))),
            ("bitflips", 6, lambda f: bitflips(self.rng, bytes(f))),
            ("random", 4, lambda f: random_frame(self.rng)),
            ("random_l4", 4, lambda f: bytes(f[:34]) + self.rng.randbytes(max(0, len(f) - 34))),
            ("stacked", 6, self._stacked),
        ]
        self.names = [m[0] for m in self.mutations]
        self.weights = [m[1] for m in self.mutations]

    def resync(self) -> None:
        sa = self.d.outbound_sa(T.SA_OUT_ID)
        self.seq, self.sa_packets = sa.seq, sa.packets

    def base(self) -> bytearray:
        rng = self.rng
        payload = rng.randbytes(payload_len(rng))
        kind = rng.random()
        if kind < 0.7:
            l4, proto = P.udp(1000, 2000, payload), P.IPPROTO_UDP
        elif kind < 0.85:
            l4, proto = P.tcp(5555, 80, payload), P.IPPROTO_TCP
        else:
            l4, proto = P.icmp_echo(ICMP_ID, rng.randrange(1 << 16), payload), P.IPPROTO_ICMP
        ip = P.ipv4(
            T.LAN_HOST,
            T.REMOTE_HOST,
            proto,
            l4,
            tos=rng.randrange(256),
            ttl=rng.choice((2, 64, 255, rng.randrange(2, 256))),
            ident=rng.randrange(1 << 16),
            frag=rng.choice((0, P.IP_DF)),
        )
        return bytearray(P.eth(T.GW1_LAN_MAC, T.LAN_HOST_MAC) + ip)

    def _eth_type(self, f: bytearray) -> str:
        _set16(
            f, 12, self.rng.choice((0x86DD, 0x0806, 0x8100, 0x88A8, 0, self.rng.randrange(1 << 16)))
        )
        return "eth_type"

    def _eth_dst(self, f: bytearray) -> str:
        f[0:6] = self.rng.choice((b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01", self.rng.randbytes(6)))
        return "eth_dst"

    def _stacked(self, f: bytearray) -> bytes:
        for _ in range(self.rng.randrange(2, 4)):
            name = self.rng.choices(self.names[1:-1], self.weights[1:-1])[0]
            out = dict((m[0], m[2]) for m in self.mutations)[name](f)
            if isinstance(out, bytes):
                f = bytearray(out)
        return bytes(f)

    def next(self) -> tuple[str, bytes]:
        f = self.base()
        i = self.rng.choices(range(len(self.mutations)), self.weights)[0]
        name, _, fn = self.mutations[i]
        out = fn(f)
        if isinstance(out, str):  # mutated in place; the name says which field
            return f"{name}:{out}", bytes(f)
        return name, out

    def check(self, what: str, frame: bytes, ret: int, out: bytes) -> None:
        if ret != XDP_REDIRECT:
            return
        expect(len(frame) >= 34, "a frame without an IPv4 header was encapsulated")
        tot = struct.unpack("!H", frame[16:18])[0]
        # What the kernel would forward: ip_forward() takes only frames sent to this host (not
        # to a broadcast or multicast MAC), ip_rcv_core() only valid header checksums.
        expect(not frame[0] & 1, "a frame to a group (broadcast, multicast) MAC forwarded")
        expect(P.csum(frame[14:34]) == 0, "a clear packet with a bad header checksum forwarded")
        expect(encap_flow_of(frame) in ENCAP_FLOWS, "a packet of no offloaded flow forwarded")
        T.check_encap_output(frame[: ETH_HLEN + tot], out, self.seq)
        self.seq += 1
        self.sa_packets += 1

    def batch_check(self) -> None:
        sa = self.d.outbound_sa(T.SA_OUT_ID)
        expect(sa.seq == self.seq, f"SA sequence {sa.seq}, {self.seq} expected")
        expect(sa.packets == self.sa_packets, f"SA packets {sa.packets}, {self.sa_packets} seen")


# ---- decap ------------------------------------------------------------------------------------
def ecn_decap(outer: int, inner: int) -> int | None:
    """RFC 6040 section 4.2 (the reference of esp.h xfp_ecn_decap): None = drop."""
    o, i = outer & 3, inner & 3
    if o == 3:
        return None if i == 0 else inner | 3
    if o == 1 and i == 2:
        return (inner & ~3) | 1
    return inner


class DecapFuzzer(Fuzzer):
    """ESP frames of the inbound SA around its replay window, sealed by the reference, with
    the plaintext (inner header, pad, pad length, next header) or the wire (outer header, SPI,
    sequence, IV, ciphertext, tag, length) mutated. With `esn`, the SA has extended sequence
    numbers (RFC 4303 appendix A) and is put back every ESN_RESET frames with its window just
    below a 2^32 boundary, so that the window keeps crossing sub-spaces."""

    program, direction = "xdp_decap", Direction.DECAP
    SEQ_RESET = (1 << 32) - (1 << 20)  # start the SA afresh before the 32-bit space runs out
    ESN_RESET = 2000

    def __init__(self, d: Datapath, rng: random.Random, esn: bool = False) -> None:
        self.d, self.rng, self.fd, self.esn = d, rng, d.decap_fd, esn
        self.sa = P.EspSa(T.SPI_IN, T.KEY_IN, esn=esn)
        self.accepted: set[int] = set()  # sequence numbers forwarded since the SA was put
        self.forwarded: list[bytes] = []  # recent forwarded frames, replayed as they were
        self.pending = 0  # the sequence number of the frame being run
        self.count = 0
        self.reset_sa(self._esn_top() if esn else 0)
        if esn:
            self.program = "xdp_decap (ESN)"
        self.inner_mutations: list[tuple[str, int, Callable]] = [
            ("valid", 30, None),
            ("inner_ip", 14, lambda p: mutate_ip(self.rng, p, 0)),
            ("inner_l4", 4, lambda p: mutate_l4(self.rng, p, 20)),
            ("inner_truncate", 2, lambda p: truncate(self.rng, bytes(p))),
            ("inner_extend", 2, lambda p: extend(self.rng, bytes(p))),
            ("inner_random", 2, lambda p: random_frame(self.rng)),
            ("inner_ipv6", 1, lambda p: b"\x60" + self.rng.randbytes(47)),
        ]
        self.seal_mutations: list[tuple[str, int]] = [
            ("none", 70),
            ("pad_long", 6),
            ("pad_bytes", 5),
            ("pad_len", 5),
            ("next_header", 5),
            ("wrong_key", 2),
            ("other_spi", 2),
            ("outer_tos", 5),
        ]
        self.wire_mutations: list[tuple[str, int]] = [
            ("none", 60),
            ("spi", 3),
            ("seq_field", 3),
            ("iv", 3),
            ("ciphertext", 4),
            ("tag", 4),
            ("outer_ip", 8),
            ("eth_type", 1),
            ("truncate", 5),
            ("extend", 4),
            ("bitflips", 3),
            ("random", 2),
        ]

    def _esn_top(self) -> int:
        return (self.rng.randrange(1, 8) << 32) - self.rng.randrange(1, 1 << 12)

    def reset_sa(self, top: int) -> None:
        self.d.put_inbound_sa(T.in_sa(replay_window=REPLAY_WINDOW, seq_top=top, esn=self.esn))
        self.top = top
        self.accepted.clear()
        self.forwarded.clear()
        self.sa_packets = 0

    def resync(self) -> None:
        sa = self.d.inbound_sa(T.SPI_IN, T.GW1_WAN)
        self.top, self.sa_packets = sa.seq_top, sa.packets

    def pick_seq(self) -> tuple[str, int]:
        rng, top = self.rng, self.top
        r = rng.random()
        if r < 0.75:
            return "next", top + 1
        if r < 0.85:
            return "in_window", max(0, top - rng.randrange(REPLAY_WINDOW))
        if r < 0.90:
            return "left_of_window", max(0, top - REPLAY_WINDOW - rng.randrange(1 << 12))
        if r < 0.97:
            return "far_ahead", top + rng.choice(
                (REPLAY_WINDOW, 1 << 13, rng.randrange(2, 1 << 16))
            )
        return "zero", 0

    def next(self) -> tuple[str, bytes]:
        rng = self.rng
        self.count += 1
        if self.esn and self.count % self.ESN_RESET == 0:
            self.reset_sa(self._esn_top())
        elif not self.esn and self.top >= self.SEQ_RESET:
            self.reset_sa(rng.choice((0, rng.randrange(1 << 31))))
        if self.forwarded and rng.random() < 0.05:
            self.pending = 0
            return "seq:replay", rng.choice(self.forwarded)
        seq_kind, seq = self.pick_seq()
        self.pending = seq
        inner = bytearray(
            P.ipv4(
                T.REMOTE_HOST,
                T.LAN_HOST,
                P.IPPROTO_UDP,
                P.udp(2000, 1000, rng.randbytes(payload_len(rng))),
                tos=rng.choice((0, 1, 2, 3, rng.randrange(256))),
                ttl=rng.choice((2, 64, 255, rng.randrange(2, 256))),
                ident=rng.randrange(1 << 16),
                frag=rng.choice((0, P.IP_DF)),
            )
        )
        names = [f"seq:{seq_kind}"]
        name, _, fn = rng.choices(self.inner_mutations, [m[1] for m in self.inner_mutations])[0]
        if fn is not None:
            out = fn(inner)
            inner = bytearray(out) if isinstance(out, bytes) else inner
            names.append(f"{name}:{out}" if isinstance(out, str) else name)
        seal = rng.choices(self.seal_mutations, [m[1] for m in self.seal_mutations])[0][0]
        esp = self._seal(seal, seq, bytes(inner))
        if seal != "none":
            names.append(seal)
        outer_tos = rng.choice((0, 1, 2, 3)) if seal == "outer_tos" else 0
        frame = bytearray(
            P.eth(T.GW1_WAN_MAC, T.GW2_WAN_MAC)
            + P.ipv4(T.GW2_WAN, T.GW1_WAN, P.IPPROTO_ESP, esp, tos=outer_tos)
        )
        wire = rng.choices(self.wire_mutations, [m[1] for m in self.wire_mutations])[0][0]
        if wire != "none":
            names.append(wire)
            frame = self._wire(wire, frame)
        return "+".join(names), bytes(frame)

    def _seal(self, how: str, seq: int, inner: bytes) -> bytes:
        rng = self.rng
        pad = None
        if how == "pad_long":  # a valid longer pad (RFC 4303 section 2.4 allows up to 255)
            pad = bytes(range(1, rng.randrange(256) + 1))
        elif how == "pad_bytes":
            pad = bytearray(range(1, rng.randrange(1, 256) + 1))
            pad[rng.randrange(len(pad))] ^= 1 << rng.randrange(8)
            pad = bytes(pad)
        elif how == "pad_len":  # pad bytes right, the pad length byte wrong
            n = P.esp_padlen(len(inner))
            plain = inner + bytes(range(1, n + 1)) + bytes([rng.randrange(256), P.IPPROTO_IPIP])
            return self._raw_seal(seq, plain)
        elif how == "next_header":
            nh = rng.choice((0, 41, 6, 17, 50, 59, rng.randrange(256)))
            return self.sa.seal(seq, inner, nexthdr=nh)
        elif how == "wrong_key":
            return P.EspSa(T.SPI_IN, T.KEY_OUT, esn=self.esn).seal(seq, inner)
        elif how == "other_spi":
            spi = rng.choice((0, T.SPI_OUT, rng.randrange(1 << 32)))
            return P.EspSa(spi, T.KEY_IN, esn=self.esn).seal(seq, inner)
        return self.sa.seal(seq, inner, pad=pad)

    def _raw_seal(self, seq: int, plain: bytes) -> bytes:
        """ESP of an arbitrary plaintext (trailer included) under the SA's key."""
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        iv = struct.pack("!Q", seq)
        ct = ChaCha20Poly1305(T.KEY_IN[:32]).encrypt(T.KEY_IN[32:] + iv, plain, self.sa.aad(seq))
        return struct.pack("!II", T.SPI_IN, seq & 0xFFFFFFFF) + iv + ct

    def _wire(self, how: str, f: bytearray) -> bytearray:
        rng = self.rng
        esp = ETH_HLEN + 20
        if how == "spi":
            f[esp + rng.randrange(4)] ^= 1 << rng.randrange(8)
        elif how == "seq_field":
            _set16(f, esp + 4 + 2 * rng.randrange(2), rng.randrange(1 << 16))
        elif how == "iv":
            f[esp + 8 + rng.randrange(8)] ^= 1 << rng.randrange(8)
        elif how == "ciphertext":
            at = rng.randrange(esp + 16, len(f) - 16)
            f[at] ^= 1 << rng.randrange(8)
        elif how == "tag":
            f[len(f) - 1 - rng.randrange(16)] ^= 1 << rng.randrange(8)
        elif how == "outer_ip":
            mutate_ip(rng, f, ETH_HLEN)
        elif how == "eth_type":
            _set16(f, 12, rng.choice((0x86DD, 0x8100, rng.randrange(1 << 16))))
        elif how == "truncate":
            return bytearray(truncate(rng, bytes(f)))
        elif how == "extend":
            return bytearray(extend(rng, bytes(f)))
        elif how == "bitflips":
            return bytearray(bitflips(rng, bytes(f)))
        elif how == "random":
            return bytearray(random_frame(rng))
        return f

    def check(self, what: str, frame: bytes, ret: int, out: bytes) -> None:
        if what == "seq:replay":
            expect(ret == XDP_DROP, f"a replay of a forwarded frame got {VERDICTS.get(ret, ret)}")
        if ret != XDP_REDIRECT:
            if self.pending > self.top:  # authenticated, then punted or dropped: moved the top?
                self.top = self.d.inbound_sa(T.SPI_IN, T.GW1_WAN).seq_top
            return
        seq = self.check_output(frame, out)
        expect(seq not in self.accepted, f"sequence number {seq} accepted twice")
        self.accepted.add(seq)
        self.top = max(self.top, seq)
        self.sa_packets += 1
        self.forwarded.append(frame)
        if len(self.forwarded) > 64:
            self.forwarded.pop(0)

    def check_output(self, frame: bytes, out: bytes) -> int:
        """The reference's view of a frame XDP decapsulated; returns its sequence number."""
        ip = frame[ETH_HLEN:]
        expect(frame[12:14] == b"\x08\x00", "not an IPv4 frame")
        expect(ip[0] == 0x45 and P.csum(ip[:20]) == 0, "outer header not a valid IPv4 header")
        olen = struct.unpack("!H", ip[2:4])[0]
        expect(len(ip) >= olen, "outer total length past the frame")
        expect(struct.unpack("!H", ip[6:8])[0] & 0x3FFF == 0, "outer fragment")
        expect(
            ip[9] == P.IPPROTO_ESP and ip[16:20] == socket.inet_aton(T.GW1_WAN),
            "outer protocol ESP, to our address",
        )
        # InvalidTag: forwarded without authenticity. With ESN the high bits are those sealed.
        seq, _, plain = self.sa.open(ip[20:olen], seq_hi=self.pending >> 32)
        padlen, nh = plain[-2], plain[-1]
        expect(nh == P.IPPROTO_IPIP, f"next header {nh}")
        expect(plain[-2 - padlen : -2] == bytes(range(1, padlen + 1)), "pad bytes")
        inner = plain[: -2 - padlen]
        expect(len(inner) >= 28 and inner[0] == 0x45, "inner IPv4 header without options")
        expect(P.csum(inner[:20]) == 0, "inner header checksum")
        expect(struct.unpack("!H", inner[2:4])[0] == len(inner), "inner length = what is left")
        expect(struct.unpack("!H", inner[6:8])[0] & 0x3FFF == 0, "inner fragment")
        expect(inner[8] > 1, f"inner TTL {inner[8]} forwarded")
        expect(
            inner[9] == P.IPPROTO_UDP
            and inner[12:20] == socket.inet_aton(T.REMOTE_HOST) + socket.inet_aton(T.LAN_HOST)
            and inner[20:24] == struct.pack("!HH", 2000, 1000),
            "inner packet of the offloaded flow",
        )
        tos = ecn_decap(ip[1], inner[1])
        expect(tos is not None, "outer CE over inner Not-ECT forwarded")
        want = P.eth(T.LAN_HOST_MAC, T.GW1_LAN_MAC) + P.ip_set_tos(P.ip_ttl_dec(inner), tos)
        expect(out == want, f"output {out.hex()} is not the inner packet {want.hex()}")
        return seq

    def batch_check(self) -> None:
        sa = self.d.inbound_sa(T.SPI_IN, T.GW1_WAN)
        # Punted frames (inner miss, TTL, ...) are authenticated too: they move the window.
        expect(sa.packets >= self.sa_packets, f"SA packets {sa.packets} < {self.sa_packets}")
        expect(sa.seq_top >= self.top, f"window top {sa.seq_top} went below {self.top}")
        self.top = sa.seq_top
        self.sa_packets = sa.packets


# ---- fixtures and tests -----------------------------------------------------------------------
@pytest.fixture
def fuzz_env(env: Datapath) -> Iterator[Datapath]:
    """test_datapath's SA and flow each way, plus TCP and ICMP echo flows on the outbound SA."""
    env.put_flow(flow_key(LO, Direction.ENCAP, **TCP_KEY), flow_val(T.SA_OUT_ID))
    env.put_flow(flow_key(LO, Direction.ENCAP, **ICMP_KEY), flow_val(T.SA_OUT_ID))
    yield env


env = T.env  # the fixture, reused


def _report(rep: Report) -> None:
    print("\n" + rep.summary())
    assert rep.violation_count == 0, f"{rep.violation_count} violations\n{rep.summary()}"


def test_fuzz_encap(fuzz_env: Datapath) -> None:
    rep = run_campaign(fuzz_env, EncapFuzzer(fuzz_env, random.Random(SEED)), FRAMES)
    _report(rep)
    assert rep.verdicts[XDP_REDIRECT] > FRAMES // 5, "the corpus reaches the encryption path"


def test_fuzz_decap(fuzz_env: Datapath) -> None:
    rep = run_campaign(fuzz_env, DecapFuzzer(fuzz_env, random.Random(SEED + 1)), FRAMES)
    _report(rep)
    assert rep.verdicts[XDP_REDIRECT] > FRAMES // 5, "the corpus reaches the decryption path"
    assert rep.reasons["DROP_REPLAY"] > 0 and rep.reasons["DROP_BAD_TRAILER"] > 0, (
        "the corpus reaches the replay and trailer checks"
    )


def test_fuzz_decap_esn(fuzz_env: Datapath) -> None:
    fuzzer = DecapFuzzer(fuzz_env, random.Random(SEED + 3), esn=True)
    rep = run_campaign(fuzz_env, fuzzer, FRAMES)
    _report(rep)
    assert rep.verdicts[XDP_REDIRECT] > FRAMES // 5, "the corpus reaches the decryption path"


@pytest.mark.parametrize("program", ["encap", "decap"])
def test_fuzz_counters_per_frame(fuzz_env: Datapath, program: str) -> None:
    """The first frames of another seed with the counters read after every frame."""
    cls = EncapFuzzer if program == "encap" else DecapFuzzer
    rep = run_campaign(fuzz_env, cls(fuzz_env, random.Random(SEED + 2)), 1000, batch=1)
    _report(rep)


def test_truncation_at_every_offset(fuzz_env: Datapath) -> None:
    """A valid frame of each program cut at every length from 14 bytes on: passed untouched
    or dropped, one count each (truncation below 14 bytes: the kernel refuses the run)."""
    encap = EncapFuzzer(fuzz_env, random.Random(1))
    decap = DecapFuzzer(fuzz_env, random.Random(2))
    cases = [
        (encap, [T.clear_frame(b"t" * 300)[:n] for n in range(ETH_HLEN, 342)]),
        (decap, [T.esp_frame(T.inner_packet(b"t" * 300), 5)[:n] for n in range(ETH_HLEN, 398)]),
    ]
    for fuzzer, frames in cases:
        rep = Report(fuzzer.program)
        before = fuzz_env.stats()
        verdicts: Counter = Counter()
        for f in frames:
            ret, out, _ = prog_test_run(fuzzer.fd, f)
            verdicts[ret] += 1
            assert (ret == XDP_PASS and out == f) or ret == XDP_DROP, (
                f"{fuzzer.program}: cut at {len(f)} B: {VERDICTS.get(ret, ret)}"
            )
        after = fuzz_env.stats()
        check_counters(before, after, fuzzer.direction, verdicts, sum(map(len, frames)), rep)
        assert not rep.violations, "\n".join(rep.violations)


# ---- key hygiene ------------------------------------------------------------------------------
def _entries(handle) -> list:
    return [handle.get(k) for k in list(handle.keys())]


def test_deleted_sa_keys_gone_and_pins_private(fuzz_env: Datapath) -> None:
    """After delete_outbound_sa / delete_inbound_sa no map entry holds the key (absent, and
    no other entry carries its bytes); the pinned maps are mode 0600 in a 0700 directory."""
    d = fuzz_env
    others = [T.out_sa(sa_id=10 + i, spi=0x3000 + i, key=bytes([i]) * 36) for i in range(3)]
    for sa in others:
        d.put_outbound_sa(sa)
    assert d.delete_outbound_sa(T.SA_OUT_ID), "outbound SA deleted"
    assert d.delete_inbound_sa(T.SPI_IN, T.GW1_WAN), "inbound SA deleted"
    for name, key in (("sa_out", T.KEY_OUT), ("sa_in", T.KEY_IN)):
        for v in _entries(d.maps[name]):
            if v is None:
                continue
            raw = bytes(v.key) + bytes(v.salt)
            assert raw != key and bytes(v.key) != key[:32], (
                f"{name}: the deleted key is still there"
            )
    assert d.outbound_sa(T.SA_OUT_ID) is None and d.inbound_sa(T.SPI_IN, T.GW1_WAN) is None, (
        "entries absent"
    )
    assert d.maps["watchdog"].get(ctypes.c_uint32(T.SA_OUT_ID)) is None, "outbound watchdog gone"
    assert d.maps["watchdog"].get(ctypes.c_uint32(T.SA_IN_ID)) is None, "inbound watchdog gone"
    assert len(_entries(d.maps["sa_out"])) == 3, "the other SAs are still there"
    pin = Path(str(d.pin_dir))
    assert stat.S_IMODE(pin.stat().st_mode) == 0o700, "pin directory mode 0700"
    for name in PINNED_MAPS:
        mode = stat.S_IMODE((pin / name).stat().st_mode)
        assert mode == 0o600, f"{name} pinned with mode {mode:o}, not 0600"
