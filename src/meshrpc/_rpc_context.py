"""The RPC being served, for code that runs inside a handler (outbound calls, log lines).

grpc.aio runs each RPC in its own task, so a context variable set at the start of
the handler is seen by everything the handler awaits and by nothing else.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterable
from typing import Any

import grpc

current_rpc: contextvars.ContextVar[grpc.aio.ServicerContext[Any, Any]] = contextvars.ContextVar("meshrpc_rpc")


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
