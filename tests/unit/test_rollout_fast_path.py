"""The fast path's decision in playbooks/rollout.yml, run by ansible-playbook on localhost.

The tasks after the probe are taken from the playbook as they are; the probe's answer is set
beforehand (the probe itself, llmfleet_drift with ``expect``, is tested in test_drift.py). A task
after them shows whether the host went on to the stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
FIRST = "Rollout | Decide whether the host can be done after its probe"
LAST = "Rollout | End a converged host here"


def fast_path_tasks() -> list[dict[str, Any]]:
    tasks = yaml.safe_load((REPO / "playbooks" / "rollout.yml").read_text())[0]["tasks"]
    names = [t["name"] for t in tasks]
    return tasks[names.index(FIRST) : names.index(LAST) + 1]


def run(tmp_path: Path, probe: dict[str, Any], *args: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "tasks": [
                {
                    "name": "Test | The probe's answer",
                    "ansible.builtin.set_fact": {"__rollout_probe": probe, "ansible_facts": {"llmfleet_plan": {"generation": "g1"}}},
                    "tags": ["always"],
                },
                *fast_path_tasks(),
                {"name": "Test | The stages", "ansible.builtin.debug": {"msg": "STAGES RAN"}, "tags": ["always"]},
            ],
        }
    ]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "LLMFLEET_RUN_DIR": str(tmp_path / "run")}
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(path), *args]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, "STAGES RAN" in done.stdout


CONVERGED = {"converged": True, "not_converged": [], "generation": "g1"}
BEHIND = {"converged": False, "not_converged": ["runs generation g0, the plan is g1"], "generation": "g0"}


def test_a_converged_host_ends_after_its_probe(tmp_path: Path) -> None:
    done, stages = run(tmp_path, CONVERGED)
    assert not stages, done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())["hosts"]["localhost"]
    assert summary["converged"] and summary["verify"] == "skipped" and summary["generation_after"] == "g1"


@pytest.mark.parametrize(
    "args",
    [("-e", "rollout_fast_path=false"), ("-e", "verify_unchanged=true"), ("-e", "store_full_check=true"), ("--skip-tags", "verify")],
)
def test_a_run_that_asks_for_more_takes_every_stage(tmp_path: Path, args: tuple[str, ...]) -> None:
    done, stages = run(tmp_path, CONVERGED, *args)
    assert stages, done.stdout
    assert "localhost takes every stage" not in done.stdout  # the probe is not the reason


def test_a_host_that_is_not_converged_says_why_and_takes_every_stage(tmp_path: Path) -> None:
    done, stages = run(tmp_path, BEHIND)
    assert stages
    assert "localhost takes every stage: runs generation g0, the plan is g1" in done.stdout
    failed = run(tmp_path, {"failed": False, "msg": "MODULE FAILURE: see stdout"})[0]
    assert "localhost takes every stage: MODULE FAILURE: see stdout" in failed.stdout
