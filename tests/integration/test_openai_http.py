"""The routers' OpenAI-compatible HTTP API, driven by the official ``openai`` client (sync and
async, streaming and not, completions and chat) and by ``curl -N``, against a real pod: tokens
equal the reference engine's; errors are OpenAI's objects with the right status; a stop
string that spans tokens cuts the text; a client that disconnects cancels its request.

The 429/503/504 mapping of the router's refusals is checked over real HTTP with a stand-in
router (the pod cannot be made to refuse that way cheaply); everything else is the real pod.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import pytest

from services.common.status import Code
from services.model.engine import GenerationRequest, ReferenceEngine
from services.model.sampling import SamplingParams
from services.model.tokenizer import decode, encode
from services.pod.spec import services
from services.router import api
from services.router.core import RouterError
from services.router.http import HttpFront
from services.router.openai_api import chat_template
from tests.loads import Loads
from tests.pods import TestPod

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pod() -> Iterator[TestPod]:
    with TestPod.running("oai", {"heartbeat": {"interval_s": 0.1, "suspect_after_s": 1.0, "dead_after_s": 3.0}}) as p:
        yield p


@pytest.fixture(scope="module")
def reference(pod: TestPod) -> ReferenceEngine:
    return ReferenceEngine.from_dir(pod.model_dir)


@pytest.fixture(scope="module")
def model(pod: TestPod) -> str:
    return Path(pod.model_dir).name   # the router serves the model under its directory's name


def ref(reference: ReferenceEngine, prompt: tuple[int, ...], **kw) -> tuple[int, ...]:
    return reference.generate([GenerationRequest("ref", prompt, SamplingParams(**kw))])[0].token_ids


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


SAMPLING = [{"temperature": 0.0}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}]


def test_ready_info_lists_one_http_url_per_router_and_health_is_ok(pod: TestPod, model: str) -> None:
    urls = pod.ready_info()["http"]
    assert len(urls) == pod.spec.routers and all(u.startswith("http://127.0.0.1:") for u in urls)
    for u in urls:
        with urllib.request.urlopen(f"{u}/health", timeout=10) as r:
            assert r.status == 200
        assert [m.id for m in sync_client(u).models.list().data] == [model]


@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seeded"])
def test_sync_completions_equal_the_reference(pod: TestPod, reference, model: str, sampling: dict) -> None:
    prompt = tuple(encode("Hello, OpenAI client"))
    want = ref(reference, prompt, max_tokens=12, **sampling)
    client = sync_client(pod.http[0])
    # Prompt as token ids (exactly the reference's), token ids back (vLLM's return_token_ids).
    done = client.completions.create(model=model, prompt=list(prompt), max_tokens=12,
                                     extra_body={"return_token_ids": True}, **sampling)
    choice = done.choices[0]
    assert tuple(choice.model_extra["token_ids"]) == want
    assert choice.text == decode(want) and choice.finish_reason in ("stop", "length")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(prompt), len(want))
    # The same as a stream, on the other router, with the usage chunk last.
    chunks = list(sync_client(pod.http[-1]).completions.create(
        model=model, prompt="Hello, OpenAI client", max_tokens=12, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_token_ids": True}, **sampling))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == decode(want)
    assert tuple(t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want)


async def test_async_chat_streaming_and_not_equal_the_reference(pod: TestPod, reference, model: str) -> None:
    messages = [{"role": "system", "content": "You are tiny."}, {"role": "user", "content": "Say something"}]
    prompt = tuple(encode(chat_template(messages)))
    async with openai.AsyncOpenAI(base_url=f"{pod.http[0]}/v1", api_key="none", max_retries=0) as client:
        for sampling in SAMPLING:
            want = ref(reference, prompt, max_tokens=10, **sampling)
            done = await client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10,
                                                        **sampling)
            assert done.object == "chat.completion"
            assert done.choices[0].message.content == decode(want)
            assert done.usage.completion_tokens == len(want) and done.usage.prompt_tokens == len(prompt)
            stream = await client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10,
                                                          stream=True, stream_options={"include_usage": True},
                                                          extra_body={"return_token_ids": True}, **sampling)
            chunks = [c async for c in stream]
            assert all(c.object == "chat.completion.chunk" for c in chunks)
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == decode(want)
            assert tuple(t for c in chunks if c.choices for t in c.choices[0].model_extra["token_ids"]) == want
            assert chunks[-1].usage.total_tokens == len(prompt) + len(want)


def test_a_stop_string_spanning_tokens_ends_the_text_before_it(pod: TestPod, reference, model: str) -> None:
    prompt = tuple(encode("stop strings are matched on text"))
    full = ref(reference, prompt, max_tokens=60)
    text = decode(full)
    # A 3-character stop string from the middle of the output: 3+ byte tokens in a row.
    k = next(k for k in range(5, len(text) - 3) if text.find(text[k:k + 3]) == k and "\ufffd" not in text[k:k + 3])
    stop = text[k:k + 3]
    upto = next(n for n in range(len(full)) if stop in decode(full[:n]))   # tokens up to the one completing it
    client = sync_client(pod.http[0])
    done = client.completions.create(model=model, prompt=list(prompt), max_tokens=60, temperature=0, stop=[stop])
    assert done.choices[0].text == text[:k] and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == upto
    chunks = list(client.completions.create(model=model, prompt=list(prompt), max_tokens=60, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text[:k]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_errors_are_openai_error_objects_with_the_right_status(pod: TestPod, model: str) -> None:
    url = pod.http[0]
    client = sync_client(url)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="n > 1") as e:
        client.completions.create(model=model, prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError, match="limit"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x" * 600}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model, prompt="x", max_tokens=2, temperature=-1)
    status, body, _ = post(f"{url}/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": ')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body, _ = post(f"{url}/v1/chat/completions", b"\xff\xfe")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = post(f"{url}/v1/completions", b'{"model": "' + model.encode() + b'", "prompt": "x"}',
                           {"X-Request-Timeout": "soon"})
    assert status == 400 and body["error"]["param"] == "X-Request-Timeout"
    # The router keeps serving.
    assert client.completions.create(model=model, prompt="x", max_tokens=2, temperature=0).choices[0].finish_reason


def test_x_request_id_is_the_idempotency_key(pod: TestPod, model: str) -> None:
    body = json.dumps({"model": model, "prompt": "idempotent", "max_tokens": 6, "temperature": 0.9,
                       "return_token_ids": True}).encode()
    s1, b1, h1 = post(f"{pod.http[0]}/v1/completions", body, {"X-Request-Id": "oai-idem-1"})
    s2, b2, h2 = post(f"{pod.http[1]}/v1/completions", body, {"X-Request-Id": "oai-idem-1"})
    assert s1 == s2 == 200 and h1["X-Request-Id"] == "oai-idem-1" and b1["id"] == "cmpl-oai-idem-1"
    # Unseeded sampling draws from the request id: the same id, the same tokens (any router).
    assert b1["choices"][0]["token_ids"] == b2["choices"][0]["token_ids"]


def test_curl_streams_server_sent_events(pod: TestPod, reference, model: str) -> None:
    prompt = tuple(encode("curl me"))
    want = ref(reference, prompt, max_tokens=8)
    body = json.dumps({"model": model, "prompt": "curl me", "max_tokens": 8, "temperature": 0, "stream": True})
    out = subprocess.run(["curl", "-sN", "--max-time", "60", f"{pod.http[0]}/v1/completions",
                          "-H", "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=90, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) >= 2
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == decode(want)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_a_client_that_disconnects_mid_stream_cancels_its_request(pod: TestPod, model: str) -> None:
    groups = range(pod.spec.decode.groups)
    routers = [s.name for s in services(pod.spec) if s.role == "router"]
    async with Loads(pod) as loads:
        def idle() -> bool:
            return all(loads.load(f"decode-{g}").get("running", 1) == 0 and "steps" in loads.load(f"attention-{g}-0")
                       for g in groups) and all(loads.load(r).get("running", 1) == 0 for r in routers)
        await loads.until(idle, 20)
        steps0 = sum(loads.load(f"attention-{g}-0")["steps"] for g in groups)
        async with openai.AsyncOpenAI(base_url=f"{pod.http[0]}/v1", api_key="none", max_retries=0) as client:
            stream = await client.completions.create(model=model, prompt="disconnect me", max_tokens=400,
                                                     temperature=0, stream=True)
            got = 0
            async for c in stream:
                got += 1
                if got >= 3:
                    break
            await stream.close()       # the HTTP connection goes away mid-stream
        busy = lambda: any(loads.load(f"decode-{g}").get("running", 0) for g in groups)  # noqa: E731
        assert got == 3
        await loads.until(idle, 20)
        assert not busy()
        steps = sum(loads.load(f"attention-{g}-0")["steps"] for g in groups) - steps0
    # Back to idle long before the 400 tokens it asked for: it was cancelled, not finished.
    assert steps < 200, f"{steps} decode steps after the disconnect: the request was not cancelled"


# ------------------------------------------------------------------ refusals, stand-in router

class RefusingRouter:
    """Stands in for ``Router`` (the HTTP front is what is tested): refuses with ``code``."""

    def __init__(self, code: Code) -> None:
        from services.model.config import preset
        self.model_cfg, self.model_name, self.code = preset("tiny"), "tiny-seed0", code
        self.deadlines: list[float | None] = []

    async def generate(self, p: api.Parsed, deadline_s: float | None) -> AsyncIterator[api.Delta]:
        self.deadlines.append(deadline_s)
        raise RouterError(f"refused: {self.code.name}", self.code)
        yield  # an async generator, as Router.generate


@pytest.mark.parametrize("code, status, error", [(Code.RESOURCE_EXHAUSTED, 429, openai.RateLimitError),
                                                 (Code.UNAVAILABLE, 503, openai.InternalServerError),
                                                 (Code.DEADLINE_EXCEEDED, 504, openai.InternalServerError)])
async def test_router_refusals_map_to_429_503_504(code: Code, status: int, error: type) -> None:
    router = RefusingRouter(code)
    front = HttpFront(router, ready=lambda: False)
    port = await front.start("127.0.0.1", 0)
    try:
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0) as c:
            for stream in (False, True):
                with pytest.raises(error) as e:
                    r = await c.chat.completions.create(model="tiny-seed0", messages=[{"role": "user", "content": "x"}],
                                                        max_tokens=2, stream=stream,
                                                        extra_headers={"X-Request-Timeout": "2.5"})
                    if stream:
                        [_ async for _ in r]
                assert e.value.status_code == status and f"refused: {code.name}" in str(e.value)
        assert all(d is not None for d in router.deadlines)
        def get() -> int:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).status
            except urllib.error.HTTPError as exc:
                return exc.code
        assert await asyncio.to_thread(get) == 503   # not ready
    finally:
        await front.stop()
