"""The overload benchmark's servers: a unary handler that burns ``BURN_MS`` of CPU.

    meshrpc serve bench.overload_app:app        # async def handler (BURN_SYNC=1: a def one)
    python -m bench.overload_app PORT           # raw grpc.aio with the same handler and health

Each server counts the handlers it started after their call's deadline had passed and
prints the count to stderr when it stops ("late starts: N").
"""

from __future__ import annotations

import asyncio
import atexit
import os
import signal
import sys
import time
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc

BURN = float(os.environ.get("BURN_MS", "1")) / 1000
late_starts = 0


def burn(context: Any) -> helloworld_pb2.HelloReply:
    global late_starts
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        late_starts += 1
    end = time.perf_counter() + BURN
    while time.perf_counter() < end:
        pass
    return helloworld_pb2.HelloReply(message="ok")


class AsyncBurner(helloworld_pb2_grpc.GreeterServicer):
    async def SayHello(self, request: helloworld_pb2.HelloRequest, context: Any) -> helloworld_pb2.HelloReply:
        return burn(context)


class SyncBurner(helloworld_pb2_grpc.GreeterServicer):
    def SayHello(self, request: helloworld_pb2.HelloRequest, context: Any) -> helloworld_pb2.HelloReply:
        return burn(context)


def _report() -> None:
    print(f"late starts: {late_starts}", file=sys.stderr, flush=True)


atexit.register(_report)
app = meshrpc.App("burner", services=[SyncBurner() if os.environ.get("BURN_SYNC") else AsyncBurner()])


async def raw(port: int) -> None:
    """The same handler on a plain grpc.aio server, with grpcio-health-checking's servicer."""
    if os.environ.get("BURN_SYNC"):
        from concurrent.futures import ThreadPoolExecutor

        server = grpc.aio.server(migration_thread_pool=ThreadPoolExecutor(16))
        helloworld_pb2_grpc.add_GreeterServicer_to_server(SyncBurner(), server)
    else:
        server = grpc.aio.server()
        helloworld_pb2_grpc.add_GreeterServicer_to_server(AsyncBurner(), server)
    health = health_aio.HealthServicer()
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("liveness", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(0)


if __name__ == "__main__":
    asyncio.run(raw(int(sys.argv[1])))
