"""The one lock file: every artifact a host runs, by version and hash.

``pins/lock.json`` holds runtimes (a vLLM distribution with its hash-locked wheel set) and
models (source, revision, every file's sha256 and size, and the architecture facts the planner
needs). Store paths are named by the hash of the pin entry, so a changed pin is a new path.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError, PlanRefused, from_validation_error

SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
DEFAULT_LOCK = Path(__file__).resolve().parents[2] / "pins" / "lock.json"


class _Pin(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Requirement(_Pin):
    name: str
    version: str
    sha256: SHA256
    filename: str | None = None
    size: Annotated[int, Field(ge=0)] | None = None

    def line(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


class CudaBuild(_Pin):
    """The CUDA release a runtime's wheels link, and the NVIDIA driver it needs.

    Read from the pinned wheels when the runtime is pinned (:func:`llmfleet.cuda.cuda_build`, with
    ``catalog/cuda.yml``: NVIDIA's release notes); the rule ``driver-cuda-minimum`` compares it with
    the hardware profile's driver.
    """

    cuda: Annotated[str, Field(pattern=r"^\d+\.\d+$")]
    release: str
    min_driver: Annotated[str, Field(pattern=r"^\d+(\.\d+)*$")]
    #: the wheel it was read from, e.g. ``nvidia-cuda-runtime-cu12 12.8.90``
    source: str


class RuntimePin(_Pin):
    distribution: str
    version: str
    engine_version: str | None = None  # the vLLM version the distribution carries
    python: Annotated[str, Field(pattern=r"^3\.\d+$")]
    device: Literal["cpu", "cuda"]
    platform: str | None = None
    status: Literal["resolved", "unresolved"] = "resolved"
    reason: str | None = None
    requirements: list[Requirement] | None = None
    excluded: list[str] = Field(default_factory=list)
    #: version constraints the resolution honoured (``uv pip compile -c``), e.g. a dependency
    #: release the engine version cannot run with
    constraints: list[str] = Field(default_factory=list)
    system_packages: list[str] = Field(default_factory=list)
    metadata_shim: bool = False
    #: architectures whose model class declares ``SupportsPP`` in this engine version, read from the
    #: release when pinning (``llmfleet.rules_scan``); None: not scanned, the PP rule cannot decide
    supports_pp: list[str] | None = None
    supports_pp_source: str | None = None
    #: a CUDA build: the CUDA release its wheels link and the driver that needs (None: a CPU build,
    #: or a CUDA release catalog/cuda.yml does not list, and the driver rule cannot decide)
    cuda: CudaBuild | None = None
    notes: str | None = None

    @property
    def resolved(self) -> bool:
        return self.status == "resolved" and bool(self.requirements)

    @property
    def vllm_version(self) -> str:
        return self.engine_version or self.version

    def requirements_text(self) -> str:
        return "".join(r.line() + "\n" for r in self.requirements or [])


class FilePin(_Pin):
    path: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-][A-Za-z0-9._/-]*$")]
    sha256: SHA256
    size: Annotated[int, Field(ge=0)]


PositiveInt = Annotated[int, Field(ge=1)]


class ArchFacts(BaseModel):
    """Architecture facts of a model: what the compatibility rules and the capacity planner read.

    Names follow the model's ``config.json`` (text config for multimodal models) where one exists.
    Only the first block is required; the rest describe the families the planner knows: dense
    decoders (Llama, Qwen, Gemma with sliding + global layers), MoE experts, and hybrid Mamba-2
    layers (Nemotron-H). Facts of the checkpoint rather than the architecture (which layers a
    quantized checkpoint keeps unquantized, its KV cache scheme) are kept here too. More keys are
    allowed and kept.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    architecture: str
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    hidden_size: PositiveInt
    head_dim: PositiveInt | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: PositiveInt
    torch_dtype: str | None = None
    # (unset booleans are left out of the lock: None means the default named here)
    tie_word_embeddings: bool | None = None  # default False
    #: gate and up projections (SwiGLU/GeGLU, the default); False for a plain up projection (Nemotron-H relu2)
    gated_mlp: bool | None = None
    # attention layer kinds: per layer "full_attention" | "sliding_attention" (Gemma 3/4)
    layer_types: list[Literal["full_attention", "sliding_attention"]] | None = None
    sliding_window: PositiveInt | None = None
    global_head_dim: PositiveInt | None = None  # head size of the full-attention layers (Gemma 4)
    num_global_key_value_heads: PositiveInt | None = None  # KV heads of full layers with attention_k_eq_v
    attention_k_eq_v: bool | None = None  # default False
    # hybrid layer pattern (Nemotron-H): M = Mamba-2, * = attention, - = MLP, E = MoE
    hybrid_override_pattern: str | None = None
    # MoE
    num_experts: PositiveInt | None = None
    num_experts_per_tok: PositiveInt | None = None
    moe_intermediate_size: PositiveInt | None = None
    shared_expert_intermediate_size: PositiveInt | None = None
    # Mamba-2
    mamba_num_heads: PositiveInt | None = None
    mamba_head_dim: PositiveInt | None = None
    ssm_state_size: PositiveInt | None = None
    mamba_n_groups: PositiveInt | None = None
    conv_kernel: PositiveInt | None = None
    mamba_ssm_cache_dtype: str | None = None
    mamba_conv_cache_dtype: str | None = None
    #: parameters outside the decoder (vision/audio towers), kept in the model dtype
    extra_params: Annotated[int, Field(ge=0)] | None = None
    #: what a quantized checkpoint keeps unquantized: "attention", "mamba", "mlp", "experts",
    #: "lm_head", or "layer:<index>" (embeddings, norms, routers, conv1d always are)
    unquantized: list[str] | None = None
    #: the KV cache dtype the checkpoint declares (e.g. a ModelOpt fp8 KV scheme); vLLM resolves
    #: ``--kv-cache-dtype auto`` to it
    kv_cache_dtype: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ArchFacts:
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types lists {len(self.layer_types)} layers, num_hidden_layers is {self.num_hidden_layers}")
        if self.hybrid_override_pattern is not None and len(self.hybrid_override_pattern) != self.num_hidden_layers:
            raise ValueError(
                f"hybrid_override_pattern has {len(self.hybrid_override_pattern)} layers, num_hidden_layers is {self.num_hidden_layers}"
            )
        if self.layer_types and "sliding_attention" in self.layer_types and not self.sliding_window:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not given")
        return self


class ModelPin(_Pin):
    source: str
    revision: str | None = None
    status: Literal["resolved", "unresolved"] = "resolved"
    reason: str | None = None
    files: list[FilePin] | None = None
    architecture: ArchFacts
    quantization: str | None = None
    trust_remote_code: bool = False
    builder: dict[str, Any] | None = None
    facts_source: str | None = None
    uncertain: list[str] | bool | None = None
    notes: str | None = None

    @property
    def resolved(self) -> bool:
        return self.status == "resolved" and self.revision is not None and bool(self.files)


class Lock(_Pin):
    schema_: Literal[1] = Field(alias="schema")
    runtimes: dict[str, RuntimePin] = Field(default_factory=dict)
    models: dict[str, ModelPin] = Field(default_factory=dict)


def canonical_json(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def content_hash(data: Any, length: int = 32) -> str:
    return hashlib.sha256(canonical_json(data)).hexdigest()[:length]


def runtime_store_name(key: str, pin: RuntimePin) -> str:
    ident = {
        "key": key,
        "distribution": pin.distribution,
        "version": pin.version,
        "python": pin.python,
        "requirements": [r.line() for r in pin.requirements or []],
        "metadata_shim": pin.metadata_shim,
    }
    return f"{content_hash(ident)}-{key}"


def model_store_name(key: str, pin: ModelPin) -> str:
    ident = {
        "key": key,
        "source": pin.source,
        "revision": pin.revision,
        "files": [f.model_dump() for f in pin.files or []],
    }
    return f"{content_hash(ident)}-{key}"


def load_lock(path: Path | str | None = None) -> Lock:
    p = Path(path or os.environ.get("LLMFLEET_LOCK") or DEFAULT_LOCK)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"lock file {p} not found (expected the pins lock, e.g. pins/lock.json)") from exc
    except json.JSONDecodeError as exc:
        raise InputError(f"lock file {p} is not valid JSON: line {exc.lineno}: {exc.msg}") from exc
    try:
        return Lock.model_validate(data)
    except ValidationError as exc:
        raise PlanRefused(from_validation_error(str(p), "lock", exc, Lock)) from exc
