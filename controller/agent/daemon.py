# SPDX-License-Identifier: GPL-2.0-only
"""The controller process: load and attach the datapath, build the real adapters behind the
agent's ports, and run the agent (controller/agent/agent.py) in one loop, one thread.

    learner (tracepoints) ──candidate──▶ agent.on_candidate ──▶ datapath maps
    kernel_watch (netlink) ──event────▶ agent.on_kernel_event ─▶ datapath maps
    every TICK_S ──────────────────────▶ agent.tick

The process runs in the gateway's network namespace (on a gateway: the host; in the test beds:
`nsenter --net=/run/netns/gw1`). Everything it attaches is detached on SIGTERM/SIGINT and on
any error; flows are removed and each offloaded SA's sequence state is handed back to the
kernel (XFRM_MSG_NEWAE) before the programs go (Agent.release_all).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from controller.agent.agent import Agent
from controller.agent.offload import recover_pinned_state
from controller.agent.ports import Ports
from controller.config import Config, check_interfaces
from controller.core.crypto import Backend, CryptoChoice, choose_backend
from controller.core.state import Direction
from controller.datapath import kcrypto
from controller.datapath.learner import Candidate, Learner, netns_inode
from controller.datapath.reseq import Resequencer
from controller.datapath.xdp import DEFAULT_PIN_DIR, Datapath
from controller.netlink.routing import Routing
from controller.netlink.watch import KernelWatch, LinkChanged
from controller.netlink.xfrm import XfrmSocket
from controller.paths import RUN_DIR, STATUS_FILE, netns_run_dir
from controller.telemetry import Exporter, MetricsSource, datapath_parts

log = logging.getLogger("xfrm-fastpath")

MIN_FLOW_MAP = 1024  # the flow map's least size, whatever [tables] flows says
TICK_S = 0.2  # housekeeping period: idle sweep, watchdog refresh, status
# Candidates learned per loop turn at most: a flood of first packets never holds kernel events
# or the tick (watchdog refresh: the offloaded flows' liveness) for long; the rest wait in the
# learner, within its bound (Learner.max_pending; beyond it they are shed and counted).
LEARN_BATCH = 1024
STALL_S = 1.0  # a main-loop step this long is logged


class Daemon:
    """The controller for one gateway namespace. `run()` blocks until stop() or a signal."""

    def __init__(self, cfg: Config, *, pin_dir: str | None = None, run_dir: Path = RUN_DIR):
        self.cfg = cfg
        self.pin_dir = pin_dir
        self.run_dir = run_dir
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.ifindex: dict[str, int] = {}
        self.role: dict[int, str] = {}  # ifindex -> "lan" | "wan"
        self.agent: Agent | None = None
        self.dp: Datapath | None = None
        self.reseq: Resequencer | None = None
        self.learner: Learner | None = None
        self.watch: KernelWatch | None = None
        self.xfrm: XfrmSocket | None = None
        self.routing: Routing | None = None
        self._xfrmi: set[int] = set()  # the xfrm interfaces the learner watches
        self.metrics: MetricsSource | None = None
        self.exporter: Exporter | None = None
        self.crypto = CryptoChoice()
        self.kcrypto: kcrypto.KcryptoDevice | None = None  # open on the kernel backend

    # -- lifecycle ---------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def start(self) -> Agent:
        """Check, load, attach, open watchers. On any failure, undo what was done and raise."""
        cfg = self.cfg
        self.ifindex = check_interfaces(cfg)  # a missing interface fails before any attach
        self.role = {self.ifindex[n]: "lan" for n in cfg.lan}
        self.role.update({self.ifindex[n]: "wan" for n in cfg.wan})
        try:
            self.xfrm = XfrmSocket()
            self.routing = Routing()
            self.watch = KernelWatch()
            self._choose_crypto()
            dp, reseq = self._load()
            # Renumbering is in place before any SA is offloaded (bpf/tc_reseq.c).
            reseq.attach(list(cfg.wan))
            for ifindex in self.role:
                dp.put_tx_port(ifindex)
            dp.attach(lan=list(cfg.lan), wan=list(cfg.wan))
            log.info(
                "XDP attached: encap on %s, decap on %s (mode %s)",
                ",".join(cfg.lan),
                ",".join(cfg.wan),
                cfg.xdp_mode,
            )
            return self._start_agent(dp, reseq, self.xfrm, self.routing)
        except BaseException:
            self.shutdown()
            raise

    def _choose_crypto(self) -> None:
        """[crypto] backend against the xfp_crypto module (controller/core/crypto.py): on the
        kernel backend /dev/xfp_crypto stays open (the module cannot be unloaded meanwhile)
        and the XDP programs are the -DXFP_KCRYPTO build. BackendError stops the start."""
        usable, probe = False, f"the {kcrypto.MODULE} module is not loaded"
        if self.cfg.crypto_backend != "bpf" and kcrypto.module_loaded():
            try:
                self.kcrypto = kcrypto.KcryptoDevice()
                usable, probe = True, f"the {kcrypto.MODULE} module is loaded"
            except OSError as e:
                probe = f"{kcrypto.DEVICE}: {e.strerror}"
        self.crypto = choose_backend(self.cfg.crypto_backend, usable, probe)
        if self.crypto.backend is not Backend.KERNEL and self.kcrypto is not None:
            self.kcrypto.close()
            self.kcrypto = None
        log.info("crypto backend: %s (%s)", self.crypto.backend, self.crypto.why)

    def _load(self) -> tuple[Datapath, Resequencer]:
        """Load the XDP programs and the resequencer on the pinned maps, sized by the config;
        what a previous controller left in them is handed back first."""
        cfg = self.cfg
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
        cflags = (
            f"-DXFP_LIVENESS_NS={int(cfg.liveness * 1e9)}ULL",
            sa_max,
            f"-DXFP_FLOWS_MAX={sizes['xfp_flows']}",
        )
        pin_dir = self.pin_dir or DEFAULT_PIN_DIR
        kc = self.kcrypto is not None

        def load_programs() -> tuple[Datapath, Resequencer]:
            self.dp = Datapath(
                pin_dir=pin_dir, xdp_mode=cfg.xdp_mode, cflags=cflags, kcrypto=kc
            ).load()
            self.reseq = Resequencer(pin_dir=self.dp.pin_dir, cflags=(sa_max,), kcrypto=kc).load()
            return self.dp, self.reseq

        dp, reseq = load_programs()
        assert self.xfrm is not None
        recover_pinned_state(dp, reseq, self.xfrm, self.kcrypto)
        pinned = dp.map_sizes()
        if any(pinned.get(name) != want for name, want in sizes.items()):
            # BCC takes a pinned map as it finds it: maps pinned by an earlier run with
            # other sizes would stay. Their SAs are handed back by now: pin anew.
            log.warning("pinned maps sized %s, config wants %s: recreating them", pinned, sizes)
            reseq.close()
            dp.close()
            reseq.unpin()
            dp.unpin()
            dp, reseq = load_programs()
        return dp, reseq

    def _start_agent(
        self, dp: Datapath, reseq: Resequencer, xfrm: XfrmSocket, routing: Routing
    ) -> Agent:
        """The learner, the metrics and the agent, once the programs are attached."""
        cfg = self.cfg
        self.learner = Learner.open(netns_inode(), self._learn_ifaces(routing))
        lan_wan = {Direction.ENCAP: cfg.lan, Direction.DECAP: cfg.wan}
        self.metrics = MetricsSource(
            datapath=lambda: datapath_parts(dp, lan_wan, agent.reqids()),
            flow_capacity=cfg.flow_table_size,
        )
        ports = Ports(
            datapath=dp,
            reseq=reseq,
            xfrm=xfrm,
            routing=routing,
            metrics=self.metrics,
            learner=self.learner,
            events=self.watch,
            crypto=self.kcrypto,
        )
        agent = self.agent = Agent(cfg, ports, run_dir=self.run_dir, ifindex=self.ifindex)
        agent.state.crypto = self.crypto
        self.metrics.build_info["crypto_backend"] = str(self.crypto.backend)
        self.metrics.flows = agent.flows
        self.metrics.set_health(up=True, bpf_programs_attached=len(dp.attached))
        agent.snapshot = self.metrics.snapshot()
        self.exporter = Exporter(cfg.metrics_host, cfg.metrics_port, lambda: agent.snapshot)
        self.exporter.start()
        log.info("metrics on http://%s/metrics", cfg.metrics_address)
        return agent

    def shutdown(self) -> None:
        """Remove flows, hand sequence state back, wipe keys, detach. Tolerant of half-starts."""
        if self.agent is not None and self.dp is not None and self.dp.maps:
            self.agent.release_all()
        if self.kcrypto is not None:  # contexts a failed release left: keys zeroized
            with contextlib.suppress(OSError):
                self.kcrypto.flush()
        if self.exporter is not None:
            with contextlib.suppress(Exception):
                self.exporter.stop()
        if self.reseq is not None:
            with contextlib.suppress(Exception):
                self.reseq.close()
            self.reseq = None
        if self.dp is not None:
            with contextlib.suppress(Exception):
                self.dp.close()
            log.info("XDP detached")
        for closable in (self.learner, self.watch, self.xfrm, self.routing, self.kcrypto):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()
        self.learner = self.watch = self.xfrm = self.routing = self.kcrypto = None
        self.dp = None
        with contextlib.suppress(OSError):
            (self.run_dir / STATUS_FILE).unlink()

    # -- main loop ---------------------------------------------------------------------------------
    def run(self) -> int:
        agent = self.start()
        learner, watch = self.learner, self.watch
        assert learner is not None and watch is not None
        poller = select.epoll()
        poller.register(learner.fileno(), select.EPOLLIN)
        poller.register(watch.fileno(), select.EPOLLIN)
        poller.register(self._wake_r, select.EPOLLIN)
        next_tick = 0.0
        try:
            while not self._stop.is_set():
                poller.poll(0 if learner.waiting else TICK_S)
                for ev in watch.read_events():
                    with self._timed(lambda ev=ev: f"kernel event {type(ev).__name__}"):
                        agent.on_kernel_event(ev)
                        if isinstance(ev, LinkChanged) and self.routing is not None:
                            self._rewatch(learner, self.routing)
                # Every waiting candidate at once: one batch map write per turn (learn.py).
                cands = learner.poll(0, limit=LEARN_BATCH)
                if cands:
                    with self._timed(lambda c=cands: _learning(c)):
                        agent.on_candidates(cands)
                agent.learner_shed(learner.shed + learner.lost)
                now = time.monotonic()
                if now >= next_tick:
                    with self._timed(lambda: "housekeeping tick"):
                        agent.tick()
                    next_tick = now + TICK_S
        finally:
            poller.close()
            self.shutdown()
        return 0

    def _learn_ifaces(self, routing: Routing) -> dict[int, str]:
        """The learner's devices: ours by role, and the xfrm interfaces that are up (a
        route-based tunnel's packets pass them, docs/design.md §10)."""
        self._xfrmi = set(routing.xfrm_interfaces())
        return {**{i: "xfrm" for i in self._xfrmi}, **self.role}

    def _rewatch(self, learner: Learner, routing: Routing) -> None:
        """An xfrm interface came or went: point the learner at the new set."""
        before = self._xfrmi
        ifaces = self._learn_ifaces(routing)
        if self._xfrmi != before:
            learner.watch(netns_inode(), ifaces)

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
                if self.agent is not None:
                    self.agent.loop_stalls += 1
                log.warning("main loop held %.1f s by %s", took, what())


def _learning(cands: Sequence[Candidate]) -> str:
    """A learning step as the stall warning names it."""
    if len(cands) == 1:
        return f"learning {_dir(cands[0].direction)} flow"
    return f"learning {len(cands)} flows"


def _dir(direction: Direction | None) -> str:
    """A candidate's direction as the logs spell it."""
    return direction.name.lower() if direction is not None else "clear"


def run(cfg: Config) -> int:
    """Run the controller until SIGTERM/SIGINT; everything attached is detached on the way out."""
    daemon = Daemon(cfg, run_dir=netns_run_dir())
    signal.signal(signal.SIGTERM, daemon.stop)
    signal.signal(signal.SIGINT, daemon.stop)
    log.info("xfrm-fastpath controller starting (%s)", cfg.source)
    try:
        return daemon.run()
    finally:
        log.info("xfrm-fastpath controller stopped")
