# SPDX-License-Identifier: GPL-2.0-only
"""Conversions between XFRM netlink messages and the model of controller/core/xfrm_model.py.

Three parts: the model to and from the dicts of pyroute2 messages (`sa_from`, `sa_to_msg`,
`policy_from`, ...); the request messages `XfrmSocket` sends (`usersa_id_msg`, `policy_to_msg`,
`aevent_msg`, ...); received messages decoded (`decode`) and turned into typed events
(`event_from`). No I/O here: controller/netlink/xfrm.py does the requests and the multicast
reading. Message classes: controller/netlink/xfrm_messages.py.

Kernel references are to net/xfrm/xfrm_user.c (handlers named xfrm_add_sa, xfrm_get_ae, ...).
"""

from __future__ import annotations

import ipaddress
import struct
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
    Policy,
    PolicyAdded,
    PolicyDeleted,
    PolicyExpired,
    PolicyUpdated,
    ReplayState,
    Report,
    Sa,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaId,
    SaMapping,
    SaUpdated,
    Secret,
    Selector,
    Template,
    XfrmEvent,
)
from controller.netlink import xfrm_messages as m
from controller.netlink.nlsock import check_attrs
from controller.netlink.xfrm_structs import (
    CStruct,
    XfrmLifetimeCfg,
    XfrmUserpolicyInfo,
    XfrmUsersaInfo,
)


class MalformedMessage(ValueError):
    """A message that does not decode (short, bad attribute); counted, never fatal."""


# -- the model <-> the dicts of netlink messages --------------------------------------------------
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


def family_of(a: IPAddress | None) -> int:
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


def lifetime_cfg_from(d: dict[str, Any]) -> LifetimeCfg:
    return LifetimeCfg(**d)


def lifetime_cur_from(d: dict[str, Any]) -> LifetimeCur:
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


def replay_from(attrs: dict[str, Any]) -> ReplayState | None:
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
        lifetime=lifetime_cfg_from(info["lft"]),
        current=lifetime_cur_from(attrs.get("XFRMA_LTIME_VAL") or info["curlft"]),
        replay=replay_from(attrs),
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
    msg["lft"] = {name: getattr(lft, name) for name, _ in XfrmLifetimeCfg.members}
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
        attrs.append(mark_attr(sa.mark))
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
        attrs.append(("XFRMA_REPLAY_ESN_VAL", esn_attr(r, window)))
    elif r is not None and (r.oseq or r.seq or r.bitmap):
        attrs.append(("XFRMA_REPLAY_VAL", {"oseq": r.oseq, "seq": r.seq, "bitmap": r.bitmap}))
    msg["attrs"] = attrs
    return msg


def esn_attr(r: ReplayState, window: int) -> dict[str, Any]:
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
        lifetime=lifetime_cfg_from(info["lft"]),
        current=lifetime_cur_from(info["curlft"]),
    )


def policy_attrs(p: Policy) -> list[tuple[str, Any]]:
    attrs: list[tuple[str, Any]] = []
    if p.templates:
        attrs.append(("XFRMA_TMPL", [template_to(t) for t in p.templates]))
    if p.mark is not None:
        attrs.append(mark_attr(p.mark))
    if p.if_id:
        attrs.append(("XFRMA_IF_ID", p.if_id))
    if p.ptype:
        attrs.append(("XFRMA_POLICY_TYPE", {"type": p.ptype}))
    return attrs


def fields_of(msg: Any, ctype: type[CStruct]) -> dict[str, Any]:
    return {name: msg[name] for name, _ in ctype.members}


# -- request messages (what XfrmSocket sends) -----------------------------------------------------
def mark_attr(mark: Mark) -> tuple[str, dict[str, int]]:
    """XFRMA_MARK: struct xfrm_mark { __u32 v; __u32 m; }."""
    return ("XFRMA_MARK", {"v": mark.value, "m": mark.mask})


def usersa_id_msg(
    daddr: IPAddress, spi: int, family: int, proto: int, mark: Mark | None = None
) -> Any:
    """struct xfrm_usersa_id (+ XFRMA_MARK): one SA by (daddr, spi, proto), for GETSA and
    DELSA (xfrm_user_state_lookup())."""
    msg = m.xfrm_usersa_id()
    msg["daddr"] = addr_to(daddr)
    msg["spi"] = spi
    msg["family"] = family
    msg["proto"] = int(proto)
    if mark is not None:
        msg["attrs"] = [mark_attr(mark)]
    return msg


def userpolicy_id_msg(index: int, dir: Dir, selector: Selector | None) -> Any:
    """struct xfrm_userpolicy_id: one policy by index (when non-zero) or by selector + dir
    (xfrm_get_policy())."""
    msg = m.xfrm_userpolicy_id()
    msg["sel"] = selector_to(selector or Selector())
    msg["index"] = index
    msg["dir"] = int(dir)
    return msg


def policy_to_msg(p: Policy) -> Any:
    """Policy -> xfrm_userpolicy_info message with its attributes (for NEWPOLICY/UPDPOLICY)."""
    msg = m.xfrm_userpolicy_info()
    msg["sel"] = selector_to(p.selector)
    msg["lft"] = {name: getattr(p.lifetime, name) for name, _ in XfrmLifetimeCfg.members}
    msg["curlft"] = {}
    msg["priority"] = p.priority
    msg["index"] = p.index
    msg["dir"] = int(p.dir)
    msg["action"] = int(p.action)
    msg["flags"] = p.flags
    msg["share"] = p.share
    msg["attrs"] = policy_attrs(p)
    return msg


def aevent_msg(sa: Sa, flags: int) -> Any:
    """struct xfrm_aevent_id (+ XFRMA_MARK): names the SA of a GETAE or NEWAE."""
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
        msg["attrs"].append(mark_attr(sa.mark))
    return msg


def ae_attrs(
    sa: Sa, replay: ReplayState | None, lifetime_cur: LifetimeCur | None
) -> list[tuple[str, Any]]:
    """What a NEWAE sets (xfrm_update_ae_params()): XFRMA_REPLAY_ESN_VAL or XFRMA_REPLAY_VAL,
    and XFRMA_LTIME_VAL."""
    attrs: list[tuple[str, Any]] = []
    if replay is not None:
        if replay.esn or sa.esn:
            attrs.append(("XFRMA_REPLAY_ESN_VAL", esn_attr(replay, sa.replay_window)))
        else:
            attrs.append(
                (
                    "XFRMA_REPLAY_VAL",
                    {"oseq": replay.oseq, "seq": replay.seq, "bitmap": replay.bitmap},
                )
            )
    if lifetime_cur is not None:
        attrs.append(
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
    return attrs


def expire_msg(sa: Sa, hard: bool) -> Any:
    """struct xfrm_user_expire (+ XFRMA_MARK), for XFRM_MSG_EXPIRE (xfrm_add_sa_expire())."""
    msg = m.xfrm_user_expire()
    msg["state"] = fields_of(sa_to_msg(sa), XfrmUsersaInfo)
    msg["hard"] = int(hard)
    msg["attrs"] = []
    if sa.mark is not None:
        msg["attrs"].append(mark_attr(sa.mark))
    return msg


# -- received messages: replies and events ---------------------------------------------------------
def sa_from_msg(msg: Any) -> Sa:
    """A decoded xfrm_usersa_info message (NEWSA/UPDSA, GETSA replies) -> Sa."""
    return sa_from(fields_of(msg, XfrmUsersaInfo), msg_attrs(msg))


def policy_from_msg(msg: Any) -> Policy:
    """A decoded xfrm_userpolicy_info message (NEWPOLICY/UPDPOLICY, GETPOLICY replies)."""
    return policy_from(fields_of(msg, XfrmUserpolicyInfo), msg_attrs(msg))


def ae_state_from(msg: Any) -> AeState:
    """A GETAE reply (xfrm_get_ae()): replay state, lifetime counters, thresholds."""
    attrs = msg_attrs(msg)
    lt = attrs.get("XFRMA_LTIME_VAL")
    return AeState(
        replay=replay_from(attrs),
        current=lifetime_cur_from(lt) if lt else None,
        replay_thresh=attrs.get("XFRMA_REPLAY_THRESH"),
        etimer_thresh=attrs.get("XFRMA_ETIMER_THRESH"),
    )


def event_from(mtype: int, msg: Any, ts_ns: int) -> XfrmEvent | None:
    """One decoded XFRM message -> typed event (None for types that carry no event)."""
    attrs = msg_attrs(msg)
    if mtype in (m.XFRM_MSG_NEWSA, m.XFRM_MSG_UPDSA):
        sa = sa_from(fields_of(msg, XfrmUsersaInfo), attrs)
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
        p = policy_from(fields_of(msg, XfrmUserpolicyInfo), attrs)
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
            replay=replay_from(attrs),
            current=lifetime_cur_from(lt) if lt else None,
        )
    if mtype in (m.XFRM_MSG_GETDEFAULT, m.XFRM_MSG_SETDEFAULT):
        return DefaultPolicyChanged(ts_ns, default_policy_from(msg))
    if mtype == m.XFRM_MSG_MAPPING:
        sid = msg["id"]
        fam = sid["family"]
        return SaMapping(
            ts_ns,
            sa_id=SaId(addr_from(sid["daddr"], fam), sid["spi"], sid["proto"], fam),
            reqid=msg["reqid"],
            old_saddr=addr_from(msg["old_saddr"], fam),
            new_saddr=addr_from(msg["new_saddr"], fam),
            old_sport=msg["old_sport"],
            new_sport=msg["new_sport"],
        )
    if mtype == m.XFRM_MSG_REPORT:
        sel = selector_from(msg["sel"])
        co = attrs.get("XFRMA_COADDR")
        return Report(ts_ns, msg["proto"], sel, addr_from(co, sel.family) if co else None)
    return None


def _da(v: int) -> DefaultAction:
    return DefaultAction(v) if v in DefaultAction._value2member_map_ else DefaultAction.UNSPEC


def default_policy_from(msg: Any) -> DefaultPolicy:
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
