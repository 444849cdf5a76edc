"""A checkpoint's own files as the source of the planner's facts.

A pinned model's architecture facts (:class:`llmfleet.pins.ArchFacts`) are read from what the
checkpoint ships, the way vLLM reads them:

- ``config.json``: the shapes; for a multimodal model the decoder's shapes are its ``text_config``
  (vLLM's ``get_hf_text_config``), the architecture name is the top level's;
- the quantization config: ModelOpt's ``hf_quant_config.json`` (``quantization.quant_algo``,
  ``group_size``, ``exclude_modules``, ``kv_cache_quant_algo``) or ``quantization_config`` in
  ``config.json`` (ModelOpt, compressed-tensors, fp8, GPTQ/AWQ): the weight format, the modules
  left unquantized and the KV cache dtype the checkpoint declares;
- the safetensors headers: the parameters outside the decoder (vision and audio towers,
  their projectors), which vLLM loads beside it.

Nothing here touches the network: the hub client (:mod:`llmfleet.artifacts.hub`) hands over the
parsed files. See docs/pins.md for the mapping and its sources.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ..errors import LlmfleetError
from ..pins import ArchFacts

#: config.json key(s) -> ArchFacts field, first present wins (text config first, then the top level)
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "head_dim": ("head_dim", "attention_head_dim"),
    "intermediate_size": ("intermediate_size", "ffn_hidden_size"),
    "vocab_size": ("vocab_size",),
    "max_position_embeddings": ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"),
    "torch_dtype": ("torch_dtype", "dtype"),
    "tie_word_embeddings": ("tie_word_embeddings",),
    "layer_types": ("layer_types",),
    "sliding_window": ("sliding_window",),
    "global_head_dim": ("global_head_dim",),
    "num_global_key_value_heads": ("num_global_key_value_heads",),
    "attention_k_eq_v": ("attention_k_eq_v",),
    "hybrid_override_pattern": ("hybrid_override_pattern",),
    "num_experts": ("n_routed_experts", "num_experts", "num_local_experts"),
    "num_experts_per_tok": ("num_experts_per_tok", "top_k_experts", "moe_top_k"),
    "moe_intermediate_size": ("moe_intermediate_size",),
    "shared_expert_intermediate_size": ("moe_shared_expert_intermediate_size", "shared_expert_intermediate_size"),
    "mamba_num_heads": ("mamba_num_heads",),
    "mamba_head_dim": ("mamba_head_dim",),
    "ssm_state_size": ("ssm_state_size",),
    "mamba_n_groups": ("n_groups", "mamba_n_groups"),
    "conv_kernel": ("conv_kernel",),
    "mamba_ssm_cache_dtype": ("mamba_ssm_cache_dtype",),
    "mamba_conv_cache_dtype": ("mamba_conv_cache_dtype",),
}
#: Nemotron-H's newer spelling of the layer pattern (a list of block names)
BLOCK_SYMBOLS = {"mamba": "M", "attention": "*", "mlp": "-", "moe": "E"}
#: booleans the lock leaves out when they hold the planner's default
BOOLEAN_DEFAULTS = {"tie_word_embeddings": False, "attention_k_eq_v": False, "gated_mlp": True}
#: activations without a gate projection (the MLP is up -> act -> down)
UNGATED_ACTIVATIONS = {"relu2"}
#: checkpoint files that carry a quantization config of their own
QUANT_CONFIG_FILES = ("hf_quant_config.json",)

#: the planner's weight format for a quantization method (what vLLM's --quantization names)
MODELOPT_ALGOS = {"NVFP4": "nvfp4", "FP8": "fp8", "W4A16_NVFP4": "nvfp4", "MXFP4": "mxfp4"}
KV_ALGOS = {"FP8": "fp8", "FP8_E4M3": "fp8", "INT8": "int8", "NVFP4": "nvfp4"}


class CheckpointError(LlmfleetError):
    """A checkpoint whose files cannot give the facts (a config missing a required key, say)."""


@dataclass(frozen=True)
class QuantInfo:
    """What a checkpoint's quantization config says."""

    method: str | None = None  # the planner's weight format: nvfp4, fp8, int4, mxfp4; None: unquantized
    source: str | None = None  # the file and key it came from
    group_size: int | None = None
    exclude: tuple[str, ...] = ()  # module globs left in the model dtype
    kv_cache_dtype: str | None = None
    raw_method: str | None = None  # as the checkpoint spells it (quant_method / quant_algo)


@dataclass
class CheckpointFacts:
    """The facts of one checkpoint, and where each came from."""

    architecture: ArchFacts
    quantization: str | None
    sources: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder's config: ``text_config`` merged over the top level (vLLM's get_hf_text_config)."""
    text = config.get("text_config")
    if isinstance(text, Mapping):
        return {**{k: v for k, v in config.items() if k != "text_config"}, **text}
    return dict(config)


def _first(cfg: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return None


def quant_info(config: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]]) -> QuantInfo:
    """The quantization a checkpoint declares: ``hf_quant_config.json`` first (ModelOpt's export, what
    vLLM reads first), else ``quantization_config`` of config.json."""
    for name in QUANT_CONFIG_FILES:
        if name in files:
            q = files[name].get("quantization", files[name])
            return _modelopt(q, name)
    qc = config.get("quantization_config") or text_config(config).get("quantization_config")
    if not isinstance(qc, Mapping):
        return QuantInfo()
    method = str(qc.get("quant_method") or "").lower()
    where = "config.json quantization_config"
    if method in ("modelopt", "modelopt_fp4", "modelopt_fp8"):
        return _modelopt(qc, where)
    if method == "compressed-tensors":
        return _compressed_tensors(qc, where)
    if method == "fp8":
        return QuantInfo("fp8", where, None, tuple(qc.get("ignored_layers") or qc.get("modules_to_not_convert") or ()), None, method)
    if method in ("gptq", "awq", "gptq_marlin", "awq_marlin"):
        bits = qc.get("bits") or qc.get("w_bit")
        if bits != 4:
            raise CheckpointError(f"{where}: {method} with {bits} bits is not a weight format the planner knows (4 bits is)")
        group = qc.get("group_size") or qc.get("q_group_size")
        return QuantInfo("int4", where, group, tuple(qc.get("modules_to_not_convert") or ()), None, method)
    if method == "mxfp4":
        return QuantInfo("mxfp4", where, 32, tuple(qc.get("modules_to_not_convert") or ()), None, method)
    raise CheckpointError(
        f"{where}: quant_method {method!r} is not a format the planner knows "
        "(known: modelopt NVFP4/FP8, compressed-tensors, fp8, gptq, awq, mxfp4)"
    )


def _modelopt(q: Mapping[str, Any], where: str) -> QuantInfo:
    algo = str(q.get("quant_algo") or "").upper()
    if algo not in MODELOPT_ALGOS:
        raise CheckpointError(f"{where}: quant_algo {algo!r} is not one the planner knows (known: {', '.join(MODELOPT_ALGOS)})")
    kv = q.get("kv_cache_quant_algo")
    kv_dtype = KV_ALGOS.get(str(kv).upper()) if kv else None
    if kv and kv_dtype is None:
        raise CheckpointError(f"{where}: kv_cache_quant_algo {kv!r} is not one the planner knows (known: {', '.join(KV_ALGOS)})")
    exclude = q.get("exclude_modules") or q.get("ignore") or ()
    return QuantInfo(MODELOPT_ALGOS[algo], f"{where} quant_algo", q.get("group_size"), tuple(exclude), kv_dtype, algo)


def _compressed_tensors(qc: Mapping[str, Any], where: str) -> QuantInfo:
    weights = [g.get("weights") or {} for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    if not weights:
        raise CheckpointError(f"{where}: compressed-tensors without config_groups.*.weights")
    w = weights[0]
    bits, kind, group = w.get("num_bits"), w.get("type"), w.get("group_size")
    if kind == "float" and bits == 4:
        method = "nvfp4" if group in (16, None) else "mxfp4"
    elif kind == "float" and bits == 8:
        method = "fp8"
    elif kind == "int" and bits == 4:
        method = "int4"
    else:
        raise CheckpointError(f"{where}: compressed-tensors weights of {bits}-bit {kind} are not a format the planner knows")
    kv = qc.get("kv_cache_scheme") or {}
    kv_dtype = "fp8" if isinstance(kv, Mapping) and kv.get("type") == "float" and kv.get("num_bits") == 8 else None
    return QuantInfo(method, f"{where} config_groups", group, tuple(qc.get("ignore") or ()), kv_dtype, "compressed-tensors")


# --- module names, to read an exclude list in the planner's terms ---------------------------------


def _family(architecture: str, cfg: Mapping[str, Any]) -> str:
    if cfg.get("hybrid_override_pattern") or architecture.startswith("NemotronH"):
        return "nemotron_h"
    if architecture.endswith("ForConditionalGeneration"):
        return "multimodal"
    return "decoder"


def block_modules(family: str, layer: int, block: str, facts: ArchFacts) -> list[str]:
    """The checkpoint's names of the quantizable linear modules of one block of one layer."""
    if family == "nemotron_h":
        pre = f"backbone.layers.{layer}.mixer"
        if block == "attention":
            return [f"{pre}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if block == "mamba":
            return [f"{pre}.in_proj", f"{pre}.out_proj"]
        if block == "moe":
            shared = [f"{pre}.shared_experts.up_proj", f"{pre}.shared_experts.down_proj"] if facts.shared_expert_intermediate_size else []
            return [f"{pre}.experts.0.up_proj", f"{pre}.experts.0.down_proj", *shared]
        return [f"{pre}.up_proj", f"{pre}.down_proj"]
    pre = f"model.language_model.layers.{layer}" if family == "multimodal" else f"model.layers.{layer}"
    if block == "attention":
        return [f"{pre}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if block == "moe":
        return [f"{pre}.mlp.experts.0.gate_proj", f"{pre}.mlp.experts.0.up_proj", f"{pre}.mlp.experts.0.down_proj"]
    up = ["gate_proj", "up_proj"] if facts.gated_mlp is not False else ["up_proj"]
    return [f"{pre}.mlp.{p}" for p in (*up, "down_proj")]


def _excluded(name: str, patterns: Iterable[str]) -> bool:
    """ModelOpt and compressed-tensors name a module, a glob of modules, or (compressed-tensors) ``re:``."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") or name.startswith(p + "."):
            return True
    return False


def unquantized_from_exclude(facts: ArchFacts, architecture: str, cfg: Mapping[str, Any], exclude: Iterable[str]) -> list[str]:
    """The planner's ``unquantized`` list for an exclude list (see ArchFacts.unquantized).

    A block counts as unquantized when any of its modules is excluded: the planner then counts
    it at the model dtype, which can only over-count weights (the safe side for KV capacity).
    """
    from ..capacity import layer_blocks

    patterns = list(exclude)
    family = _family(architecture, cfg)
    blocks = layer_blocks(facts)
    kept: dict[str, list[int]] = {}  # block kind -> layers where it stays unquantized
    present: dict[str, list[int]] = {}
    for i, layer in enumerate(blocks):
        for block in layer:
            present.setdefault(block, []).append(i)
            if any(_excluded(m, patterns) for m in block_modules(family, i, block, facts)):
                kept.setdefault(block, []).append(i)
    out: list[str] = []
    whole = {b for b, layers in kept.items() if layers == present[b]}
    out += sorted(whole)
    partial = sorted({i for b, layers in kept.items() if b not in whole for i in layers})
    out += [f"layer:{i}" for i in partial]
    if _excluded("lm_head", patterns):
        out.append("lm_head")
    return out


# --- the facts -----------------------------------------------------------------------------------


def extra_params(config: Mapping[str, Any], headers: Mapping[str, Mapping[str, Any]] | None) -> int | None:
    """Parameters outside the text decoder (towers, projectors) from the safetensors headers
    (tensor name -> {"shape": [...]}): multimodal checkpoints only; None when not read."""
    if "text_config" not in config or headers is None:
        return None
    total = 0
    for name, info in headers.items():
        if name == "__metadata__" or "language_model" in name or name.startswith("lm_head"):
            continue
        total += math.prod(int(d) for d in info.get("shape") or [])
    return total


def facts_from_checkpoint(
    config: Mapping[str, Any],
    files: Mapping[str, Mapping[str, Any]] | None = None,
    headers: Mapping[str, Mapping[str, Any]] | None = None,
) -> CheckpointFacts:
    """The planner's facts from a checkpoint's config.json, its other JSON files by name
    (``hf_quant_config.json``) and its safetensors headers (tensor name -> dtype/shape)."""
    files = files or {}
    archs = config.get("architectures") or []
    if not archs or not isinstance(archs, list):
        raise CheckpointError("config.json: no `architectures` list: the model class vLLM loads is unknown")
    cfg = text_config(config)
    values: dict[str, Any] = {"architecture": str(archs[0])}
    for fact, keys in CONFIG_KEYS.items():
        value = _first(cfg, keys)
        if value is not None:
            values[fact] = value
    if "num_key_value_heads" not in values and "num_attention_heads" in values:
        values["num_key_value_heads"] = values["num_attention_heads"]  # multi-head attention
    if "hybrid_override_pattern" not in values and isinstance(cfg.get("layers_block_type"), list):
        values["hybrid_override_pattern"] = "".join(BLOCK_SYMBOLS[str(b)] for b in cfg["layers_block_type"])
    act = cfg.get("mlp_hidden_act") or cfg.get("hidden_act") or cfg.get("hidden_activation")
    if act in UNGATED_ACTIVATIONS:
        values["gated_mlp"] = False
    for flag, default in BOOLEAN_DEFAULTS.items():  # the lock leaves a default out (ArchFacts)
        if values.get(flag) == default:
            del values[flag]
    if values.get("torch_dtype") is not None:
        values["torch_dtype"] = str(values["torch_dtype"]).removeprefix("torch.")
    sources = ["config.json" + (" text_config" if "text_config" in config else "")]
    warnings: list[str] = []
    if (n := cfg.get("num_kv_shared_layers")) and int(n) > 0:
        warnings.append(f"num_kv_shared_layers {n}: layers that share another layer's KV cache are counted as their own")
    extra = extra_params(config, headers)
    if extra is not None:
        values["extra_params"] = extra
        sources.append("safetensors headers (parameters outside the decoder)")
    try:
        base = ArchFacts.model_validate(values)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "facts"
        raise CheckpointError(f"config.json: {where}: {err['msg']} (got {err.get('input')!r})") from exc
    q = quant_info(config, files)
    if q.method is None:
        return CheckpointFacts(base, None, sources, warnings)
    sources.append(q.source or "quantization config")
    update: dict[str, Any] = {"unquantized": unquantized_from_exclude(base, base.architecture, cfg, q.exclude)}
    if q.kv_cache_dtype:
        update["kv_cache_dtype"] = q.kv_cache_dtype
    if q.method == "nvfp4" and q.group_size not in (None, 16):
        warnings.append(f"NVFP4 group size {q.group_size}: the planner counts one scale per 16 values")
    facts = ArchFacts.model_validate(base.model_dump(exclude_none=True) | update)
    return CheckpointFacts(facts, q.method, sources, warnings)


def fact_differences(expected: ArchFacts | Mapping[str, Any], actual: ArchFacts) -> list[tuple[str, Any, Any]]:
    """(fact, expected, actual) for every fact that differs; a fact one side leaves out is compared
    with the default the planner assumes for it."""
    a = actual.model_dump(exclude_none=True)
    e = expected.model_dump(exclude_none=True) if isinstance(expected, ArchFacts) else dict(expected)
    defaults: dict[str, Any] = {**BOOLEAN_DEFAULTS, "unquantized": []}
    out = []
    for key in sorted(set(a) | set(e)):
        ev, av = e.get(key, defaults.get(key)), a.get(key, defaults.get(key))
        if isinstance(ev, list) and isinstance(av, list) and key == "unquantized":
            ev, av = sorted(ev), sorted(av)
        if ev != av:
            out.append((key, e.get(key), a.get(key)))
    return out
