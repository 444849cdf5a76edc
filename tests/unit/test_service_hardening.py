"""The vLLM unit as rendered for each profile, scored offline by ``systemd-analyze security``, and
the API key kept out of the plan and of Ansible's output.

The lab host's live score is asserted on the host itself (tests/molecule/lab/tests/test_lab.py);
the GPU profile cannot run here, so its rendered unit is scored with ``--offline=yes``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402

ROLE = REPO / "roles" / "vllm_service"
UNIT = ROLE / "templates" / "etc" / "systemd" / "system" / "llmfleet-vllm@.service.j2"
#: the exposure each profile must not exceed (docs/architecture.md, "Hardening and secrets")
MAX_EXPOSURE = {"lab": 1.5, "xr7620": 2.0}
SECRET = "lab0nly-S3cret-Key-0123456789abcdef"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")


DROP_IN = ROLE / "templates" / "var" / "lib" / "llmfleet" / "generations" / "units" / "llmfleet-vllm@.service.d" / "llmfleet.conf.j2"


def _render(template: Path, plan: dict[str, Any], **extra: Any) -> str:
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    variables: dict[str, Any] = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in role_vars.items()}
    variables.update(vllm_service_plan=plan, ansible_managed="Ansible managed", **extra)
    return str(Templar(loader=DataLoader(), variables=variables).template(trust_as_template(template.read_text())))


def render_unit(plan: dict[str, Any], instance: dict[str, Any] | None = None) -> str:
    """The unit exactly as the role renders it (Ansible's templar, the role's vars); with an instance,
    the template followed by that instance's drop-in: what systemd runs for it."""
    text = _render(UNIT, plan)
    if instance is not None:
        text += "\n" + _render(DROP_IN, plan, __vllm_service_instance=instance)
    return text


def first_plan(inventory: str) -> dict[str, Any]:
    hosts = load_inventory(REPO / "inventory" / inventory)
    host = sorted(hosts)[0]
    return evaluate_host(host, hosts[host], load_lock())


def exposure(unit_text: str, tmp_path: Path) -> tuple[float, str]:
    path = tmp_path / "llmfleet-vllm@probe.service"
    path.write_text(unit_text)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", path.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout + out.stderr)
    assert m, f"no exposure level in the output of systemd-analyze security:\n{out.stdout}\n{out.stderr}"
    return float(m.group(1)), out.stdout


def directives(unit_text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def all_plans(inventory: str) -> list[dict[str, Any]]:
    hosts = load_inventory(REPO / "inventory" / inventory)
    return [evaluate_host(h, hosts[h], load_lock()) for h in sorted(hosts)]


@needs_analyze
@pytest.mark.parametrize("inventory", sorted(MAX_EXPOSURE))
def test_unit_exposure_offline(inventory: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Every instance of every host of the inventory: the template with its drop-in."""
    worst = 0.0
    for plan in all_plans(inventory):
        for inst in plan["instances"]:
            score, table = exposure(render_unit(plan, inst), tmp_path)
            with capsys.disabled():
                print(f"\nsystemd-analyze security --offline=yes, {inventory} {plan['host']} {inst['unit']}: exposure {score}")
            assert score <= MAX_EXPOSURE[inventory], table
            worst = max(worst, score)
    assert worst > 0


def test_gpu_unit_allows_only_the_nvidia_devices() -> None:
    plan = first_plan("xr7620")
    inst = plan["instances"][0]
    d = directives(render_unit(plan, inst))
    assert d["PrivateDevices"] == ["no"]
    assert d["DevicePolicy"] == ["closed"]
    allowed = d["DeviceAllow"]
    assert allowed, "a GPU unit needs DeviceAllow= for the NVIDIA devices"
    assert all(re.fullmatch(r"/dev/nvidia(ctl|-uvm|\d+) rw", a) for a in allowed), allowed
    assert sorted(allowed) == sorted(["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", *(f"/dev/nvidia{g} rw" for g in inst["devices"])])


@pytest.mark.parametrize("inventory", sorted(MAX_EXPOSURE))
def test_unit_key_properties(inventory: str) -> None:
    plan = first_plan(inventory)
    d = directives(render_unit(plan))
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateUsers": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "ProtectProc": "invisible",
        "RestrictNamespaces": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }.items():
        assert d.get(key) == [value], f"{inventory}: {key}={d.get(key)}, expected {value!r}"
    assert d["DynamicUser"] == ["yes"] and d["User"] == [f"{plan['service']['user_prefix']}%i"]
    assert f"{plan['root']}/store" in d["ReadOnlyPaths"]
    # the key reaches a keyed instance only through its drop-in's root-owned file, never through argv
    assert not any(plan["service"]["api_key_dir"] in e for e in d["EnvironmentFile"])
    assert "--api-key" not in d["ExecStart"][0]
    assert (d.get("PrivateDevices") == ["yes"]) == (plan["hardware"]["accelerator"] == "cpu")


def _exposed_vars(host_vars: dict[str, Any], keys: dict[str, str] | None) -> dict[str, Any]:
    out = dict(host_vars, llmfleet_api_bind="10.213.0.99")
    if keys is not None:
        out["vllm_service_api_keys"] = keys
    return out


def test_exposed_plan_requires_the_key_and_never_holds_it() -> None:
    hosts = load_inventory(REPO / "inventory" / "lab")
    host = sorted(hosts)[0]
    name = hosts[host]["llmfleet_instances"][0]["name"]
    plan = evaluate_host(host, _exposed_vars(hosts[host], {name: SECRET}), load_lock())
    inst = plan["instances"][0]
    assert inst["exposed"] and inst["api_key_required"]
    assert inst["api_key_file"] == f"/etc/llmfleet/api-keys/{name}.env"
    text = json.dumps(plan)
    assert SECRET not in text
    assert "--api-key" not in inst["argv"] and "VLLM_API_KEY" not in inst["environment"]


def test_plan_cli_json_never_holds_the_key(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    shutil.copytree(REPO / "inventory" / "lab", inv)
    (inv / "host_vars" / "lab1.yml").write_text(
        (inv / "host_vars" / "lab1.yml").read_text()
        + f"llmfleet_api_bind: 10.213.0.11\nvllm_service_api_keys:\n  tiny: {SECRET}\n"
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plan.py"), "-i", str(inv), "-l", "lab1", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert SECRET not in out.stdout + out.stderr
    inst = json.loads(out.stdout)["plans"]["lab1"]["instances"][0]
    assert inst["api_key_required"] is True


def test_ansible_output_never_holds_the_key(tmp_path: Path) -> None:
    """The role's key tasks, run in check mode with --diff and -vvv: the key shows nowhere."""
    plan = evaluate_host("probe", _exposed_vars(first_vars("lab"), {"tiny": SECRET}), load_lock())
    plan = json.loads(json.dumps(plan).replace("/etc/llmfleet", str(tmp_path / "etc")))
    playbook = tmp_path / "play.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Probe",
                    "hosts": "localhost",
                    "connection": "local",
                    "gather_facts": False,
                    "vars": {"vllm_service_plan": plan, "vllm_service_api_keys": {"tiny": SECRET}},
                    "tasks": [
                        {"name": "Probe | Key tasks", "ansible.builtin.include_role": {"name": "vllm_service", "tasks_from": "configure"}}
                    ],
                }
            ]
        )
    )
    env = {
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_LOCALHOST_WARNING": "false",
        "ANSIBLE_INVENTORY_UNPARSED_WARNING": "false",
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-C", "--diff", "-vvv", "-i", "localhost,", str(playbook)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    text = out.stdout + out.stderr
    assert "Write each keyed instance's API key file" in text, text[-3000:]
    assert SECRET not in text
    assert out.returncode == 0, text[-3000:]


def first_vars(inventory: str) -> dict[str, Any]:
    hosts = load_inventory(REPO / "inventory" / inventory)
    return hosts[sorted(hosts)[0]]


def test_trust_remote_code_only_from_the_pin_with_a_warning() -> None:
    lock = load_lock()
    host_vars = first_vars("lab")
    plan = evaluate_host("probe", host_vars, lock)
    assert "--trust-remote-code" not in plan["instances"][0]["argv"]
    assert not any("trust_remote_code" in w for w in plan["warnings"])
    model = host_vars["llmfleet_instances"][0]["model"]
    allowing = lock.model_copy(
        update={"models": lock.models | {model: lock.models[model].model_copy(update={"trust_remote_code": True})}}
    )
    plan = evaluate_host("probe", host_vars, allowing)
    assert "--trust-remote-code" in plan["instances"][0]["argv"]
    assert any("trust_remote_code" in w and model in w for w in plan["warnings"]), plan["warnings"]
