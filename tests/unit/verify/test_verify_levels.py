"""Several concurrency levels, the sweep, the counter cross-check and refusals under load."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, serve
from llmfleet.verify.client import _Stream
from llmfleet.verify.httpclient import ProtocolError
from llmfleet.verify.sse import SseParser

SHORT = ("--prompt-tokens", "16", "--output-tokens", "8", "--no-ladder", "--json")


def checks(env: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in env["checks"]}


def test_levels_targets_at_the_first(run_cli: RunCli) -> None:
    with serve(Behaviour()) as (url, fake):
        r = run_cli("--url", url, *SHORT, "--concurrency", "2,1,2,3", "--requests", "6", "--target-min-output-tokens-per-s", "1")
    assert r.code == 0, r.err
    env = json.loads(r.out)
    levels = [(lv["concurrency"], lv["phase"], lv["requests"], lv["complete"]) for lv in env["levels"]]
    assert levels == [(2, "target", 6, 6), (1, "level", 6, 6), (3, "level", 6, 6)]  # the repeated 2 is measured once
    assert env["load"]["concurrency"] == 2 and env["load"]["output_tokens_total"] == 48
    assert all(0 <= lv["client_cpu_share"] <= 1.5 for lv in env["levels"])
    # the cross-check covers every level: 18 requests × 8 tokens
    c = checks(env)
    assert (c["server_generation_tokens"]["measured"], c["server_generation_tokens"]["verdict"]) == (144, "pass")
    assert "3 levels" in c["server_generation_tokens"]["detail"]
    assert fake.state.stream_requests == 18
    # per-level server figures, and the target level's beside the client's
    assert env["levels"][1]["server"]["generation_tokens_delta"] == 48
    assert env["server"]["load_metrics"]["histograms"]["ttft_s"]["count"] == 6


def test_sweep_stops_where_throughput_stops_growing(run_cli: RunCli) -> None:
    """The server streams at most 2 requests at once: from 2 to 4 streams nothing is gained."""
    with serve(Behaviour(max_parallel=2, token_delay=0.01)) as (url, _):
        r = run_cli("--url", url, *SHORT, "--concurrency", "1", "--requests", "4", "--sweep", "--sweep-max-concurrency", "16",
                    "--sweep-min-gain", "0.3")  # fmt: skip
    assert r.code == 0, r.err
    env = json.loads(r.out)
    sweep = env["sweep"]
    assert sweep["levels"] == [1, 2, 4] and sweep["knee_concurrency"] == 2
    assert "from concurrency 2 to 4" in sweep["stopped"]
    phases = {lv["concurrency"]: (lv["phase"], lv["requests"]) for lv in env["levels"]}
    assert phases == {1: ("target", 4), 2: ("sweep", 8), 4: ("sweep", 16)}  # the target level is not run twice
    assert checks(env)["sweep_knee_concurrency"]["measured"] == 2


def test_sweep_to_its_largest_level(run_cli: RunCli) -> None:
    with serve(Behaviour(token_delay=0.01)) as (url, _):
        r = run_cli("--url", url, *SHORT, "--concurrency", "1", "--requests", "2", "--sweep", "--sweep-max-concurrency", "4",
                    "--sweep-min-gain", "0.2")  # fmt: skip
    assert r.code == 0, r.err
    sweep = json.loads(r.out)["sweep"]
    assert sweep["levels"] == [1, 2, 4] and sweep["knee_concurrency"] == 4 and sweep["stopped"] == "reached the largest level (4)"


def test_a_failure_in_a_later_level_ends_the_run(run_cli: RunCli) -> None:
    with serve(Behaviour(completions="500", bad_after=5)) as (url, _):
        r = run_cli("--url", url, *SHORT, "--concurrency", "2,2,1", "--requests", "4")
    assert r.code == 1
    assert r.err.startswith("verify: 1 of 4 load requests failed at concurrency 1 (level), 2 not sent; first: HTTP 500")
    env = json.loads(r.out)
    assert [(lv["complete"], lv["failed"], lv["not_sent"]) for lv in env["levels"]] == [(4, 0, 0), (1, 1, 2)]
    assert env["load"]["complete"] == 4


def test_counters_other_than_the_clients_miss(run_cli: RunCli) -> None:
    with serve(Behaviour(counter_extra_tokens=1)) as (url, _):
        r = run_cli("--url", url, *SHORT, "--requests", "4")
        shared = run_cli("--url", url, *SHORT, "--requests", "4", "--shared-server")
    assert r.code == 2
    c = checks(json.loads(r.out))["server_generation_tokens"]
    assert (c["measured"], c["target"], c["verdict"]) == (36, "= 32", "fail")
    assert "pass --shared-server" in c["detail"]
    assert shared.code == 0, shared.err
    assert checks(json.loads(shared.out))["server_generation_tokens"]["verdict"] == "warn"


def test_refusals_are_counted(run_cli: RunCli) -> None:
    with serve(Behaviour(completions="429", bad_after=2)) as (url, _):
        r = run_cli("--url", url, *SHORT, "--requests", "6", "--concurrency", "1")
    assert r.code == 1
    load = json.loads(r.out)["load"]
    assert (load["complete"], load["failed"], load["refused"], load["not_sent"]) == (2, 1, 1, 3)
    assert "HTTP 429" in r.err


@pytest.mark.parametrize("value", ["0", "2,,3", "x", "-1,2"])
def test_bad_concurrency_lists(run_cli: RunCli, value: str) -> None:
    r = run_cli("--url", "http://h:1", "--concurrency", value)
    assert r.code == 1 and r.err.startswith("verify: usage: argument --concurrency")


def test_events_of_one_read_come_as_one_batch() -> None:
    got: list[tuple[list[bytes], float]] = []
    p = SseParser(on_batch=lambda events, t: got.append((events, t)))
    p.feed(b"data: a\n\ndata: b\ndata: c\n\n: comment\n\ndata: d\n\ndata: e", 1.0)
    p.feed(b"\n\n", 2.0)
    assert got == [([b"a", b"b\nc", b"d"], 1.0), ([b"e"], 2.0)]
    with pytest.raises(TypeError):
        SseParser()


def test_stream_events_parse_strictly() -> None:
    st = _Stream()
    chunk = b'{"choices": [{"text": "x", "finish_reason": null}]}'
    st.on_events([chunk, b" " + chunk + b" "], 1.0)  # whitespace around the JSON is fine
    assert st.first == 1.0 and st.itl == [0.0]
    for bad in (chunk + b"x", b'{"choices": [{"text": "x"}]', b"\xff"):
        with pytest.raises(ProtocolError, match="malformed SSE: invalid JSON in event"):
            _Stream().on_events([bad], 1.0)
    with pytest.raises(ProtocolError, match="not a JSON object"):
        _Stream().on_events([b"[1]"], 1.0)
    with pytest.raises(ProtocolError, match="event after \\[DONE\\]"):
        _Stream().on_events([b"[DONE]", chunk], 1.0)
