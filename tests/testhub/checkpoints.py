"""Checkpoints for the test hub: the files a repo holds, as {path: bytes}.

- :func:`production`: config-complete builds of the production models with their public
  ``config.json`` shapes (and, for the NVFP4 builds, a ModelOpt ``hf_quant_config.json`` following
  the recipe their model cards state), tokenizer and template files, and small weights: a few
  tensors under the real names, in two shards with an index. Beside them lie what a real repo has
  that vLLM does not read (README, LICENSE, an ``original/`` folder, a ``.bin`` copy of the weights)
  so that the pin's file selection is exercised. Sources of each value: docs/pins.md.
- :func:`sharded`: random shards of a given size, for transfer tests (resume, corruption).
- :func:`folder`: the files of a model folder on disk (the tiny model of the cache).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from llmfleet.artifacts.safetensors import serialize

GEMMA4_REPO = "google/gemma-4-31B-it"
GEMMA4_NVFP4_REPO = "nvidia/Gemma-4-31B-IT-NVFP4"
NEMOTRON_REPO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
NEMOTRON_NVFP4_REPO = "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-NVFP4"
NEMOTRON_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def gemma4_config() -> dict[str, Any]:
    """google/gemma-4-31B-it config.json (Gemma4ForConditionalGeneration, decoder in text_config)."""
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 10
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "boi_token_id": 255999,
        "eoi_token_id": 258882,
        "image_token_id": 258880,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "transformers_version": "5.5.0",
        "text_config": {
            "model_type": "gemma4_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attention_k_eq_v": True,
            "dtype": "bfloat16",
            "enable_moe_block": False,
            "final_logit_softcapping": 30.0,
            "global_head_dim": 512,
            "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 5376,
            "hidden_size_per_layer_input": 0,
            "intermediate_size": 21504,
            "layer_types": layer_types,
            "max_position_embeddings": 262144,
            "num_attention_heads": 32,
            "num_global_key_value_heads": 4,
            "num_hidden_layers": 60,
            "num_key_value_heads": 16,
            "num_kv_shared_layers": 0,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0, "rope_type": "proportional"},
                "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
            },
            "sliding_window": 1024,
            "tie_word_embeddings": True,
            "use_cache": True,
            "use_double_wide_mlp": False,
            "vocab_size": 262144,
        },
        "vision_config": {
            "model_type": "gemma4_vision",
            "head_dim": 72,
            "hidden_size": 1152,
            "num_attention_heads": 16,
            "num_key_value_heads": 16,
            "patch_size": 16,
            "standardize": True,
        },
    }


def nemotron_config() -> dict[str, Any]:
    """nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json (NemotronHForCausalLM)."""
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "chunk_size": 128,
        "conv_kernel": 4,
        "eos_token_id": 2,
        "expand": 2,
        "head_dim": 128,
        "hidden_size": 2688,
        "hybrid_override_pattern": NEMOTRON_PATTERN,
        "intermediate_size": 1856,
        "layer_norm_epsilon": 1e-05,
        "mamba_head_dim": 64,
        "mamba_hidden_act": "silu",
        "mamba_num_heads": 64,
        "mamba_proj_bias": False,
        "mamba_ssm_cache_dtype": "float32",
        "max_position_embeddings": 262144,
        "mlp_bias": False,
        "mlp_hidden_act": "relu2",
        "moe_intermediate_size": 1856,
        "moe_shared_expert_intermediate_size": 3712,
        "n_group": 1,
        "n_groups": 8,
        "n_routed_experts": 128,
        "n_shared_experts": 1,
        "norm_eps": 1e-05,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_experts_per_tok": 6,
        "num_hidden_layers": 52,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "rescale_prenorm_residual": True,
        "residual_in_fp32": False,
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "ssm_state_size": 128,
        "tie_word_embeddings": False,
        "topk_group": 1,
        "torch_dtype": "bfloat16",
        "use_bias": False,
        "use_cache": True,
        "use_conv_bias": True,
        "use_mamba_kernels": True,
        "vocab_size": 131072,
    }


def gemma4_nvfp4_quant() -> dict[str, Any]:
    """ModelOpt export: NVFP4 weights, FP8 KV cache; every self_attn, the vision side and lm_head kept."""
    return {
        "producer": {"name": "modelopt", "version": "0.37.0"},
        "quantization": {
            "quant_algo": "NVFP4",
            "kv_cache_quant_algo": "FP8",
            "group_size": 16,
            "exclude_modules": ["lm_head", "model.embed_vision*", "model.vision_tower*", "model.language_model.layers.*.self_attn*"],
        },
    }


def nemotron_nvfp4_quant() -> dict[str, Any]:
    """ModelOpt export: NVFP4 experts and Mamba GEMMs, FP8 KV cache; the attention layers and the
    Mamba layers that feed them (the one before each ``*``) kept in BF16, with lm_head."""
    attention = [i for i, c in enumerate(NEMOTRON_PATTERN) if c == "*"]
    feeding = [i - 1 for i in attention]
    exclude = ["lm_head"] + [f"backbone.layers.{i}.mixer*" for i in sorted(attention + feeding)]
    return {
        "producer": {"name": "modelopt", "version": "0.37.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16, "exclude_modules": exclude},
    }


def _tokenizer_files(eos: str) -> dict[str, bytes]:
    vocab = {"<pad>": 0, "<bos>": 1, eos: 2, "a": 3, "b": 4}
    tokenizer = {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}, "added_tokens": []}
    return {
        "tokenizer.json": _json(tokenizer),
        "tokenizer_config.json": _json({"bos_token": "<bos>", "eos_token": eos, "pad_token": "<pad>", "model_max_length": 262144}),
        "special_tokens_map.json": _json({"bos_token": "<bos>", "eos_token": eos, "pad_token": "<pad>"}),
        "chat_template.jinja": b"{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\n",
    }


def _shards(names: dict[str, tuple[tuple[int, ...], str]], seed: int) -> dict[str, bytes]:
    """Two shards and their index holding ``names`` (name -> (shape, dtype)), small random values."""
    rng = np.random.default_rng(seed)
    split = sorted(names)
    halves = [split[: len(split) // 2], split[len(split) // 2 :]]
    files: dict[str, bytes] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, part in enumerate(halves, start=1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        tensors = {}
        for n in part:
            shape, dtype = names[n]
            tensors[n] = rng.integers(0, 255, size=shape) if dtype in ("U8", "F8_E4M3") else rng.normal(0, 0.02, size=shape)
            weight_map[n] = shard
        data = serialize(tensors, {n: names[n][1] for n in part}, {"format": "pt"})
        files[shard] = data
        total += len(data)
    files["model.safetensors.index.json"] = _json({"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _decoys(weights: dict[str, bytes]) -> dict[str, bytes]:
    """What a hub repo holds that vLLM does not read."""
    first = sorted(p for p in weights if p.endswith(".safetensors"))[0]
    return {
        "README.md": b"# model card\n",
        "LICENSE": b"license text\n",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        "original/consolidated.safetensors": weights[first],
        "pytorch_model.bin": weights[first],
        "assets/diagram.png": b"\x89PNG\r\n\x1a\n",
    }


def _gemma4_files(quantized: bool) -> dict[str, bytes]:
    lm = "model.language_model"
    names: dict[str, tuple[tuple[int, ...], str]] = {
        f"{lm}.embed_tokens.weight": ((16, 8), "BF16"),
        f"{lm}.norm.weight": ((8,), "BF16"),
        f"{lm}.layers.0.self_attn.q_proj.weight": ((8, 8), "BF16"),
        f"{lm}.layers.0.input_layernorm.weight": ((8,), "BF16"),
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight": ((12, 12), "BF16"),
        "model.vision_tower.patch_embedder.input_proj.weight": ((12, 48), "BF16"),
        "model.embed_vision.embedding_projection.weight": ((8, 12), "BF16"),
    }
    if quantized:  # packed fp4 values (two per byte) and one fp8 scale per 16 values
        names |= {
            f"{lm}.layers.0.mlp.gate_proj.weight": ((32, 16), "U8"),
            f"{lm}.layers.0.mlp.gate_proj.weight_scale": ((32, 2), "F8_E4M3"),
            f"{lm}.layers.0.mlp.gate_proj.weight_scale_2": ((1,), "F32"),
        }
    else:
        names[f"{lm}.layers.0.mlp.gate_proj.weight"] = ((32, 8), "BF16")
    weights = _shards(names, seed=4 + quantized)
    files = {
        "config.json": _json(gemma4_config()),
        "generation_config.json": _json({"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}),
        "processor_config.json": _json({"processor_class": "Gemma4Processor", "image_seq_length": 280}),
        **_tokenizer_files("<eos>"),
        **weights,
    }
    if quantized:
        files["hf_quant_config.json"] = _json(gemma4_nvfp4_quant())
    return files | _decoys(weights)


def _nemotron_files(quantized: bool) -> dict[str, bytes]:
    names: dict[str, tuple[tuple[int, ...], str]] = {
        "backbone.embeddings.weight": ((16, 8), "BF16"),
        "backbone.norm_f.weight": ((8,), "BF16"),
        "backbone.layers.0.mixer.in_proj.weight": ((40, 8), "BF16"),
        "backbone.layers.0.mixer.A_log": ((4,), "F32"),
        "lm_head.weight": ((16, 8), "BF16"),
    }
    if quantized:
        names |= {
            "backbone.layers.1.mixer.experts.0.up_proj.weight": ((16, 8), "U8"),
            "backbone.layers.1.mixer.experts.0.up_proj.weight_scale": ((16, 1), "F8_E4M3"),
        }
    else:
        names["backbone.layers.1.mixer.experts.0.up_proj.weight"] = ((16, 16), "BF16")
    weights = _shards(names, seed=8 + quantized)
    files = {
        "config.json": _json(nemotron_config()),
        "generation_config.json": _json({"bos_token_id": 1, "eos_token_id": [2, 11], "pad_token_id": 0}),
        **_tokenizer_files("</s>"),
        **weights,
    }
    if quantized:
        files["hf_quant_config.json"] = _json(nemotron_nvfp4_quant())
    return files | _decoys(weights)


def production() -> dict[str, dict[str, bytes]]:
    """repo id -> files, for the four production repos the example inventory pins."""
    return {
        GEMMA4_REPO: _gemma4_files(quantized=False),
        GEMMA4_NVFP4_REPO: _gemma4_files(quantized=True),
        NEMOTRON_REPO: _nemotron_files(quantized=False),
        NEMOTRON_NVFP4_REPO: _nemotron_files(quantized=True),
    }


#: lock key -> repo, as catalog/models.yml names them
PRODUCTION_KEYS = {
    "gemma-4-31b-it": GEMMA4_REPO,
    "gemma-4-31b-it-nvfp4": GEMMA4_NVFP4_REPO,
    "nemotron-3-nano-30b-a3b": NEMOTRON_REPO,
    "nemotron-3-nano-30b-a3b-nvfp4": NEMOTRON_NVFP4_REPO,
}


def sharded(shards: int, shard_bytes: int, seed: int = 0) -> dict[str, bytes]:
    """A Llama-shaped config and ``shards`` random weight shards of ``shard_bytes`` each (plus index)."""
    rng = np.random.default_rng(seed)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "max_position_embeddings": 4096, "torch_dtype": "bfloat16",
    }
    files = {"config.json": _json(config), **_tokenizer_files("</s>")}
    weight_map = {}
    for i in range(1, shards + 1):
        name = f"model-{i:05d}-of-{shards:05d}.safetensors"
        files[name] = rng.integers(0, 256, size=shard_bytes, dtype=np.uint8).tobytes()
        weight_map[f"model.layers.{i}.weight"] = name
    files["model.safetensors.index.json"] = _json({"metadata": {"total_size": shards * shard_bytes}, "weight_map": weight_map})
    return files


def folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
