"""The handlers every contender serves: as bare as a raw grpc.aio servicer's.

No validation and no drain check per message (the example greeter has both): work
inside the handler would dilute what the framework around it costs.

    meshrpc serve bench.app:app
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc


class BareGreeter(helloworld_pb2_grpc.GreeterServicer, meshrpc.Service):
    async def SayHello(
        self, request: helloworld_pb2.HelloRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> helloworld_pb2.HelloReply:
        return helloworld_pb2.HelloReply(message=f"Hello, {request.name}!")

    async def SayHelloStream(
        self, request: helloworld_pb2.HelloRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[helloworld_pb2.HelloReply]:
        for i in range(request.count):
            yield helloworld_pb2.HelloReply(message=f"Hello, {request.name}! ({i + 1})")


app = meshrpc.App("greeter", services=[BareGreeter()])
