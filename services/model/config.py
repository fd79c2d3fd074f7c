"""Model configuration: an HF-style ``config.json`` with DeepSeek-V3 / Qwen2-MoE field names.

``ModelConfig.from_hf(dict)`` accepts the fields we model plus a short list of HF metadata keys
that do not change the computation (``architectures``, ``torch_dtype``...). Any other key is a
``ConfigError`` naming it, so a checkpoint whose architecture we would silently compute wrong is
refused rather than loaded.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.config import ConfigError, from_mapping, to_mapping

# Byte-level tokenizer: ids 0..255 are bytes, then the specials.
BYTE_VOCAB = 256
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB_SIZE = 259

# HF keys that carry no information for our computation, with the values we can honour.
_IGNORED_HF_KEYS: dict[str, Any] = {
    "architectures": None, "torch_dtype": None, "transformers_version": None,
    "_name_or_path": None, "initializer_range": None, "use_cache": None,
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
    "topk_method": "greedy", "scoring_func": "softmax", "attention_dropout": 0.0,
}


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str = "xds_moe"
    vocab_size: int = VOCAB_SIZE
    hidden_size: int = 64
    intermediate_size: int = 128          # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = 32       # one routed expert; shared expert = this x n_shared_experts
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 512
    bos_token_id: int = BOS_ID
    eos_token_id: int = EOS_ID
    pad_token_id: int = PAD_ID

    def __post_init__(self) -> None:
        checks = [
            (self.num_attention_heads % self.num_key_value_heads == 0, "num_attention_heads",
             "must be a multiple of num_key_value_heads"),
            (self.head_dim % 2 == 0, "head_dim", "must be even (rotary embeddings)"),
            (0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "must be in 1..n_routed_experts"),
            (0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
             "must be in 0..num_hidden_layers"),
            (self.vocab_size >= VOCAB_SIZE, "vocab_size", f"must be >= {VOCAB_SIZE} (byte tokenizer)"),
            (self.max_position_embeddings > 1, "max_position_embeddings", "must be > 1"),
        ]
        for ok, key, why in checks:
            if not ok:
                raise ConfigError(f"ModelConfig.{key}", why)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_hf(cls, data: dict[str, Any], where: str = "config.json") -> ModelConfig:
        ours = {f.name for f in dataclasses.fields(cls)}
        kept: dict[str, Any] = {}
        for key, value in data.items():
            if key in ours:
                kept[key] = value
            elif key in _IGNORED_HF_KEYS:
                want = _IGNORED_HF_KEYS[key]
                if want is not None and value != want:
                    raise ConfigError(f"{where}.{key}", f"only {want!r} is supported, got {value!r}")
            else:
                raise ConfigError(f"{where}.{key}", "unknown or unsupported model setting")
        return from_mapping(cls, kept, path=where)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(str(path), "missing: not a model directory") from exc
        except json.JSONDecodeError as exc:
            raise ConfigError(str(path), f"not valid JSON: {exc}") from exc
        return cls.from_hf(data, where=str(path))

    def to_hf(self) -> dict[str, Any]:
        d = to_mapping(self)
        d["architectures"] = ["XdsMoeForCausalLM"]
        d["torch_dtype"] = "float32"
        return d


PRESETS: dict[str, ModelConfig] = {
    # Unit/integration tests: milliseconds per step.
    "tiny": ModelConfig(),
    # Benchmarks: compute-dominated on a CPU.
    "small": ModelConfig(
        hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
        num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
        first_k_dense_replace=1, max_position_embeddings=2048,
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError("preset", f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None
