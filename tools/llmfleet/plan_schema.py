"""The plan's shape, typed: what the evaluator returns and what the roles and host modules read.

One owner for the plan's schema: :class:`Plan` is checked against every plan the evaluator makes (the
unit tests plan every inventory of the repository), and generates the JSON Schema published as
``docs/plan.schema.json`` (``tools/plan.py --schema`` prints it; a test keeps the file current). The
parts only people and the rules read (``capacity``, ``rules``) are left open.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .spec import HardwareProfile

HEX = r"^[0-9a-f]+$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PlanFile(_Strict):
    path: Annotated[str, Field(description="path inside the model's store path")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    size: Annotated[int, Field(ge=0)]


class PlanModel(_Strict):
    source: Annotated[str, Field(description="hf://ORG/REPO, build:NAME, or where the pin came from")]
    revision: str | None = None
    store_path: Annotated[str, Field(description="<root>/store/<hash>-<key>: read-only once complete")]
    files: list[PlanFile]


class PlanRuntime(BaseModel):
    """The pinned vLLM: what the runtime role installs into its store path (a GPU runtime also names its CUDA)."""

    model_config = ConfigDict(extra="allow")
    key: str
    version: str
    python: Annotated[str, Field(pattern=r"^3\.[0-9]+$")]
    requirements: Annotated[str, Field(description="pip requirements, every line with --hash=sha256:")]
    store_path: str
    system_packages: list[str] = []


class PlanService(_Strict):
    dynamic_user: bool
    user_prefix: str
    private_devices: bool
    limit_nofile: int
    read_only_paths: list[str]
    api_key_dir: str
    unit_revision: Annotated[str, Field(pattern=HEX, description="sha256 of the instance templates (restarts on change)")]


class PlanSandbox(_Strict):
    device_allow: list[str] = []
    ip_address_allow: list[str] | None = None
    memory_max: int | None = None
    tasks_max: int | None = None


class PlanInstance(_Strict):
    name: str
    unit: str
    user: str
    model: str
    served_model_name: str
    devices: list[int]
    tensor_parallel: Annotated[int, Field(ge=1)]
    pipeline_parallel: Annotated[int, Field(ge=1)]
    max_model_len: Annotated[int, Field(ge=1)]
    bind: str
    port: Annotated[int, Field(ge=1024, le=65535)]
    url: str
    exposed: bool
    api_key_required: bool
    api_key_file: str | None
    argv: list[str]
    environment: dict[str, str]
    state_dir: str
    sandbox: PlanSandbox
    content_hash: Annotated[str, Field(pattern=HEX, description="what restarts the instance when it changes")]
    targets: dict[str, Any]
    load: dict[str, Any]
    capacity: dict[str, Any] | None = None
    rules: list[dict[str, Any]] = []


class PlanMirror(_Strict):
    host: str
    url: str
    upstream: str | None = None


class PlanWheel(_Strict):
    filename: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
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
    root: str
    hardware_profile: str
    hardware: HardwareProfile
    driver: dict[str, Any] | None
    runtime: PlanRuntime
    models: dict[str, PlanModel]
    service: PlanService
    instances: list[PlanInstance]
    unresolved: list[str]
    warnings: list[str]
    advice: list[str]
    site: PlanSite | None = None


def json_schema() -> dict[str, Any]:
    return Plan.model_json_schema(by_alias=True)


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
