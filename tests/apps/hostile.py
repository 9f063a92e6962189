"""The echo service behind middleware, an interceptor, a check and a lifespan that misbehave on request.

What each piece does is chosen per call by request metadata (``x-middleware``,
``x-interceptor``) or per process by ``HOSTILE_*`` variables, so one app serves
every hardening test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2

import meshrpc
from examples._generated.echo import echo_pb2
from tests.apps.echo import Echo

log = logging.getLogger("hostile")


class Details(Echo):
    async def Unary(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoReply:
        if request.text.startswith("details:"):  # "details:N": N field violations of 100 bytes each
            count = int(request.text.split(":")[1])
            violations = [
                error_details_pb2.BadRequest.FieldViolation(field=f"f{i}", description="x" * 100) for i in range(count)
            ]
            info = error_details_pb2.ErrorInfo(reason="TOO_BIG", domain="hostile.test")
            raise meshrpc.InvalidArgument(
                "bad fields", details=[info, error_details_pb2.BadRequest(field_violations=violations)]
            )
        if request.text.startswith("message:"):  # "message:N": a status message of N characters
            raise meshrpc.FailedPrecondition("m" * int(request.text.split(":")[1]))
        return await super().Unary(request, context)


async def reads_metadata(call: meshrpc.Call, call_next: meshrpc.CallNext) -> None:
    """Reads every header, as an auth middleware does; misbehaves when asked."""
    asked = call.metadata.get("x-middleware", "")
    if asked == "skip":  # never calls call_next and raises nothing
        return
    await call_next(call)
    if asked == "twice":
        await call_next(call)


class Raising(grpc.aio.ServerInterceptor):
    """Raises what ``x-interceptor`` names, in intercept_service or in the handler it returns."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        asked = dict(details.invocation_metadata or ()).get("x-interceptor", "")
        if asked == "raise":
            raise RuntimeError("ICSECRET token=abc")
        if asked == "exit":
            sys.exit(9)
        if asked == "interrupt":
            raise KeyboardInterrupt
        handler = await continuation(details)
        if asked != "raise-in-handler" or handler is None or handler.unary_unary is None:
            return handler

        async def failing(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            raise RuntimeError("ICSECRET in the wrapper")

        return grpc.unary_unary_rpc_method_handler(
            failing,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


@contextlib.asynccontextmanager
async def lifespan(app: meshrpc.App) -> AsyncIterator[None]:
    startup = os.environ.get("HOSTILE_STARTUP")
    if startup:  # a startup that swallows its cancellation: then ends ("swallow") or goes on ("stuck")
        log.info("slow startup begins")
        for _ in range(300):
            try:
                await asyncio.sleep(0.5)
                if startup == "swallow":
                    break
            except asyncio.CancelledError:
                log.info("startup swallowed a cancellation")
    yield


app = meshrpc.App(
    "hostile",
    services=[Details()],
    middleware=[reads_metadata],
    interceptors=[Raising()],
    lifespan=lifespan,
)

if os.environ.get("HOSTILE_CHECK"):

    @app.readiness_check(name="exits")
    async def exits() -> bool:
        if os.environ["HOSTILE_CHECK"] == "exit":
            sys.exit(4)
        raise KeyboardInterrupt
