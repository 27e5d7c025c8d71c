# SPDX-License-Identifier: GPL-2.0-only
"""Label values of the exported metrics, derived from the enums they name.

`direction` comes from `controller.core.state.Direction`, `reason` from the datapath's reason enum
(enum xfp_reason in bpf/include/xfp_defs.h, mirrored in controller/datapath/abi.py), `backend`
from `controller.core.crypto.Backend` (and an SA entry's XFP_SA_F_KCRYPTO flag), `spi` is
printed as `ip xfrm state` prints it. No label value is typed here a second time.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from controller.core.crypto import Backend
from controller.core.state import Direction
from controller.datapath.abi import SA_F_KCRYPTO

# The `backend` label of an SA that no backend can serve (it stays on the kernel path), and the
# `direction` label of an SA not offloaded (the kernel's SA says no direction).
NO_BACKEND = "none"
NO_DIRECTION = "none"


def direction_label(direction: Direction | int | str) -> str:
    """The `direction` label value: the enum name in lower case ("encap", "decap")."""
    if isinstance(direction, str):
        return Direction[direction.upper()].name.lower()
    return Direction(direction).name.lower()


def backend_label(backend: Backend | int | None) -> str:
    """The `backend` label value: "bpf" or "kernel" (the Backend enum's values), "none" for an
    SA no backend can serve. An int is an SA entry's flags (struct xfp_sa_out/xfp_sa_in):
    XFP_SA_F_KCRYPTO set means the xfp_crypto module seals/opens it."""
    if backend is None:
        return NO_BACKEND
    if isinstance(backend, Backend):
        return backend.value
    return (Backend.KERNEL if backend & SA_F_KCRYPTO else Backend.BPF).value


def spi_label(spi: int) -> str:
    """The `spi` label value: 8 hex digits, as `ip xfrm state` prints it (0x%08x)."""
    return f"0x{spi & 0xFFFFFFFF:08x}"


# The datapath's reason enum (enum xfp_reason in bpf/include/xfp_defs.h, mirrored in
# controller/datapath/abi.py) says by its member names what a verdict was: *_OK = forwarded by XDP,
# PASS_* = handed to the kernel, DROP_* = dropped. Label values are derived from those names, so
# a reason added to the header shows up here without a second list to keep in step.
_ENUM_PREFIXES = ("XFP_R_", "XFP_REASON_", "R_")


def _bare(name: str) -> str:
    for prefix in _ENUM_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name


def reason_kind(reason: enum.Enum | str) -> tuple[str, str]:
    """(kind, label) of a datapath reason: kind is "fastpath", "kernel", "drop" or "none" (the
    enum's MAX sentinel); label is the reason without its prefixes, in lower case
    (XFP_R_DROP_BAD_ICV -> ("drop", "bad_icv")). An unclassifiable name raises: a new kind of
    verdict needs a decision on how to export it."""
    name = _bare(reason if isinstance(reason, str) else reason.name)
    if name == "MAX":
        return "none", ""
    if name.startswith("PASS_"):
        return "kernel", name[len("PASS_") :].lower()
    if name.startswith("DROP_"):
        return "drop", name[len("DROP_") :].lower()
    if name.endswith("_OK"):
        return "fastpath", name[: -len("_OK")].lower()
    raise ValueError(f"datapath reason {name!r} is neither *_OK, PASS_* nor DROP_*")


def reason_labels(reasons: Iterable[enum.Enum], kind: str) -> list[str]:
    """Every label value of one kind, in enum order: the series
    `collect.snapshot_from_datapath` exports for that kind, zero or not."""
    return [lbl for r in reasons for k, lbl in [reason_kind(r)] if k == kind]
