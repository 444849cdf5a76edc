"""The typed spec: what one host runs.

The spec is an interface. Inventory variables of a host that start with ``llmfleet_`` are
gathered, the prefix stripped, and validated here (``extra="forbid"``: a misspelt variable is
refused, never silently ignored). A renamed or removed variable is refused with its replacement.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Sequence
from importlib import resources
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: an instance runs as its own (systemd dynamic) user llmfleet-<name>; a user name has at most 31 characters
SERVICE_USER_PREFIX = "llmfleet-"
MAX_INSTANCE_NAME = 31 - len(SERVICE_USER_PREFIX)
NAME_RE = rf"^[a-z][a-z0-9-]{{0,{MAX_INSTANCE_NAME - 1}}}$"
SPEC_PREFIX = "llmfleet_"
#: llmfleet_root lives below this (systemd's StateDirectory= is relative to /var/lib, which only root may write)
ROOT_PARENT = "/var/lib/"
#: ``llmfleet_*`` names that are not spec variables (facts the bundle itself sets)
#: facts the playbooks set, not spec
NOT_SPEC = frozenset({"llmfleet_plan", "llmfleet_report", "llmfleet_mirror_ready", "llmfleet_mirror_failed"})

#: variables (without prefix) that are renamed or removed, with what to use instead
RENAMED_HOST_VARS: dict[str, str] = {
    "models": "llmfleet_instances (a list of model instances)",
    "gpu_profile": "llmfleet_hardware",
    "vllm_version": "llmfleet_runtime (a runtime key of pins/lock.json)",
    "bind": "llmfleet_api_bind",
}
RENAMED_INSTANCE_FIELDS: dict[str, str] = {
    "tp": "tensor_parallel",
    "pp": "pipeline_parallel",
    "tensor_parallel_size": "tensor_parallel",
    "pipeline_parallel_size": "pipeline_parallel",
    "gpu_ids": "gpus",
    "devices": "gpus",
    "context_length": "max_model_len",
    "extra_args": "engine_args (a mapping of vLLM flag name to value)",
}

EngineValue = str | int | float | bool


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Pcie(_Model):
    generation: Annotated[int, Field(ge=1, le=6)]
    width: Literal[1, 2, 4, 8, 16]


TopologyLevel = Literal["X", "NV", "PIX", "PXB", "PHB", "NODE", "SYS"]


DriverSource = Literal["debian-non-free", "ubuntu-server-open", "rhel-module"]


class DriverPin(_Model):
    """The NVIDIA driver of one distribution, pinned exactly (rendered by roles/nvidia_driver).

    ``version`` is the distribution's package version (apt ``Pin: version``, dnf versionlock
    ``name-version``), not only the branch: a pin that names a branch rots as the branch moves.
    """

    source: DriverSource
    version: Annotated[str, Field(min_length=3)]
    packages: Annotated[list[str], Field(min_length=1)]
    #: Ubuntu only: the package set that replaces ``packages`` when Secure Boot needs Canonical's
    #: precompiled, signed modules (``linux-modules-nvidia-*``, no DKMS build on the host)
    signed_packages: list[str] = []


#: distribution keys of ``HardwareProfile.driver``: ``<ansible_distribution lower>-<major version>``
DRIVER_DISTRIBUTIONS = ("debian-12", "ubuntu-22.04", "ubuntu-24.04", "redhat-9")


class HardwareProfile(_Model):
    """What a host has. GPU hosts count GPUs; CPU (lab) hosts count core groups."""

    description: str = ""
    accelerator: Literal["cuda", "cpu"]
    device_model: str
    device_count: Annotated[int, Field(ge=1, le=64)]
    device_memory_gib: Annotated[float, Field(gt=0)]
    memory_bandwidth_gbs: Annotated[float, Field(gt=0)]
    compute_capability: str | None = None
    interconnect: Literal["pcie", "nvlink", "none"] = "pcie"
    pcie: Pcie | None = None
    topology: list[list[TopologyLevel]] | None = None
    driver_branch: str | None = None
    #: exact driver pins per distribution (keys: DRIVER_DISTRIBUTIONS); a profile without a GPU has none
    driver: dict[str, DriverPin] = Field(default_factory=dict)
    cpu_binds: list[str] | None = None
    nccl_p2p_disable: bool = False
    #: GPUs partitioned with MIG: an instance also needs the capability nodes /dev/nvidia-caps/*
    mig: bool = False

    def with_topology(self, topology: Sequence[Sequence[str]]) -> HardwareProfile:
        """This profile with an NVML topology measured on a host (NVLink measured: interconnect nvlink)."""
        update: dict[str, Any] = {"topology": [list(row) for row in topology]}
        if any(level == "NV" for row in topology for level in row):
            update["interconnect"] = "nvlink"
        return HardwareProfile.model_validate(self.model_dump() | update)

    @field_validator("driver")
    @classmethod
    def _driver(cls, v: dict[str, DriverPin]) -> dict[str, DriverPin]:
        unknown = sorted(set(v) - set(DRIVER_DISTRIBUTIONS))
        if unknown:
            raise ValueError(f"unknown driver distribution(s) {unknown}; valid: {', '.join(DRIVER_DISTRIBUTIONS)}")
        return v

    @model_validator(mode="after")
    def _driver_fits(self) -> HardwareProfile:
        if self.driver and self.accelerator != "cuda":
            raise ValueError("driver pins are for cuda profiles; a CPU profile installs no driver")
        for distro, pin in self.driver.items():
            upstream = re.sub(r"^\d+:", "", pin.version)  # drop an epoch ("3:580.95.05-1.el9")
            if self.driver_branch and not upstream.startswith(self.driver_branch + "."):
                raise ValueError(
                    f"driver[{distro}].version {pin.version!r} is not on the profile's branch R{self.driver_branch}"
                )
        return self

    @field_validator("compute_capability")
    @classmethod
    def _cc(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"\d+\.\d+", v):
            raise ValueError("compute capability must look like '8.9'")
        return v


class Targets(_Model):
    """What a live instance must show; verify fails the rollout when one is missed."""

    min_output_tokens_per_s: Annotated[float, Field(gt=0)] | None = None
    max_ttft_p95_s: Annotated[float, Field(gt=0)] | None = None
    min_context_tokens: Annotated[int, Field(ge=1)] | None = None
    min_kv_cache_tokens: Annotated[int, Field(ge=1)] | None = None
    #: the largest worsening of throughput or TPOT against the last passing run (fraction; verify's default 0.2)
    max_regression: Annotated[float, Field(gt=0, lt=1)] | None = None


class Load(_Model):
    """The fixed streaming load verify runs."""

    concurrency: Annotated[int, Field(ge=1, le=1024)] = 4
    requests: Annotated[int, Field(ge=1, le=100000)] = 16
    prompt_tokens: Annotated[int, Field(ge=1)] = 64
    output_tokens: Annotated[int, Field(ge=2)] = 32


class Instance(_Model):
    """One vLLM server: a model on a set of devices with a parallel layout."""

    name: str
    model: str
    gpus: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    tensor_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    pipeline_parallel: Annotated[int, Field(ge=1, le=64)] = 1
    port: Annotated[int, Field(ge=1024, le=65535)]
    max_model_len: Annotated[int, Field(ge=16)]
    kv_cache_memory_bytes: Annotated[int, Field(ge=1)] | None = None
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | None = None
    engine_args: dict[str, EngineValue] = Field(default_factory=dict)
    targets: Targets = Field(default_factory=Targets)
    load: Load = Field(default_factory=Load)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(NAME_RE, v):
            raise ValueError(
                f"must be [a-z][a-z0-9-]*, at most {MAX_INSTANCE_NAME} characters (the instance runs as its own user"
                f" {SERVICE_USER_PREFIX}<name>, and a user name has at most 31)"
            )
        return v


HTTP_URL = r"^https?://[A-Za-z0-9.\[\]:_-]+(/[A-Za-z0-9._~/-]*)?$"


class SiteMirror(_Model):
    """A site's mirror of the pinned artifacts: a host of the site serves them on the LAN.

    ``url`` is what the site's hosts fetch from; ``upstream`` is where the mirror fills itself
    from (the control node's ``tools/pin.py serve``, or another mirror); without an upstream the
    mirror must already hold every blob (imported from a bundle: an air-gapped site).
    """

    host: Annotated[str, Field(min_length=1)]
    url: Annotated[str, Field(pattern=HTTP_URL)]
    upstream: Annotated[str, Field(pattern=HTTP_URL)] | None = None


class HostSpec(_Model):
    """Everything one host runs: the value of its ``llmfleet_*`` inventory variables."""

    hardware: str | HardwareProfile
    runtime: str
    api_bind: str = "127.0.0.1"
    root: Annotated[str, Field(pattern=r"^/[A-Za-z0-9._/-]+$")] = "/var/lib/llmfleet"
    instances: list[Instance] = Field(default_factory=list)
    hardware_profiles: dict[str, HardwareProfile] = Field(default_factory=dict)
    #: the site the host belongs to (hosts of a site share one mirror); None: artifacts come
    #: straight from the control node
    site: Annotated[str, Field(pattern=NAME_RE)] | None = None
    site_mirror: SiteMirror | None = None
    #: the NVML topology measured on this host, recorded into the inventory by
    #: ``tools/plan.py --record-gpus``: it replaces the profile's, so the plan stays a function of the
    #: inventory and the pins (the host's GPU check only compares)
    measured_topology: list[list[TopologyLevel]] | None = None

    @model_validator(mode="after")
    def _mirror_needs_site(self) -> HostSpec:
        if self.site_mirror is not None and self.site is None:
            raise ValueError("llmfleet_site_mirror is set but llmfleet_site is not: a mirror serves one site")
        return self

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        # checked once, here, on the control node: the roles, gc and StateDirectory= take it as given
        if posixpath.normpath(v) != v or v.startswith("//"):
            raise ValueError("must be a normalised absolute path (no ., .. or empty segment, no trailing /), e.g. /var/lib/llmfleet")
        if not v.startswith(ROOT_PARENT):
            raise ValueError(
                f"must be a directory under {ROOT_PARENT} (root's, and systemd's StateDirectory= is relative to it;"
                " never a world-writable place such as /tmp), e.g. /var/lib/llmfleet"
            )
        return v

    @field_validator("api_bind")
    @classmethod
    def _bind(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError as exc:
            raise ValueError("must be an IP address, e.g. 127.0.0.1 or 0.0.0.0") from exc
        return v


def builtin_hardware_profiles() -> dict[str, HardwareProfile]:
    text = resources.files("llmfleet.catalog").joinpath("hardware.yml").read_text()
    return {k: HardwareProfile.model_validate(v) for k, v in yaml.safe_load(text).items()}


def spec_vars(host_vars: dict[str, Any]) -> dict[str, Any]:
    """The ``llmfleet_*`` variables of a host, prefix stripped."""
    return {
        k[len(SPEC_PREFIX):]: v for k, v in host_vars.items() if k.startswith(SPEC_PREFIX) and k not in NOT_SPEC
    }
