# SPDX-License-Identifier: GPL-2.0-only
"""Run the real-kernel tests and the demo: natively when this kernel has ESP, else in a VM.

    python -m testbed.vmrun test        host tests, then the `vm` tests (native or in VMs)
    python -m testbed.vmrun vm-only     only the `vm` tests
    python -m testbed.vmrun demo        the demo (testbed/demo.py)
    python -m testbed.vmrun shell-cmd 'CMD ...'   any shell command, where the vm tests run

The `vm` tests need a kernel with ESP (esp4, xfrm_user, rfc7539esp(chacha20,poly1305)). When
the running kernel has it they run here; otherwise in boots of the pinned Debian kernel
(vm/kernel.env, fetched by scripts/fetch-kernel.sh) under qemu TCG with virtme-ng: the whole
suite in --shards boots side by side (testbed/vmshards.py), named test files in one. The
guest sees this machine's root file system read-only over 9p, so it runs the same checkout,
virtualenv and Debian packages; what it writes goes to tmpfs (/run) or an overlay (/tmp).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from controller.datapath.bpf_cache import ENV as BPF_CACHE_ENV
from controller.datapath.bpf_cache import OFF as BPF_CACHE_OFF
from controller.paths import pid_alive
from testbed import vmshards

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
KERNEL_CACHE = Path("/var/cache/xfrm-fastpath/kernel")
# Shared read-write with the guest: pytest's temporary directories (controller and charon logs,
# captures) land here, readable from the host while the VM runs and after it is gone.
VM_OUT_BASE = Path("/var/tmp/xfrm-fastpath-vm")
# One directory per runner process, so that two runs at once never clear each other's.
VM_OUT = VM_OUT_BASE / f"run-{os.getpid()}"


def _prepare_vm_out() -> None:
    """Create this run's directory; remove those of runs whose process is gone."""
    VM_OUT_BASE.mkdir(parents=True, exist_ok=True)
    for old in VM_OUT_BASE.glob("run-*"):
        pid = old.name.removeprefix("run-")
        if old == VM_OUT or not (pid.isdigit() and pid_alive(int(pid))):
            shutil.rmtree(old, ignore_errors=True)
    VM_OUT.mkdir(parents=True)


QEMU = "qemu-system-x86_64"
# Set in the environment of every run this module starts: tests/conftest.py skips `vm` tests on a
# kernel without ESP only when it is NOT set (inside the runner a missing ESP is a failure).
RUNNER_ENV = "XFRM_FASTPATH_RUNNER"

# Loaded up front in the guest so a missing one is reported once, at boot, by name (the tests
# would otherwise fail later with "Requested AEAD algorithm not found"). chacha20poly1305 is the
# rfc7539esp template (crypto/chacha20poly1305.c); chacha_generic/poly1305_generic back it.
# chacha_x86_64, poly1305_x86_64 and aesni_intel are what the xfp_crypto module (kmod/) calls
# into (tests/vm/test_vm_kcrypto.py inserts it); the crypto API would autoload them anyway.
GUEST_MODULES = (
    "veth",
    "xfrm_user",
    "xfrm_algo",
    "esp4",
    "chacha20poly1305",
    "chacha_generic",
    "poly1305_generic",
    "xfrm_interface",
    "chacha_x86_64",
    "poly1305_x86_64",
    "aesni_intel",
)

# `--icount`: qemu options for measuring (bench/e2e.py --esp). -icount shift=0 advances guest
# time 1 ns per guest instruction while the guest runs, so guest CPU time is instructions; sleep
# stays on (with sleep=off an idle guest's clock leaps ahead and time-outs in the guest fire
# early). -cpu max gives the kernel the SIMD it would use on hardware (qemu >= 7.2 TCG emulates
# AVX2, AES-NI, PCLMUL). docs/design.md §7.1: measuring against the kernel's ESP.
ICOUNT_OPTS = ("-cpu", "max", "-icount", "shift=0")
# The qemu options of this boot, exported in the guest so a benchmark can say how it was measured.
QEMU_OPTS_ENV = "XFRM_FASTPATH_QEMU_OPTS"

PYTEST_HOST = ["-m", "not vm and not bench", "tests"]
# -rA: every test's outcome in the summary, so CI logs name each VM test as PASSED.
PYTEST_VM = ["-p", "no:cacheprovider", "-m", "vm", "-v", "-rA", "--timeout=1800", "--durations=25"]


class VmRunError(RuntimeError):
    """Something the runner needs is missing; the message says what and how to get it."""


def say(msg: str) -> None:
    print(f"[vmrun] {msg}", flush=True)


# -- where to run --------------------------------------------------------------------------------
def host_has_esp() -> tuple[bool, str]:
    """Whether this kernel can run an rfc7539esp(chacha20,poly1305) tunnel-mode SA, and why not.

    /proc/net/xfrm_stat only says XFRM is there; ESP and the AEAD may still be missing (as on
    kernels built without CONFIG_INET_ESP or CONFIG_CRYPTO_CHACHA20POLY1305), so add a real SA in
    a scratch namespace, which also lets the kernel autoload the modules if it has them.
    """
    if not Path("/proc/net/xfrm_stat").exists():
        return False, "no XFRM (/proc/net/xfrm_stat missing)"
    if os.geteuid() != 0:
        return False, "not root: cannot probe ESP in a scratch namespace"
    ns = f"xfp-esp-probe-{os.getpid()}"
    key = "0x" + "11" * 36  # 32-byte ChaCha20 key + 4-byte salt (RFC 7634 section 2)
    try:
        add = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=10)
        if add.returncode != 0:
            return False, f"cannot create a scratch namespace: {add.stderr.strip()}"
        # fmt: off
        proc = subprocess.run(
            ["ip", "-n", ns, "xfrm", "state", "add", "src", "192.0.2.1", "dst", "192.0.2.2",
             "proto", "esp", "spi", "0x100", "mode", "tunnel",
             "aead", "rfc7539esp(chacha20,poly1305)", key, "128"],
            capture_output=True, text=True, timeout=10,
        )
        # fmt: on
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
    if proc.returncode != 0:
        return False, f"no rfc7539esp ESP SA: {proc.stderr.strip()}"
    return True, "this kernel adds rfc7539esp(chacha20,poly1305) tunnel SAs"


@dataclass(frozen=True)
class Kernel:
    """The unpacked pinned Debian kernel that the VM boots."""

    abi: str
    vmlinuz: Path
    moddir: Path


def find_kernel(cache: Path = KERNEL_CACHE) -> Kernel:
    """The cached kernel from scripts/fetch-kernel.sh, checked piece by piece."""
    hint = "run `make setup` (or scripts/fetch-kernel.sh) to fetch and unpack it"
    env = cache / "current.env"
    if not env.exists():
        raise VmRunError(f"no VM kernel: {env} is missing; {hint}")
    abi = ""
    for line in env.read_text().splitlines():
        if line.startswith("KERNEL_ABI="):
            abi = line.split("=", 1)[1].strip()
    if not abi:
        raise VmRunError(f"no KERNEL_ABI in {env}; {hint}")
    k = Kernel(abi, cache / "root" / "boot" / f"vmlinuz-{abi}", cache / "root/lib/modules" / abi)
    if not k.vmlinuz.is_file():
        raise VmRunError(f"kernel image {k.vmlinuz} is missing; {hint}")
    if not (k.moddir / "modules.dep").is_file():
        raise VmRunError(f"modules of {abi} are not unpacked and indexed at {k.moddir}; {hint}")
    if not (k.moddir / "build" / "Makefile").exists():
        raise VmRunError(f"no kernel headers at {k.moddir}/build (BCC needs them); {hint}")
    return k


def find_tools() -> None:
    if shutil.which(QEMU) is None:
        raise VmRunError(f"{QEMU} not found: install Debian's qemu-system-x86 (`make setup`)")
    if not (VENV_BIN / "virtme-run").exists():
        raise VmRunError(f"{VENV_BIN}/virtme-run not found: run `make setup` (installs virtme-ng)")
    for tool in ("depmod", "modprobe", "udevadm"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            raise VmRunError(f"{tool} not found: the guest needs kmod and udev (`make setup`)")


# -- the guest -----------------------------------------------------------------------------------
def guest_script(command: str, qemu_opts: tuple[str, ...] = ()) -> str:
    """Shell run as the guest's init task: mounts, modules, then `command` in the checkout."""
    mods = " ".join(GUEST_MODULES)
    cache = bpf_cache_dir()
    lines = [
        f"export PATH={VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"export {RUNNER_ENV}=vm PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1",
        # This checkout's controller/ and testbed/ first, whichever checkout the virtualenv's
        # editable install names (a second worktree runs its own code, not the first's).
        f"export PYTHONPATH={shlex.quote(str(ROOT))}",
        f"export {QEMU_OPTS_ENV}={shlex.quote(' '.join(qemu_opts))}",
        # BCC's output kept per run in the shared directory (controller/datapath/bpf_cache.py):
        # each source and flag set is compiled once per run, not at every controller start.
        f"export {BPF_CACHE_ENV}={shlex.quote(str(cache or 'off'))}",
        # XDG_CACHE_HOME in it too: the learner's kernel struct offsets, parsed from the
        # kernel's BTF (controller/datapath/btf_offsets.py, ~0.4 s natively, tens of seconds
        # under TCG), cached once per run instead of at every controller start (the guest's
        # home is on the read-only root).
        *(
            [f"export XDG_CACHE_HOME={shlex.quote(str(cache / 'xdg'))}"]
            if cache is not None
            else []
        ),
        # tracefs for BCC tracepoints, bpffs for pinning; virtme-ng mounts tracefs, be sure.
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing",
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        # `ip netns add` bind-mounts into /run/netns; /run is the guest's own tmpfs.
        "mkdir -p /run/netns",
        f'for m in {mods}; do modprobe -q $m || echo "[vm] modprobe $m failed"; done',
        "echo \"[vm] kernel $(uname -r), $(nproc) CPUs, modules: $(lsmod | awk 'NR>1{print $1}' "
        "| grep -E '^(esp4|xfrm_user|chacha20poly1305|veth)$' | sort | tr '\\n' ' ')\"",
        f"cd {shlex.quote(str(ROOT))}",
        command,
    ]
    return "\n".join(lines)


def bpf_cache_dir() -> Path | None:
    """The guests' compile cache (controller/datapath/bpf_cache.py): $XFP_BPF_CACHE (None when
    "off"), else this run's VM_OUT/bpf-cache; run_shards points both shards at its own."""
    env = os.environ.get(BPF_CACHE_ENV)
    if env in BPF_CACHE_OFF:
        return None
    return Path(env) if env else VM_OUT / "bpf-cache"


def compile_python() -> None:
    """Byte-compile the checkout's Python here, natively, in seconds: the guest runs with
    PYTHONDONTWRITEBYTECODE (the tree is shared read-only), so without .pyc files every process
    there (each controller start, each pytest run) compiles controller/, testbed/ and tests/
    under TCG again. Stale .pyc files are never used (Python checks the source's mtime)."""
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "controller", "testbed", "tests", "bench"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def virtme_argv(
    kernel: Kernel,
    script: str,
    cpus: int,
    memory: str,
    qemu_opts: tuple[str, ...] = (),
    out_dir: Path = VM_OUT,
) -> list[str]:
    # fmt: off
    return [
        str(VENV_BIN / "virtme-run"),
        "--kimg", str(kernel.vmlinuz),
        "--mods", "auto",
        # No KVM on this machine (nested virtualisation is off); 9p because virtiofsd is absent.
        "--disable-kvm", "--force-9p",
        "--cpus", str(cpus), "--memory", memory,
        # virtme-ng links /lib/modules/ABI to the unpacked tree under /var/cache, but the guest
        # mounts a tmpfs over /var/cache: export the tree again at its own path.
        "--rodir", str(KERNEL_CACHE),
        # /tmp writable in the guest (pytest's tmp_path, iperf3), host /tmp still visible below.
        "--overlay-rwdir", "/tmp",
        "--rwdir", str(out_dir),
        # The compile cache, shared by the shards of a run (one kernel, one cache).
        *(["--rwdir", str(cache)] if (cache := bpf_cache_dir()) is not None else []),
        "--script-sh", script,
        # --qemu-opts takes the rest of the command line: it goes last.
        *(["--qemu-opts", *qemu_opts] if qemu_opts else []),
    ]
    # fmt: on


def _emit(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def stream(argv: list[str], env: dict[str, str], timeout: float) -> int:
    """Run argv with stdin from /dev/null and output through a pipe (virtme-ng misbehaves with a
    terminal or a file there), copy its output here as it comes, kill it after `timeout`."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its own process group, so a timeout kills qemu too
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                say(f"timed out after {timeout:.0f} s: killing the VM")
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                return 124
            ready, _, _ = select.select([fd], [], [], min(left, 5.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                _emit(chunk)
        return proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def run_in_vm(
    command: str,
    *,
    cpus: int,
    memory: str,
    timeout: float,
    qemu_opts: tuple[str, ...] = (),
) -> int:
    """Boot the pinned kernel once, run `command` (shell) in the checkout, return its status.
    The guest's read-write window here is VM_OUT (a shard's: --out-dir), prepared afresh."""
    find_tools()
    kernel = find_kernel()
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    _prepare_vm_out()
    out_dir = VM_OUT
    if (cache := bpf_cache_dir()) is not None:
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    compile_python()
    # virtme-ng hands the guest its script base64-encoded on the kernel command line, which
    # x86 cuts at 2048 bytes: a long command (a shard's file list) there leaves the guest
    # hanging before it prints anything. The command goes in a file of the shared directory.
    (out_dir / "command.sh").write_text(command + "\n")
    script = guest_script(f"bash {shlex.quote(str(out_dir / 'command.sh'))}", qemu_opts)
    argv = virtme_argv(kernel, script, cpus, memory, qemu_opts, out_dir)
    extra = f", qemu {' '.join(qemu_opts)}" if qemu_opts else ""
    say(f"booting Debian {kernel.abi} under qemu TCG ({cpus} vCPUs, {memory}{extra}), "
        f"{timeout:.0f} s max")  # fmt: skip
    t0 = time.monotonic()
    rc = stream(argv, env, timeout)
    say(f"VM exited with status {rc} after {time.monotonic() - t0:.0f} s")
    return rc


def run_native(command: str, *, timeout: float) -> int:
    env = dict(os.environ)
    env[RUNNER_ENV] = "native"
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    return stream(["bash", "-c", command], env, timeout)


def runs_natively(args: argparse.Namespace) -> bool:
    """Whether the `vm` tests run here (this kernel has ESP, or --native); says why."""
    if args.where == "native":
        say("running natively (--native)")
        return True
    if args.where == "auto":
        ok, why = host_has_esp()
        if ok:
            say(f"running natively: {why}")
            return True
        say(f"running in a VM: this kernel ({os.uname().release}) has {why}")
    else:
        say("running in a VM (--vm)")
    return False


def run_where_esp(command: str, args: argparse.Namespace) -> int:
    """Run `command` natively if this kernel has ESP, else in the VM; say which and why."""
    if runs_natively(args):
        return run_native(command, timeout=args.timeout)
    try:
        opts = ICOUNT_OPTS if getattr(args, "icount", False) else ()
        return run_in_vm(
            command, cpus=args.cpus, memory=args.memory, timeout=args.timeout, qemu_opts=opts
        )
    except VmRunError as e:
        say(f"cannot run the VM: {e}")
        return 2


def pytest_cmd(argv: list[str]) -> str:
    return shlex.join([str(VENV_BIN / "pytest"), *argv])


# -- commands ------------------------------------------------------------------------------------
def cmd_test(args: argparse.Namespace) -> int:
    say("host tests: pytest " + " ".join(PYTEST_HOST))
    host_rc = subprocess.run(
        [str(VENV_BIN / "pytest"), *PYTEST_HOST], cwd=ROOT, stdin=subprocess.DEVNULL
    ).returncode
    vm_rc = cmd_vm_only(args)
    say(f"host tests: {'passed' if host_rc == 0 else f'FAILED (exit {host_rc})'}")
    say(f"vm tests: {'passed' if vm_rc == 0 else f'FAILED (exit {vm_rc})'}")
    return 0 if host_rc == 0 and vm_rc == 0 else 1


def cmd_vm_only(args: argparse.Namespace) -> int:
    extra = list(args.pytest_args)
    # Test paths given (e.g. tests/vm/test_vm_strongswan.py): run those, else all of tests/.
    paths = [a for a in extra if not a.startswith("-") and (ROOT / a.split("::")[0]).exists()]
    if not paths and args.shards > 1 and not args.icount and args.where != "native":
        if not runs_natively(args):
            return run_shards(args, extra)
        args.where = "native"  # decided (and said) once
    basetemp = f"--basetemp={VM_OUT / 'pytest'}"  # logs stay readable from the host
    argv = [*PYTEST_VM, basetemp, *extra, *([] if paths else ["tests"])]
    return run_where_esp(pytest_cmd(argv), args)


def run_shards(args: argparse.Namespace, extra: list[str]) -> int:
    """The whole `vm` suite in args.shards VM boots side by side (testbed/vmshards.py): one
    runner process per shard (`vm-only` on its files, its output directory VM_OUT/shardN),
    their output read here line by line, each line led by [vmN]. The worst status of them.
    (Processes, not threads: two virtme-run started from threads of one process both hung
    before their guests booted.)"""
    weights = vmshards.load_weights()
    plan = vmshards.partition(vmshards.vm_test_files(), weights, args.shards)
    _prepare_vm_out()
    # One compile cache for the shards (the same kernel): what one guest compiled, the other
    # loads. The runners inherit it, and write it into their guests' scripts.
    os.environ.setdefault(BPF_CACHE_ENV, str(VM_OUT / "bpf-cache"))
    procs: list[subprocess.Popen[bytes]] = []
    for i, units in enumerate(plan):
        out = VM_OUT / f"shard{i + 1}"
        est = vmshards.planned_seconds(units, weights)
        say(f"shard vm{i + 1} (~{est:.0f} s by testbed/vm_weights.json): {' '.join(units)}")
        argv = [sys.executable, "-m", "testbed.vmrun", "--vm", "--shards", "1",
                "--out-dir", str(out), "--cpus", str(args.cpus), "--memory", args.memory,
                "--timeout", str(args.timeout), "vm-only", "--",
                *(p for u in units for p in vmshards.unit_paths(u)),
                f"--junitxml={out / 'junit.xml'}", *extra]  # fmt: skip
        procs.append(
            subprocess.Popen(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )  # fmt: skip
    try:
        status = _follow(procs, args.timeout + 120)
    finally:
        for proc in procs:  # stopped (SIGTERM/SIGINT): each runner kills its own VM
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
    xml = [VM_OUT / f"shard{i + 1}" / "junit.xml" for i in range(len(plan))]
    seconds = vmshards.junit_seconds(xml)
    for unit, secs in sorted(seconds.items(), key=lambda kv: -kv[1]):
        say(f"  {secs:7.0f} s  {unit}")
    if args.record_weights and seconds:
        vmshards.record_weights(seconds)
        say(f"recorded in {vmshards.WEIGHTS.relative_to(ROOT)}")
    for line in vmshards.junit_failures(xml):
        say(line)
    for i, rc in enumerate(status):
        say(f"shard vm{i + 1}: {'passed' if rc == 0 else f'FAILED (exit {rc})'}")
    return next((rc for rc in status if rc != 0), 0)


def _follow(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int]:
    """Copy each process's output here, whole lines led by [vmN], until all have ended (or
    `timeout`: then 124 for those still running). Their exit statuses."""
    fds = {p.stdout.fileno(): i for i, p in enumerate(procs) if p.stdout is not None}
    partial = dict.fromkeys(fds, b"")
    deadline = time.monotonic() + timeout
    while fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(fds), [], [], 5.0)
        for fd in ready:
            lead = f"[vm{fds[fd] + 1}] ".encode()
            chunk = os.read(fd, 65536)
            *lines, partial[fd] = (partial[fd] + chunk).split(b"\n")
            if not chunk and partial[fd]:
                lines, partial[fd] = [*lines, partial[fd]], b""
            if lines:
                _emit(b"".join(lead + line + b"\n" for line in lines))
            if not chunk:
                del fds[fd]
    status = []
    for p in procs:
        try:
            status.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            status.append(124)
    return status


def cmd_demo(args: argparse.Namespace) -> int:
    return run_where_esp(shlex.join([str(VENV_BIN / "python"), "-m", "testbed.demo"]), args)


def cmd_shell(args: argparse.Namespace) -> int:
    return run_where_esp(" ".join(args.command), args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m testbed.vmrun", description=(__doc__ or "").split("\n")[0]
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--vm", dest="where", action="store_const", const="vm", help="always a VM")
    where.add_argument(
        "--native", dest="where", action="store_const", const="native", help="never a VM"
    )
    p.set_defaults(where="auto")
    p.add_argument("--cpus", type=int, default=2, help="guest vCPUs (default 2)")
    p.add_argument("--memory", default="2G", help="guest memory (default 2G)")
    p.add_argument("--timeout", type=float, default=4800, help="bound on the whole VM run, seconds")
    p.add_argument(
        "--shards",
        type=int,
        default=2,
        help="VM boots side by side for the whole vm suite (default 2; 1: one boot)",
    )
    p.add_argument("--out-dir", type=Path, default=None, help=argparse.SUPPRESS)  # a shard's
    p.add_argument(
        "--record-weights",
        action="store_true",
        help="write this run's seconds per test file to testbed/vm_weights.json",
    )
    p.add_argument("--icount", action="store_true", help="measure: qemu " + " ".join(ICOUNT_OPTS)
                   + " (guest CPU time = instructions; the VM only)")  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("test", help="host tests, then the vm tests")
    t.add_argument("pytest_args", nargs="*", help="extra pytest arguments for the vm part")
    t.set_defaults(func=cmd_test)
    v = sub.add_parser("vm-only", help="only the vm tests")
    v.add_argument("pytest_args", nargs="*", help="extra pytest arguments")
    v.set_defaults(func=cmd_vm_only)
    d = sub.add_parser("demo", help="the demo: test bed, strongSwan tunnel, traffic, summary")
    d.set_defaults(func=cmd_demo)
    s = sub.add_parser("shell-cmd", help="run a shell command where the vm tests would run")
    s.add_argument("command", nargs="+")
    s.set_defaults(func=cmd_shell)
    return p


class Terminated(Exception):
    """SIGTERM/SIGHUP: unwind so `stream` kills the VM's process group (qemu runs in a session
    of its own and would otherwise outlive us)."""


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.chdir(ROOT)
    if args.out_dir is not None:  # a shard of run_shards(): its directory in the parent's
        global VM_OUT
        VM_OUT = args.out_dir
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        return int(args.func(args))
    except (Terminated, KeyboardInterrupt) as e:
        say(f"stopped ({e or 'SIGINT'})")
        return 130


if __name__ == "__main__":
    sys.exit(main())
