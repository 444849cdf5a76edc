"""verify against local fake vLLM servers: a good one, misbehaving ones, a slow one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, free_port, serve

CTX = ("--target-min-context-tokens", "2048")


def envelope(out: str) -> dict[str, Any]:
    env: dict[str, Any] = json.loads(out)
    return env


def checks(env: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in env["checks"]}


def test_good_server_meets_targets_with_exact_counts(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(tokens_per_chunk=3)) as (url, fake):
        r = run_cli(
            "--url", url, "--json", "--output", str(tmp_path / "out.json"), *CTX,
            "--target-min-output-tokens-per-s", "10", "--target-max-ttft-p95-s", "5", "--target-min-kv-cache-tokens", "16000",
            "--concurrency", "3", "--requests", "10", "--prompt-tokens", "50", "--output-tokens", "20",
        )  # fmt: skip
    assert (r.code, r.err) == (0, "")
    env = envelope(r.out)
    assert env == json.loads((tmp_path / "out.json").read_text())
    assert env["schema"] == "llmfleet.verify/1" and env["ok"] is True and env["exit_code"] == 0 and env["error"] is None
    assert env["instance"]["model"] == "tiny-llama"
    c = checks(env)
    assert {k: v["verdict"] for k, v in c.items()} == {
        "model": "pass",
        "model_revision": "info",  # no plan: the path is reported
        "max_model_len": "pass",
        "kv_cache_tokens": "pass",
        "context_tokens": "pass",
        "context_max_prompt": "pass",
        "context_overlong_refused": "pass",
        "load_requests": "pass",
        "output_tokens_per_s": "pass",
        "ttft_p95_s": "pass",
        "requests_per_s": "info",
        "server_generation_tokens": "pass",
        "server_prompt_tokens": "pass",
        "prefix_cache_hits": "info",
        "client_cpu": "info",
    }
    assert c["prefix_cache_hits"]["measured"] == "0.0%"
    assert c["kv_cache_tokens"]["measured"] == 1024 * 16
    assert c["context_tokens"]["measured"] == 2048
    load = env["load"]
    # counts come from usage (3 tokens per chunk here), never from counting chunks
    assert (load["sent"], load["complete"], load["failed"], load["cut_short"], load["not_sent"]) == (10, 10, 0, 0, 0)
    assert load["output_tokens_total"] == 200 and load["prompt_tokens_total"] == 500
    assert load["output_tokens_per_s"] == pytest.approx(200 / load["duration_s"])
    assert load["ttft_s"]["count"] == 10 and load["e2el_s"]["count"] == 10
    assert load["itl_s"]["count"] == 10 * 6  # 7 content chunks per request (3+3+3+3+3+3+2): 6 gaps
    # every load prompt was exactly 50 tokens by the server's count, and no two alike
    assert fake.state.prompt_lengths == [50] * 10 and len(set(fake.state.prompts)) == 10
    server = env["server"]
    assert server["load_metrics"]["generation_tokens_delta"] == 200 and server["load_metrics"]["prompt_tokens_delta"] == 500
    assert server["context_probe"]["answered_prompt_tokens"] == 2044 and server["context_probe"]["answered_output_tokens"] == 4
    assert server["version"] == "0.32.0-fake" and server["max_model_len"] == 2048


def test_each_run_sends_prompts_the_prefix_cache_has_not_seen(run_cli: RunCli) -> None:
    """A second run against the same server (on-call after the rollout's verify) must not have its prefill
    served from the first run's cache; a repeated --prompt-seed does, and verify says so."""
    load = ("--no-ladder", "--no-history", "--json", "--concurrency", "2", "--requests", "6", "--prompt-tokens", "50")
    with serve() as (url, fake):
        first, second = (envelope(run_cli("--url", url, *load).out) for _ in range(2))
        assert fake.state.prefix_hits == 0 and len(set(fake.state.prompts)) == 12
        assert first["load"]["prompt_seed"] != second["load"]["prompt_seed"]
        for env in (first, second):
            assert checks(env)["prefix_cache_hits"]["verdict"] == "info"
            assert env["server"]["load_metrics"]["prefix_cache_hits_delta"] == 0
            assert env["server"]["load_metrics"]["prefix_cache_queries_delta"] == 6 * 50

        again = [run_cli("--url", url, *load, "--prompt-seed", "7") for _ in range(2)]
    assert [r.code for r in again] == [0, 0]  # worth a look, not a missed target
    fresh, repeated = (envelope(r.out) for r in again)
    assert fresh["load"]["prompt_seed"] == repeated["load"]["prompt_seed"] == 7
    assert checks(fresh)["prefix_cache_hits"]["verdict"] == "info"
    c = checks(repeated)["prefix_cache_hits"]
    assert c["verdict"] == "warn" and c["measured"] == "96.0%"  # 3 full blocks of 16 of each 50-token prompt
    assert "288 of 300 prompt tokens served from the prefix cache" in c["detail"] and "TTFT is flattered" in c["detail"]


def test_human_output(run_cli: RunCli) -> None:
    with serve() as (url, _):
        r = run_cli("--url", url, *CTX, "--requests", "4")
    assert r.code == 0 and r.err == ""
    for word in ("context_tokens", "load_requests", "4/4", "TTFT", "ITL", "result: all targets met (exit 0)"):
        assert word in r.out


@pytest.mark.parametrize(
    ("behaviour", "args", "reason"),
    [
        (Behaviour(health="503"), ("--ready-timeout", "1"), "server not ready after 1 s: /health answered HTTP 503"),
        (Behaviour(health="hang"), ("--ready-timeout", "1"), "server not ready after 1 s: GET /health: no response within 1 s"),
        (Behaviour(completions="hang"), ("--idle-timeout", "0.5"), "POST /v1/completions: response stalled, no data for 0.5 s"),
        (Behaviour(completions="500"), ("--no-ladder",), "HTTP 500 from POST /v1/completions: EngineCore encountered an issue"),
        (Behaviour(completions="cut"), (), "stream ended before [DONE]"),
        (Behaviour(completions="abort"), (), "connection closed mid-body"),
        (Behaviour(completions="malformed"), (), "malformed SSE: invalid JSON in event"),
        (Behaviour(completions="no_usage"), (), "stream had no usage event"),
        (Behaviour(completions="error_event"), (), "error event in stream: engine died"),
        (Behaviour(), ("--model", "llama-70b"), "wrong model: server serves tiny-llama, expected llama-70b"),
        (Behaviour(metrics=False), ("--target-min-kv-cache-tokens", "10"), "KV-cache capacity: GET /metrics answered HTTP 404"),
        (Behaviour(ttft_delay=5), ("--first-byte-timeout", "0.5"), "no response within 0.5 s"),
        (Behaviour(completions="500"), CTX, "context probe: POST /v1/completions answered HTTP 500"),
        (Behaviour(max_model_len=80), (), "load does not fit: prompt_tokens 64 + output_tokens 32 > max_model_len 80"),
    ],
    ids=["health-never-ready", "health-hangs", "hang-mid-stream", "500", "cut-before-done", "connection-dropped", "malformed-json",
         "no-usage", "error-event", "wrong-model", "no-metrics", "no-first-byte", "500-on-probe", "load-too-long"],
)  # fmt: skip
def test_cannot_measure_exits_1_with_one_line(run_cli: RunCli, behaviour: Behaviour, args: tuple[str, ...], reason: str) -> None:
    with serve(behaviour) as (url, _):
        r = run_cli("--url", url, "--requests", "8", "--concurrency", "2", *args)
    assert r.code == 1, r.out + r.err
    assert r.err.startswith("verify: ") and r.err.count("\n") == 1, r.err
    assert reason in r.err
    assert "Traceback" not in r.err + r.out
    assert r.seconds < 8


def test_failures_are_counted_never_dropped(run_cli: RunCli) -> None:
    with serve(Behaviour(completions="500", bad_after=3)) as (url, fake):
        r = run_cli("--url", url, "--json", "--requests", "20", "--concurrency", "1")
    env = envelope(r.out)
    assert r.code == 1 and env["exit_code"] == 1 and env["ok"] is False
    load = env["load"]
    # 3 good, the 4th fails, nothing more is sent; all 20 accounted for
    assert (load["sent"], load["complete"], load["failed"], load["not_sent"]) == (4, 3, 1, 16)
    assert load["errors"] == [{"error": "HTTP 500 from POST /v1/completions: EngineCore encountered an issue", "count": 1}]
    assert checks(env)["load_requests"]["verdict"] == "fail"
    assert "1 of 20 load requests failed, 16 not sent" in env["error"]
    assert fake.state.stream_requests == 4


def test_connection_refused(run_cli: RunCli) -> None:
    port = free_port()
    r = run_cli("--url", f"http://127.0.0.1:{port}", "--ready-timeout", "0.5")
    assert r.code == 1
    assert r.err == f"verify: server not ready after 0.5 s: connection refused by 127.0.0.1:{port}\n"
    assert r.seconds < 3


def test_slow_server_misses_ttft_target(run_cli: RunCli) -> None:
    with serve(Behaviour(ttft_delay=0.3)) as (url, _):
        r = run_cli("--url", url, "--json", "--requests", "4", "--target-max-ttft-p95-s", "0.1", "--target-min-output-tokens-per-s", "1")
    assert r.code == 2
    env = envelope(r.out)
    assert env["ok"] is False and env["exit_code"] == 2 and env["error"] is None
    ttft = checks(env)["ttft_p95_s"]
    assert ttft["verdict"] == "fail" and ttft["measured"] >= 0.3 and ttft["target"] == "<= 0.1"
    assert checks(env)["output_tokens_per_s"]["verdict"] == "pass"
    assert r.err.startswith("verify: target missed: ttft_p95_s ")


def test_cut_short_requests_miss_a_target(run_cli: RunCli) -> None:
    with serve(Behaviour(completions="short", bad_after=2)) as (url, _):
        r = run_cli("--url", url, "--json", "--requests", "6", "--concurrency", "1")
    assert r.code == 2
    env = envelope(r.out)
    c = checks(env)["load_requests"]
    assert c["verdict"] == "fail" and c["measured"] == "2/6"
    assert "first cut short: 16 of 32 tokens, finish_reason length" in c["detail"]
    assert (env["load"]["cut_short"], env["load"]["output_tokens_total"]) == (4, 2 * 32 + 4 * 16)


def test_context_target_missed(run_cli: RunCli) -> None:
    with serve(Behaviour(max_model_len=1024)) as (url, _):
        r = run_cli("--url", url, "--json", *CTX, "--requests", "2")
    assert r.code == 2
    c = checks(envelope(r.out))
    assert c["max_model_len"]["verdict"] == "fail" and c["max_model_len"]["measured"] == 1024
    assert c["context_tokens"]["verdict"] == "fail" and "not probed" in c["context_tokens"]["detail"]

    with serve(Behaviour(refuse_over=1500)) as (url, _):  # /v1/models says 2048, the server refuses more than 1500
        r = run_cli("--url", url, "--json", *CTX, "--requests", "2")
    assert r.code == 2
    c = checks(envelope(r.out))
    assert c["max_model_len"]["verdict"] == "pass"
    assert c["context_tokens"]["verdict"] == "fail" and "refused: HTTP 400" in c["context_tokens"]["detail"]


def test_kv_cache_target_missed(run_cli: RunCli) -> None:
    with serve(Behaviour(num_gpu_blocks=100, block_size=16)) as (url, _):
        r = run_cli("--url", url, "--json", "--requests", "2", "--target-min-kv-cache-tokens", "2048")
    assert r.code == 2
    c = checks(envelope(r.out))["kv_cache_tokens"]
    assert (c["measured"], c["target"], c["verdict"], c["detail"]) == (1600, ">= 2048", "fail", "100 blocks × 16")


def test_api_key_from_environment(run_cli: RunCli, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(Behaviour(api_key="s3cret")) as (url, fake):
        monkeypatch.setenv("LLMF_TEST_KEY", "s3cret")
        r = run_cli("--url", url, "--api-key-env", "LLMF_TEST_KEY", "--requests", "2")
        assert r.code == 0, r.err
        # every request carries the key but the one probe that must be refused without it
        assert "Bearer s3cret" in fake.state.authorizations and fake.state.authorizations.count(None) == 1
        assert "s3cret" not in r.out + r.err

        monkeypatch.setenv("LLMF_TEST_KEY", "wrong")
        r = run_cli("--url", url, "--api-key-env", "LLMF_TEST_KEY")
        assert r.code == 1 and "GET /v1/models answered HTTP 401: Unauthorized" in r.err

        monkeypatch.delenv("LLMF_TEST_KEY")
        r = run_cli("--url", url, "--api-key-env", "LLMF_TEST_KEY")
        assert r.code == 1 and r.err == "verify: environment variable LLMF_TEST_KEY (the API key) is not set or empty\n"


def test_api_key_from_file(run_cli: RunCli, tmp_path: Path) -> None:
    """The plan's api_key_file (the unit's root-only environment file) or --api-key-file: never argv."""
    env_file, bare = tmp_path / "tiny.env", tmp_path / "bare-key"
    env_file.write_text("VLLM_API_KEY=s3cret-from-file\n")
    bare.write_text("s3cret-from-file\n")
    env_file.chmod(0o600)
    with serve(Behaviour(api_key="s3cret-from-file")) as (url, fake):
        inst = {"name": "tiny", "served_model_name": "tiny-llama", "url": url, "api_key_required": True, "api_key_file": str(env_file),
                "load": {"concurrency": 1, "requests": 2, "prompt_tokens": 16, "output_tokens": 4}}
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"schema": 1, "host": "h", "generation": "b" * 24, "instances": [inst]}))
        r = run_cli("--plan", str(plan), "--no-history")
        assert r.code == 0, r.err
        r = run_cli("--url", url, "--model", "tiny-llama", "--api-key-file", str(bare), "--requests", "2")
        assert r.code == 0, r.err
        # two runs: every request carries the key but each run's one probe that must be refused without it
        assert fake.state.authorizations.count(None) == 2 and set(fake.state.authorizations) == {"Bearer s3cret-from-file", None}
        assert "s3cret" not in r.out + r.err
        (tmp_path / "junk").write_text("A=1\nB=2\n")
        r = run_cli("--url", url, "--api-key-file", str(tmp_path / "junk"))
        assert r.code == 1 and "holds no VLLM_API_KEY=<key> line" in r.err


def test_plan_instance(run_cli: RunCli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with serve(Behaviour(api_key="k", model="qwen")) as (url, fake):
        inst = {
            "name": "small",
            "unit": "llmfleet-vllm@small.service",
            "served_model_name": "qwen",
            "url": url,
            "max_model_len": 2048,
            "api_key_env": "LLMF_PLAN_KEY",
            "targets": {"min_output_tokens_per_s": 1, "max_ttft_p95_s": 5, "min_context_tokens": 1024},
            "load": {"concurrency": 2, "requests": 6, "prompt_tokens": 30, "output_tokens": 8},
        }
        other = {**inst, "name": "other", "url": "http://127.0.0.1:1"}
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"schema": 1, "host": "lab1", "generation": "a" * 24, "instances": [other, inst]}))
        monkeypatch.setenv("LLMF_PLAN_KEY", "k")
        r = run_cli("--plan", str(plan), "--instance", "small", "--json")
    assert r.code == 0, r.err
    env = envelope(r.out)
    assert env["instance"] == {"name": "small", "url": url, "model": "qwen", "generation": "a" * 24}
    assert env["targets"] == {"min_output_tokens_per_s": 1, "max_ttft_p95_s": 5, "min_context_tokens": 1024}
    assert env["load"]["requests"] == 6 and env["load"]["output_tokens_total"] == 48
    assert fake.state.prompt_lengths == [30] * 6


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        ((), "usage: give --plan FILE or --url URL"),
        (("--url", "http://h:1", "--requests", "0"), "usage: argument --requests: must be > 0: '0'"),
        (("--url", "http://h:1", "--prompt-seed", "0"), "usage: argument --prompt-seed: must be > 0: '0'"),
        (("--url", "http://h:1", "--bogus"), "usage: unrecognized arguments: --bogus"),
        (("--plan", "/nonexistent/plan.json"), "cannot read plan /nonexistent/plan.json"),
        (("--url", "localhost:8000"), "invalid URL 'localhost:8000'"),
    ],
)
def test_usage_errors_exit_1_not_2(run_cli: RunCli, argv: tuple[str, ...], reason: str) -> None:
    r = run_cli(*argv)
    assert r.code == 1 and reason in r.err and r.err.count("\n") == 1


def test_usage_error_with_json_still_prints_an_envelope(run_cli: RunCli) -> None:
    r = run_cli("--json", "--url", "ftp://x")
    env = envelope(r.out)
    assert r.code == 1 and env["schema"] == "llmfleet.verify/1" and env["exit_code"] == 1 and "invalid URL" in env["error"]
