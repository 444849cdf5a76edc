"""The NVIDIA driver a CUDA runtime needs: read from its pinned wheels (llmfleet.cuda) into the lock,
and a profile with an older driver refused by the planner (rule driver-cuda-minimum).

The expected figures are NVIDIA's (docs/driver-cuda.md: the release notes' cudart versions and
"CUDA Toolkit and Corresponding Driver Versions"), written here by hand, not read from the catalog.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.cli import plan as plan_cli  # noqa: E402
from llmfleet.cuda import cuda_build, driver_version  # noqa: E402
from llmfleet.errors import InputError, PlanRefused  # noqa: E402
from llmfleet.pins import DEFAULT_LOCK, Requirement, load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402

LOCK = load_lock(DEFAULT_LOCK)
SCENARIO = REPO / "tests" / "molecule" / "driver"
SCENARIO_LOCK = load_lock(SCENARIO / "lock.json")
#: runtime -> (CUDA, release, driver, the wheel it is read from), from NVIDIA's tables
NVIDIA = {
    "vllm-0.19.0-cu128": ("12.8", "CUDA 12.8 Update 1", "570.124.06", "nvidia-cuda-runtime-cu12 12.8.90"),
    "vllm-0.33.0-cu128": ("13.0", "CUDA 13.0 Update 2", "580.95.05", "nvidia-cuda-runtime 13.0.96"),
    "vllm-0.26.0-cu130": ("13.0", "CUDA 13.0 Update 2", "580.95.05", "nvidia-cuda-runtime 13.0.96"),
    "vllm-0.4.3-cu121": ("12.1", "CUDA 12.1 Update 1", "530.30.02", "nvidia-cuda-runtime-cu12 12.1.105"),
}


def _req(name: str, version: str) -> Requirement:
    return Requirement(name=name, version=version, sha256="0" * 64)


@pytest.mark.parametrize("lock", [LOCK, SCENARIO_LOCK], ids=["pins/lock.json", "driver scenario lock"])
def test_each_cuda_runtime_records_the_driver_its_pinned_wheels_need(lock: Any) -> None:
    for key, pin in lock.runtimes.items():
        if pin.device != "cuda":
            assert pin.cuda is None, key
            continue
        assert pin.cuda is not None, f"{key} records no CUDA release"
        assert pin.cuda == cuda_build(pin.requirements or []), f"{key}: the lock's record is not what its wheels give"
        assert (pin.cuda.cuda, pin.cuda.release, pin.cuda.min_driver, pin.cuda.source) == NVIDIA[key]


def test_cuda_build_reads_the_cudart_wheel() -> None:
    build = cuda_build([_req("torch", "2.10.0"), _req("nvidia-cuda-runtime-cu12", "12.8.90"), _req("nvidia-cuda-nvrtc-cu12", "12.8.93")])
    assert build is not None and (build.cuda, build.min_driver) == ("12.8", "570.124.06")
    # PyTorch's own index tags its wheels: without a cudart wheel the tag gives the CUDA version
    tagged = cuda_build([_req("torch", "2.3.0+cu121")])
    assert tagged is not None and (tagged.cuda, tagged.min_driver) == ("12.1", "530.30.02")
    assert "torch 2.3.0+cu121" in tagged.source
    assert cuda_build([_req("torch", "2.13.0+cpu"), _req("numpy", "2.2.0")]) is None  # a CPU build
    assert cuda_build([_req("nvidia-cuda-runtime-cu12", "12.4.127")]) is None  # not in catalog/cuda.yml: cannot say
    with pytest.raises(InputError, match=r"torch 2.3.0\+cu121 is built for CUDA 12.1, but nvidia-cuda-runtime-cu12 12.8.90"):
        cuda_build([_req("torch", "2.3.0+cu121"), _req("nvidia-cuda-runtime-cu12", "12.8.90")])


@pytest.mark.parametrize(
    ("text", "numbers"),
    [("580.95.05-0ubuntu0.24.04.2", (580, 95, 5)), ("3:580.95.05-1.el9", (580, 95, 5)), ("535.261.03-1", (535, 261, 3)), ("535", (535,))],
)
def test_driver_version_of_a_package_version(text: str, numbers: tuple[int, ...]) -> None:
    assert driver_version(text) == numbers


def _scenario_vars(**spec: Any) -> dict[str, Any]:
    doc = yaml.safe_load((SCENARIO / "inventory" / "group_vars" / "lab.yml").read_text())
    return {k: v for k, v in doc.items() if k.startswith("llmfleet_")} | spec


def _profile(branch: str | None, version: str | None) -> dict[str, Any]:
    """The scenario's L4 profile with another driver (Ubuntu 24.04's package spelling)."""
    profile = dict(_scenario_vars()["llmfleet_hardware_profiles"]["drv-debian-l4"])
    profile["driver_branch"] = branch
    profile["driver"] = (
        {"ubuntu-24.04": {"source": "ubuntu-server-open", "version": version, "packages": [f"nvidia-headless-{branch}-server-open"]}}
        if version
        else {}
    )
    return {"llmfleet_hardware_profiles": {"drv-debian-l4": profile}}


def test_r535_with_the_cuda_12_8_runtime_is_refused_with_its_reference(tmp_path: Path) -> None:
    """The pair the driver scenario planned before: Debian 12's R535 and vllm-0.19.0-cu128, through
    tools/plan.py as an operator runs it: exit 2, the place, the value, the driver needed, the reference."""
    inv = tmp_path / "inv"
    shutil.copytree(SCENARIO / "inventory", inv)
    group_vars = inv / "group_vars" / "lab.yml"
    group_vars.write_text(group_vars.read_text().replace("llmfleet_runtime: vllm-0.4.3-cu121", "llmfleet_runtime: vllm-0.19.0-cu128"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = plan_cli.main(["-i", str(inv), "--lock", str(DEFAULT_LOCK)])
    text = " ".join(out.getvalue().split())
    assert code == 2, text
    for words in (
        'drv1: llmfleet_runtime = "vllm-0.19.0-cu128"',
        "links CUDA 12.8 Update 1 (nvidia-cuda-runtime-cu12 12.8.90)",
        "needs an NVIDIA driver >= 570.124.06",
        "pins R535, debian-12 535.261.03-1",
        "[rule driver-cuda-minimum; see NVIDIA CUDA Toolkit Release Notes, \"CUDA Toolkit and Corresponding Driver Versions\"",
        "docs/driver-cuda.md",
        "valid: a driver of branch R570 or later at version >= 570.124.06",
    ):
        assert words in text, f"{words!r} not in:\n{text}"
    assert "Traceback" not in text


@pytest.mark.parametrize(
    ("runtime", "branch", "version", "refused"),
    [
        ("vllm-0.19.0-cu128", "570", "570.124.06-0ubuntu1", None),  # the release's own driver
        ("vllm-0.19.0-cu128", "570", "570.86.15-0ubuntu0.24.04.4", "ubuntu-24.04 570.86.15-0ubuntu0.24.04.4"),  # branch 570, too old
        ("vllm-0.19.0-cu128", "580", "580.95.05-0ubuntu0.24.04.2", None),
        ("vllm-0.19.0-cu128", "535", None, "R535"),  # a branch alone
        ("vllm-0.33.0-cu128", "580", "580.95.05-0ubuntu0.24.04.2", None),  # CUDA 13.0 Update 2's own driver
        ("vllm-0.33.0-cu128", "580", "580.82.07-0ubuntu1", "ubuntu-24.04 580.82.07-0ubuntu1"),
        ("vllm-0.33.0-cu128", "570", "570.172.08-0ubuntu1", "R570, ubuntu-24.04 570.172.08-0ubuntu1"),
    ],
)
def test_every_pinned_driver_must_reach_the_runtime_s(runtime: str, branch: str, version: str | None, refused: str | None) -> None:
    host_vars = _scenario_vars(llmfleet_runtime=runtime) | _profile(branch, version)
    if refused is None:
        plan = evaluate_host("drv1", host_vars, LOCK)
        assert not [w for w in plan["warnings"] if "driver-cuda-minimum" in w]
        rule = next(r for r in plan["instances"][0]["rules"] if r["id"] == "driver-cuda-minimum")
        assert rule["status"] == "passed", rule
        return
    with pytest.raises(PlanRefused) as exc:
        evaluate_host("drv1", host_vars, LOCK)
    (problem,) = [p for p in exc.value.problems if "driver-cuda-minimum" in p.message]
    assert problem.where == "llmfleet_runtime" and problem.value == runtime
    assert f"pins {refused}." in problem.message


def test_a_profile_without_a_driver_pin_is_warned_not_passed() -> None:
    plan = evaluate_host("drv1", _scenario_vars(llmfleet_runtime="vllm-0.19.0-cu128") | _profile(None, None), LOCK)
    (warning,) = [w for w in plan["warnings"] if "driver-cuda-minimum" in w]
    assert "could not be checked" in warning and "pins no NVIDIA driver" in warning


def test_the_refusal_is_the_host_s_once_whatever_the_instances() -> None:
    inst = _scenario_vars()["llmfleet_instances"][0]
    two = [inst, {**inst, "name": "tiny2", "port": 8001}]
    with pytest.raises(PlanRefused) as exc:
        evaluate_host("drv1", _scenario_vars(llmfleet_runtime="vllm-0.19.0-cu128", llmfleet_instances=two), LOCK)
    assert len([p for p in exc.value.problems if "driver-cuda-minimum" in p.message]) == 1


def test_the_driver_scenario_plans_a_pair_r535_runs() -> None:
    """tests/molecule/driver plans against its own lock (molecule.yml sets LLMFLEET_LOCK): no refusal,
    no warning from the driver rule, and its model pin is pins/lock.json's."""
    molecule = yaml.safe_load((SCENARIO / "molecule.yml").read_text())
    assert molecule["provisioner"]["env"]["LLMFLEET_LOCK"] == "${MOLECULE_SCENARIO_DIRECTORY}/lock.json"
    plan = evaluate_host("drv1", _scenario_vars(), SCENARIO_LOCK)
    assert plan["runtime"]["key"] == "vllm-0.4.3-cu121" and plan["driver"]["branch"] == "535"
    rule = next(r for r in plan["instances"][0]["rules"] if r["id"] == "driver-cuda-minimum")
    assert rule["status"] == "passed", rule
    assert SCENARIO_LOCK.models == {"tiny-llama": LOCK.models["tiny-llama"]}
