"""meshrpc's own sampled server spans (a TracerProvider meshrpc built): what an exporter
receives is what the SDK's span gives, field by field, whatever the application does
with the span; and the SDK's spans come back as soon as the pipeline is not meshrpc's alone."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from meshrpc._sampling import PreSampler
from meshrpc._spans import Pipeline, ServerSpan

ATTRS = {
    "rpc.system": "grpc",
    "rpc.service": "echo.Echo",
    "rpc.method": "Unary",
    "server.address": "127.0.0.1",
    "server.port": 50051,
    "client.address": "127.0.0.1",
    "client.port": 5555,
}
INCOMING = SpanContext(
    0x0AF7651916CD43DD8448EB211C80319C,
    0xB7AD6B7169203331,
    True,
    TraceFlags(TraceFlags.SAMPLED),
    TraceState.from_header(["vendor=abc"]),
)


def meshrpc_built(limits: SpanLimits | None = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    """A provider as ``otel_sdk`` builds it: meshrpc's pipeline, a batch processor."""
    limits = limits or SpanLimits()
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": "spans-test"}),
        span_limits=limits,
        active_span_processor=Pipeline(limits),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def pair(provider: TracerProvider, parent: Any) -> tuple[trace.Span, trace.Span]:
    """meshrpc's span for a sampled call, and the span the SDK makes for the same call."""
    presampler = PreSampler.for_tracer(provider.get_tracer("meshrpc", "9.9.9"))
    assert presampler is not None
    ours = presampler.start("echo.Echo/Unary", parent, lambda peer: ATTRS, lambda: "ipv4:127.0.0.1:5555")
    theirs = provider.get_tracer("meshrpc", "9.9.9").start_span(
        "echo.Echo/Unary", context=parent, kind=SpanKind.SERVER, attributes=ATTRS
    )
    return ours, theirs


def exported(provider: TracerProvider, exporter: InMemorySpanExporter) -> tuple[ReadableSpan, ReadableSpan]:
    provider.force_flush()
    ours, theirs = exporter.get_finished_spans()
    return ours, theirs


def otlp(span: ReadableSpan) -> Any:
    """The span as the OTLP exporter sends it, with what differs between two spans of
    one call by nature (their own span ids and clocks) set aside."""
    (resource_spans,) = encode_spans([span]).resource_spans
    (scope_spans,) = resource_spans.scope_spans
    (encoded,) = scope_spans.spans
    encoded.span_id = b""
    encoded.start_time_unix_nano = encoded.end_time_unix_nano = 0
    for event in encoded.events:
        event.time_unix_nano = 0
    return resource_spans.resource, scope_spans.scope, encoded


def boom() -> ValueError:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        return exc


def plain(span: trace.Span) -> None:
    """What meshrpc does with a call's span when the handler touches nothing: the status code."""
    if isinstance(span, ServerSpan):
        span.own_attribute("rpc.grpc.status_code", 0)
    else:
        span.set_attribute("rpc.grpc.status_code", 0)


def busy(error: ValueError) -> Callable[[trace.Span], None]:
    def use(span: trace.Span) -> None:
        """Everything an application can do to its current span."""
        span.set_attribute("app.user", "ada")
        span.set_attribute("app.bad", {"not": "valid"})  # type: ignore[arg-type]  # dropped, with a warning
        span.set_attributes({"app.n": 3, "app.list": [1, 2], "app.none": None})  # type: ignore[dict-item]
        span.add_event("cache miss", {"key": "k", "bad": object()})  # type: ignore[dict-item]
        span.add_link(SpanContext(1, 2, False), {"link.n": 1})
        span.add_link(SpanContext(0, 0, False))  # an invalid link with no attributes: ignored
        span.record_exception(error, {"extra": "x"})
        span.update_name("echo.Echo/Renamed")
        span.set_status(StatusCode.ERROR, "why")
        span.set_status(Status(StatusCode.UNSET))  # ignored
        plain(span)

    return use


@pytest.mark.parametrize("parent", ["new trace", "incoming"])
@pytest.mark.parametrize("use", ["plain", "busy"])
def test_exporters_receive_the_sdk_s_span(parent: str, use: str) -> None:
    provider, exporter = meshrpc_built()
    context = None if parent == "new trace" else trace.set_span_in_context(NonRecordingSpan(INCOMING))
    ours, theirs = pair(provider, context)
    assert isinstance(ours, ServerSpan) and not isinstance(theirs, ServerSpan)
    act = plain if use == "plain" else busy(boom())
    for span in (ours, theirs):
        act(span)
        assert span.is_recording()
        span.end()
        assert not span.is_recording()
    a, b = exported(provider, exporter)
    if parent == "new trace":
        assert a.context is not None and b.context is not None
        assert a.context.trace_flags == b.context.trace_flags and a.parent is None is b.parent
        assert otlp(a)[2].trace_id != otlp(b)[2].trace_id  # each drew its own new trace
        assert otlp(a)[:2] == otlp(b)[:2]
        ours_span, theirs_span = otlp(a)[2], otlp(b)[2]
        ours_span.trace_id = theirs_span.trace_id = b""
        assert ours_span == theirs_span
    else:
        assert otlp(a) == otlp(b)
    # what OTLP does not carry, as exporters such as the console's read it
    for field in ("name", "kind", "resource", "instrumentation_scope", "dropped_attributes"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.status.status_code, a.status.description) == (b.status.status_code, b.status.description)
    assert (a.dropped_events, a.dropped_links) == (b.dropped_events, b.dropped_links)
    assert dict(a.attributes or {}) == dict(b.attributes or {})
    with pytest.deprecated_call():  # the SDK still fills it in, for older exporters
        assert a.instrumentation_info == b.instrumentation_info
    assert a.start_time is not None and a.end_time is not None and a.start_time <= a.end_time


def test_limits_drop_the_same_attributes_events_and_links() -> None:
    limits = SpanLimits(max_span_attributes=10, max_events=1, max_links=1, max_event_attributes=1)
    provider, exporter = meshrpc_built(limits)
    ours, theirs = pair(provider, None)
    assert isinstance(ours, ServerSpan)
    for span in (ours, theirs):
        span.set_attributes({f"app.{i}": i for i in range(6)})
        span.add_event("one", {"a": 1, "b": 2})
        span.add_event("two")
        span.add_link(SpanContext(1, 2, False))
        span.add_link(SpanContext(3, 4, False))
        plain(span)
        span.end()
    a, b = exported(provider, exporter)
    assert dict(a.attributes or {}) == dict(b.attributes or {}) and len(a.attributes or {}) == 10
    assert (a.dropped_attributes, a.dropped_events, a.dropped_links) == (
        b.dropped_attributes,
        b.dropped_events,
        b.dropped_links,
    )
    assert a.dropped_attributes == 4 and a.dropped_events == 1 and a.dropped_links == 1
    # the newest event is kept, as the SDK's bounded list keeps it
    assert [(e.name, dict(e.attributes or {})) for e in a.events] == [("two", {})]
    assert [(e.name, dict(e.attributes or {})) for e in b.events] == [("two", {})]


def test_an_ended_span_changes_no_more_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    provider, exporter = meshrpc_built()
    ours, theirs = pair(provider, None)
    logs = []
    for span in (ours, theirs):
        plain(span)
        span.end()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            span.set_attribute("late", 1)
            span.add_event("late")
            span.set_status(StatusCode.ERROR)
            span.update_name("late")
            span.end()
        logs.append([r.getMessage() for r in caplog.records])
    assert logs[0] == logs[1] and len(logs[0]) == 5
    a, b = exported(provider, exporter)
    assert a.name == b.name == "echo.Echo/Unary" and "late" not in (a.attributes or {})
    assert a.status.status_code is StatusCode.UNSET and not a.events


def test_as_a_context_manager_an_escaping_exception_is_recorded_as_by_the_sdk() -> None:
    provider, exporter = meshrpc_built()
    ours, theirs = pair(provider, None)
    for span in (ours, theirs):
        with pytest.raises(ValueError), span:
            raise ValueError("boom")  # one line for both: the same stack trace
    a, b = exported(provider, exporter)
    assert (a.status.status_code, a.status.description) == (b.status.status_code, b.status.description)
    assert a.status.description == "ValueError: boom"
    assert [(e.name, dict(e.attributes or {})) for e in a.events] == [
        (e.name, dict(e.attributes or {})) for e in b.events
    ]
    assert dict(a.events[0].attributes or {})["exception.escaped"] == "True"


def test_the_sdk_s_spans_come_back_when_the_pipeline_is_not_meshrpc_s_alone() -> None:
    provider, _ = meshrpc_built()
    assert isinstance(pair(provider, None)[0], ServerSpan)
    seen = InMemorySpanExporter()

    started: list[Any] = []

    class Starts(SimpleSpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            started.append(span)

    # An application adds a processor of its own, which may act when a span starts.
    provider.add_span_processor(Starts(seen))
    ours, _ = pair(provider, None)
    assert not isinstance(ours, ServerSpan)
    assert started and started[0] is ours  # it saw meshrpc's span start


def test_limits_that_would_cut_meshrpc_s_attributes_leave_the_span_to_the_sdk() -> None:
    provider, _ = meshrpc_built(SpanLimits(max_span_attribute_length=4))
    assert not isinstance(pair(provider, None)[0], ServerSpan)
    provider, _ = meshrpc_built(SpanLimits(max_span_attributes=3))
    assert not isinstance(pair(provider, None)[0], ServerSpan)


def test_a_provider_the_application_built_keeps_the_sdk_s_spans() -> None:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    assert not isinstance(pair(provider, None)[0], ServerSpan)


def test_the_sdk_s_own_metrics_keep_the_sdk_s_spans() -> None:
    limits = SpanLimits()
    provider = TracerProvider(span_limits=limits, active_span_processor=Pipeline(limits, sdk_metrics=True))
    provider.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    assert not isinstance(pair(provider, None)[0], ServerSpan)


def test_the_span_reads_as_a_readable_span_while_it_runs() -> None:
    provider, _ = meshrpc_built()
    ours, theirs = pair(provider, trace.set_span_in_context(NonRecordingSpan(INCOMING)))
    assert isinstance(ours, ServerSpan) and isinstance(theirs, ReadableSpan)
    for field in ("name", "kind", "parent", "resource", "instrumentation_scope", "end_time"):
        assert getattr(ours, field) == getattr(theirs, field), field
    assert ours.status.status_code is theirs.status.status_code is StatusCode.UNSET
    assert dict(ours.attributes or {}) == dict(theirs.attributes or {})
    assert ours.context.trace_id == theirs.context.trace_id and ours.events == theirs.events == ()
    assert "echo.Echo/Unary" in repr(ours)
