# SPDX-License-Identifier: GPL-2.0-only
"""The names controller/agent imported from here before telemetry was split by layer (see
controller/telemetry/__init__.py). Import from `controller.telemetry` instead."""

from controller.telemetry.collect import MetricsSource, datapath_parts
from controller.telemetry.exposition import Exporter
from controller.telemetry.snapshot import MetricsSnapshot, snapshot_to_dict

__all__ = ["Exporter", "MetricsSnapshot", "MetricsSource", "datapath_parts", "snapshot_to_dict"]
