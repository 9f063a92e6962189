"""Rich error details: google.rpc.Status in grpc-status-details-bin, read back by clients."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from examples.greeter.app import app as greeter
from meshrpc import testing


async def test_bad_request_details_reach_a_python_client() -> None:
    async with testing.serve(greeter) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await helloworld_pb2_grpc.GreeterStub(channel).SayHello(helloworld_pb2.HelloRequest(name=""))
    error = info.value
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "name must not be empty")
    # grpcio-status, as any Python client reads them ...
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None and status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert [(v.field, v.description) for v in bad_request.field_violations] == [("name", "must not be empty")]
    # ... and meshrpc's helper, unpacked.
    assert meshrpc.error_details(error) == [bad_request]


async def test_several_details_on_any_status_error_and_in_streams() -> None:
    from examples._generated.echo import echo_pb2, echo_pb2_grpc

    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2))
    info = error_details_pb2.ErrorInfo(reason="QUOTA", domain="shop.example", metadata={"limit": "10"})

    class Limited(echo_pb2_grpc.EchoServicer):
        async def Unary(self, request: Any, context: Any) -> Any:
            raise meshrpc.ResourceExhausted("slow down", details=[info, retry])

        async def ServerStream(self, request: Any, context: Any) -> Any:
            yield echo_pb2.EchoReply(text="one")
            raise meshrpc.Unavailable("try another", details=[retry])

    async with testing.serve(meshrpc.App("limited", services=[Limited()])) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Unary(echo_pb2.EchoRequest())
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            [r async for r in stub.ServerStream(echo_pb2.EchoRequest())]
    assert meshrpc.error_details(unary.value) == [info, retry]
    assert stream.value.code() == grpc.StatusCode.UNAVAILABLE
    assert meshrpc.error_details(stream.value) == [retry]


async def test_errors_without_details_have_none() -> None:
    from examples._generated.echo import echo_pb2, echo_pb2_grpc
    from tests.apps.echo import app as echo

    async with testing.serve(echo) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(fail="NOT_FOUND"))
    assert meshrpc.error_details(info.value) == []


def test_details_must_be_messages_and_ok_is_no_error() -> None:
    with pytest.raises(TypeError, match="must be protobuf messages"):
        meshrpc.InvalidArgument("x", details=["field name is empty"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="cannot carry the OK status"):
        meshrpc.StatusError("fine", code=grpc.StatusCode.OK)
