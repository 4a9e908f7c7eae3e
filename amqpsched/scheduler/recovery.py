"""Rebuilding the scheduler's memory from its journal: pure functions over the task store."""

from __future__ import annotations

import json
import time

from ..protocol import (
    Answer,
    AnswerBatch,
    Kind,
    TaskBatch,
    TaskMessage,
    TaskState,
)
from .passthrough import decode_message
from .state import TaskRecord, TaskStore


def journaled_tasks(kind: str, body: bytes) -> list[TaskMessage]:
    """The dispatches a journal entry holds: one (``task``), several (``task_batch``) or none."""
    if kind == Kind.TASK:
        return [decode_message(TaskMessage, body)]
    if kind == Kind.TASK_BATCH:
        return decode_message(TaskBatch, body).tasks
    return []


def journaled_answers(kind: str, body: bytes) -> list[Answer]:
    """The answers a journal entry holds: one (``answer``), several (``answer_batch``) or none."""
    if kind == Kind.ANSWER:
        return [decode_message(Answer, body)]
    if kind == Kind.ANSWER_BATCH:
        return [item.answer for item in decode_message(AnswerBatch, body).answers]
    return []


def apply_entry(
    store: TaskStore,
    cancels: dict[str, float],
    kind: str,
    body: bytes,
    owner: str | None = None,
    offset: int = -1,
) -> None:
    """One journal entry at ``offset``, written by the scheduler ``owner``: a dispatch, an
    answer (or a batch of either), or a JSON record."""
    if kind in (Kind.TASK, Kind.TASK_BATCH):
        for task in journaled_tasks(kind, body):
            apply_dispatch(store, task, owner, offset)
    elif kind in (Kind.ANSWER, Kind.ANSWER_BATCH):
        for answer in journaled_answers(kind, body):
            apply_answer(store, answer)
    else:
        record = json.loads(body)
        if record.get("k") == "cancelled":
            cancels[record["task_id"]] = record["until"]


def apply_dispatch(
    store: TaskStore, task: TaskMessage, owner: str | None = None, offset: int = -1
) -> None:
    """A dispatch journaled by ``owner`` (a scheduler id; None if not known) at ``offset``."""
    known = store.get(task.task_id)
    if known is not None and not known.final:
        if task.attempt >= known.attempt:  # a re-dispatch
            known.attempt, known.task = task.attempt, task
            known.owner = owner or known.owner
            if task.attempt > known.attempts:
                known.state, known.worker_id = TaskState.DISPATCHED, None
        return
    # New, or a later dispatch of a finished id: a replay from the dead-letter queue.
    if known is None or task.submitted_at >= (known.finished_at or 0.0):
        record = TaskRecord.of(
            task, state=TaskState.DISPATCHED, recovered=True, owner=owner, since=offset
        )
        store.add(record)


def apply_answer(store: TaskStore, answer: Answer) -> None:
    if answer.task_id is None:
        return
    at = answer.finished_at or time.time()
    known = store.get(answer.task_id)
    if known is None:
        known = TaskRecord(
            answer.task_id, answer.capability or "", "", "", answer.submitted_at or at, at
        )
    elif known.final and (known.finished_at or 0.0) >= at:
        return  # an older answer than the one known (a replayed task's first run)
    elif not known.final and at < known.submitted_at:
        return  # the answer of a run before this one (read out of order)
    known.attempts = answer.attempts
    store.finish(known, answer, at)
