"""llmfleet_drift (module) and tools/drift.py: a host tree in tmp_path built from the lab's real plan.

Each kind of drift is introduced alone into a clean tree and must be named exactly once; the clean
tree has none. systemctl and /proc are faked; /v1/models is a real HTTP server in a thread. The CLI
is tested on canned ansible ``--tree`` results (no live hosts), and once end to end through the real
``ansible`` ad-hoc command on localhost (local connection, a fake systemctl on PATH).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from by_path import load_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet import drift as fleet_drift  # noqa: E402
from llmfleet.cli import drift as drift_cli  # noqa: E402
from llmfleet.errors import Problem  # noqa: E402
from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402

MODULE_PATH = REPO / "library" / "llmfleet_drift.py"
drift_module = load_file("llmfleet_drift", MODULE_PATH)

UNIT_TEXT = "[Unit]\nDescription=llmfleet vLLM instance %i\n[Service]\nExecStart=/var/lib/llmfleet/current/instances/%i/launch\n"
MAIN_PID = 4242


# --- /v1/models --------------------------------------------------------------------------------


class _Models(BaseHTTPRequestHandler):
    doc: ClassVar[dict[str, Any]] = {}

    def do_GET(self) -> None:
        if self.path != "/v1/models":
            self.send_error(404)
            return
        body = json.dumps(type(self).doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


# --- the host tree -------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def real_plan(root: Path, port: int) -> dict[str, Any]:
    """lab1's plan as the evaluator makes it, with the port of this test, its paths under ``root``
    (a root under /var/lib is planned as is; the evaluator refuses any other, so a tree in tmp_path
    gets the paths of the default root moved under it)."""
    host_vars = copy.deepcopy(load_inventory(REPO / "inventory" / "lab", "lab1")["lab1"])
    host_vars["llmfleet_instances"][0]["port"] = port
    if str(root).startswith("/var/lib/"):
        host_vars["llmfleet_root"] = str(root)
        return evaluate_host("lab1", host_vars, load_lock())
    plan = evaluate_host("lab1", host_vars, load_lock())
    return dict(json.loads(json.dumps(plan).replace('"/var/lib/llmfleet', f'"{root}')))


def write_generation(root: Path, plan: dict[str, Any], generation: str) -> Path:
    gen = root / "generations" / generation
    (gen / "units").mkdir(parents=True)
    (gen / "units" / "llmfleet-vllm@.service").write_text(UNIT_TEXT)
    for inst in plan["instances"]:
        d = gen / "instances" / inst["name"]
        d.mkdir(parents=True)
        (d / "env").write_text("".join(f"{k}={v}\n" for k, v in sorted(inst["environment"].items())))
        (d / "argv.json").write_text(json.dumps(inst["argv"]))
        (d / "launch").write_text("#!/bin/sh\nexec \\\n" + " \\\n".join(f"  '{a}'" for a in inst["argv"]) + "\n")
    (gen / "plan.json").write_text(json.dumps({**plan, "generation": generation}, indent=2, sort_keys=True))
    files = {str(p.relative_to(gen)): sha(p.read_bytes()) for p in sorted(gen.rglob("*")) if p.is_file()}
    store_paths = [{"path": plan["runtime"]["store_path"], "kind": "runtime"}]
    store_paths += [{"path": m["store_path"], "kind": "model"} for m in plan["models"].values()]
    for e in store_paths:
        e["marker_sha256"] = sha((Path(e["path"]) / ".llmfleet-complete").read_bytes())
    manifest = {
        "schema": 1,
        "generation": generation,
        "host": plan["host"],
        "instances": {i["name"]: i["content_hash"] for i in plan["instances"]},
        "files": files,
        "store_paths": store_paths,
    }
    (gen / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return gen


class Host:
    """A deployed lab1 in tmp_path: root, unit dir, a fake systemd/proc, the served models.

    ``port``: where the instance's /v1/models answers (default: the module's test server); ``edit``
    changes the plan before the generation is written (as the evaluator would have planned it);
    ``root``: the llmfleet root (default under tmp_path).
    """

    def __init__(
        self,
        tmp_path: Path,
        server: ThreadingHTTPServer | None,
        root: Path | None = None,
        port: int | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.root = root or tmp_path / "var" / "lib" / "llmfleet"
        self.unit_dir = tmp_path / "etc" / "systemd" / "system"
        self.unit_dir.mkdir(parents=True)
        plan = real_plan(self.root, port if port is not None else server.server_address[1] if server else 0)
        if edit is not None:
            edit(plan)
        # model files with content made here: the plan keeps the pin's paths, with these hashes and sizes
        for key, model in plan["models"].items():
            store = Path(model["store_path"])
            store.mkdir(parents=True)
            for i, f in enumerate(model["files"]):
                data = f"{key}:{f['path']}:{i}\n".encode() * 8
                (store / f["path"]).parent.mkdir(parents=True, exist_ok=True)
                (store / f["path"]).write_bytes(data)
                f.update(sha256=sha(data), size=len(data))
            (store / ".llmfleet-complete").write_text(json.dumps({"kind": "model", "key": key}))
        runtime = Path(plan["runtime"]["store_path"])
        (runtime / "bin").mkdir(parents=True)
        (runtime / "bin" / "python").write_text("")
        (runtime / ".llmfleet-complete").write_text(json.dumps({"kind": "runtime"}))
        self.generation = plan["generation"]
        self.plan = {**plan}
        self.gen = write_generation(self.root, plan, self.generation)
        (self.root / "current").symlink_to(f"generations/{self.generation}")
        (self.unit_dir / "llmfleet-vllm@.service").write_text(UNIT_TEXT)
        (inst,) = plan["instances"]
        self.inst = inst
        self.units = {inst["unit"]: {"ActiveState": "active", "UnitFileState": "enabled", "MainPID": str(MAIN_PID)}}
        self.cmdlines: dict[int, list[str]] = {MAIN_PID: list(inst["argv"])}
        self.children: dict[int, list[int]] = {}
        self.model_file = Path(plan["models"][inst["model"]]["store_path"]) / plan["models"][inst["model"]]["files"][-1]["path"]
        _Models.doc = {
            "object": "list",
            "data": [
                {
                    "id": inst["served_model_name"],
                    "object": "model",
                    "root": plan["models"][inst["model"]]["store_path"],
                    "max_model_len": inst["max_model_len"],
                }
            ],
        }
        self.systemctl_error: str | None = None
        self.packages: dict[str, str] = {}

    # the probes interface of the module
    def unit_state(self, unit: str) -> dict[str, str]:
        if self.systemctl_error:
            raise drift_module.ProbeError(self.systemctl_error)
        return self.units.get(unit, {"ActiveState": "inactive", "UnitFileState": "", "MainPID": "0"})

    def active_units(self) -> list[str]:
        if self.systemctl_error:
            raise drift_module.ProbeError(self.systemctl_error)
        return [u for u, s in self.units.items() if s["ActiveState"] == "active"]

    def cmdline(self, pid: int) -> list[str] | None:
        return self.cmdlines.get(pid)

    def children_of(self, pid: int) -> list[int]:
        return self.children.get(pid, [])

    def get_json(self, url: str, timeout: float, headers: dict[str, str] | None = None) -> Any:
        return drift_module.Probes().get_json(url, timeout, headers)

    def package_states(self, names: list[str]) -> dict[str, str]:
        return {n: self.packages[n] for n in names if n in self.packages}

    def read_text(self, path: str) -> str | None:
        return None

    def check(self, **kw: Any) -> dict[str, Any]:
        probes = _ProbesView(self)
        return drift_module.check_host(str(self.root), str(self.unit_dir), probes, **kw)


class _ProbesView:
    def __init__(self, host: Host) -> None:
        self.unit_state = host.unit_state
        self.active_units = host.active_units
        self.cmdline = host.cmdline
        self.children = host.children_of
        self.get_json = host.get_json
        self.package_states = host.package_states
        self.read_text = host.read_text


@pytest.fixture
def host(tmp_path: Path, server: ThreadingHTTPServer) -> Host:
    return Host(tmp_path, server)


def whats(result: dict[str, Any]) -> list[str]:
    return [d["what"] for d in result["drift"]]


# --- the module ----------------------------------------------------------------------------------


def test_clean_host_has_no_drift(host: Host) -> None:
    r = host.check()
    assert r["drift"] == [] and r["unchecked"] == []
    assert r["generation"] == host.generation and r["host"] == "lab1"
    files = len(json.loads((host.gen / "manifest.json").read_text())["files"])
    model_files = len(host.plan["models"][host.inst["model"]]["files"])
    assert r["checked"] == {"generation_files": files, "store_paths": 2, "model_files": model_files, "instances": 1, "units": 1}
    assert files == 5  # plan.json, the unit, env, argv.json, launch


def test_edited_env_file(host: Host) -> None:
    env = host.gen / "instances" / "tiny" / "env"
    env.write_text(env.read_text() + "VLLM_LOGGING_LEVEL=DEBUG\n")
    r = host.check()
    assert whats(r) == ["file-changed"]
    assert r["drift"][0]["path"] == str(env)


def test_missing_and_unexpected_generation_files(host: Host) -> None:
    (host.gen / "instances" / "tiny" / "argv.json").unlink()
    (host.gen / "instances" / "tiny" / "notes.txt").write_text("hand edit\n")
    (host.gen / "verified.json").write_text("{}")  # a verdict is not covered by the manifest
    r = host.check()
    assert sorted(whats(r)) == ["file-missing", "file-unexpected"]


def test_changed_installed_unit(host: Host) -> None:
    (host.unit_dir / "llmfleet-vllm@.service").write_text(UNIT_TEXT + "Environment=X=1\n")
    assert whats(host.check()) == ["unit-changed"]
    (host.unit_dir / "llmfleet-vllm@.service").unlink()
    assert whats(host.check()) == ["unit-missing"]


def test_corrupted_model_file_same_size(host: Host) -> None:
    time.sleep(0.05)  # a change lands on a later clock tick than the marker
    data = bytearray(host.model_file.read_bytes())
    data[0] ^= 0xFF
    host.model_file.write_bytes(bytes(data))
    r = host.check()
    assert whats(r) == ["model-file-changed"]
    assert r["drift"][0]["path"] == str(host.model_file)
    # without hashing every file: it was written after the marker, so it is hashed and seen
    assert whats(host.check(hash_files=False)) == ["model-file-changed"]


def test_truncated_model_file_is_seen_without_hashing(host: Host) -> None:
    host.model_file.write_bytes(host.model_file.read_bytes()[:-1])
    r = host.check(hash_files=False)
    assert whats(r) == ["model-file-changed"]
    assert r["drift"][0]["found"]["size"] == r["drift"][0]["expected"]["size"] - 1


def test_missing_model_file(host: Host) -> None:
    host.model_file.unlink()
    assert whats(host.check()) == ["model-file-missing"]


def test_missing_store_marker(host: Host) -> None:
    marker = Path(host.plan["models"][host.inst["model"]]["store_path"]) / ".llmfleet-complete"
    marker.unlink()
    r = host.check()
    assert whats(r) == ["store-marker-missing"]
    assert r["drift"][0]["path"] == str(marker)


def test_changed_store_marker(host: Host) -> None:
    (Path(host.plan["runtime"]["store_path"]) / ".llmfleet-complete").write_text("{}")
    assert whats(host.check()) == ["store-marker-changed"]


def test_missing_store_path_is_one_entry(host: Host) -> None:
    shutil.rmtree(host.plan["models"][host.inst["model"]]["store_path"])
    r = host.check()
    assert whats(r) == ["store-path-missing"]


def test_missing_runtime_python(host: Host) -> None:
    (Path(host.plan["runtime"]["store_path"]) / "bin" / "python").unlink()
    assert whats(host.check()) == ["runtime-python-missing"]


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"id": "other-model"}, "instance-model-missing"),
        ({"max_model_len": 4096}, "instance-max-model-len"),
        ({"root": "/somewhere/else"}, "instance-model-root"),
    ],
)
def test_wrong_served_model(host: Host, change: dict[str, Any], what: str) -> None:
    _Models.doc["data"][0].update(change)
    r = host.check()
    assert whats(r) == [what]
    assert r["drift"][0]["instance"] == "tiny"


def test_unreachable_endpoint(host: Host) -> None:
    host.inst["url"] = "http://127.0.0.1:9"  # discard port: nothing listens
    plan = json.loads((host.gen / "plan.json").read_text())
    plan["instances"][0]["url"] = "http://127.0.0.1:9"
    (host.gen / "plan.json").write_text(json.dumps(plan))
    r = host.check(http_timeout=2)
    assert "instance-unreachable" in whats(r)
    assert sorted(whats(r)) == ["file-changed", "instance-unreachable"]  # plan.json was edited for the test


def test_stray_active_unit(host: Host) -> None:
    host.units["llmfleet-vllm@old.service"] = {"ActiveState": "active", "UnitFileState": "enabled", "MainPID": "77"}
    r = host.check()
    assert whats(r) == ["unit-stray"]
    assert r["drift"][0]["path"] == "llmfleet-vllm@old.service"


def test_inactive_instance_is_one_entry(host: Host) -> None:
    host.units[host.inst["unit"]] = {"ActiveState": "failed", "UnitFileState": "enabled", "MainPID": "0"}
    assert whats(host.check()) == ["instance-inactive"]


def test_disabled_instance(host: Host) -> None:
    host.units[host.inst["unit"]]["UnitFileState"] = "disabled"
    assert whats(host.check()) == ["instance-disabled"]


def test_process_runs_other_argv(host: Host) -> None:
    host.cmdlines[MAIN_PID] = [*host.inst["argv"][:-1], "--max-num-seqs", "1"]
    r = host.check()
    assert whats(r) == ["instance-argv"]
    assert r["drift"][0]["expected"] == host.inst["argv"]


def test_wrapper_process_whose_child_runs_argv_is_no_drift(host: Host) -> None:
    host.cmdlines[MAIN_PID] = ["/bin/sh", str(host.root / "current" / "instances" / "tiny" / "launch")]
    host.cmdlines[MAIN_PID + 1] = list(host.inst["argv"])
    host.children[MAIN_PID] = [MAIN_PID + 1]
    assert host.check()["drift"] == []


def test_current_pointing_outside_the_generations(host: Host) -> None:
    (host.root / "current").unlink()
    (host.root / "current").symlink_to("/tmp")
    r = host.check()
    assert whats(r) == ["current-invalid"] and r["generation"] is None


def test_current_pointing_at_a_missing_generation(host: Host) -> None:
    (host.root / "current").unlink()
    (host.root / "current").symlink_to("generations/0123456789abcdef01234567")
    assert whats(host.check()) == ["current-invalid"]


def test_current_pointing_at_another_generation(host: Host) -> None:
    """The host is consistent with the other generation: no module drift; the CLI names the generation."""
    other = "ffffffffffffffffffffffff"
    write_generation(host.root, host.plan, other)
    (host.root / "current").unlink()
    (host.root / "current").symlink_to(f"generations/{other}")
    r = host.check()
    assert r["generation"] == other and r["drift"] == []
    report = fleet_drift.host_report("lab1", r, host.generation, [])
    assert [d["what"] for d in report["drift"]] == ["generation"]
    assert report["drift"][0]["message"] == f"generation: planned {host.generation}, host runs {other}"


def test_generation_without_manifest(host: Host) -> None:
    (host.gen / "manifest.json").unlink()
    r = host.check()
    assert whats(r) == ["manifest-missing"] and r["generation"] is None


def test_nothing_deployed(host: Host) -> None:
    (host.root / "current").unlink()
    r = host.check()
    assert whats(r) == ["current-missing"] and r["generation"] is None


def test_root_missing_is_the_one_failure(tmp_path: Path) -> None:
    with pytest.raises(drift_module.RootUnreadable, match=r"/nope: does not exist"):
        drift_module.check_host(str(tmp_path / "nope"), str(tmp_path), drift_module.Probes())


def test_systemctl_unavailable_is_unchecked_not_drift(host: Host) -> None:
    host.systemctl_error = "systemctl show: No such file or directory"
    r = host.check()
    assert r["drift"] == []
    assert [u["what"] for u in r["unchecked"]] == ["unit-state", "units"]


# --- the real probes, over a fake /proc and a fake systemctl ------------------------------------


def test_probes_read_proc_and_systemctl(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "10" / "task" / "10").mkdir(parents=True)
    (proc / "10" / "cmdline").write_bytes(b"/bin/sh\0/x/launch\0")
    (proc / "10" / "task" / "10" / "children").write_text("11 12 ")
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = show ]; then printf "MainPID=10\\nActiveState=active\\nUnitFileState=enabled\\n"; exit 0; fi\n'
        'printf "llmfleet-vllm@a.service loaded active running a\\nllmfleet-vllm@b.service loaded inactive dead b\\n"\n'
    )
    systemctl.chmod(0o755)
    probes = drift_module.Probes(proc=str(proc), systemctl=str(systemctl))
    assert probes.cmdline(10) == ["/bin/sh", "/x/launch"]
    assert probes.cmdline(99) is None
    assert sorted(probes.children(10)) == [11, 12]
    assert probes.unit_state("llmfleet-vllm@a.service") == {"MainPID": "10", "ActiveState": "active", "UnitFileState": "enabled"}
    assert probes.active_units() == ["llmfleet-vllm@a.service"]
    with pytest.raises(drift_module.ProbeError, match="nonexistent-systemctl"):
        drift_module.Probes(systemctl="nonexistent-systemctl").unit_state("x")


def test_module_print_mode_without_ansible(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(MODULE_PATH), "--print", str(tmp_path / "absent")], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 1 and "absent: does not exist" in done.stderr and "Traceback" not in done.stderr


# --- the store, as module_utils/llmfleet_store checks it ---------------------------------------------


def test_a_file_the_pin_does_not_name_in_a_model_path(host: Host) -> None:
    extra = Path(host.plan["models"][host.inst["model"]]["store_path"]) / "extra.safetensors"
    extra.write_bytes(b"x")
    r = host.check(hash_files=False)
    assert whats(r) == ["store-file-unexpected"] and r["drift"][0]["path"] == str(extra)


def test_a_runtime_file_changed_after_completion(host: Host) -> None:
    time.sleep(0.05)
    python = Path(host.plan["runtime"]["store_path"]) / "bin" / "python"
    python.write_text("#!/bin/sh\n")  # same path, written after the marker
    r = host.check(hash_files=False)
    assert whats(r) == ["store-path-changed"]
    assert r["drift"][0]["found"] == ["bin/python"]


def test_damage_the_last_full_check_found_is_drift_until_the_path_is_replaced(host: Host) -> None:
    store = host.plan["models"][host.inst["model"]]["store_path"]
    problem = {"what": "model-file-changed", "path": str(host.model_file), "expected": "a", "found": "b", "message": "sha256 differs"}
    st = os.stat(store)
    record = {"schema": 1, "paths": {store: {"status": "damaged", "problems": [problem], "dir": [st.st_dev, st.st_ino], "time": "T"}}}
    (host.root / "store-check.json").write_text(json.dumps(record))
    r = host.check(hash_files=False)
    assert whats(r) == ["model-file-changed"] and "the full check of T found it" in r["drift"][0]["message"]
    assert host.check()["drift"] == []  # a full check hashes again: the files match their pins
    record["paths"][store]["dir"] = [st.st_dev, st.st_ino + 1]  # the path was rebuilt since
    (host.root / "store-check.json").write_text(json.dumps(record))
    assert host.check(hash_files=False)["drift"] == []


# --- API keys: as verify reads them (the fake vLLM of the verify tests) -----------------------------

KEY = "lab-key-0123456789abcdefghij"


def keyed(key_file: Path | None = None, env: str | None = None) -> Callable[[dict[str, Any]], None]:
    def edit(plan: dict[str, Any]) -> None:
        inst = plan["instances"][0]
        inst.update(api_key_required=True, api_key_file=str(key_file) if key_file else None)
        if env:
            inst["api_key_env"] = env

    return edit


@pytest.fixture
def fake_vllm() -> Any:
    sys.path.insert(0, str(REPO / "tests" / "unit" / "verify"))
    from fake_vllm import Behaviour, serve

    with serve(Behaviour(api_key=KEY, max_model_len=2048)) as (url, fake):
        yield int(url.rsplit(":", 1)[1]), fake


def keyed_host(tmp_path: Path, fake_vllm: Any, key_file_text: str | None, **kw: Any) -> Host:
    port, fake = fake_vllm
    key_file = tmp_path / "api-keys" / "tiny.env"
    if key_file_text is not None:
        key_file.parent.mkdir()
        key_file.write_text(key_file_text)
    host = Host(tmp_path, None, port=port, edit=kw.pop("edit", keyed(key_file)))
    fake.b.root = host.plan["models"][host.inst["model"]]["store_path"]
    return host


@pytest.mark.parametrize("text", [f"VLLM_API_KEY={KEY}\n", f"{KEY}\n"])
def test_an_instance_with_a_key_is_asked_with_it(tmp_path: Path, fake_vllm: Any, text: str) -> None:
    host = keyed_host(tmp_path, fake_vllm, text)
    r = host.check(hash_files=False)
    assert r["drift"] == [] and r["unchecked"] == []
    assert fake_vllm[1].state.authorizations[-1] == f"Bearer {KEY}"


def test_a_401_with_the_instance_s_key_is_drift(tmp_path: Path, fake_vllm: Any) -> None:
    host = keyed_host(tmp_path, fake_vllm, "VLLM_API_KEY=another-key-0123456789\n")
    r = host.check(hash_files=False)
    assert whats(r) == ["instance-api-key"] and "runs with another key" in r["drift"][0]["message"]


def test_a_401_from_an_instance_the_plan_gives_no_key_is_drift(tmp_path: Path, fake_vllm: Any) -> None:
    host = keyed_host(tmp_path, fake_vllm, None, edit=lambda plan: None)
    r = host.check(hash_files=False)
    assert whats(r) == ["instance-api-key"] and "the plan gives the instance none" in r["drift"][0]["message"]


def test_a_missing_key_file_is_drift(tmp_path: Path, fake_vllm: Any) -> None:
    host = keyed_host(tmp_path, fake_vllm, None)
    r = host.check(hash_files=False)
    assert whats(r) == ["instance-api-key-file"]
    assert fake_vllm[1].state.authorizations == []  # nothing was sent without the key


def test_a_key_the_check_cannot_read_is_a_configuration_error_not_drift(
    tmp_path: Path, fake_vllm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMFLEET_TEST_KEY", raising=False)
    host = keyed_host(tmp_path, fake_vllm, None, edit=keyed(None, env="LLMFLEET_TEST_KEY"))
    r = host.check(hash_files=False)
    assert r["drift"] == [] and [u["what"] for u in r["unchecked"]] == ["api-key"]
    assert "LLMFLEET_TEST_KEY" in r["unchecked"][0]["reason"] and "not drift" in r["unchecked"][0]["reason"]
    monkeypatch.setenv("LLMFLEET_TEST_KEY", KEY)  # the environment, as verify's --api-key-env
    assert host.check(hash_files=False)["drift"] == []
    env = fleet_drift.envelope({"lab1": {}}, {"lab1": {"generation": host.generation}}, [], {"lab1": {**r, "changed": False}})
    assert env["hosts"]["lab1"]["status"] == "error" and drift_cli.exit_code(env) == 1


# --- converged: the rollout's fast path ---------------------------------------------------------------


def expect(host: Host, **extra: Any) -> dict[str, Any]:
    return {"generation": host.generation, **extra}


def test_a_verified_host_without_drift_is_converged(host: Host) -> None:
    (host.gen / "verified.json").write_text("{}")
    assert drift_module.converged(str(host.root), host.check(hash_files=False), expect(host), host) == []


def test_reasons_a_host_is_not_converged(host: Host) -> None:
    r = host.check(hash_files=False)
    assert drift_module.converged(str(host.root), r, expect(host), host) == [f"generation {host.generation} has not passed verify"]
    (host.gen / "verified.json").write_text("{}")
    assert drift_module.converged(str(host.root), r, {"generation": "ffff0000ffff0000ffff0000"}, host)[0].startswith(
        f"runs generation {host.generation}, the plan is ffff"
    )
    (host.root / "pending-restart.json").write_text('["tiny"]\n')
    assert drift_module.converged(str(host.root), r, expect(host), host) == ["restarts are pending (pending-restart.json)"]
    (host.root / "pending-restart.json").unlink()
    host.units[host.inst["unit"]]["ActiveState"] = "failed"
    assert drift_module.converged(str(host.root), host.check(hash_files=False), expect(host), host) == ["1 drift (instance-inactive)"]
    host.units[host.inst["unit"]]["ActiveState"] = "active"
    why = drift_module.converged(str(host.root), r, expect(host, system_packages=["libnuma1"]), host)
    assert why == ["system packages not installed: libnuma1"]
    host.packages["libnuma1"] = "installed"
    assert drift_module.converged(str(host.root), r, expect(host, system_packages=["libnuma1"]), host) == []


def test_key_files_must_hold_the_inventory_s_keys(host: Host, tmp_path: Path) -> None:
    (host.gen / "verified.json").write_text("{}")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    (keys / "tiny.env").write_text(f"VLLM_API_KEY={KEY}\n")
    (keys / "tiny.env").chmod(0o600)
    r = host.check(hash_files=False)
    want = expect(host, api_key_dir=str(keys), api_key_sha256={"tiny": hashlib.sha256(KEY.encode()).hexdigest()})
    assert drift_module.converged(str(host.root), r, want, host) == []
    (keys / "tiny.env").chmod(0o644)
    assert drift_module.converged(str(host.root), r, want, host) == [f"API key of tiny: {keys}/tiny.env is not a root-owned 0600 file"]
    (keys / "tiny.env").chmod(0o600)
    # the key file of an instance this generation does not key belongs to a kept one: gc's, no reason
    (keys / "old.env").write_text("VLLM_API_KEY=x\n")
    assert drift_module.converged(str(host.root), r, want, host) == []
    want["api_key_sha256"]["tiny"] = hashlib.sha256(b"rotated-key").hexdigest()
    assert drift_module.converged(str(host.root), r, want, host) == [
        f"API key of tiny: {keys}/tiny.env holds another key than the inventory's"
    ]


def test_the_store_checker_and_its_timer_must_be_in_place(host: Host) -> None:
    (host.gen / "verified.json").write_text("{}")
    r = host.check(hash_files=False)
    script = REPO / "module_utils" / "llmfleet_store.py"
    want = expect(host, store_check_sha256=hashlib.sha256(script.read_bytes()).hexdigest())
    why = drift_module.converged(str(host.root), r, want, host)
    assert why == [f"{host.root}/tools/llmfleet_store.py is missing", "llmfleet-store-check.timer is inactive and not installed"]
    (host.root / "tools").mkdir()
    shutil.copy(script, host.root / "tools" / "llmfleet_store.py")
    host.units["llmfleet-store-check.timer"] = {"ActiveState": "active", "UnitFileState": "enabled", "MainPID": "0"}
    assert drift_module.converged(str(host.root), r, want, host) == []


def test_a_gpu_host_runs_the_pinned_driver(host: Host) -> None:
    driver = {"branch": "580", "distributions": {"ubuntu-24.04": {"version": "580.95.05-0ubuntu0.24.04.2"}}}
    files = {"/etc/os-release": 'ID=ubuntu\nVERSION_ID="24.04"\n', "/sys/module/nvidia/version": "580.95.05\n"}
    probes = _ProbesView(host)
    probes.read_text = files.get  # type: ignore[attr-defined]
    assert drift_module._driver(driver, probes) == []
    files["/sys/module/nvidia/version"] = "570.1\n"
    assert drift_module._driver(driver, probes) == ["NVIDIA driver 570.1, the plan pins 580.95.05"]
    files["/etc/os-release"] = "ID=debian\nVERSION_ID=12\n"
    assert drift_module._driver(driver, probes) == ["the plan pins no NVIDIA driver for debian-12"]


# --- the CLI: canned ansible results -------------------------------------------------------------

PLANNED = "0c28777deafdebb076eccef9"


def module_ok(generation: str | None = PLANNED, drift: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "changed": False,
        "generation": generation,
        "host": "lab1",
        "drift": drift or [],
        "unchecked": [],
        "checked": {"generation_files": 5, "store_paths": 2, "model_files": 6, "instances": 1, "units": 1},
    }


UNREACHABLE = {
    "changed": False,
    "unreachable": True,
    "msg": "Task failed: Failed to connect to the host via ssh: ssh: connect to host 10.213.0.12 port 22: No route to host",
}
FAILED = {"failed": True, "msg": "/var/lib/llmfleet: does not exist (the llmfleet root; is the host deployed?)"}


def test_read_tree(tmp_path: Path) -> None:
    (tmp_path / "lab1").write_text(json.dumps(module_ok()))
    (tmp_path / "lab2").write_text(json.dumps(UNREACHABLE))
    (tmp_path / "lab3").write_text("not json")
    res = fleet_drift.read_tree(tmp_path)
    assert res["lab1"]["generation"] == PLANNED and res["lab2"]["unreachable"] is True
    assert res["lab3"]["failed"] is True and "not JSON" in res["lab3"]["msg"]
    assert fleet_drift.read_tree(tmp_path / "none") == {}


def test_envelope_statuses() -> None:
    hosts: dict[str, Any] = {"a": {}, "b": {}, "c": {}, "d": {}, "e": {}}
    plans = {h: {"generation": PLANNED} for h in hosts}
    edited = {"what": "file-changed", "path": "/x/env", "expected": "1", "found": "2", "message": "/x/env changed"}
    results = {"a": module_ok(), "b": module_ok(drift=[edited]), "c": UNREACHABLE, "d": FAILED}
    env = fleet_drift.envelope(hosts, plans, [], results, "fatal: something\n")
    assert env["schema"] == "llmfleet.drift/1" and env["ok"] is False
    h = env["hosts"]
    assert h["a"]["status"] == "ok" and h["a"]["generation"] == {"planned": PLANNED, "running": PLANNED}
    assert h["b"]["status"] == "drift" and h["b"]["drift"] == [edited]
    assert h["c"]["status"] == "error" and h["c"]["error"].startswith("unreachable: Task failed: Failed to connect")
    assert h["d"]["status"] == "error" and h["d"]["error"] == f"llmfleet_drift failed: {FAILED['msg']}"
    assert h["e"]["status"] == "error" and h["e"]["error"] == "ansible gave no result for this host (fatal: something)"
    assert drift_cli.exit_code(env) == 1
    assert drift_cli.exit_code(fleet_drift.envelope({"a": {}, "b": {}}, plans, [], results)) == drift_cli.ExitCode.DRIFT == 3
    assert drift_cli.exit_code(fleet_drift.envelope({"a": {}}, plans, [], results)) == 0


def test_refused_plan_and_unchecked_probes() -> None:
    problem = Problem("a", "llmfleet_instances[0] (tiny).port", 80, "below 1024")
    env = fleet_drift.envelope({"a": {}}, {}, [problem], {"a": module_ok(generation="1234abcd1234abcd")})
    assert env["hosts"]["a"]["status"] == "refused" and env["hosts"]["a"]["generation"]["planned"] is None
    assert drift_cli.exit_code(env) == 2
    unchecked = {**module_ok(), "unchecked": [{"what": "units", "reason": "systemctl: not found"}]}
    env = fleet_drift.envelope({"a": {}}, {"a": {"generation": PLANNED}}, [], {"a": unchecked})
    assert env["hosts"]["a"]["status"] == "error" and "systemctl: not found" in env["hosts"]["a"]["error"]


def test_ansible_command() -> None:
    cmd = fleet_drift.ansible_command("inventory/lab", "lab1", "/tmp/t", hash_files=False, http_timeout=5)
    assert cmd[1:] == [
        "all",
        "-i",
        "inventory/lab",
        "-m",
        "llmfleet_drift",
        "-a",
        "root={{ llmfleet_root | default('/var/lib/llmfleet') }} mirror_dir={{ site_mirror_dir | default('/srv/llmfleet/mirror') }} "
        "hash_files=false http_timeout=5",
        "--tree",
        "/tmp/t",
        "--limit",
        "lab1",
    ]
    assert Path(cmd[0]).name == "ansible"


def canned(results: dict[str, Any], output: str = "") -> Any:
    def runner(inventory: str, limit: str | None, **kw: Any) -> tuple[dict[str, Any], str]:
        return results, output

    return runner


@pytest.fixture
def planned() -> dict[str, str]:
    hosts = load_inventory(REPO / "inventory" / "lab")
    lock = load_lock()
    return {h: evaluate_host(h, hosts[h], lock)["generation"] for h in hosts}


def test_cli_json_and_exit_codes(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], planned: dict[str, str]) -> None:
    edited = {"what": "unit-changed", "path": "/etc/systemd/system/llmfleet-vllm@.service", "expected": "a", "found": "b", "message": "m"}
    results = {"lab1": module_ok(planned["lab1"]), "lab2": module_ok("aaaaaaaaaaaaaaaaaaaaaaaa", [edited])}
    monkeypatch.setattr(fleet_drift, "run_ansible", canned(results))
    assert drift_cli.main(["-i", "inventory/lab", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["schema"] == "llmfleet.drift/1" and out["ok"] is False
    assert out["hosts"]["lab1"]["status"] == "ok"
    lab2 = out["hosts"]["lab2"]
    assert [d["what"] for d in lab2["drift"]] == ["generation", "unit-changed"]
    assert lab2["drift"][0]["message"] == f"generation: planned {planned['lab2']}, host runs aaaaaaaaaaaaaaaaaaaaaaaa"

    monkeypatch.setattr(fleet_drift, "run_ansible", canned({"lab1": module_ok(planned["lab1"])}))
    assert drift_cli.main(["-i", "inventory/lab", "-l", "lab1", "--json"]) == 0


def test_cli_says_what_it_checks_while_it_works(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], planned: dict[str, str]
) -> None:
    monkeypatch.setattr(fleet_drift, "run_ansible", canned({h: module_ok(planned[h]) for h in planned}))
    assert drift_cli.main(["-i", "inventory/lab", "-l", "lab1", "--json", "--no-hash"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "drift: checking the hosts of inventory/lab -l lab1 (sizes and change times of the store)…"
    assert err[-1].startswith("drift: checking the hosts of inventory/lab -l lab1 (sizes and change times of the store): done in ")


def test_cli_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], planned: dict[str, str]) -> None:
    edited = {"what": "file-changed", "path": "/var/lib/llmfleet/generations/x/instances/tiny/env", "message": "env changed"}
    results = {"lab1": module_ok(planned["lab1"]), "lab2": module_ok(planned["lab2"], [edited])}
    monkeypatch.setattr(fleet_drift, "run_ansible", canned(results))
    assert drift_cli.main(["-i", "inventory/lab"]) == 3
    out = capsys.readouterr().out
    assert f"OK lab1: runs generation {planned['lab1']} as planned, no drift" in out
    assert "file-changed" in out and "instances/tiny/env" in out and "1 drift" in out

    monkeypatch.setattr(fleet_drift, "run_ansible", canned({"lab1": UNREACHABLE}))
    assert drift_cli.main(["-i", "inventory/lab", "-l", "lab1"]) == 1
    captured = capsys.readouterr()
    assert "ERROR lab1: could not check: unreachable" in captured.out
    assert "error: lab1: unreachable" in captured.err and "Traceback" not in captured.err


def drift_tool(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "drift.py"), *args], capture_output=True, text=True, timeout=180, cwd=REPO, env=env
    )


def test_cli_bad_arguments_give_messages_not_tracebacks(tmp_path: Path) -> None:
    r = drift_tool()
    assert r.returncode == 2 and "-i/--inventory" in r.stderr and "Traceback" not in r.stderr
    r = drift_tool("-i", str(tmp_path / "nope"))
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = drift_tool("-i", "inventory/lab", "-l", "nohost")
    assert r.returncode == 1 and "matches no host" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs a python3 for the module")
def test_end_to_end_through_ansible_on_localhost(tmp_path: Path, server: ThreadingHTTPServer, request: pytest.FixtureRequest) -> None:
    """The real ad-hoc command and --tree parsing: localhost over the local connection, a host tree in
    tmp_path, a fake systemctl on PATH that says the instance is stopped (drift) and lists no units."""
    # the CLI plans the inventory on this machine: its root must be one the evaluator takes (under /var/lib)
    if os.geteuid() != 0 or not os.access("/var/lib", os.W_OK):
        pytest.skip("needs root: the host tree of this test lives under /var/lib")
    root = Path("/var/lib") / f"llmfleet-drift-test-{os.getpid()}-{tmp_path.name}"
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    host = Host(tmp_path, server, root)
    inv = tmp_path / "inv"
    (inv / "host_vars").mkdir(parents=True)
    lab1 = load_inventory(REPO / "inventory" / "lab", "lab1")["lab1"]
    lab1["llmfleet_root"] = str(host.root)
    lab1["llmfleet_instances"][0]["port"] = server.server_address[1]
    (inv / "hosts.yml").write_text(
        f"all:\n  hosts:\n    lab1:\n      ansible_connection: local\n      ansible_python_interpreter: {shutil.which('python3')}\n"
    )
    (inv / "host_vars" / "lab1.yml").write_text(json.dumps(lab1))  # every llmfleet_* variable, group ones included
    # the CLI keeps the module's default unit_dir (this machine's /etc/systemd/system, without our unit):
    # what this test checks is the plumbing, so the unit entry may be there or not
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "systemctl").write_text(
        '#!/bin/sh\nif [ "$1" = show ]; then printf "MainPID=0\\nActiveState=inactive\\nUnitFileState=enabled\\n"; fi\nexit 0\n'
    )
    (bindir / "systemctl").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    r = drift_tool("-i", str(inv), "--json", "--no-hash", env=env)
    assert "Traceback" not in r.stderr, r.stderr
    out = json.loads(r.stdout)
    lab1_out = out["hosts"]["lab1"]
    assert lab1_out["generation"]["running"] == host.generation == lab1_out["generation"]["planned"], lab1_out
    whats_found = [d["what"] for d in lab1_out["drift"]]
    assert "instance-inactive" in whats_found
    assert set(whats_found) <= {"instance-inactive", "unit-missing", "unit-changed"}
    assert r.returncode == 3


# --- the site mirror ---------------------------------------------------------------------------


def test_a_mirror_blob_whose_content_is_not_its_name_is_drift_and_what_it_holds_is_reported(host: Host, tmp_path: Path) -> None:
    mirror_dir = tmp_path / "srv" / "mirror"
    (mirror_dir / "sha256").mkdir(parents=True)
    good, bad = b"weights", b"rotten"
    (mirror_dir / "sha256" / sha(good)).write_bytes(good)
    (mirror_dir / "sha256" / sha(b"what it was")).write_bytes(bad)
    (mirror_dir / "sha256" / f"{'a' * 64}.part").write_bytes(b"in flight")
    plan = json.loads((host.gen / "plan.json").read_text())
    plan["site"] = {"name": "site-a", "mirror": {"host": plan["host"], "url": "http://x:8090"}, "wheels": []}
    (host.gen / "plan.json").write_text(json.dumps(plan))
    manifest = json.loads((host.gen / "manifest.json").read_text())
    manifest["files"]["plan.json"] = sha((host.gen / "plan.json").read_bytes())
    (host.gen / "manifest.json").write_text(json.dumps(manifest))
    doc = host.check(mirror_dir=str(mirror_dir))
    assert [(d["what"], d["expected"]) for d in doc["drift"]] == [("mirror-blob-corrupt", sha(b"what it was"))]
    assert doc["mirror"]["blobs"] == {sha(good): len(good), sha(b"what it was"): len(bad)}
    sizes_only = host.check(mirror_dir=str(mirror_dir), hash_files=False)
    assert sizes_only["drift"] == []
    # the control node: what the site's plans use and the mirror lacks
    plans = {"h1": {**plan, "site": {**plan["site"], "wheels": [{"filename": "w.whl", "sha256": sha(good), "size": len(good)}]}}}
    lacking = fleet_drift.mirror_drift(plans, {plan["host"]: doc})[plan["host"]]
    need = {f["sha256"] for m in plan["models"].values() for f in m["files"]} | {sha(good)}
    assert lacking["mirror"] == {"blobs": 2, "needed": len(need), "missing": len(need) - 1, "unused": 1, "bytes": len(good) + len(bad)}
    assert lacking["drift"][0]["what"] == "mirror-blob-missing"


def test_a_host_that_is_not_its_sites_mirror_reports_no_mirror(host: Host, tmp_path: Path) -> None:
    assert "mirror" not in host.check(mirror_dir=str(tmp_path / "nowhere"))


def test_an_instance_drop_in_is_checked_like_the_unit(host: Host) -> None:
    """Each instance's drop-in (its key file, devices, limits) is the generation's, as the template is."""
    name = f"{host.inst['unit']}.d"
    ours = host.gen / "units" / name / "llmfleet.conf"
    ours.parent.mkdir()
    ours.write_text("[Service]\nTasksMax=4096\n")
    manifest = json.loads((host.gen / "manifest.json").read_text())
    manifest["files"][f"units/{name}/llmfleet.conf"] = sha(ours.read_bytes())
    (host.gen / "manifest.json").write_text(json.dumps(manifest))
    assert [d["what"] for d in host.check()["drift"]] == ["unit-missing"]
    installed = host.unit_dir / name / "llmfleet.conf"
    installed.parent.mkdir()
    installed.write_text("[Service]\nTasksMax=4096\nDeviceAllow=/dev/nvidia-uvm-tools rw\n")
    assert [(d["what"], d["path"]) for d in host.check()["drift"]] == [("unit-changed", str(installed))]
    installed.write_text(ours.read_text())
    assert host.check()["drift"] == []
