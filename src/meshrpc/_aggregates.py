"""The RPC histograms, aggregated by meshrpc and handed to OpenTelemetry when a reader collects.

Recording a measurement through the OpenTelemetry SDK re-validates and hashes its
attributes on every call, which cost more than all the rest of meshrpc's per-RPC work.
When meshrpc builds the MeterProvider itself (``metrics_port``, ``otel_sdk``), it knows
the provider has no Views, so it keeps each histogram stream (one method, one status
code) as plain numbers, aggregated exactly as the SDK's explicit-bucket histogram
aggregates them, and adds the finished points to what each of its readers collects.

The readers are the SDK's own (``PeriodicExportingMetricReader``, the Prometheus
exporter's ``PrometheusMetricReader``) with one addition: their ``_receive_metrics``,
which the SDK documents as the hook a reader implements ("Called by
`MetricReader.collect` when it receives a batch of metrics"), first adds meshrpc's
points to the batch.  Exporters, temporality and the export schedule stay the SDK's.

A MeterProvider meshrpc did not build may have Views that rename, re-bucket or drop
these histograms: then meshrpc records through the SDK on every call, as before.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from ._version import __version__

SCOPE = InstrumentationScope("meshrpc", __version__)
# Calls' measurements wait in `Aggregates.pending` until this many have come, then are
# aggregated together: one call's share of the work is an append to a deque.
BATCH = 256

# The SDK's default explicit bucket boundaries: what an SDK histogram with no View and
# no advisory boundaries uses.
DEFAULT_BOUNDARIES: tuple[float, ...] = (
    0.0,
    5.0,
    10.0,
    25.0,
    50.0,
    75.0,
    100.0,
    250.0,
    500.0,
    750.0,
    1000.0,
    2500.0,
    5000.0,
    7500.0,
    10000.0,
)


class Stream:
    """One attribute set's histogram for one reader.

    Aggregated as the SDK's ``_ExplicitBucketHistogramAggregation`` does, step for
    step (bucket by ``bisect_left``, the interval's sum folded into the cumulative
    one at each collection), so a point equals the SDK's to the last bit of its sum.
    Recorded and collected only under `Aggregates.flushing` (see `Aggregates.aggregate_batch`).
    """

    __slots__ = (
        "attributes",
        "bounds",
        "counts",
        "delta",
        "max",
        "min",
        "prev_counts",
        "prev_max",
        "prev_min",
        "prev_sum",
        "recorded",
        "start",
        "sum",
    )

    def __init__(self, attributes: dict[str, Any], bounds: tuple[float, ...], delta: bool, start: int) -> None:
        self.attributes = attributes
        self.bounds = bounds
        self.delta = delta
        self.start = start  # the previous collection's time (or this stream's creation), as the SDK sets it
        self.recorded = False  # anything since the last collection
        self.counts = [0] * (len(bounds) + 1)
        self.sum: float = 0
        self.min = math.inf
        self.max = -math.inf
        self.prev_counts: list[int] | None = None
        self.prev_sum: float = 0
        self.prev_min = math.inf
        self.prev_max = -math.inf

    def record(self, value: float) -> None:
        self.recorded = True
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.counts[bisect_left(self.bounds, value)] += 1

    def record_many(self, values: Sequence[float]) -> None:
        """`record` of each of ``values`` (finite numbers) in turn, in one call: the same sum,
        added in the same order, the same buckets, min and max.

        A value lands in the first bucket whose bound it does not exceed (``bisect_left``
        on the bounds), so a bucket's count is how many values the bound admits less how
        many the bound before it does: counted on the values sorted, fifteen bisections
        instead of one per value (a batch of 256 in about a quarter of the time).
        """
        if not values:
            return
        self.recorded = True
        ordered = sorted(values)
        counts, below = self.counts, 0
        for index, bound in enumerate(self.bounds):
            upto = bisect_right(ordered, bound, below)  # the values <= bound
            counts[index] += upto - below
            below = upto
        counts[-1] += len(ordered) - below
        # Added one by one, in the calls' order, as the SDK adds them: not sum(), which
        # compensates its rounding from Python 3.12 on, so its last bits would differ.
        total = self.sum
        for value in values:
            total += value
        self.sum = total
        if ordered[0] < self.min:
            self.min = ordered[0]
        if ordered[-1] > self.max:
            self.max = ordered[-1]

    def collect(self, now: int) -> HistogramDataPoint | None:
        """The point a collection at ``now`` reports (None: nothing to report)."""
        recorded, counts, sum_, min_, max_ = self.recorded, self.counts, self.sum, self.min, self.max
        self.recorded = False
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum, self.min, self.max = 0, math.inf, -math.inf
        if self.delta:
            start, self.start = self.start, now
            if not recorded:
                return None
            return HistogramDataPoint(
                attributes=self.attributes,
                start_time_unix_nano=start,
                time_unix_nano=now,
                count=sum(counts),
                sum=sum_,
                bucket_counts=tuple(counts),
                explicit_bounds=self.bounds,
                min=min_,
                max=max_,
            )
        if not recorded and self.prev_counts is None:
            return None  # the SDK makes a stream's aggregation at its first measurement
        previous = self.prev_counts if self.prev_counts is not None else [0] * len(counts)
        self.prev_counts = [a + b for a, b in zip(counts, previous, strict=True)]
        self.prev_min = min(min_, self.prev_min)
        self.prev_max = max(max_, self.prev_max)
        self.prev_sum = sum_ + self.prev_sum
        return HistogramDataPoint(
            attributes=self.attributes,
            start_time_unix_nano=self.start,
            time_unix_nano=now,
            count=sum(self.prev_counts),
            sum=self.prev_sum,
            bucket_counts=tuple(self.prev_counts),
            explicit_bounds=self.bounds,
            min=self.prev_min,
            max=self.prev_max,
        )


class Instrument:
    """A histogram instrument: its streams for every reader, by attribute set."""

    def __init__(self, sink: Aggregates, name: str, unit: str, description: str) -> None:
        self.sink = sink
        self.name, self.unit, self.description = name, unit, description
        self.streams: list[list[Stream]] = [[] for _ in sink.readers]  # per reader

    def streams_for(self, attributes: dict[str, Any]) -> tuple[Stream, ...]:
        """The streams one attribute set records into: one per reader.  Built once per set
        by the caller, who keeps them (a method's streams, by status code)."""
        made = []
        for index, reader in enumerate(self.sink.readers):
            stream = Stream(attributes, DEFAULT_BOUNDARIES, reader.delta, reader.last_collection or time.time_ns())
            with self.sink.lock:
                self.streams[index].append(stream)
            made.append(stream)
        return tuple(made)

    def metric(self, index: int, now: int) -> Metric | None:
        with self.sink.lock:
            streams = list(self.streams[index])
        points = [point for stream in streams if (point := stream.collect(now)) is not None]
        if not points:
            return None  # the SDK leaves out a metric with no points
        temporality = (
            AggregationTemporality.DELTA if self.sink.readers[index].delta else AggregationTemporality.CUMULATIVE
        )
        return Metric(
            name=self.name,
            description=self.description,
            unit=self.unit,
            data=Histogram(data_points=points, aggregation_temporality=temporality),
        )


class ReaderState:
    """What meshrpc keeps for one reader: its temporality and its last collection time."""

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.last_collection = 0


class Aggregates:
    """meshrpc's histograms for every reader of the MeterProvider meshrpc built.

    Readers are added while the provider is built, before any instrument: each gets
    its own streams, as each SDK reader has its own storage.
    """

    def __init__(self) -> None:
        self.resource = Resource.get_empty()  # the provider's, set by whoever builds it
        self.provider: object | None = None  # the MeterProvider whose readers carry these histograms
        self.readers: list[ReaderState] = []
        self.instruments: list[Instrument] = []
        self.lock = threading.Lock()
        # Each entry is ``(record, *arguments)``: one finished call's measurements, for
        # ``record(*arguments)`` to put into the streams (see `aggregate_batch`).
        self.pending: collections.deque[tuple[Any, ...]] = collections.deque()
        # The measurements of one method's calls that ended OK, each queue with what records a
        # list of them (see `queue`).
        self.queues: list[tuple[collections.deque[Any], Callable[[list[Any]], None]]] = []
        # Held while measurements are aggregated or the streams collected: the event loop's
        # thread aggregates, a reader's thread collects.
        self.flushing = threading.Lock()

    def queue(self, record: Callable[[list[Any]], None]) -> collections.deque[Any]:
        """A queue of measurements, aggregated with each batch by ``record(measurements)``: for
        the most common ones (a unary call's duration, a server stream's duration and replies,
        when it ended OK), one append per call and one call per batch, instead of an entry in
        `pending` and a record call for each."""
        made: collections.deque[Any] = collections.deque()
        with self.lock:
            self.queues = [*self.queues, (made, record)]
        return made

    def aggregate_batch(self) -> None:
        """Aggregate what is pending, unless a reader's thread is collecting (that
        collection drains the deque): called by whoever appended the BATCH-th entry.

        Each call appends ``(record, *arguments)`` to `pending` as it ends, and ``record(*arguments)``
        puts it into the streams later, in a batch.  Under load each call's Python runs
        between grpc's C code and the kernel's, from cold caches: recording a call's
        histograms as it ended cost a saturated server several times what it costs in a
        loop; a batch is aggregated in one loop, warm.  Every collection aggregates what
        is pending first, so a point includes every call that had ended before it.
        """
        if self.flushing.acquire(blocking=False):
            try:
                self._drain()
            finally:
                self.flushing.release()

    def _drain(self) -> None:
        pending = self.pending
        popleft = pending.popleft
        # Only the holder of `flushing` takes from the deque; entries appended meanwhile wait.
        while pending:
            record, *arguments = popleft()
            record(*arguments)
        for queue, record_all in self.queues:
            if queue:
                take = queue.popleft
                record_all([take() for _ in range(len(queue))])

    def installed(self) -> bool:
        """Whether the global MeterProvider is the one these readers are on: the SDK keeps the
        first provider set in a process, so a second app served in it records through the SDK."""
        from opentelemetry import metrics

        return self.provider is not None and metrics.get_meter_provider() is self.provider

    def add_reader(self, delta: bool) -> int:
        if self.instruments:
            raise RuntimeError("readers are added before the first instrument")
        self.readers.append(ReaderState(delta))
        return len(self.readers) - 1

    def histogram(self, name: str, unit: str, description: str) -> Instrument:
        instrument = Instrument(self, name, unit, description)
        self.instruments.append(instrument)
        return instrument

    def add_to(self, index: int, data: MetricsData) -> MetricsData:
        """``data`` (one collection of reader ``index``) with meshrpc's histograms added to its
        meshrpc scope, as the SDK would have put them there."""
        now = _collection_time(data)
        self.readers[index].last_collection = now
        with self.flushing:
            self._drain()
            ours = [m for instrument in self.instruments if (m := instrument.metric(index, now)) is not None]
        if not ours:
            return data
        resources = list(data.resource_metrics)
        if not resources:
            return MetricsData([ResourceMetrics(self.resource, [ScopeMetrics(SCOPE, ours, "")], "")])
        first = resources[0]
        scopes: list[ScopeMetrics] = list(first.scope_metrics)
        for i, scope in enumerate(scopes):
            if scope.scope.name == SCOPE.name and scope.scope.version == SCOPE.version:
                scopes[i] = ScopeMetrics(scope.scope, [*scope.metrics, *ours], scope.schema_url)
                break
        else:
            scopes.append(ScopeMetrics(SCOPE, ours, ""))
        resources[0] = ResourceMetrics(first.resource, scopes, first.schema_url)
        return MetricsData(resources)


def _collection_time(data: MetricsData) -> int:
    """The SDK's time for this collection (every point it made carries it), so meshrpc's
    points share it; now if the SDK made none."""
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    return point.time_unix_nano
    return time.time_ns()


def histogram_temporality_is_delta(environ: Mapping[str, str]) -> bool:
    """Whether OTLP exporters ask for delta histograms: OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE
    is ``delta`` or ``lowmemory`` (both make histograms delta, per the OpenTelemetry specification)."""
    preference = environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "cumulative").strip().lower()
    return preference in ("delta", "lowmemory")


def with_aggregates(reader_class: type[Any], aggregates: Aggregates, delta: bool) -> type[Any]:
    """``reader_class`` (an SDK MetricReader) whose collections carry ``aggregates``' histograms."""
    index = aggregates.add_reader(delta)

    def _receive_metrics(self: Any, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> None:
        reader_class._receive_metrics(self, aggregates.add_to(index, metrics_data), timeout_millis, **kwargs)

    return type(reader_class.__name__, (reader_class,), {"_receive_metrics": _receive_metrics})
