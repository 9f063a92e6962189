"""The ceiling: the greeter's SayHello served by raw grpc.aio, as one would wire it by hand.

``python -m bench.raw_server PORT``; prints READY when listening.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

from examples._generated.helloworld import helloworld_pb2_grpc
from examples.greeter.app import Greeter


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    helloworld_pb2_grpc.add_GreeterServicer_to_server(Greeter(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
