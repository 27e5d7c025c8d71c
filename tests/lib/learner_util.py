# SPDX-License-Identifier: GPL-2.0-only
"""Helpers shared by the learner tests (host and VM): traffic from inside test bed namespaces,
and waiting for candidates with a deadline."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable

from controller.datapath.learner import Candidate, Learner, netns_inode
from testbed.bed import Testbed


def watch_gw1(learner: Learner, bed: Testbed) -> dict[str, int]:
    """Point the learner at gw1 of `bed`; returns {"lan": ifindex, "wan": ifindex, "ino": ...}."""
    info = {
        "lan": bed.ifindex("gw1", "lan"),
        "wan": bed.ifindex("gw1", "wan"),
        "ino": netns_inode(f"/run/netns/{bed.ns('gw1')}"),
    }
    learner.watch(info["ino"], {info["lan"]: "lan", info["wan"]: "wan"})
    return info


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000  # include/uapi/linux/sched.h


def socket_in(bed: Testbed, role: str, family: int, kind: int) -> socket.socket:
    """A socket created inside a role's namespace (a socket keeps its namespace for life): a
    helper thread setns()es there, creates it, and ends. No process start per packet, which
    matters under qemu TCG where starting Python takes seconds."""
    result: dict[str, object] = {}

    def enter_and_create() -> None:
        fd = os.open(f"/run/netns/{bed.ns(role)}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {bed.ns(role)}: {os.strerror(err)}")
            result["sock"] = socket.socket(family, kind)
        except BaseException as e:
            result["err"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=enter_and_create)
    t.start()
    t.join(timeout=10)
    if "err" in result:
        raise result["err"]  # type: ignore[misc]
    sock = result.get("sock")
    assert isinstance(sock, socket.socket), f"socket created in {bed.ns(role)}"
    return sock


def udp_send(bed: Testbed, role: str, dst: str, dport: int, count: int = 1) -> int:
    """Send `count` UDP datagrams from a fresh socket in `role`; returns the source port."""
    with socket_in(bed, role, socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", 0))
        for _ in range(count):
            s.sendto(b"x" * 32, (dst, dport))
        return int(s.getsockname()[1])


def tcp_exchange(
    bed: Testbed, server_role: str, client_role: str, dst: str, port: int, bulk: int = 0
) -> int:
    """A real TCP connection client -> server:port: a greeting echoed back, then `bulk` bytes
    client -> server. Returns the client's source port."""
    with socket_in(bed, server_role, socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("0.0.0.0", port))
        srv.listen(1)
        srv.settimeout(30)
        with socket_in(bed, client_role, socket.AF_INET, socket.SOCK_STREAM) as cli:
            cli.settimeout(30)
            cli.connect((dst, port))  # the listener's backlog completes the handshake
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(30)
                cli.sendall(b"hello")
                conn.sendall(conn.recv(100))
                assert cli.recv(100) == b"hello", "TCP echo came back"
                if bulk:
                    received = 0

                    def sink() -> None:
                        nonlocal received
                        while received < bulk:
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            received += len(chunk)

                    t = threading.Thread(target=sink)
                    t.start()
                    cli.sendall(b"b" * bulk)
                    t.join(timeout=60)
                    assert received == bulk, f"bulk transfer arrived: {received}/{bulk}"
            return int(cli.getsockname()[1])


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
