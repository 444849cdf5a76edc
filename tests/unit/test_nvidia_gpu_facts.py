"""library/nvidia_gpu_facts.py: collection over a fake pynvml built from the real H100 capture."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from gpu_fakes import MODULE_PATH, ROOT, FakeNvml, capture, load_module

facts_module = load_module()


@pytest.mark.parametrize("name", ["h100-capture.json", "xr7620-4xl4-derived.json"])
def test_collect_reproduces_the_capture(name):
    facts = capture(name)
    assert facts_module.collect(FakeNvml(facts)) == facts


def test_h100_capture_is_what_the_device_reported():
    facts = capture("h100-capture.json")
    assert facts["nvml_available"] is True and facts["error"] is None
    assert facts["driver_version"] == "580.159.04"
    assert facts["cuda_driver_version"] == "13.0"
    (gpu,) = facts["gpus"]
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["memory_total_bytes"] == 81559 * 1024 * 1024
    assert gpu["pcie"]["max_generation"] == 5 and gpu["pcie"]["max_width"] == 16
    # the single-GPU VM gave no NUMA node: a field NVML does not support is null, not a failure
    assert gpu["numa_node"] is None
    assert facts["pairs"] == []


def test_derived_capture_is_what_derive_l4_writes():
    sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "gpu"))
    try:
        import derive_l4
    finally:
        sys.path.pop(0)
    derived = derive_l4.render(derive_l4.derive(capture("h100-capture.json")))
    assert derived == (ROOT / "tests" / "fixtures" / "gpu" / "xr7620-4xl4-derived.json").read_text()


@pytest.mark.parametrize(
    ("code", "start"),
    [
        (12, "NVML library not found (install nvidia-ml-py / the driver)"),
        (18, "Driver/library version mismatch: "),
        (9, "NVIDIA driver not loaded"),
        (999, "NVML initialisation failed: "),
    ],
)
def test_nvml_init_failure_is_one_line_not_a_traceback(code, start):
    facts = facts_module.collect(FakeNvml(capture("h100-capture.json"), init_error=code))
    assert facts["nvml_available"] is False
    assert facts["error"].startswith(start)
    assert "\n" not in facts["error"]
    assert facts["gpus"] == [] and facts["pairs"] == [] and facts["driver_version"] is None


def test_unsupported_fields_are_null():
    facts = capture("xr7620-4xl4-derived.json")
    blank = copy.deepcopy(facts)
    for gpu in blank["gpus"]:
        for key in ("uuid", "compute_capability", "numa_node", "remapped_rows", "memory_total_bytes"):
            gpu[key] = None
        gpu["pcie"] = dict.fromkeys(gpu["pcie"])
        gpu["ecc"] = {"current": None, "pending": None}
    for pair in blank["pairs"]:
        pair.update(topology=None, topology_level=None, p2p_read=None)
    got = facts_module.collect(FakeNvml(blank))
    assert got["nvml_available"] is True
    assert got["gpus"][0]["pcie"]["max_generation"] is None
    assert got["gpus"][0]["retired_pages"] is None  # neither rows nor pages: both null
    assert got["pairs"][0]["topology"] is None and got["pairs"][0]["p2p_read"] is None
    assert got == blank


def test_missing_binding_function_is_null():
    class OldBinding(FakeNvml):  # an older nvidia-ml-py without the call
        nvmlDeviceGetNumaNodeId = None

    facts = capture("xr7620-4xl4-derived.json")
    got = facts_module.collect(OldBinding(facts))
    assert [g["numa_node"] for g in got["gpus"]] == [None] * 4


def test_retired_pages_on_a_gpu_without_row_remapping():
    facts = capture("h100-capture.json")
    facts["gpus"][0]["remapped_rows"] = None
    facts["gpus"][0]["retired_pages"] = {"single_bit_ecc": 2, "double_bit_ecc": 0, "pending": False}
    assert facts_module.collect(FakeNvml(facts)) == facts


def test_nvlink_pairs_read_nv_and_the_link_count():
    facts = capture("xr7620-4xl4-derived.json")
    for pair in facts["pairs"]:
        pair.update(nvlink_links=0)
    facts["pairs"][0].update(nvlink=True, nvlink_links=4, topology="NV4")
    assert facts_module.collect(FakeNvml(facts)) == facts


def test_pynvml_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    facts = facts_module.load_and_collect()
    assert facts["nvml_available"] is False
    assert facts["error"].startswith("NVML library not found (install nvidia-ml-py / the driver)")


def _run_module(tmp_path, args):
    """Run the file the way Ansible's old-style debugging does: the arguments in a JSON file."""
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    env = os.environ | {"PYTHONPATH": ""}
    code = "import runpy, sys; sys.modules['pynvml'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, str(MODULE_PATH), str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_ansible_module_reports_nvml_absent_without_failing(tmp_path):
    rc, result = _run_module(tmp_path, {"_ansible_check_mode": True})
    assert rc == 0, result
    assert result["changed"] is False
    facts = result["ansible_facts"]["nvidia_gpu"]
    assert facts["nvml_available"] is False and facts["error"].startswith("NVML library not found")


def test_ansible_module_require_fails_with_the_reason(tmp_path):
    rc, result = _run_module(tmp_path, {"require": True})
    assert rc == 1
    assert result["failed"] is True
    assert result["msg"].startswith("NVML library not found (install nvidia-ml-py / the driver)")
