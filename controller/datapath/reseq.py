# SPDX-License-Identifier: GPL-2.0-only
"""The TC egress resequencer (bpf/tc_reseq.c): load it, attach it to the WAN devices, and keep
its SPI index beside the datapath's outbound SA entries.

    rs = Resequencer(pin_dir).load()         # kcrypto=True: the kernel crypto backend
    rs.attach(["wan"])                       # clsact egress, direct-action; detached on close()
    rs.index_sa(spi, daddr, sa_id)           # after Datapath.put_outbound_sa()
    rs.unindex_sa(spi, daddr)                # before Datapath.delete_outbound_sa()
    rs.stats()                               # {"ok": (packets, bytes), ...}

The program shares the pinned maps of the datapath (same XFP_PIN_DIR), so it sees the same SA
entries and takes sequence numbers from the same counters under the same lock. Compiling and
attaching go through the one loader (controller/datapath/loader.py). With `kcrypto`, the
program is built with -DXFP_KCRYPTO and loaded through controller/datapath/kfunc.py (the
xfp_crypto module must be loaded): SAs flagged XFP_SA_F_KCRYPTO are re-sealed by the module's
kfuncs, the others by the BPF AEAD, as in the kernel-crypto xdp_encap.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.datapath import abi as defs
from controller.datapath.abi import SaInKey, Stat
from controller.datapath.loader import Loader, LoaderError, Prog
from controller.datapath.xdp import DEFAULT_PIN_DIR, MapHandle

# Counter names by index: enum xfp_reseq_stat (bpf/include/xfp_defs.h), mirrored in abi.py.
RESEQ_STATS = defs.RESEQ_STATS
PINNED_MAPS = ("xfp_sa_out_spi", "xfp_reseq_stats")  # beside the datapath's (same pin dir)


class ResequencerError(LoaderError):
    pass


@dataclass
class Resequencer:
    pin_dir: Path | str = DEFAULT_PIN_DIR
    cflags: Sequence[str] = ()  # -D flags only
    kcrypto: bool = False  # the kernel crypto backend (issue 17)
    bpf: object | None = None
    fn: object | None = None
    spi_map: MapHandle | None = None
    stat_map: MapHandle | None = None
    loader: Loader = field(default_factory=Loader, repr=False)

    @property
    def attached(self) -> list[int]:
        """ifindex of every device whose egress carries our filter."""
        return [a.ifindex for a in self.loader.attachments if a.kind == "tc-egress"]

    def load(self) -> Resequencer:
        """Compile and load bpf/tc_reseq.c (maps pinned beside the datapath's, under pin_dir)."""
        try:
            variant = ["-DXFP_KCRYPTO"] if self.kcrypto else []
            cflags = [*self.cflags, *variant]
            self.bpf = self.loader.compile("tc_reseq.c", cflags, pin_dir=self.pin_dir)
            load = self.loader.load_kfunc if self.kcrypto else self.loader.load
            self.fn = load(self.bpf, "tc_reseq", Prog.SCHED_CLS)
        except LoaderError as e:  # "compiling/loading bpf/tc_reseq.c: ..."
            raise ResequencerError(str(e), e.errno) from e
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
        """clsact + a direct-action BPF filter on egress of each device of the calling
        thread's namespace. Idempotent (replaces our filter), transactional (a failure undoes
        this call's attaches)."""
        assert self.fn is not None, "load() first"
        try:
            with self.loader.transaction():
                for dev in devices:
                    self.loader.attach_tc_egress(dev, self.fn, "tc_reseq")
        except LoaderError as e:  # "no device DEV" / "attach tc egress to DEV: ..."
            raise ResequencerError(str(e), e.errno) from e

    def detach_all(self) -> None:
        """Remove our filter from every device it was attached to (in the calling thread's
        namespace, as attach was; tolerant: a vanished device is fine)."""
        self.loader.detach_all()

    def close(self) -> None:
        """Detach everything (idempotent); the program and its maps stay loaded."""
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
