# SPDX-License-Identifier: GPL-2.0-only
"""The pure flow state: indexing, invalidation by every fact a flow relied on, invariants."""

from __future__ import annotations

import random

from controller.core.state import Cause, Direction, FlowKey, FlowRecord, FlowState, SaRef

SA1 = SaRef("192.0.2.2", 0x1001, reqid=1)
SA2 = SaRef("192.0.2.2", 0x1002, reqid=2)


def rec(n: int, sa: SaRef = SA1, policy: int = 8, neigh: str = "192.0.2.2") -> FlowRecord:
    key = FlowKey(2, Direction.ENCAP, "10.1.0.2", "10.2.0.2", 17, 1000 + n, 53)
    return FlowRecord(
        key,
        sa,
        egress_ifindex=3,
        src_mac="02:00:00:00:00:01",
        dst_mac="02:00:00:00:00:02",
        policy_index=policy,
        neighbour=(3, neigh),
    )


def test_add_and_invalidate_by_each_fact() -> None:
    st = FlowState()
    a, b, c = rec(1), rec(2, sa=SA2, policy=16), rec(3, neigh="192.0.2.9")
    for r in (a, b, c):
        st.add(r)
    assert len(st) == 3, "three flows installed"
    assert st.flows_of_sa(SA1) == {a.key, c.key}, "SA index"
    assert st.flows_of_spi(0x1002) == {b.key}, "SPI lookup"
    assert st.flows_of_policy(16) == {b.key}, "policy index"
    assert st.flows_of_neigh(3, "192.0.2.9") == {c.key}, "neighbour index"
    assert st.flows_of_link(2) == {a.key, b.key, c.key}, "ingress link index"
    removed = st.remove(st.flows_of_neigh(3, "192.0.2.9"), Cause.NEIGH_CHANGED)
    assert [r.key for r in removed] == [c.key], "neighbour change removes only its flow"
    assert st.invalidations[Cause.NEIGH_CHANGED] == 1, "counted under its cause"
    st.remove(st.flows_of_sa(SA1), Cause.SA_DELETED)
    assert set(st.flows) == {b.key}, "SA delete removes the flows of that SA only"
    st.check_invariants()
    st.remove(st.flows_of_link(3), Cause.LINK_CHANGED)
    assert len(st) == 0, "egress link down removes everything leaving by it"
    st.check_invariants()
    assert not st.flows_of_policy(16), "indexes emptied"


def test_replacing_a_flow_reindexes() -> None:
    st = FlowState()
    st.add(rec(1))
    old = st.add(rec(1, sa=SA2))
    assert old is not None and old.sa == SA1, "the replaced record is returned"
    assert not st.flows_of_sa(SA1), "old SA no longer references the flow"
    assert st.flows_of_sa(SA2) == {rec(1).key}, "new SA does"
    st.check_invariants()


def test_idle_and_capacity() -> None:
    st = FlowState(capacity=2)
    r1, r2 = rec(1), rec(2)
    st.add(r1)
    st.add(r2)
    assert st.full(), "capacity reached"
    r1.last_active_ns = 0
    r2.last_active_ns = 10**15
    assert st.idle(now_ns=10**15 + 1, timeout_s=1.0) == {r1.key}, "only the quiet flow is idle"


def test_random_operations_keep_invariants() -> None:
    rng = random.Random(7)
    st = FlowState()
    sas = [SaRef("192.0.2.2", 0x2000 + i) for i in range(4)]
    for _ in range(2000):
        op = rng.random()
        if op < 0.6:
            st.add(
                rec(
                    rng.randrange(50),
                    sa=rng.choice(sas),
                    policy=rng.randrange(4),
                    neigh=f"192.0.2.{rng.randrange(3)}",
                )
            )
        elif op < 0.75:
            st.remove(st.flows_of_sa(rng.choice(sas)), Cause.SA_DELETED)
        elif op < 0.9:
            st.remove(st.flows_of_policy(rng.randrange(4)), Cause.POLICY_CHANGED)
        else:
            st.remove(st.flows_of_neigh(3, f"192.0.2.{rng.randrange(3)}"), Cause.NEIGH_CHANGED)
        st.check_invariants()
    before = sum(st.invalidations.values())
    st.remove(list(st.flows), Cause.SHUTDOWN)
    assert len(st) == 0 and sum(st.invalidations.values()) >= before, "counters only grow"
