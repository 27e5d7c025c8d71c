# SPDX-License-Identifier: GPL-2.0-only
"""Where the controller keeps its run-time files. Tiny on purpose: the CLI imports it to find
a running controller without importing the controller itself."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path("/run/xfrm-fastpath")
STATUS_FILE = "status.json"


def netns_run_dir(base: Path = RUN_DIR, netns: str | os.PathLike[str] | None = None) -> Path:
    """Status files live per network namespace (by inode), so the controllers of several
    test-bed gateways on one machine never collide. `netns`: a path such as /run/netns/gw1;
    default: this process's namespace."""
    ino = os.stat(netns or "/proc/self/ns/net").st_ino
    return base / f"netns-{ino}"


def pid_alive(pid: int) -> bool:
    """Whether a process exists (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def status_path(netns: str | os.PathLike[str] | None = None) -> Path:
    return netns_run_dir(netns=netns) / STATUS_FILE
