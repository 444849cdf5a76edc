"""The store's integrity checks and repair (module_utils/llmfleet_store.py, library/llmfleet_store.py, roles/model_store).

Store paths are built in tmp_path the way the roles build them (files, then the marker last). A change
made after the marker lands on a later clock tick (``later()``), as any change after completion does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from by_path import load_file

REPO = Path(__file__).resolve().parents[2]
store = load_file("llmfleet_store", REPO / "module_utils" / "llmfleet_store.py")
# the module imports its helpers as Ansible ships them
sys.modules.setdefault("ansible.module_utils.llmfleet_store", store)
module = load_file("llmfleet_store_module", REPO / "library" / "llmfleet_store.py")

FILES = {"config.json": b'{"hidden_size": 8}\n', "model.safetensors": b"\x00" * 4096, "tok/tokenizer.json": b'{"v": 1}\n'}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pins(files: dict[str, bytes] = FILES) -> list[dict[str, Any]]:
    return [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in sorted(files.items())]


def later() -> None:
    time.sleep(0.05)  # past the coarse clock tick of the marker's ctime


def build_model(path: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    (path / store.MARKER).write_text(json.dumps({"files": pins(files)}))
    return path


def build_runtime(path: Path) -> Path:
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").write_text("#!/bin/sh\n")
    (path / "lib" / "site-packages" / "vllm").mkdir(parents=True)
    (path / "lib" / "site-packages" / "vllm" / "__init__.py").write_text("")
    (path / store.MARKER).write_text("{}")
    return path


def whats(result: dict[str, Any]) -> list[str]:
    return [p["what"] for p in result["problems"]]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_model(tmp_path / "store" / "abc-tiny")


# --- the checks -------------------------------------------------------------------------------------


def test_an_intact_model_path_is_ok_cheap_and_full(model: Path) -> None:
    cheap = store.check_path(str(model), "model", pins())
    assert cheap["status"] == "ok" and cheap["problems"] == [] and cheap["files"] == 3 and cheap["hashed_bytes"] == 0
    full = store.check_path(str(model), "model", pins(), full=True)
    assert full["status"] == "ok" and full["hashed_bytes"] == sum(len(d) for d in FILES.values())


def test_one_byte_appended_is_seen_by_its_size(model: Path) -> None:
    with (model / "model.safetensors").open("ab") as f:
        f.write(b"\x01")
    r = store.check_path(str(model), "model", pins())
    assert r["status"] == "damaged" and whats(r) == ["model-file-changed"]
    assert r["problems"][0]["found"] == {"size": 4097} and r["problems"][0]["file"] == "model.safetensors"


def test_a_byte_changed_in_place_is_hashed_because_it_was_written_after_the_marker(model: Path) -> None:
    later()
    with (model / "model.safetensors").open("r+b") as f:
        f.seek(100)
        f.write(b"\x07")
    r = store.check_path(str(model), "model", pins())
    assert whats(r) == ["model-file-changed"] and r["hashed_bytes"] == 4096
    assert r["problems"][0]["expected"] == sha(FILES["model.safetensors"])


def test_a_touched_but_intact_file_is_not_damage(model: Path) -> None:
    later()
    os.chmod(model / "config.json", 0o600)
    os.chmod(model / "config.json", 0o644)
    r = store.check_path(str(model), "model", pins())
    assert r["status"] == "ok" and r["hashed_bytes"] == len(FILES["config.json"])


def test_missing_and_unexpected_files(model: Path) -> None:
    (model / "tok" / "tokenizer.json").unlink()
    (model / "extra.bin").write_bytes(b"x")
    (model / "cache").mkdir()
    r = store.check_path(str(model), "model", pins())
    assert sorted(whats(r)) == ["model-file-missing", "store-file-unexpected", "store-file-unexpected"]


def test_missing_and_incomplete_paths(tmp_path: Path, model: Path) -> None:
    assert store.check_path(str(tmp_path / "nope"), "model", pins())["status"] == "missing"
    (model / store.MARKER).unlink()
    r = store.check_path(str(model), "model", pins())
    assert r["status"] == "incomplete" and whats(r) == ["store-marker-missing"]


def test_the_marker_against_the_manifest(model: Path) -> None:
    good = sha((model / store.MARKER).read_bytes())
    assert store.check_path(str(model), "model", pins(), marker_sha256=good)["status"] == "ok"
    r = store.check_path(str(model), "model", pins(), marker_sha256="0" * 64)
    assert whats(r) == ["store-marker-changed"]


def test_a_runtime_must_not_change_after_completion(tmp_path: Path) -> None:
    rt = build_runtime(tmp_path / "store" / "def-runtime")
    assert store.check_path(str(rt), "runtime")["status"] == "ok"
    later()
    (rt / "lib" / "site-packages" / "evil.pth").write_text("import os\n")  # a new file: its directory changed
    r = store.check_path(str(rt), "runtime")
    assert whats(r) == ["store-path-changed"] and set(r["problems"][0]["found"]) == {"lib/site-packages", "lib/site-packages/evil.pth"}
    (rt / "bin" / "python").unlink()
    assert whats(store.check_path(str(rt), "runtime")) == ["runtime-python-missing"]


def test_what_the_last_full_check_found_stays_until_the_path_is_replaced(model: Path) -> None:
    later()
    with (model / "config.json").open("r+b") as f:
        f.write(b"[")  # same size
    root = model.parent.parent
    full = store.check_path(str(model), "model", pins(), full=True)
    store.write_record(str(root), [full])
    record = store.read_record(str(root))
    assert record[str(model)]["status"] == "damaged"
    (model / "config.json").write_bytes(FILES["config.json"])  # put right by hand: the cheap check sees nothing now
    assert store.check_path(str(model), "model", pins())["status"] == "ok"
    r = store.check_path(str(model), "model", pins(), last=record[str(model)])
    assert r["status"] == "damaged" and "found it" in r["problems"][0]["message"]  # a store path is rebuilt, not patched
    fresh = build_model(model.parent / "fresh")
    store.replace(str(model), str(fresh))
    assert store.check_path(str(model), "model", pins(), last=store.read_record(str(root))[str(model)])["status"] == "ok"


# --- repair ---------------------------------------------------------------------------------------------


def test_seed_copies_only_the_files_that_match_their_pin(model: Path) -> None:
    with (model / "model.safetensors").open("ab") as f:
        f.write(b"\x01")
    later()
    (model / "config.json").write_bytes(b'{"hidden_size": 9}\n')  # same size, other content
    partial = Path(f"{model}.partial")
    partial.mkdir()
    assert store.seed(str(model), str(partial), pins()) == ["tok/tokenizer.json"]
    assert (partial / "tok" / "tokenizer.json").read_bytes() == FILES["tok/tokenizer.json"]
    assert sorted(p.name for p in partial.rglob("*") if p.is_file()) == ["tokenizer.json"]


def test_replace_swaps_a_damaged_path_for_the_rebuild(model: Path) -> None:
    before = model.stat().st_ino
    fresh = build_model(Path(f"{model}.partial"))
    fresh_ino = fresh.stat().st_ino
    os.chmod(model / "config.json", 0o444)
    os.chmod(model, 0o555)  # store paths are read-only trees
    store.replace(str(model), str(fresh))
    assert model.stat().st_ino == fresh_ino != before
    assert not fresh.exists() and not Path(f"{model}.replaced").exists()


def test_replace_without_an_exchange_uses_two_renames(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exchange(a: str, b: str) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(store, "_exchange", no_exchange)
    fresh = build_model(Path(f"{model}.partial"))
    fresh_ino = fresh.stat().st_ino
    store.replace(str(model), str(fresh))
    assert model.stat().st_ino == fresh_ino and not Path(f"{model}.replaced").exists()


def test_replace_refuses_an_unfinished_build(model: Path) -> None:
    partial = Path(f"{model}.partial")
    partial.mkdir()
    with pytest.raises(store.StoreError, match="not complete"):
        store.replace(str(model), str(partial))
    assert (model / store.MARKER).is_file()


# --- a root's generations -------------------------------------------------------------------------------


def deploy(root: Path, model_path: Path, runtime_path: Path) -> str:
    """A current generation whose plan and manifest use the two store paths."""
    gid = "0123456789abcdef01234567"
    gen = root / "generations" / gid
    gen.mkdir(parents=True)
    plan = {
        "generation": gid,
        "runtime": {"store_path": str(runtime_path)},
        "models": {"tiny": {"store_path": str(model_path), "files": pins()}},
        "instances": [{"name": "tiny", "unit": "llmfleet-vllm@tiny.service", "model": "tiny"}],
    }
    (gen / "plan.json").write_text(json.dumps(plan))
    entries = [
        {"path": str(p), "kind": k, "marker_sha256": sha((p / store.MARKER).read_bytes())}
        for p, k in ((model_path, "model"), (runtime_path, "runtime"))
    ]
    (gen / "manifest.json").write_text(json.dumps({"generation": gid, "store_paths": entries}))
    (root / "current").symlink_to(f"generations/{gid}")
    return gid


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "var" / "lib" / "llmfleet"
    deploy(root, build_model(root / "store" / "abc-tiny"), build_runtime(root / "store" / "def-runtime"))
    return root


def test_paths_of_root_and_who_serves_from_them(root: Path) -> None:
    found = store.paths_of_root(str(root))
    assert [(e["kind"], e["current"], e["files"] is not None) for e in found] == [("model", True, True), ("runtime", True, False)]
    model_path = str(root / "store" / "abc-tiny")
    assert store.serving(str(root), [model_path]) == {model_path: [{"name": "tiny", "unit": "llmfleet-vllm@tiny.service"}]}


def test_pending_restarts_are_merged(root: Path) -> None:
    (root / "pending-restart.json").write_text('["other"]\n')
    assert store.add_pending_restarts(str(root), ["tiny", "other"])
    assert json.loads((root / "pending-restart.json").read_text()) == ["other", "tiny"]
    assert not store.add_pending_restarts(str(root), ["tiny"])


def run_checker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "module_utils" / "llmfleet_store.py"), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_timer_s_command_hashes_writes_the_textfile_and_the_record(root: Path, tmp_path: Path) -> None:
    prom = tmp_path / "llmfleet_store.prom"
    done = run_checker("--root", str(root), "--textfile", str(prom))
    assert done.returncode == 0, done.stderr
    text = prom.read_text()
    assert f'llmfleet_store_path_ok{{path="{root}/store/abc-tiny",kind="model",current="true"}} 1' in text
    assert "llmfleet_store_check_full 1" in text and f"llmfleet_store_check_hashed_bytes {sum(len(d) for d in FILES.values())}" in text
    later()
    with (root / "store" / "abc-tiny" / "config.json").open("r+b") as f:
        f.write(b"[")
    done = run_checker("--root", str(root), "--textfile", str(prom), "--json")
    assert done.returncode == 3 and "has another sha256 than the pin" in done.stderr
    assert f'llmfleet_store_path_ok{{path="{root}/store/abc-tiny",kind="model",current="true"}} 0' in prom.read_text()
    assert store.read_record(str(root))[f"{root}/store/abc-tiny"]["status"] == "damaged"
    assert json.loads(done.stdout)["full"] is True


def test_the_checker_on_a_missing_root_is_one_line(tmp_path: Path) -> None:
    done = run_checker("--root", str(tmp_path / "nope"))
    assert done.returncode == 1 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr


# --- the module ---------------------------------------------------------------------------------------


def params(**kw: Any) -> dict[str, Any]:
    base = {"action": "check", "paths": None, "full": False, "path": None, "partial": None, "files": None, "restart": True, "root": None}
    return {**base, **kw}


def test_module_check_names_the_damaged_path_and_who_runs_from_it(root: Path) -> None:
    model_path = root / "store" / "abc-tiny"
    paths = [
        {"store_path": str(model_path), "files": pins(), "revision": "r"},
        {"path": str(root / "store" / "def-runtime"), "kind": "runtime"},
    ]
    assert module._check(params(paths=paths), False)["damaged"] == []
    with (model_path / "model.safetensors").open("ab") as f:
        f.write(b"\x01")
    r = module._check(params(paths=paths), False)
    assert r["damaged"] == [str(model_path)] and r["serving"] == {str(model_path): [{"name": "tiny", "unit": "llmfleet-vllm@tiny.service"}]}
    assert not (root / store.RECORD).exists()  # only a full check is kept
    module._check(params(paths=paths, full=True), False)
    assert store.read_record(str(root))[str(model_path)]["status"] == "damaged"


def test_module_replace_records_the_restarts_first(root: Path) -> None:
    model_path = root / "store" / "abc-tiny"
    build_model(Path(f"{model_path}.partial"))
    assert module._replace(params(action="replace", path=str(model_path), partial=f"{model_path}.partial"), True) == {
        "changed": True,
        "pending": ["tiny"],
    }
    assert not (root / "pending-restart.json").exists()  # check mode
    module._replace(params(action="replace", path=str(model_path), partial=f"{model_path}.partial"), False)
    assert json.loads((root / "pending-restart.json").read_text()) == ["tiny"]
    new = root / "store" / "ghi-new"
    build_model(Path(f"{new}.partial"))
    assert module._replace(params(action="replace", path=str(new), partial=f"{new}.partial"), False)["pending"] == []


# --- the role: a damaged model rebuilt beside itself (ansible-playbook, local connection) ---------------


@pytest.mark.skipif(os.geteuid() != 0, reason="the role installs root-owned files")
def test_model_store_rebuilds_a_damaged_path_beside_itself_and_records_the_restart(tmp_path: Path) -> None:
    root = tmp_path / "var" / "lib" / "llmfleet"
    (root / "store").mkdir(parents=True)
    source = tmp_path / "source"
    for rel, data in FILES.items():
        (source / "tiny" / rel).parent.mkdir(parents=True, exist_ok=True)
        (source / "tiny" / rel).write_bytes(data)
    model_path = root / "store" / "abc-tiny"
    plan_models = {"tiny": {"source": "build:tiny", "store_path": str(model_path), "files": pins(), "revision": "r1"}}
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        json.dumps(
            [
                {
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Test | The role",
                            "ansible.builtin.include_role": {"name": "model_store"},
                            "vars": {"model_store_models": plan_models, "model_store_source_dir": str(source)},
                        }
                    ],
                }
            ]
        )
    )

    def play() -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
        argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local"]
        argv += ["-e", f"ansible_python_interpreter={sys.executable}", str(playbook)]
        return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=False)

    first = play()
    assert first.returncode == 0, first.stdout[-3000:]
    deploy(root, model_path, build_runtime(root / "store" / "def-runtime"))
    ino = model_path.stat().st_ino
    with (model_path / "model.safetensors").open("ab") as f:
        f.write(b"\x01")  # one byte appended
    second = play()
    assert second.returncode == 0, second.stdout[-3000:]
    assert model_path.stat().st_ino != ino, "the damaged path was not rebuilt beside itself"
    assert store.check_path(str(model_path), "model", pins(), full=True)["status"] == "ok"
    assert json.loads((root / "pending-restart.json").read_text()) == ["tiny"]
    assert not Path(f"{model_path}.partial").exists()

    # the source lost the damaged file too: the repair fails and the damaged path stays as it was, beside the partial copy
    with (model_path / "model.safetensors").open("ab") as f:
        f.write(b"\x01")
    (source / "tiny" / "model.safetensors").unlink()
    third = play()
    assert third.returncode != 0
    assert store.check_path(str(model_path), "model", pins())["status"] == "damaged"
    shutil.rmtree(f"{model_path}.partial", ignore_errors=True)
