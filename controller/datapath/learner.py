# SPDX-License-Identifier: GPL-2.0-only
"""First-packet learning: the adapter between bpf/tp_learn.c and the controller.

    learner = Learner.open(netns_ino, {lan_ifindex: "lan", wan_ifindex: "wan"})
    try:
        for cand in learner.poll(timeout=0.1):     # or select() on learner.fileno()
            ...                                    # validate against the kernel, then install
    finally:
        learner.close()

The BPF side reports a flow when the kernel forwarded one of its packets between a LAN and a WAN
device of the gateway's namespace (see tp_learn.c). Tracepoints are global, so the learner runs
in any namespace: it is told the gateway's netns inode and the ifindexes there. As a command it
prints candidates as JSON lines (for tests and for operators):

    nsenter --net=/run/netns/gw1 .venv/bin/python -m controller.datapath.learner --lan lan --wan wan

A candidate is a *sighting*, not a proof: the controller validates it against the kernel's
XFRM policies and SAs, routes and neighbours before it installs anything.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes as ct
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from controller.core.state import Direction
from controller.datapath import btf_offsets
from controller.datapath import learn_abi as d
from controller.datapath.loader import ROOT, Loader, LoaderError  # noqa: F401 (ROOT: tests)

# How the kernel forwarded a flow (tp_learn.c's LEARN_DIR_*), as Candidate.forwarding spells it.
DIRECTIONS = {
    d.LEARN_DIR_ENCAP: "encap",
    d.LEARN_DIR_DECAP: "decap",
    d.LEARN_DIR_CLEAR_OUT: "clear-out",
    d.LEARN_DIR_CLEAR_IN: "clear-in",
}
# The tunnel's direction of each, for the controller; clear forwarding has none.
TUNNEL_DIRECTIONS = {"encap": Direction.ENCAP, "decap": Direction.DECAP}
ROLES = {"lan": d.LEARN_ROLE_LAN, "wan": d.LEARN_ROLE_WAN, "xfrm": d.LEARN_ROLE_XFRMI}
PROTO_ICMP = 1


class LearnerError(LoaderError):
    """The learner could not be set up (BTF, BPF compile, bad interface)."""


def _ip(be32: int) -> str:
    return str(ipaddress.IPv4Address(socket.ntohl(be32)))


def _mac(raw: Iterable[int]) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# struct learn_event (learn_abi.LearnEvent, 112 bytes) for struct.unpack: addresses as their 4
# network-order bytes (socket.inet_ntoa takes them as they are), ports and SPIs as host-order
# reads of network-order fields (ntohs/ntohl turn them), the padding skipped.
_EVENT = struct.Struct("<QQQIIII4s4sHHBBBBII8sI4s4s6s6sB3xII2s2s")
assert _EVENT.size == ct.sizeof(d.LearnEvent), "learn_event layout (learn_abi.py)"
_ntoa, _ntohs, _ntohl = socket.inet_ntoa, socket.ntohs, socket.ntohl
_NETNS, _NETNS_OFF = struct.Struct("<I"), d.LearnEvent.netns_ino.offset


@dataclass(frozen=True)
class Candidate:
    """One flow the kernel was seen forwarding. Ports and SPIs are host-order ints.

    For ICMP, `sport` is the echo identifier (0 for types other than echo and echo reply) and
    `dport` is (type << 8) | code: the datapath's flow key (bpf/include/pkt/parsing.h) exactly;
    `icmp_type`/`icmp_id` spell it out.
    """

    forwarding: str  # encap | decap | clear-out | clear-in (see `direction`)
    in_ifindex: int
    out_ifindex: int
    saddr: str  # the inner (clear) flow, as received
    daddr: str
    proto: int
    sport: int
    dport: int
    esp_spi: int | None  # from the wire: tx for encap, rx for decap
    esp_seq: int | None
    esp_iv: bytes | None  # encap only: the explicit IV the kernel sent (RFC 7634 section 2)
    sp_spi: int | None  # decap: the SA in the skb's sec_path at xmit
    sp_len: int
    eth_src: str  # L2 header of the transmitted frame
    eth_dst: str
    outer_saddr: str  # IPv4 header of the transmitted frame
    outer_daddr: str
    outer_proto: int
    tx_len: int
    # The table of the packet's input route lookup, when it was matched. (Its gateway is not
    # reported: fib_table_lookup leaves gw4 unset for a nexthop without an IPv4 gateway,
    # include/trace/events/fib.h, so a connected route shows ring-buffer garbage.)
    fib_tb_id: int | None
    flags: int
    ktime_rx: int  # CLOCK_MONOTONIC ns: first receive in the gateway
    ktime_tx: int  # ... at xmit
    seen_ns: int = field(compare=False)  # ... when Python read the event
    netns_ino: int = 0
    skbaddr: int = field(default=0, compare=False)
    # NAT-T (RFC 3948): the UDP (source, destination) ports around the wire's ESP (tx for
    # encap, rx for decap); None for plain ESP or when no ESP frame was seen.
    encap_ports: tuple[int, int] | None = None

    @property
    def wire_seen(self) -> bool:
        """An ESP frame of this packet was seen (so encap_ports says what the wire carried)."""
        want = d.LEARN_F_ESP_TX if self.forwarding == "encap" else d.LEARN_F_ESP_RX
        return bool(self.flags & want)

    @property
    def direction(self) -> Direction | None:
        """The tunnel direction (ENCAP: clear from a LAN device out as ESP, DECAP: ESP in,
        clear out to the LAN); None for clear forwarding, which the controller leaves alone."""
        return TUNNEL_DIRECTIONS.get(self.forwarding)

    @property
    def spi(self) -> int | None:
        """The SA this flow used: the tunnel's SPI in its direction."""
        if self.forwarding == "encap":
            return self.esp_spi
        if self.forwarding == "decap":
            return self.sp_spi if self.sp_spi is not None else self.esp_spi
        return None

    @property
    def flow(self) -> tuple[str, str, str, int, int, int]:
        """(forwarding, saddr, daddr, proto, sport, dport): one entry per flow and direction."""
        return (self.forwarding, self.saddr, self.daddr, self.proto, self.sport, self.dport)

    @property
    def mangled(self) -> bool:
        """The clear packet left different from how it came in (NAT): never offload it."""
        return bool(self.flags & d.LEARN_F_MANGLED)

    @property
    def icmp_type(self) -> int | None:
        return self.dport >> 8 if self.proto == PROTO_ICMP else None

    @property
    def icmp_id(self) -> int | None:
        return self.sport if self.proto == PROTO_ICMP else None

    @property
    def iv_xor_seq(self) -> bytes | None:
        """Encap: the explicit IV XOR the 64-bit sequence number (high half 0 without ESN).

        The kernel's seqiv IV generator (crypto/seqiv.c) sends seq XOR a per-SA salt, so this
        is that salt, the mask the fastpath must apply to its own sequence numbers to send
        IVs from the same space (valid for non-ESN SAs; with ESN the high half is unknown
        here).
        """
        if self.esp_iv is None or self.esp_seq is None:
            return None
        seq = self.esp_seq.to_bytes(8, "big")
        return bytes(a ^ b for a, b in zip(self.esp_iv, seq, strict=True))

    @property
    def latency_ns(self) -> int:
        """From the packet's first tracepoint to Python holding the event."""
        return self.seen_ns - self.ktime_rx

    def to_json(self) -> dict[str, object]:
        fields = asdict(self)
        out = {"direction": fields.pop("forwarding"), **fields}  # the JSON keeps its old key
        out["esp_iv"] = self.esp_iv.hex() if self.esp_iv is not None else None
        out["spi"] = self.spi
        out["latency_ns"] = self.latency_ns
        return out

    @classmethod
    def from_raw(cls, raw: bytes, seen_ns: int) -> Candidate:
        """From the bytes of one struct learn_event (the perf sample as copied): one
        struct.unpack and C-level address formatting, about 4 us against 14 us for the field
        by field ctypes read of from_event (a burst of 1000 first packets is decoded in Python
        one by one). Equal to from_event's result (tests/host/test_learner.py)."""
        (ktime_rx, ktime_tx, skbaddr, netns_ino, in_ifindex, out_ifindex, tx_len, saddr, daddr,
         sport, dport, proto, direction, flags, sp_len, esp_spi, esp_seq, esp_iv, sp_spi,
         outer_saddr, outer_daddr, eth_dst, eth_src, outer_proto, fib_tb_id, _gw4,
         encap_sport, encap_dport,
         ) = _EVENT.unpack_from(raw)  # fmt: skip
        esp = flags & (d.LEARN_F_ESP_RX | d.LEARN_F_ESP_TX)
        encap_tx = direction == d.LEARN_DIR_ENCAP and flags & d.LEARN_F_ESP_TX
        return cls(
            DIRECTIONS.get(direction) or f"unknown-{direction}",
            in_ifindex,
            out_ifindex,
            _ntoa(saddr),
            _ntoa(daddr),
            proto,
            _ntohs(sport),
            _ntohs(dport),
            _ntohl(esp_spi) if esp else None,
            _ntohl(esp_seq) if esp else None,
            esp_iv if encap_tx else None,
            _ntohl(sp_spi) if flags & d.LEARN_F_SECPATH else None,
            sp_len,
            eth_src.hex(":"),
            eth_dst.hex(":"),
            _ntoa(outer_saddr),
            _ntoa(outer_daddr),
            outer_proto,
            tx_len,
            fib_tb_id if flags & d.LEARN_F_FIB else None,
            flags,
            ktime_rx,
            ktime_tx,
            seen_ns,
            netns_ino,
            skbaddr,
            (
                (int.from_bytes(encap_sport, "big"), int.from_bytes(encap_dport, "big"))
                if flags & d.LEARN_F_UDP_ENCAP
                else None
            ),
        )

    @classmethod
    def from_event(cls, ev: d.LearnEvent, seen_ns: int) -> Candidate:
        flags = ev.flags
        encap = ev.direction == d.LEARN_DIR_ENCAP
        esp = bool(flags & (d.LEARN_F_ESP_RX | d.LEARN_F_ESP_TX))
        return cls(
            forwarding=DIRECTIONS.get(ev.direction, f"unknown-{ev.direction}"),
            in_ifindex=ev.in_ifindex,
            out_ifindex=ev.out_ifindex,
            saddr=_ip(ev.saddr),
            daddr=_ip(ev.daddr),
            proto=ev.proto,
            sport=socket.ntohs(ev.sport),
            dport=socket.ntohs(ev.dport),
            esp_spi=socket.ntohl(ev.esp_spi) if esp else None,
            esp_seq=socket.ntohl(ev.esp_seq) if esp else None,
            esp_iv=bytes(ev.esp_iv) if encap and flags & d.LEARN_F_ESP_TX else None,
            sp_spi=socket.ntohl(ev.sp_spi) if flags & d.LEARN_F_SECPATH else None,
            sp_len=ev.sp_len,
            eth_src=_mac(ev.eth_src),
            eth_dst=_mac(ev.eth_dst),
            outer_saddr=_ip(ev.outer_saddr),
            outer_daddr=_ip(ev.outer_daddr),
            outer_proto=ev.outer_proto,
            tx_len=ev.tx_len,
            fib_tb_id=ev.fib_tb_id if flags & d.LEARN_F_FIB else None,
            flags=flags,
            ktime_rx=ev.ktime_rx,
            ktime_tx=ev.ktime_tx,
            seen_ns=seen_ns,
            netns_ino=ev.netns_ino,
            skbaddr=ev.skbaddr,
            encap_ports=(
                (socket.ntohs(ev.encap_sport), socket.ntohs(ev.encap_dport))
                if flags & d.LEARN_F_UDP_ENCAP
                else None
            ),
        )


def netns_inode(path: str | os.PathLike[str] = "/proc/self/ns/net") -> int:
    """The inode of a network namespace (what ns.inum holds in the kernel)."""
    return os.stat(path).st_ino


def compile_cflags(**overrides: int) -> list[str]:
    """The -D flags of tp_learn.c: the running kernel's struct offsets, optional tunables
    (LEARN_REEMIT_NS, LEARN_MAX_AGE_NS, LEARN_SIGHTINGS, ...). The loader adds the include
    root."""
    flags = btf_offsets.cflags()
    flags += [f"-D{k}={int(v)}" for k, v in sorted(overrides.items())]
    return flags


class Learner:
    """tp_learn.c loaded and attached, reporting one netns. Not thread-safe.

    Deduplication: BPF emits a flow at most once per LEARN_REEMIT_NS; on top of that, poll()
    yields a (flow, SPI) once per `holddown` seconds, until `forget(flow)` (the controller calls
    it when it drops or refuses a flow and wants to hear about it again).

    Bounds: a flood of distinct first packets costs bounded memory. The BPF maps are LRU
    (learn_sightings, learn_emitted: maps.h), the perf rings are fixed (a full ring counts
    `lost`), the events read but not yet polled are at most `max_pending` (one more is shed,
    counted `shed`), and the dedup memory keeps the `max_tracked` newest flows. Known flows
    never come here: XDP forwards them before the kernel's receive path, where the tracepoints
    are, so a flood slows learning only.
    """

    def __init__(
        self,
        bpf: object,
        holddown: float = 5.0,
        max_tracked: int = 65536,
        loader: Loader | None = None,
        max_pending: int = 16384,
    ) -> None:
        self.bpf = bpf
        self.loader = loader  # the one that compiled `bpf` and holds its tracepoints
        self.holddown_ns = int(holddown * 1e9)
        self.max_tracked = max_tracked
        self.max_pending = max_pending
        # Events read from the rings, not yet polled: (CLOCK_MONOTONIC ns read, raw bytes).
        self._pending: list[tuple[int, bytes]] = []
        self._recent: OrderedDict[tuple[object, ...], int] = OrderedDict()
        self._epoll = select.epoll()
        self.lost = 0
        self.shed = 0  # events read but dropped: max_pending were already waiting
        self.events = 0
        self.netns_ino = 0
        table = bpf[b"learn_events"]  # type: ignore[index]
        table.open_perf_buffer(self._on_event, page_cnt=64, lost_cb=self._on_lost)
        from bcc import lib  # the perf readers' fds, so callers can select() on one fd

        for reader in bpf.perf_buffers.values():  # type: ignore[attr-defined]
            self._epoll.register(lib.perf_reader_fd(reader), select.EPOLLIN)

    # -- set-up -----------------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        netns_ino: int,
        ifaces: Mapping[int, str],
        *,
        holddown: float = 5.0,
        **tunables: int,
    ) -> Learner:
        """Compile and attach tp_learn.c, then watch `ifaces` ({ifindex: "lan"|"wan"}) of the
        namespace whose inode is netns_ino. Transactional: when anything fails, the
        tracepoints attached so far are detached again before LearnerError is raised."""
        loader = Loader()
        try:
            # Its TRACEPOINT_PROBEs are attached as BCC compiles it; the loader records them.
            bpf = loader.compile("tp_learn.c", compile_cflags(**tunables))
            learner = cls(bpf, holddown=holddown, loader=loader)
        except LoaderError as e:  # "compiling/loading bpf/tp_learn.c: ..."
            loader.close()
            raise LearnerError(str(e), e.errno) from e
        except BaseException:
            loader.close()
            raise
        try:
            learner.watch(netns_ino, ifaces)
        except BaseException:
            learner.close()
            raise
        return learner

    def watch(self, netns_ino: int, ifaces: Mapping[int, str]) -> None:
        """(Re)point the learner at a namespace and its devices; forgets all earlier state."""
        for ifindex, role in ifaces.items():
            if role not in ROLES:
                raise LearnerError(f"ifindex {ifindex}: role must be one of {sorted(ROLES)}")
        b = self.bpf
        cfg_map = b[b"learn_cfg"]  # type: ignore[index]
        cfg_map[ct.c_int(0)] = d.LearnCfg(0)  # off while the tables change
        b[b"learn_ifaces"].clear()  # type: ignore[index]
        b[b"learn_sightings"].clear()  # type: ignore[index]
        b[b"learn_emitted"].clear()  # type: ignore[index]
        for ifindex, role in ifaces.items():
            b[b"learn_ifaces"][ct.c_uint32(ifindex)] = ct.c_uint32(ROLES[role])  # type: ignore[index]
        cfg_map[ct.c_int(0)] = d.LearnCfg(netns_ino)
        # Events of the previous namespace still in the rings are dropped here, and by
        # _on_event (a program that read the old config may submit after this drain).
        self.netns_ino = netns_ino
        self.bpf.perf_buffer_consume()  # type: ignore[attr-defined]
        self._recent.clear()
        self._pending.clear()

    # -- events -----------------------------------------------------------------------------------
    def _on_event(self, _cpu: int, data: int, size: int) -> None:
        # As little as possible per sample (BCC calls this once per event): copy the bytes;
        # poll() decodes what survives the netns check and the bound.
        if size < _EVENT.size:
            return
        raw = ct.string_at(data, _EVENT.size)
        if _NETNS.unpack_from(raw, _NETNS_OFF)[0] != self.netns_ino:
            return
        self.events += 1
        if len(self._pending) >= self.max_pending:
            self.shed += 1
            return
        self._pending.append((time.monotonic_ns(), raw))  # the clock of bpf_ktime_get_ns()

    def _on_lost(self, count: int) -> None:
        self.lost += count

    def fileno(self) -> int:
        """An fd that is readable when events are waiting (an epoll over the per-CPU rings)."""
        return self._epoll.fileno()

    @property
    def waiting(self) -> int:
        """Events read from the rings and not yet returned (poll with a `limit` leaves them;
        fileno() does not show them)."""
        return len(self._pending)

    def poll(self, timeout: float = 0.0, limit: int | None = None) -> list[Candidate]:
        """Read waiting events (waiting at most `timeout` seconds for the first) and return the
        new candidates, deduplicated: of at most `limit` events, the oldest; the rest wait for
        the next call (`waiting`), within max_pending."""
        ms = int(timeout * 1000)
        if ms > 0:
            self.bpf.perf_buffer_poll(ms)  # type: ignore[attr-defined]
        else:  # BCC 0.26's perf_buffer_poll(0) was seen returning with data waiting: read all
            self.bpf.perf_buffer_consume()  # type: ignore[attr-defined]
        out: list[Candidate] = []
        pending, self._pending = self._pending, []
        if limit is not None and len(pending) > limit:
            pending, self._pending = pending[:limit], pending[limit:]
        recent, holddown = self._recent, self.holddown_ns
        for seen, raw in pending:
            cand = Candidate.from_raw(raw, seen)
            key = (*cand.flow, cand.spi)
            last = recent.get(key)
            if last is not None and seen - last < holddown:
                continue
            recent[key] = seen
            recent.move_to_end(key)
            out.append(cand)
        while len(recent) > self.max_tracked:
            recent.popitem(last=False)
        return out

    def forget(self, flow: tuple[object, ...], spi: int | None = None) -> None:
        """Let the next sighting of `flow` (Candidate.flow: its first item is the forwarding,
        "encap", "decap", "clear-out" or "clear-in") through again, in Python and in
        the BPF re-emit map. With `spi` (Candidate.spi) only that SA's entry is dropped, in one
        map operation; without it every SPI's entry of the flow is (a scan of the map)."""
        direction, saddr, daddr, proto, sport, dport = flow
        # Addresses as Candidate spells them, whatever the caller holds (str, int, IPv4Address).
        saddr, daddr = str(ipaddress.IPv4Address(saddr)), str(ipaddress.IPv4Address(daddr))
        flow = (direction, saddr, daddr, proto, sport, dport)
        if spi is not None:
            self._recent.pop((*flow, spi), None)
        else:
            for key in [k for k in self._recent if k[:6] == flow]:
                del self._recent[key]
        fk_map = self.bpf[b"learn_emitted"]  # type: ignore[index]
        want = fk_map.Key()
        want.saddr = socket.htonl(int(ipaddress.IPv4Address(saddr)))
        want.daddr = socket.htonl(int(ipaddress.IPv4Address(daddr)))
        want.sport = socket.htons(int(sport))  # type: ignore[call-overload]
        want.dport = socket.htons(int(dport))  # type: ignore[call-overload]
        want.proto = int(proto)  # type: ignore[call-overload]
        want.direction = {v: k for k, v in DIRECTIONS.items()}.get(str(direction), 0)
        if spi is not None or direction in ("clear-out", "clear-in"):
            want.spi = socket.htonl(spi or 0)
            with contextlib.suppress(KeyError):
                del fk_map[want]
            return
        for k in list(fk_map.keys()):
            if (k.saddr, k.daddr, k.sport, k.dport, k.proto, k.direction) == (
                want.saddr,
                want.daddr,
                want.sport,
                want.dport,
                want.proto,
                want.direction,
            ):
                with contextlib.suppress(KeyError):
                    del fk_map[k]

    def stats(self) -> dict[str, int]:
        """The BPF counters (summed over CPUs), plus lost perf samples and shed events."""
        table = self.bpf[b"learn_stats"]  # type: ignore[index]
        out = {name: 0 for name in d.STAT_NAMES.values()}
        for idx, name in d.STAT_NAMES.items():
            out[name] = int(sum(table[ct.c_int(idx)]))
        out["lost"] = self.lost
        out["shed"] = self.shed
        return out

    def __enter__(self) -> Learner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Detach everything (idempotent)."""
        if self.bpf is not None:
            with contextlib.suppress(Exception):
                self._epoll.close()
            if self.loader is not None:
                self.loader.close()  # the tracepoints, then the module
            else:
                self.bpf.cleanup()  # type: ignore[attr-defined]
            self.bpf = None


# -- command line: candidates as JSON lines ------------------------------------------------------
def _ifaces_here(lan: list[str], wan: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for role, names in (("lan", lan), ("wan", wan)):
        for name in names:
            try:
                out[socket.if_nametoindex(name)] = role
            except OSError as e:
                raise LearnerError(f"no interface {name!r} in this network namespace") from e
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lan", action="append", default=[], help="LAN device (repeatable)")
    p.add_argument("--wan", action="append", default=[], help="WAN device (repeatable)")
    p.add_argument("--duration", type=float, default=600.0, help="exit after this many seconds")
    p.add_argument("--holddown", type=float, default=5.0)
    a = p.parse_args(argv)
    if not a.lan or not a.wan:
        p.error("need at least one --lan and one --wan device")
    try:
        learner = Learner.open(netns_inode(), _ifaces_here(a.lan, a.wan), holddown=a.holddown)
    except LearnerError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        return 1
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    deadline = time.monotonic() + a.duration
    try:
        print(json.dumps({"ready": True, "netns_ino": netns_inode()}), flush=True)
        while not stop and time.monotonic() < deadline:
            for cand in learner.poll(0.1):
                print(json.dumps(cand.to_json()), flush=True)
        print(json.dumps({"stats": learner.stats()}), flush=True)
    finally:
        learner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
