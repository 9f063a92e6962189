"""Every RPC kind, every status mapping, malformed bodies, UNIMPLEMENTED, limits."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from tests.apps.echo import app
from tests.helpers import eventually


def stub(server: testing.TestServer) -> echo_pb2_grpc.EchoStub:
    return echo_pb2_grpc.EchoStub(server.channel)


async def test_all_four_rpc_kinds(echo_server: testing.TestServer) -> None:
    s = stub(echo_server)
    assert (await s.Unary(echo_pb2.EchoRequest(text="a"))).text == "a"
    replies = [r.index async for r in s.ServerStream(echo_pb2.EchoRequest(text="b", count=4))]
    assert replies == [0, 1, 2, 3]

    async def requests():  # type: ignore[no-untyped-def]
        for text in ("x", "y", "z"):
            yield echo_pb2.EchoRequest(text=text)

    assert (await s.ClientStream(requests())).text == "x,y,z"
    assert [r.text async for r in s.BidiStream(requests())] == ["x", "y", "z"]


@pytest.mark.parametrize("code", [c for c in grpc.StatusCode if c not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)])
async def test_status_errors_map_to_their_code(echo_server: testing.TestServer, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(echo_server).Unary(echo_pb2.EchoRequest(fail=code.name))
    assert info.value.code() == code
    assert info.value.details() == f"asked to fail with {code.name}"


async def test_status_error_in_every_streaming_kind(echo_server: testing.TestServer) -> None:
    s = stub(echo_server)
    call = s.ServerStream(echo_pb2.EchoRequest(count=2, fail="NOT_FOUND"))
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for r in call:
            got.append(r.index)
    assert got == [0, 1]  # messages sent before the error still arrive
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    async def failing():  # type: ignore[no-untyped-def]
        yield echo_pb2.EchoRequest(text="ok")
        yield echo_pb2.EchoRequest(fail="PERMISSION_DENIED")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await s.ClientStream(failing())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in s.BidiStream(failing()):
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unexpected_exception_is_internal_without_details(
    echo_server: testing.TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="meshrpc"), pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(echo_server).Unary(echo_pb2.EchoRequest(fail="crash"))
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details() == "Internal server error"
    assert "hunter2" not in (info.value.debug_error_string() or "")
    # ...while the server log has the whole story, traceback included.
    record = next(r for r in caplog.records if "/echo.Echo/Unary" in r.getMessage())
    assert record.exc_info is not None and "hunter2" in str(record.exc_info[1])
    # and the server keeps serving
    assert (await stub(echo_server).Unary(echo_pb2.EchoRequest(text="still"))).text == "still"


async def test_malformed_body_is_invalid_argument(echo_server: testing.TestServer) -> None:
    raw = echo_server.channel.unary_unary("/echo.Echo/Unary")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\xff\xff\xff\xff")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request is not a valid echo.EchoRequest"
    server_stream = echo_server.channel.unary_stream("/echo.Echo/ServerStream")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in server_stream(b"\xff\xff\xff\xff"):
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "request is not a valid echo.EchoRequest"
    bidi = echo_server.channel.stream_stream("/echo.Echo/BidiStream")
    call = bidi()
    await call.write(b"\x0a\x02ok")  # a valid EchoRequest(text="ok")
    await call.write(b"\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
        await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await stub(echo_server).Unary(echo_pb2.EchoRequest(text="fine"))).text == "fine"


async def test_unimplemented_method(echo_server: testing.TestServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(echo_server).Missing(echo_pb2.EchoRequest())
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert info.value.details() == "method /echo.Echo/Missing is not implemented"


async def test_unknown_service_is_unimplemented(echo_server: testing.TestServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await echo_server.channel.unary_unary("/nope.Nope/X")(b"")
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_max_concurrent_rpcs_answers_resource_exhausted() -> None:
    async with testing.running(app, max_concurrent_rpcs=2) as server:
        s = stub(server)
        slow = [asyncio.ensure_future(s.Unary(echo_pb2.EchoRequest(text="slow", sleep=0.5))) for _ in range(2)]
        await eventually(lambda: server.server.in_flight == 2)  # both reached their handlers
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await s.Unary(echo_pb2.EchoRequest(text="one too many"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert [r.text for r in await asyncio.gather(*slow)] == ["slow", "slow"]


async def test_max_receive_message_size() -> None:
    async with testing.running(app, max_receive_message_size=1024) as server:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub(server).Unary(echo_pb2.EchoRequest(text="x" * 2048))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_status_error_default_and_override() -> None:
    assert meshrpc.NotFound("x").code == grpc.StatusCode.NOT_FOUND
    err = meshrpc.StatusError("custom", code=grpc.StatusCode.ABORTED)
    assert err.code == grpc.StatusCode.ABORTED and err.message == "custom"
