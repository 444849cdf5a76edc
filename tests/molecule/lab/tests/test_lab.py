"""The contract of a converged lab host, checked on the host itself (testinfra).

Each host is compared with the plan the evaluator computes on the control node from the same
inventory and pins: what runs must be exactly that generation.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402

ROOT = "/var/lib/llmfleet"
#: the lab's exposure ceiling (docs/architecture.md; the GPU unit is scored offline in tests/unit/test_service_hardening.py)
MAX_EXPOSURE = 1.5
# LLMFLEET_TEST_INVENTORY points the checks at another lab inventory (a private copy with other hosts)
_INVENTORY = load_inventory(os.environ.get("LLMFLEET_TEST_INVENTORY") or REPO / "inventory" / "lab")
# tools/lab.py writes an ssh_config for the lab hosts (testinfra does not template inventory vars)
_LAB_DIR = Path(os.environ.get("LLMFLEET_LAB_DIR") or REPO / ".lab")
testinfra_hosts = [f"ssh://{name}?ssh_config={_LAB_DIR / 'ssh_config'}" for name in sorted(_INVENTORY)]
_LOCK = load_lock()


@pytest.fixture(scope="module")
def plan(host: Any) -> dict[str, Any]:
    name = host.backend.get_hostname()
    return evaluate_host(name, _INVENTORY[name], _LOCK)


@pytest.fixture(autouse=True)
def journal_on_failure(request: pytest.FixtureRequest, host: Any) -> Any:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        out = host.run("journalctl -u 'llmfleet-vllm@*' -n 80 --no-pager")
        print(f"--- journal of {host.backend.get_hostname()} ---\n{out.stdout}")


def test_current_is_the_planned_generation(host: Any, plan: dict[str, Any]) -> None:
    current = host.file(f"{ROOT}/current")
    assert current.is_symlink
    assert current.linked_to == f"{ROOT}/generations/{plan['generation']}"
    deployed = json.loads(host.file(f"{ROOT}/current/plan.json").content_string)
    assert deployed["generation"] == plan["generation"]


def test_manifest_seals_what_the_generation_holds(host: Any, plan: dict[str, Any]) -> None:
    """Not only present: the manifest names the planned generation and host, the plan's instances
    with their content hashes, the plan's store paths with the sha256 of each completion marker, and
    every file of the generation (docs/architecture.md) with the sha256 it has on the host."""
    gen_dir = f"{ROOT}/generations/{plan['generation']}"
    manifest = json.loads(host.file(f"{gen_dir}/manifest.json").content_string)
    assert (manifest["generation"], manifest["host"]) == (plan["generation"], plan["host"])
    assert manifest["instances"] == {i["name"]: i["content_hash"] for i in plan["instances"]}
    store = {plan["runtime"]["store_path"]} | {m["store_path"] for m in plan["models"].values()}
    assert {e["path"] for e in manifest["store_paths"]} == store
    for entry in manifest["store_paths"]:
        assert entry["marker_sha256"] == host.file(f"{entry['path']}/.llmfleet-complete").sha256sum, entry["path"]
    files = {"plan.json", "units/llmfleet-vllm@.service"}
    files |= {f"instances/{i['name']}/{name}" for i in plan["instances"] for name in ("env", "argv.json", "launch")}
    files |= {f"units/{i['unit']}.d/llmfleet.conf" for i in plan["instances"]}  # each instance's drop-in
    on_disk = set(host.check_output(f"cd {gen_dir} && find . -type f ! -name '.*' -printf '%P\\n'").split())
    assert on_disk - {"manifest.json", "verified.json"} == files, on_disk
    assert set(manifest["files"]) == files
    for rel, digest in manifest["files"].items():
        assert digest == host.file(f"{gen_dir}/{rel}").sha256sum, rel


def test_units_active_enabled_and_listening(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        svc = host.service(inst["unit"])
        assert svc.is_running, inst["unit"]
        assert svc.is_enabled, inst["unit"]
        assert host.socket(f"tcp://{inst['bind']}:{inst['port']}").is_listening
        health = host.run(f"curl -fsS -o /dev/null -w '%{{http_code}}' {inst['url']}/health")
        assert health.stdout == "200"


def test_api_bound_as_planned(host: Any, plan: dict[str, Any]) -> None:
    """Loopback unless the inventory exposes it; never on every address."""
    for inst in plan["instances"]:
        assert host.socket(f"tcp://{inst['bind']}:{inst['port']}").is_listening
        if inst["bind"] not in ("0.0.0.0", "::"):
            assert not host.socket(f"tcp://0.0.0.0:{inst['port']}").is_listening
        if not inst["exposed"]:
            assert inst["bind"] == "127.0.0.1"


def _key(host: Any, inst: dict[str, Any]) -> str:
    line = host.check_output(f"cat {inst['api_key_file']}")
    assert line.startswith("VLLM_API_KEY=")
    return str(line.split("=", 1)[1].strip())


def test_exposed_api_needs_the_key(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        if not inst["exposed"]:
            continue
        assert inst["api_key_required"]
        url = f"{inst['url']}/v1/models"
        anonymous = host.run(f"curl -sS -o /dev/null -w '%{{http_code}}' {url}")
        assert anonymous.stdout == "401", "an exposed instance answered without its API key"
        wrong = host.run(f"curl -sS -o /dev/null -w '%{{http_code}}' -H 'Authorization: Bearer not-the-key' {url}")
        assert wrong.stdout == "401"
        # the key goes through a root-only file into curl's config, never into a command line
        key_to_header = r"""sed -n 's/^VLLM_API_KEY=\(.*\)$/header = "Authorization: Bearer \1"/p' """ + inst["api_key_file"]
        ok = host.run(f"umask 077; f=$(mktemp); {key_to_header} > $f; curl -sS -o /dev/null -w '%{{http_code}}' -K $f {url}; rm -f $f")
        assert ok.stdout == "200", ok.stderr


def test_api_key_file_root_only(host: Any, plan: dict[str, Any]) -> None:
    keyed = [inst for inst in plan["instances"] if inst["api_key_required"]]
    d = host.file(plan["service"]["api_key_dir"])
    assert d.is_directory and d.user == "root" and d.group == "root" and d.mode == 0o700
    for inst in keyed:
        f = host.file(inst["api_key_file"])
        assert f.user == "root" and f.group == "root" and f.mode == 0o600, inst["api_key_file"]
        assert len(_key(host, inst)) >= 16
    # a key stays while a generation kept on the host needs it (gc removes it with the last): on this
    # lab's fresh hosts, every one that exists
    files = host.run(f"ls {plan['service']['api_key_dir']}").stdout.split()
    assert sorted(files) == sorted(f"{inst['name']}.env" for inst in keyed), "a key file no generation needs"


def test_api_key_nowhere_else(host: Any, plan: dict[str, Any]) -> None:
    """Not in any process's argv (ps), the journal, the plan or any world-readable file."""
    for inst in [i for i in plan["instances"] if i["api_key_required"]]:
        key = _key(host, inst)
        # grep -F -f: the key is read from the root-only file, so it is on no command line here either
        src = inst["api_key_file"]
        pat = "$(mktemp)"
        probe = (
            f"p={pat}; sed -n 's/^VLLM_API_KEY=//p' {src} > $p; "
            "echo ps:$(ps -eo args | grep -cF -f $p); "
            "echo proc:$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -cF -f $p); "
            "echo journal:$(journalctl --no-pager -o cat | grep -cF -f $p); "
            f"echo plan:$(grep -lF -f $p {ROOT}/current/plan.json {ROOT}/current/instances/*/* | wc -l); "
            "echo world:$(find /etc /var/lib/llmfleet /run /tmp /var/tmp -xdev -type f -perm -o=r -size -2M "
            "-exec grep -lF -f $p {} + 2>/dev/null | wc -l); rm -f $p"
        )
        out = host.check_output(probe)
        counts = dict(line.split(":", 1) for line in out.split())
        assert counts == {"ps": "0", "proc": "0", "journal": "0", "plan": "0", "world": "0"}, counts
        assert key not in json.dumps(plan)


def test_exposure_score(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        out = host.run(f"systemd-analyze security --no-pager {inst['unit']}")
        assert out.rc == 0, out.stderr
        m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
        assert m, out.stdout
        score = float(m.group(1))
        print(f"{host.backend.get_hostname()} {inst['unit']}: systemd-analyze security exposure {score}")
        assert score <= MAX_EXPOSURE, out.stdout


def _props(host: Any, unit: str, *names: str) -> dict[str, str]:
    out = host.check_output(f"systemctl show {unit} " + " ".join(f"-p {n}" for n in names))
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_hardening_properties(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        p = _props(
            host,
            inst["unit"],
            "User",
            "ProtectSystem",
            "ProtectHome",
            "NoNewPrivileges",
            "PrivateTmp",
            "PrivateDevices",
            "ProtectKernelTunables",
            "ProtectKernelModules",
            "ProtectControlGroups",
            "RestrictSUIDSGID",
            "CapabilityBoundingSet",
            "LimitNOFILE",
            "UMask",
            "PrivateUsers",
            "ProtectProc",
            "RestrictNamespaces",
            "LockPersonality",
            "SystemCallArchitectures",
            "ReadOnlyPaths",
            "EnvironmentFiles",
            "DynamicUser",
            "DeviceAllow",
        )
        assert p["DynamicUser"] == "yes" and p["User"] == inst["user"] == f"llmfleet-{inst['name']}"
        assert p["ProtectSystem"] == "strict"
        assert p["ProtectHome"] in ("yes", "read-only", "tmpfs")
        for flag in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
                     "ProtectKernelModules", "ProtectControlGroups", "RestrictSUIDSGID"):
            assert p[flag] == "yes", flag
        assert p["CapabilityBoundingSet"] == ""
        assert p["LimitNOFILE"] == "20000"
        assert p["UMask"] == "0077"
        assert p["PrivateUsers"] == "yes" and p["ProtectProc"] == "invisible" and p["LockPersonality"] == "yes"
        assert p["RestrictNamespaces"] == "yes" and p["SystemCallArchitectures"] == "native"
        assert f"{ROOT}/store" in p["ReadOnlyPaths"].split()
        if inst["api_key_required"]:  # required: a missing key file stops the start
            assert f"{inst['api_key_file']} (ignore_errors=no)" in p["EnvironmentFiles"], p["EnvironmentFiles"]
        else:
            assert plan["service"]["api_key_dir"] not in p["EnvironmentFiles"]
        assert "nvidia" not in p["DeviceAllow"]  # a CPU instance opens no GPU (ProtectClock= adds char-rtc only)
        uid = _uid(host, inst)
        assert DYNAMIC_UIDS[0] <= uid <= DYNAMIC_UIDS[1], f"{inst['unit']} runs as uid {uid}, not a dynamic user of its own"


#: the range systemd allocates DynamicUser= uids from (systemd.exec(5))
DYNAMIC_UIDS = (61184, 65519)


def _uid(host: Any, inst: dict[str, Any]) -> int:
    pid = host.check_output(f"systemctl show -p MainPID --value {inst['unit']}")
    assert pid != "0", f"{inst['unit']} has no main process"
    return int(host.check_output(f"awk '/^Uid:/ {{print $2}}' /proc/{pid}/status"))


def test_limits_where_vllm_tolerates_them(host: Any, plan: dict[str, Any]) -> None:
    """The drop-in's limits are the plan's, and vLLM runs inside them (memory and tasks measured here
    where the lab host's systemd has the memory and pids controllers: on a control node with the
    hybrid cgroup layout, v1 controllers, the container's systemd gets none, accounts nothing and
    enforces no limit; the test then says so and checks the configuration only)."""
    for inst in plan["instances"]:
        sandbox = inst["sandbox"]
        p = _props(host, inst["unit"], "MemoryMax", "MemoryCurrent", "TasksMax", "TasksCurrent", "IPAddressDeny")
        assert int(p["TasksMax"]) == sandbox["tasks_max"] and int(p["MemoryMax"]) == sandbox["memory_max"]
        assert ("ip_address_allow" in sandbox) == bool(p["IPAddressDeny"])
        name = f"{host.backend.get_hostname()} {inst['unit']}"
        controllers = host.run("cat /sys/fs/cgroup/cgroup.controllers").stdout.split()
        if not {"memory", "pids"} <= set(controllers):
            print(f"{name}: limits configured (MemoryMax {sandbox['memory_max'] >> 20} MiB, TasksMax {p['TasksMax']}); not measured: "
                  f"this host's systemd has no memory/pids controller (cgroup2 controllers: {controllers or 'none'})")  # fmt: skip
            continue
        assert int(p["TasksCurrent"]) < sandbox["tasks_max"] and int(p["MemoryCurrent"]) < sandbox["memory_max"]
        cgroup = host.check_output(f"systemctl show -p ControlGroup --value {inst['unit']}")
        peak = host.run(f"cat '/sys/fs/cgroup{cgroup}/memory.peak'").stdout.strip()
        print(
            f"{name}: memory {int(p['MemoryCurrent']) >> 20} MiB now, peak {int(peak) >> 20 if peak else '?'} MiB, MemoryMax"
            f" {sandbox['memory_max'] >> 20} MiB; tasks {p['TasksCurrent']} of {p['TasksMax']}; IPAddressDeny={p['IPAddressDeny'] or '-'}"
        )


def test_store_read_only_and_weights_not_writable_by_service_user(host: Any, plan: dict[str, Any]) -> None:
    paths = [plan["runtime"]["store_path"]] + [m["store_path"] for m in plan["models"].values()]
    for path in paths:
        d = host.file(path)
        assert d.is_directory and d.user == "root"
        assert d.mode & 0o022 == 0, f"{path} is writable by group or others"
        assert host.file(f"{path}/.llmfleet-complete").exists
        # no partial build left behind
        assert not host.file(f"{path}.partial").exists
    for model in plan["models"].values():
        for f in model["files"]:
            fp = host.file(f"{model['store_path']}/{f['path']}")
            assert fp.sha256sum == f["sha256"] and fp.size == f["size"]
            assert fp.mode & 0o022 == 0 and fp.mode & 0o004
        for inst in plan["instances"]:  # as the instance's own (dynamic) user
            uid = _uid(host, inst)
            as_user = f"setpriv --reuid={uid} --regid={uid} --clear-groups --"
            probe = host.run(f"{as_user} touch {model['store_path']}/probe")
            assert probe.rc != 0, "the service user could write into its weights"
            probe = host.run(f"{as_user} sh -c 'echo x >> {model['store_path']}/config.json'")
            assert probe.rc != 0, "the service user could modify a weight file"
            assert host.run(f"{as_user} cat {model['store_path']}/config.json").rc == 0, "the service user cannot read its weights"


def test_launch_matches_plan_argv(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        argv = json.loads(host.file(f"{ROOT}/current/instances/{inst['name']}/argv.json").content_string)
        assert argv == inst["argv"]
        pid = host.check_output(f"systemctl show -p MainPID --value {inst['unit']}")
        cmdline = host.file(f"/proc/{pid}/cmdline").content.split(b"\0")
        assert [c.decode() for c in cmdline if c] == inst["argv"]


def test_environment_file_is_not_world_readable(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        env = host.file(f"{ROOT}/current/instances/{inst['name']}/env")
        assert env.user == "root" and env.mode & 0o007 == 0


def test_verify_result_recorded_and_passed(host: Any, plan: dict[str, Any]) -> None:
    for inst in plan["instances"]:
        f = host.file(f"{ROOT}/verify/{plan['generation']}/{inst['name']}.json")
        assert f.exists, "verify did not record a result for this generation"
        result = json.loads(f.content_string)
        assert result["ok"] is True and result["exit_code"] == 0


def test_verify_textfile_for_node_exporter(host: Any, plan: dict[str, Any]) -> None:
    # vllm_verify_textfile_dir's default (Debian's prometheus-node-exporter collector directory)
    for inst in plan["instances"]:
        f = host.file(f"/var/lib/prometheus/node-exporter/llmfleet_verify_{inst['name']}.prom")
        assert f.exists and f.user == "root" and f.mode == 0o644
        assert f'llmfleet_verify_exit_code{{llmfleet_instance="{inst["name"]}"' in f.content_string
        # written to a temporary name and renamed: none left behind
        assert host.run("find /var/lib/prometheus/node-exporter -name '.*' -type f").stdout == ""


def _drift(host_name: str) -> tuple[int, dict[str, Any]]:
    """tools/drift.py from the control node, this host only, sizes of the weights only (the point here is the API)."""
    import subprocess

    inventory = os.environ.get("LLMFLEET_TEST_INVENTORY") or str(REPO / "inventory" / "lab")
    argv = [sys.executable, str(REPO / "tools" / "drift.py"), "-i", inventory, "-l", host_name, "--json", "--no-hash"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    return done.returncode, json.loads(done.stdout)


def test_drift_asks_a_keyed_instance_with_its_key_and_a_401_with_it_is_drift(host: Any, plan: dict[str, Any]) -> None:
    keyed = [inst for inst in plan["instances"] if inst["api_key_required"]]
    if not keyed:
        pytest.skip("no instance of this host has an API key")
    name = host.backend.get_hostname()
    rc, doc = _drift(name)
    assert rc == 0 and doc["hosts"][name]["status"] == "ok", doc["hosts"][name]
    # another key in the file than the one the running vLLM read at start: the server refuses it
    key_file = keyed[0]["api_key_file"]
    host.check_output(f"cp -p {key_file} {key_file}.orig && printf 'VLLM_API_KEY=llmfleet-test-not-the-served-key\\n' > {key_file}")
    try:
        rc, doc = _drift(name)
    finally:
        host.check_output(f"mv -f {key_file}.orig {key_file}")
    assert rc == 3, doc["hosts"][name]
    assert [d["what"] for d in doc["hosts"][name]["drift"]] == ["instance-api-key"], doc["hosts"][name]
    assert _drift(name)[0] == 0


def test_a_keyed_instance_does_not_start_without_its_key(host: Any, plan: dict[str, Any]) -> None:
    """Last (it restarts the instance): with its key file gone the unit fails before vLLM runs, and
    starts again once the key is back."""
    for inst in [i for i in plan["instances"] if i["api_key_required"]]:
        unit, key = inst["unit"], inst["api_key_file"]
        try:
            host.check_output(f"systemctl stop {unit} && mv {key} {key}.away")
            started = host.run(f"systemctl start {unit}")
            state = _props(host, unit, "ActiveState", "SubState")
            journal = host.run(f"journalctl -u {unit} -n 20 --no-pager -o cat").stdout
            # failed, or waiting to try again (Restart=always): never running
            down = state["ActiveState"] in ("failed", "inactive") or state["SubState"] == "auto-restart"
            assert started.rc != 0 and down, (started.rc, state)
            assert "Failed to load environment files" in journal or "environment" in journal.lower(), journal
            assert not host.socket(f"tcp://{inst['bind']}:{inst['port']}").is_listening
        finally:
            host.run(f"mv {key}.away {key}; systemctl reset-failed {unit}; systemctl start {unit}")
        health = host.run(f"for i in $(seq 120); do curl -fsS -o /dev/null {inst['url']}/health && echo up && break; sleep 2; done")
        assert health.stdout.strip() == "up", "the instance did not come back with its key"
