"""meshrpc.channel: balancing, draining replicas, deadlines, retries, the sidecar gate."""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from typing import Any

import grpc
import pytest

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
from meshrpc import _client, testing
from meshrpc._rpc_context import current_rpc
from tests.apps.echo import app
from tests.helpers import Served
from tests.sidecar import StandIn


async def test_calls_spread_over_replicas_and_survive_a_drain() -> None:
    replicas = [Served("tests.apps.echo:app", "--drain-delay", "1", "--grace", "5") for _ in range(2)]
    try:
        for served in replicas:
            served.wait_serving()
        target = "ipv4:" + ",".join(s.target for s in replicas)
        seen: collections.Counter[str] = collections.Counter()
        errors: list[str] = []
        async with meshrpc.channel(target, mesh="none") as channel:
            stub = echo_pb2_grpc.EchoStub(channel)

            async def caller(until: float) -> None:
                while time.monotonic() < until:
                    try:
                        reply = await stub.Unary(echo_pb2.EchoRequest(text="x", sleep=0.002), timeout=5)
                        seen[reply.server] += 1
                    except grpc.aio.AioRpcError as exc:
                        errors.append(f"{exc.code().name}: {exc.details()}")

            end = time.monotonic() + 1.0
            await asyncio.gather(*(caller(end) for _ in range(4)))
            assert set(seen) == {f"pid-{s.proc.pid}" for s in replicas}, seen  # round_robin: both serve
            before = dict(seen)
            # One replica drains (SIGTERM) while calls go on: zero errors, the other takes over.
            replicas[0].signal(signal.SIGTERM)
            end = time.monotonic() + 3.0
            await asyncio.gather(*(caller(end) for _ in range(4)))
            assert await asyncio.to_thread(replicas[0].wait, 15) == 0
        survivor = f"pid-{replicas[1].proc.pid}"
        assert errors == []
        assert seen[survivor] - before[survivor] > 100
    finally:
        for served in replicas:
            served.close()


async def test_unavailable_once_is_retried_and_other_codes_are_not() -> None:
    async with testing.running(app) as server, meshrpc.channel(server.target, mesh="none") as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply = await stub.Unary(echo_pb2.EchoRequest(text="ok", fail="once:UNAVAILABLE:retry-test"))
        assert reply.text == "ok"  # the first attempt failed UNAVAILABLE; the retry succeeded
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Unary(echo_pb2.EchoRequest(fail="once:ABORTED:no-retry-test"))
        assert info.value.code() == grpc.StatusCode.ABORTED
        async with meshrpc.channel(server.target, mesh="none", retry=None) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await echo_pb2_grpc.EchoStub(plain).Unary(echo_pb2.EchoRequest(fail="once:UNAVAILABLE:off-test"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


class Front(helloworld_pb2_grpc.GreeterServicer):
    """Calls the echo service, which reports the time it has left."""

    target = ""

    async def SayHello(self, request: Any, context: Any) -> Any:
        async with meshrpc.channel(self.target, mesh="none") as channel:
            left_before_call = context.time_remaining()
            reply = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="deadline"))
        return helloworld_pb2.HelloReply(message=json.dumps([left_before_call, float(reply.text)]))


async def test_deadline_propagates_downstream() -> None:
    front = Front()
    async with testing.running(app) as back, testing.running(meshrpc.App("front", services=[front])) as server:
        front.target = back.target
        reply = await helloworld_pb2_grpc.GreeterStub(server.channel).SayHello(
            helloworld_pb2.HelloRequest(name="x"), timeout=1.5
        )
    front_left, back_left = json.loads(reply.message)
    # grpc core rounds the grpc-timeout header up and times each deadline from the
    # header's arrival, so each hop may gain a few milliseconds (seen: up to 9 ms).
    assert 0 < back_left <= front_left + 0.015
    assert front_left <= 1.5 + 0.015


async def test_explicit_timeout_only_shortens() -> None:
    class Context:
        def time_remaining(self) -> float:
            return 0.5

        def invocation_metadata(self) -> tuple[()]:
            return ()

    token = current_rpc.set(Context())  # type: ignore[arg-type]
    try:
        interceptor = meshrpc.OutboundInterceptor()
        details = grpc.aio.ClientCallDetails("/echo.Echo/Unary", 10.0, None, None, None)
        assert interceptor._details(details).timeout == 0.5
        shorter = grpc.aio.ClientCallDetails("/echo.Echo/Unary", 0.1, None, None, None)
        assert interceptor._details(shorter).timeout == 0.1
    finally:
        current_rpc.reset(token)


async def test_expired_incoming_deadline_fails_fast_without_the_wire() -> None:
    class Expired:
        def time_remaining(self) -> float:
            return -0.01

        def invocation_metadata(self) -> tuple[()]:
            return ()

    async with testing.running(app, access_log="text") as server:
        token = current_rpc.set(Expired())  # type: ignore[arg-type]
        try:
            async with meshrpc.channel(server.target, mesh="none") as channel:
                started = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="never"))
                assert time.monotonic() - started < 0.5
        finally:
            current_rpc.reset(token)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "was not sent" in (info.value.details() or "")


async def test_first_call_waits_for_the_sidecar() -> None:
    with StandIn(ready_status=503) as sidecar:
        async with (
            testing.running(app) as server,
            meshrpc.channel(server.target, mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url) as channel,
        ):
            call = asyncio.ensure_future(echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="x")))
            await asyncio.sleep(0.4)
            assert not call.done()
            sidecar.ready_status = 200
            assert (await asyncio.wait_for(call, 5)).text == "x"


def test_service_config_per_mesh_mode() -> None:
    none = _client.service_config("none", meshrpc.RetryPolicy(), True)
    assert none["loadBalancingConfig"] == [{"round_robin": {}}]
    assert none["healthCheckConfig"] == {"serviceName": ""}
    assert none["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    sidecar = _client.service_config("istio-sidecar", meshrpc.RetryPolicy(), True)
    assert "loadBalancingConfig" not in sidecar  # Envoy balances each request
    with pytest.raises(ValueError, match="max_attempts"):
        meshrpc.RetryPolicy(max_attempts=9)
    with pytest.raises(ValueError, match="status names"):
        meshrpc.RetryPolicy(retryable_status_codes=("UNAVAIL",))
