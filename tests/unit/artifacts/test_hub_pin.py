"""``tools/pin.py model add`` against the test hub, through the real ``huggingface_hub`` client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llmfleet.artifacts.checkpoint import fact_differences, facts_from_checkpoint
from llmfleet.artifacts.lockfile import read_lock
from llmfleet.artifacts.tiny_model import TinyLlamaSpec, build
from llmfleet.cli.pin import main
from llmfleet.pins import DEFAULT_LOCK, load_lock
from testhub import TestHub
from testhub.checkpoints import PRODUCTION_KEYS, folder, nemotron_config, production

REPO = Path(__file__).resolve().parents[3]
SECRET = "hf_good_token_for_tests"


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The lock's tiny model, built here (byte-identical to its pin)."""
    out = tmp_path_factory.mktemp("tiny") / "model"
    build(TinyLlamaSpec.model_validate(load_lock().models["tiny-llama"].builder), out)
    return folder(out)


def _lock(tmp_path: Path) -> Path:
    lock = tmp_path / "lock.json"
    shutil.copy(DEFAULT_LOCK, lock)
    return lock


def test_the_tiny_model_pinned_from_the_hub_matches_its_build(
    hub: TestHub, tiny_files: dict[str, bytes], tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    commit = hub.publish("llmfleet/tiny-llama", tiny_files | {"README.md": b"# tiny\n", "original/x.bin": b"x"})
    lock = _lock(tmp_path)
    assert main(["--lock", str(lock), "model", "add", "tiny-llama", "hf://llmfleet/tiny-llama"]) == 0
    pinned, built = read_lock(lock).models["tiny-llama"], load_lock().models["tiny-llama"]
    assert (pinned.source, pinned.revision, pinned.status) == ("hf://llmfleet/tiny-llama", commit, "resolved")
    assert pinned.files == built.files  # every path, size and sha256 as the build pins them
    assert pinned.architecture == built.architecture  # read from its config.json: what the builder wrote down
    out = capsys.readouterr().out
    assert f"commit {commit}" in out and "6 files" in out
    assert "README.md (not read for serving)" in out and "original/x.bin (in the folder original/" in out
    # the safetensors weights are LFS: hashed by the hub; the JSON files were downloaded and hashed here
    gets = [r for r in hub.requests if "/resolve/" in r.path and r.method == "GET"]
    assert {r.path.rsplit("/", 1)[-1] for r in gets} == {p for p in tiny_files if not p.endswith(".safetensors")}


def test_production_repos_pin_with_the_facts_the_planner_uses_and_the_example_plans_strict(
    hub: TestHub, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repos = production()
    for repo, files in repos.items():
        hub.publish(repo, files)
    lock = _lock(tmp_path)
    before = load_lock()
    for key, repo in PRODUCTION_KEYS.items():
        assert main(["--lock", str(lock), "model", "add", key, f"hf://{repo}"]) == 0, capsys.readouterr().err
    after = read_lock(lock)
    out = capsys.readouterr().out
    for key, repo in PRODUCTION_KEYS.items():
        pin = after.models[key]
        assert pin.resolved and pin.revision == hub.repos[repo].refs["main"]
        assert pin.quantization == before.models[key].quantization
        paths = {f.path for f in pin.files or []}
        assert "config.json" in paths and "model-00001-of-00002.safetensors" in paths
        assert not paths & {"README.md", "LICENSE", ".gitattributes", "pytorch_model.bin", "original/consolidated.safetensors"}
        now = pin.architecture.model_dump()
        differ = {fact for fact, _, _ in fact_differences(before.models[key].architecture, pin.architecture)}
        if "gemma" in key:
            # the only difference: the test build's vision tower is a few tensors, counted from its headers
            assert differ == {"extra_params"}
            assert now["extra_params"] == 12 * 12 + 12 * 48 + 8 * 12
            assert f"extra_params: 550000000, the checkpoint says {now['extra_params']}" in out
        else:
            assert differ == set(), f"{key}: {differ}"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), "-i", str(REPO / "inventory" / "xr7620"), "--strict"],
        env={"LLMFLEET_LOCK": str(lock), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unresolved" not in result.stdout + result.stderr
    strict_before = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), "-i", str(REPO / "inventory" / "xr7620"), "--strict"],
        env={"LLMFLEET_LOCK": str(DEFAULT_LOCK), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=False,
    )
    assert strict_before.returncode == 2  # the shipped lock cannot reach a hub: its production pins are unresolved


def test_the_selection_follows_what_vllm_reads_and_include_exclude_adjust_it(
    hub: TestHub, tmp_path: Path, cache: Path
) -> None:
    hub.publish("org/m", production()["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"] | {"model-extra.safetensors": b"x" * 8})
    lock = _lock(tmp_path)
    argv = ["--lock", str(lock), "model", "add", "m", "hf://org/m", "--include", "original/*", "--exclude", "chat_template.jinja"]
    assert main(argv) == 0
    pin = read_lock(lock).models["m"]
    paths = {f.path for f in pin.files or []}
    assert "original/consolidated.safetensors" in paths and "chat_template.jinja" not in paths
    assert "model-extra.safetensors" not in paths  # a shard the index does not name
    assert "not named by model.safetensors.index.json" in (pin.notes or "")
    assert "pytorch_model.bin (weights in another format (.safetensors is present))" in (pin.notes or "")


def test_a_revision_is_a_branch_a_tag_or_a_sha_and_an_unknown_one_is_one_line(
    hub: TestHub, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = production()["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"]
    first = hub.publish("org/m", files, tags=("v1",))
    second = hub.publish("org/m", files | {"generation_config.json": b"{}\n"})
    lock = _lock(tmp_path)
    for rev, want in (("v1", first), (first, first), ("main", second)):
        assert main(["--lock", str(lock), "model", "add", "m", "hf://org/m", "--revision", rev]) == 0
        assert read_lock(lock).models["m"].revision == want
    capsys.readouterr()
    assert main(["--lock", str(lock), "model", "add", "m", "hf://org/m", "--revision", "v9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hf://org/m revision v9: revision not found" in err
    assert read_lock(lock).models["m"].revision == second  # the lock is untouched
    assert main(["--lock", str(lock), "model", "add", "m", "hf://org/nope"]) == 1
    assert "no such repository" in capsys.readouterr().err


def test_a_gated_repo_needs_a_token_with_access_and_the_token_is_never_written(
    hub: TestHub, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    hub.publish("gated-org/gated-model", production()["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"], gated=True)
    lock = _lock(tmp_path)
    argv = ["--lock", str(lock), "model", "add", "g", "hf://gated-org/gated-model"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "hf://gated-org/gated-model" in err and "gated (HTTP 401) and no token is set" in err and "hf auth login" in err
    monkeypatch.setenv("HF_TOKEN", "hf_other_token")
    assert main(argv) == 1
    assert "gated (HTTP 403) and the token in use has no access" in capsys.readouterr().err
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(argv) == 0
    out = capsys.readouterr()
    assert read_lock(lock).models["g"].resolved
    assert SECRET not in lock.read_text() and SECRET not in out.out + out.err
    assert any(r.authorized for r in hub.requests)


def test_a_429_is_waited_out_as_its_retry_after_says(hub: TestHub, tmp_path: Path, cache: Path) -> None:
    hub.publish("org/m", production()["nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"])
    hub.rate_limit("/api/models/*", times=1, retry_after=2)
    lock = _lock(tmp_path)
    started = time.monotonic()
    assert main(["--lock", str(lock), "model", "add", "m", "hf://org/m"]) == 0
    api = [r for r in hub.requests if r.path.startswith("/api/models/")]
    assert [r.status for r in api[:2]] == [429, 200]
    assert api[1].at - api[0].at >= 2.0 and time.monotonic() - started >= 2.0


def test_an_unreachable_hub_is_one_line(hub: TestHub, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub.stop()
    assert main(["--lock", str(_lock(tmp_path)), "model", "add", "m", "hf://org/m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the hub {hub.endpoint} is unreachable" in err and "HF_ENDPOINT" in err


def test_facts_of_a_model_nobody_catalogued_come_from_its_config() -> None:
    """A hybrid layer list (the newer Nemotron spelling) and a compressed-tensors NVFP4 config."""
    config = nemotron_config()
    pattern = config.pop("hybrid_override_pattern")
    config["layers_block_type"] = [{"M": "mamba", "E": "moe", "*": "attention"}[c] for c in pattern]
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "config_groups": {"group_0": {"weights": {"num_bits": 4, "type": "float", "group_size": 16}, "targets": ["Linear"]}},
        "ignore": ["lm_head", "re:.*mixer\\.(q|k|v|o)_proj$"],
        "kv_cache_scheme": {"num_bits": 8, "type": "float"},
    }
    found = facts_from_checkpoint(json.loads(json.dumps(config)))
    f = found.architecture
    assert found.quantization == "nvfp4" and f.kv_cache_dtype == "fp8"
    assert f.hybrid_override_pattern == pattern and f.gated_mlp is False and f.num_experts == 128
    assert f.unquantized == ["attention", "lm_head"]
    assert f.shared_expert_intermediate_size == 3712 and f.mamba_n_groups == 8 and f.mamba_ssm_cache_dtype == "float32"


def test_check_reports_each_fact_where_the_lock_or_the_catalog_and_the_checkpoint_disagree(
    hub: TestHub, tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from testhub.checkpoints import GEMMA4_NVFP4_REPO

    hub.publish(GEMMA4_NVFP4_REPO, production()[GEMMA4_NVFP4_REPO])
    lock = _lock(tmp_path)
    key = "gemma-4-31b-it-nvfp4"
    assert main(["--lock", str(lock), "model", "add", key, f"hf://{GEMMA4_NVFP4_REPO}"]) == 0
    assert main(["--lock", str(lock), "fetch", "--model", key]) == 0
    capsys.readouterr()
    # the catalog's vision tower (a secondary source) against the build's headers
    assert main(["--lock", str(lock), "check", "--model", key]) == 2
    out = capsys.readouterr().out
    assert "fact extra_params: catalog/models.yml says 550000000, the checkpoint's files say 816" in out
    # a lock edited by hand no longer says what the checkpoint's files say
    doc = json.loads(lock.read_text())
    doc["models"][key]["architecture"]["num_hidden_layers"] = 30
    doc["models"][key]["architecture"]["layer_types"] = doc["models"][key]["architecture"]["layer_types"][:30]
    doc["models"][key]["architecture"]["kv_cache_dtype"] = "bfloat16"
    lock.write_text(json.dumps(doc))
    assert main(["--lock", str(lock), "check", "--model", key]) == 2
    out = capsys.readouterr().out
    assert "fact num_hidden_layers: the lock says 30, the checkpoint's files say 60" in out
    assert "fact kv_cache_dtype: the lock says 'bfloat16', the checkpoint's files say 'fp8'" in out
