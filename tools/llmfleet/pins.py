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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
    system_packages: list[str] = Field(default_factory=list)
    metadata_shim: bool = False
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


class ArchFacts(BaseModel):
    """Architecture facts of a model; more keys are kept for the capacity planner."""

    model_config = ConfigDict(extra="allow", frozen=True)

    architecture: str
    num_hidden_layers: Annotated[int, Field(ge=1)]
    num_attention_heads: Annotated[int, Field(ge=1)]
    num_key_value_heads: Annotated[int, Field(ge=1)]
    hidden_size: Annotated[int, Field(ge=1)]
    head_dim: Annotated[int, Field(ge=1)] | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    max_position_embeddings: Annotated[int, Field(ge=1)]
    torch_dtype: str | None = None


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
        raise PlanRefused(from_validation_error(str(p), "lock", exc)) from exc
