"""A tiny, real Llama model built on the control node without torch and without a model hub.

Weights come from a seeded numpy RNG (one stream per tensor, so adding a layer leaves the
others unchanged) and are written as safetensors by hand. The tokenizer is a byte-level BPE
trained with ``tokenizers`` on a corpus generated from a seeded syllable generator. Every file
is byte-identical across rebuilds with the same parameters and the same numpy/tokenizers
versions: JSON is written with sorted keys, nothing carries a timestamp or a path.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..pins import ArchFacts, FilePin
from . import safetensors
from .cache import manifest

BUILDER = "tiny-llama"
ARCHITECTURE = "LlamaForCausalLM"

PAD, BOS, EOS, IM_START, IM_END = "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]  # ids 0..4, in this order
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TinyLlamaSpec(BaseModel):
    """Builder parameters; they are the ``builder`` entry of the model's pin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    vocab_size: Annotated[int, Field(ge=512, le=65536)] = 4096
    hidden_size: Annotated[int, Field(ge=8)] = 128
    intermediate_size: Annotated[int, Field(ge=8)] = 256
    num_hidden_layers: Annotated[int, Field(ge=1, le=128)] = 2
    num_attention_heads: Annotated[int, Field(ge=1)] = 4
    num_key_value_heads: Annotated[int, Field(ge=1)] = 2
    head_dim: Annotated[int, Field(ge=2)] | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: Annotated[int, Field(ge=16)] = 4096
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    corpus_sentences: Annotated[int, Field(ge=1000)] = 40000

    @model_validator(mode="after")
    def _shapes(self) -> TinyLlamaSpec:
        # transformers' LlamaConfig refuses hidden_size % heads != 0 even with an explicit head_dim
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embedding)")
        return self

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def params(self) -> dict[str, Any]:
        """Every parameter, head_dim resolved: what the lock records."""
        return self.model_dump()

    def facts(self) -> ArchFacts:
        return ArchFacts(
            architecture=ARCHITECTURE,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.resolved_head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            torch_dtype=self.dtype,
        )


# --- corpus ------------------------------------------------------------------------------

# Word lists read better as one string each than as 130 one-item lines (hence the SIM905 skips).
_ONSETS = "|b|bl|br|c|ch|cl|cr|d|dr|f|fl|fr|g|gl|gr|h|j|k|l|m|n|p|pl|pr|qu|r|s|sh|sk|sl|sm|sn|sp|st|str|sw|t|th|tr|v|w|wh|y|z".split("|")  # noqa: SIM905
_NUCLEI = "a|e|i|o|u|ai|ea|ee|oo|ou|y|ie|oa|au".split("|")  # noqa: SIM905
_CODAS = "||||n|r|s|t|l|m|nd|ng|st|ck|th|x|rk|nt|sh|ld".split("|")  # noqa: SIM905
_COMMON = (  # noqa: SIM905
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word but "
    "not what all were we when your can said there use an each which she do how their if will up other about out many "
    "then them these so some her would make like him into time has look two more write go see number no way could "
    "people my than first water been call who its now find long down day did get come made may part hello world model "
    "server token stream request answer question tell story short please thank"
).split()


def corpus(seed: int, sentences: int) -> Iterator[str]:
    """Deterministic pseudo-text: Zipf-distributed invented words, English glue words, numbers.

    Uses only ``random.Random.random()``, whose sequence for an integer seed Python keeps stable.
    """
    rng = random.Random(seed)

    def pick(seq: list[str]) -> str:
        return seq[int(rng.random() * len(seq))]

    lexicon = list(_COMMON)
    seen = set(lexicon)
    while len(lexicon) < 3000:
        word = "".join(pick(_ONSETS) + pick(_NUCLEI) + pick(_CODAS) for _ in range(1 + int(rng.random() * 3)))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    # interleave so that common English words and invented words share the head of the Zipf curve
    order = [lexicon[i] for i in sorted(range(len(lexicon)), key=lambda i: (i % 7, i))]
    cumulative = list(np.cumsum([1.0 / (rank + 1) ** 1.07 for rank in range(len(order))]))
    total = cumulative[-1]
    paragraph: list[str] = []
    for _ in range(sentences):
        words = []
        for _ in range(3 + int(rng.random() * 14)):
            r = rng.random()
            if r < 0.03:
                words.append(str(int(rng.random() * 10000)))
            else:
                words.append(order[min(bisect.bisect_left(cumulative, rng.random() * total), len(order) - 1)])
            if rng.random() < 0.07:
                words[-1] += ","
        words[0] = words[0].capitalize()
        paragraph.append(" ".join(words).rstrip(",") + pick([".", ".", ".", "!", "?", ":"]))
        if rng.random() < 0.2:
            yield " ".join(paragraph) + "\n"
            paragraph = []
    if paragraph:
        yield " ".join(paragraph) + "\n"


# --- tokenizer ---------------------------------------------------------------------------


def train_tokenizer(spec: TinyLlamaSpec) -> str:
    """A byte-level BPE tokenizer (``tokenizer.json`` text) with BOS/EOS/PAD and ChatML tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=0,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(spec.seed, spec.corpus_sentences), trainer=trainer)
    if tok.get_vocab_size() != spec.vocab_size:
        raise ValueError(
            f"the corpus gave a vocabulary of {tok.get_vocab_size()}, not {spec.vocab_size}: raise corpus_sentences or lower vocab_size"
        )
    for i, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != i:
            raise AssertionError(f"special token {token} got id {tok.token_to_id(token)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    return str(tok.to_str(pretty=True)) + "\n"


def tokenizer_config(spec: TinyLlamaSpec) -> dict[str, Any]:
    return {
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "bos_token": BOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": spec.max_position_embeddings,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


# --- weights -----------------------------------------------------------------------------


def tensor_shapes(spec: TinyLlamaSpec) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and shapes (untied embeddings)."""
    h, i, hd = spec.hidden_size, spec.intermediate_size, spec.resolved_head_dim
    q, kv = spec.num_attention_heads * hd, spec.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (spec.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (spec.vocab_size, h),
    }
    for n in range(spec.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        }
    return shapes


def weights(spec: TinyLlamaSpec) -> dict[str, npt.NDArray[np.float32]]:
    """float32 weights: norms are ones, everything else N(0, initializer_range) from its own stream."""
    out = {}
    for name, shape in tensor_shapes(spec).items():
        if name.endswith("norm.weight"):
            out[name] = np.ones(shape, dtype=np.float32)
            continue
        stream = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
        rng = np.random.default_rng(np.random.SeedSequence([spec.seed, stream]))
        out[name] = (rng.standard_normal(shape) * spec.initializer_range).astype(np.float32)
    return out


# --- the model folder --------------------------------------------------------------------


def model_config(spec: TinyLlamaSpec) -> dict[str, Any]:
    """config.json; rope and dtype are written both ways so transformers 4.x and 5.x read them."""
    return {
        "architectures": [ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "dtype": spec.dtype,
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "head_dim": spec.resolved_head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": spec.initializer_range,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": spec.num_attention_heads,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads,
        "pad_token_id": SPECIAL_TOKENS.index(PAD),
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": spec.dtype,
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }


def _json(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()


def build(spec: TinyLlamaSpec, out: Path) -> list[FilePin]:
    """Write the model folder ``out`` (created; must not hold other files) and return its manifest."""
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "config.json": _json(model_config(spec)),
        "generation_config.json": _json(
            {
                "bos_token_id": SPECIAL_TOKENS.index(BOS),
                "eos_token_id": [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)],
                "pad_token_id": SPECIAL_TOKENS.index(PAD),
            }
        ),
        "model.safetensors": safetensors.serialize(weights(spec), safetensors.TORCH_DTYPES[spec.dtype], {"format": "pt"}),
        "special_tokens_map.json": _json(
            {
                "additional_special_tokens": [IM_START, IM_END],
                "bos_token": BOS,
                "eos_token": EOS,
                "pad_token": PAD,
            }
        ),
        "tokenizer.json": train_tokenizer(spec).encode(),
        "tokenizer_config.json": _json(tokenizer_config(spec)),
    }
    for name, data in files.items():
        path = out / name
        path.write_bytes(data)
        path.chmod(0o644)  # a service user must read the weights (0600 shows up as FileNotFoundError)
    return manifest(out)
