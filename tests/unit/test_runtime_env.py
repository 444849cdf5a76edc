"""The runtime virtualenv of the control node: built from the wheelhouse only, atomically, reused."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from llmfleet import runtime_env
from llmfleet.pins import Lock, Requirement, RuntimePin, runtime_store_name

PY = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _wheel(folder: Path, name: str = "hello_rt", version: str = "1.0") -> Requirement:
    """A minimal pure-Python wheel (a module and its dist-info), as a locked requirement."""
    filename = f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"GREETING = 'hello'\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = ""
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record += f"{path},sha256={digest},{len(data)}\n"
    record += f"{dist}/RECORD,,\n"
    files[f"{dist}/RECORD"] = record.encode()
    path = folder / filename
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    data = path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    return Requirement(name=name.replace("_", "-"), version=version, sha256=sha256, filename=filename, size=len(data))


def _lock(reqs: list[Requirement] | None, status: str = "resolved") -> Lock:
    pin = RuntimePin(distribution="hello-rt", version="1.0", python=PY, device="cpu", status=status, requirements=reqs)  # type: ignore[arg-type]
    return Lock.model_validate({"schema": 1, "runtimes": {"rt": pin}})


def test_builds_once_in_the_store_name_and_reuses_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheelhouse" / "rt"
    wheels.mkdir(parents=True)
    lock = _lock([_wheel(wheels)])
    venv = runtime_env.ensure_runtime_venv(lock, "rt", python=sys.executable)
    assert venv == tmp_path / "cache" / "venvs" / runtime_store_name("rt", lock.runtimes["rt"])
    out = subprocess.run([venv / "bin" / "python", "-c", "import hello_rt; print(hello_rt.GREETING)"], capture_output=True, text=True)
    assert out.stdout == "hello\n", out.stderr
    marker = json.loads((venv / runtime_env.MARKER).read_text())
    assert marker["key"] == "rt" and len(marker["requirements_sha256"]) == 64
    assert not list(venv.parent.glob("*.partial"))  # nothing left beside it
    # complete: returned as it is, without looking at the wheelhouse again
    for w in wheels.iterdir():
        w.unlink()
    assert runtime_env.ensure_runtime_venv(lock, "rt", python=sys.executable) == venv


def test_an_unfinished_path_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheelhouse" / "rt"
    wheels.mkdir(parents=True)
    lock = _lock([_wheel(wheels)])
    stale = runtime_env.venv_dir("rt", lock.runtimes["rt"])
    stale.mkdir(parents=True)
    (stale / "junk").write_text("no marker: an interrupted build")
    venv = runtime_env.ensure_runtime_venv(lock, "rt", python=sys.executable)
    assert venv == stale and not (venv / "junk").exists() and (venv / runtime_env.MARKER).is_file()


def test_refuses_a_wheelhouse_that_differs_from_the_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheelhouse" / "rt"
    wheels.mkdir(parents=True)
    req = _wheel(wheels)
    (wheels / (req.filename or "")).write_bytes(b"tampered")
    with pytest.raises(runtime_env.RuntimeEnvError, match="does not match the lock"):
        runtime_env.ensure_runtime_venv(_lock([req]), "rt", python=sys.executable)
    assert not (tmp_path / "cache" / "venvs").exists() or not any((tmp_path / "cache" / "venvs").iterdir())


def test_refuses_unknown_and_unresolved_runtimes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMFLEET_CACHE", str(tmp_path / "cache"))
    with pytest.raises(runtime_env.RuntimeEnvError, match="not in the lock"):
        runtime_env.ensure_runtime_venv(_lock(None, "unresolved"), "other")
    with pytest.raises(runtime_env.RuntimeEnvError, match="unresolved"):
        runtime_env.ensure_runtime_venv(_lock(None, "unresolved"), "rt")
