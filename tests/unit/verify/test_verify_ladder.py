"""The context ladder: the longest prompt the server answers, and clean refusals past its limit."""

from __future__ import annotations

import json
from typing import Any

from conftest import RunCli
from fake_vllm import Behaviour, serve

LIGHT = ("--requests", "2", "--concurrency", "1", "--prompt-tokens", "16", "--output-tokens", "4", "--json")


def run(run_cli: RunCli, behaviour: Behaviour, *args: str) -> tuple[int, dict[str, Any], str]:
    with serve(behaviour) as (url, _):
        r = run_cli("--url", url, *LIGHT, *args)
    return r.code, json.loads(r.out), r.err


def checks(env: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in env["checks"]}


def test_ladder_up_to_the_limit_and_refusals_past_it(run_cli: RunCli) -> None:
    code, env, err = run(run_cli, Behaviour())
    assert code == 0, err
    rungs = [(r["prompt_tokens"], r["kind"], r["status"]) for r in env["ladder"]]
    assert rungs == [
        (256, "ladder", 200), (512, "ladder", 200), (1024, "ladder", 200), (2047, "ladder", 200),
        (2048, "over", 400), (2049, "over", 400),
    ]  # fmt: skip
    assert all(r["answered_prompt_tokens"] == r["prompt_tokens"] and r["output_tokens"] == 1 for r in env["ladder"][:4])
    c = checks(env)
    assert (c["context_max_prompt"]["measured"], c["context_max_prompt"]["target"], c["context_max_prompt"]["verdict"]) == (
        2047,
        ">= 2047",
        "pass",
    )
    over = c["context_overlong_refused"]
    assert over["verdict"] == "pass" and over["measured"] == "2048: HTTP 400, 2049: HTTP 400"
    assert "maximum context length is 2048" in over["detail"]
    assert env["server"]["context_ladder"] == {"max_model_len": 2048, "longest_answered_prompt_tokens": 2047}


def test_refused_below_its_own_limit_finds_the_real_one(run_cli: RunCli) -> None:
    """/v1/models says 2048 but prompts past 1500 are refused: the search finds 1500 exactly."""
    code, env, err = run(run_cli, Behaviour(refuse_over=1500))
    assert code == 2
    c = checks(env)["context_max_prompt"]
    assert (c["measured"], c["verdict"]) == (1500, "fail")
    assert "2047 refused: HTTP 400" in c["detail"]
    searched = [r for r in env["ladder"] if r["kind"] == "search"]
    assert 1 <= len(searched) <= 11
    assert err.startswith("verify: target missed: context_max_prompt 1500 tokens (target >= 2047)")


def test_an_overlong_prompt_answered_misses(run_cli: RunCli) -> None:
    code, env, _ = run(run_cli, Behaviour(overlong="accept"))
    assert code == 2
    c = checks(env)["context_overlong_refused"]
    assert c["verdict"] == "fail" and "2049 tokens answered" in c["detail"] and "not enforced" in c["detail"]


def test_a_5xx_on_an_overlong_prompt_is_a_broken_server(run_cli: RunCli) -> None:
    code, env, err = run(run_cli, Behaviour(overlong="500"))
    assert code == 1
    assert err == "verify: context ladder: 2048 prompt tokens: HTTP 500: index out of range\n"
    assert checks(env)["context_overlong_refused"]["verdict"] == "fail"
    assert env["load"] is None  # the run ended there


def test_a_5xx_below_the_limit_is_a_broken_server(run_cli: RunCli) -> None:
    code, env, err = run(run_cli, Behaviour(fail_over=1000))
    assert code == 1
    assert err == "verify: context ladder: 1024 prompt tokens: HTTP 500: CUDA out of memory\n"
    assert checks(env)["context_max_prompt"]["verdict"] == "fail"


def test_a_hang_on_a_rung_ends_within_the_timeout(run_cli: RunCli) -> None:
    with serve(Behaviour(ttft_delay=30)) as (url, _):
        r = run_cli("--url", url, *LIGHT, "--first-byte-timeout", "0.5")
    assert r.code == 1 and r.seconds < 5
    assert r.err == "verify: context ladder: 256 prompt tokens: POST /v1/completions: no response within 0.5 s\n"


def test_no_ladder(run_cli: RunCli) -> None:
    code, env, _ = run(run_cli, Behaviour(refuse_over=100), "--no-ladder")
    assert code == 0
    assert env["ladder"] == [] and "context_max_prompt" not in checks(env)
