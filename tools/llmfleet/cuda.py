"""The NVIDIA driver a CUDA runtime pin needs, read from its wheels (``catalog/cuda.yml``).

A CUDA build of vLLM carries its CUDA runtime as a wheel (``nvidia-cuda-runtime-cu12`` for CUDA 12,
``nvidia-cuda-runtime`` for CUDA 13); its version is the toolkit release's cudart version, and
NVIDIA's release notes give the driver that release needs. PyTorch's own index marks its wheels
``+cuXYZ``: that names the CUDA minor version only, so it is used when no cudart wheel is pinned
(the earliest listed release of that version) and otherwise only to check that both agree.
See docs/driver-cuda.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from .errors import InputError
from .pins import CudaBuild, Requirement

#: the wheels that carry libcudart, by CUDA major version
CUDART_WHEELS = ("nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime", "nvidia-cuda-runtime-cu11")
TORCH_CUDA_TAG = re.compile(r"\+cu(\d+)(\d)$")


@dataclass(frozen=True)
class CudaRelease:
    release: str
    cuda: str
    cudart: str
    min_driver: str
    source: str


@lru_cache(maxsize=1)
def releases() -> tuple[CudaRelease, ...]:
    data = yaml.safe_load(resources.files("llmfleet.catalog").joinpath("cuda.yml").read_text())
    return tuple(CudaRelease(**{k: str(v) for k, v in entry.items()}) for entry in data["releases"])


def driver_version(text: str) -> tuple[int, ...]:
    """An NVIDIA driver as numbers: ``"580.95.05-0ubuntu0.24.04.2"`` (a package version: the epoch
    and the distribution's revision dropped), ``"3:580.95.05-1.el9"``, ``"570.124.06"`` or a branch
    ``"535"``."""
    upstream = re.sub(r"^\d+:", "", text.strip()).split("-", 1)[0]
    if not re.fullmatch(r"\d+(\.\d+)*", upstream):
        raise ValueError(f"not an NVIDIA driver version: {text!r}")
    return tuple(int(p) for p in upstream.split("."))


def cuda_build(requirements: Iterable[Requirement]) -> CudaBuild | None:
    """The CUDA release a runtime's pinned wheels link, or None when none of them says (a CPU build)
    or the release is not in catalog/cuda.yml."""
    reqs = {r.name: r for r in requirements}
    cudart = next((reqs[n] for n in CUDART_WHEELS if n in reqs), None)
    torch = reqs.get("torch")
    tag = TORCH_CUDA_TAG.search(torch.version) if torch else None
    tag_cuda = f"{tag.group(1)}.{tag.group(2)}" if tag else None
    if cudart is not None:
        found = next((r for r in releases() if r.cudart == cudart.version), None)
        if tag_cuda and torch is not None and not cudart.version.startswith(tag_cuda + "."):
            raise InputError(f"torch {torch.version} is built for CUDA {tag_cuda}, but {cudart.name} {cudart.version} is pinned")
        if found is None:
            return None
        return CudaBuild(cuda=found.cuda, release=found.release, min_driver=found.min_driver, source=f"{cudart.name} {cudart.version}")
    if tag_cuda and torch is not None:
        found = min((r for r in releases() if r.cuda == tag_cuda), key=lambda r: driver_version(r.min_driver), default=None)
        if found is None:
            return None
        return CudaBuild(
            cuda=found.cuda, release=f"CUDA {found.cuda}", min_driver=found.min_driver,
            source=f"torch {torch.version} (the tag names CUDA {found.cuda}, not its update)",
        )  # fmt: skip
    return None
