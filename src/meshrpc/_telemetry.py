"""OpenTelemetry for every RPC: a server span, RPC metrics and an access log line.

All three are decided once, when the server composes its handlers: with no SDK
configured (the API's proxy providers) and the access log off, nothing observes
the RPCs, so telemetry costs nothing.  Otherwise meshrpc's handler wrapper begins
an :class:`Observation` before the handler and finishes it after.  Span and
metric names follow the RPC semantic conventions as the OpenTelemetry gRPC
instrumentations emit them
(``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``,
``rpc.server.duration`` in ms).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from ._errors import StatusError
from ._failures import final_code
from ._rpc_context import incoming_metadata, text_items
from ._service import MethodSpec, RpcKind
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


class _MetadataGetter(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_GETTER = _MetadataGetter()


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

    @property
    def enabled(self) -> bool:
        return self.tracing or self.metrics or self.access_log != "off"


class _Instruments:
    def __init__(self, metric_attrs: dict[str, dict[str, Any]]) -> None:
        meter = metrics.get_meter("meshrpc", __version__)
        self.duration = meter.create_histogram(
            "rpc.server.duration", unit="ms", description="Measures the duration of inbound RPC."
        )
        # RPCs in flight per method, counted in plain ints and read when the SDK collects:
        # two synchronous add() calls per RPC cost about a third of all per-RPC telemetry.
        self.active: dict[str, int] = dict.fromkeys(metric_attrs, 0)
        self._metric_attrs = metric_attrs
        meter.create_observable_up_down_counter(
            "rpc.server.active_requests",
            callbacks=[self._observe_active],
            unit="{request}",
            description="RPCs being served now.",
        )
        self.requests_per_rpc = meter.create_histogram(
            "rpc.server.requests_per_rpc", unit="{count}", description="Messages received per streaming RPC."
        )
        self.responses_per_rpc = meter.create_histogram(
            "rpc.server.responses_per_rpc", unit="{count}", description="Messages sent per streaming RPC."
        )
        # The attributes of each (method, status code), built once rather than per RPC.
        self.code_attrs: dict[tuple[str, grpc.StatusCode], dict[str, Any]] = {}

    def _observe_active(self, options: metrics.CallbackOptions) -> list[metrics.Observation]:
        return [metrics.Observation(count, self._metric_attrs[path]) for path, count in self.active.items()]

    def attrs_for(self, path: str, code: grpc.StatusCode) -> dict[str, Any]:
        attrs = self.code_attrs.get((path, code))
        if attrs is None:
            attrs = self.code_attrs[(path, code)] = {**self._metric_attrs[path], "rpc.grpc.status_code": code.value[0]}
        return attrs


def _peer_address(peer: str) -> tuple[str, int | None]:
    # grpc's peer strings: "ipv4:127.0.0.1:5555", "ipv6:[::1]:5555", "unix:/path"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else None
    return rest or peer, None


class Observation:
    """One RPC's telemetry: begun before the handler, finished after it.

    ``received`` is counted by whoever reads a client's stream.
    """

    __slots__ = ("context", "received", "span", "spec", "start", "token", "tools")

    def __init__(self, tools: _Tools, spec: MethodSpec, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.tools = tools
        self.spec = spec
        self.context = context
        self.start = time.perf_counter()
        self.received = 0
        self.span: trace.Span | None = None
        if tools.tracer is not None:
            # Extract only when a propagator's header came in: most of the cost otherwise.
            # grpc builds the metadata tuple anew at each invocation_metadata() call: one call.
            parent = None
            metadata = context.invocation_metadata() or ()
            for key, _ in metadata:
                if key in tools.fields:
                    parent = propagate.extract(text_items(metadata), getter=_GETTER)
                    break
            # All attributes at start: one validation pass instead of one locked set per attribute.
            self.span = tools.tracer.start_span(
                tools.span_names[spec.path],
                context=parent,
                kind=SpanKind.SERVER,
                attributes=tools.span_attributes(spec.path, context.peer() or ""),
            )
        if tools.instruments is not None:
            tools.instruments.active[spec.path] += 1
        # The span is current while the handler runs: its own spans and log lines nest under it.
        self.token = otel_context.attach(trace.set_span_in_context(self.span)) if self.span is not None else None

    def finish(self, exc: BaseException | None, sent: int | None) -> None:
        """End the RPC's span and record it: ``exc`` is what the handler raised (None if it
        returned), ``sent`` the replies of a server stream (None if not known)."""
        if self.token is not None:
            otel_context.detach(self.token)
        tools, spec = self.tools, self.spec
        code = final_code(self.context, exc)
        elapsed_ms = (time.perf_counter() - self.start) * 1000
        span = self.span
        if span is not None and span.is_recording():  # not for the ones the sampler dropped
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code in ERROR_CODES:
                if exc is not None and not isinstance(exc, (StatusError, grpc.aio.AbortError, asyncio.CancelledError)):
                    span.record_exception(exc)
                details = exc.message if isinstance(exc, StatusError) else self.context.details()
                span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}" if details else code.name))
            span.end()
        instruments = tools.instruments
        if instruments is not None:
            instruments.active[spec.path] -= 1
            attrs = instruments.attrs_for(spec.path, code)
            instruments.duration.record(elapsed_ms, attrs)
            if spec.kind is not RpcKind.UNARY_UNARY:
                if spec.kind is not RpcKind.UNARY_STREAM:
                    instruments.requests_per_rpc.record(self.received, attrs)
                if sent is not None and spec.kind is not RpcKind.STREAM_UNARY:
                    instruments.responses_per_rpc.record(sent, attrs)
        if tools.access_log != "off" and (tools.sample_rate >= 1.0 or random.random() < tools.sample_rate):
            self._access_log(code, elapsed_ms)

    def _access_log(self, code: grpc.StatusCode, elapsed_ms: float) -> None:
        span_context = self.span.get_span_context() if self.span is not None else None
        trace_id = f"{span_context.trace_id:032x}" if span_context and span_context.is_valid else _incoming_trace_id()
        record = {
            "method": self.spec.path,
            "status": code.name,
            "duration_ms": round(elapsed_ms, 3),
            "peer": self.context.peer(),
            "trace_id": trace_id,
        }
        # The record carries its own trace id: the log format adds none (one JSON object per line).
        if self.tools.access_log == "json":
            access_logger.info(json.dumps(record, separators=(",", ":")), extra=_ACCESS)
        else:
            access_logger.info(" ".join(f"{k}={escape(v)}" for k, v in record.items() if v != ""), extra=_ACCESS)


class _Tools:
    """Per-server telemetry objects, built once."""

    PEER_CACHE = 4096  # (method, peer) attribute sets kept; peers repeat for a connection's life

    def __init__(self, telemetry: Telemetry, specs: list[MethodSpec]) -> None:
        self.tracer = trace.get_tracer("meshrpc", __version__) if telemetry.tracing else None
        self.fields = frozenset(propagate.get_global_textmap().fields)
        self.access_log = telemetry.access_log
        self.sample_rate = telemetry.access_log_sample_rate
        self.span_names: dict[str, str] = {}
        self.attrs: dict[str, dict[str, Any]] = {}
        self.metric_attrs: dict[str, dict[str, Any]] = {}
        for spec in specs:
            key = spec.path
            self.span_names[key] = f"{spec.service}/{spec.name}"
            base = {"rpc.system": "grpc", "rpc.service": spec.service, "rpc.method": spec.name}
            self.metric_attrs[key] = base
            self.attrs[key] = {
                **base,
                "server.address": telemetry.server_address,
                "server.port": telemetry.server_port,
            }
        self.instruments = _Instruments(self.metric_attrs) if telemetry.metrics else None
        self._span_attrs: dict[tuple[str, str], dict[str, Any]] = {}

    def span_attributes(self, path: str, peer: str) -> dict[str, Any]:
        """A server span's attributes for ``path`` called from ``peer``, built once per pair.

        The SDK copies what it is given, so one dict serves every span of a connection.
        """
        attributes = self._span_attrs.get((path, peer))
        if attributes is None:
            if len(self._span_attrs) >= self.PEER_CACHE:
                self._span_attrs.clear()
            host, port = _peer_address(peer)
            attributes = {**self.attrs[path], "client.address": host}
            if port is not None:
                attributes["client.port"] = port
            self._span_attrs[(path, peer)] = attributes
        return attributes


# Begins an RPC's observation: called with the method and the RPC's context.
Observe = Callable[[MethodSpec, grpc.aio.ServicerContext[Any, Any]], Observation]


def observer(telemetry: Telemetry, specs: list[MethodSpec]) -> Observe:
    """How each RPC of ``specs`` is observed, as ``telemetry`` asks."""
    return functools.partial(Observation, _Tools(telemetry, specs))


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
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "meshrpc_access", False):  # an access line holds its trace id already
            record.trace_id, record.trace = "", ""
            return True
        span_context = trace.get_current_span().get_span_context()
        trace_id = f"{span_context.trace_id:032x}" if span_context.is_valid else _incoming_trace_id()
        record.trace_id = trace_id
        record.trace = f" trace_id={trace_id}" if trace_id else ""
        return True
