# SPDX-License-Identifier: GPL-2.0-only
"""One place that watches the kernel for everything that can invalidate a fastpath flow.

Sources (each a netlink multicast socket opened in the watched network namespace):
- rtnetlink (NETLINK_ROUTE): links (RTNLGRP_LINK), neighbours (RTNLGRP_NEIGH), IPv4 addresses,
  routes and rules (RTNLGRP_IPV4_IFADDR/_ROUTE/_RULE), decoded with pyroute2's rtnl classes;
- nftables (NETLINK_NETFILTER, NFNLGRP_NFTABLES): every NFT_MSG_NEW*/DEL*/DESTROY* message,
  with a generation event (NFT_MSG_NEWGEN) closing each committed batch. The fastpath bypasses
  netfilter, so any ruleset change is a reason to flush learned flows (docs/design.md §4);
- XFRM (controller.netlink.xfrm.XfrmMonitor): SA, policy, expire, acquire, default-policy events.

`KernelWatch` is non-blocking: `fileno()` is an epoll descriptor that becomes readable when
any source has data, so a controller loop can poll() it beside its other descriptors, then
call `read_events()`. Every event carries ts_ns (CLOCK_MONOTONIC ns when read). A message that
is unknown or does not decode is counted in `stats` and logged; it never raises. An ENOBUFS
overrun (the kernel dropped notifications for us) yields an `Overrun` event: the caller must
assume anything changed and re-read state.
"""

from __future__ import annotations

import ipaddress
import logging
import select
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink.rtnl.fibmsg import fibmsg
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from controller.core.xfrm_model import Overrun, XfrmEvent
from controller.netlink.nlsock import NetlinkSocket, check_attrs, events_within, split_messages
from controller.netlink.xfrm import DEFAULT_GROUPS, XfrmMonitor

log = logging.getLogger(__name__)

# include/uapi/linux/rtnetlink.h
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
RTM_NEWRULE, RTM_DELRULE = 32, 33
RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTNLGRP_IPV4_IFADDR = 5
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_ROUTE = 11
RTNL_GROUPS = (
    RTNLGRP_LINK,
    RTNLGRP_NEIGH,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_ROUTE,
)
IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

# include/uapi/linux/neighbour.h
NUD_NAMES = {
    0x01: "incomplete",
    0x02: "reachable",
    0x04: "stale",
    0x08: "delay",
    0x10: "probe",
    0x20: "failed",
    0x40: "noarp",
    0x80: "permanent",
    0x00: "none",
}

# include/uapi/linux/netlink.h, netfilter/nfnetlink.h, netfilter/nf_tables.h
NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NAMES = (
    "NEWTABLE",
    "GETTABLE",
    "DELTABLE",
    "NEWCHAIN",
    "GETCHAIN",
    "DELCHAIN",
    "NEWRULE",
    "GETRULE",
    "DELRULE",
    "NEWSET",
    "GETSET",
    "DELSET",
    "NEWSETELEM",
    "GETSETELEM",
    "DELSETELEM",
    "NEWGEN",
    "GETGEN",
    "TRACE",
    "NEWOBJ",
    "GETOBJ",
    "DELOBJ",
    "GETOBJ_RESET",
    "NEWFLOWTABLE",
    "GETFLOWTABLE",
    "DELFLOWTABLE",
    "GETRULE_RESET",
    "DESTROYTABLE",
    "DESTROYCHAIN",
    "DESTROYRULE",
    "DESTROYSET",
    "DESTROYSETELEM",
    "DESTROYOBJ",
    "DESTROYFLOWTABLE",
    "GETSETELEM_RESET",
)
NFT_MSG_NEWGEN = 15
NFTA_GEN_ID = 1  # __be32, in NFT_MSG_NEWGEN
NFTA_TABLE = 1  # NFTA_TABLE_NAME / NFTA_CHAIN_TABLE / NFTA_RULE_TABLE / NFTA_SET_TABLE / ...


# -- events ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelEvent:
    ts_ns: int


@dataclass(frozen=True)
class LinkChanged(KernelEvent):
    action: str  # "new" (added or changed) or "del"
    ifindex: int
    ifname: str
    up: bool  # IFF_UP: administratively up
    lower_up: bool  # IFF_LOWER_UP: carrier
    operstate: str
    mtu: int
    mac: str | None


@dataclass(frozen=True)
class AddrChanged(KernelEvent):
    action: str
    ifindex: int
    family: int
    address: str | None
    prefixlen: int


@dataclass(frozen=True)
class RouteChanged(KernelEvent):
    action: str
    family: int
    table: int
    dst: str  # prefix, e.g. "10.2.0.0/24" ("0.0.0.0/0" for default)
    gateway: str | None
    oif: int
    type: int  # RTN_UNICAST 1, RTN_LOCAL 2, RTN_BLACKHOLE 6, ...
    protocol: int
    priority: int
    multipath: bool


@dataclass(frozen=True)
class RuleChanged(KernelEvent):
    action: str
    family: int
    table: int
    priority: int


@dataclass(frozen=True)
class NeighChanged(KernelEvent):
    action: str
    ifindex: int
    family: int
    dst: str | None
    lladdr: str | None
    state: int
    state_name: str


@dataclass(frozen=True)
class NftChanged(KernelEvent):
    """One nftables object changed (NFT_MSG_NEW*/DEL*/DESTROY*)."""

    msg: str  # e.g. "NEWRULE"
    family: int  # NFPROTO_* of the table (1 inet, 2 ipv4, ...)
    table: str | None


@dataclass(frozen=True)
class NftGeneration(KernelEvent):
    """A ruleset transaction was committed (NFT_MSG_NEWGEN closes each batch)."""

    genid: int


# -- decoding ----------------------------------------------------------------------------------
_RTNL_CLASSES: dict[int, type] = {
    RTM_NEWLINK: ifinfmsg,
    RTM_DELLINK: ifinfmsg,
    RTM_NEWADDR: ifaddrmsg,
    RTM_DELADDR: ifaddrmsg,
    RTM_NEWROUTE: rtmsg,
    RTM_DELROUTE: rtmsg,
    RTM_NEWNEIGH: ndmsg,
    RTM_DELNEIGH: ndmsg,
    RTM_NEWRULE: fibmsg,
    RTM_DELRULE: fibmsg,
}


def _attr(msg: Any, name: str, default: Any = None) -> Any:
    v = msg.get_attr(name)
    return default if v is None else v


def rtnl_event(mtype: int, raw: bytes, ts_ns: int) -> KernelEvent | None:
    """Decode one rtnetlink message into an event (None: a type we do not watch)."""
    cls = _RTNL_CLASSES.get(mtype)
    if cls is None:
        return None
    hdrlen = 16 + cls.get_size()
    if len(raw) < hdrlen:
        raise ValueError(f"type {mtype}: {len(raw)} bytes, fixed part needs {hdrlen}")
    check_attrs(raw, hdrlen)
    msg = cls(raw)
    msg.decode()
    action = "del" if mtype in (RTM_DELLINK, RTM_DELADDR, RTM_DELROUTE, RTM_DELNEIGH) else "new"
    if mtype == RTM_DELRULE:
        action = "del"
    if cls is ifinfmsg:
        flags = msg["flags"]
        return LinkChanged(
            ts_ns,
            action,
            msg["index"],
            _attr(msg, "IFLA_IFNAME", ""),
            bool(flags & IFF_UP),
            bool(flags & IFF_LOWER_UP),
            str(_attr(msg, "IFLA_OPERSTATE", "")),
            _attr(msg, "IFLA_MTU", 0),
            _attr(msg, "IFLA_ADDRESS"),
        )
    if cls is ifaddrmsg:
        return AddrChanged(
            ts_ns,
            action,
            msg["index"],
            msg["family"],
            _attr(msg, "IFA_LOCAL") or _attr(msg, "IFA_ADDRESS"),
            msg["prefixlen"],
        )
    if cls is rtmsg:
        fam = msg["family"]
        dst = _attr(msg, "RTA_DST") or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
        return RouteChanged(
            ts_ns,
            action,
            fam,
            _attr(msg, "RTA_TABLE", msg["table"]),
            str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}", strict=False)),
            _attr(msg, "RTA_GATEWAY"),
            _attr(msg, "RTA_OIF", 0),
            msg["type"],
            msg["proto"],
            _attr(msg, "RTA_PRIORITY", 0),
            msg.get_attr("RTA_MULTIPATH") is not None,
        )
    if cls is ndmsg:
        state = msg["state"]
        return NeighChanged(
            ts_ns,
            action,
            msg["ifindex"],
            msg["family"],
            _attr(msg, "NDA_DST"),
            _attr(msg, "NDA_LLADDR"),
            state,
            "|".join(n for bit, n in NUD_NAMES.items() if bit and state & bit) or "none",
        )
    return RuleChanged(
        ts_ns,
        action,
        msg["family"],
        _attr(msg, "FRA_TABLE", msg["table"]),
        _attr(msg, "FRA_PRIORITY", 0),
    )


def nft_event(mtype: int, raw: bytes, ts_ns: int) -> KernelEvent | None:
    """Decode an nf_tables notification: struct nfgenmsg { __u8 nfgen_family; __u8 version;
    __be16 res_id; } then attributes; only the table name (or generation id) is read."""
    if mtype >> 8 != NFNL_SUBSYS_NFTABLES:
        return None
    sub = mtype & 0xFF
    name = f"MSG{sub}" if sub >= len(NFT_MSG_NAMES) else NFT_MSG_NAMES[sub]
    if len(raw) < 20:
        raise ValueError(f"nftables {name}: {len(raw)} bytes, no nfgenmsg")
    family = raw[16]
    first: bytes | None = None
    pos = 20
    while pos + 4 <= len(raw):
        alen, atype = struct.unpack_from("HH", raw, pos)
        if alen < 4 or pos + alen > len(raw):
            raise ValueError(f"nftables {name}: bad attribute length {alen} at {pos}")
        if atype & 0x3FFF == NFTA_TABLE and first is None:
            first = bytes(raw[pos + 4 : pos + alen])
        pos += (alen + 3) & ~3
    if sub == NFT_MSG_NEWGEN:
        genid = struct.unpack(">I", first[:4])[0] if first and len(first) >= 4 else 0
        return NftGeneration(ts_ns, genid)
    if not name.startswith(("NEW", "DEL", "DESTROY")):
        return None  # GET*/TRACE: not a ruleset change
    table = first.rstrip(b"\0").decode(errors="replace") if first is not None else None
    return NftChanged(ts_ns, name, family, table)


# -- the watcher -------------------------------------------------------------------------------
Event = KernelEvent | XfrmEvent


class KernelWatch:
    """Watch links, addresses, routes, rules, neighbours, nftables and XFRM in one namespace.

    netns: a name under /run/netns (or a path) to watch from outside; None for the namespace
    this process runs in (the controller under `nsenter --net`).
    """

    def __init__(
        self,
        netns: str | None = None,
        *,
        rtnl: bool = True,
        nft: bool = True,
        xfrm: bool = True,
        xfrm_groups: tuple[int, ...] = DEFAULT_GROUPS,
    ) -> None:
        self.stats: Counter[str] = Counter()
        self._epoll = select.epoll()
        self._sources: dict[int, tuple[str, Any]] = {}
        try:
            if rtnl:
                s = NetlinkSocket(
                    socket.NETLINK_ROUTE, groups=RTNL_GROUPS, netns=netns, nonblocking=True
                )
                self._add("rtnl", s)
            if nft:
                s = NetlinkSocket(
                    NETLINK_NETFILTER, groups=(NFNLGRP_NFTABLES,), netns=netns, nonblocking=True
                )
                self._add("nft", s)
            if xfrm:
                self._add("xfrm", XfrmMonitor(netns, groups=xfrm_groups))
        except BaseException:
            self.close()
            raise

    def _add(self, name: str, src: Any) -> None:
        self._sources[src.fileno()] = (name, src)
        self._epoll.register(src.fileno(), select.EPOLLIN)

    def fileno(self) -> int:
        """An epoll descriptor: readable when any source has something to read."""
        return self._epoll.fileno()

    def close(self) -> None:
        for _name, src in self._sources.values():
            src.close()
        self._sources.clear()
        self._epoll.close()

    def __enter__(self) -> KernelWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_events(self) -> list[Event]:
        """Drain every source without blocking."""
        out: list[Event] = []
        for fd, _mask in self._epoll.poll(0):
            name, src = self._sources[fd]
            if name == "xfrm":
                evs = src.read_events()
                out.extend(evs)
                continue
            datagrams, overrun = src.read_nonblocking()
            ts = time.monotonic_ns()
            if overrun:
                self.stats[f"{name}.overrun"] += 1
                log.warning("%s: kernel dropped notifications (ENOBUFS); resync needed", name)
                out.append(Overrun(ts, name))
            for dgram in datagrams:
                out.extend(self.parse(name, dgram, ts))
        return out

    def parse(self, source: str, dgram: bytes, ts_ns: int) -> list[Event]:
        """Decode one datagram of `source` ("rtnl" or "nft"); never raises on bad input."""
        decoder = rtnl_event if source == "rtnl" else nft_event
        out: list[Event] = []
        try:
            msgs = list(split_messages(dgram))
        except ValueError as e:
            self.stats[f"{source}.malformed"] += 1
            log.warning("%s: malformed datagram: %s", source, e)
            return out
        for mtype, _flags, _seq, raw in msgs:
            self.stats[f"{source}.messages"] += 1
            try:
                ev = decoder(mtype, raw, ts_ns)
            except Exception as e:  # a decoder bug or hostile input must not stop the watcher
                self.stats[f"{source}.malformed"] += 1
                log.warning("%s: malformed message type %d: %s", source, mtype, e)
                continue
            if ev is None:
                self.stats[f"{source}.unknown"] += 1
                log.debug("%s: ignoring message type %d", source, mtype)
                continue
            self.stats[type(ev).__name__] += 1
            out.append(ev)
        return out

    @property
    def xfrm_stats(self) -> Counter[str]:
        for name, src in self._sources.values():
            if name == "xfrm":
                return src.stats
        return Counter()

    def events(self, timeout: float) -> Iterator[Event]:
        """Yield events as they arrive, for at most `timeout` seconds."""
        return events_within(self.fileno(), self.read_events, timeout)
