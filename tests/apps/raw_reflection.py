"""A plain grpc.aio server (no meshrpc) with the greeter and grpcio-reflection's v1alpha service.

``python -m tests.apps.raw_reflection`` prints its port on the first line and serves
until killed: what `meshrpc list|describe|call` must handle as well as a meshrpc server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection

from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc


class Greeter(helloworld_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: helloworld_pb2.HelloRequest, context: Any) -> helloworld_pb2.HelloReply:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is empty")
        return helloworld_pb2.HelloReply(message=f"raw hello, {request.name}")


async def main() -> None:
    server = grpc.aio.server()
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    names = (helloworld_pb2.DESCRIPTOR.services_by_name["Greeter"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main())
