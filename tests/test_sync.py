"""``def`` handlers, as written for grpc.server, served unchanged from the thread pool."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from tests.apps import sync_echo
from tests.helpers import Served


async def requests(*texts: str, fail: str = "") -> AsyncIterator[echo_pb2.EchoRequest]:
    for text in texts:
        yield echo_pb2.EchoRequest(text=text, fail=fail if text == texts[-1] else "")


async def test_all_four_kinds_run_in_the_pool() -> None:
    async with testing.serve(sync_echo.app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Unary(echo_pb2.EchoRequest(text="a"))
        assert reply.text == "a" and reply.server.startswith("meshrpc-handler")
        assert [r.index async for r in stub.ServerStream(echo_pb2.EchoRequest(text="s", count=5))] == [0, 1, 2, 3, 4]
        assert (await stub.ClientStream(requests("x", "y", "z"))).text == "x,y,z"
        assert [r.text async for r in stub.BidiStream(requests("p", "q"))] == ["P", "Q"]


async def test_eight_slow_calls_run_at_once_and_health_still_answers() -> None:
    async with testing.running(sync_echo.app, thread_pool_size=8) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        health = health_pb2_grpc.HealthStub(server.channel)
        start = time.monotonic()
        calls = [asyncio.ensure_future(stub.Unary(echo_pb2.EchoRequest(sleep=0.5))) for _ in range(8)]
        await asyncio.sleep(0.15)  # every pool thread is now asleep in a handler
        probe_start = time.monotonic()
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        probe_took = time.monotonic() - probe_start
        await asyncio.gather(*calls)
        took = time.monotonic() - start
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    assert probe_took < 0.2, f"health waited {probe_took:.2f}s behind busy handler threads"
    assert took < 1.2, f"8 concurrent 0.5 s calls took {took:.2f}s: not run in parallel"


async def test_a_ninth_call_waits_for_a_free_thread() -> None:
    async with testing.serve(sync_echo.app, thread_pool_size=2) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        start = time.monotonic()
        await asyncio.gather(*(stub.Unary(echo_pb2.EchoRequest(sleep=0.3)) for _ in range(3)))
        assert 0.55 < time.monotonic() - start < 1.5  # two rounds of 0.3 s, the pool bounds the work


@pytest.mark.parametrize(
    ("fail", "code", "details"),
    [
        ("abort", grpc.StatusCode.NOT_FOUND, "no such thing"),
        ("crash", grpc.StatusCode.INTERNAL, "Internal server error"),
        ("set-code", grpc.StatusCode.FAILED_PRECONDITION, "set, not raised"),
    ],
)
async def test_sync_errors_get_the_same_mapping(fail: str, code: grpc.StatusCode, details: str) -> None:
    async with testing.serve(sync_echo.app) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(fail=fail))
    assert (info.value.code(), info.value.details()) == (code, details)
    assert "secret" not in str(info.value)


async def test_streams_end_with_the_mapped_status() -> None:
    async with testing.serve(sync_echo.app) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for reply in stub.ServerStream(echo_pb2.EchoRequest(count=2, fail="abort")):
                got.append(reply.index)
        assert got == [0, 1] and info.value.code() == grpc.StatusCode.OUT_OF_RANGE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            [r async for r in stub.BidiStream(requests("a", "b", fail="crash"))]
        assert info.value.code() == grpc.StatusCode.INTERNAL


async def test_deadline_and_cancellation_are_visible_in_the_thread() -> None:
    async with testing.serve(sync_echo.app, thread_pool_size=1) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        remaining = float((await stub.Unary(echo_pb2.EchoRequest(text="deadline"), timeout=5)).text)
        assert 4.0 < remaining <= 5.1  # the server rounds the deadline it was sent
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Unary(echo_pb2.EchoRequest(text="until-cancelled"), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The handler saw is_active() turn False and let its thread go: the pool of one is free again.
        assert (await stub.Unary(echo_pb2.EchoRequest(text="free"), timeout=2)).text == "free"
        assert time.monotonic() - start < 2


async def test_sync_and_async_methods_mix_in_one_servicer() -> None:
    class Mixed(echo_pb2_grpc.EchoServicer):
        def Unary(self, request: echo_pb2.EchoRequest, context: object) -> echo_pb2.EchoReply:
            return echo_pb2.EchoReply(text="sync")

        async def ClientStream(
            self, requests: AsyncIterator[echo_pb2.EchoRequest], context: object
        ) -> echo_pb2.EchoReply:
            return echo_pb2.EchoReply(text="async:" + ",".join([r.text async for r in requests]))

    async with testing.serve(meshrpc.App("mixed", services=[Mixed()]), thread_pool_size=1) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        assert (await stub.Unary(echo_pb2.EchoRequest())).text == "sync"
        assert (await stub.ClientStream(requests("a", "b"))).text == "async:a,b"


def test_a_sync_call_in_flight_across_sigterm_completes() -> None:
    with Served("tests.apps.sync_echo:app", "--drain-delay", "0.2", "--grace", "5") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            future = stub.Unary.future(echo_pb2.EchoRequest(text="slow", sleep=1.5), timeout=10)
            time.sleep(0.4)
            served.signal(signal.SIGTERM)
            assert future.result().text == "slow"
        assert served.wait() == 0, served.log
    assert "1 RPCs in flight" in served.log


def test_thread_pool_size_is_validated() -> None:
    with pytest.raises(meshrpc.ConfigError, match="thread_pool_size"):
        meshrpc.Config(thread_pool_size=0)


def _outcomes(target: str) -> list[object]:
    """What a client sees from a set of calls, errors included, as comparable values."""
    seen: list[object] = []
    with grpc.insecure_channel(target) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        calls = [
            lambda: stub.Unary(echo_pb2.EchoRequest(text="hi")).text,
            lambda: stub.Unary(echo_pb2.EchoRequest(fail="abort")),
            lambda: stub.Unary(echo_pb2.EchoRequest(fail="set-code")),
            lambda: [r.index for r in stub.ServerStream(echo_pb2.EchoRequest(count=3))],
            lambda: [r.index for r in stub.ServerStream(echo_pb2.EchoRequest(count=1, fail="abort"))],
            lambda: stub.ClientStream(iter([echo_pb2.EchoRequest(text=t) for t in "abc"])).text,
            lambda: [r.text for r in stub.BidiStream(iter([echo_pb2.EchoRequest(text=t) for t in "xy"]))],
        ]
        for call in calls:
            try:
                seen.append(call())
            except grpc.RpcError as exc:
                seen.append((exc.code(), exc.details()))  # type: ignore[attr-defined]
    return seen


def test_the_servicer_answers_as_it_did_on_grpc_server() -> None:
    """The same unchanged servicer on a plain grpc.server and on meshrpc: the clients see the same."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers import free_port

    plain = grpc.server(ThreadPoolExecutor(max_workers=4))
    echo_pb2_grpc.add_EchoServicer_to_server(sync_echo.SyncEcho(), plain)
    port = plain.add_insecure_port(f"127.0.0.1:{free_port()}")
    plain.start()
    try:
        expected = _outcomes(f"127.0.0.1:{port}")
    finally:
        plain.stop(0)
    with Served("tests.apps.sync_echo:app") as served:
        served.wait_serving()
        got = _outcomes(served.target)
    assert got == expected
    assert expected[1] == (grpc.StatusCode.NOT_FOUND, "no such thing")  # the comparison is not of empty lists


async def test_a_callback_added_after_the_rpc_ended_still_runs() -> None:
    """A 'def' handler hands its context to a thread that registers a callback late: grpc
    has run the RPC's done callbacks by then, and a callback registered after that must
    still be called (it was silently dropped)."""
    import threading

    called = threading.Event()

    class Late(echo_pb2_grpc.EchoServicer):
        def Unary(self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext) -> echo_pb2.EchoReply:
            def later() -> None:
                time.sleep(0.3)  # the RPC has ended by now
                assert not context.is_active()
                context.add_callback(called.set)

            threading.Thread(target=later, daemon=True).start()
            return echo_pb2.EchoReply(text=request.text)

    async with testing.serve(meshrpc.App("late", services=[Late()])) as channel:
        assert (await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="x"))).text == "x"
        assert await asyncio.to_thread(called.wait, 3.0)


def test_close_racing_next_never_leaves_a_thread_waiting() -> None:
    """close() from the loop while the handler's thread is between its check and its wait."""
    import threading

    from meshrpc._sync import RequestIterator

    async def never() -> AsyncIterator[int]:
        await asyncio.Event().wait()
        yield 0

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for round_ in range(200):
            iterator = RequestIterator(never(), loop)
            outcome: list[str] = []

            def pull(it: RequestIterator = iterator, out: list[str] = outcome) -> None:
                try:
                    next(it)
                except grpc.RpcError:
                    out.append("ended")

            thread = threading.Thread(target=pull, daemon=True)
            thread.start()
            if round_ % 2:
                await asyncio.sleep(0)
            iterator.close()
            await asyncio.to_thread(thread.join, 2.0)
            assert not thread.is_alive(), f"round {round_}: next() still waits after close()"
            assert outcome == ["ended"]

    asyncio.run(main())
