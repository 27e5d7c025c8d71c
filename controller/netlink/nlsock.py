# SPDX-License-Identifier: GPL-2.0-only
"""Raw netlink sockets, optionally opened inside a named network namespace.

A netlink socket belongs to the network namespace it was created in, so entering the namespace
just long enough to create the socket (setns(2) on this thread, then back) gives a socket that
talks to that namespace's XFRM/rtnetlink/nfnetlink for the rest of its life. The controller
itself runs in gw1's namespace (nsenter --net), where netns=None is right; tests open sockets
into their own test-bed namespaces without moving the whole process.

Requests are synchronous with a deadline; multicast sockets are non-blocking and expose
fileno() so that a caller can poll() them.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_ROOT = 0x100
NLM_F_MATCH = 0x200
NLM_F_DUMP = NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP_INTR = 0x10

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSGERR_ATTR_MSG = 1
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_ns_lock = threading.Lock()


class NetlinkError(OSError):
    """The kernel refused a request: errno plus the extended-ack message when it gave one."""

    def __init__(self, code: int, message: str = "", request: str = "") -> None:
        text = os.strerror(code) + (f": {message}" if message else "")
        super().__init__(code, f"{request}: {text}" if request else text)
        self.kernel_message = message


def netns_path(netns: str) -> str:
    return netns if netns.startswith("/") else f"/run/netns/{netns}"


@contextmanager
def in_netns(netns: str | None) -> Iterator[None]:
    """Run the body with this thread in `netns` (a name under /run/netns or a path)."""
    if netns is None:
        yield
        return
    with _ns_lock, open("/proc/thread-self/ns/net") as here, open(netns_path(netns)) as there:
        if _libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns({netns}): {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(here.fileno(), CLONE_NEWNET) != 0:  # pragma: no cover
                e = ctypes.get_errno()
                # Continuing in the wrong namespace would be worse than dying here.
                os.write(2, f"cannot leave netns {netns}: {os.strerror(e)}\n".encode())
                os._exit(70)


def _parse_error(data: bytes, offset: int, length: int) -> tuple[int, str]:
    """struct nlmsgerr { int error; struct nlmsghdr msg; } + NLMSGERR_ATTR_* TLVs (ext ack)."""
    (err,) = struct.unpack_from("i", data, offset + 16)
    flags = struct.unpack_from("H", data, offset + 6)[0]
    msg = ""
    if flags & NLM_F_ACK_TLVS:
        inner_len = struct.unpack_from("I", data, offset + 20)[0]
        pos = offset + 20 + (16 if flags & NLM_F_CAPPED else (inner_len + 3) & ~3)
        end = offset + length
        while pos + 4 <= end:
            alen, atype = struct.unpack_from("HH", data, pos)
            if alen < 4:
                break
            if atype & 0x3FFF == NLMSGERR_ATTR_MSG:
                msg = bytes(data[pos + 4 : pos + alen]).rstrip(b"\0").decode(errors="replace")
            pos += (alen + 3) & ~3
    return -err, msg


class NetlinkSocket:
    """One AF_NETLINK socket: requests with acks and dumps, or multicast reading."""

    RCVBUF = 1 << 22

    def __init__(
        self,
        protocol: int,
        *,
        groups: tuple[int, ...] = (),
        netns: str | None = None,
        nonblocking: bool = False,
    ) -> None:
        with in_netns(netns):
            self.sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, protocol
            )
        self.netns = netns
        try:
            # Bigger than the default so that a burst of notifications does not overrun; the
            # FORCE variant ignores rmem_max (we are root), plain SO_RCVBUF is the fallback.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, 33, self.RCVBUF)  # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
            self.sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            self.sock.bind((0, 0))
            for g in groups:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, g)
            if nonblocking:
                self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise
        self._seq = int.from_bytes(os.urandom(2), "little") + 1

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NetlinkSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def request(
        self, payload: bytes, msg_type: int, flags: int, *, timeout: float = 5.0, what: str = ""
    ) -> list[tuple[int, int, bytes]]:
        """Send one request (payload = the message after the nlmsghdr) and collect replies.

        Returns (type, flags, whole message bytes) of each reply, until NLMSG_DONE for a dump
        or the ack for anything else. Raises NetlinkError when the kernel answers with an
        error, TimeoutError when it does not answer within `timeout`."""
        seq = self.next_seq()
        flags |= NLM_F_REQUEST
        dump = (flags & NLM_F_DUMP) == NLM_F_DUMP and not flags & NLM_F_ACK
        hdr = struct.pack("IHHII", 16 + len(payload), msg_type, flags, seq, 0)
        self.sock.sendto(hdr + payload, (0, 0))
        out: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{what or msg_type}: no answer within {timeout} s")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, mflags, mseq, _pid = struct.unpack_from("IHHII", data, offset)
                if length < 16 or offset + length > len(data):
                    break
                if mseq == seq:
                    if mtype == NLMSG_ERROR:
                        code, msg = _parse_error(data, offset, length)
                        if code:
                            raise NetlinkError(code, msg, what)
                        return out  # the ack
                    if mtype == NLMSG_DONE:
                        return out
                    if mflags & NLM_F_DUMP_INTR:
                        raise NetlinkError(errno.EINTR, "dump interrupted, retry", what)
                    out.append((mtype, mflags, bytes(data[offset : offset + length])))
                    if not dump and not flags & NLM_F_ACK:
                        return out
                offset += (length + 3) & ~3

    def read_nonblocking(self, max_messages: int = 4096) -> tuple[list[bytes], bool]:
        """Drain what is queued without blocking: (datagrams, overrun). overrun is True when the
        kernel reported ENOBUFS (it dropped notifications for us)."""
        out: list[bytes] = []
        overrun = False
        for _ in range(max_messages):
            try:
                out.append(self.sock.recv(1 << 20, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    overrun = True
                    continue
                raise
        return out, overrun


def split_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, message bytes) for each netlink message in a datagram; stops at the
    first malformed header."""
    offset = 0
    while offset + 16 <= len(data):
        length, mtype, mflags, mseq, _pid = struct.unpack_from("IHHII", data, offset)
        if length < 16 or offset + length > len(data):
            raise ValueError(f"bad nlmsg length {length} at offset {offset} of {len(data)}")
        yield mtype, mflags, mseq, data[offset : offset + length]
        offset += (length + 3) & ~3


def check_attrs(raw: bytes | bytearray, offset: int) -> None:
    """Validate the top-level attribute chain of a message from `offset` (after the fixed
    header, 4-aligned) to its end: every nla_len at least 4 and inside the message. pyroute2
    clamps a bad length and decodes on; a watcher must instead call the message malformed."""
    pos, end = (offset + 3) & ~3, len(raw)
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("HH", raw, pos)
        if alen < 4 or pos + alen > end:
            raise ValueError(f"attribute type {atype & 0x3FFF} length {alen} at {pos} of {end}")
        pos += (alen + 3) & ~3


EventT = TypeVar("EventT")


def events_within(
    fileno: int, read_events: Callable[[], Iterable[EventT]], timeout: float
) -> Iterator[EventT]:
    """Yield what `read_events()` drains each time `fileno` turns readable, for at most
    `timeout` seconds (the watchers' and the XFRM monitor's `events()`)."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fileno, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        if poller.poll(left * 1000):
            yield from read_events()
