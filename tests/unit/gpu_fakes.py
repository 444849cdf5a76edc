"""A fake ``pynvml`` that answers from a capture (tests/fixtures/gpu/*.json), and the module loader.

A field the capture holds as null answers NVML's Not Supported, the way the real binding does; so
``collect(FakeNvml(capture))`` must give the capture back.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

from by_path import load_file

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "gpu"
MODULE_PATH = ROOT / "library" / "nvidia_gpu_facts.py"

NOT_SUPPORTED = 3


def load_module() -> ModuleType:
    return load_file("nvidia_gpu_facts", MODULE_PATH)


def capture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


class NVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


_P2P_CODES = {
    "OK": 0,
    "chipset not supported": 1,
    "GPU not supported": 2,
    "IOH topology not supported": 3,
    "disabled by regkey": 4,
    "not supported": 5,
    "unknown": 6,
}


class FakeNvml:
    """Enough of pynvml for ``collect``; handles are the GPU indexes."""

    NVMLError = NVMLError

    def __init__(self, facts: dict[str, Any], init_error: int | None = None):
        self.facts = facts
        self.init_error = init_error
        self.calls: list[str] = []
        self.initialised = False
        self.gpus = facts["gpus"]
        self.pairs = {(p["a"], p["b"]): p for p in facts["pairs"]} | {(p["b"], p["a"]): p for p in facts["pairs"]}
        # NVLink: a GPU has links only if some pair of it has nvlink_links not null.
        self.links: dict[int, list[str] | None] = {}
        for gpu in self.gpus:
            i = gpu["index"]
            mine = [p for (a, _b), p in self.pairs.items() if a == i]
            if all(p.get("nvlink_links") is None for p in mine):
                self.links[i] = None
                continue
            remote: list[str] = []
            for p in mine:
                peer = p["b"] if p["a"] == i else p["a"]
                remote += [self.gpus[peer]["pci_bus_id"]] * (p.get("nvlink_links") or 0)
            self.links[i] = remote + [""] * 2  # two inactive links beside the active ones

    # --- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _some(value: Any) -> Any:
        if value is None:
            raise NVMLError(NOT_SUPPORTED)
        return value

    def _gpu(self, handle: int, *path: str) -> Any:
        value: Any = self.gpus[handle]
        for key in path:
            value = None if value is None else value.get(key)
        return self._some(value)

    # --- system ----------------------------------------------------------------------------
    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self._some(self.facts["driver_version"])

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        major, minor = self._some(self.facts["cuda_driver_version"]).split(".")
        return int(major) * 1000 + int(minor) * 10

    def nvmlSystemGetNVMLVersion(self) -> str:
        return self._some(self.facts["nvml_version"])

    def nvmlDeviceGetCount(self) -> int:
        assert self.initialised
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    # --- per GPU ---------------------------------------------------------------------------
    def nvmlDeviceGetName(self, h: int) -> str:
        return self._gpu(h, "name")

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._gpu(h, "uuid")

    def nvmlDeviceGetPciInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self._gpu(h, "pci_bus_id").encode())  # older bindings give bytes

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(total=self._gpu(h, "memory_total_bytes"), free=0, used=0)

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        major, minor = self._gpu(h, "compute_capability").split(".")
        return int(major), int(minor)

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "pcie", "max_generation")

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "pcie", "max_width")

    def nvmlDeviceGetGpuMaxPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "pcie", "gpu_max_generation")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "pcie", "current_generation")

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "pcie", "current_width")

    def nvmlDeviceGetPersistenceMode(self, h: int) -> int:
        return int(self._gpu(h, "persistence_mode"))

    def nvmlDeviceGetEccMode(self, h: int) -> list[int]:
        return [int(self._gpu(h, "ecc", "current")), int(self._gpu(h, "ecc", "pending"))]

    def nvmlDeviceGetMigMode(self, h: int) -> list[int]:
        return [int(self._gpu(h, "mig", "current")), int(self._gpu(h, "mig", "pending"))]

    def nvmlDeviceGetRemappedRows(self, h: int) -> tuple[int, int, int, int]:
        r = self._gpu(h, "remapped_rows")
        return r["correctable"], r["uncorrectable"], int(r["pending"]), int(r["failure"])

    def nvmlDeviceGetRetiredPages(self, h: int, cause: int) -> list[int]:
        pages = self._gpu(h, "retired_pages")
        count = self._some(pages["single_bit_ecc" if cause == 0 else "double_bit_ecc"])
        return [0x1000 * n for n in range(count)]

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: int) -> int:
        return int(self._gpu(h, "retired_pages", "pending"))

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        return self._gpu(h, "numa_node")

    # --- pairs -----------------------------------------------------------------------------
    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return self._some(self.pairs[(a, b)]["topology_level"])

    def nvmlDeviceGetP2PStatus(self, a: int, b: int, index: int) -> int:
        assert index == 0, "the read capability index is the C value 0, not pynvml's tuple"
        return _P2P_CODES[self._some(self.pairs[(a, b)]["p2p_read"])]

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        links = self._some(self.links[h])
        if link >= len(links):
            raise NVMLError(NOT_SUPPORTED)
        return int(bool(links[link]))

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> SimpleNamespace:
        links = self._some(self.links[h])
        return SimpleNamespace(busId=links[link])
