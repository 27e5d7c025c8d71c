# SPDX-License-Identifier: GPL-2.0-only
"""What the controller can tell an operator, in layers that can be read alone:

- `labels`: label values, derived from the enums they name (direction, datapath reason, SPI).
- `snapshot`: `MetricsSnapshot`, plain data (what the controller knows at one instant), and its
  JSON form.
- `collect`: the only stateful layer. `MetricsSource` turns the datapath's per-CPU counters
  (summed), the flow state and the controller's health into snapshots, absorbs counter resets
  (a datapath reload recreates its maps at zero) and accumulates the learn latency histogram.
- `exposition`: the Prometheus exporter (HTTP /metrics and /status.json). It only reads
  snapshots, through the provider it is given (`MetricsSource.snapshot`).
- `status_text`: a snapshot as the terminal report of `xfrm-fastpath status`.

The names the agent needs are re-exported here.
"""

from controller.telemetry.collect import MetricsSource, datapath_parts
from controller.telemetry.exposition import Exporter
from controller.telemetry.snapshot import MetricsSnapshot, snapshot_to_dict

__all__ = ["Exporter", "MetricsSnapshot", "MetricsSource", "datapath_parts", "snapshot_to_dict"]
