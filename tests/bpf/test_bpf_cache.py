# SPDX-License-Identifier: GPL-2.0-only
"""The compiled-program cache (controller/datapath/bpf_cache.py) with BCC and this kernel: a
module from the cache carries the same instructions as a fresh compile, map for map, and its
programs do the same work (an encap frame sealed byte for byte alike, a tracepoint attached);
every way an entry can be wrong (corrupt, tables changed, a directory others may write to, a
source without maps.h) ends in a full compile, counted."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import packets as P
import pytest

from controller.core.state import Direction
from controller.datapath import bpf_cache
from controller.datapath.bpfsys import prog_test_run
from controller.datapath.loader import BPF_DIR, INCLUDE_DIR, compile_bpf
from controller.datapath.xdp import Datapath, OutboundSa, flow_key, flow_val

LAN_HOST, REMOTE_HOST, GW1_WAN, GW2_WAN = "10.1.0.2", "10.2.0.2", "192.0.2.1", "192.0.2.2"
KEY = bytes(range(0x40, 0x40 + 36))
XDP_REDIRECT = 4


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    d = tmp_path / "bpf-cache"
    monkeypatch.setenv(bpf_cache.ENV, str(d))
    yield d


@pytest.fixture
def pin() -> Iterator[str]:
    """A pin directory of this test's own (tc_reseq.c pins its maps), removed after."""
    d = Path(f"/sys/fs/bpf/xfp-cache-test-{os.getpid()}")
    yield str(d)
    for f in d.glob("*"):
        f.unlink()
    if d.exists():
        d.rmdir()


def unpin(*tags: str) -> None:
    """Remove the pin directories /sys/fs/bpf/xfp-cache-TAG-PID a test's compiles made."""
    for tag in tags:
        d = Path(f"/sys/fs/bpf/xfp-cache-{tag}-{os.getpid()}")
        for f in d.glob("*"):
            f.unlink()
        if d.exists():
            d.rmdir()


def stats_delta(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in bpf_cache.STATS.items() if v != before.get(k, 0)}


def normalised(bpf, name: bytes) -> tuple[bytes, list[tuple[int, str]]]:
    """A function's instructions with map fds zeroed, and which map each reference names."""
    names = {fd: n for n, fd in bpf_cache.table_fds(bpf.module).items()}
    insns = bpf.dump_func(name)
    refs = bpf_cache.map_references(insns, names)
    return bpf_cache.bind(insns, refs, dict.fromkeys(names.values(), 0)), refs


def test_hit_has_the_compiled_instructions_map_for_map(cache: Path) -> None:
    before = dict(bpf_cache.STATS)
    fresh = compile_bpf("xdp_encap.c", pin_dir=f"/sys/fs/bpf/xfp-cache-a-{os.getpid()}")
    cached = compile_bpf("xdp_encap.c", pin_dir=f"/sys/fs/bpf/xfp-cache-b-{os.getpid()}")
    try:
        assert stats_delta(before) == {"miss": 1, "stored": 1, "hit": 1}
        assert type(cached).__name__ == "CachedBPF" and type(fresh).__name__ == "BPF"
        assert len(list(cache.glob("*.json"))) == 1, "one entry for one source and flag set"
        ins_f, refs_f = normalised(fresh, b"xdp_encap")
        ins_c, refs_c = normalised(cached, b"xdp_encap")
        assert refs_f and refs_c == refs_f, "the same maps referenced at the same instructions"
        assert ins_c == ins_f, "otherwise the same instructions"
        assert bpf_cache.table_fds(cached.module).keys() == bpf_cache.table_fds(fresh.module).keys()
    finally:
        for b in (fresh, cached):
            b.cleanup()
        unpin("a", "b")


def _encap_once(pin: str) -> tuple[int, bytes, Datapath]:
    d = Datapath(pin_dir=pin)
    d.load()
    lo = socket.if_nametoindex("lo")
    d.put_tx_port(lo)
    d.put_outbound_sa(
        OutboundSa(
            sa_id=1, spi=0x1000, saddr=GW1_WAN, daddr=GW2_WAN, key=KEY, egress_ifindex=lo,
            dmac="02:00:c0:00:02:02", smac="02:00:c0:00:02:01", mtu=1500,
        )
    )  # fmt: skip
    key = dict(proto=P.IPPROTO_UDP, saddr=LAN_HOST, daddr=REMOTE_HOST, sport=1000, dport=2000)
    d.put_flow(flow_key(lo, Direction.ENCAP, **key), flow_val(1))
    inner = P.ipv4(LAN_HOST, REMOTE_HOST, P.IPPROTO_UDP, P.udp(1000, 2000, b"z" * 300))
    ret, out, _ = prog_test_run(d.encap_fd, P.eth("02:00:0a:01:00:01", "02:00:0a:01:00:02") + inner)
    return ret, out, d


def test_datapath_from_the_cache_seals_byte_for_byte_alike(cache: Path) -> None:
    before = dict(bpf_cache.STATS)
    pins = [f"/sys/fs/bpf/xfp-cache-{n}-{os.getpid()}" for n in ("c", "d")]
    made: list[Datapath] = []
    try:
        outs = []
        for pin in pins:
            ret, out, d = _encap_once(pin)
            made.append(d)
            assert ret == XDP_REDIRECT, f"encap redirected (got {ret})"
            outs.append(out)
        assert stats_delta(before).get("hit", 0) >= 2, "the second datapath came from the cache"
        assert outs[0] == outs[1], "the same ESP frame from both (same key, sequence, IV)"
        seq, _, plain = P.EspSa(0x1000, KEY).open(outs[1][34:])
        assert seq == 1 and plain[-1] == P.IPPROTO_IPIP, "and it opens with cryptography"
    finally:
        for d in made:
            d.close()
            d.unpin()


def test_tracepoint_program_from_the_cache_is_attached(cache: Path) -> None:
    text = (
        b'#define XFP_MAPS_LEARN\n#include "maps.h"\n'
        b"TRACEPOINT_PROBE(net, netif_receive_skb) {\n"
        b"  u32 k = 0; u64 *v = learn_stats.lookup(&k); if (v) __sync_fetch_and_add(v, 1);\n"
        b"  return 0;\n}\n"
    )
    first = compile_bpf(text=text)
    first.cleanup()
    before = dict(bpf_cache.STATS)
    b = compile_bpf(text=text)
    try:
        assert stats_delta(before) == {"hit": 1}
        assert b"net:netif_receive_skb" in b.tracepoint_fds, "attached as BCC attaches it"
    finally:
        b.cleanup()


def test_corrupt_entry_is_compiled_again_and_replaced(cache: Path, pin: str) -> None:
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    (entry,) = cache.glob("*.json")
    entry.write_text('{"format": 1, "functions": {"tc_reseq": {"insns": "!!"')
    before = dict(bpf_cache.STATS)
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    assert stats_delta(before) == {"unreadable": 1, "miss": 1, "stored": 1}
    assert json.loads(entry.read_text())["functions"], "a whole entry again"


def test_entry_whose_tables_changed_is_not_used(cache: Path, pin: str) -> None:
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    (entry,) = cache.glob("*.json")
    e = json.loads(entry.read_text())
    name = next(iter(e["tables"]))
    e["tables"][name][2] += 1  # leaf size (max entries may differ: see SIZE_MACROS)
    entry.write_text(json.dumps(e))
    before = dict(bpf_cache.STATS)
    b = compile_bpf("tc_reseq.c", pin_dir=pin)
    b.cleanup()
    assert stats_delta(before) == {"stale": 1, "miss": 1, "stored": 1}
    assert type(b).__name__ == "BPF"


def test_directory_others_may_write_is_not_used(cache: Path, pin: str) -> None:
    cache.mkdir(mode=0o700)
    os.chmod(cache, 0o777)
    before = dict(bpf_cache.STATS)
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    assert stats_delta(before) == {"refused": 2}
    assert not list(cache.glob("*.json")), "nothing written there"


def test_off_and_sources_without_maps_h_compile_the_usual_way(
    cache: Path, pin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = dict(bpf_cache.STATS)
    text = b"BPF_ARRAY(own, u32, 1);\nint prog(struct xdp_md *ctx) { return XDP_PASS; }\n"
    compile_bpf(text=text).cleanup()
    compile_bpf(text=text).cleanup()
    assert stats_delta(before) == {"miss": 2, "uncacheable": 2}, "declares its own map"
    monkeypatch.setenv(bpf_cache.ENV, "off")
    before = dict(bpf_cache.STATS)
    compile_bpf("tc_reseq.c", pin_dir=pin).cleanup()
    assert stats_delta(before) == {}


def test_key_follows_source_flags_and_headers_but_not_pins_or_table_sizes(tmp_path: Path) -> None:
    src = (BPF_DIR / "xdp_encap.c").read_bytes()
    base = [f"-I{INCLUDE_DIR}"]
    k = bpf_cache.cache_key(src, base, BPF_DIR)
    assert bpf_cache.cache_key(src, [*base, '-DXFP_PIN_DIR="/x"'], BPF_DIR) == k
    sized = [*base, "-DXFP_SA_MAX=8", "-DXFP_FLOWS_MAX=4096"]
    assert bpf_cache.cache_key(src, sized, BPF_DIR) == k, "table sizes reach no instruction"
    assert bpf_cache.cache_key(src, [*base, "-DXFP_MAX_FRAME=9100"], BPF_DIR) != k
    assert bpf_cache.cache_key(src + b"\n", base, BPF_DIR) != k
    used = src + b"\n#if XFP_SA_MAX > 4\n#endif\n"
    assert bpf_cache.cache_key(used, sized, BPF_DIR) != bpf_cache.cache_key(used, base, BPF_DIR), (
        "a source that uses a size macro is keyed by it"
    )
    tree = tmp_path / "bpf"
    for p in BPF_DIR.rglob("*"):
        if p.is_file():
            (tree / p.relative_to(BPF_DIR)).parent.mkdir(parents=True, exist_ok=True)
            (tree / p.relative_to(BPF_DIR)).write_bytes(p.read_bytes())
    assert bpf_cache.cache_key(src, base, tree) == k, "the same tree elsewhere: the same key"
    with (tree / "include" / "maps.h").open("a") as f:
        f.write("\n")
    assert bpf_cache.cache_key(src, base, tree) != k, "a header changed: another key"
    with (tree / "include" / "xfp_defs.h").open("a") as f:
        f.write("\n#define XFP_SA_SLOTS (XFP_SA_MAX / 2)\n")
    assert bpf_cache.cache_key(src, sized, tree) == bpf_cache.cache_key(src, base, tree)
    with (tree / "include" / "parse.h").open("a") as f:
        f.write("\n#define XFP_SA_HALF (XFP_SA_MAX / 2)\n")
    assert bpf_cache.cache_key(src, sized, tree) != bpf_cache.cache_key(src, base, tree), (
        "a header beside maps.h uses a size macro: keyed by it"
    )


def test_hit_with_other_table_sizes_makes_maps_of_those_sizes(cache: Path) -> None:
    """[tables] sas/flows change only the maps: the entry of the default sizes serves, and the
    maps BCC makes from the prologue have the sizes asked for."""
    before = dict(bpf_cache.STATS)
    fresh = compile_bpf("xdp_encap.c", pin_dir=f"/sys/fs/bpf/xfp-cache-c-{os.getpid()}")
    cached = compile_bpf(
        "xdp_encap.c", ["-DXFP_SA_MAX=8", "-DXFP_FLOWS_MAX=2048"],
        pin_dir=f"/sys/fs/bpf/xfp-cache-d-{os.getpid()}",
    )  # fmt: skip
    try:
        assert stats_delta(before) == {"miss": 1, "stored": 1, "hit": 1}
        sizes = {
            n: v[bpf_cache.SPEC_MAX_ENTRIES]
            for n, v in bpf_cache.table_specs(cached.module).items()
        }
        assert sizes["xfp_sa_out"] == 8 and sizes["xfp_flows"] == 2048, sizes
        assert normalised(cached, b"xdp_encap") == normalised(fresh, b"xdp_encap")
        cached.load_func(b"xdp_encap", cached.XDP)
    finally:
        for b in (fresh, cached):
            b.cleanup()
        unpin("c", "d")
