# SPDX-License-Identifier: GPL-2.0-only
"""The controller as a child process on a test-bed gateway: how the demo and the VM tests run
it, the way an operator would (`xfrm-fastpath run` inside the gateway's network namespace),
and how they ask it questions (`xfrm-fastpath status|flows|sas --json`).

    ctl = ControllerProcess(bed, "gw1", workdir, config="[timers]\\nwatchdog = 5\\n")
    ctl.wait_started(900)       # BCC compiles four programs: long under qemu TCG
    ctl.status(); ctl.flows(); ctl.sas()
    ctl.stop()                  # SIGTERM: sequence numbers handed back, XDP detached
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from controller.paths import status_path
from testbed.bed import Testbed

CLI = [sys.executable, "-m", "controller.cli"]


class ControllerError(RuntimeError):
    """The controller did not start, or a CLI query failed; the message carries its log."""


class ControllerProcess:
    """`xfrm-fastpath run` in the namespace of `role`, logging to workdir/controller.log."""

    def __init__(self, bed: Testbed, role: str, workdir: Path, config: str = "") -> None:
        self.bed = bed
        self.role = role
        self.log = workdir / "controller.log"
        self.config = workdir / f"{role}.toml"
        self.config.write_text(config)
        self._status = status_path(f"/run/netns/{bed.ns(role)}")
        with self.log.open("w") as logf:
            self.proc = subprocess.Popen(
                [*bed.nsenter_argv(role), *CLI, "run", "--config", str(self.config)],
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.started_at = time.monotonic()

    def wait_started(self, within: float) -> float:
        """Wait until the controller publishes its first status (programs compiled, loaded and
        attached); the seconds it took. ControllerError if it exits or takes too long."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ControllerError(f"controller exited ({self.proc.returncode}): {self.tail()}")
            if self._published():
                return time.monotonic() - self.started_at
            time.sleep(0.2)
        raise ControllerError(f"controller not up after {within:.0f} s: {self.tail()}")

    def _published(self) -> bool:
        """Our process wrote the status file (a controller killed earlier leaves its own)."""
        try:
            return json.loads(self._status.read_text()).get("pid") == self.proc.pid
        except (OSError, ValueError):
            return False

    def published_status(self) -> dict[str, Any]:
        """The whole status file as the controller last wrote it (more than `status` prints:
        flows, SAs, the resequencer's counters)."""
        return json.loads(self._status.read_text())

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `xfrm-fastpath ARGS` in the gateway's namespace. Generous timeout: a Python
        start-up under qemu TCG on a busy machine takes tens of seconds."""
        return subprocess.run(
            [*self.bed.nsenter_argv(self.role), *CLI, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def _json(self, *args: str) -> Any:
        r = self.cli(*args, "--json")
        if r.returncode != 0:
            raise ControllerError(f"xfrm-fastpath {' '.join(args)}: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status(self) -> dict[str, Any]:
        return self._json("status")

    def flows(self) -> list[dict[str, Any]]:
        return self._json("flows")

    def sas(self) -> list[dict[str, Any]]:
        return self._json("sas")

    def fastpath_packets(self, direction: str) -> int:
        """Packets XDP encapsulated ("encap") or decapsulated ("decap") so far."""
        rows = self.status()["fastpath"]
        return sum(r["packets"] for r in rows if r["direction"] == direction)

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text()[-chars:]
        except OSError as e:
            return f"(no log: {e})"

    def stop(self, timeout: float = 120) -> int:
        """SIGTERM and wait; SIGKILL after `timeout`. The exit status (-9 when killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                return -9
        return self.proc.returncode
