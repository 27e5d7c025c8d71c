# SPDX-License-Identifier: GPL-2.0-only
"""A kernel for tests/unit, built on the project's own XFRM model: the agent's XfrmPort and
RoutingPort (controller/agent/ports.py) without netlink or root.

It stands for controller/netlink/xfrm.py `XfrmSocket` (XFRM state and policies) and the
rtnetlink routing adapter (routes, neighbours, addresses, links). Its state is the model's own
types (controller/core/xfrm_model.py: Sa, Policy, DefaultPolicy, ReplayState, LifetimeCur,
AeState), and what the kernel decides from it is decided by the model, not here: the policy
lookup the agent validates with is the model's (checked against the kernel by
tests/vm/test_vm_policy_diff.py and tests/host/test_xfrm_netlink.py), and `forward_encap`
picks the SA of a flow the same way (model.policy_lookup + model.resolve_sa).

What it keeps of the real kernel and adapter:
- dumps in the kernel's order: policies newest first (net->xfrm.policy_all, see
  model.policy_lookup), SAs as added, each SA with its current lifetime and replay state;
- GETAE / NEWAE on a missing SA fail with ESRCH (xfrm_get_ae(), xfrm_new_ae(),
  net/xfrm/xfrm_user.c), raised as the adapter raises it (NetlinkError); GETSA of a missing
  SA is None; NEWAE with XFRMA_LTIME_VAL overwrites all four counters
  (xfrm_update_ae_params());
- set_oseq / set_replay_top exactly as XfrmSocket does them (read, never backwards, 32-bit
  check without ESN, write back), and each call recorded in `oseq_set` / `replay_top_set`;
- XFRM_MSG_EXPIRE (xfrm_add_sa_expire()): ENOENT for a missing SA; a hard one deletes the SA;
  each recorded in `expires`, and the multicast SaExpired queued in `events`;
- every change a test makes through the mutators (add_sa, delete_sa, add_policy, ...)
  returns the event the kernel would multicast (the model's events, or
  controller/netlink/watch.py's for routes, neighbours, links and nftables), also queued in
  `events`. The agent sees state changes only through events, as on a gateway.

Routes are a plain table, longest prefix first (a gateway's main table, no rules).
"""

from __future__ import annotations

import errno
import ipaddress
import time
from dataclasses import dataclass, field, replace

from controller.core.validate import NeighInfo, RouteInfo
from controller.core.xfrm_model import (
    AeState,
    DefaultPolicy,
    DefaultPolicyChanged,
    Dir,
    Flow,
    LifetimeCur,
    Policy,
    PolicyAdded,
    PolicyDeleted,
    ReplayState,
    Sa,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaUpdated,
    policy_lookup,
    resolve_sa,
)
from controller.netlink.nlsock import NetlinkError
from controller.netlink.watch import (
    LinkChanged,
    NeighChanged,
    NftChanged,
    NftGeneration,
    RouteChanged,
)

SEQ_SPACE_32 = 1 << 32


def _now_ns() -> int:
    return time.monotonic_ns()


@dataclass
class _SaState:
    """What the kernel keeps beside an SA's configuration: counters and sequence state."""

    sa: Sa
    current: LifetimeCur
    replay: ReplayState


@dataclass
class FakeKernel:
    """XfrmPort + RoutingPort over the model's types. Set it up with the mutators (or the
    plain tables), then hand it to the agent as both ports."""

    policy_list: list[Policy] = field(default_factory=list)  # oldest first; dumped newest first
    default: DefaultPolicy = field(default_factory=DefaultPolicy)
    routes: dict[str, RouteInfo] = field(default_factory=dict)  # prefix -> route
    neighbours: dict[tuple[int, str], NeighInfo] = field(default_factory=dict)
    addrs: set[str] = field(default_factory=set)
    links: dict[int, tuple[int, str | None]] = field(default_factory=dict)  # ifindex -> MTU, MAC
    xfrmi: dict[int, int] = field(default_factory=dict)  # up xfrm interfaces: ifindex -> if_id
    states: dict[tuple[str, int], _SaState] = field(default_factory=dict)
    # What the agent did to the kernel, in order.
    oseq_set: list[tuple[int, int]] = field(default_factory=list)  # (spi, oseq64 written)
    replay_top_set: list[tuple[int, int]] = field(default_factory=list)  # (spi, top written)
    lifetimes_set: list[tuple[int, LifetimeCur]] = field(default_factory=list)
    expires: list[tuple[int, bool]] = field(default_factory=list)  # (spi, hard)
    events: list[object] = field(default_factory=list)  # multicast, not yet read
    # Each call the agent made, by name (a test can make one fail: see `fail`).
    calls: list[str] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail[name]

    def _emit(self, ev: object) -> object:
        self.events.append(ev)
        return ev

    def _state(self, dst: object, spi: int) -> _SaState:
        st = self.states.get((str(dst), spi))
        if st is None:
            raise NetlinkError(errno.ESRCH, "", "XFRM_MSG_GETAE")
        return st

    def _full(self, st: _SaState) -> Sa:
        return replace(st.sa, current=st.current, replay=st.replay)

    # -- set-up (what the IKE daemon, the operator or the network does) -------------------------
    def add_sa(self, sa: Sa, *, oseq: int = 0, seq: int = 0) -> SaAdded:
        """XFRM_MSG_NEWSA: the SA, with add_time now unless the SA carries one."""
        cur = sa.current
        if not cur.add_time:
            cur = replace(cur, add_time=int(time.time()))
        replay = ReplayState(
            oseq=oseq & 0xFFFFFFFF,
            oseq_hi=oseq >> 32,
            seq=seq & 0xFFFFFFFF,
            seq_hi=seq >> 32,
            esn=sa.esn,
            replay_window=sa.replay_window,
        )
        st = _SaState(replace(sa, current=cur), cur, replay)
        self.states[(str(sa.dst), sa.spi)] = st
        return self._emit(SaAdded(_now_ns(), self._full(st)))  # type: ignore[return-value]

    def update_sa(self, sa: Sa) -> SaUpdated:
        st = self._state(sa.dst, sa.spi)
        st.sa = replace(sa, current=st.current)
        return self._emit(SaUpdated(_now_ns(), self._full(st)))  # type: ignore[return-value]

    def delete_sa(self, sa: Sa) -> SaDeleted:
        st = self.states.pop((str(sa.dst), sa.spi))
        return self._emit(SaDeleted(_now_ns(), st.sa.id, self._full(st)))  # type: ignore[return-value]

    def expire_sa(self, sa: Sa, *, hard: bool) -> SaExpired:
        """A lifetime limit hit in the kernel (xfrm_timer_handler()): a hard one deletes the SA
        with no DELSA notification, only the EXPIRE."""
        st = self._state(sa.dst, sa.spi)
        if hard:
            del self.states[(str(sa.dst), sa.spi)]
        return self._emit(SaExpired(_now_ns(), self._full(st), hard))  # type: ignore[return-value]

    def kernel_sends(self, sa: Sa, packets: int = 1, nbytes: int = 100) -> int:
        """The kernel itself sends on an outbound SA (its oseq and counters move): the last
        sequence number it used."""
        st = self._state(sa.dst, sa.spi)
        o = st.replay.oseq64 + packets
        st.replay = replace(st.replay, oseq=o & 0xFFFFFFFF, oseq_hi=o >> 32)
        st.current = replace(
            st.current, packets=st.current.packets + packets, bytes=st.current.bytes + nbytes
        )
        return o

    def add_policy(self, p: Policy) -> PolicyAdded:
        self.policy_list.append(p)
        return self._emit(PolicyAdded(_now_ns(), p))  # type: ignore[return-value]

    def delete_policy(self, p: Policy) -> PolicyDeleted:
        self.policy_list.remove(p)
        return self._emit(PolicyDeleted(_now_ns(), p.index, p.dir, p))  # type: ignore[return-value]

    def set_default(self, d: DefaultPolicy) -> DefaultPolicyChanged:
        self.default = d
        return self._emit(DefaultPolicyChanged(_now_ns(), d))  # type: ignore[return-value]

    def set_route(self, prefix: str, route: RouteInfo | None) -> RouteChanged:
        """Add or replace (route) or delete (None) a route of the main table."""
        if route is None:
            old = self.routes.pop(prefix)
            action = "del"
        else:
            old, action = route, "new"
            self.routes[prefix] = route
        return self._emit(  # type: ignore[return-value]
            RouteChanged(
                _now_ns(), action, 2, 254, prefix, old.gateway, old.oif, old.type, 4, 0, False
            )
        )

    def set_neigh(self, ifindex: int, addr: str, neigh: NeighInfo | None) -> NeighChanged:
        if neigh is None:
            self.neighbours.pop((ifindex, addr), None)
            ev = NeighChanged(_now_ns(), "del", ifindex, 2, addr, None, 0, "none")
        else:
            self.neighbours[(ifindex, addr)] = neigh
            ev = NeighChanged(_now_ns(), "new", ifindex, 2, addr, neigh.lladdr, neigh.state, "")
        return self._emit(ev)  # type: ignore[return-value]

    def set_link(self, ifindex: int, name: str, mtu: int, mac: str | None) -> LinkChanged:
        self.links[ifindex] = (mtu, mac)
        return self._emit(  # type: ignore[return-value]
            LinkChanged(_now_ns(), "new", ifindex, name, True, True, "up", mtu, mac)
        )

    def set_xfrmi(self, ifindex: int, name: str, if_id: int, *, up: bool = True) -> LinkChanged:
        """An xfrm interface added or brought up (up=False: brought down)."""
        if up:
            self.xfrmi[ifindex] = if_id
        else:
            self.xfrmi.pop(ifindex, None)
        st = "up" if up else "down"
        return self._emit(  # type: ignore[return-value]
            LinkChanged(_now_ns(), "new", ifindex, name, up, up, st, 1500, None)
        )

    def nft_commit(self, table: str = "filter") -> list[object]:
        """An nftables transaction: one object changed, then the generation that closes it."""
        return [
            self._emit(NftChanged(_now_ns(), "NEWRULE", 1, table)),
            self._emit(NftGeneration(_now_ns(), 1)),
        ]

    def take_events(self) -> list[object]:
        """The multicast events not yet read (the agent's KernelEventsPort would read them)."""
        out, self.events = self.events, []
        return out

    # -- what the kernel decides, by the model -------------------------------------------------
    def out_sa_for(self, flow: Flow) -> Sa | None:
        """The SA the kernel would encrypt `flow` with: its OUT policy (model.policy_lookup),
        then the template's SA (model.resolve_sa)."""
        p = policy_lookup(reversed(self.policy_list), flow, Dir.OUT)
        if p is None or not p.templates:
            return None
        return resolve_sa(p, [self._full(st) for st in self.states.values()], flow)

    # -- XfrmPort ------------------------------------------------------------------------------
    def policies(self) -> list[Policy]:
        self._call("policies")
        return list(reversed(self.policy_list))

    def get_default_policy(self) -> DefaultPolicy:
        self._call("get_default_policy")
        return self.default

    def sas(self) -> list[Sa]:
        self._call("sas")
        return [self._full(st) for st in self.states.values()]

    def get_sa(self, daddr: str, spi: int) -> Sa | None:
        self._call("get_sa")
        st = self.states.get((str(daddr), spi))
        return None if st is None else self._full(st)

    def get_ae(self, sa: Sa) -> AeState:
        self._call("get_ae")
        st = self._state(sa.dst, sa.spi)
        # The kernel's default thresholds (XFRM_AE_SEQT_SIZE, XFRM_AE_ETIME, include/net/xfrm.h)
        return AeState(replay=st.replay, current=st.current, replay_thresh=2, etimer_thresh=10)

    def new_ae(
        self,
        sa: Sa,
        *,
        replay: ReplayState | None = None,
        lifetime_cur: LifetimeCur | None = None,
    ) -> None:
        self._call("new_ae")
        if replay is None and lifetime_cur is None:
            raise ValueError("new_ae: nothing to set")
        st = self._state(sa.dst, sa.spi)
        if replay is not None:
            st.replay = replay
        if lifetime_cur is not None:
            st.current = lifetime_cur
            self.lifetimes_set.append((sa.spi, lifetime_cur))

    def set_oseq(self, sa: Sa, oseq64: int) -> ReplayState:
        """XfrmSocket.set_oseq: never backwards, 32 bits without ESN."""
        ae = self.get_ae(sa)
        r = ae.replay or ReplayState()
        if oseq64 < r.oseq64:
            raise ValueError(f"oseq would go backwards: {r.oseq64} -> {oseq64}")
        if not r.esn and oseq64 >> 32:
            raise ValueError("oseq beyond 32 bits on a non-ESN SA")
        new = replace(r, oseq=oseq64 & 0xFFFFFFFF, oseq_hi=oseq64 >> 32)
        self.new_ae(sa, replay=new)
        self.oseq_set.append((sa.spi, oseq64))
        return new

    def set_replay_top(self, sa: Sa, seq64: int) -> ReplayState:
        """XfrmSocket.set_replay_top: the top never goes back; the whole window marked seen."""
        ae = self.get_ae(sa)
        r = ae.replay or ReplayState()
        top = max(seq64, r.seq64)
        if not r.esn and top >> 32:
            raise ValueError("replay top beyond 32 bits on a non-ESN SA")
        new = replace(
            r,
            seq=top & 0xFFFFFFFF,
            seq_hi=top >> 32,
            bitmap=0xFFFFFFFF,
            bmp=tuple(0xFFFFFFFF for _ in r.bmp),
        )
        self.new_ae(sa, replay=new)
        self.replay_top_set.append((sa.spi, top))
        return new

    def send_expire(self, sa: Sa, hard: bool = False) -> None:
        self._call("send_expire")
        st = self.states.get((str(sa.dst), sa.spi))
        if st is None:
            raise NetlinkError(errno.ENOENT, "", "XFRM_MSG_EXPIRE")
        self.expires.append((sa.spi, hard))
        if hard:
            del self.states[(str(sa.dst), sa.spi)]
        self._emit(SaExpired(_now_ns(), self._full(st), hard))

    # -- RoutingPort ---------------------------------------------------------------------------
    def route(self, dst: str) -> RouteInfo | None:
        self._call("route")
        addr = ipaddress.ip_address(dst)
        best: tuple[int, RouteInfo] | None = None
        for prefix, r in self.routes.items():
            net = ipaddress.ip_network(prefix)
            if addr in net and (best is None or net.prefixlen > best[0]):
                best = (net.prefixlen, r)
        return best[1] if best else None

    def neigh(self, ifindex: int, addr: str) -> NeighInfo | None:
        self._call("neigh")
        return self.neighbours.get((ifindex, addr))

    def local_addrs(self) -> set[str]:
        self._call("local_addrs")
        return set(self.addrs)

    def link(self, ifindex: int) -> tuple[int, str | None] | None:
        self._call("link")
        return self.links.get(ifindex)

    def xfrm_interfaces(self) -> dict[int, int]:
        self._call("xfrm_interfaces")
        return dict(self.xfrmi)
