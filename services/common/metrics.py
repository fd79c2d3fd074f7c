"""Prometheus metrics of one pod process: the per-process registry, the naming rule, and the
``/metrics`` HTTP server that ``ServiceRuntime`` (and the fabric simulator) starts.

Naming (vLLM's style, e.g. ``vllm:time_to_first_token_seconds``): every family is
``xds:<what>[_<unit>]``; durations end in ``_seconds``, byte counts in ``_bytes``. Counters are
*declared without* ``_total``: prometheus_client appends it to the exposed family (and would
strip a ``_total`` given to it, so declaring the base name is the one unambiguous spelling).
``:`` is legal in classic Prometheus names (``[a-zA-Z_:][a-zA-Z0-9_:]*``); Prometheus reserves
it for recording rules by convention only, and vLLM uses it all the same.

Hot paths pay one ``inc``/``observe`` (a lock and an add); state that already lives in a
service (queue depths, KV blocks in use, batch size) is *sampled at scrape time* by
``sampled()`` instead of being mirrored on every change. The server runs on the service's own
event loop (no thread), so a scrape reads that state between two loop steps, never mid-update.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector

from services.common.logging import get_logger

PREFIX = "xds:"
# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
# Sub-millisecond to a second: one MoE layer's dispatch or combine on this emulated fabric.
HOP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)   # process_cpu_seconds_total, process_resident_memory_bytes, ...
_made: dict[str, Any] = {}
log = get_logger()


class MetricNameError(ValueError):
    pass


def check_name(name: str, kind: str) -> None:
    """The naming rule, as an error that says what to change."""
    if not name.startswith(PREFIX) or len(name) <= len(PREFIX):
        raise MetricNameError(f"metric {name!r}: names start with {PREFIX!r}")
    if kind == "counter" and name.endswith("_total"):
        raise MetricNameError(f"counter {name!r}: declare it without '_total' (prometheus_client appends it)")
    if kind != "counter" and name.endswith("_total"):
        raise MetricNameError(f"{kind} {name!r}: only counters end in '_total'")
    if set(name[len(PREFIX):].split("_")) & {"ms", "us", "ns", "millis", "milliseconds", "microseconds", "minutes"}:
        raise MetricNameError(f"metric {name!r}: durations are in seconds ('_seconds')")


def _get(kind: str, cls: type, name: str, doc: str, labels: Sequence[str], **kw: Any) -> Any:
    """Idempotent per process: a second service object in the same process (tests) shares it."""
    check_name(name, kind)
    m = _made.get(name)
    if m is None:
        m = _made[name] = cls(name, doc, tuple(labels), registry=REGISTRY, **kw)
    elif not isinstance(m, cls):
        raise MetricNameError(f"metric {name!r} already declared as {type(m).__name__}")
    return m


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    return _get("counter", Counter, name, doc, labels)


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    return _get("gauge", Gauge, name, doc, labels)


def histogram(name: str, doc: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> Histogram:
    return _get("histogram", Histogram, name, doc, labels, buckets=tuple(buckets))


Sample = float | Mapping[tuple[str, ...], float]


class _Sampled:
    """Families read from a service's own state at scrape time (``fn`` is called on the loop)."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, tuple[str, ...], Callable[[], Sample]]] = {}

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        for name, (kind, doc, labels, fn) in list(self.families.items()):
            value = fn()
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = cls(name, doc, labels=labels if labels else None)
            if isinstance(value, Mapping):
                for key, v in value.items():
                    fam.add_metric(list(key), float(v))
            else:
                fam.add_metric([], float(value))
            yield fam


_SAMPLED = _Sampled()
REGISTRY.register(_SAMPLED)


def sampled(name: str, doc: str, fn: Callable[[], Sample], labels: Sequence[str] = (), *,
            kind: str = "gauge") -> None:
    """A gauge (or, ``kind="counter"``, a counter a service already keeps: declared without
    ``_total``) computed by ``fn`` at each scrape: a number, or {label values: number}.
    Declaring the same name again replaces ``fn`` (the newest service object of the process)."""
    if kind not in ("gauge", "counter"):
        raise MetricNameError(f"sampled metric {name!r}: kind is 'gauge' or 'counter', not {kind!r}")
    check_name(name, kind)
    if name in _made:
        raise MetricNameError(f"metric {name!r} already declared as {type(_made[name]).__name__}")
    _SAMPLED.families[name] = (kind, doc, tuple(labels), fn)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


# --------------------------------------------------------------------------- peers

_PEER_STATES = ("alive", "suspect", "dead")


def peer_state(peer: str, state: str) -> None:
    """``xds:peer_state{peer,state}``: 1 for the state this process's failure detector holds
    for ``peer`` (alive / suspect / dead), 0 for the others."""
    g = gauge("xds:peer_state", "Liveness of a watched peer, as this process's failure detector sees it "
              "(1 for the current state).", ("peer", "state"))
    for s in _PEER_STATES:
        g.labels(peer, s).set(1.0 if s == state else 0.0)


# --------------------------------------------------------------------------- HTTP

MAX_REQUEST_HEAD = 8192
READ_TIMEOUT_S = 5.0


class MetricsServer:
    """``GET /metrics`` over HTTP/1.x on ``host:port`` (port 0: any free port; ``url`` is the
    real one). One response per connection (``Connection: close``). Anything else: 404/405."""

    def __init__(self, bind: str, *, advertise_host: str | None = None) -> None:
        host, _, port = bind.rpartition(":")
        self._host, self._port = host, int(port)
        self._advertise = advertise_host
        self._server: asyncio.base_events.Server | None = None
        self.scrapes = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self._host, self._port)
        self._port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self._advertise or self._host}:{self._port}/metrics"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ") + ["", ""]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET\n"
            elif path.split("?", 1)[0] != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
            else:
                self.scrapes += 1
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, exposition()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:   # a collector's bug: the scrape fails, saying why; the service stays up
                    log.exception("metrics.collect_failed")
                    status, ctype, body = "500 Internal Server Error", "text/plain", f"{exc!r}\n".encode()
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass  # a client that went away or sent garbage: nothing to answer
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
