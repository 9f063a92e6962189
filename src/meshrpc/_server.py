"""The server's lifecycle: startup, serving, and the drain that loses no request.

    start    detect mesh -> bind -> lifespan startup -> start serving (readiness
             NOT_SERVING) -> wait for the sidecar -> readiness SERVING
    stop     t0: readiness NOT_SERVING, drain event set, liveness stays SERVING
             t0..t0+D: keep serving new RPCs while endpoints and proxies catch up
             t0+D: stop accepting (GOAWAY); in-flight RPCs get up to G
             t0+D+G: cancel what is left; lifespan shutdown; shutdown hooks
    a second stop request skips what is left of D and G.

Signal handlers only set flags (and wake the loop); all work happens here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import _assembly, _mesh
from ._assembly import Assembly
from ._config import Config
from ._errors import AppError
from ._health import CheckLog, Health, consume_outcome, poll_checks, run_checks
from ._otel_setup import flush as flush_telemetry
from ._runner import exit_by, hard_exit, owns_process
from ._sampling import serving_context

if TYPE_CHECKING:
    from ._app import App

logger = logging.getLogger("meshrpc.server")
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_EXIT_AFTER = 1.0  # seconds from a second signal to the process's exit, whatever still runs
TASK_EXIT_WAIT = 1.0  # seconds the server's own tasks (checks, sidecar wait) get to end once cancelled


class Server:
    """Serves one App once.  Create a new one to serve again."""

    def __init__(self, app: App, config: Config) -> None:
        self.app = app
        self.config = config
        self.port: int | None = None
        self.mesh: _mesh.MeshInfo | None = None
        self.health: Health | None = None
        self.exit_code = 0
        # Set when the drain begins: handlers watch it (app.draining, self.draining in a Service).
        self.draining = asyncio.Event()
        self._assembly: Assembly | None = None
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._started = asyncio.Event()
        self._sidecar: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._owns_process = False
        self.phase = "starting"
        self._skip_delay = False
        self._interactive = False
        self._mesh_token: contextvars.Token[_mesh.MeshInfo | None] | None = None

    @property
    def display_address(self) -> str:
        """An address a user can paste into a client (the wildcard hosts become 127.0.0.1)."""
        host = self.config.host
        if host in ("[::]", "0.0.0.0", "::"):
            return f"127.0.0.1:{self.port} (listening on {host}:{self.port}, every address)"
        return f"{host}:{self.port}"

    @property
    def abandoned(self) -> str:
        """What a forced exit leaves unfinished, for its log line."""
        return f"{self.phase}, {self.in_flight} RPCs in flight"

    @property
    def in_flight(self) -> int:
        """RPCs of the app's own services being served now."""
        return self._assembly.inflight.count if self._assembly is not None else 0

    @property
    def assembly(self) -> Assembly | None:
        """What the server is built from (its grpc server, port, pool, telemetry), once bound."""
        return self._assembly

    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._started.is_set() and self.phase != "stopped"

    # -- control -------------------------------------------------------------

    def request_stop(self, *, force: bool = False, skip_delay: bool = False) -> None:
        """Begin the drain; when already draining (or ``force``), skip what is left of it.

        ``skip_delay``: no drain delay (nothing routes to a developer's terminal), but
        in-flight RPCs still get the grace.
        """
        if self._stop_requested.is_set() or force:
            self._force.set()
        if skip_delay:
            self._skip_delay = True
        self._stop_requested.set()

    async def wait_started(self) -> None:
        await self._started.wait()

    async def proxy_ready(self) -> None:
        if self._sidecar is not None:
            await asyncio.shield(self._sidecar)

    @contextlib.contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        loop = asyncio.get_running_loop()
        received = 0
        # Ctrl-C at a terminal is a developer stopping their server: the drain delay, which
        # waits for endpoints and proxies during a rolling update, protects nothing there.
        self._interactive = sys.stdin is not None and sys.stdin.isatty()

        def handle(signum: int, frame: FrameType | None) -> None:
            nonlocal received
            received += 1
            if received == 2 and self._owns_process:  # past FORCE_EXIT_AFTER nothing may hold the exit
                _watchdog(FORCE_EXIT_AFTER, "a second signal", lambda: self.abandoned)
            loop.call_soon_threadsafe(self._on_signal, signum)

        previous: dict[int, Any] = {}
        for sig in HANDLED_SIGNALS:
            previous[sig] = signal.signal(sig, handle)
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop_requested.is_set():
            logger.warning("received %s again: stopping now, skipping the rest of the drain", name)
        elif signum == signal.SIGINT and self._interactive and self.config.drain_delay > 0:
            logger.info(
                "received SIGINT at a terminal: stopping without the %.1fs drain delay, which is for rolling "
                "updates (SIGTERM keeps it); in-flight RPCs still get the grace (Ctrl-C again to stop now)",
                self.config.drain_delay,
            )
            self.request_stop(skip_delay=True)
            return
        elif signum == signal.SIGINT:
            logger.info("received SIGINT: draining (Ctrl-C again to stop now)")
        else:
            logger.info("received %s: draining", name)
        self.request_stop()

    # -- the three phases ----------------------------------------------------

    async def serve(self, *, install_signal_handlers: bool = False) -> int:
        """Start, serve until asked to stop, drain; return the exit code."""
        self._owns_process = owns_process()
        with self._signal_handlers() if install_signal_handlers else contextlib.nullcontext():
            try:
                self.mesh = await _mesh.detect(self.config)  # bounded: a file read and one short probe
                logger.info("mesh mode %s (%s)", self.mesh.mode, self.mesh.reason)
                # Set in this task, before startup's, so everything the app runs inherits it.
                self._mesh_token = _mesh.set_current(self.mesh)
                if not await self._startup_unless_stopped():
                    return self.exit_code
                if install_signal_handlers:
                    # meshrpc owns the process: what startup built lives as long as it does,
                    # so keep it out of the garbage collector's scans (gc.freeze). Not done
                    # when embedded (tests), where it would make earlier garbage immortal.
                    gc.freeze()
                self._started.set()
                await self._stop_requested.wait()
                await self._drain()
            finally:
                await self._cleanup()
                if self._assembly is not None and self._assembly.metrics_endpoint is not None:
                    self._assembly.metrics_endpoint.close()  # scraped through the drain, until the end
                self.phase = "stopped"
                _mesh.reset_current(self._mesh_token)
        if not self._owns_process:  # else the runner says it, once it knows what is left running
            logger.info("shutdown complete, exit code %d", self.exit_code)
        return self.exit_code

    async def _startup_unless_stopped(self) -> bool:
        startup = asyncio.ensure_future(self._startup())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait((startup, stop), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            startup.cancel()  # the caller's own cancellation: it propagates, and startup ends with it
            raise
        finally:
            stop.cancel()
        if startup.done() and not startup.cancelled():
            startup.result()
            return True
        logger.info("stop requested during startup: stopping")
        startup.cancel()
        # Not awaited without a bound: a lifespan that swallows its cancellation would keep
        # the process past every documented limit.  _startup itself checks for the stop
        # after each step it awaits, so such a startup never reaches SERVING.
        await asyncio.wait((startup,), timeout=self.config.shutdown_timeout)
        if not startup.done():
            startup.add_done_callback(consume_outcome)
            logger.error(
                "startup of app %s ignored its cancellation for %gs: abandoned",
                self.app.name,
                self.config.shutdown_timeout,
            )
            self.exit_code = 1
        elif not startup.cancelled() and startup.exception() is not None:
            logger.error("startup of app %s failed while stopping", self.app.name, exc_info=startup.exception())
            self.exit_code = 1
        return False

    def _unless_stopped(self) -> None:
        """A stop requested during startup ends it here, whatever the awaited step did with its cancellation."""
        if self._stop_requested.is_set():
            raise asyncio.CancelledError

    async def _startup(self) -> None:
        config, app = self.config, self.app
        assert self.mesh is not None
        if self.mesh.mode == _mesh.SIDECAR:
            self._sidecar = self._task(_mesh.wait_for_sidecar(config.sidecar_ready_url, config.sidecar_ready_timeout))
            self._sidecar.add_done_callback(consume_outcome)  # its error is raised where it is awaited

        self._assembly = assembly = await _assembly.bind(app, config, self.mesh)
        self.port = assembly.port

        if app.lifespan is not None:
            lifespan = app.lifespan(app)
            try:
                await lifespan.__aenter__()
            except Exception as exc:
                logger.error("lifespan startup of app %s failed", app.name, exc_info=exc)
                raise AppError(f"lifespan startup of app {app.name!r} failed: {exc!r}") from exc
            self._lifespan = lifespan
            self._unless_stopped()

        self.health = health = Health([s.name for s in app.services], config.liveness_service)
        health.proxy_ready = self._sidecar is None
        await health.publish()  # NOT_SERVING until started: the library's default is SERVING
        _assembly.register(assembly, app, config, health)
        self._unless_stopped()
        # grpc.aio copies the context its server starts in to every RPC's task.
        with serving_context() if assembly.stand_in else contextlib.nullcontext():
            await assembly.server.start()
        assembly.inflight.shedder.start()
        tls = " (mutual TLS)" if config.tls_client_ca_file else " (TLS)" if config.tls_cert_file else ""
        logger.info("serving app %s on %s%s: %s", app.name, self.display_address, tls, ", ".join(assembly.names))
        if not app.services:
            logger.warning(
                "app %s registers no services: it serves health and reflection only; "
                "pass your servicers, e.g. meshrpc.App(%r, services=[Greeter()])",
                app.name,
                app.name,
            )
        if config.host in ("127.0.0.1", "localhost", "::1", "[::1]"):
            logger.info(
                "listening on this machine only (%s); in a pod, or to be reached from elsewhere: --host [::] "
                "(MESHRPC_HOST; the default inside Kubernetes)",
                config.host,
            )
        if self._sidecar is not None:
            await asyncio.shield(self._sidecar)
            await health.update(proxy_ready=True)
        checks, check_log = app.readiness_checks, CheckLog()
        if checks:  # the first round decides readiness before it is ever SERVING
            await run_checks(health, checks, config.health_check_timeout, check_log)
        self._unless_stopped()
        await health.update(started=True)
        if checks:
            self._task(
                poll_checks(
                    health,
                    checks,
                    config.health_check_interval,
                    config.health_check_timeout,
                    check_log,
                )
            )

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # awaited, but bounded: a task that ignores its cancellation is left behind
            await asyncio.wait(self._tasks, timeout=TASK_EXIT_WAIT)
        assembly = self._assembly
        if assembly is not None:
            await assembly.inflight.shedder.stop()
            await assembly.server.stop(0)  # no-op after a completed drain
            if assembly.pool is not None:
                # Handlers still running past the grace were cancelled; their threads are
                # not waited for here (the runner gives them a bounded moment at exit).
                assembly.pool.shutdown(wait=False, cancel_futures=True)
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            self.phase = "lifespan shutdown"
            await self._shutdown_lifespan(lifespan)
        if self._force.is_set():
            return  # stop now: no telemetry flush that may wait on an exporter
        # An exporter's flush can block on the network: off the event loop, and bounded.
        shutdown = assembly.telemetry_shutdown if assembly is not None else None
        self.phase = "telemetry flush"
        flushing = asyncio.ensure_future(asyncio.to_thread(shutdown if shutdown is not None else flush_telemetry))
        done, _ = await asyncio.wait((flushing,), timeout=self.config.shutdown_timeout)
        if not done:
            logger.warning("telemetry flush did not finish in %gs: abandoned", self.config.shutdown_timeout)
        elif flushing.exception() is not None:
            logger.warning("telemetry flush failed", exc_info=flushing.exception())

    async def _shutdown_lifespan(self, lifespan: AbstractAsyncContextManager[Any]) -> None:
        """Run the lifespan's shutdown, bounded by shutdown_timeout and cut short by a second signal."""
        shutdown = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
        forced = asyncio.ensure_future(self._force.wait())
        await asyncio.wait(
            (shutdown, forced), timeout=self.config.shutdown_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        forced.cancel()
        if not shutdown.done():
            shutdown.cancel()  # not awaited: a shutdown that ignores cancellation must not hold the exit
            why = "a second signal" if self._force.is_set() else f"its {self.config.shutdown_timeout:g}s timeout"
            logger.error(
                "lifespan shutdown of app %s cut short by %s: its remaining work is abandoned", self.app.name, why
            )
            self.exit_code = 1
        elif shutdown.exception() is not None:
            logger.error("lifespan shutdown of app %s failed", self.app.name, exc_info=shutdown.exception())
            self.exit_code = 1

    async def _drain(self) -> None:
        assert self._assembly is not None and self.health is not None
        server, inflight = self._assembly.server, self._assembly.inflight
        config, loop = self.config, asyncio.get_running_loop()
        t0 = loop.time()

        def since() -> str:
            return f"t0+{loop.time() - t0:.2f}s"

        if self._owns_process:  # nothing a handler, check or lifespan does may keep the process past its budget
            # The manifests' terminationGracePeriodSeconds is this budget rounded up plus a
            # second: the process ends, with its log, before the kubelet's SIGKILL.
            budget = config.exit_budget
            _watchdog(budget, f"the drain's budget of {budget:g}s", lambda: self.abandoned)
        self.phase = "draining (drain delay)"
        self.draining.set()
        await self.health.update(draining=True)
        delay = 0.0 if self._skip_delay else config.drain_delay
        logger.info(
            "drain t0: readiness NOT_SERVING, liveness SERVING; %d RPCs in flight; serving new RPCs for %.1fs (drain delay)",
            self.in_flight,
            delay,
        )
        if delay > 0 and not self._force.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._force.wait(), delay)
        grace = 0.0 if self._force.is_set() else config.grace
        logger.info(
            "drain %s: no new RPCs (GOAWAY); %d RPCs in flight get %.1fs (grace)",
            since(),
            self.in_flight,
            grace,
        )
        self.health.servicer.end_watches()
        self.phase = "draining (grace)"
        inflight.cancelled = 0
        # What is in flight when the grace ends is what gets cancelled, whether or not a
        # handler lets the cancellation through (one that swallows it is still cut off).
        left = self.in_flight
        stopping = asyncio.ensure_future(server.stop(grace))
        if grace > 0:
            forced = asyncio.ensure_future(self._force.wait())
            await asyncio.wait((stopping, forced), timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            forced.cancel()
            left = 0 if stopping.done() else self.in_flight
        if not stopping.done() and self._force.is_set():
            logger.warning("drain %s: stopping now, cancelling %d RPCs in flight", since(), self.in_flight)
            if grace > 0:
                # A second stop cuts the first one's grace short.  Never two stops without
                # a grace at once: grpc.aio's second may cancel the calls of a server the
                # first has just destroyed, and the process dies of a segfault.
                await server.stop(0)
        await stopping
        cancelled = max(left, inflight.cancelled)
        logger.log(
            logging.WARNING if cancelled else logging.INFO,
            "drain %s: server stopped, %d RPCs cancelled; running lifespan shutdown",
            since(),
            cancelled,
        )


def _watchdog(after: float, reason: str, abandoned: Callable[[], str]) -> None:
    """End the process ``after`` seconds from now unless it has ended by then."""

    def expire() -> None:
        logger.error("exiting now, %.1fs after %s: abandoned %s", after, reason, abandoned())
        hard_exit(1)

    exit_by(time.monotonic() + after)  # the runner's own last waits fit before it
    timer = threading.Timer(after, expire)
    timer.daemon = True
    timer.start()
