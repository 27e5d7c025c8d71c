# SPDX-License-Identifier: GPL-2.0-only
"""The XDP datapath's maps and the resequencer's SPI index in memory: the agent's DatapathPort
and ResequencerPort (controller/agent/ports.py) for tests/unit, where there is no root and no BPF.

They stand for controller/datapath/xdp.py `Datapath` (maps declared in bpf/include/maps.h) and
controller/datapath/reseq.py `Resequencer` (bpf/tc_reseq.c's xfp_sa_out_spi), and keep what
the agent can observe of them:

- the same values: the ctypes structs of controller/datapath/abi.py, built by the entries'
  own `to_c()`; a read returns a copy (as bpf(2) copies the element out);
- the same keys: xfp_flows by struct xfp_flow_key, xfp_sa_out and xfp_watchdog by sa_id,
  xfp_sa_in and xfp_sa_out_spi by struct xfp_sa_in_key (SPI and daddr in network order);
- the same errors: a hash map (SA tables, watchdog, SPI index) that holds max_entries refuses
  a new key with E2BIG (kernel/bpf/hashtab.c, alloc_htab_elem), raised as the real adapter
  raises it (DatapathError with .errno); the flow map is an LRU hash and evicts instead;
- the same side effects: put_*_sa writes the watchdog too, delete_*_sa removes the watchdog
  and liveness entries and wipes the element (zeros written over it) before deleting it,
  fence_sa sets the watchdog in the past (0);
- the datapath's own rule for using an SA (maps.h, xfp_watchdog): only while now <=
  min(entry.deadline_ns, watchdog entry). `xdp_send` / `xdp_receive` apply it when a test
  plays XDP traffic on an SA (sequence numbers, packet and byte counters).

`journal` lists every map write in order ("put_flow", "delete_flows", "watchdog", ...), so a
test can check an order (e.g. an SA fenced before its flows go, re-armed after).
"""

from __future__ import annotations

import ctypes
import errno
import time
from collections.abc import Iterator, Sequence

from controller.core.secret import Secret
from controller.datapath import abi
from controller.datapath import kcrypto_abi as kc
from controller.datapath.abi import FlowKey, FlowVal, SaIn, SaInKey, SaOut
from controller.datapath.entries import InboundSa, OutboundSa
from controller.datapath.reseq import RESEQ_STATS
from controller.datapath.xdp import DatapathError


def _sa_in_key(spi: int, daddr: str) -> bytes:
    return bytes(SaInKey(spi=abi.be32(spi), daddr=abi.be32(daddr)))


def _copy(c: ctypes.Structure) -> ctypes.Structure:
    return type(c).from_buffer_copy(bytes(c))


class HashMap:
    """One BPF hash map (BPF_MAP_TYPE_HASH, or LRU_HASH with `lru`): bytes of the key ->
    the value struct. A full hash map refuses a new key with E2BIG; a full LRU map evicts
    its oldest element (the kernel's LRU is approximate; oldest-written stands for it)."""

    def __init__(self, name: str, max_entries: int, *, lru: bool = False) -> None:
        self.name = name
        self.max_entries = max_entries
        self.lru = lru
        self.elems: dict[bytes, ctypes.Structure | int] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.elems)

    def put(self, key: bytes, value: ctypes.Structure | int) -> None:
        if key not in self.elems and len(self.elems) >= self.max_entries:
            if not self.lru:
                # What MapHandle.put raises for bpf(2)'s -E2BIG (controller/datapath/xdp.py).
                raise DatapathError(
                    f"update of {self.name}: {errno.errorcode[errno.E2BIG]}", errno.E2BIG
                )
            del self.elems[next(iter(self.elems))]
            self.evicted += 1
        self.elems.pop(key, None)  # rewritten elements go to the back (the LRU's newest)
        self.elems[key] = value

    def get(self, key: bytes) -> ctypes.Structure | int | None:
        v = self.elems.get(key)
        return _copy(v) if isinstance(v, ctypes.Structure) else v

    def delete(self, key: bytes) -> bool:
        return self.elems.pop(key, None) is not None

    def wipe_and_delete(self, key: bytes) -> bool:
        """Datapath._wipe_and_delete: zeros over the element in place, then delete."""
        v = self.elems.get(key)
        if v is None:
            return False
        if isinstance(v, ctypes.Structure):
            ctypes.memset(ctypes.addressof(v), 0, ctypes.sizeof(v))
        return self.delete(key)


class MemoryDatapath:
    """DatapathPort on dicts (see the module docstring for what it keeps of the real one).

    Sizes as the controller sizes the real maps: `sa_max` for each SA table (and twice that
    for the watchdog), `flows_max` for the flow map."""

    def __init__(self, *, sa_max: int = abi.SA_MAX, flows_max: int = abi.FLOWS_MAX) -> None:
        self.flow_map = HashMap("xfp_flows", flows_max, lru=True)
        self.sa_out_map = HashMap("xfp_sa_out", sa_max)
        self.sa_in_map = HashMap("xfp_sa_in", sa_max)
        self.watchdog_map = HashMap("xfp_watchdog", 2 * sa_max)
        self.liveness_map = HashMap("xfp_liveness", 2 * sa_max, lru=True)
        self.journal: list[tuple[object, ...]] = []
        self.wiped: list[ctypes.Structure] = []  # every SA element zeroed before its delete

    # -- flows ---------------------------------------------------------------------------------
    def put_flow(self, key: FlowKey, val: FlowVal) -> None:
        self.flow_map.put(bytes(key), _copy(val))
        self.journal.append(("put_flow", bytes(key)))

    def put_flows(self, items: Sequence[tuple[FlowKey, FlowVal]]) -> None:
        """MapHandle.put_batch: in order, one journal entry for the batch; a failing element
        raises with the ones before it written (the kernel's BPF_MAP_UPDATE_BATCH)."""
        self.journal.append(("put_flows", len(items)))
        for key, val in items:
            self.flow_map.put(bytes(key), _copy(val))

    def get_flow(self, key: FlowKey) -> FlowVal | None:
        return self.flow_map.get(bytes(key))  # type: ignore[return-value]

    def delete_flow(self, key: FlowKey) -> bool:
        self.journal.append(("delete_flow", bytes(key)))
        return self.flow_map.delete(bytes(key))

    def delete_flows(self, keys: Sequence[FlowKey | bytes]) -> int:
        """MapHandle.delete_batch: absent keys skipped, how many were deleted."""
        raw = [k if isinstance(k, bytes) else bytes(k) for k in keys]
        size = ctypes.sizeof(FlowKey)
        if any(len(k) != size for k in raw):
            raise ValueError(f"xfp_flows: keys of {size} bytes expected")
        self.journal.append(("delete_flows", len(raw)))
        return sum(self.flow_map.delete(k) for k in raw)

    def flows(self) -> Iterator[tuple[FlowKey, FlowVal]]:
        for k in list(self.flow_map.elems):
            v = self.flow_map.get(k)
            if v is not None:
                yield FlowKey.from_buffer_copy(k), v  # type: ignore[misc]

    # -- SAs -----------------------------------------------------------------------------------
    def put_outbound_sa(self, sa: OutboundSa) -> None:
        """Datapath.put_outbound_sa: the entry, then its watchdog at sa.deadline_ns."""
        self.sa_out_map.put(bytes(ctypes.c_uint32(sa.sa_id)), sa.to_c())
        self.journal.append(("put_outbound_sa", sa.sa_id))
        self.refresh_watchdog(sa.sa_id, sa.deadline_ns)

    def put_inbound_sa(self, sa: InboundSa) -> None:
        key, val = sa.to_c()
        self.sa_in_map.put(bytes(key), val)
        self.journal.append(("put_inbound_sa", sa.sa_id))
        self.refresh_watchdog(sa.sa_id, sa.deadline_ns)

    def outbound_sa(self, sa_id: int) -> SaOut | None:
        return self.sa_out_map.get(bytes(ctypes.c_uint32(sa_id)))  # type: ignore[return-value]

    def inbound_sa(self, spi: int, daddr: str) -> SaIn | None:
        return self.sa_in_map.get(_sa_in_key(spi, daddr))  # type: ignore[return-value]

    def outbound_sa_entries(self) -> Iterator[tuple[int, SaOut]]:
        for k in list(self.sa_out_map.elems):
            v = self.sa_out_map.get(k)
            if v is not None:
                yield ctypes.c_uint32.from_buffer_copy(k).value, v  # type: ignore[misc]

    def inbound_sa_entries(self) -> Iterator[SaIn]:
        for k in list(self.sa_in_map.elems):
            v = self.sa_in_map.get(k)
            if v is not None:
                yield v  # type: ignore[misc]

    def _wipe(self, m: HashMap, key: bytes) -> bool:
        v = m.elems.get(key)
        if isinstance(v, ctypes.Structure):
            self.wiped.append(v)  # the very element: zeros after the wipe
        return m.wipe_and_delete(key)

    def delete_outbound_sa(self, sa_id: int) -> bool:
        k = bytes(ctypes.c_uint32(sa_id))
        self.watchdog_map.delete(k)
        self.liveness_map.delete(k)
        self.journal.append(("delete_outbound_sa", sa_id))
        return self._wipe(self.sa_out_map, k)

    def delete_inbound_sa(self, spi: int, daddr: str) -> bool:
        key = _sa_in_key(spi, daddr)
        old = self.sa_in_map.elems.get(key)
        if isinstance(old, SaIn):
            k = bytes(ctypes.c_uint32(old.sa_id))
            self.watchdog_map.delete(k)
            self.liveness_map.delete(k)
            self.journal.append(("delete_inbound_sa", old.sa_id))
        return self._wipe(self.sa_in_map, key)

    # -- watchdog ------------------------------------------------------------------------------
    def refresh_watchdog(self, sa_id: int, deadline_ns: int) -> None:
        self.watchdog_map.put(bytes(ctypes.c_uint32(sa_id)), int(deadline_ns))
        self.journal.append(("watchdog", sa_id, int(deadline_ns)))

    def watchdog(self, sa_id: int) -> int | None:
        return self.watchdog_map.get(bytes(ctypes.c_uint32(sa_id)))  # type: ignore[return-value]

    def fence_sa(self, sa_id: int) -> None:
        self.refresh_watchdog(sa_id, 0)

    def watchdog_ids(self) -> list[int]:
        """The sa_ids that have a watchdog entry, sorted."""
        return sorted(ctypes.c_uint32.from_buffer_copy(k).value for k in self.watchdog_map.elems)

    # -- what XDP does, for tests to play ------------------------------------------------------
    def usable(self, sa_id: int, deadline_ns: int, now_ns: int | None = None) -> bool:
        """Would XDP use the SA now? Only while now <= min(deadline_ns, watchdog) (maps.h)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        wd = self.watchdog(sa_id)
        return wd is not None and now <= min(deadline_ns, wd)

    def xdp_send(self, sa_id: int, packets: int, nbytes: int, now_ns: int | None = None) -> int:
        """XDP encrypts `packets` packets (`nbytes` bytes in all) on outbound SA `sa_id`: each
        takes the next sequence number and is counted in the entry. How many XDP carried (0:
        the SA is absent, fenced, past its deadline or out of sequence numbers; the kernel
        gets them)."""
        v = self.sa_out_map.elems.get(bytes(ctypes.c_uint32(sa_id)))
        if not isinstance(v, SaOut) or not self.usable(sa_id, v.deadline_ns, now_ns):
            return 0
        if v.seq + packets > v.seq_limit:
            return 0
        v.seq += packets
        v.packets += packets
        v.bytes += nbytes
        return packets

    def xdp_receive(
        self, spi: int, daddr: str, packets: int, nbytes: int, now_ns: int | None = None
    ) -> int:
        """XDP decrypts `packets` in-order packets on inbound SA (spi, daddr): the window's
        top moves up by as many, the counters count them. How many XDP took."""
        v = self.sa_in_map.elems.get(_sa_in_key(spi, daddr))
        if not isinstance(v, SaIn) or not self.usable(v.sa_id, v.deadline_ns, now_ns):
            return 0
        v.seq_top += packets
        v.packets += packets
        v.bytes += nbytes
        return packets

    def touch_flow(self, key: FlowKey, now_ns: int, nbytes: int = 100) -> None:
        """XDP forwarded one packet of a flow: last_seen and the flow's counters."""
        v = self.flow_map.elems.get(bytes(key))
        assert isinstance(v, FlowVal), "no such flow in xfp_flows"
        v.last_seen_ns = now_ns
        v.packets += 1
        v.bytes += nbytes


class MemoryResequencer:
    """ResequencerPort on a dict: xfp_sa_out_spi, (SPI, daddr) -> sa_id, a hash map of
    `sa_max` entries as in bpf/tc_reseq.c. `kernel_send` plays bpf/tc_reseq.c renumbering a
    kernel-built ESP packet from the outbound SA entry it indexes (the shared counter): not
    offloaded or not indexed, the kernel's number stands; past the entry's deadline_ns it
    stands too (counted "expired"); at seq_limit the packet is dropped ("exhausted"). The
    watchdog is XDP's alone: a fenced SA is still renumbered (the agent's fence,
    controller/agent/invalidate.py, relies on it)."""

    def __init__(self, datapath: MemoryDatapath | None = None, *, sa_max: int = abi.SA_MAX):
        self.spi_map = HashMap("xfp_sa_out_spi", sa_max)
        self.datapath = datapath
        self.counts = dict.fromkeys(RESEQ_STATS, 0)

    def index_sa(self, spi: int, daddr: str, sa_id: int) -> None:
        self.spi_map.put(_sa_in_key(spi, daddr), sa_id)

    def unindex_sa(self, spi: int, daddr: str) -> bool:
        return self.spi_map.delete(_sa_in_key(spi, daddr))

    def indexed(self) -> list[tuple[int, str, int]]:
        out = []
        for k, sa_id in self.spi_map.elems.items():
            key = SaInKey.from_buffer_copy(k)
            out.append((abi.from_be32(key.spi), abi.ip_of(key.daddr), int(sa_id)))  # type: ignore[arg-type]
        return out

    def stats(self) -> dict[str, tuple[int, int]]:
        return {name: (n, 0) for name, n in self.counts.items()}

    def kernel_send(self, spi: int, daddr: str) -> int | None:
        """The kernel built one ESP packet on (spi, daddr): the number the TC program gives it
        from XDP's counter, or None when the SA is not indexed (the kernel's own number
        stands)."""
        sa_id = self.spi_map.elems.get(_sa_in_key(spi, daddr))
        if sa_id is None or self.datapath is None:
            return None
        v = self.datapath.sa_out_map.elems.get(bytes(ctypes.c_uint32(int(sa_id))))  # type: ignore[arg-type]
        if not isinstance(v, SaOut) or not v.flags & abi.SA_F_OFFLOAD:
            return None
        if time.monotonic_ns() > v.deadline_ns:
            self.counts["expired"] += 1
            return None
        seq = int(v.seq) or 1
        if seq >= v.seq_limit:
            self.counts["exhausted"] += 1  # the TC program drops it (TC_ACT_SHOT)
            return None
        v.seq = seq + 1
        self.counts["ok"] += 1
        return seq


class MemoryCrypto:
    """CryptoPort (controller/agent/ports.py) on a dict: the xfp_crypto module's context table
    as /dev/xfp_crypto keeps it (kmod/xfp_crypto.c; controller/datapath/kcrypto.py is the real
    adapter). It refuses as the module does, with OSError and the module's errno
    (bpf/include/kcrypto_defs.h): EEXIST for an id in use, ERANGE for an id past CTX_MAX,
    EOPNOTSUPP for an unknown algorithm, EINVAL for a key of the wrong size, ENOENT to destroy
    an id that has none. `destroyed` keeps every context's key as it was zeroized, and the
    datapath's journal (when given) gets ("kc_create", id) / ("kc_destroy", id), so a test can
    check that a context outlives every entry naming it."""

    KEY_LEN = {kc.Alg.CHACHA20_POLY1305: (36,), kc.Alg.AES_GCM: (20, 36)}

    def __init__(self, datapath: MemoryDatapath | None = None) -> None:
        self.contexts: dict[int, tuple[kc.Alg, bytes, bool]] = {}
        self.destroyed: list[bytearray] = []
        self.journal = datapath.journal if datapath is not None else []

    def create(self, ctx_id: int, alg: kc.Alg, key: Secret | bytes, esn: bool = False) -> None:
        raw = key.reveal() if isinstance(key, Secret) else bytes(key)
        if not 0 <= ctx_id < kc.CTX_MAX:
            raise OSError(errno.ERANGE, f"context id {ctx_id}")
        if ctx_id in self.contexts:
            raise OSError(errno.EEXIST, f"context {ctx_id} exists")
        if alg not in self.KEY_LEN:
            raise OSError(errno.EOPNOTSUPP, f"algorithm {alg}")
        if len(raw) not in self.KEY_LEN[alg]:
            raise OSError(errno.EINVAL, f"key of {len(raw)} bytes for {alg.name}")
        self.contexts[ctx_id] = (alg, raw, esn)
        self.journal.append(("kc_create", ctx_id))

    def destroy(self, ctx_id: int) -> None:
        if ctx_id not in self.contexts:
            raise OSError(errno.ENOENT, f"no context {ctx_id}")
        _alg, raw, _esn = self.contexts.pop(ctx_id)
        self.destroyed.append(bytearray(len(raw)))  # the module zeroizes before it returns
        self.journal.append(("kc_destroy", ctx_id))

    def flush(self) -> None:
        for ctx_id in list(self.contexts):
            self.destroy(ctx_id)
