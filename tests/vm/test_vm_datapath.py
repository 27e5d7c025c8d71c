# SPDX-License-Identifier: GPL-2.0-only
"""Interop with the kernel's own ESP (needs a kernel with esp4 and rfc7539esp: the VM test bed).

gw2 runs static kernel ESP SAs (testbed/static_esp.py); gw1 runs no kernel ESP at all, only
the XDP datapath, configured with the same SPIs and keys:

- lan -> remote: XDP encap on gw1 builds the ESP; gw2's kernel must accept it (its `in`/`fwd`
  policy drops anything else), decrypt it and deliver to remote. Its SA counters move and
  /proc/net/xfrm_stat stays at zero.
- remote -> lan: gw2's kernel encrypts; XDP decap on gw1 authenticates, decrypts and delivers to
  lan (gw1's kernel could not: it has no SA).

    .venv/bin/python -m testbed.vmrun vm-only tests/vm/test_vm_datapath.py

The two programs are compiled once per module (BCC takes long under qemu TCG).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import test_datapath_redirect as R

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.xdp import Datapath, InboundSa, OutboundSa, flow_key, flow_val
from controller.netns import in_netns
from testbed.bed import Testbed
from testbed.static_esp import install_static_esp

# Two BCC compiles and ~250k verified instructions under qemu TCG take over 15 minutes.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(2100)]
N_PACKETS = 20


@pytest.fixture(scope="module")
def gw1_datapath(esp_kernel: None) -> Iterator[Datapath]:
    d = Datapath(pin_dir=f"/sys/fs/bpf/xfp-vm-{os.getpid()}")
    try:
        d.load()
        yield d
    finally:
        d.close()
        d.unpin()


@pytest.fixture(scope="module")
def xdp_pass(esp_kernel: None):
    from controller.datapath.loader import Prog, compile_bpf, load_program

    b = compile_bpf(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    return load_program(b, "xdp_pass", Prog.XDP)


def xfrm_stat(bed: Testbed, role: str) -> dict[str, int]:
    """/proc/net/xfrm_stat of a namespace (net/xfrm/xfrm_proc.c): every error counter."""
    out = bed.cmd(role, ["cat", "/proc/net/xfrm_stat"]).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


def test_xdp_gw1_interoperates_with_kernel_esp_on_gw2(
    bed: Testbed, gw1_datapath: Datapath, xdp_pass
) -> None:
    from bcc import BPF

    d = gw1_datapath
    tun = install_static_esp(bed, roles=("gw2",), replay_window=64)
    for key in list(d.maps["flows"].keys()):
        d.maps["flows"].delete(key)
    ns = bed.ns("gw1")
    lan_if, wan_if = bed.ifindex("gw1", "lan"), bed.ifindex("gw1", "wan")
    d.put_tx_port(lan_if, netns=ns)
    d.put_tx_port(wan_if, netns=ns)
    gw1_wan, gw2_wan = bed.iface("gw1", "wan"), bed.iface("gw2", "wan")
    lan_host, remote = bed.iface("lan", "eth0"), bed.iface("remote", "eth0")
    d.put_outbound_sa(
        OutboundSa(
            sa_id=1,
            spi=tun.out.spi,
            saddr=gw1_wan.addr,
            daddr=gw2_wan.addr,
            key=tun.out.key,
            egress_ifindex=wan_if,
            dmac=gw2_wan.mac,
            smac=gw1_wan.mac,
        )
    )
    d.put_inbound_sa(
        InboundSa(
            sa_id=2, spi=tun.back.spi, saddr=gw2_wan.addr, daddr=gw1_wan.addr, key=tun.back.key
        )
    )
    udp = 17
    lp, rp = R.UDP_LAN_PORT, R.UDP_REMOTE_PORT
    d.put_flow(
        flow_key(lan_if, Direction.ENCAP, udp, lan_host.addr, remote.addr, lp, rp), flow_val(1)
    )
    d.put_flow(
        flow_key(wan_if, Direction.DECAP, udp, remote.addr, lan_host.addr, rp, lp),
        flow_val(2, egress_ifindex=lan_if, dmac=lan_host.mac, smac=bed.iface("gw1", "lan").mac),
    )
    # Receivers of XDP-redirected frames on veth need an XDP program: gw2's wan (ESP from gw1's
    # encap) and the lan host's eth0 (clear from gw1's decap).
    peers = [("gw2", "wan"), ("lan", "eth0")]
    stat_before = xfrm_stat(bed, "gw2")
    try:
        d.attach(lan=["lan"], wan=["wan"], netns=ns)
        for role, dev in peers:
            with in_netns(bed.ns(role)):
                BPF.attach_xdp(dev.encode(), xdp_pass, 0)
        before = d.stats()
        result = R.udp_echo(bed, N_PACKETS)
        after = d.stats()
    finally:
        for role, dev in peers:
            with in_netns(bed.ns(role)):
                BPF.remove_xdp(dev.encode(), 0)
        d.detach_all()

    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert result == {"ok": N_PACKETS, "bad": []}, (
        f"every datagram echoed intact: {result}; gw1 XDP counters moved {moved}; gw2 SAs "
        f"{tun.counters('gw2')}; gw2 XFRM {xfrm_stat(bed, 'gw2')}"
    )
    assert moved.get((Direction.ENCAP, Reason.ENCAP_OK)) == N_PACKETS, f"XDP encapsulated: {moved}"
    assert moved.get((Direction.DECAP, Reason.DECAP_OK)) == N_PACKETS, f"XDP decapsulated: {moved}"
    counters = tun.counters("gw2")
    assert counters[tun.out.spi].packets == N_PACKETS, (
        f"gw2's kernel accepted every XDP-built packet: {counters}"
    )
    assert counters[tun.back.spi].packets == N_PACKETS, f"gw2's kernel sent the echoes: {counters}"
    stat_after = xfrm_stat(bed, "gw2")
    errors = {
        k: v - stat_before.get(k, 0) for k, v in stat_after.items() if v != stat_before.get(k, 0)
    }
    assert errors == {}, f"no XFRM error counter moved on gw2: {errors}"
    sa = d.inbound_sa(tun.back.spi, gw1_wan.addr)
    assert sa.seq_top == N_PACKETS, f"gw1's window followed the kernel's sequence: {sa.seq_top}"
