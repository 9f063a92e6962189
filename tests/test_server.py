"""The server's lifecycle seen from code that embeds it: its tasks, its flush, its caller's cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

import meshrpc
from examples._generated.echo import echo_pb2_grpc
from meshrpc import testing
from tests.apps.echo import Echo


async def test_the_servers_own_tasks_are_awaited_when_it_stops() -> None:
    """A readiness check's poll is cancelled at stop and given time to finish its cleanup."""
    app = meshrpc.App("polled", services=[Echo()])
    cleaned = asyncio.Event()
    runs = 0

    @app.readiness_check
    async def slow_to_clean() -> bool:
        nonlocal runs
        runs += 1
        if runs == 1:
            return True  # the first round, before SERVING
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # cleanup that itself awaits
            cleaned.set()
        return True

    async with testing.running(app, health_check_interval=0.01, health_check_timeout=60) as server:
        await asyncio.sleep(0.1)  # the poll is inside the check now
        assert server.server.running
    assert cleaned.is_set()


async def test_a_slow_telemetry_flush_does_not_block_the_event_loop() -> None:
    """The user's TracerProvider flushes at stop; an exporter that takes a second must not
    freeze every other task on the loop for that second."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

    class SlowFlush(SpanProcessor):
        def force_flush(self, timeout_millis: int = 30000) -> bool:
            time.sleep(1.0)
            return True

    provider = TracerProvider()
    provider.add_span_processor(SlowFlush())
    previous = trace._TRACER_PROVIDER
    trace._TRACER_PROVIDER = provider  # the test's own provider, put back below
    try:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.02)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        beating = asyncio.ensure_future(heartbeat())
        started = time.monotonic()
        async with testing.serve(meshrpc.App("flushed", services=[Echo()])) as channel:
            await echo_pb2_grpc.EchoStub(channel).Unary(
                __import__("examples._generated.echo.echo_pb2", fromlist=["x"]).EchoRequest(text="x")
            )
        took = time.monotonic() - started
        beating.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beating
    finally:
        trace._TRACER_PROVIDER = previous
    assert took >= 0.9  # the flush ran, and the stop waited for it
    assert max(gaps) < 0.5, max(gaps)  # but the loop kept running meanwhile


async def test_cancelling_serve_during_startup_cancels_it_and_propagates() -> None:
    """The caller's own cancellation is never swallowed, and the startup stops with it."""
    entered, finished = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def lifespan(app: meshrpc.App) -> AsyncIterator[None]:
        entered.set()
        try:
            await asyncio.sleep(30)
        finally:
            finished.set()
        yield

    app = meshrpc.App("cancelled", services=[Echo()], lifespan=lifespan)
    task = asyncio.ensure_future(app.serve(meshrpc.Config(host="127.0.0.1", port=0, mesh="none")))
    await asyncio.wait_for(entered.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await asyncio.wait_for(finished.wait(), 1)
    assert app.server is None


async def test_two_apps_in_one_process_keep_their_own_state() -> None:
    first, second = meshrpc.App("first", services=[Echo()]), meshrpc.App("second", services=[Echo()])
    async with testing.running(first) as a, testing.running(second, mesh="ambient") as b:
        assert a.server is first.server and b.server is second.server
        await a.stop()
        assert first.draining.is_set() and not second.draining.is_set()
        assert a.server.mesh is not None and b.server.mesh is not None
        assert (a.server.mesh.mode, b.server.mesh.mode) == ("none", "ambient")
