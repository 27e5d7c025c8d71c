# SPDX-License-Identifier: GPL-2.0-only
"""The controller as an operator runs it, on the host test bed (no kernel ESP needed): a bad
config or a missing interface is refused before anything is attached; `run` attaches XDP and
the TC resequencer inside gw1, answers `status`/`flows`/`sas` and serves metrics; SIGTERM
detaches everything and exits 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.bed import Testbed

CLI = [sys.executable, "-m", "controller.cli"]


def _cli(bed: Testbed, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*bed.nsenter_argv("gw1"), *CLI, *args], capture_output=True, text=True, timeout=timeout
    )


def _wait(pred, within: float, what):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out after {within}s waiting for {what()}")


def test_bad_config_and_missing_interface_are_refused(bed: Testbed, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[tables]\nflows = 'lots'\n")
    r = _cli(bed, "run", "--config", str(bad))
    assert r.returncode == 2, f"bad config exits 2: {r.returncode} {r.stderr}"
    assert "tables.flows has the wrong type" in r.stderr, f"says which key: {r.stderr}"
    missing = tmp_path / "missing.toml"
    missing.write_text("[interfaces]\nlan = ['lan']\nwan = ['wan7']\n")
    r = _cli(bed, "run", "--config", str(missing))
    assert r.returncode == 2, f"missing interface exits 2: {r.returncode} {r.stderr}"
    assert "wan7" in r.stderr, f"names the missing interface: {r.stderr}"
    links = bed.ip("gw1", "link", "show").stdout
    assert " xdp" not in links, "nothing was attached"


@pytest.fixture
def own_pins() -> Iterator[None]:
    """The controller pins its maps at the default path: remove them after the test unless
    they were there before (another controller's), so no test leaves pins behind."""
    import shutil

    from controller.datapath.xdp import DEFAULT_PIN_DIR

    existed = DEFAULT_PIN_DIR.exists()
    yield
    if not existed:
        shutil.rmtree(DEFAULT_PIN_DIR, ignore_errors=True)


def _run_until_up(bed: Testbed, cfg: Path, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as logf:
        proc = subprocess.Popen(
            [*bed.nsenter_argv("gw1"), *CLI, "run", "--config", str(cfg)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            text=True,
        )
    _wait(
        lambda: _cli(bed, "status", "--json").returncode == 0 or proc.poll() is not None,
        300,  # three BCC compiles; slow on a loaded 2-core machine
        lambda: f"controller status ({log.read_text()[-2000:]})",
    )
    assert proc.poll() is None, f"controller up: {log.read_text()[-2000:]}"
    return proc


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_run_status_and_sigterm_detach(bed: Testbed, tmp_path: Path, own_pins: None) -> None:
    cfg = tmp_path / "gw1.toml"
    cfg.write_text("[metrics]\naddress = '127.0.0.1:9478'\n[timers]\nwatchdog = 2\n")
    log = tmp_path / "controller.log"
    proc = _run_until_up(bed, cfg, log)
    try:
        links = bed.ip("gw1", "-d", "link", "show").stdout
        assert links.count("prog/xdp") >= 2, f"XDP on lan and wan: {links}"
        tc = bed.cmd("gw1", ["tc", "filter", "show", "dev", "wan", "egress"]).stdout
        assert "tc_reseq" in tc, f"resequencer on wan egress: {tc}"
        status = json.loads(_cli(bed, "status", "--json").stdout)
        assert status["up"] is True or status.get("up") == 1, f"controller up: {status}"
        flows = _cli(bed, "flows")
        assert flows.returncode == 0 and "0 flow(s)" in flows.stdout, flows.stdout
        sas = _cli(bed, "sas", "--json")
        assert sas.returncode == 0 and json.loads(sas.stdout) == [], "no SAs on this bed"
        metrics = bed.cmd(
            "gw1",
            [
                sys.executable,
                "-c",
                "import urllib.request;print(urllib.request.urlopen("
                "'http://127.0.0.1:9478/metrics',timeout=5).read().decode())",
            ],
        )
        assert "xfrm_fastpath_up 1.0" in metrics.stdout, "metrics served inside gw1"
        # Traffic still flows with the controller attached (no SA: every packet is punted).
        assert bed.ping("lan", bed.addr("REMOTE_HOST"), count=3), "clear forwarding unharmed"
    finally:
        rc = _stop(proc)
    assert rc == 0, f"SIGTERM exits 0: {rc}\n{log.read_text()[-3000:]}"
    links = bed.ip("gw1", "-d", "link", "show").stdout
    assert "prog/xdp" not in links, f"XDP detached: {links}"
    tc = bed.cmd("gw1", ["tc", "filter", "show", "dev", "wan", "egress"]).stdout
    assert "tc_reseq" not in tc, f"resequencer detached: {tc}"
    assert _cli(bed, "status").returncode == 3, "status says no controller runs"
    assert "XDP detached" in log.read_text(), "the log says what happened"


def test_status_left_by_a_killed_controller_is_stale(bed: Testbed) -> None:
    """kill -9 leaves status.json behind: the CLI must not report a dead controller as up."""
    from controller.paths import status_path

    path = status_path(f"/run/netns/{bed.ns('gw1')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(json.dumps({"pid": dead.pid, "metrics": {}, "flows": [], "sas": []}))
    try:
        r = _cli(bed, "status")
        assert r.returncode == 3, f"not running (exit 3): {r.returncode} {r.stdout} {r.stderr}"
        assert "no controller is running" in r.stderr, r.stderr
    finally:
        path.unlink()


def test_restart_with_other_table_sizes_pins_anew(
    bed: Testbed, tmp_path: Path, own_pins: None
) -> None:
    """`[tables]` sizes changed between two runs take effect: BCC would reuse the maps pinned
    by the first run at their old sizes, so the controller pins anew (after handing back what
    the old maps held)."""
    import ctypes
    import os

    from controller.datapath.bpfsys import map_info
    from controller.datapath.xdp import DEFAULT_PIN_DIR, open_pinned_map

    def pinned_sizes() -> dict[str, int]:
        out = {}
        for name in ("xfp_flows", "xfp_sa_out", "xfp_sa_in", "xfp_sa_out_spi"):
            h = open_pinned_map(DEFAULT_PIN_DIR / name, ctypes.c_uint8, ctypes.c_uint8)
            try:
                out[name] = int(map_info(h.fd)["max_entries"])
            finally:
                os.close(h.fd)
        return out

    for sas, flows, port in ((4, 2048, 9481), (8, 4096, 9482)):
        cfg = tmp_path / f"gw1-{sas}.toml"
        cfg.write_text(
            f"[metrics]\naddress = '127.0.0.1:{port}'\n[tables]\nsas = {sas}\nflows = {flows}\n"
        )
        log = tmp_path / f"controller-{sas}.log"
        proc = _run_until_up(bed, cfg, log)
        try:
            sizes = pinned_sizes()
        finally:
            rc = _stop(proc)
        assert rc == 0, f"SIGTERM exits 0: {log.read_text()[-3000:]}"
        want = {"xfp_flows": flows, "xfp_sa_out": sas, "xfp_sa_in": sas, "xfp_sa_out_spi": sas}
        assert sizes == want, f"maps sized by the config: {sizes}\n{log.read_text()[-2000:]}"
    assert "recreating them" in log.read_text(), "the second run says it pinned anew"
