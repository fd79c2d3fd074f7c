"""Byte layout of a KV pool block and the keys a sequence's KV is stored under (pure, no I/O).

A block is the K and V of ``block_size`` consecutive positions for every layer: one C-order
float32 array ``[num_layers, 2, num_kv_heads, block_size, head_dim]`` (index 0 of axis 1 is K,
1 is V), so a block is ``block_bytes`` contiguous bytes at ``slot * block_bytes`` of the pool's
``kv`` window. The model keeps KV per layer as ``[num_kv_heads, capacity, head_dim]`` arrays;
``pack`` / ``unpack`` convert between the two with one copy each and are exact (bitwise).

A sequence of ``n`` tokens is stored as its ``n // block_size`` full blocks under the hash
chain of its tokens (shared with every sequence of the same prefix) plus, if ``n`` is not a
multiple of ``block_size``, one private *tail* block (zero-padded) under ``tail_key(owner,
tokens)``: a key from a different hash domain, unique to the owner and the exact tokens, so
it never collides with a chain key and a lookup by prefix never finds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from services.kvpool.core import block_hashes
from services.model.config import ModelConfig
from services.protocol.inference import KVRef

KEY_BYTES = 16
_TAIL_DOMAIN = b"xds-kv-tail\x00"

KV = list[tuple[np.ndarray, np.ndarray]]


class KVLayoutError(ValueError):
    """KV arrays or a KVRef that do not fit the pool's block layout (local misuse)."""


@dataclass(frozen=True, slots=True)
class BlockLayout:
    num_layers: int
    num_kv_heads: int
    block_size: int
    head_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig, block_size: int) -> BlockLayout:
        if block_size < 1:
            raise KVLayoutError(f"block_size must be >= 1, got {block_size}")
        return cls(cfg.num_hidden_layers, cfg.num_key_value_heads, block_size, cfg.head_dim)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return int(np.prod(self.block_shape)) * 4

    def num_blocks(self, num_tokens: int) -> int:
        """Blocks holding ``num_tokens`` positions: the full ones plus a partial tail."""
        return -(-num_tokens // self.block_size)

    def check_kv(self, kv: Sequence[tuple[np.ndarray, np.ndarray]], num_tokens: int) -> None:
        if len(kv) != self.num_layers:
            raise KVLayoutError(f"KV has {len(kv)} layers, the model has {self.num_layers}")
        want = (self.num_kv_heads, self.head_dim)
        for li, pair in enumerate(kv):
            if len(pair) != 2:
                raise KVLayoutError(f"layer {li}: expected a (k, v) pair")
            for name, a in zip("kv", pair):
                if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 3:
                    raise KVLayoutError(f"layer {li} {name}: expected a 3-d float32 array")
                if (a.shape[0], a.shape[2]) != want or a.shape[1] < num_tokens:
                    raise KVLayoutError(f"layer {li} {name}: shape {a.shape} cannot hold {num_tokens} positions "
                                        f"of [{want[0]}, n, {want[1]}]")

    def pack(self, kv: Sequence[tuple[np.ndarray, np.ndarray]], num_tokens: int) -> np.ndarray:
        """Positions ``0..num_tokens-1`` of per-layer KV as blocks ``[nblocks, *block_shape]``;
        the last block is zero-padded when ``num_tokens`` is not a multiple of block_size."""
        self.check_kv(kv, num_tokens)
        nb, bs = self.num_blocks(num_tokens), self.block_size
        full, rest = divmod(num_tokens, bs)
        out = np.zeros((nb, *self.block_shape), dtype=np.float32)
        dst = out.transpose(1, 2, 3, 0, 4, 5)  # a view: [layer, k|v, head, block, pos, dim]
        shape = (self.num_kv_heads, full, bs, self.head_dim)
        for li, pair in enumerate(kv):
            for j, a in enumerate(pair):
                dst[li, j, :, :full] = a[:, :full * bs].reshape(shape)
                if rest:
                    dst[li, j, :, full, :rest] = a[:, full * bs:num_tokens]
        return out

    def unpack(self, blocks: np.ndarray, num_tokens: int) -> KV:
        """Inverse of ``pack``: per-layer (k, v) C-contiguous arrays ``[Hkv, num_tokens, D]``."""
        nb = self.num_blocks(num_tokens)
        if blocks.dtype != np.float32 or blocks.shape != (nb, *self.block_shape):
            raise KVLayoutError(f"blocks {blocks.dtype}{blocks.shape} do not hold {num_tokens} positions "
                                f"as {nb} x {self.block_shape}")
        # One copy into [layer, k|v, head, position, dim]; slices are copied again only for a tail.
        flat = blocks.transpose(1, 2, 3, 0, 4, 5).copy(order="C").reshape(
            self.num_layers, 2, self.num_kv_heads, nb * self.block_size, self.head_dim)
        if num_tokens == nb * self.block_size:
            return [(flat[li, 0], flat[li, 1]) for li in range(self.num_layers)]
        return [(np.ascontiguousarray(flat[li, 0, :, :num_tokens]), np.ascontiguousarray(flat[li, 1, :, :num_tokens]))
                for li in range(self.num_layers)]

    def view_blocks(self, buf: bytes | bytearray | memoryview | np.ndarray, nblocks: int) -> np.ndarray:
        """Read-only float32 view of ``nblocks`` blocks laid out back to back in ``buf``."""
        a = np.frombuffer(buf, dtype=np.float32)
        if a.nbytes != nblocks * self.block_bytes:
            raise KVLayoutError(f"{a.nbytes} bytes are not {nblocks} blocks of {self.block_bytes}")
        return a.reshape(nblocks, *self.block_shape)


def tail_key(owner: str, tokens: Sequence[int]) -> bytes:
    """Key of the private partial block of ``tokens`` stored by ``owner``."""
    h = hashlib.blake2b(_TAIL_DOMAIN + owner.encode() + b"\x00", digest_size=KEY_BYTES)
    h.update(np.asarray(tokens, dtype="<u4").tobytes())
    return h.digest()


def kv_ref(tokens: Sequence[int], owner: str, block_size: int) -> KVRef:
    """The KVRef under which ``store`` keeps the KV of all of ``tokens``."""
    if not tokens:
        raise KVLayoutError("a KVRef needs at least one token")
    if block_size < 1:
        raise KVLayoutError(f"block_size must be >= 1, got {block_size}")
    hashes = tuple(block_hashes(tokens, block_size))
    tail = tail_key(owner, tokens) if len(tokens) % block_size else b""
    return KVRef(len(tokens), block_size, hashes, tail)


def ref_keys(ref: KVRef) -> list[bytes]:
    """Every key of a KVRef in position order (full blocks, then the tail if any)."""
    if ref.num_tokens < 1 or ref.block_size < 1:
        raise KVLayoutError(f"KVRef of {ref.num_tokens} tokens in blocks of {ref.block_size} is empty")
    full, rest = divmod(ref.num_tokens, ref.block_size)
    if len(ref.block_hashes) != full or bool(rest) != bool(ref.tail_key):
        raise KVLayoutError(f"KVRef of {ref.num_tokens} tokens needs {full} block hashes "
                            f"({len(ref.block_hashes)} given) and {'a' if rest else 'no'} tail key")
    keys = [*ref.block_hashes, *([ref.tail_key] if rest else [])]
    if any(len(k) != KEY_BYTES for k in keys):
        raise KVLayoutError(f"KVRef keys must be {KEY_BYTES} bytes")
    return keys


def runs(pairs: Iterable[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Merge (block index, slot) pairs into (first index, first slot, count) runs where both
    advance by one, so consecutive blocks in consecutive slots move as one transfer."""
    out: list[tuple[int, int, int]] = []
    for i, s in sorted(pairs):
        if out and out[-1][0] + out[-1][2] == i and out[-1][1] + out[-1][2] == s:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((i, s, 1))
    return out
