"""Exceptions: the ones handlers raise to answer with a status, and meshrpc's own."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import Message


class MeshrpcError(Exception):
    """Raised inside meshrpc for a problem a user has to fix (config, app, binding)."""


class ConfigError(MeshrpcError, ValueError):
    """A setting has an invalid value; the message names the setting."""


class AppError(MeshrpcError):
    """The app cannot be loaded or served as declared (services, lifespan, discovery)."""


class BindError(MeshrpcError, OSError):
    """The server could not listen on its address, usually because the port is in use."""


class StatusError(Exception):
    """Raise in a handler to end the RPC with this gRPC status and message.

    The message goes to the client as the status details, so keep internals out
    of it.  Subclasses fix the status code: ``raise meshrpc.NotFound("no such user")``.

    ``details`` are protobuf messages (``google.rpc.BadRequest``, ``ErrorInfo``,
    ``RetryInfo``, ...) sent as a ``google.rpc.Status`` in the
    ``grpc-status-details-bin`` trailer, where every gRPC client library reads them.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str = "", *, code: grpc.StatusCode | None = None, details: Iterable[Message] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details: tuple[Message, ...] = tuple(details)
        if code is not None:
            self.code = code
        if self.code is grpc.StatusCode.OK:
            raise ValueError("a StatusError cannot carry the OK status: return from the handler instead")
        for detail in self.details:
            if not isinstance(detail, Message):
                raise TypeError(f"error details must be protobuf messages, got {type(detail).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code.name})"


# One class per gRPC status a handler may answer with.  OK and UNKNOWN are left
# out on purpose: returning is OK, and an unexpected exception answers INTERNAL.


class HandlerShapeError(TypeError):
    """A handler gave something of the wrong shape (a message where a stream of them was
    due): answered INTERNAL, and logged as one line naming the user's method."""


class Cancelled(StatusError):
    """CANCELLED: raise it to answer that status (the operation was cancelled, typically by the caller).

    Not `asyncio.CancelledError`, which is the handler's task being cancelled
    (the client went away, or the drain's grace ran out): that one must propagate, and
    meshrpc reports it as CANCELLED or DEADLINE_EXCEEDED itself.  Never catch one for
    the other.
    """

    code = grpc.StatusCode.CANCELLED


class InvalidArgument(StatusError):
    """INVALID_ARGUMENT: the request is invalid, whatever the system's state."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(StatusError):
    """DEADLINE_EXCEEDED: the deadline passed before the operation finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(StatusError):
    """NOT_FOUND: a requested entity does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(StatusError):
    """ALREADY_EXISTS: the entity the caller tried to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(StatusError):
    """PERMISSION_DENIED: the caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(StatusError):
    """RESOURCE_EXHAUSTED: a quota or limit is used up."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(StatusError):
    """FAILED_PRECONDITION: the system is not in a state for this operation."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(StatusError):
    """ABORTED: a concurrency conflict; retry at a higher level."""

    code = grpc.StatusCode.ABORTED


class OutOfRange(StatusError):
    """OUT_OF_RANGE: the operation went past the valid range."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(StatusError):
    """UNIMPLEMENTED: the operation is not implemented or supported."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(StatusError):
    """INTERNAL: an invariant the system relies on is broken."""

    code = grpc.StatusCode.INTERNAL


class Unavailable(StatusError):
    """UNAVAILABLE: the service is unavailable for now; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(StatusError):
    """DATA_LOSS: unrecoverable data loss or corruption."""

    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(StatusError):
    """UNAUTHENTICATED: the request has no valid credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED
