# SPDX-License-Identifier: GPL-2.0-only
"""Helpers shared by the learner tests (host and VM): traffic from inside test bed namespaces,
and waiting for candidates with a deadline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

from controller.learner import Candidate, Learner, netns_inode
from controller.testbed import Testbed


def watch_gw1(learner: Learner, bed: Testbed) -> dict[str, int]:
    """Point the learner at gw1 of `bed`; returns {"lan": ifindex, "wan": ifindex, "ino": ...}."""
    info = {
        "lan": bed.ifindex("gw1", "lan"),
        "wan": bed.ifindex("gw1", "wan"),
        "ino": netns_inode(f"/run/netns/{bed.ns('gw1')}"),
    }
    learner.watch(info["ino"], {info["lan"]: "lan", info["wan"]: "wan"})
    return info


def udp_send(bed: Testbed, role: str, dst: str, dport: int, count: int = 1) -> int:
    """Send `count` UDP datagrams from a fresh socket in `role`; returns the source port."""
    code = textwrap.dedent(f"""
        import socket
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", 0))
        for _ in range({count}):
            s.sendto(b"x" * 32, ({dst!r}, {dport}))
        print(s.getsockname()[1])
    """)
    return int(bed.cmd(role, [sys.executable, "-c", code], timeout=20).stdout.strip())


def tcp_exchange(bed: Testbed, server_role: str, client_role: str, dst: str, port: int) -> int:
    """A real TCP connection client -> server:port with a little data both ways; returns the
    client's source port."""
    server_code = textwrap.dedent(f"""
        import socket
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", {port}))
        s.listen(1)
        s.settimeout(20)
        print("listening", flush=True)
        c, _ = s.accept()
        c.settimeout(20)
        c.sendall(c.recv(100))
        c.close()
    """)
    server = subprocess.Popen(
        ["ip", "netns", "exec", bed.ns(server_role), sys.executable, "-c", server_code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening", "TCP server did not start"
        client_code = textwrap.dedent(f"""
            import socket
            c = socket.create_connection(({dst!r}, {port}), timeout=20)
            c.sendall(b"hello")
            assert c.recv(100) == b"hello"
            print(c.getsockname()[1])
            c.close()
        """)
        out = bed.cmd(client_role, [sys.executable, "-c", client_code], timeout=30).stdout
        server.wait(timeout=20)
        return int(out.strip())
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


class Events:
    """Every candidate a learner yielded during a test, searchable after the fact (one poll()
    may return several candidates; none of them may be lost to a test waiting for another)."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.seen: list[Candidate] = []

    def wait(self, pred: Callable[[Candidate], bool], timeout: float = 10.0) -> Candidate | None:
        """The first candidate so far matching `pred`, else poll until one does or `timeout`
        passes (then None)."""
        for cand in self.seen:
            if pred(cand):
                return cand
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            batch = self.learner.poll(0.05)
            self.seen.extend(batch)
            for cand in batch:
                if pred(cand):
                    return cand
        return None

    def drain(self, timeout: float = 0.3) -> list[Candidate]:
        """Poll for `timeout` more seconds; returns everything seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.seen.extend(self.learner.poll(0.05))
        return self.seen
