"""Weights: HF-style tensor names in safetensors files, deterministic random init, validated loading.

Names follow DeepSeek-V3 checkpoints (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``...),
Linear weights stored as HF does, ``[out_features, in_features]``. At load, every Linear weight
is transposed once into a C-contiguous ``[in, out]`` array: all code paths (reference engine and
services) then multiply by the very same array objects, which is part of what makes their
results bitwise equal.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.model.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
_ACCEPTED_DTYPES = (np.float32, np.float16)


class WeightsError(ValueError):
    """A checkpoint does not match its config: names the tensor and what is wrong."""


@dataclass(frozen=True, slots=True)
class FFNWeights:
    """SwiGLU FFN: down(silu(x @ gate) * (x @ up)); arrays are [in, out]."""
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


@dataclass(frozen=True, slots=True)
class AttentionWeights:
    input_norm: np.ndarray
    wq: np.ndarray
    wk: np.ndarray
    wv: np.ndarray
    wo: np.ndarray


@dataclass(frozen=True, slots=True)
class LayerWeights:
    attn: AttentionWeights
    post_norm: np.ndarray
    dense: FFNWeights | None          # set for dense layers
    router: np.ndarray | None         # [H, E] for MoE layers
    experts: tuple[FFNWeights, ...]   # routed experts (MoE layers)
    shared: FFNWeights | None         # shared expert(s) fused (MoE layers with n_shared_experts > 0)


@dataclass(frozen=True, slots=True)
class ModelWeights:
    embed: np.ndarray                 # [V, H]
    layers: tuple[LayerWeights, ...]
    norm: np.ndarray                  # [H]
    lm_head: np.ndarray               # [H, V]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a checkpoint for ``cfg`` with its HF shape, in a fixed order."""
    H, V, D = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}

    def ffn(prefix: str, inter: int) -> None:
        shapes[f"{prefix}.gate_proj.weight"] = (inter, H)
        shapes[f"{prefix}.up_proj.weight"] = (inter, H)
        shapes[f"{prefix}.down_proj.weight"] = (H, inter)

    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (H,)
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, H)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, H)
        shapes[f"{p}.self_attn.o_proj.weight"] = (H, q_out)
        shapes[f"{p}.post_attention_layernorm.weight"] = (H,)
        if cfg.is_moe_layer(i):
            shapes[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, H)
            for e in range(cfg.n_routed_experts):
                ffn(f"{p}.mlp.experts.{e}", cfg.moe_intermediate_size)
            if cfg.n_shared_experts:
                ffn(f"{p}.mlp.shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
        else:
            ffn(f"{p}.mlp", cfg.intermediate_size)
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    return shapes


def init_tensors(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Deterministic random weights (same seed, same bytes, on every machine)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in expected_shapes(cfg).items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            t = rng.standard_normal(shape)
        else:
            fan_in = shape[-1]
            # Router logits need spread, or every token picks the same experts.
            scale = 4.0 if name.endswith("mlp.gate.weight") else 1.0
            t = rng.standard_normal(shape) * (scale / np.sqrt(fan_in))
        out[name] = t.astype(np.float32)
    return out


def save_model(model_dir: str | Path, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / WEIGHTS_FILE), metadata={"format": "np"})
    # safetensors creates the file 0600; weights are shared read-only (other users, containers).
    os.chmod(d / WEIGHTS_FILE, 0o644)
    (d / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2, sort_keys=True) + "\n")
    return d


def read_tensors(model_dir: str | Path) -> dict[str, np.ndarray]:
    """All tensors of ``*.safetensors`` files in the directory (sharded checkpoints too)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir}: no *.safetensors file")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="np") as st:
                for name in st.keys():
                    if name in tensors:
                        raise WeightsError(f"{name}: appears in more than one file ({f.name})")
                    try:
                        tensors[name] = st.get_tensor(name)
                    except (TypeError, ValueError) as exc:  # e.g. bf16, which numpy cannot hold
                        raise WeightsError(f"{name}: unsupported dtype in {f.name} ({exc})") from exc
        except WeightsError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt files
            raise WeightsError(f"{f}: not a readable safetensors file ({exc})") from exc
    return tensors


def validate(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, shapes and dtypes; return float32 tensors. Errors name the bad tensor."""
    want = expected_shapes(cfg)
    missing = [n for n in want if n not in tensors]
    if missing:
        raise WeightsError(f"{missing[0]}: missing from checkpoint ({len(missing)} missing in all)")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise WeightsError(f"{extra[0]}: unexpected tensor for this config ({len(extra)} unexpected)")
    checked = {}
    for name, shape in want.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise WeightsError(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        if t.dtype not in _ACCEPTED_DTYPES:
            raise WeightsError(f"{name}: dtype {t.dtype}, expected float32 or float16")
        if not np.all(np.isfinite(t)):
            raise WeightsError(f"{name}: contains NaN or infinity")
        checked[name] = t.astype(np.float32, copy=False)
    return checked


def build_weights(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> ModelWeights:
    t = validate(cfg, tensors)

    def lin(name: str) -> np.ndarray:  # HF [out, in] -> contiguous [in, out]
        return np.ascontiguousarray(t[name].T)

    def ffn(prefix: str) -> FFNWeights:
        return FFNWeights(lin(f"{prefix}.gate_proj.weight"), lin(f"{prefix}.up_proj.weight"),
                          lin(f"{prefix}.down_proj.weight"))

    layers = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        attn = AttentionWeights(
            t[f"{p}.input_layernorm.weight"], lin(f"{p}.self_attn.q_proj.weight"),
            lin(f"{p}.self_attn.k_proj.weight"), lin(f"{p}.self_attn.v_proj.weight"),
            lin(f"{p}.self_attn.o_proj.weight"))
        if cfg.is_moe_layer(i):
            layers.append(LayerWeights(
                attn, t[f"{p}.post_attention_layernorm.weight"], None, lin(f"{p}.mlp.gate.weight"),
                tuple(ffn(f"{p}.mlp.experts.{e}") for e in range(cfg.n_routed_experts)),
                ffn(f"{p}.mlp.shared_experts") if cfg.n_shared_experts else None))
        else:
            layers.append(LayerWeights(attn, t[f"{p}.post_attention_layernorm.weight"],
                                       ffn(f"{p}.mlp"), None, (), None))
    return ModelWeights(t["model.embed_tokens.weight"], tuple(layers), t["model.norm.weight"],
                        lin("lm_head.weight"))


def load_model(model_dir: str | Path) -> tuple[ModelConfig, ModelWeights]:
    cfg = ModelConfig.load(model_dir)
    return cfg, build_weights(cfg, read_tensors(model_dir))
