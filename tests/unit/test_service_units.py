"""What each instance's unit gets, as the role renders it from the plan: its own user, only its own
GPUs, its API key or no start at all, and limits where vLLM tolerates them.

The template unit (``llmfleet-vllm@.service``) is the same for every instance; what differs per
instance is a drop-in the generation carries (``units/llmfleet-vllm@<name>.service.d/``), installed
by the switch with the template. The launch script refuses to start a keyed instance without its key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.errors import PlanRefused  # noqa: E402
from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402

ROLE = REPO / "roles" / "vllm_service"
TEMPLATES = ROLE / "templates"
UNIT = TEMPLATES / "etc" / "systemd" / "system" / "llmfleet-vllm@.service.j2"
DROP_IN = TEMPLATES / "var" / "lib" / "llmfleet" / "generations" / "units" / "llmfleet-vllm@.service.d" / "llmfleet.conf.j2"
LAUNCH = TEMPLATES / "var" / "lib" / "llmfleet" / "generations" / "instances" / "launch.j2"
LOCK = load_lock()


def render(template: Path, plan: dict[str, Any], **extra: Any) -> str:
    """A template exactly as the role renders it (Ansible's templar, the role's vars)."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    role_vars = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    variables: dict[str, Any] = {k: trust_as_template(v) if isinstance(v, str) else v for k, v in role_vars.items()}
    variables.update(vllm_service_plan=plan, ansible_managed="Ansible managed", **extra)
    return str(Templar(loader=DataLoader(), variables=variables).template(trust_as_template(template.read_text())))


def directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def plans(inventory: str) -> dict[str, dict[str, Any]]:
    hosts = load_inventory(REPO / "inventory" / inventory)
    return {h: evaluate_host(h, v, LOCK) for h, v in hosts.items()}


def drop_in(plan: dict[str, Any], name: str) -> dict[str, list[str]]:
    inst = next(i for i in plan["instances"] if i["name"] == name)
    return directives(render(DROP_IN, plan, __vllm_service_instance=inst))


# --- 3. one user per instance, only its own devices ---------------------------------------------


def test_each_instance_runs_as_a_user_of_its_own() -> None:
    plan = plans("xr7620")["edge-b01"]
    users = [i["user"] for i in plan["instances"]]
    assert users == ["llmfleet-gemma", "llmfleet-nemotron"]
    unit = directives(render(UNIT, plan))
    assert unit["DynamicUser"] == ["yes"] and unit["User"] == ["llmfleet-%i"], unit.get("User")
    assert "Group" not in unit, "a static group shared by every instance"


def test_an_instance_name_that_makes_too_long_a_user_name_is_refused() -> None:
    host_vars = load_inventory(REPO / "inventory" / "lab")["lab1"]
    host_vars["llmfleet_instances"][0]["name"] = "a-very-long-instance-name"  # 25 characters
    with pytest.raises(PlanRefused) as info:
        evaluate_host("lab1", host_vars, LOCK)
    assert "llmfleet_instances[0].name" in str(info.value) and "llmfleet-<name>" in str(info.value)


def test_a_gpu_instance_may_open_only_its_own_gpus() -> None:
    plan = plans("xr7620")["edge-b01"]
    template = directives(render(UNIT, plan))
    assert "DeviceAllow" not in template and template["DevicePolicy"] == ["closed"], "the shared template must allow no GPU"
    gemma, nemotron = drop_in(plan, "gemma")["DeviceAllow"], drop_in(plan, "nemotron")["DeviceAllow"]
    assert sorted(gemma) == ["/dev/nvidia-uvm rw", "/dev/nvidia0 rw", "/dev/nvidia1 rw", "/dev/nvidiactl rw"]
    assert sorted(nemotron) == ["/dev/nvidia-uvm rw", "/dev/nvidia2 rw", "/dev/nvidia3 rw", "/dev/nvidiactl rw"]
    assert not any("uvm-tools" in d for d in gemma + nemotron)


def test_mig_profiles_also_get_the_nvidia_caps_nodes() -> None:
    host_vars = load_inventory(REPO / "inventory" / "xr7620")["edge-a01"]
    profile = dict(yaml.safe_load((REPO / "tools" / "llmfleet" / "catalog" / "hardware.yml").read_text())["xr7620-4xl4"], mig=True)
    plan = evaluate_host("edge-a01", host_vars | {"llmfleet_hardware": profile}, LOCK)
    allowed = drop_in(plan, plan["instances"][0]["name"])["DeviceAllow"]
    assert "char-nvidia-caps r" in allowed


def test_a_cpu_instance_opens_no_device() -> None:
    plan = plans("lab")["lab1"]
    assert directives(render(UNIT, plan))["PrivateDevices"] == ["yes"]
    assert "DeviceAllow" not in drop_in(plan, "tiny")


# --- 2. a keyed instance does not start without its key -----------------------------------------


def test_a_keyed_instance_needs_its_key_file_and_an_unkeyed_one_never_reads_one() -> None:
    lab = plans("lab")
    keyed = drop_in(lab["lab2"], "tiny-tp2")
    assert keyed["EnvironmentFile"] == ["/etc/llmfleet/api-keys/tiny-tp2.env"], "a missing key file must stop the start (no '-')"
    assert "EnvironmentFile" not in drop_in(lab["lab1"], "tiny")
    assert not any("api-keys" in e for e in directives(render(UNIT, lab["lab2"])).get("EnvironmentFile", []))


@pytest.mark.parametrize(("key", "started"), [(None, False), ("", False), ("k" * 20, True)])
def test_the_launch_script_of_a_keyed_instance_refuses_to_start_without_the_key(tmp_path: Path, key: str | None, started: bool) -> None:
    plan = plans("lab")["lab2"]
    inst = dict(plan["instances"][0], argv=[str(tmp_path / "no-such-python"), "-m", "vllm"])
    script = tmp_path / "launch"
    script.write_text(render(LAUNCH, plan, __vllm_service_instance=inst))
    env = {"PATH": "/usr/bin:/bin"} | ({"VLLM_API_KEY": key} if key is not None else {})
    out = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, env=env, check=False)
    if started:
        assert out.returncode == 127, out.stderr  # it got as far as exec
    else:
        assert out.returncode == 78 and "API key" in out.stderr and "no-such-python" not in out.stderr, out


def test_an_unkeyed_launch_drops_a_key_it_may_have_been_given(tmp_path: Path) -> None:
    plan = plans("lab")["lab1"]
    probe = tmp_path / "probe"
    probe.write_text("#!/bin/sh\necho \"key=${VLLM_API_KEY-unset}\"\n")
    probe.chmod(0o755)
    inst = dict(plan["instances"][0], argv=[str(probe)])
    script = tmp_path / "launch"
    script.write_text(render(LAUNCH, plan, __vllm_service_instance=inst))
    out = subprocess.run(["/bin/sh", str(script)], capture_output=True, text=True, env={"VLLM_API_KEY": "stale"}, check=False)
    assert out.stdout.strip() == "key=unset", out


# --- 8. limits where vLLM tolerates them --------------------------------------------------------


def test_limits_of_a_single_rank_loopback_instance() -> None:
    """vLLM >= 0.32 starts one rank with a file rendezvous: it talks to nothing but its clients on
    loopback. (No bind allow-list: gloo binds an ephemeral listener in every rank.)"""
    d = drop_in(plans("lab")["lab1"], "tiny")
    assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    assert "SocketBindDeny" not in d
    assert int(d["TasksMax"][0]) > 0
    assert int(d["MemoryMax"][0]) >= 2 << 30


def test_limits_of_a_multi_rank_exposed_instance() -> None:
    """Ranks meet over TCP on the host's address (gloo, the TCP store): no IP allow-list; an exposed
    API takes clients from anywhere: no IPAddressDeny either."""
    d = drop_in(plans("lab")["lab2"], "tiny-tp2")
    for key in ("IPAddressDeny", "IPAddressAllow", "SocketBindAllow", "SocketBindDeny"):
        assert key not in d, key
    assert int(d["TasksMax"][0]) > 0 and int(d["MemoryMax"][0]) > int(drop_in(plans("lab")["lab1"], "tiny")["MemoryMax"][0])


def test_no_socket_or_address_limits_before_vllm_0_32() -> None:
    """vLLM 0.19 starts even one rank with a TCP store on the host's address and an ephemeral port."""
    plan = plans("xr7620")["edge-a01"]
    assert plan["runtime"]["engine_version"] == "0.19.0"
    d = drop_in(plan, plan["instances"][0]["name"])
    for key in ("IPAddressDeny", "SocketBindDeny", "MemoryMax"):
        assert key not in d, key  # MemoryMax: host memory of a GPU instance is not modelled
    assert int(d["TasksMax"][0]) > 0


def test_unit_files_are_rendered_for_each_instance_and_installed_by_the_switch() -> None:
    configure = (ROLE / "tasks" / "configure.yml").read_text()
    service = (ROLE / "tasks" / "service.yml").read_text()
    assert "llmfleet.conf.j2" in configure
    assert "service.d" in service, "the switch must install each instance's drop-in with the template"


def test_rendering_a_generation_never_removes_a_key_file() -> None:
    """Keys belong to the generations that use them: a render (before its switch) must leave every
    key a rollback may need."""
    tasks = yaml.safe_load((ROLE / "tasks" / "configure.yml").read_text())
    for task in tasks:
        module = task.get("ansible.builtin.file") or {}
        assert not (module.get("state") == "absent" and "api_key" in str(task)), task["name"]
    assert (REPO / "library" / "llmfleet_generation.py").is_file()
