"""The GPU facts module on NVML's raw answers from a real H200, checked against nvidia-smi.

The answers (tests/fixtures/gpu/h200-nvml-raw.json) were recorded by nvml_raw_dump.py, which does
not use the module; the expected facts are read from ``nvidia-smi -q`` of the same machine, a
second reader of the same driver. Neither side is derived from ``collect()``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gpu_fakes import load_module
from nvml_replay import FIXTURES, Handle, NotRecorded, ReplayNvml, raw, with_answer

facts_module = load_module()
SMI = (FIXTURES / "h200-nvidia-smi-q.txt").read_text()


def smi(label: str, after: str | None = None) -> str:
    """The value of ``label`` in nvidia-smi -q (the first one after the ``after`` section header)."""
    text = SMI if after is None else SMI[SMI.index(after) :]
    m = re.search(rf"^\s*{re.escape(label)}\s*:\s*(.+?)\s*$", text, flags=re.MULTILINE)
    assert m, label
    return m.group(1)


def test_collect_on_the_h200_answers_is_what_nvidia_smi_reports() -> None:
    facts = facts_module.collect(ReplayNvml(raw("h200-nvml-raw.json")))
    assert facts["nvml_available"] and facts["error"] is None
    assert facts["driver_version"] == smi("Driver Version")
    assert facts["cuda_driver_version"] == smi("CUDA Version")
    (gpu,) = facts["gpus"]
    assert gpu["name"] == smi("Product Name")
    assert gpu["uuid"] == smi("GPU UUID")
    assert gpu["pci_bus_id"] == smi("Bus Id")
    mib = int(smi("Total", after="FB Memory Usage").split()[0])
    assert gpu["memory_total_bytes"] == mib * 1024 * 1024
    assert gpu["pcie"]["max_generation"] == int(smi("Max", after="PCIe Generation"))
    assert gpu["pcie"]["current_generation"] == int(smi("Current", after="PCIe Generation"))
    assert gpu["pcie"]["gpu_max_generation"] == int(smi("Device Max", after="PCIe Generation"))
    assert gpu["pcie"]["max_width"] == int(smi("Max", after="Link Width").rstrip("x"))
    assert gpu["persistence_mode"] is (smi("Persistence Mode") == "Enabled")
    ecc = {"current": smi("Current", after="ECC Mode"), "pending": smi("Pending", after="ECC Mode")}
    mig = {"current": smi("Current", after="MIG Mode"), "pending": smi("Pending", after="MIG Mode")}
    assert gpu["ecc"] == {k: v == "Enabled" for k, v in ecc.items()}
    assert gpu["mig"] == {k: v != "Disabled" for k, v in mig.items()}
    assert gpu["remapped_rows"] == {
        "correctable": int(smi("Correctable Error", after="Remapped Rows")),
        "uncorrectable": int(smi("Uncorrectable Error", after="Remapped Rows")),
        "pending": smi("Pending", after="Remapped Rows") == "Yes",
        "failure": smi("Remapping Failure Occurred") == "Yes",
    }
    assert gpu["compute_capability"] == "9.0"  # nvidia-smi -q does not print it; the H200 is Hopper, 9.0
    assert facts["pairs"] == []  # one GPU (nvidia-smi topo -m shows GPU0 alone)


def test_collect_on_the_h200_answers_is_what_the_module_said_on_the_machine() -> None:
    """The replay gives what the module itself printed there (h200-capture.json): the fake is faithful."""
    import json

    on_device = json.loads((FIXTURES / "h200-capture.json").read_text())
    assert facts_module.collect(ReplayNvml(raw("h200-nvml-raw.json"))) == on_device


def test_a_call_the_dump_has_no_answer_for_fails() -> None:
    nvml = ReplayNvml(raw("h200-nvml-raw.json"))
    with pytest.raises(NotRecorded, match="nvmlDeviceGetNvLinkState"):
        nvml.nvmlDeviceGetNvLinkState(Handle(0), 99)
    with pytest.raises(AttributeError):
        nvml.nvmlDeviceGetFanSpeed(Handle(0))


def test_unsupported_answers_become_null_and_errors_stay_one_line() -> None:
    dump = with_answer(raw("h200-nvml-raw.json"), "nvmlDeviceGetEccMode", ["gpu:0"], error=3)
    gpu = facts_module.collect(ReplayNvml(dump))["gpus"][0]
    assert gpu["ecc"] == {"current": None, "pending": None}
    broken = with_answer(raw("h200-nvml-raw.json"), "nvmlInit", [], error=18)
    facts = facts_module.collect(ReplayNvml(broken))
    assert not facts["nvml_available"] and "Driver/library version mismatch" in facts["error"] and "\n" not in facts["error"]


def test_fixture_files_exist() -> None:
    for name in ("h200-nvml-raw.json", "h200-nvidia-smi-q.txt", "h200-capture.json", "nvml_raw_dump.py"):
        assert (Path(FIXTURES) / name).is_file(), name
