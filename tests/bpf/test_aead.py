# SPDX-License-Identifier: GPL-2.0-only
"""ChaCha20-Poly1305 in BPF (bpf/include/aead/aead.h) through BPF_PROG_TEST_RUN on
bpf/tests/test_aead.c.

Checked against the RFC 8439 vectors (§2.4.2, §2.5.2, §2.8.2, exact bytes) and against
`cryptography`'s ChaCha20Poly1305 (OpenSSL) with the RFC 7634 ESP nonce (salt || IV) and AAD
(SPI || seq, or SPI || seq_hi || seq_lo with ESN), for every payload length 0..200 and a
stride up to 1500 with the block edges. The program is compiled and loaded once per module.
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from controller.datapath.bpfsys import prog_info, prog_test_run

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "bpf" / "tests" / "test_aead.c"
INCLUDE = ROOT / "bpf" / "include"

# include/uapi/linux/bpf.h: enum xdp_action
XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX = 0, 1, 2, 3

# bpf/tests/test_aead.c: enum xfp_aead_test_op
SEAL, VERIFY, DECRYPT, OPEN, PEEK, POLY = 1, 2, 3, 4, 5, 6

# bpf/tests/test_aead.c: struct xfp_aead_test_hdr (packed, little-endian), 64 bytes
HDR = struct.Struct("<BBHHH32s4s8s12s")
assert HDR.size == 64, "test header is 64 bytes, payload starts at 64"
PAYLOAD_OFF = HDR.size

# RFC 8439 §2.4.2 / §2.8.2 plaintext
SUNSCREEN = (
    b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
    b"the future, sunscreen would be it."
)


@dataclass(frozen=True)
class Op:
    """One request to the test program: what to run on which bytes."""

    op: int
    key: bytes = bytes(32)
    salt: bytes = bytes(4)
    iv: bytes = bytes(8)
    aad: bytes = bytes(8)
    payload: bytes = b""
    tag: bytes = bytes(16)
    length: int | None = None  # defaults to len(payload)

    def frame(self) -> bytes:
        n = len(self.payload) if self.length is None else self.length
        hdr = HDR.pack(
            self.op,
            len(self.aad),
            PAYLOAD_OFF,
            n,
            PAYLOAD_OFF + len(self.payload),
            self.key,
            self.salt,
            self.iv,
            self.aad.ljust(12, b"\0"),
        )
        return hdr + self.payload + self.tag


class AeadProg:
    """The loaded test program; run() returns (verdict, payload bytes, tag-slot bytes)."""

    def __init__(self, fn: object) -> None:
        self.fn = fn

    def run(self, req: Op, repeat: int = 1) -> tuple[int, bytes, bytes, int]:
        frame = req.frame()
        rv, out, ns = prog_test_run(self.fn, frame, repeat=repeat)
        assert len(out) == len(frame), f"frame length unchanged ({len(out)} vs {len(frame)})"
        assert out[:PAYLOAD_OFF] == frame[:PAYLOAD_OFF], "test header left untouched"
        n = len(req.payload)
        return rv, out[PAYLOAD_OFF : PAYLOAD_OFF + n], out[PAYLOAD_OFF + n :], ns


def load_aead_prog(max_frame: int = 1600) -> tuple[object, object]:
    """Compile and load bpf/tests/test_aead.c with BCC; returns (BPF object, program)."""
    pytest.importorskip("bcc")
    from controller.datapath.loader import Prog, compile_bpf, load_program

    b = compile_bpf(
        SRC.relative_to(ROOT / "bpf"), [f"-DXFP_MAX_FRAME={max_frame}", "-Wno-unused-function"]
    )
    return b, load_program(b, "xfp_aead_test", Prog.XDP)


@pytest.fixture(scope="module")
def prog() -> Iterator[AeadProg]:
    b, fn = load_aead_prog()
    try:
        yield AeadProg(fn)
    finally:
        b.cleanup()


def esp_case(rng: random.Random, n: int, esn: bool) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Random key, salt, IV, AAD (SPI||seq or SPI||seq_hi||seq_lo) and payload of n bytes."""
    key, salt, iv = rng.randbytes(32), rng.randbytes(4), rng.randbytes(8)
    aad = rng.randbytes(12 if esn else 8)
    return key, salt, iv, aad, rng.randbytes(n)


LENGTHS = sorted(
    {*range(201), *range(201, 1501, 37), 255, 256, 257, 511, 512, 1023, 1024, 1499, 1500}
)
EDGES = (0, 1, 15, 16, 17, 63, 64, 65, 127, 128, 129, 1499, 1500)


# -- RFC 8439 vectors -----------------------------------------------------------------------


def test_rfc8439_2_4_2_chacha20_encryption(prog: AeadProg) -> None:
    """§2.4.2: key 00..1f, nonce 00000000 0000004a 00000000, counter 1 (ESP's counter)."""
    expected = bytes.fromhex(
        "6e2e359a2568f98041ba0728dd0d6981e97e7aec1d4360c20a27afccfd9fae0b"
        "f91b65c5524733ab8f593dabcd62b3571639d624e65152ab8f530c359f0861d8"
        "07ca0dbf500d6a6156a38e088a22b65e52bc514d16ccf806818ce91ab7793736"
        "5af90bbf74a35be6b40b8eedf2785e42874d"
    )
    nonce = bytes.fromhex("000000000000004a00000000")
    req = Op(DECRYPT, key=bytes(range(32)), salt=nonce[:4], iv=nonce[4:], payload=SUNSCREEN)
    rv, ct, _, _ = prog.run(req)
    assert rv == XDP_TX, f"raw ChaCha20 run succeeds (verdict {rv})"
    assert ct == expected, f"RFC 8439 §2.4.2 ciphertext: got {ct.hex()}"


def test_rfc8439_2_5_2_poly1305(prog: AeadProg) -> None:
    key = bytes.fromhex("85d6be7857556d337f4452fe42d506a80103808afb0db2fd4abff6af4149f51b")
    req = Op(POLY, key=key, payload=b"Cryptographic Forum Research Group")
    rv, msg, tag, _ = prog.run(req)
    assert rv == XDP_TX, f"Poly1305 run succeeds (verdict {rv})"
    assert msg == req.payload, "Poly1305 leaves the message alone"
    assert tag == bytes.fromhex("a8061dc1305136c6c22b8baf0c0127a9"), f"§2.5.2 tag: {tag.hex()}"


RFC_2_8_2_KEY = bytes(range(0x80, 0xA0))
RFC_2_8_2_NONCE = bytes.fromhex("070000004041424344454647")
RFC_2_8_2_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
RFC_2_8_2_CT = bytes.fromhex(
    "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6"
    "3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36"
    "92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc"
    "3ff4def08e4b7a9de576d26586cec64b6116"
)
RFC_2_8_2_TAG = bytes.fromhex("1ae10b594f09e26a7e902ecbd0600691")


def rfc_2_8_2(op: int, payload: bytes, tag: bytes = bytes(16)) -> Op:
    return Op(
        op,
        key=RFC_2_8_2_KEY,
        salt=RFC_2_8_2_NONCE[:4],
        iv=RFC_2_8_2_NONCE[4:],
        aad=RFC_2_8_2_AAD,
        payload=payload,
        tag=tag,
    )


def test_rfc8439_2_8_2_aead_seal(prog: AeadProg) -> None:
    rv, ct, tag, _ = prog.run(rfc_2_8_2(SEAL, SUNSCREEN))
    assert rv == XDP_TX, f"seal succeeds (verdict {rv})"
    assert ct == RFC_2_8_2_CT, f"§2.8.2 ciphertext: {ct.hex()}"
    assert tag == RFC_2_8_2_TAG, f"§2.8.2 tag: {tag.hex()}"


def test_rfc8439_2_8_2_aead_open(prog: AeadProg) -> None:
    rv, pt, tag, _ = prog.run(rfc_2_8_2(OPEN, RFC_2_8_2_CT, RFC_2_8_2_TAG))
    assert rv == XDP_TX, f"open of the §2.8.2 ciphertext verifies (verdict {rv})"
    assert pt == SUNSCREEN, f"§2.8.2 plaintext recovered: {pt!r}"
    assert tag == RFC_2_8_2_TAG, "verify does not write the tag slot"


# -- against cryptography (OpenSSL) ---------------------------------------------------------


@pytest.mark.parametrize("esn", [False, True], ids=["aad8", "aad12-esn"])
def test_seal_matches_cryptography(prog: AeadProg, esn: bool) -> None:
    rng = random.Random(0x5EA1 + esn)
    for n in LENGTHS:
        key, salt, iv, aad, pt = esp_case(rng, n, esn)
        rv, ct, tag, _ = prog.run(Op(SEAL, key, salt, iv, aad, pt))
        assert rv == XDP_TX, f"seal of {n} bytes succeeds (verdict {rv})"
        want = ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad)
        assert ct == want[:-16], f"ciphertext of {n} bytes equals cryptography's"
        assert tag == want[-16:], f"tag of {n} bytes equals cryptography's"
        opened = ChaCha20Poly1305(key).decrypt(salt + iv, ct + tag, aad)
        assert opened == pt, f"cryptography opens our {n}-byte packet"


@pytest.mark.parametrize("esn", [False, True], ids=["aad8", "aad12-esn"])
def test_open_of_cryptography_sealed(prog: AeadProg, esn: bool) -> None:
    rng = random.Random(0x0BE7 + esn)
    for n in LENGTHS:
        key, salt, iv, aad, pt = esp_case(rng, n, esn)
        sealed = ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad)
        ct, tag = sealed[:-16], sealed[-16:]
        rv, out, tag_out, _ = prog.run(Op(VERIFY, key, salt, iv, aad, ct, tag))
        assert rv == XDP_TX, f"verify accepts cryptography's {n}-byte packet (verdict {rv})"
        assert out == ct and tag_out == tag, f"verify leaves the {n}-byte packet untouched"
        rv, out, tag_out, _ = prog.run(Op(OPEN, key, salt, iv, aad, ct, tag))
        assert rv == XDP_TX, f"open of {n} bytes succeeds (verdict {rv})"
        assert out == pt, f"decrypt of {n} bytes gives the plaintext"
        assert tag_out == tag, f"open leaves the {n}-byte packet's tag alone"


def test_tampering_fails_verify(prog: AeadProg) -> None:
    rng = random.Random(0x7A3)
    for n in EDGES:
        key, salt, iv, aad, pt = esp_case(rng, n, esn=n % 2 == 1)
        sealed = ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad)
        ct, tag = sealed[:-16], sealed[-16:]
        base = Op(OPEN, key, salt, iv, aad, ct, tag)
        rv, out, _, _ = prog.run(base)
        assert rv == XDP_TX, f"untampered {n}-byte packet opens (verdict {rv})"
        bad_tags = [bytes([tag[0] ^ 1]) + tag[1:], tag[:15] + bytes([tag[15] ^ 0x80])]
        for i, bad in enumerate(bad_tags):
            rv, out, _, _ = prog.run(Op(OPEN, key, salt, iv, aad, ct, bad))
            assert rv == XDP_DROP, f"tag flip {i} on {n} bytes fails verify (verdict {rv})"
            assert out == ct, f"a failed verify on {n} bytes writes nothing"
        if n:
            pos = rng.randrange(n)
            bad_ct = ct[:pos] + bytes([ct[pos] ^ 4]) + ct[pos + 1 :]
            rv, out, _, _ = prog.run(Op(OPEN, key, salt, iv, aad, bad_ct, tag))
            assert rv == XDP_DROP, f"ciphertext flip at {pos}/{n} fails verify (verdict {rv})"
            assert out == bad_ct, f"a failed verify on {n} bytes writes nothing"
        bad_aad = bytes([aad[0] ^ 0x10]) + aad[1:]
        rv, _, _, _ = prog.run(Op(OPEN, key, salt, iv, bad_aad, ct, tag))
        assert rv == XDP_DROP, f"aad flip on {n} bytes fails verify (verdict {rv})"
        if len(aad) == 12:
            rv, _, _, _ = prog.run(Op(OPEN, key, salt, iv, aad[:8], ct, tag))
            assert rv == XDP_DROP, f"ESN aad cut to 8 bytes fails verify on {n} bytes ({rv})"
        bad_iv = iv[:7] + bytes([iv[7] ^ 1])
        rv, _, _, _ = prog.run(Op(OPEN, key, salt, bad_iv, aad, ct, tag))
        assert rv == XDP_DROP, f"wrong IV on {n} bytes fails verify (verdict {rv})"
        bad_salt = bytes([salt[0] ^ 1]) + salt[1:]
        rv, _, _, _ = prog.run(Op(OPEN, key, bad_salt, iv, aad, ct, tag))
        assert rv == XDP_DROP, f"wrong salt on {n} bytes fails verify (verdict {rv})"


def test_peek_is_first_64_plaintext_bytes(prog: AeadProg) -> None:
    rng = random.Random(0x9EE)
    for n in (*EDGES, 20, 40, 84, 200):
        key, salt, iv, aad, pt = esp_case(rng, n, esn=False)
        sealed = ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad)
        ct = sealed[:-16]
        # the 64 bytes of output go to the tag slot: give it 64 bytes of room
        req = Op(PEEK, key, salt, iv, aad, ct, tag=bytes(64))
        rv, out, slot, _ = prog.run(req)
        assert rv == XDP_TX, f"peek of {n} bytes succeeds (verdict {rv})"
        assert out == ct, f"peek leaves the {n}-byte ciphertext untouched"
        want = pt[:64].ljust(64, b"\0")
        assert slot == want, f"peek of {n} bytes: first min(n,64) plaintext bytes, zero after"


def test_bounds_are_refused(prog: AeadProg) -> None:
    """Lengths past the frame or past XFP_MAX_FRAME fail cleanly (-1 -> XDP_DROP)."""
    rng = random.Random(0xB0)
    key, salt, iv, aad, pt = esp_case(rng, 100, esn=False)
    for op in (SEAL, VERIFY, DECRYPT, PEEK):
        # claims 200 bytes, the frame carries 100 + 16
        slot = bytes(64 if op == PEEK else 16)
        rv, _, _, _ = prog.run(Op(op, key, salt, iv, aad, pt, slot, length=200))
        if op == PEEK:
            assert rv == XDP_TX, "peek only needs the first 64 bytes, which are present"
        else:
            assert rv == XDP_DROP, f"op {op} over the frame end is refused (verdict {rv})"
        rv, _, _, _ = prog.run(Op(op, key, salt, iv, aad, pt, slot, length=1600))
        assert rv == XDP_DROP, f"op {op} with off+len > XFP_MAX_FRAME is refused (verdict {rv})"
    rv, _, _, _ = prog.run(Op(SEAL, key, salt, iv, aad=bytes(10), payload=pt))
    assert rv == XDP_DROP, f"aad of 10 bytes is refused (verdict {rv})"


def run_layout(
    prog: AeadProg,
    op: int,
    case: tuple[bytes, bytes, bytes, bytes],
    payload: bytes,
    tag: bytes,
    pad: int,
    tag_first: bool,
) -> tuple[int, bytes, bytes]:
    """Run op with the payload `pad` bytes after the header; the tag slot follows the payload,
    or (tag_first) sits before it so that the payload ends exactly at data_end, which drives
    the byte-wise paths the bound checks fall back to. Returns (verdict, payload, tag slot)."""
    key, salt, iv, aad = case
    n, slot = len(payload), len(tag)
    if tag_first:
        tag_off, off = PAYLOAD_OFF + pad, PAYLOAD_OFF + pad + slot
        body = bytes(pad) + tag + payload
    else:
        off, tag_off = PAYLOAD_OFF + pad, PAYLOAD_OFF + pad + n
        body = bytes(pad) + payload + tag
    hdr = HDR.pack(op, len(aad), off, n, tag_off, key, salt, iv, aad.ljust(12, b"\0"))
    rv, out, _ = prog_test_run(prog.fn, hdr + body)
    return rv, out[off : off + n], out[tag_off : tag_off + slot]


@pytest.mark.parametrize("tag_first", [False, True], ids=["tag-after", "payload-at-end"])
def test_unaligned_offsets_and_frame_end(prog: AeadProg, tag_first: bool) -> None:
    """Payload at every offset mod 8 (ESP's is 50 B into an untagged frame), and payloads that
    end at data_end: seal, open and peek still agree with cryptography."""
    rng = random.Random(0xA119 + tag_first)
    for pad in range(8):
        for n in (0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100, 127, 128, 129, 1400):
            key, salt, iv, aad, pt = esp_case(rng, n, esn=pad % 2 == 1)
            case = (key, salt, iv, aad)
            want = ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad)
            rv, ct, tag = run_layout(prog, SEAL, case, pt, bytes(16), pad, tag_first)
            where = f"{n} bytes at pad {pad}, tag_first={tag_first}"
            assert rv == XDP_TX, f"seal of {where} succeeds (verdict {rv})"
            assert ct + tag == want, f"seal of {where} equals cryptography"
            rv, out, tag_out = run_layout(prog, OPEN, case, want[:-16], want[-16:], pad, tag_first)
            assert rv == XDP_TX, f"open of {where} succeeds (verdict {rv})"
            assert out == pt and tag_out == want[-16:], f"open of {where} gives the plaintext"
            rv, _, peek = run_layout(prog, PEEK, case, want[:-16], bytes(64), pad, tag_first)
            assert rv == XDP_TX, f"peek of {where} succeeds (verdict {rv})"
            assert peek == pt[:64].ljust(64, b"\0"), f"peek of {where} is the plaintext head"


def test_max_frame_payload(prog: AeadProg) -> None:
    """The largest payload the default XFP_MAX_FRAME allows: off + len + 16 == 1600."""
    rng = random.Random(0x1600)
    n = 1600 - PAYLOAD_OFF - 16
    key, salt, iv, aad, pt = esp_case(rng, n, esn=True)
    rv, ct, tag, _ = prog.run(Op(SEAL, key, salt, iv, aad, pt))
    assert rv == XDP_TX, f"seal of {n} bytes at the frame limit succeeds (verdict {rv})"
    assert ct + tag == ChaCha20Poly1305(key).encrypt(salt + iv, pt, aad), "equals cryptography"


def test_verified_program_size(prog: AeadProg) -> None:
    """The harness (every op in one program) stays clear of the verifier's 1M-insn budget."""
    info = prog_info(prog.fn)
    print(f"\nxfp_aead_test: {info}")
    assert info["name"] == "xfp_aead_test", f"program info is ours: {info}"
    if info["verified_insns"]:  # 0 before Linux 5.16
        assert info["verified_insns"] < 900_000, f"verifier walk leaves headroom: {info}"


def test_native_build_is_the_same_algorithm(tmp_path: Path) -> None:
    """bench/native_aead.c builds aead.h with gcc and checks RFC 8439 §2.8.2 before timing;
    a drift between the BPF and native builds would fail here, not silently in the bench."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc: the native benchmark build cannot run")
    exe = tmp_path / "native_aead"
    flags = ["-O2", "-Wall", "-Werror", "-Wno-unknown-pragmas", "-DXFP_NATIVE", f"-I{INCLUDE}"]
    src = ROOT / "bench" / "native_aead.c"
    subprocess.run([gcc, *flags, str(src), "-o", str(exe)], check=True, timeout=120)
    out = subprocess.run([str(exe), "64"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"native build passes RFC 8439 2.8.2: {out.stderr}"
    size, seal, opn = out.stdout.split()
    assert size == "64" and float(seal) > 0 and float(opn) > 0, f"timings printed: {out.stdout}"


@pytest.mark.bench
def test_aead_bench_table() -> None:
    """`make bench`: ns/op of seal and open, BPF vs the same C native vs OpenSSL (one table)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aead_bench", ROOT / "bench" / "aead_bench.py")
    assert spec and spec.loader, "bench/aead_bench.py is importable"
    bench = importlib.util.module_from_spec(spec)
    sys.modules["aead_bench"] = bench  # dataclasses look the module up
    spec.loader.exec_module(bench)
    rows = bench.measure()
    print("\n" + bench.table(rows))
    for r in rows:
        assert r.bpf_seal > r.bpf_floor, f"seal at {r.size} B costs more than the empty program"
        assert r.native_seal > 0 and r.native_open > 0, f"native timings at {r.size} B"
