"""Set up the OpenTelemetry SDK from the standard OTEL_* variables, when asked (``otel_sdk``).

The SDK and exporters are the optional ``otel`` extra; this module imports them
only when called.  Exporters are found by name through the entry points the SDK
and the exporter packages register (``otlp``, ``console``, ``none``), as the
OpenTelemetry distro does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ._aggregates import Aggregates, histogram_temporality_is_delta, with_aggregates
from ._errors import ConfigError
from ._spans import Pipeline

logger = logging.getLogger("meshrpc.telemetry")


def _exporters(group: str, names: str, protocol: str) -> list[tuple[str, Any]]:
    """The exporters named, as (name, exporter).

    ``otlp`` is the OTLP exporter for ``protocol`` (OTEL_EXPORTER_OTLP_PROTOCOL: ``grpc``
    or ``http/protobuf``), as the SDK's own configuration resolves it: the OTLP packages
    register ``otlp_proto_grpc`` and ``otlp_proto_http``, and only the ``opentelemetry-exporter-otlp``
    bundle registers ``otlp`` itself.
    """
    from importlib.metadata import entry_points

    found = []
    for name in (n.strip() for n in names.split(",")):
        if not name or name == "none":
            continue
        if name == "otlp":
            name = "otlp_proto_http" if protocol.strip().lower() == "http/protobuf" else "otlp_proto_grpc"
        matches = list(entry_points(group=group, name=name))
        if not matches:
            package = (
                "opentelemetry-exporter-otlp-proto-http"
                if name == "otlp_proto_http"
                else "opentelemetry-exporter-otlp-proto-grpc (the 'otel' extra)"
            )
            raise ConfigError(f"OpenTelemetry exporter {name!r} ({group}) is not installed: pip install {package}")
        found.append((name, matches[0].load()()))
    return found


def _protocol(environ: Mapping[str, str], signal: str) -> str:
    return environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"


def service_resource(service_name: str) -> Any:
    """The SDK's resource from OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, named after
    the app when they name no service.  Needs the SDK installed."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    return resource


def configure_sdk(
    service_name: str, environ: Mapping[str, str], aggregates: Aggregates, extra_readers: Sequence[Any] = ()
) -> Callable[[], None]:
    """Install tracer and meter providers; return the function that flushes and shuts them down.

    ``extra_readers`` join the OTLP ones on the one MeterProvider (the Prometheus reader
    of ``metrics_port``): the SDK cannot add a reader to a provider once it exists.
    Every reader's collections carry ``aggregates``' histograms.
    """
    try:
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import SERVICE_NAME
        from opentelemetry.sdk.trace import SpanLimits, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "otel_sdk needs the OpenTelemetry SDK: pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-grpc "
            "(the 'otel' extra)"
        ) from None

    resource = service_resource(service_name)
    # The span limits from OTEL_*_LIMIT, as the provider reads them when given none, and a
    # span pipeline that lets meshrpc hand its server spans to the BatchSpanProcessors
    # itself while they are the only processors (see _spans).
    limits = SpanLimits()
    sdk_metrics = environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "").strip().lower() == "true"
    pipeline = Pipeline(limits, sdk_metrics=sdk_metrics)
    tracer_provider = TracerProvider(  # sampler from OTEL_TRACES_SAMPLER
        resource=resource, span_limits=limits, active_span_processor=pipeline
    )
    for _, exporter in _exporters(
        "opentelemetry_traces_exporter", environ.get("OTEL_TRACES_EXPORTER", "otlp"), _protocol(environ, "TRACES")
    ):
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    # OTLP exporters make histograms delta when OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
    # asks; the points meshrpc adds follow the same preference.
    delta = histogram_temporality_is_delta(environ)
    readers = [
        with_aggregates(PeriodicExportingMetricReader, aggregates, delta=delta and name.startswith("otlp"))(exporter)
        for name, exporter in _exporters(
            "opentelemetry_metrics_exporter",
            environ.get("OTEL_METRICS_EXPORTER", "otlp"),
            _protocol(environ, "METRICS"),
        )
    ]
    trace.set_tracer_provider(tracer_provider)
    meter_provider = None
    if readers or extra_readers:
        aggregates.resource = resource
        meter_provider = aggregates.provider = MeterProvider(
            resource=resource, metric_readers=[*readers, *extra_readers]
        )
        metrics.set_meter_provider(meter_provider)
    # else OTEL_METRICS_EXPORTER=none and no /metrics: no reader would ever collect, so no
    # MeterProvider, and no metric is recorded on any call.
    logger.info("OpenTelemetry SDK set up for service %s", resource.attributes.get(SERVICE_NAME))

    def shutdown() -> None:
        tracer_provider.shutdown()
        if meter_provider is not None:
            meter_provider.shutdown()

    return shutdown


def flush() -> None:
    """Flush whatever providers are installed, so the last spans of a stopping pod are not lost."""
    from opentelemetry import metrics, trace

    for provider in (trace.get_tracer_provider(), metrics.get_meter_provider()):
        force_flush = getattr(provider, "force_flush", None)
        if callable(force_flush):
            try:
                force_flush()
            except Exception:
                logger.exception("flushing telemetry failed")
