"""meshrpc's own histogram aggregation against the OpenTelemetry SDK's: the same values
give the same exported points, field by field, in OTLP's shape and in Prometheus' text."""

from __future__ import annotations

import math
import random
import threading
import time
from typing import Any

import pytest
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality, HistogramDataPoint, InMemoryMetricReader
from prometheus_client import REGISTRY, generate_latest

from meshrpc._aggregates import BATCH, Aggregates, with_aggregates
from meshrpc._version import __version__

ATTRS = {"rpc.system": "grpc", "rpc.service": "echo.Echo", "rpc.method": "Unary", "rpc.grpc.status_code": 0}
OTHER = {**ATTRS, "rpc.grpc.status_code": 14}


def values(n: int, seed: int) -> list[float]:
    """Durations as a server sees them, with every bucket boundary itself (``le`` is inclusive)."""
    rng = random.Random(seed)
    out: list[float] = []
    for i in range(n):
        pick = i % 5
        if pick == 0:
            out.append(rng.choice([0.0, 5.0, 10.0, 25.0, 75.0, 1000.0, 10000.0]))
        elif pick == 1:
            out.append(rng.lognormvariate(0, 2))
        elif pick == 2:
            out.append(rng.uniform(10000, 50000))
        else:
            out.append(rng.expovariate(1 / 40))
    return out


def points(reader: InMemoryMetricReader, data: Any) -> dict[str, list[HistogramDataPoint]]:
    found: dict[str, list[HistogramDataPoint]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = list(metric.data.data_points)
                found[metric.name + ":temporality"] = metric.data.aggregation_temporality
                found[metric.name + ":scope"] = (scope.scope.name, scope.scope.version)
                found[metric.name + ":unit"] = metric.unit
    return found


def compare(ours: HistogramDataPoint, sdk: HistogramDataPoint, *, start_too: bool) -> None:
    for field in ("attributes", "time_unix_nano", "count", "bucket_counts", "explicit_bounds", "min", "max"):
        assert getattr(ours, field) == getattr(sdk, field), field
    # the sum to the last bit: the same additions in the same order
    assert ours.sum == sdk.sum and type(ours.sum) is type(sdk.sum)
    assert list(ours.exemplars) == []
    if start_too:
        assert ours.start_time_unix_nano == sdk.start_time_unix_nano
    else:
        assert abs(ours.start_time_unix_nano - sdk.start_time_unix_nano) < 5e9


@pytest.mark.parametrize("delta", [False, True], ids=["cumulative", "delta"])
def test_points_equal_the_sdk_histograms_field_by_field(delta: bool) -> None:
    aggregates = Aggregates()
    temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
    reader = with_aggregates(InMemoryMetricReader, aggregates, delta=delta)(
        preferred_temporality={SdkHistogram: temporality}
    )
    provider = MeterProvider(metric_readers=[reader])
    try:
        meter = provider.get_meter("meshrpc", __version__)
        # As meshrpc's rpc.server.active_requests: a collection always has a point, so the
        # SDK always hands the reader a batch.
        meter.create_observable_up_down_counter("active", callbacks=[lambda options: [Observation(0, ATTRS)]])
        sdk = meter.create_histogram("sdk.twin", unit="ms")
        ours = aggregates.histogram("rpc.server.duration", unit="ms", description="d")
        ok, unavailable = ours.streams_for(ATTRS)[0], ours.streams_for(OTHER)[0]
        sdk_counts = meter.create_histogram("sdk.counts", unit="{count}")
        ours_counts = aggregates.histogram("rpc.server.responses_per_rpc", unit="{count}", description="c")
        counts = ours_counts.streams_for(ATTRS)[0]
        seen = 0
        for round_, n in enumerate([40_000, 0, 25_000, 35_000]):
            # OK's durations in lists of every length up to a batch's, as a method's queue
            # hands them over (Stream.record_many); the other code's one at a time.
            held: list[float] = []
            held_counts: list[int] = []
            for i, value in enumerate(values(n, round_)):
                attrs = OTHER if i % 7 == 3 else ATTRS
                sdk.record(value, attrs)
                if attrs is OTHER:
                    unavailable.record(value)
                else:
                    held.append(value)
                    if len(held) >= 1 + i % BATCH:
                        ok.record_many(held)
                        held = []
                # Integers (a stream's replies, 5 and 10 on bucket bounds): the sum stays an
                # int, as the SDK's does.  In batches as a stream method's queue hands them
                # over, and one at a time as other calls' are.
                sdk_counts.record(i % 11, ATTRS)
                if i % 3:
                    held_counts.append(i % 11)
                    if len(held_counts) >= 1 + i % BATCH:
                        counts.record_many(held_counts)
                        held_counts = []
                else:
                    counts.record(i % 11)
            ok.record_many(held)
            counts.record_many(held_counts)
            seen += n
            got = points(reader, reader.get_metrics_data())
            if delta and n == 0:
                # nothing recorded: neither reports the histograms at all
                assert "sdk.twin" not in got and "rpc.server.duration" not in got
                continue
            assert got["rpc.server.duration:scope"] == got["sdk.twin:scope"] == ("meshrpc", __version__)
            assert got["rpc.server.duration:temporality"] == got["sdk.twin:temporality"] == temporality
            ours_points = {p.attributes["rpc.grpc.status_code"]: p for p in got["rpc.server.duration"]}
            sdk_points = {p.attributes["rpc.grpc.status_code"]: p for p in got["sdk.twin"]}
            assert ours_points.keys() == sdk_points.keys() == {0, 14}
            for code in (0, 14):
                compare(ours_points[code], sdk_points[code], start_too=delta and round_ > 0)
            (ours_count,), (sdk_count,) = got["rpc.server.responses_per_rpc"], got["sdk.counts"]
            compare(ours_count, sdk_count, start_too=delta and round_ > 0)
            assert isinstance(ours_count.sum, int)
            total = sum(p.count for p in ours_points.values())
            assert total == (n if delta else seen)
            assert math.isfinite(ours_points[0].sum)
    finally:
        provider.shutdown()


def prometheus_lines(text: str, name: str) -> list[str]:
    return sorted(line.replace(name, "NAME") for line in text.splitlines() if line.startswith(name))


def test_prometheus_renders_meshrpc_points_as_it_renders_the_sdks() -> None:
    aggregates = Aggregates()
    reader = with_aggregates(PrometheusMetricReader, aggregates, delta=False)()
    provider = MeterProvider(metric_readers=[reader])
    try:
        meter = provider.get_meter("meshrpc", __version__)
        sdk = meter.create_histogram("sdk.twin", unit="ms", description="Measures the duration of inbound RPC.")
        ours = aggregates.histogram(
            "rpc.server.duration", unit="ms", description="Measures the duration of inbound RPC."
        )
        stream = ours.streams_for(ATTRS)[0]
        for value in values(20_000, 7):
            sdk.record(value, ATTRS)
            stream.record(value)
        text = generate_latest(REGISTRY).decode()
        mine = prometheus_lines(text, "rpc_server_duration_milliseconds")
        theirs = prometheus_lines(text, "sdk_twin_milliseconds")
        assert len(mine) == 15 + 1 + 2  # 15 boundaries and +Inf, _count, _sum
        assert mine == theirs
        assert 'otel_scope_name="meshrpc"' in mine[0]
    finally:
        provider.shutdown()


def test_metrics_endpoint_shows_the_histograms_meshrpc_aggregates() -> None:
    """`meshrpc serve` with metrics_port: the scrape has the RPC histograms with one count
    per call, by status code, beside the SDK's own metrics and the process's."""
    import re
    import signal
    import time

    import grpc

    from examples._generated.echo import echo_pb2, echo_pb2_grpc
    from tests.helpers import Served, metrics_text

    with Served("tests.apps.echo:app", "--drain-delay", "0", env={"MESHRPC_METRICS_PORT": "0"}) as served:
        served.wait_serving()
        served.wait_for("metrics on http://")
        port = int(re.search(r"metrics on http://[^:]+:(\d+)/metrics", served.log)[1])  # type: ignore[index]
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            for i in range(25):
                stub.Unary(echo_pb2.EchoRequest(text=f"call {i}"), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.Unary(echo_pb2.EchoRequest(text="x", fail="NOT_FOUND"), timeout=10)
        # A call is recorded when its handler's wrapper finishes, which may be just after the
        # client has its answer: scrape until the last call is in.
        for _ in range(50):
            text = metrics_text(port)
            if 'rpc_grpc_status_code="5"' in text and "_count{" in text:
                break
            time.sleep(0.1)
        served.signal(signal.SIGTERM)
        assert served.wait(20) == 0

    def count(code: int) -> float:
        (line,) = [
            line
            for line in text.splitlines()
            if line.startswith("rpc_server_duration_milliseconds_count{") and f'rpc_grpc_status_code="{code}"' in line
        ]
        assert 'rpc_method="Unary"' in line and 'otel_scope_name="meshrpc"' in line
        return float(line.rsplit(" ", 1)[1])

    assert count(0) == 25
    assert count(5) == 1  # NOT_FOUND, its own series
    assert 'le="+Inf"' in text and "# TYPE rpc_server_duration_milliseconds histogram" in text
    assert "rpc_server_active_requests" in text and "process_cpu_seconds_total" in text


def always(provider: MeterProvider) -> None:
    """An SDK instrument with a point in every collection, as meshrpc's rpc.server.active_requests."""
    meter = provider.get_meter("meshrpc", __version__)
    meter.create_observable_up_down_counter("active", callbacks=[lambda options: [Observation(0, ATTRS)]])


def batched(aggregates: Aggregates, record: Any, value: float) -> None:
    """What a call's end does with its measurement (see _telemetry.Observation.finish)."""
    pending = aggregates.pending
    pending.append((record, value))
    if len(pending) >= BATCH:
        aggregates.aggregate_batch()


def queued(aggregates: Aggregates, queue: Any, value: float) -> None:
    """What a unary call that ended OK does with its duration (see _telemetry.Observation.finish)."""
    queue.append(value)
    if len(queue) >= BATCH:
        aggregates.aggregate_batch()


def way_in(aggregates: Aggregates, stream: Any, way: str) -> tuple[Any, Any]:
    """How a measurement reaches ``stream``: an entry in `pending`, or a number in a queue."""
    if way == "pending":
        return stream.record, lambda record, value: batched(aggregates, record, value)
    queue = aggregates.queue(stream.record_many)
    return queue, lambda queue, value: queued(aggregates, queue, value)


WAYS = ["pending", "queue"]


@pytest.mark.parametrize("way", WAYS)
def test_measurements_wait_for_a_batch_and_every_collection_includes_them(way: str) -> None:
    aggregates = Aggregates()
    reader = with_aggregates(InMemoryMetricReader, aggregates, delta=False)()
    provider = MeterProvider(metric_readers=[reader])
    always(provider)
    try:
        (stream,) = aggregates.histogram("rpc.server.duration", unit="ms", description="d").streams_for(ATTRS)
        target, put = way_in(aggregates, stream, way)
        waiting = aggregates.pending if way == "pending" else target
        for i in range(BATCH - 1):
            put(target, float(BATCH - 2 - i))  # the least last
        assert len(waiting) == BATCH - 1 and sum(stream.counts) == 0  # not aggregated yet
        put(target, 1.0)
        assert len(waiting) == 0 and sum(stream.counts) == BATCH  # the batch, at once
        for _ in range(10):
            put(target, 2.0)
        (point,) = points(reader, reader.get_metrics_data())["rpc.server.duration"]
        assert point.count == BATCH + 10  # the collection took the 10 still waiting
        assert point.sum == sum(float(i) for i in range(BATCH - 1)) + 1.0 + 20.0
        assert point.min == 0.0 and point.max == float(BATCH - 2)
        assert len(waiting) == 0
    finally:
        provider.shutdown()


def test_a_full_batch_never_waits_for_a_collection_in_progress() -> None:
    """The event loop's thread appends and moves on while a reader's thread holds the
    aggregates: that collection, or the next, takes what waits."""
    aggregates = Aggregates()
    with_aggregates(InMemoryMetricReader, aggregates, delta=False)
    (stream,) = aggregates.histogram("h", unit="ms", description="d").streams_for(ATTRS)
    with aggregates.flushing:  # a reader's thread, collecting
        for _ in range(BATCH * 3):
            batched(aggregates, stream.record, 1.0)
        assert len(aggregates.pending) == BATCH * 3 and sum(stream.counts) == 0
    aggregates.aggregate_batch()  # the collection is over: the next batch takes everything
    assert sum(stream.counts) == BATCH * 3 and not aggregates.pending


@pytest.mark.parametrize("way", WAYS)
def test_collections_in_another_thread_lose_and_repeat_no_measurement(way: str) -> None:
    aggregates = Aggregates()
    reader = with_aggregates(InMemoryMetricReader, aggregates, delta=True)(
        preferred_temporality={SdkHistogram: AggregationTemporality.DELTA}
    )
    provider = MeterProvider(metric_readers=[reader])
    always(provider)
    (stream,) = aggregates.histogram("h", unit="ms", description="d").streams_for(ATTRS)
    target, put = way_in(aggregates, stream, way)
    counted: list[int] = []
    done = threading.Event()

    def collect() -> None:
        while not done.is_set():
            counted.extend(p.count for p in points(reader, reader.get_metrics_data()).get("h", []))

    collector = threading.Thread(target=collect)
    collector.start()
    try:
        for i in range(20_000):
            put(target, float(i % 7))
            if i % 1000 == 0:
                time.sleep(0.002)  # calls end between collections, as on a server
    finally:
        done.set()
        collector.join()
    counted.extend(p.count for p in points(reader, reader.get_metrics_data()).get("h", []))
    provider.shutdown()
    assert sum(counted) == 20_000  # delta points: each measurement in exactly one
    assert len(counted) > 1  # collected while calls ended, not only at the end
