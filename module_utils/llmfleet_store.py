#!/usr/bin/python3
"""Is a store path what its pin, or its completion, says it is? Python standard library only.

The one owner of the store's integrity checks. Used by the modules ``llmfleet_store`` (a rollout checks
and repairs the store paths its generation uses) and ``llmfleet_drift``, and run on the host by
``llmfleet-store-check.timer`` (roles/store_check copies this file to ``<root>/tools/llmfleet_store.py``):

    python3 /var/lib/llmfleet/tools/llmfleet_store.py --root /var/lib/llmfleet [--cheap] [--textfile F] [--json]

A store path ``<root>/store/<hash>-<name>`` is complete when its marker ``.llmfleet-complete`` is there;
the marker is written last, after every file of the path, and the path is never written again.

cheap check (every rollout; drift without hashing): the marker is there (and has the sha256 the
    generation's manifest recorded); a model path holds exactly its pinned files, each with its pinned
    size; no file (no directory, for a runtime) changed after the marker was written (ctime, mtime:
    an in-place write or a chmod moves them; a model file that did is hashed against its pin); a runtime
    has ``bin/python``; and the last full check did not find the path damaged (unless the path was
    replaced since).
full check (on demand, the timer): the cheap check plus the sha256 of every pinned file. A runtime has
    no pinned file hashes: its full check is its cheap check.

Exit codes of the command: 0 every path intact, 3 damage found, 1 could not check.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

# --- the host-state layout: the one place its names are written (library/llmfleet_generation.py,
# library/llmfleet_drift.py and this file's checks all read them from here) ---------------------------
#: <root>/current -> generations/<id>: the one switchable pointer
CURRENT = "current"
GENERATIONS = "generations"
STORE = "store"
#: a generation's list of every file's sha256 and each store path with its marker's, written last
MANIFEST = "manifest.json"
PLAN = "plan.json"
HISTORY = "history.json"
#: a generation's verdict (not part of what the manifest seals)
VERDICT_FILES = ("verified.json", "failed.json")
#: a store path is complete when it holds this marker (written last, before the rename)
MARKER = ".llmfleet-complete"
#: a store path being built: <path>.partial, renamed (or exchanged) into place when complete
PARTIAL = ".partial"
#: a generation id: hex, from the hash of the plan
ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
#: <root>/store-check.json: the last full check (what the timer or a rollout's full check found)
RECORD = "store-check.json"
PENDING_RESTART = "pending-restart.json"
#: every instance is an instance of this systemd template unit: <UNIT_PREFIX><name>.service
UNIT_PREFIX = "llmfleet-vllm@"
UNIT_TEMPLATE = UNIT_PREFIX + ".service"
#: the root's lock: one generation action (seal, switch, mark, gc) at a time
LOCK = ".lock"
#: how long an action waits for another one (a gc, a switch) to release the root's lock
LOCK_WAIT_S = 60.0
SCHEMA = 1
OK, DAMAGED, MISSING, INCOMPLETE, ERROR = "ok", "damaged", "missing", "incomplete", "error"
TEXTFILE_NAME = "llmfleet_store.prom"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class StoreError(Exception):
    """A refusal with a message that names what is wrong."""


def exit_module(module: Any, work: Callable[[], dict[str, Any]], where: str) -> None:
    """End an Ansible module with what ``work`` returns; a StoreError or an OSError fails it in one line
    (an OSError without a file name is placed at ``where``)."""
    try:
        result = work()
    except StoreError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg=f"{exc.filename or where}: {exc.strerror or exc}")
    module.exit_json(**result)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _problem(what: str, path: str, message: str, expected: Any = None, found: Any = None) -> dict[str, Any]:
    return {"what": what, "path": path, "expected": expected, "found": found, "message": message}


def _walk(top: str) -> list[tuple[str, os.stat_result]]:
    """(relative path, lstat) of the top directory ('.') and everything below it, symlinks not followed."""
    out = [(".", os.lstat(top))]
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(top, rel_dir) if rel_dir else top) as it:
            for entry in it:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                out.append((rel, st))
                if stat.S_ISDIR(st.st_mode):
                    stack.append(rel)
    return out


def dir_identity(path: str) -> list[int] | None:
    """(device, inode) of a store path: a path rebuilt and renamed into place has another one."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_dev, st.st_ino]


def check_path(
    path: str,
    kind: str,
    files: list[dict[str, Any]] | None = None,
    *,
    marker_sha256: str | None = None,
    full: bool = False,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One store path, cheap or full (see the module docstring): {path, kind, status, problems, ...}.

    ``files`` are the pinned files of a model ({path, size, sha256}); ``marker_sha256`` the marker's
    sha256 a manifest recorded; ``last`` this path's entry of the last full check's record.
    """
    result: dict[str, Any] = {"path": path, "kind": kind, "status": OK, "problems": [], "full": full, "files": 0, "hashed_bytes": 0}
    problems: list[dict[str, Any]] = result["problems"]
    if not os.path.isdir(path):
        result["status"] = MISSING
        problems.append(_problem("store-path-missing", path, f"store path {path} is missing", expected=kind))
        return result
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        result["status"] = INCOMPLETE
        problems.append(_problem("store-marker-missing", marker, f"{marker} is missing (an incomplete store path)", expected=marker_sha256))
        return result
    try:
        mst = os.stat(marker)
        if marker_sha256 is not None:
            got = sha256_file(marker)
            if got != marker_sha256:
                problems.append(_problem("store-marker-changed", marker, f"{marker} differs from the manifest's", marker_sha256, got))
        sealed = max(mst.st_ctime_ns, mst.st_mtime_ns)
        if files is not None:
            _check_pinned(path, files, sealed, full, result)
        else:
            _check_unpinned(path, kind, sealed, result)
    except OSError as exc:
        result.update(status=ERROR, error=f"{exc.filename or path}: {exc.strerror or _one_line(exc)}")
        return result
    if not problems and not full and last and last.get("status") == DAMAGED and last.get("dir") == dir_identity(path):
        for p in last.get("problems") or []:  # found by a full check, and the path was not replaced since
            problems.append({**p, "message": f"{p.get('message')} (the full check of {last.get('time') or '?'} found it)"})
    if problems:
        result["status"] = DAMAGED
    return result


def _check_pinned(path: str, files: list[dict[str, Any]], sealed: int, full: bool, result: dict[str, Any]) -> None:
    problems = result["problems"]
    pinned = {str(f["path"]): f for f in files}
    parents = {os.path.dirname(p) for p in pinned}
    for p in list(parents):
        while p:
            p = os.path.dirname(p)
            parents.add(p)
    seen = set()
    for rel, st in _walk(path):
        full_path = os.path.join(path, rel)
        if rel in (".", MARKER):
            continue
        if stat.S_ISDIR(st.st_mode):
            if rel not in parents:
                problems.append(_problem("store-file-unexpected", full_path, f"{full_path} is not a file of the pin", None, "directory"))
            continue
        f = pinned.get(rel)
        if f is None:
            problems.append(_problem("store-file-unexpected", full_path, f"{full_path} is not a file of the pin", None, rel))
            continue
        seen.add(rel)
        result["files"] += 1
        if not stat.S_ISREG(st.st_mode):
            problems.append(_problem("model-file-changed", full_path, f"{full_path} is not a regular file", "a regular file", "other"))
            continue
        if f.get("size") is not None and st.st_size != f["size"]:
            problems.append(
                _problem(
                    "model-file-changed",
                    full_path,
                    f"{full_path} has {st.st_size} bytes, the pin {f['size']}",
                    {"size": f["size"]},
                    {"size": st.st_size},
                )
                | {"file": rel}
            )
            continue
        # a file written (or its mode changed) after the marker is hashed even in a cheap check
        if f.get("sha256") and (full or max(st.st_ctime_ns, st.st_mtime_ns) > sealed):
            got = sha256_file(full_path)
            result["hashed_bytes"] += st.st_size
            if got != f["sha256"]:
                problems.append(
                    _problem("model-file-changed", full_path, f"{full_path} has another sha256 than the pin", f["sha256"], got)
                    | {"file": rel}
                )
    for rel in sorted(set(pinned) - seen):
        full_path = os.path.join(path, rel)
        problems.append(_problem("model-file-missing", full_path, f"{full_path} is missing", pinned[rel].get("sha256")) | {"file": rel})


def _check_unpinned(path: str, kind: str, sealed: int, result: dict[str, Any]) -> None:
    """No file hashes were pinned (a runtime): nothing may have changed since the marker was written."""
    changed = []
    for rel, st in _walk(path):
        if not stat.S_ISDIR(st.st_mode):
            result["files"] += 1
        if rel == MARKER:
            continue
        # a directory's mtime moves when an entry is added or removed (its ctime also moved when it was
        # renamed into place); a file's ctime moves with any write or chmod
        when = st.st_mtime_ns if stat.S_ISDIR(st.st_mode) else max(st.st_ctime_ns, st.st_mtime_ns)
        if when > sealed:
            changed.append(rel)
    python = os.path.join(path, "bin", "python")
    if kind == "runtime" and not os.path.exists(python):
        result["problems"].append(_problem("runtime-python-missing", python, f"{python} is missing", "bin/python"))
    elif changed:
        shown = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        result["problems"].append(
            _problem(
                "store-path-changed",
                path,
                f"{path}: {len(changed)} entries changed after the path was completed ({shown})",
                None,
                changed[:20],
            )
        )


# --- what a root's generations use --------------------------------------------------------------


def read_json(path: str, default: Any = None) -> Any:
    """The JSON document at ``path``; ``default`` when there is none; StoreError when it is not JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not readable JSON: {_one_line(exc)}") from None


def unit_name(instance: str) -> str:
    """The systemd unit of an instance: llmfleet-vllm@<name>.service."""
    return f"{UNIT_PREFIX}{instance}.service"


def current_generation(root: str) -> str | None:
    """The generation ``current`` points at; None when there is none or it cannot be read (the checks go on)."""
    try:
        return GenerationRoot(root).current()
    except StoreError:
        return None


def paths_of_root(root: str) -> list[dict[str, Any]]:
    """Every store path a generation on the host uses: {path, kind, files, marker_sha256, current}."""
    gens_dir = os.path.join(root, GENERATIONS)
    try:
        gens = sorted(os.listdir(gens_dir))
    except FileNotFoundError:
        return []
    current = current_generation(root)
    found: dict[str, dict[str, Any]] = {}
    for gid in gens:
        manifest = read_json(os.path.join(gens_dir, gid, MANIFEST))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("store_paths"), list):
            continue  # not sealed: it uses nothing yet
        plan = read_json(os.path.join(gens_dir, gid, PLAN))
        models = plan.get("models") if isinstance(plan, dict) and isinstance(plan.get("models"), dict) else {}
        pinned = {m.get("store_path"): m.get("files") for m in models.values() if isinstance(m, dict)}
        for e in manifest["store_paths"]:
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                continue
            entry = found.setdefault(
                e["path"], {"path": e["path"], "kind": e.get("kind"), "files": None, "marker_sha256": None, "current": False}
            )
            if gid == current or entry["marker_sha256"] is None:
                entry["marker_sha256"] = e.get("marker_sha256")
            if isinstance(pinned.get(e["path"]), list):
                entry["files"] = pinned[e["path"]]
            entry["current"] = entry["current"] or gid == current
    return [found[p] for p in sorted(found)]


def serving(root: str, paths: list[str]) -> dict[str, list[dict[str, str]]]:
    """The instances of the current generation that run from each path: {path: [{name, unit}]}."""
    out: dict[str, list[dict[str, str]]] = {p: [] for p in paths}
    current = current_generation(root)
    if current is None:
        return out
    plan = read_json(os.path.join(root, GENERATIONS, current, PLAN))
    if not isinstance(plan, dict):
        return out
    runtime = (plan.get("runtime") or {}).get("store_path")
    models = plan.get("models") or {}
    for inst in plan.get("instances") or []:
        if not isinstance(inst, dict):
            continue
        uses = {runtime, (models.get(inst.get("model")) or {}).get("store_path")}
        who = {"name": str(inst.get("name")), "unit": str(inst.get("unit") or unit_name(str(inst.get("name"))))}
        for p in paths:
            if p in uses:
                out[p].append(who)
    return out


# --- a root's generations (read by llmfleet_generation, llmfleet_generation_info) ---------------------


class GenerationRoot:
    """A root's generations as the layout above puts them: read them, resolve a rollback target, hold the lock."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.generations = os.path.join(root, GENERATIONS)
        self.current_link = os.path.join(root, CURRENT)
        self.history_file = os.path.join(root, HISTORY)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold ``<root>/.lock`` (flock, exclusive) for one action; fail after LOCK_WAIT_S."""
        if not os.path.isdir(self.root):  # nothing rendered yet (check mode before install): nothing to guard
            yield
            return
        path = os.path.join(self.root, LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"another llmfleet_generation action holds {path} (waited {LOCK_WAIT_S:g} s): a gc or a switch"
                            " is running on this host; try again when it is done"
                        ) from None
                    time.sleep(0.1)
            yield
        finally:
            os.close(fd)  # releases the lock

    def switched_at(self) -> int | None:
        """When ``current`` was last switched (the symlink's own mtime, ns), or None."""
        try:
            return os.lstat(self.current_link).st_mtime_ns
        except FileNotFoundError:
            return None

    def gen_dir(self, generation: str) -> str:
        if not ID_RE.match(generation or ""):
            raise StoreError(f"generation {generation!r} is not a generation id (8 to 64 hex digits)")
        return os.path.join(self.generations, generation)

    def current(self) -> str | None:
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{self.current_link} is not a symlink to a generation: {exc}") from None
        name = os.path.basename(os.path.normpath(target))
        return name if ID_RE.match(name) else None

    def history(self) -> list[dict[str, Any]]:
        doc = read_json(self.history_file, {"schema": SCHEMA, "entries": []})
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            raise StoreError(f"{self.history_file}: expected {{'entries': [...]}}")
        return [e for e in entries if isinstance(e, dict) and isinstance(e.get("generation"), str)]

    def on_disk(self) -> list[str]:
        try:
            names = os.listdir(self.generations)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if ID_RE.match(n) and os.path.isdir(os.path.join(self.generations, n)))

    def complete(self, generation: str) -> bool:
        return os.path.isfile(os.path.join(self.gen_dir(generation), MANIFEST))

    def verdict(self, generation: str, name: str) -> bool:
        return os.path.isfile(os.path.join(self.gen_dir(generation), f"{name}.json"))

    def describe(self) -> dict[str, Any]:
        history = self.history()
        numbers: dict[str, list[int]] = {}
        for entry in history:
            numbers.setdefault(entry["generation"], []).append(int(entry.get("n", 0)))
        generations = [
            {
                "id": gid,
                "complete": self.complete(gid),
                "verified": self.verdict(gid, "verified"),
                "failed": self.verdict(gid, "failed"),
                "numbers": numbers.get(gid, []),
            }
            for gid in self.on_disk()
        ]
        current = self.current()
        return {
            "current": current,
            "previous": self.previous(current, history),
            "history": history,
            "generations": generations,
        }

    def previous(self, current: str | None, history: list[dict[str, Any]]) -> str | None:
        for entry in reversed(history):
            gid = entry["generation"]
            if gid != current and os.path.isdir(self.gen_dir(gid)) and self.complete(gid) and not self.verdict(gid, "failed"):
                return gid
        return None

    def resolve(self, to: str) -> str:
        history = self.history()
        current = self.current()
        if to in ("", "previous"):
            target = self.previous(current, history)
            if target is None:
                raise StoreError(
                    f"no previous generation to roll back to (current {current}; the history has no other complete "
                    "generation that is not marked failed)"
                )
            return target
        if to.isdigit():
            for entry in history:
                if int(entry.get("n", -1)) == int(to):
                    target = entry["generation"]
                    break
            else:
                valid = ", ".join(str(e.get("n")) for e in history) or "none"
                raise StoreError(f"rollback_to={to}: no switch numbered {to} in the history (valid: {valid})")
        else:
            matches = [g for g in self.on_disk() if len(to) >= 8 and g.startswith(to.lower())]
            if len(matches) != 1:
                valid = ", ".join(self.on_disk()) or "none"
                raise StoreError(
                    f"rollback_to={to}: {'no' if not matches else 'more than one'} generation matches "
                    f"(valid: previous, a history number, or one of: {valid})"
                )
            target = matches[0]
        if not os.path.isdir(self.gen_dir(target)) or not self.complete(target):
            raise StoreError(f"generation {target} is no longer complete on this host (collected?): cannot switch to it")
        return target


# --- the record of the last full check ----------------------------------------------------------


def read_record(root: str) -> dict[str, Any]:
    try:
        doc = read_json(os.path.join(root, RECORD))
    except StoreError:
        return {}
    paths = doc.get("paths") if isinstance(doc, dict) else None
    return paths if isinstance(paths, dict) else {}


def write_json_atomic(path: str, doc: Any, mode: int = 0o644) -> bool:
    """Write doc to path by rename, with ``mode`` set on the open file; False when the file already
    holds exactly this content with this mode."""
    text = json.dumps(doc, indent=2, sort_keys=True) + "\n"
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text and os.fstat(handle.fileno()).st_mode & 0o7777 == mode:
                return False
    except FileNotFoundError:
        pass
    write_text_atomic(path, text, mode)
    return True


def write_text_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Write text to path by rename (0644 by default: node_exporter reads a textfile as its own user)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_record(root: str, results: list[dict[str, Any]], when: float | None = None) -> None:
    """Keep what a full check found (merged into the record: paths not checked now keep their entry)."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when or time.time()))
    paths = {p: e for p, e in read_record(root).items() if os.path.isdir(p)}  # collected paths leave the record
    for r in results:
        if not r.get("full") or r["status"] == ERROR:
            continue
        paths[r["path"]] = {
            "status": r["status"],
            "problems": r["problems"],
            "dir": dir_identity(r["path"]),
            "time": stamp,
            "kind": r.get("kind"),
        }
    write_json_atomic(os.path.join(root, RECORD), {"schema": SCHEMA, "time": stamp, "paths": paths})


def add_pending_restarts(root: str, names: list[str]) -> bool:
    """Add instance names to <root>/pending-restart.json (the switch restarts them, then clears it)."""
    if not names:
        return False
    path = os.path.join(root, PENDING_RESTART)
    old = read_json(path)
    have = [str(n) for n in old] if isinstance(old, list) else []
    new = have + [n for n in names if n not in have]
    if new == have:
        return False
    write_text_atomic(path, json.dumps(new) + "\n")
    return True


# --- repair: seed a rebuild, swap it into place ---------------------------------------------------


def seed(path: str, partial: str, files: list[dict[str, Any]]) -> list[str]:
    """Copy into ``partial`` the files of a damaged ``path`` that still have their pinned size and sha256.

    Only the damaged files are then sent again from the source. Each copy is hashed as it is made;
    one that does not match its pin is not kept. Returns the files copied.
    """
    copied = []
    for f in files:
        rel = str(f["path"])
        src, dest = os.path.join(path, rel), os.path.join(partial, rel)
        try:
            if os.path.lexists(dest) or not stat.S_ISREG(os.lstat(src).st_mode) or os.path.getsize(src) != f.get("size"):
                continue
        except OSError:
            continue
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        tmp = dest + ".seed"
        digest = hashlib.sha256()
        with open(src, "rb") as reader, open(tmp, "wb") as writer:
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
                writer.write(block)
        if digest.hexdigest() != f.get("sha256"):
            os.unlink(tmp)
            continue
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
        copied.append(rel)
    return copied


def _exchange(a: str, b: str) -> None:
    """renameat2(RENAME_EXCHANGE): both names stay taken throughout; OSError when the kernel or fs cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a)


def remove_tree(path: str) -> None:
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for dirpath, dirnames, _ in os.walk(path):  # store paths are read-only trees: make them removable
        os.chmod(dirpath, 0o755)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path)


def replace(path: str, new: str) -> str | None:
    """Put the complete build ``new`` at ``path``; what was there (damaged, unfinished) is removed.

    An existing path is swapped with one renameat2(RENAME_EXCHANGE), so ``path`` is never absent; a
    filesystem that cannot exchange gets two renames. Returns what was replaced, or None.
    """
    if not os.path.isfile(os.path.join(new, MARKER)):
        raise StoreError(f"{new} is not complete (no {MARKER}): it cannot replace {path}")
    if not os.path.lexists(path):
        os.rename(new, path)
        return None
    try:
        _exchange(new, path)
        old = new
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        old = path + ".replaced"
        if os.path.lexists(old):
            remove_tree(old)
        os.rename(path, old)
        os.rename(new, path)
    remove_tree(old)
    return path


# --- node_exporter textfile -----------------------------------------------------------------------


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_textfile(results: list[dict[str, Any]], started: float, duration: float, full: bool) -> str:
    lines = [
        "# HELP llmfleet_store_path_ok 1 when the store path passed its check, 0 when it is damaged, missing or unreadable.",
        "# TYPE llmfleet_store_path_ok gauge",
    ]
    for r in results:
        labels = f'path="{_label(r["path"])}",kind="{_label(r.get("kind"))}",current="{"true" if r.get("current") else "false"}"'
        lines.append(f"llmfleet_store_path_ok{{{labels}}} {1 if r['status'] == OK else 0}")
    lines += [
        "# HELP llmfleet_store_path_problems Problems the check found in the store path.",
        "# TYPE llmfleet_store_path_problems gauge",
    ]
    for r in results:
        lines.append(f'llmfleet_store_path_problems{{path="{_label(r["path"])}"}} {len(r["problems"]) + (r["status"] == ERROR)}')
    lines += [
        "# HELP llmfleet_store_check_full 1 when the last check hashed every pinned file, 0 for a cheap check.",
        "# TYPE llmfleet_store_check_full gauge",
        f"llmfleet_store_check_full {1 if full else 0}",
        "# HELP llmfleet_store_check_timestamp_seconds When the last check started.",
        "# TYPE llmfleet_store_check_timestamp_seconds gauge",
        f"llmfleet_store_check_timestamp_seconds {started:.3f}",
        "# HELP llmfleet_store_check_duration_seconds How long the last check took.",
        "# TYPE llmfleet_store_check_duration_seconds gauge",
        f"llmfleet_store_check_duration_seconds {duration:.3f}",
        "# HELP llmfleet_store_check_hashed_bytes Bytes the last check hashed.",
        "# TYPE llmfleet_store_check_hashed_bytes gauge",
        f"llmfleet_store_check_hashed_bytes {sum(r.get('hashed_bytes', 0) for r in results)}",
    ]
    return "\n".join(lines) + "\n"


# --- the host's command (the timer) -----------------------------------------------------------------


def check_root(root: str, full: bool) -> list[dict[str, Any]]:
    record = {} if full else read_record(root)
    results = []
    for e in paths_of_root(root):
        r = check_path(
            e["path"], str(e.get("kind")), e.get("files"), marker_sha256=e.get("marker_sha256"), full=full, last=record.get(e["path"])
        )
        r["current"] = e["current"]
        results.append(r)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llmfleet_store.py", description="Check the store paths the host's generations use.")
    p.add_argument("--root", default="/var/lib/llmfleet", help="the llmfleet root (default /var/lib/llmfleet)")
    p.add_argument("--cheap", action="store_true", help="sizes and change times only (default: sha256 of every pinned file)")
    p.add_argument("--textfile", metavar="FILE", help="also write node_exporter metrics to FILE (*.prom)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    args = p.parse_args(argv)
    full = not args.cheap
    started = time.time()
    try:
        if not os.path.isdir(args.root):
            raise StoreError(f"{args.root} is not a directory (the llmfleet root; is the host deployed?)")
        results = check_root(args.root, full)
        if full:
            write_record(args.root, results, started)
        if args.textfile:
            write_text_atomic(args.textfile, render_textfile(results, started, time.time() - started, full))
    except (StoreError, OSError) as exc:
        print(f"error: {exc if isinstance(exc, StoreError) else _one_line(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"schema": SCHEMA, "full": full, "results": results}, indent=2, sort_keys=True))
    for r in results:
        if r["status"] == ERROR:
            print(f"error: {r['path']}: {r.get('error')}", file=sys.stderr)
        elif r["status"] == OK and not args.json:
            print(f"ok: {r['path']} ({r['files']} files, {'hashed' if full and r.get('kind') == 'model' else 'sizes and change times'})")
        for prob in r["problems"]:
            print(f"{r['status']}: {prob['message']}", file=sys.stderr)
    if any(r["status"] == ERROR for r in results):
        return 1
    return 3 if any(r["status"] != OK for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
