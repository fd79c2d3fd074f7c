from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from services.model import tokenizer
from services.model.config import BOS_ID, EOS_ID
from services.model.engine import (GenerationRequest, InvalidRequest, ReferenceEngine, prompt_ids,
                                   validate_request)
from services.model.sampling import InvalidSamplingParams, SamplingParams, sample


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_any_text_round_trips(text: str) -> None:
    ids = tokenizer.encode(text)
    assert ids[0] == BOS_ID and all(0 <= i < 256 for i in ids[1:])
    assert tokenizer.decode(ids + [EOS_ID]) == text


@settings(max_examples=100, deadline=None)
@given(st.text(), st.integers(1, 7))
def test_incremental_decoder_never_splits_characters(text: str, step: int) -> None:
    ids = tokenizer.encode(text, add_bos=False)
    dec = tokenizer.IncrementalDecoder()
    out = "".join(dec.feed(ids[i:i + step]) for i in range(0, len(ids), step)) + dec.flush()
    assert out == text


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(259).astype(np.float32) * 3


def test_greedy_and_degenerate_sampling_agree() -> None:
    lg = _logits()
    g = sample(lg, SamplingParams(), "r", 5)
    assert g == int(np.argmax(lg))
    assert sample(lg, SamplingParams(temperature=1.0, top_k=1, seed=1), "r", 5) == g
    assert sample(lg, SamplingParams(temperature=1.0, top_p=1e-6, seed=1), "r", 5) == g


def test_draw_depends_only_on_seed_and_position() -> None:
    lg = _logits(1)
    p = SamplingParams(temperature=1.0, seed=42)
    draws = [sample(lg, p, "req-a", pos) for pos in range(40)]
    assert draws == [sample(lg, p, "req-b", pos) for pos in range(40)]   # seed given: id irrelevant
    assert len(set(draws)) > 5                                             # it is really random
    q = SamplingParams(temperature=1.0)
    assert [sample(lg, q, "req-a", pos) for pos in range(40)] == [sample(lg, q, "req-a", pos) for pos in range(40)]
    assert [sample(lg, q, "req-a", pos) for pos in range(40)] != [sample(lg, q, "req-b", pos) for pos in range(40)]


def test_top_k_and_top_p_restrict_the_support() -> None:
    lg = _logits(2)
    top5 = set(np.argsort(-lg)[:5].tolist())
    assert {sample(lg, SamplingParams(temperature=2.0, top_k=5, seed=s), "r", 0) for s in range(200)} <= top5
    probs = np.exp(lg - lg.max()); probs /= probs.sum()
    order = np.argsort(-probs); nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1].tolist())
    assert {sample(lg, SamplingParams(temperature=1.0, top_p=0.5, seed=s), "r", 0) for s in range(200)} <= nucleus


@pytest.mark.parametrize("kw, needle", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"seed": -1}, "seed"),
])
def test_invalid_sampling_params_are_named(kw, needle) -> None:
    with pytest.raises(InvalidSamplingParams, match=needle):
        SamplingParams(**kw)


def test_invalid_requests_are_named() -> None:
    cfg = ReferenceEngine.from_preset("tiny").cfg
    with pytest.raises(InvalidRequest, match="empty"):
        prompt_ids("")
    with pytest.raises(InvalidRequest, match="exceeds the model's limit of 512"):
        validate_request(cfg, GenerationRequest("r", (BOS_ID,) * 500, SamplingParams(max_tokens=13)))
    with pytest.raises(InvalidRequest, match="token id 999"):
        validate_request(cfg, GenerationRequest("r", (BOS_ID, 999), SamplingParams()))


def test_stop_tokens_end_the_stream() -> None:
    e = ReferenceEngine.from_preset("tiny")
    req = GenerationRequest("r", prompt_ids("stop me"), SamplingParams(max_tokens=20, stop_token_ids=()))
    free = e.generate([req])[0].token_ids
    stop = free[5]
    cut = e.generate([GenerationRequest("r", req.prompt_ids, SamplingParams(max_tokens=20, stop_token_ids=(stop,)))])[0]
    assert cut.finish_reason == "stop" and cut.token_ids == free[: free.index(stop) + 1]
    assert e.generate([req])[0].finish_reason == "length"
