"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then BOS/EOS/PAD. Any text round-trips."""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from services.model.config import BOS_ID, BYTE_VOCAB, EOS_ID, PAD_ID

SPECIAL_IDS = frozenset({BOS_ID, EOS_ID, PAD_ID})


def encode(text: str, *, add_bos: bool = True) -> list[int]:
    ids = list(text.encode("utf-8"))
    return [BOS_ID, *ids] if add_bos else ids


def decode(ids: Iterable[int]) -> str:
    """Text of the byte tokens; specials are dropped, invalid UTF-8 becomes U+FFFD."""
    return bytes(i for i in ids if i < BYTE_VOCAB).decode("utf-8", errors="replace")


class IncrementalDecoder:
    """Streams text from token ids without splitting a multi-byte character across deltas."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        return self._dec.decode(bytes(i for i in ids if i < BYTE_VOCAB))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)
