# SPDX-License-Identifier: GPL-2.0-only
"""Typed XFRM API over netlink: SAs, policies, default policy, AE state, expire, monitor.

`XfrmSocket` does requests (one socket, synchronous, with a deadline); `XfrmMonitor` reads the
multicast groups without blocking and turns each message into a typed event from
controller/core/xfrm_model.py. No netlink type crosses this module's boundary: the conversions
between messages and the model are in controller/netlink/xfrm_codec.py.

Kernel references are to net/xfrm/xfrm_user.c (handlers named xfrm_add_sa, xfrm_get_ae, ...).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from controller.core.xfrm_model import (
    AeState,
    DefaultAction,
    DefaultPolicy,
    Dir,
    IPAddress,
    LifetimeCur,
    Mark,
    Overrun,
    Policy,
    Proto,
    ReplayState,
    Sa,
    SaId,
    Selector,
    XfrmEvent,
)
from controller.netlink import xfrm_messages as m
from controller.netlink.nlsock import (
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NetlinkError,
    NetlinkSocket,
    events_within,
    split_messages,
)
from controller.netlink.xfrm_codec import (
    MalformedMessage,
    ae_attrs,
    ae_state_from,
    aevent_msg,
    decode,
    default_policy_from,
    event_from,
    expire_msg,
    family_of,
    is_socket_policy,
    policy_attrs,
    policy_from_msg,
    policy_to_msg,
    sa_from_msg,
    sa_to_msg,
    userpolicy_id_msg,
    usersa_id_msg,
)

log = logging.getLogger(__name__)

# MAPPING: a NAT-T peer's new address or port (XFRM_MSG_MAPPING), which invalidates its flows.
DEFAULT_GROUPS = (
    m.XFRMNLGRP_ACQUIRE,
    m.XFRMNLGRP_EXPIRE,
    m.XFRMNLGRP_SA,
    m.XFRMNLGRP_POLICY,
    m.XFRMNLGRP_MAPPING,
)


# -- requests ----------------------------------------------------------------------------------
class XfrmSocket:
    """Requests to the kernel's XFRM (NETLINK_XFRM) in `netns` (None: this process's)."""

    def __init__(self, netns: str | None = None, *, timeout: float = 5.0) -> None:
        self.netns = netns
        self.timeout = timeout
        self.nl = NetlinkSocket(m.NETLINK_XFRM, netns=netns)

    def close(self) -> None:
        self.nl.close()

    def __enter__(self) -> XfrmSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _do(self, msg: Any, mtype: int, flags: int) -> list[Any]:
        msg["header"] = {}
        msg.encode()
        payload = bytes(msg.data[16:])
        what = m.MSG_NAMES.get(mtype, str(mtype))
        for attempt in range(3):
            try:
                replies = self.nl.request(payload, mtype, flags, timeout=self.timeout, what=what)
                break
            except NetlinkError as e:
                # A dump that raced with a change is flagged NLM_F_DUMP_INTR: read it again.
                if e.errno != errno.EINTR or attempt == 2:
                    raise
        out = []
        for _rtype, _flags, raw in replies:
            t, dec = decode(raw)
            if dec is not None:
                out.append((t, dec))
        return out

    # SAs
    def sas(self) -> list[Sa]:
        """Every SA (XFRM_MSG_GETSA dump; xfrm_dump_sa() wants no fixed header)."""
        res = self._do(m.xfrm_empty(), m.XFRM_MSG_GETSA, NLM_F_DUMP)
        return [sa_from_msg(x) for _t, x in res]

    def get_sa(
        self,
        daddr: str | IPAddress,
        spi: int,
        proto: int = Proto.ESP,
        *,
        mark: Mark | None = None,
    ) -> Sa | None:
        """One SA by (daddr, spi, proto) (XFRM_MSG_GETSA, xfrm_get_sa()); None when absent."""
        daddr = ipaddress.ip_address(daddr) if isinstance(daddr, str) else daddr
        msg = usersa_id_msg(daddr, spi, family_of(daddr), proto, mark)
        try:
            res = self._do(msg, m.XFRM_MSG_GETSA, NLM_F_ACK)
        except NetlinkError as e:
            if e.errno == 3:  # ESRCH
                return None
            raise
        for _t, x in res:
            return sa_from_msg(x)
        return None

    def add_sa(self, sa: Sa) -> None:
        """XFRM_MSG_NEWSA (fails with EEXIST when the SA exists)."""
        self._do(sa_to_msg(sa), m.XFRM_MSG_NEWSA, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def update_sa(self, sa: Sa) -> None:
        """XFRM_MSG_UPDSA: replace an SA's properties (e.g. complete a larval SA)."""
        self._do(sa_to_msg(sa), m.XFRM_MSG_UPDSA, NLM_F_ACK | NLM_F_REPLACE)

    def delete_sa(self, sa: Sa | SaId, *, mark: Mark | None = None) -> None:
        """XFRM_MSG_DELSA by (daddr, spi, proto)."""
        sid = sa.id if isinstance(sa, Sa) else sa
        if isinstance(sa, Sa) and mark is None:
            mark = sa.mark
        msg = usersa_id_msg(sid.dst, sid.spi, sid.family, sid.proto, mark)
        self._do(msg, m.XFRM_MSG_DELSA, NLM_F_ACK)

    def flush_sa(self, proto: int = m.IPSEC_PROTO_ANY) -> None:
        """XFRM_MSG_FLUSHSA (IPSEC_PROTO_ANY: ESP, AH and IPComp)."""
        msg = m.xfrm_usersa_flush()
        msg["proto"] = proto
        self._do(msg, m.XFRM_MSG_FLUSHSA, NLM_F_ACK)

    # policies
    def policies(self) -> list[Policy]:
        """Every policy, in the kernel's dump order: newest first (see model.policy_lookup)."""
        res = self._do(m.xfrm_empty(), m.XFRM_MSG_GETPOLICY, NLM_F_DUMP)
        return [policy_from_msg(x) for _t, x in res if not is_socket_policy(x["dir"])]

    def get_policy(
        self, index: int = 0, dir: Dir = Dir.OUT, selector: Selector | None = None
    ) -> Policy | None:
        """One policy by index, or by selector + dir (XFRM_MSG_GETPOLICY, xfrm_get_policy());
        None when absent."""
        msg = userpolicy_id_msg(index, dir, selector)
        try:
            res = self._do(msg, m.XFRM_MSG_GETPOLICY, NLM_F_ACK)
        except NetlinkError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                return None
            raise
        for _t, x in res:
            return policy_from_msg(x)
        return None

    def add_policy(self, p: Policy) -> None:
        """XFRM_MSG_NEWPOLICY (EEXIST when an equal selector/dir/mark policy exists)."""
        self._do(policy_to_msg(p), m.XFRM_MSG_NEWPOLICY, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def update_policy(self, p: Policy) -> None:
        """XFRM_MSG_UPDPOLICY: add or replace."""
        self._do(policy_to_msg(p), m.XFRM_MSG_UPDPOLICY, NLM_F_ACK | NLM_F_REPLACE)

    def delete_policy(
        self,
        p: Policy | None = None,
        *,
        index: int = 0,
        dir: Dir = Dir.OUT,
        selector: Selector | None = None,
    ) -> None:
        """XFRM_MSG_DELPOLICY by index (when non-zero) or by selector + dir (xfrm_get_policy())."""
        if p is not None:
            index, dir, selector = p.index, p.dir, p.selector
        msg = userpolicy_id_msg(index, dir, selector)
        attrs: list[tuple[str, Any]] = []
        if p is not None:
            attrs = [a for a in policy_attrs(p) if a[0] != "XFRMA_TMPL"]
        msg["attrs"] = attrs
        self._do(msg, m.XFRM_MSG_DELPOLICY, NLM_F_ACK)

    def flush_policy(self, ptype: int = m.XFRM_POLICY_TYPE_MAIN) -> None:
        msg = m.xfrm_empty()
        if ptype:
            msg["attrs"] = [("XFRMA_POLICY_TYPE", {"type": ptype})]
        self._do(msg, m.XFRM_MSG_FLUSHPOLICY, NLM_F_ACK)

    def get_default_policy(self) -> DefaultPolicy:
        """XFRM_MSG_GETDEFAULT (Linux 5.17+): the action for packets no policy matches."""
        res = self._do(m.xfrm_userpolicy_default(), m.XFRM_MSG_GETDEFAULT, NLM_F_ACK)
        for _t, x in res:
            return default_policy_from(x)
        raise NetlinkError(61, "no GETDEFAULT reply", "XFRM_MSG_GETDEFAULT")  # ENODATA

    def set_default_policy(
        self,
        inbound: DefaultAction | None = None,
        forward: DefaultAction | None = None,
        outbound: DefaultAction | None = None,
    ) -> None:
        """XFRM_MSG_SETDEFAULT; None leaves a direction unchanged (XFRM_USERPOLICY_UNSPEC)."""
        msg = m.xfrm_userpolicy_default()
        msg["in"] = int(inbound or 0)
        msg["fwd"] = int(forward or 0)
        msg["out"] = int(outbound or 0)
        self._do(msg, m.XFRM_MSG_SETDEFAULT, NLM_F_ACK)

    # AE (replay and lifetime state)
    def get_ae(self, sa: Sa) -> AeState:
        """XFRM_MSG_GETAE (xfrm_get_ae()): sequence numbers, replay window, lifetime counters."""
        msg = aevent_msg(sa, m.XFRM_AE_RTHR | m.XFRM_AE_ETHR)
        res = self._do(msg, m.XFRM_MSG_GETAE, NLM_F_ACK)
        for _t, x in res:
            return ae_state_from(x)
        raise NetlinkError(61, "no GETAE reply", "XFRM_MSG_GETAE")

    def new_ae(
        self,
        sa: Sa,
        *,
        replay: ReplayState | None = None,
        lifetime_cur: LifetimeCur | None = None,
    ) -> None:
        """XFRM_MSG_NEWAE (xfrm_new_ae(), NLM_F_REPLACE required): hand sequence state and/or
        lifetime counters back to the kernel. For an ESN SA, `replay` must carry the whole
        bitmap with the kernel's bmp_len (take it from get_ae()). `lifetime_cur` overwrites all
        four counters (xfrm_update_ae_params()), add_time included: start from get_ae().current
        and add what the datapath counted. Read-modify-write is not atomic against packets the
        kernel itself sends meanwhile; the controller should call it when it stops using the SA
        or while it owns it."""
        if replay is None and lifetime_cur is None:
            raise ValueError("new_ae: nothing to set")
        msg = aevent_msg(sa, 0)
        msg["attrs"].extend(ae_attrs(sa, replay, lifetime_cur))
        self._do(msg, m.XFRM_MSG_NEWAE, NLM_F_ACK | NLM_F_REPLACE)

    def set_oseq(self, sa: Sa, oseq64: int) -> ReplayState:
        """Read the SA's replay state, move its outbound sequence to `oseq64` (the last number
        used), write it back; returns what was written. Never moves it backwards."""
        ae = self.get_ae(sa)
        r = ae.replay or ReplayState()
        if oseq64 < r.oseq64:
            raise ValueError(f"oseq would go backwards: {r.oseq64} -> {oseq64}")
        new = ReplayState(
            oseq=oseq64 & 0xFFFFFFFF,
            seq=r.seq,
            bitmap=r.bitmap,
            esn=r.esn,
            oseq_hi=oseq64 >> 32,
            seq_hi=r.seq_hi,
            replay_window=r.replay_window,
            bmp=r.bmp,
        )
        if not r.esn and oseq64 >> 32:
            raise ValueError("oseq beyond 32 bits on a non-ESN SA")
        self.new_ae(sa, replay=new)
        return new

    def set_replay_top(self, sa: Sa, seq64: int) -> ReplayState:
        """Move the SA's inbound window top to `seq64` (never backwards) and mark the whole
        window as seen: what the fastpath accepted can never be accepted again by the kernel.
        Conservative: a delayed packet still inside the window is dropped as a replay."""
        ae = self.get_ae(sa)
        r = ae.replay or ReplayState()
        top = max(seq64, r.seq64)
        if not r.esn and top >> 32:
            raise ValueError("replay top beyond 32 bits on a non-ESN SA")
        new = ReplayState(
            oseq=r.oseq,
            seq=top & 0xFFFFFFFF,
            bitmap=0xFFFFFFFF,
            esn=r.esn,
            oseq_hi=r.oseq_hi,
            seq_hi=top >> 32,
            replay_window=r.replay_window,
            bmp=tuple(0xFFFFFFFF for _ in r.bmp),
        )
        self.new_ae(sa, replay=new)
        return new

    def send_expire(self, sa: Sa, hard: bool = False) -> None:
        """XFRM_MSG_EXPIRE (xfrm_add_sa_expire()): tell key managers the SA expired, as the kernel
        would on a lifetime limit. hard=True also deletes the SA. The SA must be VALID."""
        self._do(expire_msg(sa, hard), m.XFRM_MSG_EXPIRE, NLM_F_ACK)

    def monitor(self, groups: Iterable[int] = DEFAULT_GROUPS) -> XfrmMonitor:
        """A multicast reader in the same namespace (see XfrmMonitor)."""
        return XfrmMonitor(self.netns, groups=tuple(groups))


# -- multicast ---------------------------------------------------------------------------------
class XfrmMonitor:
    """Non-blocking reader of XFRM multicast groups yielding typed events.

    Default groups: ACQUIRE, EXPIRE, SA, POLICY, MAPPING. XFRMNLGRP_AEVENTS is opt-in: while anyone
    listens on it, the kernel emits a NEWAE per replay-threshold change or timer
    (xfrm_aevent_is_on(), include/net/xfrm.h), which costs on a busy kernel datapath.
    Unknown and malformed messages are counted in `stats` and logged, never raised.
    """

    def __init__(self, netns: str | None = None, *, groups: tuple[int, ...] = DEFAULT_GROUPS):
        self.nl = NetlinkSocket(m.NETLINK_XFRM, groups=groups, netns=netns, nonblocking=True)
        self.stats: Counter[str] = Counter()

    def fileno(self) -> int:
        return self.nl.fileno()

    def close(self) -> None:
        self.nl.close()

    def __enter__(self) -> XfrmMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_events(self) -> list[XfrmEvent]:
        """Everything queued now, decoded; never blocks."""
        datagrams, overrun = self.nl.read_nonblocking()
        ts = time.monotonic_ns()
        out: list[XfrmEvent] = []
        if overrun:
            self.stats["overrun"] += 1
            log.warning("xfrm monitor: kernel dropped notifications (ENOBUFS); resync needed")
            out.append(Overrun(ts, "xfrm"))
        for dgram in datagrams:
            out.extend(self.parse(dgram, ts))
        return out

    def parse(self, dgram: bytes, ts_ns: int) -> list[XfrmEvent]:
        """Decode one datagram (exposed for tests: malformed input must never raise)."""
        out: list[XfrmEvent] = []
        try:
            msgs = list(split_messages(dgram))
        except ValueError as e:
            self.stats["malformed"] += 1
            log.warning("xfrm monitor: malformed datagram: %s", e)
            return out
        for mtype, _flags, _seq, raw in msgs:
            self.stats["messages"] += 1
            try:
                t, msg = decode(raw)
                ev = event_from(t, msg, ts_ns) if msg is not None else None
            except (MalformedMessage, ValueError, KeyError, TypeError, struct.error) as e:
                self.stats["malformed"] += 1
                log.warning("xfrm monitor: malformed %s: %s", m.MSG_NAMES.get(mtype, mtype), e)
                continue
            if ev is None:
                self.stats["unknown"] += 1
                log.info("xfrm monitor: ignoring message type %s", m.MSG_NAMES.get(mtype, mtype))
                continue
            self.stats[type(ev).__name__] += 1
            out.append(ev)
        return out

    def events(self, timeout: float) -> Iterator[XfrmEvent]:
        """Yield events as they arrive, for at most `timeout` seconds."""
        return events_within(self.fileno(), self.read_events, timeout)
