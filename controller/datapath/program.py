# SPDX-License-Identifier: GPL-2.0-only
"""What every loader path shares: the program types the project loads and the one error type
for compiling, loading and attaching them. Apart from controller/datapath/loader.py so that
controller/datapath/kfunc.py (which the loader calls for programs with kfunc calls) can name
them without importing the loader back."""

from __future__ import annotations

import enum


class Prog(enum.Enum):
    """Program types the project loads (BCC's constant of the same name)."""

    XDP = "XDP"
    SCHED_CLS = "SCHED_CLS"
    TRACEPOINT = "TRACEPOINT"


class LoaderError(RuntimeError):
    """Compiling, loading, attaching or detaching failed. The message names the source file
    ("compiling/loading bpf/x.c: ...") or the device; `errno` is the system error, when known."""

    def __init__(self, msg: str, errno: int = 0, source: str | None = None) -> None:
        super().__init__(msg)
        self.errno = errno
        self.source = source
