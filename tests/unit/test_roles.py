"""Static checks of roles/: inputs, argument specs, task style, and a syntax check of every entry point.

House style: every input carries the role's prefix and is documented in
meta/argument_specs.yml with the default of defaults/main.yml; every task is named and calls an
``ansible.builtin`` module by its FQCN; templates start with the ansible_managed comment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ROLES_DIR = REPO / "roles"
ROLES = sorted(p.name for p in ROLES_DIR.iterdir() if (p / "tasks" / "main.yml").is_file()) if ROLES_DIR.is_dir() else []
EXPECTED_ROLES = {"vllm_runtime", "model_store", "vllm_service", "vllm_verify"}


def task_keywords() -> set[str]:
    """Keywords a task, handler or block may carry besides its one module, as ansible-core defines them."""
    ansible_block = pytest.importorskip("ansible.playbook.block")
    ansible_handler = pytest.importorskip("ansible.playbook.handler")
    return set(ansible_handler.Handler.fattributes) | set(ansible_block.Block.fattributes)


def load(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def defaults(role: str) -> dict[str, Any]:
    path = ROLES_DIR / role / "defaults" / "main.yml"
    return (load(path) or {}) if path.is_file() else {}


def specs(role: str) -> dict[str, Any]:
    return load(ROLES_DIR / role / "meta" / "argument_specs.yml")["argument_specs"]


def walk_tasks(tasks: list[dict[str, Any]] | None):
    for task in tasks or []:
        yield task
        for key in ("block", "rescue", "always"):
            yield from walk_tasks(task.get(key))


def task_files(role: str) -> list[Path]:
    files = sorted((ROLES_DIR / role / "tasks").glob("*.yml"))
    handlers = ROLES_DIR / role / "handlers" / "main.yml"
    return files + ([handlers] if handlers.is_file() else [])


def test_the_four_roles_exist():
    assert set(ROLES) >= EXPECTED_ROLES


@pytest.mark.parametrize("role", ROLES)
def test_meta_names_the_role(role):
    info = load(ROLES_DIR / role / "meta" / "main.yml")["galaxy_info"]
    assert info["namespace"] == "llmfleet"
    assert info["role_name"] == role


@pytest.mark.parametrize("role", ROLES)
def test_main_spec_documents_exactly_the_inputs(role):
    """defaults ∪ required inputs == the options of the `main` entry point."""
    options = specs(role)["main"]["options"]
    required = {name for name, opt in options.items() if opt.get("required")}
    assert set(defaults(role)) | required == set(options), f"{role}: defaults/main.yml and argument_specs.yml differ"
    assert not set(defaults(role)) & required, f"{role}: a required input must not have a default"


@pytest.mark.parametrize("role", ROLES)
def test_inputs_carry_the_role_prefix(role):
    names = set(defaults(role))
    for entry in specs(role).values():
        names |= set(entry.get("options", {}))
    bad = sorted(n for n in names if not n.startswith(role + "_"))
    assert not bad, f"{role}: inputs without the prefix {role}_: {bad}"
    # llmfleet_* is the host spec's namespace: the evaluator refuses llmfleet_* names it does not know
    clash = sorted(n for n in names if n.startswith("llmfleet_"))
    assert not clash, f"{role}: inputs in the spec's llmfleet_* namespace: {clash}"


@pytest.mark.parametrize("role", ROLES)
def test_spec_defaults_match_defaults_file(role):
    values = defaults(role)
    for entry_point, entry in specs(role).items():
        for name, opt in entry.get("options", {}).items():
            assert opt.get("type"), f"{role}:{entry_point}:{name} has no type"
            assert opt.get("description"), f"{role}:{entry_point}:{name} has no description"
            if name in values:
                assert "default" in opt, f"{role}:{entry_point}:{name} has a default in defaults/main.yml, not in the spec"
                assert opt["default"] == values[name], f"{role}:{entry_point}:{name}: spec {opt['default']!r} != {values[name]!r}"
            else:
                assert opt.get("required"), f"{role}:{entry_point}:{name} is neither required nor in defaults/main.yml"


@pytest.mark.parametrize("role", ROLES)
def test_other_entry_points_are_subsets_of_main(role):
    main = specs(role)["main"]["options"]
    for entry_point, entry in specs(role).items():
        assert (ROLES_DIR / role / "tasks" / f"{entry_point}.yml").is_file(), f"{role}: no tasks/{entry_point}.yml"
        extra = set(entry.get("options", {})) - set(main)
        assert not extra, f"{role}:{entry_point} has options main lacks: {sorted(extra)}"


@pytest.mark.parametrize("role", ROLES)
def test_readme_lists_every_input(role):
    readme = (ROLES_DIR / role / "README.md").read_text(encoding="utf-8")
    missing = [name for name in specs(role)["main"]["options"] if f"`{name}`" not in readme]
    assert not missing, f"{role}: README.md does not list {missing}"


@pytest.mark.parametrize("role", ROLES)
def test_every_task_is_named_and_uses_an_fqcn_builtin(role):
    """ansible.builtin modules by FQCN, or one of the project's own modules (library/, short name)."""
    keywords = task_keywords()
    own = {p.stem for p in [*(REPO / "library").glob("*.py"), *(ROLES_DIR / role / "library").glob("*.py")]}
    problems = []
    for path in task_files(role):
        for task in walk_tasks(load(path)):
            where = f"{path.relative_to(REPO)}: {task.get('name', task)!r}"
            if not task.get("name"):
                problems.append(f"{where}: no name")
            if any(k in task for k in ("block", "rescue", "always")):
                continue
            modules = [k for k in task if k not in keywords and not k.startswith("with_")]
            if len(modules) != 1:
                problems.append(f"{where}: expected one module, found {modules}")
            elif not modules[0].startswith("ansible.builtin.") and modules[0] not in own:
                problems.append(f"{where}: module {modules[0]} is not an ansible.builtin FQCN")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("role", ROLES)
def test_task_names_name_the_component(role):
    names = [t["name"] for p in task_files(role) for t in walk_tasks(load(p)) if t.get("name")]
    bad = [n for n in names if " | " not in n or not n[0].isupper()]
    assert not bad, f"{role}: task names not 'Component | Verb object': {bad}"


@pytest.mark.parametrize("role", ROLES)
def test_registered_results_and_internals_are_prefixed(role):
    bad = []
    for path in task_files(role):
        for task in walk_tasks(load(path)):
            reg = task.get("register")
            if reg and not reg.startswith(f"__{role}_"):
                bad.append(f"register {reg}")
    vars_file = ROLES_DIR / role / "vars" / "main.yml"
    internals = (load(vars_file) or {}) if vars_file.is_file() else {}
    bad += [f"vars {n}" for n in internals if not n.startswith(f"_{role}_")]
    assert not bad, f"{role}: {bad}"


@pytest.mark.parametrize("role", ROLES)
def test_modes_are_quoted_strings(role):
    bad = []
    for path in task_files(role):
        for task in walk_tasks(load(path)):
            for args in task.values():
                if isinstance(args, dict) and "mode" in args and not isinstance(args["mode"], str):
                    bad.append(f"{path.name}: {task.get('name')}: mode {args['mode']!r}")
    assert not bad, bad


@pytest.mark.parametrize("role", ROLES)
def test_templates_start_with_ansible_managed(role):
    for path in sorted((ROLES_DIR / role / "templates").rglob("*.j2")) if (ROLES_DIR / role / "templates").is_dir() else []:
        lines = path.read_text(encoding="utf-8").splitlines()
        head = lines[1] if lines and lines[0].startswith("#!") else (lines[0] if lines else "")
        assert head == "{{ ansible_managed | comment }}", f"{path.relative_to(REPO)} does not start with the ansible_managed comment"


def _ansible_playbook() -> str | None:
    here = Path(sys.executable).absolute().parent / "ansible-playbook"
    return str(here) if here.is_file() else shutil.which("ansible-playbook")


@pytest.mark.skipif(_ansible_playbook() is None, reason="ansible-playbook is not installed")
def test_syntax_check_every_entry_point(tmp_path):
    """ansible-playbook --syntax-check of a play that imports every role's every entry point."""
    tasks = []
    for role in ROLES:
        for entry_point in specs(role):
            task: dict[str, Any] = {
                "name": f"Test | Import {role} {entry_point}",
                "ansible.builtin.import_role": {"name": role},
            }
            if entry_point != "main":
                task["ansible.builtin.import_role"]["tasks_from"] = entry_point
            tasks.append(task)
    play = [{"name": "Test | Every role", "hosts": "localhost", "gather_facts": False, "tasks": tasks}]
    path = tmp_path / "play.yml"
    path.write_text(yaml.safe_dump(play, sort_keys=False), encoding="utf-8")
    cfg = tmp_path / "ansible.cfg"
    # the project's own modules (library/, as ansible.cfg and molecule configure it)
    cfg.write_text(f"[defaults]\nroles_path = {ROLES_DIR}\nlibrary = {REPO / 'library'}\nlocal_tmp = {tmp_path}\n", encoding="utf-8")
    env = os.environ | {"ANSIBLE_CONFIG": str(cfg)}
    result = subprocess.run(
        [_ansible_playbook(), "--syntax-check", "-i", "localhost,", str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
