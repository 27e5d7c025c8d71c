# SPDX-License-Identifier: GPL-2.0-only
"""The crypto backend (issue 17, controller/core/crypto.py): which one the controller chooses
at start, which one each SA gets, and the kernel backend's per-SA contexts (made with the
entry, destroyed after it, flushed at start), driven in-process as tests/unit/test_agent.py
drives the agent: the XFRM model (tests/lib/fake_kernel.py), the in-memory maps and the
module's context table in memory (tests/lib/memory_datapath.py MemoryCrypto). That the kfuncs
and the -DXFP_KCRYPTO programs do what the entries say is tests/vm's."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from agent_bed import GW1, GW2, SPI_IN, SPI_OUT, AgentBed, key_of, make_sa, one_tunnel
from memory_datapath import MemoryCrypto

from controller.agent import daemon as daemon_module
from controller.agent.offload import recover_pinned_state
from controller.config import Config, ConfigError, parse_config
from controller.core.crypto import (
    AES_GCM_AEAD,
    Backend,
    BackendError,
    choose_backend,
    sa_backend,
)
from controller.core.reasons import RejectReason
from controller.core.xfrm_model import Algorithm, Secret
from controller.datapath import abi
from controller.datapath.kcrypto_abi import Alg

GCM_KEY = Secret(bytes(range(20)))  # AES-128 key || 4-byte salt (RFC 4106 section 8.1)


def gcm(key: Secret = GCM_KEY) -> Algorithm:
    return Algorithm("aead", AES_GCM_AEAD, len(key.reveal()) * 8, key, 128)


def kernel_bed(tmp_path: Path, **sas: object) -> AgentBed:
    """gw1 on the kernel crypto backend; `out_sa`/`in_sa` replace the tunnel's SAs."""
    bed = AgentBed(tmp_path, tunnel=False, crypto_backend=Backend.KERNEL)
    one_tunnel(bed.kernel, **sas)  # type: ignore[arg-type]
    return bed


# -- the choice at start ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("configured", "usable", "want"),
    [
        ("auto", True, Backend.KERNEL),
        ("auto", False, Backend.BPF),
        ("bpf", True, Backend.BPF),
        ("bpf", False, Backend.BPF),
        ("kernel", True, Backend.KERNEL),
    ],
)
def test_backend_choice(configured: str, usable: bool, want: Backend) -> None:
    got = choose_backend(configured, usable, "what the probe found")
    assert got.backend is want, f"{configured}, module usable={usable}"
    assert got.why, "the choice says why (status, log)"
    if configured == "auto":
        assert "what the probe found" in got.why, "auto names what it found"


def test_kernel_backend_without_the_module_refuses_to_start() -> None:
    with pytest.raises(BackendError, match="not loaded"):
        choose_backend("kernel", False, "the xfp_crypto module is not loaded")


def test_daemon_probes_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """Daemon._choose_crypto: no module -> auto gives bpf, kernel refuses; a module whose
    device opens -> auto gives kernel and keeps the device open; bpf never opens it."""
    opened: list[object] = []

    class Device:
        def __init__(self) -> None:
            opened.append(self)
            self.closed = False

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(daemon_module.kcrypto, "KcryptoDevice", Device)
    monkeypatch.setattr(daemon_module.kcrypto, "module_loaded", lambda: False)
    d = daemon_module.Daemon(Config())
    d._choose_crypto()
    assert d.crypto.backend is Backend.BPF and d.kcrypto is None, "auto without the module"
    with pytest.raises(BackendError):
        daemon_module.Daemon(Config(crypto_backend="kernel"))._choose_crypto()

    monkeypatch.setattr(daemon_module.kcrypto, "module_loaded", lambda: True)
    d = daemon_module.Daemon(Config())
    d._choose_crypto()
    assert d.crypto.backend is Backend.KERNEL, "auto with the module loaded"
    assert d.kcrypto is opened[-1], "the device stays open (the module cannot go meanwhile)"
    n = len(opened)
    d = daemon_module.Daemon(Config(crypto_backend="bpf"))
    d._choose_crypto()
    assert d.crypto.backend is Backend.BPF and len(opened) == n, "bpf never opens the device"


def test_config_crypto_backend() -> None:
    assert Config().crypto_backend == "auto", "the default"
    assert parse_config('[crypto]\nbackend = "kernel"\n').crypto_backend == "kernel"
    with pytest.raises(ConfigError, match=r"crypto\.backend"):
        parse_config('[crypto]\nbackend = "openssl"\n')


# -- which backend each SA gets ---------------------------------------------------------------
def test_kernel_backend_inbound_sa_gets_a_context(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path)
    bed.agent.on_candidate(bed.decap())
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    e = bed.dp.inbound_sa(SPI_IN, GW1)
    assert e is not None, "offloaded"
    assert e.flags & abi.SA_F_KCRYPTO, "the entry names a kernel crypto context"
    assert not any(bytes(e.key)) and not any(bytes(e.salt)), "no key in the map"
    assert bed.crypto is not None and set(bed.crypto.contexts) == {e.kc_id}, "its context"
    alg, key, esn = bed.crypto.contexts[e.kc_id]
    assert (alg, key, esn) == (Alg.CHACHA20_POLY1305, key_of(SPI_IN).reveal(), False)
    assert bed.dp.journal.index(("kc_create", e.kc_id)) < bed.dp.journal.index(
        ("put_inbound_sa", e.sa_id)
    ), "the context exists before the entry naming it"
    sas = {s["spi"]: s for s in bed.agent.status()["sas"]}
    assert sas[f"0x{SPI_IN:08x}"]["crypto"] == "kernel", "status: the SA's backend"
    assert sas[f"0x{SPI_IN:08x}"]["crypto_why"], "and why"
    assert bed.agent.status()["crypto"]["backend"] == "kernel", "status: the chosen backend"


def test_kernel_backend_takes_inbound_aes_gcm(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path, in_sa=make_sa(SPI_IN, GW2, GW1, aead=gcm()))
    bed.agent.on_candidate(bed.decap())
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    e = bed.dp.inbound_sa(SPI_IN, GW1)
    assert e is not None and e.flags & abi.SA_F_KCRYPTO, "AES-GCM offloaded on kernel crypto"
    assert bed.crypto is not None
    assert bed.crypto.contexts[e.kc_id][:2] == (Alg.AES_GCM, GCM_KEY.reveal()), "its context"


GCM256_KEY = Secret(bytes(range(36)))  # AES-256 key || 4-byte salt


@pytest.mark.parametrize(
    ("aead", "alg"),
    [(None, Alg.CHACHA20_POLY1305), (gcm(), Alg.AES_GCM), (gcm(GCM256_KEY), Alg.AES_GCM)],
    ids=["chacha20-poly1305", "aes128-gcm", "aes256-gcm"],
)
def test_kernel_backend_outbound_sa_gets_a_context(
    tmp_path: Path, aead: Algorithm | None, alg: Alg
) -> None:
    """The resequencer re-seals kernel-built packets with the kfuncs too (bpf/tc_reseq.c,
    -DXFP_KCRYPTO): an outbound SA of every AEAD the module supports is offloaded on kernel
    crypto, its key in the module only."""
    out_sa = make_sa(SPI_OUT, GW1, GW2, aead=aead) if aead else make_sa(SPI_OUT, GW1, GW2)
    bed = kernel_bed(tmp_path, out_sa=out_sa)
    bed.agent.on_candidate(bed.encap())
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    (_sa_id, e), *_ = bed.dp.outbound_sa_entries()
    assert e.flags & abi.SA_F_KCRYPTO, "outbound: kernel crypto"
    assert not any(bytes(e.key) + bytes(e.salt)), "no key in the entry"
    assert bed.crypto is not None
    assert bed.crypto.contexts[e.kc_id][:2] == (alg, out_sa.key.reveal()), "its context"
    assert (SPI_OUT, GW2, _sa_id) in bed.reseq.indexed(), "the resequencer renumbers it"
    sas = {s["spi"]: s for s in bed.agent.status()["sas"]}
    st = sas[f"0x{SPI_OUT:08x}"]
    assert st["offloaded"] and st["crypto"] == "kernel", f"status says so: {st}"


@pytest.mark.parametrize("outbound", [False, True], ids=["inbound", "outbound"])
@pytest.mark.parametrize(
    ("backend", "aead", "want"),
    [
        (Backend.KERNEL, None, Backend.KERNEL),
        (Backend.KERNEL, gcm(), Backend.KERNEL),
        (Backend.KERNEL, gcm(GCM256_KEY), Backend.KERNEL),
        (Backend.BPF, None, Backend.BPF),
        (Backend.BPF, gcm(), None),
    ],
    ids=["kernel-chacha", "kernel-gcm128", "kernel-gcm256", "bpf-chacha", "bpf-gcm128"],
)
def test_sa_backend_is_the_same_both_ways(
    backend: Backend, aead: Algorithm | None, want: Backend | None, outbound: bool
) -> None:
    sa = make_sa(SPI_OUT, GW1, GW2, aead=aead) if aead else make_sa(SPI_OUT, GW1, GW2)
    got, why = sa_backend(sa, backend, outbound)
    assert got is want, f"{backend} {sa.alg_name} outbound={outbound}: {got} ({why})"
    assert "resequencer" not in why, f"no resequencer reason left: {why}"


def test_kernel_backend_refuses_aes_gcm_key_sizes_the_module_lacks() -> None:
    """AES-192 (RFC 4106 allows it) has no context in the module: refused, either way."""
    sa = make_sa(SPI_OUT, GW1, GW2, aead=gcm(Secret(bytes(range(28)))))
    for outbound in (False, True):
        got, why = sa_backend(sa, Backend.KERNEL, outbound)
        assert got is None and why, f"AES-192 outbound={outbound}: refused ({why})"


def test_bpf_backend_leaves_aes_gcm_to_the_kernel(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, tunnel=False)
    one_tunnel(bed.kernel, in_sa=make_sa(SPI_IN, GW2, GW1, aead=gcm()))
    bed.agent.on_candidate(bed.decap())
    assert bed.metrics.rejects == {RejectReason.SA_UNSUPPORTED: 1}, "AES-GCM stays in the kernel"
    sas = {s["spi"]: s for s in bed.agent.status()["sas"]}
    st = sas[f"0x{SPI_IN:08x}"]
    assert not st["supported"] and st["crypto"] is None, "no backend serves it"
    assert "only rfc7539esp(chacha20,poly1305)" in st["reason"], st["reason"]


# -- context lifetime -------------------------------------------------------------------------
def test_context_destroyed_after_its_entry(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path)
    bed.agent.on_candidate(bed.decap())
    e = bed.dp.inbound_sa(SPI_IN, GW1)
    assert e is not None
    kc_id, sa_id = e.kc_id, e.sa_id
    bed.agent.on_kernel_event(bed.kernel.delete_sa(make_sa(SPI_IN, GW2, GW1)))
    assert bed.crypto is not None and not bed.crypto.contexts, "DELSA: the context goes"
    j = bed.dp.journal
    assert j.index(("delete_inbound_sa", sa_id)) < j.index(("kc_destroy", kc_id)), (
        "the entry naming it goes first"
    )
    assert bed.crypto.destroyed and not any(bed.crypto.destroyed[-1]), "key zeroized"


def test_release_all_and_rekey_destroy_contexts(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path)
    bed.agent.on_candidate(bed.decap())
    bed.agent.on_kernel_event(bed.kernel.update_sa(make_sa(SPI_IN, GW2, GW1)))
    assert bed.crypto is not None and not bed.crypto.contexts, "an updated SA hands back"
    bed.agent.on_candidate(bed.decap())
    e = bed.dp.inbound_sa(SPI_IN, GW1)
    assert e is not None and set(bed.crypto.contexts) == {e.kc_id}, "offloaded again"
    assert e.kc_id != 0, "ids go round: the one just destroyed is not reused at once"
    bed.agent.release_all()
    assert not bed.crypto.contexts, "shutdown: every context destroyed"


def test_start_flushes_contexts_left_by_a_dead_controller(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path)
    bed.agent.on_candidate(bed.decap())
    assert bed.crypto is not None and bed.crypto.contexts
    bed.start()  # the controller died: a new one on the same maps and module
    recover_pinned_state(bed.dp, bed.reseq, bed.kernel, bed.crypto)
    assert not bed.crypto.contexts, "flushed"
    assert bed.dp.inbound_sa(SPI_IN, GW1) is None, "and the entries naming them gone"
    bed.agent.on_candidate(bed.decap())
    assert bed.dp.inbound_sa(SPI_IN, GW1) is not None, "offloaded again"


def test_context_refused_leaves_nothing_half_installed(tmp_path: Path) -> None:
    bed = kernel_bed(tmp_path)

    class Refusing(MemoryCrypto):
        def create(self, *a: object, **kw: object) -> None:
            raise OSError(errno.ENODEV, "no synchronous SIMD implementation")

    bed.crypto = Refusing(bed.dp)
    bed.start()
    bed.agent.on_candidate(bed.decap())
    assert bed.metrics.rejects == {RejectReason.INSTALL_FAILED: 1}, "counted"
    assert not bed.dp.sa_in_map.elems and not bed.dp.flow_map.elems, "nothing installed"
