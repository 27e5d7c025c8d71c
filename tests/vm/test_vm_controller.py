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
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.ike import have_strongswan, start_ike_tunnel
from testbed.static_esp import parse_xfrm_state_stats
from testbed.supervisor import ControllerProcess

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
import os, socket, struct, sys, time
dst, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((dst, port))
ok, late, lost = 0, 0, []
for i in range(n):
    payload = struct.pack("!I", i) + os.urandom(12 + (i * 37) % 1200)
    s.send(payload)
    deadline = time.monotonic() + 2
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            lost.append(f"{i}@{time.time():.3f}")
            break
        s.settimeout(left)
        try:
            got = s.recv(65535)
        except socket.timeout:
            continue
        if got == payload:
            ok += 1
            break
        late += 1  # the echo of an earlier datagram that timed out (or a damaged one)
print(ok, late, *lost)
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
    from controller.datapath.xdp import DEFAULT_PIN_DIR

    work = tmp_path_factory.mktemp("rig")
    pins_existed = DEFAULT_PIN_DIR.exists()
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
        state[2].wait_started(1200)
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
        if not pins_existed:  # the controller leaves its pins (for a restart): remove ours
            shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)


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


def replay_stats(bed: Testbed, role: str) -> list[str]:
    """Each SA's replay statistics (struct xfrm_stats, as `ip -s xfrm state` shows them): tells
    a packet outside the window (replay-window: too old, reordered) from a duplicate (replay)."""
    from controller.netlink.xfrm import XfrmSocket

    with XfrmSocket(bed.ns(role)) as x:
        return [
            f"0x{sa.spi:08x}: replay-window {sa.stats_replay_window} replay {sa.stats_replay} "
            f"failed {sa.stats_integrity_failed}"
            for sa in x.sas()
        ]


def xfrm_stat(bed: Testbed, role: str) -> dict[str, int]:
    """A gateway's non-zero XFRM error counters (/proc/net/xfrm_stat, per namespace)."""
    text = bed.cmd(role, ["cat", "/proc/net/xfrm_stat"]).stdout
    return {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.strip()) if int(v)}


def gateway_xfrm_stats(bed: Testbed) -> dict[str, dict[str, int]]:
    """Both gateways' non-zero XFRM error counters."""
    return {gw: xfrm_stat(bed, gw) for gw in ("gw1", "gw2")}


def xfrm_moved(bed: Testbed, before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """How each gateway's XFRM error counters moved since `before` (gateway_xfrm_stats)."""
    after = gateway_xfrm_stats(bed)
    return {
        gw: {k: v - before[gw].get(k, 0) for k, v in after[gw].items() if v != before[gw].get(k, 0)}
        for gw in after
    }


def echoed_across_rekey(bed: Testbed, n: int) -> tuple[int, int, str]:
    """udp_echo(n) across a CHILD_SA rekey: (echoed, lost that gw1's kernel dropped for want
    of an SA, what else was seen). The IKE responder (gw2) may send on its new outbound SA
    before the initiator's answer is processed and its inbound SA installed (XfrmInNoStates);
    and while strongSwan swaps gw1's outbound SA, a datagram on the kernel path (a new flow's
    first packet) can find the policy with no SA (XfrmOutNoStates: seen once, two datagrams at
    the start of a run under two TCG guests). Such a loss is the IKE daemon's, on the kernel
    path (XDP passes an SPI it does not know, and forwards no flow the kernel has not), never
    the fastpath's. The third item names late echoes, lost datagrams and the change in both
    gateways' XFRM error counters, for the failure message."""
    before = gateway_xfrm_stats(bed)
    got, late, lost = udp_echo_detail(bed, n)
    delta = xfrm_moved(bed, before)
    no_state = delta["gw1"].get("XfrmInNoStates", 0) + delta["gw1"].get("XfrmOutNoStates", 0)
    seen = f"late echoes {late}, lost {lost or 'none'}, XFRM counters moved {delta}"
    return got, no_state, seen


def diag(gw: ControllerProcess) -> str:
    """What the controller saw (per-reason counters, flows, SAs) and its log: for failures."""
    parts = [gw.cli(cmd).stdout for cmd in ("status", "flows", "sas")]
    return "\n".join([*parts, gw.tail(3000)])


def udp_echo(bed: Testbed, n: int, port: int = ECHO_PORT) -> int:
    """Send n datagrams (16..1215 B, each tagged with its index) one at a time from lan to
    remote's echo server: how many came back byte for byte within 2 s each."""
    return udp_echo_detail(bed, n, port)[0]


def udp_echo_detail(bed: Testbed, n: int, port: int = ECHO_PORT) -> tuple[int, int, list[str]]:
    """udp_echo, with the number of echoes that came late (after their 2 s) and the lost
    datagrams as `index@wall-clock time` (to set beside the controller's and charon's logs)."""
    out = bed.cmd(
        "lan",
        [sys.executable, "-I", "-S", "-c", UDP_CLIENT, bed.addr("REMOTE_HOST"), str(port), str(n)],
        timeout=n * 3 + 30,
    ).stdout.split()
    if not out:
        return 0, 0, [f"client printed nothing for {n} datagrams"]
    return int(out[0]), int(out[1]), out[2:]


@contextmanager
def esp_capture(bed: Testbed, role: str, path: Path) -> Iterator[Path]:
    """tcpdump of a gateway's WAN ESP into `path` while the block runs. On gw2 it shows the
    order in which the peer's kernel received gw1's packets; on gw1 (egress, after TC) only
    the packets the kernel built, with the numbers the resequencer gave them: XDP's frames
    bypass the taps of the device they are redirected to."""
    dump = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns(role), "tcpdump", "-n", "-U", "-Z", "root", "-B", "16384",
         "-i", "wan", "-w", str(path), "esp"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert dump.stderr is not None and "listening" in dump.stderr.readline(), "tcpdump up"
        yield path
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=60)


def late_arrivals(seqs: list[int]) -> list[tuple[int, int, int]]:
    """(position, sequence number, depth) of each packet that arrived after a higher number of
    its SA, in arrival order: depth is how far below the highest number already seen it lies
    (a replay window of W accepts depth < W); a repeated number has depth -1."""
    top, seen, out = 0, set(), []
    for i, seq in enumerate(seqs):
        if seq in seen:
            out.append((i, seq, -1))
        elif seq < top:
            out.append((i, seq, top - seq))
        seen.add(seq)
        top = max(top, seq)
    return out


def arrival_report(rx_pcap: Path, tx_pcap: Path, spi: int) -> str:
    """How gw1's packets of SA `spi` reached gw2: the packets that came after a higher number,
    the deepest first, each marked K when the kernel built it (seen on gw1's WAN tap) or X
    for XDP, with the four packets before it."""
    rx = [seq for s, seq, _, _ in _esp_from_pcap(rx_pcap) if s == spi]
    kernel_built = {seq for s, seq, _, _ in _esp_from_pcap(tx_pcap) if s == spi}
    late = late_arrivals(rx)
    deepest = max((d for _, _, d in late), default=0)
    worst = sorted(late, key=lambda t: -t[2])[:12]

    def mark(seq: int) -> str:
        return f"{seq}{'K' if seq in kernel_built else 'X'}"

    shown = ", ".join(
        f"#{i} {mark(seq)} depth {d} after [{' '.join(mark(s) for s in rx[max(0, i - 4) : i])}]"
        for i, seq, d in worst
    )
    return (
        f"{len(rx)} packets received ({len(kernel_built)} built by the kernel), {len(late)} "
        f"after a higher number, deepest {deepest}: {shown or 'none'}"
    )


def test_flows_take_the_fastpath_both_ways_intact(rig: Rig, tmp_path: Path) -> None:
    bed, ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    enc0, dec0 = gw.fastpath_packets("encap"), gw.fastpath_packets("decap")

    with (
        esp_capture(bed, "gw2", tmp_path / "gw2-rx.pcap") as rx_pcap,
        esp_capture(bed, "gw1", tmp_path / "gw1-tx.pcap") as tx_pcap,
    ):
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
    spi_out = int(next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))["spi-out"], 16)
    arrivals = arrival_report(rx_pcap, tx_pcap, spi_out)
    print(f"\ngw2's arrival order of SA 0x{spi_out:08x}: {arrivals}")

    flows = gw.flows()
    dirs = {(f["direction"], f["proto"]) for f in flows}
    for want in (("encap", 1), ("decap", 1), ("encap", 17), ("decap", 17)):
        assert want in dirs, f"learned {want}: {flows}\n{gw.tail()}"
    enc = gw.fastpath_packets("encap") - enc0
    dec = gw.fastpath_packets("decap") - dec0
    # The kernel carries the first packet(s) of each flow; XDP the rest.
    assert enc >= 30 + 200 - 10, f"encap fastpath packets {enc}: most of the traffic"
    assert dec >= 30 + 200 - 10, f"decap fastpath packets {dec}: most of the traffic"
    assert not peer_errors(bed), (
        f"gw2 saw no replay, sequence or ICV errors: {peer_errors(bed)}; gw2's SAs "
        f"{replay_stats(bed, 'gw2')}; gw1's resequencer "
        f"{gw.published_status()['resequencer']}, XFRM {xfrm_stat(bed, 'gw1')}; "
        f"arrival order {arrivals}"
    )

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
        f"in {k_in}; strongSwan out {swan_out} in {swan_in}; gw1's resequencer "
        f"{gw.published_status()['resequencer']}"
    )


def test_kernel_path_packets_share_the_sequence(
    rig: Rig,
) -> None:
    """New flows (kernel path, renumbered by tc_reseq) interleaved with fastpath traffic."""
    bed, _ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    for i in range(15):
        # A new UDP flow each round (new source port: its first packet is the kernel's) ...
        got = udp_echo_detail(bed, 3)
        assert got[0] == 3, f"round {i}: new flow's datagrams all echoed {got}"
        # ... and the established ICMP flow on the fastpath in between.
        assert bed.ping("lan", remote, count=3), f"round {i}: fastpath ICMP answered"
    assert not peer_errors(bed), f"one forward-moving sequence at gw2: {peer_errors(bed)}"
    reseq = [line for line in gw.tail().splitlines() if "ERROR" in line]
    assert not reseq, f"no errors in the controller log: {reseq}"


# One UDP datagram of argv[3] bytes with DF clear, to argv[1]:argv[2]. IP_PMTUDISC_OMIT, not
# _DONT: both leave DF clear, but _DONT fragments at a path MTU the host learned earlier (the
# TCP test's ICMP "fragmentation needed" from gw1 leaves one for the remote host), and those
# fragments would fit the tunnel; _OMIT sends the datagram whole up to the interface's MTU.
SEND_NO_DF = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 5)  # IP_MTU_DISCOVER, IP_PMTUDISC_OMIT
s.sendto(b"f" * int(sys.argv[3]), (sys.argv[1], int(sys.argv[2])))
"""


def test_fragmented_kernel_esp_never_reaches_the_peer_with_a_stale_number(rig: Rig) -> None:
    """A datagram without DF, too long for the tunnel: XDP passes it (mtu), the kernel seals
    it with its own number and then fragments the ESP packet. The resequencer cannot renumber
    fragments, and the kernel's number lies far behind the shared counter, so the peer would
    count a replay: the first fragment is dropped at gw1 and counted instead. (Such datagrams
    are lost while their SA is offloaded; see docs/design.md section 3.4.)"""
    bed, _ike, gw = rig
    assert udp_echo(bed, 20) == 20, "the SA offloaded"

    def frags() -> int:
        return int(gw.published_status()["resequencer"].get("fragment", 0))

    before, errors = frags(), peer_errors(bed)
    for _ in range(3):
        bed.cmd("lan", [sys.executable, "-c", SEND_NO_DF, bed.addr("REMOTE_HOST"), "9", "1460"])
    wait_for(
        lambda: frags() >= before + 3,
        10,
        lambda: (
            f"3 fragments dropped: resequencer {gw.published_status()['resequencer']}\n{diag(gw)}"
        ),
    )
    assert peer_errors(bed) == errors, f"no replay counted at gw2: {peer_errors(bed)}"
    assert udp_echo(bed, 20) == 20, "the tunnel carries on"


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

    from controller.core.state import Direction
    from controller.datapath import abi as defs
    from controller.datapath.xdp import DEFAULT_PIN_DIR, open_pinned_map

    h = open_pinned_map(DEFAULT_PIN_DIR / "xfp_stats", ctypes.c_uint32, defs.Stat, percpu=True)
    try:
        per_cpu = h.get(ctypes.c_uint32(defs.stat_index(Direction.ENCAP, defs.Reason.ENCAP_OK)))
        return [s.packets for s in per_cpu or []]
    finally:
        os.close(h.fd)


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

    from controller.netlink.xfrm import XfrmSocket

    bed, ike, _gw = rig
    remote = bed.addr("REMOTE_HOST")
    streams: list[subprocess.Popen[str]] = []
    with esp_capture(bed, "gw2", tmp_path / "wan.pcap") as pcap:
        try:
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


def test_each_change_takes_its_flows_off_timed(rig: Rig) -> None:
    """Issue 4, acceptance 3. A UDP stream (one 5-tuple, a datagram every 5 ms) runs on the
    fastpath both ways; then one change the flow's proof rested on, after which the kernel no
    longer carries that flow: an nftables forward rule dropping it, a blackhole route, the next
    hop's neighbour entry pointing elsewhere, the OUT policy deleted, the inbound SA deleted,
    `ip xfrm policy setdefault fwd block` (no FWD policy covers the LAN->remote direction), and
    the LAN link going down; last, the WAN MTU changing (the flows are still forwarded: their
    entries go and they are learned again). Each change is made over netlink from this
    process; the kernel made it between the request (t0) and the ACK (t1). For each:
    - the controller's own record of when the flows were out of the maps (status
      "invalidations": an upper bound on the last packet XDP could carry), from t1 and t0;
    - the send time of the last datagram whose echo still came back, i.e. the last packet the
      fastpath carried (the kernel drops the rest). None may come back sent after the removal.
    The goal is 100 ms; figures are printed, not asserted (TCG timing is noise), but a flow
    left on the fastpath fails the test: its echoes keep coming."""
    bed, ike, gw = rig
    p = bed.plan
    remote = p["REMOTE_HOST"]
    gw2_mac = bed.iface("gw2", "wan").mac
    lan_if = bed.ifindex("gw1", "lan")
    rows: list[str] = []

    def stream_flows() -> list[dict[str, Any]]:
        return [
            f for f in gw.published_status()["flows"] if STREAM_PORT in (f["sport"], f["dport"])
        ]

    def timed(what: str, causes: set[str], change: Callable[[], None],
              undo: Callable[[], None], carried: bool = True,
              relearned_ok: bool = False) -> None:  # fmt: skip
        """`relearned_ok`: the kernel still forwards one direction of the stream (to a MAC
        nobody has; the outbound SA), so the flow may rightly be learned again as it now is."""
        stream = start_stream(bed, STREAM_PORT, 10, 0.005)
        try:
            # (a Python start-up under emulation on a busy machine takes seconds)
            wait_for(
                lambda: {f["direction"] for f in stream_flows()} == {"encap", "decap"},
                20,
                lambda: f"{what}: the stream's flows on the fastpath both ways: {diag(gw)}",
            )
            time.sleep(0.3)
            t0 = time.monotonic()
            change()
            t1 = time.monotonic()  # the kernel has made the change by now (netlink ACK)
            try:
                rec = wait_for(
                    lambda: next(
                        (
                            r
                            for r in gw.published_status()["invalidations"]
                            if r["cause"] in causes and r["removed_ns"] / 1e9 >= t0
                        ),
                        None,
                    ),
                    5,
                    lambda: f"{what}: flows removed ({causes}): {diag(gw)}",
                )
                out, _ = stream.communicate(timeout=60)
                result = json.loads(out)
                removed = rec["removed_ns"] / 1e9
                if not relearned_ok:
                    # Echoes already on their way back may rightly be learned as a decap flow
                    # (that direction's proof stands); the direction the change broke may not.
                    again = [f for f in stream_flows() if f["direction"] == "encap"]
                    assert not again, f"{what}: learned again: {again}\n{diag(gw)}"
            finally:
                undo()
        finally:
            if stream.poll() is None:
                stream.kill()
                stream.wait()
        echoed = result["echoed"]
        late = [t for t in echoed if t > removed]
        assert not late, (
            f"{what}: {len(late)} datagrams sent after the flows were removed still came back: "
            "the fastpath carried a flow the kernel no longer forwards"
        )
        assert echoed and min(echoed) < t0, f"{what}: the stream ran on the fastpath first"
        after = [t for t in echoed if t >= t0]
        last = f"{(max(after) - t0) * 1e3:4.0f} ms" if after else "none"
        if not carried:
            last = "n/a"
        handled = (rec["removed_ns"] - (rec["event_ns"] or rec["removed_ns"])) / 1e6
        # The kernel event lies between t0 (request sent) and t1 (ACK read).
        rows.append(
            f"  {what:<38} {(removed - t1) * 1e3:5.1f} .. {(removed - t0) * 1e3:5.1f} ms "
            f"(event read -> removed {handled:4.1f} ms)   last echoed packet sent {last}"
        )
        wait_for(lambda: udp_echo(bed, 3) == 3, 60, f"{what}: the path is back")

    # nftables: a forward rule that drops the offloaded flow.
    rules = (
        "table inet xfp_block {\n  chain forward_filter {\n"
        "    type filter hook forward priority 0;\n"
        f"    udp dport {ECHO_PORT} udp sport {STREAM_PORT} drop\n  }}\n}}\n"
    )
    # Each change is made from this process over netlink (no process start-up inside the
    # timed window, which under emulation takes longer than the goal).
    nft = Nft(bed.ns("gw1"))
    ipr = netns_iproute(bed.ns("gw1"))
    try:
        timed(
            "nftables rule drops the flow",
            {"firewall_changed"},
            lambda: nft.run(rules),
            lambda: nft.run("delete table inet xfp_block", check=False),
        )
        timed(
            "blackhole route to the remote host",
            {"route_changed"},
            lambda: ipr.route("add", dst=f"{remote}/32", type="blackhole"),
            lambda: bed.ip("gw1", "route", "del", "blackhole", f"{remote}/32", check=False),
        )
        wan = bed.ifindex("gw1", "wan")
        timed(
            "next hop's neighbour entry changed",
            {"neigh_changed"},
            lambda: ipr.neigh(
                "replace",
                dst=p["GW2_WAN"],
                lladdr="02:00:00:00:00:99",
                ifindex=wan,
                state=NUD_PERMANENT,
            ),
            lambda: bed.ip(
                "gw1",
                "neigh",
                "replace",
                p["GW2_WAN"],
                "lladdr",
                gw2_mac,
                "dev",
                "wan",
                "nud",
                "permanent",
            ),
            relearned_ok=True,
        )
        _timed_xfrm_changes(bed, ike, timed)

        def lan_up() -> None:
            bed.ip("gw1", "link", "set", "lan", "up")
            wait_for(lambda: bed.ping("lan", remote, count=1), 30, "the LAN link is back")

        # Down, the link carries nothing either way: only the removal time says anything.
        timed("LAN link down", {"link_changed", "route_changed"},
              lambda: ipr.link("set", index=lan_if, state="down"), lan_up,
              carried=False)  # fmt: skip
        # The WAN MTU changes: entries written with the old one are wrong (frames too big for
        # the link), so they go, and the flows are learned again with the new MTU.
        assert udp_echo(bed, 5) == 5, "WAN MTU: traffic before"
        wait_for(lambda: any(f["direction"] == "encap" for f in gw.published_status()["flows"]),
                 20, "WAN MTU: encap flows learned")  # fmt: skip
        t0 = time.monotonic()
        ipr.link("set", index=wan, mtu=1400)
        t1 = time.monotonic()
        try:
            rec = wait_for(
                lambda: next(
                    (
                        r
                        for r in gw.published_status()["invalidations"]
                        if r["cause"] == "link_changed" and r["removed_ns"] / 1e9 >= t0
                    ),
                    None,
                ),
                5,
                lambda: f"WAN MTU change: flows removed: {diag(gw)}",
            )
            assert udp_echo(bed, 5) == 5, "WAN MTU 1400: traffic goes on"
        finally:
            bed.ip("gw1", "link", "set", "wan", "mtu", "1500")
        removed = rec["removed_ns"] / 1e9
        rows.append(
            f"  {'WAN MTU 1500 -> 1400':<38} {(removed - t1) * 1e3:5.1f} .. "
            f"{(removed - t0) * 1e3:5.1f} ms"
        )
    finally:
        ipr.close()
        nft.close()

    assert lan_if == bed.ifindex("gw1", "lan")
    assert udp_echo(bed, 10) == 10, "flows learned again after the changes"
    assert not peer_errors(bed), f"no peer errors: {peer_errors(bed)}"
    print(
        "\ninvalidation: kernel change -> flows out of the maps (goal 100 ms), bounds from the"
        " change's netlink request and its ACK:\n" + "\n".join(rows)
    )


def _timed_xfrm_changes(bed: Testbed, ike: Any, timed: Callable[..., None]) -> None:
    """The XFRM cases of the timed invalidation test: OUT policy deleted, inbound SA deleted,
    forward default set to block."""
    from controller.core.xfrm_model import DefaultAction, Dir
    from controller.netlink.xfrm import XfrmSocket
    from testbed.ike import CHILD

    with XfrmSocket(bed.ns("gw1")) as x:
        outs = [q for q in x.policies() if q.dir is Dir.OUT and q.templates]
        assert len(outs) == 1, f"one OUT policy with a template on gw1: {outs}"
        out_policy = outs[0]
        timed(
            "OUT policy deleted",
            {"policy_changed"},
            lambda: x.delete_policy(out_policy),
            lambda: x.add_policy(out_policy),
        )
        child = next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))
        sa_in = x.get_sa(bed.addr("GW1_WAN"), int(child["spi-in"], 16))
        assert sa_in is not None, "gw1's inbound SA"
        timed(
            "inbound SA deleted",
            {"sa_deleted"},
            lambda: x.delete_sa(sa_in),
            lambda: ike.gw1.swanctl("--rekey", "--child", CHILD["gw1"]),
            relearned_ok=True,
        )
        timed(
            "setdefault fwd block (no FWD policy)",
            {"policy_changed"},
            lambda: x.set_default_policy(forward=DefaultAction.BLOCK),
            lambda: x.set_default_policy(forward=DefaultAction.ACCEPT),
        )


NUD_PERMANENT = 0x80


def netns_iproute(netns: str) -> Any:
    """A pyroute2 IPRoute whose socket lives in `netns` (bound there when it is created)."""
    from pyroute2 import IPRoute

    from controller.netns import in_netns

    with in_netns(netns):
        return IPRoute()


class Nft:
    """nftables commands run by libnftables in this process, in `netns` (no `nft` process to
    start inside a timed window)."""

    def __init__(self, netns: str) -> None:
        import ctypes

        from controller.netns import in_netns

        lib = ctypes.CDLL("libnftables.so.1")
        lib.nft_ctx_new.restype, lib.nft_ctx_new.argtypes = ctypes.c_void_p, [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib, self.netns, self.in_netns = lib, netns, in_netns
        with in_netns(netns):
            self.ctx = lib.nft_ctx_new(0)
        assert self.ctx, "nft_ctx_new"

    def run(self, script: str, check: bool = True) -> int:
        with self.in_netns(self.netns):
            rc = self.lib.nft_run_cmd_from_buffer(self.ctx, script.encode())
        assert rc == 0 or not check, f"nft {script!r}: failed ({rc})"
        return rc

    def close(self) -> None:
        if self.ctx:
            self.lib.nft_ctx_free(self.ctx)
            self.ctx = None


def test_default_fwd_block_flow_without_policy_is_never_learned(rig: Rig) -> None:
    """Issue 4, acceptance 2: under `ip xfrm policy setdefault fwd block` a LAN->remote flow
    has no FWD policy (strongSwan installs FWD policies for the inbound direction only): the
    kernel drops it and the fastpath never learns it, while the inbound direction, which has a
    FWD policy, is still forwarded."""
    from controller.core.xfrm_model import DefaultAction
    from controller.netlink.xfrm import XfrmSocket

    bed, _ike, gw = rig
    assert udp_echo(bed, 5) == 5, "before: the tunnel works"
    with XfrmSocket(bed.ns("gw1")) as x:
        x.set_default_policy(forward=DefaultAction.BLOCK)
        try:
            # The status file is written by the controller's main loop; a stall of it shows
            # as "main loop held" in the log (it failed a 5 s wait here once, cause unseen).
            wait_for(
                lambda: not gw.flows(),
                15,
                lambda: f"the default change flushed the flows\n{diag(gw)}",
            )
            assert udp_echo(bed, 10) == 0, "the kernel drops LAN->remote: no FWD policy"
            assert bed.ping("lan", bed.addr("GW2_WAN"), count=2) is False, (
                "a clear flow with no policy at all is dropped too"
            )
            time.sleep(0.5)  # a (wrong) learn event would have arrived by now
            enc = [f for f in gw.flows() if f["direction"] == "encap"]
            assert not enc, f"nothing learned LAN->remote under fwd block: {enc}"
            st = gw.published_status()["metrics"]
            print(f"\nunder fwd block: flows {gw.flows()}; metrics refusals "
                  f"{st.get('validation_rejections') if st else None}")  # fmt: skip
        finally:
            x.set_default_policy(forward=DefaultAction.ACCEPT)
    wait_for(lambda: udp_echo(bed, 3) == 3, 30, "the tunnel works again under accept")


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
    from testbed.ike import CHILD

    bed, ike, gw = rig
    assert udp_echo(bed, 20) == 20, "warm"
    old = {s["spi"] for s in gw.sas() if s["offloaded"]}
    assert len(old) == 2, f"both directions offloaded before the rekey: {gw.sas()}"
    t0 = time.monotonic()
    ike.gw1.swanctl("--rekey", "--child", CHILD["gw1"])
    got, no_state, seen = echoed_across_rekey(bed, 100)
    assert got + no_state >= 100, (
        f"no datagram lost to the rekey but for the IKE race ({got}/100, {no_state} "
        f"dropped by gw1's kernel for want of an SA); {seen}\n{diag(gw)}"
    )

    on_new: list[float] = []  # when both offloaded SAs were new ones, first seen

    def moved() -> set[str] | None:
        sas = gw.sas()
        now = {s["spi"] for s in sas if s["offloaded"]}
        if len(now) == 2 and not now & old and not on_new:
            on_new.append(time.monotonic() - t0)
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
    print(
        f"\nrekey: {sorted(old)} -> {sorted(new)}, {got}/100 echoed ({no_state} lost to the "
        f"IKE race; {seen}): both directions offloaded on the new SAs "
        f"within {on_new[0]:.1f} s, old SAs deleted and let go within {took:.1f} s"
    )


# Rekeys per run of the next test, alternating ends (`XFP_REKEY_ROUNDS=20` for a longer soak).
REKEY_ROUNDS = int(os.environ.get("XFP_REKEY_ROUNDS", "4"))
REKEY_LOAD = 400  # datagrams echoed while each rekey runs


def test_rekeys_from_either_end_under_load(rig: Rig) -> None:
    """REKEY_ROUNDS CHILD_SA rekeys in a row, initiated in turn by gw1 (the controller's side:
    its new outbound SA is installed at once) and by gw2 (gw1 responds: strongSwan installs
    gw1's new outbound SA only when gw2's DELETE for the old one arrives), each under a stream
    of REKEY_LOAD UDP echoes started before the rekey. Every datagram comes back but for the
    IKE race, the flows end up offloaded on the new SAs, the old ones are let go, and the peer
    never sees a replay, sequence or ICV error."""
    from testbed.ike import CHILD

    bed, ike, gw = rig
    remote = bed.addr("REMOTE_HOST")

    def offloaded() -> set[str]:
        return {s["spi"] for s in gw.sas() if s["offloaded"]}

    def both_offloaded() -> set[str] | None:
        udp_echo(bed, 3)
        now = offloaded()
        return now if len(now) == 2 else None

    rounds: list[str] = []
    for r in range(REKEY_ROUNDS):
        by = ("gw1", "gw2")[r % 2]
        old = wait_for(both_offloaded, 30, lambda: f"both directions offloaded: {diag(gw)}")
        before = gateway_xfrm_stats(bed)
        enc0 = gw.fastpath_packets("encap")
        client = subprocess.Popen(
            [*bed.nsenter_argv("lan"), sys.executable, "-I", "-S", "-c", UDP_CLIENT, remote,
             str(ECHO_PORT), str(REKEY_LOAD)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            time.sleep(0.5)  # the stream is running on the fastpath before the rekey starts
            t0 = time.monotonic()
            getattr(ike, by).swanctl("--rekey", "--child", CHILD[by])
            out, _ = client.communicate(timeout=REKEY_LOAD * 3 + 30)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        fields = out.split()
        got, late, lost = int(fields[0]), int(fields[1]), fields[2:]
        delta = xfrm_moved(bed, before)
        no_state = delta["gw1"].get("XfrmInNoStates", 0)
        assert got + no_state >= REKEY_LOAD, (
            f"round {r} (rekeyed by {by}): {got}/{REKEY_LOAD} echoed, {no_state} dropped by "
            f"gw1 for want of an SA; late echoes {late}, lost {lost}, XFRM counters moved "
            f"{delta}\n{diag(gw)}"
        )

        def moved(old: set[str] = old) -> set[str] | None:
            udp_echo(bed, 3)
            sas = gw.sas()
            now = {s["spi"] for s in sas if s["offloaded"]}
            left = {s["spi"] for s in sas} & old
            return now if len(now) == 2 and not now & old and not left else None

        new = wait_for(moved, 60, lambda r=r: f"round {r}: flows on the new SAs: {diag(gw)}")
        rounds.append(
            f"{by}: {sorted(old)} -> {sorted(new)} in {time.monotonic() - t0:.1f} s, "
            f"{got}/{REKEY_LOAD} echoed ({no_state} IKE race), "
            f"{gw.fastpath_packets('encap') - enc0} encap on XDP"
        )
    assert not peer_errors(bed), f"no peer errors across the rekeys: {peer_errors(bed)}"
    print("\nrekeys under load:\n  " + "\n  ".join(rounds))


def _reconfigure_gw1(ike: Any, extra: str) -> None:
    """Reload gw1's CHILD_SA config with `extra` options and bring the tunnel up afresh (a
    live CHILD_SA keeps the config it was created with)."""
    from testbed.ike import CHILD

    conf = ike.gw1.rundir / "swanctl.conf"
    base = getattr(ike, "_base_conf", None) or conf.read_text()
    ike._base_conf = base
    conf.write_text(base.replace("replay_window = 128", f"replay_window = 128\n{extra}"))
    ike.gw1.load()
    ike.gw1.swanctl("--terminate", "--ike", "gw1-gw2", "--timeout", "30", check=False)
    ike.gw1.swanctl("--initiate", "--child", CHILD["gw1"], "--timeout", "60", timeout=70)


def _child(ike: Any) -> dict[str, Any]:
    return next(iter(ike.gw1.list_sas()[0]["child-sas"].values()))


def test_fastpath_bytes_trigger_rekey_and_liveness_keeps_child_up(rig: Rig) -> None:
    """Issue 5, acceptance 2 and 3, with gw1's CHILD_SA reconfigured: rekey_bytes 1 MB and an
    inactivity timeout of 30 s.
    - 2500 UDP datagrams echoed over the fastpath cross the soft byte limit: XDP's bytes reach the
      kernel's SA counters (NEWAE), the controller raises the soft expire, strongSwan rekeys,
      the transfer arrives intact and the peer sees no replay or ICV error.
    - Then 65 s of pings that only the fastpath carries, but for one packet per SA every
      `[timers] liveness` (10 s) that takes the kernel path and so moves the policies' use
      time that strongSwan's inactivity check reads: the CHILD_SA stays up."""
    from controller.netlink.xfrm import XfrmSocket

    bed, ike, gw = rig
    remote = bed.addr("REMOTE_HOST")
    # rand_bytes 0: its default (life_bytes - rekey_bytes) would be subtracted from rekey_bytes
    # and wrap the soft limit round to near 2**64.
    _reconfigure_gw1(
        ike, "inactivity = 30s\nrekey_bytes = 1000000\nrand_bytes = 0\nlife_bytes = 50000000"
    )
    try:
        assert udp_echo(bed, 20) == 20, "the fresh CHILD_SA carries traffic"
        child = _child(ike)
        spi_out = int(child["spi-out"], 16)
        with XfrmSocket(bed.ns("gw1")) as x:
            sa = x.get_sa(bed.addr("GW2_WAN"), spi_out)
        assert sa is not None and sa.lifetime.soft_byte_limit <= 1_000_000, (
            f"strongSwan set a soft byte limit on the SA: {sa and sa.lifetime}"
        )
        old = {child["spi-out"], child["spi-in"]}
        enc0 = gw.fastpath_packets("encap")
        got, no_state, seen = echoed_across_rekey(bed, 2500)  # ~1.5 MB each way, 16..1215 B
        assert got + no_state >= 2500, (
            f"every datagram echoed intact across the rekey but for the IKE race: {got}/2500, "
            f"{no_state} dropped by gw1's kernel for want of an SA; {seen}\n{diag(gw)}"
        )
        assert gw.fastpath_packets("encap") - enc0 > 2000, "the fastpath carried the bulk"

        def rekeyed() -> dict[str, Any] | None:
            udp_echo(bed, 2)
            c = _child(ike)
            return c if not {c["spi-out"], c["spi-in"]} & old else None

        new = wait_for(rekeyed, 60, lambda: f"strongSwan rekeyed: {_child(ike)}\n{diag(gw)}")
        assert "soft volume limit reached on the fastpath" in gw.tail(20000), (
            "the controller raised the soft expire from fastpath bytes"
        )
        assert not peer_errors(bed), f"no peer errors across the rekey: {peer_errors(bed)}"

        # Inactivity: 65 s of fastpath-only pings (5/s) against a 30 s timeout.
        ping = bed.cmd("lan", ["ping", "-n", "-q", "-i", "0.2", "-c", "325", remote],
                       check=False, timeout=200)  # fmt: skip
        assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
        after = _child(ike)
        assert after["uniqueid"] == new["uniqueid"], (
            f"the CHILD_SA stayed up through 65 s of fastpath traffic: {new} -> {after}"
        )
        print(
            f"\nrekey by fastpath bytes: {sorted(old)} -> {new['spi-out']}/{new['spi-in']}, "
            f"{got}/2500 echoed ({no_state} lost to the IKE race; {seen}); "
            f"after 65 s of fastpath pings the CHILD_SA is still {after['uniqueid']}, "
            f"strongSwan last use in {after.get('use-in')} s, out {after.get('use-out')} s"
        )
        for key in ("use-in", "use-out"):
            if key in after:
                assert int(after[key]) <= 15, f"strongSwan saw recent use ({key}): {after}"
    finally:
        _reconfigure_gw1(ike, "")
        wait_for(lambda: udp_echo(bed, 3) == 3, 60, "the tunnel is back on the base config")


# The first ESP frame `src` sends to `dst` on device argv[1] (ETH_P_ALL sees outgoing frames),
# as hex; nothing when none within argv[4] seconds.
CAPTURE_ESP = r"""
import socket, sys, time
dev, src, dst, within = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3)); s.bind((dev, 3))
want = socket.inet_aton(src) + socket.inet_aton(dst)
print("ready", flush=True)
end = time.monotonic() + within
while time.monotonic() < end:
    s.settimeout(max(end - time.monotonic(), 0.01))
    try:
        f = s.recv(65535)
    except socket.timeout:
        break
    if len(f) > 34 and f[23] == 50 and f[26:34] == want:
        print(f.hex())
        break
"""

SEND_FRAME = r"""
import socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW); s.bind((sys.argv[1], 0))
s.send(bytes.fromhex(sys.argv[2]))
"""


def _xdp_drops(gw: ControllerProcess, direction: str, reason: str) -> int:
    rows = gw.status()["drops"]
    return sum(r["packets"] for r in rows if (r["direction"], r["reason"]) == (direction, reason))


def test_stalled_controller_hands_inbound_back_and_replays_stay_dropped(rig: Rig) -> None:
    """SIGSTOP for longer than the watchdog: XDP gives the SAs up and the kernel carries the
    traffic, its replay window taking packets XDP's never saw. On SIGCONT the controller sees
    the lapse and hands the inbound SA back instead of refreshing it; offloaded again, XDP
    starts from the kernel's window. A packet the kernel accepted during the stall, sent again
    by an attacker on the WAN afterwards, is dropped by XDP as a replay."""
    bed, _ike, gw = rig
    assert udp_echo(bed, 20) == 20, "on the fastpath"
    assert gw.fastpath_packets("decap") > 0, "decap on the fastpath"
    gw.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(6)  # past the 5 s watchdog: the kernel alone
        cap = subprocess.Popen(
            ["ip", "netns", "exec", bed.ns("gw2"), sys.executable, "-I", "-S", "-c",
             CAPTURE_ESP, "wan", bed.addr("GW2_WAN"), bed.addr("GW1_WAN"), "30"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        # Traffic only once the capture listens (an interpreter's start under TCG on a loaded
        # machine outlasted the fixed 0.5 s this waited before: nothing captured).
        assert cap.stdout is not None and cap.stdout.readline().strip() == "ready", "capture up"
        during = udp_echo(bed, 10)
        frame = cap.communicate(timeout=40)[0].strip()
    finally:
        gw.proc.send_signal(signal.SIGCONT)
    assert during == 10, f"the kernel carried the traffic during the stall: {during}"
    assert frame, "an ESP frame gw2 -> gw1 captured during the stall"
    # The lapse seen (logged, then the SA handed back in the same step), and the status file
    # written again since: what it says of the SAs is after the hand-back ...
    wait_for(lambda: "watchdog lapsed" in gw.tail(50000), 30, lambda: gw.tail())
    written = gw.published_status()["written_ns"]
    wait_for(lambda: gw.published_status()["written_ns"] > written, 10, "status written again")

    def inbound_offloaded_again() -> bool:
        udp_echo(bed, 5)  # a new flow each time: its first packets take the kernel's path
        return any(s["offloaded"] and s["direction"] == "decap" for s in gw.sas())

    # ... then the SA offloaded again, from the kernel's window.
    wait_for(inbound_offloaded_again, 60, lambda: f"inbound offloaded again\n{diag(gw)}")
    replays0 = _xdp_drops(gw, "decap", "replay")
    bed.cmd("gw2", [sys.executable, "-c", SEND_FRAME, "wan", frame])
    wait_for(
        lambda: _xdp_drops(gw, "decap", "replay") > replays0,
        10,
        lambda: f"XDP dropped the replayed frame\n{diag(gw)}",
    )
    assert udp_echo(bed, 20) == 20, "the tunnel carries on"
    assert not peer_errors(bed), f"no replay or ICV errors at gw2: {peer_errors(bed)}"


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
    fresh.wait_started(1200)
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
