#!/usr/bin/env python3
"""Prepare the GPU memory captures of ``captures.yml``: config-only checkpoints and the plan's argv.

    # 1. the checkpoints (needs transformers, for the Gemma 4 processor: the device image has it)
    python3 bench/gpu/prepare.py models --out .gpu/models
    # 2. every capture planned by llmfleet's own evaluator (control venv): argv and environment
    .venv/bin/python bench/gpu/prepare.py plan --models .gpu/models --out .gpu/manifest.json
    # 3. the wheels the device image lacks, hash-checked against the lock, cut into carryable pieces
    .venv/bin/python bench/gpu/prepare.py pieces --wheels DIR --out .whl --lock pins/lock.json

A checkpoint holds ``config.json`` (the planner's facts spelled as the model's config, plus the
``hf`` keys of captures.yml), the tiny BPE tokenizer of the lab model (vLLM needs one to serve;
its vocabulary is smaller than the config's, which changes nothing in memory), and for Gemma 4 the
multimodal processor vLLM profiles the vision tower with. No weights: vLLM runs with
``--load-format dummy``, which allocates and fills every tensor as a real checkpoint would.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPEC = HERE / "captures.yml"
TOKENIZER_SRC = Path(os.environ.get("LLMFLEET_CACHE") or Path.home() / ".cache" / "llmfleet") / "models" / "tiny-llama"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GEMMA4_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}
#: the planner's facts that are not config.json keys
PLANNER_ONLY = {
    "architecture",
    "gated_mlp",
    "unquantized",
    "kv_cache_dtype",
    "extra_params",
    "vision",
    "num_experts",
    "shared_expert_intermediate_size",
    "conv_kernel",
    "mamba_ssm_cache_dtype",
}


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


# --- checkpoints ---------------------------------------------------------------------------------


def hf_config(key: str, model: dict[str, Any], token_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json of a model entry: its facts under config.json's names, plus the ``hf`` keys."""
    facts = dict(model["facts"])
    hf = dict(model.get("hf") or {})
    base = {k: v for k, v in facts.items() if k not in PLANNER_ONLY}
    base["architectures"] = [facts["architecture"]]
    base.setdefault("bos_token_id", 1)
    base.setdefault("eos_token_id", 2)
    base.setdefault("pad_token_id", 0)
    if facts.get("num_experts"):
        base["n_routed_experts"] = facts["num_experts"]
    if facts.get("shared_expert_intermediate_size"):
        base["moe_shared_expert_intermediate_size"] = facts["shared_expert_intermediate_size"]
    if facts.get("conv_kernel"):
        base["mamba_d_conv"] = facts["conv_kernel"]
    if facts.get("mamba_ssm_cache_dtype"):
        base["mamba_ssm_cache_dtype"] = facts["mamba_ssm_cache_dtype"]
    if hf.get("model_type") != "gemma4":
        return base | hf
    # Gemma 4: the text config nests, the vision tower has its own
    text = {k: v for k, v in base.items() if k not in ("architectures",)}
    text |= {
        "model_type": "gemma4_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "hidden_size_per_layer_input": 0,
        "num_kv_shared_layers": 0,
        "enable_moe_block": False,
        "use_bidirectional_attention": "vision",
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
    }
    v = facts["vision"]
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": v["hidden_size"],
        "intermediate_size": v["intermediate_size"],
        "num_hidden_layers": v["num_hidden_layers"],
        "num_attention_heads": v["num_attention_heads"],
        "num_key_value_heads": v["num_attention_heads"],
        "head_dim": v["head_dim"],
        "global_head_dim": v["head_dim"],
        "patch_size": v["patch_size"],
        "pooling_kernel_size": v["pooling_kernel_size"],
        "position_embedding_size": 10240,
        "default_output_length": v["default_output_length"],
        "standardize": True,
        "use_clipped_linears": False,
        "rms_norm_eps": 1e-6,
    }
    ids = token_ids or {}
    out = {
        "architectures": [facts["architecture"]],
        "model_type": "gemma4",
        "text_config": text,
        "vision_config": vision,
        "audio_config": None,
        "tie_word_embeddings": facts.get("tie_word_embeddings", True),
        "torch_dtype": facts.get("torch_dtype", "bfloat16"),
        "image_token_id": ids.get("image_token"),
        "boi_token_id": ids.get("boi_token"),
        "eoi_token_id": ids.get("eoi_token"),
        "video_token_id": ids.get("video_token"),
        "audio_token_id": ids.get("audio_token"),
        "boa_token_id": ids.get("boa_token"),
        "eoa_token_index": ids.get("eoa_token"),
    }
    return out | {k: v for k, v in hf.items() if k != "model_type"}


def write_checkpoint(key: str, model: dict[str, Any], out: Path) -> Path:
    dst = out / key
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    token_ids = None
    if (model.get("hf") or {}).get("model_type") == "gemma4":
        token_ids = _gemma4_processor(dst)
    else:
        for name in TOKENIZER_FILES:
            shutil.copy(TOKENIZER_SRC / name, dst / name)
    config = hf_config(key, model, token_ids)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return dst


def _gemma4_processor(dst: Path) -> dict[str, int]:
    """Gemma 4's processor (image, video and audio parts) over the tiny tokenizer with Gemma 4's
    multimodal tokens added; returns their ids for config.json."""
    from transformers import (  # type: ignore[import-not-found, unused-ignore]
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
        PreTrainedTokenizerFast,
    )

    tok = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_SRC), extra_special_tokens=GEMMA4_TOKENS)
    proc = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(),
        tokenizer=tok,
        video_processor=Gemma4VideoProcessor(),
        chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
    )
    proc.save_pretrained(str(dst))
    ids = {name: int(tok.convert_tokens_to_ids(text)) for name, text in GEMMA4_TOKENS.items()}
    ids["video_token"] = int(proc.video_token_id)
    return ids


def cmd_models(args: argparse.Namespace) -> int:
    spec = load_spec()
    out = Path(args.out)
    for key, model in spec["models"].items():
        d = write_checkpoint(key, model, out)
        print(f"{key}: {d}")
    return 0


# --- plans ---------------------------------------------------------------------------------------


def files_of(d: Path) -> list[dict[str, Any]]:
    out = []
    for p in sorted(d.rglob("*")):
        if p.is_file():
            digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out.append({"path": p.relative_to(d).as_posix(), "sha256": digest, "size": p.stat().st_size})
    return out


def capture_layouts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (capture, budget) with its engine_args and gpu_memory_utilization."""
    out = []
    for cap in spec["captures"]:
        for budget in cap.get("budgets") or list(spec["budgets"]):
            b = spec["budgets"][budget]
            engine_args = dict(b.get("engine_args") or {}) | dict(cap.get("engine_args") or {})
            engine_args |= dict((cap.get("by_budget") or {}).get(budget) or {})
            out.append(
                {
                    "id": f"{cap['id']}@{budget}",
                    "capture": cap["id"],
                    "budget": budget,
                    "model": cap["model"],
                    "gpu_memory_utilization": b["gpu_memory_utilization"],
                    "engine_args": engine_args,
                    "serve_for_agreement": bool(cap.get("serve_for_agreement")),
                }
            )
    return out


def model_pins(spec: dict[str, Any], models_dir: Path) -> dict[str, dict[str, Any]]:
    pins = {}
    for key, model in spec["models"].items():
        files = files_of(models_dir / key)
        pins[key] = {
            "source": f"config-only:bench/gpu/captures.yml#{key}",
            "revision": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:40],
            "status": "resolved",
            "files": files,
            "architecture": model["facts"],
            "quantization": model.get("quantization"),
            "notes": "config-only checkpoint for GPU memory captures (vLLM --load-format dummy)",
        }
    return pins


def cmd_plan(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "tools"))
    from llmfleet.pins import Lock, load_lock
    from llmfleet.plan import evaluate_host
    from llmfleet.spec import HardwareProfile

    spec = load_spec()
    base = load_lock(args.lock)
    lock = Lock.model_validate(base.model_dump(by_alias=True) | {"models": model_pins(spec, Path(args.models))})
    ((hw_key, hw_raw),) = spec["hardware"].items()
    hw = HardwareProfile.model_validate(hw_raw)
    entries = []
    for lay in capture_layouts(spec):
        instance = {
            "name": lay["model"].replace(".", "-"),
            "model": lay["model"],
            "gpus": [0],
            "tensor_parallel": 1,
            "pipeline_parallel": 1,
            "port": 8000,
            "max_model_len": spec["max_model_len"],
            "gpu_memory_utilization": lay["gpu_memory_utilization"],
            "engine_args": lay["engine_args"],
        }
        host_vars = {
            "llmfleet_hardware": hw_key,
            "llmfleet_hardware_profiles": {hw_key: hw.model_dump(exclude_none=True)},
            "llmfleet_runtime": spec["runtime"],
            "llmfleet_instances": [instance],
        }
        plan = evaluate_host(lay["id"].replace("@", "-"), host_vars, lock)
        inst = plan["instances"][0]
        entries.append(
            lay
            | {
                "argv": inst["argv"],
                "environment": inst["environment"],
                "model_store": next(a for a in inst["argv"] if a.startswith("/") and a.endswith("-" + lay["model"])),
                "planned": {k: inst["capacity"][k] for k in ("weights", "memory", "kv")},
                "facts": spec["models"][lay["model"]]["facts"],
                "quantization": spec["models"][lay["model"]].get("quantization"),
                "plan": plan if lay["serve_for_agreement"] else None,
            }
        )
    Path(args.out).write_text(json.dumps({"hardware": {hw_key: hw_raw}, "captures": entries}, indent=1) + "\n")
    print(f"{len(entries)} captures planned -> {args.out}")
    return 0


# --- wheel pieces --------------------------------------------------------------------------------


def cmd_pieces(args: argparse.Namespace) -> int:
    """Check every wheel in --wheels against the runtime pin's sha256, tar them with a manifest
    (name, sha256) and cut the tar into pieces of --size MiB under --out."""
    lock = json.loads(Path(args.lock).read_text())
    reqs = {r["filename"]: r for r in lock["runtimes"][args.runtime]["requirements"]}
    wheels = sorted(Path(args.wheels).glob("*.whl"))
    listed = []
    for w in wheels:
        r = reqs.get(w.name)
        if r is None:
            raise SystemExit(f"{w.name}: not a wheel of runtime {args.runtime}")
        digest = hashlib.sha256(w.read_bytes()).hexdigest()
        if digest != r["sha256"]:
            raise SystemExit(f"{w.name}: sha256 {digest} differs from the lock's {r['sha256']}")
        listed.append(f"{r['sha256']}  {w.name}\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("piece-*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        sums = Path(tmp) / "SHA256SUMS"
        sums.write_text("".join(listed))
        tar = Path(tmp) / "wheels.tar"
        with tarfile.open(tar, "w") as t:
            t.add(sums, "SHA256SUMS")
            for w in wheels:
                t.add(w, w.name)
        size = args.size << 20
        with tar.open("rb") as f:
            i = 0
            while chunk := f.read(size):
                (out / f"piece-{i:02d}").write_bytes(chunk)
                i += 1
    print(f"{len(wheels)} wheels checked against {args.runtime}; {i} pieces of at most {args.size} MiB in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_models)
    pl = sub.add_parser("plan")
    pl.add_argument("--models", required=True)
    pl.add_argument("--out", required=True)
    pl.add_argument("--lock", default=str(ROOT / "pins" / "lock.json"))
    pl.set_defaults(func=cmd_plan)
    pc = sub.add_parser("pieces")
    pc.add_argument("--wheels", required=True)
    pc.add_argument("--out", required=True)
    pc.add_argument("--lock", default=str(ROOT / "pins" / "lock.json"))
    pc.add_argument("--runtime", default="vllm-0.26.0-cu130")
    pc.add_argument("--size", type=int, default=61, help="MiB per piece (default 61)")
    pc.set_defaults(func=cmd_pieces)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
