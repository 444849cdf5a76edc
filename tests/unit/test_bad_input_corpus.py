"""Every broken input of tests/corpus/bad_inputs.yml is refused on the control node, before any host
is touched, with a message that names the place, the value and what would be valid, and no traceback.

Each case runs through the real entry point an operator uses (``tools/plan.py``'s main, on an
inventory written to disk; ``tools/verify.py``'s main), in process: an exception escaping it is a
traceback and fails the case. Kinds:

* ``spec``: the lab host ``lab1`` with ``host_vars`` set (null removes a variable), ``instance``
  merged into its first instance, or ``instances`` replacing them; planned with ``--strict``.
* ``inventory``: ``files`` written into an empty inventory directory; ``args`` for plan.py
  (``{inv}`` is that directory).
* ``pins``: ``lock`` edits of pins/lock.json (``a/b/0/c`` path → value, ``__delete__`` removes);
  the lab inventory planned against it with ``--strict``.
* ``verify``: ``plan`` edits of lab1's plan (same form), written to ``{plan}``; ``args`` for verify.
* ``cli``: ``tool`` (plan or verify) with ``args``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet.cli import plan as plan_cli  # noqa: E402
from llmfleet.cli.common import ExitCode  # noqa: E402
from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import DEFAULT_LOCK, load_lock  # noqa: E402
from llmfleet.plan import evaluate_host  # noqa: E402
from llmfleet.verify import cli as verify_cli  # noqa: E402

CORPUS = REPO / "tests" / "corpus" / "bad_inputs.yml"
CASES: list[dict[str, Any]] = yaml.safe_load(CORPUS.read_text())
KINDS = ("spec", "inventory", "pins", "verify", "cli")
DELETE = "__delete__"
#: expectations too common to show anything: every error message may hold them
BARE_WORDS = frozenset({"not", "no", "error", "invalid", "cannot", "failed", "bad", "wrong", "usage", "must", "is"})


def _edit(data: Any, edits: dict[str, Any]) -> Any:
    data = copy.deepcopy(data)
    for path, value in edits.items():
        parts = path.split("/")
        node = data
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last: Any = int(parts[-1]) if isinstance(node, list) else parts[-1]
        if value == DELETE:
            del node[last]
        else:
            node[last] = value
    return data


def _lab1_vars() -> dict[str, Any]:
    return yaml.safe_load((REPO / "inventory" / "lab" / "host_vars" / "lab1.yml").read_text())


def _run(main: Any, argv: list[str]) -> tuple[int, str]:
    """Call a CLI's main in process; return its exit code and everything it printed."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
    return int(code), out.getvalue() + err.getvalue()


def run_case(case: dict[str, Any], tmp: Path) -> tuple[int, str]:
    kind = case["kind"]
    if kind == "spec":
        inv = tmp / "inv"
        shutil.copytree(REPO / "inventory" / "lab", inv)
        (inv / "host_vars" / "lab2.yml").unlink()
        (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lab": {"hosts": {"lab1": {"ansible_host": "10.213.0.11"}}}}}}))
        host_vars = _lab1_vars()
        if "instance" in case:
            inst = host_vars["llmfleet_instances"][0]
            for k, v in case["instance"].items():
                if v is None:
                    inst.pop(k, None)
                else:
                    inst[k] = v
        if "instances" in case:
            host_vars["llmfleet_instances"] = case["instances"]
        for k, v in (case.get("host_vars") or {}).items():
            if v is None:
                host_vars.pop(k, None)
            else:
                host_vars[k] = v
        if case.get("group_vars") is not None:
            (inv / "group_vars" / "all.yml").write_text(yaml.safe_dump(case["group_vars"]))
        (inv / "host_vars" / "lab1.yml").write_text(yaml.safe_dump(host_vars, sort_keys=False))
        return _run(plan_cli.main, ["-i", str(inv), "--strict", *case.get("args", [])])
    if kind == "inventory":
        inv = tmp / "inv"
        inv.mkdir()
        for name, text in (case.get("files") or {}).items():
            (inv / name).parent.mkdir(parents=True, exist_ok=True)
            (inv / name).write_text(text)
        args = [a.replace("{inv}", str(inv)) for a in case.get("args", ["-i", "{inv}", "--strict"])]
        return _run(plan_cli.main, args)
    if kind == "pins":
        lock = _edit(json.loads(DEFAULT_LOCK.read_text()), case["lock"])
        path = tmp / "lock.json"
        path.write_text(json.dumps(lock))
        return _run(plan_cli.main, ["-i", str(REPO / "inventory" / "lab"), "-l", "lab1", "--strict", "--lock", str(path)])
    if kind == "verify":
        hosts = load_inventory(REPO / "inventory" / "lab", "lab1")
        plan = _edit(evaluate_host("lab1", hosts["lab1"], load_lock()), case.get("plan") or {})
        path = tmp / "plan.json"
        path.write_text(case["plan_text"] if "plan_text" in case else json.dumps(plan))
        args = [a.replace("{plan}", str(path)).replace("{tmp}", str(tmp)) for a in case["args"]]
        return _run(verify_cli.main, [*args, "--no-progress", "--ready-timeout", "0"])
    if kind == "cli":
        main = {"plan": plan_cli.main, "verify": verify_cli.main}[case["tool"]]
        args = [a.replace("{repo}", str(REPO)).replace("{tmp}", str(tmp)) for a in case["args"]]
        return _run(main, args)
    raise AssertionError(f"case {case['id']}: unknown kind {kind!r} (one of {', '.join(KINDS)})")


def test_corpus_is_large_and_well_formed(capsys: pytest.CaptureFixture[str]) -> None:
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    by_kind = {k: sum(1 for c in CASES if c["kind"] == k) for k in KINDS}
    with capsys.disabled():  # shown in every run, not only with -s
        print(f"\nbad-input corpus: {len(CASES)} cases ({', '.join(f'{k} {n}' for k, n in by_kind.items())})")
    assert len(CASES) >= 40
    assert all(by_kind.values()), by_kind
    for c in CASES:
        assert c["kind"] in KINDS and c["exit"] in ExitCode.__members__ and c["expect"], c["id"]
        # a word any error message holds proves nothing ("cannot" holds "not")
        bare = [w for w in c["expect"] if w.strip().lower() in BARE_WORDS]
        assert not bare, f"{c['id']}: expect {bare} would match any error; name the place, the value and what is valid"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_is_refused_clearly(case: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMFLEET_LOCK", raising=False)
    for k, v in (case.get("env") or {}).items():
        monkeypatch.setenv(k, v)
    code, text = run_case(case, tmp_path)
    assert "Traceback" not in text, text
    assert code == ExitCode[case["exit"]], f"exit {code}, expected {case['exit']} ({int(ExitCode[case['exit']])}):\n{text}"
    missing = [w for w in case["expect"] if w.lower() not in text.lower()]
    assert not missing, f"the message does not name {missing}:\n{text}"


def test_deploy_refuses_before_any_host_is_touched(tmp_path: Path) -> None:
    """site.yml on a host that cannot be reached (TEST-NET-1): the validate play refuses the spec on
    the control node, names the place, the value and what is valid, and no host is contacted."""
    import subprocess

    inv = tmp_path / "inv"
    (inv / "host_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text(yaml.safe_dump({"all": {"children": {"lab": {"hosts": {"edge-x": {"ansible_host": "192.0.2.1"}}}}}}))
    host_vars = _lab1_vars() | {"llmfleet_hardware": "lab-cpu", "llmfleet_runtime": "vllm-cpu-0.32.0", "llmfleet_api_bind": "0.0.0.0"}
    (inv / "host_vars" / "edge-x.yml").write_text(yaml.safe_dump(host_vars))
    bin_dir = Path(sys.executable).parent
    out = subprocess.run(
        [str(bin_dir / "ansible-playbook"), "-i", str(inv), str(REPO / "site.yml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"ANSIBLE_CONFIG": str(REPO / "ansible.cfg"), "PATH": f"{bin_dir}:/usr/bin:/bin", "ANSIBLE_TIMEOUT": "2"},
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "Validate | Evaluate spec and pins" in text and "UNREACHABLE" not in text, text
    assert 'llmfleet_api_bind = "0.0.0.0"' in text and "vllm_service_api_keys.tiny" in text, text
    assert "Traceback" not in text
