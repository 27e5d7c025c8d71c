# SPDX-License-Identifier: GPL-2.0-only
"""The controller's configuration: a TOML file, validated in full before anything is attached.

    [interfaces]
    lan = ["lan"]            # clear side: XDP encap runs here
    wan = ["wan"]            # ESP side: XDP decap runs here

    [tables]
    flows = 65536            # flow table entries (the BPF map has at least 1024)
    sas = 1024               # SA table entries per direction; a full table leaves further
                             # SAs on the kernel path (sa_table_full). Maps pinned with
                             # other sizes by an earlier run are pinned anew at start.

    [timers]
    idle_timeout = 60.0      # seconds without a packet before a flow is removed
    watchdog = 5.0           # seconds: the datapath stops using an SA this long after the
                             # controller last refreshed it (kill -9 safety), or at hard expiry
    liveness = 10.0          # seconds: one packet per SA and direction this often takes the
                             # kernel path, so the IKE daemon's inactivity timeout and DPD see
                             # the traffic (the kernel's policy use_time); 0 = never

    [metrics]
    address = "127.0.0.1:9478"

    [log]
    level = "info"

    [datapath]
    xdp_mode = "auto"        # auto | native | generic

    [crypto]
    backend = "auto"         # auto | bpf | kernel: who seals and opens ESP on the fastpath.
                             # kernel: the xfp_crypto module's kfuncs (kmod/; SIMD ChaCha20-
                             # Poly1305 and AES-GCM), refused at start when it is not loaded;
                             # bpf: the BPF ChaCha20-Poly1305 (AES-GCM SAs stay on the kernel
                             # path); auto: kernel when the module is loaded and usable

Every key has a default; an unknown key, a wrong type or an out-of-range value is an error that
names the key. Interfaces are checked against the running system by `check_interfaces`.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_METRICS_PORT = 9478
LOG_LEVELS = ("debug", "info", "warning", "error")
XDP_MODES = ("auto", "native", "generic")
CRYPTO_BACKENDS = ("auto", "bpf", "kernel")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


@dataclass(frozen=True)
class Config:
    lan: tuple[str, ...] = ("lan",)
    wan: tuple[str, ...] = ("wan",)
    flow_table_size: int = 65536
    sa_table_size: int = 1024
    idle_timeout: float = 60.0
    watchdog: float = 5.0
    liveness: float = 10.0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = DEFAULT_METRICS_PORT
    log_level: str = "info"
    xdp_mode: str = "auto"
    crypto_backend: str = "auto"
    source: str = field(default="<defaults>", compare=False)

    @property
    def metrics_address(self) -> str:
        return f"{self.metrics_host}:{self.metrics_port}"


# (section, key) -> (Config attribute, expected python type(s), validator or None)
def _positive_int(lo: int, hi: int):
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi}"

    return check


def _positive_float(lo: float, hi: float):
    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be between {lo} and {hi} seconds"

    return check


def _liveness(v: Any) -> str | None:
    return None if v == 0 or 1 <= v <= 3600 else "must be 0 (never) or between 1 and 3600 seconds"


def _iface_list(v: Any) -> str | None:
    if not v:
        return "must name at least one interface"
    for name in v:
        if not isinstance(name, str) or not name or len(name) > 15 or "/" in name or " " in name:
            return f"{name!r} is not a valid interface name"
    if len(set(v)) != len(v):
        return "names an interface twice"
    return None


def _one_of(choices: tuple[str, ...]):
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _address(v: Any) -> str | None:
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "must be HOST:PORT, e.g. 127.0.0.1:9478"
    return None


SCHEMA: dict[tuple[str, str], tuple[str, type | tuple[type, ...], Any]] = {
    ("interfaces", "lan"): ("lan", list, _iface_list),
    ("interfaces", "wan"): ("wan", list, _iface_list),
    ("tables", "flows"): ("flow_table_size", int, _positive_int(16, 1 << 24)),
    ("tables", "sas"): ("sa_table_size", int, _positive_int(2, 1 << 20)),
    ("timers", "idle_timeout"): ("idle_timeout", (int, float), _positive_float(0.1, 86400)),
    ("timers", "watchdog"): ("watchdog", (int, float), _positive_float(0.5, 3600)),
    ("timers", "liveness"): ("liveness", (int, float), _liveness),
    ("metrics", "address"): ("metrics_address", str, _address),
    ("log", "level"): ("log_level", str, _one_of(LOG_LEVELS)),
    ("datapath", "xdp_mode"): ("xdp_mode", str, _one_of(XDP_MODES)),
    ("crypto", "backend"): ("crypto_backend", str, _one_of(CRYPTO_BACKENDS)),
}


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse and validate TOML text; raise ConfigError naming the first bad key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    values: dict[str, Any] = {"source": source}
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        for key, value in body.items():
            spec = SCHEMA.get((section, key))
            if spec is None:
                known = ", ".join(sorted(f"{s}.{k}" for s, k in SCHEMA))
                raise ConfigError(f"{source}: unknown key {section}.{key} (known: {known})")
            attr, typ, check = spec
            if isinstance(value, bool) or not isinstance(value, typ):
                raise ConfigError(
                    f"{source}: {section}.{key} has the wrong type ({type(value).__name__})"
                )
            problem = check(value) if check else None
            if problem:
                raise ConfigError(f"{source}: {section}.{key} {problem}")
            values[attr] = value
    if "lan" in values:
        values["lan"] = tuple(values["lan"])
    if "wan" in values:
        values["wan"] = tuple(values["wan"])
    if "metrics_address" in values:
        host, _, port = values.pop("metrics_address").rpartition(":")
        values["metrics_host"], values["metrics_port"] = host.strip("[]"), int(port)
    if "idle_timeout" in values:
        values["idle_timeout"] = float(values["idle_timeout"])
    if "watchdog" in values:
        values["watchdog"] = float(values["watchdog"])
    if "liveness" in values:
        values["liveness"] = float(values["liveness"])
    cfg = Config(**values)
    overlap = set(cfg.lan) & set(cfg.wan)
    if overlap:
        raise ConfigError(
            f"{source}: interface(s) {', '.join(sorted(overlap))} are both lan and wan"
        )
    return cfg


def load_config(path: str | Path | None) -> Config:
    """Load a config file, or the defaults when path is None."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_config(text, source=str(p))


def check_interfaces(cfg: Config) -> dict[str, int]:
    """Map every configured interface to its ifindex in the current network namespace, or raise
    ConfigError naming the missing ones (before anything is attached)."""
    found: dict[str, int] = {}
    missing: list[str] = []
    for name in (*cfg.lan, *cfg.wan):
        try:
            found[name] = socket.if_nametoindex(name)
        except OSError:
            missing.append(name)
    if missing:
        raise ConfigError(
            f"{cfg.source}: interface(s) not found in this network namespace: {', '.join(missing)}"
        )
    return found
