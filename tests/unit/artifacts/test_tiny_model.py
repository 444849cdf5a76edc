"""The tiny Llama builder: deterministic bytes, shapes vLLM expects, parameterised variants."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from llmfleet.artifacts import safetensors as st
from llmfleet.artifacts.tiny_model import SPECIAL_TOKENS, TinyLlamaSpec, build, tensor_shapes, weights
from llmfleet.pins import DEFAULT_LOCK, FilePin, load_lock
from pydantic import ValidationError

FILES = ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
SMALL: dict[str, Any] = {"vocab_size": 1024, "corpus_sentences": 3000}


@pytest.fixture(scope="module")
def default_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[FilePin]]:
    out = tmp_path_factory.mktemp("tiny") / "model"
    return out, build(TinyLlamaSpec(), out)


def test_rebuild_is_byte_identical(default_build: tuple[Path, list[FilePin]], tmp_path: Path) -> None:
    _, first = default_build
    second = build(TinyLlamaSpec(), tmp_path / "again")
    assert [f.path for f in first] == FILES
    assert first == second


@pytest.mark.skipif(not DEFAULT_LOCK.exists(), reason="no pins/lock.json in this checkout")
def test_default_build_matches_the_tiny_llama_pin(default_build: tuple[Path, list[FilePin]]) -> None:
    """What `pin.py fetch` rebuilds on a fresh machine must equal the lock, file by file."""
    pin = load_lock(DEFAULT_LOCK).models["tiny-llama"]
    _, files = default_build
    assert pin.builder == TinyLlamaSpec().params()
    assert files == pin.files


def test_weights_header_has_every_llama_tensor(default_build: tuple[Path, list[FilePin]]) -> None:
    out, _ = default_build
    spec = TinyLlamaSpec()
    metadata, infos, _ = st.read_header(out / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert {t.name: t.shape for t in infos} == tensor_shapes(spec)
    assert {t.dtype for t in infos} == {"BF16"}
    assert tensor_shapes(spec)["model.layers.1.self_attn.k_proj.weight"] == (2 * 32, 128)
    assert (out / "model.safetensors").stat().st_size // 1_000_000 == 2  # about 2.7 MB


def test_config_and_tokenizer_agree_with_the_facts(default_build: tuple[Path, list[FilePin]]) -> None:
    from tokenizers import Tokenizer

    out, _ = default_build
    spec = TinyLlamaSpec()
    config = json.loads((out / "config.json").read_text())
    facts = spec.facts()
    assert config["architectures"] == [facts.architecture]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"):
        assert config[key] == getattr(facts, key)
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 4096
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("Hello world").ids[0] == config["bos_token_id"] == 1
    assert tok.decode(tok.encode("Hello world").ids) == "Hello world"
    tconf = json.loads((out / "tokenizer_config.json").read_text())
    assert tconf["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "<|im_start|>" in tconf["chat_template"] and tconf["eos_token"] == "</s>"


@pytest.mark.parametrize(
    ("params", "dtype", "q_shape", "kv_shape"),
    [
        ({"num_hidden_layers": 3, "num_key_value_heads": 1}, "BF16", (128, 128), (32, 128)),
        ({"head_dim": 64}, "BF16", (256, 128), (128, 128)),
        ({"dtype": "float16", "num_key_value_heads": 4}, "F16", (128, 128), (128, 128)),
        ({"dtype": "float32", "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2}, "F32", (64, 64), (64, 64)),
    ],
)
def test_variants(tmp_path: Path, params: dict[str, Any], dtype: str, q_shape: tuple[int, ...], kv_shape: tuple[int, ...]) -> None:
    spec = TinyLlamaSpec(**SMALL, **params)
    build(spec, tmp_path)
    _, infos, _ = st.read_header(tmp_path / "model.safetensors")
    by_name = {t.name: t for t in infos}
    assert {t.dtype for t in infos} == {dtype}
    assert by_name["model.layers.0.self_attn.q_proj.weight"].shape == q_shape
    assert by_name["model.layers.0.self_attn.k_proj.weight"].shape == kv_shape
    layers = {int(n.split(".")[2]) for n in by_name if n.startswith("model.layers.")}
    assert layers == set(range(spec.num_hidden_layers))
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == spec.resolved_head_dim


def test_adding_a_layer_keeps_the_other_tensors() -> None:
    two, three = weights(TinyLlamaSpec(**SMALL)), weights(TinyLlamaSpec(**SMALL, num_hidden_layers=3))
    assert set(two) < set(three)
    for name, value in two.items():
        assert (value == three[name]).all(), name


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"hidden_size": 130}, "not a multiple of num_attention_heads"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"head_dim": 33}, "must be even"),
        ({"dtype": "int8"}, "dtype"),
        ({"layers": 2}, "Extra inputs"),
    ],
)
def test_invalid_parameters_are_refused(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        TinyLlamaSpec(**params)


def test_the_package_imports_without_torch() -> None:
    code = (
        "import sys; import llmfleet.cli.pin, llmfleet.artifacts.tiny_model, llmfleet.artifacts.wheelhouse; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    tools = Path(__file__).resolve().parents[3] / "tools"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(tools)})
