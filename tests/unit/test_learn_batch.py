# SPDX-License-Identifier: GPL-2.0-only
"""Learning a burst: the agent takes every waiting candidate at once (Agent.on_candidates) and
writes their flow entries in one batch (DatapathPort.put_flows), with the outcome of one
candidate at a time: the same entries, refusals and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from agent_bed import AgentBed

from controller.config import Config
from controller.core.reasons import RejectReason


@pytest.fixture
def ab(tmp_path: Path) -> AgentBed:
    return AgentBed(tmp_path)


def _burst(bed: AgentBed, n: int) -> list:
    return [bed.encap(5000 + i) for i in range(n)] + [bed.decap(dport=5000 + i) for i in range(n)]


def _flows(bed: AgentBed) -> dict[bytes, bytes]:
    return {k: bytes(v) for k, v in bed.dp.flow_map.elems.items()}


def test_a_burst_is_written_in_one_batch_as_one_at_a_time_would(tmp_path: Path) -> None:
    one = AgentBed(tmp_path / "one")
    for c in _burst(one, 200):
        one.agent.on_candidate(c)
    many = AgentBed(tmp_path / "many")
    many.agent.on_candidates(_burst(many, 200))

    assert len(many.dp.flow_map) == 400, "every flow of the burst installed"
    assert _flows(many) == _flows(one), "the same entries as one candidate at a time"
    assert set(many.agent.flows.flows) == set(one.agent.flows.flows), "the same records"
    assert not many.metrics.rejects and not one.metrics.rejects, "nothing refused"
    assert len(many.metrics.learn_latencies) == 400, "a learn latency per flow"
    puts = [e for e in many.dp.journal if e[0] in ("put_flow", "put_flows")]
    # The flows waiting are written before an SA is offloaded (offloading may remove flows):
    # the encap flows go when the inbound SA is first needed, the decap flows at the end.
    assert puts == [("put_flows", 200), ("put_flows", 200)], f"batched writes: {puts}"


def test_the_same_flow_twice_in_a_burst_is_written_once(ab: AgentBed) -> None:
    bed = ab
    bed.agent.on_candidates([bed.encap(4000), bed.encap(4001), bed.encap(4000)])
    assert len(bed.dp.flow_map) == 2 and len(bed.agent.flows) == 2, "two flows, each once"
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"


def test_a_burst_past_the_table_size_is_refused_from_there(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, cfg=Config(flow_table_size=3))
    bed.agent.on_candidates([bed.encap(4000 + i) for i in range(7)])
    assert len(bed.dp.flow_map) == 3, "the table's size installed"
    assert bed.metrics.rejects == {RejectReason.TABLE_FULL: 4}, "the rest refused, counted"


def test_a_failed_batch_is_written_flow_by_flow(ab: AgentBed) -> None:
    bed = ab
    """When the batch write fails, each flow is written alone: a flow whose own write fails
    is refused (install_failed), the others are installed."""
    bed.agent.on_candidate(bed.encap(3999))  # the SA offloaded: the burst is one batch
    bad = bed.dp_key(bed.encap(4002))
    real_put = bed.dp.put_flow

    def put_flows(items: object) -> None:
        raise OSError(28, "no space left")

    def put_flow(key: object, val: object) -> None:
        if bytes(key) == bytes(bad):  # type: ignore[call-overload]
            raise OSError(28, "no space left")
        real_put(key, val)  # type: ignore[arg-type]

    bed.dp.put_flows = put_flows  # type: ignore[method-assign]
    bed.dp.put_flow = put_flow  # type: ignore[method-assign]
    bed.agent.on_candidates([bed.encap(4000 + i) for i in range(5)])
    assert len(bed.dp.flow_map) == 5 and len(bed.agent.flows) == 5, "4 + the first installed"
    assert bed.dp.get_flow(bad) is None, "the failing flow is not in the map"
    assert bed.metrics.rejects == {RejectReason.INSTALL_FAILED: 1}, "and is refused, counted"


def test_shed_first_packets_are_counted(ab: AgentBed) -> None:
    """The daemon hands the agent the learner's running shed count each turn; what it grew by
    is counted once under learn_shed (status metrics, Prometheus)."""
    for total in (0, 3, 3, 10):
        ab.agent.learner_shed(total)
    assert ab.metrics.rejects == {RejectReason.LEARN_SHED: 10}, "10 shed, each counted once"
