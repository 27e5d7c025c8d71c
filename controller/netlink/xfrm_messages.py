# SPDX-License-Identifier: GPL-2.0-only
"""XFRM netlink messages (NETLINK_XFRM) on pyroute2's message machinery.

pyroute2 has no XFRM classes, so this module declares them: the constants of
include/uapi/linux/xfrm.h, and each netlink message as a pyroute2 `nlmsg` whose `fields` are the
layout of its C struct (controller/netlink/xfrm_structs.py) and whose `nla_map` is the XFRMA_*
attribute table. The conversions to and from the model (controller/netlink/xfrm_codec.py) and
the socket (controller/netlink/xfrm.py) sit on top; nothing outside controller/netlink sees
these classes.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pyroute2.netlink import NotInitialized, nla_base_string, nlmsg

from controller.netlink.xfrm_structs import (
    CStruct,
    XfrmAddress,
    XfrmAddressFilter,
    XfrmAeventId,
    XfrmAlgo,
    XfrmAlgoAead,
    XfrmAlgoAuth,
    XfrmEncapTmpl,
    XfrmLifetimeCur,
    XfrmMark,
    XfrmReplayState,
    XfrmReplayStateEsn,
    XfrmUserAcquire,
    XfrmUserExpire,
    XfrmUserMapping,
    XfrmUserOffload,
    XfrmUserPolexpire,
    XfrmUserpolicyDefault,
    XfrmUserpolicyId,
    XfrmUserpolicyInfo,
    XfrmUserpolicyType,
    XfrmUserReport,
    XfrmUsersaFlush,
    XfrmUsersaId,
    XfrmUsersaInfo,
    XfrmUserTmpl,
)

# -- constants: include/uapi/linux/xfrm.h ----------------------------------------------------------
NETLINK_XFRM = 6

XFRM_MSG_NEWSA = 0x10
XFRM_MSG_DELSA = 0x11
XFRM_MSG_GETSA = 0x12
XFRM_MSG_NEWPOLICY = 0x13
XFRM_MSG_DELPOLICY = 0x14
XFRM_MSG_GETPOLICY = 0x15
XFRM_MSG_ALLOCSPI = 0x16
XFRM_MSG_ACQUIRE = 0x17
XFRM_MSG_EXPIRE = 0x18
XFRM_MSG_UPDPOLICY = 0x19
XFRM_MSG_UPDSA = 0x1A
XFRM_MSG_POLEXPIRE = 0x1B
XFRM_MSG_FLUSHSA = 0x1C
XFRM_MSG_FLUSHPOLICY = 0x1D
XFRM_MSG_NEWAE = 0x1E
XFRM_MSG_GETAE = 0x1F
XFRM_MSG_REPORT = 0x20
XFRM_MSG_MIGRATE = 0x21
XFRM_MSG_NEWSADINFO = 0x22
XFRM_MSG_GETSADINFO = 0x23
XFRM_MSG_NEWSPDINFO = 0x24
XFRM_MSG_GETSPDINFO = 0x25
XFRM_MSG_MAPPING = 0x26
XFRM_MSG_SETDEFAULT = 0x27
XFRM_MSG_GETDEFAULT = 0x28

MSG_NAMES = {v: k for k, v in globals().items() if k.startswith("XFRM_MSG_")}

# enum xfrm_nlgroups
XFRMNLGRP_ACQUIRE = 1
XFRMNLGRP_EXPIRE = 2
XFRMNLGRP_SA = 3
XFRMNLGRP_POLICY = 4
XFRMNLGRP_AEVENTS = 5
XFRMNLGRP_REPORT = 6
XFRMNLGRP_MIGRATE = 7
XFRMNLGRP_MAPPING = 8

XFRM_INF = (1 << 64) - 1

# XFRM_MODE_*
XFRM_MODE_TRANSPORT = 0
XFRM_MODE_TUNNEL = 1
XFRM_MODE_ROUTEOPTIMIZATION = 2
XFRM_MODE_IN_TRIGGER = 3
XFRM_MODE_BEET = 4
XFRM_MODE_IPTFS = 5

# xfrm_usersa_info.flags
XFRM_STATE_NOECN = 1
XFRM_STATE_DECAP_DSCP = 2
XFRM_STATE_NOPMTUDISC = 4
XFRM_STATE_WILDRECV = 8
XFRM_STATE_ICMP = 16
XFRM_STATE_AF_UNSPEC = 32
XFRM_STATE_ALIGN4 = 64
XFRM_STATE_ESN = 128

# XFRMA_SA_EXTRA_FLAGS
XFRM_SA_XFLAG_DONT_ENCAP_DSCP = 1
XFRM_SA_XFLAG_OSEQ_MAY_WRAP = 2

# policy dir / action / flags / type
XFRM_POLICY_IN = 0
XFRM_POLICY_OUT = 1
XFRM_POLICY_FWD = 2
# Per-socket policies (setsockopt IP_XFRM_POLICY, e.g. an IKE daemon's bypass for its own
# sockets) show up in policy dumps with dir = XFRM_POLICY_MAX + their direction.
XFRM_POLICY_MAX = 3
XFRM_POLICY_ALLOW = 0
XFRM_POLICY_BLOCK = 1
XFRM_POLICY_LOCALOK = 1
XFRM_POLICY_ICMP = 2
XFRM_POLICY_TYPE_MAIN = 0
XFRM_POLICY_TYPE_SUB = 1

# struct xfrm_userpolicy_default values
XFRM_USERPOLICY_UNSPEC = 0
XFRM_USERPOLICY_BLOCK = 1
XFRM_USERPOLICY_ACCEPT = 2

# enum xfrm_ae_ftype_t
XFRM_AE_RTHR = 1
XFRM_AE_RVAL = 2
XFRM_AE_LVAL = 4
XFRM_AE_ETHR = 8
XFRM_AE_CR = 16
XFRM_AE_CE = 32
XFRM_AE_CU = 64

# include/uapi/linux/udp.h: UDP_ENCAP_ESPINUDP (RFC 3948 NAT-T)
UDP_ENCAP_ESPINUDP_NON_IKE = 1
UDP_ENCAP_ESPINUDP = 2
# include/uapi/linux/in.h
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_COMP = 108
IPSEC_PROTO_ANY = 255  # include/uapi/linux/ipsec.h


# -- attributes ------------------------------------------------------------------------------------
class _struct_nla(nla_base_string):
    """An NLA whose payload is one C struct (plus its flexible tail); value: a dict."""

    __slots__ = ()
    ctype: ClassVar[type[CStruct]] = CStruct

    def _plain_value(self) -> Any:
        if self.value is not NotInitialized:
            return self.value
        # pyroute2's setvalue() merges a dict value into the NLA itself.
        return {k: v for k, v in self.items() if k not in ("header", "attrs", "value")}

    def encode(self) -> None:
        self["value"] = self.ctype.pack(self._plain_value())
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        self.value = self.ctype.unpack(self["value"])


class _struct_array_nla(_struct_nla):
    """An NLA holding back-to-back structs (XFRMA_TMPL); value: a list of dicts."""

    __slots__ = ()

    def encode(self) -> None:
        items = self._plain_value() or []
        self["value"] = b"".join(self.ctype.pack(i) for i in items)
        nla_base_string.encode(self)

    def decode(self) -> None:
        nla_base_string.decode(self)
        raw, size = self["value"], self.ctype.size
        if len(raw) % size:
            raise ValueError(f"{self.ctype.__name__} array: {len(raw)} bytes, not a multiple")
        self.value = [self.ctype.unpack(raw[i : i + size]) for i in range(0, len(raw), size)]


def _nla_of(ctype: type[CStruct], array: bool = False) -> type[nla_base_string]:
    base = _struct_array_nla if array else _struct_nla
    return type(f"nla_{ctype.__name__}", (base,), {"__slots__": (), "ctype": ctype})


class _xfrm_attrs:
    """The XFRMA_* attribute table (enum xfrm_attr_type_t), shared by every XFRM message."""

    xfrm_algo = _nla_of(XfrmAlgo)
    xfrm_algo_auth = _nla_of(XfrmAlgoAuth)
    xfrm_algo_aead = _nla_of(XfrmAlgoAead)
    xfrm_encap_tmpl = _nla_of(XfrmEncapTmpl)
    xfrm_user_tmpl = _nla_of(XfrmUserTmpl, array=True)
    xfrm_usersa_info = _nla_of(XfrmUsersaInfo)
    xfrm_userpolicy_info = _nla_of(XfrmUserpolicyInfo)
    xfrm_lifetime_cur = _nla_of(XfrmLifetimeCur)
    xfrm_replay_state = _nla_of(XfrmReplayState)
    xfrm_replay_state_esn = _nla_of(XfrmReplayStateEsn)
    xfrm_address = _nla_of(XfrmAddress)
    xfrm_userpolicy_type = _nla_of(XfrmUserpolicyType)
    xfrm_mark = _nla_of(XfrmMark)
    xfrm_address_filter = _nla_of(XfrmAddressFilter)
    xfrm_user_offload = _nla_of(XfrmUserOffload)

    prefix = "XFRMA_"
    nla_map = (
        (0, "XFRMA_UNSPEC", "none"),
        (1, "XFRMA_ALG_AUTH", "xfrm_algo"),
        (2, "XFRMA_ALG_CRYPT", "xfrm_algo"),
        (3, "XFRMA_ALG_COMP", "xfrm_algo"),
        (4, "XFRMA_ENCAP", "xfrm_encap_tmpl"),
        (5, "XFRMA_TMPL", "xfrm_user_tmpl"),
        (6, "XFRMA_SA", "xfrm_usersa_info"),
        (7, "XFRMA_POLICY", "xfrm_userpolicy_info"),
        (8, "XFRMA_SEC_CTX", "cdata"),
        (9, "XFRMA_LTIME_VAL", "xfrm_lifetime_cur"),
        (10, "XFRMA_REPLAY_VAL", "xfrm_replay_state"),
        (11, "XFRMA_REPLAY_THRESH", "uint32"),
        (12, "XFRMA_ETIMER_THRESH", "uint32"),
        (13, "XFRMA_SRCADDR", "xfrm_address"),
        (14, "XFRMA_COADDR", "xfrm_address"),
        (15, "XFRMA_LASTUSED", "uint64"),
        (16, "XFRMA_POLICY_TYPE", "xfrm_userpolicy_type"),
        (17, "XFRMA_MIGRATE", "cdata"),
        (18, "XFRMA_ALG_AEAD", "xfrm_algo_aead"),
        (19, "XFRMA_KMADDRESS", "cdata"),
        (20, "XFRMA_ALG_AUTH_TRUNC", "xfrm_algo_auth"),
        (21, "XFRMA_MARK", "xfrm_mark"),
        (22, "XFRMA_TFCPAD", "uint32"),
        (23, "XFRMA_REPLAY_ESN_VAL", "xfrm_replay_state_esn"),
        (24, "XFRMA_SA_EXTRA_FLAGS", "uint32"),
        (25, "XFRMA_PROTO", "uint8"),
        (26, "XFRMA_ADDRESS_FILTER", "xfrm_address_filter"),
        (27, "XFRMA_PAD", "none"),
        (28, "XFRMA_OFFLOAD_DEV", "xfrm_user_offload"),
        (29, "XFRMA_SET_MARK", "uint32"),  # a.k.a. XFRMA_OUTPUT_MARK
        (30, "XFRMA_SET_MARK_MASK", "uint32"),
        (31, "XFRMA_IF_ID", "uint32"),
        (32, "XFRMA_MTIMER_THRESH", "uint32"),
        (33, "XFRMA_SA_DIR", "uint8"),
        (34, "XFRMA_NAT_KEEPALIVE_INTERVAL", "uint32"),
        (35, "XFRMA_SA_PCPU", "uint32"),
        (36, "XFRMA_IPTFS_DROP_TIME", "uint32"),
        (37, "XFRMA_IPTFS_REORDER_WINDOW", "uint16"),
        (38, "XFRMA_IPTFS_DONT_FRAG", "flag"),
        (39, "XFRMA_IPTFS_INIT_DELAY", "uint32"),
        (40, "XFRMA_IPTFS_MAX_QSIZE", "uint32"),
        (41, "XFRMA_IPTFS_PKT_SIZE", "uint32"),
    )


def _msg(name: str, ctype: type[CStruct] | None) -> type[nlmsg]:
    fields = ctype.layout if ctype is not None else ()
    doc = ctype.__doc__ if ctype is not None else "No fixed header: attributes only."
    return type(name, (_xfrm_attrs, nlmsg), {"__slots__": (), "fields": fields, "__doc__": doc})


xfrm_usersa_info = _msg("xfrm_usersa_info", XfrmUsersaInfo)
xfrm_usersa_id = _msg("xfrm_usersa_id", XfrmUsersaId)
xfrm_userpolicy_info = _msg("xfrm_userpolicy_info", XfrmUserpolicyInfo)
xfrm_userpolicy_id = _msg("xfrm_userpolicy_id", XfrmUserpolicyId)
xfrm_user_expire = _msg("xfrm_user_expire", XfrmUserExpire)
xfrm_user_polexpire = _msg("xfrm_user_polexpire", XfrmUserPolexpire)
xfrm_user_acquire = _msg("xfrm_user_acquire", XfrmUserAcquire)
xfrm_aevent_id = _msg("xfrm_aevent_id", XfrmAeventId)
xfrm_usersa_flush = _msg("xfrm_usersa_flush", XfrmUsersaFlush)
xfrm_userpolicy_default = _msg("xfrm_userpolicy_default", XfrmUserpolicyDefault)
xfrm_user_report = _msg("xfrm_user_report", XfrmUserReport)
xfrm_user_mapping = _msg("xfrm_user_mapping", XfrmUserMapping)
xfrm_empty = _msg("xfrm_empty", None)

# What the kernel sends (replies and multicast), by message type. DELSA and DELPOLICY carry the
# id struct with the full info in an XFRMA_SA / XFRMA_POLICY attribute (xfrm_notify_sa() and
# xfrm_notify_policy() in net/xfrm/xfrm_user.c).
RECV_CLASSES: dict[int, type[nlmsg]] = {
    XFRM_MSG_NEWSA: xfrm_usersa_info,
    XFRM_MSG_UPDSA: xfrm_usersa_info,
    XFRM_MSG_DELSA: xfrm_usersa_id,
    XFRM_MSG_NEWPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_UPDPOLICY: xfrm_userpolicy_info,
    XFRM_MSG_DELPOLICY: xfrm_userpolicy_id,
    XFRM_MSG_ACQUIRE: xfrm_user_acquire,
    XFRM_MSG_EXPIRE: xfrm_user_expire,
    XFRM_MSG_POLEXPIRE: xfrm_user_polexpire,
    XFRM_MSG_FLUSHSA: xfrm_usersa_flush,
    XFRM_MSG_FLUSHPOLICY: xfrm_empty,
    XFRM_MSG_NEWAE: xfrm_aevent_id,
    XFRM_MSG_GETAE: xfrm_aevent_id,
    XFRM_MSG_REPORT: xfrm_user_report,
    XFRM_MSG_MAPPING: xfrm_user_mapping,
    XFRM_MSG_GETDEFAULT: xfrm_userpolicy_default,
    XFRM_MSG_SETDEFAULT: xfrm_userpolicy_default,
}
