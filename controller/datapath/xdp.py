# SPDX-License-Identifier: GPL-2.0-only
"""The XDP datapath as the controller sees it: compile and load the two programs with BCC,
attach them, and read and write their maps with the types of controller/datapath/abi.py.

    with Datapath(pin_dir="/sys/fs/bpf/xfrm-fastpath") as dp:   # compiles both programs
        dp.attach(lan=["lan"], wan=["wan"])                      # detached again on exit
        dp.put_tx_port(ifindex_of("wan"))
        dp.put_outbound_sa(OutboundSa(sa_id=1, spi=0x1000, ...))
        dp.put_flow(FlowKey(...), FlowVal(...))
        dp.stats()   # {(Direction, Reason): (packets, bytes)}

bpf/xdp_encap.c runs on the LAN devices, bpf/xdp_decap.c on the WAN devices. Each is its own BCC
module; the flow, SA and counter maps are pinned in bpffs under `pin_dir` (mode 0600), so both
modules share them and a restarted controller finds them again (BCC reopens a map already pinned
at its path). Variants are chosen with -D cflags only. Map access goes through the raw bpf(2)
wrappers of libbcc with the ctypes structs of controller/datapath/abi.py, so what is written is
exactly what tests/bpf/test_abi.py checked against the C header.

Limits worth knowing:
- veth delivers an XDP-redirected frame only if the receiving peer runs an XDP program (or has
  GRO on). Frames that a veth receives from a local sender may carry CHECKSUM_PARTIAL (the L4
  checksum not yet computed): XDP sees the bytes only, so they would be encrypted with an
  unfinished checksum. Real NICs deliver complete checksums; on veth, turn tx checksum offload
  off on the sender (tests/host/test_datapath_redirect.py does).
- veth also hands XDP a buffer cut to the frame's size: bpf/xdp_encap.c then takes the ESP
  trailer's room in front and slides the packet (costs a copy; counted as a normal encap).
- Rewriting a live SA entry (put_outbound_sa / put_inbound_sa on an sa_id in use) resets its
  sequence number or replay window; extend an SA with refresh_watchdog instead.

Compiling, loading and attaching go through the one loader (controller/datapath/loader.py):
attach() is idempotent and transactional, and close() detaches what this object attached.

Namespaces: attach/detach act on devices of the calling thread's network namespace. A process
started with `nsenter --net=/run/netns/NAME` works as is; `netns=` on attach/detach enters a
named namespace around the call (controller/netns.py), so one compile can serve several.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.core.state import Direction
from controller.datapath import abi as defs
from controller.datapath.abi import FlowKey, FlowVal, Reason, SaIn, SaInKey, SaOut, Stat
from controller.datapath.bpfsys import map_info

# The entry builders live with no bcc import in entries.py; many callers import them from here.
from controller.datapath.entries import (  # noqa: F401
    NEVER,
    SEQ_LIMIT_32,
    InboundSa,
    OutboundSa,
    flow_key,
    flow_val,
)

# Paths and ensure_bpffs are the loader's; importable from here as before.
from controller.datapath.loader import (  # noqa: F401
    BPF_DIR,
    BPFFS,
    INCLUDE_DIR,
    ROOT,
    Loader,
    LoaderError,
    Prog,
    ensure_bpffs,
    netns_scope,
)

DEFAULT_PIN_DIR = BPFFS / "xfrm-fastpath"
PINNED_MAPS = (
    "xfp_flows",
    "xfp_sa_out",
    "xfp_sa_in",
    "xfp_watchdog",
    "xfp_liveness",
    "xfp_stats",
)

# include/uapi/linux/bpf.h: map update flags; include/uapi/linux/if_link.h: XDP attach flags
BPF_ANY = 0
BPF_F_LOCK = 4
XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4
XDP_MODES = {"auto": 0, "generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}


class DatapathError(LoaderError):
    """Compiling, loading, attaching or a map operation failed; the message says which, and
    `errno` the system error of a failed map operation (E2BIG: the map is full)."""

    def __init__(self, msg: str, errno: int = 0) -> None:
        super().__init__(msg, errno)


def _lib():  # bcc.libbcc.lib, imported late: importing bcc is slow
    from bcc.libbcc import lib

    return lib


def _possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno() or -ret
        raise DatapathError(f"{what}: {os.strerror(err)}", err)


def ifindex_of(dev: str) -> int:
    """ifindex of a device in the calling thread's network namespace."""
    return socket.if_nametoindex(dev)


def open_pinned_map(
    path: Path | str, key_type: type, value_type: type, percpu: bool = False
) -> MapHandle:
    """A MapHandle on the map pinned at `path` (another process's, e.g. a running
    controller's). The caller owns its fd: os.close(handle.fd) when done."""
    lib = _lib()
    lib.bpf_obj_get.restype, lib.bpf_obj_get.argtypes = ctypes.c_int, [ctypes.c_char_p]
    fd = lib.bpf_obj_get(str(path).encode())
    _check(fd, f"open pinned map {path}")
    return MapHandle(fd, key_type, value_type, Path(path).name, percpu=percpu)


# The entry layouts of the pinned maps, as this build's programs declare them (bpf/include/
# maps.h, mirrored in abi.py): BCC reuses a pinned map as it finds it, whatever its layout.
PINNED_LAYOUTS = {
    "xfp_flows": (FlowKey, FlowVal),
    "xfp_sa_out": (ctypes.c_uint32, SaOut),
    "xfp_sa_in": (SaInKey, SaIn),
}


def check_pinned_layout(pin_dir: Path) -> None:
    """Refuse maps pinned by a build whose entries have another layout (an upgrade while an
    older controller died without handing its SAs back). Reading its SA entries with this
    build's structs would misread their sequence counters, and handing back a wrong number
    would let the kernel repeat sequence numbers, and so nonces, under the same key; so the
    operator decides: the error says how."""
    for name, (key_t, val_t) in PINNED_LAYOUTS.items():
        path = pin_dir / name
        if not path.exists():
            continue
        handle = open_pinned_map(path, key_t, val_t)
        try:
            info = map_info(handle.fd)
        finally:
            os.close(handle.fd)
        have = (int(info["key_size"]), int(info["value_size"]))
        want = (ctypes.sizeof(key_t), ctypes.sizeof(val_t))
        if have != want:
            raise DatapathError(
                f"{path} was pinned by another build of xfrm-fastpath (key/value {have[0]}/"
                f"{have[1]} bytes, this build {want[0]}/{want[1]}): its SA entries cannot be "
                "read to hand their sequence numbers back. Start the build that pinned it and "
                "stop it cleanly (it hands every SA back), or have the IKE daemon rekey every "
                f"CHILD_SA (e.g. `swanctl --rekey`), then remove {pin_dir}"
            )


# The kernel's own "operation not supported" (include/linux/errno.h), which bpf(2) returns for a
# map type without batch operations; not in errno.
ENOTSUPP = 524


class MapHandle:
    """One BPF map by fd, read and written with ctypes structs (raw bpf(2) via libbcc)."""

    def __init__(self, fd: int, key_type: type, value_type: type, name: str, percpu: bool = False):
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.name = name
        self.percpu = percpu
        self._ncpu = _possible_cpus() if percpu else 1

    def _value_buf(self) -> ctypes.Array:
        # Per-CPU maps: one value per possible CPU, each rounded up to 8 bytes (bpf(2)).
        size = (ctypes.sizeof(self.value_type) + 7) & ~7
        return ctypes.create_string_buffer(size * self._ncpu)

    def get(self, key: ctypes.Structure | ctypes._SimpleCData):
        """The value (a list per CPU for per-CPU maps), or None when the key is absent."""
        buf = self._value_buf()
        if _lib().bpf_lookup_elem(self.fd, ctypes.byref(key), buf) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return None
            _check(-1, f"lookup in {self.name}")
        if not self.percpu:
            return self.value_type.from_buffer_copy(buf.raw[: ctypes.sizeof(self.value_type)])
        step = (ctypes.sizeof(self.value_type) + 7) & ~7
        return [
            self.value_type.from_buffer_copy(buf.raw[i * step : i * step + step])
            for i in range(self._ncpu)
        ]

    def put(self, key, value, flags: int = BPF_ANY) -> None:
        _check(
            _lib().bpf_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags),
            f"update of {self.name}",
        )

    def delete(self, key) -> bool:
        """Delete a key; False when it was absent."""
        if _lib().bpf_delete_elem(self.fd, ctypes.byref(key)) < 0:
            if ctypes.get_errno() == errno.ENOENT:
                return False
            _check(-1, f"delete from {self.name}")
        return True

    def put_batch(self, items: Sequence[tuple[object, object]]) -> None:
        """Write many (key, value) pairs (structs, or their bytes) with BPF_MAP_UPDATE_BATCH:
        one bpf(2) call instead of one per pair (what lets the learner install a burst of new
        flows at line rate). In order; an error raises DatapathError with the pairs before it
        written (the kernel stops at the first). BPF_ANY (libbcc's wrapper passes no element
        flags). A kernel without batch ops for the map gets one update per pair."""
        n = len(items)
        if n == 0:
            return
        ksize, vsize = ctypes.sizeof(self.key_type), ctypes.sizeof(self.value_type)
        kraw = b"".join(k if isinstance(k, bytes) else bytes(k) for k, _ in items)  # type: ignore[call-overload]
        vraw = b"".join(v if isinstance(v, bytes) else bytes(v) for _, v in items)  # type: ignore[call-overload]
        if len(kraw) != n * ksize or len(vraw) != n * vsize:
            raise ValueError(f"{self.name}: keys of {ksize} and values of {vsize} bytes expected")
        if self.percpu:
            raise ValueError(f"{self.name}: put_batch writes one value per key, not per CPU")
        keys = (self.key_type * n).from_buffer_copy(kraw)
        vals = (self.value_type * n).from_buffer_copy(vraw)
        count = ctypes.c_uint32(n)
        if _lib().bpf_update_batch(self.fd, keys, vals, ctypes.byref(count)) >= 0:
            return
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP) and count.value == 0:
            for k, v in zip(keys, vals, strict=True):
                self.put(k, v)
            return
        ctypes.set_errno(err)
        _check(-1, f"batch update of {self.name} ({count.value} of {n} written)")

    def delete_batch(self, keys: Sequence) -> int:
        """Delete many keys (key structs, or their bytes) with BPF_MAP_DELETE_BATCH: one
        bpf(2) call where nothing is amiss. How many were deleted. The kernel deletes in order
        and stops at the first error, telling how far it got: the call resumes past a key
        already absent, and falls back to one delete per key if the kernel lacks batch ops."""
        n = len(keys)
        if n == 0:
            return 0
        size = ctypes.sizeof(self.key_type)
        raw = b"".join(k if isinstance(k, bytes) else bytes(k) for k in keys)
        if len(raw) != n * size:
            raise ValueError(f"{self.name}: keys of {size} bytes expected")
        arr = (self.key_type * n).from_buffer_copy(raw)
        base = ctypes.addressof(arr)
        lib = _lib()
        deleted = i = 0
        while i < n:
            count = ctypes.c_uint32(n - i)
            ret = lib.bpf_delete_batch(self.fd, base + i * size, ctypes.byref(count))
            done = min(count.value, n - i) if ret < 0 else n - i
            deleted += done
            i += done
            if ret >= 0:
                break
            err = ctypes.get_errno()
            if err == errno.ENOENT:
                i += 1  # the kernel stopped at key i: already gone
            elif err in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP) and done == 0:
                return deleted + sum(self.delete(k) for k in arr[i:])
            else:
                _check(-1, f"batch delete from {self.name}")
        return deleted

    def keys(self, limit: int = 1 << 20) -> Iterator:
        """Every key (a snapshot walk; bounded by `limit`)."""
        cur = None
        for _ in range(limit):
            nxt = self.key_type()
            ret = _lib().bpf_get_next_key(
                self.fd, ctypes.byref(cur) if cur is not None else None, ctypes.byref(nxt)
            )
            if ret < 0:
                return
            yield nxt
            cur = nxt


@dataclass
class _Loaded:
    bpf: object  # bcc.BPF
    fn: object  # bcc.BPF.Function
    tx_ports: MapHandle


@dataclass
class Datapath:
    """Both XDP programs, their maps and their attachments. Use as a context manager (or call
    load() and close()): close() detaches everything this object attached."""

    pin_dir: Path | str = DEFAULT_PIN_DIR
    cflags: Sequence[str] = ()  # extra -D flags only, e.g. ("-DXFP_MAX_FRAME=9100",)
    xdp_mode: str = "auto"
    # The kernel crypto backend (issue 17): built with -DXFP_KCRYPTO, SAs flagged SA_F_KCRYPTO
    # are sealed and opened by the xfp_crypto module's kfuncs (bpf/include/kcrypto/esp_kc.h),
    # so the programs load through Loader.load_kfunc (the module must be loaded).
    kcrypto: bool = False
    encap: _Loaded | None = None
    decap: _Loaded | None = None
    maps: dict[str, MapHandle] = field(default_factory=dict)
    loader: Loader = field(default_factory=Loader, repr=False)

    @property
    def attached(self) -> list[tuple[str | None, str, int]]:
        """(netns, device, XDP flags) of every attachment this object holds."""
        return [(a.netns, a.target, a.flags) for a in self.loader.attachments if a.kind == "xdp"]

    # -- load ----------------------------------------------------------------------------------
    def _cflags(self) -> list[str]:
        for flag in self.cflags:
            if not flag.startswith("-D"):
                raise DatapathError(f"only -D cflags select variants, not {flag!r}")
        return list(self.cflags)

    def _load_one(self, name: str) -> _Loaded:
        try:  # the loader adds -I bpf/include and -DXFP_PIN_DIR (maps.h pins the maps there)
            variant = ["-DXFP_KCRYPTO"] if self.kcrypto else []
            b = self.loader.compile(f"{name}.c", self._cflags() + variant, pin_dir=self.pin_dir)
            load = self.loader.load_kfunc if self.kcrypto else self.loader.load
            fn = load(b, name, Prog.XDP)
        except LoaderError as e:  # "compiling/loading bpf/NAME.c: ..."
            raise DatapathError(str(e), e.errno) from e
        tx = b[b"xfp_tx_ports"]
        return _Loaded(b, fn, MapHandle(tx.map_fd, ctypes.c_uint32, ctypes.c_int32, "tx_ports"))

    def load(self) -> Datapath:
        """Compile and load both programs (maps pinned under pin_dir, created if absent;
        bpffs mounted if it is not)."""
        pin = Path(self.pin_dir)
        check_pinned_layout(pin)
        self.encap = self._load_one("xdp_encap")
        self.decap = self._load_one("xdp_decap")
        t = self.encap.bpf
        self.maps = {
            "flows": MapHandle(t[b"xfp_flows"].map_fd, FlowKey, FlowVal, "xfp_flows"),
            "sa_out": MapHandle(t[b"xfp_sa_out"].map_fd, ctypes.c_uint32, SaOut, "xfp_sa_out"),
            "sa_in": MapHandle(t[b"xfp_sa_in"].map_fd, SaInKey, SaIn, "xfp_sa_in"),
            "watchdog": MapHandle(
                t[b"xfp_watchdog"].map_fd, ctypes.c_uint32, ctypes.c_uint64, "xfp_watchdog"
            ),
            "liveness": MapHandle(
                t[b"xfp_liveness"].map_fd, ctypes.c_uint32, ctypes.c_uint64, "xfp_liveness"
            ),
            "stats": MapHandle(
                t[b"xfp_stats"].map_fd, ctypes.c_uint32, Stat, "xfp_stats", percpu=True
            ),
        }
        for name in PINNED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                os.chmod(pin / name, 0o600)
        return self

    @property
    def encap_fd(self) -> int:
        assert self.encap is not None, "load() first"
        return self.encap.fn.fd

    @property
    def decap_fd(self) -> int:
        assert self.decap is not None, "load() first"
        return self.decap.fn.fd

    # -- attach ---------------------------------------------------------------------------------
    def attach(
        self, lan: Iterable[str] = (), wan: Iterable[str] = (), netns: str | None = None
    ) -> None:
        """Attach encap to every LAN device and decap to every WAN device. Idempotent (a device
        already carrying our program is replaced in place); transactional: when one attach
        fails, the ones made by this call are undone and DatapathError raised."""
        assert self.encap is not None and self.decap is not None, "load() first"
        flags = XDP_MODES[self.xdp_mode]
        try:
            with self.loader.transaction():
                for devs, loaded in ((lan, self.encap), (wan, self.decap)):
                    for dev in devs:
                        self.loader.attach_xdp(dev, loaded.fn, flags, netns=netns)
        except LoaderError as e:  # "attach XDP to DEV: ..."
            raise DatapathError(str(e), e.errno) from e

    def detach_all(self) -> None:
        """Detach every program this object attached (tolerant: a vanished device is fine)."""
        self.loader.detach_all()

    def close(self) -> None:
        """Detach everything (idempotent). The programs and maps stay loaded: the map
        handles still work, e.g. for unpin() or a last read of the counters."""
        self.detach_all()

    def __enter__(self) -> Datapath:
        return self.load()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def map_sizes(self) -> dict[str, int]:
        """max_entries of the loaded flow and SA maps (those pinned, if they were found)."""
        return {
            h.name: int(map_info(h.fd)["max_entries"])
            for h in (self.maps["flows"], self.maps["sa_out"], self.maps["sa_in"])
        }

    def unpin(self) -> None:
        """Remove the pinned maps and the pin directory (uninstall, or a test's own pins)."""
        pin = Path(self.pin_dir)
        for name in PINNED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                (pin / name).unlink()
        with contextlib.suppress(FileNotFoundError, OSError):
            pin.rmdir()

    # -- devmap -----------------------------------------------------------------------------------
    def put_tx_port(self, ifindex: int, netns: str | None = None) -> None:
        """Allow redirects to `ifindex` (in both programs' devmaps). The kernel resolves the
        ifindex in the calling thread's network namespace: pass `netns` (as to attach) when the
        device lives elsewhere."""
        if not 0 < ifindex < defs.DEVMAP_SIZE:
            raise DatapathError(f"ifindex {ifindex} outside the devmap (< {defs.DEVMAP_SIZE})")
        with netns_scope(netns):
            for loaded in (self.encap, self.decap):
                assert loaded is not None, "load() first"
                loaded.tx_ports.put(ctypes.c_uint32(ifindex), ctypes.c_int32(ifindex))

    def delete_tx_port(self, ifindex: int) -> None:
        for loaded in (self.encap, self.decap):
            assert loaded is not None, "load() first"
            loaded.tx_ports.delete(ctypes.c_uint32(ifindex))

    # -- SAs ---------------------------------------------------------------------------------------
    def put_outbound_sa(self, sa: OutboundSa) -> None:
        """Install an outbound SA (and its watchdog, at sa.deadline_ns). Writing an entry that
        is in use resets its sequence number to sa.seq: do that only for a new sa_id, never to
        change a live one (refresh_watchdog is the safe way to extend it)."""
        self.maps["sa_out"].put(ctypes.c_uint32(sa.sa_id), sa.to_c())
        self.refresh_watchdog(sa.sa_id, sa.deadline_ns)

    def put_inbound_sa(self, sa: InboundSa) -> None:
        """Install an inbound SA (and its watchdog). Same caveat: rewriting a live entry resets
        its replay window to sa.seq_top."""
        key, val = sa.to_c()
        self.maps["sa_in"].put(key, val)
        self.refresh_watchdog(sa.sa_id, sa.deadline_ns)

    def outbound_sa(self, sa_id: int) -> SaOut | None:
        """The entry as the datapath left it: seq (next to use), packets, bytes."""
        return self.maps["sa_out"].get(ctypes.c_uint32(sa_id))

    def inbound_sa(self, spi: int, daddr: str) -> SaIn | None:
        """The entry as the datapath left it: seq_top, bitmap, packets, replay_drops..."""
        return self.maps["sa_in"].get(SaInKey(spi=defs.be32(spi), daddr=defs.be32(daddr)))

    def outbound_sa_entries(self) -> Iterator[tuple[int, SaOut]]:
        """(sa_id, entry) of every outbound SA entry present (a restarted controller finds
        those its predecessor left pinned); entries deleted during the walk are skipped."""
        for key in list(self.maps["sa_out"].keys()):
            entry = self.maps["sa_out"].get(key)
            if entry is not None:
                yield int(key.value), entry

    def inbound_sa_entries(self) -> Iterator[SaIn]:
        """Every inbound SA entry present (its spi and daddr are its key)."""
        for key in list(self.maps["sa_in"].keys()):
            entry = self.maps["sa_in"].get(key)
            if entry is not None:
                yield entry

    def _wipe_and_delete(self, handle: MapHandle, key, value_type: type) -> bool:
        """Key hygiene: overwrite the element in place with zeros (an update with BPF_F_LOCK is
        done in place by the kernel's hash map, kernel/bpf/hashtab.c, where a plain update
        would leave the old element, key material included, on the free list), then delete."""
        if handle.get(key) is None:
            return False
        with contextlib.suppress(DatapathError):
            handle.put(key, value_type(), BPF_F_LOCK)
        return handle.delete(key)

    def delete_outbound_sa(self, sa_id: int) -> bool:
        self.maps["watchdog"].delete(ctypes.c_uint32(sa_id))
        self.maps["liveness"].delete(ctypes.c_uint32(sa_id))
        return self._wipe_and_delete(self.maps["sa_out"], ctypes.c_uint32(sa_id), SaOut)

    def delete_inbound_sa(self, spi: int, daddr: str) -> bool:
        key = SaInKey(spi=defs.be32(spi), daddr=defs.be32(daddr))
        old = self.maps["sa_in"].get(key)
        if old is not None:
            self.maps["watchdog"].delete(ctypes.c_uint32(old.sa_id))
            self.maps["liveness"].delete(ctypes.c_uint32(old.sa_id))
        return self._wipe_and_delete(self.maps["sa_in"], key, SaIn)

    def refresh_watchdog(self, sa_id: int, deadline_ns: int) -> None:
        """Let the datapath use SA `sa_id` until `deadline_ns` (CLOCK_MONOTONIC). A map of its
        own: refreshing it never races with the sequence or replay state in the SA entry."""
        self.maps["watchdog"].put(ctypes.c_uint32(sa_id), ctypes.c_uint64(deadline_ns))

    def watchdog(self, sa_id: int) -> int | None:
        """SA `sa_id`'s watchdog deadline (CLOCK_MONOTONIC ns), None when it has none."""
        got = self.maps["watchdog"].get(ctypes.c_uint32(sa_id))
        return None if got is None else int(got.value)

    def fence_sa(self, sa_id: int) -> None:
        """Stop XDP using SA `sa_id` now, whatever the number of its flows: its watchdog is set
        in the past, so each of its packets goes to the kernel (counted as sa_expired) while
        the flows are being removed. refresh_watchdog lifts the fence."""
        self.refresh_watchdog(sa_id, 0)

    # -- flows ------------------------------------------------------------------------------------
    def put_flow(self, key: FlowKey, val: FlowVal) -> None:
        self.maps["flows"].put(key, val)

    def put_flows(self, items: Sequence[tuple[FlowKey, FlowVal]]) -> None:
        """Write many flow entries in one bpf(2) call (MapHandle.put_batch): in order; an error
        raises with the entries before the failing one written."""
        self.maps["flows"].put_batch(items)

    def get_flow(self, key: FlowKey) -> FlowVal | None:
        return self.maps["flows"].get(key)

    def delete_flow(self, key: FlowKey) -> bool:
        return self.maps["flows"].delete(key)

    def delete_flows(self, keys: Sequence[FlowKey | bytes]) -> int:
        """Delete many flows at once (keys as structs or their bytes; absent ones skipped):
        how many were deleted."""
        return self.maps["flows"].delete_batch(keys)

    def flows(self) -> Iterator[tuple[FlowKey, FlowVal]]:
        """(key, value) of every flow (entries deleted during the walk are skipped)."""
        for key in list(self.maps["flows"].keys()):
            val = self.maps["flows"].get(key)
            if val is not None:
                yield key, val

    # -- counters ---------------------------------------------------------------------------------
    def stats(self) -> dict[tuple[Direction, Reason], tuple[int, int]]:
        """Per-CPU counters summed: (direction, reason) -> (packets, bytes), zeros included."""
        out = {}
        for d in Direction:
            for r in Reason:
                if r is Reason.MAX:
                    continue
                per_cpu = self.maps["stats"].get(ctypes.c_uint32(defs.stat_index(d, r)))
                out[(d, r)] = (
                    sum(s.packets for s in per_cpu or []),
                    sum(s.bytes for s in per_cpu or []),
                )
        return out
