"""Two services in one app, with route options: ``meshrpc routes examples.multi.app:app``.

This is the scenario ``meshrpc routes`` was made for: ``main.MainService`` on port
8888 behind one gateway, with a tighter timeout and retries on one method.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

import meshrpc
from examples._generated.main import main_pb2, main_pb2_grpc
from examples.greeter.app import Greeter

ITEMS = {str(i): main_pb2.Item(id=str(i), title=f"item {i}") for i in range(1, 6)}
Context = grpc.aio.ServicerContext[object, object]


@meshrpc.route(timeout="10s")
class MainService(main_pb2_grpc.MainServiceServicer, meshrpc.Service):
    @meshrpc.route(timeout="2s", retries=3, per_try_timeout="500ms", retry_on=["unavailable", "reset"])
    async def GetItem(self, request: main_pb2.GetItemRequest, context: Context) -> main_pb2.Item:
        try:
            return ITEMS[request.id]
        except KeyError:
            raise meshrpc.NotFound(f"no item {request.id!r}") from None

    async def ListItems(self, request: main_pb2.ListItemsRequest, context: Context) -> AsyncIterator[main_pb2.Item]:
        for item in list(ITEMS.values())[: request.limit or None]:
            yield item


app = meshrpc.App("main", services=[MainService(), Greeter()], config=meshrpc.Config(port=8888))
