"""The greeter: ``meshrpc serve examples.greeter.app:app --port 50051``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.rpc import error_details_pb2

import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc


class Greeter(helloworld_pb2_grpc.GreeterServicer, meshrpc.Service):
    async def SayHello(
        self, request: helloworld_pb2.HelloRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> helloworld_pb2.HelloReply:
        if not request.name:
            # The details tell any client (Go, Java, Node, grpcurl) which field is wrong.
            violation = error_details_pb2.BadRequest.FieldViolation(field="name", description="must not be empty")
            raise meshrpc.InvalidArgument(
                "name must not be empty", details=[error_details_pb2.BadRequest(field_violations=[violation])]
            )
        return helloworld_pb2.HelloReply(message=f"Hello, {request.name}!")

    async def SayHelloStream(
        self, request: helloworld_pb2.HelloRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[helloworld_pb2.HelloReply]:
        count = request.count or 3
        if count < 0 or count > 1000:
            raise meshrpc.InvalidArgument(f"count must be 0..1000, got {count}")
        for i in range(count):
            # A draining server finishes the stream early and cleanly, with OK.
            if self.draining.is_set():
                return
            yield helloworld_pb2.HelloReply(message=f"Hello, {request.name}! ({i + 1}/{count})")


app = meshrpc.App("greeter", services=[Greeter()])
