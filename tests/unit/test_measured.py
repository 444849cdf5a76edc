"""Measured facts recorded into the inventory (tools/plan.py --record-gpus): the plan stays a pure
function of inventory and pins; the control node, drift and the host's check plan one generation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from gpu_fakes import capture
from llmfleet.errors import InputError, PlanRefused
from llmfleet.gpu_preflight import check_plan_against_gpu_facts
from llmfleet.inventory import load_inventory
from llmfleet.measured import MEASURED_FILE, VAR, record_gpus
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_fleet, evaluate_host

REPO = Path(__file__).resolve().parents[2]
LOCK = load_lock(REPO / "tests" / "fixtures" / "lock.json")
ACROSS = [["X", "SYS", "SYS", "SYS"], ["SYS", "X", "SYS", "SYS"], ["SYS", "SYS", "X", "NODE"], ["SYS", "SYS", "NODE", "X"]]


@pytest.fixture
def inventory(tmp_path: Path) -> Path:
    inv = tmp_path / "xr7620"
    shutil.copytree(REPO / "inventory" / "xr7620", inv)
    return inv


def facts_across_sockets() -> dict[str, Any]:
    facts = capture("xr7620-4xl4-derived.json")
    for pair in facts["pairs"]:
        if {pair["a"], pair["b"]} == {0, 1}:
            pair["topology"] = "SYS"
    return facts


def runner(results: dict[str, Any], seen: list[list[str]] | None = None) -> Callable[..., tuple[dict[str, Any], str]]:
    def run(command: Callable[[str], list[str]]) -> tuple[dict[str, Any], str]:
        if seen is not None:
            seen.append(command("/tree"))
        return results, ""

    return run


def test_record_writes_an_inventory_source_the_planner_and_ansible_read(inventory: Path) -> None:
    before = evaluate_host("edge-a01", load_inventory(inventory)["edge-a01"], LOCK)
    seen: list[list[str]] = []
    across = {"edge-a01": {"ansible_facts": {"nvidia_gpu": facts_across_sockets()}}}
    env = record_gpus(str(inventory), "edge-a01", runner=runner(across, seen))
    assert env["ok"] and env["recorded"] == {"edge-a01": ACROSS} and env["errors"] == {}
    (cmd,) = seen
    assert cmd[cmd.index("-m") + 1] == "nvidia_gpu_facts" and cmd[cmd.index("--limit") + 1] == "edge-a01"
    doc = yaml.safe_load((inventory / MEASURED_FILE).read_text())
    assert doc == {"all": {"hosts": {"edge-a01": {VAR: ACROSS}}}}
    hosts = load_inventory(inventory)
    assert hosts["edge-a01"][VAR] == ACROSS and VAR not in hosts["edge-b01"]
    after = evaluate_host("edge-a01", hosts["edge-a01"], LOCK)
    assert after["hardware"]["topology"] == ACROSS and after["generation"] != before["generation"]
    # pure: planned again, by anyone, the same id; the host's check with the same facts changes nothing
    assert evaluate_host("edge-a01", load_inventory(inventory)["edge-a01"], LOCK)["generation"] == after["generation"]
    assert check_plan_against_gpu_facts("edge-a01", after, facts_across_sockets())["generation"] == after["generation"]
    with pytest.raises(PlanRefused, match="--record-gpus"):
        check_plan_against_gpu_facts("edge-a01", before, facts_across_sockets())


def test_recording_one_host_keeps_the_others_and_a_failed_host_is_named_not_recorded(inventory: Path) -> None:
    good = {"ansible_facts": {"nvidia_gpu": capture("xr7620-4xl4-derived.json")}}
    record_gpus(str(inventory), "edge-a01", runner=runner({"edge-a01": {"ansible_facts": {"nvidia_gpu": facts_across_sockets()}}}))
    env = record_gpus(str(inventory), None, runner=runner({"edge-b01": good}))
    assert not env["ok"] and set(env["recorded"]) == {"edge-b01"}
    assert env["errors"] == {"edge-a01": "ansible gave no result for this host"}
    hosts = yaml.safe_load((inventory / MEASURED_FILE).read_text())["all"]["hosts"]
    assert hosts["edge-a01"][VAR] == ACROSS, "an earlier record was lost"
    env = record_gpus(str(inventory), "edge-a01", runner=runner({"edge-a01": {"unreachable": True, "msg": "ssh: no route"}}))
    assert env["errors"] == {"edge-a01": "unreachable: ssh: no route"} and env["recorded"] == {}
    no_nvml = {"ansible_facts": {"nvidia_gpu": {"nvml_available": False, "error": "NVML Shared Library Not Found"}}}
    env = record_gpus(str(inventory), "edge-a01", runner=runner({"edge-a01": no_nvml}))
    assert "NVML Shared Library Not Found" in env["errors"]["edge-a01"]
    h100 = {"edge-a01": {"ansible_facts": {"nvidia_gpu": capture("h100-capture.json")}}}
    env = record_gpus(str(inventory), "edge-a01", runner=runner(h100))
    assert env["errors"]["edge-a01"].startswith("NVML shows 1 GPU(s), the hardware profile has 4")


def test_record_refuses_what_it_cannot_do_with_the_reason(inventory: Path) -> None:
    with pytest.raises(InputError, match="not one"):
        record_gpus(str(inventory / "hosts.yml"), None, runner=runner({}))
    with pytest.raises(InputError, match="no host of lab1 has a GPU profile"):
        record_gpus(str(REPO / "inventory" / "lab"), "lab1", runner=runner({}))
    (inventory / MEASURED_FILE).write_text("- a list\n")
    with pytest.raises(InputError, match="is not an inventory of the form"):
        record_gpus(str(inventory), "edge-a01", runner=runner({"edge-a01": {"ansible_facts": {"nvidia_gpu": facts_across_sockets()}}}))


@pytest.mark.parametrize(
    ("value", "where", "needle"),
    [
        ([["X", "SYS"], ["SYS", "X"]], "llmfleet_measured_topology", "must be 4 x 4"),
        ([*ACROSS[:3], ["SYS", "SYS", "NODE", "NODE"]], "llmfleet_measured_topology[3][3]", "X exactly on the diagonal"),
        ([["X", "PIX", "SYS", "SYS"], *ACROSS[1:]], "llmfleet_measured_topology[0][1]", "symmetric"),
    ],
)
def test_a_bad_recorded_topology_is_refused_by_name(inventory: Path, value: Any, where: str, needle: str) -> None:
    hv = load_inventory(inventory)["edge-a01"] | {VAR: value}
    with pytest.raises(PlanRefused) as info:
        evaluate_host("edge-a01", hv, LOCK)
    (problem,) = info.value.problems
    assert problem.where == where and needle in problem.message


def test_a_recorded_topology_on_a_cpu_profile_is_refused() -> None:
    lab = load_inventory(REPO / "inventory" / "lab")
    _, problems = evaluate_fleet({"lab1": lab["lab1"] | {VAR: [["X"]]}}, LOCK)
    assert [(p.where, p.message) for p in problems] == [(VAR, "hardware profile lab-cpu has no GPU to measure")]


def test_the_cli_names_a_file_inventory_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), "-i", "inventory/xr7620/hosts.yml", "--record-gpus", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "writes llmfleet-measured.yml into the inventory directory" in done.stdout + done.stderr
    assert not json.loads(done.stdout or "{}").get("ok", False)
