"""Every stage keeps the full run's safety when it runs alone: the run state a rollback needs (the
generation the host ran before this run) is read whatever ``--tags`` or stage playbook is used.

A run of one stage (``site.yml --tags switch``) used to skip the preflight, where that state was read:
a failed switch then had nothing to roll back to. ``ansible-playbook --list-tasks`` shows which tasks
a run would take, without a host.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
STAGES = ["preflight", "driver", "runtime", "models", "services", "switch", "verify"]
RUN_STATE = ["Run state | Read the generation the host runs now", "Run state | Remember it for a rollback and the report"]


def listed(*args: str) -> list[str]:
    done = subprocess.run(
        [str(ANSIBLE_PLAYBOOK), "-i", str(REPO / "inventory" / "lab"), *args, "--list-tasks"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [line.strip().split("\t")[0] for line in done.stdout.splitlines() if "\t" in line]


@pytest.mark.parametrize("stage", STAGES)
def test_site_yml_with_one_stage_reads_the_run_state_before_the_stage(stage: str) -> None:
    tasks = listed("site.yml", "--tags", stage)
    assert all(t in tasks for t in RUN_STATE), tasks
    first_of_stage = next(i for i, t in enumerate(tasks) if t.lower().startswith(f"{stage} |"))
    assert tasks.index(RUN_STATE[1]) < first_of_stage, tasks


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_playbook_reads_the_run_state(stage: str) -> None:
    tasks = listed(f"playbooks/{stage}.yml")
    assert all(t in tasks for t in RUN_STATE), tasks


@pytest.mark.parametrize("stage", ["switch", "verify"])
def test_the_stages_that_roll_back_roll_back_to_the_run_state(stage: str) -> None:
    """Their rescue includes the rollback, and the rollback goes to what run_state.yml remembered."""
    (block,) = [t for t in yaml.safe_load((REPO / "playbooks" / "stages" / f"{stage}.yml").read_text()) if "rescue" in t]
    assert any("rollback-on-failure.yml" in str(t.get("ansible.builtin.import_tasks")) for t in block["rescue"])
    rollback = (REPO / "playbooks" / "stages" / "rollback-on-failure.yml").read_text()
    assert "vllm_service_rollback_to: \"{{ _llmfleet_before }}\"" in rollback
    run_state = yaml.safe_load((REPO / "playbooks" / "tasks" / "run_state.yml").read_text())
    assert any("_llmfleet_before" in (t.get("ansible.builtin.set_fact") or {}) for t in run_state)
