"""``otel_sdk`` as a cluster runs it: the default OTLP exporters, a ratio sampler, and a
collector (a real OTLP/gRPC server on 127.0.0.1) that receives meshrpc's spans and the
histograms meshrpc aggregates itself."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.helpers import Served

CALLS = 120
RATE = 0.3


class Collector(trace_service_pb2_grpc.TraceServiceServicer, metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[Any] = []
        self.metrics: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            if isinstance(request, trace_service_pb2.ExportTraceServiceRequest):
                self.spans.extend(span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()
            self.metrics.extend(
                (ss.scope.name, metric)
                for rm in request.resource_metrics
                for ss in rm.scope_metrics
                for metric in ss.metrics
            )
            return metrics_service_pb2.ExportMetricsServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    found = Collector()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    # One servicer object, two services: route each service's Export to it.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(found, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(found, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield found, port
    finally:
        server.stop(0)


def test_default_otlp_exporters_carry_sampled_spans_and_meshrpc_histograms(collector: tuple[Collector, int]) -> None:
    found, port = collector
    env = {
        "MESHRPC_OTEL_SDK": "true",
        "MESHRPC_ACCESS_LOG": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(RATE),
        "OTEL_SERVICE_NAME": "otlp-test",
    }
    with Served("tests.apps.echo:app", "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for i in range(CALLS):
                stub.Unary(echo_pb2.EchoRequest(text=f"call {i}"), timeout=10)
        served.signal(signal.SIGTERM)
        assert served.wait(20) == 0  # shutdown flushes both exporters
    access = [
        json.loads(line[line.index("{") :]) for line in served.log.splitlines() if '"method":"/echo.Echo/Unary"' in line
    ]
    assert len(access) == CALLS
    # Every call has a trace id in its log line; the sampled ones are exactly those the
    # configured sampler's rule keeps, and each reached the collector once.
    bound = TraceIdRatioBased.get_bound_for_rate(RATE)
    expected = sorted(r["trace_id"] for r in access if int(r["trace_id"], 16) & (2**64 - 1) < bound)
    exported = sorted(span.trace_id.hex() for span in found.spans if span.name == "echo.Echo/Unary")
    assert exported == expected
    assert 0 < len(exported) < CALLS
    # The duration histogram, aggregated by meshrpc, reaches OTLP in the meshrpc scope with
    # the RPC attributes, one count per call.
    durations = [m for scope, m in found.metrics if m.name == "rpc.server.duration"]
    assert durations and all(scope == "meshrpc" for scope, m in found.metrics if m.name == "rpc.server.duration")
    last = durations[-1]
    assert last.unit == "ms"
    (point,) = last.histogram.data_points
    attributes = {a.key: a.value for a in point.attributes}
    assert attributes["rpc.method"].string_value == "Unary" and attributes["rpc.grpc.status_code"].int_value == 0
    assert point.count == CALLS and len(point.bucket_counts) == len(point.explicit_bounds) + 1 == 16
    assert sum(point.bucket_counts) == CALLS and 0 < point.min <= point.max and point.sum > 0
    assert last.histogram.aggregation_temporality == 2  # cumulative, the OTLP exporter's default
    assert any(m.name == "rpc.server.active_requests" for _, m in found.metrics)  # the SDK's own, beside it
