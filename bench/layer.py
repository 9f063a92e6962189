"""What meshrpc's own handler layer costs per call and per streamed message, without the network.

    python bench/layer.py [--calls N]

The greeter's handlers are called in a loop, bare and through the handler meshrpc
registers (parsing, error mapping, request checks, in-flight count), from the request's
bytes as grpc hands them over, with a stand-in context, so
grpc's C core, HTTP/2 and the kernel are out of the figure.  Each line is the median of
five runs, in µs of the calling thread's CPU (a batch span processor's exports run in a
thread of their own).  The production line adds the telemetry of the bench's production
profile (metrics, 10 % sampled traces, no incoming traceparent), in the context a server
without grpc.aio interceptors serves its calls in; the lines under it each half alone,
and both with no call sampled: what is left is the sampled spans' share.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.app import BareGreeter as Greeter  # noqa: E402
from bench.app import app  # noqa: E402
from examples._generated.helloworld import helloworld_pb2  # noqa: E402
from meshrpc._handlers import InFlight, method_handler  # noqa: E402


class StandInContext:
    """The parts of a grpc.aio ServicerContext the handlers touch."""

    async def write(self, message: Any) -> None:
        pass

    async def abort(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the benchmark's calls do not fail")

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5555"

    def code(self) -> None:
        return None

    def details(self) -> None:
        return None

    def time_remaining(self) -> None:
        return None


async def per_call(fn: Callable[[], Awaitable[Any]], calls: int, per: int = 1) -> float:
    runs = []
    for _ in range(6):
        start = time.thread_time()
        for _ in range(calls):
            await fn()
        runs.append((time.thread_time() - start) / (calls * per) * 1e6)
    return statistics.median(runs[1:])  # the first run warms up


async def main(calls: int) -> None:
    greeter, context = Greeter(), StandInContext()
    specs = {m.name: m for s in app.services for m in s.methods}

    def handler(name: str, **options: Any) -> Any:
        # As meshrpc's server composes it when the app has no grpc.aio interceptors.
        return method_handler(specs[name], InFlight(), intercepted=False, **options)

    unary = handler("SayHello").unary_unary
    stream = handler("SayHelloStream").unary_stream
    # grpc hands over the request's bytes: raw grpc.aio has its deserializer parse them
    # before the handler; meshrpc's handler parses them itself.
    parse = helloworld_pb2.HelloRequest.FromString
    hello = helloworld_pb2.HelloRequest(name="bench").SerializeToString()
    ten = helloworld_pb2.HelloRequest(name="bench", count=10).SerializeToString()

    async def bare_stream() -> None:
        async for reply in greeter.SayHelloStream(parse(ten), context):
            await context.write(reply)

    async def meshrpc_stream() -> None:
        await stream(ten, context)

    bare = await per_call(lambda: greeter.SayHello(parse(hello), context), calls)
    wrapped = await per_call(lambda: unary(hello, context), calls)
    print(f"unary:  bare handler {bare:6.2f} us, through meshrpc {wrapped:6.2f} us: +{wrapped - bare:.2f} us per call")

    async def nothing(call: Any, call_next: Any) -> None:
        await call_next(call)

    behind = handler("SayHello", middleware=(nothing,)).unary_unary
    with_middleware = await per_call(lambda: behind(hello, context), calls)
    print(f"unary with one no-op middleware {with_middleware:6.2f} us: +{with_middleware - wrapped:.2f} us per call")
    bare = await per_call(bare_stream, calls // 10, 10)
    wrapped = await per_call(meshrpc_stream, calls // 10, 10)
    print(
        f"stream: bare handler {bare:6.2f} us, through meshrpc {wrapped:6.2f} us: +{wrapped - bare:.2f} us per message"
    )

    import os

    from bench.servers import PLUGINS, PRODUCTION_OTEL
    from meshrpc._aggregates import Aggregates
    from meshrpc._otel_setup import configure_sdk
    from meshrpc._sampling import serving_context
    from meshrpc._telemetry import Telemetry, observer, sdk_configured

    # The SDK as `otel_sdk` sets it up from the production profile's OTEL_* variables.
    # (the SDK reads its sampler from os.environ itself)
    sys.path.insert(0, str(PLUGINS))
    os.environ.update({k: v for k, v in PRODUCTION_OTEL.items() if k not in os.environ})
    aggregates = Aggregates()
    configure_sdk("bench", os.environ, aggregates)
    tracing, metering = sdk_configured()
    telemetry = Telemetry(
        tracing=tracing,
        metrics=metering,
        access_log="off",
        access_log_sample_rate=0.01,
        server_address="127.0.0.1",
        server_port=50051,
        aggregates=aggregates,
    )
    # As a server without grpc.aio interceptors runs its calls: in the context its RPC tasks
    # are copied from, where a dropped call's span is set behind the stand-in.
    serving, standing_in = contextvars.copy_context(), serving_context()
    serving.run(standing_in.__enter__)

    async def per_served_call(fn: Callable[[], Awaitable[Any]]) -> float:
        return await serving.run(asyncio.ensure_future, per_call(fn, calls))

    observed = handler("SayHello", observe=observer(telemetry)).unary_unary
    production = await per_served_call(lambda: observed(hello, context))
    print(
        f"unary with the production profile's telemetry {production:6.2f} us: +{production - wrapped:.2f} us per call"
    )
    # Each half alone: the histograms without traces, the traces without histograms.
    for name, alone in (
        ("metrics", dataclasses.replace(telemetry, tracing=False)),
        ("traces", dataclasses.replace(telemetry, metrics=False)),
    ):
        part = handler("SayHello", observe=observer(alone)).unary_unary
        cost = await per_served_call(lambda: part(hello, context))  # noqa: B023 (awaited here)
        print(f"  {name} alone {cost:6.2f} us (+{cost - wrapped:.2f} us)")
    # The same telemetry with no call sampled (the pre-sampler's bound at 0): the rest is what
    # the SDK's spans for the sampled 10 % cost, spread over every call.
    begin_for: Any = observer(telemetry)
    begin_for.__self__.presampler.bound = 0
    dropped = handler("SayHello", observe=begin_for).unary_unary
    unsampled = await per_served_call(lambda: dropped(hello, context))
    print(
        f"  of which no call sampled {unsampled:6.2f} us (+{unsampled - wrapped:.2f} us), "
        f"the SDK's spans for the sampled 10 % +{production - unsampled:.2f} us per call"
    )
    serving.run(standing_in.__exit__, None, None, None)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per run (default 20000)")
    asyncio.run(main(parser.parse_args().calls))
