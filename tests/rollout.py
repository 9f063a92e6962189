"""A rolling update through a real Envoy that health-checks meshrpc replicas.

Two old replicas are replaced by two new ones, one at a time, as a Deployment's
rollout does, while callers hammer the proxy.  Used by tests/test_rollout.py and by
``python tools/figures.py rollout``, which draws what it recorded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import signal
import time
from pathlib import Path

import grpc

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.envoy import Envoy, grpc_proxy_config
from tests.helpers import Served, free_port

CALLERS = 8


class Load:
    """Callers that call through the proxy until stopped, counting every status and replica.

    Every call's end is kept as an event (seconds since the load started, replica, status)
    for the rollout figure.
    """

    def __init__(self, target: str) -> None:
        self.statuses: collections.Counter[str] = collections.Counter()
        self.servers: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []
        self.events: list[tuple[float, str, str]] = []
        self.started = time.monotonic()
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
                self.events.append((time.monotonic() - self.started, "", exc.code().name))
            else:
                self.statuses["OK"] += 1
                self.servers[reply.server] += 1
                self.events.append((time.monotonic() - self.started, reply.server, "OK"))

    def start(self) -> None:
        self.started = time.monotonic()
        self._tasks = [asyncio.ensure_future(self._caller()) for _ in range(CALLERS)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()


async def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@dataclasses.dataclass
class Rollout:
    """What a rolling update did: the load, the calls per replica, how the old ones exited, when."""

    load: Load
    per_replica: dict[str, int]
    exit_codes: list[int]
    drain_delay: float
    grace: float
    # Seconds since the load started at which each old replica got SIGTERM, and its label.
    sigterms: list[tuple[float, str]]
    # Each replica's label ("old a", "new a", ...) by the server id its replies carry.
    labels: dict[str, str]


async def rolling_update(workdir: Path, drain_delay: float, grace: float = 5.0) -> Rollout:
    ports = [free_port() for _ in range(4)]
    old_a, old_b, new_a, new_b = ports
    listen, admin = free_port(), free_port()
    args = ("--drain-delay", str(drain_delay), "--grace", str(grace))
    names = {old_a: "old a", old_b: "old b", new_a: "new a", new_b: "new b"}
    sigterms: list[tuple[float, str]] = []
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
            sigterms.append((time.monotonic() - load.started, names[old]))
            exit_codes.append(await asyncio.to_thread(replicas[old].wait, 30))
        await asyncio.sleep(1.0)
        await load.stop()
        pids = {f"pid-{served.proc.pid}": port for port, served in replicas.items()}
        per_replica = {str(pids.get(server, server)): n for server, n in load.servers.items()}
        labels = {server: names[port] for server, port in pids.items()}
        return Rollout(load, per_replica, exit_codes, drain_delay, grace, sigterms, labels)
    finally:
        for served in replicas.values():
            served.close()
        envoy.close()
