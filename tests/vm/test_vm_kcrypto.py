# SPDX-License-Identifier: GPL-2.0-only
"""The xfp_crypto module's kfuncs (kmod/xfp_crypto.c) in the real kernel: ESP ChaCha20-Poly1305
(RFC 7634) and AES-GCM (RFC 4106) sealed and opened in place by an XDP and a TC program
(bpf/tests/kcrypto_test.c, loaded through controller/datapath/kfunc.py), checked against the
RFC 8439 section 2.8.2 vector and against `cryptography`; the bounds and key refusals; a
destroyed context refused by the kfunc; rmmod refused while the module is in use.

The module is built on the host against the VM kernel's headers (scripts/build-kmod.sh, run by
scripts/setup.sh) and inserted here; the tests skip, saying why, when it is not built for the
running kernel. One BCC compile (about 40 s under TCG) serves every test.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.datapath import kfunc
from controller.datapath.bpfsys import prog_test_run
from controller.datapath.kcrypto import DEVICE, MODULE, KcryptoDevice, module_loaded
from controller.datapath.kcrypto_abi import Alg, KcRet
from controller.datapath.loader import Loader, Prog
from testbed.vmrun import KERNEL_CACHE

pytestmark = pytest.mark.vm

KO = KERNEL_CACHE / "kmod" / os.uname().release / "xfp_crypto.ko"
BTF_CACHE = KERNEL_CACHE / f"vmlinux-{os.uname().release}.btf"
# Kernel modules the kfuncs call into: the arch ChaCha20 and Poly1305 libraries (symbols the
# module links against) and aesni-intel (the AES-GCM AEAD it allocates by name).
DEPS = ("chacha_x86_64", "poly1305_x86_64", "aesni_intel")

XDP_TX = 3
TC_ACT_OK = 0
OP_SEAL, OP_OPEN = 1, 2
HDR = struct.Struct("<IIIIIi8x")  # struct xfp_kc_test_hdr (bpf/tests/kcrypto_test.c)
ESP_OFF = HDR.size  # the ESP header right after the test header
FUZZ_CASES = 200  # per program type: about 10 s under TCG

# RFC 8439 section 2.8.2: its AAD is SPI || seq_hi || seq_lo of an ESN SA (RFC 7634 section 2.1),
# its nonce salt || IV.
RFC8439_KEY = bytes(range(0x80, 0xA0))
RFC8439_SALT = bytes.fromhex("07000000")
RFC8439_IV = bytes.fromhex("4041424344454647")
RFC8439_SPI, RFC8439_SEQ_HI, RFC8439_SEQ_LO = 0x50515253, 0xC0C1C2C3, 0xC4C5C6C7
RFC8439_PT = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the "
    b"future, sunscreen would be it."
)
RFC8439_CT_HEAD = bytes.fromhex("d31a8d34648e60db7b86afbc53ef7ec2")
RFC8439_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")

# The GCM specification's (McGrew & Viega) test case 4 key and 96-bit IV, split as RFC 4106
# section 4 splits the nonce: salt 4 || IV 8.
GCM_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
GCM_SALT, GCM_IV = bytes.fromhex("cafebabe"), bytes.fromhex("facedbaddecaf888")


def _modprobe(*mods: str) -> None:
    for m in mods:
        subprocess.run(["modprobe", m], capture_output=True, timeout=60)


@dataclass
class Kc:
    dev: KcryptoDevice
    xdp: kfunc.KfuncProgram
    tc: kfunc.KfuncProgram
    xdp_frags: kfunc.KfuncProgram  # the XDP program again, loaded with BPF_F_XDP_HAS_FRAGS


@pytest.fixture(scope="module")
def kc() -> Iterator[Kc]:
    if not KO.is_file():
        pytest.skip(f"{KO} is not built: run scripts/build-kmod.sh (make setup does)")
    _modprobe(*DEPS)
    if not module_loaded():
        proc = subprocess.run(["insmod", str(KO)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, f"insmod {KO}: {proc.stderr.strip()}"
    dev_path = DEVICE
    if not DEVICE.exists():  # no devtmpfs on /dev: make the node from sysfs
        major, minor = Path("/sys/class/misc/xfp_crypto/dev").read_text().strip().split(":")
        dev_path = Path("/run/xfp_crypto")
        if not dev_path.exists():
            os.mknod(dev_path, 0o600 | 0o020000, os.makedev(int(major), int(minor)))
    try:
        with Loader() as ld:
            bpf = ld.compile("tests/kcrypto_test.c")
            xdp = ld.load_kfunc(bpf, "xfp_kc_test_xdp", Prog.XDP)
            tc = ld.load_kfunc(bpf, "xfp_kc_test_tc", Prog.SCHED_CLS)
            frags = kfunc.load_with_kfuncs(
                bpf, "xfp_kc_test_xdp", Prog.XDP, prog_flags=kfunc.BPF_F_XDP_HAS_FRAGS
            )
            dev = KcryptoDevice(dev_path)
            dev.flush()
            try:
                yield Kc(dev, xdp, tc, frags)
            finally:
                dev.close()
                frags.close()
    finally:
        # The rest of the suite runs on the BPF crypto backend: `[crypto] backend = "auto"`
        # must find no module (test_unload_is_refused_while_in_use removes it when it passes).
        subprocess.run(["rmmod", MODULE], capture_output=True, timeout=60)


def esp_frame(op: int, ctx_id: int, spi: int, seq: int, iv: bytes, body: bytes, **kw: int) -> bytes:
    """Test header || SPI || seq || IV || body (payload, then the ICV or room for it)."""
    hdr = HDR.pack(
        op,
        ctx_id,
        kw.get("esp_off", ESP_OFF),
        kw.get("length", len(body) - 16),
        kw.get("seq_hi", 0),
        -1,
    )
    return hdr + struct.pack(">II", spi, seq) + iv + body


def run(kc: Kc, frame: bytes, tc: bool = False, prog=None) -> tuple[KcRet, bytes]:
    """Run the XDP (or TC) test program on `frame`: (the kfunc's return code, the frame after)."""
    retval, out, _ = prog_test_run(prog or (kc.tc if tc else kc.xdp), frame)
    assert retval == (TC_ACT_OK if tc else XDP_TX), f"test program verdict {retval}"
    assert len(out) == len(frame), "the kfunc does not change the frame's length"
    return KcRet(HDR.unpack_from(out)[5]), out


def aad_of(spi: int, seq: int, seq_hi: int | None) -> bytes:
    if seq_hi is None:
        return struct.pack(">II", spi, seq)
    return struct.pack(">III", spi, seq_hi, seq)


def reference(alg: Alg, key: bytes, nonce: bytes, pt: bytes, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    cls = ChaCha20Poly1305 if alg is Alg.CHACHA20_POLY1305 else AESGCM
    return cls(key).encrypt(nonce, pt, aad)


def seal_open(kc: Kc, alg, key, salt, iv, pt, spi, seq, seq_hi=None, tc=False, ctx_id=1) -> bytes:
    """Create the context, seal `pt`, open it again; returns the sealed payload || ICV."""
    kc.dev.create(ctx_id, alg, key + salt, esn=seq_hi is not None)
    try:
        hi = seq_hi or 0
        rc, out = run(kc, esp_frame(OP_SEAL, ctx_id, spi, seq, iv, pt + bytes(16), seq_hi=hi), tc)
        assert rc is KcRet.OK, f"seal returned {rc.name}"
        sealed = out[ESP_OFF + 16 :]
        rc, out = run(kc, esp_frame(OP_OPEN, ctx_id, spi, seq, iv, sealed, seq_hi=hi), tc)
        assert rc is KcRet.OK, f"open returned {rc.name}"
        assert out[ESP_OFF + 16 : -16] == pt, "open gives the plaintext back"
        return sealed
    finally:
        kc.dev.destroy(ctx_id)


# ---- the tests ----------------------------------------------------------------------------------
def test_cached_btf_is_the_running_kernels(kc: Kc) -> None:
    """The base BTF the module was built against (extracted from the packaged image by
    scripts/build-kmod.sh) is byte for byte what the running kernel exports."""
    assert BTF_CACHE.read_bytes() == Path("/sys/kernel/btf/vmlinux").read_bytes(), (
        "vmlinux BTF extracted from the image equals /sys/kernel/btf/vmlinux"
    )
    assert kc.xdp.kfunc_calls == 2 and kc.tc.kfunc_calls == 2, "both placeholder calls rewritten"


@pytest.mark.parametrize("tc", [False, True], ids=["xdp", "tc"])
def test_rfc8439_aead_vector(kc: Kc, tc: bool) -> None:
    sealed = seal_open(
        kc, Alg.CHACHA20_POLY1305, RFC8439_KEY, RFC8439_SALT, RFC8439_IV, RFC8439_PT,
        RFC8439_SPI, RFC8439_SEQ_LO, seq_hi=RFC8439_SEQ_HI, tc=tc,
    )  # fmt: skip
    assert sealed[:16] == RFC8439_CT_HEAD, "RFC 8439 section 2.8.2 ciphertext"
    assert sealed[-16:] == RFC8439_TAG, "RFC 8439 section 2.8.2 tag"


CASES = [
    (alg, klen, size, esn, tc)
    for alg, klen in ((Alg.CHACHA20_POLY1305, 32), (Alg.AES_GCM, 16), (Alg.AES_GCM, 32))
    for size in (64, 512, 1400)
    for esn in (False, True)
    for tc in (False, True)
    if not (tc and size == 512)  # TC: two sizes are enough
]


@pytest.mark.parametrize(
    "alg,klen,size,esn,tc",
    CASES,
    ids=[
        f"{a.name}-{k * 8}-{s}B-{'esn' if e else 'seq32'}-{'tc' if t else 'xdp'}"
        for a, k, s, e, t in CASES
    ],
)
def test_random_payloads_match_cryptography(kc, alg, klen, size, esn, tc) -> None:
    key, salt, iv, pt = os.urandom(klen), os.urandom(4), os.urandom(8), os.urandom(size)
    spi, seq, hi = 0x1000 + size, 0x01020304, (0xA0B0C0D0 if esn else None)
    sealed = seal_open(kc, alg, key, salt, iv, pt, spi, seq, seq_hi=hi, tc=tc)
    want = reference(alg, key, salt + iv, pt, aad_of(spi, seq, hi))
    assert sealed == want, f"{alg.name} seal equals cryptography's"


def test_gcm_spec_key_in_esp_shape(kc: Kc) -> None:
    """AES-128-GCM with the GCM specification's test-case key and nonce in ESP form (RFC 4106
    section 4: salt || IV); the reference is `cryptography`, itself checked here against the
    specification's test case 4 tag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    pt4 = bytes.fromhex(
        "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
        "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
    )
    aad4 = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
    tag4 = bytes.fromhex("5bc94fbc3221a5db94fae95ae7121a47")
    assert AESGCM(GCM_KEY).encrypt(GCM_SALT + GCM_IV, pt4, aad4)[-16:] == tag4, "reference ok"
    sealed = seal_open(kc, Alg.AES_GCM, GCM_KEY, GCM_SALT, GCM_IV, pt4, 0x4321, 1)
    assert sealed == reference(
        Alg.AES_GCM, GCM_KEY, GCM_SALT + GCM_IV, pt4, aad_of(0x4321, 1, None)
    )


@pytest.mark.parametrize(
    "alg,klen", [(Alg.CHACHA20_POLY1305, 32), (Alg.AES_GCM, 16)], ids=["chacha", "gcm128"]
)
def test_bad_tag_is_refused(kc: Kc, alg: Alg, klen: int) -> None:
    key, iv = os.urandom(klen + 4), os.urandom(8)
    kc.dev.create(2, alg, key)
    try:
        _, out = run(kc, esp_frame(OP_SEAL, 2, 7, 9, iv, bytes(64 + 16)))
        sealed = bytearray(out[ESP_OFF + 16 :])
        sealed[-1] ^= 1
        rc, _ = run(kc, esp_frame(OP_OPEN, 2, 7, 9, iv, bytes(sealed)))
        assert rc is KcRet.BAD_TAG, "a flipped ICV bit fails the open"
        rc, _ = run(kc, esp_frame(OP_OPEN, 2, 7, 10, iv, out[ESP_OFF + 16 :]))
        assert rc is KcRet.BAD_TAG, "another sequence number (in the AAD) fails the open"
    finally:
        kc.dev.destroy(2)


@pytest.mark.parametrize("tc", [False, True], ids=["xdp", "tc"])
def test_bounds_are_refused(kc: Kc, tc: bool) -> None:
    kc.dev.create(3, Alg.CHACHA20_POLY1305, os.urandom(36))
    try:
        body = bytes(64 + 16)
        frame = esp_frame(OP_SEAL, 3, 7, 9, bytes(8), body)
        # fmt: off
        for what, kw in (
            ("one byte past the end", {"length": 65}),
            ("len near 2^32 (no wrap-around)", {"length": 0xFFFFFFF0}),
            ("esp_off past the end", {"esp_off": len(frame)}),
            ("esp_off near 2^32", {"esp_off": 0xFFFFFFFF, "length": 0}),
        ):
            # fmt: on
            f = esp_frame(OP_SEAL, 3, 7, 9, bytes(8), body, **kw)
            rc, out = run(kc, f, tc)
            assert rc is KcRet.BOUNDS, f"{what}: refused"
            assert out[ESP_OFF:] == f[ESP_OFF:], f"{what}: the packet is untouched"
        rc, _ = run(kc, esp_frame(OP_SEAL, 3, 7, 9, bytes(8), body, length=64), tc)
        assert rc is KcRet.OK, "exactly up to the end is fine"
    finally:
        kc.dev.destroy(3)


@pytest.mark.parametrize("tc", [False, True], ids=["xdp", "tc"])
def test_bounds_fuzz(kc: Kc, tc: bool) -> None:
    """Random esp_off and len around the end of random-sized frames: refused exactly when the
    ESP header, payload and ICV do not fit, and then the frame is untouched."""
    rng = random.Random(17)
    kc.dev.create(3, Alg.AES_GCM, os.urandom(20))
    try:
        for _ in range(FUZZ_CASES):
            size = rng.randrange(ESP_OFF + 1, 1600)
            frame = bytearray(os.urandom(size))
            esp_off = rng.choice([rng.randrange(0, size + 40), rng.getrandbits(32)])
            length = rng.choice([rng.randrange(0, size + 40), rng.getrandbits(32)])
            frame[: HDR.size] = HDR.pack(OP_SEAL, 3, esp_off, length, 0, -1)
            fits = esp_off >= ESP_OFF and esp_off + 32 + length <= size
            if esp_off < ESP_OFF and esp_off + 32 + length <= size:
                continue  # it would seal over the test header itself
            rc, out = run(kc, bytes(frame), tc)
            case = f"size {size} esp_off {esp_off} len {length}"
            assert rc is (KcRet.OK if fits else KcRet.BOUNDS), case
            if not fits:
                assert out[HDR.size :] == frame[HDR.size :], f"{case}: untouched"
    finally:
        kc.dev.destroy(3)


def test_multi_buffer_frame_is_refused(kc: Kc) -> None:
    """A frame larger than a test run's linear buffer (4096 - 256 headroom - 320 tailroom, see
    net/bpf/test_run.c) arrives with fragments: the kfunc refuses it even when the range it is
    given lies in the linear part."""
    kc.dev.create(3, Alg.CHACHA20_POLY1305, os.urandom(36))
    try:
        frame = esp_frame(OP_SEAL, 3, 7, 9, bytes(8), bytes(64 + 16)) + os.urandom(6000)
        rc, out = run(kc, frame, prog=kc.xdp_frags)
        assert rc is KcRet.FRAGS, "multi-buffer frame refused"
        assert out[ESP_OFF:] == frame[ESP_OFF:], "the frame is untouched"
        rc, _ = run(kc, frame[:200], prog=kc.xdp_frags)
        assert rc is KcRet.OK, "the same program seals a single-buffer frame"
    finally:
        kc.dev.destroy(3)


def test_contexts_refuse_what_they_do_not_support(kc: Kc) -> None:
    chacha = Alg.CHACHA20_POLY1305
    # fmt: off
    cases = [
        ("unknown algorithm", dict(ctx_id=4, alg=9, key=bytes(36)), errno.EOPNOTSUPP),
        ("16-byte ChaCha20 key", dict(ctx_id=4, alg=chacha, key=bytes(20)), errno.EINVAL),
        ("AES-192-GCM", dict(ctx_id=4, alg=Alg.AES_GCM, key=bytes(28)), errno.EINVAL),
        ("id out of range", dict(ctx_id=4096, alg=Alg.AES_GCM, key=bytes(20)), errno.ERANGE),
    ]
    # fmt: on
    for what, kw, want in cases:
        with pytest.raises(OSError) as e:
            kc.dev.create(**kw)
        assert e.value.errno == want, f"{what}: errno {errno.errorcode.get(e.value.errno)}"
    kc.dev.create(4, Alg.AES_GCM, bytes(36))
    try:
        with pytest.raises(OSError) as e:
            kc.dev.create(4, Alg.CHACHA20_POLY1305, bytes(36))
        assert e.value.errno == errno.EEXIST, "an id in use is refused"
    finally:
        kc.dev.destroy(4)
    with pytest.raises(OSError) as e:
        kc.dev.destroy(4)
    assert e.value.errno == errno.ENOENT, "destroying a missing context says so"


def test_destroyed_context_is_refused_by_the_kfunc(kc: Kc) -> None:
    frame = esp_frame(OP_SEAL, 5, 7, 9, bytes(8), bytes(64 + 16))
    for alg, klen in ((Alg.CHACHA20_POLY1305, 36), (Alg.AES_GCM, 20)):
        kc.dev.create(5, alg, os.urandom(klen))
        assert run(kc, frame)[0] is KcRet.OK, f"{alg.name}: sealed while the context exists"
        kc.dev.destroy(5)
        rc, out = run(kc, frame)
        assert rc is KcRet.NO_CTX, f"{alg.name}: gone after destroy (key zeroized and freed)"
        assert out[ESP_OFF:] == frame[ESP_OFF:], "the packet is untouched"
    assert run(kc, esp_frame(OP_SEAL, 4095, 7, 9, bytes(8), bytes(80)))[0] is KcRet.NO_CTX
    assert run(kc, esp_frame(OP_SEAL, 1 << 31, 7, 9, bytes(8), bytes(80)))[0] is KcRet.NO_CTX


def _rmmod() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["rmmod", MODULE], capture_output=True, text=True, timeout=60)


def test_unload_is_refused_while_in_use(kc: Kc) -> None:
    """Last: it unloads the module. A program calling the kfuncs holds the module (through the
    BTF of its kfunc calls), and so does the open device; with both gone, rmmod works and takes
    the contexts left over with it."""
    kc.dev.create(6, Alg.CHACHA20_POLY1305, os.urandom(36))  # left for module exit to zeroize
    assert _rmmod().returncode != 0, "rmmod refused: device open and programs loaded"
    kc.dev.close()
    refcnt = int(Path(f"/sys/module/{MODULE}/refcnt").read_text())
    assert refcnt >= 2, f"the two loaded programs hold the module (refcnt {refcnt})"
    proc = _rmmod()
    assert proc.returncode != 0, "rmmod refused: programs that call the kfuncs are loaded"
    kc.xdp.close()
    kc.tc.close()
    kc.xdp_frags.close()
    proc = _rmmod()
    assert proc.returncode == 0, f"rmmod once nothing uses the module: {proc.stderr.strip()}"
    assert not module_loaded(), "the module is gone"


def test_struct_sizes_on_this_kernel() -> None:
    """The ioctl struct is what the module copies (its size is in the ioctl number)."""
    from controller.datapath.kcrypto_abi import IOC_CREATE, KcCreate

    assert ctypes.sizeof(KcCreate) == 80 and (IOC_CREATE >> 16) & 0x3FFF == 80, "80-byte create"
