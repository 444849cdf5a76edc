"""The verify core runs on a bare host Python >= 3.11: stdlib only, nothing else of llmfleet."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOOLS
from fake_vllm import Behaviour, serve

PACKAGE = TOOLS / "llmfleet" / "verify"
HOST_PYTHON = Path("/usr/bin/python3.11")  # Debian 12's system Python, as on the hosts


def interpreters() -> list[list[str]]:
    """This venv's Python (rich importable), and a bare 3.11 without site-packages (no rich)."""
    found = [[sys.executable]]
    if HOST_PYTHON.exists():
        found.append([str(HOST_PYTHON), "-S"])
    else:
        found.append([sys.executable, "-S"])
    return found


def test_imports_are_stdlib_or_verify() -> None:
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    assert node.level == 1, f"{path.name}: relative import leaves llmfleet.verify"
                    continue
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                ok = top in sys.stdlib_module_names or name.startswith("llmfleet.verify") or (top == "rich" and path.name == "report.py")
                assert ok, f"{path.name} imports {name}"


def test_llmfleet_init_has_no_imports() -> None:
    tree = ast.parse((TOOLS / "llmfleet" / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


@pytest.mark.parametrize("python", interpreters(), ids=["venv", "bare-3.11"])
def test_loaded_modules_on_a_bare_python(python: list[str]) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import llmfleet.verify.cli;"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names and m != '__main__');"
        "print(__import__('json').dumps(mods))"
    )
    out = subprocess.run([*python, "-c", code, str(TOOLS)], capture_output=True, text=True, check=True, timeout=60).stdout
    mods = json.loads(out)
    foreign = [m for m in mods if not (m == "llmfleet" or m.startswith("llmfleet.verify") or m.split(".")[0] == "rich")]
    assert foreign == []
    if "-S" in python:
        assert not [m for m in mods if m.startswith("rich")]


@pytest.mark.parametrize("python", interpreters(), ids=["venv", "bare-3.11"])
def test_cli_subprocess(python: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TOOLS), "LLMF_SUB_KEY": "abc"}
    with serve(Behaviour(api_key="abc")) as (url, fake):
        ok = subprocess.run(
            [*python, "-m", "llmfleet.verify", "--url", url, "--api-key-env", "LLMF_SUB_KEY", "--requests", "4",
             "--target-min-context-tokens", "512", "--output", str(tmp_path / "v.json"), "--concurrency", "2,1", "--sweep",
             "--sweep-max-concurrency", "2", "--textfile", str(tmp_path / "v.prom"), "--plot", str(tmp_path / "v.html"),
             "--history", str(tmp_path)],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        slow = subprocess.run(
            [*python, str(TOOLS / "verify.py"), "--url", url, "--api-key-env", "LLMF_SUB_KEY", "--requests", "2",
             "--target-max-ttft-p95-s", "0.000001"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == "" and "result: all targets met (exit 0)" in ok.stdout
    assert json.loads((tmp_path / "v.json").read_text())["ok"] is True
    assert "llmfleet_verify_exit_code{" in (tmp_path / "v.prom").read_text() and "<svg" in (tmp_path / "v.html").read_text()
    assert "Bearer abc" in fake.state.authorizations
    assert slow.returncode == 2 and slow.stderr.startswith("verify: target missed: ttft_p95_s")
    down = subprocess.run(
        [*python, "-m", "llmfleet.verify", "--url", "http://127.0.0.1:9", "--ready-timeout", "0.2"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert down.returncode == 1 and down.stderr == "verify: server not ready after 0.2 s: connection refused by 127.0.0.1:9\n"
    with serve(Behaviour(completions="hang")) as (url, _):
        t0 = time.monotonic()
        hang = subprocess.run(
            [*python, "-m", "llmfleet.verify", "--url", url, "--idle-timeout", "0.5", "--requests", "4", "--json"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        hang_seconds = time.monotonic() - t0
    assert hang.returncode == 1 and hang_seconds < 10
    assert hang.stderr == ("verify: 4 of 4 load requests failed; first: POST /v1/completions: response stalled, no data for 0.5 s\n")
    assert json.loads(hang.stdout)["load"]["failed"] == 4
    for proc in (ok, slow, down, hang):
        assert "Traceback" not in proc.stdout + proc.stderr
