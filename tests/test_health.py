"""Health: readiness and liveness names, Check, Watch, List, readiness checks."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshrpc
from meshrpc import testing
from tests.apps.echo import Echo

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_server_services_and_liveness_are_serving(echo_server: testing.TestServer) -> None:
    for name in ("", "echo.Echo", "liveness"):
        assert await check(echo_server.channel, name) == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check(echo_server.channel, "no.Such")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_reports_every_name(echo_server: testing.TestServer) -> None:
    reply = await health_pb2_grpc.HealthStub(echo_server.channel).List(health_pb2.HealthListRequest())
    assert {name: s.status for name, s in reply.statuses.items()} == {
        "": SERVING,
        "echo.Echo": SERVING,
        "liveness": SERVING,
    }


async def test_watch_follows_drain_and_ends_when_server_stops() -> None:
    app = meshrpc.App("watched", services=[Echo()])
    async with testing.running(app, drain_delay=0.5, grace=10) as server:
        stub = health_pb2_grpc.HealthStub(server.channel)
        readiness = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        liveness = stub.Watch(health_pb2.HealthCheckRequest(service="liveness"))
        assert (await readiness.read()).status == SERVING
        assert (await liveness.read()).status == SERVING
        loop = asyncio.get_running_loop()
        started = loop.time()
        stopping = asyncio.ensure_future(server.stop())
        assert (await readiness.read()).status == NOT_SERVING
        assert app.draining.is_set()
        # Liveness stays SERVING through the drain; the stream ends (OK) when the server stops.
        assert await liveness.read() == grpc.aio.EOF
        assert await liveness.code() == grpc.StatusCode.OK
        assert await readiness.read() == grpc.aio.EOF
        assert await stopping == 0
        # The watches did not hold the stop open for the 10 s grace.
        assert loop.time() - started < 3


async def test_readiness_check_failure_and_recovery() -> None:
    healthy = True
    calls = 0

    app = meshrpc.App("checked", services=[Echo()])

    @app.readiness_check
    async def database() -> bool:
        nonlocal calls
        calls += 1
        if healthy == "raise":
            raise ConnectionError("db down")
        return bool(healthy)

    async def wait_for(status: int) -> None:
        for _ in range(100):
            if await check(server.channel) == status:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"readiness never became {status}")

    async with testing.running(app, health_check_interval=0.05, health_check_timeout=0.2) as server:
        await wait_for(SERVING)
        healthy = False
        await wait_for(NOT_SERVING)
        assert await check(server.channel, "echo.Echo") == NOT_SERVING
        assert await check(server.channel, "liveness") == SERVING  # a failing dependency is no reason to restart
        healthy = True
        await wait_for(SERVING)
        healthy = "raise"  # type: ignore[assignment]
        await wait_for(NOT_SERVING)
        healthy = True
        await wait_for(SERVING)
    assert calls >= 5


async def test_readiness_check_timeout_counts_as_failure(caplog: pytest.LogCaptureFixture) -> None:
    app = meshrpc.App("slowcheck", services=[Echo()])

    @app.readiness_check(name="slow-dependency")
    async def slow() -> None:
        await asyncio.sleep(5)

    async with testing.running(app, health_check_interval=0.05, health_check_timeout=0.05) as server:
        for _ in range(100):
            if (
                await check(server.channel) == NOT_SERVING
                and "readiness check slow-dependency fails: timed out after 0.05s" in caplog.text
            ):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("a timed-out check did not make readiness NOT_SERVING")


def test_readiness_check_must_be_async() -> None:
    app = meshrpc.App("sync-check", services=[Echo()])
    with pytest.raises(meshrpc.AppError, match="async def"):
        app.readiness_check(lambda: True)  # type: ignore[arg-type]


async def test_failing_check_keeps_readiness_off_from_the_start() -> None:
    app = meshrpc.App("never-ready", services=[Echo()])

    @app.readiness_check
    async def broken() -> bool:
        return False

    async with testing.running(app, health_check_interval=60) as server:
        assert await check(server.channel) == NOT_SERVING
        assert await check(server.channel, "liveness") == SERVING


async def test_a_check_that_swallows_cancellation_still_times_out(caplog: pytest.LogCaptureFixture) -> None:
    app = meshrpc.App("stubborn", services=[Echo()])
    done = asyncio.Event()

    @app.readiness_check(name="stubborn")
    async def stubborn() -> None:
        for _ in range(200):  # ignores every cancellation, until the test ends (10 s at most)
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            if done.is_set():
                return

    async with testing.running(app, health_check_interval=0.05, health_check_timeout=0.1) as server:
        assert await check(server.channel) == NOT_SERVING  # the first round decided, in about 0.1 s
        await asyncio.sleep(0.3)
        assert await check(server.channel) == NOT_SERVING
        assert "readiness check stubborn fails: timed out after 0.1s" in caplog.text
        assert "has still not finished (it ignores cancellation)" in caplog.text
    done.set()


async def test_a_failing_check_logs_once_per_change_not_per_poll(caplog: pytest.LogCaptureFixture) -> None:
    app = meshrpc.App("flaky", services=[Echo()])
    reasons = iter(["connection refused"] * 6 + ["timeout"] * 6)
    healthy = asyncio.Event()

    @app.readiness_check(name="db")
    async def database() -> None:
        if healthy.is_set():
            return
        raise ConnectionError(next(reasons, "timeout"))

    caplog.set_level("INFO", logger="meshrpc.health")
    async with testing.running(app, health_check_interval=0.02) as server:
        for _ in range(200):
            await asyncio.sleep(0.02)
            if caplog.text.count("timeout") and caplog.text.count("still fails"):
                break
        healthy.set()
        for _ in range(100):
            if await check(server.channel) == SERVING:
                break
            await asyncio.sleep(0.02)
    lines = [r for r in caplog.records if "readiness check db" in r.getMessage()]
    messages = [r.getMessage() for r in lines]
    assert messages[0] == "readiness check db fails: raised ConnectionError: connection refused"
    assert lines[0].exc_info is not None  # the first failure carries its traceback
    assert "readiness check db still fails, now: raised ConnectionError: timeout" in messages
    assert sum(r.exc_info is not None for r in lines) == 1  # no traceback per poll
    assert len(lines) <= 4  # first failure, the change, maybe a reminder, the recovery
    assert messages[-1].startswith("readiness check db passes again after")


def test_check_log_reminds_while_a_check_keeps_failing(caplog: pytest.LogCaptureFixture) -> None:
    from meshrpc._health import CheckLog

    log = CheckLog(remind_every=0.0)
    with caplog.at_level("WARNING", logger="meshrpc.health"):
        log.failed("db", "down")
        log.failed("db", "down")
    assert "readiness check db has been failing for" in caplog.text


async def test_readiness_lines_say_why_not_serving(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="meshrpc.health"):
        async with testing.running(meshrpc.App("why", services=[Echo()])):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "meshrpc.health"]
    assert messages == ["readiness NOT_SERVING (starting up)", "readiness SERVING", "readiness NOT_SERVING (draining)"]
