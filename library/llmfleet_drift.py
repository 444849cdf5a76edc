#!/usr/bin/python
# Drift of an llmfleet host from its current generation. Read-only; Python standard library only.
# The checks are `check_host(root, unit_dir, probes, ...)`, a plain function over a probes object
# (systemctl, /proc, HTTP), so the unit tests drive it with a host tree in a temporary directory
# and fake probes, without Ansible. Outside Ansible: `python3 library/llmfleet_drift.py --print [ROOT]`.
from __future__ import annotations

DOCUMENTATION = r"""
module: llmfleet_drift
short_description: Compare a live llmfleet host with its current generation
description:
  - Reads C(<root>/current), the generation it points at (C(manifest.json), C(plan.json)) and compares the
    live host with it, one drift entry per difference found.
  - Generation files have the sha256 of the manifest, and no file is in the generation directory that the
    manifest does not list (C(manifest.json), C(verified.json), C(failed.json) and dot files excepted).
  - The installed template unit C(<unit_dir>/llmfleet-vllm@.service) and each instance's drop-in
    C(<unit_dir>/llmfleet-vllm@<name>.service.d/) equal the generation's copies.
  - Every store path of the manifest exists and its C(.llmfleet-complete) marker has the manifest's sha256;
    every model file of the plan is in its store path with the plan's size and (O(hash_files)) sha256;
    the runtime store path has C(bin/python).
  - Per instance of the plan, C(systemctl show) says the unit is active and enabled; the unit's MainPID
    (or, when that is a wrapper such as a shell, a process below it) runs exactly the plan's argv; and
    C(GET <url>/v1/models) lists the served model name with C(root) the model's store path and
    C(max_model_len) the plan's.
  - Units named C(llmfleet-vllm@*.service) that are active but not instances of the plan are drift.
  - Drift is data, not a failure. The task fails only when the root cannot be read at all. A probe that
    could not be made (no systemctl, unreadable /proc) is listed in C(unchecked), not as drift.
  - On a host that serves its site's mirror (the plan's C(site.mirror.host) is the plan's host), every file of
    C(<mirror_dir>/sha256/) must be named by its own sha256 (sizes only without I(hash_files)); a file that is not is
    drift (C(mirror-blob-corrupt)). The result's C(mirror) lists what the mirror holds, so the control node can
    name what the site's plans need and it lacks.
  - Changes nothing on the host.
options:
  root:
    description: The llmfleet root on the host (the plan's C(root)).
    type: path
    default: /var/lib/llmfleet
  unit_dir:
    description: Where the template unit is installed.
    type: path
    default: /etc/systemd/system
  hash_files:
    description: sha256 every model file (slow for large models); false compares sizes only.
    type: bool
    default: true
  http_timeout:
    description: Seconds to wait for each instance's C(/v1/models).
    type: float
    default: 5
  mirror_dir:
    description: The folder a site mirror serves (roles/site_mirror C(site_mirror_dir)).
    type: path
    default: /srv/llmfleet/mirror
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
author: llmfleet
"""

EXAMPLES = r"""
- name: Drift | Compare the host with its current generation
  llmfleet_drift:
  register: __llmfleet_drift

- name: Drift | Sizes only, another root
  llmfleet_drift:
    root: /srv/llmfleet
    hash_files: false
"""

RETURN = r"""
generation:
  description: The generation C(current) points at; null when there is none (or it is not a generation).
  returned: always
  type: str
host:
  description: The host name the generation's manifest was sealed for.
  returned: always
  type: str
drift:
  description: >-
    One entry per difference, C({what, path or instance, expected, found, message}). C(what) is one of
    current-missing, current-invalid, manifest-missing, manifest-invalid, plan-invalid, generation-mismatch,
    file-missing, file-changed, file-unexpected, unit-missing, unit-changed, store-path-missing,
    store-marker-missing, store-marker-changed, model-file-missing, model-file-changed,
    runtime-python-missing, instance-inactive, instance-disabled, instance-argv, instance-unreachable,
    instance-model-missing, instance-model-root, instance-max-model-len, unit-stray.
  returned: always
  type: list
unchecked:
  description: Probes that could not be made, C({what, instance or path, reason}); not drift.
  returned: always
  type: list
checked:
  description: How much was compared (generation_files, store_paths, model_files, instances, units).
  returned: always
  type: dict
"""

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

SCHEMA = 1
MANIFEST = "manifest.json"
NOT_IN_MANIFEST = (MANIFEST, "verified.json", "failed.json")
MARKER = ".llmfleet-complete"
TEMPLATE_UNIT = "llmfleet-vllm@.service"
UNIT_RE = re.compile(r"^llmfleet-vllm@[^ /]+\.service$")
ID_RE = re.compile(r"^[0-9a-f]{8,64}$")
ACTIVE_STATES = ("active", "activating", "reloading")


class RootUnreadable(Exception):
    """The root cannot be read at all: the only failure of the module."""


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha(path: str, r: Report) -> str | None:
    """sha256 of a file, None (and an unchecked entry) when it cannot be read."""
    try:
        return sha256_file(path)
    except OSError as exc:
        r.skip("file", exc.strerror or _one_line(exc), path=path)
        return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ProbeError(Exception):
    """A probe that could not be made (not drift)."""


class Probes:
    """The live host: systemctl, /proc and HTTP. Tests pass an object with the same methods."""

    def __init__(self, proc: str = "/proc", systemctl: str = "systemctl") -> None:
        self.proc = proc
        self.systemctl = systemctl

    def _systemctl(self, *args: str) -> str:
        try:
            done = subprocess.run([self.systemctl, *args], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProbeError(f"{self.systemctl} {' '.join(args)}: {_one_line(exc)}") from None
        if done.returncode != 0:
            raise ProbeError(f"{self.systemctl} {' '.join(args)}: exit {done.returncode}: {' '.join(done.stderr.split())}")
        return done.stdout

    def unit_state(self, unit: str) -> dict[str, str]:
        """{"ActiveState", "UnitFileState", "MainPID"} of a unit, as `systemctl show` gives them."""
        out = self._systemctl("show", "-p", "ActiveState,UnitFileState,MainPID", "--", unit)
        state = {}
        for line in out.splitlines():
            key, sep, value = line.partition("=")
            if sep:
                state[key.strip()] = value.strip()
        return state

    def active_units(self) -> list[str]:
        """Names of the loaded llmfleet-vllm@*.service units whose state is active (or becoming it)."""
        out = self._systemctl("list-units", "--all", "--plain", "--no-legend", "--no-pager", "--type=service", "llmfleet-vllm@*.service")
        units = []
        for line in out.splitlines():
            cols = line.split()
            if len(cols) >= 3 and UNIT_RE.match(cols[0]) and cols[2] in ACTIVE_STATES:
                units.append(cols[0])
        return units

    def cmdline(self, pid: int) -> list[str] | None:
        """argv of a process, None when there is no such process."""
        try:
            with open(os.path.join(self.proc, str(pid), "cmdline"), "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ProbeError(f"{self.proc}/{pid}/cmdline: {_one_line(exc)}") from None
        if not raw:
            return []
        return [part.decode("utf-8", "surrogateescape") for part in raw.rstrip(b"\0").split(b"\0")]

    def children(self, pid: int) -> list[int]:
        """Direct children of a process (every thread's /proc/<pid>/task/<tid>/children)."""
        found: list[int] = []
        try:
            tids = os.listdir(os.path.join(self.proc, str(pid), "task"))
        except OSError:
            return found
        for tid in tids:
            try:
                with open(os.path.join(self.proc, str(pid), "task", tid, "children"), encoding="ascii") as handle:
                    found.extend(int(c) for c in handle.read().split())
            except (OSError, ValueError):
                continue
        return found

    def get_json(self, url: str, timeout: float) -> Any:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise ProbeError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ProbeError(f"GET {url}: {_one_line(reason if isinstance(reason, BaseException) else exc)}") from None


class Report:
    def __init__(self) -> None:
        self.drift: list[dict[str, Any]] = []
        self.unchecked: list[dict[str, Any]] = []
        self.checked = {"generation_files": 0, "store_paths": 0, "model_files": 0, "instances": 0, "units": 0}

    def add(self, what: str, message: str, *, expected: Any = None, found: Any = None, **where: Any) -> None:
        self.drift.append({"what": what, **where, "expected": expected, "found": found, "message": message})

    def skip(self, what: str, reason: str, **where: Any) -> None:
        self.unchecked.append({"what": what, **where, "reason": reason})


def _read_json(path: str) -> tuple[Any, str | None]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle), None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, ValueError) as exc:
        return None, f"not readable JSON: {_one_line(exc)}"


def _current(root: str, r: Report) -> str | None:
    link = os.path.join(root, "current")
    if not os.path.lexists(link):
        r.add("current-missing", f"{link} does not exist (nothing deployed?)", path=link, expected="generations/<id>", found=None)
        return None
    if not os.path.islink(link):
        r.add("current-invalid", f"{link} is not a symlink", path=link, expected="generations/<id>", found="not a symlink")
        return None
    target = os.readlink(link)
    parts = os.path.normpath(target).split(os.sep)
    if len(parts) != 2 or parts[0] != "generations" or not ID_RE.match(parts[1]):
        r.add("current-invalid", f"{link} -> {target}, not generations/<id>", path=link, expected="generations/<id>", found=target)
        return None
    gen_dir = os.path.join(root, "generations", parts[1])
    if not os.path.isdir(gen_dir):
        r.add("current-invalid", f"{link} -> {target}, which does not exist", path=link, expected="an existing generation", found=target)
        return None
    return parts[1]


def _generation_files(gen_dir: str) -> list[str]:
    rels = []
    for dirpath, dirnames, filenames in os.walk(gen_dir):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), gen_dir)
            if rel in NOT_IN_MANIFEST or name.startswith("."):
                continue
            rels.append(rel)
    return rels


def _check_files(gen_dir: str, manifest: dict[str, Any], r: Report) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        r.add(
            "manifest-invalid",
            f"{gen_dir}/{MANIFEST}: 'files' is not a mapping",
            path=f"{gen_dir}/{MANIFEST}",
            expected="files: {path: sha256}",
            found=type(files).__name__,
        )
        return
    for rel, want in sorted(files.items()):
        path = os.path.join(gen_dir, rel)
        r.checked["generation_files"] += 1
        if not os.path.isfile(path):
            r.add("file-missing", f"{path} is missing", path=path, expected=want, found=None)
            continue
        got = _sha(path, r)
        if got is not None and got != want:
            r.add("file-changed", f"{path} changed since the generation was sealed", path=path, expected=want, found=got)
    for rel in _generation_files(gen_dir):
        if rel not in files:
            path = os.path.join(gen_dir, rel)
            r.add("file-unexpected", f"{path} is not in the manifest", path=path, expected=None, found=rel)


def _check_unit(gen_dir: str, unit_dir: str, r: Report) -> None:
    """The installed template unit and each instance's drop-in (its key file, devices, limits) are the generation's."""
    units = os.path.join(gen_dir, "units")
    pairs = [(os.path.join(units, TEMPLATE_UNIT), os.path.join(unit_dir, TEMPLATE_UNIT))]
    for name in sorted(os.listdir(units)) if os.path.isdir(units) else []:
        if UNIT_RE.match(name.removesuffix(".d")) and name.endswith(".service.d") and os.path.isdir(os.path.join(units, name)):
            for file in sorted(os.listdir(os.path.join(units, name))):
                pairs.append((os.path.join(units, name, file), os.path.join(unit_dir, name, file)))
    for ours, installed in pairs:
        if not os.path.isfile(ours):
            continue  # a file-missing entry already says so
        r.checked["units"] += 1
        want = _sha(ours, r)
        if not os.path.isfile(installed):
            r.add("unit-missing", f"{installed} is not installed", path=installed, expected=want, found=None)
            continue
        got = _sha(installed, r)
        if got is not None and want is not None and got != want:
            r.add("unit-changed", f"{installed} differs from the generation's {ours}", path=installed, expected=want, found=got)


def _check_store(manifest: dict[str, Any], plan: dict[str, Any] | None, hash_files: bool, r: Report) -> set[str]:
    """Store paths and model files; returns the store paths that are missing (their contents are not checked)."""
    missing: set[str] = set()
    entries = manifest.get("store_paths")
    if not isinstance(entries, list):
        r.add("manifest-invalid", "manifest 'store_paths' is not a list", path=MANIFEST, expected="a list", found=type(entries).__name__)
        entries = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            r.add(
                "manifest-invalid",
                f"manifest store_paths entry {entry!r} has no path",
                path=MANIFEST,
                expected="{path, kind, marker_sha256}",
                found=entry,
            )
            continue
        path = entry["path"]
        r.checked["store_paths"] += 1
        if not os.path.isdir(path):
            missing.add(path)
            r.add("store-path-missing", f"store path {path} is missing", path=path, expected=entry.get("kind"), found=None)
            continue
        marker = os.path.join(path, MARKER)
        if not os.path.isfile(marker):
            r.add(
                "store-marker-missing",
                f"{marker} is missing (an incomplete store path)",
                path=marker,
                expected=entry.get("marker_sha256"),
                found=None,
            )
            continue
        got = _sha(marker, r)
        if got is not None and entry.get("marker_sha256") is not None and got != entry["marker_sha256"]:
            r.add("store-marker-changed", f"{marker} differs from the manifest's", path=marker, expected=entry["marker_sha256"], found=got)
    if plan is None:
        return missing
    for key, model in sorted((plan.get("models") or {}).items()):
        store = model.get("store_path") if isinstance(model, dict) else None
        if not isinstance(store, str) or store in missing:
            continue
        if not os.path.isdir(store):
            missing.add(store)
            r.add("store-path-missing", f"store path {store} of model {key} is missing", path=store, expected="model", found=None)
            continue
        for f in model.get("files") or []:
            path = os.path.join(store, f["path"])
            r.checked["model_files"] += 1
            if not os.path.isfile(path):
                r.add("model-file-missing", f"model {key}: {path} is missing", path=path, expected=f.get("sha256"), found=None)
                continue
            size = os.path.getsize(path)
            if f.get("size") is not None and size != f["size"]:
                r.add(
                    "model-file-changed",
                    f"model {key}: {path} has {size} bytes, the pin {f['size']}",
                    path=path,
                    expected={"size": f["size"]},
                    found={"size": size},
                )
                continue
            if hash_files and f.get("sha256"):
                got = _sha(path, r)
                if got is not None and got != f["sha256"]:
                    r.add(
                        "model-file-changed",
                        f"model {key}: {path} has another sha256 than the pin",
                        path=path,
                        expected=f["sha256"],
                        found=got,
                    )
    runtime = plan.get("runtime") or {}
    store = runtime.get("store_path")
    if isinstance(store, str) and store not in missing:
        python = os.path.join(store, "bin", "python")
        if not os.path.isdir(store):
            missing.add(store)
            r.add("store-path-missing", f"runtime store path {store} is missing", path=store, expected="runtime", found=None)
        elif not os.path.exists(python):
            r.add("runtime-python-missing", f"{python} is missing", path=python, expected="bin/python", found=None)
    return missing


def _process_runs(probes: Any, pid: int, argv: list[str]) -> tuple[bool, list[str] | None]:
    """Does the process or one below it run argv? (match, the MainPID's own cmdline).

    The launch script execs argv, so MainPID normally is vLLM itself. When it is a wrapper (a shell
    that did not exec, a supervisor), a descendant that runs exactly argv counts: breadth first,
    at most 64 processes. vLLM renames only its engine-core children (VLLM::EngineCore), not the API
    server, so the API server's cmdline is argv unchanged.
    """
    own = probes.cmdline(pid)
    if own == argv:
        return True, own
    queue, seen = list(probes.children(pid)), {pid}
    while queue and len(seen) < 64:
        child = queue.pop(0)
        if child in seen:
            continue
        seen.add(child)
        if probes.cmdline(child) == argv:
            return True, own
        queue.extend(probes.children(child))
    return False, own


def _models_entry(doc: Any, name: str) -> tuple[dict[str, Any] | None, list[str]]:
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        return None, []
    names = [str(m.get("id")) for m in data if isinstance(m, dict)]
    for m in data:
        if isinstance(m, dict) and m.get("id") == name:
            return m, names
    return None, names


def _check_instance(inst: dict[str, Any], plan: dict[str, Any], probes: Any, http_timeout: float, r: Report) -> None:
    name = inst.get("name")
    unit = inst.get("unit") or f"llmfleet-vllm@{name}.service"
    r.checked["instances"] += 1
    try:
        state = probes.unit_state(unit)
    except ProbeError as exc:
        r.skip("unit-state", str(exc), instance=name)
        return
    if state.get("UnitFileState") != "enabled":
        r.add(
            "instance-disabled",
            f"{unit} is {state.get('UnitFileState') or 'not installed'}, not enabled",
            instance=name,
            expected="enabled",
            found=state.get("UnitFileState"),
        )
    if state.get("ActiveState") != "active":
        r.add(
            "instance-inactive",
            f"{unit} is {state.get('ActiveState')}, not active",
            instance=name,
            expected="active",
            found=state.get("ActiveState"),
        )
        return  # its process and endpoint cannot match: one entry, not three
    argv = [str(a) for a in inst.get("argv") or []]
    try:
        pid = int(state.get("MainPID") or 0)
    except ValueError:
        pid = 0
    try:
        if pid <= 0:
            r.add("instance-argv", f"{unit} is active but has no main process", instance=name, expected=argv, found=None)
        else:
            ok, own = _process_runs(probes, pid, argv)
            if not ok:
                r.add("instance-argv", f"{unit} (pid {pid}) does not run the plan's argv", instance=name, expected=argv, found=own)
    except ProbeError as exc:
        r.skip("process", str(exc), instance=name)
    url = str(inst.get("url") or "").rstrip("/") + "/v1/models"
    served = str(inst.get("served_model_name") or _flag(argv, "--served-model-name") or inst.get("model"))
    model = (plan.get("models") or {}).get(inst.get("model")) or {}
    want_root = model.get("store_path") or _flag(argv, "--model")
    try:
        doc = probes.get_json(url, http_timeout)
    except ProbeError as exc:
        r.add("instance-unreachable", f"{exc}", instance=name, expected=url, found=str(exc))
        return
    entry, names = _models_entry(doc, served)
    if entry is None:
        r.add(
            "instance-model-missing",
            f"{url} does not list {served} (lists {', '.join(names) or 'nothing'})",
            instance=name,
            expected=served,
            found=names,
        )
        return
    if entry.get("root") != want_root:
        r.add(
            "instance-model-root",
            f"{url}: {served} serves {entry.get('root')}, not {want_root}",
            instance=name,
            expected=want_root,
            found=entry.get("root"),
        )
    if entry.get("max_model_len") != inst.get("max_model_len"):
        r.add(
            "instance-max-model-len",
            f"{url}: {served} has max_model_len {entry.get('max_model_len')}, the plan {inst.get('max_model_len')}",
            instance=name,
            expected=inst.get("max_model_len"),
            found=entry.get("max_model_len"),
        )


def _flag(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _check_mirror(mirror_dir: str, hash_files: bool, r: Report) -> dict[str, Any]:
    """A site mirror's blobs: each named by its sha256; what it holds (sha256 -> size) for the control node."""
    folder = os.path.join(mirror_dir, "sha256")
    held: dict[str, int] = {}
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        r.add("mirror-missing", f"{folder} does not exist (the site's mirror was never filled)",
              path=folder, expected="a mirror", found=None)
        return {"dir": mirror_dir, "blobs": held}
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not re.fullmatch(r"[0-9a-f]{64}", name):
            if not name.endswith(".part"):  # a transfer in progress
                r.add("mirror-blob-stray", f"{path} is not named by a sha256", path=path, expected=None, found=name)
            continue
        held[name] = os.path.getsize(path)
        if hash_files:
            actual = _sha(path, r)
            if actual is not None and actual != name:
                r.add("mirror-blob-corrupt", f"{path}: its content has sha256 {actual}", path=path, expected=name, found=actual)
    return {"dir": mirror_dir, "blobs": held}


def check_host(
    root: str, unit_dir: str, probes: Any, *, hash_files: bool = True, http_timeout: float = 5.0, mirror_dir: str = "/srv/llmfleet/mirror"
) -> dict[str, Any]:
    """Compare the host under root (and unit_dir) with its current generation; see DOCUMENTATION."""
    if not os.path.isdir(root):
        raise RootUnreadable(
            f"{root}: {'not a directory' if os.path.exists(root) else 'does not exist'} (the llmfleet root; is the host deployed?)"
        )
    try:
        os.listdir(root)
    except OSError as exc:
        raise RootUnreadable(f"{root}: {exc.strerror or _one_line(exc)}") from None
    r = Report()
    result: dict[str, Any] = {"generation": None, "host": None, "root": root}
    generation = _current(root, r)
    plan: dict[str, Any] | None = None
    if generation is not None:
        gen_dir = os.path.join(root, "generations", generation)
        manifest, err = _read_json(os.path.join(gen_dir, MANIFEST))
        if err is not None or not isinstance(manifest, dict):
            what = "manifest-missing" if err == "missing" else "manifest-invalid"
            r.add(
                what,
                f"{gen_dir}/{MANIFEST}: {err or 'not a JSON object'} (an incomplete generation)",
                path=f"{gen_dir}/{MANIFEST}",
                expected="a sealed manifest",
                found=err,
            )
        else:
            result["generation"] = generation
            result["host"] = manifest.get("host")
            if manifest.get("generation") != generation:
                r.add(
                    "generation-mismatch",
                    f"{gen_dir}/{MANIFEST} was sealed for generation {manifest.get('generation')}",
                    path=f"{gen_dir}/{MANIFEST}",
                    expected=generation,
                    found=manifest.get("generation"),
                )
            _check_files(gen_dir, manifest, r)
            _check_unit(gen_dir, unit_dir, r)
            loaded, err = _read_json(os.path.join(gen_dir, "plan.json"))
            if err is not None or not isinstance(loaded, dict) or not isinstance(loaded.get("instances"), list):
                if err != "missing":  # a missing plan.json is already a file-missing entry
                    r.add(
                        "plan-invalid",
                        f"{gen_dir}/plan.json: {err or 'no instances list'}",
                        path=f"{gen_dir}/plan.json",
                        expected="the host's plan",
                        found=err,
                    )
            else:
                plan = loaded
                if plan.get("generation") not in (None, generation):
                    r.add(
                        "generation-mismatch",
                        f"{gen_dir}/plan.json is the plan of generation {plan.get('generation')}",
                        path=f"{gen_dir}/plan.json",
                        expected=generation,
                        found=plan.get("generation"),
                    )
            _check_store(manifest, plan, hash_files, r)
    if plan is not None:
        mirror = (plan.get("site") or {}).get("mirror") if isinstance(plan.get("site"), dict) else None
        if isinstance(mirror, dict) and mirror.get("host") == plan.get("host"):
            result["mirror"] = _check_mirror(mirror_dir, hash_files, r)
        for inst in plan["instances"]:
            if isinstance(inst, dict):
                _check_instance(inst, plan, probes, http_timeout, r)
        planned = {inst.get("unit") or f"llmfleet-vllm@{inst.get('name')}.service" for inst in plan["instances"] if isinstance(inst, dict)}
        try:
            for unit in sorted(set(probes.active_units()) - planned):
                r.add(
                    "unit-stray",
                    f"{unit} is active but not an instance of generation {generation}",
                    path=unit,
                    expected=None,
                    found="active",
                )
        except ProbeError as exc:
            r.skip("units", str(exc))
    result.update(drift=r.drift, unchecked=r.unchecked, checked=r.checked, schema=SCHEMA)
    return result


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/var/lib/llmfleet"},
            "unit_dir": {"type": "path", "default": "/etc/systemd/system"},
            "hash_files": {"type": "bool", "default": True},
            "http_timeout": {"type": "float", "default": 5.0},
            "mirror_dir": {"type": "path", "default": "/srv/llmfleet/mirror"},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        result = check_host(
            p["root"], p["unit_dir"], Probes(), hash_files=p["hash_files"], http_timeout=p["http_timeout"], mirror_dir=p["mirror_dir"]
        )
    except RootUnreadable as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg=f"{exc.filename or p['root']}: {exc.strerror or _one_line(exc)}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a hand-edited plan.json or manifest
        module.fail_json(msg=f"{p['root']}: the current generation has unexpected content ({type(exc).__name__}: {_one_line(exc)})")
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--print"]:
        where = sys.argv[2] if len(sys.argv) > 2 else "/var/lib/llmfleet"
        try:
            print(json.dumps(check_host(where, "/etc/systemd/system", Probes()), indent=2, sort_keys=True))
        except RootUnreadable as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    else:
        main()
