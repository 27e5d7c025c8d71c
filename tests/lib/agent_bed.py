# SPDX-License-Identifier: GPL-2.0-only
"""One gateway for tests/unit: the agent in-process, on the fake kernel (tests/lib/fake_kernel.py)
and the in-memory maps (tests/lib/memory_datapath.py), with the test bed's addressing
(testbed/addresses.env: gw1 between a LAN and a WAN, its peer gw2 at the tunnel's far end).

    bed = AgentBed(tmp_path)            # kernel with one tunnel: SAs, policies, routes, L2
    bed.agent.on_candidate(bed.encap()) # the kernel was seen forwarding one packet
    bed.dp.flow_map / bed.kernel.oseq_set / bed.metrics.rejects ...

Candidates are made the way the learner makes them: a struct learn_event as bpf/tp_learn.c
fills it (network byte order, flags), turned into a Candidate by Candidate.from_event
(controller/datapath/learner.py). For encap, the kernel sends the packet on the SA its own
policy lookup picks (the model's), so the candidate's sequence number is the kernel's and its
IV is seq XOR the SA's IV mask (crypto/seqiv.c), as on the wire.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from fake_kernel import FakeKernel
from memory_datapath import MemoryCrypto, MemoryDatapath, MemoryResequencer

from controller.agent.agent import Agent
from controller.agent.ports import Ports
from controller.config import Config
from controller.core.crypto import Backend, CryptoChoice
from controller.core.validate import NUD_PERMANENT, NeighInfo, RouteInfo
from controller.core.xfrm_model import (
    FASTPATH_AEAD,
    Algorithm,
    Dir,
    Flow,
    Mode,
    Policy,
    Sa,
    Secret,
    Selector,
    Template,
)
from controller.datapath import abi
from controller.datapath import learn_abi as la
from controller.datapath.entries import flow_key
from controller.datapath.learner import Candidate
from testbed.bed import load_addresses

# gw1 of the test bed (testbed/addresses.env): LAN_NET on "lan", WAN_NET on "wan"; gw2 the
# peer. MACs as testbed/bed.py gives them.
PLAN = load_addresses()
LAN_IF, WAN_IF = 2, 3
GW1, GW2 = PLAN["GW1_WAN"], PLAN["GW2_WAN"]
GW1_LAN = PLAN["GW1_LAN"]
LAN_NET, REMOTE_NET, WAN_NET = PLAN["LAN_NET"], PLAN["REMOTE_NET"], PLAN["WAN_NET"]
LAN_HOST, REMOTE_HOST = PLAN["LAN_HOST"], PLAN["REMOTE_HOST"]
GW1_LAN_MAC, GW1_WAN_MAC = "02:00:0a:01:00:01", "02:00:c0:00:02:01"
GW2_MAC, LAN_HOST_MAC = "02:00:c0:00:02:02", "02:00:0a:01:00:02"
MTU = 1500
SPI_OUT, SPI_IN = 0x1000, 0x2000
IV_MASK = 0x1122334455667788  # the per-SA salt seqiv XORs with the sequence number
PROTO_UDP = 17
ip = ipaddress.ip_address


def key_of(spi: int) -> Secret:
    """36 bytes of rfc7539esp key material (32-byte key, 4-byte salt), distinct per SA."""
    return Secret(bytes((spi + i) & 0xFF for i in range(36)))


def make_sa(spi: int, src: str, dst: str, reqid: int = 1, **kw: object) -> Sa:
    """An SA the datapath can serve: ESP tunnel, ChaCha20-Poly1305 (RFC 7634)."""
    kw.setdefault("aead", Algorithm("aead", FASTPATH_AEAD, 288, key_of(spi), 128))
    kw.setdefault("replay_window", 128)
    return Sa(src=ip(src), dst=ip(dst), spi=spi, reqid=reqid, **kw)  # type: ignore[arg-type]


def tmpl(src: str, dst: str, reqid: int = 1, optional: bool = False) -> Template:
    return Template(dst=ip(dst), src=ip(src), reqid=reqid, mode=Mode.TUNNEL, optional=optional)


def tunnel_policies(reqid: int = 1) -> list[Policy]:
    """What strongSwan installs for LAN <-> REMOTE over GW1 <-> GW2 (oldest first)."""
    return [
        Policy(
            Selector.of(LAN_NET, REMOTE_NET),
            Dir.OUT,
            2000,
            index=1,
            templates=(tmpl(GW1, GW2, reqid),),
        ),
        Policy(
            Selector.of(REMOTE_NET, LAN_NET),
            Dir.IN,
            2000,
            index=2,
            templates=(tmpl(GW2, GW1, reqid),),
        ),
        Policy(
            Selector.of(REMOTE_NET, LAN_NET),
            Dir.FWD,
            2000,
            index=3,
            templates=(tmpl(GW2, GW1, reqid),),
        ),
        # the outbound FWD policy: lets clear LAN packets be forwarded (optional template)
        Policy(
            Selector.of(LAN_NET, REMOTE_NET),
            Dir.FWD,
            2000,
            index=4,
            templates=(tmpl(GW1, GW2, reqid, optional=True),),
        ),
    ]


# A second tunnel to the same peer, for a second outbound SA (REMOTE2 over reqid 2).
REMOTE2_NET, REMOTE2_HOST = "10.3.0.0/24", "10.3.0.2"
SPI_OUT2, SPI_IN2 = 0x1001, 0x2001


def second_tunnel(kernel: FakeKernel) -> list[object]:
    """LAN <-> REMOTE2 over the same gateways, reqid 2: its SAs and policies (the events)."""
    evs: list[object] = [
        kernel.add_sa(make_sa(SPI_OUT2, GW1, GW2, reqid=2), oseq=5),
        kernel.add_sa(make_sa(SPI_IN2, GW2, GW1, reqid=2), seq=5),
    ]
    evs += [
        kernel.add_policy(
            Policy(
                Selector.of(LAN_NET, REMOTE2_NET),
                Dir.OUT,
                2000,
                index=11,
                templates=(tmpl(GW1, GW2, 2),),
            )
        ),
        kernel.add_policy(
            Policy(
                Selector.of(LAN_NET, REMOTE2_NET),
                Dir.FWD,
                2000,
                index=12,
                templates=(tmpl(GW1, GW2, 2, optional=True),),
            )
        ),
    ]
    kernel.routes[REMOTE2_NET] = RouteInfo(oif=WAN_IF, gateway=GW2)
    return evs


@dataclass
class RecordingMetrics:
    """MetricsPort that records (stands for controller/telemetry/'s MetricsSource)."""

    rejects: Counter[str] = field(default_factory=Counter)
    learn_latencies: list[float | None] = field(default_factory=list)
    netlink_events: int = 0

    def reject(self, reason: str, n: int = 1) -> None:
        self.rejects[str(reason)] += n

    def observe_learn_latency(self, seconds: float | None) -> None:
        self.learn_latencies.append(seconds)

    def netlink_event(self, when: float | None = None) -> None:
        self.netlink_events += 1

    def snapshot(self) -> None:
        """No exposition here: the status shows no metrics."""
        return None


def one_tunnel(kernel: FakeKernel, *, out_sa: Sa | None = None, in_sa: Sa | None = None) -> None:
    """gw1's kernel with one tunnel up: both SAs, strongSwan's policies, routes, neighbours,
    addresses and links."""
    kernel.add_sa(out_sa or make_sa(SPI_OUT, GW1, GW2), oseq=10)
    kernel.add_sa(in_sa or make_sa(SPI_IN, GW2, GW1), seq=20)
    for p in tunnel_policies():
        kernel.add_policy(p)
    kernel.routes.update(
        {
            WAN_NET: RouteInfo(oif=WAN_IF, gateway=None),
            LAN_NET: RouteInfo(oif=LAN_IF, gateway=None),
            REMOTE_NET: RouteInfo(oif=WAN_IF, gateway=GW2),
        }
    )
    kernel.neighbours[(WAN_IF, GW2)] = NeighInfo(GW2_MAC, NUD_PERMANENT)
    kernel.neighbours[(LAN_IF, LAN_HOST)] = NeighInfo(LAN_HOST_MAC, NUD_PERMANENT)
    kernel.addrs |= {GW1, GW1_LAN}
    kernel.links[LAN_IF] = (MTU, GW1_LAN_MAC)
    kernel.links[WAN_IF] = (MTU, GW1_WAN_MAC)
    kernel.take_events()  # set up before the agent started: nothing to tell it


def learn_event(**f: object) -> la.LearnEvent:
    """A struct learn_event with host-order values given by field name (ports, SPIs, sequence
    numbers and addresses are put in network byte order as bpf/tp_learn.c writes them)."""
    ev = la.LearnEvent()
    for name in ("saddr", "daddr", "outer_saddr", "outer_daddr"):
        if name in f:
            setattr(ev, name, abi.be32(str(f.pop(name))))
    for name in ("esp_spi", "esp_seq", "sp_spi"):
        if name in f:
            setattr(ev, name, abi.be32(int(f.pop(name))))  # type: ignore[arg-type]
    for name in ("sport", "dport"):
        if name in f:
            setattr(ev, name, abi.be16(int(f.pop(name))))  # type: ignore[arg-type]
    for name in ("eth_src", "eth_dst"):
        if name in f:
            getattr(ev, name)[:] = abi.mac_bytes(str(f.pop(name)))
    if "esp_iv" in f:
        ctypes.memmove(ev.esp_iv, bytes(f.pop("esp_iv")), 8)  # type: ignore[arg-type]
    for name, v in f.items():
        setattr(ev, name, v)
    return ev


@dataclass
class AgentBed:
    """The agent and its ports for one test. `kernel` has one tunnel unless `tunnel=False`."""

    run_dir: Path  # the status file goes there (tick writes it)
    cfg: Config = field(default_factory=Config)
    sa_max: int = abi.SA_MAX
    tunnel: bool = True
    kernel: FakeKernel = field(default_factory=FakeKernel)
    metrics: RecordingMetrics = field(default_factory=RecordingMetrics)
    # The crypto backend the daemon would have chosen; KERNEL gives the agent the module's
    # contexts in memory (bed.crypto).
    crypto_backend: Backend = Backend.BPF

    def __post_init__(self) -> None:
        self.dp = MemoryDatapath(sa_max=self.sa_max, flows_max=max(self.cfg.flow_table_size, 1024))
        self.reseq = MemoryResequencer(self.dp, sa_max=self.sa_max)
        self.crypto = MemoryCrypto(self.dp) if self.crypto_backend is Backend.KERNEL else None
        if self.tunnel:
            one_tunnel(self.kernel)
        self.agent = self.start()

    def start(self) -> Agent:
        """A new agent on the same kernel and maps (as a restarted controller finds them)."""
        ports = Ports(
            datapath=self.dp,
            reseq=self.reseq,
            xfrm=self.kernel,
            routing=self.kernel,
            metrics=self.metrics,
            crypto=self.crypto,
        )
        self.agent = Agent(
            self.cfg, ports, run_dir=self.run_dir, ifindex={"lan": LAN_IF, "wan": WAN_IF}
        )
        self.agent.state.crypto = CryptoChoice(self.crypto_backend, "chosen by the test")
        return self.agent

    # -- candidates ----------------------------------------------------------------------------
    def encap(
        self,
        sport: int = 4000,
        dport: int = 53,
        *,
        proto: int = PROTO_UDP,
        spi: int | None = None,
        saddr: str = LAN_HOST,
        daddr: str = REMOTE_HOST,
        **changes: object,
    ) -> Candidate:
        """The kernel forwarded one clear packet LAN -> REMOTE and sent it as ESP on the SA its
        policy picks (or `spi`); the candidate the learner reports for it."""
        flow = Flow.of(saddr, daddr, proto, sport, dport)
        sa = self.kernel.out_sa_for(flow)
        if spi is None:
            spi = sa.spi if sa is not None else SPI_OUT
        seq = self.kernel.kernel_sends(sa) if sa is not None and sa.spi == spi else 1
        now = time.monotonic_ns()
        ev = learn_event(
            direction=la.LEARN_DIR_ENCAP,
            in_ifindex=LAN_IF,
            out_ifindex=WAN_IF,
            saddr=saddr,
            daddr=daddr,
            proto=proto,
            sport=sport,
            dport=dport,
            flags=la.LEARN_F_ESP_TX,
            esp_spi=spi,
            esp_seq=seq,
            esp_iv=(seq ^ IV_MASK).to_bytes(8, "big"),
            eth_src=GW1_WAN_MAC,
            eth_dst=GW2_MAC,
            outer_saddr=GW1,
            outer_daddr=GW2,
            outer_proto=50,
            tx_len=160,
            ktime_rx=now - 50_000,
            ktime_tx=now - 20_000,
        )
        return replace(Candidate.from_event(ev, now), **changes)

    def decap(
        self,
        sport: int = 53,
        dport: int = 4000,
        *,
        proto: int = PROTO_UDP,
        spi: int = SPI_IN,
        saddr: str = REMOTE_HOST,
        daddr: str = LAN_HOST,
        **changes: object,
    ) -> Candidate:
        """The kernel received ESP on SA `spi`, decrypted it and forwarded the clear packet
        REMOTE -> LAN; the candidate the learner reports for it."""
        now = time.monotonic_ns()
        ev = learn_event(
            direction=la.LEARN_DIR_DECAP,
            in_ifindex=WAN_IF,
            out_ifindex=LAN_IF,
            saddr=saddr,
            daddr=daddr,
            proto=proto,
            sport=sport,
            dport=dport,
            flags=la.LEARN_F_ESP_RX | la.LEARN_F_SECPATH,
            esp_spi=spi,
            esp_seq=21,
            sp_spi=spi,
            sp_len=1,
            eth_src=GW1_LAN_MAC,
            eth_dst=LAN_HOST_MAC,
            outer_saddr=saddr,
            outer_daddr=daddr,
            outer_proto=proto,
            tx_len=120,
            ktime_rx=now - 50_000,
            ktime_tx=now - 20_000,
        )
        return replace(Candidate.from_event(ev, now), **changes)

    # -- what the maps hold ---------------------------------------------------------------------
    @staticmethod
    def dp_key(c: Candidate) -> abi.FlowKey:
        """The struct xfp_flow_key the agent should write for a candidate."""
        assert c.direction is not None, "a tunnel candidate"
        return flow_key(c.in_ifindex, c.direction, c.proto, c.saddr, c.daddr, c.sport, c.dport)
