# SPDX-License-Identifier: GPL-2.0-only
"""Who seals and opens ESP on the fastpath: the crypto backend (issue 17). Pure: the daemon
probes the xfp_crypto module and passes what it found.

    bpf     the BPF ChaCha20-Poly1305 (bpf/include/aead/); its key is in the SA entry. AES-GCM
            cannot be done well in BPF (no AES instructions), so AES-GCM SAs stay on the kernel
            path.
    kernel  the xfp_crypto module's kfuncs (kmod/xfp_crypto.c): the kernel's SIMD
            ChaCha20-Poly1305 and AES-GCM (RFC 4106, 128- and 256-bit keys, ICV 16); the key
            is in the module only (a context per SA, by id).

`[crypto] backend = "auto"` takes the kernel when the module is loaded and usable, the BPF AEAD
otherwise; "kernel" refuses to start without it; "bpf" never uses it.

With the kernel backend, both directions of an SA whose AEAD the module supports are sealed and
opened by the module: inbound by xdp_decap, outbound by xdp_encap and by bpf/tc_reseq.c, which
re-seals the kernel's own ESP packets of an offloaded outbound SA with the same kfuncs
(docs/design.md: it renumbers them from the datapath's counter, so that sequence numbers and
IVs never repeat).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from controller.core.xfrm_model import BPF_AEADS, FASTPATH_AEAD, FASTPATH_KEY_BITS, Sa

AES_GCM_AEAD = "rfc4106(gcm(aes))"
# The kernel backend: RFC 7634 and RFC 4106 with 128- or 256-bit AES keys, each + 32-bit salt.
KERNEL_AEADS: dict[str, frozenset[int]] = {
    FASTPATH_AEAD: frozenset({FASTPATH_KEY_BITS}),
    AES_GCM_AEAD: frozenset({128 + 32, 256 + 32}),
}


class Backend(enum.StrEnum):
    BPF = "bpf"
    KERNEL = "kernel"


class BackendError(RuntimeError):
    """`[crypto] backend = "kernel"` and the module is not usable: the controller does not
    start (a silent fall-back would leave AES-GCM traffic on the kernel path unannounced)."""


@dataclass(frozen=True)
class CryptoChoice:
    """The backend the controller runs with, and why (status, metrics, log)."""

    backend: Backend = Backend.BPF
    why: str = "default"


def choose_backend(configured: str, usable: bool, probe: str) -> CryptoChoice:
    """`configured`: [crypto] backend; `usable`/`probe`: whether the module is loaded and
    usable, and what the probe found (its words go to the log and the status)."""
    if configured == "bpf":
        return CryptoChoice(Backend.BPF, "[crypto] backend = bpf")
    if configured == "kernel":
        if not usable:
            raise BackendError(f"[crypto] backend = kernel, but {probe}")
        return CryptoChoice(Backend.KERNEL, f"[crypto] backend = kernel: {probe}")
    if usable:
        return CryptoChoice(Backend.KERNEL, f"auto: {probe}")
    return CryptoChoice(Backend.BPF, f"auto: {probe}")


def sa_backend(sa: Sa, backend: Backend, outbound: bool) -> tuple[Backend | None, str]:
    """Which backend serves this SA in this direction, or (None, why not). Both directions
    choose alike (`outbound` is kept for the callers that ask per direction): the resequencer
    has a kernel-crypto build (bpf/tc_reseq.c), so outbound SAs need not keep the BPF AEAD."""
    if backend is Backend.KERNEL:
        ok, why = sa.fastpath_support(KERNEL_AEADS)
        return (Backend.KERNEL, "kernel crypto (xfp_crypto)") if ok else (None, why)
    ok, why = sa.fastpath_support(BPF_AEADS)
    return (Backend.BPF, "BPF AEAD") if ok else (None, why)
