"""Rich error details: a ``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer.

This is the gRPC-wide convention (grpc-go's ``status.FromError(err).Details()``,
grpc-java's ``StatusProto``, grpc-js, ``grpc_status.rpc_status`` in Python), so
the reading is grpcio-status's, not written again here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2  # noqa: F401  (registers the standard detail types)
from grpc_status import rpc_status

DETAILS_KEY = "grpc-status-details-bin"


# What an error's status message and details may take on the wire.  grpc clients refuse
# trailers past their metadata limit (8 KiB by default, "received metadata size exceeds
# limit") and the caller then gets RESOURCE_EXHAUSTED instead of the status it was sent,
# with nothing logged on the server.  Kept well under that, with room for other trailers.
MESSAGE_BUDGET = 2048  # bytes of the percent-encoded grpc-message
TRAILER_BUDGET = 7000  # bytes of grpc-message and the base64 grpc-status-details-bin together


def encoded_size(message: str) -> int:
    """The size of ``message`` as the grpc-message header carries it (percent-encoded UTF-8)."""
    return sum(1 if 0x20 <= b <= 0x7E and b != 0x25 else 3 for b in message.encode())


def fit_message(message: str) -> str:
    """``message``, cut (with an ellipsis) to what `MESSAGE_BUDGET` allows."""
    if len(message) * 3 <= MESSAGE_BUDGET or encoded_size(message) <= MESSAGE_BUDGET:
        return message
    low, high = 0, len(message)
    while low < high:  # the longest prefix that fits with the ellipsis
        mid = (low + high + 1) // 2
        if encoded_size(message[:mid]) + 9 <= MESSAGE_BUDGET:
            low = mid
        else:
            high = mid - 1
    return message[:low] + "…"


def fit_details(code: grpc.StatusCode, message: str, details: Sequence[Message]) -> tuple[Message, ...]:
    """The leading ``details`` whose trailer fits `TRAILER_BUDGET` beside ``message``."""
    kept = tuple(details)
    while kept:
        size = len(status_trailer(code, message, kept)[0][1])
        if encoded_size(message) + 4 * -(-size // 3) <= TRAILER_BUDGET:
            break
        kept = kept[:-1]
    return kept


def status_trailer(code: grpc.StatusCode, message: str, details: Sequence[Message]) -> tuple[tuple[str, bytes], ...]:
    """The trailing metadata that carries ``details`` for an RPC ending with ``code``."""
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    status = status_pb2.Status(code=code.value[0], message=message, details=packed)
    return ((DETAILS_KEY, status.SerializeToString()),)


def error_details(error: grpc.RpcError | grpc.aio.AioRpcError) -> list[Message]:
    """The detail messages a failed call carries, unpacked (``BadRequest``, ``ErrorInfo``, ...).

    Works on the ``grpc.aio.AioRpcError`` (or sync ``grpc.RpcError``) a client caught.
    A detail whose type this process does not know stays a ``google.protobuf.Any``.
    An error without details, or whose details contradict its status, gives ``[]``.
    """
    call: Any = error
    if not callable(getattr(call, "trailing_metadata", None)):
        return []
    try:
        status = rpc_status.from_call(call)
    except ValueError:  # the trailer's code or message differs from the call's own
        return []
    if status is None:
        return []
    return [_unpack(detail) for detail in status.details]


def _unpack(packed: any_pb2.Any) -> Message:
    name = packed.TypeName()
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        return packed
    message: Message = message_factory.GetMessageClass(descriptor)()
    packed.Unpack(message)
    return message
