"""GPU preflight: a host's measured NVML facts against its plan's hardware.

The facts are what ``library/nvidia_gpu_facts.py`` returns as ``ansible_facts.nvidia_gpu``. Every
difference becomes a :class:`~llmfleet.errors.Problem` that names the GPU and the field
(``gpu[2].name``), what the profile expects and what was found, so one run shows every wrong GPU.
Errors refuse the rollout; warnings (ECC off, NVLink on a PCIe profile) are reported only.

The check only compares: the plan is a function of the inventory and the pins. A measured NVML
topology that is not the plan's refuses the host until it is recorded into the inventory
(``tools/plan.py --record-gpus``, :func:`topology_from_facts`; the evaluator reads it as the host's
``llmfleet_measured_topology``), so that the control node, drift and the host plan the same generation.
"""

from __future__ import annotations

from typing import Any

from llmfleet.errors import PlanRefused, Problem
from llmfleet.spec import HardwareProfile

GIB = 1024**3
MEMORY_TOLERANCE = 0.02  # NVML's usable memory moves by a few MiB between drivers and ECC settings
# NVML levels the planner knows (llmfleet.spec.TopologyLevel); NVLink pairs ("NV4") become "NV".
_LEVELS = {"X", "PIX", "PXB", "PHB", "NODE", "SYS"}
# A pair NVML gave no level for is planned as the worst case.
UNKNOWN_LEVEL = "SYS"
#: how an operator records a host's measured topology into the inventory
RECORD_COMMAND = "tools/plan.py -i INVENTORY -l HOST --record-gpus"


class _Problems:
    def __init__(self, host: str):
        self.host = host
        self.items: list[Problem] = []

    def error(self, where: str, value: Any, message: str, valid: str = "") -> None:
        self.items.append(Problem(self.host, where, value, message, valid))

    def warn(self, where: str, value: Any, message: str, valid: str = "") -> None:
        self.items.append(Problem(self.host, where, value, message, valid, severity="warning"))


def driver_branch(driver_version: str | None) -> str | None:
    """``"580.95.05"`` -> ``"580"``."""
    if not driver_version:
        return None
    return driver_version.split(".", 1)[0]


def _gib(value: int) -> str:
    return f"{value / GIB:.1f} GiB ({value // (1024 * 1024)} MiB)"


def _check_gpu(out: _Problems, profile: HardwareProfile, gpu: dict[str, Any]) -> None:
    i = gpu.get("index")
    at = f"gpu[{i}]"
    name = gpu.get("name")
    if name != profile.device_model:
        out.error(f"{at}.name", name, f"wrong GPU model: expected {profile.device_model!r}, found {name!r}", profile.device_model)

    memory = gpu.get("memory_total_bytes")
    expected = profile.device_memory_gib * GIB
    if memory is None:
        out.error(f"{at}.memory_total_bytes", None, "NVML gave no memory size")
    elif abs(memory - expected) > expected * MEMORY_TOLERANCE:
        out.error(
            f"{at}.memory_total_bytes",
            memory,
            f"wrong memory size: expected about {profile.device_memory_gib:g} GiB, found {_gib(memory)}",
            f"{profile.device_memory_gib:g} GiB +/- {MEMORY_TOLERANCE:.0%}",
        )

    cc = gpu.get("compute_capability")
    if profile.compute_capability and cc != profile.compute_capability:
        out.error(
            f"{at}.compute_capability",
            cc,
            f"wrong compute capability: expected {profile.compute_capability}, found {cc}",
            profile.compute_capability,
        )

    pcie = gpu.get("pcie") or {}
    if profile.pcie is not None:
        want_gen, want_width = profile.pcie.generation, profile.pcie.width
        gen, width = pcie.get("max_generation"), pcie.get("max_width")
        found = f"Gen{gen} x{width}"
        want = f"Gen{want_gen} x{want_width}"
        if gen is None or width is None:
            out.error(f"{at}.pcie.max", found, f"NVML gave no maximum PCIe link: expected {want}", want)
        elif (gen, width) != (want_gen, want_width):
            # The maximum is the slot's and the card's together: a lower one is a riser, a slot or a
            # BIOS setting; the current link drops at idle and is not compared.
            out.error(f"{at}.pcie.max", found, f"wrong maximum PCIe link: expected {want}, found {found}", want)

    mig = (gpu.get("mig") or {}).get("current")
    if mig:
        out.error(f"{at}.mig.current", mig, "MIG mode is on: llmfleet plans whole GPUs", "MIG off (nvidia-smi -i N -mig 0)")
    ecc = gpu.get("ecc") or {}
    if ecc.get("current") is False:
        out.warn(f"{at}.ecc.current", False, "ECC is off", "ECC on (nvidia-smi -i N -e 1, then a reboot)")
    if ecc.get("current") is not None and ecc.get("pending") is not None and ecc["pending"] != ecc["current"]:
        out.warn(f"{at}.ecc.pending", ecc["pending"], "an ECC mode change waits for a reboot")

    rows = gpu.get("remapped_rows")
    if rows:
        if rows.get("failure"):
            out.error(f"{at}.remapped_rows.failure", True, "row remapping failed: the GPU needs replacing (NVIDIA RMA)")
        if rows.get("pending"):
            out.error(f"{at}.remapped_rows.pending", True, "a row remap waits for a GPU reset or reboot", "no pending remap")
        if rows.get("uncorrectable"):
            out.warn(f"{at}.remapped_rows.uncorrectable", rows["uncorrectable"], "rows were remapped for uncorrectable errors")
    pages = gpu.get("retired_pages")
    if pages:
        if pages.get("pending"):
            out.error(f"{at}.retired_pages.pending", True, "a page retirement waits for a reboot", "no pending retirement")
        if pages.get("double_bit_ecc"):
            out.warn(f"{at}.retired_pages.double_bit_ecc", pages["double_bit_ecc"], "pages were retired for double-bit ECC errors")
    if gpu.get("persistence_mode") is False:
        out.warn(f"{at}.persistence_mode", False, "persistence mode is off (slow first CUDA call, link state lost)", "on")


def check_gpu_facts(host: str, profile: HardwareProfile, facts: dict[str, Any] | None) -> list[Problem]:
    """Every difference between a host's ``nvidia_gpu`` facts and its hardware profile."""
    out = _Problems(host)
    if profile.accelerator != "cuda":
        return out.items
    if not facts or not facts.get("nvml_available"):
        reason = (facts or {}).get("error") or "no nvidia_gpu facts (was nvidia_gpu_facts run?)"
        out.error("nvidia_gpu.nvml_available", False, reason, "a loaded NVIDIA driver and nvidia-ml-py on the host")
        return out.items

    if profile.driver_branch:
        version = facts.get("driver_version")
        branch = driver_branch(version)
        if branch != profile.driver_branch:
            out.error(
                "nvidia_gpu.driver_version",
                version,
                f"wrong driver branch: expected R{profile.driver_branch}, found {'R' + branch if branch else 'none'}",
                f"{profile.driver_branch}.x",
            )

    gpus: list[dict[str, Any]] = facts.get("gpus") or []
    if len(gpus) != profile.device_count:
        names = ", ".join(sorted({str(g.get("name")) for g in gpus})) or "none"
        out.error(
            "nvidia_gpu.gpus",
            len(gpus),
            f"wrong GPU count: expected {profile.device_count} x {profile.device_model}, found {len(gpus)} ({names})",
            str(profile.device_count),
        )
    for gpu in gpus:
        _check_gpu(out, profile, gpu)

    pairs = facts.get("pairs") or []
    if profile.interconnect == "pcie" and any(p.get("nvlink") for p in pairs):
        out.warn("nvidia_gpu.pairs", "NVLink", "NVLink found on a profile that says PCIe: the profile undersells the host")
    if profile.topology and len(gpus) == profile.device_count:
        measured = topology_from_facts(facts)
        for a in range(len(measured)):
            for b in range(a + 1, len(measured)):
                want, got = profile.topology[a][b], measured[a][b]
                if want != got:
                    out.error(
                        f"topology[{a}][{b}]",
                        got,
                        f"measured NVML topology differs from the plan's: expected {want}, found {got}",
                        f"record what the host has, then plan again: {RECORD_COMMAND}",
                    )
    return out.items


def _level(pair: dict[str, Any]) -> str:
    if pair.get("nvlink"):
        return "NV"
    topo = pair.get("topology")
    if isinstance(topo, str) and topo.startswith("NV"):
        return "NV"
    return topo if topo in _LEVELS else UNKNOWN_LEVEL


def topology_from_facts(facts: dict[str, Any]) -> list[list[str]]:
    """The measured N x N NVML topology matrix ("X" on the diagonal), in ``HardwareProfile.topology`` terms.

    NVLink pairs read "NV"; a pair NVML gave no level for reads "SYS", the worst case.
    """
    n = len(facts.get("gpus") or [])
    matrix = [["X" if a == b else UNKNOWN_LEVEL for b in range(n)] for a in range(n)]
    for pair in facts.get("pairs") or []:
        a, b = pair["a"], pair["b"]
        if a < n and b < n:
            matrix[a][b] = matrix[b][a] = _level(pair)
    return matrix


def profile_with_measured_topology(profile: HardwareProfile, facts: dict[str, Any]) -> HardwareProfile:
    """The profile with its topology (and interconnect, where NVLink was measured) taken from the facts."""
    topology = topology_from_facts(facts)
    return profile if len(topology) != profile.device_count else profile.with_topology(topology)


def check_plan_against_gpu_facts(host: str, plan: dict[str, Any], facts: dict[str, Any] | None) -> dict[str, Any]:
    """The host's plan, unchanged, once its measured GPUs match the plan's hardware.

    Raises :class:`PlanRefused` with every error (expected vs found per GPU; a measured topology the
    plan does not have, with the command that records it). Warnings join the plan's (they are not
    part of the generation id: the same inputs give the same id on every control node and host).
    """
    profile = HardwareProfile.model_validate(plan["hardware"])
    problems = check_gpu_facts(host, profile, facts)
    errors = [p for p in problems if p.severity == "error"]
    if errors:
        raise PlanRefused(errors)
    if problems:
        plan = {**plan, "warnings": [str(p) for p in problems] + list(plan["warnings"])}
    return plan
