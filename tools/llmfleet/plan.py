"""The evaluator: spec + pins → a complete per-host plan.

The plan is a plain JSON value: every instance's argv, environment, devices, port, store paths,
targets and a content hash. Roles render it and nothing else; ``tools/plan.py``, the Ansible action
plugin and the tests all call :func:`evaluate_host`. It never touches a host.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from . import engine_args, plan_schema, rules
from .errors import InputError, PlanRefused, Problem, from_validation_error
from .pins import Lock, ModelPin, RuntimePin, content_hash, model_store_name, runtime_store_name
from .spec import (
    RENAMED_HOST_VARS,
    RENAMED_INSTANCE_FIELDS,
    SERVICE_USER_PREFIX,
    HardwareProfile,
    HostSpec,
    Instance,
    builtin_hardware_profiles,
    spec_vars,
)

PLAN_SCHEMA = 1
#: where the lock comes from, for messages
LOCK_NAME = "pins/lock.json or $LLMFLEET_LOCK"
#: the templates of what an instance runs under (unit, its drop-in, launch script, environment): their
#: content is the unit revision, so that any change of them restarts the instances at the next switch
UNIT_TEMPLATES = (
    "etc/systemd/system/llmfleet-vllm@.service.j2",
    "var/lib/llmfleet/generations/units/llmfleet-vllm@.service.d/llmfleet.conf.j2",
    "var/lib/llmfleet/generations/instances/launch.j2",
    "var/lib/llmfleet/generations/instances/env.j2",
)


@functools.cache
def unit_revision(templates: Path | None = None) -> str:
    """sha256 (first 12 hex digits) of the instance templates of roles/vllm_service, in order."""
    folder = templates or Path(__file__).resolve().parents[2] / "roles" / "vllm_service" / "templates"
    digest = hashlib.sha256()
    for name in UNIT_TEMPLATES:
        try:
            data = (folder / name).read_bytes()
        except OSError as exc:
            raise InputError(f"the instance template {folder / name} cannot be read ({exc.strerror}): a broken checkout?") from None
        digest.update(name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()[:12]

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: the role input that holds the API keys (instance name -> key); the evaluator reads only its names
API_KEYS_VAR = "vllm_service_api_keys"
#: root-owned 0600 environment files, one per keyed instance (``EnvironmentFile=-`` of the unit)
API_KEY_DIR = "/etc/llmfleet/api-keys"
#: the variable vLLM reads its API key from (vllm/envs.py); never ``--api-key`` in argv
API_KEY_ENV = "VLLM_API_KEY"
#: threads and processes one instance may have (systemd TasksMax=): a rank runs a few hundred
TASKS_MAX = 4096
#: host memory of one rank of the CPU build besides its weights and KV cache (torch, vLLM, the
#: compile at warm-up): 2.5-2.9 GB measured for a whole single-rank instance with 1 GiB of KV
RANK_MEMORY_ALLOWANCE = 3 << 30
#: from this vLLM version a single rank meets itself through a file store (uniproc_executor.py,
#: get_file_store_init_method); 0.19 still opened a TCP store on the host's address, which an
#: address allow-list of localhost would stop. (No SocketBindAllow=: every rank, even a single one,
#: has torch's gloo group bind an ephemeral TCP listener, a bind of port 0; systemd matches the
#: requested port, and the systemd of Debian 12 (252) takes no rule for port 0, so a bind allow-list
#: would stop vLLM there.)
FILE_RENDEZVOUS_FROM = (0, 32)


def is_loopback(bind: str) -> bool:
    return ipaddress.ip_address(bind).is_loopback


def api_key_names(host: str, host_vars: Mapping[str, Any]) -> tuple[frozenset[str], list[Problem]]:
    """The instance names the operator supplies an API key for (``vllm_service_api_keys``), never
    the keys themselves: those stay in the inventory (Ansible Vault) and reach only the host."""
    raw = host_vars.get(API_KEYS_VAR)
    if raw is None:
        return frozenset(), []
    if isinstance(raw, Mapping):
        names = [str(k) for k in raw]
    elif isinstance(raw, list | tuple | set | frozenset) and all(isinstance(k, str) for k in raw):
        names = list(raw)  # names only (what tools/plan.py and the action plugin pass)
    else:
        return frozenset(), [
            Problem(host, API_KEYS_VAR, type(raw).__name__, "must be a mapping of instance name to API key",
                    "{tiny: !vault |...}, one key per instance")
        ]
    return frozenset(names), []


def _renamed(host: str, raw: Mapping[str, Any]) -> list[Problem]:
    problems = []
    for old, new in RENAMED_HOST_VARS.items():
        if old in raw:
            problems.append(Problem(host, f"llmfleet_{old}", raw[old], "was renamed or removed", f"use {new}"))
    for i, inst in enumerate(raw.get("instances") or []):
        if not isinstance(inst, Mapping):
            continue
        for old, new in RENAMED_INSTANCE_FIELDS.items():
            if old in inst:
                where = f"llmfleet_instances[{i}].{old}"
                problems.append(Problem(host, where, inst[old], "was renamed or removed", f"use {new}"))
    return problems


def _spec_hints(lock: Lock | None) -> dict[str, str]:
    hints = {"hardware": "a hardware profile key: " + ", ".join(sorted(builtin_hardware_profiles())) + ", or an inline profile"}
    if lock is not None:
        hints["runtime"] = "a runtime key of the lock: " + ", ".join(sorted(lock.runtimes))
        hints["instances.model"] = "a model key of the lock: " + ", ".join(sorted(lock.models))
    return hints


def parse_spec(host: str, host_vars: Mapping[str, Any], lock: Lock | None = None) -> HostSpec:
    """Validate a host's ``llmfleet_*`` variables into a :class:`HostSpec` (``lock``: to name valid keys)."""
    raw = spec_vars(dict(host_vars))
    problems = _renamed(host, raw)
    if problems:
        raise PlanRefused(problems)
    try:
        return HostSpec.model_validate(raw)
    except ValidationError as exc:
        problems = from_validation_error(host, "", exc, HostSpec, _spec_hints(lock))
        # name the variable as the operator wrote it
        problems = [
            Problem(p.host, "llmfleet_" + p.where.lstrip("."), p.value, p.message, p.valid) for p in problems
        ]
        raise PlanRefused(problems) from exc


def resolve_hardware(host: str, spec: HostSpec) -> tuple[str, HardwareProfile]:
    """The host's profile (its key, or "inline"), with the topology measured on it where recorded."""
    if isinstance(spec.hardware, HardwareProfile):
        key, profile = "inline", spec.hardware
    else:
        profiles = builtin_hardware_profiles() | spec.hardware_profiles
        if spec.hardware not in profiles:
            raise PlanRefused(
                [Problem(host, "llmfleet_hardware", spec.hardware, "unknown hardware profile", ", ".join(sorted(profiles)))]
            )
        key, profile = spec.hardware, profiles[spec.hardware]
    if spec.measured_topology is not None:
        profile = _recorded_topology(host, key, profile, spec.measured_topology)
    return key, profile


def _recorded_topology(host: str, key: str, profile: HardwareProfile, topology: Sequence[Sequence[str]]) -> HardwareProfile:
    where, n = "llmfleet_measured_topology", len(topology)
    if profile.accelerator != "cuda":
        raise PlanRefused([Problem(host, where, f"{n} x {n}", f"hardware profile {key} has no GPU to measure", f"no {where}")])
    square = all(len(row) == n for row in topology)
    if n != profile.device_count or not square:
        raise PlanRefused([Problem(host, where, f"{n} rows", f"must be {profile.device_count} x {profile.device_count} "
                                   f"(profile {key} has {profile.device_count} GPUs)",
                                   "measure it again: tools/plan.py -i INVENTORY -l HOST --record-gpus")])  # fmt: skip
    bad = [(a, b) for a in range(n) for b in range(n) if (topology[a][b] == "X") != (a == b) or topology[a][b] != topology[b][a]]
    if bad:
        a, b = bad[0]
        raise PlanRefused([Problem(host, f"{where}[{a}][{b}]", topology[a][b], "must be symmetric with X exactly on the diagonal",
                                   "an NVML level: NV, PIX, PXB, PHB, NODE, SYS")])  # fmt: skip
    return profile.with_topology(topology)


class _Checker:
    """Collects every problem of one host instead of stopping at the first."""

    def __init__(self, host: str):
        self.host = host
        self.problems: list[Problem] = []
        self.advice: list[str] = []
        self.analyses: dict[int, rules.Analysis] = {}

    def error(self, where: str, value: Any, message: str, valid: str = "") -> None:
        self.problems.append(Problem(self.host, where, value, message, valid))

    def warn(self, where: str, value: Any, message: str, valid: str = "") -> None:
        self.problems.append(Problem(self.host, where, value, message, valid, severity="warning"))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def _check_instance(
    c: _Checker,
    i: int,
    inst: Instance,
    hw: HardwareProfile,
    hw_key: str,
    lock: Lock,
    runtime: RuntimePin | None,
    runtime_key: str | None = None,
) -> None:
    at = f"llmfleet_instances[{i}] ({inst.name})"
    n = len(inst.gpus)
    if len(set(inst.gpus)) != n:
        dup = sorted({g for g in inst.gpus if inst.gpus.count(g) > 1})
        c.error(f"{at}.gpus", inst.gpus, f"lists device(s) {dup} more than once", "each device index once")
    beyond = [g for g in inst.gpus if g >= hw.device_count]
    if beyond:
        c.error(
            f"{at}.gpus",
            inst.gpus,
            f"device index {beyond[0]} is beyond hardware profile '{hw_key}' ({hw.device_count} devices)",
            f"indices 0-{hw.device_count - 1}",
        )
    ranks = inst.tensor_parallel * inst.pipeline_parallel
    if ranks != n:
        c.error(
            f"{at}.tensor_parallel × pipeline_parallel",
            f"{inst.tensor_parallel} × {inst.pipeline_parallel} = {ranks}",
            f"does not equal the {n} device(s) given in gpus {inst.gpus}",
            f"tensor_parallel × pipeline_parallel = {n}",
        )
    model = lock.models.get(inst.model)
    if model is None:
        c.error(f"{at}.model", inst.model, f"unknown model key (not in the lock: {LOCK_NAME})", ", ".join(sorted(lock.models)))
    else:
        arch = model.architecture
        if inst.max_model_len > arch.max_position_embeddings:
            c.error(
                f"{at}.max_model_len",
                inst.max_model_len,
                f"exceeds the model's limit (max_position_embeddings of {inst.model})",
                f"at most {arch.max_position_embeddings}",
            )
        targets = inst.targets
        if targets.min_context_tokens and targets.min_context_tokens > inst.max_model_len:
            c.error(
                f"{at}.targets.min_context_tokens",
                targets.min_context_tokens,
                "asks for more context than max_model_len allows",
                f"at most {inst.max_model_len}",
            )
        if model.trust_remote_code:
            c.warn(
                f"{at}.model",
                inst.model,
                "the model pin allows trust_remote_code: the model's own Python code runs in the service (--trust-remote-code)",
                "a pin without trust_remote_code keeps it off",
            )
    if inst.load.prompt_tokens + inst.load.output_tokens > inst.max_model_len:
        c.error(
            f"{at}.load",
            inst.load.model_dump(),
            "prompt_tokens + output_tokens exceed max_model_len",
            f"a sum of at most {inst.max_model_len}",
        )
    if runtime is not None:
        for f in engine_args.check(inst.engine_args, runtime_key or "", runtime, inst.model, model):
            (c.warn if f.severity == "warning" else c.error)(f"{at}.{f.where}", f.value, f.message, f.valid)
    if hw.accelerator == "cpu":
        if inst.kv_cache_memory_bytes is None:
            c.error(
                f"{at}.kv_cache_memory_bytes",
                None,
                "the CPU build of vLLM needs a fixed KV-cache size",
                "a byte count, e.g. 268435456",
            )
        if inst.gpu_memory_utilization is not None:
            c.error(f"{at}.gpu_memory_utilization", inst.gpu_memory_utilization, "has no meaning on a CPU profile", "leave it out")
    if runtime is not None and runtime.device != hw.accelerator:
        c.error(
            "llmfleet_runtime",
            runtime_key or runtime.distribution,
            f"is a {runtime.device} build but hardware profile '{hw_key}' is {hw.accelerator}",
            f"a runtime with device '{hw.accelerator}'",
        )
    if model is not None:
        _check_rules(c, i, inst, hw, hw_key, model, runtime_key, runtime)


def instance_layout(inst: Instance) -> rules.Layout:
    """The parts of an instance the rules and the capacity planner read."""
    return rules.Layout(
        tp=inst.tensor_parallel,
        pp=inst.pipeline_parallel,
        gpus=tuple(inst.gpus),
        max_model_len=inst.max_model_len,
        gpu_memory_utilization=inst.gpu_memory_utilization,
        kv_cache_memory_bytes=inst.kv_cache_memory_bytes,
        engine_args=tuple(sorted(inst.engine_args.items())),
        min_kv_cache_tokens=inst.targets.min_kv_cache_tokens,
    )


def _check_rules(
    c: _Checker,
    i: int,
    inst: Instance,
    hw: HardwareProfile,
    hw_key: str,
    model: ModelPin,
    runtime_key: str | None,
    runtime: RuntimePin | None,
) -> None:
    """The compatibility rules (catalog/rules.yml) and the capacity planner on this instance."""
    at = f"llmfleet_instances[{i}] ({inst.name})"
    analysis = rules.analyse(inst.model, model, runtime_key, runtime, hw, hw_key, instance_layout(inst))
    c.analyses[i] = analysis
    for r in analysis.results:
        # a rule about the host (its runtime, its hardware) names the host's variable, once
        where = f"llmfleet_{r.field}" if r.field in rules.HOST_FIELDS else f"{at}.{r.field}"
        if r.field in rules.HOST_FIELDS and any(p.where == where and r.id in p.message for p in c.problems):
            continue
        if r.status == "unknown":
            c.warn(where, r.value, f"rule {r.id} {r.message}")
        elif r.status != "fired":
            continue
        elif r.verdict == "refuse":
            c.error(where, r.value, r.text(), r.valid)
        elif r.verdict == "warn":
            c.warn(where, r.value, r.text(), r.valid)
        else:
            c.advice.append(str(Problem(c.host, where, r.value, r.text(), r.valid, severity="advice")))


def _check_host(c: _Checker, spec: HostSpec, hw: HardwareProfile, hw_key: str, lock: Lock) -> RuntimePin | None:
    runtime = lock.runtimes.get(spec.runtime)
    if runtime is None:
        c.error("llmfleet_runtime", spec.runtime, f"unknown runtime key (not in the lock: {LOCK_NAME})", ", ".join(sorted(lock.runtimes)))
    if not spec.instances:
        c.error("llmfleet_instances", [], "no instance to run", "at least one instance")
    seen_names: dict[str, int] = {}
    owner: dict[int, str] = {}
    ports: dict[int, str] = {}
    for i, inst in enumerate(spec.instances):
        at = f"llmfleet_instances[{i}] ({inst.name})"
        if inst.name in seen_names:
            c.error(f"{at}.name", inst.name, f"is used by instance {seen_names[inst.name]} too", "a unique name per host")
        seen_names.setdefault(inst.name, i)
        for g in sorted(set(inst.gpus)):
            if g in owner:
                c.error(
                    f"{at}.gpus", inst.gpus, f"device {g} is already given to instance '{owner[g]}'", "devices no other instance uses"
                )
            owner.setdefault(g, inst.name)
        if inst.port in ports:
            c.error(f"{at}.port", inst.port, f"is already used by instance '{ports[inst.port]}'", "a free port")
        ports.setdefault(inst.port, inst.name)
        _check_instance(c, i, inst, hw, hw_key, lock, runtime, spec.runtime if runtime is not None else None)
    return runtime


def _check_api_keys(c: _Checker, spec: HostSpec, keyed: frozenset[str]) -> None:
    """An API bound beyond loopback needs a key per instance; a key must name an instance."""
    names = [inst.name for inst in spec.instances]
    for name in sorted(keyed - set(names)):
        c.error(f"{API_KEYS_VAR}.{name}", name, "is a key for an instance this host does not run", ", ".join(names) or "no instances")
    if is_loopback(spec.api_bind):
        return
    for inst in spec.instances:
        if inst.name not in keyed:
            c.error(
                "llmfleet_api_bind",
                spec.api_bind,
                f"exposes instance '{inst.name}' beyond loopback but no API key is given for it",
                f"a key in {API_KEYS_VAR}.{inst.name} (an Ansible Vault string fits), or llmfleet_api_bind 127.0.0.1",
            )


def _instance_plan(
    spec: HostSpec,
    inst: Instance,
    hw: HardwareProfile,
    runtime: dict[str, Any],
    model_path: str,
    model_pin: ModelPin,
    keyed: frozenset[str],
    runtime_pin: RuntimePin,
    capacity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    state_dir = f"{spec.root}/state/{inst.name}"
    argv = [
        f"{runtime['store_path']}/bin/python",
        "-m",
        API_SERVER_MODULE,
        "--model",
        model_path,
        "--served-model-name",
        inst.model,
        "--host",
        spec.api_bind,
        "--port",
        str(inst.port),
        "--max-model-len",
        str(inst.max_model_len),
        "--tensor-parallel-size",
        str(inst.tensor_parallel),
        "--pipeline-parallel-size",
        str(inst.pipeline_parallel),
    ]
    if inst.tensor_parallel * inst.pipeline_parallel > 1:
        argv += ["--distributed-executor-backend", "mp"]
    if inst.kv_cache_memory_bytes is not None:
        argv += ["--kv-cache-memory-bytes", str(inst.kv_cache_memory_bytes)]
    if inst.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(inst.gpu_memory_utilization)]
    if model_pin.trust_remote_code:
        # only a pin may allow it (engine_args cannot); the plan carries a warning
        argv.append("--trust-remote-code")
    options = runtime_pin.engine_options or {}
    for name in sorted(inst.engine_args):  # checked against these options: `--flag=value`, one argv element each
        argv.append(engine_args.render(name, inst.engine_args[name], options[name.replace("_", "-")]))

    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HOME": state_dir,
        "TMPDIR": state_dir,
        "XDG_CACHE_HOME": f"{state_dir}/cache",
        "VLLM_CACHE_ROOT": f"{state_dir}/cache/vllm",
        "HF_HOME": f"{state_dir}/cache/huggingface",
    }
    if hw.accelerator == "cuda":
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in inst.gpus)
        if hw.nccl_p2p_disable:
            env["NCCL_P2P_DISABLE"] = "1"
    else:
        binds = hw.cpu_binds or [str(g) for g in range(hw.device_count)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(binds[g] for g in inst.gpus)

    url_host = "127.0.0.1" if spec.api_bind in ("0.0.0.0", "::") else spec.api_bind
    if ":" in url_host:
        url_host = f"[{url_host}]"
    plan = {
        "name": inst.name,
        "unit": plan_schema.unit_name(inst.name),
        "model": inst.model,
        "served_model_name": inst.model,
        "bind": spec.api_bind,
        "port": inst.port,
        "url": f"http://{url_host}:{inst.port}",
        "devices": list(inst.gpus),
        "tensor_parallel": inst.tensor_parallel,
        "pipeline_parallel": inst.pipeline_parallel,
        "max_model_len": inst.max_model_len,
        "exposed": not is_loopback(spec.api_bind),
        # where the key is, never the key: a root-owned 0600 file systemd reads (EnvironmentFile=)
        "api_key_required": inst.name in keyed,
        "api_key_file": f"{API_KEY_DIR}/{inst.name}.env" if inst.name in keyed else None,
        # a systemd dynamic user of its own (DynamicUser=): instances share no uid, no file, no device
        "user": f"{SERVICE_USER_PREFIX}{inst.name}",
        "sandbox": _sandbox(inst, hw, runtime_pin, spec.api_bind, capacity),
        "argv": argv,
        "environment": env,
        "state_dir": state_dir,
        "targets": inst.targets.model_dump(exclude_none=True),
        "load": inst.load.model_dump(),
    }
    plan["content_hash"] = content_hash(
        {
            "argv": argv,
            "environment": env,
            "unit_revision": unit_revision(),
            "devices": plan["devices"],
            "api_key_required": plan["api_key_required"],
            "user": plan["user"],
            "sandbox": plan["sandbox"],
        }
    )
    return plan


def _sandbox(inst: Instance, hw: HardwareProfile, runtime_pin: RuntimePin, bind: str, capacity: Mapping[str, Any] | None) -> dict[str, Any]:
    """What only this instance's unit gets (the drop-in the generation carries for it): its own
    device nodes and the limits vLLM tolerates for its layout and version."""
    ranks = inst.tensor_parallel * inst.pipeline_parallel
    devices: list[str] = []
    if hw.accelerator == "cuda":
        # its own GPUs and the control and UVM nodes every CUDA process opens; never nvidia-uvm-tools (profiling)
        devices = ["/dev/nvidiactl rw", "/dev/nvidia-uvm rw", *(f"/dev/nvidia{g} rw" for g in sorted(inst.gpus))]
        if hw.mig:
            devices.append("char-nvidia-caps r")  # MIG capability nodes /dev/nvidia-caps/nvidia-cap*
    sandbox: dict[str, Any] = {"device_allow": devices, "tasks_max": TASKS_MAX}
    if hw.accelerator == "cpu" and inst.kv_cache_memory_bytes is not None:
        # host memory of a GPU instance (weight loading, pinned buffers) is not modelled: no MemoryMax there
        weights = int(((capacity or {}).get("weights") or {}).get("max_bytes_per_gpu") or 0)
        sandbox["memory_max"] = ranks * (weights + inst.kv_cache_memory_bytes + RANK_MEMORY_ALLOWANCE)
    if ranks == 1 and is_loopback(bind) and rules.version_tuple(runtime_pin.vllm_version)[:2] >= FILE_RENDEZVOUS_FROM:
        # one rank talks to no one but its clients on loopback (ranks > 1 meet over TCP, gloo and NCCL
        # on the host's own address; an exposed API takes clients from anywhere)
        sandbox["ip_address_allow"] = ["localhost"]
    return sandbox


def _service(spec: HostSpec, hw: HardwareProfile) -> dict[str, Any]:
    """What the template unit every instance shares gets (per instance: ``instances[].sandbox``)."""
    return {
        "dynamic_user": True,
        "user_prefix": SERVICE_USER_PREFIX,
        "private_devices": hw.accelerator == "cpu",
        "limit_nofile": 20000,
        "read_only_paths": [f"{spec.root}/store"],
        "api_key_dir": API_KEY_DIR,
        "unit_revision": unit_revision(),
    }


def _driver(hw: HardwareProfile) -> dict[str, Any] | None:
    """What roles/nvidia_driver installs: None for a profile without a GPU, else the branch and the
    exact pin per distribution (the role picks the host's own and refuses a distribution not listed)."""
    if hw.accelerator != "cuda":
        return None
    return {
        "branch": hw.driver_branch,
        "distributions": {k: v.model_dump() for k, v in sorted(hw.driver.items())},
    }


def evaluate_host(host: str, host_vars: Mapping[str, Any], lock: Lock) -> dict[str, Any]:
    """Return the plan of one host, or raise :class:`PlanRefused` with every problem found.

    Unresolved pins do not refuse a plan (the operator may inspect it); they are listed in
    ``plan["unresolved"]`` and the deploy refuses them.
    """
    spec = parse_spec(host, host_vars, lock)
    hw_key, hw = resolve_hardware(host, spec)
    c = _Checker(host)
    keyed, key_problems = api_key_names(host, host_vars)
    c.problems.extend(key_problems)
    runtime_pin = _check_host(c, spec, hw, hw_key, lock)
    _check_api_keys(c, spec, keyed)
    if runtime_pin is not None and spec.site_mirror is not None:
        unnamed = [r.name for r in runtime_pin.requirements or [] if not r.filename or r.size is None]
        if unnamed:
            c.error("llmfleet_site_mirror", spec.site, f"runtime {spec.runtime} pins {len(unnamed)} wheel(s) without file name and "
                    f"size (e.g. {unnamed[0]}): a mirror serves files", f"pin it again: tools/pin.py runtime {spec.runtime}")
    if c.errors:
        raise PlanRefused(c.problems)
    assert runtime_pin is not None

    unresolved: list[str] = []
    if not runtime_pin.resolved:
        unresolved.append(f"runtime {spec.runtime}: {runtime_pin.reason or 'no hash-locked requirement set'}")
    runtime = {
        "key": spec.runtime,
        "distribution": runtime_pin.distribution,
        "version": runtime_pin.version,
        "engine_version": runtime_pin.vllm_version,
        "python": runtime_pin.python,
        "device": runtime_pin.device,
        "store_path": f"{spec.root}/store/{runtime_store_name(spec.runtime, runtime_pin)}",
        "requirements": runtime_pin.requirements_text(),
        "system_packages": list(runtime_pin.system_packages),
        "metadata_shim": runtime_pin.metadata_shim,
    }
    models: dict[str, dict[str, Any]] = {}
    for inst in spec.instances:
        pin: ModelPin = lock.models[inst.model]
        if inst.model in models:
            continue
        if not pin.resolved:
            unresolved.append(f"model {inst.model}: {pin.reason or 'no revision and file hashes pinned'}")
        models[inst.model] = {
            "source": pin.source,
            "revision": pin.revision,
            "store_path": f"{spec.root}/store/{model_store_name(inst.model, pin)}",
            "files": [f.model_dump() for f in pin.files or []],
        }
    instances = []
    for i, inst in enumerate(spec.instances):
        analysis = c.analyses.get(i)
        capacity = analysis.plan_capacity() if analysis is not None else None
        inst_plan = _instance_plan(
            spec, inst, hw, runtime, models[inst.model]["store_path"], lock.models[inst.model], keyed, runtime_pin, capacity
        )
        if analysis is not None:
            inst_plan["capacity"] = capacity
            inst_plan["rules"] = [r.to_dict() for r in analysis.results]
        instances.append(inst_plan)
    plan: dict[str, Any] = {
        "schema": PLAN_SCHEMA,
        "host": host,
        "root": spec.root,
        "hardware_profile": hw_key,
        "hardware": hw.model_dump(exclude_none=True),
        "driver": _driver(hw),
        "runtime": runtime,
        "models": models,
        "service": _service(spec, hw),
        "instances": instances,
        "unresolved": unresolved,
        "warnings": [str(p) for p in c.problems if p.severity == "warning"],
        "advice": list(c.advice),
    }
    if spec.site is not None:
        plan["site"] = _site(spec, runtime_pin)
    # The generation id is the hash of everything that makes the host what it is, so the same
    # inputs give the same id on any control node; the host name is part of it. How the bytes
    # reach the host (its site and mirror) is not what it runs: moving a mirror restarts nothing.
    plan["generation"] = content_hash({k: v for k, v in plan.items() if k not in NOT_IN_GENERATION}, 24)
    # the plan's schema is the one owner of its rules: a plan that breaks them never leaves the evaluator
    broken = plan_schema.problems(plan, deployable=False)
    if broken:
        raise PlanRefused([Problem(host, "plan", plan["generation"], f"the evaluator made a plan its schema refuses: {line}")
                           for line in broken])
    return plan


#: plan keys that do not make the host what it is
NOT_IN_GENERATION = ("warnings", "advice", "site")


def _site(spec: HostSpec, runtime_pin: RuntimePin) -> dict[str, Any]:
    """The host's site: its name, its mirror, and the runtime's wheels as the mirror names them."""
    mirror = spec.site_mirror
    return {
        "name": spec.site,
        "mirror": mirror.model_dump() if mirror is not None else None,
        "wheels": [
            {"filename": r.filename, "sha256": r.sha256, "size": r.size}
            for r in runtime_pin.requirements or []
            if r.filename and r.size is not None
        ],
    }


def evaluate_fleet(
    hosts: Mapping[str, Mapping[str, Any]], lock: Lock, only: Collection[str] | None = None
) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Plan every host; return the plans of the valid ones and every problem of the others.

    ``only`` (a ``--limit``) narrows what is returned; the hosts outside it are still planned, so
    that what spans hosts (a site and its mirror) is judged on the whole inventory.
    """
    plans: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for host in sorted(hosts):
        try:
            plans[host] = evaluate_host(host, hosts[host], lock)
        except PlanRefused as exc:
            problems.extend(exc.problems)
    problems.extend(check_sites(plans))
    if only is not None:
        keep = set(only)
        plans = {h: p for h, p in plans.items() if h in keep}
        problems = [p for p in problems if p.host in keep]
    return plans, problems


def check_sites(plans: Mapping[str, Mapping[str, Any]]) -> list[Problem]:
    """A site has one mirror: every host of it names the same one, and it runs on a host of the site."""
    problems: list[Problem] = []
    sites: dict[str, dict[str, list[str]]] = {}
    for host, plan in sorted(plans.items()):
        site = plan.get("site")
        if site is not None:
            mirror = site["mirror"]
            sites.setdefault(site["name"], {}).setdefault(content_hash(mirror), []).append(host)
    for name, mirrors in sorted(sites.items()):
        members = sorted(h for hs in mirrors.values() for h in hs)
        # each member is refused: a --limit on any one of them still sees why
        if len(mirrors) > 1:
            problems.extend(Problem(m, "llmfleet_site_mirror", name,
                                    f"the hosts of site {name} name {len(mirrors)} different mirrors",
                                    "one llmfleet_site_mirror per site (set it in the site's group_vars)") for m in members)
            continue
        host = plans[members[0]]["site"]["mirror"]
        if host is not None and host["host"] not in members:
            problems.extend(Problem(m, "llmfleet_site_mirror.host", host["host"],
                                    f"the mirror of site {name} must run on a host of the site", ", ".join(members))
                            for m in members)
    return problems


def explain_host(host: str, host_vars: Mapping[str, Any], lock: Lock) -> dict[str, Any]:
    """Everything behind a host's verdict: each instance's rules (passed ones too) and capacity
    arithmetic, and the problems, whether or not the plan is refused. Spec errors that prevent the
    analysis are returned as problems."""
    out: dict[str, Any] = {"host": host, "instances": [], "problems": [], "advice": []}
    try:
        spec = parse_spec(host, host_vars, lock)
        hw_key, hw = resolve_hardware(host, spec)
    except PlanRefused as exc:
        out["problems"] = exc.problems
        return out
    c = _Checker(host)
    keyed, key_problems = api_key_names(host, host_vars)
    c.problems.extend(key_problems)
    _check_host(c, spec, hw, hw_key, lock)
    _check_api_keys(c, spec, keyed)
    out["hardware_profile"] = hw_key
    out["runtime"] = spec.runtime
    for i, inst in enumerate(spec.instances):
        analysis = c.analyses.get(i)
        out["instances"].append({"name": inst.name, "model": inst.model, "analysis": analysis})
    out["problems"] = c.problems
    out["advice"] = c.advice
    return out
