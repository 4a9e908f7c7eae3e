"""What is measured: the workloads, the measurement of one, and the row it becomes."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .procs import BenchError

H = TypeVar("H")

#: Keys of each object in ``--json``, in order.
JSON_KEYS = (
    "system",
    "workload",
    "in_flight",
    "payload_bytes",
    "tasks",
    "throughput_tps",
    "p50_ms",
    "p99_ms",
)


@dataclass(frozen=True)
class Workload:
    """``tasks`` echo calls of ``payload_bytes`` each, ``in_flight`` at a time.

    ``throughput``: 100-byte payloads at 1, 64 and 1,000 in flight; ``latency``: one call at a
    time (sequential round trips, their p50/p99); ``payload``: 1 KB and 64 KB at 64 in flight;
    ``map``: every task submitted as one batch (amqpsched ``Client.map``, Celery ``group``,
    Dramatiq ``group``)."""

    name: str
    in_flight: int
    payload_bytes: int
    tasks: int
    #: Seconds each caller waits between its calls (``paced``: sequential calls at a low rate,
    #: where the machine is not busy and a round trip is its path, not a queue for the CPU).
    pause: float = 0.0
    #: Times it is run; its row is the median run (by tasks/s). A workload that lasts about a
    #: second (``map``) is moved by one slow moment of the machine.
    runs: int = 1


#: Seconds between two calls of the ``paced`` workload.
PACE = 0.02


def plan(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("throughput", 1, 100, 50),
            Workload("throughput", 64, 100, 300),
            Workload("throughput", 1000, 100, 1000),
            Workload("latency", 1, 100, 100),
            Workload("paced", 1, 100, 30, PACE),
            Workload("payload", 64, 1024, 200),
            Workload("payload", 64, 65536, 100),
            Workload("map", 1000, 100, 1000),
        ]
    return [
        Workload("throughput", 1, 100, 500),
        Workload("throughput", 64, 100, 4000),
        Workload("throughput", 1000, 100, 10000),
        Workload("latency", 1, 100, 1000),
        Workload("paced", 1, 100, 300, PACE),
        Workload("payload", 64, 1024, 3000),
        Workload("payload", 64, 65536, 1000),
        Workload("map", 10000, 100, 10000, runs=3),
    ]


#: ``--payload-shape``: what a payload is made of.
SHAPES = ("text", "rows")


def payload_of(size: int, shape: str = "text") -> Any:
    """The echo payload of about ``size`` bytes of JSON. ``text``: one string of ``size``
    ASCII characters. ``rows``: a list of small objects (numbers, strings, a list), as a
    payload of records would be; the fewest rows that reach ``size`` bytes, at least one."""
    if shape == "text":
        return "x" * size
    rows: list[dict[str, Any]] = []
    length = 1  # the list's brackets, less the last comma
    while length < size or not rows:
        i = len(rows)
        row = {"id": i, "name": f"item {i}", "score": i * 0.25, "tags": ["a", "b"]}
        rows.append(row)
        length += len(json.dumps(row)) + 2
    return rows


@dataclass
class Measurement:
    tasks: int
    elapsed: float
    #: Seconds from submit to result, one per task (empty when only the batch was timed).
    latencies: list[float] = field(default_factory=list)


@dataclass
class Row:
    system: str
    workload: str
    in_flight: int
    payload_bytes: int
    tasks: int = 0
    throughput_tps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: Why nothing was measured (not implemented, not installed, failed), or the tasks/s of
    #: each run of a workload run several times.
    note: str = ""
    #: CPU microseconds per task, by role (scheduler, worker, broker, client).
    cpu_us: dict[str, float] = field(default_factory=dict)
    #: Cores used meanwhile by every other process of the machine (noise from neighbours).
    other_cores: float | None = None

    @classmethod
    def skipped(cls, system: str, w: Workload, note: str) -> Row:
        return cls(system, w.name, w.in_flight, w.payload_bytes, note=note)

    @classmethod
    def measured(cls, system: str, w: Workload, m: Measurement) -> Row:
        row = cls(system, w.name, w.in_flight, w.payload_bytes, tasks=m.tasks)
        row.throughput_tps = m.tasks / m.elapsed if m.elapsed > 0 else None
        if m.latencies:
            lat = sorted(m.latencies)
            row.p50_ms = percentile(lat, 0.50) * 1000
            row.p99_ms = percentile(lat, 0.99) * 1000
        return row

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None, digits: int) -> float | None:
            return None if x is None else round(x, digits)

        values: dict[str, Any] = {
            "system": self.system,
            "workload": self.workload,
            "in_flight": self.in_flight,
            "payload_bytes": self.payload_bytes,
            "tasks": self.tasks,
            "throughput_tps": r(self.throughput_tps, 1),
            "p50_ms": r(self.p50_ms, 3),
            "p99_ms": r(self.p99_ms, 3),
        }
        return {k: values[k] for k in JSON_KEYS}


def median_run(runs: list[Measurement]) -> Measurement:
    """The run of median throughput (of an even count, the slower of the middle two)."""
    ranked = sorted(runs, key=lambda m: m.tasks / m.elapsed if m.elapsed > 0 else 0.0)
    return ranked[(len(ranked) - 1) // 2]


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[rank - 1]


async def drive_async(
    call: Callable[[str], Awaitable[Any]],
    payload: str,
    total: int,
    in_flight: int,
    pause: float = 0.0,
) -> Measurement:
    """``in_flight`` coroutines, each calling one task after another until ``total`` are done:
    exactly ``in_flight`` calls are outstanding until the tail (each waits ``pause`` seconds
    between its calls)."""
    latencies: list[float] = []
    remaining = total

    async def lane() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            result = await call(payload)
            latencies.append(time.perf_counter() - started)
            if result != payload:
                raise BenchError(f"echo answered {str(result)[:60]!r}")
            if pause:
                await asyncio.sleep(pause)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(min(in_flight, total))))
    return Measurement(total, time.perf_counter() - started, latencies)


def drive_window(
    send: Callable[[str], H],
    wait: Callable[[H], Any],
    payload: str,
    total: int,
    in_flight: int,
    pause: float = 0.0,
) -> Measurement:
    """For blocking clients, in one thread: keep a window of ``in_flight`` sent tasks, wait for
    the oldest, send one more. Tasks finish about in order, so about ``in_flight`` are
    outstanding; a task's latency runs until the bench sees its result."""
    latencies: list[float] = []
    window: deque[tuple[float, H]] = deque()
    sent = 0
    started = time.perf_counter()
    while sent < min(in_flight, total):
        window.append((time.perf_counter(), send(payload)))
        sent += 1
    while window:
        t0, handle = window.popleft()
        result = wait(handle)
        latencies.append(time.perf_counter() - t0)
        if result != payload:
            raise BenchError(f"echo answered {str(result)[:60]!r}")
        if pause:
            time.sleep(pause)
        if sent < total:
            window.append((time.perf_counter(), send(payload)))
            sent += 1
    return Measurement(total, time.perf_counter() - started, latencies)
