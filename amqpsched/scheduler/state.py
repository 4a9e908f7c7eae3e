"""What the scheduler remembers about tasks: records, their deadlines, and bounded retention."""

from __future__ import annotations

import asyncio
import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Protocol

from ..protocol import Answer, ErrorType, RawJson, Status, TaskMessage, TaskState
from .cold import BATCH_REPLY, RECOVERED, ColdTasks


@dataclass
class TaskRecord:
    task_id: str
    capability: str
    reply_to: str
    correlation_id: str
    submitted_at: float
    deadline: float
    state: TaskState = TaskState.QUEUED
    #: The last attempt a worker took (0: none yet).
    attempts: int = 0
    #: The attempt now allowed to answer; outcomes of older attempts are fenced off.
    attempt: int = 1
    worker_id: str | None = None
    #: The dispatched message, kept until the answer, to dispatch again if its worker dies.
    task: TaskMessage | None = None
    idempotency_key: str | None = None
    #: Read back from the journal by a scheduler that started after it was dispatched.
    recovered: bool = False
    answer: Answer | None = None
    finished_at: float | None = None
    #: Extra (reply_to, correlation_id) pairs waiting for the final answer.
    watchers: list[tuple[str, str]] = field(default_factory=list)
    #: W3C trace context sent on with its dispatches and answer (not journaled).
    traceparent: str | None = None
    #: Its submitter takes ``answer_batch`` replies (journaled in its task: ``answer_batch``).
    batch_reply: bool = False
    #: Confirmed when its first dispatch is: a second submission of it waits for that.
    dispatching: asyncio.Future[None] | None = None
    #: The scheduler that dispatched it, which runs its timers (None: not known).
    owner: str | None = None
    #: Its answer, sent but not confirmed yet: final only once it is (it may yet be reopened).
    answering: asyncio.Future[Any] | None = None
    #: A journal offset at or before its dispatch entry (-1: not known): where to read it back
    #: from if it is kept cold (``cold.py``) while it waits.
    since: int = -1
    #: Its place among the waiting records (in the order they came).
    seq: int = 0

    @classmethod
    def of(cls, task: TaskMessage, **fields: Any) -> TaskRecord:
        """The record of a dispatched ``task``."""
        return cls(
            task_id=task.task_id,
            capability=task.capability,
            reply_to=task.reply_to,
            correlation_id=task.correlation_id,
            submitted_at=task.submitted_at,
            deadline=task.deadline,
            attempt=task.attempt,
            task=task,
            idempotency_key=task.idempotency_key,
            **{"batch_reply": task.answer_batch, **fields},
        )

    @property
    def final(self) -> bool:
        return self.answer is not None

    @property
    def started(self) -> bool:
        return self.state == TaskState.RUNNING or self.final


def is_fenced(record: TaskRecord | None, attempt: int) -> bool:
    """An event of ``attempt`` must be ignored: the task was dispatched again since."""
    return record is not None and attempt < record.attempt


class TaskStore(Protocol):
    """The scheduler's memory of tasks. In-process now; shareable through RabbitMQ later."""

    def get(self, task_id: str) -> TaskRecord | None: ...
    def add(self, record: TaskRecord) -> None: ...
    def finish(self, record: TaskRecord, answer: Answer, now: float) -> None: ...
    def due(self, now: float) -> list[TaskRecord]: ...
    def purge(self, now: float) -> int: ...
    def forget(self, task_id: str) -> None: ...
    def remind(self, record: TaskRecord, at: float) -> None: ...
    def reopen(
        self, record: TaskRecord, state: TaskState, watchers: list[tuple[str, str]]
    ) -> None: ...
    def running_on(self, worker_id: str) -> list[TaskRecord]: ...
    def by_key(self, key: str, now: float) -> TaskRecord | None: ...


def final_state(answer: Answer) -> TaskState:
    return TaskState.SUCCEEDED if answer.status == Status.SUCCEEDED else TaskState.FAILED


def result_bytes(answer: Answer) -> int:
    """The bytes of an answer's result that count against the store's budget: those of a result
    kept as its bytes (2 KiB and more, ``scheduler.passthrough``); a small one counts 0."""
    result: object = answer.result  # a RawJson where the scheduler kept it raw
    return len(result.raw) if isinstance(result, RawJson) else 0


def timeout_error(has_live_worker: bool) -> ErrorType:
    """The error a task gets when its deadline passes before any worker started it."""
    return ErrorType.EXPIRED if has_live_worker else ErrorType.NO_WORKER


def coolable(record: TaskRecord, span: float) -> bool:
    """Whether ``record`` may be kept cold: a first dispatch, confirmed, waiting for a worker,
    nobody else waiting on it, its dispatch in the journal for longer than it can wait."""
    return (
        record.state in (TaskState.QUEUED, TaskState.DISPATCHED)
        and record.answer is None
        and record.attempts == 0
        and record.attempt == 1
        and record.since >= 0
        and not record.watchers
        and record.dispatching is None
        and record.answering is None
        and record.deadline - record.submitted_at < span
    )


class MemoryTaskStore:
    """Records in insertion order; finished ones kept ``retention`` seconds; at most ``max_size``
    records (finished ones are dropped first, then the oldest); finished ones holding at most
    ``max_result_bytes`` of results (:func:`result_bytes`; past it, the oldest of those holding
    some go first). Past ``hot_limit`` waiting tasks, the newest are kept cold
    (:class:`~amqpsched.scheduler.cold.ColdTasks`) if their dispatch stays in the journal for
    ``cold_span`` seconds."""

    def __init__(
        self,
        retention: float,
        max_size: int,
        idempotency_window: float = 3600.0,
        hot_limit: int = 5000,
        cold_span: float = 0.0,
        max_result_bytes: int | None = None,
    ) -> None:
        self.retention = retention
        self.max_size = max_size
        self.max_result_bytes = max_result_bytes
        #: Bytes of the results kept (:func:`result_bytes`), and of each, oldest answer first.
        self.result_bytes = 0
        self._sizes: dict[str, int] = {}
        #: Finished records forgotten to keep within ``max_result_bytes``.
        self.shed = 0
        self.idempotency_window = idempotency_window
        self.hot_limit = hot_limit
        self.cold_span = cold_span
        self.cold = ColdTasks()
        #: Unstarted records, oldest first: the candidates to be kept cold (newest first).
        self._waiting: dict[str, None] = {}
        self._seq = 0
        self._records: OrderedDict[str, TaskRecord] = OrderedDict()
        self._finished: OrderedDict[str, float] = OrderedDict()
        self._deadlines: list[tuple[float, str]] = []
        self._keys: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._open: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._records)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._records.get(task_id)

    def add(self, record: TaskRecord) -> None:
        if record.task_id in self._records:
            self._forget(record.task_id)
        elif len(self.cold):
            self.cold.pop(record.task_id)  # known whole again
        self._records[record.task_id] = record
        if not record.final:
            self._open[record.capability] = self._open.get(record.capability, 0) + 1
            if not record.started:
                self._waiting[record.task_id] = None
                record.seq = self._seq
                self._seq += 1
        heapq.heappush(self._deadlines, (record.deadline, record.task_id))
        if record.idempotency_key is not None:
            self._keys[record.idempotency_key] = (record.task_id, record.submitted_at)
            self._keys.move_to_end(record.idempotency_key)
        while len(self._records) > self.max_size:
            victim = next(iter(self._finished), None) or next(iter(self._records))
            self._forget(victim)

    def finish(self, record: TaskRecord, answer: Answer, now: float) -> None:
        if not record.final and record.task_id in self._records:
            self._close(record.capability)
        record.answer = answer
        record.state = final_state(answer)
        record.finished_at = now
        record.watchers.clear()
        record.task = None  # its payload is not needed any more
        self._waiting.pop(record.task_id, None)
        if record.task_id not in self._records:
            self.add(record)
        self._finished[record.task_id] = now
        self._finished.move_to_end(record.task_id)
        size = result_bytes(answer)
        self.result_bytes += size - self._sizes.pop(record.task_id, 0)
        if size:
            self._sizes[record.task_id] = size
            if self.max_result_bytes is not None and self.result_bytes > self.max_result_bytes:
                self._shed(record.task_id)

    def fit(self) -> None:
        """Shed what :meth:`finish` could not: answers confirmed since (called periodically)."""
        if self.max_result_bytes is not None and self.result_bytes > self.max_result_bytes:
            self._shed(None)

    def _shed(self, newest: str | None) -> None:
        """Forget the oldest finished records holding results until those left fit the budget;
        never ``newest``, just answered (a result larger than the budget is kept alone), nor
        one whose answer is not confirmed yet (it may be reopened: :meth:`fit` sheds it later,
        if need be)."""
        assert self.max_result_bytes is not None
        excess = self.result_bytes - self.max_result_bytes
        victims = []
        for task_id, size in self._sizes.items():  # oldest first: most often one or two
            if excess <= 0:
                break
            record = self._records.get(task_id)
            if task_id != newest and (record is None or record.answering is None):
                victims.append(task_id)
                excess -= size
        for task_id in victims:
            self._forget(task_id)
        self.shed += len(victims)

    def due(self, now: float) -> list[TaskRecord]:
        """Unstarted, unanswered records whose deadline has passed (each returned once)."""
        out: list[TaskRecord] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, task_id = heapq.heappop(self._deadlines)
            record = self._records.get(task_id)
            if record is not None and not record.started:
                out.append(record)
        return out

    def reopen(self, record: TaskRecord, state: TaskState, watchers: list[tuple[str, str]]) -> None:
        """Undo :meth:`finish` (its answer could not be sent)."""
        record.answer = None
        record.finished_at = None
        record.state = state
        record.watchers = watchers
        self._finished.pop(record.task_id, None)
        self.result_bytes -= self._sizes.pop(record.task_id, 0)
        if record.task_id in self._records:
            self._open[record.capability] = self._open.get(record.capability, 0) + 1

    def open_counts(self) -> dict[str, int]:
        """Unanswered tasks per capability."""
        counts = dict(self._open)
        for capability, n in self.cold.counts().items():
            counts[capability] = counts.get(capability, 0) + n
        return counts

    def cool(self) -> int:
        """Keep the newest waiting records cold, past ``hot_limit``: workers take the oldest
        first, so those stay whole. Returns how many."""
        excess = len(self._waiting) - self.hot_limit
        if excess <= 0:
            return 0
        # Only among the newest ``excess``: one not coolable yet (its dispatch unconfirmed)
        # is cooled once it is, not replaced by an older one.
        newest = [self._records.get(task_id) for task_id in islice(reversed(self._waiting), excess)]
        return sum(
            self._cool(record)
            for record in newest
            if record is not None and coolable(record, self.cold_span)
        )

    def cool_one(self, record: TaskRecord) -> bool:
        """Keep ``record`` cold if the store is past its limit (its dispatch was just
        confirmed: the newest waiting record)."""
        if len(self._waiting) <= self.hot_limit or not coolable(record, self.cold_span):
            return False
        oldest = self._records.get(next(iter(self._waiting)))
        if oldest is not None and record.seq < oldest.seq + self.hot_limit:
            return False  # among the oldest, which workers take first: confirmed late
        return self._cool(record)

    def _cool(self, record: TaskRecord) -> bool:
        if self._records.get(record.task_id) is not record:
            return False
        flags = (RECOVERED if record.recovered else 0) | (BATCH_REPLY if record.batch_reply else 0)
        try:
            self.cold.add(record.task_id, record.capability, record.deadline, record.since, flags)
        except OverflowError:
            return False
        self._forget(record.task_id)
        if len(self._deadlines) > 2 * len(self._records) + 4096:  # drop those of cold ones
            self._deadlines = [d for d in self._deadlines if d[1] in self._records]
            heapq.heapify(self._deadlines)
        return True

    def unwait(self, task_id: str) -> None:
        """``task_id`` started: it is not waiting any more."""
        self._waiting.pop(task_id, None)

    def waiting(self) -> int:
        """Records that may be waiting (an upper bound: started ones leave lazily)."""
        return len(self._waiting)

    def _close(self, capability: str) -> None:
        left = self._open.get(capability, 0) - 1
        if left > 0:
            self._open[capability] = left
        else:
            self._open.pop(capability, None)

    def remind(self, record: TaskRecord, at: float) -> None:
        """Return ``record`` from :meth:`due` again at ``at`` (an answer that could not be sent)."""
        heapq.heappush(self._deadlines, (at, record.task_id))

    def running_on(self, worker_id: str) -> list[TaskRecord]:
        return [
            r
            for r in self._records.values()
            if r.worker_id == worker_id and r.state == TaskState.RUNNING
        ]

    def by_key(self, key: str, now: float) -> TaskRecord | None:
        task_id = self.key_task(key, now)
        return None if task_id is None else self._records.get(task_id)

    def key_task(self, key: str, now: float) -> str | None:
        """The id of the task an idempotency key maps to (it may be kept cold)."""
        found = self._keys.get(key)
        if found is None or found[1] + self.idempotency_window < now:
            return None
        return found[0]

    def forget(self, task_id: str) -> None:
        self._forget(task_id)
        if len(self.cold):
            self.cold.pop(task_id)

    def purge(self, now: float) -> int:
        while self._keys:
            key, (_, at) = next(iter(self._keys.items()))
            if at + self.idempotency_window > now:
                break
            del self._keys[key]
        removed = 0
        while self._finished:
            task_id, finished_at = next(iter(self._finished.items()))
            if finished_at + self.retention > now:
                break
            self._forget(task_id)
            removed += 1
        return removed

    def _forget(self, task_id: str) -> None:
        record = self._records.pop(task_id, None)
        if record is not None and not record.final:
            self._close(record.capability)
        self._finished.pop(task_id, None)
        self._waiting.pop(task_id, None)
        self.result_bytes -= self._sizes.pop(task_id, 0)
