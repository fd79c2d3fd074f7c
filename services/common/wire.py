"""Typed wire messages: frozen dataclasses <-> one msgpack header frame + raw array frames.

Every message between processes goes through this module (ARCHITECTURE.md "Wire format").
A message class is a frozen dataclass decorated with ``@message("tag")``. ``encode`` returns
frames: frame 0 is a msgpack header ``{"t": tag, "v": 1, "f": {field: value}, "a": [[dtype,
shape, nbytes], ...]}``; each ndarray (at any depth) is replaced in ``f`` by its slot index in
``a`` and travels as its own raw frame, zero-copy. Never pickle: dtypes come from a fixed
whitelist looked up by exact string, so the peer cannot name an object dtype.

Rules the codec enforces:
- Decoding validates every field against the annotations (a converter per class, built once
  from ``typing.get_type_hints``). Any fault in peer input raises a ``WireError`` subclass
  naming the tag and the field path; nothing else may escape ``decode`` on garbage input.
- ``bool`` is never an ``int``; an ``int`` is accepted where a ``float`` is declared.
- Encoding validates too, so misuse is caught at the sender (``FieldError``).
- Each array slot is referenced exactly once; frame count must match the header.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import struct
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgpack
import numpy as np

WIRE_VERSION = 1
_HEADER_KEYS = frozenset(("t", "v", "f", "a"))
_I64_MIN = -(1 << 63)
_U64_MAX = (1 << 64) - 1
_MAX_NDIM = 64
# A single dimension beyond this cannot describe a real buffer; refusing it early keeps
# numpy's own size arithmetic from overflowing on shapes such as (0, 2**70).
_MAX_DIM = 1 << 48


# --------------------------------------------------------------------------- errors


class WireError(ValueError):
    """A message could not be encoded or decoded. ``tag``/``path`` name where, when known."""

    def __init__(self, message: str, *, tag: str | None = None, path: str | None = None) -> None:
        super().__init__(message)
        self.tag = tag
        self.path = path


class UnknownMessageType(WireError):
    """The tag (or, when encoding, the class) is not registered."""


class UnexpectedMessage(WireError):
    """A registered message arrived where ``decode(..., expect=...)`` allowed other types."""


class FieldError(WireError):
    """A field is missing, extra, or does not match its annotation."""


class MalformedFrame(WireError):
    """Not msgpack, wrong header shape, wrong version, or frames that are not buffers."""


class TruncatedFrame(MalformedFrame):
    """Fewer frames or bytes than the header/length prefix declares."""


class ArrayMismatch(WireError):
    """An array descriptor is invalid (dtype, shape) or disagrees with its frame."""


class _Bad(Exception):
    """Internal: raised by converters; ``path`` collects location parts innermost first."""

    def __init__(self, reason: str, kind: type[WireError] = FieldError, part: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.path: list[str] = [part] if part else []

    def to_error(self, tag: str) -> WireError:
        path = tag + "".join(reversed(self.path))
        return self.kind(f"{path}: {self.reason}", tag=tag, path=path)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _got(v: Any) -> str:
    return f"got {type(v).__name__} {_short(v)}"


# --------------------------------------------------------------------------- dtypes

_DTYPES: dict[str, np.dtype] = {}
for _name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "float16", "float32", "float64"):
    _dt = np.dtype(_name).newbyteorder("<")
    _DTYPES[_dt.str] = _dt
# Lookup by dtype (equality/hash ignore '=' vs '<' on a little-endian host) -> wire string.
_DTYPE_CODE: dict[np.dtype, str] = {dt: code for code, dt in _DTYPES.items()}


# --------------------------------------------------------------------------- converters
# A converter pair per annotation: enc(value, arrays) -> msgpack-able (appending ndarrays to
# ``arrays``), dec(wire, ctx) -> value. Both raise _Bad; containers add their path part.

Enc = Callable[[Any, list], Any]
Dec = Callable[[Any, "_Arrays"], Any]


class _Arrays:
    """Decode-side array slots for one message; ``used`` enforces one reference per slot."""

    __slots__ = ("arrays", "used")

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.used = [False] * len(arrays)


_NO_ARRAYS = _Arrays([])


def _exact(t: type, name: str) -> Callable[[Any, Any], Any]:
    """Accept exactly type ``t`` (msgpack's own types; never a bool for an int)."""

    def conv(w: Any, _: Any) -> Any:
        if type(w) is t:
            return w
        raise _Bad(f"expected {name}, {_got(w)}")

    return conv


def _enc_bool(v: Any, arrays: list) -> bool:
    if type(v) is bool or isinstance(v, np.bool_):
        return bool(v)
    raise _Bad(f"expected bool, {_got(v)}")


def _enc_int(v: Any, arrays: list) -> int:
    if type(v) is not int:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise _Bad(f"expected int, {_got(v)}")
        v = int(v)
    if _I64_MIN <= v <= _U64_MAX:
        return v
    raise _Bad(f"int {v} outside int64/uint64 range")


def _enc_float(v: Any, arrays: list) -> float:
    if type(v) is float:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise _Bad(f"expected float, {_got(v)}")
    try:
        return float(v)
    except OverflowError:
        raise _Bad(f"int {_short(v)} too large for a float") from None


def _dec_float(w: Any, ctx: _Arrays) -> float:
    if type(w) is float:
        return w
    if type(w) is int:  # "int is accepted for float"
        return float(w)
    raise _Bad(f"expected float, {_got(w)}")


def _enc_str(v: Any, arrays: list) -> str:
    if isinstance(v, str):
        return v if type(v) is str else str.__str__(v)  # plain str of a subclass (StrEnum member)
    raise _Bad(f"expected str, {_got(v)}")


def _enc_bytes(v: Any, arrays: list) -> bytes | bytearray:
    if type(v) is bytes or type(v) is bytearray:
        return v
    if isinstance(v, memoryview):
        return v.tobytes()
    raise _Bad(f"expected bytes, {_got(v)}")


_SCALARS: dict[Any, tuple[Enc, Dec]] = {
    type(None): (_exact(type(None), "None"), _exact(type(None), "None")),
    bool: (_enc_bool, _exact(bool, "bool")),
    int: (_enc_int, _exact(int, "int")),
    float: (_enc_float, _dec_float),
    str: (_enc_str, _exact(str, "str")),
    bytes: (_enc_bytes, _exact(bytes, "bytes")),
}


def _array_conv(tp: Any) -> tuple[Enc, Dec]:
    # npt.NDArray[np.float32] -> enforce the scalar type; bare np.ndarray -> any whitelisted dtype.
    args = typing.get_args(tp)
    want = (typing.get_args(args[1]) or [None])[0] if len(args) == 2 else None
    if not (isinstance(want, type) and issubclass(want, np.generic)):
        want = None

    def enc(v: Any, arrays: list) -> int:
        if type(v) is not np.ndarray:
            if not isinstance(v, np.ndarray) or isinstance(v, np.ma.MaskedArray):
                raise _Bad(f"expected numpy.ndarray, {_got(v)}")
            v = v.view(np.ndarray)
        dt = v.dtype
        if dt not in _DTYPE_CODE:
            if dt.byteorder == ">" and dt.newbyteorder("<") in _DTYPE_CODE:
                v = v.astype(dt.newbyteorder("<"))
            else:
                raise _Bad(f"dtype {dt} is not allowed on the wire")
        if want is not None and not issubclass(dt.type, want):
            raise _Bad(f"expected dtype {want.__name__}, got {dt}")
        if not v.flags.c_contiguous:
            v = v.copy(order="C")
        arrays.append(v)
        return len(arrays) - 1

    def dec(w: Any, ctx: _Arrays) -> np.ndarray:
        if type(w) is not int:
            raise _Bad(f"expected an array slot index, {_got(w)}")
        if not 0 <= w < len(ctx.arrays):
            raise _Bad(f"array slot {w} does not exist ({len(ctx.arrays)} arrays)", ArrayMismatch)
        if ctx.used[w]:
            raise _Bad(f"array slot {w} referenced twice", ArrayMismatch)
        ctx.used[w] = True
        arr = ctx.arrays[w]
        if want is not None and not issubclass(arr.dtype.type, want):
            raise _Bad(f"expected dtype {want.__name__}, got {arr.dtype}", ArrayMismatch)
        return arr

    return enc, dec


def _enum_conv(tp: type[enum.Enum]) -> tuple[Enc, Dec]:
    values = [m.value for m in tp]
    wire_t = next((t for t in (int, str) if issubclass(tp, t) or (values and all(type(x) is t for x in values))), None)
    if wire_t is None:
        raise TypeError(f"enum {tp.__name__}: wire enums need all-int or all-str values")
    members = tp._value2member_map_

    def enc(v: Any, arrays: list) -> Any:
        if type(v) is tp:
            return v._value_
        raise _Bad(f"expected {tp.__name__}, {_got(v)}")

    def dec(w: Any, ctx: _Arrays) -> Any:
        if type(w) is wire_t:
            if (m := members.get(w)) is not None:
                return m
            try:
                return tp(w)  # flag combinations and _missing_ hooks
            except ValueError:
                pass
        raise _Bad(f"expected a {tp.__name__} value, {_got(w)}")

    return enc, dec


def _literal_conv(args: tuple) -> tuple[Enc, Dec]:
    # Keyed by (type, value) so True never matches Literal[1]; enum members belong in an
    # enum-typed field instead, which keeps encode and decode symmetric here.
    for lit in args:
        if not (lit is None or type(lit) in (bool, int, str, bytes)):
            raise TypeError(f"Literal value {lit!r} is not supported on the wire (use None/bool/int/str/bytes)")
    allowed = {(type(a), a) for a in args}
    names = ", ".join(repr(a) for a in args)

    def conv(v: Any, _: Any) -> Any:
        try:
            if (type(v), v) in allowed:
                return v
        except TypeError:  # unhashable value
            pass
        raise _Bad(f"expected one of {names}, {_got(v)}")

    return conv, conv


def _each(convs: Sequence[Callable[[Any, Any], Any]], values: Any, arg: Any) -> list:
    """Convert item i with convs[i]; a failure's path gets ``[i]``."""
    out = []
    for i, (conv, x) in enumerate(zip(convs, values)):
        try:
            out.append(conv(x, arg))
        except _Bad as e:
            e.path.append(f"[{i}]")
            raise
    return out


def _seq_conv(tp: Any, where: str, py_t: type) -> tuple[Enc, Dec]:
    """list[X] (py_t=list) or tuple[X, ...] (py_t=tuple); both travel as msgpack arrays."""
    ienc, idec = _build(tp, where)
    name = py_t.__name__
    # Fast path: a list of plain scalars already is its wire form (token ids, lengths...).
    plain = tp if tp in (bool, str, bytes, float, int) else None

    def enc(v: Any, arrays: list) -> Any:
        if type(v) is not py_t:
            raise _Bad(f"expected {name}, {_got(v)}")
        if plain is not None and set(map(type, v)) <= {plain}:
            return v  # an out-of-range int fails in packb, still as a FieldError
        return _each(itertools.repeat(ienc, len(v)), v, arrays)

    def dec(w: Any, ctx: _Arrays) -> Any:
        if type(w) is not list:
            raise _Bad(f"expected {name}, {_got(w)}")
        if plain is None or not set(map(type, w)) <= {plain}:
            w = _each(itertools.repeat(idec, len(w)), w, ctx)
        return w if py_t is list else tuple(w)

    return enc, dec


def _fixed_tuple_conv(items: list[tuple[Enc, Dec]]) -> tuple[Enc, Dec]:
    n = len(items)
    encs, decs = [e for e, _ in items], [d for _, d in items]

    def enc(v: Any, arrays: list) -> list:
        if type(v) is not tuple or len(v) != n:
            raise _Bad(f"expected tuple of {n}, {_got(v)}")
        return _each(encs, v, arrays)

    def dec(w: Any, ctx: _Arrays) -> tuple:
        if type(w) is not list or len(w) != n:
            raise _Bad(f"expected array of {n}, {_got(w)}")
        return tuple(_each(decs, w, ctx))

    return enc, dec


def _dict_conv(inner: tuple[Enc, Dec]) -> tuple[Enc, Dec]:
    ienc, idec = inner

    def conv(d: Any, arg: Any, fn: Callable[[Any, Any], Any]) -> dict:
        if type(d) is not dict:
            raise _Bad(f"expected dict, {_got(d)}")
        out = {}
        for k, x in d.items():
            if type(k) is not str:
                raise _Bad(f"dict keys must be str, {_got(k)}")
            try:
                out[k] = fn(x, arg)
            except _Bad as e:
                e.path.append(f"[{k!r}]")
                raise
        return out

    return (lambda v, arrays: conv(v, arrays, ienc)), (lambda w, ctx: conv(w, ctx, idec))


def _is_type_alias(x: Any) -> bool:
    # A PEP 695 alias (``type X[T] = ...``): typing.TypeAliasType on 3.12+, typing_extensions'
    # backport elsewhere. Recognised by what it is (a value plus type parameters), not by one
    # module's class, so numpy's NDArray reads the same whichever way a release spells it
    # (numpy < 2.5: a types.GenericAlias of ndarray; >= 2.5: a TypeAliasType).
    # A subscripted alias (``NDArray[T]``, a types.GenericAlias) forwards attribute reads to
    # its origin, so it must not count as the bare alias.
    return (not isinstance(x, type) and typing.get_origin(x) is None
            and hasattr(x, "__value__") and hasattr(x, "__type_params__"))


def _unalias(tp: Any) -> Any:
    """Expand type aliases down to what they stand for, substituting their arguments:
    ``NDArray[np.int32]`` -> ``ndarray[tuple[Any, ...], dtype[np.int32]]``."""
    for _ in range(32):  # an alias of an alias ...; a cycle is a programming error
        if _is_type_alias(tp):
            tp = tp.__value__
            continue
        origin = typing.get_origin(tp)
        if not _is_type_alias(origin):
            return tp
        value, args = origin.__value__, typing.get_args(tp)
        tp = value[args] if getattr(value, "__parameters__", ()) else value
    raise TypeError(f"type alias {tp!r} does not resolve")


def _build(tp: Any, where: str) -> tuple[Enc, Dec]:
    tp = _unalias(tp)
    scalar = _SCALARS.get(type(None) if tp is None else tp)
    if scalar is not None:
        return scalar
    if tp is np.ndarray or typing.get_origin(tp) is np.ndarray:
        return _array_conv(tp)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_conv(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        codec = _by_type.get(tp)
        if codec is None:
            raise TypeError(f"{where}: nested dataclass {tp.__name__} must be decorated with @message")
        return codec.enc_value, codec.dec_fields
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return _literal_conv(args)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            ienc, idec = _build(rest[0], where)
            return (lambda v, a: None if v is None else ienc(v, a)), (lambda w, c: None if w is None else idec(w, c))
        raise TypeError(f"{where}: only `X | None` unions are supported, got {tp!r}")
    if origin is list and len(args) == 1:
        return _seq_conv(args[0], where, list)
    if origin is tuple and tp is not typing.Tuple:  # bare Tuple would read as tuple[()]
        if len(args) == 2 and args[1] is Ellipsis:
            return _seq_conv(args[0], where, tuple)
        return _fixed_tuple_conv([_build(a, where) for a in args])
    if origin is dict and len(args) == 2:
        if args[0] is not str:
            raise TypeError(f"{where}: dict keys must be str, got {args[0]!r}")
        return _dict_conv(_build(args[1], where))
    raise TypeError(f"{where}: unsupported field type {tp!r}")


# --------------------------------------------------------------------------- registry


class _Codec:
    """Per-class converters, compiled at registration or, when an annotation names a class
    defined later in its module (forward reference), at first use."""

    __slots__ = ("cls", "tag", "fields", "names")

    def __init__(self, cls: type, tag: str) -> None:
        self.cls, self.tag = cls, tag
        self.fields: tuple[tuple[str, Enc, Dec], ...] = ()
        self.names: frozenset[str] | None = None  # None until compiled

    def compile(self) -> None:
        hints = typing.get_type_hints(self.cls)
        fields = []
        for f in dataclasses.fields(self.cls):
            if not f.init:
                raise TypeError(f"{self.tag}.{f.name}: init=False fields cannot travel on the wire")
            fields.append((f.name, *_build(hints[f.name], f"{self.tag}.{f.name}")))
        self.fields = tuple(fields)
        self.names = frozenset(name for name, _, _ in fields)

    def enc_value(self, v: Any, arrays: list) -> dict:
        if type(v) is not self.cls:
            raise _Bad(f"expected {self.cls.__name__}, {_got(v)}")
        return self.enc_fields(v, arrays)

    def enc_fields(self, msg: Any, arrays: list) -> dict:
        if self.names is None:
            self.compile()
        out = {}
        for name, enc, _ in self.fields:
            try:
                out[name] = enc(getattr(msg, name), arrays)
            except _Bad as e:
                e.path.append("." + name)
                raise
        return out

    def dec_fields(self, w: Any, ctx: _Arrays) -> Any:
        if type(w) is not dict:
            raise _Bad(f"expected a map of {self.cls.__name__} fields, {_got(w)}")
        if self.names is None:
            self.compile()
        kw = {}
        for name, _, dec in self.fields:
            if name not in w:
                raise _Bad("missing field", part="." + name)
            try:
                kw[name] = dec(w[name], ctx)
            except _Bad as e:
                e.path.append("." + name)
                raise
        if len(w) != len(kw):
            extra = next(k for k in w if k not in self.names)
            raise _Bad("unexpected field", part=f".{extra}" if type(extra) is str else f"[{extra!r}]")
        try:
            return self.cls(**kw)
        except (TypeError, ValueError) as exc:  # the class's own __post_init__ validation
            raise _Bad(f"rejected by {self.cls.__name__}: {exc}") from None


_by_tag: dict[str, _Codec] = {}
_by_type: dict[type, _Codec] = {}


def message(tag: str) -> Callable[[type], type]:
    """Register a frozen dataclass as the wire message ``tag``.

    Raises ``ValueError`` for a duplicate tag and ``TypeError`` for a class that is not a
    frozen dataclass or has a field type the wire cannot carry.
    """
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"message tag must be a non-empty str, got {tag!r}")

    def register(cls: type) -> type:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise TypeError(f"@message({tag!r}) needs a dataclass, got {cls!r}")
        if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"@message({tag!r}): {cls.__name__} must be frozen=True")
        old = _by_tag.get(tag)
        # Re-registering the same module-level class (module reload) replaces it; any
        # other clash is two protocols claiming one tag.
        if old is not None and (old.cls.__module__, old.cls.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"message tag {tag!r} already used by {old.cls.__module__}.{old.cls.__qualname__}")
        if cls in _by_type:
            raise ValueError(f"{cls.__qualname__} is already registered as {_by_type[cls].tag!r}")
        codec = _Codec(cls, tag)
        try:
            codec.compile()
        except NameError:
            pass  # forward reference to a later class: compiled at first use
        if old is not None:
            _by_type.pop(old.cls, None)
        _by_tag[tag] = codec
        _by_type[cls] = codec
        return cls

    return register


def registered() -> dict[str, type]:
    """Tag -> class of every registered message."""
    return {tag: c.cls for tag, c in _by_tag.items()}


# --------------------------------------------------------------------------- encode / decode


def encode(msg: Any) -> list[bytes | memoryview]:
    """Frame 0: msgpack header; frames 1..n: the arrays' memory (no copy when C-contiguous)."""
    codec = _by_type.get(type(msg))
    if codec is None:
        raise UnknownMessageType(f"{type(msg).__qualname__} is not a registered @message class")
    arrays: list[np.ndarray] = []
    try:
        fields = codec.enc_fields(msg, arrays)
    except _Bad as e:
        raise e.to_error(codec.tag) from None
    except RecursionError:  # only a self-referencing message type can nest this deep
        raise FieldError(f"{codec.tag}: message nests too deeply", tag=codec.tag) from None
    descr = [[_DTYPE_CODE[a.dtype], list(a.shape), a.nbytes] for a in arrays]
    try:
        head = msgpack.packb({"t": codec.tag, "v": WIRE_VERSION, "f": fields, "a": descr}, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a str with lone surrogates
        raise FieldError(f"{codec.tag}: cannot pack: {exc}", tag=codec.tag) from exc
    return [head, *(a.reshape(-1).view(np.uint8).data for a in arrays)]


def _byte_view(frame: Any, what: str) -> memoryview:
    try:
        mv = memoryview(frame)
    except TypeError:
        raise MalformedFrame(f"{what} is {type(frame).__name__}, not a buffer") from None
    if mv.ndim != 1 or mv.format != "B":
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError) as exc:
            raise MalformedFrame(f"{what} is not a contiguous byte buffer: {exc}") from None
    return mv


def _decode_array(i: int, entry: Any, frame: Any) -> np.ndarray:
    if type(entry) is not list or len(entry) != 3:
        raise ArrayMismatch(f"array {i}: descriptor must be [dtype, shape, nbytes], {_got(entry)}")
    code, shape, nbytes = entry
    dt = _DTYPES.get(code) if type(code) is str else None
    if dt is None:
        raise ArrayMismatch(f"array {i}: dtype {_short(code)} is not allowed")
    if type(shape) is not list or len(shape) > _MAX_NDIM:
        raise ArrayMismatch(f"array {i}: shape must be a list of at most {_MAX_NDIM} ints")
    for d in shape:
        if type(d) is not int or not 0 <= d <= _MAX_DIM:
            raise ArrayMismatch(f"array {i}: bad dimension {_short(d)} in shape")
    if type(nbytes) is not int:
        raise ArrayMismatch(f"array {i}: nbytes must be int, {_got(nbytes)}")
    expect = math.prod(shape) * dt.itemsize
    if expect != nbytes:
        raise ArrayMismatch(f"array {i}: shape {shape} of {code} is {expect} bytes, header says {nbytes}")
    mv = _byte_view(frame, f"frame {i + 1}")
    if mv.nbytes != nbytes:
        raise ArrayMismatch(f"array {i}: frame has {mv.nbytes} bytes, header says {nbytes}")
    try:
        return np.frombuffer(mv, dtype=dt).reshape(shape)
    except ValueError as exc:
        raise ArrayMismatch(f"array {i}: {exc}") from None


def decode(frames: Sequence[Any], *, expect: type | tuple[type, ...] | None = None) -> Any:
    """Inverse of ``encode``. Arrays share the frames' memory (read-only if the frame is).

    ``expect`` optionally restricts the accepted classes (``UnexpectedMessage`` otherwise).
    Only ``WireError`` subclasses are raised for bad input.
    """
    if isinstance(frames, (bytes, bytearray, memoryview, str)) or not isinstance(frames, Sequence):
        raise MalformedFrame(f"decode() takes a sequence of frames (see split_frames), got {type(frames).__name__}")
    if not (n_frames := len(frames)):
        raise MalformedFrame("no frames")
    head = frames[0]
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except (ValueError, TypeError, BufferError, msgpack.UnpackException) as exc:
        raise MalformedFrame(f"frame 0 is not a msgpack header: {exc}") from None
    if type(header) is not dict or header.keys() != _HEADER_KEYS:
        raise MalformedFrame(f"header must be a map with keys t, v, f, a; {_got(header)}")
    version = header["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise MalformedFrame(f"unsupported wire version {_short(version)} (expected {WIRE_VERSION})")
    tag = header["t"]
    if type(tag) is not str:
        raise MalformedFrame(f"message tag must be str, {_got(tag)}")
    codec = _by_tag.get(tag)
    if codec is None:
        raise UnknownMessageType(f"unknown message type {_short(tag)}", tag=tag)
    if expect is not None and codec.cls not in (expect if isinstance(expect, tuple) else (expect,)):
        raise UnexpectedMessage(f"unexpected message {tag!r}", tag=tag)
    fields, descr = header["f"], header["a"]
    if type(fields) is not dict:
        raise MalformedFrame(f"{tag}: fields must be a map, {_got(fields)}", tag=tag)
    if type(descr) is not list:
        raise MalformedFrame(f"{tag}: array list must be a list, {_got(descr)}", tag=tag)
    if n_frames - 1 != len(descr):
        kind = TruncatedFrame if n_frames - 1 < len(descr) else MalformedFrame
        raise kind(f"{tag}: header declares {len(descr)} array frames, got {n_frames - 1}", tag=tag)
    if descr:
        try:
            ctx = _Arrays([_decode_array(i, e, frames[i + 1]) for i, e in enumerate(descr)])
        except WireError as exc:
            exc.tag = tag
            raise
    else:
        ctx = _NO_ARRAYS
    try:
        msg = codec.dec_fields(fields, ctx)
    except _Bad as e:
        raise e.to_error(tag) from None
    except RecursionError:  # msgpack allows ~1000 levels; a recursive type can exhaust the stack
        raise MalformedFrame(f"{tag}: message nests too deeply", tag=tag) from None
    if descr and not all(ctx.used):
        raise ArrayMismatch(f"{tag}: array frames {[i for i, u in enumerate(ctx.used) if not u]} are not referenced", tag=tag)
    return msg


# --------------------------------------------------------------------------- joined buffers

_U32 = struct.Struct("<I")


def join_frames(frames: Sequence[Any]) -> bytes:
    """One buffer ``[u32 n][u64 len_i]*n`` + bodies (little-endian), for single-buffer transports."""
    views = [_byte_view(f, f"frame {i}") for i, f in enumerate(frames)]
    head = struct.pack(f"<I{len(views)}Q", len(views), *(v.nbytes for v in views))
    return b"".join([head, *views])


def split_frames(buf: Any) -> list[memoryview]:
    """Inverse of ``join_frames``; the returned frames are views into ``buf`` (no copies)."""
    mv = _byte_view(buf, "joined buffer")
    total = mv.nbytes
    if total < 4:
        raise TruncatedFrame(f"joined buffer of {total} bytes has no frame count")
    (n,) = _U32.unpack_from(mv, 0)
    off = 4 + 8 * n
    if off > total:
        raise TruncatedFrame(f"joined buffer declares {n} frames but has only {total} bytes")
    lengths = struct.unpack_from(f"<{n}Q", mv, 4)
    out = []
    for i, ln in enumerate(lengths):
        end = off + ln
        if end > total:
            raise TruncatedFrame(f"frame {i} declares {ln} bytes, {total - off} left")
        out.append(mv[off:end])
        off = end
    if off != total:
        raise MalformedFrame(f"joined buffer has {total - off} trailing bytes")
    return out
