# SPDX-License-Identifier: GPL-2.0-only
"""testbed/vmshards.py: how the vm suite is dealt onto VM boots that run side by side."""

from __future__ import annotations

from pathlib import Path

from testbed import vmshards


def test_every_vm_file_is_in_exactly_one_shard() -> None:
    units = vmshards.vm_test_files()
    assert "tests/vm/test_vm_controller.py" in units and vmshards.OTHER_TIERS in units
    plan = vmshards.partition(units, vmshards.load_weights(), 2)
    assert len(plan) == 2
    dealt = [u for shard in plan for u in shard]
    assert sorted(dealt) == sorted(units)


def test_other_tiers_are_their_vm_marked_files() -> None:
    files = vmshards.unit_paths(vmshards.OTHER_TIERS)
    assert "tests/host/test_xfrm_netlink.py" in files
    assert all(not f.startswith("tests/vm/") for f in files)
    assert "tests/unit/test_vmshards.py" not in files  # no vm marker here
    assert vmshards.unit_paths("tests/vm/test_vm_learner.py") == ["tests/vm/test_vm_learner.py"]


def test_longest_first_balances_the_shards() -> None:
    weights = {"a": 100.0, "b": 60.0, "c": 50.0, "d": 10.0}
    plan = vmshards.partition(["a", "b", "c", "d"], weights, 2)
    loads = sorted(vmshards.planned_seconds(s, weights) for s in plan)
    assert loads == [100.0, 120.0] or loads == [110.0, 110.0]
    assert ["a"] in plan or ["a", "d"] in plan  # the heaviest is never paired with b or c


def test_unknown_files_count_as_the_default() -> None:
    plan = vmshards.partition(["x", "y", "z"], {}, 2)
    assert sorted(len(s) for s in plan) == [1, 2]
    assert vmshards.planned_seconds(["x"], {}) == vmshards.DEFAULT_WEIGHT_S


def test_more_shards_than_files_leaves_none_empty() -> None:
    assert vmshards.partition(["x"], {}, 3) == [["x"]]


def test_junit_seconds_by_file(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.vm.test_vm_learner" name="t1" time="12.5"/>'
        '<testcase classname="tests.vm.test_vm_learner" name="t2[x]" time="2.5"/>'
        '<testcase classname="tests.vm.test_vm_faults.TestX" name="t3" time="4"/>'
        '<testcase classname="tests.host.test_xfrm_netlink" name="t4" time="1"/>'
        "</testsuite></testsuites>"
    )
    secs = vmshards.junit_seconds([xml, tmp_path / "missing.xml"])
    assert secs == {
        "tests/vm/test_vm_learner.py": 15.0,
        "tests/vm/test_vm_faults.py": 4.0,
        vmshards.OTHER_TIERS: 1.0,
    }


def test_junit_failures_name_test_and_first_line(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.vm.test_vm_learner" name="t1" time="1"/>'
        '<testcase classname="tests.vm.test_vm_learner" name="t2[x]" time="1">'
        '<failure message="AssertionError: 0 echoes&#10;assert 0 == 20">tb</failure></testcase>'
        '<testcase classname="tests.vm.test_vm_faults" name="t3" time="1">'
        '<error message="failed on setup">tb</error></testcase>'
        '<testcase classname="tests.vm.test_vm_faults" name="t4" time="1"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    assert vmshards.junit_failures([xml, tmp_path / "missing.xml"]) == [
        "FAILURE tests.vm.test_vm_learner::t2[x]: AssertionError: 0 echoes",
        "ERROR tests.vm.test_vm_faults::t3: failed on setup",
    ]


def test_record_merges(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    vmshards.record_weights({"a": 1.04}, path)
    vmshards.record_weights({"b": 2.0}, path)
    assert vmshards.load_weights(path) == {"a": 1.0, "b": 2.0}
