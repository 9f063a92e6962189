"""meshrpc's sampled server spans, made without the SDK's per-span machinery when meshrpc
built the TracerProvider (``otel_sdk``).

A span from the SDK's ``Tracer.start_span`` asks the sampler again (meshrpc decided
already, see _sampling), validates each attribute (meshrpc's are the same few valid
strings and ints on every call), takes a lock for each change, calls every processor's
``on_start`` and, at its end, copies itself into a ``ReadableSpan``: about 25 µs of
Python per sampled call, most of full tracing's cost.

When meshrpc builds the provider it knows the whole pipeline: its processors are the
SDK's ``BatchSpanProcessor`` (whose ``on_start`` does nothing), its span limits are the
ones it passed.  Then a sampled server span is a `ServerSpan`: it keeps meshrpc's own
attributes as they are, validates only what the application adds (through the SDK's
``BoundedAttributes``, with the provider's limits), and at its end hands one
``ReadableSpan`` (the SDK's public class, what every exporter reads) to the processors'
``on_end``.  What an exporter receives is the SDK span's content, field for field.

As soon as anything else is added to the provider (``add_span_processor`` with a
processor of another kind), or the limits could cut meshrpc's own attributes, or the
SDK's own metrics are on, server spans come from the SDK again.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Mapping
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util import BoundedList
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.util import types

logger = logging.getLogger("opentelemetry.sdk.trace")  # the SDK's own warnings come from here

# meshrpc's own attributes on a server span: at most this many, each a short string or an int.
OWN_ATTRIBUTES = 8

_UNSET = Status(StatusCode.UNSET)
# What a ReadableSpan offers to read, which a ServerSpan answers from a snapshot (see the end).
_READABLE = frozenset(
    {
        "attributes",
        "context",
        "dropped_attributes",
        "dropped_events",
        "dropped_links",
        "end_time",
        "events",
        "instrumentation_info",
        "instrumentation_scope",
        "kind",
        "links",
        "name",
        "parent",
        "resource",
        "start_time",
        "status",
        "to_json",
    }
)


class Pipeline(SynchronousMultiSpanProcessor):
    """The span processors of a TracerProvider meshrpc built, and whether meshrpc may
    hand its server spans straight to their ``on_end`` (only BatchSpanProcessors)."""

    def __init__(self, limits: SpanLimits, *, sdk_metrics: bool = False) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.limits = limits
        # The SDK counts its spans in its own metrics when asked: only its own spans do that.
        self._allowed = not sdk_metrics and (
            limits.max_span_attributes is None or limits.max_span_attributes >= OWN_ATTRIBUTES
        )
        self.direct = False  # True once a processor is added, while every one is a BatchSpanProcessor
        # Each processor's on_end, which a ServerSpan calls itself when `direct`: a frame (and
        # a loop) fewer per sampled call than through this class's own on_end.
        self.ends: tuple[Any, ...] = ()

    def add_span_processor(self, span_processor: Any) -> None:
        super().add_span_processor(span_processor)
        self.ends = (*self.ends, span_processor.on_end)
        # A BatchSpanProcessor does nothing when a span starts or is ending; any other
        # processor may, and then it must see the SDK's own spans, from now on.
        if type(span_processor) is not BatchSpanProcessor:
            self._allowed = False
        self.direct = self._allowed


def _truncates(limits: SpanLimits, attributes: Mapping[str, Any]) -> bool:
    length = limits.max_span_attribute_length
    return length is not None and any(isinstance(v, str) and len(v) > length for v in attributes.values())


class ServerSpans:
    """Makes meshrpc's sampled server spans for one tracer, when its pipeline allows."""

    def __init__(self, tracer: Any, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.limits = pipeline.limits
        self.resource = tracer.resource
        self.info: InstrumentationInfo = tracer.instrumentation_info
        # What the SDK's get_tracer(name, version) gives its spans.
        self.scope = InstrumentationScope(self.info.name, self.info.version, self.info.schema_url)

    @classmethod
    def for_tracer(cls, tracer: Any) -> ServerSpans | None:
        pipeline = getattr(tracer, "span_processor", None)
        if not isinstance(pipeline, Pipeline):
            return None  # a provider meshrpc did not build: its spans are the SDK's
        return cls(tracer, pipeline)

    def usable(self, attributes: Mapping[str, Any]) -> bool:
        """Whether a span with ``attributes`` can be meshrpc's (asked per span: the
        pipeline can change while the server runs)."""
        return self.pipeline.direct and not _truncates(self.limits, attributes)

    def start(
        self, name: str, span_context: SpanContext, parent: SpanContext | None, attributes: dict[str, Any]
    ) -> ServerSpan:
        return ServerSpan(self, name, span_context, parent, dict(attributes), time_ns())


# What the application changes on a server span, from any thread, is changed under this
# one lock, shared by every ServerSpan: a lock of each span's own would be made on every
# sampled call, and most spans are never changed (nothing is awaited while it is held).
_CHANGES = threading.Lock()


def _ended(name: str) -> None:
    logger.warning("Tried calling %s on an ended span.", name)


class ServerSpan(trace.Span):
    """A recording SERVER span whose content, when it ends, is the SDK span's."""

    __slots__ = (
        "_attributes",
        "_context",
        "_end_time",
        "_events",
        "_links",
        "_name",
        "_parent",
        "_spans",
        "_start_time",
        "_status",
    )

    def __init__(
        self,
        spans: ServerSpans,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, Any],
        start_time: int,
    ) -> None:
        self._spans = spans
        self._name = name
        self._context = context
        self._parent = parent
        # meshrpc's own attributes, valid as they are; a BoundedAttributes once the application adds one.
        self._attributes: dict[str, Any] | BoundedAttributes = attributes
        self._events: BoundedList[Event] | None = None
        self._links: BoundedList[Link] | None = None
        self._status = _UNSET
        self._start_time = start_time
        self._end_time: int | None = None

    # -- what meshrpc itself sets ------------------------------------------------------

    def own_attribute(self, key: str, value: int) -> None:
        """An attribute meshrpc knows to be valid (the status code), set without validation."""
        if self._end_time is None:
            self._attributes[key] = value

    # -- the API ------------------------------------------------------------------------

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def _bounded(self) -> BoundedAttributes:
        attributes = self._attributes
        if not isinstance(attributes, BoundedAttributes):
            limits = self._spans.limits
            attributes = self._attributes = BoundedAttributes(
                limits.max_span_attributes, attributes, immutable=False, max_value_len=limits.max_span_attribute_length
            )
        return attributes

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        with _CHANGES:
            if self._end_time is not None:
                logger.warning("Setting attribute on ended span.")
                return
            bounded = self._bounded()
            for key, value in attributes.items():
                bounded[key] = value

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        self.set_attributes({key: value})

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        limits = self._spans.limits
        bounded = BoundedAttributes(
            limits.max_event_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        with _CHANGES:
            if self._end_time is not None:
                _ended("_add_event")
                return
            if self._events is None:
                self._events = BoundedList(limits.max_events)
            self._events.append(Event(name=name, attributes=bounded, timestamp=timestamp))

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if not (context and (context.is_valid or (attributes or context.trace_state))):
            return
        limits = self._spans.limits
        bounded = BoundedAttributes(
            limits.max_link_attributes, attributes, max_value_len=limits.max_attribute_length, immutable=True
        )
        with _CHANGES:
            if self._end_time is not None:
                _ended("_add_link")
                return
            if self._links is None:
                self._links = BoundedList(limits.max_links)
            self._links.append(Link(context=context, attributes=bounded))

    def update_name(self, name: str) -> None:
        if self._end_time is not None:
            _ended("update_name")
            return
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None:
            _ended("set_status")
            return
        # As the SDK: OK is final, UNSET is ignored.
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                logger.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`", description
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        # The exception event's semantic-convention attributes, as the SDK records them.
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        recorded: dict[str, Any] = {
            "exception.type": f"{module}.{qualname}" if module and module != "builtins" else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            recorded.update(attributes)
        self.add_event(name="exception", attributes=recorded, timestamp=timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            logger.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        readable = self._readable()
        for end in self._spans.pipeline.ends:
            end(readable)

    def _readable(self) -> ReadableSpan:
        spans = self._spans
        return ReadableSpan(
            name=self._name,
            context=self._context,
            parent=self._parent,
            resource=spans.resource,
            attributes=self._attributes,
            # No event or link: an empty tuple reads as the SDK's empty list does (none, none dropped).
            events=self._events if self._events is not None else (),
            links=self._links if self._links is not None else (),
            kind=SpanKind.SERVER,
            status=self._status,
            start_time=self._start_time,
            end_time=self._end_time,
            instrumentation_info=spans.info,
            instrumentation_scope=spans.scope,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        # As the SDK's span used as a context manager: the exception recorded, the status set.
        if exc_val is not None and self.is_recording():
            self.record_exception(exc_val, escaped=True)
            self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        self.end()

    def __repr__(self) -> str:
        return f'ServerSpan(name="{self._name}", context={self._context})'


def _from_snapshot(name: str) -> property:
    return property(lambda span: getattr(span._readable(), name), doc=f"``{name}``, as the SDK's span reads it.")


# Reading the span as the SDK's (``span.name``, ``span.attributes``, ``span.to_json()``), from a
# snapshot made only when asked (the hot path never reads these).  Properties, not a
# ``__getattr__``: a class with one pays a slower hook on every attribute access of its
# instances, its own included (some 8,000 instructions per traced call, counted by callgrind).
for _name in _READABLE:
    setattr(ServerSpan, _name, _from_snapshot(_name))
del _name
