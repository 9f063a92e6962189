"""gRPC health: readiness ("" and every service), liveness, and readiness checks.

Readiness and liveness never share a name: a draining pod reports NOT_SERVING
for readiness (so traffic moves away) while its liveness name stays SERVING
(so Kubernetes does not kill it mid-drain).
"""

from __future__ import annotations

import asyncio
import logging
import time
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
        self._published: tuple[bool, str] | None = None

    @property
    def ready(self) -> bool:
        return self.started and self.proxy_ready and self.checks_ok and not self.draining

    async def publish(self) -> None:
        """Set every readiness name to what `ready` says, liveness to SERVING."""
        await self.servicer.set(self._liveness, SERVING)
        ready = self.ready
        published = (ready, "" if ready else self._why_not())
        if published == self._published:
            return
        changed = self._published is None or self._published[0] != ready
        self._published = published
        if changed:
            status = SERVING if ready else NOT_SERVING
            for name in self._readiness_names:
                await self.servicer.set(name, status)
        logger.info("readiness %s", "SERVING" if ready else f"NOT_SERVING ({published[1]})")

    def _why_not(self) -> str:
        if self.draining:
            return "draining"
        if not self.proxy_ready:
            return "waiting for the sidecar"
        if not self.started:
            return "starting up"
        return "a readiness check fails"

    async def update(self, **changes: bool) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        await self.publish()


CANCEL_WAIT = 1.0  # seconds a cancelled check gets to finish its cleanup
REMIND_EVERY = 60.0  # seconds between "still failing" lines for a check that keeps failing


class CheckLog:
    """Logs readiness checks by change, not by poll: a database down for an hour is one
    traceback, a line each time the reason changes, and a reminder every minute."""

    def __init__(self, remind_every: float = REMIND_EVERY) -> None:
        self.remind_every = remind_every
        self._failing: dict[str, tuple[str, float, float]] = {}  # name -> (reason, since, last logged)
        self.stuck: dict[str, asyncio.Future[Any]] = {}  # timed-out runs, cancelled but maybe still running

    def failed(self, name: str, reason: str, exc: BaseException | None = None) -> None:
        now = time.monotonic()
        previous = self._failing.get(name)
        if previous is None:
            logger.warning("readiness check %s fails: %s", name, reason, exc_info=exc)
            self._failing[name] = (reason, now, now)
        elif previous[0] != reason:
            logger.warning("readiness check %s still fails, now: %s", name, reason)
            self._failing[name] = (reason, previous[1], now)
        elif now - previous[2] >= self.remind_every:
            logger.warning("readiness check %s has been failing for %.0fs: %s", name, now - previous[1], reason)
            self._failing[name] = (reason, previous[1], now)

    def passed(self, name: str) -> None:
        previous = self._failing.pop(name, None)
        if previous is not None:
            logger.info("readiness check %s passes again after %.0fs", name, time.monotonic() - previous[1])


class _Escaped(Exception):
    """A check raised SystemExit or KeyboardInterrupt: a failing check, not the process's end."""


async def _guarded(check: ReadinessCheck) -> Any:
    # asyncio re-raises a task's SystemExit and KeyboardInterrupt out of the event loop,
    # ending the process with nothing logged; a check that raises one only fails.
    try:
        return await check()
    except (SystemExit, KeyboardInterrupt) as exc:
        raise _Escaped() from exc


async def _run_check(name: str, check: ReadinessCheck, timeout: float, log: CheckLog) -> bool:
    stuck = log.stuck.get(name)
    if stuck is not None and not stuck.done():
        log.failed(name, "its run that timed out has still not finished (it ignores cancellation)")
        return False
    # Not wait_for: it waits for the cancelled check to end, for ever when the check
    # swallows the cancellation.  The timeout holds whether the check cooperates or not.
    task = asyncio.ensure_future(_guarded(check))
    try:
        await asyncio.wait((task,), timeout=timeout)
    except asyncio.CancelledError:  # the server is stopping: the check stops with it, given a moment
        task.cancel()
        task.add_done_callback(consume_outcome)
        await asyncio.wait((task,), timeout=CANCEL_WAIT)
        raise
    if not task.done():
        task.cancel()
        log.stuck[name] = task
        task.add_done_callback(consume_outcome)  # its late outcome was already counted as a failure
        log.failed(name, f"timed out after {timeout:g}s")
        return False
    try:
        result = task.result()
    except asyncio.CancelledError:
        log.failed(name, "was cancelled")
        return False
    except Exception as exc:
        raised = exc.__cause__ if isinstance(exc, _Escaped) and exc.__cause__ is not None else exc
        log.failed(name, f"raised {type(raised).__name__}: {raised}", raised)
        return False
    if result is False:
        log.failed(name, "returned False")
        return False
    log.passed(name)
    return True


async def run_checks(health: Health, checks: dict[str, ReadinessCheck], timeout: float, log: CheckLog) -> None:
    """Run every readiness check once, concurrently, and publish the outcome."""
    results = await asyncio.gather(*(_run_check(n, c, timeout, log) for n, c in checks.items()))
    await health.update(checks_ok=all(results))


async def poll_checks(
    health: Health, checks: dict[str, ReadinessCheck], interval: float, timeout: float, log: CheckLog
) -> None:
    """Run the readiness checks every ``interval`` until cancelled."""
    while True:
        await asyncio.sleep(interval)
        await run_checks(health, checks, timeout, log)


def consume_outcome(future: asyncio.Future[Any]) -> None:
    """A done-callback that retrieves a future's exception, so asyncio does not warn that
    nobody did, for futures whose outcome is read elsewhere or no longer matters."""
    if not future.cancelled():
        future.exception()
