# SPDX-License-Identifier: GPL-2.0-only
"""The whole product on a real kernel: strongSwan on gw1 and gw2 (IKEv2, ChaCha20-Poly1305),
the controller on gw1. After the first packets, flows take XDP in both directions, every byte
arrives intact, the peer's kernel sees one forward-moving sequence (no replay, no ICV error);
local and firewalled traffic is never learned; a firewall change, an SA deletion and SIGTERM
take flows off the fastpath with the tunnel still working.

One test bed, tunnel and controller serve the whole module: the controller compiles four BPF
programs, which takes minutes under TCG."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.static_esp import parse_xfrm_state_stats
from controller.strongswan import have_strongswan, start_ike_tunnel
from controller.supervisor import ControllerProcess
from controller.testbed import Testbed

pytestmark = pytest.mark.vm

Rig = list  # [Testbed, IkeTunnel, ControllerProcess]
CONFIG = "[timers]\nidle_timeout = 300\nwatchdog = 5\n"
ECHO_PORT = 7000
BLOCKED_PORT = 7001

# A UDP and TCP echo server for the remote host: echoes every datagram and every stream.
ECHO_SERVER = r"""
import socket, sys, threading
port = int(sys.argv[1])
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", port))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", port)); t.listen(8)
def udp():
    while True:
        data, peer = u.recvfrom(65535); u.sendto(data, peer)
def tcp_one(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d: return
            c.sendall(d)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = t.accept(); threading.Thread(target=tcp_one, args=(c,), daemon=True).start()
"""

UDP_CLIENT = r"""
import hashlib, os, socket, sys
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1); s.connect((dst, port))
ok = 0
for i in range(n):
    payload = os.urandom(16 + (i * 37) % 1200)
    s.send(payload)
    try:
        ok += s.recv(65535) == payload
    except socket.timeout:
        pass
print(ok)
"""

TCP_CLIENT = r"""
import hashlib, os, socket, sys, threading
dst, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
data = os.urandom(size)
c = socket.create_connection((dst, port), timeout=30)
got = bytearray()
def reader():
    while len(got) < size:
        d = c.recv(65536)
        if not d: break
        got.extend(d)
r = threading.Thread(target=reader); r.start()
c.sendall(data); r.join(60); c.close()
print(hashlib.sha256(data).hexdigest() == hashlib.sha256(bytes(got)).hexdigest(), len(got))
"""


def wait_for(pred: Callable[[], Any], within: float, what: Callable[[], str] | str) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {within}s: {what() if callable(what) else what}")


@pytest.fixture(scope="module")
def rig(esp_kernel: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    ok, why = have_strongswan()
    if not ok:
        pytest.fail(why)
    work = tmp_path_factory.mktemp("rig")
    bed = Testbed(prefix=f"ctl{os.getpid()}-").build()
    ike = echo = None
    state: Rig = [bed, None, None]  # a list: the restart test swaps in its new controller
    try:
        ike = state[1] = start_ike_tunnel(bed, work / "ike")
        echo = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                bed.ns("remote"),
                sys.executable,
                "-c",
                ECHO_SERVER,
                str(ECHO_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert echo.stdout.readline().strip() == "ready", "echo server up"
        state[2] = ControllerProcess(bed, "gw1", work, CONFIG)
        state[2].wait_started(900)
        yield state
    finally:
        if state[2] is not None:
            state[2].stop()
        if echo is not None:
            echo.kill()
            echo.wait()
        if ike is not None:
            ike.stop()
        bed.destroy()


# Inbound errors a wrong sequence, IV or key would cause at the peer (net/xfrm/xfrm_input.c):
# replay/sequence, ICV (proto error), unknown SPI, bad header, invalid state.
PEER_ERRORS = (
    "XfrmInStateSeqError",
    "XfrmInStateProtoError",
    "XfrmInNoStates",
    "XfrmInHdrError",
    "XfrmInStateInvalid",
    "XfrmInError",
)


def peer_errors(bed: Testbed) -> dict[str, int]:
    """gw2's inbound XFRM error counters (/proc/net/xfrm_stat is per namespace): must stay 0."""
    text = bed.cmd("gw2", ["cat", "/proc/net/xfrm_stat"]).stdout
    stats = {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}
    return {k: stats.get(k, 0) for k in PEER_ERRORS if stats.get(k, 0)}


def diag(gw: ControllerProcess) -> str:
    """What the controller saw (per-reason counters, flows, SAs) and its log: for failures."""
    parts = [gw.cli(cmd).stdout for cmd in ("status", "flows", "sas")]
    return "\n".join([*parts, gw.tail(3000)])


def udp_echo(bed: Testbed, n: int, port: int = ECHO_PORT) -> int:
    out = bed.cmd(
        "lan",
        [sys.executable, "-c", UDP_CLIENT, bed.addr("REMOTE_HOST"), str(port), str(n)],
        timeout=n * 2 + 30,
    ).stdout
    return int(out.strip() or 0)


def test_flows_take_the_fastpath_both_ways_intact(
    rig: Rig,
) -> None:
    bed, ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    enc0, dec0 = gw.fastpath_packets("encap"), gw.fastpath_packets("decap")

    assert bed.ping("lan", remote, count=30), f"ICMP: every echo answered\n{diag(gw)}"
    got = udp_echo(bed, 200)
    assert got == 200, (
        f"UDP: all 200 datagrams (16..1215 B) came back intact, not {got}\n{diag(gw)}"
    )
    tcp = bed.cmd(
        "lan",
        [sys.executable, "-c", TCP_CLIENT, remote, str(ECHO_PORT), str(2_000_000)],
        timeout=300,
    ).stdout.split()
    assert tcp and tcp[0] == "True", f"TCP: 2 MB echoed byte for byte: {tcp}\n{diag(gw)}"

    flows = gw.flows()
    dirs = {(f["direction"], f["proto"]) for f in flows}
    for want in (("encap", 1), ("decap", 1), ("encap", 17), ("decap", 17)):
        assert want in dirs, f"learned {want}: {flows}\n{gw.tail()}"
    enc = gw.fastpath_packets("encap") - enc0
    dec = gw.fastpath_packets("decap") - dec0
    # The kernel carries the first packet(s) of each flow; XDP the rest.
    assert enc >= 30 + 200 - 10, f"encap fastpath packets {enc}: most of the traffic"
    assert dec >= 30 + 200 - 10, f"decap fastpath packets {dec}: most of the traffic"
    assert not peer_errors(bed), f"gw2 saw no replay, sequence or ICV errors: {peer_errors(bed)}"

    # The kernel's SA lifetime counters and strongSwan include what XDP carried (NEWAE sync).
    child = next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))
    spi_out, spi_in = int(child["spi-out"], 16), int(child["spi-in"], 16)

    def kernel_counts() -> tuple[int, int] | None:
        k = parse_xfrm_state_stats(bed.ip("gw1", "-s", "xfrm", "state").stdout)
        got = (k[spi_out].packets, k[spi_in].packets)
        return got if got[0] >= enc and got[1] >= dec else None

    k_out, k_in = wait_for(kernel_counts, 5, lambda: f"kernel counters include XDP's: {enc} {dec}")
    child = next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))
    swan_out, swan_in = int(child["packets-out"]), int(child["packets-in"])
    assert swan_out >= enc and swan_in >= dec, (
        f"strongSwan counts the fastpath's packets: out {swan_out} >= {enc}, in {swan_in} >= {dec}"
    )
    print(
        f"\nfastpath encap {enc} decap {dec}; kernel SA counters (XDP included) out {k_out} "
        f"in {k_in}; strongSwan out {swan_out} in {swan_in}"
    )


def test_kernel_path_packets_share_the_sequence(
    rig: Rig,
) -> None:
    """New flows (kernel path, renumbered by tc_reseq) interleaved with fastpath traffic."""
    bed, _ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    for i in range(15):
        # A new UDP flow each round (new source port: its first packet is the kernel's) ...
        got = bed.cmd(
            "lan", [sys.executable, "-c", UDP_CLIENT, remote, str(ECHO_PORT), "3"], timeout=30
        ).stdout.strip()
        assert got == "3", f"round {i}: new flow's datagrams all echoed ({got})"
        # ... and the established ICMP flow on the fastpath in between.
        assert bed.ping("lan", remote, count=3), f"round {i}: fastpath ICMP answered"
    assert not peer_errors(bed), f"one forward-moving sequence at gw2: {peer_errors(bed)}"
    reseq = [line for line in gw.tail().splitlines() if "ERROR" in line]
    assert not reseq, f"no errors in the controller log: {reseq}"


def _esp_from_pcap(path: Path) -> list[tuple[int, int, bytes, bytes]]:
    """(spi, seq, iv, rest) of every IPv4 ESP packet in a classic little-endian pcap of an
    Ethernet link (what tcpdump -w writes)."""
    data = path.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data, 0)
    assert magic == 0xA1B2C3D4 and linktype == 1, f"pcap of an Ethernet link: {magic:x}"
    out, off = [], 24
    while off + 16 <= len(data):
        _, _, caplen, _ = struct.unpack_from("<IIII", data, off)
        frame = data[off + 16 : off + 16 + caplen]
        off += 16 + caplen
        if len(frame) < 14 + 20 + 16 or frame[12:14] != b"\x08\x00" or frame[23] != 50:
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from(">H", frame, 16)[0]
        esp = frame[14 + ihl : 14 + total]
        spi, seq = struct.unpack_from(">II", esp, 0)
        out.append((spi, seq, esp[8:16], esp[16:]))
    return out


# A paced UDP stream with one 5-tuple (fixed source port): each datagram carries its send time
# (CLOCK_MONOTONIC, shared by every process in the VM); prints the send times of the datagrams
# whose echo came back, as JSON. Used to see the last packet a path carried.
STREAM_PORT = 40123
STREAM = r"""
import json, socket, struct, sys, threading, time
dst, (port, sport), (secs, gap) = sys.argv[1], map(int, sys.argv[2:4]), map(float, sys.argv[4:6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", sport)); s.connect((dst, port)); s.settimeout(0.2)
echoed, sent, stop = [], 0, time.monotonic() + secs
def rx():
    while time.monotonic() < stop + 1.0:
        try:
            echoed.append(struct.unpack("!d", s.recv(2048)[:8])[0])
        except (socket.timeout, ConnectionRefusedError):
            pass
r = threading.Thread(target=rx); r.start()
while time.monotonic() < stop:
    try:
        s.send(struct.pack("!d", time.monotonic()) + bytes(56)); sent += 1
    except OSError:
        pass  # no route while a link is down: the datagram is lost either way
    time.sleep(gap)
r.join()
print(json.dumps({"sent": sent, "echoed": echoed}))
"""


def start_stream(
    bed: Testbed, sport: int, secs: float, gap: float, cpu: int | None = None
) -> subprocess.Popen[str]:
    """STREAM from the LAN host to the echo server (pinned to `cpu` if given)."""
    pin = ["taskset", "-c", str(cpu)] if cpu is not None else []
    argv = [sys.executable, "-c", STREAM, bed.addr("REMOTE_HOST"), str(ECHO_PORT), str(sport)]
    return subprocess.Popen(
        ["ip", "netns", "exec", bed.ns("lan"), *pin, *argv, str(secs), str(gap)],
        stdout=subprocess.PIPE,
        text=True,
    )


def encap_hits_per_cpu() -> list[int]:
    """XDP encap hits on each CPU, from the controller's pinned per-CPU counters."""
    import ctypes

    from bcc import libbcc

    from controller import defs
    from controller.datapath import DEFAULT_PIN_DIR, MapHandle

    fd = libbcc.lib.bpf_obj_get(f"{DEFAULT_PIN_DIR}/xfp_stats".encode())
    assert fd >= 0, "the controller's pinned counters"
    try:
        h = MapHandle(fd, ctypes.c_uint32, defs.Stat, "xfp_stats", percpu=True)
        per_cpu = h.get(ctypes.c_uint32(defs.stat_index(defs.Dir.ENCAP, defs.Reason.ENCAP_OK)))
        return [s.packets for s in per_cpu or []]
    finally:
        os.close(fd)


SOAK_S = 60

# A new UDP flow every second (a fresh socket: a new source port), two datagrams each, whose
# first packets take the kernel path; prints {"flows": N, "echoed": M}.
NEW_FLOWS = r"""
import json, socket, sys, time
dst, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
flows = echoed = 0
stop = time.monotonic() + secs
while time.monotonic() < stop:
    t = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1.0); s.connect((dst, port))
        for i in range(2):
            s.send(b"new flow %d/%d" % (flows, i))
            try:
                echoed += s.recv(2048).startswith(b"new flow")
            except socket.timeout:
                pass
    flows += 1
    time.sleep(max(0.0, 1.0 - (time.monotonic() - t)))
print(json.dumps({"flows": flows, "echoed": echoed}))
"""


def test_soak_both_cpus_one_sequence_unique_ivs_and_decrypts(rig: Rig, tmp_path: Path) -> None:
    """Issue 5, acceptance 1: for a minute, a new flow every second (its first packets built
    by the kernel and renumbered at TC) interleaved with two fastpath streams, one sender
    pinned to each CPU, all on one SA. The peer reports no replay, sequence or ICV error, XDP
    ran on both CPUs, and a capture of gw1's ESP on the WAN shows every (SPI, sequence) and
    every IV once, and every packet decrypts and authenticates with the SA's key."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from controller.xfrm import XfrmSocket

    bed, ike, _gw = rig
    remote = bed.addr("REMOTE_HOST")
    pcap = tmp_path / "wan.pcap"
    dump = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns("gw2"), "tcpdump", "-n", "-U", "-Z", "root",
         "-i", "wan", "-w", str(pcap), "esp"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    streams: list[subprocess.Popen[str]] = []
    try:
        assert dump.stderr is not None and "listening" in dump.stderr.readline(), "tcpdump up"
        hits0 = encap_hits_per_cpu()
        streams = [start_stream(bed, 40201 + cpu, SOAK_S, 0.01, cpu=cpu) for cpu in (0, 1)]
        flows = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns("lan"), sys.executable, "-c", NEW_FLOWS, remote,
             str(ECHO_PORT), str(SOAK_S)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        streams.append(flows)
        new_flows = json.loads(flows.communicate(timeout=SOAK_S + 60)[0])
        streams.remove(flows)
        results = [json.loads(p.communicate(timeout=60)[0]) for p in streams]
        hits = [a - b for a, b in zip(encap_hits_per_cpu(), hits0, strict=True)]
    finally:
        for p in streams:
            if p.poll() is None:
                p.kill()
                p.wait()
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=60)
    assert not peer_errors(bed), f"gw2: no replay, sequence or ICV errors: {peer_errors(bed)}"
    assert len(hits) >= 2 and all(h > 100 for h in hits), f"XDP encap on both CPUs: {hits}"
    for r in results:
        assert len(r["echoed"]) >= 0.9 * r["sent"], f"the streams got through: {r['sent']} sent"
    assert new_flows["flows"] >= SOAK_S * 0.8, f"a new flow about every second: {new_flows}"
    # (an echo later than the script's 1 s wait counts as missing: emulation can be that slow)
    assert new_flows["echoed"] >= 0.95 * 2 * new_flows["flows"], f"new flows answered: {new_flows}"

    child = next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))
    spi_out = int(child["spi-out"], 16)
    with XfrmSocket(bed.ns("gw2")) as x:
        sa = x.get_sa(bed.addr("GW2_WAN"), spi_out)
    assert sa is not None, "gw2 has gw1's outbound SA"
    blob = sa.key.reveal()
    aead, salt = ChaCha20Poly1305(blob[:32]), blob[32:36]
    pkts = [p for p in _esp_from_pcap(pcap) if p[0] == spi_out]
    # tcpdump misses some under emulation; uniqueness and authenticity are the point.
    assert len(pkts) >= 1000, f"captured gw1's ESP: {len(pkts)} packets"
    seqs = [seq for _, seq, _, _ in pkts]
    ivs = [iv for _, _, iv, _ in pkts]
    assert len(set(seqs)) == len(seqs), "no sequence number sent twice"
    assert len(set(ivs)) == len(ivs), "no IV sent twice under the key (no nonce reuse)"
    for spi, seq, iv, rest in pkts:
        aad = struct.pack(">II", spi, seq)
        inner = aead.decrypt(salt + iv, rest, aad)  # raises InvalidTag if not authentic
        assert inner[-1] == 4, "next header: IPv4 (tunnel mode)"
    sent = sum(r["sent"] for r in results)
    echoed = sum(len(r["echoed"]) for r in results)
    print(
        f"\nsoak {SOAK_S} s: {new_flows['flows']} new flows (kernel path) among {sent} stream "
        f"datagrams ({echoed} echoed); XDP encap per CPU {hits}; WAN capture {len(pkts)} ESP "
        f"packets of SA 0x{spi_out:08x}: sequence numbers and IVs unique, every packet authentic; "
        "peer errors none"
    )


def test_local_traffic_is_never_learned(rig: Rig) -> None:
    bed, _ike, gw = rig
    before = {(f["saddr"], f["daddr"]) for f in gw.flows()}
    assert bed.ping("lan", bed.addr("GW1_LAN"), count=3), "gw1 answers on its LAN address"
    assert bed.ping("remote", bed.addr("GW1_LAN"), count=3), "gw1 answers through the tunnel"
    time.sleep(0.5)  # give a (wrong) learn event time to arrive; nothing to poll for
    after = {(f["saddr"], f["daddr"]) for f in gw.flows()}
    local = {p for p in after - before if bed.addr("GW1_LAN") in p}
    assert not local, f"traffic to gw1 itself was never learned: {local}"


def test_firewall_change_flushes_and_dropped_flows_are_not_learned(
    rig: Rig,
) -> None:
    bed, _ike, gw = rig
    assert udp_echo(bed, 5) == 5, "warm: the echo flow is learned"
    assert gw.flows(), "some flows on the fastpath before the rule"
    rules = (
        "table inet xfp_test {\n"
        "  chain forward_filter {\n"
        "    type filter hook forward priority 0;\n"
        f"    udp dport {BLOCKED_PORT} drop\n"
        "  }\n"
        "}\n"
    )
    t0 = time.monotonic()
    bed.cmd("gw1", ["nft", "-f", "-"], input=rules)
    try:
        wait_for(lambda: not gw.flows(), 5, "a ruleset change flushes every learned flow")
        flush_ms = (time.monotonic() - t0) * 1e3
        assert udp_echo(bed, 5, port=BLOCKED_PORT) == 0, "the dropped flow gets nothing through"
        assert not [f for f in gw.flows() if f["dport"] == BLOCKED_PORT], (
            "a flow the firewall drops is never learned"
        )
        assert udp_echo(bed, 5) == 5, "other flows still pass (and are learned again)"
        print(f"\nnftables change -> flows removed: {flush_ms:.0f} ms (observed by polling)")
    finally:
        bed.cmd("gw1", ["nft", "delete", "table", "inet", "xfp_test"], check=False)


def test_route_neighbour_and_link_changes_take_flows_off(rig: Rig) -> None:
    """Each change the proof of a flow rested on removes the flows that relied on it: a route
    change (every flow), the next hop's neighbour entry (the encap flows through it), a link
    going down (the flows entering or leaving it). Time from the change to the flows leaving
    the table, read from the status file (written every 0.2 s, which bounds the resolution)."""
    bed, _ike, gw = rig
    p = bed.plan
    gw2_mac = bed.iface("gw2", "wan").mac
    timings: dict[str, float] = {}

    def flows() -> list[dict[str, Any]]:
        return gw.published_status()["flows"]

    def gone(what: str, change: Callable[[], None], left: Callable[[dict], bool]) -> None:
        assert udp_echo(bed, 5) == 5, f"{what}: traffic before"
        wait_for(lambda: any(left(f) for f in flows()), 10, f"{what}: flows learned")
        t0 = time.monotonic()
        change()
        wait_for(lambda: not any(left(f) for f in flows()), 10, f"{what}: flows removed")
        timings[what] = (time.monotonic() - t0) * 1e3

    more_specific = (f"{p['REMOTE_HOST']}/32", "via", p["GW2_WAN"], "dev", "wan")
    try:
        gone("route added", lambda: bed.ip("gw1", "route", "add", *more_specific), lambda f: True)
    finally:
        bed.ip("gw1", "route", "del", *more_specific, check=False)

    def neigh(mac: str) -> None:
        bed.ip("gw1", "neigh", "replace", p["GW2_WAN"], "lladdr", mac, "dev", "wan",
               "nud", "permanent")  # fmt: skip

    try:
        gone("neighbour changed", lambda: neigh("02:00:00:00:00:99"),
             lambda f: f["direction"] == "encap")  # fmt: skip
    finally:
        neigh(gw2_mac)
    lan_if = bed.ifindex("gw1", "lan")

    def lan_down() -> None:
        bed.ip("gw1", "link", "set", "lan", "down")

    try:
        gone("link down", lan_down,
             lambda f: lan_if in (f["ifindex"], f["egress_ifindex"]))  # fmt: skip
    finally:
        bed.ip("gw1", "link", "set", "lan", "up")
    wait_for(lambda: bed.ping("lan", p["REMOTE_HOST"], count=1), 20, "the path is back")
    assert udp_echo(bed, 10) == 10, "flows learned again after the changes"
    assert not peer_errors(bed), f"no peer errors: {peer_errors(bed)}"
    print(
        "\ninvalidation (change -> flows out of the table, via the status file): "
        + ", ".join(f"{k} {v:.0f} ms" for k, v in timings.items())
    )


def test_sas_command_reports_each_sa(rig: Rig) -> None:
    bed, _ike, gw = rig
    # An AES-GCM SA beside the tunnel's: the fastpath must say why it will not serve it.
    bed.ip(
        "gw1",
        "xfrm",
        "state",
        "add",
        "src",
        bed.addr("GW2_WAN"),
        "dst",
        bed.addr("GW1_WAN"),
        "proto",
        "esp",
        "spi",
        "0x0badbeef",
        "mode",
        "tunnel",
        "aead",
        "rfc4106(gcm(aes))",
        "0x" + "11" * 20,
        "128",
    )
    try:

        def listed() -> list[dict[str, Any]]:
            r = gw.cli("sas", "--json")
            sas = json.loads(r.stdout) if r.returncode == 0 else []
            return [s for s in sas if s["spi"] == "0x0badbeef"]

        gcm = wait_for(listed, 10, "the AES-GCM SA is listed")[0]
        assert gcm["offloaded"] is False and "rfc4106" in gcm["reason"], f"reason given: {gcm}"
        chacha = [s for s in json.loads(gw.cli("sas", "--json").stdout) if s["offloaded"]]
        assert chacha, "the tunnel's SAs are offloaded"
        assert "11111111" not in gw.cli("sas", "--json").stdout, "no key material in output"
    finally:
        bed.ip(
            "gw1",
            "xfrm",
            "state",
            "delete",
            "src",
            bed.addr("GW2_WAN"),
            "dst",
            bed.addr("GW1_WAN"),
            "proto",
            "esp",
            "spi",
            "0x0badbeef",
            check=False,
        )


def test_rekey_moves_flows_to_the_new_sa(rig: Rig) -> None:
    """IKEv2 CHILD_SA rekey (make-before-break) while flows run: flows leave the old SAs,
    are re-learned onto the new ones, no datagram is lost, the old SAs are let go."""
    from controller.strongswan import CHILD

    bed, ike, gw = rig
    assert udp_echo(bed, 20) == 20, "warm"
    old = {s["spi"] for s in gw.sas() if s["offloaded"]}
    assert len(old) == 2, f"both directions offloaded before the rekey: {gw.sas()}"
    t0 = time.monotonic()
    ike.gw1.swanctl("--rekey", "--child", CHILD["gw1"])
    got = udp_echo(bed, 100)
    assert got == 100, f"no datagram lost to the rekey ({got}/100)\n{diag(gw)}"

    def moved() -> set[str] | None:
        sas = gw.sas()
        now = {s["spi"] for s in sas if s["offloaded"]}
        # the old SAs gone from the kernel (strongSwan deletes them) and from the fastpath
        left = {s["spi"] for s in sas} & old
        return now if len(now) == 2 and not now & old and not left else None

    def traffic_and_moved() -> set[str] | None:
        udp_echo(bed, 3)
        return moved()

    new = wait_for(traffic_and_moved, 60, lambda: f"flows on the new SAs: {diag(gw)}")
    took = time.monotonic() - t0
    assert udp_echo(bed, 50) == 50, "the new SAs carry the flows"
    assert not peer_errors(bed), f"no replay or ICV errors across the rekey: {peer_errors(bed)}"
    print(f"\nrekey: {sorted(old)} -> {sorted(new)}, flows moved within {took:.1f} s")


def test_kill_9_watchdog_then_restart_resumes(rig: Rig) -> None:
    """kill -9: XDP stops using the SAs at the watchdog, the kernel carries on (its packets
    renumbered from XDP's counter), the peer sees no replay; a restarted controller hands the
    pinned SAs back, starts clean and offloads again."""
    bed, _ike, gw = rig
    assert udp_echo(bed, 20) == 20 and gw.fastpath_packets("encap") > 0, "on the fastpath"
    gw.proc.kill()
    gw.proc.wait(timeout=30)
    got = udp_echo(bed, 30)  # across the watchdog (5 s): XDP first, then the kernel
    time.sleep(6)
    after = udp_echo(bed, 20)
    assert (got, after) == (30, 20), f"traffic through and after the watchdog: {got}, {after}"
    assert not peer_errors(bed), f"no replay or ICV errors after kill -9: {peer_errors(bed)}"

    work = gw.log.parent / "restart"
    work.mkdir()
    fresh = ControllerProcess(bed, "gw1", work, CONFIG)
    rig[2] = fresh
    fresh.wait_started(900)
    assert "recovered" in fresh.tail(), f"pinned state handed back: {fresh.tail()}"
    enc0 = fresh.fastpath_packets("encap")
    assert udp_echo(bed, 100) == 100, f"the tunnel carries on\n{diag(fresh)}"
    # The first echoes cross on the kernel path while the flow is learned (tens of ms here).
    assert fresh.fastpath_packets("encap") - enc0 >= 50, f"offloaded again\n{diag(fresh)}"
    assert not peer_errors(bed), f"no replay errors after the restart: {peer_errors(bed)}"


def test_sigterm_hands_back_and_tunnel_carries_on(
    rig: Rig,
) -> None:
    bed, _ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    assert bed.ping("lan", remote, count=10), "fastpath traffic before stopping"
    rc = gw.stop()
    assert rc == 0, f"SIGTERM: clean exit, not {rc}: {gw.tail()}"
    links = bed.ip("gw1", "-d", "link", "show").stdout
    assert "prog/xdp" not in links, "XDP detached"
    assert "handed back" in gw.log.read_text(), "sequence handed back to the kernel"
    assert bed.ping("lan", remote, count=10), "the kernel path carries the tunnel on"
    assert udp_echo(bed, 20) == 20, "UDP too"
    assert not peer_errors(bed), f"no replay errors at gw2 after the hand-back: {peer_errors(bed)}"
