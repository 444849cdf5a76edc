"""The capacity planner: weights, KV cache, concurrency and the decode bound of one layout.

Everything here is arithmetic on the architecture facts of a model pin (``ArchFacts``), the
parallel layout and the hardware profile; nothing imports vLLM or touches a GPU. The figures follow
what vLLM itself computes, version by version where it differs (sources named next to each step):

- weights per GPU: every linear layer's per-rank shard (column-parallel layers split the output,
  row-parallel ones the input, experts split their intermediate size), by format — bf16 2 bytes,
  fp8 1 byte, NVFP4 4 bits plus one fp8 scale per 16 values; embeddings, norms, routers, convolutions
  and whatever the checkpoint excludes stay in the model dtype;
- KV cache: per attention layer per token 2 (K and V) × KV heads per rank × head size × dtype bytes;
  Mamba layers hold a fixed state per sequence instead. Layers are grouped the way vLLM's KV cache
  manager groups them (``vllm/v1/core/kv_cache_utils.py``): one group when every layer has the same
  spec, else page sizes are unified and layers split into equal-size groups sharing one block pool;
- KV tokens and blocks: ``num_blocks = KV memory // bytes per block`` on every worker, the smallest
  across pipeline stages; tokens as the engine version publishes them;
- decode bound at batch 1: tokens/s ≤ bandwidth ÷ bytes read per token per GPU (the weights the GPU
  holds, only the routed experts' share for MoE, plus the KV of one sequence at ``max_model_len``);
  pipeline stages run one after another for one sequence, so their times add up.

The arithmetic is written down step by step (``steps``) for ``tools/plan.py --explain``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from .pins import ArchFacts

GiB = 1 << 30
BF16 = "bfloat16"

#: bytes per element of the KV cache / state dtypes vLLM accepts
DTYPE_BYTES: dict[str, float] = {
    "bfloat16": 2,
    "bf16": 2,
    "float16": 2,
    "fp16": 2,
    "half": 2,
    "float32": 4,
    "fp32": 4,
    "float": 4,
    "fp8": 1,
    "fp8_e4m3": 1,
    "fp8_e5m2": 1,
    "fp8_inc": 1,
}

#: weight formats: bytes per quantized parameter (scales included) and the names that mean them
WEIGHT_FORMATS: dict[str, float] = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp32": 4.0,
    "fp8": 1.0,  # per-tensor / per-channel scales are negligible and left out
    "nvfp4": 0.5 + 1 / 16,  # 4-bit values + one fp8 (E4M3) scale per 16 values; two fp32 globals per tensor ignored
    "mxfp4": 0.5 + 1 / 32,  # 4-bit values + one E8M0 scale per 32 values
    "int4": 0.5 + 2 / 128,  # GPTQ/AWQ W4A16, group 128, fp16 scales (zero points ignored)
}
FORMAT_ALIASES: dict[str, str] = {
    "": "bf16",
    "none": "bf16",
    "bfloat16": "bf16",
    "bf16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "float32": "fp32",
    "fp8": "fp8",
    "fp8_e4m3": "fp8",
    "modelopt_fp8": "fp8",
    "nvfp4": "nvfp4",
    "modelopt_fp4": "nvfp4",
    "fp4": "nvfp4",
    "mxfp4": "mxfp4",
    "gptq": "int4",
    "awq": "int4",
    "int4": "int4",
    "w4a16": "int4",
}


def model_catalog() -> dict[str, dict[str, Any]]:
    """``catalog/models.yml``: per model key, the facts its checkpoint's files do not state
    (``facts``, ArchFacts fields), with ``source``, ``sources`` and ``uncertain`` (see the file)."""
    text = resources.files("llmfleet.catalog").joinpath("models.yml").read_text()
    data: dict[str, dict[str, Any]] = yaml.safe_load(text) or {}
    probe = {"architecture": "x", "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
             "hidden_size": 1, "max_position_embeddings": 1}  # fmt: skip
    for key, entry in data.items():
        facts = entry.get("facts") or {}
        unknown = sorted(set(facts) - set(ArchFacts.model_fields))
        if unknown:
            raise ValueError(f"catalog/models.yml {key}.facts: unknown fact(s) {', '.join(unknown)} (valid: ArchFacts fields)")
        ArchFacts.model_validate(probe | facts)  # the values have the facts' types
        entry["facts"] = facts
        entry.setdefault("uncertain", [])
    return data


def weight_format(quantization: str | None, torch_dtype: str | None = None) -> str:
    """The planner's name for a pin's quantization (``None`` → the model dtype)."""
    if quantization is None:
        return FORMAT_ALIASES.get((torch_dtype or BF16).lower(), "bf16")
    key = quantization.lower()
    if key not in FORMAT_ALIASES:
        raise ValueError(f"unknown quantization {quantization!r} (known: {', '.join(sorted(set(FORMAT_ALIASES.values())))})")
    return FORMAT_ALIASES[key]


def dtype_bytes(name: str) -> float:
    try:
        return DTYPE_BYTES[name.lower()]
    except KeyError as exc:
        raise ValueError(f"unknown dtype {name!r} (known: {', '.join(sorted(DTYPE_BYTES))})") from exc


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def fmt_bytes(n: float) -> str:
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= 1 << 20:
        return f"{n / (1 << 20):.1f} MiB"
    return f"{int(n)} B"


# --- the model as layers ------------------------------------------------------------------------

BlockKind = str  # "attention" | "mlp" | "moe" | "mamba"


@dataclass(frozen=True)
class AttentionShape:
    sliding_window: int | None
    num_heads: int
    num_kv_heads: int
    head_dim: int


def layer_blocks(f: ArchFacts) -> list[list[BlockKind]]:
    """The blocks of every decoder layer, in order (``hybrid_override_pattern`` for Nemotron-H)."""
    pattern = f.hybrid_override_pattern
    if pattern:
        table = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
        try:
            return [[table[c]] for c in pattern]
        except KeyError as exc:
            raise ValueError(f"hybrid_override_pattern has an unknown layer symbol {exc.args[0]!r} (known: M * - E)") from exc
    ffn = "moe" if f.num_experts else "mlp"
    return [["attention", ffn] for _ in range(f.num_hidden_layers)]


def attention_shape(f: ArchFacts, layer: int) -> AttentionShape:
    kind = f.layer_types[layer] if f.layer_types else "full_attention"
    head_dim = f.head_dim or f.hidden_size // f.num_attention_heads
    if kind == "sliding_attention":
        if not f.sliding_window:
            raise ValueError(f"layer {layer} is sliding_attention but the facts give no sliding_window")
        return AttentionShape(f.sliding_window, f.num_attention_heads, f.num_key_value_heads, head_dim)
    kv = f.num_key_value_heads
    if f.layer_types and f.global_head_dim:
        head_dim = f.global_head_dim
    if f.layer_types and f.attention_k_eq_v and f.num_global_key_value_heads:
        kv = f.num_global_key_value_heads
    return AttentionShape(None, f.num_attention_heads, kv, head_dim)


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """vLLM shards KV heads over TP, or replicates each head on ``tp // kv`` ranks when fewer."""
    return kv_heads // tp if kv_heads >= tp else 1


def mamba_groups_per_rank(f: ArchFacts, tp: int) -> int:
    groups = f.mamba_n_groups or 1
    if groups % tp == 0:
        return groups // tp
    # vLLM extends the groups so that each rank holds the groups its heads need (n_groups == 1: replicated)
    return max(1, cdiv(groups, tp))


@dataclass(frozen=True)
class Linear:
    """One linear layer (or one expert bank) as a tensor-parallel rank sees it."""

    layer: int | None
    name: str
    n: int  # per-rank output size (Marlin's size_n)
    k: int  # per-rank input size (Marlin's size_k)
    count: int = 1  # experts in a bank
    quantized: bool = False
    kind: str = "dense"  # dense | expert | shared_expert | router | conv
    active: float = 1.0  # fraction read per decoded token (routed experts: top_k / experts)

    @property
    def params(self) -> int:
        return self.n * self.k * self.count


def _prefix(f: ArchFacts, layer: int) -> str:
    if f.architecture.endswith("ForConditionalGeneration"):
        return f"language_model.model.layers.{layer}"
    return f"model.layers.{layer}"


def _is_unquantized(f: ArchFacts, layer: int, block: str) -> bool:
    keep = set(f.unquantized or [])
    return block in keep or f"layer:{layer}" in keep


def linear_layers(f: ArchFacts, tp: int, quantized_model: bool, layers: range | None = None) -> list[Linear]:
    """Every linear layer of the decoder at tensor-parallel size ``tp`` (per-rank n and k)."""
    blocks = layer_blocks(f)
    out: list[Linear] = []
    hidden = f.hidden_size
    hybrid = bool(f.hybrid_override_pattern)
    for i in layers if layers is not None else range(len(blocks)):
        pre = _prefix(f, i)
        for block in blocks[i]:
            q = quantized_model and not _is_unquantized(f, i, block)
            mod = "mixer" if hybrid else {"attention": "self_attn", "mlp": "mlp", "moe": "mlp", "mamba": "mixer"}[block]
            if block == "attention":
                a = attention_shape(f, i)
                heads = a.num_heads // tp if a.num_heads % tp == 0 else cdiv(a.num_heads, tp)
                kv = kv_heads_per_rank(a.num_kv_heads, tp)
                out.append(Linear(i, f"{pre}.{mod}.qkv_proj", (heads + 2 * kv) * a.head_dim, hidden, quantized=q))
                out.append(Linear(i, f"{pre}.{mod}.o_proj", hidden, heads * a.head_dim, quantized=q))
            elif block == "mlp":
                inter = f.intermediate_size or 0
                up = "gate_up_proj" if f.gated_mlp is not False else "up_proj"
                mult = 2 if f.gated_mlp is not False else 1
                out.append(Linear(i, f"{pre}.{mod}.{up}", mult * (inter // tp), hidden, quantized=q))
                out.append(Linear(i, f"{pre}.{mod}.down_proj", hidden, inter // tp, quantized=q))
            elif block == "moe":
                e = f.num_experts or 0
                inter = f.moe_intermediate_size or f.intermediate_size or 0
                mult = 2 if f.gated_mlp is not False else 1
                active = (f.num_experts_per_tok or e) / e if e else 1.0
                qe = q and "experts" not in set(f.unquantized or [])
                out.append(Linear(i, f"{pre}.{mod}.router", e, hidden, kind="router"))
                out.append(Linear(i, f"{pre}.{mod}.experts.w13", mult * (inter // tp), hidden, e, qe, "expert", active))
                out.append(Linear(i, f"{pre}.{mod}.experts.w2", hidden, inter // tp, e, qe, "expert", active))
                if f.shared_expert_intermediate_size:
                    s = f.shared_expert_intermediate_size
                    up = "gate_up_proj" if f.gated_mlp is not False else "up_proj"
                    out.append(Linear(i, f"{pre}.{mod}.shared_experts.{up}", mult * (s // tp), hidden, 1, q, "shared_expert"))
                    out.append(Linear(i, f"{pre}.{mod}.shared_experts.down_proj", hidden, s // tp, 1, q, "shared_expert"))
            elif block == "mamba":
                heads = f.mamba_num_heads or 0
                inner = heads * (f.mamba_head_dim or 0)
                groups = mamba_groups_per_rank(f, tp)
                state = f.ssm_state_size or 0
                # in_proj = [z, x, B, C, dt] = intermediate + intermediate + 2·n_groups·state + n_heads
                # (vllm/model_executor/layers/mamba/mamba_mixer2.py, MergedColumnParallelLinear)
                n_in = 2 * (inner // tp) + 2 * groups * state + heads // tp
                out.append(Linear(i, f"{pre}.{mod}.in_proj", n_in, hidden, quantized=q))
                conv_dim = inner // tp + 2 * groups * state
                out.append(Linear(i, f"{pre}.{mod}.conv1d", conv_dim, f.conv_kernel or 4, kind="conv"))
                out.append(Linear(i, f"{pre}.{mod}.out_proj", hidden, inner // tp, quantized=q))
    return out


# --- pipeline stages ----------------------------------------------------------------------------


def pp_partition(num_layers: int, pp: int) -> list[range]:
    """Layers of each pipeline stage, as ``vllm.distributed.utils.get_pp_indices`` splits them
    (the remainder goes to the stages before the last, from the second-to-last backwards)."""
    sizes = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        sizes[-i] += 1
    out, start = [], 0
    for s in sizes:
        out.append(range(start, start + s))
        start += s
    return out


# --- weights -------------------------------------------------------------------------------------


def _other_params_per_layer(f: ArchFacts, blocks: list[BlockKind], tp: int) -> int:
    """Norms and the small Mamba tensors (A, D, dt_bias, gated norm, conv bias): model dtype."""
    n = 2 * f.hidden_size  # the layer's norms (Gemma has more; a few KiB either way)
    if "mamba" in blocks:
        heads = f.mamba_num_heads or 0
        inner = heads * (f.mamba_head_dim or 0)
        n += 3 * (heads // tp) + inner // tp + inner // tp + 2 * mamba_groups_per_rank(f, tp) * (f.ssm_state_size or 0)
    return n


@dataclass
class StageWeights:
    stage: int
    layers: range
    bytes: int
    read_bytes: int  # read per decoded token (routed experts: their active share only)
    detail: dict[str, int] = field(default_factory=dict)


def stage_weights(f: ArchFacts, fmt: str, tp: int, pp: int) -> list[StageWeights]:
    model_bytes = dtype_bytes(f.torch_dtype or BF16)
    qbytes = WEIGHT_FORMATS[fmt]
    quantized = fmt not in ("bf16", "fp16", "fp32")
    blocks = layer_blocks(f)
    vocab = f.vocab_size or 0
    stages = []
    for s, layers in enumerate(pp_partition(len(blocks), pp)):
        detail: dict[str, float] = {"quantized": 0.0, "unquantized": 0.0, "embedding": 0.0, "lm_head": 0.0, "other": 0.0}
        read = 0.0
        for lin in linear_layers(f, tp, quantized, layers):
            b = lin.params * (qbytes if lin.quantized else model_bytes)
            detail["quantized" if lin.quantized else "unquantized"] += b
            read += b * lin.active
        other = sum(_other_params_per_layer(f, blocks[i], tp) for i in layers) * model_bytes
        detail["other"] += other
        read += other
        embed = vocab * f.hidden_size // tp * model_bytes
        if s == 0:
            detail["embedding"] += embed  # one row read per token: left out of the read bytes
        if s == pp - 1:
            lm_quant = quantized and "lm_head" not in set(f.unquantized or ["lm_head"])
            lm = vocab * f.hidden_size // tp * (qbytes if lm_quant else model_bytes)
            if not (f.tie_word_embeddings and pp == 1):
                detail["lm_head"] += lm
            read += lm + f.hidden_size * model_bytes
            detail["other"] += f.hidden_size * model_bytes  # final norm
        if f.extra_params:
            # vision/audio towers: built whole on every GPU (vLLM 0.26 gemma4_mm.py builds the tower with
            # transformers' AutoModel: no tensor-parallel layers), not read in text decode
            detail["extra"] = f.extra_params * model_bytes
        total = int(sum(detail.values()))
        stages.append(StageWeights(s, layers, total, int(read), {k: int(v) for k, v in detail.items()}))
    return stages


# --- KV cache ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerKV:
    """The cache spec of one layer on one rank (what vLLM's KVCacheSpec holds)."""

    layer: int
    kind: str  # full | sliding | mamba
    bytes_per_token: int  # attention: per token; mamba: 0
    state_bytes: int  # mamba: per sequence; attention: 0
    window: int | None = None

    @property
    def spec_key(self) -> tuple[str, int, int, int | None]:
        return (self.kind, self.bytes_per_token, self.state_bytes, self.window)


def layer_kv(f: ArchFacts, tp: int, kv_dtype: str) -> list[LayerKV]:
    kvb = dtype_bytes(kv_dtype)
    out = []
    for i, blocks in enumerate(layer_blocks(f)):
        if "attention" in blocks:
            a = attention_shape(f, i)
            per_token = int(2 * kv_heads_per_rank(a.num_kv_heads, tp) * a.head_dim * kvb)
            out.append(LayerKV(i, "sliding" if a.sliding_window else "full", per_token, 0, a.sliding_window))
        elif "mamba" in blocks:
            heads = f.mamba_num_heads or 0
            inner = heads * (f.mamba_head_dim or 0)
            conv_dim = inner // tp + 2 * mamba_groups_per_rank(f, tp) * (f.ssm_state_size or 0)
            conv_bytes = dtype_bytes(f.mamba_conv_cache_dtype or f.torch_dtype or BF16)
            ssm_bytes = dtype_bytes(f.mamba_ssm_cache_dtype or f.torch_dtype or BF16)
            # vllm/model_executor/layers/mamba/mamba_utils.py mamba2_state_shape:
            # conv (conv_kernel - 1, conv_dim / tp), temporal (n_heads / tp, head_dim, state_size)
            conv = ((f.conv_kernel or 4) - 1) * conv_dim * conv_bytes
            ssm = (heads // tp) * (f.mamba_head_dim or 0) * (f.ssm_state_size or 0) * ssm_bytes
            out.append(LayerKV(i, "mamba", 0, int(conv + ssm)))
    return out


@dataclass
class KVGroup:
    kind: str
    layers: list[int]  # global layer indices (a padded group lists fewer than group_size)
    block_size: int
    page_bytes: int  # per layer per block
    window: int | None = None


@dataclass
class KVPlan:
    block_size: int
    groups: list[KVGroup]
    group_size: int
    page_bytes: int  # uniform page (0 when per-layer pages differ in one uniform-type group)
    notes: list[str] = field(default_factory=list)


def _round_up(x: int, m: int) -> int:
    return cdiv(x, m) * m


def kv_groups(specs: list[LayerKV], block_size: int, kernel_alignment: int = 16) -> KVPlan:
    """Group layers the way vLLM's KV cache manager does (``get_kv_cache_groups``).

    - every layer the same spec → one group;
    - all attention with the same tokens per block but different sizes → one group, pages summed;
    - otherwise (sliding + full, attention + Mamba): pages unified — Mamba pages padded up to the
      attention page after the attention block size was raised to hold one Mamba state
      (``HybridAttentionMambaModelConfig``), smaller attention pages scaled by a larger block size
      (``unify_kv_cache_spec_page_size``) — then each kind split into groups of the same number of
      layers (``_get_kv_cache_groups_uniform_page_size``).
    """
    notes: list[str] = []
    if not specs:
        return KVPlan(block_size, [], 0, 0, ["attention-free: no KV cache"])
    attn = [s for s in specs if s.kind != "mamba"]
    mamba = [s for s in specs if s.kind == "mamba"]
    keys = {s.spec_key for s in specs}
    if len(keys) == 1 and not mamba:
        s = specs[0]
        g = KVGroup(s.kind, [x.layer for x in specs], block_size, block_size * s.bytes_per_token, s.window)
        return KVPlan(block_size, [g], len(specs), g.page_bytes)
    if not mamba and all(s.kind == "full" for s in specs):
        # UniformTypeKVCacheSpecs: one group, every layer its own page size
        g = KVGroup("full", [x.layer for x in specs], block_size, 0)
        notes.append("one group of full-attention layers with different sizes: bytes per block = sum of the layers' pages")
        return KVPlan(block_size, [g], len(specs), 0, notes)
    if mamba and not attn:
        raise ValueError("attention-free (pure Mamba) models are not planned")
    if mamba:
        per_token = max(s.bytes_per_token for s in attn)
        mamba_page = max(s.state_bytes for s in mamba)
        needed = kernel_alignment * cdiv(mamba_page, kernel_alignment * per_token)
        if block_size < needed:
            notes.append(
                f"attention block size raised from {block_size} to {needed} tokens so that one attention page "
                f"({needed} × {per_token} B) holds a Mamba state ({mamba_page} B)"
            )
            block_size = needed
    # pages per kind at this block size
    pages = {s.spec_key: (block_size * s.bytes_per_token if s.kind != "mamba" else s.state_bytes) for s in specs}
    max_page = max(pages[s.spec_key] for s in attn)
    block_of: dict[tuple[str, int, int, int | None], int] = {}
    for key, page in pages.items():
        if key[0] == "mamba":
            block_of[key] = block_size
            continue
        if max_page % page:
            raise ValueError(f"cannot unify KV page sizes {page} and {max_page} (not a multiple): vLLM refuses this model")
        block_of[key] = block_size * (max_page // page)
        if max_page != page:
            notes.append(f"{key[0]} layers ({page} B pages) use {block_of[key]}-token blocks to match the {max_page} B page")
    if mamba:
        notes.append(f"Mamba state pages ({mamba[0].state_bytes} B) padded to the attention page ({max_page} B)")
    by_kind: dict[tuple[str, int, int, int | None], list[int]] = {}
    for s in specs:
        by_kind.setdefault(s.spec_key, []).append(s.layer)
    counts = [len(v) for v in by_kind.values()]
    group_size = min(counts)
    if max(counts) < group_size * 1.5:
        group_size = max(counts)
    groups: list[KVGroup] = []
    for key, layers in by_kind.items():
        n_groups = cdiv(len(layers), group_size)
        if len(layers) % group_size:
            notes.append(f"{group_size - len(layers) % group_size} padding layer(s) in the {key[0]} groups")
        for j in range(n_groups):
            groups.append(KVGroup(key[0], layers[j::n_groups], block_of[key], max_page, key[3]))
    return KVPlan(block_size, groups, group_size, max_page, notes)


def blocks_per_request(plan: KVPlan, specs: list[LayerKV], max_len: int, in_flight_tokens: int) -> int:
    """Blocks one request of ``max_len`` tokens takes from the shared pool, over all groups
    (``max_memory_usage_bytes`` of each spec ÷ its page: full cdiv(len, block), sliding
    cdiv(min(window − 1 + in-flight tokens, len), block) + 1, Mamba one state)."""
    if len(plan.groups) == 1 and plan.page_bytes == 0:
        return cdiv(max_len, plan.block_size)
    total = 0
    for g in plan.groups:
        if g.kind == "full":
            total += cdiv(max_len, g.block_size)
        elif g.kind == "sliding":
            assert g.window is not None
            total += cdiv(min(g.window - 1 + in_flight_tokens, max_len), g.block_size) + 1
        else:
            total += 1
    return total


def worker_bytes_per_block(plan: KVPlan, specs: list[LayerKV], stage_layers: range) -> int:
    """Bytes one block takes on one worker (its pipeline stage's layers only)."""
    in_stage = [s for s in specs if s.layer in stage_layers]
    if not in_stage:
        return 0
    if len(plan.groups) == 1 and plan.page_bytes == 0:
        return sum(plan.block_size * s.bytes_per_token for s in in_stage)
    if len(plan.groups) == 1:
        return len(in_stage) * plan.page_bytes
    # equal-size groups share group_size tensors; on this worker the widest projected group counts
    widest = max(sum(1 for layer in g.layers if layer in stage_layers) for g in plan.groups)
    return widest * plan.page_bytes


# --- the whole figure ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CudaMemory:
    """How one vLLM version sizes the KV cache on a CUDA GPU (catalog/rules.yml ``capacity.cuda``).

    vLLM's worker (``determine_available_memory``): requested = ceil(CUDA-visible total ×
    gpu_memory_utilization); KV = requested − weights as loaded − peak activation of the profile
    run − non-torch memory − (the CUDA-graph estimate, where the version and model runner put it
    inside the budget). Each figure here either was captured from that version on a GPU
    (``measured``) or is an estimate that errs towards less KV.
    """

    measured: bool  # the activation/non-torch/load figures come from captures of this version
    reference: str
    #: NVML's total minus what CUDA reports as total, per device model; ``default`` for others
    cuda_reserved_bytes: dict[str, int]
    non_torch_bytes: int  # one GPU (CUDA context, cuBLAS workspaces, ...)
    non_torch_per_peer_bytes: int  # each further rank of the TP/PP group (NCCL, all-reduce buffers): estimate
    #: rows of float32 logits in the profile run's sampling pass; 0: max_num_seqs rows
    logits_rows: int
    #: weights as loaded over the checkpoint arithmetic, by weight format (repacking, padding)
    load_overhead: dict[str, float]
    #: "never" (graphs are captured after the KV cache, from memory outside the request) or
    #: "v1_runner" (the V1 model runner estimates them first and takes them from the budget)
    cudagraph_in_budget: str
    cudagraph_estimate_bytes: int  # used where the graphs come out of the budget: estimate
    margin_bytes: int  # rounding of the profiler, taken off the KV memory


@dataclass(frozen=True)
class EngineBehaviour:
    """What differs between vLLM versions for the arithmetic (from catalog/rules.yml ``capacity``)."""

    block_size: int
    gpu_memory_utilization: float
    max_num_batched_tokens: int
    token_formula: str  # "label" (kv_cache_size_tokens, 0.26+) or "log" (num_blocks // groups × min block)
    null_block_reserved: bool
    cuda: CudaMemory | None = None  # None: no CUDA accounting (CPU, or a fixed kv_cache_memory_bytes)
    max_num_seqs: int = 256
    enforce_eager: bool = False
    device_model: str = ""


@dataclass
class CapacityInput:
    facts: ArchFacts
    quantization: str | None
    tp: int
    pp: int
    max_model_len: int
    accelerator: str  # cuda | cpu
    device_memory_bytes: int
    memory_bandwidth_gbs: float
    engine: EngineBehaviour
    gpu_memory_utilization: float | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_dtype: str = "auto"
    dtype: str = "auto"  # the engine's --dtype
    compute_capability: str | None = None  # cuda: which dtypes the GPU runs


#: ``--dtype`` spellings → the dtype's name (vllm/config/model.py _STR_DTYPE_TO_TORCH_DTYPE)
MODEL_DTYPES: dict[str, str] = {
    "half": "float16",
    "float16": "float16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float": "float32",
    "float32": "float32",
    "fp32": "float32",
}


def supported_model_dtypes(accelerator: str, compute_capability: str | None = None) -> list[str]:
    """The dtypes vLLM runs a model in on this accelerator, preferred first
    (``current_platform.supported_dtypes``: vllm/platforms/cpu.py for x86-64 and aarch64 Linux,
    vllm/platforms/cuda.py by compute capability; an unknown capability counts as 8.0+)."""
    if accelerator == "cuda" and compute_capability:
        major = int(compute_capability.split(".")[0])
        if major < 6:
            return ["float32"]
        if major < 8:
            return ["float16", "float32"]
    return ["bfloat16", "float16", "float32"]


def resolve_model_dtype(config_dtype: str | None, dtype: str, accelerator: str, compute_capability: str | None = None) -> tuple[str, str]:
    """The dtype vLLM runs the model (and, with ``--kv-cache-dtype auto``, its KV cache) in, and why.

    ``vllm/config/model.py`` ``_get_and_verify_dtype`` / ``_resolve_auto_dtype`` (0.19.0 and
    0.32.0): an explicit ``--dtype`` wins; ``auto`` takes the checkpoint's dtype, except that a
    float32 checkpoint is downcast to the platform's preferred dtype (bfloat16 on CPUs and on GPUs
    of compute capability 8.0+), and a dtype the platform lacks falls back to that preferred one.
    """
    explicit = (dtype or "auto").lower()
    if explicit != "auto":
        if explicit not in MODEL_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (known: auto, {', '.join(sorted(MODEL_DTYPES))})")
        return MODEL_DTYPES[explicit], f"engine_args.dtype {dtype}"
    checkpoint = MODEL_DTYPES.get((config_dtype or BF16).lower(), config_dtype or BF16)
    supported = supported_model_dtypes(accelerator, compute_capability)
    if checkpoint == "float32":
        return supported[0], f"--dtype auto downcasts a float32 checkpoint to {supported[0]}"
    if checkpoint not in supported:
        return supported[0], f"{checkpoint} is not supported here: vLLM falls back to {supported[0]}"
    return checkpoint, "--dtype auto = the checkpoint's dtype"


def _resolve_kv_dtype(ci: CapacityInput, model_dtype: str) -> tuple[str, str]:
    if ci.kv_cache_dtype and ci.kv_cache_dtype != "auto":
        return ci.kv_cache_dtype, "engine_args.kv_cache_dtype"
    if ci.facts.kv_cache_dtype:
        return ci.facts.kv_cache_dtype, "the checkpoint's KV cache scheme (vLLM resolves 'auto' to it)"
    return model_dtype, "'auto' = the model dtype"


def rope_cache_bytes(f: ArchFacts) -> int:
    """The rotary embedding's cos/sin cache vLLM builds at load: max_position_embeddings × head size
    in the model dtype, one per distinct head size (``get_rope``; captured on 0.26: 16 MiB for a
    64-wide head at 131072 positions)."""
    sizes = {f.head_dim or f.hidden_size // f.num_attention_heads}
    if f.global_head_dim:
        sizes.add(f.global_head_dim)
    return sum(f.max_position_embeddings * d * int(dtype_bytes(f.torch_dtype or BF16)) for d in sizes)


def _vision(f: ArchFacts) -> dict[str, int] | None:
    extra = f.model_extra or {}
    v = extra.get("vision")
    return v if isinstance(v, dict) else None


def activation_terms(ci: CapacityInput, f: ArchFacts, last_stage: bool) -> tuple[int, list[str], bool]:
    """Peak activation of vLLM's profile run on one worker, and how it was reached.

    The profile run is one forward pass of ``max_num_batched_tokens`` tokens, then a sampling pass
    over float32 logits (``_dummy_run`` + ``_dummy_sampler_run``); the torch peak over both, above
    what was allocated before, is the figure. Modelled as the larger of
    - the forward pass: T × dtype × (4 × MLP width per rank + 2 × hidden) (the MLP's gate/up output,
      its activation and the residual stream at once), and
    - the sampling pass: logits rows × vocab × 4 + 2 × T × hidden × dtype,
    plus, for a model with a vision tower, what its profile pass holds (the tower's own forward
    over one image of the largest size: patches × dtype × (4 × its MLP width + 2 × its width)).
    Captured on vLLM 0.26.0 (dense Llama shapes, bf16 and NVFP4): the sampling term matched to
    within 64 KiB, the forward term (a 16-layer 2048-wide model at T = 8192) to 0.7 % above.
    """
    mem = ci.engine.cuda
    assert mem is not None
    b = int(dtype_bytes(f.torch_dtype or BF16))
    t = ci.engine.max_num_batched_tokens
    h = f.hidden_size
    estimate = not mem.measured
    widths = [(f.intermediate_size or 0) // ci.tp]
    why = ""
    if f.num_experts:
        routed = (f.moe_intermediate_size or f.intermediate_size or 0) * (f.num_experts_per_tok or 1)
        widths.append((routed + (f.shared_expert_intermediate_size or 0)) // ci.tp)
        estimate = True
        why = "MoE width = routed experts per token + shared expert (not captured)"
    if f.hybrid_override_pattern:
        inner = (f.mamba_num_heads or 0) * (f.mamba_head_dim or 0)
        widths.append(inner // ci.tp)
        estimate = True
        why = (why + "; " if why else "") + "Mamba layers (not captured)"
    fwd = t * b * (4 * max(widths) + 2 * h)
    rows = mem.logits_rows or ci.engine.max_num_seqs
    sample = rows * (f.vocab_size or 0) * 4 + 2 * t * h * b if last_stage else 0
    steps = [f"forward T={t}: {t} × {b} × (4 × {max(widths)} + 2 × {h}) = {fmt_bytes(fwd)}"]
    if last_stage:
        steps.append(f"sampling: {rows} rows × vocab {f.vocab_size} × 4 + 2 × {t} × {h} × {b} = {fmt_bytes(sample)}")
    peak = max(fwd, sample)
    v = _vision(f)
    if v or f.extra_params:
        estimate = True
        if v:
            per_item = v.get("max_tokens_per_item") or v.get("default_output_length", 280)
            patches = per_item * v.get("pooling_kernel_size", 1) ** 2
            tower = patches * b * (4 * v["intermediate_size"] + 2 * v["hidden_size"])
            steps.append(
                f"vision tower over one image of {per_item} tokens ({patches} patches): {patches} × {b} × "
                f"(4 × {v['intermediate_size']} + 2 × {v['hidden_size']}) = {fmt_bytes(tower)} (estimate: not captured)"
            )
            peak = max(peak, tower) + per_item * h * b
        else:
            why = (why + "; " if why else "") + "a vision/audio tower whose shapes the facts do not give (not counted)"
    if why:
        steps.append(f"estimate: {why}")
    return peak, steps, estimate


def cuda_kv_memory(
    ci: CapacityInput, f: ArchFacts, fmt: str, stages: list[StageWeights], steps: list[str]
) -> tuple[list[int], dict[str, Any]]:
    """KV memory per worker as vLLM's GPU worker computes it (see :class:`CudaMemory`)."""
    util = ci.gpu_memory_utilization or ci.engine.gpu_memory_utilization
    mem = ci.engine.cuda
    if mem is None:
        raise ValueError("the CUDA memory model of this engine version is missing from catalog/rules.yml capacity.cuda")
    reserved = mem.cuda_reserved_bytes.get(ci.engine.device_model, mem.cuda_reserved_bytes["default"])
    reserved_known = ci.engine.device_model in mem.cuda_reserved_bytes
    total = ci.device_memory_bytes - reserved
    requested = math.ceil(total * util)
    world = ci.tp * ci.pp
    non_torch = mem.non_torch_bytes + (world - 1) * mem.non_torch_per_peer_bytes
    overhead = mem.load_overhead.get(fmt, max(mem.load_overhead.values()))
    rope = rope_cache_bytes(f)
    moe_or_hybrid = bool(f.num_experts or f.hybrid_override_pattern)
    graphs_in = not ci.engine.enforce_eager and (
        mem.cudagraph_in_budget == "always" or (mem.cudagraph_in_budget == "v1_runner" and moe_or_hybrid)
    )
    graphs = mem.cudagraph_estimate_bytes if graphs_in else 0
    estimate_terms: list[str] = []
    if not reserved_known:
        estimate_terms.append(f"CUDA-visible total of {ci.engine.device_model or 'this GPU'} not captured")
    if world > 1:
        estimate_terms.append(f"non-torch memory of {world - 1} peer rank(s) (NCCL, all-reduce buffers) not captured")
    if graphs_in:
        estimate_terms.append("CUDA-graph memory taken from the budget not captured")
    steps.append(
        f"KV memory per GPU (vLLM {'measured' if mem.measured else 'estimated'} accounting): CUDA-visible total = "
        f"{fmt_bytes(ci.device_memory_bytes)} − {fmt_bytes(reserved)} driver reserve = {fmt_bytes(total)}"
        + ("" if reserved_known else " (estimate: reserve of another GPU)")
        + f"; requested = ceil(total × {util}) = {fmt_bytes(requested)}"
    )
    kv_mem: list[int] = []
    loaded_all: list[int] = []
    act_all: list[int] = []
    act_estimate = False
    for s in stages:
        loaded = int(s.bytes * (1 + overhead)) + rope
        act, act_steps, est = activation_terms(ci, f, s.stage == len(stages) - 1)
        act_estimate |= est
        act += mem.margin_bytes
        kv = requested - loaded - act - non_torch - graphs
        kv_mem.append(kv)
        loaded_all.append(loaded)
        act_all.append(act)
        steps.append(
            f"  stage {s.stage}: weights as loaded {fmt_bytes(loaded)} (checkpoint {fmt_bytes(s.bytes)} × (1 + {overhead:g}) "
            f"+ rotary cache {fmt_bytes(rope)}); peak activation {fmt_bytes(act)} (max of the passes + "
            f"{fmt_bytes(mem.margin_bytes)} margin); non-torch {fmt_bytes(non_torch)}; CUDA graphs "
            + (f"{fmt_bytes(graphs)} inside the budget" if graphs_in else "outside the budget")
            + f" -> KV {fmt_bytes(kv)}"
        )
        steps.extend(f"    {x}" for x in act_steps)
    if act_estimate:
        estimate_terms.append("peak activation of shapes not captured on this version")
    if not mem.measured:
        estimate_terms.append("this engine version's activation and non-torch memory were not captured")
    if estimate_terms:
        steps.append("  estimate, erring towards less KV: " + "; ".join(estimate_terms))
    memory = {
        "device_bytes": ci.device_memory_bytes,
        "cuda_total_bytes": total,
        "gpu_memory_utilization": util,
        "requested_bytes": requested,
        "weights_loaded_bytes": loaded_all,
        "peak_activation_bytes": act_all,
        "non_torch_bytes": non_torch,
        "cudagraph_in_budget_bytes": graphs,
        "estimate_terms": estimate_terms,
    }
    return kv_mem, memory


def plan_capacity(ci: CapacityInput) -> dict[str, Any]:
    """Every figure of one layout, plus the steps that led to them (ints, or floats rounded)."""
    steps: list[str] = []
    model_dtype, model_dtype_why = resolve_model_dtype(ci.facts.torch_dtype, ci.dtype, ci.accelerator, ci.compute_capability)
    f = ci.facts
    if model_dtype != (f.torch_dtype or BF16):
        # the weights and an 'auto' KV cache follow the dtype the engine runs in
        f = f.model_copy(update={"torch_dtype": model_dtype})
        steps.append(f"model dtype {model_dtype} (checkpoint {ci.facts.torch_dtype or BF16}: {model_dtype_why})")
    fmt = weight_format(ci.quantization, f.torch_dtype)
    stages = stage_weights(f, fmt, ci.tp, ci.pp)
    steps.append(
        f"weights: format {fmt} ({WEIGHT_FORMATS[fmt]:g} B/param for quantized layers, "
        f"{dtype_bytes(f.torch_dtype or BF16):g} B for embeddings, norms and excluded layers); "
        f"tp={ci.tp} shards each layer, pp={ci.pp} splits the {len(layer_blocks(f))} layers as "
        + ", ".join(f"{r.start}-{r.stop - 1}" for r in (s.layers for s in stages))
    )
    for s in stages:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s.detail.items() if v)
        steps.append(f"  stage {s.stage}: {fmt_bytes(s.bytes)} per GPU ({parts})")
    weights_max = max(s.bytes for s in stages)

    kv_dtype, kv_dtype_why = _resolve_kv_dtype(ci, model_dtype)
    specs = layer_kv(f, ci.tp, kv_dtype)
    per_token = sum(s.bytes_per_token for s in specs)
    n_attn = sum(1 for s in specs if s.kind != "mamba")
    n_mamba = sum(1 for s in specs if s.kind == "mamba")
    steps.append(
        f"KV dtype {kv_dtype} ({kv_dtype_why}); {n_attn} attention layer(s)"
        + (f", {n_mamba} Mamba layer(s) with a fixed state per sequence" if n_mamba else "")
        + f": {per_token} B per token per rank over all stages"
    )
    kv_plan = kv_groups(specs, ci.engine.block_size)
    estimate = len(kv_plan.groups) > 1
    if estimate:
        kv_plan.notes.append(
            "hybrid grouping as vLLM 0.19.0 does it (equal-size groups, one shared page size); vLLM 0.32+ may pack "
            "pages differently (_get_packed_kv_cache_groups): these KV figures are an estimate"
        )
    steps.extend(f"  {n}" for n in kv_plan.notes)
    steps.append(
        f"  KV groups: {len(kv_plan.groups)} of {kv_plan.group_size} layer(s), block size {kv_plan.block_size}"
        + (f", page {kv_plan.page_bytes} B per layer" if kv_plan.page_bytes else "")
    )

    # KV memory per worker
    memory: dict[str, Any] = {}
    kv_mem: list[int] = []
    if ci.kv_cache_memory_bytes is not None:
        kv_mem = [ci.kv_cache_memory_bytes] * ci.pp
        memory = {"kv_cache_memory_bytes": ci.kv_cache_memory_bytes}
        steps.append(f"KV memory per worker: kv_cache_memory_bytes = {ci.kv_cache_memory_bytes} (fixed; no profiling)")
    else:
        kv_mem, memory = cuda_kv_memory(ci, f, fmt, stages, steps)
    memory["kv_bytes_per_worker"] = kv_mem
    memory["weights_fit"] = all(m > 0 for m in kv_mem)

    # blocks per worker, the smallest counts
    per_block = [worker_bytes_per_block(kv_plan, specs, s.layers) for s in stages]
    worker_blocks = [(m // b if b else 0) for m, b in zip(kv_mem, per_block, strict=True)]
    num_blocks = max(0, min(worker_blocks)) if worker_blocks else 0
    steps.append(
        "  blocks per worker = KV memory // bytes per block: "
        + ", ".join(f"{max(m, 0)} // {b} = {max(n, 0)}" for m, b, n in zip(kv_mem, per_block, worker_blocks, strict=True))
        + f"; the engine takes the smallest: {num_blocks}"
    )
    in_flight = ci.engine.max_num_batched_tokens
    need = blocks_per_request(kv_plan, specs, ci.max_model_len, in_flight)
    usable = num_blocks - (1 if ci.engine.null_block_reserved else 0)
    concurrency = num_blocks / need if need else 0.0
    if ci.engine.token_formula == "label":
        tokens = int(concurrency * ci.max_model_len)
        token_why = f"num_blocks / blocks per request × max_model_len = {num_blocks} / {need} × {ci.max_model_len}"
    else:
        groups = max(1, len(kv_plan.groups))
        tokens = num_blocks // groups * min(g.block_size for g in kv_plan.groups) if kv_plan.groups else 0
        token_why = f"num_blocks // groups × block size = {num_blocks} // {groups} × {min(g.block_size for g in kv_plan.groups)}"
    steps.append(f"  one request of {ci.max_model_len} tokens takes {need} block(s); KV tokens = {token_why} = {tokens}")
    steps.append(f"  max concurrency at max_model_len = {num_blocks} / {need} = {concurrency:.2f}")
    fits = need <= usable and usable > 0
    largest = _largest_len(kv_plan, specs, usable, in_flight, f.max_position_embeddings)
    if not fits:
        steps.append(f"  does not fit max_model_len {ci.max_model_len}: the largest length that fits is {largest}")

    # decode bound
    kv_read = []
    for s in stages:
        read = 0
        for spec in specs:
            if spec.layer in s.layers:
                ctx = min(ci.max_model_len, spec.window) if spec.window else ci.max_model_len
                read += spec.bytes_per_token * ctx + spec.state_bytes
        kv_read.append(read)
    per_stage = [w.read_bytes + r for w, r in zip(stages, kv_read, strict=True)]
    seconds = sum(b / (ci.memory_bandwidth_gbs * 1e9) for b in per_stage)
    bound = round(1 / seconds, 1) if seconds else 0.0
    steps.append(
        f"decode bound (batch 1, context {ci.max_model_len}): per GPU and stage, weights read + KV read = "
        + ", ".join(f"{fmt_bytes(w.read_bytes)} + {fmt_bytes(r)}" for w, r in zip(stages, kv_read, strict=True))
        + f"; {ci.memory_bandwidth_gbs:g} GB/s ÷ that"
        + (" (stages one after another)" if ci.pp > 1 else "")
        + f" ≤ {bound} tokens/s"
    )
    return {
        "weight_format": fmt,
        "weights": {
            "bytes_per_gpu": [s.bytes for s in stages],
            "max_bytes_per_gpu": weights_max,
            "stages": [{"layers": [s.layers.start, s.layers.stop - 1], **s.detail} for s in stages],
        },
        "memory": memory,
        "kv": {
            "dtype": kv_dtype,
            "bytes_per_token": per_token,
            "bytes_per_token_per_worker": [sum(x.bytes_per_token for x in specs if x.layer in st.layers) for st in stages],
            "attention_layers": n_attn,
            "mamba_layers": n_mamba,
            "block_size": kv_plan.block_size,
            "groups": len(kv_plan.groups),
            "group_size": kv_plan.group_size,
            "bytes_per_block_per_worker": per_block,
            "num_blocks": num_blocks,
            "blocks_per_request": need,
            "tokens": tokens,
            "max_concurrency": round(concurrency, 2),
            "fits_max_model_len": fits,
            "largest_max_model_len": largest,
            "estimate": estimate or bool(memory.get("estimate_terms")),
        },
        "decode": {
            "bandwidth_gbs": ci.memory_bandwidth_gbs,
            "read_bytes_per_token": per_stage,
            "tokens_per_s_bound": bound,
        },
        "steps": steps,
    }


def _largest_len(plan: KVPlan, specs: list[LayerKV], usable: int, in_flight: int, limit: int) -> int:
    if usable <= 0 or not plan.groups:
        return 0
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if blocks_per_request(plan, specs, mid, in_flight) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def marlin_ok(n: int, k: int, tiles: list[tuple[int, int]]) -> bool:
    return any(n % tn == 0 and k % tk == 0 for tn, tk in tiles)


def tile_failure(n: int, k: int, tiles: list[tuple[int, int]]) -> str:
    """Why ``(n, k)`` fits no Marlin thread tile, naming the first family's failing side."""
    tn, tk = tiles[0]
    if n % tn:
        return f"size_n = {n} is not divisible by {tn}"
    if k % tk:
        alt = " or ".join(f"n % {a} and k % {b}" for a, b in tiles[1:])
        return f"size_k = {k} is not divisible by {tk}" + (f" (nor is {alt} met)" if alt else "")
    return f"({n}, {k}) fits no tile"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def gcd_all(values: list[int]) -> int:
    out = 0
    for v in values:
        out = math.gcd(out, v)
    return out
