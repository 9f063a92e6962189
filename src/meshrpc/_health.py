"""gRPC health: readiness ("" and every service), liveness, and readiness checks.

Readiness and liveness never share a name: a draining pod reports NOT_SERVING
for readiness (so traffic moves away) while its liveness name stays SERVING
(so Kubernetes does not kill it mid-drain).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

logger = logging.getLogger("meshrpc.health")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
HEALTH_SERVICE = "grpc.health.v1.Health"
ReadinessCheck = Callable[[], Awaitable[Any]]


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer, with List, and Watch streams that end at stop.

    A Watch stream otherwise stays open until the grace period runs out and holds
    the server's stop open with it (the bug grpc-go and grpc-dotnet also had).
    """

    def __init__(self) -> None:
        super().__init__()
        self._stopped = asyncio.Event()
        self._statuses: dict[str, health_pb2.HealthCheckResponse.ServingStatus.ValueType] = {}

    async def set(
        self,
        service: str,
        status: health_pb2.HealthCheckResponse.ServingStatus.ValueType,
    ) -> None:
        self._statuses[service] = status
        await super().set(service, status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        if self._stopped.is_set():
            return
        watch = asyncio.ensure_future(super().Watch(request, context))
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait((watch, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (watch, stopped):
                task.cancel()
        if watch.done() and not watch.cancelled():
            watch.result()  # re-raise what the stream ended with

    async def List(self, request: health_pb2.HealthListRequest, context: Any) -> health_pb2.HealthListResponse:
        response = health_pb2.HealthListResponse()
        for name, status in sorted(self._statuses.items()):
            response.statuses[name].status = status
        return response

    def end_watches(self) -> None:
        """End every Watch stream (with OK) and refuse new ones: the server is stopping."""
        self._stopped.set()


class Health:
    """Decides readiness from its inputs and publishes it on the health service.

    Readiness is SERVING only when the app has started, the mesh's proxy is ready,
    every readiness check passes and the server is not draining.
    """

    def __init__(self, services: Iterable[str], liveness: str) -> None:
        self.servicer = HealthServicer()
        self._readiness_names = ("", *services)
        self._liveness = liveness
        self.started = False
        self.proxy_ready = True
        self.checks_ok = True
        self.draining = False
        self._published: bool | None = None

    @property
    def ready(self) -> bool:
        return self.started and self.proxy_ready and self.checks_ok and not self.draining

    async def publish(self) -> None:
        """Set every readiness name to what :attr:`ready` says, liveness to SERVING."""
        await self.servicer.set(self._liveness, SERVING)
        ready = self.ready
        if ready == self._published:
            return
        self._published = ready
        status = SERVING if ready else NOT_SERVING
        for name in self._readiness_names:
            await self.servicer.set(name, status)
        logger.info("readiness %s", "SERVING" if ready else "NOT_SERVING")

    async def update(self, **changes: bool) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        await self.publish()


async def _run_check(name: str, check: ReadinessCheck, timeout: float) -> bool:
    try:
        result = await asyncio.wait_for(check(), timeout)
    except TimeoutError:
        logger.warning("readiness check %s timed out after %.1fs", name, timeout)
        return False
    except Exception:
        logger.exception("readiness check %s raised", name)
        return False
    if result is False:
        logger.warning("readiness check %s failed", name)
        return False
    return True


async def run_checks(health: Health, checks: dict[str, ReadinessCheck], timeout: float) -> None:
    """Run every readiness check once, concurrently, and publish the outcome."""
    results = await asyncio.gather(*(_run_check(n, c, timeout) for n, c in checks.items()))
    ok = all(results)
    if ok != health.checks_ok:
        logger.info("readiness checks %s", "pass" if ok else "fail")
    await health.update(checks_ok=ok)


async def poll_checks(health: Health, checks: dict[str, ReadinessCheck], interval: float, timeout: float) -> None:
    """Run the readiness checks every ``interval`` until cancelled."""
    while True:
        await asyncio.sleep(interval)
        await run_checks(health, checks, timeout)
