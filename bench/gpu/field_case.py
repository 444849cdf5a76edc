#!/usr/bin/env python3
"""The field's Gemma 4 TP=2 layout on the XR7620 profile: the planner's KV tokens and the range the unknowns allow.

    .venv/bin/python bench/gpu/field_case.py

The field reported 10,432 KV tokens (vLLM 0.19.0, max_model_len 8192) and not which build or memory
settings it ran. The plan is tools/plan.py's for inventory/xr7620 host edge-b01 (gemma-4-31b-it-nvfp4,
tp 2, gpu_memory_utilization 0.9); each unknown of the CUDA memory model (catalog/rules.yml
capacity.cuda for 0.19.0: none of it captured on that version or on an L4) is then moved over the
range named next to it, one at a time and all together, and the tokens printed.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))

from llmfleet import rules  # noqa: E402
from llmfleet.inventory import load_inventory  # noqa: E402
from llmfleet.pins import load_lock  # noqa: E402
from llmfleet.spec import builtin_hardware_profiles  # noqa: E402

FIELD = 10432
MiB = 1 << 20
#: unknown → (low, planned, high): the values the rulebook takes and a range around them
UNKNOWNS = {
    # the L4's driver reserve: NVML total − CUDA total; 615 MiB measured on the H200
    "cuda_reserved_bytes": (400 * MiB, None, 800 * MiB),
    # NCCL and all-reduce buffers of the second rank
    "non_torch_per_peer_bytes": (128 * MiB, None, 768 * MiB),
    # logits rows of the profile's sampling pass: 256 (V1 runner: max_num_seqs on an L4) .. 2048 (0.26 V2)
    "logits_rows": (256, None, 2048),
}


def tokens(book: rules.RuleBook, host_vars: dict, lock) -> int:  # type: ignore[no-untyped-def]
    """The planner's KV tokens for the layout with this rulebook (also where it would refuse)."""
    inst = host_vars["llmfleet_instances"][0]
    hw_key = host_vars["llmfleet_hardware"]
    hw = builtin_hardware_profiles()[hw_key]
    rt_key = host_vars["llmfleet_runtime"]
    layout = rules.Layout(
        tp=inst["tensor_parallel"],
        pp=inst["pipeline_parallel"],
        gpus=tuple(inst["gpus"]),
        max_model_len=inst["max_model_len"],
        gpu_memory_utilization=inst.get("gpu_memory_utilization"),
    )
    a = rules.analyse(inst["model"], lock.models[inst["model"]], rt_key, lock.runtimes[rt_key], hw, hw_key, layout, book)
    assert a.capacity is not None, a.capacity_error
    return int(a.capacity["kv"]["tokens"])


def evaluate_host_tokens(host_vars: dict, lock) -> int:  # type: ignore[no-untyped-def]
    """The same figure through the evaluator (tools/plan.py), with the rulebook as committed."""
    from llmfleet.plan import evaluate_host

    return int(evaluate_host("edge-b01", host_vars, lock)["instances"][0]["capacity"]["kv"]["tokens"])


def with_memory(book: rules.RuleBook, **change: object) -> rules.RuleBook:
    cuda = []
    for applies, mem in book.cuda:
        values = dict(change)
        if "cuda_reserved_bytes" in values:
            values["cuda_reserved_bytes"] = {**mem.cuda_reserved_bytes, "default": values["cuda_reserved_bytes"]}
        cuda.append((applies, dataclasses.replace(mem, **values)))  # type: ignore[arg-type]
    return dataclasses.replace(book, cuda=tuple(cuda))


def main() -> int:
    inv = load_inventory(str(REPO / "inventory" / "xr7620"))
    host_vars = inv["edge-b01"]
    host_vars = {**host_vars, "llmfleet_instances": [host_vars["llmfleet_instances"][0]]}
    lock = load_lock(REPO / "pins" / "lock.json")
    book = rules.load_rulebook()
    planned = tokens(book, host_vars, lock)
    assert planned == evaluate_host_tokens(host_vars, lock)
    print(f"planned: {planned} KV tokens; field: {FIELD} ({100 * (planned - FIELD) / FIELD:+.1f} %)")
    mem = book.cuda_memory("0.19.0")
    assert mem is not None
    for name, (lo, _, hi) in UNKNOWNS.items():
        got = [tokens(with_memory(book, **{name: v}), host_vars, lock) for v in (lo, hi)]
        print(f"  {name}: {lo} .. {hi}: {got[0]} .. {got[1]} tokens")
    everything = [
        tokens(with_memory(book, **dict(zip(UNKNOWNS, combo, strict=True))), host_vars, lock)
        for combo in itertools.product(*((lo, hi) for lo, _, hi in UNKNOWNS.values()))
    ]
    print(f"  all together: {min(everything)} .. {max(everything)} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
