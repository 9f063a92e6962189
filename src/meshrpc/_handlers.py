"""Turn a registered method into a grpc.aio method handler, composed once.

Everything that wraps a user's handler (status mapping, request validation) is
decided here at registration, so an RPC pays for one coroutine frame and a
``try`` block, not for a chain of interceptors looked up per call.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ._errors import StatusError
from ._rpc_context import current_rpc
from ._service import MethodSpec, RpcKind

logger = logging.getLogger("meshrpc.handlers")

Handler = Callable[..., Any]
INTERNAL_DETAILS = "Internal server error"


class _Malformed:
    """What the deserializer returns for bytes that do not parse as the request."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _deserializer(spec: MethodSpec) -> Callable[[bytes], Any]:
    parse = spec.request_type.FromString
    name = spec.request_type.DESCRIPTOR.full_name

    # grpc.aio answers a deserializer's exception with UNKNOWN and the exception's
    # text; a bad body is the client's fault, so the handler answers INVALID_ARGUMENT.
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return _Malformed(f"request is not a valid {name}")

    return deserialize


async def _fail(context: grpc.aio.ServicerContext[Any, Any], spec: MethodSpec, exc: BaseException) -> None:
    """Answer the client for an exception a handler raised; never returns."""
    if isinstance(exc, StatusError):
        await context.abort(exc.code, exc.message)
    logger.error("unhandled exception in %s", spec.path, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


def _unimplemented(spec: MethodSpec) -> Handler:
    details = f"method {spec.path} is not implemented"

    async def unimplemented(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, details)

    return unimplemented


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request.__class__ is _Malformed:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        yield request


def _wrap(spec: MethodSpec, impl: Handler) -> Handler:
    kind = spec.kind
    abort_error = grpc.aio.AbortError
    # Each RPC runs in its own task: setting the variable needs no reset.
    enter = current_rpc.set
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    if kind is RpcKind.UNARY_UNARY:

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            enter(context)
            if request.__class__ is _Malformed:
                await context.abort(invalid, request.reason)
            try:
                return await impl(request, context)
            except abort_error:
                raise
            except Exception as exc:
                await _fail(context, spec, exc)

        return unary_unary

    if kind is RpcKind.STREAM_UNARY:

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            enter(context)
            try:
                return await impl(_checked(requests, context), context)
            except abort_error:
                raise
            except Exception as exc:
                await _fail(context, spec, exc)

        return stream_unary

    def first_arg(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        return request if kind is RpcKind.UNARY_STREAM else _checked(request, context)

    if inspect.isasyncgenfunction(impl):

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            enter(context)
            if request.__class__ is _Malformed:
                await context.abort(invalid, request.reason)
            try:
                async for reply in impl(first_arg(request, context), context):
                    yield reply
            except abort_error:
                raise
            except Exception as exc:
                await _fail(context, spec, exc)

        return streaming

    # A coroutine that writes its replies with context.write().
    async def writing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        enter(context)
        if request.__class__ is _Malformed:
            await context.abort(invalid, request.reason)
        try:
            await impl(first_arg(request, context), context)
        except abort_error:
            raise
        except Exception as exc:
            await _fail(context, spec, exc)

    return writing


Middleware = Callable[[MethodSpec, Handler], Handler]

_FACTORIES = {
    RpcKind.UNARY_UNARY: grpc.unary_unary_rpc_method_handler,
    RpcKind.UNARY_STREAM: grpc.unary_stream_rpc_method_handler,
    RpcKind.STREAM_UNARY: grpc.stream_unary_rpc_method_handler,
    RpcKind.STREAM_STREAM: grpc.stream_stream_rpc_method_handler,
}


def method_handler(spec: MethodSpec, middlewares: tuple[Middleware, ...] = ()) -> grpc.RpcMethodHandler[Any, Any]:
    """The grpc handler for ``spec``: the user's method inside meshrpc's wrappers.

    Middlewares wrap the user's method inside the error mapping, so they see the
    exceptions it raises; each must keep the method's shape (coroutine function or
    async generator function).
    """
    if spec.impl is None:
        handler = _unimplemented(spec)
    else:
        impl = spec.impl
        for middleware in middlewares:
            impl = middleware(spec, impl)
        handler = _wrap(spec, impl)
    factory: Any = _FACTORIES[spec.kind]
    result: grpc.RpcMethodHandler[Any, Any] = factory(
        handler,
        request_deserializer=_deserializer(spec),
        response_serializer=spec.response_type.SerializeToString,
    )
    return result
