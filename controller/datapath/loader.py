# SPDX-License-Identifier: GPL-2.0-only
"""One loader for every BPF program: compile with BCC, load programs by name and type, attach
them (XDP, TC egress, tracepoints) and detach them again, transactionally.

    ld = Loader()
    b = ld.compile("xdp_encap.c", ("-DXFP_MAX_FRAME=9100",), pin_dir="/sys/fs/bpf/xfp")
    fn = ld.load(b, "xdp_encap", Prog.XDP)
    try:
        with ld.transaction():                   # all of these, or none of them
            for dev in ("lan0", "lan1", "lan2"):
                ld.attach_xdp(dev, fn, netns="gw1")
        ...
    finally:
        ld.close()                               # detaches everything, releases the modules

Compiling: the source is named relative to bpf/ (or given as `text`); the include root
`-I bpf/include` is added here and nowhere else, and `pin_dir` becomes -DXFP_PIN_DIR for the
programs that pin their maps (bpf/include/maps.h). Callers choose variants with -D flags only
(-W/-w flags, which change no code, are let through for test programs).

Attaching (what xdp-tools' libxdp does, docs/design.md §6):
- idempotent: attaching a program where this loader already attached one (same kind, device,
  namespace, mode) replaces it in place and is recorded once;
- transactional: inside `transaction()`, every attachment is recorded as it is made; when
  anything in the block raises, what the block attached is detached again (newest first)
  before the error propagates. A single attach_* call is a transaction of its own;
- detach_all() / close() detach everything this loader attached, tolerantly (a vanished device
  or namespace is fine), and are idempotent. Call them in `finally`. As a last resort they run
  at interpreter exit (atexit; a daemon turns SIGTERM into an orderly exit for that): an XDP
  attachment made over netlink outlives the process that made it.

Namespaces: XDP and TC attachments act on the device of that name in the calling thread's
network namespace, or, with `netns=NAME`, inside /run/netns/NAME entered for the call
(controller/netns.py), so one compile can serve several namespaces. Tracepoints are global.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from controller.datapath import bpf_cache
from controller.datapath.kfunc import load_with_kfuncs
from controller.datapath.program import LoaderError, Prog

ROOT = Path(__file__).resolve().parents[2]
BPF_DIR = ROOT / "bpf"
INCLUDE_DIR = BPF_DIR / "include"  # the one include root (-I) of every program
BPFFS = Path("/sys/fs/bpf")
log = logging.getLogger(__name__)

# TC egress: the clsact qdisc's egress hook (include/uapi/linux/pkt_sched.h, TC_H_CLSACT and
# TC_H_MIN_EGRESS), our filter's handle and priority there, and ETH_P_ALL (every protocol).
TC_EGRESS_PARENT = "ffff:fff3"
TC_HANDLE = 0xF1F0
TC_PRIO = 1
ETH_P_ALL = 0x0003


def ensure_bpffs() -> None:
    """Mount bpffs on /sys/fs/bpf when nothing is mounted there (pinning needs it)."""
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == str(BPFFS) and line.split()[2] == "bpf" for line in f):
            return
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True, capture_output=True)


def check_cflags(cflags: Sequence[str]) -> list[str]:
    """Variants are chosen with -D flags only (never by editing C text, docs/design.md §6);
    -W/-w flags only silence warnings. Anything else (-I, -include, -O...) is refused: the
    loader owns the include root."""
    for flag in cflags:
        if not (flag.startswith(("-D", "-W")) or flag == "-w"):
            raise LoaderError(f"only -D cflags select variants, not {flag!r}")
    return list(cflags)


# The label ("bpf/x.c" or "<text>") of every module compiled here, for load errors.
_SOURCES: weakref.WeakKeyDictionary[object, str] = weakref.WeakKeyDictionary()


def compile_bpf(
    source: str | os.PathLike[str] | None = None,
    cflags: Sequence[str] = (),
    *,
    text: str | bytes | None = None,
    pin_dir: Path | str | None = None,
):
    """Compile `source` (a path relative to bpf/, e.g. "xdp_encap.c" or "tests/test_aead.c")
    or `text` with BCC and return the bcc.BPF object. The loader adds `-I bpf/include`; with
    `pin_dir`, also -DXFP_PIN_DIR (bpffs mounted and the directory made, mode 0700, when
    absent). BCC attaches a module's TRACEPOINT_PROBEs as it compiles it: when one of those
    fails, the ones already attached are detached again before LoaderError is raised."""
    if (source is None) == (text is None):
        raise ValueError("compile_bpf: give a source file or text, not both or neither")
    label = "<text>" if source is None else f"bpf/{Path(source).as_posix()}"
    flags = [f"-I{INCLUDE_DIR}"]
    if pin_dir is not None:
        ensure_bpffs()
        Path(pin_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        flags.append(f'-DXFP_PIN_DIR="{pin_dir}"')
    flags += check_cflags(cflags)
    try:
        from bcc import BPF
    except ImportError as e:  # pragma: no cover - set-up error
        raise LoaderError(f"compiling/loading {label}: BCC (python3-bpfcc) not importable") from e
    if source is not None:
        path = BPF_DIR / source
        if not path.is_file():
            raise LoaderError(f"compiling/loading {label}: no such file", source=label)
        kw = {"src_file": str(path).encode()}
        code = path.read_bytes()
    else:
        code = text.encode() if isinstance(text, str) else text
        kw = {"text": code}
    d = bpf_cache.cache_dir()
    key = None
    if d is not None and bpf_cache.usable(d):
        key = bpf_cache.cache_key(code, flags, BPF_DIR)
        entry = bpf_cache.read_entry(d, key)
        bpf = _from_cache(entry, code, flags, label) if entry is not None else None
        if bpf is not None:
            bpf_cache.STATS["hit"] += 1
            _SOURCES[bpf] = label
            return bpf
        bpf_cache.STATS["miss"] += 1
    # Built in two steps so that a half-built module can be cleaned up: BPF.__init__ compiles
    # and then attaches the module's tracepoint__* functions (bcc's _trace_autoload).
    bpf = BPF.__new__(BPF)
    try:
        bpf.__init__(cflags=flags, **kw)
    except Exception as e:  # BCC raises bare Exception
        with contextlib.suppress(Exception):
            bpf.cleanup()
        raise LoaderError(f"compiling/loading {label}: {e}", source=label) from e
    if key is not None:
        _store(bpf, code, flags, d, key, label)
    _SOURCES[bpf] = label
    return bpf


def _from_cache(entry: dict, code: bytes, flags: list[str], label: str):
    """A module from a cache entry (controller/datapath/bpf_cache.py): BCC compiles the map
    prologue, the cached functions are bound to its maps. None when the entry does not fit
    (then the caller compiles the whole source)."""
    try:
        prologue = bpf_cache.maps_prologue(code)
    except bpf_cache.Uncacheable:
        return None
    cls = bpf_cache.cached_bpf_class()
    bpf = cls.__new__(cls)
    try:
        bpf.__init__(cflags=flags, text=prologue)
        bpf.bind_entry(entry)
        bpf.autoload_tracepoints()
    except bpf_cache.Uncacheable as e:
        with contextlib.suppress(Exception):
            bpf.cleanup()
        bpf_cache.STATS["stale"] += 1
        log.warning("%s: compile cache entry not used (%s): compiling", label, e)
        return None
    except Exception as e:  # BCC raises bare Exception
        with contextlib.suppress(Exception):
            bpf.cleanup()
        raise LoaderError(f"compiling/loading {label}: {e}", source=label) from e
    log.info("%s: instructions from the compile cache", label)
    return bpf


def _store(bpf, code: bytes, flags: list[str], d: Path, key: str, label: str) -> None:
    """Keep a freshly compiled module's instructions (best effort: a module that cannot be kept,
    or a full disk, costs the next start a compile, nothing more)."""
    from bcc import BPF

    scratch: Path | None = None
    try:
        prologue = bpf_cache.maps_prologue(code)
        if any(f.startswith(bpf_cache.PIN_FLAG) for f in flags):
            # The check compiles the prologue against pins of its own, never the caller's:
            # storing must leave the maps the programs use exactly as the compile made them.
            scratch = Path(tempfile.mkdtemp(prefix="xfp-cache-store-", dir=BPFFS))
            flags = [f for f in flags if not f.startswith(bpf_cache.PIN_FLAG)]
            flags.append(f'{bpf_cache.PIN_FLAG}"{scratch}"')
        prologue_bpf = BPF(text=prologue, cflags=flags)
        try:
            entry = bpf_cache.entry_of(bpf, prologue_bpf)
        finally:
            prologue_bpf.cleanup()
        bpf_cache.write_entry(d, key, entry)
        bpf_cache.STATS["stored"] += 1
    except bpf_cache.Uncacheable as e:
        bpf_cache.STATS["uncacheable"] += 1
        log.debug("%s: not kept in the compile cache: %s", label, e)
    except Exception as e:  # BCC's bare Exception, OSError
        bpf_cache.STATS["uncacheable"] += 1
        log.warning("%s: not kept in the compile cache: %s", label, e)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def load_program(bpf, name: str, prog: Prog):
    """Load function `name` of a compiled module as a program of type `prog` (verifier run
    here); returns BCC's Function (its `.fd`). Loading twice returns the same program."""
    from bcc import BPF

    try:
        return bpf.load_func(name.encode(), getattr(BPF, prog.value))
    except Exception as e:
        label = _SOURCES.get(bpf, "<text>")
        raise LoaderError(f"compiling/loading {label}: {e}", source=label) from e


def netns_scope(netns: str | None) -> contextlib.AbstractContextManager:
    """Inside /run/netns/NAME for the block (this thread only); None: stay where we are."""
    if netns is None:
        return contextlib.nullcontext()
    from controller.netns import in_netns

    return in_netns(netns)


@dataclass(frozen=True)
class Attachment:
    """One attachment this loader made: enough to undo it."""

    kind: str  # "xdp" | "tc-egress" | "tracepoint"
    target: str  # the device, or the tracepoint ("category:name")
    netns: str | None = None  # None: the calling thread's namespace at the time of the call
    flags: int = 0  # XDP attach flags (include/uapi/linux/if_link.h), part of the identity
    module: int = 0  # tracepoint: id() of its module (two modules may share a tracepoint)
    ifindex: int = field(default=0, compare=False)  # TC: the device as it was attached
    bpf: object = field(default=None, compare=False, repr=False)  # tracepoint: its module


def _undo(a: Attachment) -> None:
    if a.kind == "xdp":
        from bcc import BPF

        with netns_scope(a.netns):
            BPF.remove_xdp(a.target.encode(), a.flags)
    elif a.kind == "tc-egress":
        from pyroute2 import IPRoute

        with netns_scope(a.netns), IPRoute() as ipr:
            ipr.tc(
                "del-filter",
                "bpf",
                a.ifindex,
                TC_HANDLE,
                parent=TC_EGRESS_PARENT,
                prio=TC_PRIO,
                protocol=ETH_P_ALL,
            )
    elif a.kind == "tracepoint":
        if a.target.encode() in a.bpf.tracepoint_fds:  # type: ignore[attr-defined]
            a.bpf.detach_tracepoint(a.target.encode())  # type: ignore[attr-defined]
    else:  # pragma: no cover - a kind without an undo is a bug here
        raise AssertionError(a.kind)


def _detach_at_exit(ref: weakref.ref, pid: int) -> None:
    loader = ref()
    if loader is not None and os.getpid() == pid:  # not in a forked child
        loader.detach_all()


class Loader:
    """Modules compiled, programs loaded and attachments made through one object; see the
    module docstring. Not thread-safe (namespace entry is per thread)."""

    def __init__(self) -> None:
        self.attachments: list[Attachment] = []  # in the order made
        self.modules: list[object] = []
        self._txn: list[Attachment] | None = None  # what the open transaction attached
        atexit.register(_detach_at_exit, weakref.ref(self), os.getpid())

    # -- compile and load ---------------------------------------------------------------------
    def compile(
        self,
        source: str | os.PathLike[str] | None = None,
        cflags: Sequence[str] = (),
        *,
        text: str | bytes | None = None,
        pin_dir: Path | str | None = None,
    ):
        """compile_bpf(), with the module's tracepoints (attached by BCC as it compiles)
        recorded as this loader's attachments and the module released by close()."""
        bpf = compile_bpf(source, cflags, text=text, pin_dir=pin_dir)
        self.modules.append(bpf)
        for tp in list(bpf.tracepoint_fds):  # type: ignore[attr-defined]
            self._record(Attachment("tracepoint", tp.decode(), module=id(bpf), bpf=bpf))
        return bpf

    def load(self, bpf, name: str, prog: Prog):
        """load_program()."""
        return load_program(bpf, name, prog)

    def load_kfunc(self, bpf, name: str, prog: Prog, module: str = "xfp_crypto"):
        """A program whose placeholder calls become calls of `module`'s kfuncs, loaded by
        controller/datapath/kfunc.py (BCC cannot emit kfunc calls); released by close()."""

        fn = load_with_kfuncs(bpf, name, prog, module)
        self.modules.append(fn)  # its cleanup() closes it
        return fn

    # -- attach ---------------------------------------------------------------------------------
    def _record(self, a: Attachment) -> None:
        if a in self.attachments:
            return  # attached again in place: still one attachment
        self.attachments.append(a)
        if self._txn is not None:
            self._txn.append(a)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Loader]:
        """All attachments made in the block, or none: on an exception, the ones the block
        made are detached (newest first) and the exception propagates. Attachments that
        existed before the block are left alone, even when the block attached them again.
        Transactions nest (an inner failure that the outer block catches undoes the inner
        block's attachments only)."""
        outer, self._txn = self._txn, []
        try:
            yield self
        except BaseException:
            made, self._txn = self._txn, outer
            self._detach(made)
            raise
        made, self._txn = self._txn, outer
        if outer is not None:
            outer.extend(made)

    def attach_xdp(self, dev: str, fn, flags: int = 0, netns: str | None = None) -> Attachment:
        """Attach XDP program `fn` to device `dev` (in namespace `netns`), with XDP_FLAGS_*
        `flags` (0: the kernel picks the mode). Without XDP_FLAGS_UPDATE_IF_NOEXIST the kernel
        replaces a program already there (net/core/dev.c, dev_xdp_attach()). `fn` is a BCC
        function or a program load_kfunc() loaded (anything with an `fd`: BCC's attach_xdp
        takes its own Function type only, so those go through libbcc's bpf_attach_xdp)."""
        from bcc import BPF, lib

        try:
            with netns_scope(netns):
                if isinstance(fn, BPF.Function):
                    BPF.attach_xdp(dev.encode(), fn, flags)
                else:
                    # libbcc prints libbpf's reason to stderr and returns -1
                    if lib.bpf_attach_xdp(dev.encode(), fn.fd, flags) < 0:
                        raise RuntimeError(f"bpf_attach_xdp of fd {fn.fd} failed")
        except Exception as e:
            raise LoaderError(f"attach XDP to {dev}: {e}") from e
        a = Attachment("xdp", dev, netns, flags)
        self._record(a)
        return a

    def attach_tc_egress(self, dev: str, fn, name: str, netns: str | None = None) -> Attachment:
        """A clsact qdisc (added if absent, left in place on detach) and a direct-action BPF
        filter of `fn` on the egress hook of `dev`; `name` labels the filter (`tc filter
        show`). Attaching again replaces our filter (same handle and priority)."""
        from pyroute2 import IPRoute

        try:
            with netns_scope(netns), IPRoute() as ipr:
                idx = ipr.link_lookup(ifname=dev)
                if not idx:
                    raise LoaderError(f"no device {dev}")
                ifindex = idx[0]
                with contextlib.suppress(Exception):  # exists already: fine
                    ipr.tc("add", "clsact", ifindex)
                ipr.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    TC_HANDLE,
                    fd=fn.fd,
                    name=name,
                    parent=TC_EGRESS_PARENT,
                    prio=TC_PRIO,
                    direct_action=True,
                    protocol=ETH_P_ALL,
                )
        except LoaderError:
            raise
        except Exception as e:
            raise LoaderError(f"attach tc egress to {dev}: {e}") from e
        a = Attachment("tc-egress", dev, netns, ifindex=ifindex)
        self._record(a)
        return a

    def attach_tracepoint(self, bpf, tp: str, fn_name: str) -> Attachment:
        """Attach function `fn_name` of module `bpf` to tracepoint `tp` ("category:name")."""
        try:
            bpf.attach_tracepoint(tp=tp.encode(), fn_name=fn_name.encode())
        except Exception as e:
            raise LoaderError(f"attach {fn_name} to tracepoint {tp}: {e}") from e
        a = Attachment("tracepoint", tp, module=id(bpf), bpf=bpf)
        self._record(a)
        return a

    # -- detach -----------------------------------------------------------------------------------
    def _detach(self, entries: Iterable[Attachment]) -> list[str]:
        """Undo `entries`, newest first; keep going past failures (a device or namespace
        already gone). Returns what could not be undone."""
        errors = []
        for a in reversed(list(entries)):
            with contextlib.suppress(ValueError):
                self.attachments.remove(a)
            if self._txn is not None:
                with contextlib.suppress(ValueError):
                    self._txn.remove(a)
            try:
                _undo(a)
            except Exception as e:
                errors.append(f"{a.kind} {a.netns or ''}:{a.target}: {e}")
        return errors

    def detach(self, a: Attachment) -> None:
        """Undo one attachment (tolerant, like detach_all)."""
        self._detach([a])

    def detach_all(self) -> list[str]:
        """Detach everything this loader attached. Returns what could not be undone (a device
        that vanished took its program with it); never raises for that."""
        return self._detach(list(self.attachments))

    def close(self) -> None:
        """detach_all(), then release the compiled modules (their programs and map fds; pinned
        maps stay in bpffs). Idempotent."""
        self.detach_all()
        modules, self.modules = self.modules, []
        for bpf in modules:
            with contextlib.suppress(Exception):
                bpf.cleanup()  # type: ignore[attr-defined]

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
