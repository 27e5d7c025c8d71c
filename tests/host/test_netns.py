# SPDX-License-Identifier: GPL-2.0-only
"""controller.netns.in_netns: one BCC program, compiled once in this process, attached to
devices inside test bed namespaces (the pattern session-scoped BPF fixtures use in the VM)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

import testbed.bed as testbed_mod
from controller.netns import in_netns, netns_inode
from testbed.bed import Testbed

XDP_COUNT = r"""
#include <uapi/linux/bpf.h>
BPF_ARRAY(seen, u64, 1);
int count_all(struct xdp_md *ctx) {
    u32 k = 0;
    u64 *v = seen.lookup(&k);
    if (v)
        __sync_fetch_and_add(v, 1);
    return XDP_PASS;
}
"""


def test_in_netns_enters_and_comes_back(bed: Testbed) -> None:
    home = netns_inode()
    target = os.stat(f"/run/netns/{bed.ns('gw1')}").st_ino
    with in_netns(bed.ns("gw1")):
        assert netns_inode() == target, "inside: the thread is in gw1's namespace"
        assert socket.if_nametoindex("wan") == bed.ifindex("gw1", "wan"), "gw1's devices seen"
    assert netns_inode() == home, "back in the original namespace"
    with pytest.raises(RuntimeError), in_netns(bed.ns("gw2")):
        raise RuntimeError("boom")
    assert netns_inode() == home, "back in the original namespace after an exception"


@pytest.fixture(scope="module")
def xdp_prog() -> Iterator[tuple[object, object]]:
    from controller.datapath.loader import Prog, compile_bpf, load_program

    b = compile_bpf(text=XDP_COUNT)
    try:
        yield b, load_program(b, "count_all", Prog.XDP)
    finally:
        b.cleanup()


def test_one_compiled_program_serves_two_test_beds(bed: Testbed, xdp_prog) -> None:
    b, fn = xdp_prog
    seen = b["seen"]
    with testbed_mod.testbed(prefix=f"{bed.prefix}b-") as other:
        for tb in (bed, other):
            seen.clear()
            with in_netns(tb.ns("gw1")):
                b.attach_xdp(b"lan", fn, 0)
            try:
                assert "xdp" in tb.ip("gw1", "link", "show", "dev", "lan").stdout, "attached"
                assert tb.ping("lan", tb.addr("REMOTE_HOST"), count=3), "traffic forwards"
            finally:
                with in_netns(tb.ns("gw1")):
                    b.remove_xdp(b"lan", 0)
            got = seen[0].value
            assert got >= 3, f"{tb.prefix}: XDP counted the 3 echo requests: {got}"
            assert "xdp" not in tb.ip("gw1", "link", "show", "dev", "lan").stdout, "detached"
