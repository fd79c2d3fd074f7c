"""Bad input from a peer: every fault in frames or header is a specific WireError, never a crash."""

from __future__ import annotations

import copy
import enum
import struct
from dataclasses import dataclass
from typing import Literal

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.wire import (
    ArrayMismatch,
    FieldError,
    MalformedFrame,
    TruncatedFrame,
    UnknownMessageType,
    WireError,
    decode,
    encode,
    join_frames,
    message,
    registered,
    split_frames,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@message("test.faults.Inner")
@dataclass(frozen=True, slots=True)
class FInner:
    x: int
    arr: np.ndarray


@message("test.faults.M")
@dataclass(frozen=True, slots=True)
class M:
    i: int
    f: float
    s: str
    level: Level
    lit: Literal["on", "off"]
    a: np.ndarray
    opt: list[int] | None
    nested: FInner


@message("test.faults.Checked")
@dataclass(frozen=True, slots=True)
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


def sample() -> M:
    return M(7, 1.5, "ok", Level.HIGH, "on", np.arange(6, dtype=np.float32).reshape(2, 3), [1, 2],
             FInner(3, np.arange(4, dtype=np.uint8)))


def parts() -> tuple[dict, list[bytes]]:
    frames = encode(sample())
    return msgpack.unpackb(frames[0], raw=False), [bytes(f) for f in frames[1:]]


def pack(header) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def run(mutate) -> object:
    """Apply ``mutate(header, bodies)`` (in place, or returning new frames) and decode."""
    header, bodies = parts()
    out = mutate(header, bodies)
    frames = out if out is not None else [pack(header), *bodies]
    return decode(frames)


def _set(path, value):
    def mutate(h, b):
        node = h
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return mutate


def _drop(path):
    def mutate(h, b):
        node = h
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return mutate


HEADER_FAULTS = {
    "unknown tag": (_set(["t"], "no.such.Message"), UnknownMessageType),
    "tag not str": (_set(["t"], 5), MalformedFrame),
    "version 2": (_set(["v"], 2), MalformedFrame),
    "version bool": (_set(["v"], True), MalformedFrame),
    "no array list": (_drop(["a"]), MalformedFrame),
    "extra header key": (_set(["x"], 1), MalformedFrame),
    "fields not map": (_set(["f"], [1, 2]), MalformedFrame),
    "arrays not list": (_set(["a"], {}), MalformedFrame),
    "header not map": (lambda h, b: [pack([h["t"], h["f"]]), *b], MalformedFrame),
}

FIELD_FAULTS = {
    "missing field": (_drop(["f", "i"]), "test.faults.M.i"),
    "extra field": (_set(["f", "zz"], 1), "test.faults.M.zz"),
    "str for int": (_set(["f", "i"], "7"), "test.faults.M.i"),
    "bool for int": (_set(["f", "i"], True), "test.faults.M.i"),
    "float for int": (_set(["f", "i"], 7.0), "test.faults.M.i"),
    "str for float": (_set(["f", "f"], "x"), "test.faults.M.f"),
    "bytes for str": (_set(["f", "s"], b"ok"), "test.faults.M.s"),
    "bad enum value": (_set(["f", "level"], 99), "test.faults.M.level"),
    "enum as str": (_set(["f", "level"], "1"), "test.faults.M.level"),
    "literal not allowed": (_set(["f", "lit"], "maybe"), "test.faults.M.lit"),
    "list item type": (_set(["f", "opt"], [1, "a"]), "test.faults.M.opt[1]"),
    "list as map": (_set(["f", "opt"], {"0": 1}), "test.faults.M.opt"),
    "nested not map": (_set(["f", "nested"], "x"), "test.faults.M.nested"),
    "nested missing": (_drop(["f", "nested", "x"]), "test.faults.M.nested.x"),
    "nested wrong type": (_set(["f", "nested", "x"], None), "test.faults.M.nested.x"),
    "slot as str": (_set(["f", "a"], "0"), "test.faults.M.a"),
    "slot as None": (_set(["f", "a"], None), "test.faults.M.a"),
}


def _descr(index, value):
    def mutate(h, b):
        h["a"][0][index] = value
    return mutate


def _twice(h, b):
    h["f"]["nested"]["arr"] = 0
    del h["a"][1]
    del b[1]


def _unreferenced(h, b):
    h["a"].append(["|u1", [1], 1])
    b.append(b"\x00")


ARRAY_FAULTS = {
    **{f"dtype {d!r}": (_descr(0, d), None) for d in ["O", "|O", "<U4", ">f4", "<V8", "<M8[s]", "<c8", "", 3, None]},
    **{f"shape {s!r}": (_descr(1, s), None) for s in [[-1, 3], [2, -3], [-2, -3], [2 ** 63, 3], [0, 2 ** 64 - 1], [2 ** 32, 2 ** 32], "6", [1.5, 4],
                                                      [True, 6], [3, 3], [0, 3], [3, 2, 1, 1, 2], [1] * 70]},
    "nbytes wrong": (_descr(2, 23), None),
    "nbytes str": (_descr(2, "24"), None),
    "descriptor short": (lambda h, b: h["a"].__setitem__(0, ["<f4", [2, 3]]), None),
    "descriptor not list": (lambda h, b: h["a"].__setitem__(0, "<f4"), None),
    "frame shorter": (lambda h, b: b.__setitem__(0, b[0][:-4]), None),
    "frame longer": (lambda h, b: b.__setitem__(0, b[0] + b"\x00" * 4), None),
    "slot out of range": (_set(["f", "a"], 5), None),
    "negative slot": (_set(["f", "a"], -1), None),
    "slot referenced twice": (_twice, None),
    "unreferenced frame": (_unreferenced, None),
}


@pytest.mark.parametrize("name", list(HEADER_FAULTS))
def test_header_faults(name):
    mutate, exc = HEADER_FAULTS[name]
    with pytest.raises(exc):
        run(mutate)


@pytest.mark.parametrize("name", list(FIELD_FAULTS))
def test_field_faults_name_the_path(name):
    mutate, path = FIELD_FAULTS[name]
    with pytest.raises(FieldError) as ei:
        run(mutate)
    assert ei.value.path == path and str(ei.value).startswith(path + ":")


@pytest.mark.parametrize("name", list(ARRAY_FAULTS))
def test_array_faults(name):
    with pytest.raises(ArrayMismatch) as ei:
        run(ARRAY_FAULTS[name][0])
    assert ei.value.tag == "test.faults.M"


def test_unmodified_parts_decode():
    """Control for the fault tables: the unmutated header decodes, so each fault is the cause."""
    out = run(lambda h, b: None)
    assert out.i == 7 and out.nested.arr.tolist() == [0, 1, 2, 3]


def test_int_for_float_is_accepted():
    out = run(_set(["f", "f"], 2))
    assert out.f == 2.0 and type(out.f) is float


def test_frame_count_mismatch():
    header, bodies = parts()
    with pytest.raises(TruncatedFrame):
        decode([pack(header), bodies[0]])
    with pytest.raises(MalformedFrame) as ei:
        decode([pack(header), *bodies, b""])
    assert not isinstance(ei.value, TruncatedFrame)


@pytest.mark.parametrize("frames", [[], b"\x80", bytearray(b"x"), "text", 5, [5], [None], [object()]])
def test_not_frames(frames):
    with pytest.raises(MalformedFrame):
        decode(frames)


def test_array_frame_not_a_buffer():
    header, bodies = parts()
    with pytest.raises(MalformedFrame):
        decode([pack(header), 12345, bodies[1]])


def test_invalid_utf8_string_is_malformed():
    header, bodies = parts()
    header["f"]["s"] = "QQ"
    raw = pack(header).replace(b"\xa2QQ", b"\xa2\xff\xfe")
    with pytest.raises(MalformedFrame):
        decode([raw, *bodies])


def test_class_validation_rejects_with_field_error():
    header = msgpack.unpackb(encode(Checked(1))[0])
    header["f"]["n"] = -5
    with pytest.raises(FieldError, match="n must be >= 0"):
        decode([pack(header)])


def test_decoder_keeps_working_after_faults():
    for name in ("unknown tag", "fields not map"):
        with pytest.raises(WireError):
            run(HEADER_FAULTS[name][0])
    assert decode(encode(sample())).s == "ok"


# ---------------------------------------------------------------- generated garbage


def _decodes_or_wire_error(frames) -> None:
    try:
        out = decode(frames)
    except WireError:
        return
    assert type(out) in registered().values()


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats() | st.text(max_size=6)
    | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=10,
)


@FAST
@given(st.binary(max_size=200), st.lists(st.binary(max_size=64), max_size=3))
def test_random_bytes_only_wire_errors(head, rest):
    _decodes_or_wire_error([head, *rest])


@FAST
@given(st.data())
def test_truncated_header_is_malformed(data):
    head = encode(sample())[0]
    cut = data.draw(st.integers(0, len(head) - 1))
    with pytest.raises(MalformedFrame):
        decode([head[:cut]])


@FAST
@given(st.data())
def test_byte_flips_only_wire_errors(data):
    frames = [bytearray(f) for f in encode(sample())]
    for _ in range(data.draw(st.integers(1, 4))):
        k = data.draw(st.integers(0, len(frames) - 1))
        if frames[k]:
            pos = data.draw(st.integers(0, len(frames[k]) - 1))
            frames[k][pos] = data.draw(st.integers(0, 255))
    _decodes_or_wire_error(frames)


@FAST
@given(st.data())
def test_random_header_values_only_wire_errors(data):
    header, bodies = parts()
    target = data.draw(st.sampled_from(
        [("t",), ("v",), ("f",), ("a",), ("a", 0), ("a", 0, 0), ("a", 0, 1), ("a", 1, 2)]
        + [("f", k) for k in header["f"]] + [("f", "nested", "x"), ("f", "nested", "arr")]
    ))
    node = header
    for key in target[:-1]:
        node = node[key]
    node[target[-1]] = data.draw(msgpack_values)
    _decodes_or_wire_error([pack(header), *bodies])
    if data.draw(st.booleans()):
        _decodes_or_wire_error([pack(copy.deepcopy(header))])


# ---------------------------------------------------------------- joined buffers


@FAST
@given(st.lists(st.binary(max_size=50), max_size=6))
def test_join_split_roundtrip(frames):
    assert [bytes(f) for f in split_frames(join_frames(frames))] == frames


@FAST
@given(st.lists(st.binary(max_size=20), max_size=4), st.data())
def test_split_truncated_buffer(frames, data):
    buf = join_frames(frames)
    cut = data.draw(st.integers(0, len(buf) - 1))
    with pytest.raises(TruncatedFrame):
        split_frames(buf[:cut])


def test_split_trailing_and_absurd_lengths():
    buf = join_frames([b"ab", b"c"])
    with pytest.raises(MalformedFrame) as ei:
        split_frames(buf + b"\x00")
    assert not isinstance(ei.value, TruncatedFrame)
    with pytest.raises(TruncatedFrame):
        split_frames(struct.pack("<I", 0xFFFFFFFF) + b"\x00" * 16)
    with pytest.raises(TruncatedFrame):
        split_frames(struct.pack("<IQ", 1, 2 ** 64 - 1) + b"abc")
    with pytest.raises(MalformedFrame):
        split_frames(12345)


@FAST
@given(st.binary(max_size=100))
def test_split_random_bytes_only_wire_errors(buf):
    try:
        out = split_frames(buf)
    except WireError:
        return
    assert sum(len(f) for f in out) + 4 + 8 * len(out) == len(buf)


@message("test.faults.Chain")
@dataclass(frozen=True, slots=True)
class Chain:
    next: list[Chain]


def test_deeply_nested_recursive_message_is_a_wire_error():
    # msgpack itself accepts ~1000 nesting levels; decoding them must not crash the receiver.
    # Written byte by byte: a packer refuses this depth (msgpack < 1.2 at 511 levels), an
    # attacker's bytes need not come from a packer.
    level = b"\x81" + pack("next") + b"\x91"  # {"next": [ ... ]}
    fields = level * 490 + b"\x81" + pack("next") + b"\x90"
    head = (b"\x84" + pack("t") + pack("test.faults.Chain") + pack("v") + pack(1) + pack("a") + pack([])
            + pack("f") + fields)
    with pytest.raises(MalformedFrame, match="nests too deeply"):
        decode([head])
    assert decode(encode(Chain([Chain([])]))) == Chain([Chain([])])
    deep = Chain([])
    for _ in range(3000):
        deep = Chain([deep])
    with pytest.raises(FieldError):
        encode(deep)
