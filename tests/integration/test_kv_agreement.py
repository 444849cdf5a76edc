"""The planner's KV figures equal what real vLLM publishes.

For tiny Llama models that differ in layers, KV heads, head size and dtype, and for tp=2 and
pp=2, a host plan is made by the evaluator the deploy runs (``evaluate_host`` on the ``lab-cpu``
profile) and the instance is started from that plan's own argv and environment (store paths
swapped for the runtime virtualenv and the built model folder). Then the plan's
``capacity.kv`` must equal the labels of ``vllm:cache_config_info`` on ``/metrics``:
``num_blocks`` = ``num_gpu_blocks`` (the CPU build counts its blocks there), ``block_size`` =
``block_size`` and ``tokens`` = ``kv_cache_size_tokens``.

One server at a time (the machine is shared; a start takes about a minute). Run with
``make integration`` or ``python -m pytest tests/integration -m integration``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from llmfleet.artifacts.cache import revision
from llmfleet.artifacts.tiny_model import BUILDER, TinyLlamaSpec, build
from llmfleet.errors import PlanRefused
from llmfleet.pins import Lock, ModelPin
from llmfleet.plan import evaluate_host
from llmfleet.verify import prometheus

pytestmark = pytest.mark.integration

START_TIMEOUT_S = float(os.environ.get("LLMFLEET_TEST_START_TIMEOUT", "420"))
STOP_TIMEOUT_S = 30.0
MiB = 1 << 20


@dataclass(frozen=True)
class Variant:
    name: str
    model: dict[str, Any]  # TinyLlamaSpec parameters
    max_model_len: int
    kv_bytes: int
    tp: int = 1
    pp: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> TinyLlamaSpec:
        # a small vocabulary keeps the build fast; it does not enter the KV arithmetic
        return TinyLlamaSpec.model_validate({"vocab_size": 512, "corpus_sentences": 2000, **self.model})


def _llama(layers: int, heads: int, kv_heads: int, hidden: int, head_dim: int | None = None, dtype: str = "bfloat16") -> dict[str, Any]:
    params: dict[str, Any] = {
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_size": hidden,
        "dtype": dtype,
    }
    return params | ({"head_dim": head_dim} if head_dim else {})


BASE = _llama(2, 4, 2, 128)  # the pinned tiny-llama's shape: head size 32

# Head sizes are ones the CPU attention backend takes (rule cpu-head-size). Lengths and KV sizes
# are chosen so that neither is a multiple of the block or page (the arithmetic must round as
# vLLM does), and dtypes cover bf16, fp16, a float32 checkpoint served with --dtype auto (vLLM
# downcasts it to bf16) and one served with --dtype float32.
VARIANTS = [
    Variant("base-bf16", BASE, 2048, 256 * MiB),
    Variant("l4-kv1-hd64-fp16", _llama(4, 4, 1, 256, dtype="float16"), 1000, 100_000_000),
    Variant("l3-kv4-hd128-fp32auto", _llama(3, 4, 4, 128, 128, "float32"), 3000, 200 * MiB),
    Variant("l1-kv2-hd80-fp16", _llama(1, 4, 2, 128, 80, "float16"), 777, 50_000_000),
    Variant("l5-kv1-hd512-fp32", _llama(5, 2, 1, 128, 512, "float32"), 4096, 256 * MiB, engine_args={"dtype": "float32"}),
    Variant("l6-kv8-hd96-bf16", _llama(6, 8, 8, 256, 96), 1500, 150 * MiB),
    Variant("base-bf16-tp2", BASE, 2048, 256 * MiB, tp=2),
    Variant("base-bf16-pp2", BASE, 2048, 256 * MiB, pp=2),
    # one KV head on two ranks (replicated, not split); three layers on two stages (2 + 1: the
    # first stage has fewer blocks and the engine takes the smallest count)
    Variant("l4-kv1-hd64-fp16-tp2", _llama(4, 4, 1, 256, dtype="float16"), 1000, 100_000_000, tp=2),
    Variant("l3-kv4-hd128-fp32auto-pp2", _llama(3, 4, 4, 128, 128, "float32"), 3000, 200 * MiB, pp=2),
]


# --- helpers ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (API server, EngineCore, workers), SIGKILL what stays."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # children may outlive the API server
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


_models: dict[TinyLlamaSpec, tuple[Path, ModelPin]] = {}


def _model(spec: TinyLlamaSpec, root: Path) -> tuple[Path, ModelPin]:
    """The variant's model folder and its pin (built once per spec in a session)."""
    if spec not in _models:
        out = root / f"model-{len(_models)}"
        files = build(spec, out)
        pin = ModelPin(
            source=f"build:{BUILDER}", revision=revision(files), files=files, architecture=spec.facts(), builder=spec.params()
        )
        _models[spec] = (out, pin)
    return _models[spec]


def _plan(v: Variant, lock: Lock, runtime: str, model: ModelPin, root: Path, port: int) -> dict[str, Any]:
    """The host plan of one instance of this variant, from the evaluator the deploy uses."""
    test_lock = Lock.model_validate({"schema": 1, "runtimes": {runtime: lock.runtimes[runtime]}, "models": {v.name: model}})
    host_vars = {
        "llmfleet_hardware": "lab-cpu",
        "llmfleet_runtime": runtime,
        "llmfleet_api_bind": "127.0.0.1",
        "llmfleet_instances": [
            {
                "name": "kv",
                "model": v.name,
                "gpus": list(range(v.tp * v.pp)),
                "tensor_parallel": v.tp,
                "pipeline_parallel": v.pp,
                "port": port,
                "max_model_len": v.max_model_len,
                "kv_cache_memory_bytes": v.kv_bytes,
                "engine_args": {"enforce_eager": True, **v.engine_args},
                "load": {"prompt_tokens": 8, "output_tokens": 8},
            }
        ],
    }
    try:
        plan = evaluate_host("kv-agreement", host_vars, test_lock)
    except PlanRefused as exc:
        pytest.fail(f"the evaluator refuses variant {v.name}:\n{exc}", pytrace=False)
    # planned for the default root (the evaluator takes only roots under /var/lib), run under this one
    return dict(json.loads(json.dumps(plan).replace(f'"{plan["root"]}', f'"{root}')))


def _serve_and_scrape(plan: dict[str, Any], venv: Path, model_dir: Path, log: Path) -> tuple[dict[str, str], float]:
    """Start the plan's instance, wait for /health, return the cache_config_info labels and the start time."""
    inst = plan["instances"][0]
    swap = {plan["runtime"]["store_path"]: str(venv), plan["models"][inst["model"]]["store_path"]: str(model_dir)}

    def local(arg: str) -> str:
        for old, new in swap.items():
            if arg == old or arg.startswith(old + "/"):
                return new + arg[len(old):]
        return arg

    argv = [local(a) for a in inst["argv"]]
    env = dict(inst["environment"], PATH="/usr/local/bin:/usr/bin:/bin")  # what systemd gives the unit
    state = Path(inst["state_dir"])
    for key in ("HOME", "TMPDIR", "XDG_CACHE_HOME", "VLLM_CACHE_ROOT", "HF_HOME"):
        if key in env:
            Path(env[key]).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, cwd=state, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = inst["url"]
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode} before /health answered; log {log}:\n{_tail(log)}", pytrace=False)
            if time.monotonic() - t0 > START_TIMEOUT_S:
                pytest.fail(f"vLLM not healthy after {START_TIMEOUT_S:.0f} s; log {log}:\n{_tail(log)}", pytrace=False)
            try:
                if _get(f"{url}/health", 2.0)[0] == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1.0)
        started = time.monotonic() - t0
        status, text = _get(f"{url}/metrics", 10.0)
        assert status == 200, f"/metrics answered {status}"
    finally:
        _stop(proc)
    series = prometheus.parse(text).select("vllm:cache_config_info")
    assert len(series) == 1, f"expected one vllm:cache_config_info series, got {len(series)}"
    return dict(series[0].labels), started


# --- the test --------------------------------------------------------------------------------


@pytest.mark.parametrize("v", VARIANTS, ids=[v.name for v in VARIANTS])
def test_planner_kv_equals_vllm(
    v: Variant,
    lock: Lock,
    runtime_key: str,
    runtime_venv: Path,
    tmp_path_factory: pytest.TempPathFactory,
    agreement_rows: list[dict[str, Any]],
    request: pytest.FixtureRequest,
) -> None:
    spec = v.spec
    model_dir, model_pin = _model(spec, tmp_path_factory.getbasetemp())
    # A short root: vLLM puts ZMQ IPC sockets under the state dir, and a socket path may not pass
    # 107 bytes (pytest's own tmp paths grow with the run count and once broke the pp=2 start).
    root = Path(tempfile.mkdtemp(prefix="llmf-kv-"))
    request.addfinalizer(lambda: shutil.rmtree(root, ignore_errors=True))
    plan = _plan(v, lock, runtime_key, model_pin, root, _free_port())
    kv = plan["instances"][0]["capacity"]["kv"]
    labels, started = _serve_and_scrape(plan, runtime_venv, model_dir, root / "vllm.log")

    planned = {"num_gpu_blocks": kv["num_blocks"], "block_size": kv["block_size"], "kv_cache_size_tokens": kv["tokens"]}
    served = {k: int(labels[k]) for k in planned}
    agreement_rows.append(
        {
            "variant": v.name,
            "layers": spec.num_hidden_layers,
            "kv_heads": spec.num_key_value_heads,
            "head_dim": spec.resolved_head_dim,
            "dtype": spec.dtype + (f" --dtype {v.engine_args['dtype']}" if "dtype" in v.engine_args else ""),
            "kv_dtype": kv["dtype"],
            "tp": v.tp,
            "pp": v.pp,
            "max_model_len": v.max_model_len,
            "kv_bytes": v.kv_bytes,
            "plan_block_size": kv["block_size"],
            "plan_blocks": kv["num_blocks"],
            "plan_tokens": kv["tokens"],
            "vllm_block_size": served["block_size"],
            "vllm_blocks": served["num_gpu_blocks"],
            "vllm_tokens": served["kv_cache_size_tokens"],
            "equal": "yes" if planned == served else "NO",
            "start_s": round(started),
        }
    )
    assert int(labels["kv_cache_memory_bytes"]) == v.kv_bytes
    assert planned == served, f"planner {planned} != vLLM {served} (plan KV arithmetic: {kv})"
