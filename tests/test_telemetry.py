"""OpenTelemetry spans and metrics, propagation, access log and trace ids in logs."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import metrics, propagate, trace
from opentelemetry.propagators.b3 import B3MultiFormat
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from meshrpc import testing
from meshrpc._spans import Pipeline
from tests.apps.echo import Echo, app
from tests.helpers import Served, reset_otel_globals

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Otel:
    """A tracer provider the application built (``sdk``: the SDK's spans), or as meshrpc's
    ``otel_sdk`` builds it (``pipeline``: meshrpc's own server spans, batched)."""

    def __init__(self, kind: str = "sdk") -> None:
        self.spans = InMemorySpanExporter()
        if kind == "pipeline":
            limits = SpanLimits()
            provider = TracerProvider(span_limits=limits, active_span_processor=Pipeline(limits))
            provider.add_span_processor(BatchSpanProcessor(self.spans))
        else:
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.provider = provider
        self.reader = InMemoryMetricReader()
        trace.set_tracer_provider(provider)
        metrics.set_meter_provider(MeterProvider(metric_readers=[self.reader]))

    def finished(self, name: str) -> list[ReadableSpan]:
        self.provider.force_flush()
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def points(self, metric_name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found = []
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == metric_name:
                        found.extend(metric.data.data_points)
        return found


@pytest.fixture(params=["sdk", "pipeline"])
def otel(request: pytest.FixtureRequest) -> Iterator[Otel]:
    reset_otel_globals()
    try:
        yield Otel(request.param)
    finally:
        reset_otel_globals()


async def test_no_sdk_means_nothing_observes_the_rpcs() -> None:
    reset_otel_globals()
    async with testing.running(app) as server:
        assert server.server.assembly is not None and server.server.assembly.observed is False


async def test_unary_span_follows_the_rpc_conventions(otel: Otel) -> None:
    async with testing.running(app) as server:
        await echo_pb2_grpc.EchoStub(server.channel).Unary(echo_pb2.EchoRequest(text="hi"))
        port = server.port
    (span,) = otel.finished("echo.Echo/Unary")
    assert span.kind is SpanKind.SERVER
    assert dict(span.attributes or {}) | {"client.port": 0} == {
        "rpc.system": "grpc",
        "rpc.service": "echo.Echo",
        "rpc.method": "Unary",
        "rpc.grpc.status_code": 0,
        "server.address": "127.0.0.1",
        "server.port": port,
        "client.address": "127.0.0.1",
        "client.port": 0,
    }
    assert span.status.status_code is StatusCode.UNSET


async def test_status_of_failed_and_cancelled_rpcs(otel: Otel) -> None:
    async with testing.running(app) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(echo_pb2.EchoRequest(fail="NOT_FOUND"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(echo_pb2.EchoRequest(fail="crash"))
        call = stub.Unary(echo_pb2.EchoRequest(sleep=5))
        await asyncio.sleep(0.2)
        call.cancel()
        for _ in range(50):
            if len(otel.finished("echo.Echo/Unary")) == 3:
                break
            await asyncio.sleep(0.02)
    not_found, crash, cancelled = sorted(otel.finished("echo.Echo/Unary"), key=lambda s: s.start_time or 0)
    assert not_found.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]  # type: ignore[index]
    assert not_found.status.status_code is StatusCode.UNSET  # the client's problem, not the server's
    assert crash.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]  # type: ignore[index]
    assert crash.status.status_code is StatusCode.ERROR
    assert [e.name for e in crash.events] == ["exception"]
    assert "hunter2" in str(crash.events[0].attributes)  # the exception is in the trace, not the reply
    assert cancelled.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]  # type: ignore[index]


async def test_parent_from_incoming_traceparent(otel: Otel) -> None:
    async with testing.running(app) as server:
        await echo_pb2_grpc.EchoStub(server.channel).Unary(
            echo_pb2.EchoRequest(text="x"), metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        )
    (span,) = otel.finished("echo.Echo/Unary")
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID and span.parent.is_remote


async def test_parent_from_traceparent_behind_a_grpc_interceptor_and_from_a_def_handler(otel: Otel) -> None:
    # The request metadata comes from grpc's handler lookup (see _rpc_context.request_metadata):
    # an interceptor runs that lookup itself, and a def handler runs on another thread.
    class PassThrough(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
            return await continuation(details)

    class Greeter(helloworld_pb2_grpc.GreeterServicer, meshrpc.Service):
        def SayHello(self, request: helloworld_pb2.HelloRequest, context: Any) -> helloworld_pb2.HelloReply:
            current = trace.get_current_span().get_span_context()
            return helloworld_pb2.HelloReply(message=f"{current.trace_id:032x}")

    traceparent = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
    for interceptors in ([], [PassThrough()]):
        greeter = meshrpc.App("greeter", services=[Greeter()], interceptors=interceptors)
        async with testing.running(greeter) as server:
            stub = helloworld_pb2_grpc.GreeterStub(server.channel)
            reply = await stub.SayHello(helloworld_pb2.HelloRequest(name="x"), metadata=traceparent)
            untraced = await stub.SayHello(helloworld_pb2.HelloRequest(name="x"))
        assert reply.message == TRACE_ID  # the handler's current span is on the caller's trace
        assert untraced.message not in (TRACE_ID, "0" * 32)  # a new trace, not the last call's
    spans = otel.finished("helloworld.Greeter/SayHello")
    assert len(spans) == 4
    parented = [s for s in spans if s.parent is not None]
    assert len(parented) == 2
    assert all(f"{s.context.trace_id:032x}" == TRACE_ID and s.parent.is_remote for s in parented)  # type: ignore[union-attr]


def test_request_metadata_is_the_lookups_only_for_the_method_looked_up() -> None:
    import contextvars

    from meshrpc._rpc_context import call_details, request_metadata

    class Details(grpc.HandlerCallDetails):
        def __init__(self, method: str, invocation_metadata: tuple[tuple[str, str], ...]) -> None:
            self.method = method
            self.invocation_metadata = invocation_metadata

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("traceparent", "from the context"),)

    def check() -> None:
        context: Any = Context()
        assert request_metadata(context, "/a.A/X") == (("traceparent", "from the context"),)  # no lookup here
        call_details.set(Details("/a.A/X", (("traceparent", "from the lookup"),)))
        assert request_metadata(context, "/a.A/X") == (("traceparent", "from the lookup"),)
        assert request_metadata(context, "/a.A/Y") == (("traceparent", "from the context"),)  # another method's

    contextvars.copy_context().run(check)


async def test_parent_from_b3_when_configured(otel: Otel) -> None:
    previous = propagate.get_global_textmap()
    propagate.set_global_textmap(B3MultiFormat())  # what OTEL_PROPAGATORS=b3multi selects
    try:
        async with testing.running(app) as server:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(
                echo_pb2.EchoRequest(text="x"),
                metadata=(("x-b3-traceid", TRACE_ID), ("x-b3-spanid", PARENT_ID), ("x-b3-sampled", "1")),
            )
    finally:
        propagate.set_global_textmap(previous)
    (span,) = otel.finished("echo.Echo/Unary")
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID


async def test_streaming_spans_cover_the_whole_stream(otel: Otel) -> None:
    async with testing.running(app) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        assert len([r async for r in stub.ServerStream(echo_pb2.EchoRequest(count=3, sleep=0.1))]) == 3

        async def requests():  # type: ignore[no-untyped-def]
            for text in "abcd":
                yield echo_pb2.EchoRequest(text=text)

        assert len([r async for r in stub.BidiStream(requests())]) == 4
        assert (await stub.ClientStream(requests())).text == "a,b,c,d"
    (server_stream,) = otel.finished("echo.Echo/ServerStream")
    assert (server_stream.end_time or 0) - (server_stream.start_time or 0) >= 0.25e9
    assert server_stream.attributes["rpc.grpc.status_code"] == 0  # type: ignore[index]
    assert len(otel.finished("echo.Echo/BidiStream")) == 1 and len(otel.finished("echo.Echo/ClientStream")) == 1
    responses = {p.attributes["rpc.method"]: p.sum for p in otel.points("rpc.server.responses_per_rpc")}
    requests_in = {p.attributes["rpc.method"]: p.sum for p in otel.points("rpc.server.requests_per_rpc")}
    assert responses == {"ServerStream": 3, "BidiStream": 4}
    assert requests_in == {"BidiStream": 4, "ClientStream": 4}


async def test_stream_counts_behind_middleware_and_for_writing_handlers(otel: Otel) -> None:
    """Replies are counted where they are written: by the middleware chain when there is
    one; a handler that writes with context.write records no count rather than a wrong 0."""

    async def nothing(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        await call_next(call)

    class Writing(Echo):
        async def BidiStream(self, requests: Any, context: Any) -> None:  # type: ignore[override]
            async for request in requests:
                await context.write(echo_pb2.EchoReply(text=request.text))

    async def requests():  # type: ignore[no-untyped-def]
        for text in "abc":
            yield echo_pb2.EchoRequest(text=text)

    behind = meshrpc.App("echo", services=[Writing()], middleware=[nothing])
    async with testing.running(behind) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        assert len([r async for r in stub.ServerStream(echo_pb2.EchoRequest(count=5))]) == 5
        assert len([r async for r in stub.BidiStream(requests())]) == 3
    responses = {p.attributes["rpc.method"]: p.sum for p in otel.points("rpc.server.responses_per_rpc")}
    requests_in = {p.attributes["rpc.method"]: p.sum for p in otel.points("rpc.server.requests_per_rpc")}
    assert responses == {"ServerStream": 5}
    assert requests_in == {"BidiStream": 3}


async def test_a_handler_adds_to_its_server_span_and_nests_its_own_spans(otel: Otel) -> None:
    """What an application does with the current span, from an async and a 'def' handler
    (run in a thread): attributes, an event, a child span, all on the server span's trace."""
    user = trace.get_tracer("app")

    def annotate(kind: str) -> None:
        span = trace.get_current_span()
        assert span.is_recording()
        span.set_attribute("app.kind", kind)
        span.add_event("looked up", {"hit": True})
        with user.start_as_current_span(f"child {kind}"):
            pass

    class Annotating(Echo):
        async def Unary(self, request: Any, context: Any) -> Any:
            annotate("async")
            return echo_pb2.EchoReply(text=request.text)

        def ServerStream(self, request: Any, context: Any) -> Any:  # type: ignore[override]
            annotate("def")
            yield echo_pb2.EchoReply(text=request.text)

    async with testing.running(meshrpc.App("echo", services=[Annotating()])) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        await stub.Unary(echo_pb2.EchoRequest(text="a"))
        assert len([r async for r in stub.ServerStream(echo_pb2.EchoRequest(text="b"))]) == 1
    for name, kind in (("echo.Echo/Unary", "async"), ("echo.Echo/ServerStream", "def")):
        (span,) = otel.finished(name)
        (child,) = otel.finished(f"child {kind}")
        assert span.attributes["app.kind"] == kind  # type: ignore[index]
        assert span.attributes["rpc.grpc.status_code"] == 0  # type: ignore[index]
        assert [(e.name, dict(e.attributes or {})) for e in span.events] == [("looked up", {"hit": True})]
        assert child.parent is not None and child.parent.span_id == span.context.span_id
        assert child.context.trace_id == span.context.trace_id


async def test_a_wrong_reply_type_is_observed_as_the_internal_error_the_client_gets(otel: Otel) -> None:
    async with testing.running(app) as server:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(echo_pb2.EchoRequest(fail="return-dict"))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    (span,) = otel.finished("echo.Echo/Unary")
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]  # type: ignore[index]
    assert span.status.status_code is StatusCode.ERROR
    (point,) = otel.points("rpc.server.duration")
    assert point.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]


async def test_duration_and_in_flight_metrics(otel: Otel) -> None:
    async with testing.running(app) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        for _ in range(3):
            await stub.Unary(echo_pb2.EchoRequest(text="x"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(echo_pb2.EchoRequest(fail="UNAVAILABLE"))
        slow = asyncio.ensure_future(stub.Unary(echo_pb2.EchoRequest(sleep=0.5)))
        await asyncio.sleep(0.2)
        during = {p.attributes["rpc.method"]: p.value for p in otel.points("rpc.server.active_requests")}
        await slow
    durations = {
        (p.attributes["rpc.method"], p.attributes["rpc.grpc.status_code"]): p.count
        for p in otel.points("rpc.server.duration")
    }
    assert durations == {("Unary", 0): 4, ("Unary", grpc.StatusCode.UNAVAILABLE.value[0]): 1}
    point = next(p for p in otel.points("rpc.server.duration") if p.attributes["rpc.grpc.status_code"] == 0)
    assert point.attributes["rpc.system"] == "grpc" and point.attributes["rpc.service"] == "echo.Echo"
    assert during["Unary"] == 1 and during["ServerStream"] == 0  # one per method, read when collected
    after = {p.attributes["rpc.method"]: p.value for p in otel.points("rpc.server.active_requests")}
    assert set(after.values()) == {0}  # back to zero once everything finished


class Front(helloworld_pb2_grpc.GreeterServicer):
    """Calls the echo service while serving: the outbound side of propagation."""

    def __init__(self) -> None:
        self.channel: grpc.aio.Channel | None = None

    async def SayHello(self, request: Any, context: Any) -> Any:
        assert self.channel is not None
        reply = await echo_pb2_grpc.EchoStub(self.channel).Unary(echo_pb2.EchoRequest(text="metadata"))
        return helloworld_pb2.HelloReply(message=reply.text)


async def test_outbound_interceptor_connects_the_trace(otel: Otel) -> None:
    front = Front()
    front_app = meshrpc.App("front", services=[front])
    async with testing.running(app) as back, testing.running(front_app) as server:
        front.channel = grpc.aio.insecure_channel(back.target, interceptors=[meshrpc.OutboundInterceptor()])
        reply = await helloworld_pb2_grpc.GreeterStub(server.channel).SayHello(
            helloworld_pb2.HelloRequest(name="x"),
            metadata=(("x-request-id", "req-42"), ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")),
        )
        await front.channel.close()
    sent = json.loads(reply.message)
    assert sent["x-request-id"] == "req-42"  # Istio's request id forwarded
    (front_span,) = otel.finished("helloworld.Greeter/SayHello")
    (back_span,) = otel.finished("echo.Echo/Unary")
    assert back_span.parent is not None and back_span.parent.span_id == front_span.context.span_id
    assert back_span.context.trace_id == front_span.context.trace_id == int(TRACE_ID, 16)
    assert sent["traceparent"].split("-")[2] == f"{front_span.context.span_id:016x}"


async def test_outgoing_metadata_without_sdk_forwards_the_mesh_headers() -> None:
    reset_otel_globals()
    front = Front()
    async with testing.running(app) as back, testing.running(meshrpc.App("front", services=[front])) as server:
        front.channel = grpc.aio.insecure_channel(back.target, interceptors=[meshrpc.OutboundInterceptor()])
        incoming = (
            ("x-request-id", "req-7"),
            ("x-b3-traceid", TRACE_ID),
            ("x-b3-spanid", PARENT_ID),
            ("x-b3-sampled", "1"),
            ("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),
        )
        reply = await helloworld_pb2_grpc.GreeterStub(server.channel).SayHello(
            helloworld_pb2.HelloRequest(name="x"), metadata=incoming
        )
        await front.channel.close()
    sent = json.loads(reply.message)
    assert {k: sent[k] for k, _ in incoming} == dict(incoming)
    assert meshrpc.outgoing_metadata([("a", "b")]) == [("a", "b")]  # outside an RPC: nothing added


async def test_access_log_json(caplog: pytest.LogCaptureFixture) -> None:
    reset_otel_globals()
    with caplog.at_level(logging.INFO, logger="meshrpc.access"):
        async with testing.running(app, access_log="json") as server:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(
                echo_pb2.EchoRequest(text="x"), metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
            )
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshrpc.access"]
    assert line["method"] == "/echo.Echo/Unary" and line["status"] == "OK"
    assert line["duration_ms"] >= 0 and line["peer"].startswith("ipv4:127.0.0.1:")


async def test_access_log_is_off_by_default_and_sampled(caplog: pytest.LogCaptureFixture) -> None:
    reset_otel_globals()
    with caplog.at_level(logging.INFO, logger="meshrpc.access"):
        async with testing.running(app) as server:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(echo_pb2.EchoRequest(text="x"))
        async with testing.running(app, access_log="text", access_log_sample_rate=0.0) as server:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(echo_pb2.EchoRequest(text="x"))
        async with testing.running(app, access_log="text") as server:
            await echo_pb2_grpc.EchoStub(server.channel).Unary(echo_pb2.EchoRequest(text="x"))
    lines = [r.getMessage() for r in caplog.records if r.name == "meshrpc.access"]
    assert len(lines) == 1 and lines[0].startswith("method=/echo.Echo/Unary status=OK duration_ms=")


async def test_log_lines_in_an_rpc_carry_the_trace_id(otel: Otel, caplog: pytest.LogCaptureFixture) -> None:
    caplog.handler.addFilter(meshrpc.TraceContextFilter())
    async with testing.running(app) as server:
        await echo_pb2_grpc.EchoStub(server.channel).Unary(
            echo_pb2.EchoRequest(text="log"), metadata=(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
        )
    record = next(r for r in caplog.records if r.getMessage() == "handling a logged call")
    assert record.trace_id == TRACE_ID  # type: ignore[attr-defined]
    outside = logging.LogRecord("x", logging.INFO, "", 0, "outside", None, None)
    meshrpc.TraceContextFilter().filter(outside)
    assert outside.trace_id == "" and outside.trace == ""  # type: ignore[attr-defined]


def test_otel_sdk_from_environment_exports_and_flushes_at_shutdown() -> None:
    env = {
        "MESHRPC_OTEL_SDK": "true",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "echo-test",
        "OTEL_PROPAGATORS": "tracecontext,baggage,b3multi",  # Istio's Envoy speaks B3
    }
    with Served("tests.apps.echo:app", "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            b3 = (("x-b3-traceid", TRACE_ID), ("x-b3-spanid", PARENT_ID), ("x-b3-sampled", "1"))
            echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="log"), metadata=b3)
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 0
    log = served.log
    assert '"name": "echo.Echo/Unary"' in log  # the batch processor's span, flushed at shutdown
    assert '"service.name": "echo-test"' in log
    assert f"handling a logged call trace_id={TRACE_ID}" in log  # the CLI's log format carries the trace id
    assert f'"trace_id": "0x{TRACE_ID}"' in log and f'"parent_id": "0x{PARENT_ID}"' in log  # B3 parent


class Reporting(helloworld_pb2_grpc.GreeterServicer):
    """Reports its call's trace as the handler sees it; a name of "fail" fails the call.
    A stream sends the report three times."""

    async def SayHello(self, request: Any, context: Any) -> Any:
        if request.name == "fail":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")
        current = trace.get_current_span()
        seen = current.get_span_context()
        return helloworld_pb2.HelloReply(message=json.dumps([f"{seen.trace_id:032x}", current.is_recording()]))

    async def SayHelloStream(self, request: Any, context: Any) -> Any:
        report = await self.SayHello(request, context)
        for _ in range(3):
            yield report


class Writing(Reporting):
    """Writes a stream's reports with ``context.write``: replies meshrpc does not count."""

    async def SayHelloStream(self, request: Any, context: Any) -> None:  # type: ignore[override]
        report = await self.SayHello(request, context)
        for _ in range(3):
            await context.write(report)


@pytest.mark.parametrize("shape", ["unary", "stream", "written stream"])
async def test_calls_observed_in_their_lane_report_what_calls_observed_in_full_report(
    caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    """Unary and server-streaming calls that go as most do (a new trace the sampler drops,
    an OK end, no log line) are observed inline in their wrapper; callers' traces, sampled
    calls, failures and logged calls in full.  Mixed on one server, every call still has its
    own trace (the sampler's decision for it), the spans of exactly the sampled calls, its
    log line at the configured rate under its own trace id, and its count in /metrics (a
    stream's replies too, where meshrpc counts them)."""
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    from tests.helpers import free_port, metrics_text, traced_by

    sampler = ParentBasedTraceIdRatio(0.5)
    spans = traced_by(sampler)
    metrics_port = free_port()
    parent = "00-{:032x}-00f067aa0ba902b7-01"
    method = "SayHello" if shape == "unary" else "SayHelloStream"

    async def call(stub: Any, request: Any, metadata: Any = None) -> Any:
        if shape == "unary":
            return await stub.SayHello(request, metadata=metadata)
        replies = [reply async for reply in stub.SayHelloStream(request, metadata=metadata)]
        assert len(replies) == 3 and len({reply.message for reply in replies}) == 1
        return replies[0]

    try:
        with caplog.at_level(logging.INFO, logger="meshrpc.access"):
            app = meshrpc.App("lanes", services=[Writing() if shape == "written stream" else Reporting()])
            settings = {"metrics_port": metrics_port, "access_log": "json", "access_log_sample_rate": 0.3}
            async with testing.running(app, **settings) as server:
                stub = helloworld_pb2_grpc.GreeterStub(server.channel)
                new = await asyncio.gather(*(call(stub, helloworld_pb2.HelloRequest(name=str(i))) for i in range(200)))
                traced = await asyncio.gather(
                    *(
                        call(stub, helloworld_pb2.HelloRequest(), (("traceparent", parent.format(i + 1)),))
                        for i in range(20)
                    )
                )
                for _ in range(10):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await call(stub, helloworld_pb2.HelloRequest(name="fail"))
                    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                scraped = await asyncio.to_thread(metrics_text, metrics_port)
    finally:
        reset_otel_globals()
    seen = [json.loads(r.message) for r in (*new, *traced)]
    assert [trace_id for trace_id, _ in seen[200:]] == [f"{i + 1:032x}" for i in range(20)]  # the callers' traces
    assert all(recording for _, recording in seen[200:])  # their parent was sampled
    sampled = set()
    for trace_id, recording in seen[:200]:
        expected = sampler.should_sample(None, int(trace_id, 16), f"helloworld.Greeter/{method}")
        assert recording is expected.decision.is_sampled()
        if recording:
            sampled.add(trace_id)
    assert len({trace_id for trace_id, _ in seen[:200]}) == 200 and 70 < len(sampled) < 130  # 100 of 200
    ended = spans.get_finished_spans()
    assert {s.name for s in ended} == {f"helloworld.Greeter/{method}"}
    ok_spans = {f"{s.context.trace_id:032x}" for s in ended if s.attributes["rpc.grpc.status_code"] == 0}
    assert ok_spans == sampled | {trace_id for trace_id, _ in seen[200:]}
    assert len(ended) - len(ok_spans) <= 10  # the failed calls' the sampler kept
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshrpc.access"]
    assert 230 * 0.3 * 0.5 < len(logged) < 230 * 0.3 * 1.6
    assert {line["method"] for line in logged} == {f"/helloworld.Greeter/{method}"}
    answered = {trace_id for trace_id, _ in seen}
    ok_lines = [line for line in logged if line["status"] == "OK"]
    assert ok_lines and all(line["trace_id"] in answered for line in ok_lines)  # each under its call's trace
    dropped = {trace_id for trace_id, recording in seen[:200] if not recording}
    assert 0.3 * len(dropped) / 3 < sum(line["trace_id"] in dropped for line in ok_lines) < 0.3 * len(dropped) * 2
    failed_lines = [line for line in logged if line["status"] == "INVALID_ARGUMENT"]
    assert len(ok_lines) + len(failed_lines) == len(logged)

    def value(series: str, code: int) -> float | None:
        found = [
            line
            for line in scraped.splitlines()
            if line.startswith(f"{series}{{")
            and f'rpc_grpc_status_code="{code}"' in line
            and f'rpc_method="{method}"' in line
        ]
        assert len(found) <= 1
        return float(found[0].rsplit(" ", 1)[1]) if found else None

    assert value("rpc_server_duration_milliseconds_count", 0) == 220
    assert value("rpc_server_duration_milliseconds_count", 3) == 10
    replies = "rpc_server_responses_per_rpc"
    if shape == "stream":  # 3 replies each, none for the failed calls
        assert value(f"{replies}_count", 0) == 220 and value(f"{replies}_sum", 0) == 660
        assert value(f"{replies}_count", 3) == 10 and value(f"{replies}_sum", 3) == 0
    else:  # a unary call sends one; replies written with context.write are not counted
        assert value(f"{replies}_count", 0) is None and value(f"{replies}_count", 3) is None
    active = [line for line in scraped.splitlines() if line.startswith("rpc_server_active_requests{")]
    assert active and all(line.endswith(" 0.0") for line in active)
