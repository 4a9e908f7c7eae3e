"""Structured logs: the task a log line is about (id, capability, attempt, worker, trace), kept in
a context variable, and a formatter that writes one JSON object per line.

The scheduler and the worker set the context around handling a task; every log line emitted
meanwhile (a handler's own included) carries it, so one task can be followed across processes."""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, NamedTuple


class TaskContext(NamedTuple):
    task_id: str
    capability: str | None = None
    attempt: int | None = None
    worker_id: str | None = None
    traceparent: str | None = None


_context: ContextVar[TaskContext | None] = ContextVar("amqpsched_task", default=None)


def current() -> TaskContext | None:
    """The task being handled in this context, if any."""
    return _context.get()


class _Scope:
    """Sets the task context for a ``with`` block (a class: cheaper than a generator, and the
    worker enters one per task)."""

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: TaskContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> TaskContext:
        self._token = _context.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        _context.reset(self._token)


def task_context(
    task_id: str,
    capability: str | None = None,
    attempt: int | None = None,
    worker_id: str | None = None,
    traceparent: str | None = None,
) -> _Scope:
    """Log lines emitted inside carry this task (one context variable set and reset)."""
    return _Scope(TaskContext(task_id, capability, attempt, worker_id, traceparent))


def context_fields(ctx: TaskContext | None) -> dict[str, Any]:
    if ctx is None:
        return {}
    fields: dict[str, Any] = {"task_id": ctx.task_id}
    if ctx.capability is not None:
        fields["capability"] = ctx.capability
    if ctx.attempt is not None:
        fields["attempt"] = ctx.attempt
    if ctx.worker_id is not None:
        fields["worker_id"] = ctx.worker_id
    if ctx.traceparent is not None:
        fields["trace_id"] = ctx.traceparent[3:35]
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the task context when set, and
    ``exception`` (its traceback) when one is logged."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(context_fields(_context.get()))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The plain-text format, with `` task=<id> capability=<name> attempt=<n>`` appended inside
    a task's context."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        ctx = _context.get()
        if ctx is None:
            return text
        extra = " ".join(f"{k}={v}" for k, v in context_fields(ctx).items())
        return f"{text} [{extra}]"
