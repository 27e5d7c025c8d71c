# SPDX-License-Identifier: GPL-2.0-only
"""The TC egress resequencer (bpf/tc_reseq.c): load it, attach it to the WAN devices, and keep
its SPI index beside the datapath's outbound SA entries.

    rs = Resequencer(pin_dir).load()
    rs.attach(["wan"])                       # clsact egress, direct-action; detached on close()
    rs.index_sa(spi, daddr, sa_id)           # after Datapath.put_outbound_sa()
    rs.unindex_sa(spi, daddr)                # before Datapath.delete_outbound_sa()
    rs.stats()                               # {"ok": (packets, bytes), ...}

The program shares the pinned maps of the datapath (same XFP_PIN_DIR), so it sees the same SA
entries and takes sequence numbers from the same counters under the same lock.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.datapath import abi as defs
from controller.datapath.abi import SaInKey, Stat
from controller.datapath.xdp import BPF_DIR, DEFAULT_PIN_DIR, INCLUDE_DIR, MapHandle, ensure_bpffs

# Counter names by index: enum xfp_reseq_stat (bpf/include/xfp_defs.h), mirrored in abi.py.
RESEQ_STATS = defs.RESEQ_STATS
TC_HANDLE = 0xF1F0  # our filter's handle on the clsact egress hook
TC_PRIO = 1
PINNED_MAPS = ("xfp_sa_out_spi", "xfp_reseq_stats")  # beside the datapath's (same pin dir)


class ResequencerError(RuntimeError):
    pass


@dataclass
class Resequencer:
    pin_dir: Path | str = DEFAULT_PIN_DIR
    cflags: Sequence[str] = ()
    bpf: object | None = None
    fn: object | None = None
    attached: list[int] = field(default_factory=list)
    spi_map: MapHandle | None = None
    stat_map: MapHandle | None = None

    def load(self) -> Resequencer:
        from bcc import BPF

        ensure_bpffs()
        Path(self.pin_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = [f"-I{INCLUDE_DIR}", f'-DXFP_PIN_DIR="{self.pin_dir}"', *self.cflags]
        try:
            self.bpf = BPF(src_file=str(BPF_DIR / "tc_reseq.c").encode(), cflags=flags)
            self.fn = self.bpf.load_func(b"tc_reseq", BPF.SCHED_CLS)
        except Exception as e:  # BCC raises bare Exception
            raise ResequencerError(f"compiling/loading bpf/tc_reseq.c: {e}") from e
        b = self.bpf
        self.spi_map = MapHandle(
            b[b"xfp_sa_out_spi"].map_fd, SaInKey, ctypes.c_uint32, "xfp_sa_out_spi"
        )
        self.stat_map = MapHandle(
            b[b"xfp_reseq_stats"].map_fd, ctypes.c_uint32, Stat, "xfp_reseq_stats", percpu=True
        )
        return self

    @property
    def fd(self) -> int:
        assert self.fn is not None, "load() first"
        return self.fn.fd  # type: ignore[attr-defined]

    def attach(self, devices: Iterable[str]) -> None:
        """clsact + a direct-action BPF filter on egress of each device. Idempotent (replaces
        our filter), transactional (a failure undoes this call's attaches)."""
        from pyroute2 import IPRoute

        done: list[int] = []
        with IPRoute() as ipr:
            try:
                for dev in devices:
                    idx = ipr.link_lookup(ifname=dev)
                    if not idx:
                        raise ResequencerError(f"no device {dev}")
                    ifindex = idx[0]
                    with contextlib.suppress(Exception):
                        ipr.tc("add", "clsact", ifindex)
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        ifindex,
                        TC_HANDLE,
                        fd=self.fd,
                        name="tc_reseq",
                        parent="ffff:fff3",
                        prio=TC_PRIO,
                        direct_action=True,
                        protocol=0x0003,
                    )
                    done.append(ifindex)
            except Exception as e:
                self._detach(ipr, done)
                if isinstance(e, ResequencerError):
                    raise
                raise ResequencerError(f"attach tc egress: {e}") from e
        self.attached += [i for i in done if i not in self.attached]

    def _detach(self, ipr, ifindexes: Iterable[int]) -> None:
        for ifindex in ifindexes:
            with contextlib.suppress(Exception):
                ipr.tc(
                    "del-filter",
                    "bpf",
                    ifindex,
                    TC_HANDLE,
                    parent="ffff:fff3",
                    prio=TC_PRIO,
                    protocol=0x0003,
                )

    def detach_all(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            self._detach(ipr, self.attached)
        self.attached.clear()

    def close(self) -> None:
        self.detach_all()

    def unpin(self) -> None:
        """Remove this program's pinned maps (Datapath.unpin() removes the rest)."""
        for name in PINNED_MAPS:
            with contextlib.suppress(FileNotFoundError):
                (Path(self.pin_dir) / name).unlink()

    # -- the SPI index -------------------------------------------------------------------------
    def index_sa(self, spi: int, daddr: str, sa_id: int) -> None:
        assert self.spi_map is not None, "load() first"
        key = SaInKey(spi=defs.be32(spi), daddr=defs.be32(daddr))
        self.spi_map.put(key, ctypes.c_uint32(sa_id))

    def unindex_sa(self, spi: int, daddr: str) -> bool:
        assert self.spi_map is not None, "load() first"
        return self.spi_map.delete(SaInKey(spi=defs.be32(spi), daddr=defs.be32(daddr)))

    def indexed(self) -> list[tuple[int, str, int]]:
        assert self.spi_map is not None, "load() first"
        out = []
        for key in list(self.spi_map.keys()):
            val = self.spi_map.get(key)
            if val is not None:
                out.append((defs.from_be32(key.spi), defs.ip_of(key.daddr), int(val.value)))
        return out

    def stats(self) -> dict[str, tuple[int, int]]:
        assert self.stat_map is not None, "load() first"
        out = {}
        for i, name in enumerate(RESEQ_STATS):
            per_cpu = self.stat_map.get(ctypes.c_uint32(i)) or []
            out[name] = (sum(s.packets for s in per_cpu), sum(s.bytes for s in per_cpu))
        return out
