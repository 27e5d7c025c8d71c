# SPDX-License-Identifier: GPL-2.0-only
"""strongSwan on the test bed: one charon per gateway namespace, driven through swanctl.

The configuration lives in testbed/strongswan/{gw1,gw2}/ as templates over the addressing plan
(testbed/addresses.env) plus SWAN_PSK and SWAN_RUNDIR; Vagrant machines render the same files
with testbed/strongswan/render.sh. Each daemon gets its own directory (config, vici socket, log),
so several run on one machine, one per network namespace:

    with ike_tunnel(bed, workdir) as ike:          # both charons, CHILD_SA initiated by gw1
        bed.ping("lan", bed.addr("REMOTE_HOST"))
        ike.gw1.list_sas()                          # parsed `swanctl --list-sas --raw`
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from testbed.bed import ROOT, Testbed, TestbedError

SWAN_DIR = ROOT / "testbed" / "strongswan"
# charon-systemd is Debian's packaged daemon (package charon-systemd); `charon` is the classic one.
CHARON_CANDIDATES = (
    "/usr/sbin/charon-systemd",
    "/usr/lib/ipsec/charon",
    "/usr/libexec/ipsec/charon",
)
# Names of the connection and CHILD_SA in each gateway's swanctl.conf.
CONN = {"gw1": "gw1-gw2", "gw2": "gw2-gw1"}
CHILD = {"gw1": "lan-remote", "gw2": "remote-lan"}
# The CHILD_SA's ESP proposal (SWAN_ESP in swanctl.conf; render.sh has the same default):
# ChaCha20-Poly1305 (RFC 7634), what the BPF AEAD serves. The kernel crypto backend's tests ask
# for AES-GCM (RFC 4106) with ESP_AES_GCM.
ESP_PROPOSALS = "chacha20poly1305-x25519"
ESP_AES_GCM = {128: "aes128gcm16-x25519", 256: "aes256gcm16-x25519"}


class StrongswanError(TestbedError):
    """A charon or swanctl step failed; the message carries the daemon's log tail."""


def find_charon() -> str:
    for path in CHARON_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise StrongswanError(
        "no strongSwan daemon (charon-systemd or charon): install Debian's charon-systemd "
        "and strongswan-swanctl (`make setup`)"
    )


def render(
    role: str,
    outdir: Path,
    plan: dict[str, str],
    psk: str,
    rundir: Path,
    esp: str = ESP_PROPOSALS,
) -> None:
    """Write strongswan.conf and swanctl.conf for `role` into outdir, from the templates;
    `esp`: the CHILD_SA's esp_proposals (both gateways must be rendered with the same)."""
    if not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", esp):
        raise StrongswanError(f"not a strongSwan proposal: {esp!r}")
    values = {**plan, "SWAN_PSK": psk, "SWAN_RUNDIR": str(rundir), "SWAN_ESP": esp}
    outdir.mkdir(parents=True, exist_ok=True)
    for name in ("strongswan.conf", "swanctl.conf"):
        text = Template((SWAN_DIR / role / name).read_text()).substitute(values)
        dst = outdir / name
        dst.write_text(text)
        dst.chmod(0o600)


@dataclass
class Charon:
    """One charon daemon inside a gateway's network namespace."""

    bed: Testbed
    role: str
    rundir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def conf(self) -> Path:
        return self.rundir / "strongswan.conf"

    @property
    def uri(self) -> str:
        return f"unix://{self.rundir}/charon.vici"

    @property
    def log_path(self) -> Path:
        return self.rundir / "charon.log"

    def log_tail(self, lines: int = 40) -> str:
        with suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def start(self, within: float = 60.0) -> None:
        """Start charon in the namespace and wait until its vici socket answers."""
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf)}
        out = (self.rundir / "charon.out").open("wb")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.bed.ns(self.role), find_charon()],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
        out.close()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StrongswanError(
                    f"charon in {self.role} exited ({self.proc.returncode}):\n{self.log_tail()}"
                )
            sock = self.rundir / "charon.vici"
            if sock.exists() and self.swanctl("--version", check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise StrongswanError(f"charon in {self.role}: no vici socket after {within} s")

    def swanctl(
        self, *args: str, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """swanctl against this daemon's socket (a unix socket: reachable from any netns)."""
        env = {**os.environ, "STRONGSWAN_CONF": str(self.conf)}
        proc = subprocess.run(
            ["swanctl", *args, "--uri", self.uri],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if check and proc.returncode != 0:
            raise StrongswanError(
                f"swanctl {' '.join(args)} ({self.role}): exit {proc.returncode}: "
                f"{proc.stderr.strip()} {proc.stdout.strip()}\n{self.log_tail()}"
            )
        return proc

    def load(self) -> None:
        self.swanctl("--load-all", "--noprompt", "--file", str(self.rundir / "swanctl.conf"))

    def initiate(self, timeout: float = 60.0) -> None:
        """Bring up this side's CHILD_SA (and the IKE_SA under it); returns once established."""
        self.swanctl(
            "--initiate",
            "--child",
            CHILD[self.role],
            "--timeout",
            str(int(timeout)),
            timeout=timeout + 10,
        )

    def list_sas(self) -> list[dict[str, Any]]:
        """IKE_SAs as dicts (vici list-sa events), each with `name` and its `child-sas`."""
        out = self.swanctl("--list-sas", "--noblock", "--raw").stdout
        return [{"name": k, **v} for ev in parse_vici_raw(out) for k, v in ev.items()]

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class IkeTunnel:
    """The two daemons of a gw1-gw2 IKEv2 tunnel."""

    gw1: Charon
    gw2: Charon
    psk: str
    daemons: list[Charon] = field(default_factory=list)
    scratch: Path | None = None  # the daemons' run directories (sockets), removed at stop
    logdir: Path | None = None  # where their logs are copied at stop

    def stop(self) -> None:
        for d in reversed(self.daemons):
            d.stop()
        if self.scratch is not None:
            if self.logdir is not None:
                for d in self.daemons:
                    with suppress(OSError):
                        (self.logdir / d.role).mkdir(parents=True, exist_ok=True)
                        for name in ("charon.log", "charon.out"):
                            if (d.rundir / name).exists():
                                shutil.copy(d.rundir / name, self.logdir / d.role / name)
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def start_ike_tunnel(
    bed: Testbed,
    workdir: Path,
    psk: str | None = None,
    initiate: bool = True,
    esp: str = ESP_PROPOSALS,
) -> IkeTunnel:
    """Render both configs under workdir, start both charons, load them, and (by default)
    have gw1 initiate the CHILD_SA, with the ESP proposal `esp`. On failure everything
    started is stopped again."""
    psk = psk or secrets.token_hex(16)
    # Run directories (config, vici socket, log) on /run: a tmpfs on the host and in the VM,
    # where unix sockets work (they do not on the 9p share the VM runner keeps logs on) and
    # paths stay short (108-byte sun_path). Logs are copied to workdir when the tunnel stops.
    scratch = Path(tempfile.mkdtemp(prefix="xfp-swan-", dir="/run"))
    tun = IkeTunnel(
        Charon(bed, "gw1", scratch / "gw1"),
        Charon(bed, "gw2", scratch / "gw2"),
        psk,
        scratch=scratch,
        logdir=workdir,
    )
    try:
        for daemon in (tun.gw2, tun.gw1):
            render(daemon.role, daemon.rundir, bed.plan, psk, daemon.rundir, esp)
            tun.daemons.append(daemon)
            daemon.start()
            daemon.load()
        if initiate:
            tun.gw1.initiate()
    except BaseException:
        tun.stop()
        raise
    return tun


@contextmanager
def ike_tunnel(
    bed: Testbed, workdir: Path, psk: str | None = None, esp: str = ESP_PROPOSALS
) -> Iterator[IkeTunnel]:
    tun = start_ike_tunnel(bed, workdir, psk, esp=esp)
    try:
        yield tun
    finally:
        tun.stop()


def have_strongswan() -> tuple[bool, str]:
    try:
        find_charon()
    except StrongswanError as e:
        return False, str(e)
    if shutil.which("swanctl") is None:
        return False, "swanctl not found: install Debian's strongswan-swanctl (`make setup`)"
    return True, ""


# -- `swanctl --raw` output ---------------------------------------------------------------------
_TOKEN = re.compile(r"\{|\}|\[|\]|=|[^\s{}\[\]=]+")


def parse_vici_raw(text: str) -> list[dict[str, Any]]:
    """Parse swanctl's --raw dump of vici messages into dicts.

    The dump writes a section as `name {...}`, a key as `key=value`, a list as `key=[a b]`
    (src/swanctl/command.c and src/libcharon/plugins/vici/vici_message.c, dump in raw mode).
    Each message starts with its type words (e.g. `list-sa event`), returned as its top key.
    """
    tokens = _TOKEN.findall(text)
    messages: list[dict[str, Any]] = []
    i = 0
    while i < len(tokens):
        words: list[str] = []
        while i < len(tokens) and tokens[i] != "{":
            words.append(tokens[i])
            i += 1
        if i >= len(tokens):
            break
        body, i = _section(tokens, i + 1)
        messages.append(body)
    return messages


def _section(tokens: list[str], i: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(tokens):
        tok = tokens[i]
        if tok == "}":
            return out, i + 1
        nxt = tokens[i + 1] if i + 1 < len(tokens) else "}"
        if nxt == "{":
            out[tok], i = _section(tokens, i + 2)
        elif nxt == "=":
            val = tokens[i + 2] if i + 2 < len(tokens) else "}"
            if val == "[":
                items: list[str] = []
                i += 3
                while i < len(tokens) and tokens[i] != "]":
                    items.append(tokens[i])
                    i += 1
                out[tok] = items
                i += 1
            elif val in ("}", "]") or (i + 3 < len(tokens) and tokens[i + 3] == "="):
                out[tok] = ""  # empty value: the next token is already the next key
                i += 2
            else:
                out[tok] = val
                i += 3
        else:
            i += 1  # a stray word: skip it rather than fail on a format detail
    return out, i
