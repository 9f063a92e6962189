"""How grpc.aio finds meshrpc's handlers: one table, one dict lookup per RPC.

Methods are not registered with grpc's core (health's Check aside, see _assembly):
grpc.aio waits on a pending request per registered method for every call it accepts,
so each one would cost every RPC (figures in docs/design.md).
"""

from __future__ import annotations

from typing import Any

import grpc


class MethodTable(grpc.GenericRpcHandler):
    """Every method a server answers, by its full path (``/package.Service/Method``)."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add(self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]) -> None:
        """Serve ``handlers`` (by method name) as ``service``'s methods."""
        for name, handler in handlers.items():
            self._handlers[f"/{service}/{name}"] = handler

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)
