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
import concurrent.futures
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager
from types import FrameType
from typing import TYPE_CHECKING, Any

import grpc

from . import _mesh, _metrics
from ._bind import check_bindable
from ._config import Config, env_name
from ._dispatch import MethodTable
from ._errors import AppError, BindError, ConfigError
from ._handlers import InFlight, method_handler
from ._health import HEALTH_SERVICE, CheckLog, Health, consume_outcome, poll_checks, run_checks
from ._interceptors import server_interceptors
from ._otel_setup import configure_sdk
from ._otel_setup import flush as flush_telemetry
from ._reflection import add_reflection
from ._runner import exit_by, hard_exit, owns_process
from ._service import describe
from ._sync import is_sync
from ._telemetry import Observe, Telemetry, observer, sdk_configured

if TYPE_CHECKING:
    from ._app import App

logger = logging.getLogger("meshrpc.server")
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
FORCE_EXIT_AFTER = 1.0  # seconds from a second signal to the process's exit, whatever still runs


class Server:
    """Serves one App once.  Create a new one to serve again."""

    def __init__(self, app: App, config: Config) -> None:
        self.app = app
        self.config = config
        self.port: int | None = None
        self.mesh: _mesh.MeshInfo | None = None
        self.health: Health | None = None
        self.exit_code = 0
        self._grpc: grpc.aio.Server | None = None
        self._stop_requested = asyncio.Event()
        self._force = asyncio.Event()
        self._started = asyncio.Event()
        self._sidecar: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._otel_shutdown: Callable[[], None] | None = None
        self._inflight = InFlight(config.max_concurrent_rpcs)
        self._owns_process = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._metrics_endpoint: _metrics.MetricsEndpoint | None = None
        self.phase = "starting"

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
        return self._inflight.count

    # -- control -------------------------------------------------------------

    def request_stop(self, *, force: bool = False) -> None:
        """Begin the drain; when already draining (or ``force``), skip what is left of it."""
        if self._stop_requested.is_set() or force:
            self._force.set()
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
        elif signum == signal.SIGINT:
            logger.info("received SIGINT: draining (Ctrl-C again to stop now)")
        else:
            logger.info("received %s: draining", name)
        self.request_stop()

    # -- the three phases ----------------------------------------------------

    async def serve(self, *, install_signal_handlers: bool = False) -> int:
        """Start, serve until asked to stop, drain; return the exit code."""
        self.app._draining = asyncio.Event()
        self._owns_process = owns_process()
        with self._signal_handlers() if install_signal_handlers else contextlib.nullcontext():
            try:
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
                if self._metrics_endpoint is not None:  # scraped through the drain, until the end
                    self._metrics_endpoint.close()
        if not self._owns_process:  # else the runner says it, once it knows what is left running
            logger.info("shutdown complete, exit code %d", self.exit_code)
        return self.exit_code

    async def _startup_unless_stopped(self) -> bool:
        startup = asyncio.ensure_future(self._startup())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        try:
            await asyncio.wait((startup, stop), return_when=asyncio.FIRST_COMPLETED)
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
        self.mesh = await _mesh.detect(config)
        logger.info("mesh mode %s (%s)", self.mesh.mode, self.mesh.reason)
        _mesh.set_current(self.mesh)  # outbound channels made in this process follow it
        if self.mesh.mode == _mesh.SIDECAR:
            self._sidecar = self._task(_mesh.wait_for_sidecar(config.sidecar_ready_url, config.sidecar_ready_timeout))
            self._sidecar.add_done_callback(consume_outcome)  # its error is raised where it is awaited

        if config.port != 0:
            check_bindable(config.host, config.port, reuse_port=config.reuse_port)
        # max_concurrent_rpcs is enforced by meshrpc's handlers on the app's own services
        # (InFlight), so health and reflection always answer.
        credentials = _tls_credentials(config)  # before the server: a bad file leaves nothing half-made
        server = grpc.aio.server(
            options=self._options(),
            interceptors=server_interceptors(app.interceptors, builtins=app.intercept_builtins),
        )
        self._grpc = server
        try:
            if credentials is None:
                self.port = server.add_insecure_port(config.address)
            else:
                self.port = server.add_secure_port(config.address, credentials)
        except RuntimeError:  # lost a race with another process since the check
            raise BindError(f"cannot listen on {config.address}: the address is in use or not available") from None

        await self._setup_telemetry()

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
        names = self._add_handlers(server, health)
        self._unless_stopped()
        await server.start()
        tls = " (mutual TLS)" if config.tls_client_ca_file else " (TLS)" if config.tls_cert_file else ""
        logger.info("serving app %s on %s%s: %s", app.name, self.display_address, tls, ", ".join(names))
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

    async def _setup_telemetry(self) -> None:
        """The OpenTelemetry SDK (otel_sdk) and /metrics (metrics_port), before any handler is built."""
        config, app = self.config, self.app
        reader = _metrics.prometheus_reader() if config.metrics_port is not None else None
        if config.otel_sdk:
            # OTEL_* are the SDK's own standard variables; the SDK reads some of them itself.
            self._otel_shutdown = configure_sdk(app.name, os.environ, [reader] if reader is not None else [])
        elif reader is not None:
            if sdk_configured()[1]:
                logger.warning(
                    "metrics_port: a MeterProvider is installed already and meshrpc cannot add a reader to it; "
                    "/metrics shows the process metrics, and the RPC metrics only if that provider has a "
                    "PrometheusMetricReader"
                )
            else:
                self._otel_shutdown = _metrics.install_meter_provider(app.name, reader)
        if config.metrics_port is not None:
            host = config.host.strip("[]")
            self._metrics_endpoint = _metrics.MetricsEndpoint(host, config.metrics_port)
            await self._metrics_endpoint.start()
            shown = "127.0.0.1" if host in ("::", "0.0.0.0") else config.host
            logger.info("metrics on http://%s:%d/metrics", shown, self._metrics_endpoint.port)

    def _task(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    async def _cleanup(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._grpc is not None:
            await self._grpc.stop(0)  # no-op after a completed drain
        if self._pool is not None:
            # Handlers still running past the grace were cancelled; their threads are
            # not waited for here (the runner gives them a bounded moment at exit).
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            self.phase = "lifespan shutdown"
            await self._shutdown_lifespan(lifespan)
        if self._force.is_set():
            return  # stop now: no telemetry flush that may wait on an exporter
        if self._otel_shutdown is not None:
            self._otel_shutdown()  # meshrpc's own providers: shutting down flushes them
            self._otel_shutdown = None
        else:
            flush_telemetry()  # the user's providers: flush, and leave them to their owner

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

    def _options(self) -> list[tuple[str, Any]]:
        config = self.config
        options: list[tuple[str, Any]] = [
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ("grpc.max_receive_message_length", config.max_receive_message_size),
            ("grpc.max_send_message_length", config.max_send_message_size),
            # Envoy and grpc-go clients ping every few minutes at most; allow that
            # without answering with too_many_pings (GOAWAY ENHANCE_YOUR_CALM).
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        assert self.mesh is not None
        age = _mesh.connection_age(config, self.mesh.mode)
        if age is not None:
            options.append(("grpc.max_connection_age_ms", int(age * 1000)))
            options.append(
                (
                    "grpc.max_connection_age_grace_ms",
                    int(config.max_connection_age_grace * 1000),
                )
            )
        return options

    def _observer(self) -> Observe | None:
        config = self.config
        tracing, metering = sdk_configured() if config.telemetry else (False, False)
        telemetry = Telemetry(
            tracing=tracing,
            metrics=metering,
            access_log=config.access_log,
            access_log_sample_rate=config.access_log_sample_rate,
            server_address=config.host.strip("[]"),
            server_port=self.port or config.port,
        )
        logger.debug("telemetry: tracing %s, metrics %s, access log %s", tracing, metering, config.access_log)
        if not telemetry.enabled:
            return None  # nothing observes the RPCs: no cost at all
        return observer(telemetry)

    def _add_handlers(self, server: grpc.aio.Server, health: Health) -> list[str]:
        observe = self._observer()
        middleware, pool = self.app.middleware, self._thread_pool()
        intercepted = bool(self.app.interceptors)
        table = MethodTable()
        for service in self.app.services:
            handlers = {
                m.name: method_handler(
                    m, self._inflight, observe=observe, middleware=middleware, pool=pool, intercepted=intercepted
                )
                for m in service.methods
            }
            table.add(service.name, handlers)
        # Health and reflection get the same malformed-body and error mapping, but no
        # middleware and no concurrency limit: probes must always be answered.
        for service in describe(health.servicer):
            table.add(service.name, {m.name: method_handler(m, intercepted=intercepted) for m in service.methods})
        names = [*(s.name for s in self.app.services), HEALTH_SERVICE]
        if self.config.reflection:
            names = list(add_reflection(table, names, intercepted=intercepted))
        server.add_generic_rpc_handlers((table,))
        return names

    def _thread_pool(self) -> concurrent.futures.ThreadPoolExecutor | None:
        """The pool for 'def' handlers; made only when the app has some."""
        sync = [m.path for s in self.app.services for m in s.methods if m.impl is not None and is_sync(m.impl)]
        if not sync:
            return None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.config.thread_pool_size, thread_name_prefix="meshrpc-handler"
        )
        logger.debug("%d 'def' handlers run in %d threads", len(sync), self.config.thread_pool_size)
        return self._pool

    async def _drain(self) -> None:
        assert self._grpc is not None and self.health is not None
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
        self.app._draining.set()
        await self.health.update(draining=True)
        logger.info(
            "drain t0: readiness NOT_SERVING, liveness SERVING; %d RPCs in flight; serving new RPCs for %.1fs (drain delay)",
            self.in_flight,
            config.drain_delay,
        )
        if config.drain_delay > 0 and not self._force.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._force.wait(), config.drain_delay)
        grace = 0.0 if self._force.is_set() else config.grace
        logger.info(
            "drain %s: no new RPCs (GOAWAY); %d RPCs in flight get %.1fs (grace)",
            since(),
            self.in_flight,
            grace,
        )
        self.health.servicer.end_watches()
        self.phase = "draining (grace)"
        self._inflight.cancelled = 0
        # What is in flight when the grace ends is what gets cancelled, whether or not a
        # handler lets the cancellation through (one that swallows it is still cut off).
        left = self.in_flight
        stopping = asyncio.ensure_future(self._grpc.stop(grace))
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
                await self._grpc.stop(0)
        await stopping
        cancelled = max(left, self._inflight.cancelled)
        logger.log(
            logging.WARNING if cancelled else logging.INFO,
            "drain %s: server stopped, %d RPCs cancelled; running lifespan shutdown",
            since(),
            cancelled,
        )


def _tls_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The server's TLS credentials from the PEM files the config names, or None for plaintext."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None

    def read(setting: str, path: str) -> bytes:
        try:
            with open(path, "rb") as file:
                return file.read()
        except OSError as exc:
            where = f"{setting} ({env_name(setting)} / --{setting.replace('_', '-')})"
            raise ConfigError(f"invalid setting {where}: cannot read {path}: {exc.strerror}") from None

    cert = read("tls_cert_file", config.tls_cert_file)
    pair = (read("tls_key_file", config.tls_key_file), cert)
    ca = read("tls_client_ca_file", config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def _watchdog(after: float, reason: str, abandoned: Callable[[], str]) -> None:
    """End the process ``after`` seconds from now unless it has ended by then."""

    def expire() -> None:
        logger.error("exiting now, %.1fs after %s: abandoned %s", after, reason, abandoned())
        hard_exit(1)

    exit_by(time.monotonic() + after)  # the runner's own last waits fit before it
    timer = threading.Timer(after, expire)
    timer.daemon = True
    timer.start()
