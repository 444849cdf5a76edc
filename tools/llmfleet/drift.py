"""Drift of a fleet: what each host runs against what the control node plans for it now.

The ``llmfleet_drift`` module (``library/llmfleet_drift.py``) compares a host with its *current*
generation; this module runs it over an inventory with Ansible's ad-hoc command, reads the per-host
results, and adds the one comparison only the control node can make: the generation the evaluator
plans for the host now (inventory + pins) against the generation the host runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import InputError, Problem

ENVELOPE = "llmfleet.drift/1"
REPO = Path(__file__).resolve().parents[2]
MODULE = "llmfleet_drift"
# The host's root comes from its own inventory, as the plan's does (spec field `root`).
ROOT_ARG = "{{ llmfleet_root | default('/var/lib/llmfleet') }}"
MIRROR_ARG = "{{ site_mirror_dir | default('/srv/llmfleet/mirror') }}"

OK, DRIFT, ERROR, REFUSED = "ok", "drift", "error", "refused"


def ansible_bin() -> str:
    """The control venv's ``ansible`` (beside this interpreter), else the one on PATH."""
    here = Path(sys.executable).parent / "ansible"
    return str(here) if here.exists() else "ansible"


def ansible_command(inventory: str, limit: str | None, tree: str, *, hash_files: bool = True, http_timeout: float = 5.0) -> list[str]:
    """The ad-hoc command: the module on every host, one JSON result file per host under ``tree``.

    ``--tree`` (ansible.builtin.tree) is the one machine-readable result channel of ad-hoc that
    ansible-core carries (the json callback lives in ansible.posix, not in the control venv); it
    writes unreachable and failed results too. It is deprecated for removal in ansible-core 2.23.
    """
    args = f"root={ROOT_ARG} mirror_dir={MIRROR_ARG} hash_files={'true' if hash_files else 'false'} http_timeout={http_timeout:g}"
    return module_command(inventory, limit, tree, MODULE, args)


def module_command(inventory: str, limit: str | None, tree: str, module: str, args: str) -> list[str]:
    """Any of the project's modules on every host of the limit, one result file per host under ``tree``."""
    cmd = [ansible_bin(), "all", "-i", inventory, "-m", module, "-a", args, "--tree", tree]
    if limit:
        cmd += ["--limit", limit]
    return cmd


def ansible_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))  # library/ on the module path from any cwd
    # the module and its helpers even under another ansible.cfg (ANSIBLE_CONFIG set for a site)
    env.setdefault("ANSIBLE_LIBRARY", str(REPO / "library"))
    env.setdefault("ANSIBLE_MODULE_UTILS", str(REPO / "module_utils"))
    env["ANSIBLE_DEPRECATION_WARNINGS"] = "false"  # the tree callback's own notice
    env["ANSIBLE_NOCOLOR"] = "1"
    return env


def run_ansible(inventory: str, limit: str | None, *, hash_files: bool = True, http_timeout: float = 5.0) -> tuple[dict[str, Any], str]:
    """Run the drift module over the inventory; ({host: parsed result document or parse error}, ansible's stderr)."""
    return run_module(lambda tree: ansible_command(inventory, limit, tree, hash_files=hash_files, http_timeout=http_timeout))


def run_module(command: Any) -> tuple[dict[str, Any], str]:
    """Run ``command(tree)`` (an ad-hoc command line); ({host: result document}, ansible's output)."""
    with tempfile.TemporaryDirectory(prefix="llmfleet-adhoc-") as tmp:
        tree = os.path.join(tmp, "tree")
        cmd = command(tree)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ansible_env(), check=False)
        except OSError as exc:
            raise InputError(f"could not run {cmd[0]}: {exc.strerror or exc} (run from the control venv, .venv)") from None
        return read_tree(tree), (done.stderr or "") + (done.stdout or "")


def read_tree(tree: str | Path) -> dict[str, Any]:
    """{host: result document} of an ansible ``--tree`` directory (a missing directory is no results)."""
    results: dict[str, Any] = {}
    path = Path(tree)
    if not path.is_dir():
        return results
    for f in sorted(path.iterdir()):
        try:
            results[f.name] = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            results[f.name] = {"failed": True, "msg": f"ansible's result file {f} is not JSON: {exc}"}
    return results


def output_tail(text: str, lines: int = 3) -> str:
    """The last non-empty lines of a command's output, on one line."""
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def host_report(host: str, doc: Any, planned: str | None, refused: list[Problem], ansible_output: str = "") -> dict[str, Any]:
    """One host's entry of the envelope from its module result (None: ansible gave none)."""
    entry: dict[str, Any] = {
        "status": OK,
        "generation": {"planned": planned, "running": None},
        "drift": [],
        "unchecked": [],
        "checked": {},
        "error": None,
    }
    if refused:
        entry["refused"] = [str(p) for p in refused]
    if doc is None:
        tail = output_tail(ansible_output)
        entry.update(status=ERROR, error="ansible gave no result for this host" + (f" ({tail})" if tail else ""))
        return entry
    if not isinstance(doc, dict):
        entry.update(status=ERROR, error=f"unexpected result from ansible: {str(doc)[:200]}")
        return entry
    if doc.get("unreachable"):
        entry.update(status=ERROR, error=f"unreachable: {_one_line(doc.get('msg'))}")
        return entry
    if doc.get("failed"):
        entry.update(status=ERROR, error=f"{MODULE} failed: {_one_line(doc.get('msg'))}")
        return entry
    drift = doc.get("drift")
    if not isinstance(drift, list):
        entry.update(status=ERROR, error=f"the result has no drift list (is {MODULE} the one of this repository?): {str(doc)[:200]}")
        return entry
    running = doc.get("generation")
    entry["generation"]["running"] = running
    entry["drift"] = list(drift)
    entry["unchecked"] = list(doc.get("unchecked") or [])
    entry["checked"] = dict(doc.get("checked") or {})
    # a host without a current generation already says so (current-missing / current-invalid)
    if planned is not None and running is not None and running != planned:
        entry["drift"].insert(
            0,
            {"what": "generation", "expected": planned, "found": running, "message": f"generation: planned {planned}, host runs {running}"},
        )
    if refused:
        entry["status"] = REFUSED
    elif entry["drift"]:
        entry["status"] = DRIFT
    elif entry["unchecked"]:
        entry["status"] = ERROR
        entry["error"] = "some probes could not be made: " + "; ".join(f"{u.get('what')}: {u.get('reason')}" for u in entry["unchecked"])
    return entry


def _one_line(value: Any) -> str:
    return " ".join(str(value or "no message").split())


def envelope(
    hosts: Mapping[str, Any],
    plans: Mapping[str, Mapping[str, Any]],
    problems: list[Problem],
    results: Mapping[str, Any],
    ansible_output: str = "",
) -> dict[str, Any]:
    """The versioned JSON envelope: every inventory host, planned against running."""
    out: dict[str, Any] = {}
    for host in sorted(hosts):
        refused = [p for p in problems if p.host == host and p.severity == "error"]
        planned = plans[host]["generation"] if host in plans else None
        out[host] = host_report(host, results.get(host), planned, refused, ansible_output)
    for mirror_host, entry in mirror_drift(plans, results).items():
        if mirror_host in out and out[mirror_host]["status"] in (OK, DRIFT):
            out[mirror_host]["drift"].extend(entry["drift"])
            out[mirror_host]["mirror"] = entry["mirror"]
            if entry["drift"]:
                out[mirror_host]["status"] = DRIFT
    statuses = {h["status"] for h in out.values()}
    return {"schema": ENVELOPE, "ok": statuses <= {OK}, "hosts": out}


def site_blobs(plans: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per mirror host: every blob (sha256 -> size) the current plans of its site's hosts use."""
    out: dict[str, dict[str, int]] = {}
    for plan in plans.values():
        site = plan.get("site") or {}
        mirror = site.get("mirror")
        if not mirror:
            continue
        need = out.setdefault(str(mirror["host"]), {})
        for model in plan["models"].values():
            need.update({f["sha256"]: f["size"] for f in model["files"]})
        need.update({w["sha256"]: w["size"] for w in site.get("wheels") or []})
    return out


def mirror_drift(plans: Mapping[str, Mapping[str, Any]], results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """What each site mirror lacks of what its site's plans use (the module reports what it holds)."""
    out: dict[str, dict[str, Any]] = {}
    for host, need in site_blobs(plans).items():
        doc = results.get(host)
        held = (doc.get("mirror") or {}).get("blobs") if isinstance(doc, dict) else None
        if not isinstance(held, dict):
            continue
        missing = sorted(sha for sha, size in need.items() if held.get(sha) != size)
        drift = []
        if missing:
            drift.append({
                "what": "mirror-blob-missing", "expected": len(need), "found": len(need) - len(missing),
                "message": f"the site's mirror lacks {len(missing)} of the {len(need)} blobs its plans use, e.g. {missing[0]}",
            })  # fmt: skip
        unused = sorted(set(held) - set(need))
        out[host] = {"drift": drift, "mirror": {"blobs": len(held), "needed": len(need), "missing": len(missing),
                                                 "unused": len(unused), "bytes": sum(held.values())}}  # fmt: skip
    return out


def drift_hosts(
    inventory: str,
    limit: str | None,
    lock_path: str | None,
    *,
    hash_files: bool = True,
    http_timeout: float = 5.0,
    runner: Any = None,
) -> dict[str, Any]:
    """Plan the inventory, run the module on its hosts (``runner`` is ``run_ansible`` unless a test fakes it)."""
    from .inventory import load_inventory_limited
    from .pins import load_lock
    from .plan import evaluate_fleet

    everyone, selected = load_inventory_limited(inventory, limit)
    hosts = {h: everyone[h] for h in selected if h in everyone}
    lock = load_lock(lock_path)
    plans, problems = evaluate_fleet(everyone, lock, only=selected)
    results, output = (runner or run_ansible)(inventory, limit, hash_files=hash_files, http_timeout=http_timeout)
    return envelope(hosts, plans, problems, results, output)
