# SPDX-License-Identifier: GPL-2.0-only
"""The agent driven in-process: learn, validate, install, rekey, expiry, invalidation and
restart, against the project's XFRM model (tests/lib/fake_kernel.py) and in-memory maps
(tests/lib/memory_datapath.py). No root, no BPF, no netlink: what the real kernel and maps do
with the same calls is covered by tests/host and tests/vm."""

from __future__ import annotations

import errno
import time
from dataclasses import replace
from pathlib import Path

import pytest
from agent_bed import (
    GW1,
    GW1_LAN_MAC,
    GW1_WAN_MAC,
    GW2,
    GW2_MAC,
    IV_MASK,
    LAN_HOST_MAC,
    LAN_IF,
    MTU,
    REMOTE2_HOST,
    SPI_IN,
    SPI_OUT,
    SPI_OUT2,
    WAN_IF,
    AgentBed,
    key_of,
    make_sa,
    one_tunnel,
    second_tunnel,
)
from fake_kernel import FakeKernel

from controller.agent import agent as agent_module
from controller.agent.offload import HANDBACK_MARGIN, SEQ_JUMP
from controller.config import Config
from controller.core.reasons import RejectReason
from controller.core.validate import NUD_PERMANENT, NeighInfo, RouteInfo
from controller.core.xfrm_model import (
    Action,
    AeState,
    Algorithm,
    DefaultAction,
    DefaultPolicy,
    Dir,
    LifetimeCfg,
    LifetimeCur,
    Policy,
    Sa,
    Secret,
    Selector,
)
from controller.datapath import abi
from controller.datapath.abi import SaOut
from controller.netlink.nlsock import NetlinkError
from controller.paths import STATUS_FILE


@pytest.fixture
def bed(tmp_path: Path) -> AgentBed:
    return AgentBed(tmp_path)


def out_entry(bed: AgentBed, spi: int = SPI_OUT) -> tuple[int, SaOut] | None:
    """(sa_id, entry) of the outbound SA entry for `spi`, None when there is none."""
    for sa_id, e in bed.dp.outbound_sa_entries():
        if abi.from_be32(e.spi) == spi:
            return sa_id, e
    return None


def kernel_oseq(bed: AgentBed, spi: int = SPI_OUT, dst: str = GW2) -> int:
    return bed.kernel.states[(dst, spi)].replay.oseq64


def assert_empty(bed: AgentBed, what: str) -> None:
    assert not bed.dp.flow_map.elems, f"{what}: no flow entry left"
    assert not bed.dp.sa_out_map.elems, f"{what}: no outbound SA entry left"
    assert not bed.dp.sa_in_map.elems, f"{what}: no inbound SA entry left"
    assert not bed.dp.watchdog_map.elems, f"{what}: no watchdog entry left"
    assert not bed.reseq.indexed(), f"{what}: nothing left in the resequencer's SPI index"


# -- learn, validate, install ----------------------------------------------------------------
def test_encap_first_packet_is_installed(bed: AgentBed) -> None:
    cand = bed.encap()
    oseq = kernel_oseq(bed)
    assert cand.spi == SPI_OUT and cand.esp_seq == oseq, "the kernel sent it on its SA"
    bed.agent.on_candidate(cand)

    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    got = out_entry(bed)
    assert got is not None, "the outbound SA was written into the datapath"
    sa_id, sa = got
    assert sa.seq == oseq + 1 + SEQ_JUMP, "the datapath starts SEQ_JUMP above the kernel's oseq"
    assert sa.iv_mask == IV_MASK, "IV mask = the kernel's IV XOR its sequence number (seqiv)"
    assert abi.ip_of(sa.saddr) == GW1 and abi.ip_of(sa.daddr) == GW2, "outer addresses"
    assert bytes(sa.key) + bytes(sa.salt) == key_of(SPI_OUT).reveal(), "key and salt"
    assert sa.flags & abi.SA_F_OFFLOAD, "the entry is marked offloaded"
    assert sa.egress_ifindex == WAN_IF and sa.mtu == MTU, "the SA leaves by the WAN link"
    wd = bed.dp.watchdog(sa_id)
    assert wd is not None and wd > time.monotonic_ns(), "a live watchdog"
    assert bed.reseq.indexed() == [(SPI_OUT, GW2, sa_id)], "the resequencer numbers the SA"

    flow = bed.dp.get_flow(bed.dp_key(cand))
    assert flow is not None, "the flow entry is written under the candidate's 5-tuple"
    assert flow.sa_id == sa_id, "the flow names the outbound SA"
    assert flow.egress_ifindex == WAN_IF, "the flow leaves by the WAN device"
    assert bytes(flow.dmac) == abi.mac_bytes(GW2_MAC), "next hop's MAC (validated neighbour)"
    assert bytes(flow.smac) == abi.mac_bytes(GW1_WAN_MAC), "our WAN MAC"
    assert flow.mtu == MTU, "the WAN link's MTU"
    assert flow.flags & abi.FLOW_F_ACTIVE, "the flow is active"
    assert len(bed.metrics.learn_latencies) == 1, "one learn latency observed"

    bed.agent.on_candidate(bed.encap())
    assert len(bed.dp.flow_map) == 1, "the same flow seen again is not written twice"
    assert len(bed.dp.sa_out_map) == 1, "nor is its SA"


def test_decap_first_packet_is_installed(bed: AgentBed) -> None:
    cand = bed.decap()
    bed.agent.on_candidate(cand)
    assert not bed.metrics.rejects, f"nothing refused: {dict(bed.metrics.rejects)}"
    sa = bed.dp.inbound_sa(SPI_IN, GW1)
    assert sa is not None, "the inbound SA was written under (SPI, our address)"
    assert sa.seq_top == 20, "the datapath's window starts at the kernel's (seq 20)"
    assert sa.replay_window == 128, "the SA's replay window"
    assert bytes(sa.key) + bytes(sa.salt) == key_of(SPI_IN).reveal(), "key and salt"
    flow = bed.dp.get_flow(bed.dp_key(cand))
    assert flow is not None, "the flow entry is written"
    assert flow.sa_id == sa.sa_id, "the flow names the inbound SA"
    assert flow.egress_ifindex == LAN_IF, "the clear packet leaves by the LAN device"
    assert bytes(flow.dmac) == abi.mac_bytes(LAN_HOST_MAC), "the LAN host's MAC"
    assert bytes(flow.smac) == abi.mac_bytes(GW1_LAN_MAC), "our LAN MAC"
    assert flow.mtu == MTU, "the LAN link's MTU"
    assert not bed.reseq.indexed(), "inbound SAs are not the resequencer's"


def test_status_lists_flows_and_sas(bed: AgentBed) -> None:
    bed.agent.on_candidate(bed.encap())
    bed.agent.on_candidate(bed.decap())
    bed.agent.tick()
    st = bed.agent.status()
    assert {f["direction"] for f in st["flows"]} == {"encap", "decap"}, "both flows listed"
    offloaded = {s["spi"]: s["offloaded"] for s in st["sas"]}
    assert offloaded == {f"0x{SPI_OUT:08x}": True, f"0x{SPI_IN:08x}": True}, "both SAs offloaded"
    assert (bed.run_dir / STATUS_FILE).exists(), "tick writes the status file"


# -- rejected candidates: counted, nothing (half) installed ------------------------------------
def _unsupported(bed: AgentBed) -> None:
    gcm = Algorithm("aead", "rfc4106(gcm(aes))", 160, Secret(bytes(20)), 128)
    bed.kernel.add_sa(make_sa(SPI_OUT, GW1, GW2, aead=gcm), oseq=10)


REFUSALS = {
    "no policy": (lambda b: b.kernel.policy_list.clear(), RejectReason.NOT_PROTECTED),
    "default forward drop": (
        lambda b: (
            b.kernel.policy_list.clear(),
            b.kernel.set_default(DefaultPolicy(forward=DefaultAction.BLOCK)),
        ),
        RejectReason.FWD_POLICY_BLOCKS,
    ),
    "block policy": (
        lambda b: b.kernel.add_policy(
            Policy(Selector.of("10.1.0.0/16", "10.2.0.0/16"), Dir.OUT, 10, Action.BLOCK, index=9)
        ),
        RejectReason.OUT_POLICY_BLOCKS,
    ),
    "SA missing": (
        lambda b: b.kernel.delete_sa(make_sa(SPI_OUT, GW1, GW2)),
        RejectReason.NO_SA,
    ),
    "unsupported algorithm": (_unsupported, RejectReason.SA_UNSUPPORTED),
    "no route": (lambda b: b.kernel.routes.clear(), RejectReason.NO_ROUTE),
    "neighbour moved": (
        lambda b: b.kernel.set_neigh(WAN_IF, GW2, NeighInfo("02:00:00:00:00:99", NUD_PERMANENT)),
        RejectReason.NEIGHBOUR_MISMATCH,
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_encap_refused(bed: AgentBed, case: str) -> None:
    change, reason = REFUSALS[case]
    change(bed)
    for ev in bed.kernel.take_events():  # the agent hears of the change as on a gateway
        bed.agent.on_kernel_event(ev)
    bed.agent.on_candidate(bed.encap(spi=SPI_OUT))
    assert bed.metrics.rejects == {reason: 1}, f"{case}: refused as {reason}"
    assert_empty(bed, case)


def test_decap_refused_without_fwd_policy(bed: AgentBed) -> None:
    fwd_in = next(p for p in bed.kernel.policy_list if p.dir is Dir.FWD and p.index == 3)
    bed.agent.on_kernel_event(bed.kernel.delete_policy(fwd_in))
    bed.agent.on_candidate(bed.decap())
    assert bed.metrics.rejects == {RejectReason.NOT_PROTECTED: 1}, "no FWD policy protects it"
    assert_empty(bed, "decap without FWD policy")


def test_clear_forwarding_is_left_to_the_kernel(bed: AgentBed) -> None:
    bed.agent.on_candidate(replace(bed.encap(), forwarding="clear-out"))
    assert not bed.metrics.rejects, "clear forwarding is no refusal: it is not the fastpath's"
    assert_empty(bed, "clear forwarding")


def test_wrong_interfaces_refused(bed: AgentBed) -> None:
    bed.agent.on_candidate(bed.encap(in_ifindex=7))
    bed.agent.on_candidate(bed.decap(out_ifindex=WAN_IF))
    assert bed.metrics.rejects == {RejectReason.WRONG_INTERFACES: 2}, "not between lan and wan"
    assert_empty(bed, "wrong interfaces")


def test_flow_table_full_refused(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, cfg=Config(flow_table_size=1))
    bed.agent.on_candidate(bed.encap(4000))
    bed.agent.on_candidate(bed.encap(4001))
    assert bed.metrics.rejects == {RejectReason.TABLE_FULL: 1}, "the second flow is refused"
    assert len(bed.dp.flow_map) == 1, "only the first flow is in the map"


def test_sa_table_full_leaves_nothing_half_installed(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, cfg=Config(sa_table_size=1), sa_max=1)
    bed.agent.on_candidate(bed.encap())
    first = out_entry(bed)
    assert first is not None, "the first outbound SA fits"
    for ev in second_tunnel(bed.kernel):
        bed.agent.on_kernel_event(ev)
    bed.agent.on_candidate(bed.encap())  # re-learned after the policy change
    cand = bed.encap(daddr=REMOTE2_HOST)
    assert cand.spi == SPI_OUT2, "the kernel sent the second tunnel's flow on its own SA"
    bed.agent.on_candidate(cand)

    assert bed.metrics.rejects == {RejectReason.SA_TABLE_FULL: 1}, "refused: SA table full"
    assert out_entry(bed, SPI_OUT2) is None, "no entry for the SA that did not fit"
    assert bed.dp.get_flow(bed.dp_key(cand)) is None, "no flow entry for it"
    assert [i[0] for i in bed.reseq.indexed()] == [SPI_OUT], "the SPI index names only SA 1"
    assert bed.dp.watchdog_ids() == [first[0]], "no watchdog for the SA that did not fit"
    assert len(bed.dp.flow_map) == 1, "the first tunnel's flow stays"
    st = {s["spi"]: s["reason"] for s in bed.agent.status()["sas"]}
    assert "SA table full" in st[f"0x{SPI_OUT2:08x}"], "`sas` says why the SA stays in the kernel"


def test_netlink_error_fails_closed(bed: AgentBed) -> None:
    bed.kernel.fail["policies"] = NetlinkError(errno.ENOBUFS, "", "XFRM_MSG_GETPOLICY")
    bed.agent.on_candidate(bed.encap())
    assert bed.metrics.rejects == {RejectReason.NETLINK_ERROR: 1}, "unreadable state: refused"
    assert_empty(bed, "netlink error")
    del bed.kernel.fail["policies"]
    bed.agent.on_candidate(bed.encap())
    assert len(bed.dp.flow_map) == 1, "learned once the kernel answers again"


class RacingKernel(FakeKernel):
    """The kernel sends past the datapath's start while the SA entry is being written (between
    the agent's first and second GETAE)."""

    def get_ae(self, sa: Sa) -> AeState:
        if self.calls.count("get_ae") == 1:
            self.kernel_sends(sa, SEQ_JUMP + 2)
        return super().get_ae(sa)


def test_kernel_racing_past_the_start_withdraws_the_sa(tmp_path: Path) -> None:
    bed = AgentBed(tmp_path, kernel=RacingKernel())
    bed.agent.on_candidate(bed.encap())
    assert bed.metrics.rejects == {RejectReason.KERNEL_RACED: 1}, "refused: the kernel raced"
    assert_empty(bed, "kernel raced")


# -- rekey ---------------------------------------------------------------------------------------
def test_rekey_moves_flows_to_the_new_sa(bed: AgentBed) -> None:
    cand = bed.encap()
    bed.agent.on_candidate(cand)
    old_id, _ = out_entry(bed) or (0, None)
    new = make_sa(0x1003, GW1, GW2, current=LifetimeCur(add_time=int(time.time()) + 1))
    bed.agent.on_kernel_event(bed.kernel.add_sa(new, oseq=0))
    assert bed.dp.get_flow(bed.dp_key(cand)) is None, "the old SA's flow is taken off"
    assert out_entry(bed) is not None, "the old SA stays offloaded (its flows may come back)"

    again = bed.encap()
    assert again.spi == 0x1003, "the kernel now sends on the new SA (newest of the reqid)"
    bed.agent.on_candidate(again)
    got = out_entry(bed, 0x1003)
    assert got is not None, "the new SA is offloaded"
    assert got[1].seq == 1 + 1 + SEQ_JUMP, "from the new SA's own sequence"
    flow = bed.dp.get_flow(bed.dp_key(again))
    assert flow is not None and flow.sa_id == got[0] != old_id, "the flow is on the new SA"

    bed.agent.on_kernel_event(bed.kernel.delete_sa(make_sa(SPI_OUT, GW1, GW2)))
    assert out_entry(bed) is None, "the old SA's entry goes with its DELSA"
    assert bed.dp.wiped and not any(bytes(bed.dp.wiped[-1].key)), "its key wiped"
    assert bed.dp.get_flow(bed.dp_key(again)) is not None, "the new SA's flow stays"


# -- lifetimes -------------------------------------------------------------------------------------
def _bed_with_lifetime(tmp_path: Path, lifetime: LifetimeCfg, **cur: int) -> AgentBed:
    bed = AgentBed(tmp_path, tunnel=False)
    sa = make_sa(SPI_OUT, GW1, GW2, lifetime=lifetime, current=LifetimeCur(**cur))
    one_tunnel(bed.kernel, out_sa=sa)
    bed.agent.on_candidate(bed.encap())
    assert out_entry(bed) is not None, "the SA is offloaded"
    return bed


def test_soft_expiry_by_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_module, "LIFETIME_SYNC_S", 0.0)  # sync at every tick
    bed = _bed_with_lifetime(tmp_path, LifetimeCfg(soft_packet_limit=100, hard_packet_limit=10**6))
    sa_id, _ = out_entry(bed) or (0, None)
    before = bed.kernel.states[(GW2, SPI_OUT)].current
    assert bed.dp.xdp_send(sa_id, 150, 150 * 100) == 150, "XDP carried 150 packets"
    bed.agent.tick()
    cur = bed.kernel.states[(GW2, SPI_OUT)].current
    assert cur.packets == before.packets + 150, "XDP's packets added to the kernel's lifetime"
    assert cur.bytes == before.bytes + 15000, "and its bytes"
    assert cur.add_time == before.add_time, "add_time kept"
    assert bed.kernel.expires == [(SPI_OUT, False)], "one soft expire sent (the IKE daemon rekeys)"
    assert out_entry(bed) is not None, "a soft limit leaves the SA offloaded"
    bed.dp.xdp_send(sa_id, 10, 1000)
    bed.agent.tick()
    assert bed.kernel.states[(GW2, SPI_OUT)].current.packets == cur.packets + 10, "synced again"
    assert bed.kernel.expires == [(SPI_OUT, False)], "no second soft expire"


def test_hard_expiry_by_volume_hands_the_sequence_back(tmp_path: Path) -> None:
    bed = _bed_with_lifetime(tmp_path, LifetimeCfg(soft_packet_limit=50, hard_packet_limit=100))
    sa_id, _ = out_entry(bed) or (0, None)
    bed.dp.xdp_send(sa_id, 150, 150 * 100)
    dp_seq = (bed.dp.outbound_sa(sa_id) or SaOut()).seq
    bed.agent.tick()
    assert out_entry(bed) is None, "the hard limit takes the SA off the fastpath"
    assert not bed.dp.flow_map.elems, "with its flows"
    assert not bed.reseq.indexed(), "and its SPI index entry"
    assert bed.kernel.oseq_set, "the sequence was handed back (set_oseq)"
    spi, handed = bed.kernel.oseq_set[-1]
    assert spi == SPI_OUT and handed >= dp_seq, "handed back at or past the datapath's counter"
    assert handed == dp_seq - 1 + HANDBACK_MARGIN, "with the hand-back margin"
    assert kernel_oseq(bed) == handed, "the kernel's oseq is there now"
    assert not any(bytes(bed.dp.wiped[-1].key)), "the entry's key was wiped before its delete"


def test_hard_expire_event_drops_without_hand_back(bed: AgentBed) -> None:
    bed.agent.on_candidate(bed.encap())
    bed.agent.on_candidate(bed.decap())
    ev = bed.kernel.expire_sa(make_sa(SPI_OUT, GW1, GW2), hard=True)
    bed.agent.on_kernel_event(ev)
    assert out_entry(bed) is None, "the hard-expired SA's entry is gone"
    assert bed.reseq.indexed() == [], "unindexed"
    assert bed.kernel.oseq_set == [], "nothing handed back to an SA the kernel deleted"
    assert len(bed.dp.flow_map) == 1, "only the decap flow is left"
    bed.agent.on_kernel_event(bed.kernel.expire_sa(make_sa(SPI_IN, GW2, GW1), hard=True))
    assert_empty(bed, "both SAs hard-expired")


def test_hard_time_limit_passed(tmp_path: Path) -> None:
    bed = _bed_with_lifetime(
        tmp_path, LifetimeCfg(hard_add_expires_seconds=5), add_time=int(time.time()) - 10
    )
    bed.agent.tick()
    assert out_entry(bed) is None, "past its hard deadline the SA leaves the datapath"
    assert not bed.dp.flow_map.elems, "with its flows"
    assert bed.kernel.oseq_set and bed.kernel.oseq_set[-1][0] == SPI_OUT, (
        "its sequence handed back (the kernel still has it until its own timer fires)"
    )


# -- invalidation --------------------------------------------------------------------------------
def _installed_both(bed: AgentBed) -> int:
    bed.agent.on_candidate(bed.encap())
    bed.agent.on_candidate(bed.decap())
    assert len(bed.dp.flow_map) == 2, "both flows installed"
    sa_id, _ = out_entry(bed) or (0, None)
    return sa_id


def _assert_fenced_then_rearmed(bed: AgentBed, sa_id: int, armed: int, what: str) -> None:
    j = bed.dp.journal
    fences = [i for i, e in enumerate(j) if e == ("watchdog", sa_id, 0)]
    assert fences, f"{what}: the outbound SA was fenced (watchdog 0)"
    deletes = [i for i, e in enumerate(j) if e[0] == "delete_flows" and i > fences[-1]]
    assert deletes, f"{what}: the flows were deleted after the fence"
    rearms = [i for i, e in enumerate(j) if e == ("watchdog", sa_id, armed) and i > deletes[0]]
    assert rearms, f"{what}: the SA was re-armed after the flows went"
    assert bed.dp.watchdog(sa_id) == armed, f"{what}: the watchdog is back as it was"


INVALIDATIONS = {
    "policy added": lambda b: [
        b.kernel.add_policy(Policy(Selector.of("10.9.0.0/24", "10.8.0.0/24"), Dir.OUT, index=20))
    ],
    "default policy": lambda b: [b.kernel.set_default(DefaultPolicy(outbound=DefaultAction.BLOCK))],
    "route changed": lambda b: [b.kernel.set_route("10.7.0.0/24", RouteInfo(WAN_IF, GW2))],
    "nftables commit": lambda b: b.kernel.nft_commit(),
}


@pytest.mark.parametrize("case", INVALIDATIONS)
def test_invalidation_takes_every_flow_off(bed: AgentBed, case: str) -> None:
    sa_id = _installed_both(bed)
    armed = bed.dp.watchdog(sa_id)
    assert armed, "the SA is armed"
    for ev in INVALIDATIONS[case](bed):
        bed.agent.on_kernel_event(ev)
    assert not bed.dp.flow_map.elems, f"{case}: every flow out of the map"
    _assert_fenced_then_rearmed(bed, sa_id, armed, case)
    assert out_entry(bed) is not None, f"{case}: the outbound SA stays offloaded"
    assert bed.dp.inbound_sa(SPI_IN, GW1) is not None, f"{case}: the inbound SA stays"
    bed.agent.on_candidate(bed.encap())
    assert len(bed.dp.flow_map) == 1, f"{case}: the flow is learned again"


def test_neighbour_change_takes_its_flows_off(bed: AgentBed) -> None:
    _installed_both(bed)
    ev = bed.kernel.set_neigh(WAN_IF, GW2, NeighInfo("02:00:00:00:00:99", NUD_PERMANENT))
    bed.agent.on_kernel_event(ev)
    assert bed.dp.get_flow(bed.dp_key(bed.encap())) is None, "the flow sent to GW2 is off"
    assert bed.dp.get_flow(bed.dp_key(bed.decap())) is not None, "the decap flow stays"
    bed.agent.on_candidate(bed.encap())
    assert bed.metrics.rejects == {RejectReason.NEIGHBOUR_MISMATCH: 1}, (
        "re-learned against the new MAC: the frame went to the old one"
    )


def test_link_mtu_change_takes_its_flows_off(bed: AgentBed) -> None:
    _installed_both(bed)
    bed.agent.on_kernel_event(bed.kernel.set_link(WAN_IF, "wan", 1400, GW1_WAN_MAC))
    assert not bed.dp.flow_map.elems, "both flows use the WAN link: both off"
    bed.agent.on_candidate(bed.encap())
    flow = bed.dp.get_flow(bed.dp_key(bed.encap()))
    assert flow is not None and flow.mtu == 1400, "re-learned with the new MTU"


def test_sa_deleted_drops_its_flows_and_entry(bed: AgentBed) -> None:
    _installed_both(bed)
    bed.agent.on_kernel_event(bed.kernel.delete_sa(make_sa(SPI_IN, GW2, GW1)))
    assert bed.dp.inbound_sa(SPI_IN, GW1) is None, "the inbound entry is gone"
    assert bed.kernel.replay_top_set == [], "nothing handed back to a deleted SA"
    assert len(bed.dp.flow_map) == 1, "the encap flow stays"


def test_sa_updated_is_handed_back(bed: AgentBed) -> None:
    sa_id = _installed_both(bed)
    dp_seq = (bed.dp.outbound_sa(sa_id) or SaOut()).seq
    bed.agent.on_kernel_event(bed.kernel.update_sa(make_sa(SPI_OUT, GW1, GW2)))
    assert out_entry(bed) is None, "an updated SA leaves the datapath"
    assert bed.kernel.oseq_set == [(SPI_OUT, dp_seq - 1 + HANDBACK_MARGIN)], (
        "its sequence goes back to the kernel, which still has the SA"
    )
    assert len(bed.dp.flow_map) == 1, "the other SA's flow stays"


# -- shutdown and restart -------------------------------------------------------------------------
def test_release_all_hands_everything_back(bed: AgentBed) -> None:
    sa_id = _installed_both(bed)
    bed.dp.xdp_send(sa_id, 10, 1000)
    bed.dp.xdp_receive(SPI_IN, GW1, 7, 700)
    dp_seq = (bed.dp.outbound_sa(sa_id) or SaOut()).seq
    bed.agent.release_all()
    assert_empty(bed, "after release_all")
    assert bed.kernel.oseq_set == [(SPI_OUT, dp_seq - 1 + HANDBACK_MARGIN)], "oseq handed back"
    assert bed.kernel.replay_top_set == [(SPI_IN, 27)], "the replay window's top handed back"
    lifetimes = dict(bed.kernel.lifetimes_set)
    assert lifetimes[SPI_OUT].packets >= 10, "XDP's last outbound counts synced"
    assert lifetimes[SPI_IN].packets >= 7, "and inbound"


def test_restart_recovers_pinned_state(bed: AgentBed) -> None:
    sa_id = _installed_both(bed)
    bed.dp.xdp_send(sa_id, 500, 50_000)
    dp_seq = (bed.dp.outbound_sa(sa_id) or SaOut()).seq
    # The controller dies (nothing released); a new one starts on the same pinned maps.
    bed.start()
    bed.agent.recover_pinned_state()
    assert bed.kernel.oseq_set == [(SPI_OUT, dp_seq - 1 + HANDBACK_MARGIN)], (
        "the earlier run's outbound sequence handed back"
    )
    assert kernel_oseq(bed) >= dp_seq, "the kernel will never reuse a number XDP sent"
    assert_empty(bed, "after recovery")
    assert all(not any(bytes(e.key)) for e in bed.dp.wiped), "every SA entry wiped"
    bed.agent.on_candidate(bed.encap())
    got = out_entry(bed)
    assert got is not None and got[1].seq > dp_seq, "offloaded again above every number sent"
