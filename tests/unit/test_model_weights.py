from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.common.config import ConfigError
from services.model.config import ModelConfig, preset
from services.model.engine import ReferenceEngine
from services.model.weights import (WEIGHTS_FILE, WeightsError, expected_shapes, init_tensors, load_model,
                                    save_model)

CFG = preset("tiny")


def test_init_is_deterministic_and_seed_dependent() -> None:
    a, b, c = init_tensors(CFG, 3), init_tensors(CFG, 3), init_tensors(CFG, 4)
    assert list(a) == list(expected_shapes(CFG))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["lm_head.weight"], c["lm_head.weight"])
    assert all(t.dtype == np.float32 for t in a.values())


def test_hf_names_cover_dense_moe_and_shared() -> None:
    names = expected_shapes(CFG)
    assert "model.layers.0.mlp.gate_proj.weight" in names                        # dense layer
    assert "model.layers.1.mlp.gate.weight" in names                             # router
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert names["model.layers.1.self_attn.k_proj.weight"] == (CFG.num_key_value_heads * CFG.head_dim,
                                                               CFG.hidden_size)


def test_save_load_round_trip_gives_same_tokens(tmp_path) -> None:
    save_model(tmp_path, CFG, init_tensors(CFG, 0))
    cfg, _ = load_model(tmp_path)
    assert cfg == CFG
    from services.model.engine import GenerationRequest, prompt_ids
    req = [GenerationRequest("a", prompt_ids("round trip"))]
    assert ReferenceEngine.from_dir(tmp_path).generate(req) == ReferenceEngine.from_preset("tiny", 0).generate(req)


def test_sharded_float16_checkpoint_loads_through_the_same_code(tmp_path) -> None:
    """A checkpoint written by other tooling: HF config keys, two shards, float16."""
    t = {k: v.astype(np.float16) for k, v in init_tensors(CFG, 0).items()}
    names = list(t)
    save_file({n: t[n] for n in names[: len(names) // 2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({n: t[n] for n in names[len(names) // 2:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    hf = CFG.to_hf() | {"transformers_version": "4.46.0", "hidden_act": "silu", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg, w = load_model(tmp_path)
    assert w.embed.dtype == np.float32 and cfg.hidden_size == CFG.hidden_size


@pytest.mark.parametrize("mutate, needle", [
    (lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"), "model.layers.2.mlp.experts.3.up_proj.weight: missing"),
    (lambda t: t.__setitem__("model.norm.weight", np.ones(3, np.float32)), "model.norm.weight: shape (3,)"),
    (lambda t: t.__setitem__("lm_head.weight", t["lm_head.weight"].astype(np.int32)), "lm_head.weight: dtype int32"),
    (lambda t: t.__setitem__("model.layers.9.foo.weight", np.ones(2, np.float32)), "model.layers.9.foo.weight: unexpected"),
    (lambda t: t["model.layers.0.self_attn.q_proj.weight"].__setitem__((0, 0), np.nan), "q_proj.weight: contains NaN"),
])
def test_loader_names_the_bad_tensor(tmp_path, mutate, needle) -> None:
    t = init_tensors(CFG, 0)
    mutate(t)
    save_model(tmp_path, CFG, t)
    with pytest.raises(WeightsError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_model(tmp_path)


def test_bad_config_keys_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelConfig.from_hf(CFG.to_hf() | {"q_lora_rank": 1536})
    with pytest.raises(ConfigError, match="scoring_func"):
        ModelConfig.from_hf(CFG.to_hf() | {"scoring_func": "sigmoid"})
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(CFG.to_hf() | {"hidden_size": "wide"})
    with pytest.raises(ConfigError, match="num_attention_heads"):
        ModelConfig(num_attention_heads=3, num_key_value_heads=2)
    with pytest.raises(ConfigError, match="missing"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CFG.to_hf()))
    with pytest.raises(WeightsError, match="no \\*.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        load_model(tmp_path)


def test_saved_weights_are_readable_by_other_users(tmp_path):
    """Model directories are shared read-only (containers run as another user)."""
    cfg = preset("tiny")
    d = save_model(tmp_path / "m", cfg, init_tensors(cfg, 0))
    assert (d / WEIGHTS_FILE).stat().st_mode & 0o777 == 0o644
