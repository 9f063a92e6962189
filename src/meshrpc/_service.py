"""Services: what a servicer implements, read from its protobuf descriptors."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory

from ._errors import AppError

if TYPE_CHECKING:
    from ._app import App
    from ._route_options import RouteOptions


class RpcKind(enum.Enum):
    UNARY_UNARY = "unary_unary"
    UNARY_STREAM = "unary_stream"
    STREAM_UNARY = "stream_unary"
    STREAM_STREAM = "stream_stream"

    @classmethod
    def of(cls, method: _descriptor.MethodDescriptor) -> RpcKind:
        return {
            (False, False): cls.UNARY_UNARY,
            (False, True): cls.UNARY_STREAM,
            (True, False): cls.STREAM_UNARY,
            (True, True): cls.STREAM_STREAM,
        }[(method.client_streaming, method.server_streaming)]


class Service:
    """Optional base class for a servicer, next to the generated one.

    ``class Greeter(helloworld_pb2_grpc.GreeterServicer, meshrpc.Service)`` gets
    `draining`; the service's name and methods always come from the
    generated ``*Servicer`` base, never from this class.
    """

    _meshrpc_app: App | None = None
    _meshrpc_never: asyncio.Event | None = None

    @property
    def draining(self) -> asyncio.Event:
        """Set when the server starts to drain: long streams should finish up.

        Outside a meshrpc App (the servicer added to a plain grpc.aio server), an
        event that is never set: the handler works as it would anywhere.
        """
        if self._meshrpc_app is not None:
            return self._meshrpc_app.draining
        if self._meshrpc_never is None:
            self._meshrpc_never = asyncio.Event()
        return self._meshrpc_never


def attach(servicer: object, app: App) -> None:
    """``app`` serves ``servicer``: a [`Service`][meshrpc.Service]'s ``draining`` is then the app's."""
    if isinstance(servicer, Service):
        servicer._meshrpc_app = app


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One RPC of a registered service."""

    service: str
    name: str
    kind: RpcKind
    request_type: type[Any]
    response_type: type[Any]
    # The user's bound method, or None where the subclass did not implement it.
    impl: Callable[..., Any] | None
    route: RouteOptions | None

    @functools.cached_property  # read several times per RPC by telemetry
    def path(self) -> str:
        """The HTTP/2 path of the RPC: ``/package.Service/Method``."""
        return f"/{self.service}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """A registered service: its full protobuf name, methods and the object serving it."""

    name: str
    methods: tuple[MethodSpec, ...]
    servicer: object
    descriptor: _descriptor.ServiceDescriptor
    route: RouteOptions | None

    @property
    def prefix(self) -> str:
        """The route prefix of every method of the service: ``/package.Service/``."""
        return f"/{self.name}/"


def _generated_bases(cls: type) -> list[tuple[type, _descriptor.ServiceDescriptor]]:
    """The generated ``*Servicer`` classes in ``cls``'s MRO, with their descriptors."""
    found = []
    for base in cls.__mro__:
        if not (base.__name__.endswith("Servicer") and base.__module__.endswith("_pb2_grpc")):
            continue
        module = sys.modules.get(base.__module__)
        short = base.__name__[: -len("Servicer")]
        service = None
        for value in vars(module).values() if module else ():
            file_descriptor = getattr(value, "DESCRIPTOR", None)
            if isinstance(file_descriptor, _descriptor.FileDescriptor):
                service = file_descriptor.services_by_name.get(short)
                if service is not None:
                    break
        if service is None:
            raise AppError(
                f"{cls.__name__}: found {base.__module__}.{base.__name__} but no protobuf service "
                f"{short!r} in the modules it imports"
            )
        found.append((base, service))
    return found


def _check_impl(cls: type, name: str, fn: Any, kind: RpcKind) -> None:
    where = f"{cls.__name__}.{name}"
    if not callable(fn):
        raise AppError(f"{where} is not a method: it must be a function handling the RPC")
    streaming_replies = kind in (RpcKind.UNARY_STREAM, RpcKind.STREAM_STREAM)
    if inspect.isasyncgenfunction(fn) and not streaming_replies:
        raise AppError(f"{where} must return its reply, not yield: the RPC has a single response")
    if inspect.isgeneratorfunction(fn) and not streaming_replies:
        raise AppError(f"{where} must return its reply, not yield: the RPC has a single response")
    # 'async def' runs on the event loop; a plain 'def' (or a sync generator for a
    # server stream) runs in the thread pool, as grpc.server(ThreadPoolExecutor) ran it.


def describe(servicer: object) -> list[ServiceSpec]:
    """Read the services ``servicer`` implements from its generated base classes."""
    from ._route_options import route_options  # the routing options live with the routes

    if isinstance(servicer, type):
        raise AppError(f"{servicer.__name__} is a class: pass an instance, e.g. services=[{servicer.__name__}()]")
    cls = type(servicer)
    bases = _generated_bases(cls)
    if not bases:
        raise AppError(
            f"{cls.__name__} is not a gRPC servicer: subclass the generated *Servicer class, "
            "e.g. class Greeter(helloworld_pb2_grpc.GreeterServicer, meshrpc.Service)"
        )
    specs = []
    for base, service in bases:
        methods = []
        for method in service.methods:
            kind = RpcKind.of(method)
            own = getattr(cls, method.name, None)
            implemented = own is not None and own is not getattr(base, method.name, None)
            if implemented:
                _check_impl(cls, method.name, own, kind)
            methods.append(
                MethodSpec(
                    service=service.full_name,
                    name=method.name,
                    kind=kind,
                    request_type=message_factory.GetMessageClass(method.input_type),
                    response_type=message_factory.GetMessageClass(method.output_type),
                    impl=getattr(servicer, method.name) if implemented else None,
                    route=route_options(own) if implemented else None,
                )
            )
        specs.append(
            ServiceSpec(
                name=service.full_name,
                methods=tuple(methods),
                servicer=servicer,
                descriptor=service,
                route=route_options(cls),
            )
        )
    return specs
