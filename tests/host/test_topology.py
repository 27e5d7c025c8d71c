# SPDX-License-Identifier: GPL-2.0-only
"""The namespace test bed builds, forwards between its hosts, and leaves nothing behind."""

from __future__ import annotations

import os

from testbed.bed import ROLES, Testbed, list_netns, run


def _root_links() -> set[str]:
    out = run(["ip", "-o", "link", "show"]).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _feature(netns: str, dev: str, name: str) -> bool:
    from pyroute2.ethtool import Ethtool

    from controller.netns import in_netns

    with in_netns(netns):
        e = Ethtool()
        try:
            return bool(e.get_features(dev).features[name].enable)
        finally:
            e.close()


def test_topology_builds_forwards_and_tears_down() -> None:
    links_before = _root_links()
    bed = Testbed(prefix=f"topo{os.getpid()}-")
    bed.build()
    try:
        names = {bed.ns(r) for r in ROLES}
        assert names <= set(list_netns()), "all four namespaces exist"
        assert _root_links() == links_before, "nothing was added to the root namespace"
        p = bed.plan
        assert bed.ping("lan", p["GW1_LAN"]), "lan reaches gw1 on its link"
        assert bed.ping("gw1", p["GW2_WAN"]), "gw1 reaches gw2 on the wan link"
        assert bed.ping("lan", p["REMOTE_HOST"], count=3), (
            "lan reaches remote through both gateways"
        )
        assert bed.ping("remote", p["LAN_HOST"]), "remote reaches lan back"
        route = bed.ip("gw1", "route", "get", p["REMOTE_HOST"]).stdout
        assert "dev wan" in route, f"gw1 routes remote out of wan: {route}"
        for role in ("lan", "remote"):
            tx = _feature(bed.ns(role), "eth0", "tx-checksum-ip-generic")
            assert tx is False, f"{role}: tx checksum offload off"
        for i in bed.ifaces:
            gro = _feature(bed.ns(i.role), i.dev, "rx-gro")
            assert gro, f"{i.role}/{i.dev}: GRO on (receives XDP redirects)"
    finally:
        bed.destroy()
    assert not ({bed.ns(r) for r in ROLES} & set(list_netns())), "namespaces removed"
    assert _root_links() == links_before, "root namespace links unchanged"


def test_destroy_after_partial_build_is_clean() -> None:
    bed = Testbed(prefix=f"part{os.getpid()}-")
    run(["ip", "netns", "add", bed.ns("gw2")])  # a collision makes build fail half-way
    try:
        try:
            bed.build()
        except Exception as exc:
            assert "already exists" in str(exc), f"collision is reported clearly: {exc}"
        else:
            raise AssertionError("build over an existing namespace must fail")
        assert bed.ns("lan") not in list_netns(), "a failed build leaves nothing of its own"
    finally:
        run(["ip", "netns", "del", bed.ns("gw2")], check=False)
