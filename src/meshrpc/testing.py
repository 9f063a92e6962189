"""Serve an App in-process for tests: ``async with meshrpc.testing.serve(app) as channel``.

The server listens on a free port of 127.0.0.1 with no drain delay and no mesh,
so tests start and stop in milliseconds; pass settings to change that.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc

from ._app import App
from ._server import Server

__all__ = ["TestServer", "running", "serve"]

TEST_DEFAULTS: dict[str, Any] = {
    "host": "127.0.0.1",
    "port": 0,
    "drain_delay": 0.0,
    "grace": 5.0,
    "mesh": "none",
}


@dataclasses.dataclass
class TestServer:
    """A running app: its channel, address and the server (to stop it or read its health)."""

    __test__ = False  # not a pytest test class

    app: App
    server: Server
    channel: grpc.aio.Channel
    target: str
    task: asyncio.Task[int]

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def stop(self, *, force: bool = False) -> int:
        """Drain as a SIGTERM would and return the exit code."""
        self.server.request_stop(force=force)
        return await self.task


@contextlib.asynccontextmanager
async def running(app: App, **settings: Any) -> AsyncIterator[TestServer]:
    """Serve ``app`` until the block ends; yield a `TestServer`."""
    config = app.config.replace(**{**TEST_DEFAULTS, **settings})
    if app.server is not None:
        raise RuntimeError(f"app {app.name!r} is being served already")
    task = asyncio.ensure_future(app.serve(config))  # the path App.run and `meshrpc serve` take
    # serve() attaches its Server in its first step, which runs before this one resumes.
    await asyncio.sleep(0)
    server = app.server
    if server is None:
        await task  # raises the startup error
        raise RuntimeError("the server stopped during startup")
    started = asyncio.ensure_future(server.wait_started())
    await asyncio.wait((task, started), return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        await task  # raises the startup error
        raise RuntimeError("the server stopped during startup")
    target = f"127.0.0.1:{server.port}"
    channel = grpc.aio.insecure_channel(target)
    try:
        yield TestServer(app, server, channel, target, task)
    finally:
        await channel.close()
        if not task.done():
            server.request_stop()
        await task


@contextlib.asynccontextmanager
async def serve(app: App, **settings: Any) -> AsyncIterator[grpc.aio.Channel]:
    """Serve ``app`` until the block ends; yield a channel connected to it."""
    async with running(app, **settings) as test_server:
        yield test_server.channel
