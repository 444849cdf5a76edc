"""Read an Ansible inventory exactly as Ansible does (group_vars, host_vars, precedence).

Only the ``llmfleet_*`` variables are needed; values that are Jinja templates are rendered with
the host's variables, as a play would see them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError
from .spec import SPEC_PREFIX

API_KEYS_VAR = "vllm_service_api_keys"  # llmfleet.plan.API_KEYS_VAR (not imported: no cycle into the evaluator)


def load_inventory(source: str | Path, limit: str | None = None) -> dict[str, dict[str, Any]]:
    """Return ``{host: {llmfleet_var: value}}`` for every host of an inventory (or of the limit)."""
    hosts, selected = load_inventory_limited(source, limit)
    return {h: hosts[h] for h in selected}


def load_inventory_limited(source: str | Path, limit: str | None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every host of the inventory, and the names the limit selects.

    Facts that span hosts (a site's mirror runs on a host of the site) are judged on the whole
    inventory, whatever the limit: a limit narrows what is reported, not what is known.
    """
    path = Path(source)
    if not path.exists():
        raise InputError(f"inventory {source} not found (give a directory like inventory/lab or a hosts file)")
    os.environ.setdefault("ANSIBLE_DEPRECATION_WARNINGS", "false")
    try:
        from ansible.inventory.manager import InventoryManager
        from ansible.parsing.dataloader import DataLoader
        from ansible.template import Templar
        from ansible.vars.manager import VariableManager
    except ImportError as exc:  # pragma: no cover - the control venv always has ansible-core
        raise InputError("ansible-core is not importable: run from the control venv (.venv)") from exc

    loader = DataLoader()
    try:
        inventory = InventoryManager(loader=loader, sources=[str(path)])
    except Exception as exc:  # ansible raises its own error types for unparsable inventories
        raise InputError(f"inventory {source} could not be read: {exc}") from exc
    variables = VariableManager(loader=loader, inventory=inventory)
    selected = [h.name for h in inventory.get_hosts(pattern=limit or "all")]
    if limit and not selected:
        known = ", ".join(sorted(h.name for h in inventory.get_hosts()))
        raise InputError(f"-l/--limit {limit} matches no host of {source} (hosts: {known})")
    result: dict[str, dict[str, Any]] = {}
    for host in inventory.get_hosts(pattern="all"):
        hv = variables.get_vars(host=host, include_hostvars=False)
        templar = Templar(loader=loader, variables=hv)
        wanted = {k: v for k, v in hv.items() if k.startswith(SPEC_PREFIX)}
        try:
            rendered = templar.template(wanted)
        except Exception as exc:
            if host.name not in selected:
                continue  # outside the limit: reported when it is asked for
            raise InputError(f"{host.name}: a llmfleet_* variable could not be templated: {exc}") from exc
        result[host.name] = plain(rendered)
        keys = hv.get(API_KEYS_VAR)
        if keys is not None:
            # only the names: the keys (often Ansible Vault strings) are never read on this path
            result[host.name][API_KEYS_VAR] = sorted(str(k) for k in keys) if isinstance(keys, Mapping) else type(keys).__name__
    return result, selected


def plain(value: Any) -> Any:
    """Strip Ansible's tagged/lazy containers down to plain Python values."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str(value)
    return value
