from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fake_vllm import toy_tokens
from llmfleet.verify.config import LoadSpec, Targets, VerifyConfig, config_from_instance, plan_instance, read_plan
from llmfleet.verify.errors import VerifyError
from llmfleet.verify.prompts import PromptBuilder


class Tokenizer:
    def __init__(self, count: Any) -> None:
        self.count = count
        self.calls = 0

    async def __call__(self, text: str) -> int:
        self.calls += 1
        result: int = self.count(text)
        return result


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 500, 2044, 32764])
def test_prompt_has_exactly_n_tokens(n: int) -> None:
    tok = Tokenizer(lambda t: len(toy_tokens(t)))  # BOS + 1 or 2 tokens per word
    builder = PromptBuilder(tok)
    prompt = asyncio.run(builder.build(n, seed=3))
    assert len(toy_tokens(prompt)) == n
    assert tok.calls <= 40


def test_prompts_differ_and_reuse_what_was_learned() -> None:
    tok = Tokenizer(lambda t: len(toy_tokens(t)))
    builder = PromptBuilder(tok)

    async def main() -> list[str]:
        return [await builder.build(200, seed) for seed in range(50)]

    prompts = asyncio.run(main())
    assert all(len(toy_tokens(p)) == 200 for p in prompts)
    assert len({p[:20] for p in prompts}) == 50  # the first block differs: no shared prefix to cache
    assert tok.calls < 50 * 6  # about two counts per prompt after the first


def test_prompt_needs_a_last_word_swap() -> None:
    # every word is 2 tokens except "a"/"an"/"at"-style short ones: odd counts need the swap
    def count(t: str) -> int:
        return 1 + sum(1 if len(w) <= 2 else 2 for w in t.split())

    tok = Tokenizer(count)
    for n in (10, 11, 99, 100):
        prompt = asyncio.run(PromptBuilder(tok).build(n, seed=0))
        assert count(prompt) == n


def test_impossible_tokenizer_gives_a_reason_not_a_hang() -> None:
    tok = Tokenizer(lambda t: 1 + 3 * len(t.split()))  # only counts of the form 1 + 3k
    with pytest.raises(VerifyError, match="could not build a prompt of exactly 6 tokens"):
        asyncio.run(PromptBuilder(tok).build(6, seed=0))
    assert tok.calls <= 64


def test_targets_and_load_validation() -> None:
    t = Targets.parse({"min_output_tokens_per_s": 20, "max_ttft_p95_s": 0.5, "min_context_tokens": 2048}, "t")
    assert t == Targets(20, 0.5, 2048, None)
    assert t.merged({"max_ttft_p95_s": 2.0, "min_kv_cache_tokens": None}) == Targets(20, 2.0, 2048, None)
    with pytest.raises(VerifyError, match="unknown target 'max_ttft_p99_s'"):
        Targets.parse({"max_ttft_p99_s": 1}, "t")
    with pytest.raises(VerifyError, match=r"t.min_context_tokens must be an integer, got 20.5"):
        Targets.parse({"min_context_tokens": 20.5}, "t")
    with pytest.raises(VerifyError, match="must be a number, got True"):
        Targets.parse({"max_ttft_p95_s": True}, "t")
    with pytest.raises(VerifyError, match="must be > 0"):
        Targets.parse({"max_ttft_p95_s": 0}, "t")
    with pytest.raises(VerifyError, match="must be > 0"):
        Targets().merged({"max_ttft_p95_s": float("nan")})
    assert LoadSpec.parse({"concurrency": 2}, "l") == LoadSpec(2, 16, 64, 32)
    with pytest.raises(VerifyError, match="unknown key 'rate'"):
        LoadSpec.parse({"rate": 2}, "l")
    with pytest.raises(VerifyError, match=r"l\.requests must be >= 1"):
        LoadSpec.parse({"requests": 0}, "l")
    with pytest.raises(VerifyError, match="min_context_tokens must be > 4"):
        VerifyConfig(url="http://h:1", targets=Targets(min_context_tokens=4))
    with pytest.raises(VerifyError, match="invalid URL"):
        VerifyConfig(url="h:1")
    with pytest.raises(VerifyError, match="must name an environment variable"):
        VerifyConfig(url="http://h:1", api_key_env="NOT-A-NAME")


def _plan(tmp_path: Path, instances: list[dict[str, Any]], schema: int = 1) -> str:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"schema": schema, "host": "lab1", "generation": "g" * 24, "instances": instances}))
    return str(path)


def test_plan_instance_selection(tmp_path: Path) -> None:
    a = {"name": "a", "url": "http://127.0.0.1:8000", "served_model_name": "m", "max_model_len": 2048, "targets": {}, "load": {}}
    b = {**a, "name": "b", "url": "http://127.0.0.1:8001"}
    path = _plan(tmp_path, [a, b])
    plan = read_plan(path)
    assert plan_instance(plan, "b", path)["url"].endswith(":8001")
    with pytest.raises(VerifyError, match=r"has 2 instances \(a, b\): pass --instance"):
        plan_instance(plan, None, path)
    with pytest.raises(VerifyError, match=r"no instance 'c' \(has: a, b\)"):
        plan_instance(plan, "c", path)
    cfg = config_from_instance(plan_instance(plan, "a", path), target_overrides={"max_ttft_p95_s": 3.0})
    assert (cfg.instance, cfg.model, cfg.plan_max_model_len, cfg.targets.max_ttft_p95_s) == ("a", "m", 2048, 3.0)
    with pytest.raises(VerifyError, match="schema 2; this verify reads schema 1"):
        read_plan(_plan(tmp_path, [a], schema=2))
    with pytest.raises(VerifyError, match="cannot read plan"):
        read_plan(str(tmp_path / "missing.json"))
    with pytest.raises(VerifyError, match="'served_model_name' must be a non-empty string"):
        config_from_instance({"name": "x", "url": "http://h:1"})
