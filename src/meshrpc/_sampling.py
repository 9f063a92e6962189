"""The sampling decision, made before the OpenTelemetry SDK is asked for a span.

With ``ParentBased(TraceIdRatioBased(r))`` (``OTEL_TRACES_SAMPLER=parentbased_traceidratio``)
most calls are not sampled, yet the SDK's ``start_span`` still builds the span's
attributes, asks the sampler and makes a non-recording span for each.  meshrpc makes
the same decision the configured sampler would, by the sampler's own rule: a sampled
or unsampled parent decides; a new trace is sampled when the low 64 bits of its trace
id are below ``TraceIdRatioBased.bound``.  Only a sampled call reaches the SDK's
``start_span``.  An unsampled call gets the non-recording span the SDK would have
made (its trace id, a new span id, the parent's flags and trace state), so its log
lines still carry the trace id and its outgoing calls still say "not sampled".

A new trace's id is drawn before the decision, from the tracer's own id generator;
when the call is sampled, the SDK must give the span that same id, so meshrpc's
tracer (its own object, from ``get_tracer``) draws trace ids through `_Drawn`, which
returns the id meshrpc drew.  The SDK's static samplers (``always_on``, ``always_off``
and their parent-based forms, ``parentbased_always_on`` being the SDK's default) are
decided the same way, as a ratio of 1 or 0.  Any other sampler, or a tracer that is
not the SDK's, and every call goes to the SDK as before.

A sampled call's span is the SDK's, or, when meshrpc built the TracerProvider, a
`ServerSpan` of its own with the same content (see _spans).
"""

from __future__ import annotations

import contextlib
import contextvars
import random
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from ._propagation import as_context
from ._spans import ServerSpans

# The SDK's ParentBased description when every parent delegate is the default one:
# a sampled parent means sampled, an unsampled one means dropped, remote or local.
_PARENT_BASED = re.compile(
    r"ParentBased\{root:TraceIdRatioBased\{(?P<rate>[^}]*)\},"
    r"remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
    r"localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler\}"
)
getrandbits = random.getrandbits  # what the SDK's RandomIdGenerator draws with
LOW_64 = (1 << 64) - 1  # TraceIdRatioBased.TRACE_ID_LIMIT: the bits its rule reads
_ALL = 1 << 64  # a bound every trace id's low 64 bits are under: TraceIdRatioBased(1.0)'s
# W3C trace context level 2's random-trace-id flag, which the SDK sets (not in older APIs).
_RANDOM_FLAG = int(getattr(TraceFlags, "RANDOM_TRACE_ID", 0))


class _Drawn:
    """An id generator that hands the SDK the trace id meshrpc drew for a sampled call,
    and otherwise is the tracer's own."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self._pinned = threading.local()

    def pin(self, trace_id: int) -> None:
        self._pinned.trace_id = trace_id

    def generate_trace_id(self) -> int:
        trace_id: int | None = getattr(self._pinned, "trace_id", None)
        if trace_id is None:
            return int(self.inner.generate_trace_id())
        self._pinned.trace_id = None
        return trace_id

    def generate_span_id(self) -> int:
        return int(self.inner.generate_span_id())

    def is_trace_id_random(self) -> bool:
        check = getattr(self.inner, "is_trace_id_random", None)
        return bool(check()) if check is not None else False


class _Deferred(NonRecordingSpan):
    """A non-recording span whose context is worked out when read, not given at creation."""

    def __repr__(self) -> str:
        return f"NonRecordingSpan({self.get_span_context()!r})"


class Dropped(_Deferred):
    """The span of a call the sampler dropped, as the SDK makes it, with its span id drawn
    when something first reads its context (a log line, an outgoing call, a child span):
    most such calls never do, and building the context is most of the cost of the span."""

    made: SpanContext | None = None  # the span context, once read

    def __init__(self, trace_id: int, flags: TraceFlags, trace_state: Any, span_id: Callable[[], int]) -> None:
        self.parts = (trace_id, flags, trace_state, span_id)

    def get_span_context(self) -> SpanContext:
        context = self.made
        if context is None:
            trace_id, flags, trace_state, span_id = self.parts
            context = self.made = SpanContext(trace_id, span_id(), False, flags, trace_state)
        return context


# A Dropped made without its __init__, then given only ``parts``: where most calls make
# one (see Observation), a Python call fewer per call.
new_dropped = object.__new__

# The dropped span of the RPC this task serves, behind the stand-in (see StandIn): set to
# None in the context grpc.aio's RPC tasks start from, absent anywhere else.
dropped_span: contextvars.ContextVar[Dropped | None] = contextvars.ContextVar("meshrpc_dropped_span")


class StandIn(_Deferred):
    """The current span in every RPC task of a server, standing in for the span of the call
    the sampler dropped, which it reads from `dropped_span`.

    Making a span current costs a context object and three of OpenTelemetry's calls in
    and out (about 4 % of a saturated server's throughput).  Most calls are dropped by the
    sampler, and their span is needed only if something reads it (a log line, an outgoing
    call, a child span): so a dropped call's span is set behind this one object, which is
    current in every RPC task already, and a sampled call's span is made current as any.

    grpc.aio runs each RPC in a task of its own, copied from the context its server was
    started in (`serving_context`), so each task sees its own call's span and nothing
    else does.  Code outside the call's task sees this stand-in's invalid context: a
    `Context` captured with ``get_current()`` and attached in another thread (not an
    asyncio task, which copies the call's context, nor a ``def`` handler) has no trace id
    for a dropped call there.
    """

    def __init__(self) -> None:
        super().__init__(INVALID_SPAN_CONTEXT)

    def get_span_context(self) -> SpanContext:
        span = dropped_span.get(None)
        return span.get_span_context() if span is not None else INVALID_SPAN_CONTEXT


STAND_IN = StandIn()


@contextlib.contextmanager
def serving_context() -> Iterator[None]:
    """Around grpc.aio's ``server.start()``: the context its RPC tasks are copied from has
    the stand-in as its current span, and a slot for each call's dropped span.  Only for a
    server without grpc.aio interceptors: an interceptor could make a span current in the
    task before meshrpc's handler runs, which the stand-in would not see."""
    token = otel_context.attach(trace.set_span_in_context(STAND_IN))
    slot = dropped_span.set(None)
    try:
        yield
    finally:
        dropped_span.reset(slot)
        otel_context.detach(token)


class PreSampler:
    """Starts a server span, deciding sampling first (see the module's docstring)."""

    def __init__(self, tracer: Any, bound: int, parent_based: bool, spans: ServerSpans | None = None) -> None:
        self.tracer: trace.Tracer = tracer
        self.bound = bound
        self.parent_based = parent_based
        self.spans = spans  # meshrpc's own sampled spans, when meshrpc built the provider
        # The SDK hands out one tracer per name and version, so a process that builds one
        # server after another (a test suite) meets the generator it wrapped before: it is
        # wrapped once, not once per server (each layer cost every later server its fast
        # path, and a thousand of them the recursion limit).  Pins are per thread.
        ids = tracer.id_generator  # meshrpc's own tracer: no one else's spans
        if type(ids) is not _Drawn:
            ids = tracer.id_generator = _Drawn(ids)
        self.ids: _Drawn = ids
        # Read once: asked on every call.  The SDK's own generator's rule, drawn here without
        # its call: 128 random bits, drawn again if all zero.
        self.random_ids = type(self.ids.inner) is RandomIdGenerator
        self._trace_id = self.ids.inner.generate_trace_id
        self.span_id = self.ids.inner.generate_span_id
        self.new_trace_flags = TraceFlags(_RANDOM_FLAG if self.ids.is_trace_id_random() else 0)
        self._new_trace_sampled = TraceFlags(self.new_trace_flags | TraceFlags.SAMPLED)

    @classmethod
    def for_tracer(cls, tracer: Any) -> PreSampler | None:
        """A PreSampler for ``tracer``'s sampler, or None when only the SDK can decide."""
        try:
            from opentelemetry.sdk.trace import Tracer
            from opentelemetry.sdk.trace.sampling import (
                ALWAYS_OFF,
                ALWAYS_ON,
                DEFAULT_OFF,
                DEFAULT_ON,
                ParentBased,
                TraceIdRatioBased,
            )
        except ImportError:
            return None
        if type(tracer) is not Tracer:
            return None
        sampler = getattr(tracer, "sampler", None)
        spans = ServerSpans.for_tracer(tracer)
        if type(sampler) is TraceIdRatioBased:
            return cls(tracer, sampler.bound, parent_based=False, spans=spans)
        # The SDK's own static samplers (OTEL_TRACES_SAMPLER always_on, parentbased_always_on,
        # the default, and their "off"s), known by identity: a StaticSampler of another
        # decision (RECORD_ONLY) describes itself as AlwaysOnSampler too.
        if sampler is ALWAYS_ON or sampler is ALWAYS_OFF:
            # The same decision whatever the parent says: every trace id passes, or none.
            return cls(tracer, _ALL if sampler is ALWAYS_ON else 0, parent_based=False, spans=spans)
        if sampler is DEFAULT_ON or sampler is DEFAULT_OFF:
            return cls(tracer, _ALL if sampler is DEFAULT_ON else 0, parent_based=True, spans=spans)
        if isinstance(sampler, ParentBased):
            match = _PARENT_BASED.fullmatch(str(sampler.get_description()))  # type: ignore[no-untyped-call]
            if match is None:
                return None
            try:
                rate = float(match["rate"])
            except ValueError:
                return None
            return cls(tracer, TraceIdRatioBased.get_bound_for_rate(rate), parent_based=True, spans=spans)
        return None

    def start(
        self,
        name: str,
        parent: Context | None,
        attributes: Callable[[str], dict[str, Any]],
        peer: Callable[[], str | None],
        remote: SpanContext | None = None,
        drawn: int = 0,
    ) -> trace.Span:
        """A SERVER span under ``parent`` (or under ``remote``, the caller's span context as
        meshrpc read it): recording (from the SDK) only if sampled.

        ``attributes(peer())`` are the span's attributes, built only for a sampled call.
        ``drawn``: a new trace's id, drawn already by the caller (0: drawn here).
        """
        if parent is not None or remote is not None:
            context = remote if remote is not None else trace.get_current_span(parent).get_span_context()
            if context.is_valid:
                flags = context.trace_flags
                # ParentBased follows the parent; TraceIdRatioBased alone reads the parent's trace id.
                sampled = flags.sampled if self.parent_based else (context.trace_id & LOW_64) < self.bound
                if sampled:
                    attrs = attributes(peer() or "")
                    spans = self.spans
                    if spans is not None and spans.usable(attrs):
                        # As the SDK makes it: the parent's trace, random-id flag and trace state.
                        sampled_flags = TraceFlags(TraceFlags.SAMPLED | (flags & _RANDOM_FLAG))
                        own = SpanContext(context.trace_id, self.span_id(), False, sampled_flags, context.trace_state)
                        return spans.start(name, own, context, attrs)
                    if parent is None:
                        parent = as_context(context)
                    return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attrs)
                # The SDK keeps the parent's random-id flag and trace state on a dropped span.
                kept = TraceFlags(_RANDOM_FLAG if flags & _RANDOM_FLAG else 0)
                return Dropped(context.trace_id, kept, context.trace_state, self.span_id)
        trace_id = drawn or (getrandbits(128) if self.random_ids else 0)
        if not trace_id:
            trace_id = self._trace_id()
        if (trace_id & LOW_64) < self.bound:
            attrs = attributes(peer() or "")
            spans = self.spans
            if spans is not None and spans.usable(attrs):
                own = SpanContext(trace_id, self.span_id(), False, self._new_trace_sampled, None)
                return spans.start(name, own, None, attrs)
            self.ids.pin(trace_id)
            return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attrs)
        return Dropped(trace_id, self.new_trace_flags, None, self.span_id)
