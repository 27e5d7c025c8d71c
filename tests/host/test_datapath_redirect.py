# SPDX-License-Identifier: GPL-2.0-only
"""A full XDP-to-XDP tunnel in the namespace test bed: gw1 and gw2 each run encap on `lan` and
decap on `wan`, with mirror SAs and flows written by the test. This host's kernel has no ESP,
so UDP between the lan host and the remote host only gets through if both XDP programs on both
gateways encrypt, decrypt and redirect correctly; counters and echoed payloads prove it.

veth delivers an XDP-redirected frame only when the receiving peer runs an XDP program (or has
GRO on), so the end hosts' eth0 get a program that passes everything. And the end hosts send
with checksum offload off: veth hands their UDP over as CHECKSUM_PARTIAL (checksum field holding
only the pseudo-header sum, to be completed "by the NIC"), and a frame that XDP redirects is no
longer an skb, so nothing would ever complete it -- the receiver counts UdpInErrors. A physical
NIC always delivers complete checksums; a veth carrying locally generated traffic does not (a
limit of XDP on veth, noted in the datapath's documentation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.xdp import (
    Datapath,
    DatapathError,
    InboundSa,
    OutboundSa,
    flow_key,
    flow_val,
)
from testbed.bed import Testbed

KEY_A = bytes(range(1, 37))  # gw1 -> gw2
KEY_B = bytes(range(101, 137))  # gw2 -> gw1
SPI_A, SPI_B = 0xA0000001, 0xB0000002
UDP_LAN_PORT, UDP_REMOTE_PORT = 41000, 42000
N_PACKETS = 40


@pytest.fixture(scope="module")
def gateways() -> Iterator[tuple[Datapath, Datapath]]:
    """Both gateways' datapaths, compiled once for the module (own pins each)."""
    dps = (
        Datapath(pin_dir=f"/sys/fs/bpf/xfp-redir-{os.getpid()}-gw1"),
        Datapath(pin_dir=f"/sys/fs/bpf/xfp-redir-{os.getpid()}-gw2"),
    )
    try:
        for d in dps:
            d.load()
        yield dps
    finally:
        for d in dps:
            d.close()
            d.unpin()


@pytest.fixture(scope="module")
def xdp_pass():
    """A program that passes everything, for the veth peers of redirect targets."""
    from controller.datapath.loader import Prog, compile_bpf, load_program

    b = compile_bpf(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    return load_program(b, "xdp_pass", Prog.XDP)


def _clear(d: Datapath) -> None:
    for name in ("flows", "sa_out", "sa_in", "watchdog"):
        for key in list(d.maps[name].keys()):
            d.maps[name].delete(key)


def configure(bed: Testbed, d: Datapath, me: str, peer: str) -> None:
    """SAs and flows of one gateway, as the controller would write them after validating the
    kernel's policy, SA, route and neighbour."""
    _clear(d)
    ns = bed.ns(me)
    lan_if, wan_if = bed.ifindex(me, "lan"), bed.ifindex(me, "wan")
    d.put_tx_port(lan_if, netns=ns)
    d.put_tx_port(wan_if, netns=ns)
    my_wan, peer_wan = bed.iface(me, "wan"), bed.iface(peer, "wan")
    my_lan = bed.iface(me, "lan")
    if me == "gw1":
        local_host, far_host = bed.iface("lan", "eth0"), bed.iface("remote", "eth0")
        out_key, out_spi, in_key, in_spi = KEY_A, SPI_A, KEY_B, SPI_B
        local_port, far_port = UDP_LAN_PORT, UDP_REMOTE_PORT
    else:
        local_host, far_host = bed.iface("remote", "eth0"), bed.iface("lan", "eth0")
        out_key, out_spi, in_key, in_spi = KEY_B, SPI_B, KEY_A, SPI_A
        local_port, far_port = UDP_REMOTE_PORT, UDP_LAN_PORT
    d.put_outbound_sa(
        OutboundSa(
            sa_id=1,
            spi=out_spi,
            saddr=my_wan.addr,
            daddr=peer_wan.addr,
            key=out_key,
            egress_ifindex=wan_if,
            dmac=peer_wan.mac,
            smac=my_wan.mac,
            mtu=1500,
        )
    )
    d.put_inbound_sa(
        InboundSa(sa_id=2, spi=in_spi, saddr=peer_wan.addr, daddr=my_wan.addr, key=in_key)
    )
    udp = 17
    d.put_flow(
        flow_key(
            lan_if, Direction.ENCAP, udp, local_host.addr, far_host.addr, local_port, far_port
        ),
        flow_val(1),
    )
    d.put_flow(
        flow_key(
            wan_if, Direction.DECAP, udp, far_host.addr, local_host.addr, far_port, local_port
        ),
        flow_val(2, egress_ifindex=lan_if, dmac=local_host.mac, smac=my_lan.mac, mtu=1500),
    )


# The server waits FIRST_WAIT_S for the first datagram: the client is another interpreter started
# through `ip netns exec`, which under qemu TCG on a loaded machine can take longer than the 15 s
# allowed between datagrams (a server gone before the client's first datagram made every one
# "no echo" in the VM suite, the tunnel not involved). Both run with -I -S: stdlib only, no
# virtualenv site to import.
FIRST_WAIT_S = 120
SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(float(sys.argv[4]))
    print("ready", flush=True)
    echoed = 0
    try:
        for _ in range(int(sys.argv[3])):
            data, peer = s.recvfrom(65535)
            s.settimeout(15)
            s.sendto(data, peer)
            echoed += 1
    finally:
        print(f"server echoed {echoed}", file=sys.stderr, flush=True)
""")

CLIENT = textwrap.dedent("""
    import json, os, socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((sys.argv[1], int(sys.argv[2])))
    s.settimeout(2)
    dst = (sys.argv[3], int(sys.argv[4]))
    ok, bad = 0, []
    for i in range(int(sys.argv[5])):
        payload = os.urandom((i * 97) % 1400 + 1)
        s.sendto(payload, dst)
        try:
            echo, _ = s.recvfrom(65535)
        except socket.timeout:
            bad.append(f"{i}: no echo")
            continue
        if echo == payload:
            ok += 1
        else:
            bad.append(f"{i}: echo differs ({len(echo)} vs {len(payload)} bytes)")
    print(json.dumps({"ok": ok, "bad": bad}), flush=True)
""")


def udp_echo(bed: Testbed, n: int) -> dict:
    lan, remote = bed.iface("lan", "eth0"), bed.iface("remote", "eth0")
    server = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns("remote"), sys.executable, "-I", "-S", "-c", SERVER,
         remote.addr, str(UDP_REMOTE_PORT), str(n), str(FIRST_WAIT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout.readline().strip() == "ready", "UDP echo server started"
        client = bed.cmd(
            "lan",
            [sys.executable, "-I", "-S", "-c", CLIENT, lan.addr, str(UDP_LAN_PORT), remote.addr,
             str(UDP_REMOTE_PORT), str(n)],
            timeout=60 + 2 * n,
        )  # fmt: skip
        result = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        if server.poll() is None:
            server.kill()
        _, err = server.communicate(timeout=10)
    if result["bad"]:  # in a failing test's captured output: how far the server got
        print(f"UDP echo server on {remote.addr}: {err.strip()[-500:]}", file=sys.stderr)
    return result


def test_xdp_to_xdp_tunnel_carries_udp_both_ways(
    bed: Testbed, gateways: tuple[Datapath, Datapath], xdp_pass
) -> None:
    from bcc import BPF

    from controller.netns import in_netns

    gw1, gw2 = gateways
    configure(bed, gw1, "gw1", "gw2")
    configure(bed, gw2, "gw2", "gw1")
    hosts = [("lan", "eth0"), ("remote", "eth0")]
    try:
        gw1.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw1"))
        gw2.attach(lan=["lan"], wan=["wan"], netns=bed.ns("gw2"))
        for role, dev in hosts:
            with in_netns(bed.ns(role)):
                BPF.attach_xdp(dev.encode(), xdp_pass, 0)
        before = (gw1.stats(), gw2.stats())
        result = udp_echo(bed, N_PACKETS)
        after = (gw1.stats(), gw2.stats())
    finally:
        for role, dev in hosts:
            with in_netns(bed.ns(role)):
                BPF.remove_xdp(dev.encode(), 0)
        gw1.detach_all()
        gw2.detach_all()

    def moved(i: int, d: Direction, r: Reason) -> int:
        return after[i][(d, r)][0] - before[i][(d, r)][0]

    deltas = [
        {f"{d.name}/{r.name}": moved(i, d, r) for (d, r) in after[i] if moved(i, d, r)}
        for i in (0, 1)
    ]
    assert result == {"ok": N_PACKETS, "bad": []}, f"every datagram echoed intact: {result}"
    for i, name in enumerate(("gw1", "gw2")):
        assert moved(i, Direction.ENCAP, Reason.ENCAP_OK) == N_PACKETS, (
            f"{name}: XDP encapsulated all {deltas}"
        )
        assert moved(i, Direction.DECAP, Reason.DECAP_OK) == N_PACKETS, (
            f"{name}: XDP decapsulated all {deltas}"
        )
    # veth cuts XDP buffers to the frame (64-byte aligned): some sizes have no tailroom for
    # the ESP trailer and take the slide path in bpf/xdp_encap.c; none may be punted.
    for i in (0, 1):
        assert moved(i, Direction.ENCAP, Reason.PASS_NO_ROOM) == 0, (
            f"no punt for lack of room {deltas}"
        )
    sa = gw2.inbound_sa(SPI_A, bed.iface("gw2", "wan").addr)
    assert sa.seq_top == N_PACKETS, "gw2's window saw gw1's sequence 1..N"
    assert gw1.outbound_sa(1).seq == N_PACKETS + 1, "gw1's next sequence number"
    for role in ("gw1", "gw2"):
        assert "xdp" not in bed.ip(role, "link", "show", "dev", "lan").stdout, f"{role}: detached"


def test_attach_is_idempotent_and_transactional(
    bed: Testbed, gateways: tuple[Datapath, Datapath]
) -> None:
    gw1, _ = gateways
    ns = bed.ns("gw1")
    try:
        gw1.attach(lan=["lan"], wan=["wan"], netns=ns)
        gw1.attach(lan=["lan"], wan=["wan"], netns=ns)  # again: replaces in place, no error
        assert "xdp" in bed.ip("gw1", "link", "show", "dev", "lan").stdout, "attached"
        gw1.detach_all()
        with pytest.raises(DatapathError, match="no-such-dev"):
            gw1.attach(lan=["lan"], wan=["no-such-dev"], netns=ns)
        assert "xdp" not in bed.ip("gw1", "link", "show", "dev", "lan").stdout, (
            "the attach that succeeded before the failure was undone"
        )
    finally:
        gw1.detach_all()
