# SPDX-License-Identifier: GPL-2.0-only
"""controller/datapath/loader.py: one loader, idempotent and transactional (docs/design.md §6).
A failed attach on one device undoes the attachments made before it in the same transaction,
checked on the devices themselves (`ip -j link`, `tc -j filter` inside a test bed namespace;
nothing is attached in this machine's own namespace)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from controller.datapath.loader import Loader, LoaderError, Prog
from testbed.bed import Testbed

XDP_PASS = "int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }"
TC_PASS = "int tc_pass(struct __sk_buff *skb) { return 0; /* TC_ACT_OK */ }"
TP_PROGS = r"""
TRACEPOINT_PROBE(net, netif_rx) { return 0; }
int tp_named(void *ctx) { return 0; }
"""


@pytest.fixture(scope="module")
def loader() -> Iterator[Loader]:
    """One loader for the module: the test programs compile once."""
    ld = Loader()
    try:
        yield ld
    finally:
        ld.close()


@pytest.fixture(scope="module")
def xdp_fn(loader: Loader):
    return loader.load(loader.compile(text=XDP_PASS), "xdp_pass", Prog.XDP)


@pytest.fixture(scope="module")
def tc_fn(loader: Loader):
    return loader.load(loader.compile(text=TC_PASS), "tc_pass", Prog.SCHED_CLS)


def xdp_devices(bed: Testbed, role: str) -> dict[str, bool]:
    """{device: carries an XDP program} for every device of a role's namespace."""
    links = json.loads(bed.ip(role, "-j", "link", "show").stdout)
    return {link["ifname"]: "xdp" in link for link in links}


def tc_egress_filters(bed: Testbed, role: str, dev: str) -> list[dict]:
    """The BPF filters on a device's egress hook (none, also when there is no clsact). `tc -j`
    prints a header entry per priority (no "options") before the filters themselves."""
    proc = subprocess.run(
        ["tc", "-n", bed.ns(role), "-j", "filter", "show", "dev", dev, "egress"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return [f for f in json.loads(proc.stdout) if f.get("kind") == "bpf" and "options" in f]


def test_failed_xdp_attach_undoes_the_devices_before_it(
    bed: Testbed, loader: Loader, xdp_fn
) -> None:
    ns = bed.ns("gw1")
    with pytest.raises(LoaderError, match="no-such-dev"), loader.transaction():
        for dev in ("lan", "wan", "no-such-dev"):
            loader.attach_xdp(dev, xdp_fn, netns=ns)
    assert not any(xdp_devices(bed, "gw1").values()), (
        f"after the failure no device of gw1 carries XDP: {xdp_devices(bed, 'gw1')}"
    )
    assert loader.attachments == [], f"nothing left recorded: {loader.attachments}"


def test_an_exception_in_the_block_undoes_only_the_blocks_attachments(
    bed: Testbed, loader: Loader, xdp_fn
) -> None:
    ns = bed.ns("gw1")
    try:
        loader.attach_xdp("lan", xdp_fn, netns=ns)  # before the transaction: not its to undo
        with pytest.raises(RuntimeError, match="boom"), loader.transaction():
            loader.attach_xdp("lan", xdp_fn, netns=ns)  # again, in place
            loader.attach_xdp("wan", xdp_fn, netns=ns)
            raise RuntimeError("boom")
        seen = xdp_devices(bed, "gw1")
        assert seen["lan"], f"lan, attached before the transaction, keeps its program: {seen}"
        assert not seen["wan"], f"wan, attached by the failed transaction, was undone: {seen}"
    finally:
        loader.detach_all()
    assert not any(xdp_devices(bed, "gw1").values()), "detach_all removed everything"


def test_attaching_twice_is_not_an_error(bed: Testbed, loader: Loader, xdp_fn) -> None:
    ns = bed.ns("gw1")
    try:
        loader.attach_xdp("lan", xdp_fn, netns=ns)
        loader.attach_xdp("lan", xdp_fn, netns=ns)
        assert xdp_devices(bed, "gw1")["lan"], "lan carries the program"
        xdp = [a for a in loader.attachments if a.kind == "xdp"]
        assert len(xdp) == 1, f"recorded once: {xdp}"
    finally:
        assert loader.detach_all() == [], "detached without errors"
        assert loader.detach_all() == [], "a second detach_all is a no-op"
    assert not xdp_devices(bed, "gw1")["lan"], "detached"


def test_failed_tc_attach_undoes_the_devices_before_it(bed: Testbed, loader: Loader, tc_fn) -> None:
    ns = bed.ns("gw1")
    with pytest.raises(LoaderError, match="no-such-dev"), loader.transaction():
        for dev in ("lan", "wan", "no-such-dev"):
            loader.attach_tc_egress(dev, tc_fn, "tc_pass", netns=ns)
    for dev in ("lan", "wan"):
        got = tc_egress_filters(bed, "gw1", dev)
        assert got == [], f"{dev}: no BPF filter left on egress after the failure: {got}"
    try:
        loader.attach_tc_egress("wan", tc_fn, "tc_pass", netns=ns)
        loader.attach_tc_egress("wan", tc_fn, "tc_pass", netns=ns)  # replaces our filter
        got = tc_egress_filters(bed, "gw1", "wan")
        assert len(got) == 1, f"attached twice: one filter on wan egress: {got}"
    finally:
        loader.detach_all()
    assert tc_egress_filters(bed, "gw1", "wan") == [], "detached"


def test_tracepoints_are_recorded_and_a_failed_one_undoes_the_rest() -> None:
    ld = Loader()
    try:
        b = ld.compile(text=TP_PROGS)  # BCC attaches TRACEPOINT_PROBE as it compiles
        auto = [a.target for a in ld.attachments if a.kind == "tracepoint"]
        assert auto == ["net:netif_rx"], f"the autoloaded tracepoint is recorded: {auto}"
        with pytest.raises(LoaderError, match="no_such_tracepoint"), ld.transaction():
            ld.attach_tracepoint(b, "net:net_dev_queue", "tp_named")
            ld.attach_tracepoint(b, "net:no_such_tracepoint", "tp_named")
        assert b"net:net_dev_queue" not in b.tracepoint_fds, "the first attach was undone"
        assert b"net:netif_rx" in b.tracepoint_fds, "the earlier one is left alone"
    finally:
        ld.close()
        ld.close()  # idempotent
    assert b.tracepoint_fds == {}, "close() detached every tracepoint"
    assert ld.attachments == [] and ld.modules == [], "and released the module"


def test_compile_errors_name_the_source() -> None:
    ld = Loader()
    try:
        with pytest.raises(LoaderError, match=r"compiling/loading bpf/no_such\.c"):
            ld.compile("no_such.c")
        with pytest.raises(LoaderError, match="only -D cflags"):
            ld.compile(text=XDP_PASS, cflags=["-I/tmp"])
        b = ld.compile(text=XDP_PASS)
        with pytest.raises(LoaderError, match=r"compiling/loading <text>"):
            ld.load(b, "no_such_function", Prog.XDP)
    finally:
        ld.close()
