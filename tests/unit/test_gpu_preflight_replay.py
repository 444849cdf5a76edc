"""GPU preflight on facts the module collected from NVML's raw answers on a real H200.

The profile below describes that H200; the unchanged answers must pass. Then one recorded answer at
a time is changed to what a host unlike its profile would give (another model, less memory, a lower
PCIe link, MIG on, ...) and the preflight must name exactly that field, with the right severity.
Every field the preflight checks has a case. Pairs (topology, NVLink) need two GPUs: the H200 machine
had one, so those stay with tests/unit/test_gpu_preflight.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from gpu_fakes import load_module
from llmfleet.gpu_preflight import check_gpu_facts
from llmfleet.spec import HardwareProfile
from nvml_replay import ReplayNvml, raw, with_answer

facts_module = load_module()
H200 = HardwareProfile.model_validate(
    {
        "accelerator": "cuda",
        "device_model": "NVIDIA H200",
        "device_count": 1,
        "device_memory_gib": 143771 / 1024,  # nvidia-smi -q: FB Memory Usage Total 143771 MiB
        "memory_bandwidth_gbs": 4800,
        "compute_capability": "9.0",
        "interconnect": "pcie",
        "pcie": {"generation": 5, "width": 16},
        "driver_branch": "580",
    }
)
G = "gpu:0"


def problems(dump: dict[str, Any]) -> set[tuple[str, str]]:
    facts = facts_module.collect(ReplayNvml(dump))
    return {(p.where, p.severity) for p in check_gpu_facts("h200", H200, facts)}


def test_the_recorded_h200_passes_its_profile() -> None:
    assert problems(raw("h200-nvml-raw.json")) == set()


CASES = [
    ("nvmlDeviceGetName", [G], "NVIDIA H100 80GB HBM3", {("gpu[0].name", "error")}),
    (
        "nvmlDeviceGetMemoryInfo",
        [G],
        {"struct": "c_nvmlMemory_t", "total": 85520809984, "free": 85520809984, "used": 0},
        {("gpu[0].memory_total_bytes", "error")},
    ),
    ("nvmlDeviceGetCudaComputeCapability", [G], [8, 9], {("gpu[0].compute_capability", "error")}),
    ("nvmlDeviceGetMaxPcieLinkGeneration", [G], 4, {("gpu[0].pcie.max", "error")}),
    ("nvmlDeviceGetMaxPcieLinkWidth", [G], 8, {("gpu[0].pcie.max", "error")}),
    ("nvmlDeviceGetCurrPcieLinkGeneration", [G], 1, set()),  # the link drops at idle: not compared
    ("nvmlDeviceGetMigMode", [G], [1, 1], {("gpu[0].mig.current", "error")}),
    ("nvmlDeviceGetEccMode", [G], [0, 0], {("gpu[0].ecc.current", "warning")}),
    ("nvmlDeviceGetEccMode", [G], [1, 0], {("gpu[0].ecc.pending", "warning")}),
    ("nvmlDeviceGetRemappedRows", [G], [0, 0, 0, 1], {("gpu[0].remapped_rows.failure", "error")}),
    ("nvmlDeviceGetRemappedRows", [G], [0, 0, 1, 0], {("gpu[0].remapped_rows.pending", "error")}),
    ("nvmlDeviceGetRemappedRows", [G], [0, 3, 0, 0], {("gpu[0].remapped_rows.uncorrectable", "warning")}),
    ("nvmlDeviceGetPersistenceMode", [G], 0, {("gpu[0].persistence_mode", "warning")}),
    ("nvmlSystemGetDriverVersion", [], "535.230.02", {("nvidia_gpu.driver_version", "error")}),
    ("nvmlDeviceGetCount", [], 0, {("nvidia_gpu.gpus", "error")}),
]


@pytest.mark.parametrize(("fn", "args", "answer", "expected"), CASES, ids=[f"{c[0]}={c[2]}" for c in CASES])
def test_one_differing_answer_names_its_field(fn: str, args: list[Any], answer: Any, expected: set[tuple[str, str]]) -> None:
    assert problems(with_answer(raw("h200-nvml-raw.json"), fn, args, ok=answer)) == expected


def test_retired_pages_on_a_gpu_that_does_not_remap_rows() -> None:
    dump = with_answer(raw("h200-nvml-raw.json"), "nvmlDeviceGetRemappedRows", [G], error=3)
    dump = with_answer(dump, "nvmlDeviceGetRetiredPages", [G, 1], ok=[4096, 8192])
    dump = with_answer(dump, "nvmlDeviceGetRetiredPages", [G, 0], ok=[])
    dump = with_answer(dump, "nvmlDeviceGetRetiredPagesPendingStatus", [G], ok=1)
    assert problems(dump) == {("gpu[0].retired_pages.pending", "error"), ("gpu[0].retired_pages.double_bit_ecc", "warning")}


def test_nvml_unusable_is_one_problem() -> None:
    dump = with_answer(raw("h200-nvml-raw.json"), "nvmlInit", [], error=9)
    assert problems(dump) == {("nvidia_gpu.nvml_available", "error")}
