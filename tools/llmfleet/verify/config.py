"""What one verify run checks: validated at the edge, stdlib only (hosts have no pydantic).

The input is either an instance of a plan (``docs/architecture.md``, plan schema 1: ``url``,
``served_model_name``, ``max_model_len``, ``targets``, ``load``, optional ``api_key_env``) or a
bare URL with targets given on the command line. Unknown keys of ``targets`` and ``load`` are
refused: a target this verify does not know must not be skipped silently.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import VerifyError
from .httpclient import Endpoint, Timeouts

PLAN_SCHEMA = 1
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: output tokens of the full-context probe; its prompt is min_context_tokens minus these
CONTEXT_PROBE_OUTPUT_TOKENS = 4


def _number(value: object, where: str, *, integer: bool, minimum: float, exclusive: bool = False) -> float | int:
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise VerifyError(f"{where} must be {kind}, got {value!r}")
    assert isinstance(value, int | float)
    if value != value or (value <= minimum if exclusive else value < minimum):  # NaN or out of range
        bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
        raise VerifyError(f"{where} must be {bound}, got {value!r}")
    return value


def _known_mapping(cls: type, raw: object, where: str, noun: str) -> Mapping[str, Any]:
    """``raw`` as a mapping whose keys are all fields of the dataclass ``cls`` (None: empty)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise VerifyError(f"{where} must be a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise VerifyError(f"{where}: unknown {noun} {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return raw


@dataclass(frozen=True, slots=True)
class Targets:
    """What the live instance must show (plan instance ``targets``)."""

    min_output_tokens_per_s: float | None = None
    max_ttft_p95_s: float | None = None
    min_context_tokens: int | None = None
    min_kv_cache_tokens: int | None = None
    #: the largest worsening against the last passing run, as a fraction (default 0.2)
    max_regression: float | None = None

    @classmethod
    def parse(cls, raw: object, where: str) -> Targets:
        raw = _known_mapping(cls, raw, where, "target")
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None:
                continue
            integer = key in ("min_context_tokens", "min_kv_cache_tokens")
            values[key] = _number(value, f"{where}.{key}", integer=integer, minimum=0, exclusive=True)
        return cls(**values)

    def merged(self, overrides: Mapping[str, float | int | None]) -> Targets:
        """These targets with the given ones (not None) put in their place."""
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        Targets.parse(given, "targets")  # validates
        return replace(self, **given)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """The fixed streaming load (plan instance ``load``)."""

    concurrency: int = 4
    requests: int = 16
    prompt_tokens: int = 64
    output_tokens: int = 32

    @classmethod
    def parse(cls, raw: object, where: str) -> LoadSpec:
        raw = _known_mapping(cls, raw, where, "key")
        values = {k: int(_number(v, f"{where}.{k}", integer=True, minimum=1)) for k, v in raw.items()}
        return cls(**values)

    def merged(self, overrides: Mapping[str, int | None]) -> LoadSpec:
        for key, value in overrides.items():
            if value is not None:
                _number(value, f"--{key.replace('_', '-')}", integer=True, minimum=1)
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given)


@dataclass(frozen=True, slots=True)
class PlanFacts:
    """What the plan predicts about the instance; None: the plan does not say, nothing is compared.

    ``model_root`` is ``models[<key>].store_path``: vLLM serves the model from that directory and
    reports it as ``root`` in ``/v1/models``; the store name is content-addressed by the pin, so the
    same path means the same revision. ``kv_*`` and ``decode_bound_tokens_per_s`` come from the
    capacity planner (``instances[i].capacity``: ``kv.tokens``, ``kv.num_blocks``, ``kv.block_size``,
    ``kv.estimate``, ``decode.tokens_per_s_bound``); ``accelerator`` from ``hardware.accelerator``.
    """

    model_key: str | None = None
    model_root: str | None = None
    revision: str | None = None
    accelerator: str | None = None
    kv_tokens: int | None = None
    kv_blocks: int | None = None
    kv_block_size: int | None = None
    kv_estimate: bool = False
    decode_bound_tokens_per_s: float | None = None

    @property
    def kv_exact(self) -> bool:
        """The KV figures can be compared exactly: a CPU build with a fixed KV size (no profiling)."""
        return self.accelerator == "cpu" and not self.kv_estimate


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """Concurrency 1, 2, 4, … up to ``max_concurrency``, until throughput grows less than ``min_gain``."""

    max_concurrency: int = 64
    min_gain: float = 0.1
    requests_per_stream: int = 4  # a level of concurrency c sends max(load.requests, c × this)


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    url: str
    instance: str | None = None
    model: str | None = None  # None: take the one model the server serves
    plan_max_model_len: int | None = None
    generation: str | None = None
    api_key_env: str | None = None
    #: a file holding the key (``VLLM_API_KEY=<key>``, as the unit's environment file, or the bare key)
    api_key_file: str | None = None
    targets: Targets = field(default_factory=Targets)
    load: LoadSpec = field(default_factory=LoadSpec)
    timeouts: Timeouts = field(default_factory=Timeouts)
    ready_timeout: float = 120.0
    context_probe_output_tokens: int = CONTEXT_PROBE_OUTPUT_TOKENS
    plan: PlanFacts = field(default_factory=PlanFacts)
    #: more concurrency levels measured after the target level (``load.concurrency``), reported only
    extra_levels: tuple[int, ...] = ()
    sweep: SweepSpec | None = None
    ladder: bool = True
    #: other clients may use the server: a counter delta larger than the client's count only warns
    shared_server: bool = False
    history_dir: str | None = None
    regression_tolerance: float = 0.2
    #: the first load prompt's seed (the others follow); None: a random one per run, so that no run
    #: finds an earlier one's prompts in the server's prefix cache
    prompt_seed: int | None = None

    def __post_init__(self) -> None:
        try:
            Endpoint.parse(self.url)
        except ValueError as exc:
            raise VerifyError(str(exc)) from None
        if self.api_key_env is not None and not ENV_NAME_RE.match(self.api_key_env):
            raise VerifyError(f"api_key_env must name an environment variable, got {self.api_key_env!r}")
        ctx = self.targets.min_context_tokens
        if ctx is not None and ctx <= self.context_probe_output_tokens:
            raise VerifyError(f"min_context_tokens must be > {self.context_probe_output_tokens}, got {ctx}")
        if self.prompt_seed is not None and not 1 <= self.prompt_seed < 10**12:
            raise VerifyError(f"prompt seed must be >= 1 and < 10**12 (0 is the context probe's), got {self.prompt_seed}")
        if not 0 <= self.regression_tolerance < 1:
            raise VerifyError(f"regression tolerance must be >= 0 and < 1, got {self.regression_tolerance}")
        if self.sweep is not None and not 0 <= self.sweep.min_gain < 10:
            raise VerifyError(f"sweep minimum gain must be >= 0 and < 10, got {self.sweep.min_gain}")

    @property
    def levels(self) -> tuple[int, ...]:
        """The fixed concurrency levels: the target level first, then the extra ones (no repeats)."""
        out = [self.load.concurrency]
        out += [c for c in self.extra_levels if c not in out]
        return tuple(out)


#: what tools/plan.py --json prints: {"schema": PLAN_ENVELOPE, "plans": {host: plan}}
PLAN_ENVELOPE = "llmfleet.plan/1"


def read_plan(path: str, limit: str | None = None) -> dict[str, Any]:
    """A host's plan: a plan file, or tools/plan.py's --json envelope and the host ``limit`` names in it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise VerifyError(f"cannot read plan {path}: {exc.strerror or exc}") from None
    try:
        plan = json.loads(text)
    except ValueError as exc:
        raise VerifyError(f"plan {path} is not JSON: {exc}") from None
    if not isinstance(plan, dict):
        raise VerifyError(f"plan {path} is not a JSON object")
    if plan.get("schema") == PLAN_ENVELOPE:
        plan = _envelope_host(plan, limit, path)
    elif limit is not None and plan.get("host") is not None and not fnmatch.fnmatchcase(str(plan["host"]), limit):
        raise VerifyError(f"-l/--limit {limit}: plan {path} is the plan of host {plan['host']}")
    if plan.get("schema") != PLAN_SCHEMA:
        raise VerifyError(f"plan {path} has schema {plan.get('schema')!r}; this verify reads schema {PLAN_SCHEMA}")
    return plan


def _envelope_host(doc: dict[str, Any], limit: str | None, path: str) -> dict[str, Any]:
    plans = doc.get("plans")
    if not isinstance(plans, dict) or not all(isinstance(p, dict) for p in plans.values()):
        raise VerifyError(f"plan {path}: 'plans' must map host names to plans ({PLAN_ENVELOPE})")
    hosts = sorted(plans)
    picked = [h for h in hosts if limit is None or fnmatch.fnmatchcase(h, limit)]
    if len(picked) == 1:
        return dict(plans[picked[0]])
    if limit is None:
        raise VerifyError(f"plan {path} holds {len(hosts)} hosts ({', '.join(hosts) or 'none'}): pass -l/--limit HOST")
    raise VerifyError(
        f"-l/--limit {limit} matches {len(picked)} hosts of plan {path} ({', '.join(picked) or 'none'}; hosts: {', '.join(hosts)}): "
        "name one host"
    )


def plan_instance(plan: Mapping[str, Any], name: str | None, path: str) -> dict[str, Any]:
    instances = plan.get("instances")
    if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
        raise VerifyError(f"plan {path}: 'instances' must be a list of objects")
    names = [str(i.get("name")) for i in instances]
    if name is None:
        if len(instances) != 1:
            raise VerifyError(f"plan {path} has {len(instances)} instances ({', '.join(names) or 'none'}): pass --instance")
        return dict(instances[0])
    for inst in instances:
        if inst.get("name") == name:
            return dict(inst)
    raise VerifyError(f"plan {path} has no instance {name!r} (has: {', '.join(names) or 'none'})")


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def plan_facts(plan: Mapping[str, Any], inst: Mapping[str, Any]) -> PlanFacts:
    """The predictions of the plan about one instance; what is missing or malformed stays None."""
    key = inst.get("model")
    model = _mapping(_mapping(plan.get("models")).get(key)) if isinstance(key, str) else {}
    accelerator = _mapping(plan.get("hardware")).get("accelerator")
    capacity = _mapping(inst.get("capacity"))
    kv = _mapping(capacity.get("kv"))
    bound = _mapping(capacity.get("decode")).get("tokens_per_s_bound")
    root, revision = model.get("store_path"), model.get("revision")
    return PlanFacts(
        model_key=key if isinstance(key, str) else None,
        model_root=root if isinstance(root, str) and root else None,
        revision=revision if isinstance(revision, str) and revision else None,
        accelerator=accelerator if isinstance(accelerator, str) else None,
        kv_tokens=_opt_int(kv.get("tokens")),
        kv_blocks=_opt_int(kv.get("num_blocks")),
        kv_block_size=_opt_int(kv.get("block_size")),
        kv_estimate=kv.get("estimate") is True,
        decode_bound_tokens_per_s=float(bound) if isinstance(bound, int | float) and not isinstance(bound, bool) and bound > 0 else None,
    )


def config_from_instance(
    inst: Mapping[str, Any],
    *,
    target_overrides: Mapping[str, float | int | None] | None = None,
    load_overrides: Mapping[str, int | None] | None = None,
    plan: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> VerifyConfig:
    """A config from one plan instance (``plan``: the whole plan, for its predictions); overrides that are not None win."""
    name = inst.get("name")
    where = f"plan instance {name!r}"
    url = inst.get("url")
    model = inst.get("served_model_name") or inst.get("model")
    if not isinstance(url, str) or not url:
        raise VerifyError(f"{where}: 'url' must be a non-empty string")
    if not isinstance(model, str) or not model:
        raise VerifyError(f"{where}: 'served_model_name' must be a non-empty string")
    mml = inst.get("max_model_len")
    if mml is not None:
        mml = int(_number(mml, f"{where}.max_model_len", integer=True, minimum=1))
    key_env = inst.get("api_key_env")
    if key_env is not None and not isinstance(key_env, str):
        raise VerifyError(f"{where}.api_key_env must be a string")
    key_file = inst.get("api_key_file")
    if key_file is not None and (not isinstance(key_file, str) or not key_file.startswith("/")):
        raise VerifyError(f"{where}.api_key_file = {key_file!r} is not valid: expected an absolute path or null")
    if inst.get("api_key_required") is True and key_file is None and key_env is None:
        raise VerifyError(f"{where}: api_key_required is true but neither api_key_file nor api_key_env is given")
    values: dict[str, Any] = {
        "url": url,
        "instance": name if isinstance(name, str) else None,
        "model": model,
        "plan_max_model_len": mml,
        "api_key_env": key_env,
        "api_key_file": key_file,
        "targets": Targets.parse(inst.get("targets"), f"{where}.targets").merged(target_overrides or {}),
        "load": LoadSpec.parse(inst.get("load"), f"{where}.load").merged(load_overrides or {}),
        "plan": plan_facts(plan or {}, inst),
    }
    if values["targets"].max_regression is not None:
        values["regression_tolerance"] = values["targets"].max_regression
    values.update({k: v for k, v in overrides.items() if v is not None})
    return VerifyConfig(**values)
