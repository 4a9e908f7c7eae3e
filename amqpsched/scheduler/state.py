"""What the scheduler remembers about tasks: records, their deadlines, and bounded retention."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import Answer, ErrorType, Status, TaskState


@dataclass
class TaskRecord:
    task_id: str
    capability: str
    reply_to: str
    correlation_id: str
    submitted_at: float
    deadline: float
    state: TaskState = TaskState.QUEUED
    attempts: int = 0
    answer: Answer | None = None
    finished_at: float | None = None
    #: Extra (reply_to, correlation_id) pairs waiting for the final answer.
    watchers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def final(self) -> bool:
        return self.answer is not None

    @property
    def started(self) -> bool:
        return self.state in (TaskState.RUNNING,) or self.final


class TaskStore(Protocol):
    """The scheduler's memory of tasks. In-process now; shareable through RabbitMQ later."""

    def get(self, task_id: str) -> TaskRecord | None: ...
    def add(self, record: TaskRecord) -> None: ...
    def finish(self, record: TaskRecord, answer: Answer, now: float) -> None: ...
    def due(self, now: float) -> list[TaskRecord]: ...
    def purge(self, now: float) -> int: ...


def final_state(answer: Answer) -> TaskState:
    return TaskState.SUCCEEDED if answer.status == Status.SUCCEEDED else TaskState.FAILED


def timeout_error(has_live_worker: bool) -> ErrorType:
    """The error a task gets when its deadline passes before any worker started it."""
    return ErrorType.EXPIRED if has_live_worker else ErrorType.NO_WORKER


class MemoryTaskStore:
    """Records in insertion order; finished ones kept ``retention`` seconds; at most ``max_size``
    records (finished ones are dropped first, then the oldest)."""

    def __init__(self, retention: float, max_size: int) -> None:
        self.retention = retention
        self.max_size = max_size
        self._records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._deadlines: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._records)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    def add(self, record: TaskRecord) -> None:
        self._records[record.task_id] = record
        heapq.heappush(self._deadlines, (record.deadline, record.task_id))
        while len(self._records) > self.max_size:
            victim = next(iter(self._finished), None) or next(iter(self._records))
            self._forget(victim)

    def finish(self, record: TaskRecord, answer: Answer, now: float) -> None:
        record.answer = answer
        record.state = final_state(answer)
        record.finished_at = now
        record.watchers.clear()
        if record.task_id not in self._records:
            self.add(record)
        self._finished[record.task_id] = now
        self._finished.move_to_end(record.task_id)

    def due(self, now: float) -> list[TaskRecord]:
        """Unstarted, unanswered records whose deadline has passed (each returned once)."""
        out: list[TaskRecord] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id = heapq.heappop(self._deadlines)
            record = self._records.get(task_id)
            if record is not None and not record.started:
                out.append(record)
        return out

    def purge(self, now: float) -> int:
        removed = 0
        while self._finished:
            task_id, finished_at = next(iter(self._finished.items()))
            if finished_at + self.retention > now:
                break
            self._forget(task_id)
            removed += 1
        return removed

    def _forget(self, task_id: str) -> None:
        self._records.pop(task_id, None)
        self._finished.pop(task_id, None)
