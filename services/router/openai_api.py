"""OpenAI-compatible request/response mapping: pure, no sockets (the server is ``http.py``).

Parses a ``/v1/completions`` or ``/v1/chat/completions`` JSON body into the router's
transport-neutral ``api.Parsed`` (plus what only HTTP needs: stop strings, streaming options),
builds OpenAI's response, chunk and error objects, and holds text back at stop strings.

Choices, written down (see also the README):

- ``model`` is required and must be the served model's name (``GET /v1/models``); else 404.
- ``prompt``: a string, a list of token ids, or a one-element list of either (a batch of
  several is a 400, like ``n`` > 1). A string gets BOS in front, as in gRPC; token ids are
  taken as they are (so a client can send exactly the reference engine's prompt ids).
- ``messages`` use this chat template for the byte tokenizer (content: a string or a list of
  ``{"type": "text"}`` parts; roles system, developer, user, assistant)::

      BOS "<|system|>\\n" content "\\n" ... "<|user|>\\n" content "\\n" "<|assistant|>\\n"

- Sampling: ``temperature`` (default 1.0, as OpenAI's), ``top_p``, ``seed``, ``top_k`` (a
  vLLM extension); ``max_tokens`` (completions: default 16, as OpenAI's) or
  ``max_completion_tokens`` (chat: default the rest of the context). Generation stops at EOS.
- ``stop``: a string or up to 4 strings, matched on the text (even across tokens); the text
  ends before the stop string and ``finish_reason`` is ``"stop"``.
- ``return_token_ids: true`` (vLLM's extension) adds ``token_ids`` to each choice (chunk).
- Fields this server does not implement (logprobs, echo, penalties, tools, ...) are a 400
  naming the field when set to anything but their neutral value; unknown fields too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

from services.common.status import Code
from services.model.config import EOS_ID, ModelConfig
from services.model.engine import GenerationRequest, InvalidRequest, validate_request
from services.model.sampling import InvalidSamplingParams, SamplingParams
from services.model.tokenizer import IncrementalDecoder, encode
from services.router import api

Kind = Literal["completion", "chat"]
MAX_STOP_STRINGS = 4
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
COMPLETION_DEFAULT_MAX_TOKENS = 16

# The pod's status codes as HTTP statuses (OpenAI's where it has one).
HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400, Code.OUT_OF_RANGE: 400, Code.FAILED_PRECONDITION: 400,
    Code.NOT_FOUND: 404, Code.ALREADY_EXISTS: 409, Code.RESOURCE_EXHAUSTED: 429,
    Code.CANCELLED: 499, Code.UNIMPLEMENTED: 501, Code.UNAVAILABLE: 503, Code.DEADLINE_EXCEEDED: 504,
}
ERROR_TYPE = {400: "invalid_request_error", 404: "not_found_error", 409: "invalid_request_error",
              429: "rate_limit_error", 499: "cancelled", 501: "not_implemented",
              503: "service_unavailable", 504: "timeout"}

# name -> neutral values: accepted (and ignored) only with one of these values.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "best_of": (1, None), "logprobs": (None, False), "top_logprobs": (None, 0),
    "echo": (False, None), "suffix": (None, ""), "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None), "logit_bias": (None, {}), "user": None, "service_tier": None,
    "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": None,
    "response_format": (None, {"type": "text"}), "store": (None, False), "metadata": None,
}
COMMON_FIELDS = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed",
                 "stop", "return_token_ids"}
FIELDS: dict[Kind, set[str]] = {"completion": COMMON_FIELDS | {"prompt"},
                                "chat": COMMON_FIELDS | {"messages", "max_completion_tokens"}}


class ApiError(Exception):
    """An OpenAI error: HTTP ``status`` and the ``error`` object's fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_code(cls, code: Code, message: str) -> ApiError:
        return cls(HTTP_STATUS.get(Code(code), 500), message, code=Code(code).name.lower())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPE.get(self.status, "internal_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_argument")


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    kind: Kind
    parsed: api.Parsed
    model: str
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]
    return_token_ids: bool


def check_request_id(rid: str) -> str:
    """The gRPC edge's rule for a client's idempotency key (``X-Request-Id`` here)."""
    if not rid or len(rid) > api.MAX_REQUEST_ID_CHARS or not rid.isprintable():
        raise bad(f"X-Request-Id must be 1 to {api.MAX_REQUEST_ID_CHARS} printable characters")
    return rid


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise bad(f"{key} must be a number, got {type(v).__name__}", key)
    return float(v)


def _int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is not None and not _is_int(v):
        raise bad(f"{key} must be an integer, got {type(v).__name__}", key)
    return v


def _token_ids(v: Any) -> tuple[int, ...] | None:
    return tuple(v) if isinstance(v, list) and v and all(_is_int(t) for t in v) else None


def completion_prompt(prompt: Any) -> tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]   # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt is empty", "prompt")
        return tuple(encode(prompt))
    ids = _token_ids(prompt)
    if ids is not None:
        return ids
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad(f"a batch of {len(prompt)} prompts is not supported: send one prompt per request", "prompt")
    raise bad("prompt must be a string or a non-empty list of token ids", "prompt")


def _content(msg: dict[str, Any], i: int) -> str:
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def chat_template(messages: Any) -> str:
    """The documented template (module doc): one ``<|role|>`` block per message, then the
    assistant's header, where generation starts."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise bad(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}", f"messages[{i}].role")
        parts.append(f"<|{CHAT_ROLES[m['role']]}|>\n{_content(m, i)}\n")
    return "".join(parts) + "<|assistant|>\n"


def _stops(v: Any) -> tuple[str, ...]:
    stops = (v,) if isinstance(v, str) else tuple(v) if isinstance(v, list) else None if v is not None else ()
    if stops is None or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def parse_request(kind: Kind, body: Any, cfg: ModelConfig, model_name: str, request_id: str) -> OpenAIRequest:
    """Raise ``ApiError`` (400, or 404 for another model) naming what is wrong."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key, v in body.items():
        if key in NEUTRAL:
            if NEUTRAL[key] is not None and v not in NEUTRAL[key]:
                what = "n > 1" if key == "n" else f"{key}={v!r}"
                raise bad(f"{what} is not supported by this server", key)
        elif key not in FIELDS[kind]:
            raise bad(f"unknown field {key!r}", key)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model is required (see GET /v1/models)", "model")
    if model != model_name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    stream = body.get("stream") or False
    opts = body.get("stream_options")
    if not isinstance(stream, bool) or not (opts is None or isinstance(opts, dict) and set(opts) <= {"include_usage"}):
        raise bad("stream must be a boolean and stream_options {\"include_usage\": bool}", "stream")
    if opts is not None and not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if kind == "completion":
        if "prompt" not in body:
            raise bad("prompt is required", "prompt")
        prompt = completion_prompt(body["prompt"])
        max_tokens = _int(body, "max_tokens")
        if max_tokens is None:
            max_tokens = COMPLETION_DEFAULT_MAX_TOKENS
    else:
        prompt = tuple(encode(chat_template(body.get("messages"))))
        max_tokens = _int(body, "max_completion_tokens")
        if max_tokens is None:
            max_tokens = _int(body, "max_tokens")
        if max_tokens is None:
            max_tokens = max(cfg.max_position_embeddings - len(prompt), 1)
    try:
        params = SamplingParams(temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                                top_k=_int(body, "top_k") or 0, seed=_int(body, "seed"), max_tokens=max_tokens,
                                stop_token_ids=(EOS_ID,))
        validate_request(cfg, GenerationRequest(request_id, prompt, params))
    except (InvalidRequest, InvalidSamplingParams) as exc:
        raise bad(str(exc)) from None
    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool):
        raise bad("return_token_ids must be a boolean", "return_token_ids")
    return OpenAIRequest(kind, api.Parsed(request_id, prompt, params, 0), model, stream,
                         bool(opts and opts.get("include_usage")), _stops(body.get("stop")), rti)


class StopMatcher:
    """Text in, text out, holding back what could still be the start of a stop string, so
    the output never contains (a part of) a stop string. ``feed`` returns the text safe to
    emit and whether a stop string completed (then the text ends before it)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return buf[:min(hits)], True
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(buf) + 1)) if buf.endswith(s[:k])),
                   default=0)
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        """At the end of the stream: what was held back was no stop string after all."""
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """The router's deltas -> the text a client may see and the tokens it covers: decoded one
    token at a time (``api.Delta.text`` may cover several), so a stop string is cut at the
    very token that completes it and usage counts the tokens up to there."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._dec = IncrementalDecoder()
        self._stop = StopMatcher(stops)
        self.token_ids: list[int] = []

    @property
    def stopped(self) -> bool:
        return self._stop.stopped

    def feed(self, delta: api.Delta) -> tuple[str, tuple[int, ...]]:
        """Text to emit and the token ids it stands for; after a stop string, nothing."""
        out: list[str] = []
        start = len(self.token_ids)
        for t in delta.token_ids:
            if self.stopped:
                break
            self.token_ids.append(t)
            out.append(self._stop.feed(self._dec.feed((t,)))[0])
        if delta.finish_reason and not self.stopped:
            out.append(self._stop.feed(self._dec.flush())[0])
            if not self.stopped:
                out.append(self._stop.flush())
        return "".join(out), tuple(self.token_ids[start:])


def finish_reason(router_reason: str, stopped: bool) -> str:
    return "stop" if stopped else router_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _base(req: OpenAIRequest, chunk: bool, created: int) -> dict[str, Any]:
    prefix, obj = ("cmpl", "text_completion") if req.kind == "completion" else \
        ("chatcmpl", "chat.completion.chunk" if chunk else "chat.completion")
    return {"id": f"{prefix}-{req.parsed.request_id}", "object": obj, "created": created, "model": req.model}


def response(req: OpenAIRequest, text: str, token_ids: tuple[int, ...], reason: str, created: int) -> dict[str, Any]:
    """The whole answer of a ``stream: false`` request."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
    if req.kind == "completion":
        choice["text"] = text
    else:
        choice["message"] = {"role": "assistant", "content": text}
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    return {**_base(req, False, created), "choices": [choice],
            "usage": usage(len(req.parsed.prompt), len(token_ids))}


def chunk(req: OpenAIRequest, text: str, token_ids: tuple[int, ...], reason: str | None, created: int, *,
          first: bool = False) -> dict[str, Any]:
    """One SSE chunk with one choice (``reason`` on the last one only)."""
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
    if req.kind == "completion":
        choice["text"] = text
    else:
        choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
    if req.return_token_ids:
        choice["token_ids"] = list(token_ids)
    out = {**_base(req, True, created), "choices": [choice]}
    if req.include_usage:
        out["usage"] = None
    return out


def usage_chunk(req: OpenAIRequest, completion_tokens: int, created: int) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {**_base(req, True, created), "choices": [], "usage": usage(len(req.parsed.prompt), completion_tokens)}


def models(model_name: str, cfg: ModelConfig, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                        "owned_by": "xdeepserve", "max_model_len": cfg.max_position_embeddings}]}


def now_s() -> int:
    return int(time.time())
