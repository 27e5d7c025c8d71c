# SPDX-License-Identifier: GPL-2.0-only
"""The controller's side of the xfp_crypto module (kmod/xfp_crypto.c): per-SA crypto contexts,
made and destroyed by id through ioctls on /dev/xfp_crypto.

Why a misc device with ioctls: each call is synchronous and returns its own errno (EEXIST,
EOPNOTSUPP, EINVAL, ENODEV: bpf/include/kcrypto_defs.h), it is the least kernel code that
can do it (no netlink family and attribute policy to keep), access is the device node's mode
(0600) plus CAP_NET_ADMIN, and the key goes from this process straight into the module: it is
never in a BPF map that user space could read back. The module zeroizes it on destroy.

    with KcryptoDevice() as dev:
        dev.create(7, Alg.CHACHA20_POLY1305, key_and_salt, esn=False)
        ...                        # programs call the kfuncs with id 7
        dev.destroy(7)
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

from controller.core.secret import Secret
from controller.datapath.kcrypto_abi import F_ESN, IOC_CREATE, IOC_DESTROY, IOC_FLUSH, Alg, KcCreate

DEVICE = Path("/dev/xfp_crypto")
MODULE = "xfp_crypto"


def module_loaded() -> bool:
    return Path("/sys/module", MODULE).is_dir()


class KcryptoDevice:
    """An open /dev/xfp_crypto. While it is open the module cannot be unloaded."""

    def __init__(self, path: Path | str = DEVICE) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def create(self, ctx_id: int, alg: Alg, key: bytes | Secret, esn: bool = False) -> None:
        """Context `ctx_id` for `alg` with key || 4-byte salt (XFRM's layout for rfc4106 and
        rfc7539esp). OSError with the module's errno on refusal."""
        raw = key.reveal() if isinstance(key, Secret) else bytes(key)
        arg = KcCreate(id=ctx_id, alg=int(alg), flags=F_ESN if esn else 0, key_len=len(raw))
        try:
            if len(raw) > len(arg.key):
                raise OSError(22, f"key of {len(raw)} bytes is longer than {len(arg.key)}")
            ctypes.memmove(arg.key, raw, len(raw))
            fcntl.ioctl(self.fd, IOC_CREATE, arg)
        finally:
            ctypes.memset(ctypes.addressof(arg), 0, ctypes.sizeof(arg))

    def destroy(self, ctx_id: int) -> None:
        """Remove context `ctx_id`; the module zeroizes its key before this returns."""
        fcntl.ioctl(self.fd, IOC_DESTROY, ctypes.c_uint32(ctx_id))

    def flush(self) -> None:
        """Remove every context (a controller starting afresh)."""
        fcntl.ioctl(self.fd, IOC_FLUSH)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> KcryptoDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
