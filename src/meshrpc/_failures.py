"""How the end of a failed handler is answered: its status, message and details."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from ._errors import HandlerShapeError, StatusError
from ._service import MethodSpec

logger = logging.getLogger("meshrpc.handlers")
INTERNAL_DETAILS = "Internal server error"

# What a handler raises, but for aborts and cancellation, is its own bug, answered
# INTERNAL: BaseException, not Exception, because asyncio re-raises a task's SystemExit
# or KeyboardInterrupt out of the event loop itself, under grpc's live server.
HANDLER_ERRORS = BaseException


def final_code(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None) -> grpc.StatusCode:
    """The status an RPC ends with when its handler returned (``exc`` None) or raised ``exc``.

    What `fail` answers, seen from outside: middleware and telemetry report it.
    """
    if exc is None:
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK
    if isinstance(exc, StatusError):
        return exc.code
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


async def fail(context: grpc.aio.ServicerContext[Any, Any], spec: MethodSpec, exc: BaseException) -> None:
    """Answer the client for an exception a handler raised; never returns."""
    if isinstance(exc, StatusError):
        from ._details import fit_details, fit_message

        message = fit_message(exc.message)
        if message is not exc.message:
            logger.warning(
                "%s: the status message of its %s (%d characters) is cut to fit a trailer",
                spec.path,
                exc.code.name,
                len(exc.message),
            )
        if exc.details:
            from ._details import status_trailer

            details = fit_details(exc.code, message, exc.details)
            if len(details) < len(exc.details):
                logger.warning(
                    "%s: %d of the %d error details of its %s are dropped: they do not fit a trailer "
                    "(clients refuse trailers past 8 KiB)",
                    spec.path,
                    len(exc.details) - len(details),
                    len(exc.details),
                    exc.code.name,
                )
            if details:
                await context.abort(exc.code, message, trailing_metadata=status_trailer(exc.code, message, details))
        await context.abort(exc.code, message)
    if isinstance(exc, HandlerShapeError):  # the message says it all; meshrpc's frames would only hide it
        logger.error("%s", exc)
    else:
        logger.error("unhandled exception in %s", spec.path, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)


async def wrong_reply(context: grpc.aio.ServicerContext[Any, Any], spec: MethodSpec, reply: Any) -> None:
    """A handler returned (or yielded) something that is not the response message; never returns."""
    logger.error(
        "%s returned %s instead of a %s",
        spec.path,
        type(reply).__name__,
        spec.response_type.DESCRIPTOR.full_name,
    )
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_DETAILS)
