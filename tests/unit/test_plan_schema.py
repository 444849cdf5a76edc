"""The plan's typed schema holds every plan the evaluator makes; its rules refuse broken plans with the field
named; what it generates (JSON Schema, field table, the roles' nested argument specs) is current, and Ansible's
own argument-spec validator takes every real plan and refuses a misshapen one."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from llmfleet.inventory import load_inventory
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_fleet
from llmfleet.plan_schema import Plan, json_schema_text, problems
from llmfleet.plan_schema_gen import argument_options, generated_files, render_argument_specs
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
INVENTORIES = ["inventory/lab", "inventory/lab-fleet", "inventory/xr7620", "tests/molecule/lab/inventory"]


#: the fixture lock names no wheel files: a site's hosts (lab-fleet) are refused with it
CASES = [(inv, "pins/lock.json") for inv in INVENTORIES] + [(inv, "tests/fixtures/lock.json") for inv in INVENTORIES if "fleet" not in inv]


@pytest.mark.parametrize(("inventory", "lock"), CASES)
def test_every_plan_of_every_inventory_fits_the_schema(inventory: str, lock: str) -> None:
    plans, _ = evaluate_fleet(load_inventory(REPO / inventory), load_lock(REPO / lock))
    assert plans, f"{inventory} planned no host"
    for host, plan in plans.items():
        typed = Plan.model_validate(plan)
        assert typed.generation == plan["generation"], host


def test_a_plan_with_a_field_nobody_declared_is_refused() -> None:
    plans, _ = evaluate_fleet(load_inventory(REPO / "inventory" / "lab"), load_lock(REPO / "pins" / "lock.json"))
    plan = plans["lab1"]
    with pytest.raises(ValidationError, match=r"instances\.0\.unexpected"):
        Plan.model_validate({**plan, "instances": [{**plan["instances"][0], "unexpected": 1}]})
    with pytest.raises(ValidationError, match=r"service\.unit_revision"):
        Plan.model_validate({**plan, "service": {**plan["service"], "unit_revision": 3}})


def test_the_published_json_schema_is_the_model_s() -> None:
    published = REPO / "docs" / "plan.schema.json"
    assert published.read_text() == json_schema_text(), "docs/plan.schema.json is stale: tools/plan.py --write-schema"


def test_every_generated_file_is_current() -> None:
    files = generated_files(REPO)
    specs = {p.parent.parent.name for p in files if p.name == "argument_specs.yml"}
    assert specs == {"vllm_service", "vllm_verify", "vllm_runtime", "nvidia_driver"}
    stale = [str(p.relative_to(REPO)) for p, text in files.items() if p.read_text(encoding="utf-8") != text]
    assert not stale, f"stale (run tools/plan.py --write-schema): {stale}"


def test_a_block_is_regenerated_from_the_model_not_kept() -> None:
    text = (REPO / "roles" / "vllm_runtime" / "meta" / "argument_specs.yml").read_text(encoding="utf-8")
    edited = text.replace("          python:\n            type: str\n", "          python:\n            type: int\n", 1)
    assert edited != text
    assert render_argument_specs(edited) == text
    with pytest.raises(ValueError, match="nope"):
        render_argument_specs("x:\n  # plan schema: nope (generated)\n  # end of plan schema\n")


def _lab_plan() -> dict:
    plans, _ = evaluate_fleet(load_inventory(REPO / "inventory" / "lab"), load_lock(REPO / "pins" / "lock.json"))
    return copy.deepcopy(plans["lab1"])


def test_a_lab_plan_has_no_problems() -> None:
    plan = _lab_plan()
    assert problems(plan) == []
    assert problems(plan["runtime"], "runtime") == []
    assert problems(plan["models"], "models") == []


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda p: p.update(root="/etc"), r"^plan\.root = \"/etc\": String should match pattern"),
        (lambda p: p.update(root="/var/lib/../etc"), r"^plan\.root = "),
        (lambda p: p["instances"][0].update(name="Tiny"), r"^plan\.instances\[0\]\.name = \"Tiny\""),
        (lambda p: p["instances"][0].update(user="someone-else"), r"instances\[0\]\.user = 'someone-else': expected llmfleet-"),
        (lambda p: p["instances"][0].update(state_dir="/tmp/x"), r"state_dir = '/tmp/x': expected /var/lib/llmfleet/state/"),
        (lambda p: p["instances"][0].update(unit="other.service"), r"unit = 'other.service': expected llmfleet-vllm@"),
        (lambda p: p["instances"][0]["argv"].__setitem__(0, "python"), r"argv\[0\] = 'python': expected an absolute path"),
        (lambda p: p["instances"][0]["environment"].update({"BAD-NAME": "1"}), r"environment has names .*BAD-NAME"),
        (lambda p: p["instances"][0]["sandbox"].update(device_allow=["/dev/nvidia0 x"]),
         r"sandbox\.device_allow\[0\] = \"/dev/nvidia0 x\""),
        (lambda p: p["instances"][0].update(api_key_required=True, api_key_file=None), r"api_key_required is true but api_key_file"),
        (lambda p: p["instances"].append(copy.deepcopy(p["instances"][0])), r"names used twice"),
        (lambda p: p.update(instances=[]), r"^plan\.instances = \[\]: List should have at least 1 item"),
        (lambda p: p.update(unresolved=["model x: no hub"]), r"^plan\.unresolved: model x: no hub"),
        (lambda p: p["service"].update(limit_nofile=0), r"^plan\.service\.limit_nofile = 0"),
        (lambda p: p.pop("runtime"), r"^plan\.runtime = \(missing\): Field required"),
    ],
)
def test_a_broken_plan_is_refused_with_the_field_named(edit, expected) -> None:
    plan = _lab_plan()
    edit(plan)
    found = problems(plan)
    assert found, "the broken plan passed"
    assert any(re.search(expected, line) for line in found), found


def test_the_parts_a_role_is_given_are_checked_alone() -> None:
    plan = _lab_plan()
    runtime = {**plan["runtime"], "requirements": "vllm==0.32.0\n"}
    assert problems(runtime, "runtime") == [
        "plan.runtime.requirements: expected a hash-locked requirements file, one `name==version --hash=sha256:<hex>` "
        "per line (is the runtime pin resolved?)"
    ]
    assert problems(runtime, "runtime", deployable=False) == []
    models = copy.deepcopy(plan["models"])
    key = next(iter(models))
    models[key]["files"].append({**models[key]["files"][0], "path": "../escape"})
    models[key]["files"].append(dict(models[key]["files"][0]))
    found = problems(models, "models")
    assert any(line.startswith(f"plan.models.{key}.files[{len(models[key]['files']) - 2}].path = \"../escape\"") for line in found), found
    del models[key]["files"][-2]
    assert any("files lists a path more than once" in line for line in problems(models, "models"))
    with pytest.raises(ValueError, match="part 'nope'"):
        problems({}, "nope")


def _ansible_validate(options: dict, value: dict) -> list[str]:
    validator = pytest.importorskip("ansible.module_utils.common.arg_spec")
    spec = {"the_plan": {"type": "dict", "required": True, "options": options}}
    result = validator.ArgumentSpecValidator(spec).validate({"the_plan": copy.deepcopy(value)}, validate_role_argument_spec=True)
    return list(result.error_messages)


@pytest.mark.parametrize(("inventory", "lock"), CASES)
def test_ansible_s_validator_takes_every_real_plan(inventory: str, lock: str) -> None:
    plans, _ = evaluate_fleet(load_inventory(REPO / inventory), load_lock(REPO / lock))
    for host, plan in plans.items():
        assert _ansible_validate(argument_options(Plan), plan) == [], host


def test_ansible_s_validator_refuses_a_misshapen_plan() -> None:
    plan = _lab_plan()
    plan["instances"][0]["surprise"] = 1
    plan["service"].pop("limit_nofile")
    plan["hardware"]["accelerator"] = "tpu"
    errors = "\n".join(_ansible_validate(argument_options(Plan), plan))
    assert "surprise" in errors and "limit_nofile" in errors and "accelerator" in errors, errors


ANSIBLE_PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


def test_the_roles_filter_checks_a_plan_inside_ansible(tmp_path: Path) -> None:
    """The roles' preflight calls the schema through the llmfleet_plan_problems filter (ansible.cfg's
    filter_plugins): a real plan passes, a broken one fails the play naming the field."""
    if not ANSIBLE_PLAYBOOK.is_file():
        pytest.skip("ansible-playbook is not in this venv")
    good = _lab_plan()
    bad = copy.deepcopy(good)
    bad["instances"][0]["name"] = "Bad_Name"
    playbook = tmp_path / "check.yml"
    playbook.write_text(
        "- hosts: localhost\n  gather_facts: false\n  tasks:\n"
        "    - name: Check\n      ansible.builtin.assert:\n        that: (the_plan | llmfleet_plan_problems) | length == 0\n"
        "        fail_msg: \"{{ the_plan | llmfleet_plan_problems | join('; ') }}\"\n"
    )
    env = {**os.environ, "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    for plan, ok in ((good, True), (bad, False)):
        extra = tmp_path / "vars.json"
        extra.write_text(json.dumps({"the_plan": plan}))
        done = subprocess.run([str(ANSIBLE_PLAYBOOK), "-i", "localhost,", "-c", "local", str(playbook), "-e", f"@{extra}"],
                              capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
        assert (done.returncode == 0) == ok, done.stdout[-2000:] + done.stderr[-2000:]
        if not ok:
            assert re.search(r'plan\.instances\[0\]\.name = \\?"Bad_Name', done.stdout), done.stdout[-2000:]
