"""Against the last good run: the baseline search and the regression verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, serve
from llmfleet.verify import history

WORKLOAD = {"concurrency": 2, "prompt_tokens": 16, "output_tokens": 8}
ARGS = ("--concurrency", "2", "--prompt-tokens", "16", "--output-tokens", "8", "--requests", "4", "--no-ladder", "--json")


def result(name: str | None, started: str, *, code: int = 0, url: str = "http://h:1", tps: float = 100.0, ttft: float = 0.01,
           tpot: float = 1e-3, **load: Any) -> dict[str, Any]:  # fmt: skip
    return {
        "schema": "llmfleet.verify/1",
        "ok": code == 0,
        "exit_code": code,
        "run_id": f"run-{started}",
        "started_at": started,
        "instance": {"name": name, "url": url, "model": "tiny-llama", "generation": "g1"},
        "load": {**WORKLOAD, "output_tokens_per_s": tps, "ttft_s": {"p50": ttft}, "tpot_s": {"p50": tpot}, "e2el_s": {"p50": 1.0}, **load},
    }


def put(d: Path, rel: str, env: dict[str, Any]) -> Path:
    p = d / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(env))
    return p


def test_newest_passing_result_of_the_instance(tmp_path: Path) -> None:
    put(tmp_path, "g1/tiny.json", result("tiny", "2026-01-01T00:00:00+00:00"))
    newest = put(tmp_path, "g2/tiny.json", result("tiny", "2026-01-03T00:00:00+00:00"))
    put(tmp_path, "g3/tiny.json", result("tiny", "2026-01-04T00:00:00+00:00", code=2))  # missed a target: not a baseline
    put(tmp_path, "g3/other.json", result("other", "2026-01-05T00:00:00+00:00"))  # another instance
    put(tmp_path, "g3/x.json", {"not": "verify"})
    (tmp_path / "g3" / "broken.json").write_text("{")
    found = history.find_baseline(str(tmp_path), "tiny", "http://h:1")
    assert found.baseline is not None and found.baseline.path == str(newest)
    assert (found.scanned, found.skipped) == (3, 2)
    # the current run is never its own baseline
    again = history.find_baseline(str(tmp_path), "tiny", "http://h:1", "run-2026-01-03T00:00:00+00:00").baseline
    assert again is not None and again.path.endswith("g1/tiny.json")
    assert history.find_baseline(str(tmp_path / "nope"), "tiny", "u").baseline is None


def test_without_an_instance_name_the_url_identifies(tmp_path: Path) -> None:
    put(tmp_path, "a.json", result(None, "2026-01-01T00:00:00+00:00", url="http://h:1"))
    put(tmp_path, "b.json", result(None, "2026-01-02T00:00:00+00:00", url="http://h:2"))
    found = history.find_baseline(str(tmp_path), None, "http://h:1")
    assert found.baseline is not None and found.baseline.path.endswith("a.json")


def test_compare_by_hand() -> None:
    base = history.Baseline("p", result("tiny", "t0", tps=100.0, ttft=0.010))
    now = {**WORKLOAD, "output_tokens_per_s": 79.0, "ttft_s": {"p50": 0.0121}, "tpot_s": {"p50": 0.001}, "e2el_s": {}}
    got = {c.name: c for c in history.compare(now, base, 0.2)}
    assert got["regression_output_tokens_per_s"].verdict == "fail" and got["regression_output_tokens_per_s"].target == ">= 80 (-20%)"
    assert got["regression_ttft_p50_s"].verdict == "warn" and "+21.0%" in got["regression_ttft_p50_s"].detail  # noisy: warns
    assert got["regression_tpot_p50_s"].verdict == "pass"
    assert got["regression_e2el_p50_s"].verdict == "info"  # not in both runs
    assert history.not_comparable({**WORKLOAD, "concurrency": 8}, "tiny-llama", base) == "concurrency 2 then, 8 now"
    assert history.not_comparable(now, "llama-70b", base) == "model tiny-llama then, llama-70b now"
    assert history.not_comparable(now, "tiny-llama", base) is None


def test_regression_beyond_the_tolerance_fails(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(token_delay=0.001)) as (url, _):
        env = result(None, "2026-01-01T00:00:00+00:00", url=url, tps=1e9, ttft=1e-9, tpot=1e-9)
        put(tmp_path, "g0/adhoc.json", env)
        r = run_cli("--url", url, *ARGS, "--history", str(tmp_path))
    assert r.code == 2
    out = json.loads(r.out)
    c = {x["name"]: x for x in out["checks"]}
    assert c["regression_output_tokens_per_s"]["verdict"] == "fail"
    assert c["regression_tpot_p50_s"]["verdict"] == "fail"
    assert c["regression_ttft_p50_s"]["verdict"] == "warn"
    assert out["history"]["baseline"]["path"] == str(tmp_path / "g0" / "adhoc.json")
    assert "verify: target missed: regression_output_tokens_per_s" in r.err


def test_a_generous_baseline_passes_and_other_workloads_are_not_compared(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(token_delay=0.001)) as (url, _):
        put(tmp_path, "g0/a.json", result(None, "2026-01-01T00:00:00+00:00", url=url, tps=1.0, ttft=100.0, tpot=1.0))
        r = run_cli("--url", url, *ARGS, "--history", str(tmp_path), "--regression-tolerance", "0")
        put(tmp_path, "g0/a.json", result(None, "2026-01-01T00:00:00+00:00", url=url, tps=1e9, concurrency=16))
        other = run_cli("--url", url, *ARGS, "--history", str(tmp_path))
        none = run_cli("--url", url, *ARGS, "--history", str(tmp_path), "--no-history")
    assert r.code == 0, r.err
    assert {x["verdict"] for x in json.loads(r.out)["checks"] if x["name"].startswith("regression_")} == {"pass"}
    assert other.code == 0, other.err
    c = {x["name"]: x for x in json.loads(other.out)["checks"]}
    assert c["regression"]["verdict"] == "info" and "concurrency 16 then, 2 now" in c["regression"]["detail"]
    assert none.code == 0 and json.loads(none.out)["history"] is None


def test_on_a_host_the_plan_root_keeps_the_history(run_cli: RunCli, tmp_path: Path) -> None:
    """The role writes <root>/verify/<generation>/<instance>.json; with --plan that is the default history."""
    root = tmp_path / "root"
    (root / "verify").mkdir(parents=True)
    with serve(Behaviour()) as (url, _):
        inst = {"name": "tiny", "served_model_name": "tiny-llama", "url": url, "load": {**WORKLOAD, "requests": 4}}
        plan = tmp_path / "plan.json"
        plan.write_text(json.dumps({"schema": 1, "generation": "g2", "root": str(root), "instances": [inst]}))
        first = run_cli("--plan", str(plan), "--json", "--no-ladder")
        earlier = json.loads(first.out)
        put(root / "verify", "g1/tiny.json", {**earlier, "load": {**earlier["load"], "output_tokens_per_s": 1e12}})
        second = run_cli("--plan", str(plan), "--json", "--no-ladder")
    assert first.code == 0, first.err
    assert json.loads(first.out)["history"]["baseline"] is None
    assert second.code == 2 and "regression_output_tokens_per_s" in second.err


@pytest.mark.parametrize("value", ["1", "-0.1", "x", "nan"])
def test_bad_tolerance(run_cli: RunCli, value: str) -> None:
    r = run_cli("--url", "http://h:1", "--regression-tolerance", value)
    assert r.code == 1 and r.err.startswith("verify: usage: argument --regression-tolerance")


def test_plan_target_max_regression_sets_the_tolerance_and_the_flag_wins() -> None:
    from llmfleet.verify.config import config_from_instance

    inst = {"name": "a", "url": "http://127.0.0.1:1", "served_model_name": "m", "targets": {"max_regression": 0.5}}
    assert config_from_instance(inst).regression_tolerance == 0.5
    assert config_from_instance(inst, regression_tolerance=0.1).regression_tolerance == 0.1
    assert config_from_instance(dict(inst, targets={})).regression_tolerance == 0.2
