# SPDX-License-Identifier: GPL-2.0-only
"""The controller: learn, validate, install, invalidate. One loop, one thread.

    learner (tracepoints) ──candidate──▶ validate against the kernel ──▶ datapath maps
    kernel_watch (netlink) ──event────▶ invalidate what relied on it ──▶ datapath maps

The process runs in the gateway's network namespace (on a gateway: the host; in the test beds:
`nsenter --net=/run/netns/gw1`). Everything it attaches is detached on SIGTERM/SIGINT and on
any error; flows are removed and each offloaded SA's sequence state is handed back to the
kernel (XFRM_MSG_NEWAE) before the programs go.

Sequence ownership (DESIGN.md §3, issue 5): once an outbound SA is offloaded, the datapath's
counter in the SA entry is the SA's only sequence source. The datapath starts it SEQ_JUMP
above the kernel's output sequence, so every number it sends is above any the kernel has sent
(the peer's window only moves forward), and ESP packets the kernel itself still builds for the
SA (first packets of new flows, gateway-originated traffic) are renumbered from the same
counter on their way out (bpf/tc_reseq.c). IVs follow the kernel's seqiv construction
(IV = seq XOR a per-SA mask learned from a kernel packet), so distinct sequence numbers give
distinct nonces whoever sends.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller.config import Config, check_interfaces
from controller.core.state import Cause, Direction, FlowKey, FlowRecord, FlowState, SaRef
from controller.core.validate import (
    Accepted,
    NeighInfo,
    Rejected,
    RouteInfo,
    Sighting,
    validate_decap,
    validate_encap,
)
from controller.core.xfrm_model import (
    DefaultPolicy,
    Flushed,
    Overrun,
    Policy,
    PolicyAdded,
    PolicyDeleted,
    PolicyExpired,
    PolicyUpdated,
    Sa,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaUpdated,
    XfrmEvent,
)
from controller.datapath import abi as defs
from controller.paths import RUN_DIR, STATUS_FILE, netns_run_dir

log = logging.getLogger("xfrm-fastpath")

# The datapath's counter starts this far above the kernel's output sequence: room for the
# packets the kernel may still send on the SA while the entry is being written (checked after).
SEQ_JUMP = 4096
# When the datapath lets an SA go, the kernel's output sequence is set this far above the
# datapath's counter before the entry is removed: room for the packets XDP and the
# resequencer may still number in between (checked after removal).
HANDBACK_MARGIN = 1024
SEQ_SPACE_32 = 1 << 32
MIN_FLOW_MAP = 1024  # the flow map's least size, whatever [tables] flows says
TICK_S = 0.2  # housekeeping period: idle sweep, watchdog refresh, status
STALL_S = 1.0  # a main-loop step this long is logged
# How often what XDP carried is added to the kernel's SA lifetime counters: bounds how far
# fastpath traffic may run past a byte/packet limit before the kernel and the IKE daemon see it.
LIFETIME_SYNC_S = 1.0
RECENT_INVALIDATIONS = 64  # removals kept in the status file, newest last
NEVER = (1 << 64) - 1


def _dp_flow_key(k: FlowKey) -> bytes:
    """The datapath's struct xfp_flow_key for a flow, as bytes."""
    from controller.datapath.xdp import flow_key

    d = defs.Dir(int(k.direction))
    return bytes(flow_key(k.ifindex, d, k.proto, k.saddr, k.daddr, k.sport, k.dport))


@dataclass
class OffloadedSa:
    """An SA written into the datapath, and what the controller keeps to look after it."""

    sa: Sa
    sa_id: int
    direction: Direction
    hard_deadline_ns: int  # CLOCK_MONOTONIC; NEVER when the SA has no hard time limit
    synced_packets: int = 0  # datapath counters already added to the kernel's lifetime
    synced_bytes: int = 0
    soft_expire_sent: bool = False

    @property
    def ref(self) -> SaRef:
        return SaRef(str(self.sa.dst), self.sa.spi, self.sa.reqid)


def _hard_deadline(sa: Sa, now_ns: int) -> int:
    """When the SA dies by time, as CLOCK_MONOTONIC ns (add_time is wall-clock seconds)."""
    lt = sa.lifetime
    if not lt.hard_add_expires_seconds:
        return NEVER
    added = sa.current.add_time or int(time.time())
    remaining = added + lt.hard_add_expires_seconds - time.time()
    return now_ns + max(0, int(remaining * 1e9))


@dataclass
class KernelView:
    """XFRM state cached between events: re-read after any XFRM event (dirty flag)."""

    xfrm: Any
    dirty: bool = True
    policies: list[Policy] = field(default_factory=list)
    default: DefaultPolicy = field(default_factory=DefaultPolicy)
    sas: list[Sa] = field(default_factory=list)

    def refresh(self) -> None:
        if not self.dirty:
            return
        self.policies = self.xfrm.policies()
        self.default = self.xfrm.get_default_policy()
        self.sas = self.xfrm.sas()
        self.dirty = False

    def sa_by_spi(self, spi: int, daddr: str | None = None) -> Sa | None:
        for sa in self.sas:
            if sa.spi == spi and sa.proto == 50 and (daddr is None or str(sa.dst) == daddr):
                return sa
        return None


class Controller:
    """The controller for one gateway namespace. `run()` blocks until stop() or a signal."""

    def __init__(self, cfg: Config, *, pin_dir: str | None = None, run_dir: Path = RUN_DIR):
        self.cfg = cfg
        self.pin_dir = pin_dir
        self.run_dir = run_dir
        self.flows = FlowState(capacity=cfg.flow_table_size)
        self.sa_out: dict[SaRef, OffloadedSa] = {}
        self.sa_in: dict[SaRef, OffloadedSa] = {}
        self.refused_sas: dict[SaRef, str] = {}
        self.loop_stalls = 0  # main-loop steps that took STALL_S or longer (see _timed)
        self._next_sa_id = 1
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.ifindex: dict[str, int] = {}
        self.role: dict[int, str] = {}
        # (MTU, MAC) of each egress link as flow entries were written with them: a change of
        # either makes those entries wrong (frames too big, or a stale source MAC).
        self.link_seen: dict[int, tuple[int, str | None]] = {}
        self.dp: Any = None
        self.reseq: Any = None
        self.learner: Any = None
        self.watch: Any = None
        self.xfrm: Any = None
        self.ipr: Any = None
        self.view: KernelView | None = None
        self.metrics: Any = None
        self.exporter: Any = None
        self._snapshot: Any = None
        self.started = time.time()
        self._next_lifetime_sync = 0
        # When the kernel event being handled was read (CLOCK_MONOTONIC ns), and the last
        # removals with their timings: how fast the fastpath let go (status "invalidations").
        self._event_ns: int | None = None
        self.recent_invalidations: deque[dict[str, Any]] = deque(maxlen=RECENT_INVALIDATIONS)

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def start(self) -> None:
        """Check, load, attach, open watchers. On any failure, undo what was done and raise."""
        from pyroute2 import IPRoute

        from controller.datapath.learner import Learner, netns_inode
        from controller.datapath.reseq import Resequencer
        from controller.datapath.xdp import Datapath
        from controller.netlink.watch import KernelWatch
        from controller.netlink.xfrm import XfrmSocket
        from controller.telemetry.metrics import Exporter, MetricsSource, datapath_parts

        cfg = self.cfg
        self.ifindex = check_interfaces(cfg)  # a missing interface fails before any attach
        self.role = {self.ifindex[n]: "lan" for n in cfg.lan}
        self.role.update({self.ifindex[n]: "wan" for n in cfg.wan})
        try:
            self.xfrm = XfrmSocket()
            self.view = KernelView(self.xfrm)
            self.ipr = IPRoute()
            self.watch = KernelWatch()
            # [tables] sas sizes the SA maps (and the resequencer's SPI index, which must
            # agree): a full one refuses further SAs (sa_table_full), which stay in the kernel.
            # [tables] flows sizes the flow map (the controller refuses flows past it:
            # table_full), with room to spare for small tables, whose LRU would otherwise
            # evict early.
            sizes = {
                "xfp_flows": max(cfg.flow_table_size, MIN_FLOW_MAP),
                "xfp_sa_out": cfg.sa_table_size,
                "xfp_sa_in": cfg.sa_table_size,
            }
            sa_max = f"-DXFP_SA_MAX={cfg.sa_table_size}"
            kw: dict[str, Any] = {
                "xdp_mode": cfg.xdp_mode,
                "cflags": (
                    f"-DXFP_LIVENESS_NS={int(cfg.liveness * 1e9)}ULL",
                    sa_max,
                    f"-DXFP_FLOWS_MAX={sizes['xfp_flows']}",
                ),
            }
            if self.pin_dir:
                kw["pin_dir"] = self.pin_dir

            def load_programs() -> None:
                self.dp = Datapath(**kw).load()
                self.reseq = Resequencer(pin_dir=self.dp.pin_dir, cflags=(sa_max,)).load()

            load_programs()
            self._recover_pinned_state()
            pinned = self.dp.map_sizes()
            if any(pinned.get(name) != want for name, want in sizes.items()):
                # BCC takes a pinned map as it finds it: maps pinned by an earlier run with
                # other sizes would stay. Their SAs are handed back by now: pin anew.
                log.warning("pinned maps sized %s, config wants %s: recreating them", pinned, sizes)
                self.reseq.close()
                self.dp.close()
                self.reseq.unpin()
                self.dp.unpin()
                load_programs()
            # Renumbering is in place before any SA is offloaded (bpf/tc_reseq.c).
            self.reseq.attach(list(cfg.wan))
            for ifindex in self.role:
                self.dp.put_tx_port(ifindex)
            self.dp.attach(lan=list(cfg.lan), wan=list(cfg.wan))
            log.info(
                "XDP attached: encap on %s, decap on %s (mode %s)",
                ",".join(cfg.lan),
                ",".join(cfg.wan),
                cfg.xdp_mode,
            )
            self.learner = Learner.open(netns_inode(), dict(self.role))
            lan_wan = {Direction.ENCAP: cfg.lan, Direction.DECAP: cfg.wan}
            self.metrics = MetricsSource(
                flows=self.flows,
                datapath=lambda: datapath_parts(self.dp, lan_wan, self._reqids()),
                flow_capacity=cfg.flow_table_size,
            )
            self.metrics.set_health(up=True, bpf_programs_attached=len(self.dp.attached))
            self._snapshot = self.metrics.snapshot()
            self.exporter = Exporter(cfg.metrics_host, cfg.metrics_port, lambda: self._snapshot)
            self.exporter.start()
            log.info("metrics on http://%s/metrics", cfg.metrics_address)
        except BaseException:
            self.shutdown()
            raise

    def _reqids(self) -> dict[int, int]:
        return {o.sa_id: o.sa.reqid for o in (*self.sa_out.values(), *self.sa_in.values())}

    def _recover_pinned_state(self) -> None:
        """A previous controller that died left SA entries pinned: hand their sequence numbers
        back to the kernel, then start clean (flows are re-learned from the next packets)."""
        leftover = list(self.dp.maps["sa_out"].keys())
        for key in leftover:
            entry = self.dp.maps["sa_out"].get(key)
            if entry is None:
                continue
            spi, daddr = defs.from_be32(entry.spi), defs.ip_of(entry.daddr)
            sa = self.xfrm.get_sa(daddr, spi)
            self._hand_back_outbound(sa, int(key.value), spi, daddr)
        for key in list(self.dp.maps["sa_in"].keys()):
            entry = self.dp.maps["sa_in"].get(key)
            if entry is not None:
                self.dp.delete_inbound_sa(defs.from_be32(entry.spi), defs.ip_of(entry.daddr))
        for key, _val in list(self.dp.flows()):
            self.dp.delete_flow(key)
        for spi, daddr, _sa_id in self.reseq.indexed():
            self.reseq.unindex_sa(spi, daddr)
        if leftover:
            log.warning("recovered %d SA entries left by a previous controller", len(leftover))

    def shutdown(self) -> None:
        """Remove flows, hand sequence state back, wipe keys, detach. Tolerant of half-starts."""
        if self.dp is not None and self.dp.maps:
            self._remove(list(self.flows.flows), Cause.SHUTDOWN)
            for off in list(self.sa_out.values()) + list(self.sa_in.values()):
                with contextlib.suppress(Exception):
                    self._release_sa(off)
        for name in ("exporter",):
            obj = getattr(self, name)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.stop()
        if self.reseq is not None:
            with contextlib.suppress(Exception):
                self.reseq.close()
            self.reseq = None
        if self.dp is not None:
            with contextlib.suppress(Exception):
                self.dp.close()
            log.info("XDP detached")
        for name in ("learner", "watch", "xfrm", "ipr"):
            obj = getattr(self, name)
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()
            setattr(self, name, None)
        self.dp = None
        with contextlib.suppress(OSError):
            (self.run_dir / STATUS_FILE).unlink()

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        poller = select.epoll()
        poller.register(self.learner.fileno(), select.EPOLLIN)
        poller.register(self.watch.fileno(), select.EPOLLIN)
        poller.register(self._wake_r, select.EPOLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                poller.poll(TICK_S)
                for ev in self.watch.read_events():
                    with self._timed(lambda ev=ev: f"kernel event {type(ev).__name__}"):
                        self.on_kernel_event(ev)
                for cand in self.learner.poll(0):
                    with self._timed(lambda cand=cand: f"learning {cand.direction} flow"):
                        self.on_candidate(cand)
                now = time.monotonic()
                if now >= next_tick:
                    with self._timed(lambda: "housekeeping tick"):
                        self.tick()
                    next_tick = now + TICK_S
        finally:
            poller.close()
            self.shutdown()
        return 0

    @contextlib.contextmanager
    def _timed(self, what: Callable[[], str]) -> Iterator[None]:
        """One step of the main loop; a step that holds the loop STALL_S or longer is logged
        (nothing else runs meanwhile: no event, no learning, no watchdog refresh)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - t0
            if took >= STALL_S:
                self.loop_stalls += 1
                log.warning("main loop held %.1f s by %s", took, what())

    # -- learning ----------------------------------------------------------------------------------
    def on_candidate(self, cand: Any) -> None:
        if cand.direction not in ("encap", "decap"):
            return  # clear forwarding (no tunnel): the kernel keeps it
        s = Sighting(
            direction=cand.direction,
            in_ifindex=cand.in_ifindex,
            out_ifindex=cand.out_ifindex,
            saddr=cand.saddr,
            daddr=cand.daddr,
            proto=cand.proto,
            sport=cand.sport,
            dport=cand.dport,
            spi=cand.spi,
            outer_saddr=cand.outer_saddr,
            outer_daddr=cand.outer_daddr,
            eth_src=cand.eth_src,
            eth_dst=cand.eth_dst,
            mangled=cand.mangled,
        )
        encap = s.direction == "encap"
        key = FlowKey(
            s.in_ifindex,
            Direction.ENCAP if encap else Direction.DECAP,
            s.saddr,
            s.daddr,
            s.proto,
            s.sport,
            s.dport,
        )
        known = self.flows.flows.get(key)
        if known is not None and known.sa.spi == s.spi:
            return  # already on the fastpath: its liveness packet (XFP_LIVENESS_NS), or in flight
        want_in, want_out = ("lan", "wan") if encap else ("wan", "lan")
        if self.role.get(s.in_ifindex) != want_in or self.role.get(s.out_ifindex) != want_out:
            return self._refuse(cand, Rejected("wrong_interfaces", "not between our lan/wan"))
        if self.flows.full():
            return self._refuse(cand, Rejected("table_full", "flow table full"))
        try:
            result = self._validate(s)
        except Exception as e:  # netlink error: fail closed, never install on partial facts
            log.warning("validation of %s failed: %s", s.saddr, e)
            result = Rejected("netlink_error", str(e))
        if isinstance(result, Rejected):
            return self._refuse(cand, result)
        try:
            self._install(cand, s, result)
        except Exception as e:
            if getattr(e, "errno", 0) == errno.E2BIG:  # an SA map is full ([tables] sas)
                why = Rejected(
                    "sa_table_full",
                    f"SA table full ({e}; [tables] sas = {self.cfg.sa_table_size}): "
                    f"SA 0x{result.sa.spi:08x} stays on the kernel path",
                )
            else:
                why = Rejected("install_failed", str(e))
            # Once per SA at error level: the flow's next sightings try again (and fail again
            # while the table stays full); the count goes on in the rejections counter.
            ref = SaRef(str(result.sa.dst), result.sa.spi, result.sa.reqid)
            level = logging.DEBUG if self.refused_sas.get(ref) == why.detail else logging.ERROR
            log.log(level, "installing flow %s->%s failed: %s", s.saddr, s.daddr, why.detail)
            self.refused_sas[ref] = why.detail  # the SA's reason in `xfrm-fastpath sas`
            self._refuse(cand, why)

    def _refuse(self, cand: Any, why: Rejected) -> None:
        self.metrics.reject(why.reason)
        log.info(
            "not offloaded: %s %s %s->%s proto %d: %s",
            cand.direction,
            why.reason,
            cand.saddr,
            cand.daddr,
            cand.proto,
            why.detail,
        )
        if why.reason in ("sa_unsupported",) and cand.spi is not None:
            sa = self.view.sa_by_spi(cand.spi) if self.view else None
            if sa is not None:
                self.refused_sas[SaRef(str(sa.dst), sa.spi, sa.reqid)] = why.detail

    def _route(self, dst: str) -> RouteInfo | None:
        try:
            msgs = self.ipr.route("get", dst=dst)
        except Exception:
            return None
        for m in msgs:
            return RouteInfo(
                oif=m.get_attr("RTA_OIF") or 0, gateway=m.get_attr("RTA_GATEWAY"), type=m["type"]
            )
        return None

    def _neigh(self, ifindex: int, addr: str) -> NeighInfo | None:
        try:
            msgs = self.ipr.neigh("dump", ifindex=ifindex, dst=addr)
        except Exception:
            return None
        for m in msgs:
            if m.get_attr("NDA_DST") == addr:
                return NeighInfo(m.get_attr("NDA_LLADDR"), m["state"])
        return None

    def _local_addrs(self) -> set[str]:
        return {a.get_attr("IFA_ADDRESS") for a in self.ipr.get_addr(family=socket.AF_INET)}

    def _validate(self, s: Sighting) -> Accepted | Rejected:
        view = self.view
        assert view is not None
        view.refresh()
        if s.spi is None:
            return Rejected("no_spi", "the sighting carries no SPI")
        if s.direction == "encap":
            sa = view.sa_by_spi(s.spi, s.outer_daddr)
            route = self._route(s.outer_daddr)
            hop = route.next_hop(s.outer_daddr) if route else s.outer_daddr
            neigh = self._neigh(route.oif, hop) if route else None
            return validate_encap(s, view.policies, view.default, sa, route, neigh)
        sa = view.sa_by_spi(s.spi)
        route = self._route(s.daddr)
        hop = route.next_hop(s.daddr) if route else s.daddr
        neigh = self._neigh(route.oif, hop) if route else None
        return validate_decap(s, view.policies, view.default, sa, self._local_addrs(), route, neigh)

    def _alloc_sa_id(self) -> int:
        sa_id = self._next_sa_id
        self._next_sa_id += 1
        return sa_id

    def _link_mtu(self, ifindex: int) -> int:
        """The link's MTU, remembered with its MAC in link_seen (flow entries are written with
        both; a LinkChanged with other values takes those flows off)."""
        for link in self.ipr.get_links(ifindex):
            mtu = int(link.get_attr("IFLA_MTU") or 1500)
            self.link_seen[ifindex] = (mtu, link.get_attr("IFLA_ADDRESS"))
            return mtu
        return 1500

    def _install(self, cand: Any, s: Sighting, ok: Accepted) -> None:
        from controller.datapath.xdp import flow_key, flow_val

        sa = ok.sa
        ref = SaRef(str(sa.dst), sa.spi, sa.reqid)
        now = time.monotonic_ns()
        if s.direction == "encap":
            off = self.sa_out.get(ref) or self._offload_outbound(sa, cand, s, now)
            if off is None:
                return
            key = flow_key(
                s.in_ifindex, defs.Dir.ENCAP, s.proto, s.saddr, s.daddr, s.sport, s.dport
            )
            # The outer next hop as validated now: after a neighbour or route change the
            # flows are learned again with the new one (the SA entry keeps the first).
            val = flow_val(
                off.sa_id, s.out_ifindex, s.eth_dst, s.eth_src, mtu=self._link_mtu(s.out_ifindex)
            )
            direction = Direction.ENCAP
        else:
            off = self.sa_in.get(ref) or self._offload_inbound(sa, now)
            key = flow_key(
                s.in_ifindex, defs.Dir.DECAP, s.proto, s.saddr, s.daddr, s.sport, s.dport
            )
            val = flow_val(
                off.sa_id, s.out_ifindex, s.eth_dst, s.eth_src, mtu=self._link_mtu(s.out_ifindex)
            )
            direction = Direction.DECAP
        self.dp.put_flow(key, val)
        rec = FlowRecord(
            key=FlowKey(s.in_ifindex, direction, s.saddr, s.daddr, s.proto, s.sport, s.dport),
            sa=ref,
            egress_ifindex=s.out_ifindex,
            src_mac=s.eth_src,
            dst_mac=s.eth_dst,
            policy_index=ok.policy.index,
            neighbour=(ok.route.oif, ok.next_hop),
            seen_ns=cand.ktime_rx,
            installed_ns=time.monotonic_ns(),
            dp_key=bytes(key),
        )
        self.flows.add(rec)
        self.metrics.observe_learn_latency(rec.learn_latency_s)
        log.info(
            "offloaded %s via SA 0x%08x (learned in %.2f ms)",
            rec.key,
            sa.spi,
            (rec.learn_latency_s or 0) * 1e3,
        )

    def _offload_outbound(self, sa: Sa, cand: Any, s: Sighting, now: int) -> OffloadedSa | None:
        from controller.datapath.xdp import OutboundSa

        mask = cand.iv_xor_seq
        if mask is None:
            self.metrics.reject("no_iv_mask")
            return None
        ae = self.xfrm.get_ae(sa)
        kernel_oseq = ae.replay.oseq64 if ae.replay else 0
        start = kernel_oseq + 1 + SEQ_JUMP
        limit = SEQ_SPACE_32 if not sa.esn else (1 << 64) - 1
        if start >= limit - SEQ_JUMP:
            self.metrics.reject("seq_exhausted")
            return None
        off = OffloadedSa(sa, self._alloc_sa_id(), Direction.ENCAP, _hard_deadline(sa, now))
        entry = OutboundSa(
            sa_id=off.sa_id,
            spi=sa.spi,
            saddr=str(sa.src),
            daddr=str(sa.dst),
            key=sa.key.reveal(),
            egress_ifindex=s.out_ifindex,
            dmac=s.eth_dst,
            smac=s.eth_src,
            mtu=self._link_mtu(s.out_ifindex),
            seq=start,
            seq_limit=limit,
            iv_mask=int.from_bytes(mask, "big"),
            esn=sa.esn,
            deadline_ns=off.hard_deadline_ns,
        )
        try:
            self.dp.put_outbound_sa(entry)
            self._refresh_watchdog(off, now)
            self.reseq.index_sa(sa.spi, str(sa.dst), off.sa_id)
        except Exception:  # e.g. a full map: leave nothing half-installed (the caller counts)
            with contextlib.suppress(Exception):
                self.reseq.unindex_sa(sa.spi, str(sa.dst))
            with contextlib.suppress(Exception):
                self.dp.delete_outbound_sa(off.sa_id)
            raise
        # The kernel may have sent on the SA while the entry was written: its numbers must
        # still be below the datapath's, or the entry is withdrawn (fail closed).
        after = self.xfrm.get_ae(sa)
        if after.replay and after.replay.oseq64 >= start:
            self.reseq.unindex_sa(sa.spi, str(sa.dst))
            self.dp.delete_outbound_sa(off.sa_id)
            self.metrics.reject("kernel_raced")
            return None
        self.sa_out[off.ref] = off
        self.refused_sas.pop(off.ref, None)
        log.info(
            "SA 0x%08x (reqid %d) outbound offloaded as sa_id %d, seq from %d",
            sa.spi,
            sa.reqid,
            off.sa_id,
            start,
        )
        return off

    def _offload_inbound(self, sa: Sa, now: int) -> OffloadedSa:
        from controller.datapath.xdp import InboundSa

        ae = self.xfrm.get_ae(sa)
        top = ae.replay.seq64 if ae.replay else 0
        off = OffloadedSa(sa, self._alloc_sa_id(), Direction.DECAP, _hard_deadline(sa, now))
        entry = InboundSa(
            sa_id=off.sa_id,
            spi=sa.spi,
            saddr=str(sa.src),
            daddr=str(sa.dst),
            key=sa.key.reveal(),
            replay_window=min(max(sa.replay_window, 32), defs.REPLAY_MAX_WINDOW)
            if sa.replay_window
            else 0,
            esn=sa.esn,
            deadline_ns=off.hard_deadline_ns,
            seq_top=top,
        )
        try:
            self.dp.put_inbound_sa(entry)
            self._refresh_watchdog(off, now)
        except Exception:  # e.g. a full map: leave nothing half-installed (the caller counts)
            with contextlib.suppress(Exception):
                self.dp.delete_inbound_sa(sa.spi, str(sa.dst))
            raise
        self.sa_in[off.ref] = off
        self.refused_sas.pop(off.ref, None)
        log.info("SA 0x%08x (reqid %d) inbound offloaded as sa_id %d", sa.spi, sa.reqid, off.sa_id)
        return off

    def _sync_lifetime(self, off: OffloadedSa, final: bool = False) -> bool:
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
        from controller.core.xfrm_model import LifetimeCur

        if off.direction is Direction.ENCAP:
            entry = self.dp.outbound_sa(off.sa_id)
        else:
            entry = self.dp.inbound_sa(off.sa.spi, str(off.sa.dst))
        if entry is None:
            return True
        packets, nbytes = entry.packets - off.synced_packets, entry.bytes - off.synced_bytes
        if packets <= 0:
            return True
        try:
            cur = self.xfrm.get_ae(off.sa).current or LifetimeCur()
            total = LifetimeCur(
                bytes=cur.bytes + nbytes,
                packets=cur.packets + packets,
                add_time=cur.add_time,
                use_time=cur.use_time or int(time.time()),
            )
            self.xfrm.new_ae(off.sa, lifetime_cur=total)
        except Exception as e:  # the SA may be gone: its DELSA event follows
            log.debug("SA 0x%08x: lifetime sync: %s", off.sa.spi, e)
            return True
        off.synced_packets, off.synced_bytes = entry.packets, entry.bytes
        if final:
            return True
        lt = off.sa.lifetime
        if total.bytes >= lt.hard_byte_limit or total.packets >= lt.hard_packet_limit:
            log.info(
                "SA 0x%08x: hard volume limit reached on the fastpath: the kernel takes over",
                off.sa.spi,
            )
            self._release_sa(off)
            return False
        if not off.soft_expire_sent and (
            total.bytes >= lt.soft_byte_limit or total.packets >= lt.soft_packet_limit
        ):
            off.soft_expire_sent = True
            try:
                self.xfrm.send_expire(off.sa, hard=False)
                log.info(
                    "SA 0x%08x: soft volume limit reached on the fastpath: soft expire", off.sa.spi
                )
            except Exception as e:
                log.warning("SA 0x%08x: soft expire: %s", off.sa.spi, e)
        return True

    def _watchdog_lapsed(self, off: OffloadedSa, now: int) -> bool:
        """An inbound SA whose watchdog lapsed (the controller stalled longer than `[timers]
        watchdog`) is handed back rather than refreshed: meanwhile XDP passed its packets to
        the kernel, whose window took them while XDP's did not, so XDP resuming would accept
        a replay of them. Handed back, it is offloaded again from the kernel's window."""
        try:
            wd = self.dp.watchdog(off.sa_id)
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
        self._drop_sa(off.sa.spi, str(off.sa.dst), Cause.WATCHDOG_LAPSED)
        return True

    def _refresh_watchdog(self, off: OffloadedSa, now: int) -> None:
        deadline = min(off.hard_deadline_ns, now + int(self.cfg.watchdog * 1e9))
        self.dp.refresh_watchdog(off.sa_id, deadline)

    # -- releasing ---------------------------------------------------------------------------
    def _hand_back_outbound(self, sa: Sa | None, sa_id: int, spi: int, daddr: str) -> None:
        """Give an outbound SA's sequence back to the kernel, then remove the entry.

        The kernel's output sequence is set HANDBACK_MARGIN above the datapath's counter
        first, so that whatever XDP or the resequencer still numbers before the entry is gone
        stays below what the kernel sends next; then the SPI index and the entry go (key
        wiped). If the counter ran past the margin meanwhile, that is logged loudly: the
        kernel would repeat numbers (and IVs), so the SA is expired to force a rekey."""
        entry = self.dp.outbound_sa(sa_id)
        handed = 0
        if sa is not None and entry is not None and entry.seq > 1:
            try:
                ae = self.xfrm.get_ae(sa)
                cur = ae.replay.oseq64 if ae.replay else 0
                handed = max(cur, entry.seq - 1 + HANDBACK_MARGIN)
                if not sa.esn:
                    handed = min(handed, SEQ_SPACE_32 - 1)
                self.xfrm.set_oseq(sa, handed)
            except Exception as e:
                log.error("SA 0x%08x: handing the sequence back failed: %s", spi, e)
        self.reseq.unindex_sa(spi, daddr)
        last = self.dp.outbound_sa(sa_id)
        self.dp.delete_outbound_sa(sa_id)
        if handed and last is not None and last.seq - 1 > handed and sa is not None:
            log.error(
                "SA 0x%08x: datapath used %d > handed back %d: expiring the SA",
                spi,
                last.seq - 1,
                handed,
            )
            with contextlib.suppress(Exception):
                self.xfrm.send_expire(sa, hard=True)
        elif handed:
            log.info("SA 0x%08x: sequence handed back to the kernel at %d", spi, handed)

    def _release_sa(self, off: OffloadedSa, *, gone: bool = False) -> None:
        """Take an SA out of the datapath: its flows first, then the entry (key wiped), and
        for an outbound SA the last sequence number used goes back to the kernel. `gone`: the
        kernel has already deleted the SA (DELSA, flush, hard expiry), so there is nothing to
        hand back or count to: the entries go, keys wiped."""
        self._remove(self.flows.flows_of_sa(off.ref), Cause.SA_DELETED)
        if gone:
            if off.direction is Direction.ENCAP:
                self.reseq.unindex_sa(off.sa.spi, str(off.sa.dst))
                self.dp.delete_outbound_sa(off.sa_id)
                self.sa_out.pop(off.ref, None)
            else:
                self.dp.delete_inbound_sa(off.sa.spi, str(off.sa.dst))
                self.sa_in.pop(off.ref, None)
            return
        self._sync_lifetime(off, final=True)  # the last of XDP's counts, before the entry goes
        if off.direction is Direction.ENCAP:
            self._hand_back_outbound(off.sa, off.sa_id, off.sa.spi, str(off.sa.dst))
            self.sa_out.pop(off.ref, None)
        else:
            self._hand_back_inbound(off)
            self.sa_in.pop(off.ref, None)

    def _hand_back_inbound(self, off: OffloadedSa) -> None:
        """Remove an inbound SA's entry (key wiped) and move the kernel's replay window up to
        what XDP accepted, so nothing XDP let through can be replayed to the kernel."""
        entry = self.dp.inbound_sa(off.sa.spi, str(off.sa.dst))
        self.dp.delete_inbound_sa(off.sa.spi, str(off.sa.dst))
        if entry is None or not entry.seq_top:
            return
        try:
            r = self.xfrm.set_replay_top(off.sa, entry.seq_top)
            log.info("SA 0x%08x: replay window handed back at %d", off.sa.spi, r.seq64)
        except Exception as e:
            log.error("SA 0x%08x: handing the replay window back failed: %s", off.sa.spi, e)

    def _remove(self, keys: Iterable[FlowKey], cause: Cause) -> int:
        recs = self.flows.remove(keys, cause)
        # The datapath first: once the entries are gone no packet of these flows takes XDP.
        dks = [rec.dp_key or _dp_flow_key(rec.key) for rec in recs]
        try:
            self.dp.delete_flows(dks)  # one bpf(2) call for the lot
        except Exception as e:
            log.warning("batch delete of %d flow(s) failed (%s): one at a time", len(dks), e)
            for dk in dks:
                with contextlib.suppress(Exception):
                    self.dp.delete_flow(defs.FlowKey.from_buffer_copy(dk))
        done_ns = time.monotonic_ns()
        # Then let the learner report them again (one map operation each: the SPI is known).
        if self.learner is not None:
            for rec in recs:
                k = rec.key
                with contextlib.suppress(Exception):
                    self.learner.forget(
                        (k.direction.name.lower(), k.saddr, k.daddr, k.proto, k.sport, k.dport),
                        rec.sa.spi,
                    )
        if recs:
            took = (
                f" {(done_ns - self._event_ns) / 1e6:.1f} ms after the event"
                if self._event_ns
                else ""
            )
            log.info("removed %d flow(s): %s%s", len(recs), cause.value, took)
            self.recent_invalidations.append(
                {
                    "cause": cause.value,
                    "flows": len(recs),
                    "event_ns": self._event_ns,
                    "removed_ns": done_ns,
                }
            )
        return len(recs)

    def _sas_matching(self, spi: int, dst: str | None) -> list[OffloadedSa]:
        return [
            o
            for o in (*self.sa_out.values(), *self.sa_in.values())
            if o.sa.spi == spi and (dst is None or str(o.sa.dst) == dst)
        ]

    def _fence(self, off: OffloadedSa) -> None:
        """XDP stops encrypting with an outbound SA now (one map write), before its flows are
        removed one by one: a packet of a flow not yet removed goes to the kernel, which
        decides (and whose ESP packets the TC program still numbers from XDP's counter).
        Inbound SAs are not fenced: the kernel's replay window lags XDP's until the hand-back,
        whereas XDP checks and marks the window before its flow lookup, so an inbound packet
        of a removed flow reaches the kernel already marked."""
        if off.direction is not Direction.ENCAP:
            return
        try:
            self.dp.fence_sa(off.sa_id)
        except Exception as e:
            log.error("SA 0x%08x: fencing it off failed: %s", off.sa.spi, e)

    def _drop_sa(self, spi: int, dst: str | None, cause: Cause, *, gone: bool = False) -> None:
        for off in self._sas_matching(spi, dst):
            self._fence(off)
            self._remove(self.flows.flows_of_sa(off.ref), cause)
            self._release_sa(off, gone=gone)

    def _drop_all(self, cause: Cause) -> None:
        """Every flow goes (a firewall, route or policy change). The SAs stay, but the
        outbound ones are fenced while the flows are removed, so that no packet is encrypted
        by XDP on a proof that no longer holds, however many flows there are; then each
        fenced SA's watchdog is put back as it was."""
        if not self.flows.flows:
            return
        armed: list[tuple[OffloadedSa, int]] = []
        for off in list(self.sa_out.values()):
            with contextlib.suppress(Exception):
                wd = self.dp.watchdog(off.sa_id)
                if wd:
                    armed.append((off, wd))
            self._fence(off)
        try:
            self._remove(list(self.flows.flows), cause)
        finally:
            for off, wd in armed:
                try:
                    self.dp.refresh_watchdog(off.sa_id, wd)
                except Exception as e:
                    log.error("SA 0x%08x: re-arming its watchdog failed: %s", off.sa.spi, e)

    # -- kernel events -----------------------------------------------------------------------------
    def on_kernel_event(self, ev: Any) -> None:
        from controller.netlink import watch as kw

        self.metrics.netlink_event()
        self._event_ns = getattr(ev, "ts_ns", None)
        try:
            self._dispatch_kernel_event(ev, kw)
        finally:
            self._event_ns = None

    def _dispatch_kernel_event(self, ev: Any, kw: Any) -> None:
        if isinstance(ev, XfrmEvent):
            if self.view is not None:
                self.view.dirty = True
            self._on_xfrm(ev)
        elif isinstance(ev, kw.NftChanged | kw.NftGeneration):
            self._drop_all(Cause.FIREWALL_CHANGED)
        elif isinstance(ev, kw.RouteChanged | kw.RuleChanged):
            self._drop_all(Cause.ROUTE_CHANGED)
        elif isinstance(ev, kw.NeighChanged):
            if ev.dst:
                self._remove(self.flows.flows_of_neigh(ev.ifindex, ev.dst), Cause.NEIGH_CHANGED)
        elif isinstance(ev, kw.LinkChanged):
            seen = self.link_seen.get(ev.ifindex)
            down = ev.action == "del" or not ev.up or not ev.lower_up
            if down or (seen is not None and seen != (ev.mtu, ev.mac)):
                self.link_seen.pop(ev.ifindex, None)
                self._remove(self.flows.flows_of_link(ev.ifindex), Cause.LINK_CHANGED)
        elif isinstance(ev, kw.AddrChanged):
            self._drop_all(Cause.ROUTE_CHANGED)

    def _on_xfrm(self, ev: XfrmEvent) -> None:
        if isinstance(ev, SaDeleted):
            self._drop_sa(ev.sa_id.spi, str(ev.sa_id.dst), Cause.SA_DELETED, gone=True)
        elif isinstance(ev, SaUpdated):
            self._drop_sa(ev.sa.spi, str(ev.sa.dst), Cause.SA_UPDATED)
        elif isinstance(ev, SaExpired):
            if ev.hard:  # the kernel deletes a hard-expired SA: nothing to hand back
                self._drop_sa(ev.sa.spi, str(ev.sa.dst), Cause.SA_EXPIRED, gone=True)
            # soft: the IKE daemon rekeys; flows move when the new SA's first packets are seen
        elif isinstance(ev, SaAdded):
            # A rekey installs a new SA with the same reqid: the kernel switches to it for new
            # packets, so flows on the old one are re-learned onto the new one.
            for off in list(self.sa_out.values()):
                if off.sa.reqid and off.sa.reqid == ev.sa.reqid and ev.sa.src == off.sa.src:
                    self._remove(self.flows.flows_of_sa(off.ref), Cause.SA_REKEYED)
        elif isinstance(ev, PolicyAdded | PolicyUpdated | PolicyDeleted | PolicyExpired):
            self._drop_all(Cause.POLICY_CHANGED)
        elif isinstance(ev, Flushed):
            if ev.what == "sa":
                for off in list(self.sa_out.values()) + list(self.sa_in.values()):
                    self._remove(self.flows.flows_of_sa(off.ref), Cause.SA_DELETED)
                    self._release_sa(off, gone=True)
            else:
                self._drop_all(Cause.POLICY_CHANGED)
        elif isinstance(ev, Overrun):
            log.warning("netlink overrun: dropping every flow and re-reading state")
            self._drop_all(Cause.POLICY_CHANGED)
        elif type(ev).__name__ == "DefaultPolicyChanged":
            self._drop_all(Cause.POLICY_CHANGED)

    # -- housekeeping ------------------------------------------------------------------------------
    def tick(self) -> None:
        now = time.monotonic_ns()
        self._sweep_idle(now)
        sync = now >= self._next_lifetime_sync
        if sync:
            self._next_lifetime_sync = now + int(LIFETIME_SYNC_S * 1e9)
        for off in (*self.sa_out.values(), *self.sa_in.values()):
            if now >= off.hard_deadline_ns:
                self._drop_sa(off.sa.spi, str(off.sa.dst), Cause.SA_EXPIRED)
                continue
            if off.direction is Direction.DECAP and self._watchdog_lapsed(off, now):
                continue
            if sync and not self._sync_lifetime(off):
                continue
            self._refresh_watchdog(off, now)
        if self.view is not None and self.view.dirty:
            # XFRM changed since the last look: `xfrm-fastpath sas` shows the kernel's SAs now,
            # not at the next learn event.
            try:
                self.view.refresh()
            except Exception as e:
                log.warning("kernel view refresh: %s", e)
        self._snapshot = self.metrics.snapshot()
        self._write_status()

    def _sweep_idle(self, now: int) -> None:
        """Fold the datapath's per-flow last_seen into the state, then remove quiet flows."""
        from controller.datapath.xdp import flow_key

        for rec in self.flows.flows.values():
            k = rec.key
            val = self.dp.get_flow(
                flow_key(
                    k.ifindex,
                    defs.Dir(int(k.direction)),
                    k.proto,
                    k.saddr,
                    k.daddr,
                    k.sport,
                    k.dport,
                )
            )
            if val is None:
                rec.last_active_ns = 0  # evicted by the LRU: let the sweep drop it
            elif val.last_seen_ns > rec.last_active_ns:
                rec.last_active_ns = val.last_seen_ns
        idle = self.flows.idle(now, self.cfg.idle_timeout)
        gone = {k for k in idle if self.flows.flows[k].last_active_ns == 0}
        self._remove(gone, Cause.EVICTED)
        self._remove(idle - gone, Cause.IDLE)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        from controller.telemetry.metrics import snapshot_to_dict

        flows = []
        for rec in sorted(self.flows.flows.values(), key=lambda r: r.key):
            flows.append(
                {
                    "direction": rec.key.direction.name.lower(),
                    "ifindex": rec.key.ifindex,
                    "saddr": rec.key.saddr,
                    "daddr": rec.key.daddr,
                    "proto": rec.key.proto,
                    "sport": rec.key.sport,
                    "dport": rec.key.dport,
                    "spi": f"0x{rec.sa.spi:08x}",
                    "egress_ifindex": rec.egress_ifindex,
                    "learn_latency_ms": round((rec.learn_latency_s or 0) * 1e3, 3),
                }
            )
        sas = []
        offloaded = {**self.sa_out, **self.sa_in}
        for sa in self.view.sas if self.view else []:
            ref = SaRef(str(sa.dst), sa.spi, sa.reqid)
            ok, why = sa.fastpath_support()
            off = offloaded.get(ref)
            sas.append(
                {
                    "spi": f"0x{sa.spi:08x}",
                    "src": str(sa.src),
                    "dst": str(sa.dst),
                    "reqid": sa.reqid,
                    "algorithm": sa.alg_name,
                    "offloaded": off is not None,
                    "direction": off.direction.name.lower() if off else None,
                    "supported": ok,
                    "reason": "offloaded"
                    if off
                    else (self.refused_sas.get(ref) or ("waiting for traffic" if ok else why)),
                    "flows": len(self.flows.flows_of_sa(ref)),
                }
            )
        return {
            "pid": os.getpid(),
            "started": self.started,
            "interfaces": {"lan": list(self.cfg.lan), "wan": list(self.cfg.wan)},
            "metrics": snapshot_to_dict(self._snapshot) if self._snapshot else None,
            "flows": flows,
            "sas": sas,
            # Kernel-built ESP on offloaded SAs, as the TC program handled it (bpf/tc_reseq.c).
            "resequencer": {k: v[0] for k, v in self.reseq.stats().items()} if self.reseq else {},
            # Each removal: cause, flows, when the kernel event was read and when the flows
            # were out of the maps (CLOCK_MONOTONIC ns; event_ns null for timer removals).
            "invalidations": list(self.recent_invalidations),
            # Main-loop steps that held it STALL_S or longer (each logged, naming the step).
            "loop_stalls": self.loop_stalls,
            "written_ns": time.monotonic_ns(),
        }

    def _write_status(self) -> None:
        try:
            self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = self.run_dir / (STATUS_FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.status(), f)
            os.replace(tmp, self.run_dir / STATUS_FILE)
        except OSError as e:
            log.debug("status file: %s", e)


def run(cfg: Config) -> int:
    """Run the controller until SIGTERM/SIGINT; everything attached is detached on the way out."""
    ctl = Controller(cfg, run_dir=netns_run_dir())
    signal.signal(signal.SIGTERM, ctl.stop)
    signal.signal(signal.SIGINT, ctl.stop)
    log.info("xfrm-fastpath controller starting (%s)", cfg.source)
    try:
        return ctl.run()
    finally:
        log.info("xfrm-fastpath controller stopped")
