"""``/metrics`` for Prometheus: the RPC metrics meshrpc records, and the process's own.

When ``metrics_port`` is set, meshrpc installs an OpenTelemetry MeterProvider with
OpenTelemetry's Prometheus reader (next to the OTLP reader when ``otel_sdk`` is on),
and serves prometheus-client's registry, which also carries the process collector
(CPU, memory, open files), on ``http://HOST:PORT/metrics``.  Both libraries are the
``metrics`` extra and are imported only here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from typing import Any

from ._aggregates import Aggregates, with_aggregates
from ._errors import BindError, ConfigError

logger = logging.getLogger("meshrpc.telemetry")
MISSING_EXTRA = (
    "metrics_port needs opentelemetry-sdk, opentelemetry-exporter-prometheus and prometheus-client, "
    "which meshrpc's install brings but this environment lacks: "
    "pip install opentelemetry-sdk opentelemetry-exporter-prometheus prometheus-client"
)


def prometheus_reader(aggregates: Aggregates) -> Any:
    """OpenTelemetry's Prometheus reader: metrics are read from the SDK when Prometheus scrapes,
    with ``aggregates``' histograms added (Prometheus histograms are cumulative)."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return with_aggregates(PrometheusMetricReader, aggregates, delta=False)()


def install_meter_provider(service_name: str, reader: Any, aggregates: Aggregates) -> Callable[[], None]:
    """A MeterProvider that feeds ``reader`` (when ``otel_sdk`` is off); return its shutdown."""
    try:
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    from ._otel_setup import service_resource

    aggregates.resource = service_resource(service_name)
    provider = aggregates.provider = MeterProvider(resource=aggregates.resource, metric_readers=[reader])
    metrics.set_meter_provider(provider)
    return provider.shutdown


class MetricsEndpoint:
    """``GET /metrics`` served on the event loop: no thread per connection.

    prometheus-client's own server spends a thread per connection with no timeouts, so
    a thousand idle connections to the metrics port took a thousand threads and the
    process's file descriptors, and the gRPC listener stopped accepting.  Here each
    connection is a coroutine with a read timeout; at most `MAX_CONNECTIONS` are
    open at once, and a new one past the cap closes the oldest that has not yet sent
    its request (so idle connections cannot lock Prometheus out); the registry is
    rendered in a single worker thread, so a slow collection never stalls the loop.
    """

    MAX_CONNECTIONS = 32
    READ_TIMEOUT = 5.0  # seconds for a request's line and headers
    MAX_HEADER_BYTES = 16 * 1024

    def __init__(self, host: str, port: int) -> None:
        try:
            from prometheus_client import REGISTRY, exposition
        except ImportError:
            raise ConfigError(MISSING_EXTRA) from None
        self._registry = REGISTRY
        self._exposition = exposition
        self._host, self._requested_port = host, port
        self._server: asyncio.AbstractServer | None = None
        self._open = 0
        self._idle: dict[asyncio.StreamWriter, None] = {}  # connections still reading their request, oldest first
        self._render = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshrpc-metrics")
        self.port = port

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(
                self._serve, self._host or None, self._requested_port, limit=self.MAX_HEADER_BYTES
            )
        except OSError as exc:
            raise BindError(f"cannot serve /metrics on {self._host}:{self._requested_port}: {exc.strerror}") from None
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.MAX_CONNECTIONS:
            if not self._idle:
                writer.transport.abort()  # every slot is rendering an answer: refused
                return
            oldest = next(iter(self._idle))
            del self._idle[oldest]
            oldest.transport.abort()  # its reader fails at once and frees its slot
        self._open += 1
        self._idle[writer] = None
        try:
            await asyncio.wait_for(self._answer(reader, writer), self.READ_TIMEOUT * 2)
        except (asyncio.TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # a slow, silent or broken client: dropped
        finally:
            self._idle.pop(writer, None)
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.READ_TIMEOUT)
        self._idle.pop(writer, None)
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        headers = {}
        for line in header_lines:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            status, content_type, body = "405 Method Not Allowed", "text/plain", b"only GET and HEAD\n"
        elif path not in ("/metrics", "/"):
            status, content_type, body = "404 Not Found", "text/plain", b"metrics are at /metrics\n"
        else:
            encoder, content_type = self._exposition.choose_encoder(headers.get("accept", ""))
            loop = asyncio.get_running_loop()
            body = await loop.run_in_executor(self._render, encoder, self._registry)
            status = "200 OK"
        head_out = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        writer.write(head_out if method == "HEAD" else head_out + body)
        await writer.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._render.shutdown(wait=False, cancel_futures=True)
