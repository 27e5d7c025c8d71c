# SPDX-License-Identifier: GPL-2.0-only
"""The test bed as code: four network namespaces joined by veth pairs.

    lan ──(eth0 | lan)── gw1 ──(wan | wan)── gw2 ──(lan | eth0)── remote

One definition serves the tests, the demo and the VM test bed; the addressing plan lives in
testbed/addresses.env, which vagrant/ provisioning reads too. Everything is created inside
namespaces that this module names and registers; nothing is ever added to the root namespace
(links are created with `ip -n NS link add ... peer ... netns NS2`, so they are born inside).
`Testbed.destroy()` removes all of it, and is safe to call after a partial build or twice.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADDRESSES_ENV = ROOT / "testbed" / "addresses.env"


class TestbedError(RuntimeError):
    """A test bed command failed; the message carries the command and its stderr."""


def load_addresses(path: Path = ADDRESSES_ENV) -> dict[str, str]:
    """Parse the shell-style KEY=VALUE addressing plan."""
    plan: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition("=")
        plan[key.strip()] = value.strip()
    return plan


def run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command, raising TestbedError with its stderr when it fails and check is set."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise TestbedError(f"{shlex.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


@dataclass(frozen=True)
class Link:
    """One veth pair: (namespace role, device) on each end."""

    a_role: str
    a_dev: str
    b_role: str
    b_dev: str


@dataclass(frozen=True)
class Iface:
    """An address on a device of a role, with a MAC pinned so neighbours can be pinned too."""

    role: str
    dev: str
    addr: str
    mac: str


ROLES = ("lan", "gw1", "gw2", "remote")
LINKS = (
    Link("lan", "eth0", "gw1", "lan"),
    Link("gw1", "wan", "gw2", "wan"),
    Link("gw2", "lan", "remote", "eth0"),
)


def _ifaces(plan: dict[str, str]) -> tuple[Iface, ...]:
    return (
        Iface("lan", "eth0", plan["LAN_HOST"], "02:00:0a:01:00:02"),
        Iface("gw1", "lan", plan["GW1_LAN"], "02:00:0a:01:00:01"),
        Iface("gw1", "wan", plan["GW1_WAN"], "02:00:c0:00:02:01"),
        Iface("gw2", "wan", plan["GW2_WAN"], "02:00:c0:00:02:02"),
        Iface("gw2", "lan", plan["GW2_LAN"], "02:00:0a:02:00:01"),
        Iface("remote", "eth0", plan["REMOTE_HOST"], "02:00:0a:02:00:02"),
    )


# ethtool names of NETIF_F_ALL_TSO (drivers/net/veth.c: veth_skb_is_eligible_for_gro());
# accecn exists on newer kernels only (set where the device has it).
NO_TSO = {
    f"tx_{name}_segmentation": False
    for name in ("tcp", "tcp_ecn", "tcp_mangleid", "tcp6", "tcp_accecn")
}
OPTIONAL_FEATURES = frozenset({"tx_tcp_accecn_segmentation"})


def set_features(netns: str, dev: str, **features: bool) -> None:
    """Set ethtool features of a device inside a namespace, by their ethtool names with "_"
    for "-" (e.g. rx_gro=True, tx_checksum_ip_generic=False)."""
    from pyroute2.ethtool import Ethtool

    from controller.netns import in_netns

    with in_netns(netns):
        e = Ethtool()
        try:
            f = e.get_features(dev)
            for name, on in features.items():
                ethtool_name = name.replace("_", "-")
                if ethtool_name not in f.features and name in OPTIONAL_FEATURES:
                    continue
                f.features[ethtool_name].enable = on
            e.set_features(dev, f)
        finally:
            e.close()


@dataclass
class Testbed:
    """The four-namespace topology. `prefix` keeps concurrent test beds apart.

    With prefix "" the namespaces are named exactly lan, gw1, gw2, remote (the demo); tests use
    a unique prefix so that two runs on one machine never collide.
    """

    __test__ = False  # not a pytest class, despite its name

    prefix: str = ""
    plan: dict[str, str] = field(default_factory=load_addresses)
    queues: int = 1  # RX and TX queues of every veth (bench/e2e.py: one per CPU)
    created: list[str] = field(default_factory=list)

    # -- names ------------------------------------------------------------------------------
    def ns(self, role: str) -> str:
        """The network namespace name of a role (lan, gw1, gw2, remote)."""
        if role not in ROLES:
            raise KeyError(f"unknown test bed role {role!r}")
        return f"{self.prefix}{role}"

    @property
    def ifaces(self) -> tuple[Iface, ...]:
        return _ifaces(self.plan)

    def iface(self, role: str, dev: str) -> Iface:
        for i in self.ifaces:
            if i.role == role and i.dev == dev:
                return i
        raise KeyError(f"{role}:{dev}")

    def addr(self, key: str) -> str:
        """An address from the plan, e.g. addr('REMOTE_HOST')."""
        return self.plan[key]

    # -- commands inside a namespace -------------------------------------------------------------
    def cmd(self, role: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
        """Run argv inside a role's namespace (`ip netns exec`)."""
        return run(["ip", "netns", "exec", self.ns(role), *argv], **kw)

    def ip(self, role: str, *args: str, **kw) -> subprocess.CompletedProcess[str]:
        return run(["ip", "-n", self.ns(role), *args], **kw)

    def nsenter_argv(self, role: str) -> list[str]:
        """Prefix that enters only the network namespace: for BCC, which needs this machine's
        /sys (`ip netns exec` remounts /sys and hides tracefs)."""
        return ["nsenter", f"--net=/run/netns/{self.ns(role)}"]

    def sysctl(self, role: str, key: str, value: str | int) -> None:
        """Write a sysctl inside a role's namespace, in-process: /proc/sys/net is resolved in
        the namespace of the thread that opens it (no `ip netns exec`, which costs two
        processes and a remount of /sys)."""
        from controller.netns import in_netns

        path = "/proc/sys/" + key.replace(".", "/")
        try:
            with in_netns(self.ns(role)), open(path, "w") as f:
                f.write(f"{value}\n")
        except OSError as e:
            raise TestbedError(f"sysctl {key}={value} in {self.ns(role)}: {e}") from e

    def ifindex(self, role: str, dev: str) -> int:
        out = self.ip(role, "-o", "link", "show", "dev", dev).stdout
        return int(out.split(":", 1)[0])

    # -- build and tear down --------------------------------------------------------------------
    def build(self) -> Testbed:
        """Create namespaces, links, addresses, routes, sysctls and pinned neighbours."""
        try:
            self._build()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build(self) -> None:
        """Few processes: under TCG each `ip` or `ip netns exec sysctl` costs a second or more,
        and a test bed is built per test. So the `ip` commands go through one `ip -batch` per
        namespace and phase, and sysctls are written in-process in the namespace."""
        existing = set(list_netns())
        for role in ROLES:
            name = self.ns(role)
            if name in existing:
                raise TestbedError(
                    f"network namespace {name} already exists: "
                    f"remove it (ip netns del {name}) or use another prefix"
                )
        for role in ROLES:
            run(["ip", "netns", "add", self.ns(role)])
            self.created.append(self.ns(role))
            # IPv6 off: no router solicitations or DAD, so only the test's packets are on the wire.
            self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", 1)
            self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", 1)
            self.sysctl(role, "net.ipv4.conf.all.rp_filter", 0)
            self.sysctl(role, "net.ipv4.conf.default.rp_filter", 0)
        for role in ("gw1", "gw2"):
            self.sysctl(role, "net.ipv4.ip_forward", 1)
        # Links: each veth born inside a's namespace, its peer born inside b's: the root
        # namespace never sees it.
        links: dict[str, list[str]] = {role: ["link set lo up"] for role in ROLES}
        for link in LINKS:
            links[link.a_role].append(
                shlex.join(
                    [
                        "link",
                        "add",
                        link.a_dev,
                        *self._queue_args(),
                        "type",
                        "veth",
                        "peer",
                        "name",
                        link.b_dev,
                        "netns",
                        self.ns(link.b_role),
                        *self._queue_args(),
                    ]
                )
            )
        self._ip_batch(links)
        prefixlen = self.plan["PREFIXLEN"]
        config: dict[str, list[str]] = {role: [] for role in ROLES}
        for i in self.ifaces:
            self.sysctl(i.role, f"net.ipv4.conf.{i.dev}.rp_filter", 0)
            config[i.role] += [
                f"link set dev {i.dev} address {i.mac}",
                f"addr add {i.addr}/{prefixlen} dev {i.dev}",
                f"link set dev {i.dev} up",
            ]
        # Neighbours pinned across every link: no ARP races in tests.
        for link in LINKS:
            a = self.iface(link.a_role, link.a_dev)
            b = self.iface(link.b_role, link.b_dev)
            config[a.role].append(
                f"neigh replace {b.addr} lladdr {b.mac} dev {a.dev} nud permanent"
            )
            config[b.role].append(
                f"neigh replace {a.addr} lladdr {a.mac} dev {b.dev} nud permanent"
            )
        p = self.plan
        config["lan"].append(f"route add default via {p['GW1_LAN']}")
        config["remote"].append(f"route add default via {p['GW2_LAN']}")
        config["gw1"].append(f"route add {p['REMOTE_NET']} via {p['GW2_WAN']} dev wan")
        config["gw2"].append(f"route add {p['LAN_NET']} via {p['GW1_WAN']} dev wan")
        self._ip_batch(config)
        # The end hosts stand for machines behind a wire: their frames arrive with complete
        # checksums. A veth would hand the gateway's XDP CHECKSUM_PARTIAL frames instead (L4
        # checksum left for an offload that never comes), which the fastpath would encrypt
        # as they are. (Off with tx checksumming goes TSO.)
        for role in ("lan", "remote"):
            set_features(self.ns(role), "eth0", tx_checksum_ip_generic=False)
        # A veth accepts frames another device's XDP program redirects to it only in NAPI
        # mode: with an XDP program of its own, or with GRO on. Every test-bed veth has GRO
        # on, so a gateway's fastpath can send to any neighbour, as it could to a NIC.
        # And each link is one FIFO, like a wire: with TSO on at the sender, a veth hands
        # forwarded skbs to its peer's per-CPU backlog and XDP frames to its NAPI ring, two
        # queues served in turns of 64, so a kernel-built ESP packet could arrive hundreds of
        # frames late and fall out of the peer's replay window for reasons of the test bed.
        for i in self.ifaces:
            set_features(self.ns(i.role), i.dev, rx_gro=True, **NO_TSO)

    def _ip_batch(self, lines_by_role: dict[str, list[str]]) -> None:
        """`ip -n NS -batch -` for each role's lines, in ROLES order (ip stops at the first
        failing line and says which: TestbedError carries it)."""
        for role in ROLES:
            if lines_by_role.get(role):
                run(
                    ["ip", "-n", self.ns(role), "-batch", "-"],
                    input="\n".join(lines_by_role[role]) + "\n",
                )

    def _queue_args(self) -> list[str]:
        if self.queues == 1:
            return []
        return ["numtxqueues", str(self.queues), "numrxqueues", str(self.queues)]

    def destroy(self) -> None:
        """Kill what runs inside our namespaces and delete them. Tolerant: never raises."""
        for name in reversed(self.created):
            pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            run(["ip", "netns", "del", name], check=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and set(self.created) & set(list_netns()):
            time.sleep(0.05)
        self.created.clear()

    # -- traffic --------------------------------------------------------------------------------
    def ping(
        self, role: str, dst: str, count: int = 1, timeout: float = 2.0, size: int | None = None
    ) -> bool:
        """Ping dst from role; True when every echo was answered."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.01", "-W", str(timeout)]
        if size is not None:
            argv += ["-s", str(size)]
        proc = self.cmd(role, [*argv, dst], check=False, timeout=timeout * count + 10)
        return proc.returncode == 0

    def wait_ping(self, role: str, dst: str, within: float = 10.0) -> bool:
        """Poll with single pings until one is answered or `within` seconds pass."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.ping(role, dst, timeout=1.0):
                return True
        return False

    def in_plan(self, net_key: str, addr: str) -> bool:
        return ipaddress.ip_address(addr) in ipaddress.ip_network(self.plan[net_key])


def list_netns() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@contextmanager
def testbed(prefix: str = "") -> Iterator[Testbed]:
    """Build the test bed, yield it, and always tear it down."""
    bed = Testbed(prefix=prefix)
    bed.build()
    try:
        yield bed
    finally:
        bed.destroy()
