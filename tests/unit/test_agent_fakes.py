# SPDX-License-Identifier: GPL-2.0-only
"""The agent's unit-test ports keep the real adapters' behaviour where the agent relies on it:
the in-memory maps (tests/lib/memory_datapath.py, for controller/datapath/xdp.py and reseq.py)
and the model-based kernel (tests/lib/fake_kernel.py, for controller/netlink/xfrm.py)."""

from __future__ import annotations

import errno
from ipaddress import ip_address

import pytest
from fake_kernel import FakeKernel
from memory_datapath import MemoryDatapath, MemoryResequencer

from controller.core.xfrm_model import (
    FASTPATH_AEAD,
    Algorithm,
    Dir,
    Policy,
    ReplayState,
    Sa,
    SaExpired,
    Secret,
    Selector,
)
from controller.datapath.entries import InboundSa, OutboundSa, flow_key, flow_val
from controller.datapath.xdp import DatapathError
from controller.netlink.nlsock import NetlinkError

KEY = bytes(range(36))
GW1, GW2 = "192.0.2.1", "192.0.2.2"


def _out(sa_id: int, **kw: object) -> OutboundSa:
    mac1, mac2 = "02:00:00:00:00:01", "02:00:00:00:00:02"
    return OutboundSa(sa_id, 0x1000 + sa_id, GW1, GW2, KEY, 3, mac2, mac1, **kw)  # type: ignore[arg-type]


def test_sa_table_full_raises_e2big_like_the_real_map() -> None:
    dp = MemoryDatapath(sa_max=1)
    dp.put_outbound_sa(_out(1))
    dp.put_outbound_sa(_out(1, seq=7))  # rewriting a present key is no new element
    with pytest.raises(DatapathError) as e:
        dp.put_outbound_sa(_out(2))
    assert e.value.errno == errno.E2BIG, "a full hash map refuses a new key with E2BIG"
    assert dp.watchdog_ids() == [1], "no watchdog written for the refused SA"


def test_sa_entries_watchdog_fence_and_wipe() -> None:
    dp = MemoryDatapath()
    dp.put_outbound_sa(_out(1, deadline_ns=123))
    assert dp.watchdog(1) == 123, "put_outbound_sa arms the watchdog at the SA's deadline"
    e = dp.outbound_sa(1)
    assert e is not None and e.seq == 1 and bytes(e.key) == KEY[:32], "the entry as to_c() made it"
    e.seq = 99
    assert (dp.outbound_sa(1) or e).seq == 1, "a read is a copy (bpf(2) copies out)"
    dp.fence_sa(1)
    assert dp.watchdog(1) == 0, "fenced: watchdog in the past"
    assert not dp.usable(1, 123), "XDP does not use a fenced SA"
    assert dp.xdp_send(1, 5, 500) == 0, "its packets go to the kernel"
    assert dp.delete_outbound_sa(1), "deleted"
    assert not any(bytes(dp.wiped[-1])), "the element was zeroed before its delete"
    assert dp.watchdog(1) is None, "its watchdog went with it"
    assert not dp.delete_outbound_sa(1), "a second delete finds nothing"

    dp.put_inbound_sa(InboundSa(5, 0x2000, GW2, GW1, KEY, seq_top=40))
    assert [s.sa_id for s in dp.inbound_sa_entries()] == [5], "inbound entry by (SPI, daddr)"
    assert dp.delete_inbound_sa(0x2000, GW1), "deleted by (SPI, daddr)"
    assert dp.watchdog_ids() == [], "the inbound SA's watchdog went with it"


def test_flows_and_resequencer() -> None:
    dp = MemoryDatapath(flows_max=2)
    keys = [flow_key(2, 0, 17, "10.1.0.2", "10.2.0.2", p, 53) for p in (1, 2, 3)]
    for k in keys:
        dp.put_flow(k, flow_val(1))
    assert dp.get_flow(keys[0]) is None, "a full LRU flow map evicts its oldest entry"
    assert dp.delete_flows([keys[1], bytes(keys[2]), keys[0]]) == 2, "batch delete skips absent"
    rs = MemoryResequencer(dp)
    dp.put_outbound_sa(_out(1, seq=10))
    rs.index_sa(0x1001, GW2, 1)
    assert rs.indexed() == [(0x1001, GW2, 1)], "the SPI index"
    assert rs.kernel_send(0x1001, GW2) == 10, "a kernel packet takes XDP's next number"
    e = dp.outbound_sa(1)
    assert e is not None and e.seq == 11, "from the shared counter"


def test_fake_kernel_errors_and_order() -> None:
    k = FakeKernel()
    aead = Algorithm("aead", FASTPATH_AEAD, 288, Secret(KEY), 128)
    sa = Sa(src=ip_address(GW1), dst=ip_address(GW2), spi=0x1000, aead=aead, replay_window=128)
    with pytest.raises(NetlinkError) as e:
        k.get_ae(sa)
    assert e.value.errno == errno.ESRCH, "GETAE of a missing SA: ESRCH (xfrm_get_ae)"
    assert k.get_sa(GW2, 0x1000) is None, "GETSA of a missing SA: None"
    k.add_sa(sa, oseq=100)
    assert k.get_ae(sa).replay == ReplayState(oseq=100, replay_window=128), "oseq as set"
    with pytest.raises(ValueError):
        k.set_oseq(sa, 99)  # XfrmSocket.set_oseq never moves it backwards
    with pytest.raises(ValueError):
        k.set_oseq(sa, 1 << 32)  # nor past 32 bits without ESN
    assert k.set_oseq(sa, 5000).oseq64 == 5000 and k.oseq_set == [(0x1000, 5000)], "recorded"
    p1 = Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.OUT, index=1)
    p2 = Policy(Selector.of("10.1.0.0/24", "10.2.0.0/24"), Dir.OUT, index=2)
    k.add_policy(p1)
    k.add_policy(p2)
    assert [p.index for p in k.policies()] == [2, 1], "dumped newest first, as the kernel does"
    k.take_events()
    k.send_expire(sa, hard=True)
    assert k.get_sa(GW2, 0x1000) is None, "a hard XFRM_MSG_EXPIRE deletes the SA"
    (ev,) = k.take_events()
    assert isinstance(ev, SaExpired) and ev.hard, "and is multicast as a hard SaExpired"
    with pytest.raises(NetlinkError):
        k.send_expire(sa)  # xfrm_add_sa_expire(): ENOENT once it is gone
