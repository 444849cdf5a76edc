"""The fleet rollout summary callback (callback_plugins/llmfleet_summary.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from by_path import load_file

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "callback_plugins" / "llmfleet_summary.py"


MOD: Any = load_file("llmfleet_summary", PLUGIN)


class FakeHost:
    def __init__(self, name: str) -> None:
        self.name = name

    def get_name(self) -> str:
        return self.name


class FakeInventory:
    def __init__(self, all_hosts: list[str]) -> None:
        self.all = all_hosts
        self.batch = all_hosts

    def get_hosts(self, pattern: str, ignore_restrictions: bool = False) -> list[FakeHost]:
        return [FakeHost(n) for n in (self.all if ignore_restrictions else self.batch)]


class Run:
    """Drives the callback the way PlaybookExecutor does: one play start per serial batch."""

    def __init__(self, tmp_path: Path, hosts: list[str], playbook: str = "site.yml") -> None:
        self.cb = MOD.CallbackModule()
        self.inv = FakeInventory(hosts)
        self.play = SimpleNamespace(hosts="fleet", serial=[1, "25%", "100%"], _uuid="p1", get_name=lambda: "Rollout",
                                    get_variable_manager=lambda: SimpleNamespace(_inventory=self.inv))
        self.cb.v2_playbook_on_start(SimpleNamespace(_file_name=str(tmp_path / playbook)))

    def batch(self, hosts: list[str]) -> None:
        self.inv.batch = hosts
        self.cb.v2_playbook_on_play_start(self.play)

    def ok(self, host: str, report: dict[str, Any] | None = None) -> None:
        self.cb.v2_runner_on_start(FakeHost(host), None)
        res: dict[str, Any] = {"ansible_facts": {"llmfleet_report": report}} if report is not None else {"changed": False}
        self.cb.v2_runner_on_ok(SimpleNamespace(_host=FakeHost(host), _result=res))

    def failed(self, host: str, msg: str) -> None:
        self.cb.v2_runner_on_failed(SimpleNamespace(_host=FakeHost(host), _result={"msg": msg}))

    def unreachable(self, host: str, msg: str) -> None:
        self.cb.v2_runner_on_unreachable(SimpleNamespace(_host=FakeHost(host), _result={"msg": msg, "unreachable": True}))

    def finish(self) -> dict[str, Any]:
        self.cb.v2_playbook_on_stats(SimpleNamespace())
        assert not self.cb._warned
        path = Path(self.cb.written_path)
        doc = json.loads(path.read_text())
        assert doc["schema"] == "llmfleet.rollout/1"
        assert {"started", "finished", "wall_s", "ok", "hosts", "totals"} <= doc.keys()
        return doc


@pytest.fixture(autouse=True)
def _run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_RUN_DIR", str(tmp_path / "run"))


def _good(before: str = "g1", after: str = "g2") -> dict[str, Any]:
    return {"generation_before": before, "generation_after": after, "generation_planned": after,
            "switched": True, "verify": "passed", "rolled_back": False}


def test_good_rollout_four_hosts_three_batches(tmp_path: Path) -> None:
    r = Run(tmp_path, ["fl1", "fl2", "fl3", "fl4"])
    r.batch(["fl1"])
    r.ok("fl1", _good())
    r.batch(["fl2"])
    r.ok("fl2", _good())
    r.batch(["fl3", "fl4"])
    r.ok("fl3", _good())
    r.ok("fl4", _good())
    doc = r.finish()
    assert doc["ok"] is True
    assert [doc["hosts"][h]["batch"] for h in ("fl1", "fl2", "fl3", "fl4")] == [1, 2, 3, 3]
    assert all(e["status"] == "ok" and e["verify"] == "passed" and e["generation_after"] == "g2" for e in doc["hosts"].values())
    assert doc["totals"] == {"hosts": 4, "switched": 4, "rolled_back": 0, "failed": 0, "unreachable": 0, "not_reached": 0, "ok": 4}
    assert (tmp_path / "run" / "summary.json").is_file()


def test_canary_failed_rolled_back_rest_not_reached(tmp_path: Path) -> None:
    r = Run(tmp_path, ["fl1", "fl2", "fl3", "fl4"])
    r.batch(["fl1"])
    r.ok("fl1", {"generation_before": "g1", "generation_planned": "g2", "batch": 1})
    r.failed("fl1", "switch: vllm-tiny did not become healthy\nwithin 600 s")
    r.ok("fl1", {"generation_before": "g1", "generation_after": "g1", "generation_planned": "g2", "switched": True,
                 "verify": "not measured", "rolled_back": True, "rolled_back_to": "g1", "failure": "switch: not healthy", "batch": 1})
    doc = r.finish()
    fl1 = doc["hosts"]["fl1"]
    assert fl1["status"] == "failed" and fl1["rolled_back"] and fl1["rolled_back_to"] == "g1"
    assert fl1["failure"] == "switch: not healthy"
    for h in ("fl2", "fl3", "fl4"):
        assert doc["hosts"][h]["status"] == "not reached" and doc["hosts"][h]["duration_s"] is None
    assert doc["ok"] is False
    assert doc["totals"]["rolled_back"] == 1 and doc["totals"]["not_reached"] == 3 and doc["totals"]["failed"] == 1


def test_unreachable_host(tmp_path: Path) -> None:
    r = Run(tmp_path, ["fl1", "fl2"])
    r.batch(["fl1", "fl2"])
    r.ok("fl1", _good())
    r.cb.v2_runner_on_start(FakeHost("fl2"), None)
    r.unreachable("fl2", "Failed to connect to the host via ssh: timed out")
    doc = r.finish()
    assert doc["hosts"]["fl2"]["status"] == "unreachable"
    assert "timed out" in doc["hosts"]["fl2"]["failure"]
    assert doc["totals"]["unreachable"] == 1 and doc["ok"] is False


def test_verify_failure_in_batch_two_with_rollback(tmp_path: Path) -> None:
    r = Run(tmp_path, ["fl1", "fl2", "fl3", "fl4"])
    r.batch(["fl1"])
    r.ok("fl1", _good())
    r.batch(["fl2"])
    r.ok("fl2", {"generation_before": "g1", "generation_planned": "g2"})
    r.failed("fl2", "verify: ttft p95 9.1 s > 8 s " + "x" * 400)
    r.ok("fl2", {"generation_before": "g1", "generation_after": "g1", "switched": True, "verify": "failed",
                 "rolled_back": True, "rolled_back_to": "g1"})
    doc = r.finish()
    fl2 = doc["hosts"]["fl2"]
    assert fl2["batch"] == 2 and fl2["verify"] == "failed" and fl2["rolled_back_to"] == "g1"
    assert fl2["status"] == "failed" and fl2["failure"].startswith("verify: ttft") and len(fl2["failure"]) <= 200
    assert doc["hosts"]["fl3"]["status"] == "not reached"
    assert doc["totals"]["switched"] == 2 and doc["totals"]["rolled_back"] == 1


def test_silent_for_other_playbooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMFLEET_RUN_DIR")
    r = Run(tmp_path, ["h"], playbook="other.yml")
    r.batch(["h"])
    r.ok("h")
    r.cb.v2_playbook_on_stats(SimpleNamespace())
    assert r.cb.written_path is None and not (tmp_path / "out").exists()


def test_never_raises(tmp_path: Path) -> None:
    cb = MOD.CallbackModule()
    cb.v2_runner_on_ok(object())  # malformed result
    cb.v2_playbook_on_play_start(object())
    assert cb._warned


def test_end_to_end_ansible_playbook(tmp_path: Path) -> None:
    (tmp_path / "inv").write_text("[fleet]\nfl1 ansible_connection=local\nfl2 ansible_connection=local\n")
    (tmp_path / "site.yml").write_text(textwrap.dedent("""\
        - hosts: fleet
          gather_facts: false
          serial: [1, "100%"]
          tasks:
            - ansible.builtin.set_fact:
                llmfleet_report: {generation_before: g1, generation_planned: g2}
            - ansible.builtin.set_fact:
                llmfleet_report: "{{ llmfleet_report | combine({'generation_after': 'g2', 'switched': true, 'verify': 'passed'}) }}"
        """))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "LLMFLEET_"))}
    env |= {"ANSIBLE_CALLBACK_PLUGINS": str(PLUGIN.parent), "ANSIBLE_CALLBACKS_ENABLED": "llmfleet_summary",
            "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"), "ANSIBLE_HOME": str(tmp_path / "home")}
    exe = Path(sys.executable).parent / "ansible-playbook"
    proc = subprocess.run([str(exe), "-i", "inv", "site.yml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LLMFLEET ROLLOUT SUMMARY" in proc.stdout
    doc = json.loads((tmp_path / "out" / "runs" / "latest.json").read_text())
    assert doc["schema"] == "llmfleet.rollout/1" and doc["ok"] is True
    assert doc["hosts"]["fl1"]["batch"] == 1 and doc["hosts"]["fl2"]["batch"] == 2
    assert doc["hosts"]["fl2"]["generation_after"] == "g2" and doc["totals"]["switched"] == 2
    assert len(list((tmp_path / "out" / "runs").glob("*-site/summary.json"))) == 1
