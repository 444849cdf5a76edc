"""``tools/pin.py fetch`` of hub pins: resumable, checked before visible, one line per failure."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import pytest
from llmfleet.artifacts import hub as hubmod
from llmfleet.artifacts.lockfile import read_lock, write_lock
from llmfleet.cli.pin import main
from testhub import TestHub
from testhub.checkpoints import sharded

REPO = Path(__file__).resolve().parents[3]
SHARDS, SHARD = 4, 8 << 20


@pytest.fixture
def pinned(hub: TestHub, tmp_path: Path, cache: Path) -> tuple[Path, dict[str, bytes]]:
    """A lock pinning ``m`` (four 8 MiB shards) from the test hub, nothing fetched yet."""
    files = sharded(SHARDS, SHARD)
    hub.publish("org/m", files)
    lock = tmp_path / "lock.json"
    write_lock(lock, read_lock(lock))
    assert main(["--lock", str(lock), "model", "add", "m", "hf://org/m"]) == 0
    return lock, files


def _fetch(lock: Path, *extra: str) -> int:
    return main(["--lock", str(lock), "fetch", "--model", "m", *extra])


def _shard_sha(files: dict[str, bytes], n: int) -> str:
    return hashlib.sha256(files[f"model-{n:05d}-of-{SHARDS:05d}.safetensors"]).hexdigest()


def test_fetch_puts_exactly_the_pinned_files_in_the_cache_and_check_agrees(
    pinned: tuple[Path, dict[str, bytes]], cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock, files = pinned
    assert _fetch(lock) == 0
    dst = cache / "models" / "m"
    assert {p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()} == set(files)
    assert all((dst / p).read_bytes() == data for p, data in files.items())
    assert not (cache / "downloads" / f"m-{read_lock(lock).models['m'].revision[:16]}").exists()
    out = capsys.readouterr().out
    assert f"model m: {len(files)} files, 34 MB verified" in out and "downloaded in" in out
    assert main(["--lock", str(lock), "check", "--model", "m"]) == 0
    assert _fetch(lock) == 0 and "present" in capsys.readouterr().out


def test_a_killed_fetch_resumes_and_resends_less_than_one_shard(hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path) -> None:
    lock, files = pinned
    hub.throttle(6 << 20)  # 6 MiB/s per connection: the kill lands mid-shard
    env = dict(os.environ, LLMFLEET_LOCK=str(lock), PYTHONPATH=str(REPO / "tools"))
    argv = [sys.executable, str(REPO / "tools" / "pin.py"), "fetch", "--model", "m"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    first = _shard_sha(files, 1)
    deadline = time.monotonic() + 60
    while hub.served(first) < 0.6 * SHARD:  # 60 % of a shard is across
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    before = sum(hub.served(_shard_sha(files, n)) for n in range(1, SHARDS + 1))
    assert before < SHARDS * SHARD and not (cache / "models" / "m").exists()  # nothing visible yet
    hub.throttle(None)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    sent = sum(hub.served(_shard_sha(files, n)) for n in range(1, SHARDS + 1))
    resent = sent - SHARDS * SHARD
    assert 0 <= resent <= SHARD, f"{resent} bytes sent twice"
    assert "already here (resumed or reused)" in done.stdout
    ranged = [r for r in hub.requests if r.range and r.path.startswith("/blobs/") and r.status == 206]
    assert ranged, "the second run did not ask for the rest of a file"
    assert all((cache / "models" / "m" / p).read_bytes() == data for p, data in files.items())


def test_a_corrupt_shard_is_refused_and_nothing_partial_is_used(
    hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock, files = pinned
    hub.corrupt(_shard_sha(files, 2))
    assert _fetch(lock) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model-00002-of-00004.safetensors: sha256" in err and "nothing of it is used" in err
    assert not (cache / "models" / "m").exists()
    staging = next((cache / "downloads").iterdir())
    assert not (staging / "model-00002-of-00004.safetensors").exists()
    assert not list(staging.rglob("*00002*"))  # the bad bytes are gone, not kept as a part to resume
    assert main(["--lock", str(lock), "check", "--model", "m"]) == 2  # named and not there: refused


def test_a_dropped_connection_is_resumed_by_the_client(hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path) -> None:
    lock, files = pinned
    sha = _shard_sha(files, 3)
    hub.cut_after(sha, SHARD // 2)
    assert _fetch(lock) == 0
    assert hub.served(sha) == SHARD  # the second half only, asked for with Range
    assert (cache / "models" / "m" / "model-00003-of-00004.safetensors").read_bytes() == files["model-00003-of-00004.safetensors"]


def test_a_429_on_a_download_waits_its_retry_after(hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path) -> None:
    lock, _ = pinned
    hub.rate_limit("/blobs/*", times=1, retry_after=1)
    started = time.monotonic()
    assert _fetch(lock, "--jobs", "1") == 0
    blobs = [r for r in hub.requests if r.path.startswith("/blobs/")]
    assert blobs[0].status == 429 and blobs[1].at - blobs[0].at >= 1.0 and time.monotonic() - started >= 1.0


def test_a_revision_gone_from_the_hub_is_one_line(
    hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock, _ = pinned
    hub.forget_revision("org/m", read_lock(lock).models["m"].revision or "")
    assert _fetch(lock) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "revision not found" in err and "pin again with tools/pin.py model add" in err


def test_a_gated_repo_without_a_token_is_one_line(
    hub: TestHub, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.publish("gated-org/gated-model", sharded(1, 1024), gated=True)
    lock = tmp_path / "lock.json"
    monkeypatch.setenv("HF_TOKEN", "hf_good_token_for_tests")
    assert main(["--lock", str(lock), "model", "add", "m", "hf://gated-org/gated-model"]) == 0
    monkeypatch.delenv("HF_TOKEN")
    assert _fetch(lock) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the repository is gated (HTTP 401) and no token is set" in err


def test_not_enough_disk_is_refused_before_anything_is_downloaded(
    hub: TestHub, pinned: tuple[Path, dict[str, bytes]], cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lock, _ = pinned
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hubmod.shutil, "disk_usage", lambda _p: usage(100 << 20, 95 << 20, 5 << 20))
    assert _fetch(lock) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk full in" in err and "0.03 GB more are needed, 0.01 GB are free" in err
    assert not [r for r in hub.requests if r.path.startswith("/blobs/")]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounts a small tmpfs (root)")
def test_a_real_small_disk_is_refused_with_the_bytes_needed(
    hub: TestHub, pinned: tuple[Path, dict[str, bytes]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lock, _ = pinned
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(small)], check=False).returncode != 0:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        monkeypatch.setenv("LLMFLEET_CACHE", str(small))
        assert _fetch(lock) == 1
        err = capsys.readouterr().err
        assert "disk full in" in err and "GB more are needed" in err and err.count("\n") == 1
    finally:
        subprocess.run(["umount", str(small)], check=False)
