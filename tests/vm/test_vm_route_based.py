# SPDX-License-Identifier: GPL-2.0-only
"""Issue 18 item 2: a route-based tunnel (an xfrm interface, what strongSwan's if_id_in and
if_id_out set up) on the fastpath, in the real kernel.

gw1: `ip link add ipsec0 type xfrm dev wan if_id 42`, the SAs and policies of the static tunnel
with `if_id 42`, and the route to the remote LAN through ipsec0 (no other policy covers the
flow: without the interface the kernel sends it in clear). gw2: the plain static ESP peer.
The controller runs on gw1. Flows are learned through the interface and offloaded both ways
(XDP's packet counters), traffic arrives intact and gw2 counts no XFRM error; then
`ip link set ipsec0 down` takes the flows off.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_datapath_redirect as R
from test_vm_datapath import xfrm_stat

from testbed.bed import Testbed
from testbed.static_esp import install_static_esp

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]
N_PACKETS = 20
IF_ID = 42
GW2_ERRORS = ("XfrmInError", "XfrmInStateSeqError", "XfrmInStateProtoError", "XfrmInNoStates")


def _wait_for(cond: Callable[[], Any], within: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(what())


def _install(bed: Testbed):  # -> StaticTunnel
    p = bed.plan
    tun = install_static_esp(bed, roles=("gw2",))
    # gw1: the same two SAs and three policies, each with if_id 42.
    for sa in (tun.out, tun.back):
        # fmt: off
        bed.ip(
            "gw1", "xfrm", "state", "add", "src", sa.src, "dst", sa.dst, "proto", "esp",
            "spi", f"{sa.spi:#010x}", "reqid", "1", "mode", "tunnel", "replay-window", "32",
            "aead", sa.aead, "0x" + sa.key.hex(), "128", "if_id", str(IF_ID),
        )
        # fmt: on
    for d, src, dst, t in (
        ("out", p["LAN_NET"], p["REMOTE_NET"], tun.out),
        ("in", p["REMOTE_NET"], p["LAN_NET"], tun.back),
        ("fwd", p["REMOTE_NET"], p["LAN_NET"], tun.back),
    ):
        # fmt: off
        bed.ip(
            "gw1", "xfrm", "policy", "add", "src", src, "dst", dst, "dir", d,
            "tmpl", "src", t.src, "dst", t.dst, "proto", "esp", "reqid", "1", "mode", "tunnel",
            "if_id", str(IF_ID),
        )
        # fmt: on
    bed.ip("gw1", "link", "add", "ipsec0", "type", "xfrm", "dev", "wan", "if_id", str(IF_ID))
    bed.ip("gw1", "link", "set", "ipsec0", "up")
    bed.ip("gw1", "route", "replace", p["REMOTE_NET"], "dev", "ipsec0")
    return tun


def test_xfrm_interface_tunnel_on_the_fastpath(bed: Testbed, tmp_path: Path) -> None:
    from controller.datapath.xdp import DEFAULT_PIN_DIR
    from testbed.supervisor import ControllerProcess

    pins_existed = DEFAULT_PIN_DIR.exists()
    tun = _install(bed)
    kernel_only = R.udp_echo(bed, 5)
    assert kernel_only["ok"] >= 4, f"the kernel carries the route-based tunnel: {kernel_only}"
    counters = tun.counters("gw1")
    assert counters[tun.out.spi].packets > 0, "the if_id SA sealed them (not sent clear)"
    stat_before = xfrm_stat(bed, "gw2")
    gw = ControllerProcess(bed, "gw1", tmp_path)
    try:
        gw.wait_started(900)
        first = R.udp_echo(bed, N_PACKETS)  # first packets teach the controller the flows
        assert first["ok"] >= N_PACKETS - 2, f"the tunnel carries: {first}"
        _wait_for(
            lambda: {f["direction"] for f in gw.flows()} >= {"encap", "decap"},
            30,
            lambda: f"flows learned through ipsec0 both ways: {gw.flows()} {gw.tail()}",
        )
        enc0, dec0 = gw.fastpath_packets("encap"), gw.fastpath_packets("decap")
        again = R.udp_echo(bed, N_PACKETS)
        assert again == {"ok": N_PACKETS, "bad": []}, f"on the fastpath, intact: {again}"
        enc = gw.fastpath_packets("encap") - enc0
        dec = gw.fastpath_packets("decap") - dec0
        assert enc >= N_PACKETS, f"XDP sealed the datagrams ({enc}): {gw.tail()}"
        assert dec >= N_PACKETS, f"XDP opened the echoes ({dec}): {gw.tail()}"
        sas = {int(s["spi"], 16): s for s in gw.sas()}
        assert sas[tun.out.spi]["offloaded"] and sas[tun.back.spi]["offloaded"], f"{sas}"

        bed.ip("gw1", "link", "set", "ipsec0", "down")
        _wait_for(
            lambda: not gw.flows(),
            15,
            lambda: f"ipsec0 down takes the flows off: {gw.flows()} {gw.tail()}",
        )
        enc1 = gw.fastpath_packets("encap")
        remote = bed.plan["REMOTE_HOST"]  # no route into the tunnel now: the kernel's to drop
        bed.cmd("lan", ["ping", "-n", "-q", "-c", "3", "-W", "1", remote], check=False, timeout=30)
        assert gw.fastpath_packets("encap") == enc1, "nothing sealed by XDP without ipsec0"
        assert not any(f["direction"] == "encap" for f in gw.flows()), "nor learned again"
    finally:
        rc = gw.stop()
        if not pins_existed:
            shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)
    assert rc == 0, f"SIGTERM: XDP detached, exit 0: {gw.tail()}"
    stat_after = xfrm_stat(bed, "gw2")
    errors = {k: stat_after.get(k, 0) - stat_before.get(k, 0) for k in GW2_ERRORS}
    assert not any(errors.values()), f"gw2: no XFRM error: {errors}"
