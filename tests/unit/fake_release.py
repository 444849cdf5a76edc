"""A made-up vLLM release for the static scans (SupportsPP, the server's options): the same files as
a source tree or as a wheel."""

from __future__ import annotations

import textwrap
import zipfile
from collections.abc import Mapping
from pathlib import Path

WHEEL_NAME = "vllm-0.99.1-cp38-abi3-manylinux_2_31_x86_64.whl"


def write_tree(root: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


def write_wheel(directory: Path, files: Mapping[str, str]) -> Path:
    wheel = directory / WHEEL_NAME
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, textwrap.dedent(text))
    return wheel
