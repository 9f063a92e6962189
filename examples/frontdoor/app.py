"""Two services, one calling the other: the front door answers main.MainService by asking the greeter.

    meshrpc serve examples.greeter.app:app --port 50051 &
    GREETER_TARGET=dns:///127.0.0.1:50051 meshrpc serve examples.frontdoor.app:app --port 8888

The channel is made once in the lifespan with ``meshrpc.channel``: round-robin over
every greeter replica without a mesh (or through the sidecar with one), retries of
UNAVAILABLE, and the incoming deadline and trace headers carried along on every call.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import grpc

import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from examples._generated.main import main_pb2, main_pb2_grpc

Context = grpc.aio.ServicerContext[object, object]


class FrontDoor(main_pb2_grpc.MainServiceServicer, meshrpc.Service):
    greeter: helloworld_pb2_grpc.GreeterAsyncStub | None = None

    async def GetItem(self, request: main_pb2.GetItemRequest, context: Context) -> main_pb2.Item:
        if not request.id:
            raise meshrpc.InvalidArgument("id must not be empty")
        assert self.greeter is not None, "the lifespan sets the greeter stub"
        try:
            reply = await self.greeter.SayHello(helloworld_pb2.HelloRequest(name=request.id))
        except grpc.aio.AioRpcError as exc:
            # The downstream failure, told as ours: the caller may retry UNAVAILABLE.
            raise meshrpc.Unavailable(f"greeter: {exc.code().name}") from exc
        return main_pb2.Item(id=request.id, title=reply.message)

    async def ListItems(self, request: main_pb2.ListItemsRequest, context: Context) -> AsyncIterator[main_pb2.Item]:
        assert self.greeter is not None, "the lifespan sets the greeter stub"
        count = request.limit or 3
        async for reply in self.greeter.SayHelloStream(helloworld_pb2.HelloRequest(name="item", count=count)):
            yield main_pb2.Item(id=str(count), title=reply.message)


front_door = FrontDoor()


@contextlib.asynccontextmanager
async def lifespan(app: meshrpc.App) -> AsyncIterator[None]:
    # The app's own setting, read at its edge (the lifespan runs once, at startup).
    target = os.environ.get("GREETER_TARGET", "dns:///127.0.0.1:50051")
    async with meshrpc.channel(target) as channel:
        front_door.greeter = helloworld_pb2_grpc.GreeterStub(channel)
        yield


app = meshrpc.App("frontdoor", services=[front_door], lifespan=lifespan, config=meshrpc.Config(port=8888))
