"""The RPC being served, for code that runs inside a handler (outbound calls, log lines).

grpc.aio runs each RPC in its own task, so a context variable set at the start of
the handler is seen by everything the handler awaits and by nothing else.
"""

from __future__ import annotations

import contextvars
import operator
from collections.abc import Iterable
from typing import Any

import grpc

current_rpc: contextvars.ContextVar[grpc.aio.ServicerContext[Any, Any]] = contextvars.ContextVar("meshrpc_rpc")
# What grpc.aio gave meshrpc's method table to find the RPC's handler, in the same task:
# the method and the request metadata.  grpc builds the metadata tuple anew at each
# ``invocation_metadata()`` call (some 6,800 instructions for a plain call's headers);
# the one it built for the lookup serves the RPC's telemetry too.
call_details: contextvars.ContextVar[grpc.HandlerCallDetails] = contextvars.ContextVar("meshrpc_call_details")


# A metadata pair's key: ``map(metadata_key, metadata)`` names the headers without a dict.
metadata_key = operator.itemgetter(0)


def request_metadata(context: grpc.aio.ServicerContext[Any, Any], path: str) -> tuple[tuple[str, str | bytes], ...]:
    """The request metadata of the RPC of method ``path`` being served (``context``'s):
    the tuple grpc built to find its handler, when that lookup was meshrpc's (not for a
    method registered with grpc's core, such as health's Check)."""
    details = call_details.get(None)
    if details is not None and details.method == path:
        return details.invocation_metadata or ()
    return context.invocation_metadata() or ()  # type: ignore[return-value]


def text_items(metadata: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
    """Metadata pairs as a dict, text values only (binary ``-bin`` keys left out)."""
    return {key: value for key, value in metadata if isinstance(value, str)}


def text_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """An RPC's request metadata as a dict, text values only (binary ``-bin`` keys left out)."""
    return text_items(context.invocation_metadata() or ())


def incoming_metadata() -> dict[str, str]:
    """The current RPC's request metadata (text values only); empty outside a handler."""
    context = current_rpc.get(None)
    return text_metadata(context) if context is not None else {}
