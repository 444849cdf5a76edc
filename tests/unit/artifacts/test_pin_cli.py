"""pins/lock.json rendering and tools/pin.py: stable output, named exit codes, refusals without tracebacks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from llmfleet.artifacts.lockfile import read_lock, render, with_model, with_runtime, write_lock
from llmfleet.cli.pin import main
from llmfleet.pins import ArchFacts, FilePin, ModelPin, Requirement, RuntimePin

FACTS = ArchFacts(
    architecture="LlamaForCausalLM",
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    hidden_size=128,
    max_position_embeddings=4096,
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def lock(tmp_path: Path, cache: Path) -> Path:
    """A lock with one tiny runtime and one model, and a cache that matches it."""
    wheel = b"not really a wheel"
    runtime = RuntimePin(
        distribution="fake",
        version="1.0",
        python="3.11",
        device="cpu",
        platform="x86_64-manylinux_2_36",
        requirements=[Requirement(name="fake", version="1.0", filename="fake-1.0-py3-none-any.whl", sha256=_sha(wheel), size=len(wheel))],
    )
    model = ModelPin(
        source="build:tiny-llama",
        revision="0" * 64,
        files=[FilePin(path="config.json", sha256=_sha(b"{}\n"), size=3)],
        architecture=FACTS,
    )
    unresolved = ModelPin(source="hf://org/big", status="unresolved", reason="no hub", architecture=FACTS)
    path = tmp_path / "lock.json"
    empty = read_lock(path)
    write_lock(path, with_model(with_model(with_runtime(empty, "fake-rt", runtime), "small", model), "big", unresolved))
    (cache / "wheelhouse" / "fake-rt").mkdir(parents=True)
    (cache / "wheelhouse" / "fake-rt" / "fake-1.0-py3-none-any.whl").write_bytes(wheel)
    (cache / "models" / "small").mkdir(parents=True)
    (cache / "models" / "small" / "config.json").write_bytes(b"{}\n")
    return path


def test_render_is_sorted_stable_and_explicit_about_unresolved(lock: Path) -> None:
    text = lock.read_text()
    data = json.loads(text)
    assert text.endswith("}\n") and text == json.dumps(data, sort_keys=True, indent=2) + "\n"
    assert data["schema"] == 1
    assert data["models"]["big"]["revision"] is None and data["models"]["big"]["files"] is None
    assert "reason" not in data["models"]["small"]  # other None fields are left out
    assert render(read_lock(lock)) == text
    assert write_lock(lock, read_lock(lock)) is False  # nothing to change: not rewritten


def test_a_missing_lock_reads_as_empty(tmp_path: Path) -> None:
    empty = read_lock(tmp_path / "none.json")
    assert (empty.runtimes, empty.models) == ({}, {})


def test_check_passes_on_a_matching_cache(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "check"]) == 0
    out = capsys.readouterr().out
    assert "runtime fake-rt: ok" in out and "model small: ok" in out and "model big: unresolved (skipped)" in out


def test_check_refuses_a_changed_file_with_exit_2(lock: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (cache / "models" / "small" / "config.json").write_bytes(b"{ }")
    assert main(["--lock", str(lock), "check"]) == 2
    assert "config.json: sha256 " in capsys.readouterr().out


def test_check_of_a_named_entry_never_fetched_fails(lock: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    shutil.rmtree(cache / "wheelhouse")
    assert main(["--lock", str(lock), "check"]) == 0  # not fetched: reported, not a failure
    assert "not fetched" in capsys.readouterr().out
    assert main(["--lock", str(lock), "check", "--runtime", "fake-rt"]) == 2


def test_fetch_copies_from_a_local_folder(lock: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    house = cache / "wheelhouse" / "fake-rt"
    src = tmp_path / "src"
    src.mkdir()
    (house / "fake-1.0-py3-none-any.whl").rename(src / "fake-1.0-py3-none-any.whl")
    assert main(["--lock", str(lock), "fetch", "--runtime", "fake-rt", "--find-links", str(src)]) == 0
    assert "1 copied" in capsys.readouterr().out
    assert main(["--lock", str(lock), "check", "--runtime", "fake-rt"]) == 0


def test_fetch_of_an_unresolved_entry_is_an_error(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "fetch", "--model", "big"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model big: unresolved") and err.count("\n") == 1 and "Traceback" not in err


def test_a_lock_with_a_bad_hash_is_refused(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = json.loads(lock.read_text())
    data["runtimes"]["fake-rt"]["requirements"][0]["sha256"] = "XYZ"
    lock.write_text(json.dumps(data))
    assert main(["--lock", str(lock), "check"]) == 2
    err = capsys.readouterr().err
    assert "sha256" in err and "Traceback" not in err


def test_unknown_keys_are_errors(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "check", "--model", "nope"]) == 1
    assert "model nope is not in the lock (known: big, small)" in capsys.readouterr().err


def test_a_new_runtime_needs_its_inputs(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "runtime", "vllm-x", "--version", "1"]) == 1
    assert "give --distribution, --python, --device, --platform" in capsys.readouterr().err


def test_a_source_of_no_known_kind_is_a_one_line_error(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "model", "add", "x", "s3://bucket/model"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected hf://ORG/REPO (a hub) or build:tiny-llama" in err
    assert main(["--lock", str(lock), "model", "add", "x", "hf://not a repo"]) == 1
    assert "is not ORG/REPO" in capsys.readouterr().err
    assert main(["--lock", str(lock), "model", "add", "x", "hf://org/repo", "--param", "a=1"]) == 1
    assert "--param is for build: sources" in capsys.readouterr().err
    assert "x" not in read_lock(lock).models


def test_bad_builder_parameters_are_one_line_errors(lock: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lock", str(lock), "model", "add", "tiny-x", "build:tiny-llama", "--param", "num_key_value_heads=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: model tiny-x: builder") and err.count("\n") == 1
    assert "tiny-x" not in read_lock(lock).models
