"""OpenTelemetry for every RPC: a server span, RPC metrics and an access log line.

All three are decided once, when the server composes its handlers: with no SDK
configured (the API's proxy providers) and the access log off, nothing observes
the RPCs, so telemetry costs nothing.  Otherwise meshrpc's handler wrapper begins
an `Observation` before the handler and finishes it after.  Span and
metric names follow the RPC semantic conventions as the OpenTelemetry gRPC
instrumentations emit them
(``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``,
``rpc.server.duration`` in ms).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._aggregates import BATCH, Aggregates, Stream
from ._errors import StatusError
from ._failures import final_code
from ._overload import LoadShedder
from ._propagation import Incoming, as_context
from ._rpc_context import current_rpc, incoming_metadata, metadata_key, request_metadata
from ._sampling import LOW_64, Dropped, PreSampler, dropped_span, getrandbits, new_dropped
from ._service import MethodSpec, RpcKind
from ._spans import ServerSpan
from ._version import __version__

access_logger = logging.getLogger("meshrpc.access")
_ACCESS = {"meshrpc_access": True}

# Server spans are errors for these codes only; the rest are the client's business.
ERROR_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def sdk_configured() -> tuple[bool, bool]:
    """Whether a real tracer provider and a real meter provider are installed (not the API's proxies)."""
    tracer_provider = trace.get_tracer_provider()
    tracing = not isinstance(tracer_provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))
    meter_provider = metrics.get_meter_provider()
    metering = type(meter_provider).__name__ not in ("_ProxyMeterProvider", "NoOpMeterProvider")
    return tracing, metering


@dataclasses.dataclass(frozen=True)
class Telemetry:
    """What to observe, decided once at startup."""

    tracing: bool
    metrics: bool
    access_log: str  # "off", "text" or "json"
    access_log_sample_rate: float
    server_address: str
    server_port: int
    shedder: LoadShedder | None = None  # whose counters and gauges the metrics report
    # The histograms' aggregates, when meshrpc built the MeterProvider (None: record through the SDK).
    aggregates: Aggregates | None = None

    @property
    def enabled(self) -> bool:
        return self.tracing or self.metrics or self.access_log != "off"


# Each status code's number, read once: an enum's ``.value`` is a descriptor call, and
# this is asked once per RPC (OK's, the most asked, without even the lookup: a status
# code's hash is Enum's, in Python).
_CODE_NUMBERS = {code: code.value[0] for code in grpc.StatusCode}
_OK = grpc.StatusCode.OK
_STATUS_CODE = grpc.StatusCode
_ABSENT = object()  # dropped_span's value outside a server's RPC tasks


class _Instruments:
    def __init__(self, methods: dict[str, _Method], shedder: LoadShedder | None, aggregates: Aggregates | None) -> None:
        meter = metrics.get_meter("meshrpc", __version__)
        if shedder is not None:
            # Plain counters kept by the shedder, read only when the SDK collects.
            self.shedder = shedder
            meter.create_observable_counter(
                "meshrpc.server.refused",
                callbacks=[self._observe_refused],
                unit="{call}",
                description="Calls refused before their handler ran, by reason: overload (shed) or late.",
            )
            meter.create_observable_gauge(
                "meshrpc.server.shed_share",
                callbacks=[lambda options: [metrics.Observation(shedder.share)]],
                unit="1",
                description="The share of new calls being shed now (0: all admitted).",
            )
            meter.create_observable_gauge(
                "meshrpc.server.queue_delay",
                callbacks=[lambda options: [metrics.Observation(shedder.delay * 1000)]],
                unit="ms",
                description="How late the event loop ran a timer at the last sample: the queueing delay.",
            )
        # The three histograms: aggregated by meshrpc and handed over when a reader
        # collects, when meshrpc built the MeterProvider (see _aggregates); otherwise
        # recorded through the SDK on every call.
        self.aggregates = aggregates
        make: Callable[..., Any] = aggregates.histogram if aggregates is not None else meter.create_histogram
        self.duration = make("rpc.server.duration", unit="ms", description="Measures the duration of inbound RPC.")
        # RPCs in flight per method, counted in plain ints and read when the SDK collects:
        # two synchronous add() calls per RPC cost about a third of all per-RPC telemetry.
        self.methods = methods  # the server's, by path: each counts its own
        meter.create_observable_up_down_counter(
            "rpc.server.active_requests",
            callbacks=[self._observe_active],
            unit="{request}",
            description="RPCs being served now.",
        )
        self.requests_per_rpc = make(
            "rpc.server.requests_per_rpc", unit="{count}", description="Messages received per streaming RPC."
        )
        self.responses_per_rpc = make(
            "rpc.server.responses_per_rpc", unit="{count}", description="Messages sent per streaming RPC."
        )

    def _observe_refused(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [
            metrics.Observation(self.shedder.shed, {"reason": "overload"}),
            metrics.Observation(self.shedder.late, {"reason": "late"}),
        ]

    def _observe_active(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(method.active, method.metric_attrs) for method in self.methods.values()]


class _Streams:
    """One method's histogram streams for one status code, in each of meshrpc's readers."""

    __slots__ = ("attributes", "duration", "requests", "responses")

    def __init__(self, instruments: _Instruments, attributes: dict[str, Any]) -> None:
        self.attributes = attributes
        self.duration = instruments.duration.streams_for(attributes)
        self.requests: tuple[Stream, ...] | None = None  # made at their first record, as the SDK makes them
        self.responses: tuple[Stream, ...] | None = None

    def requests_in(self, instruments: _Instruments) -> tuple[Stream, ...]:
        if self.requests is None:
            self.requests = instruments.requests_per_rpc.streams_for(self.attributes)
        return self.requests

    def responses_in(self, instruments: _Instruments) -> tuple[Stream, ...]:
        if self.responses is None:
            self.responses = instruments.responses_per_rpc.streams_for(self.attributes)
        return self.responses


def _peer_address(peer: str) -> tuple[str, int | None]:
    # grpc's peer strings: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else None
    return rest or peer, None


class _Method:
    """What observing one method needs, built once when its handler is composed, so an
    RPC looks nothing up by the method's name."""

    PEER_CACHE = 4096  # attribute sets kept per method; peers repeat for a connection's life

    def __init__(self, tools: _Tools, spec: MethodSpec) -> None:
        self.path = spec.path
        self.tracer = tools.tracer
        self.presampler = tools.presampler
        self.incoming = tools.incoming
        self.instruments = tools.instruments
        self.access_log = tools.access_log
        self.sample_rate = tools.sample_rate
        # The clock is read only for what records a duration: metrics or the access log.
        self.timed = self.instruments is not None or self.access_log != "off"
        self.span_name = f"{spec.service}/{spec.name}"
        self.metric_attrs: dict[str, Any] = {"rpc.system": "grpc", "rpc.service": spec.service, "rpc.method": spec.name}
        self.span_attrs = {
            **self.metric_attrs,
            "server.address": tools.server_address,
            "server.port": tools.server_port,
        }
        self.records_requests = spec.kind in (RpcKind.STREAM_UNARY, RpcKind.STREAM_STREAM)
        self.records_responses = spec.kind in (RpcKind.UNARY_STREAM, RpcKind.STREAM_STREAM)
        self.active = 0  # RPCs of this method in flight, read when metrics are collected
        self._by_peer: dict[str, dict[str, Any]] = {}
        self._by_code: dict[grpc.StatusCode, dict[str, Any]] = {}
        self._streams: dict[grpc.StatusCode, _Streams] = {}
        # OK's streams, found without the dict: a status code's hash is Enum's, in Python.
        self._ok: _Streams | None = None
        self.logs = self.access_log != "off"
        # A call that ended OK (most calls) of a unary or server-streaming method has its
        # measurements queued per method, aggregated with the batch (see Aggregates.queue): a
        # unary call's duration as a plain number, a server stream's as (duration, replies
        # sent or None).  Other calls' measurements wait in Aggregates.pending.
        aggregates = self.instruments.aggregates if self.instruments is not None else None
        self.ok_calls: collections.deque[Any] | None = None
        if aggregates is not None and not self.records_requests:
            record = self._aggregate_ok_streams if self.records_responses else self._aggregate_ok
            self.ok_calls = aggregates.queue(record)

    def span_attributes(self, peer: str) -> dict[str, Any]:
        """A server span's attributes when called from ``peer``, built once per peer.

        The SDK copies what it is given, so one dict serves every span of a connection.
        """
        attributes = self._by_peer.get(peer)
        if attributes is None:
            if len(self._by_peer) >= self.PEER_CACHE:
                self._by_peer.clear()
            host, port = _peer_address(peer)
            attributes = {**self.span_attrs, "client.address": host}
            if port is not None:
                attributes["client.port"] = port
            self._by_peer[peer] = attributes
        return attributes

    def code_attributes(self, code: grpc.StatusCode) -> dict[str, Any]:
        """The metric attributes of an RPC that ended with ``code``, built once per code."""
        attributes = self._by_code.get(code)
        if attributes is None:
            attributes = self._by_code[code] = {**self.metric_attrs, "rpc.grpc.status_code": _CODE_NUMBERS[code]}
        return attributes

    def record(
        self, instruments: _Instruments, code: grpc.StatusCode, elapsed_ms: float, received: int, sent: int | None
    ) -> None:
        """Record one finished RPC in the histograms through the SDK (a MeterProvider meshrpc
        did not build; with meshrpc's aggregates, see `aggregate`)."""
        attrs = self.code_attributes(code)
        instruments.duration.record(elapsed_ms, attrs)
        if self.records_requests:
            instruments.requests_per_rpc.record(received, attrs)
        if sent is not None and self.records_responses:
            instruments.responses_per_rpc.record(sent, attrs)

    def _streams_for(self, instruments: _Instruments, code: grpc.StatusCode) -> _Streams:
        streams = self._ok if code is _OK else self._streams.get(code)
        if streams is None:
            streams = self._streams[code] = _Streams(instruments, self.code_attributes(code))
            if code is _OK:
                self._ok = streams
        return streams

    def _aggregate_ok(self, durations: list[float]) -> None:
        """Put the durations of unary calls that ended OK into meshrpc's aggregates, a batch at a time."""
        assert self.instruments is not None
        for stream in self._streams_for(self.instruments, _OK).duration:
            stream.record_many(durations)

    def _aggregate_ok_streams(self, calls: list[tuple[float, int | None]]) -> None:
        """Put server streams that ended OK, ``(duration, replies sent or None)`` each, into
        meshrpc's aggregates, a batch at a time: as `aggregate` puts them, one by one."""
        instruments = self.instruments
        assert instruments is not None
        streams = self._streams_for(instruments, _OK)
        durations = [duration for duration, _ in calls]
        for stream in streams.duration:
            stream.record_many(durations)
        sent = [count for _, count in calls if count is not None]
        if sent:
            for stream in streams.responses_in(instruments):
                stream.record_many(sent)

    def aggregate(
        self, instruments: _Instruments, code: grpc.StatusCode, elapsed_ms: float, received: int, sent: int | None
    ) -> None:
        """Put one finished RPC into meshrpc's aggregates (a batch at a time, see `Aggregates.aggregate_batch`)."""
        streams = self._streams_for(instruments, code)
        for stream in streams.duration:
            stream.record(elapsed_ms)
        if self.records_requests:
            for stream in streams.requests_in(instruments):
                stream.record(received)
        if sent is not None and self.records_responses:
            for stream in streams.responses_in(instruments):
                stream.record(sent)


class Observation:
    """One RPC's telemetry: begun before the handler, finished after it.

    ``received`` is counted by whoever reads a client's stream.
    """

    __slots__ = ("context", "method", "received", "span", "start", "token")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext[Any, Any], drawn: int = 0) -> None:
        """``drawn``: a new trace's id, drawn by the call's lane already (see Lane); 0: drawn here."""
        self.method = method
        self.context = context
        self.start = time.perf_counter() if method.timed else 0.0
        self.received = 0
        tracer = method.tracer
        if tracer is not None:
            # The caller's span context, read by meshrpc for a lone traceparent, or the
            # context the global propagator extracted (see _propagation).  A call with
            # none of the propagator's headers (no traced caller) is told by a set
            # operation, without extract's call; a call whose lane drew its trace id had
            # none (see Lane).
            if drawn:
                remote = parent = None
            else:
                metadata = request_metadata(context, method.path)
                incoming = method.incoming
                fields = incoming.fields
                remote, parent = (
                    (None, None) if fields.isdisjoint(map(metadata_key, metadata)) else incoming.extract(metadata)
                )
            presampler = method.presampler
            if presampler is not None:
                # Decided before the SDK: only a sampled call's span is the SDK's.  A new
                # trace the ratio drops, most calls, is decided here, by PreSampler.start's
                # rule (the id's low 64 bits against the bound) and without its call.
                new_trace = presampler.random_ids and remote is None and parent is None
                trace_id = (drawn or getrandbits(128)) if new_trace else 0
                span: trace.Span
                if trace_id and (trace_id & LOW_64) >= presampler.bound:
                    span = dropped = new_dropped(Dropped)
                    dropped.parts = (trace_id, presampler.new_trace_flags, None, presampler.span_id)
                else:
                    span = presampler.start(
                        method.span_name, parent, method.span_attributes, context.peer, remote, trace_id
                    )
            else:
                # All attributes at start: one validation pass instead of one locked set per attribute.
                span = tracer.start_span(
                    method.span_name,
                    context=as_context(remote) if remote is not None else parent,
                    kind=SpanKind.SERVER,
                    attributes=method.span_attributes(context.peer() or ""),
                )
            self.span: trace.Span | None = span
            # The span is current while the handler runs: its own spans and log lines nest
            # under it.  A dropped call's span is set behind the stand-in that is current in
            # every RPC task already, where the server installed one (see StandIn).
            if span.__class__ is Dropped and dropped_span.get(_ABSENT) is not _ABSENT:
                dropped_span.set(span)
                self.token: object | None = None
            else:
                self.token = otel_context.attach(trace.set_span_in_context(span))
        else:
            self.span = self.token = None
        if method.instruments is not None:
            method.active += 1

    @classmethod
    def adopted(
        cls, method: _Method, context: grpc.aio.ServicerContext[Any, Any], start: float, span: Dropped | None
    ) -> Observation:
        """The observation of a call its lane began (see Lane), for a call that did not end as
        the lane ends it: ``start`` its clock reading, ``span`` its dropped span if it has one."""
        obs = cls.__new__(cls)
        obs.method, obs.context, obs.start, obs.received = method, context, start, 0
        obs.span, obs.token = span, None
        return obs

    def finish(self, exc: BaseException | None, sent: int | None, logged: bool | None = None) -> None:
        """End the RPC's span and record it: ``exc`` is what the handler raised (None if it
        returned), ``sent`` the replies of a server stream (None if not known), ``logged``
        whether the access log writes this call (None: its sample rate decides here)."""
        method = self.method
        # final_code's first case inline, a handler that returned (most calls): the code it
        # set, and OK for anything else (None: none set).
        code = self.context.code() if exc is None else final_code(self.context, exc)
        if code.__class__ is not _STATUS_CODE:
            code = _OK
        elapsed_ms = (time.perf_counter() - self.start) * 1000 if method.timed else 0.0
        span = self.span
        if span is not None:
            token = self.token
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
            if span.__class__ is not Dropped and span.is_recording():  # not for the ones the sampler dropped
                number = 0 if code is _OK else _CODE_NUMBERS[code]
                if span.__class__ is ServerSpan:
                    span.own_attribute("rpc.grpc.status_code", number)
                else:
                    span.set_attribute("rpc.grpc.status_code", number)
                if code is not _OK and code in ERROR_CODES:
                    self._record_error(span, code, exc)
                span.end()
        instruments = method.instruments
        if instruments is not None:
            method.active -= 1
            aggregates = instruments.aggregates
            if aggregates is not None:  # aggregated with the next batch (see Aggregates.aggregate_batch)
                ok_calls = method.ok_calls
                if ok_calls is not None and code is _OK:
                    ok_calls.append((elapsed_ms, sent) if method.records_responses else elapsed_ms)
                    if len(ok_calls) >= BATCH:
                        aggregates.aggregate_batch()
                else:
                    pending = aggregates.pending
                    pending.append((method.aggregate, instruments, code, elapsed_ms, self.received, sent))
                    if len(pending) >= BATCH:
                        aggregates.aggregate_batch()
            else:
                method.record(instruments, code, elapsed_ms, self.received, sent)
        if logged is None:
            logged = method.logs and (method.sample_rate >= 1.0 or random.random() < method.sample_rate)
        if logged:
            self._access_log(code, elapsed_ms)

    def _record_error(self, span: trace.Span, code: grpc.StatusCode, exc: BaseException | None) -> None:
        if exc is not None and not isinstance(exc, (StatusError, grpc.aio.AbortError, asyncio.CancelledError)):
            span.record_exception(exc)
        details = exc.message if isinstance(exc, StatusError) else self.context.details()
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))

    def _access_log(self, code: grpc.StatusCode, elapsed_ms: float) -> None:
        span_context = self.span.get_span_context() if self.span is not None else None
        trace_id = f"{span_context.trace_id:032x}" if span_context and span_context.is_valid else _rpc_trace_id()
        record = {
            "method": self.method.path,
            "status": code.name,
            "duration_ms": round(elapsed_ms, 3),
            "peer": self.context.peer(),
            "trace_id": trace_id,
        }
        # The record carries its own trace id: the log format adds none (one JSON object per line).
        if self.method.access_log == "json":
            access_logger.info(json.dumps(record, separators=(",", ":")), extra=_ACCESS)
        else:
            access_logger.info(" ".join(f"{k}={escape(v)}" for k, v in record.items() if v != ""), extra=_ACCESS)


class Lane:
    """How the wrapper of a unary or server-streaming call observes the calls that go as most
    do, inline: a new trace the sampler drops, a handler that returns without setting a
    status, no access-log line.  For those the wrapper reads the clock, draws the trace id
    and sets the dropped span behind the stand-in, and queues the measurements (see
    ``_Method.ok_calls``), in its own frame; anything else (a
    caller's trace context, a sampled call, an error, a logged call) is observed by an
    `Observation` as before, begun with the id the lane drew so the decision is the one
    made.  Under a saturating load, the Observation's calls (a partial, its ``__init__``,
    ``finish``, reading the metadata) cost about 3 % of raw grpc.aio's throughput
    (docs/performance.md); each is a frame of Python run from cold caches.

    Built per method when every part of its telemetry can go this way: traces decided by
    a ratio over the SDK's random ids (or no traces), histograms meshrpc aggregates (or
    none), an access log that samples (or none).
    """

    __slots__ = ("aggregates", "fields", "method", "ok_calls", "path", "presampler", "rate", "timed")

    ABSENT = _ABSENT  # dropped_span's value outside a server that stands the stand-in in

    def __init__(self, method: _Method) -> None:
        self.method = method
        self.path = method.path
        self.presampler = method.presampler  # None: no traces
        self.fields = method.incoming.fields
        self.ok_calls = method.ok_calls  # None: no histograms
        self.aggregates = method.instruments.aggregates if method.instruments is not None else None
        # The chance that a call writes an access-log line (0 without the log).
        self.rate = method.sample_rate if method.logs else 0.0
        self.timed = method.timed

    @staticmethod
    def of(method: _Method) -> Lane | None:
        presampler = method.presampler
        if method.tracer is not None and (presampler is None or not presampler.random_ids):
            return None  # the SDK decides, or draws the ids: only the Observation calls it
        if method.instruments is not None and method.ok_calls is None:
            return None  # histograms through the SDK (a MeterProvider meshrpc did not build), or a client stream
        if method.logs and method.sample_rate >= 1.0:
            return None  # every call logs: every call needs the Observation
        if presampler is not None and presampler.bound > LOW_64:
            return None  # every new trace sampled: every call needs the Observation
        return Lane(method)


class _Tools:
    """Per-server telemetry objects, built once."""

    def __init__(self, telemetry: Telemetry) -> None:
        self.tracer = trace.get_tracer("meshrpc", __version__) if telemetry.tracing else None
        self.presampler = PreSampler.for_tracer(self.tracer) if self.tracer is not None else None
        self.incoming = Incoming()
        self.access_log = telemetry.access_log
        self.sample_rate = telemetry.access_log_sample_rate
        self.server_address = telemetry.server_address
        self.server_port = telemetry.server_port
        self._methods: dict[str, _Method] = {}
        self.instruments = (
            _Instruments(self._methods, telemetry.shedder, telemetry.aggregates) if telemetry.metrics else None
        )

    def begin_for(self, spec: MethodSpec) -> Begin:
        """How each RPC of ``spec`` begins its observation."""
        return functools.partial(Observation, self._method(spec))

    def lane_for(self, spec: MethodSpec) -> Lane | None:
        """How an RPC of ``spec`` is observed inline when it goes as most do (None: never, as
        for methods that read a client's stream: its messages are counted by an Observation)."""
        if spec.kind not in (RpcKind.UNARY_UNARY, RpcKind.UNARY_STREAM):
            return None
        return Lane.of(self._method(spec))

    def _method(self, spec: MethodSpec) -> _Method:
        method = self._methods.get(spec.path)
        if method is None:
            method = self._methods[spec.path] = _Method(self, spec)
        return method


# Begins one RPC's observation, given the RPC's context (one per method).
Begin = Callable[[grpc.aio.ServicerContext[Any, Any]], Observation]
# Makes a method's Begin, once, when its handler is composed.
Observe = Callable[[MethodSpec], Begin]


def observer(telemetry: Telemetry) -> Observe:
    """How the RPCs of each method are observed, as ``telemetry`` asks."""
    return _Tools(telemetry).begin_for


def lane_of(observe: Observe, spec: MethodSpec) -> Lane | None:
    """The lane ``spec``'s calls take under ``observe`` (from `observer`), if any (see Lane)."""
    tools = getattr(observe, "__self__", None)
    return tools.lane_for(spec) if isinstance(tools, _Tools) else None


def drops_spans(observe: Observe) -> bool:
    """Whether ``observe`` (from `observer`) decides sampling before the SDK, making the
    spans of dropped calls itself: then a server that stands the stand-in in its RPC
    tasks (see _sampling.StandIn) saves making each of them current."""
    tools = getattr(observe, "__self__", None)
    return isinstance(tools, _Tools) and tools.presampler is not None


# A trace id as W3C and B3 write it: 32 (or, B3 only, 16) lowercase hex digits.  What
# a client sends goes into log lines only when it has this shape: anything else
# (newlines, escapes, fake key=value pairs, kilobytes) would let it forge log lines.
_TRACE_ID = re.compile(r"(?:[0-9a-f]{16}){1,2}")


def _trace_id_or_empty(text: str) -> str:
    return text if _TRACE_ID.fullmatch(text) and text.strip("0") else ""


def _incoming_trace_id() -> str:
    metadata = incoming_metadata()
    traceparent = metadata.get("traceparent")
    if traceparent is not None:
        parts = traceparent.split("-")
        trace_id = _trace_id_or_empty(parts[1]) if len(parts) == 4 else ""
        return trace_id if len(trace_id) == 32 else ""
    b3 = metadata.get("x-b3-traceid")
    if b3 is None:
        b3 = metadata.get("b3", "").split("-")[0]
    return _trace_id_or_empty(b3)


def escape(value: object) -> str:
    """``value`` as one safe token for a text log line: control characters, quotes and
    spaces are escaped (and the value quoted), so no client text can start a line."""
    text = str(value)
    if text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return json.dumps(text)


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` (and ``trace``: `` trace_id=...`` or empty) to log records.

    The id is the current span's; with no SDK configured, the incoming RPC's
    ``traceparent`` or B3 trace id, so log lines still match the mesh's traces.
    Attach it to a handler and use ``%(trace)s`` or ``%(trace_id)s`` in its format.

    A filter runs inside every logging call, so it never fails and never logs: reading
    an RPC's metadata can make grpc log ("Invalid encoding" for a header that is not
    UTF-8), and that record comes back through this filter.  It is let through with no
    trace id instead of reading the metadata again (which recursed until the stack ran
    out, on every such request).  The incoming id is read once per RPC.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_id, record.trace = "", ""
        if getattr(record, "meshrpc_access", False) or getattr(_filtering, "active", False):
            return True  # an access line holds its trace id already; or a record logged by this filter's own read
        _filtering.active = True
        try:
            trace_id = _current_trace_id()
        except Exception:  # a logging filter that raises loses the line, or worse
            trace_id = ""
        finally:
            _filtering.active = False
        if trace_id:
            record.trace_id = trace_id
            record.trace = f" trace_id={trace_id}"
        return True


_filtering = threading.local()
# The RPC whose incoming trace id was read last in this context, and that id.
_incoming: contextvars.ContextVar[tuple[object, str]] = contextvars.ContextVar("meshrpc_incoming_trace")


def _current_trace_id() -> str:
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        return f"{span_context.trace_id:032x}"
    return _rpc_trace_id()


def _rpc_trace_id() -> str:
    """The current RPC's incoming trace id, read from its metadata once per RPC."""
    context = current_rpc.get(None)
    if context is None:
        return ""
    cached = _incoming.get(None)
    if cached is not None and cached[0] is context:
        return cached[1]
    trace_id = _incoming_trace_id()
    _incoming.set((context, trace_id))
    return trace_id
