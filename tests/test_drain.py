"""The drain with a real SIGTERM to a real `meshrpc serve` process."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from tests.apps import echo
from tests.helpers import Served, eventually

D, G = 1.5, 3.0


def watch(target: str, service: str, seen: list[str], stop: threading.Event) -> None:
    with grpc.insecure_channel(target) as channel:
        stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service), timeout=30)
        try:
            for reply in stream:
                seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except grpc.RpcError as exc:
            seen.append(exc.code().name)
        else:
            seen.append("END")


def test_sigterm_drain_timeline() -> None:
    with Served("tests.apps.echo:app", "--drain-delay", str(D), "--grace", str(G)) as served:
        served.wait_serving()
        readiness: list[str] = []
        liveness: list[str] = []
        stop = threading.Event()
        watchers = [
            threading.Thread(target=watch, args=(served.target, "", readiness, stop)),
            threading.Thread(target=watch, args=(served.target, "liveness", liveness, stop)),
        ]
        for t in watchers:
            t.start()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            # Longer than D: started before the signal, must still complete OK.
            long_call = stub.Unary.future(echo_pb2.EchoRequest(text="long", sleep=D + 1.0))
            # Ignores the drain entirely: cancelled at D+G, its client gets UNAVAILABLE.
            stuck_call = stub.Unary.future(echo_pb2.EchoRequest(text="stuck", sleep=60))
            served.wait_for("handler sleeps", count=2)  # both calls are in flight
            t0 = time.monotonic()
            served.signal(signal.SIGTERM)

            # During D: readiness flips, but new RPCs are still served.
            during = []
            while time.monotonic() - t0 < D - 0.4:
                during.append(stub.Unary(echo_pb2.EchoRequest(text="new"), timeout=2).text)
                time.sleep(0.05)
            assert len(during) >= 10 and set(during) == {"new"}
            assert long_call.result(timeout=10).text == "long"

            # After D: new RPCs are refused.
            time.sleep(max(0.0, D + 0.3 - (time.monotonic() - t0)))
            with pytest.raises(grpc.RpcError) as refused:
                stub.Unary(echo_pb2.EchoRequest(text="late"), timeout=2)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

            with pytest.raises(grpc.RpcError) as cancelled:
                stuck_call.result(timeout=10)
            assert cancelled.value.code() == grpc.StatusCode.UNAVAILABLE
            cancelled_after = time.monotonic() - t0
        code = served.wait(15)
        total = time.monotonic() - t0
        for t in watchers:
            t.join(5)

    assert code == 0
    assert D + G - 0.5 <= cancelled_after <= D + G + 1.0
    assert total <= D + G + 1.0, f"stopped after {total:.2f}s, more than D+G+1"
    assert readiness[:2] == ["SERVING", "NOT_SERVING"]
    assert liveness[0] == "SERVING" and "NOT_SERVING" not in liveness
    # Watch streams end when the server stops accepting, instead of holding the stop open.
    assert readiness[-1] == "END" and liveness[-1] == "END"
    log = served.log
    for phase in ("received SIGTERM", "drain t0:", "no new RPCs (GOAWAY)", "server stopped", "shutdown complete"):
        assert phase in log, f"{phase!r} missing from the log:\n{log}"


def test_second_signal_skips_the_rest_of_the_drain() -> None:
    with Served("tests.apps.echo:app", "--drain-delay", "20", "--grace", "20") as served:
        served.wait_serving()
        served.signal(signal.SIGTERM)
        served.wait_for("drain t0:")
        t1 = time.monotonic()
        served.signal(signal.SIGINT)
        assert served.wait(10) == 0
        assert time.monotonic() - t1 < 2.0
    assert "received SIGINT again: stopping now" in served.log


def test_streaming_handler_watching_the_drain_ends_ok() -> None:
    with Served("tests.apps.echo:app", "--drain-delay", "1", "--grace", "5") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stream = echo_pb2_grpc.EchoStub(channel).ServerStream(
                echo_pb2.EchoRequest(text="until-drain", count=10_000, sleep=0.05), timeout=30
            )
            received = []
            for reply in stream:
                received.append(reply.index)
                if len(received) == 5:
                    served.signal(signal.SIGTERM)
            assert stream.code() == grpc.StatusCode.OK
        assert served.wait(15) == 0
    # Every message the handler sent arrived, in order, and it stopped early.
    assert received == list(range(len(received)))
    assert 5 <= len(received) < 10_000


async def test_drain_from_code_runs_without_signals() -> None:
    async with testing.running(echo.app, drain_delay=0.3, grace=2) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        slow = stub.Unary(echo_pb2.EchoRequest(text="slow", sleep=0.6))
        import asyncio

        task = asyncio.ensure_future(slow)
        await eventually(lambda: server.server.in_flight == 1)  # the call reached its handler
        exit_code = await server.stop()
        assert (await task).text == "slow"
        assert exit_code == 0
        assert echo.app.draining.is_set()


def test_signal_handlers_are_restored_after_serving() -> None:
    import asyncio

    import meshrpc

    def previous(signum: int, frame: object) -> None:  # a handler the embedding program had
        raise AssertionError("must not be called")

    old = {sig: signal.signal(sig, previous) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        app = meshrpc.App("signals", services=[echo.Echo()])
        config = meshrpc.Config(host="127.0.0.1", port=0, mesh="none", drain_delay=0)

        async def serve_then_stop() -> int:
            serving = asyncio.ensure_future(app.serve(config, install_signal_handlers=True))
            await eventually(lambda: app.server is not None and app.server.running)
            assert signal.getsignal(signal.SIGTERM) is not previous  # meshrpc's own while serving
            signal.raise_signal(signal.SIGTERM)  # a real signal to this process: drains, exit 0
            return await asyncio.wait_for(serving, 10)

        assert asyncio.run(serve_then_stop()) == 0
        assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is previous
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
