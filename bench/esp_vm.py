# SPDX-License-Identifier: GPL-2.0-only
"""`bench/e2e.py --esp`: the kernel in clear, the kernel's own ESP and the fastpath, per packet,
where the kernel has ESP (in this project: the real-kernel VM), in one run that loses nothing.

Cost: guest CPU busy time (/proc/stat, every CPU, all but idle and iowait) per delivered packet.
Under qemu `-icount shift=0` (`python -m testbed.vmrun --icount`) guest time advances 1 ns per
guest instruction while the guest runs, so busy ns are instructions; a vector instruction counts
as one, and instructions are not cycles (docs/design.md). Busy time, not the generator thread's:
the kernel's ESP and veth's NAPI may run in ksoftirqd or cryptd, and those are charged too.

Closed loop: the live-frame generator (bpf/tests/xdp_bench.c) sends WINDOW frames, then waits
until the sink has counted them all (or until nothing has moved for STALL_S: the shortfall is
lost) before it sends the next batch. No more than WINDOW frames are ever in flight, and no veth
ring holds more than VETH_RING_SIZE (256, drivers/net/veth.c), so a path slow in instructions
cannot make the generator drop frames in front of it (the open-loop bench lost 99% of the frames
at 512 and 1400 B before gw1's XDP saw them). Every loss is counted where it happened: the veth
devices' dropped counters (ip -s link: a full ring shows there), the datapath's verdict reasons
other than *_OK, and the kernel's IP and XFRM drop counters (/proc/net/snmp, xfrm_stat) in each
gateway. The path's cost per packet = (busy time - the source's busy time per frame x frames
sent) / frames delivered: the generator's work is taken off for every frame, lost ones included.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

WINDOW = 256  # frames in flight at most: VETH_RING_SIZE in drivers/net/veth.c
STALL_S = 1.0  # no frame counted for this long (guest time): the rest of the batch is lost
MODES = ("source", "kernel", "kernel-esp", "fastpath")
QEMU_OPTS_ENV = "XFRM_FASTPATH_QEMU_OPTS"  # set by testbed/vmrun.py in the guest
INSTR_NOTE = "instructions, not cycles: a vector instruction counts as one"

# What /proc/crypto is asked about, and the AF_ALG type that makes the kernel instantiate it
# (a template such as gcm(aes) is listed only once something has used it).
CRYPTO_ALGS = (
    ("chacha20", "skcipher"),
    ("poly1305", "hash"),
    ("rfc7539esp(chacha20,poly1305)", "aead"),
    ("gcm(aes)", "aead"),
    ("rfc4106(gcm(aes))", "aead"),
)


# -- which drivers the kernel picked ----------------------------------------------------------
def parse_proc_crypto(text: str) -> dict[str, str]:
    """name -> the driver of highest priority that is not internal (the one the crypto API
    hands out for that name, crypto/api.c crypto_alg_lookup)."""
    best: dict[str, tuple[int, str]] = {}
    for block in text.split("\n\n"):
        f: dict[str, str] = {}
        for line in block.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                f.setdefault(k.strip(), v.strip())
        name, driver = f.get("name"), f.get("driver")
        if not name or not driver or f.get("internal") == "yes":
            continue
        prio = int(f.get("priority", "0") or 0)
        if name not in best or prio > best[name][0]:
            best[name] = (prio, driver)
    return {n: d for n, (_, d) in best.items()}


def crypto_drivers() -> dict[str, str]:
    """The driver behind each of CRYPTO_ALGS here, after binding an AF_ALG socket to each so
    that templates are instantiated; "not available" where the kernel has none."""
    for name, kind in CRYPTO_ALGS:
        with (
            contextlib.suppress(OSError, AttributeError),
            socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as s,
        ):
            s.bind((kind, name))
    try:
        found = parse_proc_crypto(Path("/proc/crypto").read_text())
    except OSError:
        found = {}
    return {name: found.get(name, "not available") for name, _ in CRYPTO_ALGS}


# -- where frames were lost -------------------------------------------------------------------
SNMP_DROPS = {
    "Ip": ("InHdrErrors", "InAddrErrors", "InDiscards", "OutDiscards", "OutNoRoutes"),
    "Udp": ("InErrors", "RcvbufErrors", "NoPorts"),
}


def parse_snmp(text: str) -> dict[str, int]:
    """/proc/net/snmp's drop counters (SNMP_DROPS), as "Ip.InDiscards" -> count."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2], strict=False):
        names, values = head.split(), vals.split()
        proto = names[0].rstrip(":")
        for n, v in zip(names[1:], values[1:], strict=False):
            if n in SNMP_DROPS.get(proto, ()):
                out[f"{proto}.{n}"] = int(v)
    return out


def parse_xfrm_stat(text: str) -> dict[str, int]:
    """/proc/net/xfrm_stat: every counter there is an error (Documentation/networking/
    xfrm_proc.rst)."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def drop_counters(bed: Any) -> dict[str, int]:
    """Every counter a loss could show in, on every device and gateway of the test bed."""
    out: dict[str, int] = {}
    for role in ("lan", "gw1", "gw2", "remote"):
        proc = bed.ip(role, "-s", "-j", "link", "show", check=False)
        with contextlib.suppress(ValueError):
            for link in json.loads(proc.stdout or "[]"):
                st = link.get("stats64") or link.get("stats") or {}
                for way in ("rx", "tx"):
                    for what in ("dropped", "errors"):
                        out[f"{role}:{link['ifname']}:{way}_{what}"] = int(
                            st.get(way, {}).get(what, 0)
                        )
    for role in ("gw1", "gw2"):
        for path, parse in (
            ("/proc/net/snmp", parse_snmp),
            ("/proc/net/xfrm_stat", parse_xfrm_stat),
        ):
            proc = subprocess.run(
                [*bed.nsenter_argv(role), "cat", path], capture_output=True, text=True, timeout=30
            )
            for k, v in parse(proc.stdout).items():
                out[f"{role}:{k}"] = v
    with contextlib.suppress(OSError):  # one line per CPU, hex; the second field: dropped
        for cpu, line in enumerate(Path("/proc/net/softnet_stat").read_text().splitlines()):
            out[f"softnet:cpu{cpu}:dropped"] = int(line.split()[1], 16)
    return out


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# -- one closed-loop run ----------------------------------------------------------------------
def cpu_busy_s() -> float:
    """Seconds all CPUs together have not been idle, to the nanosecond: CPUs x CLOCK_MONOTONIC
    minus every CPU's idle and iowait sleep time (/proc/timer_list's .idle_sleeptime and
    .iowait_sleeptime, kernel/time/timer_list.c, kept by the NOHZ code on CLOCK_MONOTONIC; a
    CPU running this is not idle, so no sleep is in progress on it). /proc/stat counts the same
    in 10 ms ticks, too coarse for short runs; it is the fallback."""
    now = time.monotonic()
    with contextlib.suppress(OSError):
        idle = [
            int(line.split(":")[1].split()[0])
            for line in Path("/proc/timer_list").read_text().splitlines()
            if line.strip().startswith((".idle_sleeptime", ".iowait_sleeptime"))
        ]
        if idle:
            return (os.cpu_count() or 1) * now - sum(idle) / 1e9
    hz = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        parts = f.readline().split()  # the "cpu" line: every CPU summed
    ticks = [int(x) for x in parts[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / hz


@dataclass
class Closed:
    """One closed-loop run of one mode and size."""

    mode: str
    label: str
    sent: int
    delivered: int
    busy_s: float  # guest CPU time, every CPU (instructions x 1 ns under icount)
    wall_s: float
    batches: int
    polls: int  # reads of the sink's counter (charged to every mode alike)
    stalls: int  # batches that never completed: the rest was counted lost
    losses: dict[str, int] = field(default_factory=dict)  # counter -> delta, nonzero only
    path_ns: float = 0.0  # set by the caller: (busy - source per frame x sent) / delivered

    @property
    def lost(self) -> int:
        return self.sent - self.delivered

    @property
    def busy_ns_per_packet(self) -> float:
        return 1e9 * self.busy_s / self.delivered if self.delivered else 0.0

    @property
    def busy_ns_per_frame(self) -> float:  # per frame sent: the source's own cost
        return 1e9 * self.busy_s / self.sent if self.sent else 0.0


def closed_loop(
    e2e: Any, total: int, window: int = WINDOW
) -> tuple[int, int, float, float, int, int, int]:
    """Send `total` frames, `window` at a time, each batch once the last has reached the sink.
    Runs in a thread on CPU 0 in the lan host's namespace (the generator's device lives there).
    Returns (sent, delivered, busy_s, wall_s, batches, polls, stalls)."""
    from controller.datapath.bpfsys import prog_run_live
    from controller.netns import in_netns

    traffic = e2e.traffic
    frame = e2e.header + bytes(1400 - 28)
    box: list[Any] = []

    def body() -> None:
        try:
            os.sched_setaffinity(0, {0})
            with in_netns(e2e.bed.ns("lan")):
                sent = batches = polls = stalls = 0
                p0 = target = traffic.counted()[0]
                b0, t0 = cpu_busy_s(), time.monotonic()
                while sent < total:
                    n = min(window, total - sent)
                    prog_run_live(traffic.gen.fd, frame, e2e.lan_eth0, n, batch_size=64)
                    sent, target, batches = sent + n, target + n, batches + 1
                    nap, seen, moved = 0.0, -1, time.monotonic()
                    while True:
                        got = traffic.counted()[0]
                        polls += 1
                        if got >= target:
                            break
                        now = time.monotonic()
                        if got != seen:
                            seen, moved = got, now
                        elif now - moved > STALL_S:
                            stalls, target = stalls + 1, got  # the rest of it is lost
                            break
                        nap = min(0.005, max(0.0002, 2 * nap))
                        time.sleep(nap)  # idle: costs no busy time
                busy, wall = cpu_busy_s() - b0, time.monotonic() - t0
                box.append((sent, traffic.counted()[0] - p0, busy, wall, batches, polls, stalls))
        except BaseException as e:  # handed to the caller's thread
            box.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def measure(
    e2e: Any, mode: str, label: str, sizes: Sequence[int], seconds: float, max_wall: float = 1.5
) -> Closed:
    """Calibrate the frame count on a short run, then one run of about `seconds` of guest time,
    with the loss counters read around it."""
    e2e.set_mode(mode)
    e2e.traffic.configure(e2e.header, sizes, e2e.flows)
    total = 4 * WINDOW
    for _ in range(5):  # warm-up and calibration: grow until a run takes a measurable time
        _, _, busy, wall, _, _, _ = closed_loop(e2e, total)
        if busy >= seconds / 10 or wall >= max_wall / 5:
            break
        total *= 4
    # `seconds` of guest CPU time, or `max_wall` of guest time if the CPU idles meanwhile
    scale = min(seconds / max(busy, 1e-4), max_wall / max(wall, 1e-4))
    total = max(WINDOW, min(int(total * scale), 20_000_000))
    c0, s0 = drop_counters(e2e.bed), (e2e.gw1.stats(), e2e.gw2.stats())
    sent, got, busy, wall, batches, polls, stalls = closed_loop(e2e, total)
    losses = delta(c0, drop_counters(e2e.bed))
    losses.update(e2e._punts(s0))  # datapath verdicts other than *_OK, by reason
    return Closed(mode, label, sent, got, busy, wall, batches, polls, stalls, losses)


# -- the run and its table --------------------------------------------------------------------
def guest_machine() -> dict[str, str]:
    model, flags = "?", set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    opts = os.environ.get(QEMU_OPTS_ENV, "")
    return {
        "cpu": model,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "simd": " ".join(x for x in ("avx", "avx2", "avx512f", "aes", "pclmulqdq") if x in flags),
        "qemu_opts": opts,
        "icount": str("icount" in opts).lower(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def ratios(
    runs: dict[tuple[str, str], Closed], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per size label: fastpath / kernel ESP and fastpath / kernel clear, path cost per packet
    (each where both figures were measured)."""
    out: dict[str, dict[str, float]] = {}
    for label in labels:
        k, ke, f = (runs.get((m, label)) for m in ("kernel", "kernel-esp", "fastpath"))
        r = {}
        if f and ke and ke.path_ns:
            r["fastpath_over_kernel_esp"] = f.path_ns / ke.path_ns
        if f and k and k.path_ns:
            r["fastpath_over_kernel_clear"] = f.path_ns / k.path_ns
        if r:
            out[label] = r
    return out


def table(runs: dict[tuple[str, str], Closed], labels: Sequence[str], m: dict[str, str],
          drivers: dict[str, str]) -> str:  # fmt: skip
    icount = m.get("icount") == "true"
    unit = "k instr/pkt" if icount else "CPU µs/pkt"
    how = (
        f"qemu {m['qemu_opts']} (guest CPU ns = instructions; {INSTR_NOTE})"
        if icount
        else "no instruction counting: guest CPU time, not instructions"
    )
    lines = [
        f"Kernel ESP next to the fastpath, per packet delivered ({m['cpu']}, {m['cpus']} vCPU, "
        f"Linux {m['kernel']}, SIMD {m['simd'] or 'none'}, {m['date']}); {how}. "
        f"Closed loop, at most {WINDOW} frames in flight; the path's cost = guest busy time "
        "minus the source's per frame sent, over frames delivered.",
        "",
        "Crypto drivers the kernel picked (/proc/crypto): "
        + ", ".join(f"{n} -> {d}" for n, d in drivers.items())
        + ".",
        "",
        f"| size (IPv4 B) | source {unit} | kernel clear {unit} | kernel ESP {unit} | fastpath "
        f"ESP {unit} | fastpath / kernel ESP ({INSTR_NOTE if icount else 'CPU time'}) | "
        f"fastpath / kernel clear | delivered / sent (clear, ESP, fastpath) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rs = ratios(runs, labels)
    for label in labels:
        src, k, ke, f = (runs.get((mode, label)) for mode in MODES)
        if not (src and k and ke and f):
            continue
        r = rs.get(label, {})
        e, c = r.get("fastpath_over_kernel_esp"), r.get("fastpath_over_kernel_clear")
        lines.append(
            f"| {label} | {src.busy_ns_per_frame / 1e3:.1f} | {k.path_ns / 1e3:.1f} | "
            f"{ke.path_ns / 1e3:.1f} | {f.path_ns / 1e3:.1f} | "
            f"{f'{e:.2f}x' if e else '-'} | {f'{c:.2f}x' if c else '-'} | "
            + ", ".join(f"{x.delivered:,}/{x.sent:,}" for x in (k, ke, f))
            + " |"
        )
    lost = {f"{mode} {label}": (x.lost, x.stalls, x.losses) for (mode, label), x in runs.items()
            if x.lost or x.losses}  # fmt: skip
    lines += ["", "Losses (frames lost, batches stalled, counters that moved):"]
    lines += [f"- {k}: {v[0]} lost, {v[1]} stalled, {v[2]}" for k, v in lost.items()] or [
        "- none: every frame sent reached the sink, and no drop counter moved"
    ]
    return "\n".join(lines)


def _modes(
    e2e: Any,
    modes: Sequence[str],
    rows: Sequence[tuple[str, tuple[int, ...]]],
    seconds: float,
    t0: float,
    log: Callable[[str], None],
    tag: str = "",
) -> dict[tuple[str, str], Closed]:
    """Each mode at each size in one bed; the path's cost set on each run."""
    runs: dict[tuple[str, str], Closed] = {}
    for label, sizes in rows:
        for mode in modes:
            c = measure(e2e, mode, label, sizes, seconds)
            runs[(mode, label)] = c
            src = runs[("source", label)]
            # the source's frames all reach its sink; its busy time per frame is the
            # generator's own, taken off every mode's for every frame it sent.
            c.path_ns = (
                max(0.0, (c.busy_s * 1e9 - src.busy_ns_per_frame * c.sent) / c.delivered)
                if c.delivered
                else 0.0
            )
            log(
                f"  [{time.monotonic() - t0:5.0f} s] {tag}{label:>5} {mode:10}: "
                f"{c.delivered:,}/{c.sent:,} delivered, "
                f"{c.busy_ns_per_packet:,.0f} busy ns/pkt "
                f"({c.busy_s / max(c.wall_s, 1e-9):.0%} of "
                f"{c.wall_s:.2f} s), path {c.path_ns:,.0f} ns/pkt, "
                f"{c.polls / max(1, c.batches):.1f} polls/batch {c.losses or ''}"
            )
    return runs


# The kernel-crypto part: both gateways' XDP sealing and opening with the xfp_crypto module's
# kfuncs (issue 17), against the kernel's ESP with the same AEAD, at the goal sizes.
KC_MODES = ("source", "kernel-esp", "fastpath")
KC_ROWS: tuple[tuple[str, tuple[int, ...]], ...] = (("64", (64,)), ("1400", (1400,)))


def kcrypto_part(
    kc_bed: Callable[[str], Any],
    algs: Sequence[str],
    seconds: float,
    t0: float,
    log: Callable[[str], None],
) -> dict[str, dict[tuple[str, str], Closed]]:
    """alg -> that AEAD's runs (KC_MODES x KC_ROWS), each in a bed of its own."""
    out: dict[str, dict[tuple[str, str], Closed]] = {}
    for alg in algs:
        log(f"  --esp: kernel crypto, {alg}: building the test bed (the -DXFP_KCRYPTO build)")
        try:
            with kc_bed(alg) as e2e:
                out[alg] = _modes(e2e, KC_MODES, KC_ROWS, seconds, t0, log, tag=f"kc {alg} ")
        except Exception as e:  # the part before stands; say why this one is missing
            log(f"  --esp: kernel crypto, {alg}: not measured: {type(e).__name__}: {e}")
    return out


def kcrypto_table(kc: dict[str, dict[tuple[str, str], Closed]], icount: bool) -> str:
    unit = "k instr/pkt" if icount else "CPU µs/pkt"
    lines = [
        "Kernel crypto (the xfp_crypto module's kfuncs in XDP on both gateways) against the "
        f"kernel's ESP with the same AEAD ({INSTR_NOTE if icount else 'CPU time'}):",
        "",
        f"| AEAD | size (IPv4 B) | kernel ESP {unit} | fastpath, kernel crypto {unit} | "
        "fastpath / kernel ESP | delivered / sent (kernel ESP, fastpath) |",
        "|---|---|---|---|---|---|",
    ]
    for alg, runs in kc.items():
        for label, _ in KC_ROWS:
            ke, f = runs.get(("kernel-esp", label)), runs.get(("fastpath", label))
            if not (ke and f):
                continue
            r = f.path_ns / ke.path_ns if ke.path_ns else None
            lines.append(
                f"| {alg} | {label} | {ke.path_ns / 1e3:.1f} | {f.path_ns / 1e3:.1f} | "
                f"{f'{r:.2f}x' if r else '-'} | {ke.delivered:,}/{ke.sent:,}, "
                f"{f.delivered:,}/{f.sent:,} |"
            )
    lost = [f"- kc {alg} {mode} {label}: {x.lost} lost, {x.stalls} stalled, {x.losses}"
            for alg, runs in kc.items() for (mode, label), x in runs.items()
            if x.lost or x.losses]  # fmt: skip
    lines += ["", "Losses: " + ("none" if not lost else ""), *lost]
    return "\n".join(lines)


def kcrypto_ratios(kc: dict[str, dict[tuple[str, str], Closed]]) -> dict[str, dict[str, float]]:
    """alg -> size label -> fastpath (kernel crypto) / kernel ESP, path cost per packet."""
    out: dict[str, dict[str, float]] = {}
    for alg, runs in kc.items():
        for label, _ in KC_ROWS:
            ke, f = runs.get(("kernel-esp", label)), runs.get(("fastpath", label))
            if ke and f and ke.path_ns:
                out.setdefault(alg, {})[label] = f.path_ns / ke.path_ns
    return out


def run(
    e2e_bed: Callable[[], Any],
    rows: Sequence[tuple[str, tuple[int, ...]]],
    seconds: float = 1.0,
    out: Path | None = None,
    log: Callable[[str], None] = print,
    kc_bed: Callable[[str], Any] | None = None,
    kc_algs: Sequence[str] = (),
) -> tuple[str, dict[str, Any]]:
    """Every mode at every size, in one test bed (e2e_bed(): a context manager giving an
    E2EBed of 1 CPU); then, with `kc_bed` (alg -> such a bed on the kernel crypto backend),
    the kernel-crypto part for each of `kc_algs`. Returns the Markdown table and what goes to
    vm-esp.json (also written under `out`)."""
    t0 = time.monotonic()
    log("  --esp: building the test bed and compiling the programs (slow under emulation)")
    with e2e_bed() as e2e:
        log(f"  --esp: test bed up after {time.monotonic() - t0:.0f} s")
        runs = _modes(e2e, MODES, rows, seconds, t0, log)
    kc = kcrypto_part(kc_bed, kc_algs, seconds, t0, log) if kc_bed is not None else {}
    drivers = crypto_drivers()
    m = guest_machine()
    labels = [label for label, _ in rows]
    text = table(runs, labels, m, drivers)
    if kc:
        text += "\n\n" + kcrypto_table(kc, m.get("icount") == "true")
    data = {
        "machine": m,
        "crypto": drivers,
        "window": WINDOW,
        "runs": [asdict(c) | {"lost": c.lost} for c in runs.values()],
        "ratios": ratios(runs, labels),
        "kcrypto_runs": {
            a: [asdict(c) | {"lost": c.lost} for c in r.values()] for a, r in kc.items()
        },
        "kcrypto_ratios": kcrypto_ratios(kc),
        "note": INSTR_NOTE,
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "vm-esp.md").write_text(
            "# Kernel ESP vs the fastpath, instructions per packet (`bench/e2e.py --esp`)\n\n"
            + text
            + "\n"
        )
        (out / "vm-esp.json").write_text(json.dumps(data, indent=1))
    return text, data
