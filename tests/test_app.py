"""App construction: services from descriptors, clear errors for what cannot work."""

from __future__ import annotations

from typing import Any

import pytest

import meshrpc
from examples._generated.echo import echo_pb2_grpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from examples.greeter.app import Greeter
from meshrpc._service import RpcKind
from tests.apps.echo import Echo


def test_services_and_methods_come_from_descriptors() -> None:
    app = meshrpc.App("two", services=[Greeter(), Echo()])
    assert [s.name for s in app.services] == ["helloworld.Greeter", "echo.Echo"]
    greeter = app.services[0]
    assert greeter.prefix == "/helloworld.Greeter/"
    assert [(m.name, m.kind) for m in greeter.methods] == [
        ("SayHello", RpcKind.UNARY_UNARY),
        ("SayHelloStream", RpcKind.UNARY_STREAM),
    ]
    assert greeter.methods[0].request_type is helloworld_pb2.HelloRequest
    kinds = {m.name: m.kind for m in app.services[1].methods}
    assert kinds["ClientStream"] is RpcKind.STREAM_UNARY and kinds["BidiStream"] is RpcKind.STREAM_STREAM
    assert next(m for m in app.services[1].methods if m.name == "Missing").impl is None


def test_plain_generated_servicer_without_meshrpc_base() -> None:
    class Plain(helloworld_pb2_grpc.GreeterServicer):
        async def SayHello(self, request: Any, context: Any) -> Any:
            return helloworld_pb2.HelloReply()

    app = meshrpc.App("plain", services=[Plain()])
    assert app.services[0].name == "helloworld.Greeter"


def test_duplicate_service_is_an_error() -> None:
    with pytest.raises(meshrpc.AppError, match=r"service helloworld\.Greeter is registered twice"):
        meshrpc.App("dup", services=[Greeter(), Greeter()])


def test_object_that_is_not_a_servicer() -> None:
    with pytest.raises(meshrpc.AppError, match="not a gRPC servicer"):
        meshrpc.App("bad", services=[object()])


def test_generator_for_a_single_reply_is_rejected_at_registration() -> None:
    class Yields(echo_pb2_grpc.EchoServicer):
        def Unary(self, request: Any, context: Any) -> Any:
            yield None

    with pytest.raises(meshrpc.AppError, match=r"Yields\.Unary must return its reply, not yield"):
        meshrpc.App("sync", services=[Yields()])


@pytest.mark.parametrize("name", ["", "Greeter", "my_app", "-x", "a" * 64])
def test_app_name_must_be_a_kubernetes_name(name: str) -> None:
    with pytest.raises(meshrpc.AppError, match="must be a Kubernetes name"):
        meshrpc.App(name, services=[Greeter()])


def test_draining_outside_an_app_is_never_set() -> None:
    # The same servicer on a plain grpc.aio server keeps working.
    greeter = Greeter()
    assert greeter.draining.is_set() is False
    assert greeter.draining is greeter.draining


async def test_lifespan_runs_around_serving() -> None:
    from meshrpc import testing
    from tests.apps import echo

    echo.events.clear()
    async with testing.running(echo.app):
        assert echo.events == ["startup"]
    assert echo.events == ["startup", "shutdown"]


async def test_lifespan_startup_failure_is_clear() -> None:
    import contextlib
    from collections.abc import AsyncIterator

    from meshrpc import testing

    @contextlib.asynccontextmanager
    async def broken(app: meshrpc.App) -> AsyncIterator[None]:
        raise ConnectionError("cannot reach the database")
        yield

    app = meshrpc.App("broken", services=[Echo()], lifespan=broken)
    with pytest.raises(meshrpc.AppError, match=r"lifespan startup of app 'broken' failed.*database"):
        async with testing.running(app):
            pass


def test_passing_the_class_instead_of_an_instance_says_so() -> None:
    with pytest.raises(meshrpc.AppError, match=r"Echo is a class: pass an instance, e.g. services=\[Echo\(\)\]"):
        meshrpc.App("x", services=[Echo])
