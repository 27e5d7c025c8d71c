# SPDX-License-Identifier: GPL-2.0-only
"""KernelWatch: every change that can invalidate a flow arrives as a typed event, quickly.

Each change is made with the usual tool (ip, nft) inside gw1's namespace; the latency printed
is from just after the tool returned (the change is in the kernel) to the event being read,
and, in brackets, from just before the tool started (an upper bound that includes fork/exec).
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable

import pytest

from controller.core.xfrm_model import Overrun, PolicyAdded
from controller.netlink.watch import (
    AddrChanged,
    KernelWatch,
    LinkChanged,
    NeighChanged,
    NftChanged,
    NftGeneration,
    RouteChanged,
    RuleChanged,
)
from testbed.bed import ROOT, Testbed

LATENCY_GOAL_MS = 100.0


def change_and_wait(
    w: KernelWatch,
    argv: list[str],
    pred: Callable[[object], bool],
    timeout: float = 3.0,
) -> tuple[object, float, float]:
    """Run argv, wait for the first event matching pred: (event, ms after return, ms after
    start)."""
    t0 = time.monotonic_ns()
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    t1 = time.monotonic_ns()
    seen = []
    for ev in w.events(timeout):
        seen.append(ev)
        if pred(ev):
            return ev, (ev.ts_ns - t1) / 1e6, (ev.ts_ns - t0) / 1e6
    raise AssertionError(f"{' '.join(argv)}: no matching event in {timeout} s; saw {seen}")


def test_every_source_fires_with_low_latency(bed: Testbed, capsys) -> None:
    ns = bed.ns("gw1")
    ip = ["ip", "-n", ns]
    nft = ["ip", "netns", "exec", ns, "nft"]
    wan = bed.ifindex("gw1", "wan")
    cases: list[tuple[str, list[str], Callable[[object], bool]]] = [
        (
            "route add",
            [*ip, "route", "add", "10.9.0.0/24", "via", "192.0.2.2"],
            lambda e: (
                isinstance(e, RouteChanged)
                and e.action == "new"
                and e.dst == "10.9.0.0/24"
                and e.gateway == "192.0.2.2"
                and e.oif == wan
            ),
        ),
        (
            "route change",
            [*ip, "route", "change", "10.9.0.0/24", "via", "192.0.2.3", "dev", "wan"],
            lambda e: isinstance(e, RouteChanged) and e.gateway == "192.0.2.3",
        ),
        (
            "route del",
            [*ip, "route", "del", "10.9.0.0/24"],
            lambda e: isinstance(e, RouteChanged) and e.action == "del",
        ),
        (
            "rule add",
            [*ip, "rule", "add", "from", "10.1.0.0/24", "table", "100", "priority", "100"],
            lambda e: isinstance(e, RuleChanged) and e.table == 100 and e.priority == 100,
        ),
        (
            "neigh change",
            [
                *ip,
                "neigh",
                "replace",
                "192.0.2.2",
                "lladdr",
                "02:00:00:00:00:09",
                "dev",
                "wan",
                "nud",
                "permanent",
            ],
            lambda e: (
                isinstance(e, NeighChanged)
                and e.dst == "192.0.2.2"
                and e.lladdr == "02:00:00:00:00:09"
                and e.state_name == "permanent"
            ),
        ),
        (
            "neigh del",
            [*ip, "neigh", "del", "192.0.2.2", "dev", "wan"],
            lambda e: isinstance(e, NeighChanged) and e.action == "del" and e.ifindex == wan,
        ),
        (
            "addr add",
            [*ip, "addr", "add", "198.51.100.1/24", "dev", "wan"],
            lambda e: isinstance(e, AddrChanged) and e.address == "198.51.100.1",
        ),
        (
            "link down",
            [*ip, "link", "set", "wan", "down"],
            lambda e: isinstance(e, LinkChanged) and e.ifname == "wan" and not e.up,
        ),
        (
            "link up",
            [*ip, "link", "set", "wan", "up"],
            lambda e: isinstance(e, LinkChanged) and e.ifindex == wan and e.up,
        ),
        (
            "nft add table",
            [*nft, "add", "table", "inet", "xfpt"],
            lambda e: isinstance(e, NftChanged) and e.msg == "NEWTABLE" and e.table == "xfpt",
        ),
        (
            "nft add chain",
            [
                *nft,
                "add",
                "chain",
                "inet",
                "xfpt",
                "fchain",
                "{ type filter hook forward priority 0; }",
            ],
            lambda e: isinstance(e, NftChanged) and e.msg == "NEWCHAIN",
        ),
        (
            "nft add rule",
            [*nft, "add", "rule", "inet", "xfpt", "fchain", "ip", "daddr", "10.2.0.2", "drop"],
            lambda e: isinstance(e, NftChanged) and e.msg == "NEWRULE" and e.table == "xfpt",
        ),
        (
            "nft batch committed",
            [*nft, "add", "rule", "inet", "xfpt", "fchain", "tcp", "dport", "22", "accept"],
            lambda e: isinstance(e, NftGeneration) and e.genid > 0,
        ),
        (
            "nft flush ruleset",
            [*nft, "flush", "ruleset"],
            lambda e: isinstance(e, NftChanged) and e.msg in ("DELTABLE", "DELRULE", "DELCHAIN"),
        ),
        (
            "xfrm policy add",
            [
                *ip,
                "xfrm",
                "policy",
                "add",
                "src",
                "10.1.0.0/24",
                "dst",
                "10.2.0.0/24",
                "dir",
                "fwd",
            ],
            lambda e: isinstance(e, PolicyAdded),
        ),
    ]
    results = []
    with KernelWatch(ns) as w:
        settle(w)
        for name, argv, pred in cases:
            _ev, after, total = change_and_wait(w, argv, pred)
            results.append((name, after, total))
        stats = Counter(w.stats)
    with capsys.disabled():
        for name, after, total in results:
            print(
                f"\n[latency] {name}: {after:.2f} ms after the change ({total:.2f} ms incl. exec)"
            )
    assert stats["rtnl.malformed"] == 0 and stats["nft.malformed"] == 0, f"{stats}"
    slow = [(n, a) for n, a, _ in results if a > LATENCY_GOAL_MS]
    assert not slow, f"events slower than {LATENCY_GOAL_MS} ms: {slow}"


def settle(w: KernelWatch, quiet: float = 1.2, limit: float = 6.0) -> None:
    """Drain what the fresh test bed still announces (veth carrier comes up asynchronously,
    linkwatch, which batches link events up to once a second: net/core/link_watch.c) until
    `quiet` seconds pass without an event, at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not any(True for _ in w.events(quiet)):
            return


def test_fileno_is_pollable_and_quiet_when_nothing_changes(bed: Testbed) -> None:
    with KernelWatch(bed.ns("gw1")) as w:
        settle(w)
        r, _, _ = select.select([w], [], [], 0.2)
        assert r == [], "no change, not readable"
        t0 = time.monotonic()
        assert w.read_events() == [], "read_events never blocks"
        assert time.monotonic() - t0 < 0.1, "read_events returned at once"
        bed.ip("gw1", "route", "add", "10.8.0.0/24", "via", "192.0.2.2")
        r, _, _ = select.select([w], [], [], 2.0)
        assert r == [w], "readable after a change"
        evs = w.read_events()
        assert any(isinstance(e, RouteChanged) and e.dst == "10.8.0.0/24" for e in evs), f"{evs}"


def test_other_namespaces_are_not_seen(bed: Testbed) -> None:
    with KernelWatch(bed.ns("gw1")) as w:
        bed.ip("gw2", "route", "add", "10.7.0.0/24", "via", "192.0.2.1")
        bed.ip("gw1", "route", "add", "10.6.0.0/24", "via", "192.0.2.2")
        evs = []
        for ev in w.events(1.0):
            evs.append(ev)
            if isinstance(ev, RouteChanged) and ev.dst == "10.6.0.0/24":
                break
        dsts = [e.dst for e in evs if isinstance(e, RouteChanged)]
        assert "10.6.0.0/24" in dsts and "10.7.0.0/24" not in dsts, f"gw1 only: {dsts}"


def test_overrun_is_reported_not_lost(bed: Testbed) -> None:
    """A tiny receive buffer and a burst of changes: the kernel drops notifications (ENOBUFS);
    the watcher must say so (Overrun), since the caller then has to resync everything."""
    with KernelWatch(bed.ns("gw1"), nft=False, xfrm=False) as w:
        for _name, src in w._sources.values():
            src.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 0)  # kernel minimum
        batch = "".join(f"route add 10.50.{i}.0/24 via 192.0.2.2\n" for i in range(200))
        bed.ip("gw1", "-batch", "-", input=batch)
        evs = []
        for ev in w.events(2.0):
            evs.append(ev)
            if isinstance(ev, Overrun):
                break
        assert any(isinstance(e, Overrun) and e.source == "rtnl" for e in evs), (
            f"overrun reported; got {len(evs)} events, stats {w.stats}"
        )
        assert w.stats["rtnl.overrun"] >= 1, f"{w.stats}"


def test_malformed_input_is_counted_never_raised() -> None:
    w = KernelWatch.__new__(KernelWatch)  # parse() only
    w.stats = Counter()
    hdr = struct.pack
    bad_rtnl = [
        b"\x00" * 3,
        hdr("IHHII", 16, 24, 0, 0, 0),  # RTM_NEWROUTE without its rtmsg
        # RTM_NEWROUTE whose only attribute claims 40 bytes of a 4-byte remainder
        hdr("IHHII", 32, 24, 0, 0, 0) + b"\x02\x18" + b"\0" * 10 + hdr("HH", 40, 1),
        hdr("IHHII", 20, 999, 0, 0, 0) + b"\0" * 4,  # unknown type
    ]
    for raw in bad_rtnl:
        w.parse("rtnl", raw, 0)
    nft_type = (10 << 8) | 6  # NFT_MSG_NEWRULE
    bad_nft = [
        hdr("IHHII", 16, nft_type, 0, 0, 0),  # no nfgenmsg
        hdr("IHHII", 28, nft_type, 0, 0, 0) + b"\x01\x00\x00\x00" + hdr("HH", 99, 1) + b"ab",
        hdr("IHHII", 20, (3 << 8) | 1, 0, 0, 0) + b"\0" * 4,  # another subsystem
    ]
    for raw in bad_nft:
        w.parse("nft", raw, 0)
    assert w.stats["rtnl.malformed"] >= 2 and w.stats["nft.malformed"] >= 2, f"{w.stats}"
    assert w.stats["rtnl.unknown"] >= 1 and w.stats["nft.unknown"] >= 1, f"{w.stats}"
    table_attr = hdr("HH", 9, 1) + b"xfpt\0\0\0\0"  # nla_len 9, padded to 12
    ok = hdr("IHHII", 32, nft_type, 0, 0, 0) + b"\x01\x00\x00\x00" + table_attr
    (ev,) = w.parse("nft", ok, 5)
    assert isinstance(ev, NftChanged) and ev.table == "xfpt" and ev.family == 1, f"{ev}"


CHILD = """
import sys, time
from controller.netlink.watch import KernelWatch, RouteChanged
with KernelWatch() as w:
    print("ready", flush=True)
    for ev in w.events(10.0):
        if isinstance(ev, RouteChanged) and ev.dst == "10.5.0.0/24":
            print("seen", ev.oif, flush=True)
            break
"""


def test_works_inside_the_namespace_via_nsenter(bed: Testbed) -> None:
    """The controller runs in gw1's namespace (nsenter --net) and watches with netns=None."""
    argv = [*bed.nsenter_argv("gw1"), sys.executable, "-c", CHILD]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as child:
        try:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready", "child watcher started"
            bed.ip("gw1", "route", "add", "10.5.0.0/24", "via", "192.0.2.2")
            line = child.stdout.readline().strip()
            assert line == f"seen {bed.ifindex('gw1', 'wan')}", f"child saw the route: {line!r}"
            assert child.wait(timeout=10) == 0, "child exited cleanly"
        finally:
            if child.poll() is None:
                child.kill()


@pytest.mark.vm
def test_nft_rule_blocking_a_flow_is_seen_in_the_vm(bed: Testbed) -> None:
    """Same nftables watch on the VM's kernel (Debian 6.1), where the controller really runs."""
    ns = bed.ns("gw1")
    with KernelWatch(ns, rtnl=False, xfrm=False) as w:
        _ev, after, _ = change_and_wait(
            w,
            ["ip", "netns", "exec", ns, "nft", "add", "table", "ip", "vmt"],
            lambda e: isinstance(e, NftChanged) and e.table == "vmt",
        )
        assert after < 1000, f"{after} ms"
