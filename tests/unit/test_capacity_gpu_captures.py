"""The capacity planner against vLLM's own figures captured on a real GPU (tests/fixtures/gpu/captures).

Each capture is one start of vLLM 0.26.0 (CUDA build, H200) from a plan's argv with
``--load-format dummy`` (bench/gpu): ``vllm:cache_config_info`` and the worker's memory accounting in
bytes. The planner, with the rulebook's figures for that version, must give num_gpu_blocks within
±1 % and never more than vLLM (a plan that promises more KV than the engine gives refuses to start
in the field), and each memory term must match what the worker computed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from llmfleet import capacity as cap
from llmfleet.pins import ModelPin, load_lock
from llmfleet.rules import Layout, analyse, load_rulebook
from llmfleet.spec import HardwareProfile

REPO = Path(__file__).resolve().parents[2]
CAPTURES = sorted(p for p in (REPO / "tests" / "fixtures" / "gpu" / "captures").glob("*.json") if p.name != "failed.json")
RUNTIME = "vllm-0.26.0-cu130"


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def plan(capture: dict[str, Any]) -> dict[str, Any]:
    ((hw_key, hw_raw),) = capture["hardware"].items()
    argv = capture["argv_plan"]
    lay = Layout(
        tp=int(argv[argv.index("--tensor-parallel-size") + 1]),
        pp=int(argv[argv.index("--pipeline-parallel-size") + 1]),
        gpus=(0,),
        max_model_len=int(argv[argv.index("--max-model-len") + 1]),
        gpu_memory_utilization=capture["gpu_memory_utilization"],
        engine_args=tuple(sorted(capture["engine_args"].items())),
    )
    model = ModelPin.model_validate(
        {"source": "config-only", "status": "unresolved", "architecture": capture["facts"], "quantization": capture["quantization"]}
    )
    runtime = load_lock(REPO / "pins" / "lock.json").runtimes[RUNTIME]
    a = analyse(capture["model"], model, RUNTIME, runtime, HardwareProfile.model_validate(hw_raw), hw_key, lay, load_rulebook())
    assert a.capacity is not None, a.capacity_error
    return a.capacity


def test_there_are_captures() -> None:
    # every capture that came up on the GPU (bench/gpu/README.md lists those that did not)
    assert len(CAPTURES) >= 5
    budgets = {load(p)["budget"] for p in CAPTURES}
    assert budgets == {"l4", "big"}


@pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_planner_blocks_within_one_percent_and_never_more(path: Path) -> None:
    capture = load(path)
    vllm_blocks = int(capture["cache_config_info"]["labels"]["num_gpu_blocks"])
    planned = plan(capture)["kv"]["num_blocks"]
    assert planned <= vllm_blocks, f"the plan promises {planned} blocks, vLLM gave {vllm_blocks}"
    assert abs(planned - vllm_blocks) / vllm_blocks <= 0.01, f"planned {planned}, vLLM {vllm_blocks}"


@pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_each_memory_term_is_the_workers(path: Path) -> None:
    capture = load(path)
    w = capture["worker"]
    c = plan(capture)
    mem = c["memory"]
    # the CUDA-visible total and the requested memory are vLLM's to the byte
    assert mem["cuda_total_bytes"] == w["init_total_bytes"]
    assert mem["requested_bytes"] == w["requested_bytes"] == math.ceil(w["init_total_bytes"] * capture["gpu_memory_utilization"])
    # KV = requested − weights − peak activation − non-torch: the worker's own identity (V2 runner,
    # no CUDA-graph estimate in the budget), so each planned term can be held to its own figure
    assert w["returned_bytes"] == w["requested_bytes"] - w["weights_bytes"] - w["peak_activation_bytes"] - w["non_torch_bytes"]
    assert mem["cudagraph_in_budget_bytes"] == 0
    assert mem["non_torch_bytes"] == w["non_torch_bytes"]
    loaded = mem["weights_loaded_bytes"][0]
    assert w["weights_bytes"] <= loaded <= w["weights_bytes"] * 1.002, (loaded, w["weights_bytes"])
    act = mem["peak_activation_bytes"][0]
    assert w["peak_activation_bytes"] <= act <= w["peak_activation_bytes"] + 24 * (1 << 20), (act, w["peak_activation_bytes"])


@pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_tokens_are_the_label(path: Path) -> None:
    """kv_cache_size_tokens from vLLM's own blocks by the 0.26 formula (int(blocks / per request × len))."""
    capture = load(path)
    labels = capture["cache_config_info"]["labels"]
    blocks = int(labels["num_gpu_blocks"])
    max_len = int(capture["argv_plan"][capture["argv_plan"].index("--max-model-len") + 1])
    per_request = cap.cdiv(max_len, int(labels["block_size"]))
    assert int(labels["kv_cache_size_tokens"]) == int(blocks / per_request * max_len)
