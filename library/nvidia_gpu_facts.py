#!/usr/bin/python
# GPU facts from NVML (the nvidia-ml-py bindings, imported as pynvml). Read-only.
# The collection is `collect(nvml)`, a plain function over a pynvml-like module object, so the unit
# tests drive it with a fake built from a real capture (tests/fixtures/gpu/) and no Ansible.
# Run outside Ansible: `python3 library/nvidia_gpu_facts.py --print` prints the facts as JSON.
from __future__ import annotations

DOCUMENTATION = r"""
module: nvidia_gpu_facts
short_description: Read NVIDIA GPU facts through NVML
description:
  - Reads, through NVML (the C(nvidia-ml-py) bindings, imported as C(pynvml)), the driver and CUDA driver
    versions; per GPU the name, UUID, PCI bus id, memory, compute capability, maximum and current PCIe
    generation and width, persistence, ECC and MIG modes, remapped rows (or retired pages) and NUMA node;
    per GPU pair the NVML topology level, the P2P read status and the NVLink links between them.
  - Sets the fact C(nvidia_gpu). A field that NVML does not support on a GPU is null, not a failure.
  - When NVML cannot be used (bindings or library missing, driver not loaded, driver/library version
    mismatch) the fact says so in C(nvml_available) and C(error), one line; the task fails only with
    O(require=true).
  - Changes nothing on the host.
options:
  require:
    description: Fail the task when NVML cannot be used, with the one-line reason as the message.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
  diff_mode:
    support: none
requirements:
  - nvidia-ml-py (imported as pynvml) on the host's Python
  - the NVIDIA driver (libnvidia-ml.so.1)
author: llmfleet
"""

EXAMPLES = r"""
- name: Preflight | Read GPU facts
  nvidia_gpu_facts:

- name: Preflight | Read GPU facts, failing when NVML is unusable
  nvidia_gpu_facts:
    require: true
"""

RETURN = r"""
ansible_facts:
  description: C(nvidia_gpu), the facts.
  returned: always
  type: complex
  contains:
    nvidia_gpu:
      description: >-
        nvml_available (bool), error (null or one line), driver_version, cuda_driver_version (as "12.8"),
        nvml_version, pynvml_version, gpus (index, name, uuid, pci_bus_id, memory_total_bytes,
        compute_capability, pcie{max_generation, max_width, gpu_max_generation, current_generation,
        current_width}, persistence_mode, ecc{current, pending}, mig{current, pending},
        remapped_rows{correctable, uncorrectable, pending, failure}, retired_pages{single_bit_ecc,
        double_bit_ecc, pending}, numa_node) and pairs (a, b, topology, p2p_read, nvlink, nvlink_links).
      returned: always
      type: dict
"""

import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from typing import Any, Callable  # noqa: E402, UP035

FACTS_VERSION = 1

# NVML's topology levels, as nvidia-smi topo -m names them. NVLink pairs read "NV<links>".
TOPOLOGY_NAMES = {0: "X", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
P2P_STATUS_NAMES = {
    0: "OK",
    1: "chipset not supported",
    2: "GPU not supported",
    3: "IOH topology not supported",
    4: "disabled by regkey",
    5: "not supported",
    6: "unknown",
}
# pynvml defines NVML_P2P_CAPS_INDEX_READ as the tuple `0,` (a stray comma), so pass the C value.
P2P_CAPS_INDEX_READ = 0
NVLINK_MAX_LINKS = 18  # NVML_NVLINK_MAX_LINKS is 18 on Hopper, 36 in newer headers; unused links answer NOT_SUPPORTED

ERROR_LIBRARY_NOT_FOUND = 12
ERROR_DRIVER_NOT_LOADED = 9
ERROR_LIB_RM_VERSION_MISMATCH = 18
ERROR_NO_PERMISSION = 4


class _Unsupported(Exception):
    """A field NVML cannot give on this GPU; it becomes null."""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _get(nvml: Any, name: str, *args: Any) -> Any:
    """Call nvml.<name>(*args); a missing binding or any NVML error means "not available" (null)."""
    fn: Callable[..., Any] | None = getattr(nvml, name, None)
    if fn is None:
        raise _Unsupported(name)
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        raise _Unsupported(name) from exc


def _opt(nvml: Any, name: str, *args: Any) -> Any:
    try:
        return _get(nvml, name, *args)
    except _Unsupported:
        return None


def _cuda_version(value: int | None) -> str | None:
    if value is None:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


def _bool_mode(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _pair_modes(nvml: Any, name: str, handle: Any) -> dict[str, bool | None]:
    value = _opt(nvml, name, handle)
    if value is None:
        return {"current": None, "pending": None}
    current, pending = value
    return {"current": bool(current), "pending": bool(pending)}


def _remapped_rows(nvml: Any, handle: Any) -> dict[str, Any] | None:
    value = _opt(nvml, "nvmlDeviceGetRemappedRows", handle)
    if value is None:
        return None
    corr, unc, pending, failure = value
    return {"correctable": int(corr), "uncorrectable": int(unc), "pending": bool(pending), "failure": bool(failure)}


def _retired_pages(nvml: Any, handle: Any) -> dict[str, Any] | None:
    single = _opt(nvml, "nvmlDeviceGetRetiredPages", handle, 0)
    double = _opt(nvml, "nvmlDeviceGetRetiredPages", handle, 1)
    if single is None and double is None:
        return None
    pending = _opt(nvml, "nvmlDeviceGetRetiredPagesPendingStatus", handle)
    return {
        "single_bit_ecc": None if single is None else len(single),
        "double_bit_ecc": None if double is None else len(double),
        "pending": _bool_mode(pending),
    }


def _gpu(nvml: Any, index: int, handle: Any) -> dict[str, Any]:
    pci = _opt(nvml, "nvmlDeviceGetPciInfo", handle)
    memory = _opt(nvml, "nvmlDeviceGetMemoryInfo", handle)
    cc = _opt(nvml, "nvmlDeviceGetCudaComputeCapability", handle)
    name = _opt(nvml, "nvmlDeviceGetName", handle)
    uuid = _opt(nvml, "nvmlDeviceGetUUID", handle)
    remapped = _remapped_rows(nvml, handle)
    gpu: dict[str, Any] = {
        "index": index,
        "name": None if name is None else _text(name),
        "uuid": None if uuid is None else _text(uuid),
        "pci_bus_id": None if pci is None else _text(pci.busId),
        "memory_total_bytes": None if memory is None else int(memory.total),
        "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
        "pcie": {
            "max_generation": _opt(nvml, "nvmlDeviceGetMaxPcieLinkGeneration", handle),
            "max_width": _opt(nvml, "nvmlDeviceGetMaxPcieLinkWidth", handle),
            "gpu_max_generation": _opt(nvml, "nvmlDeviceGetGpuMaxPcieLinkGeneration", handle),
            "current_generation": _opt(nvml, "nvmlDeviceGetCurrPcieLinkGeneration", handle),
            "current_width": _opt(nvml, "nvmlDeviceGetCurrPcieLinkWidth", handle),
        },
        "persistence_mode": _bool_mode(_opt(nvml, "nvmlDeviceGetPersistenceMode", handle)),
        "ecc": _pair_modes(nvml, "nvmlDeviceGetEccMode", handle),
        "mig": _pair_modes(nvml, "nvmlDeviceGetMigMode", handle),
        "remapped_rows": remapped,
        # Pre-Ampere GPUs retire pages instead of remapping rows; ask only when rows are not remapped.
        "retired_pages": _retired_pages(nvml, handle) if remapped is None else None,
        "numa_node": _opt(nvml, "nvmlDeviceGetNumaNodeId", handle),
    }
    return gpu


def _nvlink_links(nvml: Any, handle: Any, peer_bus_id: str | None) -> int | None:
    """Active NVLink links from `handle` to the GPU at `peer_bus_id`; None when NVLink is not there at all."""
    if peer_bus_id is None:
        return None
    links = 0
    seen_any = False
    for link in range(NVLINK_MAX_LINKS):
        state = _opt(nvml, "nvmlDeviceGetNvLinkState", handle, link)
        if state is None:
            continue
        seen_any = True
        if not state:
            continue
        remote = _opt(nvml, "nvmlDeviceGetNvLinkRemotePciInfo", handle, link)
        if remote is not None and _text(remote.busId).lower() == peer_bus_id.lower():
            links += 1
    return links if seen_any else None


def _pair(nvml: Any, a: int, b: int, handles: list[Any], gpus: list[dict[str, Any]]) -> dict[str, Any]:
    level = _opt(nvml, "nvmlDeviceGetTopologyCommonAncestor", handles[a], handles[b])
    status = _opt(nvml, "nvmlDeviceGetP2PStatus", handles[a], handles[b], P2P_CAPS_INDEX_READ)
    links = _nvlink_links(nvml, handles[a], gpus[b]["pci_bus_id"])
    topology = None if level is None else TOPOLOGY_NAMES.get(level, f"level-{level}")
    if links:
        topology = f"NV{links}"
    return {
        "a": a,
        "b": b,
        "topology": topology,
        "topology_level": level,
        "p2p_read": None if status is None else P2P_STATUS_NAMES.get(status, f"status-{status}"),
        "nvlink": bool(links),
        "nvlink_links": links,
    }


def _init_error(nvml: Any, exc: BaseException) -> str:
    value = getattr(exc, "value", None)
    if value == ERROR_LIBRARY_NOT_FOUND:
        return "NVML library not found (install nvidia-ml-py / the driver): libnvidia-ml.so.1 is not loadable"
    if value == ERROR_DRIVER_NOT_LOADED:
        return "NVIDIA driver not loaded (NVML: Driver Not Loaded): is the kernel module in, or does the host need a reboot?"
    if value == ERROR_LIB_RM_VERSION_MISMATCH:
        return (
            "Driver/library version mismatch: the loaded kernel module and libnvidia-ml differ "
            "(a driver upgrade without a reboot; reboot or reload the nvidia modules)"
        )
    if value == ERROR_NO_PERMISSION:
        return "NVML: insufficient permissions to open the GPUs"
    return f"NVML initialisation failed: {_one_line(exc)}"


def empty_facts(error: str) -> dict[str, Any]:
    return {
        "facts_version": FACTS_VERSION,
        "nvml_available": False,
        "error": error,
        "driver_version": None,
        "cuda_driver_version": None,
        "nvml_version": None,
        "pynvml_version": None,
        "gpus": [],
        "pairs": [],
    }


def collect(nvml: Any) -> dict[str, Any]:
    """Read every fact through `nvml` (pynvml or a fake of it). Never raises for NVML errors."""
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return empty_facts(_init_error(nvml, exc))
    except OSError as exc:  # a broken libnvidia-ml that dlopen refuses
        return empty_facts(f"NVML library not found (install nvidia-ml-py / the driver): {_one_line(exc)}")
    try:
        facts = empty_facts("")
        facts["error"] = None
        facts["nvml_available"] = True
        facts["pynvml_version"] = getattr(nvml, "__version__", None)
        driver = _opt(nvml, "nvmlSystemGetDriverVersion")
        facts["driver_version"] = None if driver is None else _text(driver)
        facts["cuda_driver_version"] = _cuda_version(_opt(nvml, "nvmlSystemGetCudaDriverVersion"))
        version = _opt(nvml, "nvmlSystemGetNVMLVersion")
        facts["nvml_version"] = None if version is None else _text(version)
        try:
            count = int(_get(nvml, "nvmlDeviceGetCount"))
        except _Unsupported as exc:
            facts["nvml_available"] = False
            facts["error"] = f"NVML could not count the GPUs: {_one_line(exc.__cause__ or exc)}"
            return facts
        handles: list[Any] = []
        for index in range(count):
            try:
                handles.append(_get(nvml, "nvmlDeviceGetHandleByIndex", index))
            except _Unsupported as exc:
                facts["error"] = f"GPU {index}: NVML gave no handle: {_one_line(exc.__cause__ or exc)}"
                handles.append(None)
        gpus = [_gpu(nvml, i, h) if h is not None else {"index": i, "name": None} for i, h in enumerate(handles)]
        facts["gpus"] = gpus
        facts["pairs"] = [
            _pair(nvml, a, b, handles, gpus)
            for a in range(count)
            for b in range(a + 1, count)
            if handles[a] is not None and handles[b] is not None
        ]
        return facts
    finally:
        with contextlib.suppress(Exception):  # a failed shutdown says nothing about the facts
            nvml.nvmlShutdown()


def load_and_collect() -> dict[str, Any]:
    try:
        import pynvml  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        return empty_facts("NVML library not found (install nvidia-ml-py / the driver): the pynvml module is not importable")
    return collect(pynvml)


def main() -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(argument_spec={"require": {"type": "bool", "default": False}}, supports_check_mode=True)
    facts = load_and_collect()
    if module.params["require"] and not facts["nvml_available"]:
        module.fail_json(msg=facts["error"], ansible_facts={"nvidia_gpu": facts})
    module.exit_json(changed=False, ansible_facts={"nvidia_gpu": facts})


if __name__ == "__main__":
    if sys.argv[1:] == ["--print"]:
        print(json.dumps(load_and_collect(), indent=2, sort_keys=True))
    else:
        main()
