"""Round trips, zero-copy and fault handling of services.common.wire."""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import msgpack
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from typing_extensions import TypeAliasType

from services.common.wire import (
    ArrayMismatch,
    FieldError,
    UnexpectedMessage,
    UnknownMessageType,
    decode,
    encode,
    join_frames,
    message,
    registered,
    split_frames,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
I64_MIN, U64_MAX = -(1 << 63), (1 << 64) - 1
DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64"]


class Color(enum.IntEnum):
    RED = 1
    GREEN = 2


class Mode(enum.StrEnum):
    FAST = "fast"
    SAFE = "safe"


@message("test.Scalars")
@dataclass(frozen=True, slots=True)
class Scalars:
    b: bool
    i: int
    f: float
    s: str
    raw: bytes
    n: None
    opt: int | None = None


@message("test.Containers")
@dataclass(frozen=True, slots=True)
class Containers:
    ints: list[int]
    names: tuple[str, ...]
    pair: tuple[int, str]
    meta: dict[str, float]
    holes: list[int | None]
    grid: list[list[bool]]


@message("test.Inner")
@dataclass(frozen=True, slots=True)
class Inner:
    x: int
    arr: np.ndarray


@message("test.Outer")
@dataclass(frozen=True, slots=True)
class Outer:
    name: str
    inner: Inner
    inners: list[Inner]
    maybe: Inner | None
    arrs: dict[str, np.ndarray]


@message("test.Enums")
@dataclass(frozen=True, slots=True)
class Enums:
    color: Color
    mode: Mode
    lit: Literal["a", "b", 3]
    flag: Literal[True]


@message("test.Arr")
@dataclass(frozen=True, slots=True)
class Arr:
    a: np.ndarray


@message("test.Typed")
@dataclass(frozen=True, slots=True)
class Typed:
    a: npt.NDArray[np.float32]


# PEP 695 aliases, as numpy >= 2.5 spells NDArray (typing.TypeAliasType), built with the
# backport so the same test runs on 3.11 where the numpy in use may still use GenericAlias.
_S = TypeVar("_S", bound=np.generic)
AliasArray = TypeAliasType("AliasArray", np.ndarray[tuple[Any, ...], np.dtype[_S]], type_params=(_S,))
Floats = TypeAliasType("Floats", AliasArray[np.float32])  # an alias of an alias
Ids = TypeAliasType("Ids", list[int])


@message("test.Aliased")
@dataclass(frozen=True, slots=True)
class Aliased:
    ints: AliasArray[np.int32]
    floats: Floats
    anything: AliasArray
    ids: Ids
    maybe: Floats | None = None


@message("test.Tree")  # self-reference: resolved at first use, not at decoration
@dataclass(frozen=True, slots=True)
class Tree:
    label: str
    children: list[Tree]


@message("test.Before")  # names a class defined later in the module
@dataclass(frozen=True, slots=True)
class Before:
    after: After


@message("test.After")
@dataclass(frozen=True, slots=True)
class After:
    v: float


@message("test.Positive")
@dataclass(frozen=True, slots=True)
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


# ---------------------------------------------------------------- helpers


def same(a, b) -> bool:
    """Structural, bit-exact equality (arrays compare dtype, shape and bytes; NaN == NaN)."""
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def roundtrip(msg):
    return decode(encode(msg))


def header_of(msg) -> tuple[dict, list]:
    frames = encode(msg)
    return msgpack.unpackb(frames[0], raw=False), [bytes(f) for f in frames[1:]]


def pack(header: dict) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


ints64 = st.integers(I64_MIN, U64_MAX)
floats = st.floats(allow_nan=True, allow_infinity=True)
small_arrays = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
)

scalars_st = st.builds(Scalars, b=st.booleans(), i=ints64, f=floats, s=st.text(), raw=st.binary(),
                       n=st.none(), opt=st.none() | ints64)
containers_st = st.builds(
    Containers,
    ints=st.lists(ints64, max_size=5),
    names=st.lists(st.text(max_size=5), max_size=4).map(tuple),
    pair=st.tuples(ints64, st.text(max_size=5)),
    meta=st.dictionaries(st.text(max_size=5), floats, max_size=4),
    holes=st.lists(st.none() | ints64, max_size=5),
    grid=st.lists(st.lists(st.booleans(), max_size=3), max_size=3),
)
inner_st = st.builds(Inner, x=ints64, arr=small_arrays)
outer_st = st.builds(
    Outer, name=st.text(max_size=8), inner=inner_st, inners=st.lists(inner_st, max_size=3),
    maybe=st.none() | inner_st, arrs=st.dictionaries(st.text(max_size=4), small_arrays, max_size=3),
)
enums_st = st.builds(Enums, color=st.sampled_from(Color), mode=st.sampled_from(Mode),
                     lit=st.sampled_from(["a", "b", 3]), flag=st.just(True))
tree_st = st.recursive(
    st.builds(Tree, label=st.text(max_size=3), children=st.just([])),
    lambda kids: st.builds(Tree, label=st.text(max_size=3), children=st.lists(kids, max_size=3)),
    max_leaves=8,
)
any_msg_st = st.one_of(scalars_st, containers_st, outer_st, enums_st, tree_st,
                       st.builds(Before, after=st.builds(After, v=floats)))


# ---------------------------------------------------------------- round trips


@FAST
@given(any_msg_st)
def test_roundtrip_any_message(msg):
    out = roundtrip(msg)
    assert same(out, msg)


@FAST
@given(any_msg_st)
def test_roundtrip_through_joined_buffer(msg):
    out = decode(split_frames(join_frames(encode(msg))))
    assert same(out, msg)


@FAST
@given(small_arrays)
def test_array_every_dtype_and_shape(arr):
    out = roundtrip(Arr(arr))
    assert same(out.a, arr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_d_and_empty_arrays(dtype):
    for arr in (np.array(7, dtype=dtype), np.zeros((0,), dtype), np.zeros((3, 0, 2), dtype)):
        out = roundtrip(Arr(arr))
        assert same(out.a, arr), (dtype, arr.shape)


def test_tuples_stay_tuples_and_lists_stay_lists():
    msg = Containers([1], ("a",), (2, "b"), {"k": 1.5}, [None, 3], [[True]])
    out = roundtrip(msg)
    assert type(out.names) is tuple and type(out.pair) is tuple
    assert type(out.ints) is list and type(out.grid[0]) is list
    assert same(out, msg)


def test_extremes_of_int_range_and_unicode():
    msg = Scalars(True, U64_MAX, -0.0, "héllo ✓ 𝄞 \x00", b"\x00\xff", None, I64_MIN)
    assert same(roundtrip(msg), msg)


def test_int_accepted_for_float_and_numpy_scalars_converted():
    out = roundtrip(Scalars(np.bool_(True), np.int32(5), 3, "s", b"", None))
    assert out.f == 3.0 and type(out.f) is float
    assert out.i == 5 and type(out.i) is int and out.b is True


def test_non_contiguous_and_big_endian_arrays_are_sent_as_values():
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    strided = base[:, ::2]
    assert same(roundtrip(Arr(strided)).a, np.ascontiguousarray(strided))
    big = np.arange(5, dtype=">f8")
    out = roundtrip(Arr(big)).a
    assert out.dtype == np.dtype("<f8") and out.tolist() == big.tolist()


def test_typed_array_dtype_is_enforced():
    assert roundtrip(Typed(np.ones(3, np.float32))).a.dtype == np.float32
    with pytest.raises(FieldError, match=r"test\.Typed\.a"):
        encode(Typed(np.ones(3, np.float64)))
    header, bodies = header_of(Arr(np.ones(2, np.float64)))
    header["t"] = "test.Typed"
    with pytest.raises(ArrayMismatch, match="float32"):
        decode([pack(header), *bodies])


def test_type_aliases_are_expanded_whatever_their_spelling():
    msg = Aliased(np.arange(3, dtype=np.int32), np.ones(2, np.float32), np.zeros(1, np.uint8), [1, 2])
    out = roundtrip(msg)
    assert same(out.ints, msg.ints) and same(out.floats, msg.floats) and same(out.anything, msg.anything)
    assert out.ids == [1, 2] and out.maybe is None
    with pytest.raises(FieldError, match=r"test\.Aliased\.ints"):
        encode(Aliased(np.arange(3, dtype=np.int64), msg.floats, msg.anything, []))
    with pytest.raises(FieldError, match=r"test\.Aliased\.floats"):
        encode(Aliased(msg.ints, np.ones(2, np.float64), msg.anything, []))
    # A peer sending float64 where the alias says int32 is refused on decode too.
    header, bodies = header_of(msg)
    wrong = np.arange(3, dtype=np.float64)
    header["a"][header["f"]["ints"]] = header_of(Arr(wrong))[0]["a"][0]
    bodies[header["f"]["ints"]] = wrong.tobytes()
    with pytest.raises(ArrayMismatch, match="int32"):
        decode([pack(header), *bodies])


def test_numpy_ndarray_annotation_of_this_numpy_builds():
    # Whatever this numpy's NDArray is at run time (GenericAlias or TypeAliasType), a message
    # annotated with it must register and enforce its dtype.
    @message("test.ThisNumpy")
    @dataclass(frozen=True, slots=True)
    class ThisNumpy:
        a: npt.NDArray[np.int32]

    assert roundtrip(ThisNumpy(np.arange(4, dtype=np.int32))).a.tolist() == [0, 1, 2, 3]
    with pytest.raises(FieldError):
        encode(ThisNumpy(np.arange(4, dtype=np.float32)))


# ---------------------------------------------------------------- zero copy


def test_encode_shares_array_memory():
    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    frames = encode(Arr(arr))
    assert len(frames) == 2
    assert np.shares_memory(np.frombuffer(frames[1], dtype=arr.dtype), arr)


def test_decode_shares_received_buffer():
    arr = np.arange(64, dtype=np.int16).reshape(8, 8)
    frames = encode(Outer("o", Inner(1, arr), [], None, {"k": arr[:2]}))
    received = [bytearray(f) for f in frames]  # as if copied out of a socket
    out = decode(received)
    assert np.shares_memory(out.inner.arr, np.frombuffer(received[1], np.uint8))
    assert np.shares_memory(out.arrs["k"], np.frombuffer(received[2], np.uint8))
    assert same(out.inner.arr, arr)


def test_decode_from_joined_buffer_shares_it():
    arr = np.arange(100, dtype=np.float64)
    buf = join_frames(encode(Arr(arr)))
    out = decode(split_frames(buf))
    assert np.shares_memory(out.a, np.frombuffer(buf, np.uint8))
    assert not out.a.flags.writeable  # bytes are immutable, so is the view


def test_zmq_multipart_zero_copy_roundtrip():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-test")
        b.connect("inproc://wire-test")
        arr = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
        a.send_multipart(encode(Outer("z", Inner(3, arr), [], None, {})), copy=False)
        assert b.poll(5000), "message did not arrive"
        frames = b.recv_multipart(copy=False)
        out = decode(frames)
        assert same(out.inner.arr, arr)
        assert np.shares_memory(out.inner.arr, np.frombuffer(frames[1].buffer, np.uint8))
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


# ---------------------------------------------------------------- registration and misuse


def test_registered_lists_test_messages():
    reg = registered()
    assert reg["test.Outer"] is Outer and reg["test.Tree"] is Tree


def test_duplicate_tag_rejected():
    with pytest.raises(ValueError, match="test.Scalars"):
        @message("test.Scalars")
        @dataclass(frozen=True)
        class Other:
            x: int


@pytest.mark.parametrize("make", [
    lambda: dataclass(frozen=False)(type("Mutable", (), {"__annotations__": {"x": int}})),
    lambda: type("NotDataclass", (), {}),
])
def test_non_frozen_or_non_dataclass_rejected(make):
    with pytest.raises(TypeError):
        message("test.bad_class")(make())
    assert "test.bad_class" not in registered()


@pytest.mark.parametrize("annotation", ["int | str", "list", "set[int]", "typing.Any", "dict[int, int]",
                                        "Unregistered", "Literal[1.5]", "typing.Tuple", "typing.List",
                                        "tuple", "object", "complex"])
def test_unsupported_field_types_rejected_at_decoration(annotation):
    @dataclass(frozen=True)
    class Unregistered:
        x: int

    ns = {"typing": __import__("typing"), "Literal": Literal, "Unregistered": Unregistered}
    cls = dataclass(frozen=True)(type("Bad", (), {"__annotations__": {"x": eval(annotation, ns)}}))
    with pytest.raises(TypeError):
        message("test.bad_field")(cls)
    assert "test.bad_field" not in registered()


def test_encode_misuse_names_the_field_path():
    with pytest.raises(FieldError, match=r"^test\.Scalars\.i: expected int") as ei:
        encode(Scalars(True, "1", 1.0, "", b"", None))
    assert ei.value.path == "test.Scalars.i"
    with pytest.raises(FieldError, match=r"test\.Scalars\.i"):
        encode(Scalars(True, True, 1.0, "", b"", None))  # bool is not an int
    with pytest.raises(FieldError, match=r"test\.Scalars\.i: int .* outside"):
        encode(Scalars(True, U64_MAX + 1, 1.0, "", b"", None))
    bad_inner = Outer("o", Inner(1, np.zeros(1)), [Inner(1, np.zeros(1)), Inner(2, [1])], None, {})
    with pytest.raises(FieldError, match=r"test\.Outer\.inners\[1\]\.arr"):
        encode(bad_inner)
    with pytest.raises(FieldError, match=r"test\.Outer\.arrs\['k'\]"):
        encode(Outer("o", Inner(1, np.zeros(1)), [], None, {"k": np.array(["s"])}))
    with pytest.raises(FieldError, match=r"test\.Enums\.color"):
        encode(Enums(1, Mode.FAST, "a", True))
    with pytest.raises(FieldError, match=r"test\.Enums\.lit"):
        encode(Enums(Color.RED, Mode.FAST, "c", True))
    with pytest.raises(FieldError, match=r"test\.Containers\.names"):
        encode(Containers([], ["not", "tuple"], (1, "a"), {}, [], []))
    with pytest.raises(FieldError, match=r"test\.Containers\.pair"):
        encode(Containers([], (), (1, "a", 2), {}, [], []))
    with pytest.raises(FieldError, match=r"test\.Containers"):  # plain-int list fast path
        encode(Containers([1, U64_MAX + 1], (), (1, "a"), {}, [], []))
    with pytest.raises(FieldError, match=r"test\.Containers\.ints\[1\]"):
        encode(Containers([1, "2"], (), (1, "a"), {}, [], []))
    with pytest.raises(UnknownMessageType):
        encode(object())


@message("test.Empty")
@dataclass(frozen=True, slots=True)
class Empty:
    pass


def test_empty_message_and_empty_fixed_tuple():
    assert roundtrip(Empty()) == Empty()
    assert encode(Empty())[0] == msgpack.packb({"t": "test.Empty", "v": 1, "f": {}, "a": []})


def test_relaying_a_decoded_message_stays_zero_copy():
    """A router/relay re-encodes what it received: the outgoing frame is the incoming memory."""
    received = [bytearray(f) for f in encode(Arr(np.arange(32, dtype=np.uint16)))]
    msg = decode(received)
    again = encode(msg)
    assert np.shares_memory(np.frombuffer(again[1], np.uint8), np.frombuffer(received[1], np.uint8))
    ro = decode([bytes(f) for f in again])  # read-only arrays re-encode too
    assert same(roundtrip(ro), msg)


def test_unencodable_string_is_field_error():
    with pytest.raises(FieldError, match="test.Scalars"):
        encode(Scalars(True, 1, 1.0, "bad \ud800 surrogate", b"", None))


def test_object_arrays_never_encoded():
    with pytest.raises(FieldError, match="not allowed"):
        encode(Arr(np.array([object()], dtype=object)))


def test_expect_restricts_types():
    frames = encode(Positive(3))
    assert decode(frames, expect=Positive) == Positive(3)
    assert decode(frames, expect=(Arr, Positive)) == Positive(3)
    with pytest.raises(UnexpectedMessage):
        decode(frames, expect=Arr)
