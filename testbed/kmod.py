# SPDX-License-Identifier: GPL-2.0-only
"""The xfp_crypto module (kmod/) in the real-kernel VM: insert it with what it calls into, find
its device node, remove it. A gateway loads it at boot instead (scripts/install-gateway.sh)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from controller.datapath.kcrypto import DEVICE, MODULE, module_loaded
from testbed.vmrun import KERNEL_CACHE

# Built by scripts/build-kmod.sh against the VM kernel's headers (make setup).
KO = KERNEL_CACHE / "kmod" / os.uname().release / "xfp_crypto.ko"
# The kernel's SIMD code the module calls (chacha_crypt_arch, poly1305_*_arch, AES-NI GCM).
DEPS = ("chacha_x86_64", "poly1305_x86_64", "aesni_intel")


class KmodError(RuntimeError):
    """The module is not built here, or the kernel refused it: the message says which."""


def insert() -> Path:
    """Load the module (and DEPS) unless loaded; return its device node (/dev/xfp_crypto, or
    a node made under /run from sysfs when the guest has no devtmpfs)."""
    for dep in DEPS:
        subprocess.run(["modprobe", dep], capture_output=True, timeout=60)
    if not module_loaded():
        if not KO.is_file():
            raise KmodError(f"{KO} is not built: run scripts/build-kmod.sh (make setup does)")
        proc = subprocess.run(["insmod", str(KO)], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise KmodError(f"insmod {KO}: {proc.stderr.strip()}")
    if DEVICE.exists():
        return DEVICE
    major, minor = Path(f"/sys/class/misc/{MODULE}/dev").read_text().strip().split(":")
    node = Path("/run") / MODULE
    if not node.exists():
        os.mknod(node, 0o600 | 0o020000, os.makedev(int(major), int(minor)))
    return node


def remove() -> None:
    """rmmod, quietly: the module may be in use (then it stays) or already gone."""
    subprocess.run(["rmmod", MODULE], capture_output=True, timeout=60)
