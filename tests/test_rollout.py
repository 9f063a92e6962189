"""A rolling update through a real Envoy that health-checks two meshrpc replicas.

This is the proof of the drain: with a drain delay, replacing both replicas
while 8 callers hammer the proxy ends with zero errors; with no drain delay the
same rollout loses calls, so the test can fail.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.envoy import Envoy, grpc_proxy_config
from tests.helpers import Served, free_port

CALLERS = 8


class Load:
    """Callers that call through the proxy until stopped, counting every status and replica."""

    def __init__(self, target: str) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.servers: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self._stop = asyncio.Event()
        self._channel = grpc.aio.insecure_channel(target)
        self._tasks: list[asyncio.Task[None]] = []

    async def _caller(self) -> None:
        stub = echo_pb2_grpc.EchoStub(self._channel)
        deadline = time.monotonic() + 120  # bounded whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                reply = await stub.Unary(echo_pb2.EchoRequest(text="x", sleep=0.005), timeout=10)
            except grpc.aio.AioRpcError as exc:
                self.statuses[exc.code().name] += 1
                self.errors.append(f"{exc.code().name}: {exc.details()}")
            else:
                self.statuses["OK"] += 1
                self.servers[reply.server] += 1

    def start(self) -> None:
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(CALLERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


async def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def rolling_update(workdir: Path, drain_delay: float) -> tuple[Load, dict[str, int], list[int]]:
    ports = [free_port() for _ in range(4)]
    old_a, old_b, new_a, new_b = ports
    listen, admin = free_port(), free_port()
    args = ("--drain-delay", str(drain_delay), "--grace", "5")
    replicas: dict[int, Served] = {}
    envoy = Envoy(grpc_proxy_config(listen, admin, ports), workdir, admin)
    load = Load(f"127.0.0.1:{listen}")
    exit_codes = []
    try:
        for port in (old_a, old_b):
            replicas[port] = Served("tests.apps.echo:app", *args, port=port)
        for served in replicas.values():
            served.wait_serving()
        envoy.wait_ready()
        await wait_for(lambda: envoy.healthy_ports() == {old_a, old_b}, 10, "envoy to see both replicas")

        load.start()
        await asyncio.sleep(1.0)
        for old, new in ((old_a, new_a), (old_b, new_b)):
            # The Deployment's rollout: start the new pod, wait until it is ready, stop an old one.
            replicas[new] = Served("tests.apps.echo:app", *args, port=new)
            await asyncio.to_thread(replicas[new].wait_serving)
            await wait_for(lambda new=new: new in envoy.healthy_ports(), 10, f"envoy to see {new}")  # type: ignore[misc]
            await asyncio.sleep(0.5)
            replicas[old].signal(signal.SIGTERM)
            exit_codes.append(await asyncio.to_thread(replicas[old].wait, 30))
        await asyncio.sleep(1.0)
        await load.stop()
        pids = {f"pid-{served.proc.pid}": port for port, served in replicas.items()}
        per_replica = {str(pids.get(server, server)): n for server, n in load.servers.items()}
        return load, per_replica, exit_codes
    finally:
        for served in replicas.values():
            served.close()
        envoy.close()


async def test_rolling_update_through_envoy_loses_nothing(workdir: Path) -> None:
    load, per_replica, exit_codes = await rolling_update(workdir, drain_delay=1.5)
    print(f"rolling update with drain: statuses {dict(load.statuses)}, calls per replica {per_replica}")
    assert exit_codes == [0, 0]
    assert load.statuses["OK"] > 500
    assert set(load.statuses) == {"OK"}, f"errors during the rollout: {collections.Counter(load.errors)}"
    assert len(per_replica) == 4 and all(n > 0 for n in per_replica.values()), per_replica


async def test_rolling_update_without_drain_delay_loses_calls(workdir: Path) -> None:
    load, per_replica, _ = await rolling_update(workdir, drain_delay=0.0)
    print(f"rolling update without drain delay: statuses {dict(load.statuses)}, calls per replica {per_replica}")
    failed = sum(n for status, n in load.statuses.items() if status != "OK")
    assert failed > 0, "stopping at once should have lost calls that Envoy still routed to the old replica"
    assert load.statuses["UNAVAILABLE"] > 0
