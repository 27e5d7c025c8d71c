# SPDX-License-Identifier: GPL-2.0-only
"""XFRM over netlink: message layouts against the C compiler, the typed API against iproute2
and the kernel, the monitor, and policy_lookup() against the kernel's forwarding decision.

Host kernel here: XFRM_USER without ESP, so SAs cannot be created; policies, default policy,
flushes, ACQUIRE (larval SAs) and the monitor are tested here; SA tests are `vm` tests.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import logging
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from controller.core.xfrm_model import (
    FASTPATH_AEAD,
    Acquire,
    Action,
    Algorithm,
    DefaultAction,
    DefaultPolicy,
    DefaultPolicyChanged,
    Dir,
    Encap,
    Flow,
    Flushed,
    LifetimeCfg,
    LifetimeCur,
    Mark,
    Mode,
    Policy,
    PolicyAdded,
    PolicyDeleted,
    PolicyExpired,
    PolicyUpdated,
    Proto,
    ReplayState,
    Sa,
    SaAdded,
    SaDeleted,
    SaExpired,
    SaUpdated,
    Secret,
    Selector,
    Template,
    policy_decision,
    policy_lookup,
    resolve_sa,
)
from controller.netlink import xfrm_messages as m
from controller.netlink import xfrm_structs as structs
from controller.netlink.nlsock import NetlinkError
from controller.netlink.xfrm import XfrmMonitor, XfrmSocket
from controller.netlink.xfrm_codec import decode, msg_attrs, sa_from, sa_to_msg
from testbed.bed import Testbed

IP = ipaddress.ip_address
KEY = bytes(range(1, 37))  # 32-byte ChaCha20 key + 4-byte salt (RFC 7634 §2)
KEY_HEX = KEY.hex()
GW1, GW2 = "192.0.2.1", "192.0.2.2"


def chacha_sa(spi: int = 0x1000, **kw) -> Sa:
    base = dict(
        src=IP(GW1),
        dst=IP(GW2),
        spi=spi,
        reqid=7,
        replay_window=32,
        selector=Selector.of("10.1.0.0/24", "10.2.0.0/24"),
        aead=Algorithm("aead", FASTPATH_AEAD, 288, Secret(KEY), 128),
    )
    base.update(kw)
    return Sa(**base)


def ipx(bed: Testbed, *args: str, check: bool = True) -> str:
    return bed.ip("gw1", "xfrm", *args, check=check).stdout


# -- layouts against the compiler ---------------------------------------------------------------
C_TYPES = {
    structs.XfrmId: "struct xfrm_id",
    structs.XfrmSelector: "struct xfrm_selector",
    structs.XfrmLifetimeCfg: "struct xfrm_lifetime_cfg",
    structs.XfrmLifetimeCur: "struct xfrm_lifetime_cur",
    structs.XfrmStats: "struct xfrm_stats",
    structs.XfrmReplayState: "struct xfrm_replay_state",
    structs.XfrmReplayStateEsn: "struct xfrm_replay_state_esn",
    structs.XfrmAlgo: "struct xfrm_algo",
    structs.XfrmAlgoAuth: "struct xfrm_algo_auth",
    structs.XfrmAlgoAead: "struct xfrm_algo_aead",
    structs.XfrmEncapTmpl: "struct xfrm_encap_tmpl",
    structs.XfrmUserTmpl: "struct xfrm_user_tmpl",
    structs.XfrmMark: "struct xfrm_mark",
    structs.XfrmUserpolicyType: "struct xfrm_userpolicy_type",
    structs.XfrmUserOffload: "struct xfrm_user_offload",
    structs.XfrmAddressFilter: "struct xfrm_address_filter",
    structs.XfrmUsersaInfo: "struct xfrm_usersa_info",
    structs.XfrmUsersaId: "struct xfrm_usersa_id",
    structs.XfrmAeventId: "struct xfrm_aevent_id",
    structs.XfrmUserpolicyInfo: "struct xfrm_userpolicy_info",
    structs.XfrmUserpolicyId: "struct xfrm_userpolicy_id",
    structs.XfrmUserAcquire: "struct xfrm_user_acquire",
    structs.XfrmUserExpire: "struct xfrm_user_expire",
    structs.XfrmUserPolexpire: "struct xfrm_user_polexpire",
    structs.XfrmUsersaFlush: "struct xfrm_usersa_flush",
    structs.XfrmUserpolicyDefault: "struct xfrm_userpolicy_default",
    structs.XfrmUserReport: "struct xfrm_user_report",
}


def _offsets(cls: type[structs.CStruct]) -> dict[str, int]:
    out, off = {}, 0
    for name, fmt in cls.layout:
        if not name.startswith("__pad"):
            out[name] = off
        off += struct.calcsize(fmt) if isinstance(fmt, str) else fmt.size
    return out


def test_struct_layouts_match_the_c_compiler(tmp_path: Path) -> None:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None or not Path("/usr/include/linux/xfrm.h").exists():
        pytest.skip("needs a C compiler and /usr/include/linux/xfrm.h (linux-libc-dev)")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/xfrm.h>",
        "int main(void){",
    ]
    for cls, ctype in C_TYPES.items():
        lines.append(f'printf("{cls.__name__} size %zu\\n", sizeof({ctype}));')
        for member in _offsets(cls):
            lines.append(f'printf("{cls.__name__} {member} %zu\\n", offsetof({ctype}, {member}));')
    lines.append("return 0;}")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    c = {tuple(line.split()[:2]): int(line.split()[2]) for line in got.splitlines()}
    for cls in C_TYPES:
        assert c[(cls.__name__, "size")] == cls.size, f"sizeof {cls.__name__}"
        for member, off in _offsets(cls).items():
            assert c[(cls.__name__, member)] == off, f"offsetof({cls.__name__}, {member})"


# -- pure encode/decode ----------------------------------------------------------------------------
def _roundtrip(sa: Sa) -> Sa:
    msg = sa_to_msg(sa)
    msg["header"] = {"type": m.XFRM_MSG_NEWSA}
    msg.encode()
    t, dec = decode(bytes(msg.data))
    assert t == m.XFRM_MSG_NEWSA, "type survives encoding"
    return sa_from({k: dec[k] for k, _ in structs.XfrmUsersaInfo.members}, msg_attrs(dec))


def test_sa_encodes_and_decodes_to_itself() -> None:
    sas = [
        chacha_sa(),
        chacha_sa(
            spi=0xDEADBEEF,
            mode=Mode.TRANSPORT,
            encap=Encap(m.UDP_ENCAP_ESPINUDP, 4500, 4501, None),
            mark=Mark(0x10, 0xFF),
            if_id=9,
            lifetime=LifetimeCfg(soft_byte_limit=10**9, hard_add_expires_seconds=3600),
            flags=m.XFRM_STATE_ESN,
            replay_window=128,
            replay=ReplayState(oseq=5, esn=True, oseq_hi=1, replay_window=128, bmp=(1, 2, 3, 4)),
        ),
        chacha_sa(
            aead=None,
            crypt=Algorithm("crypt", "cbc(aes)", 128, Secret(bytes(16))),
            auth=Algorithm("auth", "hmac(sha256)", 256, Secret(bytes(32)), 128),
        ),
    ]
    for sa in sas:
        back = _roundtrip(sa)
        for f in dataclasses.fields(Sa):
            assert getattr(back, f.name) == getattr(sa, f.name), f"{f.name} of {sa}"


def test_key_never_shows_in_repr_str_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    sa = chacha_sa()
    logging.getLogger("test").warning("sa %s %r %s", sa, sa, dataclasses.asdict(sa))
    texts = [repr(sa), str(sa), f"{sa}", f"{sa.key}", str(dataclasses.asdict(sa)), caplog.text]
    for text in texts:
        assert KEY_HEX not in text and repr(KEY) not in text, f"key leaked in {text[:80]}"
        assert "\\x01\\x02\\x03" not in text, f"key bytes leaked in {text[:80]}"
    assert sa.key == KEY and sa.key.reveal() == KEY, "the key itself is still there"
    assert sa.salt.reveal() == KEY[-4:] and sa.cipher_key.reveal() == KEY[:32], "RFC 7634 split"


@pytest.mark.parametrize(
    ("change", "ok", "why"),
    [
        ({}, True, "ok"),
        ({"proto": Proto.AH}, False, "only ESP"),
        ({"mode": Mode.TRANSPORT}, False, "only tunnel"),
        ({"src": IP("2001:db8::1"), "dst": IP("2001:db8::2"), "family": 10}, False, "IPv4"),
        ({"encap": Encap(2, 4500, 4500)}, True, "ok"),  # RFC 3948 ESP in UDP is served
        ({"encap": Encap(1, 4500, 4500)}, False, "only ESP in UDP"),
        ({"mark": Mark(1, 0xFF)}, True, "ok"),  # VTI: matched by validation (validate.py)
        ({"if_id": 3}, True, "ok"),  # xfrm interfaces: the same
        ({"output_mark": 5}, False, "output mark"),
        (
            {"aead": Algorithm("aead", "rfc4106(gcm(aes))", 160, Secret(bytes(20)), 128)},
            False,
            "rfc4106(gcm(aes))",
        ),
        ({"aead": Algorithm("aead", FASTPATH_AEAD, 288, Secret(KEY), 64)}, False, "ICV of 64"),
        (
            {
                "aead": None,
                "crypt": Algorithm("crypt", "cbc(aes)", 128, Secret(bytes(16))),
                "auth": Algorithm("auth", "hmac(sha1)", 160, Secret(bytes(20)), 96),
            },
            False,
            "cbc(aes)+hmac(sha1)",
        ),
    ],
)
def test_fastpath_support_says_why_not(change: dict, ok: bool, why: str) -> None:
    got, reason = chacha_sa(**change).fastpath_support()
    assert got is ok, f"{change}: {reason}"
    assert why in reason, f"reason {reason!r} should mention {why!r}"


def test_monitor_survives_malformed_and_unknown_messages() -> None:
    mon = XfrmMonitor.__new__(XfrmMonitor)  # parse() only: no socket needed
    from collections import Counter

    mon.stats = Counter()
    good = sa_to_msg(chacha_sa())
    good["header"] = {"type": m.XFRM_MSG_NEWSA}
    good.encode()
    good_raw = bytes(good.data)
    bad = [
        b"\x01\x02",  # shorter than a header
        struct.pack("IHHII", 12, m.XFRM_MSG_NEWSA, 0, 0, 0),  # length below 16
        struct.pack("IHHII", 400, m.XFRM_MSG_NEWSA, 0, 0, 0),  # length beyond the datagram
        struct.pack("IHHII", 20, m.XFRM_MSG_NEWSA, 0, 0, 0) + b"\0" * 4,  # truncated struct
        struct.pack("IHHII", 20, 0x7F, 0, 0, 0) + b"\0" * 4,  # unknown type
        good_raw[:-8] + struct.pack("HH", 200, 18) + b"\0" * 4,  # NLA running off the end
        good_raw[:16] + b"\xff" * (len(good_raw) - 16),  # garbage body
    ]
    for raw in bad:
        mon.parse(raw, 0)  # must not raise
    assert mon.stats["malformed"] >= 4, f"malformed counted: {mon.stats}"
    assert mon.stats["unknown"] >= 1, f"unknown counted: {mon.stats}"
    (ev,) = mon.parse(good_raw, 42)
    assert isinstance(ev, SaAdded) and ev.sa.spi == 0x1000 and ev.ts_ns == 42, f"decoded {ev}"


# -- policy_lookup, pure ---------------------------------------------------------------------------
def pol(src: str, dst: str, d: Dir = Dir.FWD, prio: int = 0, act=Action.ALLOW, **kw) -> Policy:
    return Policy(Selector.of(src, dst, **kw), d, priority=prio, action=act)


def test_policy_lookup_rules() -> None:
    f = Flow.of("10.1.0.2", "10.2.0.2", 6, 40000, 80)
    wide = pol("10.1.0.0/24", "10.2.0.0/24", prio=100)
    narrow = pol("10.1.0.2/32", "10.2.0.2/32", prio=50, act=Action.BLOCK)
    assert policy_lookup([wide, narrow], f, Dir.FWD) is narrow, "lower priority value wins"
    assert policy_lookup([wide], f, Dir.OUT) is None, "direction must match"
    http = pol("0.0.0.0/0", "0.0.0.0/0", prio=10, proto=6, dport=80)
    assert policy_lookup([wide, http], f, Dir.FWD) is http, "port selector matches"
    assert policy_lookup([http], Flow.of("10.1.0.2", "10.2.0.2", 17, 1, 80), Dir.FWD) is None
    older, newer = pol("10.1.0.0/24", "0.0.0.0/0", prio=5), pol("0.0.0.0/0", "10.2.0.0/24", prio=5)
    # dump order is newest first: the older policy is listed last, and wins the tie
    assert policy_lookup([newer, older], f, Dir.FWD) is older, "equal priority: older wins"
    marked = dataclasses.replace(pol("0.0.0.0/0", "0.0.0.0/0", prio=0), mark=Mark(1, 1))
    assert policy_lookup([marked], f, Dir.FWD) is None, "mark must match"
    assert policy_lookup([marked], dataclasses.replace(f, mark=3), Dir.FWD) is marked
    sub = dataclasses.replace(pol("0.0.0.0/0", "0.0.0.0/0", prio=1000), ptype=1)
    assert policy_lookup([narrow, sub], f, Dir.FWD) is sub, "sub policies are looked up first"
    icmp = pol("0.0.0.0/0", "0.0.0.0/0", proto=1, sport=8)
    assert policy_lookup([icmp], Flow.of("1.1.1.1", "2.2.2.2", 1, 8, 0), Dir.FWD) is icmp
    d = policy_decision([], DefaultPolicy(forward=DefaultAction.BLOCK), f, Dir.FWD)
    assert not d.allowed and "default block" in d.reason, f"default policy applies: {d}"
    assert not policy_decision([narrow], DefaultPolicy(), f, Dir.FWD).allowed, "block action"


def test_resolve_sa_by_template() -> None:
    t = Template(dst=IP(GW2), src=IP(GW1), reqid=7)
    p = Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.OUT, templates=(t,))
    a = chacha_sa(0x1, current=LifetimeCur(add_time=100))
    b = chacha_sa(0x2, current=LifetimeCur(add_time=200))
    other = chacha_sa(0x3, reqid=8)
    assert resolve_sa(p, [a, b, other]) is b, "newest SA of the template's reqid"
    assert resolve_sa(p, [other]) is None, "reqid must match"


# -- host kernel: policies, default policy, flush, monitor, acquire ---------------------------
def _ip_policies(bed: Testbed) -> str:
    return ipx(bed, "policy")


def test_policies_agree_with_iproute2(bed: Testbed) -> None:
    with XfrmSocket(bed.ns("gw1")) as x:
        t = Template(dst=IP(GW2), src=IP(GW1), reqid=7)
        p_out = Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.OUT, 100, templates=(t,))
        p_fwd = Policy(Selector.of("10.2.0.0/24", "10.1.0.0/24", proto=6, dport=80), Dir.FWD, 50)
        x.add_policy(p_out)
        x.add_policy(dataclasses.replace(p_fwd, action=Action.BLOCK))
        text = _ip_policies(bed)
        assert re.search(r"src 10.1.0.0/24 dst 10.2.0.0/24 \n\s+dir out priority 100", text), text
        assert re.search(
            r"tmpl src 192.0.2.1 dst 192.0.2.2\n\s+proto esp reqid 7 mode tunnel", text
        )
        assert re.search(r"proto tcp dport 80 \n\s+dir fwd action block priority 50", text), text
        with pytest.raises(NetlinkError) as ei:
            x.add_policy(p_out)
        assert ei.value.errno == errno.EEXIST, f"add twice: {ei.value}"
        # iproute2 writes, we read
        ipx(bed, "policy", "add", "src", "10.3.0.0/16", "dst", "10.4.0.0/16", "dir", "in",
            "priority", "7", "mark", "0x5", "mask", "0xff", "tmpl", "src", GW2, "dst", GW1,
            "proto", "esp", "reqid", "9", "mode", "tunnel", "level", "use")  # fmt: skip
        ps = {(p.dir, str(p.selector.src)): p for p in x.policies()}
        assert len(ps) == 3, f"three policies: {ps}"
        pin = ps[(Dir.IN, "10.3.0.0/16")]
        assert pin.priority == 7 and pin.mark == Mark(5, 0xFF), f"in policy: {pin}"
        (tin,) = pin.templates
        assert (tin.reqid, tin.optional, str(tin.src), str(tin.dst)) == (9, True, GW2, GW1), tin
        got_out = ps[(Dir.OUT, "10.1.0.0/24")]
        assert got_out.templates == (t,) and got_out.priority == 100, f"out policy: {got_out}"
        # update, delete by object, delete by selector, flush
        x.update_policy(dataclasses.replace(p_out, priority=99))
        assert "dir out priority 99" in _ip_policies(bed), "UPDPOLICY replaced the priority"
        x.delete_policy(pin)
        x.delete_policy(dir=Dir.FWD, selector=p_fwd.selector)
        assert [p.dir for p in x.policies()] == [Dir.OUT], "two deleted"
        x.flush_policy()
        assert x.policies() == [] and _ip_policies(bed).strip() == "", "flushed"


IP_XFRM_POLICY = 17  # include/uapi/linux/in.h


def _socket_bypass_policy(direction: int) -> bytes:
    """struct xfrm_userpolicy_info for setsockopt(IP_XFRM_POLICY): allow, no templates (what an
    IKE daemon puts on its own sockets). Selector family AF_INET at offset 40; 168 bytes."""
    sel = bytearray(56)
    struct.pack_into("=H", sel, 40, 2)
    lft = struct.pack("=8Q", *([(1 << 64) - 1] * 4), 0, 0, 0, 0)
    cur = bytes(32)
    tail = struct.pack("=IIBBBB", 0, 0, direction, 0, 0, 0)
    return bytes(sel) + lft + cur + tail + bytes(4)


def test_socket_policies_are_not_forwarding_policies(bed: Testbed) -> None:
    """strongSwan bypasses IPsec on its IKE sockets with socket policies; policy dumps carry
    them with dir 3/4 (XFRM_POLICY_MAX + dir). They never apply to forwarded traffic."""
    import socket

    from controller.netns import in_netns

    with in_netns(bed.ns("gw1")):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for direction in (0, 1):
            s.setsockopt(socket.IPPROTO_IP, IP_XFRM_POLICY, _socket_bypass_policy(direction))
        text = _ip_policies(bed)
        assert "socket in" in text and "socket out" in text, f"the kernel lists them: {text}"
        with XfrmSocket(bed.ns("gw1")) as x:
            fwd = Policy(Selector.of("10.2.0.0/24", "10.1.0.0/24"), Dir.FWD, 10)
            x.add_policy(fwd)
            assert [p.dir for p in x.policies()] == [Dir.FWD], "only the forwarding policy"
            x.flush_policy()
    finally:
        s.close()


def test_default_policy_both_ways(bed: Testbed) -> None:
    with XfrmSocket(bed.ns("gw1")) as x:
        assert x.get_default_policy() == DefaultPolicy(), "fresh namespace accepts"
        x.set_default_policy(forward=DefaultAction.BLOCK)
        text = ipx(bed, "policy", "getdefault")
        assert re.search(r"fwd: block", text) and re.search(r"in:\s+accept", text), text
        ipx(bed, "policy", "setdefault", "out", "block")
        got = x.get_default_policy()
        assert got == DefaultPolicy(
            DefaultAction.ACCEPT, DefaultAction.BLOCK, DefaultAction.BLOCK
        ), f"read back {got}"
        x.set_default_policy(DefaultAction.ACCEPT, DefaultAction.ACCEPT, DefaultAction.ACCEPT)
        assert x.get_default_policy() == DefaultPolicy(), "restored"


def test_get_sa_missing_and_bad_algorithm_errors(bed: Testbed) -> None:
    with XfrmSocket(bed.ns("gw1")) as x:
        assert x.get_sa(GW2, 0x1234) is None, "absent SA is None"
        bogus = chacha_sa(aead=Algorithm("aead", "rfc9999esp(nope)", 288, Secret(KEY), 128))
        with pytest.raises(NetlinkError) as ei:
            x.add_sa(bogus)
        assert "algorithm not found" in str(ei.value).lower(), f"kernel said why: {ei.value}"
        assert ei.value.kernel_message, "extended ack message kept"


def _drain_until(mon, pred, timeout=3.0):
    seen = []
    for ev in mon.events(timeout):
        seen.append(ev)
        if pred(ev):
            return ev, seen
    raise AssertionError(f"no matching event within {timeout} s; saw {seen}")


def test_policy_monitor_events_and_latency(bed: Testbed, capsys) -> None:
    lat: dict[str, float] = {}
    with XfrmSocket(bed.ns("gw1")) as x, x.monitor() as mon:
        p = Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.FWD, 10)
        t0 = time.monotonic_ns()
        x.add_policy(p)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, PolicyAdded))
        lat["policy add (API)"] = (ev.ts_ns - t0) / 1e6
        assert ev.policy.selector == p.selector and ev.policy.priority == 10, f"{ev}"
        x.update_policy(dataclasses.replace(p, priority=11))
        ev, _ = _drain_until(mon, lambda e: isinstance(e, PolicyUpdated))
        assert ev.policy.priority == 11, f"{ev}"
        t0 = time.monotonic_ns()
        ipx(bed, "policy", "delete", "src", "10.1.0.0/24", "dst", "10.2.0.0/24", "dir", "fwd")
        ev, _ = _drain_until(mon, lambda e: isinstance(e, PolicyDeleted))
        lat["policy delete (ip xfrm, incl. exec)"] = (ev.ts_ns - t0) / 1e6
        assert ev.dir == Dir.FWD and ev.policy is not None and ev.policy.priority == 11, f"{ev}"
        x.add_policy(p)
        x.flush_policy()
        ev, _ = _drain_until(mon, lambda e: isinstance(e, Flushed))
        assert ev.what == "policy", f"{ev}"
        x.set_default_policy(forward=DefaultAction.BLOCK)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, DefaultPolicyChanged))
        assert ev.default.forward == DefaultAction.BLOCK, f"{ev}"
        assert mon.stats["malformed"] == 0, f"{mon.stats}"
    with capsys.disabled():
        for k, v in lat.items():
            print(f"\n[latency] xfrm {k}: {v:.2f} ms")
    assert all(v < 100 for v in lat.values()), f"events within 100 ms: {lat}"


def test_policy_lifetime_expires_soft_then_hard(bed: Testbed) -> None:
    """Policy lifetimes run without ESP: the kernel sends POLEXPIRE soft, then hard (and deletes
    the policy, xfrm_policy_timer(), net/xfrm/xfrm_policy.c).

    The timer first fires a second after the insert and compares whole seconds of wall-clock
    time (add_time), so it may see up to two seconds gone: a hard limit only one second after
    the soft one would sometimes expire at that first run, with no soft warning before it."""
    life = LifetimeCfg(soft_add_expires_seconds=1, hard_add_expires_seconds=3)
    with XfrmSocket(bed.ns("gw1")) as x, x.monitor() as mon:
        x.add_policy(dataclasses.replace(pol("10.1.0.0/24", "10.2.0.0/24"), lifetime=life))
        (p,) = x.policies()
        assert x.get_policy(p.index, Dir.FWD) == p, "GETPOLICY by index"
        assert x.get_policy(0, Dir.FWD, p.selector) == p, "GETPOLICY by selector"
        ev, _ = _drain_until(mon, lambda e: isinstance(e, PolicyExpired), 5.0)
        assert not ev.hard and ev.policy.index == p.index, f"soft first: {ev}"
        ev, _ = _drain_until(mon, lambda e: isinstance(e, PolicyExpired) and e.hard, 6.0)
        assert x.policies() == [] and x.get_policy(p.index, Dir.FWD) is None, "hard deletes"


def test_acquire_event_and_larval_sa(bed: Testbed) -> None:
    """An OUT policy whose template has no SA makes the kernel ask for one (XFRM_MSG_ACQUIRE)
    and hold a larval SA (spi 0), which the SA dump shows: this works without ESP."""
    with XfrmSocket(bed.ns("gw1")) as x, x.monitor() as mon:
        t = Template(dst=IP(GW2), src=IP(GW1), reqid=7)
        x.add_policy(Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.OUT, templates=(t,)))
        bed.cmd("gw1", ["ping", "-c1", "-W1", "-I", "10.1.0.1", "10.2.0.2"], check=False)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, Acquire))
        assert (str(ev.dst), str(ev.src), ev.proto) == (GW2, GW1, 50), f"{ev}"
        sel = ev.selector
        assert (sel.proto, sel.sport, str(sel.dst)) == (1, 8, "10.2.0.2/32"), f"ICMP echo: {sel}"
        (larval,) = x.sas()
        assert (larval.spi, larval.reqid, str(larval.dst)) == (0, 7, GW2), f"larval {larval}"
        assert larval.fastpath_support()[0] is False, "a larval SA has no algorithm"


@pytest.mark.parametrize("kind", ["inexact", "exact", "mixed", "priority"])
@pytest.mark.parametrize("block_first", [True, False])
def test_policy_lookup_agrees_with_kernel_forwarding(
    bed: Testbed, kind: str, block_first: bool
) -> None:
    """Two overlapping FWD policies, one allow, one block: whether the kernel forwards a ping
    is the kernel's choice; policy_decision() on the dumped policies must make the same one."""
    with XfrmSocket(bed.ns("gw1")) as x:
        x.add_policy(pol("10.2.0.0/24", "10.1.0.0/24"))  # replies
        if kind == "inexact":
            a = pol("10.1.0.0/24", "10.2.0.0/24", prio=10, act=Action.BLOCK)
            b = pol("10.1.0.2/32", "0.0.0.0/0", prio=10)
        elif kind == "exact":
            a = pol("10.1.0.2/32", "10.2.0.2/32", prio=10, act=Action.BLOCK, proto=1)
            b = pol("10.1.0.2/32", "10.2.0.2/32", prio=10)
        elif kind == "mixed":
            a = pol("10.1.0.2/32", "10.2.0.2/32", prio=10, act=Action.BLOCK)
            b = pol("10.1.0.0/24", "10.2.0.0/24", prio=10)
        else:  # lower value wins whatever the order
            a = pol("10.1.0.0/24", "10.2.0.0/24", prio=20, act=Action.BLOCK)
            b = pol("10.1.0.0/16", "10.2.0.0/16", prio=5)
        for p in (a, b) if block_first else (b, a):
            x.add_policy(p)
        flow = Flow.of("10.1.0.2", "10.2.0.2", 1, 8, 0)
        want = policy_decision(x.policies(), x.get_default_policy(), flow, Dir.FWD)
        got = bed.ping("lan", bed.addr("REMOTE_HOST"), timeout=1.0)
        assert got == want.allowed, f"{kind} block_first={block_first}: kernel {got}, us {want}"


# -- real kernel with ESP (VM) -----------------------------------------------------------------
def _ip_state(bed: Testbed) -> str:
    return bed.ip("gw1", "-s", "xfrm", "state").stdout


@pytest.mark.vm
def test_ip_added_aead_sa_reads_back_identically(bed: Testbed) -> None:
    ipx(bed, "state", "add", "src", GW1, "dst", GW2, "proto", "esp", "spi", "0x1001",
        "reqid", "7", "mode", "tunnel", "replay-window", "64", "aead", FASTPATH_AEAD,
        "0x" + KEY_HEX, "128", "sel", "src", "10.1.0.0/24", "dst", "10.2.0.0/24")  # fmt: skip
    with XfrmSocket(bed.ns("gw1")) as x:
        sa = x.get_sa(GW2, 0x1001)
        assert sa is not None, "GETSA by id"
        assert (sa.src, sa.dst, sa.spi, sa.reqid, sa.mode) == (
            IP(GW1),
            IP(GW2),
            0x1001,
            7,
            Mode.TUNNEL,
        ), f"{sa}"
        assert (sa.alg_name, sa.key_bits, sa.icv_bits) == (FASTPATH_AEAD, 288, 128), f"{sa}"
        assert sa.key == KEY and sa.salt.reveal() == KEY[32:], "key and salt read back"
        assert sa.replay_window == 64 and not sa.esn, f"window {sa.replay_window}"
        assert str(sa.selector.src) == "10.1.0.0/24" and str(sa.selector.dst) == "10.2.0.0/24"
        assert sa.fastpath_support() == (True, "ok"), sa.fastpath_support()
        assert x.sas() == [sa], "the dump holds the same SA"


@pytest.mark.vm
def test_api_added_sa_is_what_ip_shows(bed: Testbed) -> None:
    sa = chacha_sa(
        0x2002,
        replay_window=128,
        flags=m.XFRM_STATE_ESN,
        lifetime=LifetimeCfg(soft_byte_limit=1000000, hard_packet_limit=5000),
    )
    with XfrmSocket(bed.ns("gw1")) as x:
        x.add_sa(sa)
        text = _ip_state(bed)
        # `ip -s` decorates numbers: "spi 0x00002002(8194) reqid 7(0x00000007)", "(288 bits)"
        head = r"proto esp spi 0x00002002(\(8194\))? reqid 7(\(0x0+7\))? mode tunnel"
        assert re.search(head, text), text
        aead = re.escape(f"aead {FASTPATH_AEAD} 0x{KEY_HEX}") + r"( \(288 bits\))? 128"
        assert re.search(aead, text), text
        # with ESN the window lives in XFRMA_REPLAY_ESN_VAL; usersa_info.replay_window is 0
        assert "flag esn" in text and "anti-replay esn context" in text, text
        assert "replay_window 128" in text, text
        assert re.search(r"soft 1000000\(bytes\)", text) and "hard 5000(packets)" in text, text
        assert "sel src 10.1.0.0/24 dst 10.2.0.0/24" in text, text
        back = x.get_sa(GW2, 0x2002)
        assert back is not None and back.esn and back.replay_window == 128, f"{back}"
        assert back.key == KEY and back.lifetime == sa.lifetime, f"{back}"
        with pytest.raises(NetlinkError) as ei:
            x.add_sa(sa)
        assert ei.value.errno == errno.EEXIST, f"{ei.value}"
        x.update_sa(dataclasses.replace(sa, lifetime=LifetimeCfg(soft_byte_limit=7)))
        assert "soft 7(bytes)" in _ip_state(bed), "UPDSA replaced lifetimes"
        x.delete_sa(sa)
        assert x.get_sa(GW2, 0x2002) is None and _ip_state(bed).strip() == "", "deleted"


@pytest.mark.vm
@pytest.mark.parametrize("esn", [False, True])
def test_new_ae_moves_kernel_sequence_and_counters(bed: Testbed, esn: bool) -> None:
    sa = chacha_sa(0x3003, flags=m.XFRM_STATE_ESN if esn else 0, replay_window=64)
    with XfrmSocket(bed.ns("gw1")) as x:
        x.add_sa(sa)
        before = x.get_ae(sa)
        assert before.replay is not None and before.replay.oseq == 0, f"fresh: {before}"
        assert before.replay.esn is esn, f"ESN state kind: {before}"
        target = (5 << 32) + 1000 if esn else 1000
        x.set_oseq(sa, target)
        x.new_ae(sa, lifetime_cur=LifetimeCur(bytes=12345, packets=67, add_time=0, use_time=0))
        after = x.get_ae(sa)
        assert after.replay is not None and after.replay.oseq64 == target, f"{after}"
        assert after.current is not None and (after.current.bytes, after.current.packets) == (
            12345,
            67,
        ), f"{after}"
        text = _ip_state(bed)
        if esn:
            assert "oseq-hi 0x5, oseq 0x3e8" in text, text
        else:
            assert "oseq 0x3e8" in text, text
        assert re.search(r"12345\(bytes\), 67\(packets\)", text), text
        with pytest.raises(ValueError):
            x.set_oseq(sa, 10)  # never backwards
        # Inbound hand-back: the window moves up to what the fastpath accepted, all seen.
        top = (3 << 32) + 77 if esn else 77
        r = x.set_replay_top(sa, top).seq64
        got = x.get_ae(sa).replay
        assert got is not None and got.seq64 == top == r, f"window top moved: {got}"
        assert (got.bmp and all(w == 0xFFFFFFFF for w in got.bmp)) or got.bitmap == 0xFFFFFFFF
        assert x.set_replay_top(sa, 5).seq64 == top, "never backwards"
        assert x.get_ae(sa).replay.oseq64 == target, "the outbound sequence is untouched"


@pytest.mark.vm
def test_sa_events_expire_and_latency(bed: Testbed, capsys) -> None:
    lat: dict[str, float] = {}
    with XfrmSocket(bed.ns("gw1")) as x, x.monitor() as mon:
        sa = chacha_sa(0x4004)
        t0 = time.monotonic_ns()
        x.add_sa(sa)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaAdded))
        lat["sa add (API)"] = (ev.ts_ns - t0) / 1e6
        assert ev.sa.spi == 0x4004 and ev.sa.key == KEY and KEY_HEX not in repr(ev), f"{ev!r}"
        x.update_sa(dataclasses.replace(sa, lifetime=LifetimeCfg(soft_byte_limit=7)))
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaUpdated))
        assert ev.sa.lifetime.soft_byte_limit == 7, f"{ev}"
        # an expire the controller sends itself: soft keeps the SA, hard deletes it
        x.send_expire(sa, hard=False)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaExpired))
        assert not ev.hard and ev.sa.spi == 0x4004, f"{ev}"
        assert x.get_sa(GW2, 0x4004) is not None, "soft expire keeps the SA"
        # A hard expire deletes the SA without a DELSA notification (xfrm_add_sa_expire() and
        # xfrm_timer_handler() call __xfrm_state_delete(), not km_state_notify()): the hard
        # SaExpired event is the deletion.
        t0 = time.monotonic_ns()
        x.send_expire(sa, hard=True)
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaExpired) and e.hard)
        lat["hard expire (API)"] = (ev.ts_ns - t0) / 1e6
        assert x.get_sa(GW2, 0x4004) is None, "hard expire deletes"
        # the kernel's own lifetime timer: soft after 1 s, hard after 2 s
        life = LifetimeCfg(soft_add_expires_seconds=1, hard_add_expires_seconds=2)
        t0 = time.monotonic_ns()
        x.add_sa(chacha_sa(0x4005, lifetime=life))
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaExpired) and not e.hard, 5.0)
        lat["soft add-expire 1 s, past deadline (kernel timer)"] = (ev.ts_ns - t0) / 1e6 - 1000
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaExpired) and e.hard, 5.0)
        lat["hard add-expire 2 s, past deadline (kernel timer)"] = (ev.ts_ns - t0) / 1e6 - 2000
        assert ev.sa.spi == 0x4005 and x.get_sa(GW2, 0x4005) is None, f"{ev}"
        # deleting through netlink does notify
        x.add_sa(chacha_sa(0x4007))
        t0 = time.monotonic_ns()
        x.delete_sa(chacha_sa(0x4007))
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaDeleted))
        lat["sa delete (API)"] = (ev.ts_ns - t0) / 1e6
        assert ev.sa_id.spi == 0x4007 and ev.sa is not None and ev.sa.key == KEY, f"{ev}"
        x.add_sa(chacha_sa(0x4006))
        t0 = time.monotonic_ns()
        ipx(bed, "state", "flush")
        ev, _ = _drain_until(mon, lambda e: isinstance(e, Flushed))
        lat["sa flush (ip xfrm, incl. exec)"] = (ev.ts_ns - t0) / 1e6
        assert ev.what == "sa", f"{ev}"
        assert mon.stats["malformed"] == 0, f"{mon.stats}"
    with capsys.disabled():
        for k, v in lat.items():
            print(f"\n[latency] xfrm {k}: {v:.2f} ms")


@pytest.mark.vm
def test_soft_use_expire_after_traffic(bed: Testbed) -> None:
    """soft-use-expires counts from the SA's first use: an out SA used by a forwarded ping
    soft-expires about one second later (xfrm_timer_handler(), net/xfrm/xfrm_state.c)."""
    p = bed.plan
    with XfrmSocket(bed.ns("gw1")) as x, x.monitor() as mon:
        life = LifetimeCfg(soft_use_expires_seconds=1, hard_use_expires_seconds=30)
        x.add_sa(chacha_sa(0x5005, lifetime=life))
        t = Template(dst=IP(GW2), src=IP(GW1), reqid=7)
        x.add_policy(Policy(Selector.of(p["LAN_NET"], p["REMOTE_NET"]), Dir.OUT, templates=(t,)))
        assert x.sas()[0].current.use_time == 0, "unused so far"
        bed.ping("lan", p["REMOTE_HOST"], timeout=1.0)  # gw2 has no SA: only gw1's use matters
        used = x.get_sa(GW2, 0x5005)
        assert used is not None and used.current.packets >= 1, f"the SA was used: {used}"
        ev, _ = _drain_until(mon, lambda e: isinstance(e, SaExpired), 5.0)
        assert not ev.hard and ev.sa.spi == 0x5005, f"{ev}"
