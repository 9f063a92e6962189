"""Standard ``grpc.aio.ServerInterceptor`` objects, kept to the app's own services.

grpc.aio applies a server's interceptors to every RPC it serves.  Health and
reflection are answered to kubelet probes and grpcurl, which carry no
credentials, so an auth interceptor would fail every probe; each interceptor is
therefore wrapped to pass those two services straight to their handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from ._errors import AppError

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


class AppServicesOnly(grpc.aio.ServerInterceptor):
    """``interceptor`` for every method but health and reflection's."""

    def __init__(self, interceptor: grpc.aio.ServerInterceptor) -> None:
        self.interceptor = interceptor

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method: str = handler_call_details.method or ""
        if method.startswith(BUILTIN_PREFIXES):
            return await continuation(handler_call_details)
        handler: grpc.RpcMethodHandler[Any, Any] | None = await self.interceptor.intercept_service(
            continuation, handler_call_details
        )
        return handler


def server_interceptors(
    interceptors: tuple[grpc.aio.ServerInterceptor, ...], *, builtins: bool
) -> list[grpc.aio.ServerInterceptor] | None:
    """What to give ``grpc.aio.server(interceptors=...)``: None when there are none (no per-RPC cost)."""
    if not interceptors:
        return None
    return list(interceptors) if builtins else [AppServicesOnly(i) for i in interceptors]
