"""The host download module (library/llmfleet_fetch.py) against the test hub's storage host (Range, cuts)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from testhub import TestHub

REPO = Path(__file__).resolve().parents[3]
MODULE = REPO / "library" / "llmfleet_fetch.py"
DATA = os.urandom(3 << 20)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def cdn() -> Any:
    with TestHub() as h:
        h.publish("org/m", {"w.safetensors": DATA})
        yield h


def run(tmp_path: Path, check_mode: bool = False, **args: Any) -> dict[str, Any]:
    """The module as Ansible runs it: one JSON argument file, one JSON result on stdout."""
    params = {"ANSIBLE_MODULE_ARGS": {**args, "_ansible_check_mode": check_mode}}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(params))
    proc = subprocess.run([sys.executable, str(MODULE), str(path)], capture_output=True, text=True, check=False)
    return dict(json.loads(proc.stdout))


def args(cdn: TestHub, dest: Path, **extra: Any) -> dict[str, Any]:
    return {"url": f"{cdn.cdn}/blobs/{SHA}", "dest": str(dest), "sha256": SHA, "size": len(DATA), **extra}


def test_a_fresh_download_is_checked_and_installed(cdn: TestHub, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    r = run(tmp_path, **args(cdn, dest))
    assert r["changed"] and not r.get("failed") and r["received"] == len(DATA) and r["resumed_from"] == 0
    assert dest.read_bytes() == DATA and oct(dest.stat().st_mode & 0o777) == "0o644"
    assert not Path(str(dest) + ".part").exists()
    again = run(tmp_path, **args(cdn, dest))
    assert not again["changed"] and again["received"] == 0  # present and matching: nothing asked for
    assert cdn.served(SHA) == len(DATA)


def test_a_part_left_by_a_broken_transfer_is_resumed_with_range(cdn: TestHub, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    Path(str(dest) + ".part").write_bytes(DATA[: 1 << 20])
    r = run(tmp_path, **args(cdn, dest))
    assert r["changed"] and r["resumed_from"] == 1 << 20 and r["received"] == len(DATA) - (1 << 20)
    assert dest.read_bytes() == DATA and cdn.served(SHA) == len(DATA) - (1 << 20)
    assert [q.range for q in cdn.requests if q.path.startswith("/blobs/")] == [f"bytes={1 << 20}-"]


def test_a_connection_dropped_mid_file_is_resumed_within_the_task(cdn: TestHub, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    cdn.cut_after(SHA, 1 << 20)
    r = run(tmp_path, **args(cdn, dest))
    assert r["changed"] and not r.get("failed") and r["attempts"] == 2, r
    assert dest.read_bytes() == DATA and cdn.served(SHA) == len(DATA)


def test_bytes_that_do_not_match_the_pin_are_deleted_and_the_task_fails(cdn: TestHub, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    cdn.corrupt(SHA)
    r = run(tmp_path, **args(cdn, dest))
    assert r["failed"] and f"!= pinned {SHA}" in r["msg"] and "nothing of it is used" in r["msg"]
    assert not dest.exists() and not Path(str(dest) + ".part").exists()


def test_check_mode_downloads_nothing_and_errors_are_one_line(cdn: TestHub, tmp_path: Path) -> None:
    dest = tmp_path / "w.safetensors"
    r = run(tmp_path, check_mode=True, **args(cdn, dest))
    assert r["changed"] and not dest.exists() and cdn.served(SHA) == 0
    missing = run(tmp_path, **{**args(cdn, dest), "url": f"{cdn.cdn}/blobs/{'0' * 64}"})
    assert missing["failed"] and "HTTP 404" in missing["msg"] and "\n" not in missing["msg"]
    bad = run(tmp_path, **{**args(cdn, dest), "sha256": "xyz"})
    assert bad["failed"] and "64 lowercase hex digits" in bad["msg"]
