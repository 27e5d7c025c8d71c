# SPDX-License-Identifier: GPL-2.0-only
"""The configuration parser accepts good files and names the key of every bad one."""

from __future__ import annotations

import pytest

from controller.config import Config, ConfigError, check_interfaces, load_config, parse_config

GOOD = """
[interfaces]
lan = ["lan0", "lan1"]
wan = ["wan"]
[tables]
flows = 1024
[timers]
idle_timeout = 30
watchdog = 2.5
liveness = 0
[metrics]
address = "0.0.0.0:9100"
[log]
level = "debug"
[datapath]
xdp_mode = "generic"
"""


def test_good_config_parses() -> None:
    cfg = parse_config(GOOD)
    assert cfg.lan == ("lan0", "lan1"), "lan interfaces read in order"
    assert cfg.wan == ("wan",), "wan interface read"
    assert cfg.flow_table_size == 1024, "table size read"
    assert cfg.sa_table_size == Config().sa_table_size, "unset keys keep defaults"
    assert cfg.idle_timeout == 30.0 and isinstance(cfg.idle_timeout, float), "ints become floats"
    assert (cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 9100), "metrics address split"
    assert cfg.log_level == "debug" and cfg.xdp_mode == "generic", "enums read"
    assert cfg.liveness == 0.0 and Config().liveness == 10.0, "liveness 0 = never; default 10 s"


def test_defaults() -> None:
    cfg = load_config(None)
    assert cfg.metrics_port == 9478, "default metrics port is 9478"
    assert parse_config("") == cfg, "an empty file is the defaults"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[interfaces]\nlan = []", "interfaces.lan must name at least one"),
        ("[interfaces]\nlan = ['a/b']", "not a valid interface name"),
        ("[interfaces]\nlan = ['x']\nwan = ['x']", "both lan and wan"),
        ("[tables]\nflows = 1", "tables.flows must be between"),
        ("[tables]\nflows = 'many'", "tables.flows has the wrong type"),
        ("[tables]\nflows = true", "tables.flows has the wrong type"),
        ("[timers]\nidle_timeout = -1", "timers.idle_timeout must be between"),
        ("[timers]\nliveness = 0.5", "timers.liveness must be 0 (never) or between 1"),
        ("[metrics]\naddress = 'nohost'", "metrics.address must be HOST:PORT"),
        ("[metrics]\naddress = 'h:70000'", "metrics.address must be HOST:PORT"),
        ("[log]\nlevel = 'loud'", "log.level must be one of"),
        ("[tables]\nflow = 5", "unknown key tables.flow"),
        ("tables = 5", "[tables] must be a table"),
        ("[tables\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_problem(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, source="gw.toml")
    assert needle in str(err.value), f"error {err.value!s} mentions {needle!r}"
    assert str(err.value).startswith("gw.toml"), "error names the file"


def test_missing_file_is_clear(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_missing_interface_is_reported_before_attach() -> None:
    cfg = parse_config("[interfaces]\nlan = ['lo']\nwan = ['nosuchdev0']")
    with pytest.raises(ConfigError, match="nosuchdev0"):
        check_interfaces(cfg)
    found = check_interfaces(Config(lan=("lo",), wan=()))
    assert found == {"lo": 1}, f"lo resolves to ifindex 1: {found}"
