# SPDX-License-Identifier: GPL-2.0-only
"""Enter a named network namespace for a moment, in this thread, and come back.

BCC compiles a program once per process (about 40 s under the VM's emulated CPU), and an XDP
attach acts on the device of that name in the calling thread's network namespace. Entering the
test bed's namespace around `attach_xdp`/`remove_xdp` lets one compiled program (e.g. a
session-scoped pytest fixture) serve many test beds, where a child under `nsenter --net` would
compile again for each. Only the network namespace changes: the mount namespace, and with it
/sys and tracefs, stay this machine's (unlike `ip netns exec`).

    with in_netns(bed.ns("gw1")):
        b.attach_xdp(b"lan", fn, 0)
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def netns_inode(path: str = "/proc/thread-self/ns/net") -> int:
    """The inode that identifies a network namespace (as tracepoints and `ip netns` see it)."""
    return os.stat(path).st_ino


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body in network namespace /run/netns/NAME, then return to the previous one,
    also when the body raises. Affects the calling thread only (setns(2))."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)
