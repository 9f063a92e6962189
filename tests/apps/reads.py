"""main.MainService with no route options: what `meshrpc routes` reads from the proto alone.

GetItem is declared ``idempotency_level = NO_SIDE_EFFECTS`` in proto/main/main.proto;
ListItems is not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

import meshrpc
from examples._generated.main import main_pb2, main_pb2_grpc

Context = grpc.aio.ServicerContext[object, object]


class Reads(main_pb2_grpc.MainServiceServicer, meshrpc.Service):
    async def GetItem(self, request: main_pb2.GetItemRequest, context: Context) -> main_pb2.Item:
        return main_pb2.Item(id=request.id)

    async def ListItems(self, request: main_pb2.ListItemsRequest, context: Context) -> AsyncIterator[main_pb2.Item]:
        yield main_pb2.Item(id="1")


app = meshrpc.App("reads", services=[Reads()])
