"""Standard ``grpc.aio.ServerInterceptor`` objects, kept to the app's own services.

grpc.aio applies a server's interceptors to every RPC it serves.  Health and
reflection are answered to kubelet probes and grpcurl, which carry no
credentials, so an auth interceptor would fail every probe; each interceptor is
therefore wrapped to pass those two services straight to their handlers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc

from ._errors import AppError
from ._failures import INTERNAL_DETAILS

logger = logging.getLogger("meshrpc.handlers")

BUILTIN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["grpc.RpcMethodHandler[Any, Any] | None"]]


def check_interceptors(interceptors: Iterable[Any]) -> tuple[grpc.aio.ServerInterceptor, ...]:
    checked = []
    for item in interceptors:
        if isinstance(item, type):
            raise AppError(
                f"interceptor {item.__name__} is a class: pass an instance, e.g. interceptors=[{item.__name__}()]"
            )
        if not isinstance(item, grpc.aio.ServerInterceptor):
            hint = (
                ": a sync grpc.ServerInterceptor works with grpc.server only; use its grpc.aio version"
                if isinstance(item, grpc.ServerInterceptor)
                else ""
            )
            raise AppError(f"interceptor {item!r} is not a grpc.aio.ServerInterceptor{hint}")
        checked.append(item)
    return tuple(checked)


def _name(interceptor: object) -> str:
    return type(interceptor).__qualname__


class _Guarded(grpc.aio.ServerInterceptor):
    """``interceptor``, with what it raises answered INTERNAL, as a handler's exception is.

    grpc.aio answers an interceptor's exception with UNKNOWN and the exception's text
    (internals the client must not see), and a ``SystemExit`` or ``KeyboardInterrupt``
    raised on the event loop ends the process with no log and no drain.  Both places an
    interceptor's code runs are guarded: ``intercept_service`` itself, and the
    behaviours of the handler it returns (its wrapper around the next handler).
    ``builtins`` false: health and reflection pass it by.
    """

    CACHE = 1024  # wrapped handlers kept: an interceptor usually returns the same few

    def __init__(self, interceptor: grpc.aio.ServerInterceptor, *, builtins: bool) -> None:
        self.interceptor = interceptor
        self.builtins = builtins
        self.name = _name(interceptor)
        self._wrapped: dict[Any, grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method or ""
        if not self.builtins and method.startswith(BUILTIN_PREFIXES):
            return await continuation(handler_call_details)
        try:
            handler: grpc.RpcMethodHandler[Any, Any] | None = await self.interceptor.intercept_service(
                continuation, handler_call_details
            )
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except BaseException as exc:
            logger.error("interceptor %s failed for %s", self.name, method, exc_info=exc)
            return _failing()
        if handler is None:
            return None
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            if len(self._wrapped) >= self.CACHE:
                self._wrapped.clear()
            wrapped = self._wrapped[handler] = _guard_handler(handler, self.name, method)
        return wrapped


def _failing() -> grpc.RpcMethodHandler[Any, Any]:
    async def internal(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)

    # Whatever the method's kind: the request stream is never read, so its shape does not matter.
    return grpc.stream_unary_rpc_method_handler(internal)


def _guard_handler(handler: grpc.RpcMethodHandler[Any, Any], name: str, method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with its behaviour's own exceptions (not the aborts that meshrpc's
    handler inside it answered with) logged and answered INTERNAL."""

    async def failed(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        logger.error("interceptor %s failed for %s", name, method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)

    def guard(behavior: Any) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def generating(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                try:
                    async for reply in behavior(request, context):
                        yield reply
                except PASSED:
                    raise
                except BaseException as exc:
                    await failed(context, exc)

            return generating
        if inspect.iscoroutinefunction(behavior):

            async def returning(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    return await behavior(request, context)
                except PASSED:
                    raise
                except BaseException as exc:
                    await failed(context, exc)

            return returning
        return behavior  # a plain function: grpc.aio runs it in its own thread pool, where nothing escapes

    fields = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    return handler._replace(**{f: guard(getattr(handler, f)) for f in fields if getattr(handler, f) is not None})  # type: ignore[attr-defined,no-any-return]


# What passes through a guard untouched: cancellation, and the aborts that answered the call.
PASSED = (asyncio.CancelledError, grpc.aio.AbortError)


def server_interceptors(
    interceptors: tuple[grpc.aio.ServerInterceptor, ...], *, builtins: bool
) -> list[grpc.aio.ServerInterceptor] | None:
    """What to give ``grpc.aio.server(interceptors=...)``: None when there are none (no per-RPC cost)."""
    if not interceptors:
        return None
    return [_Guarded(i, builtins=builtins) for i in interceptors]
