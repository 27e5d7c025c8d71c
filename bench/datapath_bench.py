# SPDX-License-Identifier: GPL-2.0-only
"""Per-packet cost of the XDP datapath next to its floor and to the AEAD alone, in one table.

    .venv/bin/python bench/datapath_bench.py [--runs N]

Per inner IPv4 packet size (64, 256, 512, 1024, 1400 B): ns of bpf/xdp_encap.c (clear frame ->
ESP, redirected) and bpf/xdp_decap.c (ESP -> clear, ICV, replay window, peek, flow lookup,
decrypt, strip, redirected), the parse-and-XDP_TX floor (bpf/tests/xdp_floor.c), and from
bench/aead_bench.py the AEAD alone: in BPF (its harness, mean of repeat=100), the same C built
natively with gcc -O2, and OpenSSL. encap - bpf seal is what the datapath adds around the AEAD.

Timing: BPF_PROG_TEST_RUN with repeat=1 (the kernel times the single run), the fastest of
`runs` runs. repeat > 1 cannot be used here: the kernel reruns the program on the frame the
previous run left (already encapsulated or decapsulated), and a replayed ESP frame would be
dropped by the window -- so every decap run gets its own sequence number.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bpf"))  # test_datapath.py's frames and SAs
sys.path.insert(0, str(ROOT / "tests" / "lib"))  # packets.py, which test_datapath.py imports

from controller.datapath.bpfsys import prog_test_run  # noqa: E402

SIZES = (64, 256, 512, 1024, 1400)
XDP_TX, XDP_REDIRECT = 3, 4


@dataclass
class Row:
    size: int
    floor: float
    encap: float
    decap: float
    bpf_seal: float | None
    bpf_open: float | None
    native_seal: float | None
    native_open: float | None
    openssl: float | None


def _aead_bench():  # bench/aead_bench.py (the crypto engineer's), imported by path
    spec = importlib.util.spec_from_file_location("aead_bench", ROOT / "bench" / "aead_bench.py")
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["aead_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def fastest(fd: int, frames: list[bytes], want: int) -> float:
    """The fastest of one test run per frame (ns), each checked for the verdict `want`."""
    best = None
    for f in frames:
        ret, _, ns = prog_test_run(fd, f, repeat=1)
        if ret != want:
            raise RuntimeError(f"verdict {ret}, expected {want}")
        best = ns if best is None else min(best, ns)
    return float(best)


def loaded_datapath(pin_dir: str, cflags: tuple[str, ...] = ()):
    """Both XDP programs loaded (frames up to 1600 B) on the test run's loopback device, with
    test_datapath.py's SA pair and one flow each way: what the per-program benchmarks time.
    The caller closes and unpins it; on a failure here it is closed and unpinned already."""
    import test_datapath as T

    from controller.core.state import Direction
    from controller.datapath.xdp import Datapath, flow_key, flow_val

    dp = Datapath(pin_dir=pin_dir, cflags=("-DXFP_MAX_FRAME=1600", *cflags))
    try:
        dp.load()
        dp.put_tx_port(T.LO)
        dp.put_outbound_sa(T.out_sa(mtu=1600))
        dp.put_inbound_sa(T.in_sa(replay_window=4096))
        dp.put_flow(flow_key(T.LO, Direction.ENCAP, **T.ENCAP_KEY), flow_val(T.SA_OUT_ID))
        dp.put_flow(
            flow_key(T.LO, Direction.DECAP, **T.DECAP_KEY),
            flow_val(T.SA_IN_ID, egress_ifindex=T.LO, dmac=T.LAN_HOST_MAC, smac=T.GW1_LAN_MAC),
        )
    except BaseException:
        dp.close()
        dp.unpin()
        raise
    return dp


def measure(sizes: tuple[int, ...] = SIZES, runs: int = 400, with_aead: bool = True) -> list[Row]:
    import test_datapath as T

    from controller.datapath.loader import Prog, compile_bpf, load_program

    floor_b = compile_bpf("tests/xdp_floor.c")
    floor_fd = load_program(floor_b, "xdp_floor", Prog.XDP).fd
    aead = {}
    if with_aead and (mod := _aead_bench()) is not None:
        aead = {r.size: r for r in mod.measure(sizes)}
    dp = loaded_datapath(f"/sys/fs/bpf/xfp-bench-{os.getpid()}")
    rows = []
    try:
        seq = 1
        for size in sizes:
            payload = bytes(i & 0xFF for i in range(size - 28))
            clear = T.clear_frame(payload)
            inner = T.inner_packet(payload)
            esp = []
            for _ in range(runs):
                esp.append(T.esp_frame(inner, seq))
                seq += 1
            a = aead.get(size)
            rows.append(
                Row(
                    size=size,
                    floor=fastest(floor_fd, [clear] * runs, XDP_TX),
                    encap=fastest(dp.encap_fd, [clear] * runs, XDP_REDIRECT),
                    decap=fastest(dp.decap_fd, esp, XDP_REDIRECT),
                    bpf_seal=a.bpf_seal if a else None,
                    bpf_open=a.bpf_open if a else None,
                    native_seal=a.native_seal if a else None,
                    native_open=a.native_open if a else None,
                    openssl=a.openssl if a else None,
                )
            )
    finally:
        dp.close()
        dp.unpin()
    return rows


def table(rows: list[Row]) -> str:
    def f(v: float | None) -> str:
        return f"{v:9.0f}" if v is not None else "        -"

    def ratio(a: float, b: float | None) -> str:
        return f"{a / b:9.2f}" if b else "        -"

    head = (
        "  size |  floor ns |  encap ns |  decap ns | bpf seal | bpf open | nat.seal | nat.open "
        "|  openssl | encap/nat | decap/nat | encap/ossl"
    )
    lines = [
        "XDP datapath, ns per packet (BPF_PROG_TEST_RUN, fastest run; size = inner IPv4 bytes)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        lines.append(
            f"{r.size:6d} |{f(r.floor)}  |{f(r.encap)}  |{f(r.decap)}  |{f(r.bpf_seal)} |"
            f"{f(r.bpf_open)} |{f(r.native_seal)} |"
            f"{f(r.native_open)} |{f(r.openssl)} |{ratio(r.encap, r.native_seal)}  |"
            f"{ratio(r.decap, r.native_open)}  |{ratio(r.encap, r.openssl)}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=400)
    ap.add_argument("--no-aead", action="store_true", help="skip the native/OpenSSL columns")
    args = ap.parse_args()
    print(table(measure(runs=args.runs, with_aead=not args.no_aead)))


if __name__ == "__main__":
    main()
