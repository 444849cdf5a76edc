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


def test_many_files_in_one_task_trust_existing_ones_by_size_when_asked(cdn: TestHub, tmp_path: Path) -> None:
    other = os.urandom(1000)
    other_sha = hashlib.sha256(other).hexdigest()
    cdn.publish("org/n", {"x.safetensors": other})
    present, wrong, missing = tmp_path / "m" / "a", tmp_path / "m" / "b", tmp_path / "m" / "c"
    present.parent.mkdir()
    present.write_bytes(b"\0" * len(DATA))  # right size, other content: trusted by size, re-fetched by checksum
    wrong.write_bytes(b"short")
    files = [
        {"url": f"{cdn.cdn}/blobs/{SHA}", "dest": str(present), "sha256": SHA, "size": len(DATA)},
        {"url": f"{cdn.cdn}/blobs/{SHA}", "dest": str(wrong), "sha256": SHA, "size": len(DATA)},
        {"url": f"{cdn.cdn}/blobs/{other_sha}", "dest": str(missing), "sha256": other_sha, "size": len(other)},
    ]
    r = run(tmp_path, files=files, existing="size")
    assert (r["changed"], r["present"], r["fetched"]) == (True, 1, 2), r
    assert present.read_bytes() == b"\0" * len(DATA) and wrong.read_bytes() == DATA and missing.read_bytes() == other
    r = run(tmp_path, files=files)  # checksum: the stand-in of the right size is found out
    assert (r["present"], r["fetched"]) == (2, 1) and present.read_bytes() == DATA
    again = run(tmp_path, files=files)
    assert not again["changed"] and again["present"] == 3


def test_blobs_come_from_a_content_addressed_server_and_missing_ones_are_named_without_one(tmp_path: Path) -> None:
    from llmfleet.artifacts.blobs import serve_in_thread

    root = tmp_path / "upstream"
    (root / "blobs" / "sha256").mkdir(parents=True)
    (root / "blobs" / "sha256" / SHA).write_bytes(DATA)
    server = serve_in_thread([root])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        mirror = tmp_path / "mirror" / "sha256"
        blobs = [{"sha256": SHA, "size": len(DATA)}]
        offline = run(tmp_path, blobs=blobs, blob_dir=str(mirror), base_url="")
        assert offline["failed"] and "1 of 1 blob(s) are not in" in offline["msg"] and SHA in offline["msg"]
        r = run(tmp_path, blobs=blobs, blob_dir=str(mirror), base_url=url, existing="size")
        assert r["fetched"] == 1 and (mirror / SHA).read_bytes() == DATA
        assert run(tmp_path, blobs=blobs, blob_dir=str(mirror), base_url="")["present"] == 1
        named = run(tmp_path, blobs=[{"sha256": SHA, "size": len(DATA), "filename": "w-1.0-py3-none-any.whl"}],
                    blob_dir=str(tmp_path / "wheels"), base_url=url)
        assert named["fetched"] == 1 and (tmp_path / "wheels" / "w-1.0-py3-none-any.whl").read_bytes() == DATA
    finally:
        server.shutdown()
