# SPDX-License-Identifier: GPL-2.0-only
"""The demo: the gateway test bed with a strongSwan IKEv2 tunnel, real traffic, and a summary.

    lan ── gw1 ══ ESP (ChaCha20-Poly1305, negotiated by strongSwan) ══ gw2 ── remote

Needs a kernel with ESP: run it through `make demo` (python -m controller.vmrun demo), which
boots one if this machine's kernel lacks it. Steps, each a function so the controller story can
grow here: bring the test bed and both IKE daemons up, send traffic lan <-> remote (ping, then a
short bounded iperf3 TCP transfer), and print what crossed the tunnel: the IKE_SA, the CHILD_SA,
and the kernel's per-direction SA counters at both gateways. The root network namespace is
checked unchanged at the end.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.static_esp import SaCounters, parse_xfrm_state_stats
from controller.strongswan import IkeTunnel, start_ike_tunnel
from controller.testbed import Testbed, TestbedError, run

PINGS = 20
IPERF_SECONDS = 3


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


def send_traffic(bed: Testbed) -> Traffic:
    step(f"ping lan {bed.addr('LAN_HOST')} -> remote {bed.addr('REMOTE_HOST')} ({PINGS} echoes)")
    answered, rtt = send_ping(bed)
    step(f"iperf3 TCP lan -> remote for {IPERF_SECONDS} s")
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


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarize(bed: Testbed, ike: IkeTunnel, traffic: Traffic) -> bool:
    """Print the summary; True when traffic crossed the tunnel both ways."""
    sas = ike.gw1.list_sas()
    kernel = {
        r: parse_xfrm_state_stats(bed.ip(r, "-s", "xfrm", "state").stdout) for r in ("gw1", "gw2")
    }
    print()
    print("=" * 78)
    print("What crossed the tunnel")
    print("=" * 78)
    ok = True
    if not sas:
        print("IKE_SA: none at gw1 (negotiation failed; see the charon logs)")
        return False
    ike_sa: dict[str, Any] = sas[0]
    print(
        f"IKE_SA  {ike_sa.get('name')} #{ike_sa.get('uniqueid')}: {ike_sa.get('state')}, "
        f"IKEv{ike_sa.get('version')}, {ike_sa.get('encr-alg')}/{ike_sa.get('prf-alg')}/"
        f"{ike_sa.get('dh-group')}"
    )
    print(
        f"        {ike_sa.get('local-host')}[{ike_sa.get('local-port')}] <-> "
        f"{ike_sa.get('remote-host')}[{ike_sa.get('remote-port')}], "
        f"established {ike_sa.get('established')} s ago"
    )
    ok &= ike_sa.get("state") == "ESTABLISHED"
    for child in ike_sa.get("child-sas", {}).values():
        lts = ",".join(child.get("local-ts", []))
        rts = ",".join(child.get("remote-ts", []))
        print(
            f"CHILD_SA {child.get('name')}: {child.get('state')}, {child.get('mode')} "
            f"{child.get('protocol')} {child.get('encr-alg')}, {lts} === {rts}"
        )
        encap = "ESP in UDP 4500" if child.get("encap") == "yes" else "plain ESP (IP proto 50)"
        print(f"         {encap}, reqid {child.get('reqid')}")
        out_spi, in_spi = int(child["spi-out"], 16), int(child["spi-in"], 16)
        print()
        print(f"  {'direction':<28}{'SPI':>10}{'packets':>10}{'bytes':>12}   counted by")
        rows = (
            ("lan -> remote (gw1 encrypts)", out_spi, "gw1"),
            ("lan -> remote (gw2 decrypts)", out_spi, "gw2"),
            ("remote -> lan (gw2 encrypts)", in_spi, "gw2"),
            ("remote -> lan (gw1 decrypts)", in_spi, "gw1"),
        )
        for label, spi, role in rows:
            c = kernel[role].get(spi, SaCounters(0, 0, 0, 0))
            print(f"  {label:<28}{spi:>10x}{c.packets:>10}{c.bytes:>12}   {role} kernel")
            ok &= c.packets > 0
        print(
            f"  charon (gw1) counts {child.get('packets-out')} packets out, "
            f"{child.get('packets-in')} in"
        )
    print()
    rtt = f", rtt avg {traffic.rtt_avg_ms:.2f} ms" if traffic.rtt_avg_ms is not None else ""
    print(f"ping    {traffic.pings_answered}/{traffic.pings_sent} answered{rtt}")
    ok &= traffic.pings_answered == traffic.pings_sent
    if traffic.iperf_bytes is not None and traffic.iperf_mbit is not None:
        print(
            f"iperf3  {_fmt_bytes(traffic.iperf_bytes)} lan -> remote in {IPERF_SECONDS} s, "
            f"{traffic.iperf_mbit:.1f} Mbit/s (kernel ESP; emulated CPU in the VM)"
        )
    else:
        print(f"iperf3  failed: {traffic.iperf_error}")
        ok = False
    return ok


def main() -> int:
    before = root_netns_snapshot()
    ok = False
    try:
        bed = Testbed(prefix="")
        step("building the test bed: namespaces lan, gw1, gw2, remote (controller/testbed.py)")
        bed.build()
        try:
            with tempfile.TemporaryDirectory(prefix="xfp-demo-") as work:
                ike = bring_up(bed, Path(work))
                try:
                    traffic = send_traffic(bed)
                    ok = summarize(bed, ike, traffic)
                finally:
                    ike.stop()
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
