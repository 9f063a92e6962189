"""The benchmark's contenders, each serving the greeter on 127.0.0.1:PORT until SIGTERM.

    python -m bench.servers CONTENDER PORT

raw               grpc.aio wired by hand with bench/app.py's bare handlers (the ceiling)
raw-otel-contrib  the same, with opentelemetry-instrumentation-grpc's aio server instrumentor
raw-sdk-floor     raw grpc.aio whose handlers do, inline, the least tracing work (the SDK's floor
                  under load); raw-production-floor: the same with the production profile's SDK
                  and a duration histogram
raw-lean-production  raw grpc.aio with the production profile's telemetry inline, done with
                  meshrpc's techniques (histograms outside the SDK, sampling before it)
meshrpc-traced    meshrpc with every RPC traced (otel_sdk, always_on) into a batch processor and a no-op exporter;
                  meshrpc-traced-user-provider: the same SDK set up by the application (the SDK's spans)
meshrpc-middleware  meshrpc with one no-op middleware (what the middleware chain costs)
meshrpc-production  meshrpc as a cluster runs it: the SDK set up by meshrpc from OTEL_* (otel_sdk),
                  metrics always on (periodic reader), traces sampled ParentBased(TraceIdRatio
                  0.1), both exported to nowhere; a JSON access log sampled at 1 %
grpclib           grpclib with its own health and reflection services

(meshrpc with defaults is run as a user runs it: ``meshrpc serve``.)
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc

PLUGINS = Path(__file__).resolve().parent / "plugins"


def tracing_sdk() -> None:
    """Every span sampled and batched, then dropped: what tracing costs without the network."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    class NoOpExporter(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(BatchSpanProcessor(NoOpExporter()))
    trace.set_tracer_provider(provider)


class NoOpSpans(SpanExporter):
    """Spans exported to nowhere: the exporter's own cost (network, encoding) is not meshrpc's."""

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoOpMetrics(MetricExporter):
    def __init__(self) -> None:
        super().__init__()

    def export(self, metrics_data: Any, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


# The production profile as OTEL_* variables: what `meshrpc serve` with otel_sdk reads in a
# cluster.  `bench_noop` names the exporters above, registered as OpenTelemetry exporter
# entry points by bench/plugins (on the production contender's PYTHONPATH), so meshrpc
# finds them by name as it finds the OTLP exporters.
PRODUCTION_OTEL = {
    "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
    "OTEL_TRACES_SAMPLER_ARG": "0.1",
    "OTEL_TRACES_EXPORTER": "bench_noop",
    "OTEL_METRICS_EXPORTER": "bench_noop",
    "OTEL_METRIC_EXPORT_INTERVAL": "10000",
}


def production_sdk() -> None:
    """The same by hand: metrics with a periodic reader, 10 % of new traces, both exported to nowhere."""
    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    provider.add_span_processor(BatchSpanProcessor(NoOpSpans()))
    trace.set_tracer_provider(provider)
    reader = PeriodicExportingMetricReader(NoOpMetrics(), export_interval_millis=10_000)
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))


async def until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)
    await stop.wait()


async def raw(port: int) -> None:
    # Imported here: grpclib's own health proto must not meet grpcio's in one process.
    from bench.app import BareGreeter as Greeter

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await until_sigterm()
    await server.stop(0)


def traced_greeter(start: Callable[[Any, str], Any], end: Callable[[Any, float, str, int | None], None]) -> Any:
    """The bare greeter with ``start(context, method)`` before each call and
    ``end(what_start_returned, started, method, replies_sent)`` after it.  Streamed replies
    are written with ``context.write`` as they come, as meshrpc writes them: no generator
    layer per message."""
    import time

    from bench.app import BareGreeter as Greeter

    class TracedGreeter(Greeter):
        async def SayHello(self, request: Any, context: Any) -> Any:
            started = time.perf_counter()
            handle = start(context, "SayHello")
            reply = await super().SayHello(request, context)
            end(handle, started, "SayHello", None)
            return reply

        async def SayHelloStream(self, request: Any, context: Any) -> None:  # type: ignore[override]
            started, sent = time.perf_counter(), 0
            handle = start(context, "SayHelloStream")
            async for reply in super().SayHelloStream(request, context):
                await context.write(reply)
                sent += 1
            end(handle, started, "SayHelloStream", sent)

    return TracedGreeter()


def floor_servicer(production: bool, port: int) -> Any:
    """The greeter with the least any server-side OpenTelemetry must do per RPC, written inline.

    Extract the incoming trace context, start a SERVER span with the RPC attributes, end
    it with the status code; for the production profile also record the duration
    histogram (and a stream's replies).  No framework, no interceptor: the SDK's own
    cost under the same load.  Streamed replies are written with ``context.write``, as
    meshrpc writes them.
    """
    import time

    from opentelemetry import metrics, propagate, trace

    tracer = trace.get_tracer("floor")
    meter = metrics.get_meter("floor")
    duration = meter.create_histogram("rpc.server.duration", unit="ms") if production else None
    # The semantic conventions' messages per stream, which meshrpc records for server streams.
    responses = meter.create_histogram("rpc.server.responses_per_rpc", unit="{count}") if production else None
    # The attributes meshrpc gives its spans (seven) and its metrics (four).
    base = {"rpc.system": "grpc", "rpc.service": "helloworld.Greeter"}
    server = {"server.address": "127.0.0.1", "server.port": port}
    metric_attrs = {**base, "rpc.grpc.status_code": 0}

    def start(context: Any, method: str) -> Any:
        carrier = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        host, _, port_text = context.peer().rpartition(":")
        attributes = {**base, "rpc.method": method, **server, "client.address": host, "client.port": int(port_text)}
        return tracer.start_span(
            f"helloworld.Greeter/{method}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )

    def end(span: Any, started: float, method: str, sent: int | None) -> None:
        span.set_attribute("rpc.grpc.status_code", 0)
        span.end()
        if duration is not None:
            attrs = {**metric_attrs, "rpc.method": method}
            duration.record((time.perf_counter() - started) * 1000, attrs)
            if responses is not None and sent is not None:
                responses.record(sent, attrs)

    return traced_greeter(start, end)


async def raw_with(port: int, servicer: Any, started_in: Any = None) -> None:
    """A raw grpc.aio server of ``servicer``, started inside the context manager ``started_in``
    (if any): grpc.aio copies the context its server starts in into every RPC's task."""
    import contextlib

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    helloworld_pb2_grpc.add_GreeterServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    with started_in if started_in is not None else contextlib.nullcontext():
        await server.start()
    await until_sigterm()
    await server.stop(0)


async def raw_sdk_floor(port: int) -> None:
    tracing_sdk()
    await raw_with(port, floor_servicer(production=False, port=port))


async def raw_production_floor(port: int) -> None:
    production_sdk()
    await raw_with(port, floor_servicer(production=True, port=port))


def lean_servicer(port: int) -> Any:
    """The production profile's telemetry done inline in raw handlers with meshrpc's own
    techniques (histograms aggregated outside the SDK, in batches; sampling decided before
    it; a dropped call's span behind the stand-in, not made current), and nothing else: no
    framework around the handler, no access log.  What any design built on these techniques
    costs under the same load: the bar meshrpc's production profile is measured against,
    beside the SDK-only floor.  Served by `raw_lean_production`, which starts the server in
    `serving_context()`."""
    import time

    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    from meshrpc._aggregates import BATCH, Aggregates, with_aggregates
    from meshrpc._sampling import Dropped, PreSampler, dropped_span

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.1)))
    provider.add_span_processor(BatchSpanProcessor(NoOpSpans()))
    trace.set_tracer_provider(provider)
    aggregates = Aggregates()
    reader = with_aggregates(PeriodicExportingMetricReader, aggregates, delta=False)(
        NoOpMetrics(), export_interval_millis=10_000
    )
    metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
    presampler = PreSampler.for_tracer(trace.get_tracer("lean"))
    assert presampler is not None
    fields = frozenset(propagate.get_global_textmap().fields)
    duration = aggregates.histogram("rpc.server.duration", unit="ms", description="")
    responses = aggregates.histogram("rpc.server.responses_per_rpc", unit="{count}", description="")
    base = {"rpc.system": "grpc", "rpc.service": "helloworld.Greeter"}
    streams = {
        name: (
            duration.streams_for({**base, "rpc.method": name, "rpc.grpc.status_code": 0}),
            responses.streams_for({**base, "rpc.method": name, "rpc.grpc.status_code": 0}),
        )
        for name in ("SayHello", "SayHelloStream")
    }

    def attributes_for(method: str) -> Any:
        def attributes(peer: str) -> dict[str, Any]:
            host, _, port_text = peer.rpartition(":")
            return {
                **base,
                "rpc.method": method,
                "server.address": "127.0.0.1",
                "server.port": port,
                "client.address": host,
                "client.port": int(port_text),
            }

        return attributes

    def start(context: Any, method: str) -> tuple[Any, Any]:
        parent = None
        metadata = context.invocation_metadata() or ()
        for key, _ in metadata:
            if key in fields:
                parent = propagate.extract({k: v for k, v in metadata if isinstance(v, str)})
                break
        span = presampler.start(f"helloworld.Greeter/{method}", parent, attributes_for(method), context.peer)
        if span.__class__ is Dropped:
            dropped_span.set(span)
            return span, None
        return span, otel_context.attach(trace.set_span_in_context(span))

    def record(method: str, ms: float, sent: int | None) -> None:
        durations, replies = streams[method]
        for stream in durations:
            stream.record(ms)
        if sent is not None:
            for stream in replies:
                stream.record(sent)

    def end(handle: tuple[Any, Any], started: float, method: str, sent: int | None) -> None:
        span, token = handle
        if token is not None:
            otel_context.detach(token)
            span.set_attribute("rpc.grpc.status_code", 0)
            span.end()
        pending = aggregates.pending
        pending.append((record, method, (time.perf_counter() - started) * 1000, sent))
        if len(pending) >= BATCH:
            aggregates.aggregate_batch()

    return traced_greeter(start, end)


async def raw_lean_production(port: int) -> None:
    from meshrpc._sampling import serving_context

    await raw_with(port, lean_servicer(port), serving_context())


async def raw_otel_contrib(port: int) -> None:
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer

    tracing_sdk()
    GrpcAioInstrumentorServer().instrument()
    await raw(port)


# Full tracing as OTEL_* variables: every span sampled, batched and exported to nowhere,
# no metrics.
TRACING_OTEL = {
    "OTEL_TRACES_SAMPLER": "always_on",
    "OTEL_TRACES_EXPORTER": "bench_noop",
    "OTEL_METRICS_EXPORTER": "none",
}


async def meshrpc_traced(port: int) -> None:
    import os

    from bench.app import app

    # meshrpc sets up the SDK from the OTEL_* variables (otel_sdk), as in a cluster; the
    # tracing floor and the contrib contender get the same SDK set up by hand (tracing_sdk).
    os.environ.update({k: v for k, v in TRACING_OTEL.items() if k not in os.environ})
    sys.path.insert(0, str(PLUGINS))
    # As `meshrpc serve` runs it: meshrpc owns the loop and handles SIGTERM.
    base = {"host": "127.0.0.1", "port": port, "mesh": "none", "drain_delay": 0.0, "log_level": "warning"}
    config = app.config.replace(**{**base, "otel_sdk": True, **_env()})
    await app.serve(config, install_signal_handlers=True)


async def meshrpc_traced_user_provider(port: int) -> None:
    from bench.app import app

    # The same tracing with a provider the application built (tracing_sdk): the SDK's own spans.
    tracing_sdk()
    base = {"host": "127.0.0.1", "port": port, "mesh": "none", "drain_delay": 0.0, "log_level": "warning"}
    config = app.config.replace(**{**base, **_env()})
    await app.serve(config, install_signal_handlers=True)


def _env() -> dict[str, Any]:
    """MESHRPC_* settings from the environment, as `meshrpc serve` applies them (bench/instructions.py
    turns overload shedding off: under valgrind every call is 50 times slower and looks queued)."""
    import os

    from meshrpc._config import from_env

    return from_env(os.environ)


def log_to_devnull() -> None:
    """The access log is written, as a cluster collects it from stderr; here to /dev/null."""
    import logging
    import os

    logging.basicConfig(level=logging.INFO, stream=open(os.devnull, "w"))  # noqa: SIM115


async def meshrpc_production(port: int) -> None:
    import os

    from bench.app import app

    # meshrpc sets up the SDK from the OTEL_* variables (otel_sdk), as in a cluster; the
    # exporters are found by name through bench/plugins' entry points.
    os.environ.update({k: v for k, v in PRODUCTION_OTEL.items() if k not in os.environ})
    sys.path.insert(0, str(PLUGINS))
    log_to_devnull()
    settings = {
        "host": "127.0.0.1",
        "port": port,
        "mesh": "none",
        "drain_delay": 0.0,
        "access_log": "json",
        "access_log_sample_rate": 0.01,
        "otel_sdk": True,
        **_env(),
        "log_level": "info",  # the access log is written (to /dev/null), as in a cluster
    }
    config = app.config.replace(**settings)
    await app.serve(config, install_signal_handlers=True)


async def meshrpc_middleware(port: int) -> None:
    import meshrpc
    from bench.app import BareGreeter as Greeter

    async def nothing(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        await call_next(call)

    app = meshrpc.App("greeter", services=[Greeter()], middleware=[nothing])
    base = {"host": "127.0.0.1", "port": port, "mesh": "none", "drain_delay": 0.0, "log_level": "warning"}
    config = app.config.replace(**{**base, **_env()})
    await app.serve(config, install_signal_handlers=True)


async def grpclib_server(port: int) -> None:
    from grpclib.const import Cardinality, Handler
    from grpclib.health.service import Health
    from grpclib.reflection.service import ServerReflection
    from grpclib.server import Server, Stream

    class GrpclibGreeter:
        async def SayHello(self, stream: Stream[Any, Any]) -> None:
            request = await stream.recv_message()
            assert request is not None
            await stream.send_message(helloworld_pb2.HelloReply(message=f"Hello, {request.name}!"))

        async def SayHelloStream(self, stream: Stream[Any, Any]) -> None:
            request = await stream.recv_message()
            assert request is not None
            for i in range(request.count or 3):
                await stream.send_message(helloworld_pb2.HelloReply(message=f"Hello, {request.name}! ({i + 1})"))

        def __mapping__(self) -> dict[str, Handler]:
            req, rep = helloworld_pb2.HelloRequest, helloworld_pb2.HelloReply
            return {
                "/helloworld.Greeter/SayHello": Handler(self.SayHello, Cardinality.UNARY_UNARY, req, rep),
                "/helloworld.Greeter/SayHelloStream": Handler(self.SayHelloStream, Cardinality.UNARY_STREAM, req, rep),
            }

    server = Server(ServerReflection.extend([GrpclibGreeter(), Health()]))
    await server.start("127.0.0.1", port)
    await until_sigterm()
    server.close()
    await server.wait_closed()


CONTENDERS = {
    "raw": raw,
    "raw-otel-contrib": raw_otel_contrib,
    "raw-sdk-floor": raw_sdk_floor,
    "raw-production-floor": raw_production_floor,
    "raw-lean-production": raw_lean_production,
    "meshrpc-traced": meshrpc_traced,
    "meshrpc-traced-user-provider": meshrpc_traced_user_provider,
    "meshrpc-middleware": meshrpc_middleware,
    "meshrpc-production": meshrpc_production,
    "grpclib": grpclib_server,
}

if __name__ == "__main__":
    asyncio.run(CONTENDERS[sys.argv[1]](int(sys.argv[2])))
