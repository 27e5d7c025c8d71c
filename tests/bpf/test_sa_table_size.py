# SPDX-License-Identifier: GPL-2.0-only
"""`[tables] sas` sizes the datapath's SA maps (-DXFP_SA_MAX), and a full one fails the write
with E2BIG, leaving nothing behind: real BPF maps on this host (no ESP needed). The daemon's
handling of that failure (sa_table_full, the SA stays in the kernel) is shown on a real
kernel by tests/vm/test_vm_policy_diff.py::test_sa_table_full_stays_on_kernel_path."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.datapath.abi import SaOut
from controller.datapath.xdp import Datapath, DatapathError, InboundSa, OutboundSa

SAS = 2


@pytest.fixture(scope="module")
def small() -> Iterator[Datapath]:
    d = Datapath(pin_dir=f"/sys/fs/bpf/xfp-satest-{os.getpid()}", cflags=(f"-DXFP_SA_MAX={SAS}",))
    try:
        d.load()
        yield d
    finally:
        d.close()
        d.unpin()


def _out(sa_id: int) -> OutboundSa:
    return OutboundSa(sa_id, 0x1000 + sa_id, "192.0.2.1", "192.0.2.2", bytes(36), 1,
                      "02:00:00:00:00:02", "02:00:00:00:00:01")  # fmt: skip


def _in(sa_id: int) -> InboundSa:
    return InboundSa(sa_id, 0x2000 + sa_id, "192.0.2.2", "192.0.2.1", bytes(36))


def test_full_sa_tables_refuse_with_e2big_and_leave_nothing(small: Datapath) -> None:
    d = small
    for i in range(1, SAS + 1):
        d.put_outbound_sa(_out(i))
        d.put_inbound_sa(_in(100 + i))
    with pytest.raises(DatapathError) as out_full:
        d.put_outbound_sa(_out(SAS + 1))
    assert out_full.value.errno == errno.E2BIG, f"outbound table full: {out_full.value}"
    with pytest.raises(DatapathError) as in_full:
        d.put_inbound_sa(_in(100 + SAS + 1))
    assert in_full.value.errno == errno.E2BIG, f"inbound table full: {in_full.value}"
    assert d.outbound_sa(SAS + 1) is None, "no outbound entry for the refused SA"
    wd = d.maps["watchdog"]
    ids = sorted(int(k.value) for k in list(wd.keys()))
    assert ids == [*range(1, SAS + 1), *range(101, 101 + SAS)], (
        f"no watchdog of a refused SA: {ids}"
    )
    # Room again once an entry goes: the refused SA fits.
    assert d.delete_outbound_sa(1)
    d.put_outbound_sa(_out(SAS + 1))
    assert d.outbound_sa(SAS + 1) is not None
    assert wd.get(ctypes.c_uint32(1)) is None, "the deleted SA's watchdog went with it"


def test_pinned_maps_keep_their_size_until_pinned_anew() -> None:
    """BCC takes pinned maps as it finds them: loading with other sizes over old pins gives the
    old sizes (which the controller detects with map_sizes() and then pins anew)."""
    pin_dir = f"/sys/fs/bpf/xfp-resize-{os.getpid()}"

    def load(sas: int, flows: int) -> Datapath:
        return Datapath(
            pin_dir=pin_dir, cflags=(f"-DXFP_SA_MAX={sas}", f"-DXFP_FLOWS_MAX={flows}")
        ).load()

    first = load(2, 1024)
    try:
        assert first.map_sizes() == {"xfp_flows": 1024, "xfp_sa_out": 2, "xfp_sa_in": 2}
        first.close()
        again = load(4, 2048)
        assert again.map_sizes() == {"xfp_flows": 1024, "xfp_sa_out": 2, "xfp_sa_in": 2}, (
            "pinned maps are reused at their old sizes"
        )
        again.close()
        again.unpin()
        fresh = load(4, 2048)
        fresh.close()
        assert fresh.map_sizes() == {"xfp_flows": 2048, "xfp_sa_out": 4, "xfp_sa_in": 4}
    finally:
        first.unpin()


def test_maps_pinned_by_another_layout_are_refused_by_name() -> None:
    """An SA map pinned by a build whose entries have another layout (an upgrade after an older
    controller died with SAs offloaded) is refused before anything loads, with an error that
    names the map, both layouts and what to do; the pinned map is left as it was."""
    pin = Path(f"/sys/fs/bpf/xfp-layout-{os.getpid()}")
    pin.mkdir(mode=0o700)
    stale = pin / "xfp_sa_out"
    try:
        subprocess.run(
            ["bpftool", "map", "create", str(stale), "type", "hash", "key", "4", "value", "8",
             "entries", "4", "name", "xfp_sa_out"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        d = Datapath(pin_dir=str(pin))
        with pytest.raises(DatapathError) as refused:
            d.load()
        msg = str(refused.value)
        want = f"4/{ctypes.sizeof(SaOut)}"
        assert "another build" in msg and "4/8" in msg and want in msg, f"the error: {msg}"
        assert d.encap is None, "nothing was compiled or loaded over the stale map"
        assert stale.exists(), "the stale map stays for the operator"
    finally:
        stale.unlink(missing_ok=True)
        pin.rmdir()
