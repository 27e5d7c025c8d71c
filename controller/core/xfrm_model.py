# SPDX-License-Identifier: GPL-2.0-only
"""Typed XFRM state: SAs, policies, default policy, events, and the kernel's policy choice.

Pure data, no netlink: the controller's state layer and its unit tests import this module
without sockets or BPF. controller/netlink/xfrm.py converts netlink messages to and from it.

Key material is wrapped in `Secret` (controller/core/secret.py), whose repr/str never show the
bytes, so an SA can be logged, printed or put in an exception message without leaking its key.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

from controller.core.secret import Secret

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]  # noqa: UP007
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]  # noqa: UP007

AF_INET = 2
AF_INET6 = 10
XFRM_INF = (1 << 64) - 1

# The one algorithm the datapath implements (RFC 7634 ESP with ChaCha20-Poly1305): 256-bit
# key + 32-bit salt (RFC 7634 §2), 128-bit ICV. "rfc7539esp(chacha20,poly1305)" is the kernel's
# name for it (crypto/chacha20poly1305.c); strongSwan and iproute2 use the same.
FASTPATH_AEAD = "rfc7539esp(chacha20,poly1305)"
FASTPATH_KEY_BITS = 256 + 32
FASTPATH_ICV_BITS = 128
# What the BPF AEAD serves: name -> key sizes in bits (key || salt).
BPF_AEADS: dict[str, frozenset[int]] = {FASTPATH_AEAD: frozenset({FASTPATH_KEY_BITS})}

# AEAD constructions whose key material ends with a 4-byte salt (RFC 4106 §8.1, RFC 4309 §7.1,
# RFC 4543 §8.1, RFC 7634 §2).
_SALTED_AEAD_PREFIXES = ("rfc7539esp(", "rfc4106(", "rfc4309(", "rfc4543(")


class Proto(enum.IntEnum):
    ESP = 50
    AH = 51
    COMP = 108


class Mode(enum.IntEnum):
    """XFRM_MODE_* (include/uapi/linux/xfrm.h)."""

    TRANSPORT = 0
    TUNNEL = 1
    ROUTEOPTIMIZATION = 2
    IN_TRIGGER = 3
    BEET = 4
    IPTFS = 5


class Dir(enum.IntEnum):
    """XFRM_POLICY_IN / OUT / FWD."""

    IN = 0
    OUT = 1
    FWD = 2


class Action(enum.IntEnum):
    ALLOW = 0
    BLOCK = 1


class DefaultAction(enum.IntEnum):
    """XFRM_USERPOLICY_*: what happens to packets no policy matches (ip xfrm policy setdefault)."""

    UNSPEC = 0
    BLOCK = 1
    ACCEPT = 2


def _ip(value: str | IPAddress) -> IPAddress:
    return ipaddress.ip_address(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class Selector:
    """struct xfrm_selector: which packets an SA or policy covers.

    Ports are host byte order; a port matches when (port ^ sport) & sport_mask == 0
    (xfrm_selector_match(), net/xfrm/xfrm_policy.c). proto 0 and ifindex 0 mean any. For ICMP
    the kernel puts the type in sport and the code in dport (xfrm_flowi_sport/dport()).
    """

    src: IPNetwork = field(default_factory=lambda: ipaddress.ip_network("0.0.0.0/0"))
    dst: IPNetwork = field(default_factory=lambda: ipaddress.ip_network("0.0.0.0/0"))
    proto: int = 0
    sport: int = 0
    sport_mask: int = 0
    dport: int = 0
    dport_mask: int = 0
    ifindex: int = 0
    family: int = AF_INET
    user: int = 0

    @classmethod
    def of(
        cls,
        src: str = "0.0.0.0/0",
        dst: str = "0.0.0.0/0",
        proto: int = 0,
        sport: int | None = None,
        dport: int | None = None,
        ifindex: int = 0,
    ) -> Selector:
        """Build a selector the way `ip xfrm ... sel src S dst D proto P sport X dport Y` does."""
        s, d = ipaddress.ip_network(src, strict=False), ipaddress.ip_network(dst, strict=False)
        return cls(
            src=s,
            dst=d,
            proto=proto,
            sport=sport or 0,
            sport_mask=0xFFFF if sport is not None else 0,
            dport=dport or 0,
            dport_mask=0xFFFF if dport is not None else 0,
            ifindex=ifindex,
            family=AF_INET6 if s.version == 6 else AF_INET,
        )

    def matches(self, flow: Flow) -> bool:
        """xfrm_selector_match() for one flow (family, prefixes, ports with masks, proto, oif)."""
        if flow.src.version != self.src.version:
            return False
        return (
            flow.src in self.src
            and flow.dst in self.dst
            and not ((flow.sport ^ self.sport) & self.sport_mask)
            and not ((flow.dport ^ self.dport) & self.dport_mask)
            and (self.proto == 0 or self.proto == flow.proto)
            and (self.ifindex == 0 or self.ifindex == flow.oif)
        )

    def __str__(self) -> str:
        s = f"{self.src} -> {self.dst}"
        if self.proto:
            s += f" proto {self.proto}"
        if self.sport_mask:
            s += f" sport {self.sport}"
        if self.dport_mask:
            s += f" dport {self.dport}"
        return s


@dataclass(frozen=True)
class LifetimeCfg:
    """struct xfrm_lifetime_cfg: XFRM_INF byte/packet limits mean none; 0 seconds mean none."""

    soft_byte_limit: int = XFRM_INF
    hard_byte_limit: int = XFRM_INF
    soft_packet_limit: int = XFRM_INF
    hard_packet_limit: int = XFRM_INF
    soft_add_expires_seconds: int = 0
    hard_add_expires_seconds: int = 0
    soft_use_expires_seconds: int = 0
    hard_use_expires_seconds: int = 0


@dataclass(frozen=True)
class LifetimeCur:
    """struct xfrm_lifetime_cur: bytes and packets so far, add/use times (unix seconds)."""

    bytes: int = 0
    packets: int = 0
    add_time: int = 0
    use_time: int = 0


@dataclass(frozen=True)
class ReplayState:
    """Sequence state of an SA: struct xfrm_replay_state, or xfrm_replay_state_esn (esn=True).

    oseq is the last outbound sequence number used (the next packet gets oseq + 1, RFC 4303
    §3.3.3); seq and bitmap are the inbound window (RFC 4303 §3.4.3). With ESN, oseq_hi and
    seq_hi hold the high 32 bits and bmp the whole window, one bit per packet."""

    oseq: int = 0
    seq: int = 0
    bitmap: int = 0
    esn: bool = False
    oseq_hi: int = 0
    seq_hi: int = 0
    replay_window: int = 0
    bmp: tuple[int, ...] = ()

    @property
    def oseq64(self) -> int:
        return (self.oseq_hi << 32) | self.oseq

    @property
    def seq64(self) -> int:
        return (self.seq_hi << 32) | self.seq


@dataclass(frozen=True)
class AeState:
    """XFRM_MSG_GETAE reply: sequence/replay state, current lifetime, thresholds."""

    replay: ReplayState | None
    current: LifetimeCur | None
    replay_thresh: int | None
    etimer_thresh: int | None


@dataclass(frozen=True)
class Algorithm:
    """One algorithm of an SA. kind: 'aead', 'crypt', 'auth' (auth_trunc), 'comp'.

    key_bits is alg_key_len (bits); icv_bits is alg_icv_len (AEAD) or alg_trunc_len (auth)."""

    kind: str
    name: str
    key_bits: int
    key: Secret = field(default_factory=Secret, repr=False, compare=True)
    icv_bits: int = 0


# include/uapi/linux/udp.h: the encapsulation of RFC 3948 (NAT-T), the only one served
UDP_ENCAP_ESPINUDP = 2


@dataclass(frozen=True)
class Encap:
    """struct xfrm_encap_tmpl: UDP encapsulation (NAT-T, RFC 3948) of an SA. Ports in host
    order, as the kernel keeps them: outbound sport ours and dport the peer's, inbound sport
    the peer's (behind its NAT) and dport ours."""

    type: int
    sport: int
    dport: int
    oa: IPAddress | None = None


@dataclass(frozen=True)
class Mark:
    value: int
    mask: int


@dataclass(frozen=True)
class SaId:
    """How the kernel names an SA: (daddr, spi, proto) within a family (and mark)."""

    dst: IPAddress
    spi: int
    proto: int = Proto.ESP
    family: int = AF_INET

    def __str__(self) -> str:
        return f"{Proto(self.proto).name.lower()} spi 0x{self.spi:08x} dst {self.dst}"


@dataclass(frozen=True)
class Sa:
    """An XFRM state (SA) as the kernel reports it (NEWSA/GETSA/dump)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    proto: int = Proto.ESP
    mode: Mode = Mode.TUNNEL
    reqid: int = 0
    family: int = AF_INET
    selector: Selector = field(default_factory=Selector)
    aead: Algorithm | None = None
    crypt: Algorithm | None = None
    auth: Algorithm | None = None
    comp: Algorithm | None = None
    replay_window: int = 0
    flags: int = 0
    extra_flags: int = 0
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)
    current: LifetimeCur = field(default_factory=LifetimeCur)
    replay: ReplayState | None = None
    encap: Encap | None = None
    mark: Mark | None = None
    if_id: int = 0
    output_mark: int = 0
    offload_ifindex: int = 0
    lastused: int = 0
    stats_replay: int = 0
    stats_integrity_failed: int = 0
    stats_replay_window: int = 0
    seq: int = 0  # the acquire sequence (xfrm_usersa_info.seq), not an ESP sequence number
    direction: int = 0  # XFRMA_SA_DIR (Linux 6.10+): 0 unset, 1 in, 2 out

    @property
    def id(self) -> SaId:
        return SaId(self.dst, self.spi, self.proto, self.family)

    @property
    def esn(self) -> bool:
        return bool(self.flags & 128)  # XFRM_STATE_ESN

    @property
    def cipher(self) -> Algorithm | None:
        return self.aead or self.crypt

    @property
    def alg_name(self) -> str:
        a = self.cipher
        return a.name if a else ""

    @property
    def key(self) -> Secret:
        """Key material as configured (for salted AEADs: key then 4-byte salt)."""
        a = self.cipher
        return a.key if a else Secret()

    @property
    def key_bits(self) -> int:
        a = self.cipher
        return a.key_bits if a else 0

    @property
    def icv_bits(self) -> int:
        if self.aead:
            return self.aead.icv_bits
        return self.auth.icv_bits if self.auth else 0

    @property
    def salt(self) -> Secret:
        """The 4-byte nonce salt at the end of a salted AEAD's key material (RFC 7634 §2)."""
        a = self.aead
        if a and a.name.startswith(_SALTED_AEAD_PREFIXES) and len(a.key) >= 4:
            return Secret(a.key.reveal()[-4:])
        return Secret()

    @property
    def cipher_key(self) -> Secret:
        """The key without its salt."""
        k = self.key.reveal()
        return Secret(k[:-4]) if len(self.salt) else Secret(k)

    def fastpath_support(
        self, aeads: Mapping[str, frozenset[int]] | None = None
    ) -> tuple[bool, str]:
        """Can the XDP datapath serve this SA? (True, "ok") or (False, why not). `aeads`: the
        AEAD names the crypto backend serves, each with its key sizes in bits (key || salt,
        as alg_key_len); default: the BPF AEAD's (controller/core/crypto.py has the kernel
        backend's)."""
        aeads = BPF_AEADS if aeads is None else aeads
        if self.proto != Proto.ESP:
            return False, f"protocol {Proto(self.proto).name} (only ESP)"
        if self.family != AF_INET or self.src.version != 4 or self.dst.version != 4:
            return False, "IPv6 outer addresses (only IPv4)"
        if self.mode != Mode.TUNNEL:
            return False, f"{Mode(self.mode).name.lower()} mode (only tunnel)"
        only = " or ".join(sorted(aeads))
        if self.aead is None:
            names = "+".join(a.name for a in (self.crypt, self.auth) if a) or "none"
            return False, f"algorithm {names} (only {only})"
        if self.aead.name not in aeads:
            return False, f"algorithm {self.aead.name} (only {only})"
        sizes = aeads[self.aead.name]
        if self.aead.key_bits not in sizes or len(self.aead.key) * 8 != self.aead.key_bits:
            need = " or ".join(str(b) for b in sorted(sizes))
            return False, f"key of {self.aead.key_bits} bits (need {need})"
        if self.aead.icv_bits != FASTPATH_ICV_BITS:
            return False, f"ICV of {self.aead.icv_bits} bits (need {FASTPATH_ICV_BITS})"
        if self.comp is not None:
            return False, "IPComp"
        if self.encap is not None and self.encap.type != UDP_ENCAP_ESPINUDP:
            return False, f"encapsulation type {self.encap.type} (only ESP in UDP, RFC 3948)"
        if self.encap is not None and not (self.encap.sport and self.encap.dport):
            return False, "NAT-T encapsulation without both UDP ports"
        if self.output_mark:
            return False, "SA sets an output mark"
        if self.offload_ifindex:
            return False, "SA is offloaded to a device"
        if self.selector.family not in (0, AF_INET):
            return False, "IPv6 inner selector (only IPv4)"
        return True, "ok"

    def __str__(self) -> str:
        return (
            f"{Proto(self.proto).name.lower()} spi 0x{self.spi:08x} {self.src} -> {self.dst} "
            f"reqid {self.reqid} {Mode(self.mode).name.lower()} {self.alg_name or '-'}"
        )


@dataclass(frozen=True)
class Template:
    """struct xfrm_user_tmpl: which SA a policy's packets need (by reqid, or addresses)."""

    dst: IPAddress | None
    src: IPAddress | None
    proto: int = Proto.ESP
    spi: int = 0
    reqid: int = 0
    mode: Mode = Mode.TUNNEL
    family: int = AF_INET
    share: int = 0
    optional: bool = False
    aalgos: int = 0xFFFFFFFF
    ealgos: int = 0xFFFFFFFF
    calgos: int = 0xFFFFFFFF

    def covers(self, sa: Sa) -> bool:
        """Would the kernel use `sa` for this template? (xfrm_state_find() criteria that a
        userspace view can check: proto, mode, reqid when set, tunnel addresses, spi when set)."""
        if sa.proto != self.proto or sa.mode != self.mode:
            return False
        if self.reqid and sa.reqid != self.reqid:
            return False
        if self.spi and sa.spi != self.spi:
            return False
        if self.mode == Mode.TUNNEL or self.mode == Mode.BEET:
            if self.dst is not None and not self.dst.is_unspecified and sa.dst != self.dst:
                return False
            if self.src is not None and not self.src.is_unspecified and sa.src != self.src:
                return False
        return True


@dataclass(frozen=True)
class Policy:
    """An XFRM policy (SPD entry)."""

    selector: Selector
    dir: Dir
    priority: int = 0
    action: Action = Action.ALLOW
    index: int = 0
    flags: int = 0
    share: int = 0
    templates: tuple[Template, ...] = ()
    mark: Mark | None = None
    if_id: int = 0
    ptype: int = 0  # XFRM_POLICY_TYPE_MAIN / _SUB
    lifetime: LifetimeCfg = field(default_factory=LifetimeCfg)
    current: LifetimeCur = field(default_factory=LifetimeCur)

    def __str__(self) -> str:
        return (
            f"policy {self.dir.name.lower()} {self.selector} prio {self.priority} "
            f"{self.action.name.lower()} index {self.index}"
        )


@dataclass(frozen=True)
class DefaultPolicy:
    """XFRM_MSG_GETDEFAULT: what happens to packets that match no policy, per direction."""

    inbound: DefaultAction = DefaultAction.ACCEPT
    forward: DefaultAction = DefaultAction.ACCEPT
    outbound: DefaultAction = DefaultAction.ACCEPT

    def for_dir(self, d: Dir) -> DefaultAction:
        return {Dir.IN: self.inbound, Dir.FWD: self.forward, Dir.OUT: self.outbound}[d]


@dataclass(frozen=True)
class Flow:
    """What the kernel's policy lookup sees (struct flowi4): addresses, proto, ports (for ICMP:
    sport = type, dport = code), the output interface, the skb mark and the xfrm if_id."""

    src: IPAddress
    dst: IPAddress
    proto: int = 0
    sport: int = 0
    dport: int = 0
    oif: int = 0
    mark: int = 0
    if_id: int = 0

    @classmethod
    def of(cls, src: str, dst: str, proto: int = 0, sport: int = 0, dport: int = 0) -> Flow:
        return cls(_ip(src), _ip(dst), proto, sport, dport)


def policy_matches(p: Policy, flow: Flow, direction: Dir) -> bool:
    """xfrm_policy_match() (net/xfrm/xfrm_policy.c): same dir, family, mark under mask,
    if_id equal, selector match."""
    if p.dir != direction:
        return False
    if p.mark is not None and (flow.mark & p.mark.mask) != p.mark.value:
        return False
    if p.if_id != flow.if_id:
        return False
    return p.selector.matches(flow)


def policy_lookup(policies: Iterable[Policy], flow: Flow, direction: Dir) -> Policy | None:
    """The policy the kernel would apply to `flow` in `direction`, or None (default applies).

    Emulates xfrm_policy_lookup_bytype() (net/xfrm/xfrm_policy.c): among matching policies the
    lowest priority value wins; on equal priority the *older* policy wins (it is linked first
    in the exact-match chain by xfrm_policy_insert_list(), and __xfrm_policy_eval_candidates()
    prefers the lower `pos` among inexact candidates). `policies` must be in kernel dump order,
    as XfrmSocket.policies() returns them: newest first (__xfrm_policy_link() puts each new
    policy at the head of net->xfrm.policy_all, which the dump walks), so of equal priorities
    the last one listed is the oldest and wins. tests/host/test_xfrm_netlink.py checks this against
    the kernel's own forwarding decision. Sub policies (XFRM_POLICY_TYPE_SUB, looked up first
    when CONFIG_XFRM_SUB_POLICY is set, xfrm_policy_lookup()) win over any main policy.
    """
    best: dict[int, Policy] = {}
    for p in policies:
        if not policy_matches(p, flow, direction):
            continue
        cur = best.get(p.ptype)
        if cur is None or p.priority <= cur.priority:
            best[p.ptype] = p
    return best.get(1) or best.get(0)


@dataclass(frozen=True)
class Decision:
    """Outcome of checking one flow against the SPD: allowed, which policy (if any), why."""

    allowed: bool
    policy: Policy | None
    reason: str

    @property
    def protected(self) -> bool:
        return self.allowed and self.policy is not None and bool(self.policy.templates)


def policy_decision(
    policies: Sequence[Policy], default: DefaultPolicy, flow: Flow, direction: Dir
) -> Decision:
    """What the kernel does with `flow` in `direction`: the matching policy's action, or the
    default policy when nothing matches (XFRM_USERPOLICY_BLOCK drops, ACCEPT passes clear)."""
    p = policy_lookup(policies, flow, direction)
    if p is None:
        if default.for_dir(direction) == DefaultAction.BLOCK:
            return Decision(False, None, f"no {direction.name.lower()} policy, default block")
        return Decision(True, None, f"no {direction.name.lower()} policy, default accept")
    if p.action == Action.BLOCK:
        return Decision(False, p, f"policy index {p.index} blocks")
    return Decision(True, p, f"policy index {p.index} allows")


def resolve_sa(policy: Policy, sas: Iterable[Sa], flow: Flow | None = None) -> Sa | None:
    """The SA the first non-optional template of an OUT policy resolves to, or None.

    The kernel (xfrm_state_find()) picks among SAs matching the template the one whose selector
    covers the flow, preferring valid, not-dying states; userspace sees only valid states in a
    dump, so the newest matching one (highest add_time) is chosen, as the kernel prefers the
    most recently added among equals."""
    tmpls = [t for t in policy.templates if not t.optional] or list(policy.templates)
    if not tmpls:
        return None
    t = tmpls[0]
    cands = [s for s in sas if t.covers(s) and sa_fits_policy(s, policy)]
    if flow is not None:
        cands = [s for s in cands if s.selector.family == 0 or _sa_sel_ok(s.selector, flow)]
    if not cands:
        return None
    return max(cands, key=lambda s: s.current.add_time)


def mark_ok(mark: Mark | None, value: int) -> bool:
    """The kernel's mark test, (value & m) == v; no mark is v = m = 0."""
    return mark is None or (value & mark.mask) == mark.value


def sa_fits_policy(sa: Sa, p: Policy) -> bool:
    """xfrm_state_find(): the policy's if_id and mark value under its mask pick the SA."""
    return sa.if_id == p.if_id and mark_ok(sa.mark, p.mark.value & p.mark.mask if p.mark else 0)


def _sa_sel_ok(sel: Selector, flow: Flow) -> bool:
    if sel.src.prefixlen == 0 and sel.dst.prefixlen == 0 and sel.proto == 0:
        return True
    return sel.matches(flow)


# -- events ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class XfrmEvent:
    """Base of XFRM events; ts_ns is CLOCK_MONOTONIC when the message was read."""

    ts_ns: int


@dataclass(frozen=True)
class SaAdded(XfrmEvent):
    sa: Sa


@dataclass(frozen=True)
class SaUpdated(XfrmEvent):
    sa: Sa


@dataclass(frozen=True)
class SaDeleted(XfrmEvent):
    sa_id: SaId
    sa: Sa | None  # the full state, when the kernel included it (it does since 2.6.x)


@dataclass(frozen=True)
class SaExpired(XfrmEvent):
    """A lifetime limit was hit (or someone sent XFRM_MSG_EXPIRE). soft: the key manager should
    rekey; the SA still works. hard: the SA is already deleted, and NO SaDeleted follows
    (xfrm_timer_handler() and xfrm_add_sa_expire() call __xfrm_state_delete() without a
    DELSA notification), so treat a hard expire as the deletion."""

    sa: Sa
    hard: bool


@dataclass(frozen=True)
class PolicyAdded(XfrmEvent):
    policy: Policy


@dataclass(frozen=True)
class PolicyUpdated(XfrmEvent):
    policy: Policy


@dataclass(frozen=True)
class PolicyDeleted(XfrmEvent):
    index: int
    dir: Dir
    policy: Policy | None


@dataclass(frozen=True)
class PolicyExpired(XfrmEvent):
    policy: Policy
    hard: bool


@dataclass(frozen=True)
class Flushed(XfrmEvent):
    """FLUSHSA (what='sa', proto 0/255 = all) or FLUSHPOLICY (what='policy')."""

    what: str
    proto: int = 0


@dataclass(frozen=True)
class DefaultPolicyChanged(XfrmEvent):
    default: DefaultPolicy


@dataclass(frozen=True)
class Acquire(XfrmEvent):
    """The kernel asks the key manager for an SA (no SA yet for a policy's template)."""

    dst: IPAddress
    src: IPAddress
    proto: int
    selector: Selector
    policy_index: int
    policy_dir: Dir
    seq: int


@dataclass(frozen=True)
class AeEvent(XfrmEvent):
    """NEWAE: an SA's replay/lifetime state (sent on replay/timer thresholds or on NEWAE)."""

    sa_id: SaId
    src: IPAddress
    reqid: int
    flags: int
    replay: ReplayState | None
    current: LifetimeCur | None


@dataclass(frozen=True)
class SaMapping(XfrmEvent):
    """XFRM_MSG_MAPPING (XFRMNLGRP_MAPPING, esp4.c's km_new_mapping()): an authenticated
    ESP-in-UDP packet of the inbound SA `sa_id` came from another peer address or port than
    the SA's encap says (a NAT rebound): the IKE daemon moves the SAs of `reqid` to it."""

    sa_id: SaId
    reqid: int
    old_saddr: IPAddress
    new_saddr: IPAddress
    old_sport: int
    new_sport: int


@dataclass(frozen=True)
class Report(XfrmEvent):
    """XFRM_MSG_REPORT (XFRMNLGRP_REPORT, Mobile IPv6 route optimization)."""

    proto: int
    selector: Selector
    coaddr: IPAddress | None


@dataclass(frozen=True)
class Overrun(XfrmEvent):
    """The kernel dropped notifications (ENOBUFS): state must be re-read from scratch."""

    source: str
