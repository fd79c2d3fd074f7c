"""Router gRPC edge parsing: proto3 zero values, float32 decimals, clear refusals."""

from __future__ import annotations

import pytest

from services.api.xds.v1 import inference_pb2 as pb
from services.model.config import EOS_ID, ModelConfig
from services.model.engine import prompt_ids
from services.model.sampling import SamplingParams
from services.router.api import parse_generate
from services.router.core import InvalidRequestError

CFG = ModelConfig()


def test_unset_fields_mean_defaults_and_float32_keeps_the_decimal_the_user_wrote() -> None:
    p = parse_generate(pb.GenerateRequest(prompt="hi"), CFG)
    assert p.request_id.startswith("req-") and p.prompt == prompt_ids("hi") and p.resume_from == 0
    assert p.params == SamplingParams(max_tokens=SamplingParams().max_tokens, stop_token_ids=(EOS_ID,))
    s = pb.SamplingParams(temperature=0.8, top_p=0.95, top_k=5, seed=7, max_tokens=3, stop_token_ids=[10])
    p = parse_generate(pb.GenerateRequest(request_id="a", prompt_token_ids=pb.TokenIds(ids=[256, 1]),
                                          sampling=s, resume_from=2), CFG)
    assert p.params == SamplingParams(0.8, 0.95, 5, 7, 3, (10,)) and p.prompt == (256, 1) and p.resume_from == 2


@pytest.mark.parametrize("req, words", [
    (pb.GenerateRequest(), "prompt is empty"),
    (pb.GenerateRequest(prompt=""), "prompt is empty"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds()), "prompt is empty"),
    (pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 4000])), "token id 4000 is outside"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(max_tokens=600)), "exceeds the model's limit"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-2)), "top_k"),
    (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(stop_token_ids=[999])), "stop token id 999"),
    (pb.GenerateRequest(prompt="x", request_id="a\nb"), "request_id"),
    (pb.GenerateRequest(prompt="x", request_id="a" * 300), "request_id"),
])
def test_bad_requests_are_refused_with_a_message_naming_the_problem(req, words) -> None:
    with pytest.raises(InvalidRequestError, match=words) as ei:
        parse_generate(req, CFG)
    assert ei.value.code == "INVALID_ARGUMENT"
