# SPDX-License-Identifier: GPL-2.0-only
"""`xfrm-fastpath`: run the controller, or ask a running one how it is doing.

    xfrm-fastpath run --config /etc/xfrm-fastpath/config.toml
    xfrm-fastpath status [--json]     # fastpath share per direction, punts, drops, health
    xfrm-fastpath flows  [--json]     # learned flows
    xfrm-fastpath sas    [--json]     # each SA: offloaded, or why not

status/flows/sas read the running controller's status file (per network namespace, under
/run/xfrm-fastpath, root only). `sas` works without a running controller too: it reads the
kernel's SAs and says which the fastpath could serve. Keys never appear in any output.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from controller.config import ConfigError, load_config
from controller.paths import pid_alive, status_path

EXIT_CONFIG = 2
EXIT_NOT_RUNNING = 3


def _status_path() -> Path:
    return status_path()


def _read_status() -> dict[str, Any] | None:
    """The running controller's status, or None. A file left by a controller that was killed
    (its pid gone) is stale: None too."""
    try:
        st = json.loads(_status_path().read_text())
    except (OSError, ValueError):
        return None
    pid = st.get("pid") if isinstance(st, dict) else None
    if not isinstance(pid, int) or not pid_alive(pid):
        return None
    return st


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"xfrm-fastpath: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=getattr(logging, (args.log_level or cfg.log_level).upper()),
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("pyroute2").setLevel(logging.WARNING)  # its debug output is per message
    from controller.agent.daemon import run

    try:
        return run(cfg)
    except ConfigError as e:
        print(f"xfrm-fastpath: {e}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_status(args: argparse.Namespace) -> int:
    st = _read_status()
    if st is None or st.get("metrics") is None:
        print("xfrm-fastpath: no controller is running in this network namespace", file=sys.stderr)
        return EXIT_NOT_RUNNING
    from controller.telemetry.snapshot import snapshot_from_json
    from controller.telemetry.status_text import format_status

    if args.json:
        print(json.dumps(st["metrics"], indent=2))
        return 0
    print(format_status(snapshot_from_json(json.dumps(st["metrics"]))))
    if st.get("crypto"):  # the backend chosen at start (controller/core/crypto.py)
        print(f"crypto backend: {st['crypto']['backend']} ({st['crypto']['why']})")
    return 0


def cmd_flows(args: argparse.Namespace) -> int:
    st = _read_status()
    if st is None:
        print("xfrm-fastpath: no controller is running in this network namespace", file=sys.stderr)
        return EXIT_NOT_RUNNING
    flows = st.get("flows", [])
    if args.json:
        print(json.dumps(flows, indent=2))
        return 0
    print(f"{'dir':6} {'proto':>5} {'source':>21} {'destination':>21} {'spi':>10} {'learn ms':>9}")
    for f in flows:
        print(
            f"{f['direction']:6} {f['proto']:>5} {f['saddr'] + ':' + str(f['sport']):>21} "
            f"{f['daddr'] + ':' + str(f['dport']):>21} {f['spi']:>10} "
            f"{f['learn_latency_ms']:>9.2f}"
        )
    print(f"{len(flows)} flow(s)")
    return 0


def _kernel_sas() -> list[dict[str, Any]]:
    """The kernel's SAs with no controller running: which the fastpath could serve, on the
    backend `[crypto] backend = auto` would choose now (kernel when the module is loaded)."""
    from controller.agent.status import kernel_path_why
    from controller.core.crypto import Backend, sa_backend
    from controller.datapath import kcrypto
    from controller.netlink.xfrm import XfrmSocket

    loaded = kcrypto.module_loaded()
    backend = Backend.KERNEL if loaded else Backend.BPF
    probe = f"the {kcrypto.MODULE} module is {'loaded' if loaded else 'not loaded'}"
    out = []
    with XfrmSocket() as x:
        for sa in x.sas():
            fits = [sa_backend(sa, backend, outbound) for outbound in (False, True)]
            ok = any(b is not None for b, _ in fits)
            why = next((w for b, w in fits if b is None), "ok")
            out.append(
                {
                    "spi": f"0x{sa.spi:08x}",
                    "src": str(sa.src),
                    "dst": str(sa.dst),
                    "reqid": sa.reqid,
                    "algorithm": sa.alg_name,
                    "offloaded": False,
                    "direction": None,
                    "supported": ok,
                    "crypto": next((str(b) for b, _ in fits if b is not None), None),
                    "crypto_why": " / ".join(dict.fromkeys(w for _, w in fits)),
                    "reason": "no controller running"
                    if ok
                    else kernel_path_why(sa, why, backend, probe),
                    "flows": 0,
                }
            )
    return out


def cmd_sas(args: argparse.Namespace) -> int:
    st = _read_status()
    sas = st["sas"] if st is not None else _kernel_sas()
    if args.json:
        print(json.dumps(sas, indent=2))
        return 0
    print(
        f"{'spi':10} {'src':>15} {'dst':>15} {'reqid':>5} {'offloaded':>9} {'flows':>5} "
        f"{'backend':>7}  why"
    )
    for s in sas:
        crypto = f" ({s['crypto_why']})" if s.get("crypto") else ""
        print(
            f"{s['spi']:10} {s['src']:>15} {s['dst']:>15} {s['reqid']:>5} "
            f"{'yes' if s['offloaded'] else 'no':>9} {s['flows']:>5} {s.get('crypto') or '-':>7}  "
            f"{s['algorithm'] or '-'}: {s['reason']}{crypto}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xfrm-fastpath", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the controller (until SIGTERM/SIGINT)")
    r.add_argument("--config", help="TOML config file (default: built-in defaults)")
    r.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    r.set_defaults(func=cmd_run)
    for name, func, text in (
        ("status", cmd_status, "fastpath figures of the running controller"),
        ("flows", cmd_flows, "flows on the fastpath"),
        ("sas", cmd_sas, "SAs: offloaded, or why not"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
