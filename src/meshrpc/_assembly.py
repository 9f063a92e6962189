"""The server's assembly: the grpc server and everything an RPC passes through, built once.

    bind       credentials, grpc options, interceptors, the listening port; the
               OpenTelemetry SDK and /metrics (before any handler is built)
    register   health, the thread pool for 'def' handlers, and one table of every
               method: the app's (middleware, telemetry, limits) beside health and
               reflection (neither behind the app's middleware or limits)

:mod:`._server` runs the lifecycle around these; nothing here waits on the network
but the bind itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from . import _mesh, _metrics
from ._aggregates import Aggregates
from ._bind import check_bindable
from ._config import Config, env_name
from ._dispatch import MethodTable
from ._errors import BindError, ConfigError
from ._handlers import InFlight, method_handler
from ._health import HEALTH_SERVICE, Health
from ._interceptors import server_interceptors
from ._otel_setup import configure_sdk
from ._overload import LoadShedder
from ._reflection import add_reflection
from ._service import describe
from ._sync import is_sync
from ._telemetry import Observe, Telemetry, drops_spans, observer, sdk_configured

if TYPE_CHECKING:
    from ._app import App

logger = logging.getLogger("meshrpc.server")


@dataclasses.dataclass
class Assembly:
    """What one serving of an app is made of; the lifecycle owns and stops it."""

    server: grpc.aio.Server
    port: int
    inflight: InFlight
    metrics_endpoint: _metrics.MetricsEndpoint | None = None
    # Shuts down the MeterProvider/TracerProvider meshrpc installed (None: the user's, flushed instead).
    telemetry_shutdown: Callable[[], None] | None = None
    pool: concurrent.futures.ThreadPoolExecutor | None = None
    names: tuple[str, ...] = ()
    observed: bool = False  # whether telemetry observes the RPCs (no SDK and no access log: not at all)
    # Whether the server starts in a context whose current span stands in for each dropped
    # call's (see _sampling.StandIn): with meshrpc's sampling decision and no interceptors.
    stand_in: bool = False
    aggregates: Aggregates | None = None  # the histograms meshrpc aggregates itself (when it built the MeterProvider)


async def bind(app: App, config: Config, mesh: _mesh.MeshInfo) -> Assembly:
    """A grpc server listening on ``config``'s address (not yet started), and telemetry set up."""
    if config.port != 0:
        check_bindable(config.host, config.port, reuse_port=config.reuse_port)
    credentials = tls_credentials(config)  # before the server: a bad file leaves nothing half-made
    server = grpc.aio.server(
        options=grpc_options(config, mesh),
        interceptors=server_interceptors(app.interceptors, builtins=app.intercept_builtins),
    )
    try:
        if credentials is None:
            port = server.add_insecure_port(config.address)
        else:
            port = server.add_secure_port(config.address, credentials)
    except RuntimeError:  # lost a race with another process since the check
        raise BindError(f"cannot listen on {config.address}: the address is in use or not available") from None
    # max_concurrent_rpcs is enforced by meshrpc's handlers on the app's own services
    # (InFlight), so health and reflection always answer.
    inflight = InFlight(
        config.max_concurrent_rpcs,
        shedder=LoadShedder(config.overload_target_delay, config.min_time_remaining),
    )
    assembly = Assembly(server=server, port=port, inflight=inflight)
    await _setup_telemetry(assembly, app, config)
    return assembly


def register(assembly: Assembly, app: App, config: Config, health: Health) -> None:
    """Every method the server answers, in one table (after the lifespan: it may set up telemetry)."""
    observe = _observer(config, assembly.port, assembly.inflight.shedder, assembly.aggregates)
    assembly.observed = observe is not None
    intercepted = bool(app.interceptors)
    assembly.stand_in = observe is not None and not intercepted and drops_spans(observe)
    assembly.pool = _thread_pool(app, config)
    table = MethodTable()
    for service in app.services:
        handlers = {
            m.name: method_handler(
                m,
                assembly.inflight,
                observe=observe,
                middleware=app.middleware,
                pool=assembly.pool,
                intercepted=intercepted,
            )
            for m in service.methods
        }
        table.add(service.name, handlers)
    # Health and reflection get the same malformed-body and error mapping, but no
    # middleware and no concurrency limit: probes must always be answered.
    for service in describe(health.servicer):
        handlers = {m.name: method_handler(m, intercepted=intercepted) for m in service.methods}
        table.add(service.name, handlers)
        if service.name == HEALTH_SERVICE:
            # Check alone is registered with grpc's core: a registered method's calls wait in
            # a queue of their own there, so a liveness probe is not queued behind a backlog of
            # the app's calls when the server is past capacity (in the one queue of
            # unregistered calls, probes waited up to the callers' deadlines, and some were
            # cancelled).  Each registered method adds a future grpc.aio's accept loop waits
            # on for every call; one is what a probe's answer under overload costs.
            assembly.server.add_registered_method_handlers(HEALTH_SERVICE, {"Check": handlers["Check"]})
    names = [*(s.name for s in app.services), HEALTH_SERVICE]
    if config.reflection:
        names = list(add_reflection(table, names, intercepted=intercepted))
    assembly.server.add_generic_rpc_handlers((table,))
    assembly.names = tuple(names)


async def _setup_telemetry(assembly: Assembly, app: App, config: Config) -> None:
    """The OpenTelemetry SDK (otel_sdk) and /metrics (metrics_port), before any handler is built."""
    # The readers meshrpc builds carry its own histogram aggregates (see _aggregates).
    aggregates = Aggregates()
    reader = _metrics.prometheus_reader(aggregates) if config.metrics_port is not None else None
    if config.otel_sdk:
        # OTEL_* are the SDK's own standard variables; the SDK reads some of them itself.
        extra = [reader] if reader is not None else []
        assembly.telemetry_shutdown = configure_sdk(app.name, os.environ, aggregates, extra)
        assembly.aggregates = aggregates if aggregates.installed() else None
    elif reader is not None:
        if sdk_configured()[1]:
            logger.warning(
                "metrics_port: a MeterProvider is installed already and meshrpc cannot add a reader to it; "
                "/metrics shows the process metrics, and the RPC metrics only if that provider has a "
                "PrometheusMetricReader"
            )
        else:
            assembly.telemetry_shutdown = _metrics.install_meter_provider(app.name, reader, aggregates)
            assembly.aggregates = aggregates if aggregates.installed() else None
    if config.metrics_port is not None:
        host = config.host.strip("[]")
        endpoint = _metrics.MetricsEndpoint(host, config.metrics_port)
        await endpoint.start()
        assembly.metrics_endpoint = endpoint
        shown = "127.0.0.1" if host in ("::", "0.0.0.0") else config.host
        logger.info("metrics on http://%s:%d/metrics", shown, endpoint.port)


def grpc_options(config: Config, mesh: _mesh.MeshInfo) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        ("grpc.so_reuseport", 1 if config.reuse_port else 0),
        ("grpc.max_receive_message_length", config.max_receive_message_size),
        ("grpc.max_send_message_length", config.max_send_message_size),
        # Envoy and grpc-go clients ping every few minutes at most; allow that
        # without answering with too_many_pings (GOAWAY ENHANCE_YOUR_CALM).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    age = _mesh.connection_age(config, mesh.mode)
    if age is not None:
        options.append(("grpc.max_connection_age_ms", int(age * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace * 1000)))
    return options


def _observer(config: Config, port: int, shedder: LoadShedder, aggregates: Aggregates | None) -> Observe | None:
    tracing, metering = sdk_configured() if config.telemetry else (False, False)
    telemetry = Telemetry(
        tracing=tracing,
        metrics=metering,
        access_log=config.access_log,
        access_log_sample_rate=config.access_log_sample_rate,
        server_address=config.host.strip("[]"),
        server_port=port or config.port,
        shedder=shedder,
        aggregates=aggregates,
    )
    logger.debug("telemetry: tracing %s, metrics %s, access log %s", tracing, metering, config.access_log)
    if not telemetry.enabled:
        return None  # nothing observes the RPCs: no cost at all
    return observer(telemetry)


def _thread_pool(app: App, config: Config) -> concurrent.futures.ThreadPoolExecutor | None:
    """The pool for 'def' handlers; made only when the app has some."""
    sync = [m.path for s in app.services for m in s.methods if m.impl is not None and is_sync(m.impl)]
    if not sync:
        return None
    logger.debug("%d 'def' handlers run in %d threads", len(sync), config.thread_pool_size)
    return concurrent.futures.ThreadPoolExecutor(
        max_workers=config.thread_pool_size, thread_name_prefix="meshrpc-handler"
    )


def tls_credentials(config: Config) -> grpc.ServerCredentials | None:
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
