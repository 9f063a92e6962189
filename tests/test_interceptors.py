"""Third-party grpc.aio interceptors, unchanged, on the app's services (and not on health)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_interceptor.server import AsyncServerInterceptor

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from tests.apps import sync_echo
from tests.apps.echo import Echo

TOKEN = (("authorization", "Bearer s3cret"),)


class TokenAuth(AsyncServerInterceptor):  # type: ignore[misc]
    """An auth interceptor as grpc-interceptor's docs write one."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept(self, method: Any, request_or_iterator: Any, context: Any, method_name: str) -> Any:
        self.methods.append(method_name)
        if dict(context.invocation_metadata()).get("authorization") != "Bearer s3cret":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        response = method(request_or_iterator, context)
        if hasattr(response, "__aiter__"):
            return response
        return await response


async def texts(*values: str) -> AsyncIterator[echo_pb2.EchoRequest]:
    for value in values:
        yield echo_pb2.EchoRequest(text=value)


def call_all_kinds(target: str, metadata: Any) -> list[Any]:
    """Each kind once, from a sync client (in a thread: the server runs on this test's loop).

    Not grpc.aio's client: when a server ends a client stream before the client has
    finished writing, it may report INTERNAL "Internal error from Core" instead of the
    server's status (grpc/grpc#36066), which would make the denied calls flaky.
    """
    results: list[Any] = []
    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        requests = [echo_pb2.EchoRequest(text=t) for t in ("c1", "c2")]
        calls = [
            lambda: stub.Unary(echo_pb2.EchoRequest(text="u"), metadata=metadata).text,
            lambda: [r.text for r in stub.ServerStream(echo_pb2.EchoRequest(text="s", count=2), metadata=metadata)],
            lambda: stub.ClientStream(iter(requests), metadata=metadata).text,
            lambda: [r.text.lower() for r in stub.BidiStream(iter(requests), metadata=metadata)],
        ]
        for call in calls:
            try:
                results.append(call())
            except grpc.RpcError as exc:
                results.append(exc.code())  # type: ignore[attr-defined]
    return results


async def _collect(stream: Any) -> list[str]:
    return [reply.text async for reply in stream]


@pytest.mark.parametrize("servicer", [Echo(), sync_echo.SyncEcho()], ids=["async", "def"])
async def test_an_auth_interceptor_guards_all_four_kinds(servicer: Any) -> None:
    auth = TokenAuth()
    app = meshrpc.App("guarded", services=[servicer], interceptors=[auth])
    async with testing.running(app) as server:
        denied = await asyncio.to_thread(call_all_kinds, server.target, None)
        allowed = await asyncio.to_thread(call_all_kinds, server.target, TOKEN)
        health = await health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    assert denied == [grpc.StatusCode.UNAUTHENTICATED] * 4
    assert allowed == ["u", ["s", "s"], "c1,c2", ["c1", "c2"]]
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # no token, still answered
    assert not any("Health" in m for m in auth.methods)


async def test_interceptors_and_middleware_together() -> None:
    order: list[str] = []

    class Outer(AsyncServerInterceptor):  # type: ignore[misc]
        async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
            order.append("interceptor")
            response = method(request, context)
            return response if hasattr(response, "__aiter__") else await response

    async def middleware(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        order.append("middleware")
        await call_next(call)

    app = meshrpc.App("both", services=[Echo()], interceptors=[Outer()], middleware=[middleware])
    async with testing.serve(app) as channel:
        replies = await _collect(echo_pb2_grpc.EchoStub(channel).ServerStream(echo_pb2.EchoRequest(text="x", count=3)))
    assert replies == ["x", "x", "x"] and order == ["interceptor", "middleware"]


async def test_interceptors_see_parsed_requests_and_malformed_ones_are_refused() -> None:
    seen: list[Any] = []

    class Recorder(AsyncServerInterceptor):  # type: ignore[misc]
        async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
            seen.append(request)
            response = method(request, context)
            return response if hasattr(response, "__aiter__") else await response

    app = meshrpc.App("recorded", services=[Echo()], interceptors=[Recorder()])
    async with testing.running(app) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        assert (await stub.Unary(echo_pb2.EchoRequest(text="hi"))).text == "hi"
        assert await _collect(stub.ServerStream(echo_pb2.EchoRequest(text="s", count=2))) == ["s", "s"]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await server.channel.unary_unary("/echo.Echo/Unary")(b"\xff\xff\xff\xff")
    # An interceptor reads the request as a message, never as the bytes off the wire.
    assert [request.text for request in seen[:2]] == ["hi", "s"]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request is not a valid echo.EchoRequest"


async def test_a_setting_puts_health_behind_the_interceptors_too() -> None:
    app = meshrpc.App("strict", services=[Echo()], interceptors=[TokenAuth()], intercept_builtins=True)
    async with testing.serve(app) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await health.Check(health_pb2.HealthCheckRequest())
        ok = await health.Check(health_pb2.HealthCheckRequest(), metadata=TOKEN)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ok.status == health_pb2.HealthCheckResponse.SERVING


def test_interceptors_are_checked_at_construction() -> None:
    with pytest.raises(meshrpc.AppError, match="is a class: pass an instance"):
        meshrpc.App("bad", services=[Echo()], interceptors=[TokenAuth])  # type: ignore[list-item]

    class SyncOnly(grpc.ServerInterceptor):
        def intercept_service(self, continuation: Any, details: Any) -> Any:
            return continuation(details)

    with pytest.raises(meshrpc.AppError, match=r"works with grpc\.server only"):
        meshrpc.App("bad", services=[Echo()], interceptors=[SyncOnly()])  # type: ignore[list-item]


@pytest.mark.parametrize("servicer", [Echo(), sync_echo.SyncEcho()], ids=["async", "def"])
async def test_opentelemetry_s_interceptor_traces_all_four_kinds_behind_middleware(servicer: Any) -> None:
    """OpenTelemetry contrib's aio interceptor iterates streaming handlers with `async for`."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def passthrough(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        await call_next(call)

    interceptor = aio_server_interceptor(tracer_provider=provider)
    app = meshrpc.App("traced", services=[servicer], interceptors=[interceptor], middleware=[passthrough])
    async with testing.running(app) as server:
        results = await asyncio.to_thread(call_all_kinds, server.target, None)
    assert results == ["u", ["s", "s"], "c1,c2", ["c1", "c2"]]
    names = sorted(span.name for span in exporter.get_finished_spans())
    assert names == ["/echo.Echo/BidiStream", "/echo.Echo/ClientStream", "/echo.Echo/ServerStream", "/echo.Echo/Unary"]
