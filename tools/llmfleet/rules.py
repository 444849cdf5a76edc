"""Compatibility rules: data in ``catalog/rules.yml``, checks here, verdicts for the evaluator.

A rule names a check (a function below, registered in :data:`CHECKS`), the engine versions it
applies to, its verdict (``refuse`` / ``warn`` / ``advise``), a message template, what would be
valid and a reference. :func:`analyse` runs every rule on one instance layout together with the
capacity planner and returns each rule's result — also the ones that passed or did not apply, with
why — so ``tools/plan.py --explain`` can show the whole reasoning and ``--recommend`` can rank
layouts. Nothing here imports vLLM: what a release declares was read when it was pinned.

Check functions return an :class:`Outcome`; the fields they report are what messages may use.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

import yaml

from . import capacity as cap
from .cuda import driver_version
from .pins import ArchFacts, ModelPin, RuntimePin
from .spec import HardwareProfile

Verdict = Literal["refuse", "warn", "advise"]
Status = Literal["fired", "passed", "not_applicable", "unknown"]
TOPOLOGY_ORDER = ["X", "NV", "PIX", "PXB", "PHB", "NODE", "SYS"]
TOPOLOGY_WORDS = {
    "NODE": "the host bridges of one NUMA node",
    "SYS": "the CPU socket interconnect",
    "PHB": "a PCIe host bridge",
    "PXB": "several PCIe switches",
    "PIX": "one PCIe switch",
}


# --- versions -----------------------------------------------------------------------------------


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.20.2"`` → ``(0, 20, 2)``; suffixes (``rc1``, ``.post2``, ``+cpu``) are ignored."""
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    if not m:
        raise ValueError(f"not a version: {version!r}")
    parts = [int(p) for p in m.group(1).split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


@dataclass(frozen=True)
class Applies:
    engine_from: str | None = None
    engine_below: str | None = None
    accelerator: str | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Applies:
        raw = raw or {}
        unknown = set(raw) - {"engine", "accelerator"}
        if unknown:
            raise ValueError(f"unknown 'applies' keys {sorted(unknown)} (known: engine, accelerator)")
        engine = raw.get("engine") or {}
        if set(engine) - {"from", "below"}:
            raise ValueError(f"unknown engine range keys {sorted(set(engine) - {'from', 'below'})} (known: from, below)")
        for v in engine.values():
            version_tuple(str(v))
        return cls(
            str(engine["from"]) if "from" in engine else None,
            str(engine["below"]) if "below" in engine else None,
            raw.get("accelerator"),
        )

    def engine_text(self) -> str:
        if self.engine_from and self.engine_below:
            return f"vLLM {self.engine_from} to below {self.engine_below}"
        if self.engine_from:
            return f"vLLM {self.engine_from} and later"
        if self.engine_below:
            return f"vLLM below {self.engine_below}"
        return "every vLLM version"

    def matches(self, engine_version: str | None, accelerator: str) -> tuple[bool, str]:
        if self.accelerator and self.accelerator != accelerator:
            return False, f"applies to {self.accelerator} profiles only"
        if self.engine_from or self.engine_below:
            if engine_version is None:
                return False, f"applies to {self.engine_text()}; no runtime version known"
            v = version_tuple(engine_version)
            if self.engine_from and v < version_tuple(self.engine_from):
                return False, f"applies to {self.engine_text()}; the runtime carries vLLM {engine_version}"
            if self.engine_below and v >= version_tuple(self.engine_below):
                return False, f"applies to {self.engine_text()}; the runtime carries vLLM {engine_version}"
        return True, ""


# --- the catalog --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    id: str
    title: str
    applies: Applies
    check: str
    params: dict[str, Any]
    by_version: tuple[tuple[Applies, dict[str, Any]], ...]
    field: str
    verdict: Verdict
    message: str
    valid: str
    reference: str

    def params_for(self, engine_version: str | None, accelerator: str) -> dict[str, Any]:
        for applies, params in self.by_version:
            if applies.matches(engine_version, accelerator)[0]:
                return {**self.params, **params}
        return dict(self.params)


@dataclass(frozen=True)
class EngineDefaults:
    applies: Applies
    gpu_memory_utilization: float
    token_formula: str
    null_block_reserved: bool
    reference: str


@dataclass(frozen=True)
class RuleBook:
    rules: tuple[Rule, ...]
    engines: tuple[EngineDefaults, ...]
    block_size: dict[str, int]
    max_num_batched_tokens: dict[str, int]
    cuda: tuple[tuple[Applies, cap.CudaMemory], ...] = ()
    max_num_seqs: dict[str, int] = field(default_factory=lambda: {"cuda": 256, "cuda_70gib": 1024, "cpu": 256})

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def cuda_memory(self, engine_version: str | None) -> cap.CudaMemory | None:
        for applies, memory in self.cuda:
            if applies.matches(engine_version, "cuda")[0]:
                return memory
        return None

    def engine(self, engine_version: str | None, accelerator: str) -> EngineDefaults:
        for e in self.engines:
            if e.applies.matches(engine_version, accelerator)[0]:
                return e
        return self.engines[-1]


RULE_KEYS = {"id", "title", "applies", "check", "params", "by_version", "field", "verdict", "message", "valid", "reference"}


def parse_rulebook(data: Mapping[str, Any]) -> RuleBook:
    rules = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("rules") or []):
        where = f"rules[{i}] ({raw.get('id', '?')})"
        unknown = set(raw) - RULE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        missing = {"id", "check", "verdict", "message", "reference", "field"} - set(raw)
        if missing:
            raise ValueError(f"{where}: missing {sorted(missing)}")
        if raw["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(raw["id"])
        if raw["check"] not in CHECKS:
            raise ValueError(f"{where}: unknown check {raw['check']!r} (known: {', '.join(sorted(CHECKS))})")
        if raw["verdict"] not in ("refuse", "warn", "advise"):
            raise ValueError(f"{where}: verdict must be refuse, warn or advise")
        rules.append(
            Rule(
                id=raw["id"],
                title=raw.get("title", raw["id"]),
                applies=Applies.parse(raw.get("applies")),
                check=raw["check"],
                params=dict(raw.get("params") or {}),
                by_version=tuple((Applies.parse(v.get("applies")), dict(v.get("params") or {})) for v in raw.get("by_version") or []),
                field=raw["field"],
                verdict=raw["verdict"],
                message=" ".join(str(raw["message"]).split()),
                valid=" ".join(str(raw.get("valid", "")).split()),
                reference=" ".join(str(raw["reference"]).split()),
            )
        )
    c = data.get("capacity") or {}
    engines = tuple(
        EngineDefaults(
            Applies.parse(e.get("applies")),
            float(e["gpu_memory_utilization"]),
            str(e["token_formula"]),
            bool(e["null_block_reserved"]),
            " ".join(str(e.get("reference", "")).split()),
        )
        for e in c.get("engine") or []
    )
    if not engines:
        raise ValueError("capacity.engine needs at least one entry")
    return RuleBook(
        tuple(rules),
        engines,
        dict(c.get("block_size") or {"cuda": 16, "cpu": 128}),
        dict(c.get("max_num_batched_tokens") or {"cuda": 2048, "cuda_70gib": 8192, "cpu_per_rank": 2048}),
        tuple((Applies.parse(m.get("applies")), parse_cuda_memory(m)) for m in c.get("cuda") or []),
        dict(c.get("max_num_seqs") or {"cuda": 256, "cuda_70gib": 1024, "cpu": 256}),
    )


CUDA_KEYS = {f.name for f in dataclasses.fields(cap.CudaMemory)} | {"applies"}


def parse_cuda_memory(raw: Mapping[str, Any]) -> cap.CudaMemory:
    """One ``capacity.cuda`` entry of rules.yml."""
    unknown = set(raw) - CUDA_KEYS
    if unknown:
        raise ValueError(f"capacity.cuda: unknown keys {sorted(unknown)}")
    if raw.get("cudagraph_in_budget") not in ("never", "always", "v1_runner"):
        raise ValueError(f"capacity.cuda: cudagraph_in_budget {raw.get('cudagraph_in_budget')!r} (valid: never, always, v1_runner)")
    if "default" not in (raw.get("cuda_reserved_bytes") or {}):
        raise ValueError("capacity.cuda: cuda_reserved_bytes needs a default")
    return cap.CudaMemory(
        measured=bool(raw["measured"]),
        reference=" ".join(str(raw.get("reference", "")).split()),
        cuda_reserved_bytes={str(k): int(v) for k, v in raw["cuda_reserved_bytes"].items()},
        non_torch_bytes=int(raw["non_torch_bytes"]),
        non_torch_per_peer_bytes=int(raw["non_torch_per_peer_bytes"]),
        logits_rows=int(raw["logits_rows"]),
        load_overhead={str(k): float(v) for k, v in raw["load_overhead"].items()},
        cudagraph_in_budget=str(raw["cudagraph_in_budget"]),
        cudagraph_estimate_bytes=int(raw["cudagraph_estimate_bytes"]),
        margin_bytes=int(raw["margin_bytes"]),
    )


@lru_cache(maxsize=1)
def load_rulebook() -> RuleBook:
    text = resources.files("llmfleet.catalog").joinpath("rules.yml").read_text()
    return parse_rulebook(yaml.safe_load(text))


# --- one layout and its context -----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    gpus: tuple[int, ...]
    max_model_len: int
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    engine_args: tuple[tuple[str, Any], ...] = ()
    min_kv_cache_tokens: int | None = None

    def arg(self, name: str, default: Any = None) -> Any:
        return dict(self.engine_args).get(name, default)

    def value(self, field_name: str) -> Any:
        return {
            "tensor_parallel": self.tp,
            "pipeline_parallel": self.pp,
            "gpus": list(self.gpus),
            "max_model_len": self.max_model_len,
            "targets.min_kv_cache_tokens": self.min_kv_cache_tokens,
        }.get(field_name)


@dataclass
class Context:
    book: RuleBook
    model_key: str
    model: ModelPin
    runtime_key: str | None
    runtime: RuntimePin | None
    hw: HardwareProfile
    hw_key: str
    layout: Layout
    capacity: dict[str, Any] | None = None
    capacity_error: str | None = None
    nested: bool = False

    @property
    def facts(self) -> ArchFacts:
        return self.model.architecture

    @property
    def engine_version(self) -> str | None:
        return self.runtime.vllm_version if self.runtime else None

    @property
    def weight_format(self) -> str:
        return cap.weight_format(self.model.quantization, self.facts.torch_dtype)

    def base_fields(self) -> dict[str, Any]:
        return {
            "model": self.model_key,
            "architecture": self.facts.architecture,
            "engine_version": self.engine_version or "?",
            "tp": self.layout.tp,
            "pp": self.layout.pp,
            "devices": self.layout.tp * self.layout.pp,
            "max_model_len": self.layout.max_model_len,
            "format": self.weight_format,
            "cc": self.hw.compute_capability or "?",
            "interconnect": self.hw.interconnect,
            "interconnect_name": {"pcie": "PCIe", "nvlink": "NVLink", "none": "no interconnect"}[self.hw.interconnect],
        }


@dataclass(frozen=True)
class Outcome:
    status: Status
    why: str = ""
    fields: dict[str, Any] = field(default_factory=dict)


def fired(why: str = "", **fields: Any) -> Outcome:
    return Outcome("fired", why, fields)


def passed(why: str) -> Outcome:
    return Outcome("passed", why)


def not_applicable(why: str) -> Outcome:
    return Outcome("not_applicable", why)


def unknown(why: str) -> Outcome:
    return Outcome("unknown", why)


Check = Callable[[Context, dict[str, Any]], Outcome]
CHECKS: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        CHECKS[name] = fn
        return fn

    return register


# --- checks -------------------------------------------------------------------------------------


@check("supports_pp")
def _supports_pp(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: architecture, engine_version, devices."""
    if ctx.layout.pp == 1:
        return not_applicable("pipeline_parallel is 1")
    if ctx.runtime is None:
        return not_applicable("no runtime")
    if ctx.runtime.supports_pp is None:
        return unknown(
            f"runtime {ctx.runtime_key} records no SupportsPP list; pin it with the registry scan (python -m llmfleet.rules_scan WHEEL)"
        )
    if ctx.facts.architecture in ctx.runtime.supports_pp:
        return passed(f"{ctx.facts.architecture} declares SupportsPP in vLLM {ctx.engine_version} (scanned when pinned)")
    return fired(f"{ctx.facts.architecture} is not among the {len(ctx.runtime.supports_pp)} architectures declaring SupportsPP")


@check("known_broken")
def _known_broken(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: architecture, pp, tp, engine_version."""
    archs = params.get("architectures") or []
    if ctx.facts.architecture not in archs:
        return not_applicable(f"{ctx.facts.architecture} is not one of {', '.join(archs)}")
    if ctx.layout.pp < int(params.get("min_pipeline_parallel", 1)):
        return passed(f"pipeline_parallel {ctx.layout.pp} is below {params.get('min_pipeline_parallel')}")
    if ctx.layout.tp < int(params.get("min_tensor_parallel", 1)):
        return passed(f"tensor_parallel {ctx.layout.tp} is below {params.get('min_tensor_parallel')}")
    return fired(f"{ctx.facts.architecture} with this layout is on the known-broken list for this version")


@check("pp_layers")
def _pp_layers(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: pp, layers."""
    layers = ctx.facts.num_hidden_layers
    if ctx.layout.pp <= layers:
        return passed(f"{ctx.layout.pp} stage(s) for {layers} layers")
    return fired(layers=layers)


@check("heads_divisible")
def _heads_divisible(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: heads, model, divisors."""
    heads = ctx.facts.num_attention_heads
    if heads % ctx.layout.tp == 0:
        return passed(f"{heads} heads / tp {ctx.layout.tp} = {heads // ctx.layout.tp} per rank")
    return fired(heads=heads, divisors=cap.divisors(heads))


def _kv_head_counts(f: ArchFacts) -> list[tuple[int, str]]:
    counts = [(f.num_key_value_heads, "sliding layers" if f.layer_types and f.attention_k_eq_v else "attention layers")]
    if f.layer_types and f.attention_k_eq_v and f.num_global_key_value_heads and "full_attention" in f.layer_types:
        counts.append((f.num_global_key_value_heads, "full-attention layers"))
    if f.hybrid_override_pattern and "*" not in f.hybrid_override_pattern:
        return []
    return counts


@check("kv_heads_vs_tp")
def _kv_heads_vs_tp(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: kv_heads, which, tp."""
    tp = ctx.layout.tp
    for kv, which in _kv_head_counts(ctx.facts):
        if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
            return fired(kv_heads=kv, which=which)
    return passed(", ".join(f"{kv} KV heads ({which}) fit tp {tp}" for kv, which in _kv_head_counts(ctx.facts)) or "no attention")


@check("kv_heads_replicated")
def _kv_heads_replicated(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: kv_heads, which, tp, replicas."""
    tp = ctx.layout.tp
    for kv, which in _kv_head_counts(ctx.facts):
        if kv < tp and tp % kv == 0:
            return fired(kv_heads=kv, which=which, replicas=tp // kv)
    return passed(f"no more ranks than KV heads at tp {tp}")


@check("mamba_heads_divisible")
def _mamba_heads(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: reason, mamba_heads, n_groups, divisors."""
    f = ctx.facts
    if not (f.hybrid_override_pattern and "M" in f.hybrid_override_pattern) or not f.mamba_num_heads:
        return not_applicable("no Mamba layers")
    tp = ctx.layout.tp
    heads, groups = f.mamba_num_heads, f.mamba_n_groups or 1
    good = [d for d in cap.divisors(heads) if groups % d == 0 or groups == 1]
    fields: dict[str, Any] = {"mamba_heads": heads, "n_groups": groups, "divisors": good}
    if heads % tp:
        return fired("", reason=f"tensor_parallel {tp} does not divide the {heads} Mamba heads", **fields)
    if groups % tp and groups != 1:
        return fired("", reason=f"tensor_parallel {tp} does not divide the {groups} Mamba groups", **fields)
    return passed(f"{heads} Mamba heads and {groups} groups divide by tp {tp}")


def _marlin_applicable(ctx: Context, params: dict[str, Any]) -> Outcome | None:
    fmt = ctx.weight_format
    if fmt not in params.get("formats", []):
        return not_applicable(f"weights are {fmt}, not {'/'.join(params.get('formats', []))}")
    cc = ctx.hw.compute_capability
    if cc is None:
        return unknown(f"hardware profile {ctx.hw_key} gives no compute_capability")
    below = str(params.get("below_compute_capability", "10.0"))
    if version_tuple(cc) >= version_tuple(below):
        return not_applicable(f"compute capability {cc} runs {fmt} natively (Marlin only below {below})")
    return None


@check("marlin_applies")
def _marlin_applies(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: format, cc."""
    early = _marlin_applicable(ctx, params)
    return early or fired(f"{ctx.weight_format} on compute capability {ctx.hw.compute_capability}")


def _shape_summary(fails: list[cap.Linear]) -> str:
    groups: dict[tuple[str, int, int], int] = {}
    for lin in fails:
        short = lin.name.split(".", 3)[-1] if lin.layer is not None else lin.name
        short = re.sub(r"^(?:model\.)?layers\.\d+\.", "", short)
        key = (short, lin.n, lin.k)
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{name} n={n} k={k} in {c} layer(s)" for (name, n, k), c in groups.items())


@check("marlin_shapes")
def _marlin_shapes(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: layer, n, k, failure, count, distinct, aligned_tp."""
    early = _marlin_applicable(ctx, params)
    if early:
        return early
    tiles = [tuple(t) for t in params.get("tiles", [[64, 128], [128, 64]])]
    kinds = set(params.get("kinds") or ["dense", "expert", "shared_expert"])

    def failures(tp: int) -> list[cap.Linear]:
        lins = cap.linear_layers(ctx.facts, tp, quantized_model=True)
        return [lin for lin in lins if lin.quantized and lin.kind in kinds and not cap.marlin_ok(lin.n, lin.k, tiles)]

    try:
        fails = failures(ctx.layout.tp)
    except ValueError as exc:
        return unknown(f"cannot list the linear layers: {exc}")
    if not fails:
        n_quant = sum(1 for lin in cap.linear_layers(ctx.facts, ctx.layout.tp, True) if lin.quantized and lin.kind in kinds)
        return passed(f"all {n_quant} quantized layer(s) align with a Marlin tile at tp {ctx.layout.tp}")
    aligned = [tp for tp in (1, 2, 4, 8) if tp <= max(ctx.hw.device_count, 1) and not failures(tp)]
    first = fails[0]
    return fired(
        f"{len(fails)} layer(s) misaligned",
        layer=first.name,
        n=first.n,
        k=first.k,
        failure=cap.tile_failure(first.n, first.k, tiles),
        count=len(fails),
        distinct=_shape_summary(fails),
        aligned_tp="tensor_parallel " + " or ".join(map(str, aligned)) if aligned else "none on this host",
    )


def _refusals(ctx: Context, layout: Layout, skip_checks: set[str]) -> list[RuleResult]:
    alt = replace(ctx, layout=layout, capacity=None, capacity_error=None, nested=True)
    _fill_capacity(alt)
    return [r for r in evaluate(alt, skip_checks=skip_checks) if r.verdict == "refuse" and r.status == "fired"]


@check("tp_without_nvlink")
def _tp_without_nvlink(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: tp, interconnect, alt_pp."""
    if ctx.layout.tp == 1:
        return not_applicable("tensor_parallel is 1")
    if ctx.hw.interconnect == "nvlink":
        return not_applicable("the GPUs are linked by NVLink")
    if ctx.nested:
        return not_applicable("alternative layout")
    alt_pp = ctx.layout.tp * ctx.layout.pp
    alt = replace(ctx.layout, tp=1, pp=alt_pp)
    blocked = _refusals(ctx, alt, {"tp_without_nvlink", "tp_topology"})
    if blocked:
        return passed(f"pipeline_parallel {alt_pp} would be refused here ({blocked[0].id}), so tensor parallel stays the choice")
    return fired(alt_pp=alt_pp)


def tp_groups(layout: Layout) -> list[tuple[int, ...]]:
    """vLLM ranks are pp_rank × tp + tp_rank over the visible devices, in the order given."""
    return [layout.gpus[s * layout.tp : (s + 1) * layout.tp] for s in range(layout.pp)]


def worst_level(hw: HardwareProfile, groups: list[tuple[int, ...]]) -> tuple[int, tuple[int, int] | None]:
    topo = hw.topology or []
    worst, pair = 0, None
    for g in groups:
        for a, b in itertools.combinations(g, 2):
            if a >= len(topo) or b >= len(topo[a]):
                continue
            lvl = TOPOLOGY_ORDER.index(topo[a][b])
            if lvl > worst:
                worst, pair = lvl, (a, b)
    return worst, pair


def best_devices(hw: HardwareProfile, tp: int, pp: int, exclude: frozenset[int] = frozenset()) -> tuple[int, ...] | None:
    """The device set (in rank order) whose TP groups have the best worst topology level."""
    n = tp * pp
    free = [d for d in range(hw.device_count) if d not in exclude]
    if len(free) < n:
        return None
    best: tuple[tuple[int, tuple[int, ...]], tuple[int, ...]] | None = None
    candidates = itertools.combinations(free, n) if len(free) <= 12 else [tuple(free[:n])]
    for combo in candidates:
        layout = Layout(tp, pp, combo, 1)
        score = (worst_level(hw, tp_groups(layout))[0], combo)
        if best is None or score < best[0]:
            best = (score, combo)
    return best[1] if best else None


@check("tp_topology")
def _tp_topology(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: group, pair, level, through, better."""
    if ctx.layout.tp == 1:
        return not_applicable("tensor_parallel is 1")
    if not ctx.hw.topology:
        return not_applicable(f"hardware profile {ctx.hw_key} gives no NVML topology")
    levels = [TOPOLOGY_ORDER.index(lv) for lv in params.get("levels", ["NODE", "SYS"])]
    groups = tp_groups(ctx.layout)
    worst, pair = worst_level(ctx.hw, groups)
    if pair is None or worst < min(levels):
        return passed(f"tensor parallel group(s) {[list(g) for g in groups]} stay within {TOPOLOGY_ORDER[worst]}")
    level = TOPOLOGY_ORDER[worst]
    group = next(g for g in groups if pair[0] in g and pair[1] in g)
    better = best_devices(ctx.hw, ctx.layout.tp, ctx.layout.pp)
    better_level = worst_level(ctx.hw, tp_groups(replace(ctx.layout, gpus=better)))[0] if better else worst
    return fired(
        group=list(group),
        pair=f"{pair[0]} and {pair[1]}",
        level=level,
        through=TOPOLOGY_WORDS.get(level, level),
        better=(
            f"GPUs whose tensor parallel groups stay closer, e.g. gpus {list(better)} ({TOPOLOGY_ORDER[better_level]})"
            if better and better_level < worst
            else f"no set of {ctx.layout.tp * ctx.layout.pp} GPUs on {ctx.hw_key} does better; pipeline parallel avoids the all-reduces"
        ),
    )


@check("driver_supports_cuda")
def _driver_supports_cuda(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: runtime, hardware, cuda_release, cuda_source, min_driver, min_branch, driver."""
    runtime = ctx.runtime
    if runtime is None or runtime.device != "cuda":
        return not_applicable("not a CUDA runtime")
    if runtime.cuda is None:
        return unknown(
            f"runtime {ctx.runtime_key} records no CUDA release (pin it again with tools/pin.py runtime; "
            "its CUDA runtime wheel may be one catalog/cuda.yml does not list)"
        )
    hw = ctx.hw
    if not hw.driver_branch and not hw.driver:
        return unknown(f"hardware profile {ctx.hw_key} pins no NVIDIA driver (driver_branch, driver)")
    need = driver_version(runtime.cuda.min_driver)
    pinned = ([f"R{hw.driver_branch}"] if hw.driver_branch else []) + [f"{d} {pin.version}" for d, pin in sorted(hw.driver.items())]
    too_old = [f"R{hw.driver_branch}"] if hw.driver_branch and driver_version(hw.driver_branch) < need[:1] else []
    too_old += [f"{d} {pin.version}" for d, pin in sorted(hw.driver.items()) if driver_version(pin.version) < need]
    fields = {
        "runtime": ctx.runtime_key,
        "hardware": ctx.hw_key,
        "cuda_release": runtime.cuda.release,
        "cuda_source": runtime.cuda.source,
        "min_driver": runtime.cuda.min_driver,
        "min_branch": need[0],
        "driver": ", ".join(too_old),
    }
    if too_old:
        return fired(f"{', '.join(too_old)} older than {runtime.cuda.min_driver}", **fields)
    return passed(f"{', '.join(pinned)} at least {runtime.cuda.min_driver} ({runtime.cuda.release})")


@check("cpu_head_size")
def _cpu_head_size(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: head_size, head_sizes, model."""
    sizes = list(params.get("head_sizes") or [])
    f = ctx.facts
    used = {f.head_dim or f.hidden_size // f.num_attention_heads}
    if f.layer_types and f.global_head_dim:
        used.add(f.global_head_dim)
    bad = sorted(h for h in used if h not in sizes)
    if not bad:
        return passed(f"head size(s) {sorted(used)} are supported")
    return fired(head_size=bad[0], head_sizes=sizes)


def _need_capacity(ctx: Context) -> Outcome | None:
    if ctx.capacity is None:
        return unknown(f"capacity not computed: {ctx.capacity_error or 'missing input'}")
    return None


@check("weights_fit")
def _weights_fit(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: weights, usable, memory, reserve."""
    early = _need_capacity(ctx)
    if early:
        return early
    c = ctx.capacity
    assert c is not None
    mem = c["memory"]
    if "kv_cache_memory_bytes" in mem:
        return not_applicable("the KV cache has a fixed size (kv_cache_memory_bytes)")
    if mem["weights_fit"]:
        return passed(
            f"{cap.fmt_bytes(c['weights']['max_bytes_per_gpu'])} of weights per GPU leave "
            f"{cap.fmt_bytes(min(mem['kv_bytes_per_worker']))} for the KV cache"
        )
    return fired(
        weights=cap.fmt_bytes(c["weights"]["max_bytes_per_gpu"]),
        usable=cap.fmt_bytes(mem["requested_bytes"]),
        memory=f"{cap.fmt_bytes(mem['cuda_total_bytes'])} CUDA-visible × gpu_memory_utilization {mem['gpu_memory_utilization']}",
        reserve=cap.fmt_bytes(max(mem["peak_activation_bytes"]) + mem["non_torch_bytes"] + mem["cudagraph_in_budget_bytes"]),
    )


@check("max_model_len_fits")
def _max_len_fits(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: need, usable, largest, kv_memory."""
    early = _need_capacity(ctx)
    if early:
        return early
    c = ctx.capacity
    assert c is not None
    if not c["memory"]["weights_fit"]:
        return not_applicable("the weights do not fit (capacity-weights-fit)")
    kv = c["kv"]
    if kv["fits_max_model_len"]:
        return passed(f"one request of {ctx.layout.max_model_len} tokens takes {kv['blocks_per_request']} of {kv['num_blocks']} blocks")
    return fired(
        need=kv["blocks_per_request"],
        usable=kv["num_blocks"],
        largest=kv["largest_max_model_len"],
        kv_memory=cap.fmt_bytes(min(c["memory"]["kv_bytes_per_worker"])),
    )


@check("kv_target")
def _kv_target(ctx: Context, params: dict[str, Any]) -> Outcome:
    """Fields: tokens, target."""
    target = ctx.layout.min_kv_cache_tokens
    if not target:
        return not_applicable("no min_kv_cache_tokens target")
    early = _need_capacity(ctx)
    if early:
        return early
    assert ctx.capacity is not None
    tokens = ctx.capacity["kv"]["tokens"]
    if tokens >= target:
        return passed(f"{tokens} KV tokens expected, target {target}")
    return fired(tokens=tokens, target=target)


# --- evaluation ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleResult:
    id: str
    title: str
    verdict: Verdict
    status: Status
    field: str
    value: Any
    message: str  # rendered when fired (or why it could not be checked), else ""
    valid: str
    reference: str
    why: str

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "verdict": self.verdict, "status": self.status}
        if self.status in ("fired", "unknown"):
            out["message"] = self.message
        if self.status == "fired" and self.valid:
            out["valid"] = self.valid
        out["why"] = self.why
        return out

    def text(self) -> str:
        """The message an operator reads, with the rule id and reference."""
        return f"{self.message} [rule {self.id}; see {self.reference}]"


class _Fields(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _render(template: str, fields: Mapping[str, Any]) -> str:
    return template.format_map(_Fields(fields))


#: rule fields that are the host's, not the instance's: the planner reports them once per host
HOST_FIELDS = ("runtime", "hardware")


def _rule_value(ctx: Context, field_name: str) -> Any:
    return {"model": ctx.model_key, "runtime": ctx.runtime_key, "hardware": ctx.hw_key}.get(field_name, ctx.layout.value(field_name))


def evaluate(ctx: Context, skip_checks: set[str] | None = None) -> list[RuleResult]:
    """Every rule of the book on this context, in catalog order."""
    out = []
    accel = ctx.hw.accelerator
    for rule in ctx.book.rules:
        if skip_checks and rule.check in skip_checks:
            continue
        ok, why = rule.applies.matches(ctx.engine_version, accel)
        if not ok:
            outcome = not_applicable(why)
        else:
            try:
                outcome = CHECKS[rule.check](ctx, rule.params_for(ctx.engine_version, accel))
            except (ValueError, KeyError, ZeroDivisionError) as exc:
                outcome = unknown(f"check failed on these facts: {exc}")
        fields = {**ctx.base_fields(), **outcome.fields}
        message = ""
        if outcome.status == "fired":
            message = _render(rule.message, fields)
        elif outcome.status == "unknown":
            message = f"could not be checked: {outcome.why}"
        out.append(
            RuleResult(
                id=rule.id,
                title=rule.title,
                verdict=rule.verdict,
                status=outcome.status,
                field=rule.field,
                value=_rule_value(ctx, rule.field),
                message=message,
                valid=_render(rule.valid, fields) if outcome.status == "fired" else "",
                reference=rule.reference,
                why=outcome.why or ("fired" if outcome.status == "fired" else ""),
            )
        )
    return out


def engine_behaviour(book: RuleBook, engine_version: str | None, hw: HardwareProfile, lay: Layout, facts: ArchFacts) -> cap.EngineBehaviour:
    """The engine's behaviour for one layout: the rulebook's entry for this version, the batch
    defaults of this GPU class (raised for a multimodal prefix-LM as vLLM raises them), and the
    layout's engine_args."""
    accel = hw.accelerator
    engine = book.engine(engine_version, accel)
    if accel == "cpu":
        mnbt = book.max_num_batched_tokens.get("cpu_per_rank", 2048) * lay.tp * lay.pp
        seqs = book.max_num_seqs.get("cpu", 256)
    elif hw.device_memory_gib >= 70:
        mnbt = book.max_num_batched_tokens.get("cuda_70gib", 8192)
        seqs = book.max_num_seqs.get("cuda_70gib", 1024)
    else:
        mnbt = book.max_num_batched_tokens.get("cuda", 2048)
        seqs = book.max_num_seqs.get("cuda", 256)
    vision = (facts.model_extra or {}).get("vision")
    if isinstance(vision, dict) and vision.get("max_tokens_per_item"):
        # a multimodal prefix-LM (Gemma 4): vLLM raises the default to one item's tokens
        mnbt = max(mnbt, int(vision["max_tokens_per_item"]))
    return cap.EngineBehaviour(
        block_size=int(lay.arg("block_size", book.block_size.get(accel, 16))),
        gpu_memory_utilization=engine.gpu_memory_utilization,
        max_num_batched_tokens=int(lay.arg("max_num_batched_tokens", mnbt)),
        token_formula=engine.token_formula,
        null_block_reserved=engine.null_block_reserved,
        cuda=book.cuda_memory(engine_version) if accel == "cuda" else None,
        max_num_seqs=int(lay.arg("max_num_seqs", seqs)),
        enforce_eager=bool(lay.arg("enforce_eager", False)),
        device_model=hw.device_model,
    )


def capacity_input(ctx: Context) -> cap.CapacityInput | None:
    """What the capacity planner needs, with the engine's defaults for this version; None if the
    layout has no KV size to plan with (a CPU profile without kv_cache_memory_bytes)."""
    hw, lay = ctx.hw, ctx.layout
    accel = hw.accelerator
    if accel == "cpu" and lay.kv_cache_memory_bytes is None:
        ctx.capacity_error = "the CPU build needs kv_cache_memory_bytes"
        return None
    device_bytes = int(hw.device_memory_gib * cap.GiB)
    behaviour = engine_behaviour(ctx.book, ctx.engine_version, hw, lay, ctx.facts)
    return cap.CapacityInput(
        facts=ctx.facts,
        quantization=ctx.model.quantization,
        tp=lay.tp,
        pp=lay.pp,
        max_model_len=lay.max_model_len,
        accelerator=accel,
        device_memory_bytes=device_bytes,
        memory_bandwidth_gbs=hw.memory_bandwidth_gbs,
        engine=behaviour,
        gpu_memory_utilization=lay.gpu_memory_utilization,
        kv_cache_memory_bytes=lay.kv_cache_memory_bytes,
        kv_cache_dtype=str(lay.arg("kv_cache_dtype", "auto")),
        dtype=str(lay.arg("dtype", "auto")),
        compute_capability=hw.compute_capability,
    )


def _fill_capacity(ctx: Context) -> None:
    try:
        ci = capacity_input(ctx)
        if ci is not None:
            ctx.capacity = cap.plan_capacity(ci)
    except (ValueError, KeyError, ZeroDivisionError) as exc:
        ctx.capacity = None
        ctx.capacity_error = str(exc)


@dataclass
class Analysis:
    layout: Layout
    capacity: dict[str, Any] | None
    capacity_error: str | None
    results: list[RuleResult]

    def fired(self, verdict: Verdict | None = None) -> list[RuleResult]:
        return [r for r in self.results if r.status == "fired" and (verdict is None or r.verdict == verdict)]

    @property
    def unknown(self) -> list[RuleResult]:
        return [r for r in self.results if r.status == "unknown"]

    @property
    def refused(self) -> bool:
        return bool(self.fired("refuse"))

    def plan_capacity(self) -> dict[str, Any] | None:
        """The capacity figures as the plan carries them (no prose)."""
        if self.capacity is None:
            return None
        return {k: v for k, v in self.capacity.items() if k != "steps"}


def analyse(
    model_key: str,
    model: ModelPin,
    runtime_key: str | None,
    runtime: RuntimePin | None,
    hw: HardwareProfile,
    hw_key: str,
    layout: Layout,
    book: RuleBook | None = None,
) -> Analysis:
    """Capacity and every rule for one instance layout."""
    ctx = Context(book or load_rulebook(), model_key, model, runtime_key, runtime, hw, hw_key, layout)
    _fill_capacity(ctx)
    return Analysis(layout, ctx.capacity, ctx.capacity_error, evaluate(ctx))


# --- recommend ----------------------------------------------------------------------------------


@dataclass
class Candidate:
    layout: Layout
    analysis: Analysis

    @property
    def refused(self) -> bool:
        return self.analysis.refused

    def sort_key(self) -> tuple[Any, ...]:
        a = self.analysis
        c = a.capacity or {}
        decode = (c.get("decode") or {}).get("tokens_per_s_bound", 0.0)
        conc = (c.get("kv") or {}).get("max_concurrency", 0.0)
        return (
            len(a.fired("warn")) + len(a.unknown),
            len(a.fired("advise")),
            -decode,
            -conc,
            self.layout.tp * self.layout.pp,
            self.layout.tp,
        )


RANKING = "fewest warnings, then fewest advice, then highest decode bound, then highest concurrency, then fewest GPUs"


def recommend(
    model_key: str,
    model: ModelPin,
    runtime_key: str | None,
    runtime: RuntimePin | None,
    hw: HardwareProfile,
    hw_key: str,
    max_model_len: int,
    gpu_memory_utilization: float | None = None,
    kv_cache_memory_bytes: int | None = None,
    engine_args: Mapping[str, Any] | None = None,
    book: RuleBook | None = None,
) -> tuple[list[Candidate], list[Candidate]]:
    """Every tp × pp layout on 1..device_count devices (each on the device set whose tensor
    parallel groups have the best topology): the valid ones ranked (:data:`RANKING`), and the
    refused ones with the rules that dropped them."""
    valid: list[Candidate] = []
    dropped: list[Candidate] = []
    for n in range(1, hw.device_count + 1):
        for tp in cap.divisors(n):
            pp = n // tp
            gpus = best_devices(hw, tp, pp) or tuple(range(n))
            layout = Layout(
                tp=tp,
                pp=pp,
                gpus=gpus,
                max_model_len=max_model_len,
                gpu_memory_utilization=gpu_memory_utilization,
                kv_cache_memory_bytes=kv_cache_memory_bytes,
                engine_args=tuple(sorted((engine_args or {}).items())),
            )
            cand = Candidate(layout, analyse(model_key, model, runtime_key, runtime, hw, hw_key, layout, book))
            (dropped if cand.refused else valid).append(cand)
    valid.sort(key=Candidate.sort_key)
    return valid, dropped
