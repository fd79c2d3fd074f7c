"""gRPC edge <-> core types: request validation and delta building (protobuf only, no grpc)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from services.api.xds.v1 import inference_pb2 as pb
from services.model.config import EOS_ID, ModelConfig
from services.model.engine import GenerationRequest, InvalidRequest, prompt_ids, validate_request
from services.model.sampling import InvalidSamplingParams, SamplingParams
from services.router.core import InvalidRequestError

MAX_REQUEST_ID_CHARS = 256
DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


@dataclass(frozen=True, slots=True)
class Parsed:
    request_id: str
    prompt: tuple[int, ...]
    params: SamplingParams
    resume_from: int


@dataclass(frozen=True, slots=True)
class Delta:
    """One step of a request's stream, transport-neutral: tokens from output position
    ``index``, their text (never a split character), and the finish reason on the last."""
    index: int
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str


def exact_float(v: float) -> float:
    """Proto floats are float32; the user wrote a decimal. Take the shortest decimal that maps
    to the same float32 (0.8f -> 0.8, not 0.800000011920929), so a pod run samples exactly as a
    reference run given the same decimal."""
    return float(str(np.float32(v)))


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def parse_generate(msg: pb.GenerateRequest, cfg: ModelConfig) -> Parsed:
    """Raise InvalidRequestError naming what is wrong. Proto3 zero values mean "unset":
    top_p 0 -> 1 (disabled), max_tokens 0 -> the default, no stop ids -> [EOS]."""
    rid = msg.request_id or new_request_id()
    if len(rid) > MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise InvalidRequestError(f"request_id must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    which = msg.WhichOneof("input")
    try:
        if which == "prompt":
            prompt = prompt_ids(msg.prompt)
        elif which == "prompt_token_ids":
            prompt = tuple(int(t) for t in msg.prompt_token_ids.ids)
        else:
            raise InvalidRequest("prompt is empty (set prompt or prompt_token_ids)")
        s = msg.sampling
        stop = tuple(int(t) for t in s.stop_token_ids) or (EOS_ID,)
        bad = next((t for t in stop if t >= cfg.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"stop token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
        params = SamplingParams(temperature=exact_float(s.temperature), top_p=exact_float(s.top_p) or 1.0,
                                top_k=int(s.top_k), seed=int(s.seed) if s.HasField("seed") else None,
                                max_tokens=int(s.max_tokens) or DEFAULT_MAX_TOKENS, stop_token_ids=stop)
        validate_request(cfg, GenerationRequest(rid, prompt, params))
    except (InvalidRequest, InvalidSamplingParams) as exc:
        raise InvalidRequestError(str(exc)) from None
    return Parsed(rid, prompt, params, int(msg.resume_from))


def model_info(cfg: ModelConfig, name: str) -> pb.ModelInfo:
    return pb.ModelInfo(model_name=name, vocab_size=cfg.vocab_size,
                        max_position_embeddings=cfg.max_position_embeddings, bos_token_id=cfg.bos_token_id,
                        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
