"""``/metrics`` for Prometheus: the RPC metrics meshrpc records, and the process's own.

When ``metrics_port`` is set, meshrpc installs an OpenTelemetry MeterProvider with
OpenTelemetry's Prometheus reader (next to the OTLP reader when ``otel_sdk`` is on),
and serves prometheus-client's registry, which also carries the process collector
(CPU, memory, open files), on ``http://HOST:PORT/metrics``.  Both libraries are the
``metrics`` extra and are imported only here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ._errors import BindError, ConfigError

logger = logging.getLogger("meshrpc.telemetry")
MISSING_EXTRA = "metrics_port needs the 'metrics' extra: pip install 'meshrpc[metrics]'"


def prometheus_reader() -> Any:
    """OpenTelemetry's Prometheus reader: metrics are read from the SDK when Prometheus scrapes."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return PrometheusMetricReader()


def install_meter_provider(service_name: str, reader: Any) -> Callable[[], None]:
    """A MeterProvider that feeds ``reader`` (when ``otel_sdk`` is off); return its shutdown."""
    try:
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    from ._otel_setup import service_resource

    provider = MeterProvider(resource=service_resource(service_name), metric_readers=[reader])
    metrics.set_meter_provider(provider)
    return provider.shutdown


class MetricsEndpoint:
    """prometheus-client's HTTP server on its own daemon thread; closed when meshrpc exits."""

    def __init__(self, host: str, port: int) -> None:
        try:
            from prometheus_client import start_http_server
        except ImportError:
            raise ConfigError(MISSING_EXTRA) from None
        try:
            self._server, self._thread = start_http_server(port, addr=host)
        except OSError as exc:
            raise BindError(f"cannot serve /metrics on {host}:{port}: {exc.strerror}") from None
        self.port: int = self._server.server_port

    def close(self) -> None:
        # shutdown() waits for serve_forever to return: at most one poll interval (0.5 s).
        threading.Thread(target=self._server.shutdown, daemon=True).start()
        self._server.server_close()
