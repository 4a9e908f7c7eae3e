"""Prometheus metrics: names ``amqpsched_*``, base units, bounded labels (capability, outcome,
reason; never a task id). Every process gets its registry passed in; nothing is global."""

from __future__ import annotations

import platform
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._version import __version__
from .protocol import ErrorType

#: Seconds, from a millisecond round trip to an hour-long task.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)

#: Tasks in one message: 1 alone, more when coalesced under load (up to MAX_BATCH).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
#: What a scheduler's message carries tasks of: received (submit, outcome), sent (dispatch, answer).
MESSAGE_KINDS = ("submit", "dispatch", "outcome", "answer")

#: At most this many workers get their own heartbeat-age series.
MAX_WORKER_SERIES = 500


def build_info(registry: CollectorRegistry, component: str) -> None:
    Info("amqpsched_build", "Version of amqpsched and Python", registry=registry).info(
        {"version": __version__, "python": platform.python_version(), "component": component}
    )


#: Outcomes of a finished task: succeeded or one of the protocol's error types.
OUTCOMES = ("succeeded", *(e.value for e in ErrorType))
#: Reasons a client request is rejected (see docs/protocol.md).
REJECT_REASONS = (
    "too_large",
    "unknown_type",
    "malformed_json",
    "malformed_body",
    "missing_version",
    "unknown_version",
    "invalid_fields",
    "missing_reply_to",
    "timeout_too_large",
    "internal_error",
)


class _BufferedCounter:
    """A counter child's increments, added up here and handed on at the next collect."""

    __slots__ = ("_child", "_pending")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._pending = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self._pending += amount

    def flush(self) -> None:
        if self._pending:
            self._child.inc(self._pending)
            self._pending = 0.0


class _BufferedHistogram:
    """A histogram child's observations, counted per bucket here and handed on at the next
    collect. Handing on adds to the child's own bucket and sum values (prometheus_client keeps
    them per bucket, not cumulated); a child without them is observed at once instead."""

    __slots__ = ("_bounds", "_buckets", "_child", "_counts", "_dirty", "_sum", "_total")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: list[float] | None = getattr(child, "_upper_bounds", None)
        self._buckets: list[Any] | None = getattr(child, "_buckets", None)
        self._sum: Any = getattr(child, "_sum", None)
        if (
            self._bounds is None
            or self._buckets is None
            or self._sum is None
            or len(self._bounds) != len(self._buckets)
        ):
            self._bounds = None
        self._counts = [0] * len(self._bounds or ())
        self._total = 0.0
        self._dirty = False

    def observe(self, value: float) -> None:
        if self._bounds is None:
            self._child.observe(value)
            return
        self._counts[bisect_left(self._bounds, value)] += 1
        self._total += value
        self._dirty = True

    def flush(self) -> None:
        if not self._dirty or self._buckets is None:
            return
        for i, n in enumerate(self._counts):
            if n:
                self._buckets[i].inc(n)
                self._counts[i] = 0
        self._sum.inc(self._total)
        self._total = 0.0
        self._dirty = False


class _Flusher(Collector):
    """Registered first: each collect of the registry (a scrape, a test reading a value) first
    hands the buffered series on. Per task, the scheduler counts and observes about six times;
    through prometheus_client's children (a lock and several calls each) that cost about a tenth
    of its CPU in a ``map``."""

    def __init__(self) -> None:
        self.series: list[_BufferedCounter | _BufferedHistogram] = []

    def collect(self) -> Iterable[Metric]:
        for series in self.series:
            series.flush()
        return []


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._capabilities: dict[str, CapabilitySeries] = {}
        self._flusher = _Flusher()
        registry.register(self._flusher)
        build_info(registry, "scheduler")
        self.submitted = Counter(
            "amqpsched_tasks_submitted_total",
            "Tasks accepted by the scheduler",
            ["capability"],
            registry=registry,
        )
        self.dispatched = Counter(
            "amqpsched_tasks_dispatched_total",
            "Task attempts published to a capability queue (first dispatch and re-dispatches)",
            ["capability"],
            registry=registry,
        )
        self.finished = Counter(
            "amqpsched_tasks_finished_total",
            "Final answers, by outcome: succeeded or the error type",
            ["capability", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "amqpsched_task_retries_total",
            "Failed attempts that will run again",
            ["capability"],
            registry=registry,
        )
        self.redispatched = Counter(
            "amqpsched_tasks_redispatched_total",
            "Running tasks dispatched again because their worker was declared dead",
            ["capability"],
            registry=registry,
        )
        self.fenced = Counter(
            "amqpsched_fenced_results_total",
            "Late results of superseded attempts, ignored",
            ["capability"],
            registry=registry,
        )
        self.cold = Gauge(
            "amqpsched_tasks_kept_cold",
            "Waiting tasks kept in a few bytes each, read back from the journal when needed",
            registry=registry,
        )
        self.result_bytes = Gauge(
            "amqpsched_result_bytes",
            "Bytes of results kept for status and result queries (those of 2 KiB and more)",
            registry=registry,
        )
        self.results_shed = Counter(
            "amqpsched_results_shed_total",
            "Finished tasks forgotten before result_retention, to keep within max_result_bytes",
            registry=registry,
        )
        self.read_back = Counter(
            "amqpsched_cold_tasks_read_back_total",
            "Waiting tasks kept cold, read back from the journal",
            registry=registry,
        )
        self.cold_missing = Counter(
            "amqpsched_cold_tasks_missing_total",
            "Waiting tasks kept cold whose dispatch was not found in the journal (forgotten)",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "amqpsched_dead_lettered_total",
            "Messages this process put in the dead-letter queue, by reason",
            ["reason"],
            registry=registry,
        )
        self.rejected = Counter(
            "amqpsched_rejected_total",
            "Bad client requests, by reason",
            ["reason"],
            registry=registry,
        )
        self.queue_wait = Histogram(
            "amqpsched_task_queue_wait_seconds",
            "From submission to the start of the first attempt",
            ["capability"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.execution = Histogram(
            "amqpsched_task_execution_seconds",
            "Run time of the attempt that answered",
            ["capability"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.end_to_end = Histogram(
            "amqpsched_task_end_to_end_seconds",
            "From submission to the final answer",
            ["capability"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.reconnects = Counter(
            "amqpsched_broker_reconnects_total",
            "Times the connection to the broker was re-established",
            registry=registry,
        )
        self.tasks_per_message = Histogram(
            "amqpsched_tasks_per_message",
            "Tasks carried by one message the scheduler received (submit, outcome) or sent "
            "(dispatch, answer): 1 alone, more when batched under load",
            ["kind"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        # Series that exist from the start read 0, so rate() sees their first increment.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for kind in MESSAGE_KINDS:
            self.tasks_per_message.labels(kind)

    def of(self, capability: str) -> CapabilitySeries:
        """A capability's series, created at 0 the first time it is seen (and then looked up
        once per task, not once per label lookup)."""
        series = self._capabilities.get(capability)
        if series is None:
            series = self._capabilities[capability] = CapabilitySeries(self, capability)
            for counter in (self.retries, self.redispatched):
                counter.labels(capability)
        return series


class CapabilitySeries:
    """The per-capability children of the scheduler's metrics, bound once, buffered (handed on
    at each collect of the registry)."""

    def __init__(self, metrics: SchedulerMetrics, capability: str) -> None:
        self._metrics = metrics
        self._capability = capability
        self.submitted = self._counter(metrics.submitted.labels(capability))
        self.dispatched = self._counter(metrics.dispatched.labels(capability))
        self._finished = {
            o: self._counter(metrics.finished.labels(capability, o)) for o in OUTCOMES
        }
        # Histograms get their series at the first observation (none for a capability whose
        # tasks never ran), then are looked up once.
        self._histograms: dict[str, _BufferedHistogram] = {}

    def _counter(self, child: Any) -> _BufferedCounter:
        buffered = _BufferedCounter(child)
        self._metrics._flusher.series.append(buffered)
        return buffered

    def _histogram(self, name: str, metric: Histogram) -> _BufferedHistogram:
        child = self._histograms.get(name)
        if child is None:
            child = self._histograms[name] = _BufferedHistogram(metric.labels(self._capability))
            self._metrics._flusher.series.append(child)
        return child

    @property
    def queue_wait(self) -> Any:
        return self._histogram("queue_wait", self._metrics.queue_wait)

    @property
    def execution(self) -> Any:
        return self._histogram("execution", self._metrics.execution)

    @property
    def end_to_end(self) -> Any:
        return self._histogram("end_to_end", self._metrics.end_to_end)

    def finished(self, outcome: str) -> _BufferedCounter:
        child = self._finished.get(outcome)
        if child is None:
            child = self._finished[outcome] = self._counter(
                self._metrics.finished.labels(self._capability, outcome)
            )
        return child


class RegistryCollector(Collector):
    """Live workers, their slots and heartbeat ages, and open tasks, read at scrape time."""

    def __init__(
        self,
        snapshot: Callable[[], Iterable[tuple[str, list[str], int, int, float]]],
        open_tasks: Callable[[], dict[str, int]],
    ) -> None:
        # snapshot yields (worker_id, capabilities, concurrency, in_flight, seconds since seen)
        self._snapshot = snapshot
        self._open_tasks = open_tasks
        #: Capabilities seen once keep their series, at 0 when nothing is left.
        self._seen: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        live = GaugeMetricFamily(
            "amqpsched_workers_live", "Live workers per capability", labels=["capability"]
        )
        used = GaugeMetricFamily(
            "amqpsched_worker_slots_used",
            "Tasks running on live workers, per capability they offer",
            labels=["capability"],
        )
        available = GaugeMetricFamily(
            "amqpsched_worker_slots_available",
            "Free task slots on live workers, per capability they offer",
            labels=["capability"],
        )
        age = GaugeMetricFamily(
            "amqpsched_worker_heartbeat_age_seconds",
            f"Seconds since each live worker's last heartbeat (first {MAX_WORKER_SERIES})",
            labels=["worker"],
        )
        per_cap: dict[str, list[int]] = {}
        for n, (worker_id, caps, concurrency, in_flight, seen) in enumerate(self._snapshot()):
            for cap in caps:
                acc = per_cap.setdefault(cap, [0, 0, 0])
                acc[0] += 1
                acc[1] += in_flight
                acc[2] += max(concurrency - in_flight, 0)
            if n < MAX_WORKER_SERIES:
                age.add_metric([worker_id], seen)
        open_now = self._open_tasks()
        self._seen.update(per_cap, open_now)
        for cap in sorted(self._seen):
            workers, busy, free = per_cap.get(cap, [0, 0, 0])
            live.add_metric([cap], workers)
            used.add_metric([cap], busy)
            available.add_metric([cap], free)
        open_tasks = GaugeMetricFamily(
            "amqpsched_tasks_in_flight",
            "Accepted tasks not answered yet",
            labels=["capability"],
        )
        for cap in sorted(self._seen):
            open_tasks.add_metric([cap], open_now.get(cap, 0))
        return [live, used, available, age, open_tasks]


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._flusher = _Flusher()
        registry.register(self._flusher)
        self._children: dict[tuple[str, ...], _BufferedCounter | _BufferedHistogram] = {}
        build_info(registry, "worker")
        self.tasks = Counter(
            "amqpsched_worker_tasks_total",
            "Attempts this worker finished, by outcome: succeeded, retrying or the error type",
            ["capability", "outcome"],
            registry=registry,
        )
        self.execution = Histogram(
            "amqpsched_worker_execution_seconds",
            "Run time of each attempt on this worker",
            ["capability"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.direct_answers = Counter(
            "amqpsched_worker_direct_answers_total",
            "Succeeded outcomes this worker also published to the task's client (direct answers)",
            registry=registry,
        )
        self.slots_used = Gauge(
            "amqpsched_worker_slots_used_local", "Tasks this worker is running", registry=registry
        )
        self.slots_total = Gauge(
            "amqpsched_worker_slots_local", "Tasks this worker may run at once", registry=registry
        )
        self.dead_lettered = Counter(
            "amqpsched_dead_lettered_total",
            "Messages this process put in the dead-letter queue, by reason",
            ["reason"],
            registry=registry,
        )
        self.reconnects = Counter(
            "amqpsched_broker_reconnects_total",
            "Times the connection to the broker was re-established",
            registry=registry,
        )

    def finished(self, capability: str, outcome: str) -> _BufferedCounter:
        """``tasks{capability, outcome}``, bound once and buffered (as the scheduler's)."""
        child = self._children.get((capability, outcome))
        if child is None:
            child = _BufferedCounter(self.tasks.labels(capability, outcome))
            self._children[(capability, outcome)] = child
            self._flusher.series.append(child)
        assert isinstance(child, _BufferedCounter)
        return child

    def execution_of(self, capability: str) -> _BufferedHistogram:
        """``execution{capability}``, bound once and buffered."""
        child = self._children.get((capability,))
        if child is None:
            child = _BufferedHistogram(self.execution.labels(capability))
            self._children[(capability,)] = child
            self._flusher.series.append(child)
        assert isinstance(child, _BufferedHistogram)
        return child


class ClientMetrics:
    """The client SDK's own call histogram, exported into the registry the caller gives."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Histogram(
            "amqpsched_client_call_seconds",
            "From submit to answer, as the client saw it, by outcome",
            ["capability", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
