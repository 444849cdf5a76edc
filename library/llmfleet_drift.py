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
  - Every store path of the manifest and the plan is checked as C(module_utils/llmfleet_store.py) says (the one
    owner of the store's checks): its C(.llmfleet-complete) marker has the manifest's sha256; a model path holds
    exactly its pinned files, each with the plan's size and (O(hash_files)) sha256 (a file written after the
    marker is hashed in any case); nothing in the runtime path changed after its marker and it has C(bin/python);
    and the last full check (C(<root>/store-check.json), the host's timer) did not find the path damaged.
  - Per instance of the plan, C(systemctl show) says the unit is active and enabled; the unit's MainPID
    (or, when that is a wrapper such as a shell, a process below it) runs exactly the plan's argv; and
    C(GET <url>/v1/models) lists the served model name with C(root) the model's store path and
    C(max_model_len) the plan's. An instance with an API key is asked with it, read as verify reads it: from the
    plan's C(api_key_file) (C(VLLM_API_KEY=<key>) or the bare key; root-owned, so the module runs as root) or the
    environment variable its C(api_key_env) names, never from arguments. HTTP 401 with that key is drift
    (instance-api-key: the server runs with another key), and so is a 401 from an instance the plan gives no
    key; a key the module cannot read is unchecked (the check's own configuration), not drift.
  - Units named C(llmfleet-vllm@*.service) that are active but not instances of the plan are drift.
  - Drift is data, not a failure. The task fails only when the root cannot be read at all. A probe that
    could not be made (no systemctl, unreadable /proc) is listed in C(unchecked), not as drift.
  - On a host that serves its site's mirror (the plan's C(site.mirror.host) is the plan's host), every file of
    C(<mirror_dir>/sha256/) must be named by its own sha256 (sizes only without I(hash_files)); a file that is not is
    drift (C(mirror-blob-corrupt)). The result's C(mirror) lists what the mirror holds, so the control node can
    name what the site's plans need and it lacks.
  - With O(expect), also whether the host is converged to what the control node plans, so that a rollout can
    stop there (the fast path of C(playbooks/rollout.yml)): no drift and nothing unchecked, C(current) is the
    expected generation and it passed verify (C(verified.json), no C(failed.json)), no restarts are pending,
    each keyed instance's key file holds the expected key (its sha256) root-owned 0600 (the key file of an
    instance the plan does not key is never read, and gc removes it), the runtime's system packages are
    installed, the store checker and its timer are in place, and on a GPU host the loaded NVIDIA driver is the
    pinned one. Each instance runs as a C(DynamicUser=): there is no service user to check.
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
  missing_root_ok:
    description: A root that does not exist (a fresh host) is drift (current-missing), not a failure.
    type: bool
    default: false
  expect:
    description:
      - What the control node plans, to say whether the host is converged. C(generation) (required), and optionally
        C(api_key_sha256) (instance name to the sha256 of its key), C(api_key_dir), C(system_packages),
        C(driver) (the plan's C(driver)), C(store_check_sha256) (of
        C(<root>/tools/llmfleet_store.py)).
    type: dict
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
    store-file-unexpected, store-path-changed, runtime-python-missing, instance-inactive, instance-disabled,
    instance-argv, instance-unreachable, instance-api-key, instance-api-key-file, instance-model-missing,
    instance-model-root, instance-max-model-len, unit-stray.
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
converged:
  description: With O(expect), true when the host runs the expected generation as it should and it passed verify.
  returned: when expect is given
  type: bool
not_converged:
  description: With O(expect), why the host is not converged (empty when it is).
  returned: when expect is given
  type: list
"""

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import stat  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from typing import Any  # noqa: E402

try:  # the host-state layout and the store's checks have one owner: module_utils/llmfleet_store.py
    from ansible.module_utils import llmfleet_store as layout
except ImportError:  # beside a checkout (the unit tests, a plain script): module_utils/ is a sibling of library/
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "module_utils"))
    import llmfleet_store as layout  # type: ignore[no-redef]

SCHEMA = 1
NOT_IN_MANIFEST = (layout.MANIFEST, *layout.VERDICT_FILES)
TEMPLATE_UNIT = layout.UNIT_TEMPLATE
UNIT_RE = re.compile(r"^" + re.escape(layout.UNIT_PREFIX) + r"[^ /]+\.service$")
ACTIVE_STATES = ("active", "activating", "reloading")


class RootUnreadable(Exception):
    """The root cannot be read at all: the only failure of the module."""


def _sha(path: str, r: Report) -> str | None:
    """sha256 of a file, None (and an unchecked entry) when it cannot be read."""
    try:
        return layout.sha256_file(path)
    except OSError as exc:
        r.skip("file", exc.strerror or _one_line(exc), path=path)
        return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class ProbeError(Exception):
    """A probe that could not be made (not drift); ``status`` is the HTTP status when there was an answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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

    def get_json(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> Any:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            raise ProbeError(f"GET {url}: HTTP {exc.code}", exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ProbeError(f"GET {url}: {_one_line(reason if isinstance(reason, BaseException) else exc)}") from None

    def package_states(self, names: list[str]) -> dict[str, str]:
        """dpkg's status of each package ("installed", ...; absent when dpkg does not know it)."""
        try:
            done = subprocess.run(
                ["dpkg-query", "--show", "--showformat=${Package} ${db:Status-Status}\\n", *names],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ProbeError(f"dpkg-query: {_one_line(exc)}") from None
        states = {}
        for line in done.stdout.splitlines():
            name, _, status = line.partition(" ")
            states[name.split(":")[0]] = status.strip()
        return states

    def read_text(self, path: str) -> str | None:
        """A small file (os-release, the driver's sysfs version), None when it is not there."""
        try:
            with open(path, encoding="utf-8") as handle:
                return handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ProbeError(f"{path}: {_one_line(exc)}") from None


class Report:
    def __init__(self) -> None:
        self.drift: list[dict[str, Any]] = []
        self.unchecked: list[dict[str, Any]] = []
        self.checked = {"generation_files": 0, "store_paths": 0, "model_files": 0, "instances": 0, "units": 0}

    def add(self, what: str, message: str, *, expected: Any = None, found: Any = None, **where: Any) -> None:
        self.drift.append({"what": what, **where, "expected": expected, "found": found, "message": message})

    def skip(self, what: str, reason: str, **where: Any) -> None:
        self.unchecked.append({"what": what, **where, "reason": reason})


_ABSENT = object()


def _read_json(path: str) -> tuple[Any, str | None]:
    """The document and None, or None and why not (``missing``, or the layout owner's reason)."""
    try:
        doc = layout.read_json(path, _ABSENT)
    except layout.StoreError as exc:
        return None, str(exc).removeprefix(f"{path} is ")
    return (None, "missing") if doc is _ABSENT else (doc, None)


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
    if len(parts) != 2 or parts[0] != "generations" or not layout.ID_RE.match(parts[1]):
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
            f"{gen_dir}/{layout.MANIFEST}: 'files' is not a mapping",
            path=f"{gen_dir}/{layout.MANIFEST}",
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


def _check_store(root: str, manifest: dict[str, Any], plan: dict[str, Any] | None, hash_files: bool, r: Report) -> None:
    """Every store path of the manifest and of the plan, as module_utils/llmfleet_store checks it."""
    entries = manifest.get("store_paths")
    if not isinstance(entries, list):
        r.add("manifest-invalid", "manifest 'store_paths' is not a list", path=layout.MANIFEST, expected="a list",
              found=type(entries).__name__)
        entries = []
    paths: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            r.add(
                "manifest-invalid",
                f"manifest store_paths entry {entry!r} has no path",
                path=layout.MANIFEST,
                expected="{path, kind, marker_sha256}",
                found=entry,
            )
            continue
        r.checked["store_paths"] += 1
        paths[entry["path"]] = {"kind": entry.get("kind") or "model", "marker_sha256": entry.get("marker_sha256"), "files": None}
    if plan is not None:
        for key, model in sorted((plan.get("models") or {}).items()):
            store = model.get("store_path") if isinstance(model, dict) else None
            if isinstance(store, str):
                paths.setdefault(store, {"kind": "model", "marker_sha256": None, "files": None, "model": key})["files"] = list(
                    model.get("files") or []
                )
        store = (plan.get("runtime") or {}).get("store_path")
        if isinstance(store, str):
            paths.setdefault(store, {"kind": "runtime", "marker_sha256": None, "files": None})["kind"] = "runtime"
    record = {} if hash_files else layout.read_record(root)
    for path, e in paths.items():
        res = layout.check_path(path, e["kind"], e["files"], marker_sha256=e["marker_sha256"], full=hash_files, last=record.get(path))
        if res["status"] == layout.ERROR:
            r.skip("store", str(res.get("error")), path=path)
            continue
        if e["files"] is not None:
            r.checked["model_files"] += res["files"]
        for prob in res["problems"]:
            r.add(prob["what"], prob["message"], path=prob["path"], expected=prob["expected"], found=prob["found"])


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
        key, source = api_key(inst)
    except KeyFileMissing as exc:
        r.add("instance-api-key-file", str(exc), instance=name, path=exc.path, expected="the instance's API key file", found=None)
        return
    except ProbeError as exc:
        r.skip("api-key", f"{exc} (the check's own configuration, not drift of the host)", instance=name)
        return
    try:
        doc = probes.get_json(url, http_timeout, {"Authorization": f"Bearer {key}"} if key else None)
    except ProbeError as exc:
        if exc.status == 401:
            if key:
                why = f"refuses the instance's API key from {source}: the server runs with another key"
            else:
                why = "requires an API key, and the plan gives the instance none"
            r.add("instance-api-key", f"{url} {why} (HTTP 401)", instance=name, expected=source or "no key", found="HTTP 401")
            return
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


API_KEY_VAR = "VLLM_API_KEY"


class KeyFileMissing(ProbeError):
    """The plan gives an instance a key file that is not on the host: drift, the role writes it."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def read_key_file(path: str) -> str:
    """The key of an API key file as verify reads it: a VLLM_API_KEY=<key> line, or the bare key alone."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise KeyFileMissing(f"API key file {path} is missing (the plan gives the instance a key)", path) from None
    except PermissionError:
        raise ProbeError(f"API key file {path} is not readable by this user (root-owned 0600: run the check as root)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProbeError(f"API key file {path} could not be read: {type(exc).__name__}") from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    for ln in lines:
        if ln.startswith(API_KEY_VAR + "="):
            return ln[len(API_KEY_VAR) + 1 :].strip().strip("'\"")
    if len(lines) == 1 and "=" not in lines[0]:
        return lines[0]
    raise ProbeError(f"API key file {path} holds no {API_KEY_VAR}=<key> line and is not a bare key")


def api_key(inst: dict[str, Any]) -> tuple[str | None, str | None]:
    """(key, where it came from) for an instance of the plan; (None, None) when the plan gives it no key.

    Like verify: the environment variable the instance's api_key_env names, else its api_key_file.
    """
    env, path = inst.get("api_key_env"), inst.get("api_key_file")
    if isinstance(env, str) and env:
        key = os.environ.get(env, "")
        if not key:
            raise ProbeError(f"environment variable {env} (the instance's API key) is not set or empty")
        return key, f"environment variable {env}"
    if isinstance(path, str) and path:
        key = read_key_file(path)
        if not key or any(c in key for c in "\r\n\0"):
            raise ProbeError(f"API key file {path} holds an empty or invalid key")
        return key, f"API key file {path}"
    if inst.get("api_key_required"):
        raise ProbeError(f"instance {inst.get('name')} requires an API key and the plan names neither api_key_file nor api_key_env")
    return None, None


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
        manifest, err = _read_json(os.path.join(gen_dir, layout.MANIFEST))
        if err is not None or not isinstance(manifest, dict):
            what = "manifest-missing" if err == "missing" else "manifest-invalid"
            r.add(
                what,
                f"{gen_dir}/{layout.MANIFEST}: {err or 'not a JSON object'} (an incomplete generation)",
                path=f"{gen_dir}/{layout.MANIFEST}",
                expected="a sealed manifest",
                found=err,
            )
        else:
            result["generation"] = generation
            result["host"] = manifest.get("host")
            if manifest.get("generation") != generation:
                r.add(
                    "generation-mismatch",
                    f"{gen_dir}/{layout.MANIFEST} was sealed for generation {manifest.get('generation')}",
                    path=f"{gen_dir}/{layout.MANIFEST}",
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
            _check_store(root, manifest, plan, hash_files, r)
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


def converged(root: str, result: dict[str, Any], expect: dict[str, Any], probes: Any) -> list[str]:
    """Why the host is not converged to what the control node expects (empty: it is); see DOCUMENTATION."""
    why: list[str] = []
    want = expect.get("generation")
    running = result.get("generation")
    if not want or running != want:
        why.append(f"runs generation {running or 'none'}, the plan is {want}")
    if result["drift"]:
        whats = sorted({str(d.get("what")) for d in result["drift"]})
        why.append(f"{len(result['drift'])} drift ({', '.join(whats)})")
    if result["unchecked"]:
        why.append("unchecked: " + "; ".join(f"{u.get('what')}: {u.get('reason')}" for u in result["unchecked"]))
    if why:
        return why  # the rest describes the generation the host runs: only worth it when that one is planned
    gen_dir = os.path.join(root, "generations", running)
    if not os.path.isfile(os.path.join(gen_dir, "verified.json")) or os.path.exists(os.path.join(gen_dir, "failed.json")):
        why.append(f"generation {running} has not passed verify")
    if os.path.lexists(os.path.join(root, "pending-restart.json")):
        why.append("restarts are pending (pending-restart.json)")
    why += _expected_keys(expect)
    try:
        packages = [str(p) for p in expect.get("system_packages") or []]
        states = probes.package_states(packages) if packages else {}
        missing = [p for p in packages if states.get(p) != "installed"]
        if missing:
            why.append(f"system packages not installed: {', '.join(missing)}")
        why += _driver(expect.get("driver"), probes)
    except ProbeError as exc:
        why.append(f"cannot check: {exc}")
    script_sha = expect.get("store_check_sha256")
    if script_sha:
        script = os.path.join(root, "tools", "llmfleet_store.py")
        try:
            found = layout.sha256_file(script)
        except OSError:
            found = None
        if found != script_sha:
            why.append(f"{script} is {'missing' if found is None else 'another version'}")
        try:
            timer = probes.unit_state(STORE_TIMER)
            if timer.get("ActiveState") != "active" or timer.get("UnitFileState") != "enabled":
                why.append(f"{STORE_TIMER} is {timer.get('ActiveState')} and {timer.get('UnitFileState') or 'not installed'}")
        except ProbeError as exc:
            why.append(f"cannot check {STORE_TIMER}: {exc}")
    return why


STORE_TIMER = "llmfleet-store-check.timer"


def _expected_keys(expect: dict[str, Any]) -> list[str]:
    """Each keyed instance's key file holds the expected key, root-owned 0600."""
    why = []
    key_dir = expect.get("api_key_dir")
    wanted = expect.get("api_key_sha256") or {}
    for name, digest in sorted(wanted.items()):
        path = os.path.join(str(key_dir), f"{name}.env")
        try:
            st = os.lstat(path)
            key = read_key_file(path)
        except (OSError, ProbeError) as exc:
            why.append(f"API key of {name}: {exc}")
            continue
        if hashlib.sha256(key.encode()).hexdigest() != digest:
            why.append(f"API key of {name}: {path} holds another key than the inventory's")
        elif not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o600:
            why.append(f"API key of {name}: {path} is not a root-owned 0600 file")
    # another instance's key file is no reason: key files belong to the generations that use them (a
    # kept one may key an instance the current one does not) and gc removes them with the last of those
    return why


def _driver(driver: Any, probes: Any) -> list[str]:
    """On a GPU host: the loaded NVIDIA kernel module is the version pinned for this distribution."""
    if not isinstance(driver, dict):
        return []
    release = dict(line.split("=", 1) for line in (probes.read_text("/etc/os-release") or "").splitlines() if "=" in line)
    dist = release.get("ID", "").strip('"').lower()
    version = release.get("VERSION_ID", "").strip('"')
    key = f"{dist}-{version if dist == 'ubuntu' else version.split('.')[0]}"
    pin = (driver.get("distributions") or {}).get(key)
    if not isinstance(pin, dict) or not pin.get("version"):
        return [f"the plan pins no NVIDIA driver for {key}"]
    upstream = re.sub(r"-.*$", "", re.sub(r"^[0-9]+:", "", str(pin["version"])))
    loaded = (probes.read_text("/sys/module/nvidia/version") or "").strip()
    return [] if loaded == upstream else [f"NVIDIA driver {loaded or 'not loaded'}, the plan pins {upstream}"]


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(
        argument_spec={
            "root": {"type": "path", "default": "/var/lib/llmfleet"},
            "unit_dir": {"type": "path", "default": "/etc/systemd/system"},
            "hash_files": {"type": "bool", "default": True},
            "http_timeout": {"type": "float", "default": 5.0},
            "mirror_dir": {"type": "path", "default": "/srv/llmfleet/mirror"},
            "missing_root_ok": {"type": "bool", "default": False},
            "expect": {"type": "dict"},
        },
        supports_check_mode=True,
    )
    p = module.params
    probes = Probes()
    try:
        if p["missing_root_ok"] and not os.path.lexists(p["root"]):
            r = Report()
            r.add(
                "current-missing", f"{p['root']} does not exist (nothing deployed)", path=p["root"], expected="generations/<id>", found=None
            )
            result = {"generation": None, "host": None, "root": p["root"], "drift": r.drift}
            result.update(unchecked=[], checked=r.checked, schema=SCHEMA)
        else:
            result = check_host(
                p["root"], p["unit_dir"], probes, hash_files=p["hash_files"], http_timeout=p["http_timeout"], mirror_dir=p["mirror_dir"]
            )
        if p["expect"] is not None:
            why = converged(p["root"], result, p["expect"], probes)
            result.update(converged=not why, not_converged=why)
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
