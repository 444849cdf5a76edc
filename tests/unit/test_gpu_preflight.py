"""GPU preflight: the real H100 capture and the derived XR7620 capture against the xr7620-4xl4 profile."""

from __future__ import annotations

import copy

import pytest
from gpu_fakes import FakeNvml, capture, load_module
from llmfleet.gpu_preflight import (
    check_gpu_facts,
    driver_branch,
    profile_with_measured_topology,
    topology_from_facts,
)
from llmfleet.spec import builtin_hardware_profiles

facts_module = load_module()
PROFILE = builtin_hardware_profiles()["xr7620-4xl4"]


def errors(problems):
    return {p.where: p for p in problems if p.severity == "error"}


def test_h100_capture_fails_on_the_xr7620_profile_per_gpu():
    problems = check_gpu_facts("edge1", PROFILE, capture("h100-capture.json"))
    found = errors(problems)
    assert set(found) == {
        "nvidia_gpu.gpus",
        "gpu[0].name",
        "gpu[0].memory_total_bytes",
        "gpu[0].compute_capability",
        "gpu[0].pcie.max",
    }
    count = str(found["nvidia_gpu.gpus"])
    assert "wrong GPU count: expected 4 x NVIDIA L4, found 1 (NVIDIA H100 80GB HBM3)" in count
    assert str(found["gpu[0].name"]).startswith('edge1: gpu[0].name = "NVIDIA H100 80GB HBM3": wrong GPU model')
    assert "expected 'NVIDIA L4', found 'NVIDIA H100 80GB HBM3'" in str(found["gpu[0].name"])
    assert "expected about 22.49 GiB, found 79.6 GiB (81559 MiB)" in str(found["gpu[0].memory_total_bytes"])
    assert "expected 8.9, found 9.0" in str(found["gpu[0].compute_capability"])
    assert "expected Gen4 x16, found Gen5 x16" in str(found["gpu[0].pcie.max"])
    # the driver is R580 on the device too, so the branch passes
    assert "nvidia_gpu.driver_version" not in found


def test_derived_l4_capture_passes():
    assert check_gpu_facts("edge1", PROFILE, capture("xr7620-4xl4-derived.json")) == []


def test_facts_through_the_collector_pass_too():
    facts = facts_module.collect(FakeNvml(capture("xr7620-4xl4-derived.json")))
    assert check_gpu_facts("edge1", PROFILE, facts) == []


def test_one_wrong_gpu_is_named_alone():
    facts = capture("xr7620-4xl4-derived.json")
    h100 = capture("h100-capture.json")["gpus"][0]
    facts["gpus"][2] = copy.deepcopy(h100) | {"index": 2}
    found = errors(check_gpu_facts("edge1", PROFILE, facts))
    assert set(found) == {"gpu[2].name", "gpu[2].memory_total_bytes", "gpu[2].compute_capability", "gpu[2].pcie.max"}


@pytest.mark.parametrize(
    ("code", "start"),
    [(12, "NVML library not found (install nvidia-ml-py / the driver)"), (18, "Driver/library version mismatch: ")],
)
def test_nvml_unusable_is_one_clear_problem(code, start):
    facts = facts_module.collect(FakeNvml(capture("h100-capture.json"), init_error=code))
    (problem,) = check_gpu_facts("edge1", PROFILE, facts)
    assert problem.where == "nvidia_gpu.nvml_available"
    assert problem.message.startswith(start)


def test_no_facts_at_all_is_one_problem():
    (problem,) = check_gpu_facts("edge1", PROFILE, None)
    assert "nvidia_gpu_facts" in problem.message


def test_wrong_driver_branch():
    facts = capture("xr7620-4xl4-derived.json")
    facts["driver_version"] = "570.172.08"
    (problem,) = check_gpu_facts("edge1", PROFILE, facts)
    assert problem.where == "nvidia_gpu.driver_version"
    assert "expected R580, found R570" in problem.message
    assert driver_branch("580.95.05") == "580" and driver_branch(None) is None


def test_link_below_gen4_x16():
    facts = capture("xr7620-4xl4-derived.json")
    facts["gpus"][1]["pcie"].update(max_generation=3, max_width=8)
    (problem,) = check_gpu_facts("edge1", PROFILE, facts)
    assert problem.where == "gpu[1].pcie.max" and "expected Gen4 x16, found Gen3 x8" in problem.message


def test_idle_link_is_not_compared():
    facts = capture("xr7620-4xl4-derived.json")
    assert facts["gpus"][0]["pcie"]["current_generation"] == 1
    assert check_gpu_facts("edge1", PROFILE, facts) == []


def test_memory_within_tolerance_passes_and_outside_fails():
    facts = capture("xr7620-4xl4-derived.json")
    facts["gpus"][0]["memory_total_bytes"] = 23028 * 1024 * 1024  # a few MiB less with another driver
    facts["gpus"][1]["memory_total_bytes"] = 20 * 1024**3
    assert set(errors(check_gpu_facts("edge1", PROFILE, facts))) == {"gpu[1].memory_total_bytes"}


def test_mig_and_remapped_rows_fail_ecc_off_warns():
    facts = capture("xr7620-4xl4-derived.json")
    facts["gpus"][0]["mig"] = {"current": True, "pending": True}
    facts["gpus"][1]["remapped_rows"].update(pending=True)
    facts["gpus"][2]["remapped_rows"].update(failure=True)
    facts["gpus"][3]["ecc"] = {"current": False, "pending": False}
    problems = check_gpu_facts("edge1", PROFILE, facts)
    assert set(errors(problems)) == {"gpu[0].mig.current", "gpu[1].remapped_rows.pending", "gpu[2].remapped_rows.failure"}
    assert [p.where for p in problems if p.severity == "warning"] == ["gpu[3].ecc.current"]


def test_cpu_profile_has_no_gpu_preflight():
    assert check_gpu_facts("lab1", builtin_hardware_profiles()["lab-cpu"], None) == []


def test_topology_from_facts_matches_the_profile_for_the_derived_capture():
    facts = capture("xr7620-4xl4-derived.json")
    assert topology_from_facts(facts) == PROFILE.topology
    assert topology_from_facts(capture("h100-capture.json")) == [["X"]]


def test_measured_topology_differing_is_an_error_and_the_measured_profile_is_what_would_be_recorded():
    facts = capture("xr7620-4xl4-derived.json")
    for pair in facts["pairs"]:
        if (pair["a"], pair["b"]) == (1, 2):
            pair.update(topology="NODE", topology_level=40)
        if (pair["a"], pair["b"]) == (0, 3):
            pair.update(topology=None, topology_level=None)  # NVML gave nothing: planned as SYS
    problems = check_gpu_facts("edge1", PROFILE, facts)
    assert [(p.where, p.severity, p.value) for p in problems] == [("topology[1][2]", "error", "NODE")]
    assert "--record-gpus" in problems[0].valid
    measured = profile_with_measured_topology(PROFILE, facts)
    assert measured.topology is not None
    assert measured.topology[1][2] == measured.topology[2][1] == "NODE"
    assert measured.topology[0][3] == "SYS"
    assert measured.interconnect == "pcie"


def test_nvlink_pairs_become_nv():
    facts = capture("xr7620-4xl4-derived.json")
    facts["pairs"][0].update(nvlink=True, nvlink_links=4, topology="NV4")
    assert topology_from_facts(facts)[0][1] == "NV"
    assert profile_with_measured_topology(PROFILE, facts).interconnect == "nvlink"
    found = [(p.where, p.severity) for p in check_gpu_facts("edge1", PROFILE, facts)]
    assert found == [("nvidia_gpu.pairs", "warning"), ("topology[0][1]", "error")]
