"""The RPC being served, for code that runs inside a handler (outbound calls, log lines).

grpc.aio runs each RPC in its own task, so a context variable set at the start of
the handler is seen by everything the handler awaits and by nothing else.
"""

from __future__ import annotations

import contextvars
from typing import Any

import grpc

current_rpc: contextvars.ContextVar[grpc.aio.ServicerContext[Any, Any]] = contextvars.ContextVar("meshrpc_rpc")


def text_metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    """An RPC's request metadata as a dict, text values only (binary ``-bin`` keys left out)."""
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def incoming_metadata() -> dict[str, str]:
    """The current RPC's request metadata (text values only); empty outside a handler."""
    context = current_rpc.get(None)
    return text_metadata(context) if context is not None else {}
