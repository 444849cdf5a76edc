#!/usr/bin/python
"""llmfleet_store: check the store paths a generation uses; rebuild a damaged one beside it and swap it in."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llmfleet_store
short_description: Check llmfleet store paths, seed a rebuild of a damaged one, swap the rebuild into place
description:
  - C(check) checks store paths (C(module_utils/llmfleet_store.py) says how): cheap by default (the marker,
    each pinned file's size, nothing changed after the marker was written, what the last full check found),
    or I(full) (the sha256 of every pinned file; the result is kept in C(<root>/store-check.json)).
    It changes nothing and reports which paths are damaged and which instances of the current generation
    run from them.
  - C(seed) copies into I(partial) the files of the damaged I(path) that still match their pin, so that a
    repair sends only the damaged files again.
  - C(replace) puts the complete build I(partial) at I(path) (one C(renameat2) exchange when I(path)
    exists) and removes what was there. With I(restart), the instances of the current generation that ran
    from I(path) are first added to C(<root>/pending-restart.json), so that the switch restarts them even
    if this run fails before it.
  - Runs on the managed host with the Python standard library.
version_added: "0.2.0"
author: llmfleet
options:
  action:
    description: What to do.
    type: str
    required: true
    choices: [check, seed, replace]
  paths:
    description:
      - C(check). Store paths, each C({path, kind, files}) (C(store_path) is read as C(path)); C(files), the
        pinned files of a model (C(path), C(size), C(sha256)); C(kind) defaults to C(model) when there are
        files, else C(runtime).
    type: list
    elements: dict
  full:
    description: C(check). Hash every pinned file.
    type: bool
    default: false
  path:
    description: C(seed), C(replace). The store path.
    type: path
  partial:
    description: C(seed), C(replace). The build beside it (C(<path>.partial)).
    type: path
  files:
    description: C(seed). The pinned files of the model.
    type: list
    elements: dict
  restart:
    description: C(replace). Record the instances that ran from I(path) as pending restarts.
    type: bool
    default: true
  root:
    description:
      - The llmfleet root (the record of the last full check, the current generation, the pending restarts).
        Default, the directory above the store path's C(store/) directory.
    type: path
"""

EXAMPLES = r"""
- name: Check the store paths of the plan
  llmfleet_store:
    action: check
    paths: "{{ ansible_facts.llmfleet_plan.models.values() | list }}"
  register: __store

- name: Swap a rebuilt model into place
  llmfleet_store:
    action: replace
    path: /var/lib/llmfleet/store/c26beede-tiny-llama
    partial: /var/lib/llmfleet/store/c26beede-tiny-llama.partial
"""

RETURN = r"""
results:
  description: C(check). Per path C({path, kind, status, problems, files, hashed_bytes}); status is ok, damaged, missing,
    incomplete or error.
  returned: when action is check
  type: list
damaged:
  description: C(check). The paths whose status is damaged.
  returned: when action is check
  type: list
serving:
  description: C(check). Damaged path to the instances (C({name, unit})) of the current generation that run from it.
  returned: when action is check
  type: dict
copied:
  description: C(seed). Files copied into the partial build.
  returned: when action is seed
  type: list
pending:
  description: C(replace). Instances recorded as pending restarts.
  returned: when action is replace
  type: list
"""

import os  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402
from ansible.module_utils.llmfleet_store import (  # noqa: E402
    DAMAGED,
    ERROR,
    StoreError,
    add_pending_restarts,
    check_path,
    exit_module,
    read_record,
    replace,
    seed,
    serving,
    write_record,
)


def _root(params: dict[str, Any], path: str | None) -> str | None:
    if params.get("root"):
        return str(params["root"])
    if path and os.path.basename(os.path.dirname(path)) == "store":
        return os.path.dirname(os.path.dirname(path))
    return None


def _check(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    entries = []
    for e in params.get("paths") or []:
        path = e.get("path") or e.get("store_path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise StoreError(f"paths: {e!r} has no absolute path (or store_path)")
        files = e.get("files")
        entries.append((path, e.get("kind") or ("model" if files is not None else "runtime"), files))
    root = _root(params, entries[0][0] if entries else None)
    record = read_record(root) if root and not params["full"] else {}
    results = [check_path(p, k, f, full=params["full"], last=record.get(p)) for p, k, f in entries]
    errors = [r for r in results if r["status"] == ERROR]
    if errors:
        raise StoreError("; ".join(f"cannot check {r['path']}: {r.get('error')}" for r in errors))
    if params["full"] and root and not check_mode:
        write_record(root, results)
    damaged = [r["path"] for r in results if r["status"] == DAMAGED]
    return {"changed": False, "results": results, "damaged": damaged, "serving": serving(root, damaged) if root else {}}


def _seed(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    if not params.get("path") or not params.get("partial"):
        raise StoreError("action=seed needs path and partial")
    if check_mode:
        return {"changed": False, "copied": []}
    copied = seed(params["path"], params["partial"], params.get("files") or [])
    return {"changed": bool(copied), "copied": copied}


def _replace(params: dict[str, Any], check_mode: bool) -> dict[str, Any]:
    path, partial = params.get("path"), params.get("partial")
    if not path or not partial:
        raise StoreError("action=replace needs path and partial")
    root = _root(params, path)
    pending = [w["name"] for w in serving(root, [path])[path]] if root and params["restart"] and os.path.lexists(path) else []
    if check_mode:
        return {"changed": True, "pending": pending}
    if root and pending:
        add_pending_restarts(root, pending)
    replace(path, partial)
    return {"changed": True, "pending": pending}


ACTIONS = {"check": _check, "seed": _seed, "replace": _replace}


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "required": True, "choices": sorted(ACTIONS)},
            "paths": {"type": "list", "elements": "dict"},
            "full": {"type": "bool", "default": False},
            "path": {"type": "path"},
            "partial": {"type": "path"},
            "files": {"type": "list", "elements": "dict"},
            "restart": {"type": "bool", "default": True},
            "root": {"type": "path"},
        },
        supports_check_mode=True,
    )
    exit_module(module, lambda: ACTIONS[module.params["action"]](dict(module.params), module.check_mode),
                module.params.get("path") or "store")


if __name__ == "__main__":
    main()
