"""The evaluator: spec + pins → a complete per-host plan.

The plan is a plain JSON value: every instance's argv, environment, devices, port, store paths,
targets and a content hash. Roles render it and nothing else; ``tools/plan.py``, the Ansible action
plugin and the tests all call :func:`evaluate_host`. It never touches a host.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from . import rules
from .errors import PlanRefused, Problem, from_validation_error
from .pins import Lock, ModelPin, RuntimePin, content_hash, model_store_name, runtime_store_name
from .spec import (
    ENGINE_ARG_RE,
    MANAGED_ENGINE_ARGS,
    RENAMED_HOST_VARS,
    RENAMED_INSTANCE_FIELDS,
    HardwareProfile,
    HostSpec,
    Instance,
    builtin_hardware_profiles,
    spec_vars,
)

PLAN_SCHEMA = 1
#: where the lock comes from, for messages
LOCK_NAME = "pins/lock.json or $LLMFLEET_LOCK"
#: bump when the unit template changes in a way that needs running instances restarted
UNIT_REVISION = 2
SERVICE_USER = "llmfleet"
API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: the role input that holds the API keys (instance name -> key); the evaluator reads only its names
API_KEYS_VAR = "vllm_service_api_keys"
#: root-owned 0600 environment files, one per keyed instance (``EnvironmentFile=-`` of the unit)
API_KEY_DIR = "/etc/llmfleet/api-keys"
#: the variable vLLM reads its API key from (vllm/envs.py); never ``--api-key`` in argv
API_KEY_ENV = "VLLM_API_KEY"


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
    if isinstance(spec.hardware, HardwareProfile):
        return "inline", spec.hardware
    profiles = builtin_hardware_profiles() | spec.hardware_profiles
    if spec.hardware not in profiles:
        raise PlanRefused(
            [Problem(host, "llmfleet_hardware", spec.hardware, "unknown hardware profile", ", ".join(sorted(profiles)))]
        )
    return spec.hardware, profiles[spec.hardware]


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
    for name in inst.engine_args:
        if not ENGINE_ARG_RE.match(name):
            c.error(f"{at}.engine_args", name, "is not a vLLM flag name", "snake_case, e.g. enforce_eager")
        elif name in MANAGED_ENGINE_ARGS:
            c.error(f"{at}.engine_args.{name}", inst.engine_args[name], "is set by llmfleet", f"use {MANAGED_ENGINE_ARGS[name]}")
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


def _engine_flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return [flag]
    if value is False:
        return ["--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def _instance_plan(
    spec: HostSpec,
    inst: Instance,
    hw: HardwareProfile,
    runtime: dict[str, Any],
    model_path: str,
    model_pin: ModelPin,
    keyed: frozenset[str],
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
    for name in sorted(inst.engine_args):
        argv += _engine_flag(name, inst.engine_args[name])

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
        "unit": f"llmfleet-vllm@{inst.name}.service",
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
            "unit_revision": UNIT_REVISION,
            "devices": plan["devices"],
            "api_key_required": plan["api_key_required"],
        }
    )
    return plan


def _service(spec: HostSpec, hw: HardwareProfile) -> dict[str, Any]:
    if hw.accelerator == "cuda":
        nodes = ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
        nodes += [f"/dev/nvidia{i}" for i in range(hw.device_count)]
        device_allow = [f"{n} rw" for n in nodes]
    else:
        device_allow = []
    return {
        "user": SERVICE_USER,
        "group": SERVICE_USER,
        "private_devices": hw.accelerator == "cpu",
        "device_allow": device_allow,
        "limit_nofile": 20000,
        "read_only_paths": [f"{spec.root}/store"],
        "api_key_dir": API_KEY_DIR,
        "unit_revision": UNIT_REVISION,
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
    instances = [
        _instance_plan(spec, inst, hw, runtime, models[inst.model]["store_path"], lock.models[inst.model], keyed)
        for inst in spec.instances
    ]
    for i, inst_plan in enumerate(instances):
        analysis = c.analyses.get(i)
        if analysis is not None:
            inst_plan["capacity"] = analysis.plan_capacity()
            inst_plan["rules"] = [r.to_dict() for r in analysis.results]
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
    # The generation id is the hash of everything that makes the host what it is, so the same
    # inputs give the same id on any control node; the host name is part of it.
    plan["generation"] = content_hash({k: v for k, v in plan.items() if k not in ("warnings", "advice")}, 24)
    return plan


def evaluate_fleet(
    hosts: Mapping[str, Mapping[str, Any]], lock: Lock
) -> tuple[dict[str, dict[str, Any]], list[Problem]]:
    """Plan every host; return the plans of the valid ones and every problem of the others."""
    plans: dict[str, dict[str, Any]] = {}
    problems: list[Problem] = []
    for host in sorted(hosts):
        try:
            plans[host] = evaluate_host(host, hosts[host], lock)
        except PlanRefused as exc:
            problems.extend(exc.problems)
    return plans, problems


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
