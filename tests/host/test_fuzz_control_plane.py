# SPDX-License-Identifier: GPL-2.0-only
"""Control-plane fuzzing that needs no kernel ESP (the real-kernel part, with SAs and traffic
on the fastpath, is tests/vm/test_vm_faults.py):

- the pure flow state (controller/core/state.py) against a naive reference model, many random steps;
- random configuration files: each is a Config or a ConfigError that names the file and the
  bad key, never another exception;
- a running controller on the host test bed under a random churn of real netlink traffic from
  this kernel: XFRM policies of every kind (IPv6, sub-type, marks, if_id, AH and IPComp
  templates, lifetimes that expire, block), default policies, larval SAs (ALLOCSPI) and
  ACQUIREs from traffic that needs an SA, routes of every type, rules, neighbours, links
  created, renamed, flapped and deleted, addresses, nftables tables. After every step the
  controller is alive, has handled the step's events and published status since, holds no
  flow (there is no SA to offload to), its counters never went backwards and its log has no
  traceback; at the end SIGTERM still detaches everything.

Reproduce: `.venv/bin/pytest -q tests/host/test_fuzz_control_plane.py -s` (XFP_CP_HOST_SEED and
XFP_CP_HOST_STEPS change the seed and the number of churn steps).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from controller.agent.daemon import TICK_S
from controller.config import SCHEMA, Config, ConfigError, parse_config
from controller.core.state import Cause, Direction, FlowKey, FlowRecord, FlowState, SaRef
from controller.paths import status_path
from testbed.bed import Testbed

SEED = int(os.environ.get("XFP_CP_HOST_SEED", "20261203"))
CHURN_STEPS = int(os.environ.get("XFP_CP_HOST_STEPS", "150"))
STATE_STEPS = 20_000
CONFIG_CASES = 5_000


# -- 1. the pure state against a reference model -------------------------------------------------
def _record(rng: random.Random) -> FlowRecord:
    d = rng.choice(list(Direction))
    key = FlowKey(
        rng.choice((2, 3)),
        d,
        f"10.1.0.{rng.randrange(1, 5)}",
        f"10.2.0.{rng.randrange(1, 5)}",
        rng.choice((1, 6, 17)),
        rng.randrange(4),
        rng.randrange(3),
    )
    return FlowRecord(
        key,
        SaRef("192.0.2.2", 0x2000 + rng.randrange(6), reqid=rng.randrange(3)),
        egress_ifindex=rng.choice((2, 3, 4)),
        src_mac="02:00:00:00:00:01",
        dst_mac="02:00:00:00:00:02",
        policy_index=rng.randrange(5),
        neighbour=(rng.choice((2, 3)), f"192.0.2.{rng.randrange(3)}"),
        last_active_ns=rng.randrange(1, 10**6),
    )


def test_flow_state_agrees_with_a_reference_model() -> None:
    """Every query of FlowState, after every one of many random adds, replacements and
    removals by each fact, equals a brute-force scan of a plain dict; the indexes never name
    a removed flow; the invalidation counters only grow, by exactly what was removed."""
    rng = random.Random(SEED)
    st = FlowState(capacity=40)
    ref: dict[FlowKey, FlowRecord] = {}
    counts: Counter[Cause] = Counter()
    ops: Counter[str] = Counter()
    for step in range(STATE_STEPS):
        op = rng.choices(
            ("add", "sa", "spi", "policy", "neigh", "link", "idle", "keys"),
            weights=(10, 1, 1, 1, 1, 1, 1, 1),
        )[0]
        ops[op] += 1
        if op == "add":
            rec = _record(rng)
            old = st.add(rec)
            assert old is ref.get(rec.key), f"step {step}: add returns the replaced record"
            ref[rec.key] = rec
            continue
        probe = _record(rng)
        want: set[FlowKey]
        if op == "sa":
            got, want = st.flows_of_sa(probe.sa), {k for k, r in ref.items() if r.sa == probe.sa}
        elif op == "spi":
            got = st.flows_of_spi(probe.sa.spi)
            want = {k for k, r in ref.items() if r.sa.spi == probe.sa.spi}
        elif op == "policy":
            got = st.flows_of_policy(probe.policy_index)
            want = {k for k, r in ref.items() if r.policy_index == probe.policy_index}
        elif op == "neigh":
            got = st.flows_of_neigh(*probe.neighbour)
            want = {k for k, r in ref.items() if r.neighbour == probe.neighbour}
        elif op == "link":
            i = probe.egress_ifindex
            got = st.flows_of_link(i)
            want = {k for k, r in ref.items() if i in (k.ifindex, r.egress_ifindex)}
        elif op == "idle":
            limit = rng.randrange(1, 10**6)
            got = st.idle(limit, 0.0)
            want = {k for k, r in ref.items() if r.last_active_ns < limit}
        else:  # some flows by key, present or not
            got = set(rng.sample(sorted(ref), min(len(ref), 3))) | {probe.key}
            want = got & set(ref)
            got = want
        assert got == want, f"step {step}: {op} query answered {got}, model says {want}"
        assert st.sas_in_use() == {r.sa for r in ref.values()}, f"step {step}: SAs in use"
        if rng.random() < 0.7:
            cause = rng.choice(list(Cause))
            removed = st.remove(got, cause)
            assert {r.key for r in removed} == want & set(ref), f"step {step}: removed"
            for k in want:
                ref.pop(k, None)
            counts[cause] += len(removed)
        st.check_invariants()
        assert set(st.flows) == set(ref) and len(st) == len(ref), f"step {step}: flow table"
        assert st.invalidations == +counts, f"step {step}: counters {st.invalidations}"
        assert st.full() == (len(ref) >= 40), f"step {step}: full() at capacity"
    print(f"\nflow state: {STATE_STEPS} steps (seed {SEED}) {dict(ops)}, 0 disagreements")


# -- 2. configuration files ----------------------------------------------------------------------
def _toml_value(rng: random.Random) -> str:
    return rng.choice(
        (
            str(rng.randrange(-10, 10)),
            str(rng.choice((0, 1, 15, 16, 2, 1 << 20, 1 << 24, (1 << 24) + 1, 1 << 70))),
            repr(rng.choice((0.0, 0.5, 0.1, 3.25, 1e9))),
            rng.choice(("nan", "inf", "-inf", "true", "false")),
            json.dumps(
                rng.choice(
                    (
                        "",
                        "lan",
                        "wan",
                        "x" * 16,
                        "a/b",
                        "a b",
                        "auto",
                        "native",
                        "generic",
                        "debug",
                        "loud",
                        "127.0.0.1:9478",
                        "h:0",
                        "[::1]:9100",
                        ":80",
                        "h:",
                        "é",
                        "h:65536",
                    )
                )
            ),
            json.dumps(rng.sample(("lan", "wan", "eth0", "eth1", "x" * 16, "a/b", ""), 2)),
            "[]",
            "[1, 2]",
            '["lan", "lan"]',
            "{ a = 1 }",
            "1979-05-27T07:32:00Z",
        )
    )


def _random_config(rng: random.Random) -> tuple[str, set[str]]:
    """A TOML document of random keys (known and not) and values; the keys it sets."""
    keys = list(SCHEMA)
    chosen = rng.sample(keys, rng.randrange(0, 4))
    if rng.random() < 0.2:
        chosen.append((rng.choice(("tables", "timers", "bogus")), rng.choice(("flow", "x"))))
    by_section: dict[str, list[str]] = {}
    for section, key in chosen:
        by_section.setdefault(section, []).append(f"{key} = {_toml_value(rng)}")
    text = "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in by_section.items())
    if rng.random() < 0.15:  # byte-level damage too
        raw = bytearray(text.encode())
        for _ in range(rng.randrange(1, 4)):
            if raw:
                raw[rng.randrange(len(raw))] = rng.randrange(256)
        text = raw.decode("utf-8", "replace")
    return text, {f"{s}.{k}" for s, k in chosen}


def test_random_config_files_are_accepted_or_refused_clearly() -> None:
    rng = random.Random(SEED)
    accepted = refused = 0
    for case in range(CONFIG_CASES):
        text, keys = _random_config(rng)
        try:
            cfg = parse_config(text, source="gw.toml")
        except ConfigError as e:
            refused += 1
            msg = str(e)
            assert msg.startswith("gw.toml: "), f"case {case}: names the file: {msg}\n{text}"
            named = any(k in msg for k in keys) or any(
                w in msg
                for w in ("not valid TOML", "must be a table", "both lan and wan", "unknown key")
            )
            assert named, f"case {case}: says which key or what is wrong: {msg}\n{text}"
        except Exception as e:  # anything else is a crash the operator would see
            raise AssertionError(f"case {case}: {type(e).__name__}: {e}\n{text}") from e
        else:
            accepted += 1
            assert isinstance(cfg, Config), f"case {case}: a Config"
            assert 16 <= cfg.flow_table_size <= 1 << 24, f"case {case}: range enforced"
            assert 0.5 <= cfg.watchdog <= 3600, f"case {case}: range enforced ({cfg.watchdog})"
            assert not set(cfg.lan) & set(cfg.wan), f"case {case}: lan and wan disjoint"
    assert accepted and refused, f"both outcomes reached: {accepted} / {refused}"
    print(
        f"\nconfig files: {CONFIG_CASES} random (seed {SEED}): {accepted} accepted, "
        f"{refused} refused with the key named"
    )


# -- 3. a running controller under netlink churn -------------------------------------------------
# The controller as `xfrm-fastpath run` starts it (controller.agent.daemon.run), but with its maps
# pinned in a directory of this test's own: another controller on this host keeps its own.
LAUNCHER = r"""
import logging, signal, sys
from controller.config import load_config
from controller.agent.daemon import Daemon
from controller.paths import netns_run_dir
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
logging.getLogger("pyroute2").setLevel(logging.WARNING)
ctl = Daemon(load_config(sys.argv[1]), pin_dir=sys.argv[2], run_dir=netns_run_dir())
signal.signal(signal.SIGTERM, ctl.stop)
sys.exit(ctl.run())
"""


class Churn:
    """Random real changes inside gw1 (and traffic through it), one per step."""

    def __init__(self, bed: Testbed, rng: random.Random) -> None:
        self.bed, self.rng, self.p = bed, rng, bed.plan
        self.ops: Counter[str] = Counter()
        self.dummies: list[str] = []
        self.serial = 0

    def ip(self, *args: str) -> None:
        self.bed.ip("gw1", *args, check=False)

    def net(self) -> str:
        r = self.rng
        return str(
            ipaddress.ip_network(
                f"10.{r.randrange(256)}.{r.randrange(256)}.0/{r.choice((8, 16, 24, 32))}",
                strict=False,
            )
        )

    def tmpl(self) -> list[str]:
        r, p = self.rng, self.p
        proto = r.choice(("esp", "esp", "ah"))
        mode = r.choice(("tunnel", "transport"))
        t = ["tmpl", "proto", proto, "mode", mode, "reqid", str(r.randrange(4))]
        if mode == "tunnel":
            t[1:1] = ["src", p["GW1_WAN"], "dst", p["GW2_WAN"]]
        if r.random() < 0.2:
            t += ["level", "use"]
        return t

    # Each returns nothing; the checks after it are the same for all.
    def op_policy(self) -> None:
        r, p = self.rng, self.p
        verb = r.choice(("add", "update", "update", "delete"))
        d = r.choice(("in", "out", "fwd"))
        if r.random() < 0.5:
            src, dst = p["LAN_NET"], p["REMOTE_NET"]
            if d in ("in", "fwd"):
                src, dst = dst, src
        else:
            src, dst = self.net(), self.net()
        args = ["xfrm", "policy", verb, "src", src, "dst", dst, "dir", d]
        if r.random() < 0.3:
            args += ["proto", r.choice(("icmp", "udp", "tcp"))]
        if r.random() < 0.15:
            args += ["ptype", "sub"]
        if r.random() < 0.15:
            args += ["mark", str(r.randrange(1, 9)), "mask", "0xff"]
        if r.random() < 0.1:
            args += ["if_id", str(r.randrange(1, 9))]
        if verb != "delete":
            args += ["priority", str(r.randrange(0, 1 << 20))]
            if r.random() < 0.2:
                args += ["limit", "time-soft", "1", "time-hard", str(r.randrange(1, 3))]
            if r.random() < 0.25:
                args += ["action", "block"]
            else:
                args += self.tmpl()
        self.ip(*args)

    def op_policy6(self) -> None:
        self.ip(
            "xfrm",
            "policy",
            self.rng.choice(("update", "delete")),
            "src",
            "::/0",
            "dst",
            "2001:db8::/32",
            "dir",
            "out",
            "tmpl",
            "src",
            "2001:db8::1",
            "dst",
            "2001:db8::2",
            "proto",
            "esp",
            "mode",
            "tunnel",
        )

    def op_flush(self) -> None:
        self.ip("xfrm", self.rng.choice(("policy", "state")), "flush")

    def op_default(self) -> None:
        r = self.rng
        self.ip(
            "xfrm",
            "policy",
            "setdefault",
            r.choice(("in", "out", "fwd")),
            r.choice(("block", "accept")),
        )

    def op_larval_sa(self) -> None:
        """ALLOCSPI leaves a larval SA (no algorithm) in the kernel's table."""
        p = self.p
        self.ip(
            "xfrm",
            "state",
            "allocspi",
            "src",
            p["GW1_WAN"],
            "dst",
            p["GW2_WAN"],
            "proto",
            "esp",
            "mode",
            "tunnel",
            "reqid",
            str(self.rng.randrange(4)),
        )

    def op_acquire(self) -> None:
        """Traffic that an OUT policy wants protected by an SA that does not exist: the kernel
        sends XFRM_MSG_ACQUIRE (and the packets are dropped)."""
        p = self.p
        self.ip(
            "xfrm",
            "policy",
            "update",
            "src",
            p["LAN_NET"],
            "dst",
            p["REMOTE_NET"],
            "dir",
            "out",
            "tmpl",
            "src",
            p["GW1_WAN"],
            "dst",
            p["GW2_WAN"],
            "proto",
            "esp",
            "mode",
            "tunnel",
            "reqid",
            "7",
        )
        self.bed.ping("lan", p["REMOTE_HOST"], count=1, timeout=0.3)

    def op_traffic(self) -> None:
        src = self.rng.choice(("lan", "remote"))
        dst = self.rng.choice((self.p["REMOTE_HOST"], self.p["LAN_HOST"], self.p["GW1_LAN"]))
        self.bed.ping(src, dst, count=1, timeout=0.3)

    def op_route(self) -> None:
        r = self.rng
        kind = r.choice(("via", "blackhole", "unreachable", "prohibit", "table"))
        dst = self.net()
        if kind == "via":
            args = [dst, "via", self.p["GW2_WAN"], "dev", "wan"]
        elif kind == "table":
            args = [
                dst,
                "via",
                self.p["GW2_WAN"],
                "dev",
                "wan",
                "table",
                str(r.randrange(100, 103)),
            ]
        else:
            args = [kind, dst]
        self.ip("route", r.choice(("add", "replace", "del")), *args)

    def op_rule(self) -> None:
        r = self.rng
        self.ip(
            "rule",
            r.choice(("add", "del")),
            "from",
            self.net(),
            "table",
            str(r.randrange(100, 103)),
            "priority",
            str(r.randrange(1000, 1010)),
        )

    def op_neigh(self) -> None:
        r = self.rng
        dev = r.choice(("wan", "lan", *self.dummies))
        addr = f"{'192.0.2' if dev == 'wan' else '10.1.0'}.{r.randrange(3, 250)}"
        mac = "02:00:00:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))
        verb = r.choice(("add", "replace", "del"))
        args = ["neigh", verb, addr, "dev", dev]
        if verb != "del":
            args += ["lladdr", mac, "nud", r.choice(("permanent", "stale", "reachable", "noarp"))]
        self.ip(*args)

    def op_link(self) -> None:
        r = self.rng
        act = r.choice(("add", "add", "flap", "mtu", "rename", "del", "vlan", "addr"))
        if act == "add" or not self.dummies:
            self.serial += 1
            name = f"fz{self.serial}"
            kind = r.choice(("dummy", "bridge"))
            self.ip("link", "add", name, "type", kind)
            self.ip("link", "set", name, "up")
            self.dummies.append(name)
            return
        name = r.choice(self.dummies)
        if act == "flap":
            self.ip("link", "set", name, "down")
            self.ip("link", "set", name, "up")
        elif act == "mtu":
            self.ip("link", "set", name, "mtu", str(r.randrange(1280, 9000)))
        elif act == "rename":
            self.serial += 1
            new = f"fz{self.serial}"
            self.ip("link", "set", name, "down")
            self.ip("link", "set", name, "name", new)
            self.ip("link", "set", new, "up")
            self.dummies[self.dummies.index(name)] = new
        elif act == "vlan":
            self.serial += 1
            self.ip(
                "link",
                "add",
                "link",
                name,
                "name",
                f"fz{self.serial}",
                "type",
                "vlan",
                "id",
                str(r.randrange(1, 4000)),
            )
            self.dummies.append(f"fz{self.serial}")
        elif act == "addr":
            self.ip(
                "addr", r.choice(("add", "del")), f"172.16.{r.randrange(256)}.1/24", "dev", name
            )
        else:  # deleting a device deletes its VLANs too
            self.ip("link", "del", name)
            links = json.loads(self.bed.ip("gw1", "-j", "link", "show").stdout or "[]")
            self.dummies = [x["ifname"] for x in links if x["ifname"].startswith("fz")]

    def op_gw_link(self) -> None:
        """The controller's own devices: MTU changes and a flap of the LAN side."""
        r = self.rng
        if r.random() < 0.5:
            self.ip("link", "set", "lan", "mtu", str(r.choice((1400, 1500))))
        else:
            self.ip("link", "set", "lan", "down")
            self.ip("link", "set", "lan", "up")
            self.ip(
                "neigh",
                "replace",
                self.p["LAN_HOST"],
                "lladdr",
                self.bed.iface("lan", "eth0").mac,
                "dev",
                "lan",
                "nud",
                "permanent",
            )

    def op_nft(self) -> None:
        r = self.rng
        name = f"fz{r.randrange(3)}"
        script = r.choice(
            (
                f"table inet {name} {{ chain c {{ type filter hook forward priority 0; "
                f"udp dport {r.randrange(1, 65535)} drop; }} }}",
                f"delete table inet {name}",
                f"flush table inet {name}",
                f"table ip {name} {{ set s {{ type ipv4_addr; }} }}",
            )
        )
        self.bed.cmd("gw1", ["nft", "-f", "-"], input=script + "\n", check=False)

    OPS: dict[str, float] = {
        "policy": 6,
        "policy6": 1,
        "flush": 0.5,
        "default": 1,
        "larval_sa": 1,
        "acquire": 1,
        "traffic": 2,
        "route": 2,
        "rule": 1,
        "neigh": 2,
        "link": 2,
        "gw_link": 0.5,
        "nft": 1,
    }

    def step(self) -> str:
        names = list(self.OPS)
        name = self.rng.choices(names, weights=[self.OPS[n] for n in names])[0]
        self.ops[name] += 1
        getattr(self, f"op_{name}")()
        return name


def _counters(st: dict[str, Any]) -> dict[str, int]:
    m = st.get("metrics") or {}
    out = {f"kernel/{r['direction']}/{r['reason']}": r["packets"] for r in m.get("kernel", [])}
    out.update({f"drops/{r['direction']}/{r['reason']}": r["packets"] for r in m.get("drops", [])})
    out.update({f"rej/{k}": v for k, v in (m.get("validation_rejections") or {}).items()})
    out.update({f"inv/{k}": v for k, v in (m.get("invalidations") or {}).items()})
    out["learn_events"] = m.get("learn_events", 0)
    return out


def _published_after(
    proc: subprocess.Popen, read: Callable[[], dict[str, Any] | None], when: float
) -> dict[str, Any] | bool | None:
    """The status, once one taken after `when` is published; True if the process exited."""
    if proc.poll() is not None:
        return True
    st = read()
    return st if st is not None and st["metrics"].get("timestamp", 0) > when else None


def _wait(pred: Callable[[], Any], within: float, what: Callable[[], str]) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {within} s: {what()}")


@pytest.fixture
def controller(bed: Testbed, tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    pins = Path("/sys/fs/bpf") / f"xfp-cpfuzz-{os.getpid()}"
    cfg = tmp_path / "gw1.toml"
    cfg.write_text("[timers]\nwatchdog = 2\n")
    log = tmp_path / "controller.log"
    with log.open("w") as logf:
        proc = subprocess.Popen(
            [*bed.nsenter_argv("gw1"), sys.executable, "-c", LAUNCHER, str(cfg), str(pins)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
    try:
        yield proc, log, status_path(f"/run/netns/{bed.ns('gw1')}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(pins, ignore_errors=True)


def test_controller_survives_random_netlink_churn(
    bed: Testbed, controller: tuple[subprocess.Popen, Path, Path]
) -> None:
    proc, log, status = controller

    def read() -> dict[str, Any] | None:
        try:
            st = json.loads(status.read_text())
        except (OSError, ValueError):
            return None
        return st if st.get("pid") == proc.pid and st.get("metrics") else None

    _wait(lambda: proc.poll() is not None or read(), 300, lambda: log.read_text()[-2000:])
    assert proc.poll() is None, f"controller started: {log.read_text()[-3000:]}"
    churn = Churn(bed, random.Random(SEED))
    last = _counters(read() or {})
    events = 0
    t0 = time.monotonic()
    for i in range(CHURN_STEPS):
        before = time.time()
        name = churn.step()
        # The kernel queues a change's notifications before the command returns; a status
        # taken one loop (TICK_S) after that was taken after the controller read them.
        st = _wait(
            functools.partial(_published_after, proc, read, time.time() + TICK_S),
            20,
            functools.partial(str, f"step {i} ({name}): status published after the step"),
        )
        assert proc.poll() is None, (
            f"step {i} ({name}): controller exited\n{log.read_text()[-3000:]}"
        )
        assert st["flows"] == [], f"step {i} ({name}): no SA, so no flow: {st['flows']}"
        if (st["metrics"].get("last_netlink_event") or 0) >= before:
            events += 1
        now = _counters(st)
        back = {k: (v, now.get(k)) for k, v in last.items() if now.get(k, -1) < v}
        assert not back, f"step {i} ({name}): counters went backwards: {back}"
        last = now
    took = time.monotonic() - t0
    text = log.read_text()
    assert "Traceback" not in text, f"no exception in the log:\n{text[-4000:]}"
    assert events >= CHURN_STEPS // 4, f"the steps reached the controller: {events} handled"
    links = bed.ip("gw1", "-d", "link", "show", "lan").stdout
    assert "prog/xdp" in links, f"still attached after the churn: {links}"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
    assert rc == 0, f"SIGTERM exits 0 after the churn: {rc}\n{log.read_text()[-3000:]}"
    assert "prog/xdp" not in bed.ip("gw1", "-d", "link", "show").stdout, "XDP detached"
    print(
        f"\nnetlink churn: seed {SEED}, {CHURN_STEPS} steps in {took:.0f} s, {events} with "
        f"events seen by the controller, ops {dict(sorted(churn.ops.items()))}; controller "
        "alive, no traceback, counters monotonic, clean SIGTERM"
    )
