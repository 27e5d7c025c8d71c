# SPDX-License-Identifier: GPL-2.0-only
"""SA offload: writing an SA into the datapath, keeping the kernel's view of it right while XDP
carries its traffic, and handing it back.

Sequence ownership: once an outbound SA is offloaded, the datapath's counter in the SA entry is
the SA's only sequence source. The datapath starts it SEQ_JUMP above the kernel's output
sequence, so every number it sends is above any the kernel has sent (the peer's window only
moves forward), and ESP packets the kernel itself still builds for the SA (first packets of
new flows, gateway-originated traffic) are renumbered from the same counter on their way out
(bpf/tc_reseq.c). IVs follow the kernel's seqiv construction (IV = seq XOR a per-SA mask
learned from a kernel packet), so distinct sequence numbers give distinct nonces whoever sends.

While offloaded: what XDP carried is added to the kernel's lifetime counters (soft and hard
volume limits act as in the kernel), and the datapath's watchdog is refreshed; a lapsed one
means the agent stalled. On release the outbound sequence and the inbound replay window go
back to the kernel (XFRM_MSG_NEWAE) before the entry is removed, key wiped.

Crypto backend (controller/core/crypto.py): on the kernel's, an SA's key goes into an
xfp_crypto context (Ports.crypto) made with the entry and destroyed after it (key zeroized by
the module); the entry carries the context id, never the key.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from controller.agent.ports import CryptoPort, DatapathPort, Ports, ResequencerPort, XfrmPort
from controller.agent.state import NEVER, AgentState, OffloadedSa
from controller.config import Config
from controller.core.crypto import AES_GCM_AEAD, Backend, sa_backend
from controller.core.reasons import RejectReason
from controller.core.state import Cause, Direction, FlowKey
from controller.core.xfrm_model import LifetimeCur, Sa
from controller.datapath import abi as defs
from controller.datapath.entries import InboundSa, OutboundSa
from controller.datapath.kcrypto_abi import CTX_MAX, Alg

log = logging.getLogger("xfrm-fastpath")

# The datapath's counter starts this far above the kernel's output sequence: room for the
# packets the kernel may still send on the SA while the entry is being written (checked after).
SEQ_JUMP = 4096
# When the datapath lets an SA go, the kernel's output sequence is set this far above the
# datapath's counter before the entry is removed: room for the packets XDP and the
# resequencer may still number in between (checked after removal).
HANDBACK_MARGIN = 1024
SEQ_SPACE_32 = 1 << 32


def hard_deadline(sa: Sa, now_ns: int) -> int:
    """When the SA dies by time, as CLOCK_MONOTONIC ns (add_time is wall-clock seconds)."""
    lt = sa.lifetime
    if not lt.hard_add_expires_seconds:
        return NEVER
    added = sa.current.add_time or int(time.time())
    remaining = added + lt.hard_add_expires_seconds - time.time()
    return now_ns + max(0, int(remaining * 1e9))


def recover_pinned_state(
    dp: DatapathPort, reseq: ResequencerPort, xfrm: XfrmPort, crypto: CryptoPort | None = None
) -> None:
    """A previous controller that died left SA entries pinned: hand their sequence numbers
    back to the kernel, then start clean (flows are re-learned from the next packets; its
    kernel crypto contexts, when `crypto` is given, are flushed after the entries naming
    them are gone)."""
    leftover = list(dp.outbound_sa_entries())
    for sa_id, entry in leftover:
        spi, daddr = defs.from_be32(entry.spi), defs.ip_of(entry.daddr)
        sa = xfrm.get_sa(daddr, spi)
        hand_back_outbound(dp, reseq, xfrm, sa, sa_id, spi, daddr)
    for entry in list(dp.inbound_sa_entries()):
        dp.delete_inbound_sa(defs.from_be32(entry.spi), defs.ip_of(entry.daddr))
    for key, _val in list(dp.flows()):
        dp.delete_flow(key)
    for spi, daddr, _sa_id in reseq.indexed():
        reseq.unindex_sa(spi, daddr)
    if crypto is not None:
        crypto.flush()
    if leftover:
        log.warning("recovered %d SA entries left by a previous controller", len(leftover))


def hand_back_outbound(
    dp: DatapathPort,
    reseq: ResequencerPort,
    xfrm: XfrmPort,
    sa: Sa | None,
    sa_id: int,
    spi: int,
    daddr: str,
) -> None:
    """Give an outbound SA's sequence back to the kernel, then remove the entry.

    The kernel's output sequence is set HANDBACK_MARGIN above the datapath's counter
    first, so that whatever XDP or the resequencer still numbers before the entry is gone
    stays below what the kernel sends next; then the SPI index and the entry go (key
    wiped). If the counter ran past the margin meanwhile, that is logged loudly: the
    kernel would repeat numbers (and IVs), so the SA is expired to force a rekey."""
    entry = dp.outbound_sa(sa_id)
    handed = 0
    if sa is not None and entry is not None and entry.seq > 1:
        try:
            ae = xfrm.get_ae(sa)
            cur = ae.replay.oseq64 if ae.replay else 0
            handed = max(cur, entry.seq - 1 + HANDBACK_MARGIN)
            if not sa.esn:
                handed = min(handed, SEQ_SPACE_32 - 1)
            xfrm.set_oseq(sa, handed)
        except Exception as e:
            log.error("SA 0x%08x: handing the sequence back failed: %s", spi, e)
    reseq.unindex_sa(spi, daddr)
    last = dp.outbound_sa(sa_id)
    dp.delete_outbound_sa(sa_id)
    if handed and last is not None and last.seq - 1 > handed and sa is not None:
        log.error(
            "SA 0x%08x: datapath used %d > handed back %d: expiring the SA",
            spi,
            last.seq - 1,
            handed,
        )
        with contextlib.suppress(Exception):
            xfrm.send_expire(sa, hard=True)
    elif handed:
        log.info("SA 0x%08x: sequence handed back to the kernel at %d", spi, handed)


class RemoveFlows(Protocol):
    """What releasing an SA needs of invalidation: its flows out (Remover.remove in
    controller/agent/invalidate.py)."""

    def remove(self, keys: Iterable[FlowKey], cause: Cause) -> int: ...


class Offload:
    """SAs into the datapath and back out, and their upkeep while there."""

    def __init__(self, cfg: Config, state: AgentState, ports: Ports, remover: RemoveFlows):
        self.cfg = cfg
        self.state = state
        self.ports = ports
        self.remover = remover

    # -- offload -----------------------------------------------------------------------------
    def offload_outbound(
        self,
        sa: Sa,
        iv_xor_seq: bytes | None,
        out_ifindex: int,
        dmac: str,
        smac: str,
        mtu: int,
        now: int,
    ) -> OffloadedSa | None:
        """Write an outbound SA: its counter SEQ_JUMP above the kernel's, IVs masked as the
        kernel's (`iv_xor_seq`, from a packet the kernel sent), the outer next hop the flow was
        validated with. None (counted) when that cannot be done safely."""
        st, dp, xfrm, reseq = self.state, self.ports.datapath, self.ports.xfrm, self.ports.reseq
        metrics = self.ports.metrics
        if iv_xor_seq is None:
            metrics.reject(RejectReason.NO_IV_MASK)
            return None
        ae = xfrm.get_ae(sa)
        kernel_oseq = ae.replay.oseq64 if ae.replay else 0
        start = kernel_oseq + 1 + SEQ_JUMP
        limit = SEQ_SPACE_32 if not sa.esn else (1 << 64) - 1
        if start >= limit - SEQ_JUMP:
            metrics.reject(RejectReason.SEQ_EXHAUSTED)
            return None
        off = OffloadedSa(sa, st.alloc_sa_id(), Direction.ENCAP, hard_deadline(sa, now))
        self._make_context(off)
        entry = OutboundSa(
            **_entry_identity(off),
            egress_ifindex=out_ifindex,
            dmac=dmac,
            smac=smac,
            mtu=mtu,
            seq=start,
            seq_limit=limit,
            iv_mask=int.from_bytes(iv_xor_seq, "big"),
            esn=sa.esn,
            deadline_ns=off.hard_deadline_ns,
        )
        try:
            dp.put_outbound_sa(entry)
            self.refresh_watchdog(off, now)
            reseq.index_sa(sa.spi, str(sa.dst), off.sa_id)
        except Exception:  # e.g. a full map: leave nothing half-installed (the caller counts)
            with contextlib.suppress(Exception):
                reseq.unindex_sa(sa.spi, str(sa.dst))
            with contextlib.suppress(Exception):
                dp.delete_outbound_sa(off.sa_id)
            self._destroy_context(off)
            raise
        # The kernel may have sent on the SA while the entry was written: its numbers must
        # still be below the datapath's, or the entry is withdrawn (fail closed).
        after = xfrm.get_ae(sa)
        if after.replay and after.replay.oseq64 >= start:
            reseq.unindex_sa(sa.spi, str(sa.dst))
            dp.delete_outbound_sa(off.sa_id)
            self._destroy_context(off)
            metrics.reject(RejectReason.KERNEL_RACED)
            return None
        st.sa_out[off.ref] = off
        st.refused_sas.pop(off.ref, None)
        log.info(
            "SA 0x%08x (reqid %d) outbound offloaded as sa_id %d, seq from %d, crypto %s (%s)",
            sa.spi,
            sa.reqid,
            off.sa_id,
            start,
            off.crypto,
            off.crypto_why,
        )
        return off

    def offload_inbound(self, sa: Sa, now: int) -> OffloadedSa:
        """Write an inbound SA, its replay window taken over from the kernel's."""
        st, dp = self.state, self.ports.datapath
        ae = self.ports.xfrm.get_ae(sa)
        top = ae.replay.seq64 if ae.replay else 0
        off = OffloadedSa(sa, st.alloc_sa_id(), Direction.DECAP, hard_deadline(sa, now))
        self._make_context(off)
        entry = InboundSa(
            **_entry_identity(off),
            replay_window=min(max(sa.replay_window, 32), defs.REPLAY_MAX_WINDOW)
            if sa.replay_window
            else 0,
            esn=sa.esn,
            deadline_ns=off.hard_deadline_ns,
            seq_top=top,
        )
        try:
            dp.put_inbound_sa(entry)
            self.refresh_watchdog(off, now)
        except Exception:  # e.g. a full map: leave nothing half-installed (the caller counts)
            with contextlib.suppress(Exception):
                dp.delete_inbound_sa(sa.spi, str(sa.dst))
            self._destroy_context(off)
            raise
        st.sa_in[off.ref] = off
        st.refused_sas.pop(off.ref, None)
        log.info(
            "SA 0x%08x (reqid %d) inbound offloaded as sa_id %d, crypto %s (%s)",
            sa.spi,
            sa.reqid,
            off.sa_id,
            off.crypto,
            off.crypto_why,
        )
        return off

    # -- crypto contexts (kernel backend) ------------------------------------------------------
    def _make_context(self, off: OffloadedSa) -> None:
        """Choose the SA's backend for its direction; on the kernel's, make its context (the
        key goes to the module, the entry gets the id). Raises when that cannot be done (the
        caller counts install_failed)."""
        sa = off.sa
        backend, why = sa_backend(sa, self.state.crypto.backend, off.direction is Direction.ENCAP)
        if backend is None:  # validation refused it already; the SA changed meanwhile
            raise ValueError(f"SA 0x{sa.spi:08x}: {why}")
        off.crypto, off.crypto_why = backend, why
        if backend is Backend.BPF:
            return
        crypto = self.ports.crypto
        if crypto is None:
            raise RuntimeError("kernel crypto backend without the xfp_crypto device")
        assert sa.aead is not None  # sa_backend() accepted an AEAD
        alg = Alg.AES_GCM if sa.aead.name == AES_GCM_AEAD else Alg.CHACHA20_POLY1305
        kc_id = self.state.alloc_kc_id(CTX_MAX)
        crypto.create(kc_id, alg, sa.key, esn=sa.esn)
        off.kc_id = kc_id

    def _destroy_context(self, off: OffloadedSa) -> None:
        """After the entry naming it is gone: the module zeroizes the key."""
        if off.kc_id is None or self.ports.crypto is None:
            return
        try:
            self.ports.crypto.destroy(off.kc_id)
        except OSError as e:
            log.error("SA 0x%08x: destroying crypto context %d: %s", off.sa.spi, off.kc_id, e)
        off.kc_id = None

    # -- upkeep ------------------------------------------------------------------------------
    def sync_lifetime(self, off: OffloadedSa, final: bool = False) -> bool:
        """Add what XDP carried on the SA since the last sync to the kernel's lifetime counters
        (XFRM_MSG_NEWAE with XFRMA_LTIME_VAL), so that `ip -s xfrm state`, the kernel's byte
        and packet lifetimes and the IKE daemon's view of use (strongSwan's inactivity and
        rekey-by-volume logic read these counters) include the fastpath's traffic. use_time
        keeps the kernel's meaning (first use).

        Limits reached by fastpath traffic are acted on as the kernel would: the soft limit
        raises a soft XFRM_MSG_EXPIRE (the IKE daemon rekeys), the hard limit takes the SA off
        the fastpath (the kernel enforces it on the next packet). False when the SA left.
        `final`: the SA is leaving anyway; only the counters are written.

        The read-modify-write is not atomic against packets the kernel counts meanwhile; the
        window is one netlink round trip, and the error undercounts (never overcounts)."""
        dp, xfrm = self.ports.datapath, self.ports.xfrm
        if off.direction is Direction.ENCAP:
            entry = dp.outbound_sa(off.sa_id)
        else:
            entry = dp.inbound_sa(off.sa.spi, str(off.sa.dst))
        if entry is None:
            return True
        packets, nbytes = entry.packets - off.synced_packets, entry.bytes - off.synced_bytes
        if packets <= 0:
            return True
        try:
            cur = xfrm.get_ae(off.sa).current or LifetimeCur()
            total = LifetimeCur(
                bytes=cur.bytes + nbytes,
                packets=cur.packets + packets,
                add_time=cur.add_time,
                use_time=cur.use_time or int(time.time()),
            )
            xfrm.new_ae(off.sa, lifetime_cur=total)
        except Exception as e:  # the SA may be gone: its DELSA event follows
            log.debug("SA 0x%08x: lifetime sync: %s", off.sa.spi, e)
            return True
        off.synced_packets, off.synced_bytes = entry.packets, entry.bytes
        if final:
            return True
        return self._check_volume(off, total)

    def _check_volume(self, off: OffloadedSa, total: LifetimeCur) -> bool:
        """The soft and hard byte/packet limits, against the counts just written."""
        lt = off.sa.lifetime
        if total.bytes >= lt.hard_byte_limit or total.packets >= lt.hard_packet_limit:
            log.info(
                "SA 0x%08x: hard volume limit reached on the fastpath: the kernel takes over",
                off.sa.spi,
            )
            self.release_sa(off)
            return False
        if not off.soft_expire_sent and (
            total.bytes >= lt.soft_byte_limit or total.packets >= lt.soft_packet_limit
        ):
            off.soft_expire_sent = True
            try:
                self.ports.xfrm.send_expire(off.sa, hard=False)
                log.info(
                    "SA 0x%08x: soft volume limit reached on the fastpath: soft expire", off.sa.spi
                )
            except Exception as e:
                log.warning("SA 0x%08x: soft expire: %s", off.sa.spi, e)
        return True

    def watchdog_lapsed(self, off: OffloadedSa, now: int) -> bool:
        """An inbound SA whose watchdog lapsed (the controller stalled longer than `[timers]
        watchdog`) must be handed back rather than refreshed: meanwhile XDP passed its packets
        to the kernel, whose window took them while XDP's did not, so XDP resuming would accept
        a replay of them. Handed back (by the caller), it is offloaded again from the kernel's
        window."""
        try:
            wd = self.ports.datapath.watchdog(off.sa_id)
        except Exception:
            return False
        if wd is None or wd >= now:
            return False
        log.warning(
            "SA 0x%08x: the datapath's watchdog lapsed %.1f s ago (controller stalled): "
            "handing the SA back, its flows are learned again",
            off.sa.spi,
            (now - wd) / 1e9,
        )
        return True

    def refresh_watchdog(self, off: OffloadedSa, now: int) -> None:
        deadline = min(off.hard_deadline_ns, now + int(self.cfg.watchdog * 1e9))
        self.ports.datapath.refresh_watchdog(off.sa_id, deadline)

    # -- release -----------------------------------------------------------------------------
    def release_sa(self, off: OffloadedSa, *, gone: bool = False) -> None:
        """Take an SA out of the datapath: its flows first, then the entry (key wiped), and
        for an outbound SA the last sequence number used goes back to the kernel. `gone`: the
        kernel has already deleted the SA (DELSA, flush, hard expiry), so there is nothing to
        hand back or count to: the entries go, keys wiped."""
        st, dp = self.state, self.ports.datapath
        self.remover.remove(st.flows.flows_of_sa(off.ref), Cause.SA_DELETED)
        if gone:
            if off.direction is Direction.ENCAP:
                self.ports.reseq.unindex_sa(off.sa.spi, str(off.sa.dst))
                dp.delete_outbound_sa(off.sa_id)
                st.sa_out.pop(off.ref, None)
            else:
                dp.delete_inbound_sa(off.sa.spi, str(off.sa.dst))
                st.sa_in.pop(off.ref, None)
            self._destroy_context(off)
            return
        self.sync_lifetime(off, final=True)  # the last of XDP's counts, before the entry goes
        if off.direction is Direction.ENCAP:
            p = self.ports
            hand_back_outbound(
                p.datapath, p.reseq, p.xfrm, off.sa, off.sa_id, off.sa.spi, str(off.sa.dst)
            )
            st.sa_out.pop(off.ref, None)
        else:
            self._hand_back_inbound(off)
            st.sa_in.pop(off.ref, None)
        self._destroy_context(off)

    def _hand_back_inbound(self, off: OffloadedSa) -> None:
        """Remove an inbound SA's entry (key wiped) and move the kernel's replay window up to
        what XDP accepted, so nothing XDP let through can be replayed to the kernel."""
        dp = self.ports.datapath
        entry = dp.inbound_sa(off.sa.spi, str(off.sa.dst))
        dp.delete_inbound_sa(off.sa.spi, str(off.sa.dst))
        if entry is None or not entry.seq_top:
            return
        try:
            r = self.ports.xfrm.set_replay_top(off.sa, entry.seq_top)
            log.info("SA 0x%08x: replay window handed back at %d", off.sa.spi, r.seq64)
        except Exception as e:
            log.error("SA 0x%08x: handing the replay window back failed: %s", off.sa.spi, e)


def _entry_identity(off: OffloadedSa) -> dict[str, object]:
    """What an SA entry says about the SA itself, either direction: its id, SPI, addresses,
    and its key, or the xfp_crypto context holding it (the key then stays out of the map)."""
    sa = off.sa
    return {
        "sa_id": off.sa_id,
        "spi": sa.spi,
        "saddr": str(sa.src),
        "daddr": str(sa.dst),
        "key": b"" if off.kc_id is not None else sa.key.reveal(),
        "kc_id": off.kc_id,
        # RFC 3948 NAT-T: the SA's UDP ports as XFRMA_ENCAP keeps them (fastpath_support
        # admitted only ESP in UDP)
        "encap_ports": (sa.encap.sport, sa.encap.dport) if sa.encap is not None else None,
    }
