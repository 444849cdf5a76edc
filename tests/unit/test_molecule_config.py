"""Molecule runs Ansible with an ansible.cfg of its own, so the project's own paths (plugins, modules,
roles) reach the scenarios only through the shared molecule config's environment: every path setting of
ansible.cfg must be there, pointing at the same folder."""

from __future__ import annotations

import configparser
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
#: ansible.cfg [defaults] settings that name the project's folders, and the environment variable of each
PATH_SETTINGS = {
    "action_plugins": "ANSIBLE_ACTION_PLUGINS",
    "filter_plugins": "ANSIBLE_FILTER_PLUGINS",
    "library": "ANSIBLE_LIBRARY",
    "module_utils": "ANSIBLE_MODULE_UTILS",
    "roles_path": "ANSIBLE_ROLES_PATH",
}


def test_every_project_path_of_ansible_cfg_reaches_molecule() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "ansible.cfg")
    env = yaml.safe_load((REPO / ".config" / "molecule" / "config.yml").read_text())["provisioner"]["env"]
    named = {key for key in cfg["defaults"] if key.endswith(("_plugins", "_path")) or key in ("library", "module_utils")}
    # callbacks are the summary of a fleet rollout, not something a scenario runs
    assert named - {"callback_plugins"} == set(PATH_SETTINGS), "a path setting of ansible.cfg is not mapped here"
    for key, var in PATH_SETTINGS.items():
        assert env.get(var) == f"${{MOLECULE_PROJECT_DIRECTORY}}/{cfg['defaults'][key]}", f"{var} does not match ansible.cfg's {key}"
