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
    decode_event,
)
from .state import TaskRecord, TaskStore


def apply_entry(store: TaskStore, cancels: dict[str, float], kind: str, body: bytes) -> None:
    """One journal entry, replayed at start: a dispatch, an answer (or a batch of either), or a
    JSON record."""
    if kind == Kind.TASK:
        apply_dispatch(store, decode_event(TaskMessage, body))
    elif kind == Kind.ANSWER:
        apply_answer(store, decode_event(Answer, body))
    elif kind == Kind.TASK_BATCH:
        for task in decode_event(TaskBatch, body).tasks:
            apply_dispatch(store, task)
    elif kind == Kind.ANSWER_BATCH:
        for item in decode_event(AnswerBatch, body).answers:
            apply_answer(store, item.answer)
    else:
        record = json.loads(body)
        if record.get("k") == "cancelled":
            cancels[record["task_id"]] = record["until"]


def apply_dispatch(store: TaskStore, task: TaskMessage, owner: str | None = None) -> None:
    """A dispatch journaled by ``owner`` (a scheduler id; None if not known)."""
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
        store.add(TaskRecord.of(task, state=TaskState.DISPATCHED, recovered=True, owner=owner))


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
