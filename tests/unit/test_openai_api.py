"""The OpenAI request/response mapping (pure): parsing, the chat template, stop strings held
back across tokens, error statuses and the response shapes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.status import Code
from services.model.config import BOS_ID, EOS_ID, preset
from services.model.tokenizer import encode
from services.router import api
from services.router import openai_api as oa

CFG = preset("tiny")
MODEL = "tiny-seed0"


def parse(body: dict, kind: oa.Kind = "completion", rid: str = "r1") -> oa.OpenAIRequest:
    return oa.parse_request(kind, {"model": MODEL, **body}, CFG, MODEL, rid)


def test_completion_prompt_as_text_or_token_ids() -> None:
    r = parse({"prompt": "Hi", "max_tokens": 5, "temperature": 0, "seed": 3, "top_p": 0.5})
    assert r.parsed == api.Parsed("r1", (BOS_ID, 72, 105), r.parsed.params, 0)
    p = r.parsed.params
    assert (p.temperature, p.top_p, p.seed, p.max_tokens, p.stop_token_ids) == (0.0, 0.5, 3, 5, (EOS_ID,))
    assert parse({"prompt": [BOS_ID, 1, 2]}).parsed.prompt == (BOS_ID, 1, 2)
    assert parse({"prompt": ["Hi"]}).parsed.prompt == (BOS_ID, 72, 105)   # a batch of one
    assert parse({"prompt": "x"}).parsed.params.max_tokens == oa.COMPLETION_DEFAULT_MAX_TOKENS
    assert parse({"prompt": "x"}).parsed.params.temperature == 1.0        # OpenAI's default


def test_chat_template_and_max_completion_tokens() -> None:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}]
    r = parse({"messages": msgs, "max_completion_tokens": 7}, "chat")
    assert r.parsed.prompt == tuple(encode("<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"))
    assert r.parsed.params.max_tokens == 7
    r = parse({"messages": [{"role": "user", "content": "x"}]}, "chat")
    assert r.parsed.params.max_tokens == CFG.max_position_embeddings - len(r.parsed.prompt)


@pytest.mark.parametrize("body, param, match", [
    ({"prompt": "a", "n": 2}, "n", "n > 1"),
    ({"prompt": ["a", "b"]}, "prompt", "batch of 2"),
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": []}, "prompt", "token ids"),
    ({"prompt": [1, "x"]}, "prompt", "token ids"),
    ({"prompt": [100000]}, None, "outside the vocabulary"),
    ({"prompt": "a", "max_tokens": 0}, None, "max_tokens must be >= 1"),
    ({"prompt": "a", "max_tokens": 10_000}, None, "exceeds the model's limit"),
    ({"prompt": "a", "max_tokens": "5"}, "max_tokens", "integer"),
    ({"prompt": "a", "temperature": -1}, None, "temperature"),
    ({"prompt": "a", "temperature": True}, "temperature", "number"),
    ({"prompt": "a", "top_p": 0}, None, "top_p"),
    ({"prompt": "a", "seed": 1.5}, "seed", "integer"),
    ({"prompt": "a", "stop": ""}, "stop", "non-empty"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": "a", "logprobs": 3}, "logprobs", "not supported"),
    ({"prompt": "a", "echo": True}, "echo", "not supported"),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate", "unknown field"),
    ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
    ({}, "prompt", "prompt is required"),
])
def test_bad_completion_requests_are_400_naming_the_problem(body: dict, param: str | None, match: str) -> None:
    with pytest.raises(oa.ApiError, match=match) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, match", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "unknown field"),
])
def test_bad_chat_requests_are_400(body: dict, match: str) -> None:
    with pytest.raises(oa.ApiError, match=match) as e:
        parse(body, "chat")
    assert e.value.status == 400


def test_model_is_required_and_an_unknown_model_is_404() -> None:
    with pytest.raises(oa.ApiError, match="model is required") as e:
        oa.parse_request("completion", {"prompt": "a"}, CFG, MODEL, "r")
    assert e.value.status == 400
    with pytest.raises(oa.ApiError, match="does not exist") as e:
        oa.parse_request("completion", {"model": "gpt-4", "prompt": "a"}, CFG, MODEL, "r")
    assert (e.value.status, e.value.code) == (404, "model_not_found")
    with pytest.raises(oa.ApiError, match="JSON object"):
        oa.parse_request("completion", [1, 2], CFG, MODEL, "r")


def test_router_codes_map_to_openai_statuses() -> None:
    for code, status in [(Code.INVALID_ARGUMENT, 400), (Code.NOT_FOUND, 404), (Code.RESOURCE_EXHAUSTED, 429),
                         (Code.UNAVAILABLE, 503), (Code.DEADLINE_EXCEEDED, 504), (Code.INTERNAL, 500)]:
        err = oa.ApiError.from_code(code, "why")
        assert err.status == status and err.body()["error"]["message"] == "why"
        assert err.body()["error"]["code"] == code.name.lower()


def test_request_id_rule_is_grpcs() -> None:
    assert oa.check_request_id("abc-1") == "abc-1"
    for bad in ("", "x" * (api.MAX_REQUEST_ID_CHARS + 1), "a\nb"):
        with pytest.raises(oa.ApiError):
            oa.check_request_id(bad)


def test_stop_string_spanning_feeds_is_held_back_and_cut() -> None:
    m = oa.StopMatcher(("END",))
    assert m.feed("abcE") == ("abc", False)      # "E" may start "END": held
    assert m.feed("N") == ("", False)
    assert m.feed("Dxyz") == ("", True)          # completed: nothing of it, nothing after it
    assert m.feed("more") == ("", True)
    m = oa.StopMatcher(("END",))
    assert m.feed("aEN") == ("a", False)
    assert m.feed("x") == ("ENx", False)         # not a stop after all: released
    assert m.feed("E") == ("", False) and m.flush() == "E"


@given(st.text(alphabet="abE ND", max_size=30), st.lists(st.integers(1, 4), max_size=30),
       st.sampled_from([("END",), ("N",), ("EN", "D "), ("abE",)]))
def test_stop_matcher_equals_cutting_the_whole_text(text: str, cuts: list[int], stops: tuple[str, ...]) -> None:
    """Whatever the split into pieces, the output is the text up to the first stop string."""
    m, out, i = oa.StopMatcher(stops), [], 0
    for c in [*cuts, len(text)]:
        piece, stopped = m.feed(text[i:i + c])
        out.append(piece)
        i += c
        if stopped:
            break
    if not m.stopped:
        out.append(m.flush())
    first = min((j for j in (text.find(s) for s in stops) if j >= 0), default=None)
    assert "".join(out) == (text if first is None else text[:first])
    assert m.stopped == (first is not None)


def test_text_stream_cuts_at_the_token_that_completes_the_stop() -> None:
    ids = encode("héllo wörld", add_bos=False) + [EOS_ID]
    ts = oa.TextStream(("o w",))
    # Deltas of several tokens each, as a streamer that fell behind sends them.
    out = [ts.feed(api.Delta(0, tuple(ids[:3]), "", "")), ts.feed(api.Delta(3, tuple(ids[3:9]), "", ""))]
    assert "".join(t for t, _ in out) == "héll" and ts.stopped
    assert ts.token_ids == ids[:len("héllo w".encode())]     # up to the "w" that completed "o w"
    ts = oa.TextStream(())
    text, got = ts.feed(api.Delta(0, tuple(ids), "", "stop"))
    assert text == "héllo wörld" and got == tuple(ids)


def test_response_and_chunk_shapes() -> None:
    c = parse({"prompt": [BOS_ID, 1], "return_token_ids": True})
    body = oa.response(c, "hi", (104, 105), "length", 5)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-r1"
    assert body["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "length", "text": "hi",
                                "token_ids": [104, 105]}]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    ch = parse({"messages": [{"role": "user", "content": "x"}], "stream": True,
                "stream_options": {"include_usage": True}}, "chat")
    first = oa.chunk(ch, "a", (97,), None, 5, first=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "a"}
    assert oa.chunk(ch, "b", (98,), "stop", 5)["choices"][0] == {"index": 0, "logprobs": None, "finish_reason": "stop",
                                                                "delta": {"content": "b"}}
    last = oa.usage_chunk(ch, 2, 5)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 2
    assert oa.response(ch, "ab", (97, 98), "stop", 5)["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
