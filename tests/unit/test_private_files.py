"""Files written as root are written safely: the verify textfile's mode is set on the open file
(never by path, which a writer of its directory could swap for a link), in a root-owned directory."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.verify import report  # noqa: E402


def test_write_text_sets_the_mode_on_the_open_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def by_path(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"chmod by path: {args}")

    monkeypatch.setattr(os, "chmod", by_path)
    target = tmp_path / "llmfleet_verify_tiny.prom"
    report.write_text(str(target), "x 1\n")
    assert target.read_text() == "x 1\n" and target.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_the_textfile_directory_is_root_owned() -> None:
    tasks = yaml.safe_load((REPO / "roles" / "vllm_verify" / "tasks" / "verify.yml").read_text())
    block = next(t for t in tasks if "block" in t)["block"]
    task = next(t for t in block if t["name"] == "Verify | Create the textfile-collector directory")
    spec = task["ansible.builtin.file"]
    assert spec.get("owner") == "root" and spec.get("group") == "root" and spec.get("mode") == "0755", spec
