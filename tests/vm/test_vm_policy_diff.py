# SPDX-License-Identifier: GPL-2.0-only
"""The fastpath against the kernel on random policies and rules, and a full SA table, for real.

1. Differential policy test. On gw1, per seeded round: random XFRM policies for the LAN ->
   remote direction (OUT and FWD; selectors over sub-prefixes of both networks, UDP and TCP
   protocol selectors, destination ports; priorities from a small set, so that several
   policies often tie; actions: allow with the tunnel's template, allow with an optional
   template, allow without a template (bypass), block), mutated round to round (added,
   updated in place, deleted: the kernel's order of equal priorities depends on that
   history), sometimes a default FWD block, and random nftables forward rules (drop/accept by
   address, protocol, port). gw1's policies for remote -> LAN stay fixed, so replies always
   come back. Then UDP flows from four LAN addresses to echo servers on four remote addresses.

   The kernel's answer: a flow is ESP-forwarded iff its first datagram is echoed (gw2 admits
   only ESP from the LAN net, so a packet forwarded in clear is dropped there). The
   fastpath's answer: the flow's encap entry in the pinned xfp_flows map, and whether that
   entry's XDP packet counter grows with the flow's later datagrams. Some flows live across
   rounds: their first datagram of a round would be carried by a stale entry, so their
   kernel answer comes from a fresh probe flow of the same class (addresses, port; nothing
   here selects on the source port). Checked: the flows XDP carries are exactly the flows the
   kernel ESP-forwards (one carried that the kernel drops fails hard, naming the policies and
   rules in force); every later datagram of a forwarded flow is echoed; and the controller's
   own policy model (controller/core/xfrm_model.py on the kernel's dump, with the nftables rules
   evaluated here) predicts the kernel's outcome for every flow, also for the dropped ones,
   where no sighting ever reaches the controller.

2. A full SA table. `[tables] sas = 2` sizes the datapath's SA maps (xfp_sa_out, xfp_sa_in,
   the resequencer's xfp_sa_out_spi; their real max_entries are read back from bpffs). Two
   tunnels fill them; a third tunnel and then a rekey of the first bring SAs that do not
   fit: the map write fails (E2BIG) in the real kernel. The controller keeps running, the
   flows stay on the kernel path and their traffic flows, the failure is counted
   (rejections `sa_table_full`), logged, and shown as the SA's reason in the status; nothing
   is half-installed (every flow names an SA entry, the SPI index and the watchdog and
   liveness entries belong to SA entries, every SA entry is a kernel SA). Once SAs leave,
   the refused ones are offloaded after all.

One controller serves the module (sas = 2 is enough for the one tunnel of part 1).
Reproduce: `.venv/bin/python -m testbed.vmrun vm-only -- tests/vm/test_vm_policy_diff.py -s`.
XFP_POLICY_DIFF_SEED and XFP_POLICY_DIFF_ROUNDS (default 8) change the seed and the rounds;
pass them inside the VM, e.g. `.venv/bin/python -m testbed.vmrun shell-cmd
'XFP_POLICY_DIFF_ROUNDS=40 .venv/bin/pytest -m vm -s tests/vm/test_vm_policy_diff.py'`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import random
import select
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from controller.core.state import Direction
from controller.core.xfrm_model import Dir, Flow, policy_decision, policy_matches
from controller.datapath import abi as defs
from controller.datapath.xdp import DEFAULT_PIN_DIR, MapHandle, flow_key, open_pinned_map
from controller.netlink.xfrm import XfrmSocket
from controller.netns import in_netns
from testbed.bed import Testbed
from testbed.static_esp import AEAD, ICV_BITS, StaticSa, random_sa
from testbed.supervisor import ControllerProcess

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]  # BCC compiles for minutes under TCG

SEED = int(os.environ.get("XFP_POLICY_DIFF_SEED", "20261205"))
ROUNDS = int(os.environ.get("XFP_POLICY_DIFF_ROUNDS", "8"))
SAS = 2  # SA entries per direction: two tunnels fill the table
CONFIG = f"[tables]\nsas = {SAS}\n[timers]\nidle_timeout = 600\nwatchdog = 5\n"
HOSTS = (2, 66, 130, 200)  # last octet of the LAN and remote addresses flows use
PORTS = (5001, 5002, 5003)  # UDP echo ports on every remote address
PRIOS = (10, 20, 20, 30)  # few values: policies often tie
BASE_PRIO = 1000  # the tunnel's own LAN_NET -> REMOTE_NET policies
MAX_POLICIES = 8
PERSISTENT, NEW = 6, 4  # flows kept across rounds (each with a probe), new flows per round
LATER = 3  # datagrams per flow after the first, once the controller had time to learn it
ECHO_S = 2.5  # how long echoes may take (kernel ESP under TCG, a busy host)
LEARN_S = 15.0  # how long the controller may take to learn a forwarded flow
SETTLE_S = 2.0  # the controller's status must be this much newer than a change
LAN_DEV_ROLE = ("gw1", "lan")
# Peer errors a wrong sequence number or key would cause: must stay 0 (net/xfrm/xfrm_input.c).
SEQ_ICV_ERRORS = ("XfrmInStateSeqError", "XfrmInStateProtoError")


# -- the rig -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tunnel:
    reqid: int
    out: StaticSa  # gw1 -> gw2
    back: StaticSa  # gw2 -> gw1
    local: str  # selector on the LAN side
    remote: str  # selector on the remote side
    prio: int


@dataclass
class Rig:
    bed: Testbed
    gw: ControllerProcess
    work: Path
    maps: Maps
    echo: EchoServers
    lan_addrs: list[str]
    remote_addrs: list[str]
    tunnel: Tunnel
    lan_ifindex: int
    spd: Spd | None = None


@pytest.fixture(scope="module")
def rig(esp_kernel: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("policy-diff")
    # BCC reuses a pinned map whatever size the program now asks for (seen: a 2-entry pin
    # stays 2 entries for a program declaring 8): start from no pins, so sas = 2 holds.
    shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)
    bed = Testbed(prefix=f"pd{os.getpid()}-").build()
    gw = maps = echo = None
    try:
        p = bed.plan
        lan_net, remote_net = (
            ipaddress.ip_network(p["LAN_NET"]),
            ipaddress.ip_network(p["REMOTE_NET"]),
        )
        lan_addrs = [str(lan_net.network_address + h) for h in HOSTS]
        remote_addrs = [str(remote_net.network_address + h) for h in HOSTS]
        assert lan_addrs[0] == p["LAN_HOST"] and remote_addrs[0] == p["REMOTE_HOST"]
        for role, addrs in (("lan", lan_addrs), ("remote", remote_addrs)):
            for a in addrs[1:]:
                bed.ip(role, "addr", "add", f"{a}/{p['PREFIXLEN']}", "dev", "eth0")
        tunnel = add_tunnel(bed, 1, p["LAN_NET"], p["REMOTE_NET"], BASE_PRIO, gw1_out=False)
        echo = EchoServers(bed, remote_addrs, PORTS)
        gw = ControllerProcess(bed, "gw1", work, CONFIG)
        gw.wait_started(1800)
        maps = Maps()
        r = Rig(bed, gw, work, maps, echo, lan_addrs, remote_addrs, tunnel,
                bed.ifindex(*LAN_DEV_ROLE))  # fmt: skip
        r.spd = Spd(r, random.Random(SEED))
        yield r
    finally:
        if echo is not None:
            echo.stop()
        if gw is not None:
            gw.stop()
        if maps is not None:
            maps.close()
        bed.destroy()
        shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)  # our 2-entry SA maps


def _sa_argv(sa: StaticSa, reqid: int) -> list[str]:
    # fmt: off
    return ["xfrm", "state", "add", "src", sa.src, "dst", sa.dst, "proto", "esp",
            "spi", f"{sa.spi:#010x}", "reqid", str(reqid), "mode", "tunnel",
            "replay-window", "128", "aead", AEAD, "0x" + sa.key.hex(), str(ICV_BITS)]
    # fmt: on


def _tmpl(sa: StaticSa, reqid: int) -> list[str]:
    # fmt: off
    return ["tmpl", "src", sa.src, "dst", sa.dst, "proto", "esp", "reqid", str(reqid),
            "mode", "tunnel"]
    # fmt: on


def add_sa_pair(bed: Testbed, reqid: int) -> tuple[StaticSa, StaticSa]:
    """A new pair of SAs of `reqid` on both gateways (the peer first)."""
    p = bed.plan
    out, back = random_sa(p["GW1_WAN"], p["GW2_WAN"]), random_sa(p["GW2_WAN"], p["GW1_WAN"])
    for role in ("gw2", "gw1"):
        for sa in (out, back):
            bed.ip(role, *_sa_argv(sa, reqid))
    return out, back


def delete_sa(bed: Testbed, sa: StaticSa) -> None:
    for role in ("gw1", "gw2"):
        bed.ip(role, "xfrm", "state", "delete", "src", sa.src, "dst", sa.dst, "proto", "esp",
               "spi", f"{sa.spi:#010x}")  # fmt: skip


def _tunnel_policies(t: Tunnel, gw1_out: bool = True) -> list[tuple[str, list[str]]]:
    """(role, ip args after `xfrm policy VERB`) of a tunnel: out/in/fwd on each gateway."""
    pr = ["priority", str(t.prio)]
    # fmt: off
    pols = [
        ("gw1", ["src", t.remote, "dst", t.local, "dir", "in", *pr, *_tmpl(t.back, t.reqid)]),
        ("gw1", ["src", t.remote, "dst", t.local, "dir", "fwd", *pr, *_tmpl(t.back, t.reqid)]),
        ("gw2", ["src", t.remote, "dst", t.local, "dir", "out", *pr, *_tmpl(t.back, t.reqid)]),
        ("gw2", ["src", t.local, "dst", t.remote, "dir", "in", *pr, *_tmpl(t.out, t.reqid)]),
        ("gw2", ["src", t.local, "dst", t.remote, "dir", "fwd", *pr, *_tmpl(t.out, t.reqid)]),
    ]
    # fmt: on
    if gw1_out:
        pols.append(
            ("gw1", ["src", t.local, "dst", t.remote, "dir", "out", *pr, *_tmpl(t.out, t.reqid)])
        )
    return pols


def add_tunnel(
    bed: Testbed, reqid: int, local: str, remote: str, prio: int, gw1_out: bool = True
) -> Tunnel:
    """SAs and policies of a static tunnel between gw1 and gw2 for local <-> remote. Without
    gw1_out, gw1's OUT policy is left to the caller (part 1 randomises it)."""
    out, back = add_sa_pair(bed, reqid)
    t = Tunnel(reqid, out, back, local, remote, prio)
    for role, args in _tunnel_policies(t, gw1_out):
        bed.ip(role, "xfrm", "policy", "add", *args)
    return t


def remove_tunnel(bed: Testbed, t: Tunnel) -> None:
    for role, args in _tunnel_policies(t):
        sel = args[: args.index("priority")]
        bed.ip(role, "xfrm", "policy", "delete", *sel)
    delete_sa(bed, t.out)
    delete_sa(bed, t.back)


# -- echo servers and flows ----------------------------------------------------------------------
class EchoServers:
    """UDP echo on every (remote address, port), served by a thread of this process from
    sockets made inside the remote namespace (no Python start-up per flow). One socket per
    address, so a reply leaves from the address the datagram was sent to."""

    def __init__(self, bed: Testbed, addrs: list[str], ports: tuple[int, ...]) -> None:
        self.socks: list[socket.socket] = []
        with in_netns(bed.ns("remote")):
            for a in addrs:
                for port in ports:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    s.setblocking(False)
                    s.bind((a, port))
                    self.socks.append(s)
        self.echoed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="echo", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select(self.socks, [], [], 0.2)
            for s in ready:
                for _ in range(64):  # bounded per wake-up
                    try:
                        data, peer = s.recvfrom(4096)
                    except BlockingIOError:
                        break
                    s.sendto(data, peer)
                    self.echoed += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for s in self.socks:
            s.close()


@dataclass(eq=False)
class UFlow:
    """One UDP flow from the LAN: its own socket (so its own source port)."""

    fid: str
    kind: str  # "persistent" | "probe" | "new" | a name (part 2)
    src: str
    dst: str
    dport: int
    sock: socket.socket
    sport: int = 0

    @classmethod
    def open(cls, bed: Testbed, fid: str, kind: str, src: str, dst: str, dport: int) -> UFlow:
        with in_netns(bed.ns("lan")):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.bind((src, 0))
        return cls(fid, kind, src, dst, dport, s, s.getsockname()[1])

    @property
    def cls(self) -> tuple[str, str, int]:
        return (self.src, self.dst, self.dport)

    def send(self, tag: str) -> None:
        self.sock.sendto(f"{self.fid}|{tag}|".encode().ljust(64, b"."), (self.dst, self.dport))

    def __str__(self) -> str:
        return f"{self.kind} udp {self.src}:{self.sport} -> {self.dst}:{self.dport}"


def collect(flows: list[UFlow], tag: str, within: float, want: int = 0) -> dict[UFlow, int]:
    """Echoes per flow of datagrams tagged `tag` within `within` seconds (sooner when every
    flow has `want`)."""
    got = {f: 0 for f in flows}
    by_sock = {f.sock: f for f in flows}
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if want and all(n >= want for n in got.values()):
            break
        ready, _, _ = select.select(list(by_sock), [], [], min(left, 0.2))
        for s in ready:
            for _ in range(64):
                try:
                    data = s.recv(4096)
                except BlockingIOError:
                    break
                parts = data.split(b"|")
                f = by_sock[s]
                if len(parts) >= 2 and parts[0].decode() == f.fid and parts[1].decode() == tag:
                    got[f] += 1
    return got


# -- the datapath's maps, read from bpffs --------------------------------------------------------
class Maps:
    """The pinned maps this module reads (never writes)."""

    def __init__(self, pin_dir: Path = DEFAULT_PIN_DIR) -> None:
        self._fds: dict[str, int] = {}
        u32, u64 = ctypes.c_uint32, ctypes.c_uint64

        def open_map(name: str, key: type, value: type) -> MapHandle:
            h = open_pinned_map(pin_dir / name, key, value)
            self._fds[name] = h.fd
            return h

        self.flows = open_map("xfp_flows", defs.FlowKey, defs.FlowVal)
        self.sa_out = open_map("xfp_sa_out", u32, defs.SaOut)
        self.sa_in = open_map("xfp_sa_in", defs.SaInKey, defs.SaIn)
        self.spi_index = open_map("xfp_sa_out_spi", defs.SaInKey, u32)
        self.watchdog = open_map("xfp_watchdog", u32, u64)
        self.liveness = open_map("xfp_liveness", u32, u64)

    def max_entries(self, name: str) -> int:
        from controller.datapath.bpfsys import map_info

        return int(map_info(self._fds[name])["max_entries"])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    @staticmethod
    def _items(h: MapHandle) -> list[tuple[Any, Any]]:
        out = []
        for k in list(h.keys()):
            v = h.get(k)
            if v is not None:
                out.append((k, v))
        return out

    def encap(self, lan_ifindex: int, f: UFlow) -> defs.FlowVal | None:
        return self.flows.get(
            flow_key(lan_ifindex, Direction.ENCAP, 17, f.src, f.dst, f.sport, f.dport)
        )

    def encap_flows(self) -> list[tuple[Any, Any]]:
        return [(k, v) for k, v in self._items(self.flows) if k.dir == int(Direction.ENCAP)]

    def consistency(self, kernel_sas: set[tuple[int, str]]) -> list[str]:
        """What is half-installed: flows naming no SA entry, SPI index / watchdog / liveness
        entries of no SA entry, SA entries of no kernel SA. Empty when clean."""
        bad: list[str] = []
        out = {int(k.value): v for k, v in self._items(self.sa_out)}
        inb = {v.sa_id: v for _, v in self._items(self.sa_in)}
        ids = set(out) | set(inb)
        for k, v in self._items(self.flows):
            table = out if k.dir == int(Direction.ENCAP) else inb
            if v.sa_id not in table:
                bad.append(
                    f"flow {defs.ip_of(k.saddr)}->{defs.ip_of(k.daddr)} dir {k.dir} names "
                    f"sa_id {v.sa_id}: no SA entry"
                )
        index = {(defs.from_be32(k.spi), defs.ip_of(k.daddr)): int(v.value)
                 for k, v in self._items(self.spi_index)}  # fmt: skip
        want = {(defs.from_be32(v.spi), defs.ip_of(v.daddr)): i for i, v in out.items()}
        if index != want:
            bad.append(f"SPI index {index} != outbound SA entries {want}")
        for name, h in (("watchdog", self.watchdog), ("liveness", self.liveness)):
            stray = sorted(int(k.value) for k, _ in self._items(h) if int(k.value) not in ids)
            if stray:
                bad.append(f"{name} entries of no SA entry: sa_id {stray}")
        missing = sorted(i for i in ids if self.watchdog.get(ctypes.c_uint32(i)) is None)
        if missing:
            bad.append(f"SA entries without a watchdog: sa_id {missing}")
        for v in (*out.values(), *inb.values()):
            ref = (defs.from_be32(v.spi), defs.ip_of(v.daddr))
            if ref not in kernel_sas:
                bad.append(f"SA entry 0x{ref[0]:08x} dst {ref[1]}: not a kernel SA")
        return bad

    def sa_entries(self) -> tuple[dict[int, int], dict[int, int]]:
        """SPI -> sa_id of the outbound and the inbound SA entries."""
        out = {defs.from_be32(v.spi): int(k.value) for k, v in self._items(self.sa_out)}
        inb = {defs.from_be32(v.spi): v.sa_id for _, v in self._items(self.sa_in)}
        return out, inb


def kernel_sas(bed: Testbed) -> set[tuple[int, str]]:
    with XfrmSocket(bed.ns("gw1")) as x:
        return {(s.spi, str(s.dst)) for s in x.sas() if s.proto == 50}


def xfrm_errors(bed: Testbed) -> dict[str, int]:
    text = bed.cmd("gw2", ["cat", "/proc/net/xfrm_stat"]).stdout
    stat = {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.strip())}
    return {k: stat.get(k, 0) for k in SEQ_ICV_ERRORS}


def wait_for(pred: Callable[[], Any], within: float, what: Callable[[], str] | str) -> Any:
    deadline = time.monotonic() + within
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {within} s: {what() if callable(what) else what}"
            )
        time.sleep(0.2)


def settle(rig: Rig, since: float) -> dict[str, Any]:
    """The controller alive and its status written SETTLE_S after `since` (wall clock): the
    events of changes made before `since` have been read and handled by then."""

    def fresh() -> dict[str, Any] | None:
        assert rig.gw.proc.poll() is None, f"controller exited\n{rig.gw.tail()}"
        try:
            st = rig.gw.published_status()
        except (OSError, ValueError):
            return None
        m = st.get("metrics") or {}
        return st if m.get("timestamp", 0) >= since + SETTLE_S and m.get("up") else None

    return wait_for(fresh, 90, lambda: f"controller status after the change\n{rig.gw.tail()}")


def rejections(rig: Rig) -> dict[str, int]:
    return dict((rig.gw.published_status().get("metrics") or {}).get("validation_rejections") or {})


# -- part 1: the random SPD and ruleset ----------------------------------------------------------
@dataclass(frozen=True)
class Pol:
    """A policy of gw1 for LAN -> remote: selector, direction, priority, action."""

    d: str  # "out" | "fwd"
    src: str
    dst: str
    proto: str | None  # None: any
    dport: int | None
    prio: int
    action: str  # "esp" (template) | "esp?" (optional template) | "bypass" | "block"

    @property
    def ident(self) -> tuple:
        return (self.d, self.src, self.dst, self.proto, self.dport)

    def selector(self) -> list[str]:
        sel = ["src", self.src, "dst", self.dst]
        if self.proto:
            sel += ["proto", self.proto]
        if self.dport:
            sel += ["dport", str(self.dport)]
        return [*sel, "dir", self.d]

    def argv(self, tunnel: Tunnel) -> list[str]:
        args = [*self.selector(), "priority", str(self.prio)]
        if self.action == "block":
            return [*args, "action", "block"]
        if self.action == "bypass":
            return [*args, "action", "allow"]
        # OUT: the tunnel's outbound SA; FWD: the SA a decrypted packet would have come by.
        tmpl = _tmpl(tunnel.out if self.d == "out" else tunnel.back, tunnel.reqid)
        return [*args, *tmpl, *(["level", "use"] if self.action == "esp?" else [])]

    def __str__(self) -> str:
        what = f"{self.proto or 'any'}" + (f" dport {self.dport}" if self.dport else "")
        return f"{self.d} {self.src}->{self.dst} {what} prio {self.prio} {self.action}"


@dataclass(frozen=True)
class Rule:
    """An nftables forward rule of gw1 for packets from the LAN."""

    saddr: str | None
    daddr: str | None
    dport: int | None
    udp_only: bool
    verdict: str  # "drop" | "accept"

    def text(self) -> str:
        parts = ['iifname "lan"']
        if self.saddr:
            parts.append(f"ip saddr {self.saddr}")
        if self.daddr:
            parts.append(f"ip daddr {self.daddr}")
        if self.dport:
            parts.append(f"udp dport {self.dport}")
        elif self.udp_only:
            parts.append("meta l4proto udp")
        return " ".join([*parts, self.verdict])

    def matches(self, f: UFlow) -> bool:
        ip = ipaddress.ip_address
        return (
            (self.saddr is None or ip(f.src) in ipaddress.ip_network(self.saddr))
            and (self.daddr is None or ip(f.dst) in ipaddress.ip_network(self.daddr))
            and (self.dport is None or self.dport == f.dport)
        )


class Spd:
    """gw1's random policies for LAN -> remote (the tunnel's OUT policy among them), its
    default FWD action and its nftables forward rules; mutated round by round."""

    def __init__(self, rig: Rig, rng: random.Random) -> None:
        self.rig, self.bed, self.rng = rig, rig.bed, rng
        self.p = rig.bed.plan
        self.pols: dict[tuple, Pol] = {}
        self.default_fwd = "accept"
        self.rules: list[Rule] = []
        self.base = Pol("out", self.p["LAN_NET"], self.p["REMOTE_NET"], None, None, BASE_PRIO,
                        "esp")  # fmt: skip
        self.put("add", self.base)

    def put(self, verb: str, pol: Pol) -> None:
        self.bed.ip("gw1", "xfrm", "policy", verb, *pol.argv(self.rig.tunnel))
        self.pols[pol.ident] = pol

    def delete(self, pol: Pol) -> None:
        self.bed.ip("gw1", "xfrm", "policy", "delete", *pol.selector())
        del self.pols[pol.ident]

    def prefix(self, addrs: list[str]) -> str:
        plen = self.rng.choice((24, 25, 26, 32, 32))
        return str(ipaddress.ip_network(f"{self.rng.choice(addrs)}/{plen}", strict=False))

    def random_pol(self) -> Pol:
        rng = self.rng
        d = rng.choice(("out", "out", "out", "fwd", "fwd"))
        proto = rng.choice((None, None, "udp", "udp", "tcp"))
        dport = rng.choice(PORTS) if proto == "udp" and rng.random() < 0.6 else None
        if d == "out":
            action = rng.choice(("esp", "esp", "bypass", "block"))
        else:
            action = rng.choice(("bypass", "bypass", "block", "esp", "esp?"))
        return Pol(d, self.prefix(self.rig.lan_addrs), self.prefix(self.rig.remote_addrs), proto,
                   dport, rng.choice(PRIOS), action)  # fmt: skip

    def mutate(self) -> list[str]:
        """Delete, update in place and add policies (at least one change); maybe flip the
        default FWD action; maybe a new ruleset. What was done, for the record."""
        rng, done = self.rng, []
        for pol in sorted(self.pols.values(), key=str):
            r = rng.random()
            if r < 0.2:
                self.delete(pol)
                done.append(f"del [{pol}]")
            elif r < 0.4:
                if pol.ident == self.base.ident:  # the tunnel's policy: mostly protecting
                    actions: tuple[str, ...] = ("esp", "esp", "esp", "bypass", "block")
                elif pol.d == "out":
                    actions = ("esp", "esp", "bypass", "block")
                else:
                    actions = ("bypass", "block", "esp", "esp?")
                new = replace(pol, prio=rng.choice((*PRIOS, pol.prio)), action=rng.choice(actions))
                self.put("update", new)
                done.append(f"upd [{pol}] -> prio {new.prio} {new.action}")
        if self.base.ident not in self.pols and rng.random() < 0.7:
            new = replace(self.base, prio=rng.choice((20, 30, BASE_PRIO)))
            self.put("add", new)
            done.append(f"add [{new}]")
        for _ in range(rng.randint(1, 3)):
            if len(self.pols) >= MAX_POLICIES:
                break
            pol = self.random_pol()
            if pol.ident in self.pols:
                continue
            self.put("add", pol)
            done.append(f"add [{pol}]")
        if not done:  # at least one change: every round starts from dropped flows
            pol = rng.choice(sorted(self.pols.values(), key=str))
            self.delete(pol)
            done.append(f"del [{pol}]")
        default = "block" if rng.random() < 0.15 else "accept"
        if default != self.default_fwd:
            self.bed.ip("gw1", "xfrm", "policy", "setdefault", "fwd", default)
            self.default_fwd = default
            done.append(f"default fwd {default}")
        if not self.rules or rng.random() < 0.5:
            self.set_rules([self.random_rule() for _ in range(rng.choice((0, 1, 1, 2, 3)))])
            done.append(f"nft {len(self.rules)} rule(s)")
        return done

    def random_rule(self) -> Rule:
        """Drop or accept by address and/or port: never every packet from the LAN."""
        rng = self.rng
        saddr = self.prefix(self.rig.lan_addrs) if rng.random() < 0.5 else None
        daddr = self.prefix(self.rig.remote_addrs) if rng.random() < 0.5 else None
        dport = rng.choice(PORTS) if rng.random() < 0.5 or not (saddr or daddr) else None
        verdict = "drop" if rng.random() < 0.7 else "accept"
        return Rule(saddr, daddr, dport, rng.random() < 0.3, verdict)

    def set_rules(self, rules: list[Rule]) -> None:
        body = "".join(f"    {r.text()}\n" for r in rules)
        text = (
            "table inet xfp_pdiff {}\ndelete table inet xfp_pdiff\n"
            "table inet xfp_pdiff {\n  chain lan_forward {\n"
            "    type filter hook forward priority 0; policy accept;\n"
            f"{body}  }}\n}}\n"
        )
        self.bed.cmd("gw1", ["nft", "-f", "-"], input=text)
        self.rules = rules

    def nft_accepts(self, f: UFlow) -> bool:
        for r in self.rules:
            if r.matches(f):
                return r.verdict == "accept"
        return True

    def reset(self) -> None:
        """Only the tunnel's OUT policy, default accept, no rules (part 2)."""
        for pol in list(self.pols.values()):
            self.delete(pol)
        self.put("add", self.base)
        self.bed.ip("gw1", "xfrm", "policy", "setdefault", "fwd", "accept")
        self.default_fwd = "accept"
        self.bed.cmd("gw1", ["nft", "delete", "table", "inet", "xfp_pdiff"], check=False)
        self.rules = []

    def in_force(self) -> str:
        pols = sorted(self.pols.values(), key=lambda p: (p.d, p.prio))
        return (
            "policies (LAN->remote): "
            + "; ".join(map(str, pols))
            + f"; default fwd {self.default_fwd}; nft: "
            + ("; ".join(r.text() for r in self.rules) or "none")
        )


def model_says(bed: Testbed, spd: Spd, f: UFlow) -> tuple[bool, str, bool]:
    """The controller's policy model (controller/core/xfrm_model.py, as validate_encap applies it)
    on the kernel's own dump, and the nftables rules as evaluated here: (ESP-forwarded, why,
    decided by a tie of equal priorities)."""
    with XfrmSocket(bed.ns("gw1")) as x:
        pols, default = x.policies(), x.get_default_policy()
    flow = Flow.of(f.src, f.dst, 17, f.sport, f.dport)
    tie = False
    for d in (Dir.FWD, Dir.OUT):
        cands = [p for p in pols if p.ptype == 0 and policy_matches(p, flow, d)]
        best = min((p.priority for p in cands), default=None)
        tie |= sum(p.priority == best for p in cands) > 1
    fwd = policy_decision(pols, default, flow, Dir.FWD)
    out = policy_decision(pols, default, flow, Dir.OUT)
    if not fwd.allowed:
        return False, f"fwd: {fwd.reason}", tie
    if fwd.policy is not None and any(not t.optional for t in fwd.policy.templates):
        return False, f"fwd: {fwd.policy} needs a secured packet", tie
    if not spd.nft_accepts(f):
        return False, "nft drops", tie
    if not out.allowed:
        return False, f"out: {out.reason}", tie
    if out.policy is None or not out.policy.templates:
        return False, f"out: {out.reason}, no template (clear)", tie
    return True, f"out: {out.reason} (ESP)", tie


@dataclass
class Tally:
    rounds: int = 0
    flows: int = 0
    agree: int = 0
    esp: int = 0  # kernel ESP-forwarded
    carried: int = 0
    ties: int = 0  # flows whose policy was chosen among equal priorities
    disagreements: list[str] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)
    model: list[str] = field(default_factory=list)
    echo: list[str] = field(default_factory=list)


def run_round(rig: Rig, i: int, persistent: list[UFlow], t: Tally) -> str:
    bed, spd, maps = rig.bed, rig.spd, rig.maps
    assert spd is not None
    log0 = len(rig.gw.tail(10**9))
    since = time.time()
    done = spd.mutate()
    settle(rig, since)
    stale = len(maps.encap_flows())
    rng = spd.rng
    probes = [UFlow.open(bed, f"r{i}p{j}", "probe", *f.cls) for j, f in enumerate(persistent)]
    new = [
        UFlow.open(
            bed,
            f"r{i}n{j}",
            "new",
            rng.choice(rig.lan_addrs),
            rng.choice(rig.remote_addrs),
            rng.choice(PORTS),
        )
        for j in range(NEW)
    ]
    flows = [*persistent, *probes, *new]
    try:
        # A: every flow's first datagram of the round; the kernel decides.
        for f in flows:
            f.send(f"A{i}")
        first = collect(flows, f"A{i}", ECHO_S)
        truth = {f: first[f] > 0 for f in (*probes, *new)}
        for f, probe in zip(persistent, probes, strict=True):
            truth[f] = truth[probe]
        # B: the controller learns what the kernel forwarded.
        with_entry: dict[UFlow, bool] = {}

        def learned() -> bool:
            for f in flows:
                with_entry[f] = maps.encap(rig.lan_ifindex, f) is not None
            return all(with_entry[f] for f in flows if truth[f])

        deadline = time.monotonic() + LEARN_S
        while not learned() and time.monotonic() < deadline:
            time.sleep(0.2)
        before = {f: (e.packets if (e := maps.encap(rig.lan_ifindex, f)) else 0) for f in flows}
        # C: the later datagrams; XDP carries those of learned flows.
        for _ in range(LATER):
            for f in flows:
                f.send(f"C{i}")
            time.sleep(0.05)
        later = collect(flows, f"C{i}", ECHO_S, want=LATER)
        after = {f: (e.packets if (e := maps.encap(rig.lan_ifindex, f)) else 0) for f in flows}
        log = rig.gw.tail(10**9)[log0:]
        for f in flows:
            carried = after[f] > before[f]
            esp = truth[f]
            predicted, why, tie = model_says(bed, spd, f)
            t.flows += 1
            t.esp += esp
            t.carried += carried
            t.ties += tie
            what = (
                f"round {i}: {f}: kernel {'ESP-forwards' if esp else 'drops'} it "
                f"(first datagram {'echoed' if first[f] else 'not echoed'}), fastpath "
                f"{'carries' if carried else 'does not carry'} it (entry "
                f"{'yes' if with_entry.get(f) else 'no'}, XDP packets {before[f]}->{after[f]}), "
                f"controller model: {'ESP' if predicted else 'no'} ({why}{', tie' if tie else ''})"
            )
            if f.kind == "persistent" and first[f] and not esp:
                t.unsafe.append(f"{what}; its first datagram of the round was echoed: carried "
                                f"by a stale entry\n    {spd.in_force()}")  # fmt: skip
            if carried and not esp:
                t.unsafe.append(f"{what}\n    {spd.in_force()}")
            if carried == esp:
                t.agree += 1
            else:
                hint = [ln for ln in log.splitlines() if f"{f.src}->{f.dst} proto 17" in ln][-3:]
                t.disagreements.append(
                    f"{what}\n    {spd.in_force()}\n    log: " + " | ".join(hint)
                )
            if predicted != esp:
                t.model.append(f"{what}\n    {spd.in_force()}")
            if later[f] != (LATER if esp else 0):
                t.echo.append(f"{what}: {later[f]} of {LATER} later datagrams echoed")
        t.rounds += 1
        line = (
            f"round {i}: {len(spd.pols)} policies, {len(spd.rules)} rules, {stale} stale "
            f"entries; {sum(truth[f] for f in flows)}/{len(flows)} ESP-forwarded, "
            f"{sum(after[f] > before[f] for f in flows)} carried; "
            + ", ".join(done)
            + f"; nft: {'; '.join(r.text() for r in spd.rules) or 'none'}"
        )
        with (rig.work / "rounds.txt").open("a") as fh:
            fh.write(line + "\n")
        return line
    finally:
        for f in (*probes, *new):
            f.sock.close()


def test_policy_differential(rig: Rig) -> None:
    """The flows XDP carries are the flows the kernel ESP-forwards, round after round."""
    bed, spd = rig.bed, rig.spd
    assert spd is not None
    errs0 = xfrm_errors(bed)
    persistent = [
        UFlow.open(
            bed,
            f"p{j}",
            "persistent",
            spd.rng.choice(rig.lan_addrs),
            spd.rng.choice(rig.remote_addrs),
            spd.rng.choice(PORTS),
        )
        for j in range(PERSISTENT)
    ]
    t = Tally()
    t0 = time.monotonic()
    lines = []
    try:
        for i in range(ROUNDS):
            lines.append(run_round(rig, i, persistent, t))
    finally:
        for f in persistent:
            f.sock.close()
    took = time.monotonic() - t0
    errs = xfrm_errors(bed)
    print(
        f"\npolicy differential: seed {SEED}, {t.rounds} rounds in {took:.0f} s, {t.flows} flows "
        f"({t.esp} ESP-forwarded by the kernel, {t.carried} carried by XDP), {t.agree} agree, "
        f"{len(t.disagreements)} disagree ({len(t.unsafe)} carried though the kernel drops); "
        f"controller model vs kernel: {t.flows - len(t.model)} agree, {len(t.model)} disagree; "
        f"{t.ties} flows decided among equal priorities; later datagrams not as expected: "
        f"{len(t.echo)}; peer errors {errs0} -> {errs}\n  "
        + "\n  ".join(lines)
        + "".join(f"\nDISAGREEMENT {d}" for d in t.disagreements)
        + "".join(f"\nMODEL {d}" for d in t.model)
        + "".join(f"\nECHO {d}" for d in t.echo)
    )
    assert not t.unsafe, "the fastpath carried flows the kernel drops:\n" + "\n".join(t.unsafe)
    assert not t.disagreements, "fastpath != kernel:\n" + "\n".join(t.disagreements)
    assert not t.model, "the controller's policy model != kernel:\n" + "\n".join(t.model)
    assert not t.echo, "later datagrams:\n" + "\n".join(t.echo)
    assert errs == errs0, f"no sequence/ICV errors at the peer: {errs0} -> {errs}"
    # Not vacuous: both outcomes, and the fastpath did carry flows.
    assert 0 < t.esp < t.flows, f"kernel outcomes mixed: {t.esp} of {t.flows} ESP-forwarded"
    assert t.carried > 0, "the fastpath carried flows"


# -- part 2: a full SA table ---------------------------------------------------------------------
def carried_now(rig: Rig, f: UFlow, tag: str, n: int = 3) -> tuple[int, int]:
    """Send n datagrams on f: (echoes, XDP packets of its encap entry during them)."""
    e0 = rig.maps.encap(rig.lan_ifindex, f)
    for _ in range(n):
        f.send(tag)
        time.sleep(0.05)
    echoes = collect([f], tag, ECHO_S, want=n)[f]
    e1 = rig.maps.encap(rig.lan_ifindex, f)
    return echoes, (e1.packets if e1 else 0) - (e0.packets if e0 and e1 else 0)


def until_carried(rig: Rig, f: UFlow, within: float = 60) -> None:
    k = iter(range(10**6))
    wait_for(lambda: carried_now(rig, f, f"u{next(k)}")[1] > 0, within,
             lambda: f"{f} carried by XDP\n{rig.gw.tail(3000)}")  # fmt: skip


def sa_status(rig: Rig, spi: int) -> dict[str, Any]:
    for s in rig.gw.published_status().get("sas", []):
        if s["spi"] == f"0x{spi:08x}":
            return s
    return {}


def test_sa_table_full_stays_on_kernel_path(rig: Rig) -> None:
    bed, maps, gw, spd = rig.bed, rig.maps, rig.gw, rig.spd
    assert spd is not None
    sizes = {n: maps.max_entries(n) for n in ("xfp_sa_out", "xfp_sa_in", "xfp_sa_out_spi")}
    assert set(sizes.values()) == {SAS}, f"[tables] sas = {SAS} sizes the SA maps: {sizes}"
    errs0 = xfrm_errors(bed)
    spd.reset()
    la, ra = rig.lan_addrs, rig.remote_addrs
    checks: list[str] = []

    def clean(step: str) -> None:
        assert gw.proc.poll() is None, f"{step}: controller exited\n{gw.tail()}"
        bad = maps.consistency(kernel_sas(bed))
        assert not bad, f"{step}: half-installed state:\n  " + "\n  ".join(bad)
        checks.append(step)

    f1 = UFlow.open(bed, "t1", "tunnel 1", la[0], ra[0], PORTS[0])
    f2 = UFlow.open(bed, "t2", "tunnel 2", la[1], ra[1], PORTS[0])
    f3 = UFlow.open(bed, "t3", "tunnel 3", la[2], ra[2], PORTS[0])
    t2 = t3 = None
    try:
        # Two tunnels fill the table: two outbound and two inbound SA entries.
        until_carried(rig, f1)
        t2 = add_tunnel(bed, 2, f"{la[1]}/32", f"{ra[1]}/32", 10)
        until_carried(rig, f2)
        until_carried(rig, f1)  # the policy change removed it: learned again
        out, inb = maps.sa_entries()
        assert len(out) == SAS and len(inb) == SAS, f"the SA table is full: {out} {inb}"
        clean("two tunnels offloaded")

        # A third tunnel: its SAs do not fit. Its traffic flows on the kernel path.
        rej0 = rejections(rig)
        t3 = add_tunnel(bed, 3, f"{la[2]}/32", f"{ra[2]}/32", 10)
        echoes, xdp = carried_now(rig, f3, "full", n=20)
        assert echoes == 20, f"tunnel 3 carries traffic with the table full: {echoes}/20 echoed"
        wait_for(lambda: rejections(rig).get("sa_table_full", 0) > rej0.get("sa_table_full", 0),
                 30, lambda: f"a sa_table_full rejection counted: {rejections(rig)}\n"
                 f"{gw.tail(3000)}")  # fmt: skip
        echoes, xdp = carried_now(rig, f3, "full2", n=5)
        assert echoes == 5 and xdp == 0, (
            f"tunnel 3 stays on the kernel path: {echoes} echoed, XDP {xdp}"
        )
        assert maps.encap(rig.lan_ifindex, f3) is None, "no flow entry for tunnel 3"
        out, inb = maps.sa_entries()
        assert t3.out.spi not in out and t3.back.spi not in inb, "tunnel 3's SAs not installed"
        st3 = sa_status(rig, t3.out.spi)
        assert not st3.get("offloaded") and "SA table full" in st3.get("reason", ""), (
            f"the status says why tunnel 3's SA is not offloaded: {st3}"
        )
        assert "SA table full" in gw.tail(10**9), "the failure is logged"
        for f in (f1, f2):
            echoes, xdp = carried_now(rig, f, "still")
            assert echoes == 3 and xdp > 0, f"{f} still on the fastpath: {echoes} echoed, XDP {xdp}"
        clean("third tunnel refused")
        refused_t3 = rejections(rig).get("sa_table_full", 0) - rej0.get("sa_table_full", 0)

        # A rekey of tunnel 1 while the table is full: flows move to the new SA, which does
        # not fit either; they go on on the kernel path.
        rej1 = rejections(rig).get("sa_table_full", 0)
        new_out, new_back = add_sa_pair(bed, 1)
        wait_for(
            lambda: maps.encap(rig.lan_ifindex, f1) is None, 30, "tunnel 1's flow leaves the old SA"
        )
        echoes, xdp = carried_now(rig, f1, "rekey", n=10)
        assert echoes == 10, f"tunnel 1 works across the rekey: {echoes}/10"
        wait_for(lambda: rejections(rig).get("sa_table_full", 0) > rej1, 30,
                 "the rekeyed SA refused (sa_table_full)")  # fmt: skip
        echoes, xdp = carried_now(rig, f1, "rekey2", n=5)
        assert echoes == 5 and xdp == 0, f"tunnel 1 on the kernel path: {echoes} echoed, XDP {xdp}"
        out, inb = maps.sa_entries()
        assert new_out.spi not in out and new_back.spi not in inb, f"new SAs not installed: {out}"
        clean("rekeyed SA refused")

        # Room again: the old SAs of tunnel 1 go; the new one is offloaded after all.
        delete_sa(bed, rig.tunnel.out)
        delete_sa(bed, rig.tunnel.back)
        until_carried(rig, f1)
        out, _ = maps.sa_entries()
        assert new_out.spi in out, f"tunnel 1's new SA offloaded once there is room: {out}"
        clean("rekeyed SA offloaded")
        # Tunnel 2 goes: tunnel 3 is offloaded too.
        remove_tunnel(bed, t2)
        t2 = None
        until_carried(rig, f3)
        wait_for(
            lambda: sa_status(rig, t3.out.spi).get("offloaded"),
            20,
            lambda: f"status: tunnel 3's SA offloaded: {sa_status(rig, t3.out.spi)}",
        )
        for f in (f1, f3):
            echoes, xdp = carried_now(rig, f, "end")
            assert echoes == 3 and xdp > 0, f"{f} on the fastpath at the end: {echoes}, XDP {xdp}"
        clean("tunnel 3 offloaded")
        errs = xfrm_errors(bed)
        assert errs == errs0, f"no sequence/ICV errors at the peer: {errs0} -> {errs}"
        lines = [ln for ln in gw.tail(10**9).splitlines() if "SA table full" in ln]
        print(
            f"\nfull SA table (sas = {SAS}, maps {sizes}): third tunnel refused "
            f"{refused_t3} time(s) and the rekeyed SA {rejections(rig)['sa_table_full'] - rej1} "
            f"time(s) (sa_table_full), traffic on the kernel path meanwhile, controller pid "
            f"{gw.proc.pid} alive, {len(lines)} error line(s) logged, e.g.\n  {lines[0]}\n"
            f"consistent maps after: {', '.join(checks)}; peer errors {errs}"
        )
    finally:
        for f in (f1, f2, f3):
            f.sock.close()
