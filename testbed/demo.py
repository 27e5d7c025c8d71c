# SPDX-License-Identifier: GPL-2.0-only
"""The demo: the gateway test bed, a strongSwan IKEv2 tunnel, and the controller taking the
tunnel's forwarded flows onto the XDP fastpath.

    lan ── gw1 [XDP + controller] ══ ESP (ChaCha20-Poly1305, strongSwan) ══ gw2 ── remote

Needs a kernel with ESP: run it through `make demo` (python -m testbed.vmrun demo), which
boots one if this machine's kernel lacks it. The story, one function per step:

1. test bed and both IKE daemons up; gw1 initiates the CHILD_SA;
2. traffic on the kernel path alone (ping, a bounded iperf3 TCP transfer): the baseline;
3. the controller starts on gw1 (`xfrm-fastpath run`, as an operator would), compiles and
   attaches its programs;
4. the same traffic again: each flow's first packet takes the kernel path, the controller
   watches it being forwarded, checks it against the kernel's SAs, policies, routes and
   neighbours, and installs the flow; the rest is encrypted and decrypted in XDP;
5. the summary side by side: packets per direction through XDP and through the kernel, the
   flows learned and how long learning took, gw2's XFRM error counters (a wrong sequence,
   IV or tag would show there), throughput with and without the fastpath;
6. SIGTERM: the controller hands the sequence numbers back to the kernel, detaches, and the
   tunnel carries on on the kernel path.

The root network namespace is checked unchanged at the end. Under qemu TCG the throughput
figures measure the emulator more than either path: read them as a ratio.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.bed import Testbed, TestbedError, run
from testbed.ike import IkeTunnel, start_ike_tunnel
from testbed.static_esp import SaCounters, parse_xfrm_state_stats
from testbed.supervisor import ControllerError, ControllerProcess

PINGS = 20
IPERF_SECONDS = 3
CONTROLLER_START_S = 900
# Watchdog 5 s: XDP stops on an SA by itself if the controller stops refreshing it.
CONTROLLER_CONFIG = "[timers]\nwatchdog = 5\n"


def step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def root_netns_snapshot() -> str:
    """What the root network namespace holds: links, addresses, routes, XFRM, namespaces are
    excluded (the test bed's own come and go)."""
    parts = []
    for argv in (
        ["ip", "-o", "link", "show"],
        ["ip", "-o", "addr", "show"],
        ["ip", "route", "show", "table", "all"],
        ["ip", "xfrm", "state"],
        ["ip", "xfrm", "policy"],
    ):
        parts.append(run(argv, check=False).stdout)
    # Link lines carry qdisc/state that cannot change from our work but may flap on their own;
    # keep only index, name and flags.
    return "\n".join(parts)


@dataclass
class Traffic:
    pings_sent: int
    pings_answered: int
    rtt_avg_ms: float | None
    iperf_bytes: int | None
    iperf_mbit: float | None
    iperf_error: str | None


def send_ping(bed: Testbed, count: int = PINGS) -> tuple[int, float | None]:
    proc = bed.cmd(
        "lan",
        ["ping", "-n", "-q", "-c", str(count), "-i", "0.05", "-W", "2", bed.addr("REMOTE_HOST")],
        check=False,
        timeout=count * 2 + 10,
    )
    got = re.search(r"(\d+) received", proc.stdout)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
    return (int(got.group(1)) if got else 0), (float(rtt.group(1)) if rtt else None)


def send_iperf(bed: Testbed, seconds: int = IPERF_SECONDS) -> tuple[int | None, float | None, str]:
    """A TCP transfer lan -> remote for `seconds`, bounded: the server serves one client (-1)
    and everything is killed at a deadline."""
    serve = ["iperf3", "-s", "-1", "-B", bed.addr("REMOTE_HOST")]
    server = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns("remote"), *serve],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Wait for the listening socket itself, not for iperf3's "Server listening" line: that
        # sits in its stdio buffer when stdout is not a terminal.
        deadline = time.monotonic() + 30
        listening = ["ss", "-H", "-l", "-t", "-n", "sport", "=", ":5201"]
        while not bed.cmd("remote", listening, check=False).stdout.strip():
            if server.poll() is not None or time.monotonic() > deadline:
                return None, None, "iperf3 server did not start listening"
            time.sleep(0.2)
        client = bed.cmd(
            "lan",
            ["iperf3", "-c", bed.addr("REMOTE_HOST"), "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 60,
        )
        try:
            res = json.loads(client.stdout)
        except json.JSONDecodeError:
            return None, None, f"iperf3 client: {client.stderr.strip() or client.stdout[-200:]}"
        if "error" in res:
            return None, None, f"iperf3: {res['error']}"
        recv = res["end"]["sum_received"]
        return int(recv["bytes"]), recv["bits_per_second"] / 1e6, ""
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=10)


def send_traffic(bed: Testbed, label: str) -> Traffic:
    step(f"{label}: ping lan -> remote ({PINGS} echoes), then iperf3 TCP for {IPERF_SECONDS} s")
    answered, rtt = send_ping(bed)
    nbytes, mbit, err = send_iperf(bed)
    return Traffic(PINGS, answered, rtt, nbytes, mbit, err or None)


def bring_up(bed: Testbed, workdir: Path) -> IkeTunnel:
    p = bed.plan
    step(
        f"test bed: lan {p['LAN_HOST']} - gw1 [{p['GW1_LAN']} | {p['GW1_WAN']}] - "
        f"gw2 [{p['GW2_WAN']} | {p['GW2_LAN']}] - remote {p['REMOTE_HOST']}"
    )
    step("strongSwan: charon in gw1 and gw2 (testbed/strongswan/), gw1 initiates IKEv2 (PSK)")
    return start_ike_tunnel(bed, workdir)


def start_controller(bed: Testbed, workdir: Path) -> ControllerProcess:
    step("controller on gw1: xfrm-fastpath run (BCC compiles four programs: minutes under TCG)")
    ctl = ControllerProcess(bed, "gw1", workdir, CONTROLLER_CONFIG)
    took = ctl.wait_started(CONTROLLER_START_S)
    step(f"controller up in {took:.0f} s: XDP encap on gw1 lan, decap on gw1 wan")
    return ctl


def xfrm_errors(bed: Testbed, role: str) -> dict[str, int]:
    """The non-zero counters of a namespace's /proc/net/xfrm_stat (net/xfrm/xfrm_proc.c):
    replay, sequence, ICV (XfrmInStateProtoError), unknown SPI, ..."""
    text = bed.cmd(role, ["cat", "/proc/net/xfrm_stat"]).stdout
    pairs = (line.split() for line in text.splitlines() if line.strip())
    return {k: int(v) for k, v in pairs if int(v)}


def kernel_counters(bed: Testbed) -> dict[str, dict[int, SaCounters]]:
    return {
        r: parse_xfrm_state_stats(bed.ip(r, "-s", "xfrm", "state").stdout) for r in ("gw1", "gw2")
    }


@dataclass
class Story:
    """What the demo saw, for the summary."""

    ike_sa: dict[str, Any]
    child: dict[str, Any]
    before: Traffic  # kernel path only
    after: Traffic | None  # with the controller
    kernel_before: dict[str, dict[int, SaCounters]]  # SA counters when the controller started
    kernel_after: dict[str, dict[int, SaCounters]]
    fastpath: dict[str, int]  # direction -> packets through XDP
    flows: list[dict[str, Any]]
    sas: list[dict[str, Any]]
    learn_latency_s: list[float]
    peer_errors_kernel_only: dict[str, int]  # gw2's XFRM error counters after step 2
    peer_errors: dict[str, int]  # what they added while the fastpath ran (steps 3-6)
    handback_ok: bool | None  # the tunnel still carried traffic after SIGTERM
    resequencer: dict[str, int] = field(default_factory=dict)  # tc_reseq outcome -> packets


def summarize(story: Story) -> bool:
    """Print the summary; True when the story held: the tunnel carried every packet, most of
    the traffic after the first packets took XDP both ways, and gw2 saw no errors."""
    ike, child = story.ike_sa, story.child
    print()
    print("=" * 78)
    print("xfrm-fastpath demo: what happened")
    print("=" * 78)
    print(
        f"IKE_SA   {ike.get('name')} #{ike.get('uniqueid')}: {ike.get('state')}, "
        f"IKEv{ike.get('version')}, {ike.get('encr-alg')}/{ike.get('prf-alg')}/"
        f"{ike.get('dh-group')}, {ike.get('local-host')} <-> {ike.get('remote-host')}"
    )
    lts, rts = ",".join(child.get("local-ts", [])), ",".join(child.get("remote-ts", []))
    print(
        f"CHILD_SA {child.get('name')}: {child.get('state')}, {child.get('mode')} "
        f"{child.get('protocol')} {child.get('encr-alg')}, {lts} === {rts}"
    )
    ok = ike.get("state") == "ESTABLISHED"
    out_spi, in_spi = int(child["spi-out"], 16), int(child["spi-in"], 16)

    def moved(role: str, spi: int) -> int:
        a = story.kernel_after.get(role, {}).get(spi, SaCounters(0, 0, 0, 0)).packets
        b = story.kernel_before.get(role, {}).get(spi, SaCounters(0, 0, 0, 0)).packets
        return a - b

    print()
    print("With the controller running, gw1's packets per direction:")
    print(
        f"  {'direction':<30}{'XDP':>8}{'kernel':>8}{'XDP share':>11}{'SA counter':>12}{'gw2':>8}"
    )
    rows = (
        ("lan -> remote (gw1 encrypts)", "encap", out_spi),
        ("remote -> lan (gw1 decrypts)", "decap", in_spi),
    )
    for label, direction, spi in rows:
        # The kernel's SA counter includes what XDP carried (the controller adds it, NEWAE):
        # the kernel path's own share is the difference.
        xdp, counter = story.fastpath.get(direction, 0), moved("gw1", spi)
        kern = max(counter - xdp, 0)
        share = xdp / (xdp + kern) if xdp + kern else 0.0
        peer = moved("gw2", spi)
        print(f"  {label:<30}{xdp:>8}{kern:>8}{share:>10.1%}{counter:>12}{peer:>8}")
        ok &= xdp > 0 and share > 0.5
    print(
        "  kernel: the first packets of each flow (the configuration packets) and what XDP "
        "passes up.\n  SA counter: gw1's kernel SA lifetime counter, XDP's packets included "
        "(synced each second),\n  as the IKE daemon sees it. gw2: what the peer's kernel "
        "counted on the same SA."
    )
    print()
    lat = sorted(story.learn_latency_s)
    if lat:
        p50, worst = lat[len(lat) // 2] * 1e3, lat[-1] * 1e3
        lat_text = f"learn latency p50 {p50:.2f} ms, max {worst:.2f} ms"
    else:
        lat_text = "no learn latency recorded"
    print(f"flows learned: {len(story.flows)} ({lat_text}, first packet seen -> flow installed)")
    for f in story.flows[:8]:
        proto = {1: "icmp", 6: "tcp", 17: "udp"}.get(f["proto"], str(f["proto"]))
        print(
            f"  {f['direction']:<6}{proto:<5}{f['saddr']}:{f['sport']} -> "
            f"{f['daddr']}:{f['dport']}  SA {f['spi']}"
        )
    ok &= len(story.flows) >= 2
    offloaded = [s for s in story.sas if s["offloaded"]]
    print(f"SAs offloaded: {', '.join(s['spi'] + ' ' + s['direction'] for s in offloaded)}")
    moved_tc = {k: v for k, v in story.resequencer.items() if v}
    print(f"kernel-built ESP renumbered at TC egress (bpf/tc_reseq.c): {moved_tc or 'none'}")
    errs = story.peer_errors
    print(
        "gw2 XFRM errors (replay, sequence, ICV, ...): kernel path only "
        f"{story.peer_errors_kernel_only or 'none'}; with the fastpath {errs or 'none'}"
    )
    ok &= not errs
    print()
    print(f"  {'traffic':<34}{'kernel path only':>20}{'with the fastpath':>20}")
    b, a = story.before, story.after

    def ping_cell(t: Traffic | None) -> str:
        if t is None:
            return "-"
        rtt = f", {t.rtt_avg_ms:.2f} ms" if t.rtt_avg_ms is not None else ""
        return f"{t.pings_answered}/{t.pings_sent}{rtt}"

    def iperf_cell(t: Traffic | None) -> str:
        if t is None or t.iperf_mbit is None:
            return f"failed: {t.iperf_error}" if t else "-"
        return f"{t.iperf_mbit:.1f} Mbit/s"

    print(f"  {'ping lan -> remote (answered, rtt)':<34}{ping_cell(b):>20}{ping_cell(a):>20}")
    print(f"  {'iperf3 TCP lan -> remote':<34}{iperf_cell(b):>20}{iperf_cell(a):>20}")
    if a is not None and a.iperf_mbit and b.iperf_mbit:
        print(
            f"  throughput ratio fastpath/kernel: {a.iperf_mbit / b.iperf_mbit:.2f}x (emulated CPU)"
        )
    for t in (b, a):
        ok &= t is not None and t.pings_answered == t.pings_sent and t.iperf_mbit is not None
    if story.handback_ok is not None:
        print(
            "SIGTERM: sequence handed back, XDP detached; kernel path afterwards: "
            + ("traffic flows" if story.handback_ok else "BROKEN")
        )
        ok &= story.handback_ok
    return ok


def run_story(bed: Testbed, workdir: Path) -> Story:
    ike = bring_up(bed, workdir / "ike")
    try:
        sas = ike.gw1.list_sas()
        if not sas:
            raise TestbedError("IKE_SA not established at gw1 (see the charon logs)")
        ike_sa: dict[str, Any] = sas[0]
        child = next(iter(ike_sa.get("child-sas", {}).values()))
        before = send_traffic(bed, "kernel path only")
        errors_kernel_only = xfrm_errors(bed, "gw2")
        ctl = start_controller(bed, workdir)
        try:
            k0 = kernel_counters(bed)
            f0 = {d: ctl.fastpath_packets(d) for d in ("encap", "decap")}
            after = send_traffic(bed, "with the controller")
            time.sleep(1.5)  # one status period: the figures below are this traffic's
            k1 = kernel_counters(bed)
            fastpath = {d: ctl.fastpath_packets(d) - f0[d] for d in ("encap", "decap")}
            flows, ctl_sas = ctl.flows(), ctl.sas()
            reseq = ctl.published_status().get("resequencer", {})
        finally:
            step("SIGTERM to the controller: hand the sequence back to the kernel, detach")
            rc = ctl.stop()
        handback = rc == 0 and send_ping(bed, 10)[0] == 10
        return Story(
            ike_sa=ike_sa,
            child=child,
            before=before,
            after=after,
            kernel_before=k0,
            kernel_after=k1,
            fastpath=fastpath,
            flows=flows,
            sas=ctl_sas,
            learn_latency_s=[f["learn_latency_ms"] / 1e3 for f in flows],
            peer_errors_kernel_only=errors_kernel_only,
            peer_errors={
                k: v - errors_kernel_only.get(k, 0)
                for k, v in xfrm_errors(bed, "gw2").items()
                if v != errors_kernel_only.get(k, 0)
            },
            resequencer=reseq,
            handback_ok=handback,
        )
    finally:
        ike.stop()


def main() -> int:
    before = root_netns_snapshot()
    ok = False
    try:
        bed = Testbed(prefix="")
        step("building the test bed: namespaces lan, gw1, gw2, remote (testbed/bed.py)")
        bed.build()
        try:
            with tempfile.TemporaryDirectory(prefix="xfp-demo-") as work:
                try:
                    ok = summarize(run_story(bed, Path(work)))
                except ControllerError as e:
                    print(f"demo failed: {e}", file=sys.stderr)
        finally:
            bed.destroy()
    except (TestbedError, subprocess.TimeoutExpired) as e:
        print(f"demo failed: {e}", file=sys.stderr)
    after = root_netns_snapshot()
    same = before == after
    print(f"root network namespace: {'unchanged' if same else 'CHANGED'}")
    print("=" * 78)
    print(f"demo {'OK' if ok and same else 'FAILED'}")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())
