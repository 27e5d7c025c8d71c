# SPDX-License-Identifier: GPL-2.0-only
"""The agent's status: what `xfrm-fastpath status`, `flows` and `sas` show, as a dict and as
the status file in the namespace's run directory (written at every housekeeping tick,
atomically: a reader never sees half a file).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.agent.ports import Ports
from controller.agent.state import AgentState
from controller.config import Config
from controller.core.crypto import AES_GCM_AEAD, Backend, sa_backend
from controller.core.state import SaRef
from controller.core.xfrm_model import Sa
from controller.paths import STATUS_FILE
from controller.telemetry import snapshot_to_dict
from controller.telemetry.labels import NO_BACKEND, NO_DIRECTION, direction_label, spi_label
from controller.telemetry.snapshot import SaState

if TYPE_CHECKING:
    from controller.telemetry import MetricsSnapshot

log = logging.getLogger("xfrm-fastpath")


def flows_status(state: AgentState) -> list[dict[str, Any]]:
    return [
        {
            "direction": rec.key.direction.name.lower(),
            "ifindex": rec.key.ifindex,
            "saddr": rec.key.saddr,
            "daddr": rec.key.daddr,
            "proto": rec.key.proto,
            "sport": rec.key.sport,
            "dport": rec.key.dport,
            "spi": f"0x{rec.sa.spi:08x}",
            "egress_ifindex": rec.egress_ifindex,
            "learn_latency_ms": round((rec.learn_latency_s or 0) * 1e3, 3),
        }
        for rec in sorted(state.flows.flows.values(), key=lambda r: r.key)
    ]


def needs_module(sa: Sa, backend: Backend) -> bool:
    """An AES-GCM SA under the BPF backend: only the xfp_crypto module can carry it (BPF has no
    AES instructions; controller/core/crypto.py)."""
    return backend is Backend.BPF and sa.aead is not None and sa.aead.name == AES_GCM_AEAD


def kernel_path_why(sa: Sa, why: str, backend: Backend, backend_why: str) -> str:
    """Why an SA stays on the kernel path, with what would change it where the operator can:
    an AES-GCM SA under the BPF backend says that it needs the module, and why the controller
    runs without it (`backend_why`: CryptoChoice.why, or what `sas` found)."""
    if needs_module(sa, backend):
        return (
            f"{why}; AES-GCM needs the xfp_crypto module (kmod/README.md) and [crypto] "
            f"backend auto or kernel (now {backend}: {backend_why})"
        )
    return why


def sas_status(state: AgentState) -> list[dict[str, Any]]:
    """The kernel's SAs (as last read), each with whether and why it is offloaded or not, and
    which crypto backend serves it (controller/core/crypto.py) and why."""
    sas = []
    offloaded = {**state.sa_out, **state.sa_in}
    for sa in state.view.sas:
        ref = SaRef(str(sa.dst), sa.spi, sa.reqid)
        off = offloaded.get(ref)
        # Not offloaded: what either direction would use (the kernel's SA says no direction).
        fits = [sa_backend(sa, state.crypto.backend, out) for out in (False, True)]
        ok = any(b is not None for b, _ in fits)
        why = next((w for b, w in fits if b is None), "ok")
        if off:
            crypto, crypto_why = str(off.crypto), off.crypto_why
        else:
            crypto = next((str(b) for b, _ in fits if b is not None), None)
            crypto_why = " / ".join(dict.fromkeys(w for _, w in fits))
        reason = "offloaded"
        if not off:
            why = state.refused_sas.get(ref) or ("waiting for traffic" if ok else why)
            reason = kernel_path_why(sa, why, state.crypto.backend, state.crypto.why)
        sas.append(
            {
                "spi": f"0x{sa.spi:08x}",
                "src": str(sa.src),
                "dst": str(sa.dst),
                "reqid": sa.reqid,
                "algorithm": sa.alg_name,
                "offloaded": off is not None,
                "direction": off.direction.name.lower() if off else None,
                "supported": ok,
                "crypto": crypto,
                "crypto_why": crypto_why,
                "reason": reason,
                "flows": len(state.flows.flows_of_sa(ref)),
            }
        )
    return sas


def sa_states(state: AgentState) -> tuple[SaState, ...]:
    """The kernel's SAs as the metrics say them (xfrm_fastpath_sa_offloaded): what `sas`
    shows, with label values; an offloaded SA's reason is its backend's (why that one)."""
    out = []
    offloaded = {**state.sa_out, **state.sa_in}
    for row, sa in zip(sas_status(state), state.view.sas, strict=True):
        off = offloaded.get(SaRef(str(sa.dst), sa.spi, sa.reqid))
        out.append(
            SaState(
                spi=spi_label(sa.spi),
                reqid=sa.reqid,
                direction=direction_label(off.direction) if off else NO_DIRECTION,
                offloaded=off is not None,
                backend=row["crypto"] or NO_BACKEND,
                reason=row["crypto_why"] if off else row["reason"],
            )
        )
    return tuple(out)


def status(
    cfg: Config,
    state: AgentState,
    ports: Ports,
    *,
    started: float,
    snapshot: MetricsSnapshot | None,
    loop_stalls: int,
) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "started": started,
        "interfaces": {"lan": list(cfg.lan), "wan": list(cfg.wan)},
        # The crypto backend chosen at start ([crypto] backend and the module probe).
        "crypto": {"backend": str(state.crypto.backend), "why": state.crypto.why},
        "metrics": snapshot_to_dict(snapshot) if snapshot else None,
        "flows": flows_status(state),
        "sas": sas_status(state),
        # Kernel-built ESP on offloaded SAs, as the TC program handled it (bpf/tc_reseq.c).
        "resequencer": {k: v[0] for k, v in ports.reseq.stats().items()},
        # Each removal: cause, flows, when the kernel event was read and when the flows
        # were out of the maps (CLOCK_MONOTONIC ns; event_ns null for timer removals).
        "invalidations": list(state.recent_invalidations),
        # Main-loop steps that held it STALL_S or longer (each logged, naming the step).
        "loop_stalls": loop_stalls,
        "written_ns": time.monotonic_ns(),
    }


def write_status(run_dir: Path, make: Callable[[], dict[str, Any]]) -> None:
    """The status file, replaced atomically (mode 0600: it names flows and SAs)."""
    try:
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = run_dir / (STATUS_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(make(), f)
        os.replace(tmp, run_dir / STATUS_FILE)
    except OSError as e:
        log.debug("status file: %s", e)
