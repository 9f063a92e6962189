"""How grpc.aio finds meshrpc's handlers: one table, one dict lookup per RPC.

Methods are not registered with grpc's core (health's Check aside, see _assembly):
grpc.aio waits on a pending request per registered method for every call it accepts,
so each one would cost every RPC (figures in docs/design.md).
"""

from __future__ import annotations

from typing import Any

import grpc

from ._rpc_context import call_details

_keep_details = call_details.set


class MethodTable(grpc.GenericRpcHandler):
    """Every method a server answers, by its full path (``/package.Service/Method``)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        """Serve ``handlers`` (by method name) as ``service``'s methods."""
        for name, handler in handlers.items():
            self._handlers[f"/{service}/{name}"] = handler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            # grpc.aio finds the handler in the RPC's own task: kept for the handler (see _rpc_context).
            _keep_details(handler_call_details)
        return handler
