# SPDX-License-Identifier: GPL-2.0-only
"""The XDP datapath on the kernel crypto backend (issue 17) against the kernel's own ESP.

gw1 runs the -DXFP_KCRYPTO build of bpf/xdp_encap.c and bpf/xdp_decap.c (loaded through
controller/datapath/kfunc.py), its SA entries naming xfp_crypto contexts (XFP_SA_F_KCRYPTO,
kc_id; no key in the maps); gw2 runs static kernel ESP SAs (testbed/static_esp.py) with the same
SPIs and keys, ChaCha20-Poly1305 (RFC 7634) and AES-128-GCM (RFC 4106):

- lan -> remote: gw1's XDP seals with the module's kfunc; gw2's kernel must accept every packet
  (its counters move, /proc/net/xfrm_stat does not: no replay, so no sequence number and
  no IV twice);
- remote -> lan: gw2's kernel seals; gw1's XDP opens with the kfunc and delivers.

The -DXFP_KCRYPTO resequencer (bpf/tc_reseq.c) is driven through BPF_PROG_TEST_RUN with frames
made by `cryptography` (ESN, a forged ICV; AES-256-GCM too), and timed per packet beside its BPF
AEAD path.

    .venv/bin/python -m testbed.vmrun vm-only tests/vm/test_vm_kcrypto_datapath.py

The module is inserted for this file and removed after it, so the rest of the suite runs on the
BPF backend (`[crypto] backend = "auto"` finds no module).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import packets as P
import pytest
import test_datapath_redirect as R
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from test_vm_datapath import xfrm_stat
from test_vm_kcrypto import DEPS, KO, _modprobe

from controller.core.state import Direction
from controller.datapath.abi import Reason
from controller.datapath.bpfsys import prog_test_run
from controller.datapath.kcrypto import DEVICE, MODULE, KcryptoDevice, module_loaded
from controller.datapath.kcrypto_abi import Alg
from controller.datapath.reseq import Resequencer
from controller.datapath.xdp import Datapath, InboundSa, OutboundSa, flow_key, flow_val
from controller.netns import in_netns
from testbed.bed import Testbed
from testbed.static_esp import AEAD, AES_GCM, install_static_esp

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]
N_PACKETS = 20
N_PINGS = 4  # each way through gw1's kernel ESP, before and after the UDP echo
OUT_CTX, BACK_CTX, RESEQ_CTX = 11, 12, 13
TC_ACT_OK, TC_ACT_SHOT = 0, 2
# name -> (the kernel's AEAD, bytes of key || salt, the module's algorithm)
ALGS = {
    "chacha20-poly1305": (AEAD, 36, Alg.CHACHA20_POLY1305),
    "aes128-gcm": (AES_GCM, 20, Alg.AES_GCM),
    "aes256-gcm": (AES_GCM, 36, Alg.AES_GCM),
}


def _device() -> Path:
    """/dev/xfp_crypto, or a node made from sysfs when the guest has no devtmpfs."""
    if DEVICE.exists():
        return DEVICE
    major, minor = Path("/sys/class/misc/xfp_crypto/dev").read_text().strip().split(":")
    node = Path("/run/xfp_crypto")
    if not node.exists():
        os.mknod(node, 0o600 | 0o020000, os.makedev(int(major), int(minor)))
    return node


@pytest.fixture(scope="module")
def kernel_crypto(esp_kernel: None) -> Iterator[tuple[Datapath, KcryptoDevice]]:
    """The module inserted, the kernel-backend datapath loaded; all of it gone afterwards."""
    if not KO.is_file():
        pytest.skip(f"{KO} is not built: run scripts/build-kmod.sh (make setup does)")
    _modprobe(*DEPS)
    if not module_loaded():
        proc = subprocess.run(["insmod", str(KO)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"insmod {KO}: {proc.stderr.strip()}"
    d = Datapath(pin_dir=f"/sys/fs/bpf/xfp-kc-{os.getpid()}", kcrypto=True)
    dev = KcryptoDevice(_device())
    try:
        dev.flush()
        d.load()
        yield d, dev
    finally:
        d.close()
        d.unpin()
        d.loader.close()  # the programs go, and with them their references on the module
        dev.close()
        subprocess.run(["rmmod", MODULE], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def kc_reseq(kernel_crypto: tuple[Datapath, KcryptoDevice]) -> Iterator[Resequencer]:
    """The -DXFP_KCRYPTO resequencer on the datapath's pinned maps (compiled once)."""
    d, _ = kernel_crypto
    rs = Resequencer(pin_dir=d.pin_dir, kcrypto=True)
    try:
        rs.load()
        yield rs
    finally:
        rs.loader.close()
        rs.unpin()


@pytest.fixture(scope="module")
def xdp_pass(esp_kernel: None):
    from controller.datapath.loader import Prog, compile_bpf, load_program

    b = compile_bpf(text="int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }")
    return load_program(b, "xdp_pass", Prog.XDP)


@pytest.mark.parametrize("name", ["chacha20-poly1305", "aes128-gcm"])
def test_kernel_crypto_datapath_interoperates_with_kernel_esp(
    bed: Testbed,
    kernel_crypto: tuple[Datapath, KcryptoDevice],
    xdp_pass,
    name: str,
) -> None:
    from bcc import BPF

    d, dev = kernel_crypto
    aead, key_len, alg = ALGS[name]
    tun = install_static_esp(bed, roles=("gw2",), replay_window=64, aead=aead, key_len=key_len)
    for key in list(d.maps["flows"].keys()):
        d.maps["flows"].delete(key)
    ns = bed.ns("gw1")
    lan_if, wan_if = bed.ifindex("gw1", "lan"), bed.ifindex("gw1", "wan")
    d.put_tx_port(lan_if, netns=ns)
    d.put_tx_port(wan_if, netns=ns)
    gw1_wan, gw2_wan = bed.iface("gw1", "wan"), bed.iface("gw2", "wan")
    lan_host, remote = bed.iface("lan", "eth0"), bed.iface("remote", "eth0")
    dev.create(OUT_CTX, alg, tun.out.key)
    dev.create(BACK_CTX, alg, tun.back.key)
    iv_mask = int.from_bytes(os.urandom(8), "big")
    d.put_outbound_sa(
        OutboundSa(
            sa_id=1,
            spi=tun.out.spi,
            saddr=gw1_wan.addr,
            daddr=gw2_wan.addr,
            key=b"",
            kc_id=OUT_CTX,
            egress_ifindex=wan_if,
            dmac=gw2_wan.mac,
            smac=gw1_wan.mac,
            iv_mask=iv_mask,
        )
    )
    d.put_inbound_sa(
        InboundSa(
            sa_id=2,
            spi=tun.back.spi,
            saddr=gw2_wan.addr,
            daddr=gw1_wan.addr,
            key=b"",
            kc_id=BACK_CTX,
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
    peers = [("gw2", "wan"), ("lan", "eth0")]
    stat_before = xfrm_stat(bed, "gw2")
    try:
        d.attach(lan=["lan"], wan=["wan"], netns=ns)
        for role, ifname in peers:
            with in_netns(bed.ns(role)):
                BPF.attach_xdp(ifname.encode(), xdp_pass, 0)
        before = d.stats()
        result = R.udp_echo(bed, N_PACKETS)
        after = d.stats()
    finally:
        for role, ifname in peers:
            with in_netns(bed.ns(role)):
                BPF.remove_xdp(ifname.encode(), 0)
        d.detach_all()
        d.delete_outbound_sa(1)
        d.delete_inbound_sa(tun.back.spi, gw1_wan.addr)
        dev.destroy(OUT_CTX)
        dev.destroy(BACK_CTX)

    moved = {k: after[k][0] - before[k][0] for k in after if after[k] != before[k]}
    assert result == {"ok": N_PACKETS, "bad": []}, (
        f"{name}: every datagram echoed: {result}; XDP counters moved: {moved}; "
        f"gw2's SAs: {tun.counters('gw2')}; gw2's xfrm_stat: {xfrm_stat(bed, 'gw2')}"
    )
    assert moved.get((Direction.ENCAP, Reason.ENCAP_OK)) == N_PACKETS, f"XDP sealed: {moved}"
    assert moved.get((Direction.DECAP, Reason.DECAP_OK)) == N_PACKETS, f"XDP opened: {moved}"
    assert not moved.get((Direction.DECAP, Reason.PASS_KCRYPTO)), "no kfunc refusal"
    # The wire, as gw2's kernel judged it: XDP sent N (ENCAP_OK), gw2 accepted N with a
    # 64-packet replay window and no replay error, so no sequence number came twice, and no
    # IV either (IV = seq XOR the SA's mask: one to one).
    counters = tun.counters("gw2")
    assert counters[tun.out.spi].packets == N_PACKETS, f"gw2 accepted XDP's packets: {counters}"
    assert counters[tun.back.spi].packets == N_PACKETS, f"gw2 sent the echoes: {counters}"
    stat_after = xfrm_stat(bed, "gw2")
    errors = {
        k: v - stat_before.get(k, 0) for k, v in stat_after.items() if v != stat_before.get(k, 0)
    }
    assert errors == {}, f"no XFRM error counter moved on gw2: {errors}"


def _esp(name: str, key: bytes, spi: int, seq: int, iv: bytes, plain: bytes) -> bytes:
    """SPI, seq, IV, ciphertext, ICV as esp4_output() makes them on an ESN SA (RFC 4303
    section 2.2.1: the AAD carries the high half; RFC 7634 / RFC 4106: nonce salt || IV)."""
    aad = struct.pack("!III", spi, seq >> 32, seq & 0xFFFFFFFF)
    aead = ChaCha20Poly1305 if name == "chacha20-poly1305" else AESGCM
    ct = aead(key[:-4]).encrypt(key[-4:] + iv, plain, aad)
    return struct.pack("!II", spi, seq & 0xFFFFFFFF) + iv + ct


@pytest.mark.parametrize("name", ALGS)
def test_resequencer_reseals_with_the_kfuncs(
    kernel_crypto: tuple[Datapath, KcryptoDevice], kc_reseq: Resequencer, name: str
) -> None:
    """BPF_PROG_TEST_RUN of the -DXFP_KCRYPTO tc_reseq on an ESN SA: a frame the kernel
    numbered (4 << 32) | 0xfffffff0, behind the counter and in the sub-space below it, leaves
    numbered from the counter, (5 << 32) + 10, and `cryptography` opens it; the kernel's high
    half came from its IV (seqiv: IV = seq XOR the mask). A forged ICV is dropped, counted."""
    d, dev = kernel_crypto
    rs = kc_reseq
    _, key_len, alg = ALGS[name]
    key, spi, sa_id = os.urandom(key_len), 0xC0FFEE42, 9
    gw1, gw2 = "192.0.2.1", "192.0.2.2"
    mask = int.from_bytes(os.urandom(8), "big")
    start, kseq = (5 << 32) + 10, (4 << 32) | 0xFFFFFFF0
    inner = P.ipv4("10.1.0.2", "10.2.0.2", P.IPPROTO_UDP, P.udp(4000, 53, os.urandom(300)))
    pad = bytes(range(1, P.esp_padlen(len(inner)) + 1))
    plain = inner + pad + bytes([len(pad), P.IPPROTO_IPIP])
    body = _esp(name, key, spi, kseq, struct.pack("!Q", kseq ^ mask), plain)
    head = P.eth("02:00:c0:00:02:02", "02:00:c0:00:02:01")
    frame = head + P.ipv4(gw1, gw2, P.IPPROTO_ESP, body)
    forged = frame[:-1] + bytes([frame[-1] ^ 1])
    dev.create(RESEQ_CTX, alg, key, esn=True)
    d.put_outbound_sa(
        OutboundSa(
            sa_id=sa_id,
            spi=spi,
            saddr=gw1,
            daddr=gw2,
            key=b"",
            kc_id=RESEQ_CTX,
            egress_ifindex=1,
            dmac="02:00:c0:00:02:02",
            smac="02:00:c0:00:02:01",
            seq=start,
            seq_limit=(1 << 64) - 1,
            iv_mask=mask,
            esn=True,
        )
    )
    rs.index_sa(spi, gw2, sa_id)
    try:
        before = rs.stats()
        ret, out, _ = prog_test_run(rs.fd, frame)
        ret_forged, _, _ = prog_test_run(rs.fd, forged)
        after = rs.stats()
    finally:
        rs.unindex_sa(spi, gw2)
        d.delete_outbound_sa(sa_id)
        dev.destroy(RESEQ_CTX)
    assert ret == TC_ACT_OK, f"{name}: renumbered and passed on (verdict {ret})"
    out = out[: len(frame)]
    assert out[:34] == frame[:34], "Ethernet and outer IPv4 headers unchanged"
    iv = struct.pack("!Q", start ^ mask)
    assert out[34:] == _esp(name, key, spi, start, iv, plain), (
        f"{name}: the counter's number and IV, sealed as `cryptography` seals them"
    )
    moved = {k: v[0] - before[k][0] for k, v in after.items() if v != before[k]}
    assert ret_forged == TC_ACT_SHOT, f"{name}: a forged ICV is dropped (verdict {ret_forged})"
    assert moved == {"ok": 1, "error": 1}, f"one re-sealed, one refused: {moved}"


@pytest.mark.parametrize("name", [*ALGS, "bpf-aead"])
def test_resequencer_cost_per_packet(
    kernel_crypto: tuple[Datapath, KcryptoDevice], kc_reseq: Resequencer, name: str
) -> None:
    """The -DXFP_KCRYPTO tc_reseq renumbering one 1400 B packet REPEAT times in place (each
    run opens what the last one sealed and takes the next number), on the kfuncs or, for an
    SA without the flag, the BPF ChaCha20-Poly1305 of the same program. Prints the mean
    nanoseconds per run: instructions per packet when the VM runs with
    `python -m testbed.vmrun --icount` (docs/design.md section 7), wall time otherwise."""
    d, dev = kernel_crypto
    rs = kc_reseq
    repeat, spi, sa_id, start = 200, 0xC0FFEE43, 10, 1000
    on_bpf = name == "bpf-aead"
    alg_name = "chacha20-poly1305" if on_bpf else name
    _, key_len, alg = ALGS[alg_name]
    key = os.urandom(key_len)
    gw1, gw2, mask = "192.0.2.1", "192.0.2.2", int.from_bytes(os.urandom(8), "big")
    inner = P.ipv4("10.1.0.2", "10.2.0.2", P.IPPROTO_UDP, P.udp(4000, 53, os.urandom(1372)))
    pad = bytes(range(1, P.esp_padlen(len(inner)) + 1))
    plain = inner + pad + bytes([len(pad), P.IPPROTO_IPIP])
    body = _esp(alg_name, key, spi, 7, struct.pack("!Q", 7 ^ mask), plain)
    frame = P.eth("02:00:c0:00:02:02", "02:00:c0:00:02:01") + P.ipv4(gw1, gw2, P.IPPROTO_ESP, body)
    if not on_bpf:
        dev.create(RESEQ_CTX, alg, key, esn=True)
    d.put_outbound_sa(
        OutboundSa(
            sa_id=sa_id,
            spi=spi,
            saddr=gw1,
            daddr=gw2,
            key=key if on_bpf else b"",
            kc_id=None if on_bpf else RESEQ_CTX,
            egress_ifindex=1,
            dmac="02:00:c0:00:02:02",
            smac="02:00:c0:00:02:01",
            seq=start,
            seq_limit=(1 << 64) - 1,
            iv_mask=mask,
            esn=not on_bpf,
        )
    )
    rs.index_sa(spi, gw2, sa_id)
    try:
        before = rs.stats()
        ret, out, ns = prog_test_run(rs.fd, frame, repeat=repeat)
        after = rs.stats()
    finally:
        rs.unindex_sa(spi, gw2)
        d.delete_outbound_sa(sa_id)
        if not on_bpf:
            dev.destroy(RESEQ_CTX)
    moved = {k: v[0] - before[k][0] for k, v in after.items() if v != before[k]}
    print(f"\ntc_reseq {name} {len(frame)} B: {ns} ns per packet (mean of {repeat})")
    assert ret == TC_ACT_OK and moved == {"ok": repeat}, f"{name}: every run renumbered {moved}"
    last = start + repeat - 1
    if on_bpf:  # the BPF AEAD's seal is RFC 7634 without ESN here
        aead = ChaCha20Poly1305(key[:-4])
        iv = struct.pack("!Q", last ^ mask)
        aad = struct.pack("!II", spi, last)
        want = struct.pack("!II", spi, last) + iv + aead.encrypt(key[-4:] + iv, plain, aad)
    else:
        want = _esp(name, key, spi, last, struct.pack("!Q", last ^ mask), plain)
    assert out[34 : len(frame)] == want, f"{name}: the last run's number {last}, sealed right"


def _ping(bed: Testbed, dst: str) -> None:
    """Pings from the lan host: the kernel path (no flow entry for ICMP echo ids yet)."""
    proc = bed.cmd(
        "lan",
        ["ping", "-n", "-q", "-c", str(N_PINGS), "-i", "0.2", "-W", "3", dst],
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, f"pings on the kernel path answered: {proc.stdout}"


def test_controller_on_the_kernel_backend(
    bed: Testbed, kernel_crypto: tuple[Datapath, KcryptoDevice], tmp_path: Path
) -> None:
    """`[crypto] backend = "kernel"`: the controller runs the kernel-crypto datapath and
    resequencer; an AES-128-GCM tunnel (kernel ESP on both gateways) gets both SAs offloaded on
    kernel crypto. Pings (the kernel path: each a new flow's first packet, at least) are
    renumbered by the kfunc resequencer, and gw2 counts no replay or bad ICV."""
    import shutil
    import time

    from controller.datapath.xdp import DEFAULT_PIN_DIR
    from testbed.supervisor import ControllerProcess

    pins_existed = DEFAULT_PIN_DIR.exists()
    tun = install_static_esp(bed, aead=AES_GCM, key_len=20)
    remote = bed.iface("remote", "eth0").addr
    stat_before = xfrm_stat(bed, "gw2")
    # idle_timeout as the other controller tests: under TCG two echo runs can be a minute apart,
    # and a flow idled out between them sends the second run's first packets the kernel's way.
    config = '[crypto]\nbackend = "kernel"\n[timers]\nidle_timeout = 600\n'
    gw = ControllerProcess(bed, "gw1", tmp_path, config)
    try:
        gw.wait_started(1200)
        crypto = gw.published_status()["crypto"]
        assert crypto["backend"] == "kernel", f"the kernel backend: {crypto}"
        first = R.udp_echo(bed, N_PACKETS)  # its first packets teach the controller the flows
        assert first["ok"] >= N_PACKETS - 2, f"the tunnel carries: {first}"
        enc0, dec0 = gw.fastpath_packets("encap"), gw.fastpath_packets("decap")
        again = R.udp_echo(bed, N_PACKETS)
        assert again == {"ok": N_PACKETS, "bad": []}, f"on the fastpath: {again}"
        assert gw.fastpath_packets("encap") - enc0 >= N_PACKETS, f"XDP sealed: {gw.tail()}"
        assert gw.fastpath_packets("decap") - dec0 >= N_PACKETS, f"XDP opened: {gw.tail()}"
        sas = {int(s["spi"], 16): s for s in gw.sas()}
        back, out = sas[tun.back.spi], sas[tun.out.spi]
        assert back["offloaded"] and back["crypto"] == "kernel", f"inbound on kfuncs: {back}"
        assert out["offloaded"] and out["crypto"] == "kernel", f"outbound on kfuncs: {out}"
        _ping(bed, remote)
        deadline = time.monotonic() + 60  # the status file is rewritten every few seconds
        while time.monotonic() < deadline:
            reseq = gw.published_status()["resequencer"]
            if reseq.get("ok", 0) > 0:
                break
            time.sleep(0.5)
        assert reseq.get("ok", 0) > 0 and not reseq.get("error"), f"renumbered: {reseq}"
    finally:
        rc = gw.stop()
        if not pins_existed:
            shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)
    assert rc == 0, f"SIGTERM: contexts destroyed, XDP detached, exit 0: {gw.tail()}"
    stat_after = xfrm_stat(bed, "gw2")
    errors = {
        k: stat_after.get(k, 0) - stat_before.get(k, 0)
        for k in ("XfrmInStateSeqError", "XfrmInStateProtoError")
    }
    assert errors == {"XfrmInStateSeqError": 0, "XfrmInStateProtoError": 0}, (
        f"gw2: no replay, no bad ICV: {errors}"
    )
