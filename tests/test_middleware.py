"""meshrpc middleware: order, rejection, code around unary and streaming, the status seen after."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from tests.apps.echo import Echo


async def texts(*values: str) -> AsyncIterator[echo_pb2.EchoRequest]:
    for value in values:
        yield echo_pb2.EchoRequest(text=value)


class Recorder:
    """A middleware (a small class) that records what it saw."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log
        self.calls: list[meshrpc.Call] = []

    async def __call__(self, call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        self.log.append(f"{self.name}>")
        self.calls.append(call)
        try:
            await call_next(call)
        finally:
            self.log.append(f"<{self.name}:{call.code.name if call.code else None}")


async def test_list_order_is_the_order_around_the_handler() -> None:
    log: list[str] = []

    class Logged(Echo):
        async def Unary(self, request: Any, context: Any) -> echo_pb2.EchoReply:
            log.append("handler")
            return await super().Unary(request, context)

    app = meshrpc.App("mw", services=[Logged()], middleware=[Recorder("a", log), Recorder("b", log)])
    async with testing.serve(app) as channel:
        await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="x"))
    assert log == ["a>", "b>", "handler", "<b:OK", "<a:OK"]


async def test_rejecting_before_the_handler() -> None:
    ran: list[str] = []

    async def require_token(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        if call.metadata.get("authorization") != "Bearer s3cret":
            raise meshrpc.Unauthenticated("missing or wrong token")
        await call_next(call)

    class Counted(Echo):
        async def Unary(self, request: Any, context: Any) -> echo_pb2.EchoReply:
            ran.append(request.text)
            return await super().Unary(request, context)

    log: list[str] = []
    outer = Recorder("outer", log)
    app = meshrpc.App("auth", services=[Counted()], middleware=[outer, require_token])
    async with testing.serve(app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Unary(echo_pb2.EchoRequest(text="no"))
        ok = await stub.Unary(echo_pb2.EchoRequest(text="yes"), metadata=(("authorization", "Bearer s3cret"),))
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")
    assert ok.text == "yes" and ran == ["yes"]
    assert log == ["outer>", "<outer:UNAUTHENTICATED", "outer>", "<outer:OK"]
    assert isinstance(outer.calls[0].exception, meshrpc.Unauthenticated)


async def test_the_status_and_exception_seen_after() -> None:
    log: list[str] = []
    recorder = Recorder("r", log)
    app = meshrpc.App("after", services=[Echo()], middleware=[recorder])
    async with testing.serve(app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        for fail in ("crash", "NOT_FOUND"):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Unary(echo_pb2.EchoRequest(fail=fail))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Missing(echo_pb2.EchoRequest())
    crash, not_found = recorder.calls
    assert crash.code == grpc.StatusCode.INTERNAL and isinstance(crash.exception, RuntimeError)
    assert not_found.code == grpc.StatusCode.NOT_FOUND and isinstance(not_found.exception, meshrpc.NotFound)
    assert len(recorder.calls) == 2  # an unimplemented method runs no middleware: there is no handler


async def test_code_runs_around_a_whole_stream() -> None:
    seen: list[str] = []

    async def around(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        seen.append(f"start {call.kind} {call.method} request={call.request is not None}")
        try:
            await call_next(call)
        finally:
            seen.append(f"end {call.code.name if call.code else None}")

    app = meshrpc.App("streams", services=[Echo()], middleware=[around])
    async with testing.serve(app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        replies = [r.index async for r in stub.ServerStream(echo_pb2.EchoRequest(text="s", count=3))]
        joined = await stub.ClientStream(texts("a", "b"))
        bidi = [r.text async for r in stub.BidiStream(texts("c", "d"))]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.ServerStream(echo_pb2.EchoRequest(count=1, fail="ABORTED"))]
    assert replies == [0, 1, 2] and joined.text == "a,b" and bidi == ["c", "d"]
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert seen == [
        "start unary_stream /echo.Echo/ServerStream request=True",
        "end OK",
        "start stream_unary /echo.Echo/ClientStream request=False",
        "end OK",
        "start stream_stream /echo.Echo/BidiStream request=False",
        "end OK",
        "start unary_stream /echo.Echo/ServerStream request=True",
        "end ABORTED",
    ]


async def test_middleware_sees_the_call_and_passes_state_to_the_handler() -> None:
    seen: dict[str, Any] = {}

    async def tenant(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
        seen.update(method=call.method, peer=call.peer, remaining=call.time_remaining, caller=call.caller)
        call.state["tenant"] = call.metadata.get("x-tenant", "none")
        await call_next(call)

    class Tenanted(Echo):
        async def Unary(self, request: Any, context: Any) -> echo_pb2.EchoReply:
            call = meshrpc.current_call()
            assert call is not None
            return echo_pb2.EchoReply(text=call.state["tenant"])

    async with testing.serve(meshrpc.App("tenant", services=[Tenanted()], middleware=[tenant])) as channel:
        reply = await echo_pb2_grpc.EchoStub(channel).Unary(
            echo_pb2.EchoRequest(), metadata=(("x-tenant", "acme"),), timeout=5
        )
    assert reply.text == "acme"
    assert seen["method"] == "/echo.Echo/Unary" and seen["peer"].startswith("ipv4:127.0.0.1:")
    assert 4 < seen["remaining"] <= 5.1 and seen["caller"] is None


async def test_a_method_can_opt_out() -> None:
    log: list[str] = []
    a, b = Recorder("a", log), Recorder("b", log)

    class Public(Echo):
        @meshrpc.skip_middleware
        async def Unary(self, request: Any, context: Any) -> echo_pb2.EchoReply:
            return await super().Unary(request, context)

        @meshrpc.skip_middleware(a)
        async def ClientStream(self, requests: Any, context: Any) -> echo_pb2.EchoReply:
            return await super().ClientStream(requests, context)

    async with testing.serve(meshrpc.App("public", services=[Public()], middleware=[a, b])) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        await stub.Unary(echo_pb2.EchoRequest())
        assert log == []
        await stub.ClientStream(texts("x"))
        assert log == ["b>", "<b:OK"]


def test_middleware_must_be_async() -> None:
    def not_async(call: Any, call_next: Any) -> None: ...

    with pytest.raises(meshrpc.AppError, match="must be an 'async def' callable"):
        meshrpc.App("bad", services=[Echo()], middleware=[not_async])  # type: ignore[list-item]


async def test_def_handlers_run_behind_middleware() -> None:
    from tests.apps import sync_echo

    log: list[str] = []
    app = meshrpc.App("sync-mw", services=[sync_echo.SyncEcho()], middleware=[Recorder("m", log)])
    async with testing.serve(app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (await stub.Unary(echo_pb2.EchoRequest(text="u"))).text == "u"
        assert [r.index async for r in stub.ServerStream(echo_pb2.EchoRequest(count=2))] == [0, 1]
        assert (await stub.ClientStream(texts("a", "b"))).text == "a,b"
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Unary(echo_pb2.EchoRequest(fail="abort"))
    assert log == ["m>", "<m:OK", "m>", "<m:OK", "m>", "<m:OK", "m>", "<m:NOT_FOUND"]
