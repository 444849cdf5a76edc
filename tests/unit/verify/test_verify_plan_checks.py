"""Checks against the plan's predictions: revision, max_model_len, KV capacity, the bandwidth bound."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import RunCli
from fake_vllm import Behaviour, serve
from llmfleet.verify.config import PlanFacts, plan_facts

STORE = "/var/lib/llmfleet/store/c26beedea58de6f870e497ee414e4ce6-tiny-llama"
LIGHT = ("--requests", "4", "--no-ladder", "--no-history")


def write_plan(tmp_path: Path, url: str, *, accelerator: str = "cpu", store: str = STORE, **inst_extra: Any) -> Path:
    """A plan (schema 1) of one instance with the fake server's KV figures (1024 blocks × 16) predicted."""
    capacity = {
        "kv": {"tokens": 1024 * 16, "num_blocks": 1024, "block_size": 16, "estimate": False},
        "decode": {"bandwidth_gbs": 10.0, "tokens_per_s_bound": 3719.9},
    }
    inst: dict[str, Any] = {
        "name": "tiny",
        "model": "tiny-llama",
        "served_model_name": "tiny-llama",
        "url": url,
        "max_model_len": 2048,
        "targets": {"min_context_tokens": 2048},
        "load": {"concurrency": 2, "requests": 4, "prompt_tokens": 16, "output_tokens": 8},
        "capacity": capacity,
    }
    for key, value in inst_extra.items():
        if isinstance(value, dict) and isinstance(inst.get(key), dict):
            inst[key] = {**inst[key], **value}
        else:
            inst[key] = value
    plan = {
        "schema": 1,
        "host": "lab1",
        "generation": "g" * 24,
        "root": str(tmp_path / "root"),
        "hardware": {"accelerator": accelerator},
        "models": {"tiny-llama": {"store_path": store, "revision": "c33e7e0a84bf" + "0" * 52, "files": []}},
        "instances": [inst],
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def checks(out: str) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(out)["checks"]}


def test_plan_facts_read_what_the_planner_wrote(tmp_path: Path) -> None:
    plan = json.loads(write_plan(tmp_path, "http://h:1").read_text())
    f = plan_facts(plan, plan["instances"][0])
    assert f == PlanFacts("tiny-llama", STORE, "c33e7e0a84bf" + "0" * 52, "cpu", 16384, 1024, 16, False, 3719.9)
    assert f.kv_exact
    assert not PlanFacts(accelerator="cuda", kv_tokens=1).kv_exact
    assert not PlanFacts(accelerator="cpu", kv_tokens=1, kv_estimate=True).kv_exact
    # anything malformed is simply not compared
    junk = {"model": 3, "capacity": {"kv": "no", "decode": {"tokens_per_s_bound": True}}}
    assert plan_facts({"models": [], "hardware": "x"}, junk) == PlanFacts()


def test_everything_as_planned_passes(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(root=STORE + "/")) as (url, _):
        r = run_cli("--plan", str(write_plan(tmp_path, url)), "--json", *LIGHT)
    assert r.code == 0, r.err
    c = checks(r.out)
    assert c["model_revision"]["verdict"] == "pass" and c["model_revision"]["measured"] == STORE.rsplit("/", 1)[1]
    assert c["max_model_len_plan"]["verdict"] == "pass"
    kv = c["kv_cache_plan"]
    assert (kv["verdict"], kv["measured"], kv["target"]) == ("pass", 16384, "= 16384")
    assert "CPU: exact" in kv["detail"]
    env = json.loads(r.out)
    assert env["plan"]["kv_tokens"] == 16384 and env["plan"]["model_root"] == STORE
    assert env["server"]["kv_cache"]["ratio_to_plan"] == 1.0


def test_wrong_revision_cannot_be_measured(run_cli: RunCli, tmp_path: Path) -> None:
    """Other weights than the plan's: exit 1 like a wrong model id (figures of other weights say nothing)."""
    other = "/var/lib/llmfleet/store/0123456789abcdef0123456789abcdef-tiny-llama"
    with serve(Behaviour(root=other)) as (url, fake):
        r = run_cli("--plan", str(write_plan(tmp_path, url)), "--json", *LIGHT)
    assert r.code == 1
    assert r.err == f"verify: wrong model revision: server serves {other}, the plan's (revision c33e7e0a84bf, store path) is {STORE}\n"
    c = checks(r.out)
    assert c["model_revision"]["verdict"] == "fail" and c["model_revision"]["measured"] == other
    assert fake.state.stream_requests == 0  # nothing measured on the wrong weights


def test_no_root_published_only_warns(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(root="")) as (url, _):
        r = run_cli("--plan", str(write_plan(tmp_path, url)), "--json", *LIGHT)
    assert r.code == 0, r.err
    assert checks(r.out)["model_revision"]["verdict"] == "warn"


def test_max_model_len_other_than_planned_misses(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(root=STORE, max_model_len=4096)) as (url, _):
        r = run_cli("--plan", str(write_plan(tmp_path, url)), "--json", *LIGHT)
    assert r.code == 2
    c = checks(r.out)["max_model_len_plan"]
    assert (c["verdict"], c["measured"], c["target"]) == ("fail", 4096, "= 2048")


def test_kv_capacity_other_than_predicted_on_cpu_misses(run_cli: RunCli, tmp_path: Path) -> None:
    with serve(Behaviour(root=STORE, num_gpu_blocks=1000)) as (url, _):
        r = run_cli("--plan", str(write_plan(tmp_path, url)), "--json", *LIGHT)
    assert r.code == 2
    c = checks(r.out)["kv_cache_plan"]
    assert (c["verdict"], c["measured"], c["target"]) == ("fail", 16000, "= 16384")
    assert c["detail"].startswith("server 16000 tokens in 1000 blocks of 16; plan 16384 tokens in 1024 blocks of 16")
    assert r.err.startswith("verify: target missed: kv_cache_plan 16000 tokens (target = 16384)")


@pytest.mark.parametrize(("blocks", "verdict"), [(1000, "info"), (512, "warn")])
def test_kv_capacity_on_gpus_is_a_ratio(run_cli: RunCli, tmp_path: Path, blocks: int, verdict: str) -> None:
    """GPU capacity comes from profiling at start: reported as a ratio, a warning when far off, never a miss."""
    with serve(Behaviour(root=STORE, num_gpu_blocks=blocks)) as (url, _):
        r = run_cli("--plan", str(write_plan(tmp_path, url, accelerator="cuda")), "--json", *LIGHT)
    assert r.code == 0, r.err
    c = checks(r.out)["kv_cache_plan"]
    assert (c["verdict"], c["measured"], c["target"]) == (verdict, round(blocks / 1024, 3), "ratio to the plan")


def test_kv_target_and_prediction_are_separate_checks(run_cli: RunCli, tmp_path: Path) -> None:
    plan = write_plan(tmp_path, "http://x", targets={"min_kv_cache_tokens": 20000})
    obj = json.loads(plan.read_text())
    with serve(Behaviour(root=STORE)) as (url, _):
        obj["instances"][0]["url"] = url
        plan.write_text(json.dumps(obj))
        r = run_cli("--plan", str(plan), "--json", *LIGHT)
    assert r.code == 2
    c = checks(r.out)
    assert c["kv_cache_tokens"]["verdict"] == "fail" and c["kv_cache_plan"]["verdict"] == "pass"


@pytest.mark.parametrize(("bound", "verdict"), [(1e9, "info"), (0.5, "warn")])
def test_decode_rate_against_the_bandwidth_bound(run_cli: RunCli, tmp_path: Path, bound: float, verdict: str) -> None:
    plan = write_plan(tmp_path, "http://x", capacity={"decode": {"tokens_per_s_bound": bound}})
    obj = json.loads(plan.read_text())
    with serve(Behaviour(root=STORE, token_delay=0.002)) as (url, _):
        obj["instances"][0]["url"] = url
        plan.write_text(json.dumps(obj))
        r = run_cli("--plan", str(plan), "--json", *LIGHT)
    assert r.code == 0, r.err
    env = json.loads(r.out)
    c = checks(r.out)["decode_vs_bandwidth_bound"]
    tpot = env["load"]["tpot_s"]["p50"]
    assert c["verdict"] == verdict and c["measured"] == pytest.approx(1 / tpot, rel=1e-3)
    assert env["server"]["decode"]["share"] == pytest.approx((1 / tpot) / bound)


def test_the_plan_envelope_of_plan_py_and_its_host_by_limit(run_cli: RunCli, tmp_path: Path) -> None:
    """What tools/plan.py -i INV --json prints is a plan file verify reads: -l/--limit names the host."""
    with serve(Behaviour(root=STORE + "/")) as (url, _):
        lab1 = json.loads(write_plan(tmp_path, url).read_text())
        envelope = {"schema": "llmfleet.plan/1", "ok": True, "plans": {"lab1": lab1, "lab2": {**lab1, "host": "lab2"}}, "problems": []}
        path = tmp_path / "plans.json"
        path.write_text(json.dumps(envelope))
        r = run_cli("--plan", str(path), "-l", "lab1", "--json", *LIGHT)
        assert r.code == 0, r.err
        both = run_cli("--plan", str(path), *LIGHT)
        assert both.code == 1 and both.err == f"verify: plan {path} holds 2 hosts (lab1, lab2): pass -l/--limit HOST\n"
        glob = run_cli("--plan", str(path), "-l", "lab*", *LIGHT)
        assert glob.code == 1 and "matches 2 hosts" in glob.err
        one = tmp_path / "one.json"
        one.write_text(json.dumps({**envelope, "plans": {"lab2": lab1}}))
        assert run_cli("--plan", str(one), "--json", *LIGHT).code == 0  # one host: no -l needed
    assert run_cli("-l", "lab1", "--url", url).err == "verify: usage: -l/--limit needs --plan\n"
