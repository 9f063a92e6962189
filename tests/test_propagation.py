"""meshrpc reads a lone W3C traceparent itself: for every request, the caller's span
context is the one OpenTelemetry's global propagator extracts from the same metadata."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator, default_getter
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshrpc._propagation import Incoming, as_context
from meshrpc._rpc_context import text_items

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
Metadata = Sequence[tuple[str, str | bytes]]

HEADERS = [
    VALID,
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",  # not sampled
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff",  # every flag
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02",  # random-trace-id only
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase
    " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # padding before
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\t",  # padding after
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 forbids more
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # a later version may add
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the invalid version
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
    "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",  # ids cut in the wrong place
    "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + " " * 600,  # past the 512 limit
    "",
    "\n00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\n",
]


def through_propagator(metadata: Metadata) -> SpanContext:
    """What OpenTelemetry's global propagator makes of ``metadata``."""
    return trace.get_current_span(propagate.extract(text_items(metadata))).get_span_context()


def through_meshrpc(incoming: Incoming, metadata: Metadata) -> SpanContext:
    remote, parent = incoming.extract(metadata)
    if remote is not None:
        assert parent is None
        return remote
    return trace.get_current_span(parent).get_span_context()


@pytest.fixture
def global_textmap() -> Iterator[None]:
    previous = propagate.get_global_textmap()
    yield
    propagate.set_global_textmap(previous)


def test_the_default_propagator_is_read_directly() -> None:
    # OTEL_PROPAGATORS unset: tracecontext,baggage, which meshrpc reads a lone traceparent for.
    incoming = Incoming()
    assert incoming.direct
    remote, parent = incoming.extract((("user-agent", "grpc-go/1.70"), ("traceparent", VALID)))
    assert parent is None and remote is not None
    assert (f"{remote.trace_id:032x}", f"{remote.span_id:016x}") == (VALID[3:35], VALID[36:52])
    assert remote.is_remote and remote.trace_flags.sampled and not remote.trace_state
    assert incoming.extract((("user-agent", "grpc-go/1.70"),)) == (None, None)


@pytest.mark.parametrize("header", HEADERS)
@pytest.mark.parametrize(
    "around",
    [
        (),
        (("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),),
        (("baggage", "user=ada"),),
        (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),),  # repeated: the last counts
        (("x-request-id", "7"), ("grpc-trace-bin", b"\x00\x01")),
    ],
    ids=["alone", "tracestate", "baggage", "repeated", "other-headers"],
)
def test_the_callers_span_context_is_the_propagators(header: str, around: Metadata) -> None:
    incoming = Incoming()
    for metadata in ((("traceparent", header), *around), (*around, ("traceparent", header))):
        assert through_meshrpc(incoming, metadata) == through_propagator(metadata), metadata


def test_mutated_headers_give_the_propagators_span_context() -> None:
    # Every one-character change of a valid header (and some random ones) read both ways.
    incoming = Incoming()
    rng = random.Random(24)
    alphabet = string.hexdigits + "-_ \t0xX"
    read_directly = 0
    for _ in range(4000):
        chars = list(VALID)
        for _ in range(rng.choice((1, 1, 2, 3))):
            at = rng.randrange(len(chars) + 1)
            edit = rng.choice(("replace", "insert", "delete"))
            if edit == "insert" or at == len(chars):
                chars.insert(at, rng.choice(alphabet))
            elif edit == "replace":
                chars[at] = rng.choice(alphabet)
            else:
                del chars[at]
        metadata = (("traceparent", "".join(chars)),)
        assert through_meshrpc(incoming, metadata) == through_propagator(metadata), metadata
        read_directly += incoming.extract(metadata)[0] is not None
    assert 400 < read_directly < 3600  # both ways were taken


def test_a_binary_traceparent_goes_to_the_propagator() -> None:
    remote, parent = Incoming().extract((("traceparent", VALID.encode()),))
    assert remote is None and not trace.get_current_span(parent).get_span_context().is_valid


class Lenient(TraceContextTextMapPropagator):
    """A propagator of the same fields that reads a header its own way: every caller's
    trace counts as sampled (meshrpc's startup check reads it differ)."""

    def extract(self, carrier: Any, context: Context | None = None, getter: Getter[Any] = default_getter) -> Context:
        extracted = super().extract(carrier, context, getter)
        span_context = trace.get_current_span(extracted).get_span_context()
        if not span_context.is_valid:
            return extracted
        sampled = SpanContext(span_context.trace_id, span_context.span_id, True, TraceFlags(TraceFlags.SAMPLED))
        return trace.set_span_in_context(NonRecordingSpan(sampled), context)


@pytest.mark.parametrize(
    "textmap",
    [
        CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator(), B3MultiFormat()]),
        CompositePropagator([B3MultiFormat(), TraceContextTextMapPropagator()]),
        B3MultiFormat(),
        Lenient(),
        CompositePropagator([Lenient()]),
    ],
    ids=["tracecontext-baggage-b3multi", "b3multi-tracecontext", "b3multi", "subclass", "composite-of-subclass"],
)
def test_any_other_propagator_reads_every_header(global_textmap: None, textmap: TextMapPropagator) -> None:
    propagate.set_global_textmap(textmap)
    incoming = Incoming()
    assert not incoming.direct
    b3 = (
        ("x-b3-traceid", "0af7651916cd43dd8448eb211c80319c"),
        ("x-b3-spanid", "b7ad6b7169203331"),
        ("x-b3-sampled", "1"),
    )
    for metadata in ((("traceparent", VALID),), (("traceparent", VALID), *b3)):
        remote, parent = incoming.extract(metadata)
        assert remote is None
        assert trace.get_current_span(parent).get_span_context() == through_propagator(metadata)


def test_tracecontext_alone_is_read_directly(global_textmap: None) -> None:
    propagate.set_global_textmap(TraceContextTextMapPropagator())  # OTEL_PROPAGATORS=tracecontext
    assert Incoming().direct
    propagate.set_global_textmap(CompositePropagator([TraceContextTextMapPropagator()]))
    assert Incoming().direct


def test_as_context_is_what_the_propagator_hands_over() -> None:
    remote, _ = Incoming().extract((("traceparent", VALID),))
    assert remote is not None
    ours, theirs = as_context(remote), propagate.extract({"traceparent": VALID})
    assert list(ours) == list(theirs)  # the same keys: only the current span
    assert trace.get_current_span(ours).get_span_context() == trace.get_current_span(theirs).get_span_context()


class Failing(TraceContextTextMapPropagator):
    def extract(self, carrier: Any, context: Context | None = None, getter: Getter[Any] = default_getter) -> Context:
        raise RuntimeError("this propagator fails")


def test_a_propagator_that_fails_the_startup_check_is_left_to_read_every_header(global_textmap: None) -> None:
    propagate.set_global_textmap(CompositePropagator([Failing()]))
    assert not Incoming().direct  # and the server starts: the check does not raise
