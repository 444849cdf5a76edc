"""SSH trust: host keys are checked for every inventory but the lab, whose own SSH config (written by
tools/lab.py for hosts it boots with fresh keys) is the only place that turns checking off; Ansible's
control sockets live in a directory only their user can write."""

from __future__ import annotations

import configparser
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet_lab.config import Host  # noqa: E402
from llmfleet_lab.ssh import render_ssh_config  # noqa: E402

LAB_INVENTORIES = ["inventory/lab", "inventory/lab-fleet", "tests/molecule/driver/inventory"]
NO_CHECKING = ("StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "StrictHostKeyChecking no")


def ansible_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "ansible.cfg")
    return cfg


def test_ansible_cfg_checks_host_keys() -> None:
    """ansible.cfg applies to every inventory, the production ones too."""
    cfg = ansible_cfg()
    value = cfg.get("defaults", "host_key_checking", fallback="true").strip().lower()
    assert value not in ("false", "no", "0", "off"), f"ansible.cfg: host_key_checking = {value}"


def _world_writable_ancestor(path: Path) -> Path | None:
    for parent in [path, *path.parents]:
        if parent.exists():
            mode = parent.stat().st_mode
            if stat.S_ISDIR(mode) and mode & stat.S_IWOTH:
                return parent
    return None


def control_path_dirs() -> list[tuple[str, str]]:
    found = [("ansible.cfg", ansible_cfg().get("ssh_connection", "control_path_dir", fallback="~/.ansible/cp"))]
    molecule = yaml.safe_load((REPO / ".config" / "molecule" / "config.yml").read_text())
    env = (molecule.get("provisioner") or {}).get("env") or {}
    if "ANSIBLE_SSH_CONTROL_PATH_DIR" in env:
        found.append((".config/molecule/config.yml", env["ANSIBLE_SSH_CONTROL_PATH_DIR"]))
    return found


@pytest.mark.parametrize(("where", "value"), control_path_dirs())
def test_control_sockets_are_not_in_a_world_writable_directory(where: str, value: str) -> None:
    """Another user of a shared /tmp could create the directory first and hold our SSH sessions."""
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    bad = _world_writable_ancestor(path)
    assert bad is None, f"{where}: control_path_dir {value} lies in world-writable {bad}"


def _ssh_args(group_vars: Path) -> str:
    text = ""
    for f in sorted(group_vars.glob("*.yml")):
        data = yaml.safe_load(f.read_text()) or {}
        text += " " + str(data.get("ansible_ssh_common_args", "")) + " " + str(data.get("ansible_ssh_extra_args", ""))
    return text


def test_production_inventory_checks_host_keys() -> None:
    args = _ssh_args(REPO / "inventory" / "xr7620" / "group_vars")
    assert not any(n in args for n in NO_CHECKING), args


@pytest.mark.parametrize("inventory", LAB_INVENTORIES)
def test_lab_inventories_use_the_lab_s_own_ssh_config(inventory: str) -> None:
    args = _ssh_args(REPO / inventory / "group_vars")
    assert "-F " in args and "/ssh_config" in args, args
    assert not any(n in args for n in NO_CHECKING[:2]), f"{inventory}: host key checking is the lab ssh_config's business: {args}"


def test_the_lab_ssh_config_covers_each_host_by_name_and_address(tmp_path: Path) -> None:
    """Ansible connects to ansible_host (the address), so the lab's Host blocks must match it too."""
    import ipaddress

    text = render_ssh_config([Host("lab1", ipaddress.ip_address("10.213.0.11"))], tmp_path / "key")
    assert "Host lab1 10.213.0.11\n" in text
    assert "StrictHostKeyChecking no" in text  # fresh host keys at every boot: the lab's, and only the lab's
    assert "Host *" not in text
