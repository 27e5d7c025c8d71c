# SPDX-License-Identifier: GPL-2.0-only
"""Where the per-packet time of the XDP datapath goes, stage by stage, next to the floor program.

    .venv/bin/python bench/stages.py [--size 64] [--runs 200] [--trials 5]

bpf/xdp_encap.c and bpf/xdp_decap.c are built once per stage with -DXFP_STOP_AT=n: that build
ends with XDP_DROP right after stage n (the XFP_ENC_STAGE_* / XFP_DEC_STAGE_* lists at the top of
each program), and 0 is the whole program. The time of a stage is the difference between the
build that stops after it and the one that stops before it. Each build has its own pinned maps
(one outbound SA, one inbound SA, one flow each way, as bench/datapath_bench.py sets them up).

Timing: BPF_PROG_TEST_RUN with repeat=1 (a decap frame may be run once only: the window moves
over it), the fastest of `runs` runs; the builds take turns within a trial, and the figure is
the median over `trials` trials. The machine is shared: read the ratios to the floor program
(bpf/tests/xdp_floor.c, measured in the same trials), not the absolute times.

Outside the AEAD, two ways: by stage, the whole program minus its AEAD stages (encap: the seal;
decap: the ICV check, the peek's keystream block 1 and the decryption of the rest); and as
issue 16 counts it, encap + decap minus the AEAD alone (seal + open of the same ESP payload in
bpf/tests/test_aead.c, bench/aead_bench.py's BPF figures), which also charges any crypto work
the programs do beyond one seal and one open. The target of issue 16 is encap + decap outside
the AEAD at most 2x the floor program (once per program, so 2x of 2 floors).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bpf"))  # test_datapath.py's frames and SAs
sys.path.insert(0, str(ROOT / "tests" / "lib"))  # packets.py, which test_datapath.py imports


XDP_DROP, XDP_TX, XDP_REDIRECT = 1, 3, 4

# (XFP_STOP_AT value, stage name, part of the AEAD); 0, the whole program, comes last.
ENCAP_STAGES = (
    (1, "parse + flow key", False),
    (2, "flow lookup", False),
    (3, "SA + watchdog lookup, checks", False),
    (4, "sequence number", False),
    (5, "header build + checksum", False),
    (6, "AEAD seal", True),
    (0, "counters + redirect", False),
)
DECAP_STAGES = (
    (1, "parse", False),
    (2, "SA + watchdog lookup", False),
    (3, "replay check", False),
    (4, "AEAD ICV check", True),
    (5, "replay window", False),
    (6, "peek: keystream block 1, inner checks", True),
    (7, "flow lookup", False),
    (8, "AEAD decrypt", True),
    (9, "trailer + pad check", False),
    (10, "checksum + header build", False),
    (0, "counters + redirect", False),
)


@dataclass
class Stage:
    name: str
    aead: bool
    cum: float  # ns of the build that stops after this stage
    ns: float  # this stage alone: cum minus the previous stage's cum


@dataclass
class Breakdown:
    size: int
    floor: float
    encap: list[Stage] = field(default_factory=list)
    decap: list[Stage] = field(default_factory=list)
    aead_seal: float | None = None  # the AEAD alone, BPF, this ESP payload (bench/aead_bench.py)
    aead_open: float | None = None

    @staticmethod
    def _total(stages: list[Stage]) -> float:
        return stages[-1].cum

    @staticmethod
    def _outside(stages: list[Stage]) -> float:
        return stages[-1].cum - sum(s.ns for s in stages if s.aead)

    @property
    def non_aead_over_floor(self) -> float:
        """encap + decap outside the AEAD, over the floor program twice (issue 16's measure)."""
        return (self._outside(self.encap) + self._outside(self.decap)) / (2 * self.floor)

    @property
    def issue_ratio(self) -> float | None:
        """(encap + decap - (seal + open alone)) / (2 x floor): issue 16's own measure."""
        if self.aead_seal is None or self.aead_open is None:
            return None
        rest = self._total(self.encap) + self._total(self.decap) - self.aead_seal - self.aead_open
        return rest / (2 * self.floor)


def _datapath_bench():
    """bench/datapath_bench.py, whose loaded_datapath() and fastest() this bench shares."""
    spec = importlib.util.spec_from_file_location(
        "datapath_bench", ROOT / "bench" / "datapath_bench.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["datapath_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _stages(table: tuple, times: dict[int, float]) -> list[Stage]:
    out, prev = [], 0.0
    for stop, name, aead in table:
        cum = times[stop]
        out.append(Stage(name, aead, cum, cum - prev))
        prev = cum
    return out


def _aead_alone(clen: int) -> tuple[float, float] | None:
    """BPF seal and open (verify + decrypt) of clen bytes alone, by bench/aead_bench.py."""
    spec = importlib.util.spec_from_file_location("aead_bench", ROOT / "bench" / "aead_bench.py")
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aead_bench"] = mod
    spec.loader.exec_module(mod)
    b, fn = mod.load_bpf()
    try:
        return mod.bpf_ns(fn, mod.SEAL, clen, 100), mod.bpf_ns(fn, mod.OPEN_COST, clen, 100)
    finally:
        b.cleanup()


def measure(size: int = 64, runs: int = 100, trials: int = 9) -> Breakdown:
    import test_datapath as T

    from controller.datapath.loader import Prog, compile_bpf, load_program

    db = _datapath_bench()
    floor_fd = load_program(compile_bpf("tests/xdp_floor.c"), "xdp_floor", Prog.XDP).fd
    stops = sorted({s for s, _, _ in ENCAP_STAGES} | {s for s, _, _ in DECAP_STAGES})
    enc_stops = {s for s, _, _ in ENCAP_STAGES}
    payload = bytes(i & 0xFF for i in range(size - 28))
    clear = [T.clear_frame(payload)] * runs
    inner = T.inner_packet(payload)
    # Every build has its own inbound SA: each walks the same sequence numbers, once.
    esp = [T.esp_frame(inner, seq) for seq in range(1, runs * trials + 1)]
    dps = {}
    samples: dict[tuple[str, int], list[float]] = {}
    try:
        for stop in stops:
            dps[stop] = db.loaded_datapath(
                f"/sys/fs/bpf/xfp-stages-{os.getpid()}-{stop}", (f"-DXFP_STOP_AT={stop}",)
            )
        for t in range(trials):
            samples.setdefault(("floor", 0), []).append(db.fastest(floor_fd, clear, XDP_TX))
            for stop, dp in dps.items():
                want = XDP_REDIRECT if stop == 0 else XDP_DROP
                if stop in enc_stops:
                    ns = db.fastest(dp.encap_fd, clear, want)
                    samples.setdefault(("encap", stop), []).append(ns)
                ns = db.fastest(dp.decap_fd, esp[t * runs : (t + 1) * runs], want)
                samples.setdefault(("decap", stop), []).append(ns)
    finally:
        for dp in dps.values():
            dp.close()
            dp.unpin()
    med = {k: statistics.median(v) for k, v in samples.items()}
    clen = size + 2 + (-(size + 2) % 4)  # ESP payload: inner, pad to 4 (RFC 4303 2.4), 2 bytes
    aead = _aead_alone(clen)
    return Breakdown(
        size=size,
        floor=med[("floor", 0)],
        encap=_stages(ENCAP_STAGES, {s: med[("encap", s)] for s in enc_stops}),
        decap=_stages(DECAP_STAGES, {s: med[("decap", s)] for s in stops}),
        aead_seal=aead[0] if aead else None,
        aead_open=aead[1] if aead else None,
    )


def table(b: Breakdown) -> str:
    lines = [
        f"XDP datapath by stage, {b.size} B inner IPv4 (BPF_PROG_TEST_RUN, fastest run, median "
        "of trials; x floor = ns / the floor program's ns)",
        f"  floor (parse + XDP_TX, bpf/tests/xdp_floor.c): {b.floor:.0f} ns",
    ]
    for prog, stages in (("xdp_encap", b.encap), ("xdp_decap", b.decap)):
        lines.append(f"  {prog:40s} |  stage ns | x floor | cumul. ns | x floor")
        for s in stages:
            mark = " *" if s.aead else "  "
            lines.append(
                f"  {s.name + mark:40s} | {s.ns:9.0f} | {s.ns / b.floor:7.2f} | {s.cum:9.0f} | "
                f"{s.cum / b.floor:7.2f}"
            )
        out = Breakdown._outside(stages)
        lines.append(
            f"  {'outside the AEAD (* excluded)':40s} | {out:9.0f} | {out / b.floor:7.2f} |"
        )
    lines.append(
        f"  encap + decap outside the AEAD stages / (2 x floor): {b.non_aead_over_floor:.2f}"
    )
    if b.issue_ratio is not None:
        lines.append(
            f"  encap + decap - AEAD alone (seal {b.aead_seal:.0f} + open {b.aead_open:.0f} ns) "
            f"/ (2 x floor): {b.issue_ratio:.2f} (issue 16's measure; target <= 2)"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--trials", type=int, default=9)
    args = ap.parse_args()
    print(table(measure(args.size, args.runs, args.trials)))


if __name__ == "__main__":
    main()
