"""meshrpc decides sampling before the SDK: the same decisions as the configured sampler,
the same span contexts for dropped calls, and the SDK asked only for sampled ones."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from meshrpc import testing
from meshrpc._sampling import STAND_IN, PreSampler
from tests.apps.echo import app as echo_app
from tests.helpers import reset_otel_globals, traced_by

ATTRS = {"rpc.system": "grpc", "rpc.service": "echo.Echo", "rpc.method": "Unary"}


def peer() -> str:
    return "ipv4:127.0.0.1:5555"


class Seeded(RandomIdGenerator):
    """Random ids from a seeded generator, so a test sees the same ids every run."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def generate_span_id(self) -> int:
        return self.rng.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        return self.rng.getrandbits(128) or 1


def provider(sampler: Sampler, seed: int = 1) -> tuple[TracerProvider, InMemorySpanExporter]:
    spans = InMemorySpanExporter()
    made = TracerProvider(sampler=sampler, id_generator=Seeded(seed))
    made.add_span_processor(SimpleSpanProcessor(spans))
    return made, spans


def parent(sampled: bool, state: str = "") -> Any:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    context = SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C,
        0xB7AD6B7169203331,
        True,
        flags,
        TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(context))


@pytest.mark.parametrize(
    "sampler",
    [ParentBasedTraceIdRatio(0.1), ParentBased(TraceIdRatioBased(0.37)), TraceIdRatioBased(0.5)],
    ids=["parentbased_traceidratio", "ParentBased(ratio)", "traceidratio"],
)
def test_new_traces_are_sampled_as_the_configured_sampler_samples_them(sampler: Sampler) -> None:
    made, spans = provider(sampler)
    tracer = made.get_tracer("meshrpc")
    presampler = PreSampler.for_tracer(tracer)
    assert presampler is not None
    asked = 0

    def attributes(peer: str) -> dict[str, Any]:
        nonlocal asked
        asked += 1
        assert peer == "ipv4:127.0.0.1:5555"
        return ATTRS

    decisions = []
    for _ in range(3000):
        span = presampler.start("echo.Echo/Unary", None, attributes, peer)
        context = span.get_span_context()
        assert context.is_valid and not context.is_remote
        expected = sampler.should_sample(None, context.trace_id, "echo.Echo/Unary").decision.is_sampled()
        assert span.is_recording() is expected is context.trace_flags.sampled
        # the SDK's flags for a new trace: the W3C random-trace-id flag (id generator is random)
        assert context.trace_flags & ~TraceFlags.SAMPLED == getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
        assert span.get_span_context() is context  # read once, kept: one span id per span
        decisions.append((context.trace_id, expected))
        span.end()
    sampled = [trace_id for trace_id, is_sampled in decisions if is_sampled]
    assert 0 < len(sampled) < 3000
    # only sampled calls reached the SDK, each with the very trace id meshrpc decided on
    assert asked == len(sampled)
    assert [s.context.trace_id for s in spans.get_finished_spans()] == sampled
    assert all(
        s.kind == trace.SpanKind.SERVER and dict(s.attributes or {}) == ATTRS for s in spans.get_finished_spans()
    )


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("sampler", [ParentBasedTraceIdRatio(0.0001), TraceIdRatioBased(0.5)], ids=["parent", "ratio"])
def test_an_incoming_parent_gives_what_the_sdk_gives(sampler: Sampler, sampled: bool) -> None:
    made, _ = provider(sampler)
    ours_tracer, sdk_tracer = made.get_tracer("meshrpc"), made.get_tracer("sdk")
    presampler = PreSampler.for_tracer(ours_tracer)
    assert presampler is not None
    incoming = parent(sampled, "vendor=abc")
    ours = presampler.start("x", incoming, lambda peer: ATTRS, peer)
    theirs = sdk_tracer.start_span("x", context=incoming, kind=trace.SpanKind.SERVER, attributes=ATTRS)
    a, b = ours.get_span_context(), theirs.get_span_context()
    assert (a.trace_id, a.trace_flags, a.trace_state, a.is_remote) == (
        b.trace_id,
        b.trace_flags,
        b.trace_state,
        b.is_remote,
    )
    assert ours.is_recording() == theirs.is_recording()
    assert a.span_id not in (0, 0xB7AD6B7169203331)


def test_other_samplers_are_left_to_the_sdk() -> None:
    for sampler in (
        # the SDK's static samplers are known by identity: these describe themselves alike
        StaticSampler(Decision.RECORD_ONLY),
        StaticSampler(Decision.DROP),
        ParentBased(ALWAYS_ON),
        ParentBased(TraceIdRatioBased(0.1), remote_parent_not_sampled=ALWAYS_ON),
    ):
        made, _ = provider(sampler)
        assert PreSampler.for_tracer(made.get_tracer("meshrpc")) is None, sampler.get_description()
    assert PreSampler.for_tracer(trace.NoOpTracer()) is None


@pytest.mark.parametrize(
    "sampler", [ALWAYS_ON, ALWAYS_OFF, DEFAULT_ON, DEFAULT_OFF], ids=lambda s: s.get_description()[:40]
)
@pytest.mark.parametrize("incoming", ["none", "sampled", "unsampled"])
def test_the_sdk_s_static_samplers_are_decided_as_the_sdk_decides(sampler: Sampler, incoming: str) -> None:
    """always_on, always_off and their parent-based forms (parentbased_always_on is the SDK's
    default sampler): the same decision, trace id, flags and trace state as the SDK's span."""
    made, _ = provider(sampler)
    presampler = PreSampler.for_tracer(made.get_tracer("meshrpc"))
    assert presampler is not None
    sdk_tracer = made.get_tracer("sdk")
    context = None if incoming == "none" else parent(incoming == "sampled", "vendor=abc")
    for _ in range(50):
        ours = presampler.start("x", context, lambda peer: ATTRS, peer)
        theirs = sdk_tracer.start_span("x", context=context, kind=trace.SpanKind.SERVER, attributes=ATTRS)
        a, b = ours.get_span_context(), theirs.get_span_context()
        assert (a.trace_flags, a.trace_state, a.is_remote) == (b.trace_flags, b.trace_state, b.is_remote)
        assert ours.is_recording() is theirs.is_recording()
        if context is not None:
            assert a.trace_id == b.trace_id
        ours.end()
        theirs.end()


def test_only_meshrpc_s_tracer_draws_its_ids() -> None:
    made, spans = provider(ParentBasedTraceIdRatio(1.0))
    ours, user = made.get_tracer("meshrpc"), made.get_tracer("user")
    presampler = PreSampler.for_tracer(ours)
    assert presampler is not None
    span = presampler.start("x", None, lambda peer: ATTRS, peer)
    with user.start_as_current_span("child") as child:
        assert child.get_span_context().trace_id != span.get_span_context().trace_id
    span.end()
    assert len(spans.get_finished_spans()) == 2
    assert user.id_generator is made.id_generator  # the user's tracers keep the provider's generator


class Traced(helloworld_pb2_grpc.GreeterServicer):
    """Reports the span context it sees while serving, and what its outgoing call carried."""

    def __init__(self) -> None:
        self.channel: grpc.aio.Channel | None = None

    async def SayHello(self, request: Any, context: Any) -> Any:
        assert self.channel is not None
        current = trace.get_current_span()
        seen = current.get_span_context()
        await asyncio.sleep(random.random() / 100)  # the calls interleave on the loop
        logging.getLogger("tests.traced").info("serving %s", request.name)
        reply = await echo_pb2_grpc.EchoStub(self.channel).Unary(echo_pb2.EchoRequest(text="metadata"))
        after = trace.get_current_span().get_span_context()
        return helloworld_pb2.HelloReply(
            message=json.dumps(
                {
                    "seen": [seen.trace_id, seen.span_id, int(seen.trace_flags), seen.is_valid],
                    "after": [after.trace_id, after.span_id],
                    "sent": json.loads(reply.text).get("traceparent"),
                    "stand_in": current is STAND_IN,
                }
            )
        )


@pytest.fixture
def dropping() -> Iterator[InMemorySpanExporter]:
    """A global SDK whose sampler drops every new trace and follows an incoming parent."""
    reset_otel_globals()
    made, spans = provider(ParentBasedTraceIdRatio(0.0))
    trace.set_tracer_provider(made)
    try:
        yield spans
    finally:
        reset_otel_globals()


class PassThrough(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        return await continuation(handler_call_details)


@pytest.mark.parametrize("interceptors", [(), (PassThrough(),)], ids=["stand-in", "interceptor"])
async def test_a_served_call_that_is_dropped_still_has_its_trace_everywhere(
    dropping: InMemorySpanExporter, caplog: pytest.LogCaptureFixture, interceptors: tuple[Any, ...]
) -> None:
    """A real server's dropped calls, 20 at once: each handler sees its own trace id and span
    id, its log lines and outgoing calls carry them (not sampled), and nothing leaks out.

    Without interceptors, the current span is the server's stand-in, which reads each
    call's own (no span made current call by call); with one, which could make a span
    current before the handler, each dropped span is made current itself."""
    caplog.handler.addFilter(meshrpc.TraceContextFilter())
    traced = Traced()
    incoming_parent = f"00-{'ab' * 16}-{'cd' * 8}-00"  # an unsampled caller
    front_app = meshrpc.App("front", services=[traced], interceptors=list(interceptors))
    async with testing.running(echo_app) as back, testing.running(front_app) as front:
        traced.channel = grpc.aio.insecure_channel(back.target, interceptors=[meshrpc.OutboundInterceptor()])
        stub = helloworld_pb2_grpc.GreeterStub(front.channel)
        with caplog.at_level(logging.INFO, logger="tests.traced"):
            replies = await asyncio.gather(
                *(stub.SayHello(helloworld_pb2.HelloRequest(name=str(i))) for i in range(19)),
                stub.SayHello(helloworld_pb2.HelloRequest(name="child"), metadata=(("traceparent", incoming_parent),)),
            )
        await traced.channel.close()
    assert not trace.get_current_span().get_span_context().is_valid  # nothing current out here
    assert dropping.get_finished_spans() == ()  # none sampled: the SDK made no span
    results = [json.loads(r.message) for r in replies]
    for result in results:
        assert result["stand_in"] is (not interceptors)
        trace_id, span_id, flags, valid = result["seen"]
        assert valid and not flags & TraceFlags.SAMPLED
        assert result["after"] == [trace_id, span_id]  # the same span all through the handler
        _, sent_trace, sent_parent, sent_flags = result["sent"].split("-")
        # the outgoing call continues this call's trace, from this call's span, not sampled
        assert (int(sent_trace, 16), int(sent_parent, 16)) == (trace_id, span_id)
        assert not int(sent_flags, 16) & TraceFlags.SAMPLED
    assert len({r["seen"][0] for r in results}) == 20  # 19 new traces and the caller's
    assert results[-1]["seen"][0] == int("ab" * 16, 16) and results[-1]["seen"][1] != int("cd" * 8, 16)
    logged = {r.getMessage().split()[-1]: r.trace_id for r in caplog.records if r.name == "tests.traced"}  # type: ignore[attr-defined]
    assert logged == {str(i) if i < 19 else "child": f"{r['seen'][0]:032x}" for i, r in enumerate(results)}


class SyncTraced(helloworld_pb2_grpc.GreeterServicer):
    """A ``def`` handler, run in meshrpc's thread pool: reports the span context it sees."""

    def SayHello(self, request: Any, context: Any) -> Any:
        current = trace.get_current_span()
        seen = current.get_span_context()
        return helloworld_pb2.HelloReply(
            message=f"{seen.trace_id:032x} {seen.is_valid} {int(seen.trace_flags)} {current is STAND_IN}"
        )


async def test_a_def_handler_in_a_thread_sees_its_own_dropped_call_s_trace(dropping: InMemorySpanExporter) -> None:
    async with testing.running(meshrpc.App("sync", services=[SyncTraced()])) as served:
        stub = helloworld_pb2_grpc.GreeterStub(served.channel)
        replies = await asyncio.gather(
            *(
                stub.SayHello(
                    helloworld_pb2.HelloRequest(name=str(i)), metadata=(("traceparent", f"00-{i:032x}-{'cd' * 8}-00"),)
                )
                for i in range(1, 11)
            )
        )
    assert [r.message for r in replies] == [f"{i:032x} True 0 True" for i in range(1, 11)]
    assert dropping.get_finished_spans() == ()


class Deciding(helloworld_pb2_grpc.GreeterServicer):
    """Reports the current span: its trace id, flags, and whether it records."""

    async def SayHello(self, request: Any, context: Any) -> Any:
        current = trace.get_current_span()
        seen = current.get_span_context()
        return helloworld_pb2.HelloReply(
            message=json.dumps([seen.trace_id, int(seen.trace_flags), current.is_recording()])
        )


async def test_served_new_traces_are_sampled_as_the_configured_sampler_samples_them() -> None:
    """Through a real server, with the SDK's own random ids: the new traces it drops are
    decided in the observation itself, without PreSampler.start; every call's decision is
    still the sampler's own for its trace id, and only the sampled calls reach the SDK."""
    sampler = ParentBasedTraceIdRatio(0.3)
    spans = traced_by(sampler)
    replies = []
    try:
        # Two servers one after another in one process, as a test suite starts them: the
        # second decides as the first (the SDK gives both the same tracer object).
        for _ in range(2):
            async with testing.running(meshrpc.App("deciding", services=[Deciding()])) as served:
                stub = helloworld_pb2_grpc.GreeterStub(served.channel)
                for start in range(0, 150, 50):
                    batch = await asyncio.gather(
                        *(stub.SayHello(helloworld_pb2.HelloRequest(name=str(i))) for i in range(start, start + 50))
                    )
                    replies += [json.loads(r.message) for r in batch]
    finally:
        reset_otel_globals()
    random_flag = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)
    sampled = []
    for trace_id, flags, recording in replies:
        expected = sampler.should_sample(None, trace_id, "helloworld.Greeter/SayHello").decision.is_sampled()
        assert recording is expected and bool(flags & TraceFlags.SAMPLED) is expected
        assert flags & ~TraceFlags.SAMPLED == random_flag  # the SDK's flags for a new trace
        if expected:
            sampled.append(trace_id)
    assert len({trace_id for trace_id, _, _ in replies}) == 300
    assert 30 < len(sampled) < 180  # about 90 of 300
    assert sorted(s.context.trace_id for s in spans.get_finished_spans()) == sorted(sampled)


def test_a_process_that_builds_server_after_server_keeps_sampling_as_the_sampler() -> None:
    """The SDK hands out one tracer per name and version: every server built in a process
    (a thousand, in a long test suite) meets the same tracer, and the last one still
    starts its spans, decides as the sampler, and draws new trace ids the SDK's way."""
    sampler = ParentBasedTraceIdRatio(0.3)
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("meshrpc", meshrpc.__version__)
    presamplers = [PreSampler.for_tracer(provider.get_tracer("meshrpc", meshrpc.__version__)) for _ in range(1_100)]
    last = presamplers[-1]
    assert last is not None and last.random_ids  # the SDK's own random ids: the fast path
    assert type(tracer.id_generator.inner) is RandomIdGenerator  # wrapped once
    decided = [last.start("helloworld.Greeter/SayHello", None, lambda peer: {}, lambda: None) for _ in range(300)]
    sampled = []
    for span in decided:
        seen = span.get_span_context()
        expected = sampler.should_sample(None, seen.trace_id, "helloworld.Greeter/SayHello").decision.is_sampled()
        assert span.is_recording() is expected and seen.trace_flags.sampled is expected
        if expected:
            sampled.append(seen.trace_id)
            span.end()
    assert 30 < len(sampled) < 180
    assert sorted(s.context.trace_id for s in spans.get_finished_spans()) == sorted(sampled)


class Spawning(helloworld_pb2_grpc.GreeterServicer):
    """Starts a task that reads the current span after the call has ended; reports what it saw."""

    def __init__(self) -> None:
        self.later: list[asyncio.Task[tuple[str, int]]] = []

    async def SayHello(self, request: Any, context: Any) -> Any:
        async def after_the_call() -> tuple[str, int]:
            await asyncio.sleep(0.05)
            return request.name, int(trace.get_current_span().get_span_context().trace_id)

        self.later.append(asyncio.ensure_future(after_the_call()))
        seen = trace.get_current_span().get_span_context()
        return helloworld_pb2.HelloReply(message=f"{seen.trace_id} {seen.is_valid}")


async def test_a_task_the_handler_starts_keeps_its_dropped_call_s_trace(dropping: InMemorySpanExporter) -> None:
    """A dropped call's span sits behind the stand-in in the call's task context, which the
    tasks its handler starts copy: one trace id for the call and its task, even after the
    call has ended."""
    spawning = Spawning()
    async with testing.running(meshrpc.App("spawning", services=[spawning])) as served:
        stub = helloworld_pb2_grpc.GreeterStub(served.channel)
        replies = await asyncio.gather(*(stub.SayHello(helloworld_pb2.HelloRequest(name=str(i))) for i in range(10)))
        later = await asyncio.gather(*spawning.later)
    seen = [r.message.split() for r in replies]
    assert all(valid == "True" for _, valid in seen)
    assert dict(later) == {str(i): int(trace_id) for i, (trace_id, _) in enumerate(seen)}
    assert len({trace_id for _, trace_id in later}) == 10 and dropping.get_finished_spans() == ()
