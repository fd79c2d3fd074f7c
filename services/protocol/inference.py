"""Router <-> prefill and router <-> decode-master messages (ZeroMQ RPC, services/common/rpc.py).

Token ids travel here; tensors never do (they move over XCCL). Every message carries the
request id, which is the idempotency key across retries and migrations.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.status import Code
from services.common.wire import message
from services.model.sampling import SamplingParams


@message("inf.Sampling")
@dataclass(frozen=True, slots=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    max_tokens: int
    stop_token_ids: tuple[int, ...]

    @classmethod
    def of(cls, p: SamplingParams) -> Sampling:
        return cls(p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens, p.stop_token_ids)

    def params(self) -> SamplingParams:
        """Raises InvalidSamplingParams for out-of-range values from a peer."""
        return SamplingParams(self.temperature, self.top_p, self.top_k, self.seed, self.max_tokens,
                              self.stop_token_ids)


@message("inf.KVRef")
@dataclass(frozen=True, slots=True)
class KVRef:
    """Where the KV of the first ``num_tokens`` positions of a sequence lives: in the KV pool,
    and/or staged at the prefill that computed it.

    ``block_hashes`` are the hash-chain keys of the full blocks; the partial tail (if any) is a
    private block under ``tail_key`` holding ``num_tokens % block_size`` positions. Pool nodes
    are found by consistent hashing of each key over the pod's pool node list.
    """
    num_tokens: int
    block_size: int
    block_hashes: tuple[bytes, ...]
    tail_key: bytes = b""
    # A staged copy (services/kvpool/staging.py): ``source`` (a prefill) holds the packed blocks
    # at ``stage_offset`` of its ``kv_stage`` window until told ``StageRelease(stage_id)``;
    # ``digest`` (blake2b-16 of those bytes) lets the reader reject a reclaimed stage. Empty
    # ``source``: the pool is the only copy. The pool keys above are always given: the pool is
    # the fallback copy when it holds them.
    source: str = ""
    stage_offset: int = 0
    stage_id: int = 0
    digest: bytes = b""


@message("inf.Prefill")
@dataclass(frozen=True, slots=True)
class Prefill:
    request_id: str
    token_ids: tuple[int, ...]     # prompt (+ tokens already generated, on a migration replay)
    sampling: Sampling
    position_offset: int = 0       # index of the token to sample: len(token_ids) for a fresh request


@message("inf.PrefillDone")
@dataclass(frozen=True, slots=True)
class PrefillDone:
    request_id: str
    next_token: int                # sampled at position len(token_ids)
    kv: KVRef
    cached_tokens: int             # positions taken from the pool's prefix cache
    computed_tokens: int           # positions this prefill computed


@message("inf.Admit")
@dataclass(frozen=True, slots=True)
class Admit:
    """Decode ``request_id`` on this DP group, starting by feeding ``next_token``."""
    request_id: str
    prompt_len: int
    sampling: Sampling
    kv: KVRef
    next_token: int
    generated: int                 # tokens already produced (the next_token is number generated)
    router: str                    # which router to stream to (its service name)


@message("inf.Tokens")
@dataclass(frozen=True, slots=True)
class Tokens:
    """Pushed decode master -> router. ``index`` is the output position of token_ids[0]."""
    request_id: str
    index: int
    token_ids: tuple[int, ...]
    finish_reason: str = ""        # "", "stop", "length", "cancelled", "error"
    error: str = ""                # finish_reason "error": why, for a human
    code: Code = Code.OK           # finish_reason "error": what (the router replays UNAVAILABLE)


@message("inf.Cancel")
@dataclass(frozen=True, slots=True)
class Cancel:
    request_id: str
    # The sender (a router's service name): a decode master cancels only that router's
    # admission of the id, never another router's that took it over since. "": whoever holds it.
    router: str = ""


@message("inf.Subscribe")
@dataclass(frozen=True, slots=True)
class Subscribe:
    """A router announces itself to a decode master (so pushes can reach it)."""
    router: str
