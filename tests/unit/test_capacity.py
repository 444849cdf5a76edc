"""The capacity planner on figures checked by hand (the arithmetic is written next to each)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmfleet import capacity as cap
from llmfleet.pins import ArchFacts, load_lock
from llmfleet.rules import Layout, engine_behaviour, load_rulebook
from llmfleet.spec import HardwareProfile

LOCK = load_lock()
CATALOG = Path(__file__).resolve().parents[2] / "tools" / "llmfleet" / "catalog"
HARDWARE = yaml.safe_load((CATALOG / "hardware.yml").read_text())
BOOK = load_rulebook()
GiB = 1 << 30

TINY = ArchFacts(
    architecture="LlamaForCausalLM",
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    hidden_size=128,
    intermediate_size=256,
    vocab_size=1000,
    max_position_embeddings=4096,
    torch_dtype="bfloat16",
)


def behaviour(engine_version: str, hw: str, **engine_args: Any) -> cap.EngineBehaviour:
    """The engine behaviour the evaluator uses: catalog/rules.yml's entry for this version on this
    hardware profile (not one written for the test)."""
    lay = Layout(tp=1, pp=1, gpus=(0,), max_model_len=2048, engine_args=tuple(sorted(engine_args.items())))
    return engine_behaviour(BOOK, engine_version, HardwareProfile.model_validate(HARDWARE[hw]), lay, TINY)


CPU_032 = behaviour("0.32.0", "lab-cpu")
CUDA_019 = behaviour("0.19.0", "xr7620-4xl4")
CUDA_026 = behaviour("0.26.0", "xr7620-4xl4")


def test_rulebook_behaviours_are_the_versions_own() -> None:
    # vllm 0.32.0 CPU: block 128, util 0.92, kv_cache_size_tokens label, null block held back
    assert (CPU_032.block_size, CPU_032.gpu_memory_utilization, CPU_032.token_formula, CPU_032.null_block_reserved) == (
        128,
        0.92,
        "label",
        True,
    )
    # vllm 0.19.0 on an L4 (< 70 GiB): block 16, util 0.9, 2048 tokens and 256 sequences per batch
    assert (CUDA_019.block_size, CUDA_019.gpu_memory_utilization, CUDA_019.max_num_batched_tokens, CUDA_019.max_num_seqs) == (
        16,
        0.9,
        2048,
        256,
    )
    assert CUDA_019.cuda is not None and not CUDA_019.cuda.measured and CUDA_019.cuda.cudagraph_in_budget == "never"
    assert CUDA_026.cuda is not None and CUDA_026.cuda.measured and CUDA_026.gpu_memory_utilization == 0.92


def facts(key: str) -> ArchFacts:
    return LOCK.models[key].architecture


def cpu(f: ArchFacts = TINY, tp: int = 1, pp: int = 1, max_len: int = 2048, kv: int = 1 << 28, **kw: Any) -> dict[str, Any]:
    return cap.plan_capacity(cap.CapacityInput(f, None, tp, pp, max_len, "cpu", 4 * GiB, 10.0, CPU_032, kv_cache_memory_bytes=kv, **kw))


def test_cpu_kv_blocks_and_tokens_tp1() -> None:
    # per token per layer: 2 (K, V) × 2 KV heads × 32 × 2 B = 256 B; page = 128 tokens × 256 = 32 KiB;
    # a block holds both layers: 64 KiB; 256 MiB // 64 KiB = 4096 blocks; 2048 tokens = 16 blocks;
    # tokens = 4096 / 16 × 2048 = 524288
    kv = cpu()["kv"]
    assert kv["bytes_per_token"] == 512
    assert kv["block_size"] == 128 and kv["groups"] == 1
    assert kv["bytes_per_block_per_worker"] == [65536]
    assert kv["num_blocks"] == 4096 and kv["blocks_per_request"] == 16
    assert kv["tokens"] == 524288 and kv["max_concurrency"] == 256.0


def test_cpu_tp2_halves_kv_heads_and_pp2_halves_layers() -> None:
    # tp=2: 1 KV head per rank → 16 KiB pages, 32 KiB blocks → 8192 blocks
    assert cpu(tp=2)["kv"]["num_blocks"] == 8192
    # pp=2: one layer per worker → 32 KiB per block on each → 8192 blocks, the smaller of two equal
    kv = cpu(pp=2)["kv"]
    assert kv["bytes_per_block_per_worker"] == [32768, 32768] and kv["num_blocks"] == 8192
    assert kv["bytes_per_token_per_worker"] == [256, 256] and kv["bytes_per_token"] == 512
    # tp=4 > 2 KV heads: each head replicated on two ranks, still 1 head per rank
    assert cpu(tp=4)["kv"]["num_blocks"] == 8192


def test_tokens_label_when_max_len_is_not_a_multiple_of_the_block() -> None:
    # 2000 tokens = cdiv(2000, 128) = 16 blocks; int(4096 / 16 × 2000) = 512000 (not 4096 × 128)
    kv = cpu(max_len=2000)["kv"]
    assert kv["blocks_per_request"] == 16 and kv["tokens"] == 512000


def test_log_formula_and_fp32_kv_and_fp8_kv() -> None:
    f32 = TINY.model_copy(update={"torch_dtype": "float32"})
    # --dtype auto runs a float32 checkpoint in bfloat16 (weights and KV): as for TINY
    auto = cpu(f32)
    assert auto["kv"]["dtype"] == "bfloat16" and auto["kv"]["num_blocks"] == 4096
    assert auto["weights"]["bytes_per_gpu"] == cpu()["weights"]["bytes_per_gpu"]
    # --dtype float32 keeps it: 4 B per element doubles the page
    forced = cpu(f32, dtype="float32")
    assert forced["kv"]["dtype"] == "float32" and forced["kv"]["num_blocks"] == 2048
    assert cpu(kv_cache_dtype="fp8")["kv"]["num_blocks"] == 8192
    old = cap.plan_capacity(cap.CapacityInput(TINY, None, 1, 1, 2000, "cpu", 4 * GiB, 10.0, CUDA_019, kv_cache_memory_bytes=1 << 28))
    # 0.19 logs num_blocks // groups × block size: 16 B blocks here (CUDA_019 block 16): 256 MiB // (2 × 16 × 256) = 32768
    assert old["kv"]["num_blocks"] == 32768 and old["kv"]["tokens"] == 32768 * 16


def test_model_dtype_resolves_as_vllm_does() -> None:
    # vllm/config/model.py _resolve_auto_dtype with the platform's supported_dtypes
    assert cap.resolve_model_dtype("float32", "auto", "cpu")[0] == "bfloat16"
    assert cap.resolve_model_dtype("float16", "auto", "cpu")[0] == "float16"
    assert cap.resolve_model_dtype("float32", "float", "cpu")[0] == "float32"
    assert cap.resolve_model_dtype("bfloat16", "half", "cuda", "8.9")[0] == "float16"
    assert cap.resolve_model_dtype("float32", "auto", "cuda", "8.9")[0] == "bfloat16"
    # Turing and Volta have no bfloat16: float32 and bfloat16 checkpoints run in float16
    assert cap.resolve_model_dtype("float32", "auto", "cuda", "7.5")[0] == "float16"
    assert cap.resolve_model_dtype("bfloat16", "auto", "cuda", "7.0")[0] == "float16"
    with pytest.raises(ValueError, match="unknown dtype"):
        cap.resolve_model_dtype("bfloat16", "int3", "cpu")


def test_largest_len_and_refusal_figures() -> None:
    # 64 KiB of KV = 1 block of 128 tokens; with the null block held back nothing fits
    kv = cpu(kv=65536)["kv"]
    assert kv["num_blocks"] == 1 and not kv["fits_max_model_len"] and kv["largest_max_model_len"] == 0
    # 11 blocks: 10 usable → 1280 tokens at most
    kv = cpu(kv=11 * 65536)["kv"]
    assert not kv["fits_max_model_len"] and kv["largest_max_model_len"] == 1280


def test_weight_bytes_bf16_by_hand() -> None:
    # per layer: qkv (4 + 2·2)·32 × 128 = 32768, o 128 × 128 = 16384, gate_up 512 × 128 = 65536,
    # down 128 × 256 = 32768, norms 2 × 128 → 147712 params; 2 layers 295424; embedding and untied
    # lm_head 1000 × 128 each; final norm 128 → 551552 params × 2 B
    stages = cap.stage_weights(TINY, "bf16", 1, 1)
    assert len(stages) == 1 and stages[0].bytes == 551552 * 2
    # pp=2: embedding on stage 0, lm_head and final norm on stage 1
    s0, s1 = cap.stage_weights(TINY, "bf16", 1, 2)
    assert s0.bytes == (147712 + 128000) * 2 and s1.bytes == (147712 + 128000 + 128) * 2


def test_nvfp4_is_four_bits_plus_an_fp8_scale_per_16() -> None:
    assert cap.WEIGHT_FORMATS["nvfp4"] == 0.5625
    lin = sum(x.params for x in cap.linear_layers(TINY, 1, True))
    stages = cap.stage_weights(TINY, "nvfp4", 1, 1)
    assert stages[0].detail["quantized"] == int(lin * 0.5625)
    assert stages[0].detail["embedding"] == 1000 * 128 * 2  # embeddings stay in the model dtype


def test_gpu_kv_memory_is_vllms_accounting_by_hand() -> None:
    # vllm 0.26.0 determine_available_memory with the rulebook's figures for that version:
    # requested = ceil((24 GiB − reserve) × 0.5); weights as loaded = 551552 params × 2 B × (1 + bf16
    # overhead) + rotary cache 4096 positions × head 32 × 2 B; peak activation = the larger of the
    # forward pass (T 2048 × 2 B × (4 × 256 + 2 × 128)) and the sampling pass (2048 logit rows ×
    # vocab 1000 × 4 + 2 × 2048 × 128 × 2 B) plus the margin; non-torch at tp 1
    m = CUDA_026.cuda
    assert m is not None
    c = cap.plan_capacity(cap.CapacityInput(TINY, None, 1, 1, 2048, "cuda", 24 * GiB, 300.0, CUDA_026, gpu_memory_utilization=0.5))
    requested = math.ceil((24 * GiB - m.cuda_reserved_bytes["default"]) * 0.5)
    loaded = int(551552 * 2 * (1 + m.load_overhead["bf16"])) + 4096 * 32 * 2
    act = max(2048 * 2 * (4 * 256 + 2 * 128), 2048 * 1000 * 4 + 2 * 2048 * 128 * 2) + m.margin_bytes
    assert c["memory"]["requested_bytes"] == requested
    assert c["memory"]["kv_bytes_per_worker"] == [requested - loaded - act - m.non_torch_bytes]
    # dense model, vLLM 0.26.0: the V2 runner captures CUDA graphs outside the budget
    assert c["memory"]["cudagraph_in_budget_bytes"] == 0
    # a MoE model runs the V1 runner, whose CUDA-graph estimate comes out of the budget; eager has none
    moe = TINY.model_copy(update={"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64})
    g = cap.plan_capacity(cap.CapacityInput(moe, None, 1, 1, 2048, "cuda", 24 * GiB, 300.0, CUDA_026, gpu_memory_utilization=0.5))
    assert g["memory"]["cudagraph_in_budget_bytes"] == m.cudagraph_estimate_bytes and g["kv"]["estimate"]
    eager = behaviour("0.26.0", "xr7620-4xl4", enforce_eager=True)
    e = cap.plan_capacity(cap.CapacityInput(moe, None, 1, 1, 2048, "cuda", 24 * GiB, 300.0, eager, gpu_memory_utilization=0.5))
    assert e["memory"]["cudagraph_in_budget_bytes"] == 0


def test_decode_bound_by_hand() -> None:
    # batch 1: weights read = everything but the embedding (lm_head read): (295424 + 128000 + 128) × 2 B;
    # KV read at 2048 tokens: 512 B × 2048; 10 GB/s ÷ (846 304 + 1 048 576) B
    c = cpu()
    read = (295424 + 128000 + 128) * 2 + 512 * 2048
    assert c["decode"]["read_bytes_per_token"] == [read]
    assert c["decode"]["tokens_per_s_bound"] == round(10e9 / read, 1)


def test_pp_partition_matches_vllm() -> None:
    assert [len(r) for r in cap.pp_partition(5, 2)] == [3, 2]
    assert [len(r) for r in cap.pp_partition(7, 4)] == [2, 2, 2, 1]
    assert [len(r) for r in cap.pp_partition(60, 2)] == [30, 30]


def test_nemotron_in_proj_gives_the_field_size_n() -> None:
    f = facts("nemotron-3-nano-30b-a3b-nvfp4")
    # 2 × 64·64 + 2 × 8 × 128 + 64 = 10304 columns; 5152 per rank at tp=2
    for tp, n in ((1, 10304), (2, 5152), (4, 2576)):
        in_proj = next(x for x in cap.linear_layers(f, tp, True) if x.name == "model.layers.0.mixer.in_proj")
        assert in_proj.n == n and in_proj.k == 2688 and in_proj.quantized
    # the Mamba layer that feeds attention stays bf16 in the NVFP4 checkpoint
    layer4 = next(x for x in cap.linear_layers(f, 1, True) if x.name == "model.layers.4.mixer.in_proj")
    assert not layer4.quantized
    assert not cap.marlin_ok(5152, 2688, [(64, 128), (128, 64)]) and cap.marlin_ok(10304, 2688, [(64, 128), (128, 64)])
    assert cap.tile_failure(5152, 2688, [(64, 128), (128, 64)]) == "size_n = 5152 is not divisible by 64"


def test_nemotron_mamba_state_and_hybrid_block_size() -> None:
    f = facts("nemotron-3-nano-30b-a3b-nvfp4")
    specs = cap.layer_kv(f, 1, "fp8")
    mamba = [s for s in specs if s.kind == "mamba"]
    attn = [s for s in specs if s.kind == "full"]
    assert len(mamba) == 23 and len(attn) == 6
    # conv (4 − 1) × (4096 + 2·8·128) × 2 B = 36864; ssm 64 × 64 × 128 × 4 B (float32) = 2097152
    assert mamba[0].state_bytes == 36864 + 2097152
    # attention: 2 × 2 KV heads × 128 × 1 B (fp8) = 512 B/token; block = 16 · cdiv(2134016, 16 · 512) = 4176
    plan = cap.kv_groups(specs, 16)
    assert attn[0].bytes_per_token == 512 and plan.block_size == 4176
    # 6 attention layers set the group size: 23 Mamba layers → 4 groups (one padded), 1 attention group
    assert plan.group_size == 6 and len(plan.groups) == 5
    assert cap.blocks_per_request(plan, specs, 32768, 2048) == cdiv_blocks(32768, 4176) + 4


def cdiv_blocks(n: int, b: int) -> int:
    return -(-n // b)


def test_gemma4_sliding_and_global_layers() -> None:
    f = facts("gemma-4-31b-it-nvfp4")
    specs = cap.layer_kv(f, 2, "fp8")
    sliding = [s for s in specs if s.kind == "sliding"]
    full = [s for s in specs if s.kind == "full"]
    # 50 sliding layers: 2 × 16/2 KV heads × 256 × 1 B = 4096 B/token; 10 global: 2 × 4/2 × 512 × 1 = 2048
    assert len(sliding) == 50 and len(full) == 10
    assert sliding[0].bytes_per_token == 4096 and sliding[0].window == 1024 and full[0].bytes_per_token == 2048
    plan = cap.kv_groups(specs, 16)
    # pages unified at 64 KiB: global layers use 32-token blocks; 6 groups of 10 layers
    assert plan.page_bytes == 65536 and plan.group_size == 10 and len(plan.groups) == 6
    assert {g.block_size for g in plan.groups if g.kind == "full"} == {32}
    # one 8192-token request: full group cdiv(8192, 32) = 256; each sliding group
    # cdiv(min(1023 + 2048, 8192), 16) + 1 = 193 → 256 + 5 × 193
    assert cap.blocks_per_request(plan, specs, 8192, 2048) == 256 + 5 * 193


def test_gemma4_nvfp4_keeps_attention_bf16() -> None:
    f = facts("gemma-4-31b-it-nvfp4")
    lins = cap.linear_layers(f, 2, True)
    assert all(not x.quantized for x in lins if "self_attn" in x.name)
    assert all(x.quantized for x in lins if ".mlp." in x.name)
    qkv_global = next(x for x in lins if x.name == "language_model.model.layers.5.self_attn.qkv_proj")
    assert qkv_global.n == (16 + 2 * 2) * 512  # 32/2 q heads + K and V of 4/2 global KV heads, head 512


@pytest.mark.parametrize(("quant", "fmt"), [(None, "bf16"), ("NVFP4", "nvfp4"), ("modelopt_fp4", "nvfp4"), ("fp8", "fp8"), ("awq", "int4")])
def test_weight_format_names(quant: str | None, fmt: str) -> None:
    assert cap.weight_format(quant, "bfloat16") == fmt


def test_unknown_format_and_dtype_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown quantization"):
        cap.weight_format("int3")
    with pytest.raises(ValueError, match="unknown dtype"):
        cap.dtype_bytes("fp6")


def test_facts_validation() -> None:
    with pytest.raises(ValueError, match="hybrid_override_pattern has 3 layers"):
        TINY.model_validate({**TINY.model_dump(), "hybrid_override_pattern": "M*E"})
    with pytest.raises(ValueError, match="sliding_window is not given"):
        TINY.model_validate({**TINY.model_dump(), "layer_types": ["sliding_attention", "full_attention"]})


def test_estimate_flag_marks_hybrid_grouping() -> None:
    assert cpu()["kv"]["estimate"] is False
    g = cap.plan_capacity(cap.CapacityInput(facts("gemma-4-31b-it-nvfp4"), "nvfp4", 2, 1, 8192, "cuda", int(22.5 * GiB), 300.0, CUDA_019))
    assert g["kv"]["estimate"] is True


def test_model_catalog_states_only_facts_a_pin_also_carries() -> None:
    catalog = cap.model_catalog()
    assert {"gemma-4-31b-it", "gemma-4-31b-it-nvfp4"} <= set(catalog)
    for key, entry in catalog.items():
        assert entry["facts"] and entry["sources"] and entry["source"].startswith("hf://")
        pinned = facts(key).model_dump()
        assert {k: pinned[k] for k in entry["facts"]} == entry["facts"], key


def test_model_catalog_refuses_a_fact_the_planner_does_not_know(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from importlib import resources

    (tmp_path / "models.yml").write_text("m:\n  source: hf://a/b\n  facts: {vision_params: 3}\n")
    monkeypatch.setattr(resources, "files", lambda _pkg: tmp_path)
    with pytest.raises(ValueError, match=r"unknown fact\(s\) vision_params"):
        cap.model_catalog()
