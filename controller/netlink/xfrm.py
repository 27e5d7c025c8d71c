# SPDX-License-Identifier: GPL-2.0-only
"""Typed XFRM API over netlink: SAs, policies, default policy, AE state, expire, monitor.

`XfrmSocket` does requests (one socket, synchronous, with a deadline); `XfrmMonitor` reads the
multicast groups without blocking and turns each message into a typed event from
controller/core/xfrm_model.py. No netlink type crosses this module's boundary.

Kernel references are to net/xfrm/xfrm_user.c (handlers named xfrm_add_sa, xfrm_get_ae, ...).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import select
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from controller.core.xfrm_model import (
    AF_INET,
    AF_INET6,
    Acquire,
    Action,
    AeEvent,
    AeState,
    Algorithm,
    DefaultAction,
    DefaultPolicy,
    DefaultPolicyChanged,
    Dir,
    Encap,
    Flushed,
    IPAddress,
    LifetimeCfg,
    LifetimeCur,
    Mark,
    Mode,
    Overrun,
    Policy,
    PolicyAdded,
    PolicyDeleted,
    PolicyExpired,
    PolicyUpdated,
    Proto,
    ReplayState,
    Report,
    Sa,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaId,
    SaUpdated,
    Secret,
    Selector,
    Template,
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
    check_attrs,
    split_messages,
)

log = logging.getLogger(__name__)

DEFAULT_GROUPS = (m.XFRMNLGRP_ACQUIRE, m.XFRMNLGRP_EXPIRE, m.XFRMNLGRP_SA, m.XFRMNLGRP_POLICY)


class MalformedMessage(ValueError):
    """A message that does not decode (short, bad attribute); counted, never fatal."""


# -- conversions: netlink dicts <-> model ---------------------------------------------------------
def addr_from(raw: bytes, family: int) -> IPAddress:
    if family == AF_INET6:
        return ipaddress.IPv6Address(raw[:16])
    return ipaddress.IPv4Address(raw[:4])


def addr_to(a: IPAddress | str | None) -> bytes:
    if a is None:
        return b"\0" * 16
    if isinstance(a, str):
        a = ipaddress.ip_address(a)
    return a.packed.ljust(16, b"\0")


def _family_of(a: IPAddress | None) -> int:
    return AF_INET6 if a is not None and a.version == 6 else AF_INET


def selector_from(d: dict[str, Any], fallback_family: int = AF_INET) -> Selector:
    fam = d["family"] or fallback_family
    return Selector(
        src=ipaddress.ip_network((addr_from(d["saddr"], fam), d["prefixlen_s"]), strict=False),
        dst=ipaddress.ip_network((addr_from(d["daddr"], fam), d["prefixlen_d"]), strict=False),
        proto=d["proto"],
        sport=d["sport"],
        sport_mask=d["sport_mask"],
        dport=d["dport"],
        dport_mask=d["dport_mask"],
        ifindex=d["ifindex"],
        family=d["family"],
        user=d["user"],
    )


def selector_to(s: Selector) -> dict[str, Any]:
    return {
        "daddr": addr_to(s.dst.network_address),
        "saddr": addr_to(s.src.network_address),
        "dport": s.dport,
        "dport_mask": s.dport_mask,
        "sport": s.sport,
        "sport_mask": s.sport_mask,
        "family": s.family,
        "prefixlen_d": s.dst.prefixlen,
        "prefixlen_s": s.src.prefixlen,
        "proto": s.proto,
        "ifindex": s.ifindex,
        "user": s.user,
    }


def _cfg_from(d: dict[str, Any]) -> LifetimeCfg:
    return LifetimeCfg(**d)


def _cur_from(d: dict[str, Any]) -> LifetimeCur:
    return LifetimeCur(**d)


def _name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def _alg(kind: str, d: dict[str, Any] | None, icv_key: str | None = None) -> Algorithm | None:
    if d is None:
        return None
    return Algorithm(
        kind=kind,
        name=_name(d["alg_name"]),
        key_bits=d["alg_key_len"],
        key=Secret(d["alg_key"][: (d["alg_key_len"] + 7) // 8]),
        icv_bits=d[icv_key] if icv_key else 0,
    )


def _replay_from(attrs: dict[str, Any]) -> ReplayState | None:
    esn = attrs.get("XFRMA_REPLAY_ESN_VAL")
    if esn is not None:
        raw = esn["bmp"]
        n = min(esn["bmp_len"], len(raw) // 4)
        return ReplayState(
            oseq=esn["oseq"],
            seq=esn["seq"],
            bitmap=0,
            esn=True,
            oseq_hi=esn["oseq_hi"],
            seq_hi=esn["seq_hi"],
            replay_window=esn["replay_window"],
            bmp=struct.unpack_from(f"{n}I", raw) if n else (),
        )
    rv = attrs.get("XFRMA_REPLAY_VAL")
    if rv is not None:
        return ReplayState(oseq=rv["oseq"], seq=rv["seq"], bitmap=rv["bitmap"])
    return None


def msg_attrs(msg: Any) -> dict[str, Any]:
    """Decode every attribute of a message; the first of each name wins. Raises
    MalformedMessage when one does not decode."""
    out: dict[str, Any] = {}
    for slot in msg.get("attrs", ()):
        name, cell = slot.cell
        try:
            if not cell.decoded:
                cell.decode()
        except Exception as e:
            raise MalformedMessage(f"attribute {name}: {e}") from e
        if name not in out:
            out[name] = cell.getvalue()
    return out


def sa_from(info: dict[str, Any], attrs: dict[str, Any]) -> Sa:
    """struct xfrm_usersa_info + XFRMA_* attributes -> Sa."""
    fam = info["family"]
    mark = attrs.get("XFRMA_MARK")
    encap = attrs.get("XFRMA_ENCAP")
    off = attrs.get("XFRMA_OFFLOAD_DEV")
    esn = attrs.get("XFRMA_REPLAY_ESN_VAL")
    auth = _alg("auth", attrs.get("XFRMA_ALG_AUTH_TRUNC"), "alg_trunc_len") or _alg(
        "auth", attrs.get("XFRMA_ALG_AUTH")
    )
    return Sa(
        src=addr_from(info["saddr"], fam),
        dst=addr_from(info["id"]["daddr"], fam),
        spi=info["id"]["spi"],
        proto=info["id"]["proto"],
        mode=Mode(info["mode"]) if info["mode"] in Mode._value2member_map_ else info["mode"],
        reqid=info["reqid"],
        family=fam,
        selector=selector_from(info["sel"], fam),
        aead=_alg("aead", attrs.get("XFRMA_ALG_AEAD"), "alg_icv_len"),
        crypt=_alg("crypt", attrs.get("XFRMA_ALG_CRYPT")),
        auth=auth,
        comp=_alg("comp", attrs.get("XFRMA_ALG_COMP")),
        replay_window=esn["replay_window"] if esn else info["replay_window"],
        flags=info["flags"],
        extra_flags=attrs.get("XFRMA_SA_EXTRA_FLAGS", 0) or 0,
        lifetime=_cfg_from(info["lft"]),
        current=_cur_from(attrs.get("XFRMA_LTIME_VAL") or info["curlft"]),
        replay=_replay_from(attrs),
        encap=(
            Encap(
                encap["encap_type"],
                encap["encap_sport"],
                encap["encap_dport"],
                addr_from(encap["encap_oa"], fam) if any(encap["encap_oa"]) else None,
            )
            if encap
            else None
        ),
        mark=Mark(mark["v"], mark["m"]) if mark else None,
        if_id=attrs.get("XFRMA_IF_ID", 0) or 0,
        output_mark=attrs.get("XFRMA_SET_MARK", 0) or 0,
        offload_ifindex=off["ifindex"] if off else 0,
        lastused=attrs.get("XFRMA_LASTUSED", 0) or 0,
        stats_replay=info["stats"]["replay"],
        stats_integrity_failed=info["stats"]["integrity_failed"],
        stats_replay_window=info["stats"]["replay_window"],
        seq=info["seq"],
        direction=attrs.get("XFRMA_SA_DIR", 0) or 0,
    )


def _alg_attr(a: Algorithm) -> tuple[str, dict[str, Any]]:
    if len(a.key) * 8 < a.key_bits:
        raise ValueError(f"{a.name}: key of {len(a.key)} bytes for {a.key_bits} bits")
    d = {"alg_name": a.name.encode(), "alg_key_len": a.key_bits, "alg_key": a.key.reveal()}
    if a.kind == "aead":
        return "XFRMA_ALG_AEAD", d | {"alg_icv_len": a.icv_bits}
    if a.kind == "crypt":
        return "XFRMA_ALG_CRYPT", d
    if a.kind == "comp":
        return "XFRMA_ALG_COMP", d
    if a.kind == "auth":
        return "XFRMA_ALG_AUTH_TRUNC", d | {"alg_trunc_len": a.icv_bits}
    raise ValueError(f"unknown algorithm kind {a.kind!r}")


def sa_to_msg(sa: Sa) -> Any:
    """Sa -> xfrm_usersa_info message with its attributes (for NEWSA/UPDSA)."""
    msg = m.xfrm_usersa_info()
    lft = sa.lifetime
    window = sa.replay_window
    msg["sel"] = selector_to(sa.selector)
    msg["id"] = {"daddr": addr_to(sa.dst), "spi": sa.spi, "proto": int(sa.proto)}
    msg["saddr"] = addr_to(sa.src)
    msg["lft"] = {name: getattr(lft, name) for name, _ in m.XfrmLifetimeCfg.members}
    msg["curlft"] = {}
    msg["stats"] = {}
    msg["seq"] = sa.seq
    msg["reqid"] = sa.reqid
    msg["family"] = sa.family
    msg["mode"] = int(sa.mode)
    # Over 255 (u8) the window goes only in XFRMA_REPLAY_ESN_VAL (as iproute2 does).
    msg["replay_window"] = 0 if (sa.esn or window > 255) else window
    msg["flags"] = sa.flags
    attrs: list[tuple[str, Any]] = []
    for a in (sa.aead, sa.crypt, sa.auth, sa.comp):
        if a is not None:
            attrs.append(_alg_attr(a))
    if sa.encap is not None:
        attrs.append(
            (
                "XFRMA_ENCAP",
                {
                    "encap_type": sa.encap.type,
                    "encap_sport": sa.encap.sport,
                    "encap_dport": sa.encap.dport,
                    "encap_oa": addr_to(sa.encap.oa),
                },
            )
        )
    if sa.mark is not None:
        attrs.append(("XFRMA_MARK", {"v": sa.mark.value, "m": sa.mark.mask}))
    if sa.if_id:
        attrs.append(("XFRMA_IF_ID", sa.if_id))
    if sa.output_mark:
        attrs.append(("XFRMA_SET_MARK", sa.output_mark))
    if sa.extra_flags:
        attrs.append(("XFRMA_SA_EXTRA_FLAGS", sa.extra_flags))
    if sa.direction:
        attrs.append(("XFRMA_SA_DIR", sa.direction))
    r = sa.replay
    if sa.esn or window > 255:
        r = r or ReplayState(esn=True)
        attrs.append(("XFRMA_REPLAY_ESN_VAL", _esn_attr(r, window)))
    elif r is not None and (r.oseq or r.seq or r.bitmap):
        attrs.append(("XFRMA_REPLAY_VAL", {"oseq": r.oseq, "seq": r.seq, "bitmap": r.bitmap}))
    msg["attrs"] = attrs
    return msg


def _esn_attr(r: ReplayState, window: int) -> dict[str, Any]:
    window = r.replay_window or window
    words = max((window + 31) // 32, len(r.bmp))
    bmp = tuple(r.bmp) + (0,) * (words - len(r.bmp))
    return {
        "bmp_len": words,
        "oseq": r.oseq,
        "seq": r.seq,
        "oseq_hi": r.oseq_hi,
        "seq_hi": r.seq_hi,
        "replay_window": window,
        "bmp": struct.pack(f"{words}I", *bmp),
    }


def template_from(d: dict[str, Any]) -> Template:
    fam = d["family"]
    return Template(
        dst=addr_from(d["id"]["daddr"], fam),
        src=addr_from(d["saddr"], fam),
        proto=d["id"]["proto"],
        spi=d["id"]["spi"],
        reqid=d["reqid"],
        mode=Mode(d["mode"]) if d["mode"] in Mode._value2member_map_ else d["mode"],
        family=fam,
        share=d["share"],
        optional=bool(d["optional"]),
        aalgos=d["aalgos"],
        ealgos=d["ealgos"],
        calgos=d["calgos"],
    )


def template_to(t: Template) -> dict[str, Any]:
    return {
        "id": {"daddr": addr_to(t.dst), "spi": t.spi, "proto": int(t.proto)},
        "family": t.family,
        "saddr": addr_to(t.src),
        "reqid": t.reqid,
        "mode": int(t.mode),
        "share": t.share,
        "optional": int(t.optional),
        "aalgos": t.aalgos,
        "ealgos": t.ealgos,
        "calgos": t.calgos,
    }


def is_socket_policy(direction: int) -> bool:
    """Socket policies (dir >= XFRM_POLICY_MAX) bind one local socket, never forwarded
    traffic (strongSwan puts bypass policies on its IKE sockets): not ours to model. Dumps
    and events carrying them are skipped."""
    return direction >= m.XFRM_POLICY_MAX


def policy_from(info: dict[str, Any], attrs: dict[str, Any]) -> Policy:
    """struct xfrm_userpolicy_info + XFRMA_TMPL/MARK/IF_ID/POLICY_TYPE -> Policy."""
    mark = attrs.get("XFRMA_MARK")
    ptype = attrs.get("XFRMA_POLICY_TYPE")
    return Policy(
        selector=selector_from(info["sel"]),
        dir=Dir(info["dir"]),
        priority=info["priority"],
        action=Action(info["action"]),
        index=info["index"],
        flags=info["flags"],
        share=info["share"],
        templates=tuple(template_from(t) for t in attrs.get("XFRMA_TMPL") or ()),
        mark=Mark(mark["v"], mark["m"]) if mark else None,
        if_id=attrs.get("XFRMA_IF_ID", 0) or 0,
        ptype=ptype["type"] if ptype else 0,
        lifetime=_cfg_from(info["lft"]),
        current=_cur_from(info["curlft"]),
    )


def _policy_attrs(p: Policy) -> list[tuple[str, Any]]:
    attrs: list[tuple[str, Any]] = []
    if p.templates:
        attrs.append(("XFRMA_TMPL", [template_to(t) for t in p.templates]))
    if p.mark is not None:
        attrs.append(("XFRMA_MARK", {"v": p.mark.value, "m": p.mark.mask}))
    if p.if_id:
        attrs.append(("XFRMA_IF_ID", p.if_id))
    if p.ptype:
        attrs.append(("XFRMA_POLICY_TYPE", {"type": p.ptype}))
    return attrs


def _fields(msg: Any, ctype: type[m.CStruct]) -> dict[str, Any]:
    return {name: msg[name] for name, _ in ctype.members}


# -- decoding received messages into events ----------------------------------------------------
def event_from(mtype: int, msg: Any, ts_ns: int) -> XfrmEvent | None:
    """One decoded XFRM message -> typed event (None for types that carry no event)."""
    attrs = msg_attrs(msg)
    if mtype in (m.XFRM_MSG_NEWSA, m.XFRM_MSG_UPDSA):
        sa = sa_from(_fields(msg, m.XfrmUsersaInfo), attrs)
        return SaAdded(ts_ns, sa) if mtype == m.XFRM_MSG_NEWSA else SaUpdated(ts_ns, sa)
    if mtype == m.XFRM_MSG_DELSA:
        fam = msg["family"]
        sid = SaId(addr_from(msg["daddr"], fam), msg["spi"], msg["proto"], fam)
        info = attrs.get("XFRMA_SA")
        return SaDeleted(ts_ns, sid, sa_from(info, attrs) if info else None)
    if mtype == m.XFRM_MSG_EXPIRE:
        return SaExpired(ts_ns, sa_from(msg["state"], attrs), bool(msg["hard"]))
    if mtype in (m.XFRM_MSG_NEWPOLICY, m.XFRM_MSG_UPDPOLICY):
        if is_socket_policy(msg["dir"]):
            return None
        p = policy_from(_fields(msg, m.XfrmUserpolicyInfo), attrs)
        return PolicyAdded(ts_ns, p) if mtype == m.XFRM_MSG_NEWPOLICY else PolicyUpdated(ts_ns, p)
    if mtype == m.XFRM_MSG_DELPOLICY:
        if is_socket_policy(msg["dir"]):
            return None
        info = attrs.get("XFRMA_POLICY")
        p = policy_from(info, attrs) if info else None
        return PolicyDeleted(ts_ns, msg["index"], Dir(msg["dir"]), p)
    if mtype == m.XFRM_MSG_POLEXPIRE:
        if is_socket_policy(msg["pol"]["dir"]):
            return None
        return PolicyExpired(ts_ns, policy_from(msg["pol"], attrs), bool(msg["hard"]))
    if mtype == m.XFRM_MSG_FLUSHSA:
        return Flushed(ts_ns, "sa", msg["proto"])
    if mtype == m.XFRM_MSG_FLUSHPOLICY:
        return Flushed(ts_ns, "policy", 0)
    if mtype == m.XFRM_MSG_ACQUIRE:
        sel = selector_from(msg["sel"])
        fam = sel.family or AF_INET
        return Acquire(
            ts_ns,
            dst=addr_from(msg["id"]["daddr"], fam),
            src=addr_from(msg["saddr"], fam),
            proto=msg["id"]["proto"],
            selector=sel,
            policy_index=msg["policy"]["index"],
            policy_dir=Dir(msg["policy"]["dir"]),
            seq=msg["seq"],
        )
    if mtype in (m.XFRM_MSG_NEWAE, m.XFRM_MSG_GETAE):
        sid = msg["sa_id"]
        fam = sid["family"]
        lt = attrs.get("XFRMA_LTIME_VAL")
        return AeEvent(
            ts_ns,
            sa_id=SaId(addr_from(sid["daddr"], fam), sid["spi"], sid["proto"], fam),
            src=addr_from(msg["saddr"], fam),
            reqid=msg["reqid"],
            flags=msg["flags"],
            replay=_replay_from(attrs),
            current=_cur_from(lt) if lt else None,
        )
    if mtype in (m.XFRM_MSG_GETDEFAULT, m.XFRM_MSG_SETDEFAULT):
        return DefaultPolicyChanged(ts_ns, _default_from(msg))
    if mtype == m.XFRM_MSG_REPORT:
        sel = selector_from(msg["sel"])
        co = attrs.get("XFRMA_COADDR")
        return Report(ts_ns, msg["proto"], sel, addr_from(co, sel.family) if co else None)
    return None


def _da(v: int) -> DefaultAction:
    return DefaultAction(v) if v in DefaultAction._value2member_map_ else DefaultAction.UNSPEC


def _default_from(msg: Any) -> DefaultPolicy:
    return DefaultPolicy(_da(msg["in"]), _da(msg["fwd"]), _da(msg["out"]))


def decode(raw: bytes) -> tuple[int, Any]:
    """Decode one whole XFRM netlink message (header included): (type, pyroute2 message)."""
    if len(raw) < 16:
        raise MalformedMessage(f"{len(raw)} bytes: shorter than a netlink header")
    (mtype,) = struct.unpack_from("H", raw, 4)
    cls = m.RECV_CLASSES.get(mtype)
    if cls is None:
        return mtype, None
    size = _struct_size(cls)
    if len(raw) < 16 + size:
        raise MalformedMessage(f"{m.MSG_NAMES.get(mtype, mtype)}: {len(raw)} bytes < {16 + size}")
    try:
        check_attrs(raw, 16 + size)
    except ValueError as e:
        raise MalformedMessage(f"{m.MSG_NAMES.get(mtype, mtype)}: {e}") from e
    msg = cls(raw)
    try:
        msg.decode()
    except Exception as e:
        raise MalformedMessage(f"{m.MSG_NAMES.get(mtype, mtype)}: {e}") from e
    return mtype, msg


_SIZES: dict[type, int] = {}


def _struct_size(cls: type) -> int:
    size = _SIZES.get(cls)
    if size is None:
        size = 0
        for _name, fmt in cls.fields:
            size += fmt.size if isinstance(fmt, type) else struct.calcsize(fmt)
        _SIZES[cls] = size
    return size


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
        return [sa_from(_fields(x, m.XfrmUsersaInfo), msg_attrs(x)) for _t, x in res]

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
        msg = m.xfrm_usersa_id()
        msg["daddr"] = addr_to(daddr)
        msg["spi"] = spi
        msg["family"] = _family_of(daddr)
        msg["proto"] = int(proto)
        if mark is not None:
            msg["attrs"] = [("XFRMA_MARK", {"v": mark.value, "m": mark.mask})]
        try:
            res = self._do(msg, m.XFRM_MSG_GETSA, NLM_F_ACK)
        except NetlinkError as e:
            if e.errno == 3:  # ESRCH
                return None
            raise
        for _t, x in res:
            return sa_from(_fields(x, m.XfrmUsersaInfo), msg_attrs(x))
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
        msg = m.xfrm_usersa_id()
        msg["daddr"] = addr_to(sid.dst)
        msg["spi"] = sid.spi
        msg["family"] = sid.family
        msg["proto"] = int(sid.proto)
        if mark is not None:
            msg["attrs"] = [("XFRMA_MARK", {"v": mark.value, "m": mark.mask})]
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
        return [
            policy_from(_fields(x, m.XfrmUserpolicyInfo), msg_attrs(x))
            for _t, x in res
            if not is_socket_policy(x["dir"])
        ]

    def get_policy(
        self, index: int = 0, dir: Dir = Dir.OUT, selector: Selector | None = None
    ) -> Policy | None:
        """One policy by index, or by selector + dir (XFRM_MSG_GETPOLICY, xfrm_get_policy());
        None when absent."""
        msg = m.xfrm_userpolicy_id()
        msg["sel"] = selector_to(selector or Selector())
        msg["index"] = index
        msg["dir"] = int(dir)
        try:
            res = self._do(msg, m.XFRM_MSG_GETPOLICY, NLM_F_ACK)
        except NetlinkError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                return None
            raise
        for _t, x in res:
            return policy_from(_fields(x, m.XfrmUserpolicyInfo), msg_attrs(x))
        return None

    def _policy_msg(self, p: Policy) -> Any:
        msg = m.xfrm_userpolicy_info()
        msg["sel"] = selector_to(p.selector)
        msg["lft"] = {name: getattr(p.lifetime, name) for name, _ in m.XfrmLifetimeCfg.members}
        msg["curlft"] = {}
        msg["priority"] = p.priority
        msg["index"] = p.index
        msg["dir"] = int(p.dir)
        msg["action"] = int(p.action)
        msg["flags"] = p.flags
        msg["share"] = p.share
        msg["attrs"] = _policy_attrs(p)
        return msg

    def add_policy(self, p: Policy) -> None:
        """XFRM_MSG_NEWPOLICY (EEXIST when an equal selector/dir/mark policy exists)."""
        self._do(self._policy_msg(p), m.XFRM_MSG_NEWPOLICY, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)

    def update_policy(self, p: Policy) -> None:
        """XFRM_MSG_UPDPOLICY: add or replace."""
        self._do(self._policy_msg(p), m.XFRM_MSG_UPDPOLICY, NLM_F_ACK | NLM_F_REPLACE)

    def delete_policy(
        self,
        p: Policy | None = None,
        *,
        index: int = 0,
        dir: Dir = Dir.OUT,
        selector: Selector | None = None,
    ) -> None:
        """XFRM_MSG_DELPOLICY by index (when non-zero) or by selector + dir (xfrm_get_policy())."""
        msg = m.xfrm_userpolicy_id()
        if p is not None:
            index, dir, selector = p.index, p.dir, p.selector
        msg["sel"] = selector_to(selector or Selector())
        msg["index"] = index
        msg["dir"] = int(dir)
        attrs: list[tuple[str, Any]] = []
        if p is not None:
            attrs = [a for a in _policy_attrs(p) if a[0] != "XFRMA_TMPL"]
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
            return _default_from(x)
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
    def _aevent_msg(self, sa: Sa, flags: int) -> Any:
        msg = m.xfrm_aevent_id()
        msg["sa_id"] = {
            "daddr": addr_to(sa.dst),
            "spi": sa.spi,
            "family": sa.family,
            "proto": int(sa.proto),
        }
        msg["saddr"] = addr_to(sa.src)
        msg["flags"] = flags
        msg["reqid"] = sa.reqid
        msg["attrs"] = []
        if sa.mark is not None:
            msg["attrs"].append(("XFRMA_MARK", {"v": sa.mark.value, "m": sa.mark.mask}))
        return msg

    def get_ae(self, sa: Sa) -> AeState:
        """XFRM_MSG_GETAE (xfrm_get_ae()): sequence numbers, replay window, lifetime counters."""
        msg = self._aevent_msg(sa, m.XFRM_AE_RTHR | m.XFRM_AE_ETHR)
        res = self._do(msg, m.XFRM_MSG_GETAE, NLM_F_ACK)
        for _t, x in res:
            attrs = msg_attrs(x)
            lt = attrs.get("XFRMA_LTIME_VAL")
            return AeState(
                replay=_replay_from(attrs),
                current=_cur_from(lt) if lt else None,
                replay_thresh=attrs.get("XFRMA_REPLAY_THRESH"),
                etimer_thresh=attrs.get("XFRMA_ETIMER_THRESH"),
            )
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
        msg = self._aevent_msg(sa, 0)
        if replay is not None:
            if replay.esn or sa.esn:
                msg["attrs"].append(("XFRMA_REPLAY_ESN_VAL", _esn_attr(replay, sa.replay_window)))
            else:
                msg["attrs"].append(
                    (
                        "XFRMA_REPLAY_VAL",
                        {"oseq": replay.oseq, "seq": replay.seq, "bitmap": replay.bitmap},
                    )
                )
        if lifetime_cur is not None:
            msg["attrs"].append(
                (
                    "XFRMA_LTIME_VAL",
                    {
                        "bytes": lifetime_cur.bytes,
                        "packets": lifetime_cur.packets,
                        "add_time": lifetime_cur.add_time,
                        "use_time": lifetime_cur.use_time,
                    },
                )
            )
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
        msg = m.xfrm_user_expire()
        st = sa_to_msg(sa)
        msg["state"] = _fields(st, m.XfrmUsersaInfo)
        msg["hard"] = int(hard)
        msg["attrs"] = []
        if sa.mark is not None:
            msg["attrs"].append(("XFRMA_MARK", {"v": sa.mark.value, "m": sa.mark.mask}))
        self._do(msg, m.XFRM_MSG_EXPIRE, NLM_F_ACK)

    def monitor(self, groups: Iterable[int] = DEFAULT_GROUPS) -> XfrmMonitor:
        """A multicast reader in the same namespace (see XfrmMonitor)."""
        return XfrmMonitor(self.netns, groups=tuple(groups))


# -- multicast ---------------------------------------------------------------------------------
class XfrmMonitor:
    """Non-blocking reader of XFRM multicast groups yielding typed events.

    Default groups: ACQUIRE, EXPIRE, SA, POLICY. XFRMNLGRP_AEVENTS is opt-in: while anyone
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
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if poller.poll(left * 1000):
                yield from self.read_events()
