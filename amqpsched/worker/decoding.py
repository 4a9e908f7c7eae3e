"""The worker's decoding of tasks: a large payload read by msgspec, in one pass with the rest.

A handler needs its payload as Python values. For a payload of many small objects, msgspec reads
JSON about twice as fast as pydantic: a task of 64 KiB of records took 265 µs this way (the rest
of the task then validated by pydantic, its payload set apart) against 555 µs by pydantic alone.
For a small body, or for one long string, pydantic alone is as fast or faster, so a task goes
this way only from :data:`FROM_BYTES` bytes. Both give the same Python values for any JSON the
scheduler passes on. A body that either step refuses is decoded by
:func:`protocol.decode_event`, which gives the reason."""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec
from pydantic import ValidationError

from ..protocol import TaskBatch, TaskMessage, decode_event

#: Bytes of body per task from which msgspec reads it.
FROM_BYTES = 2048

T = TypeVar("T", TaskMessage, TaskBatch)
_BODY = msgspec.json.Decoder(dict[str, Any])
_PAYLOAD = b'"payload"'


def decode_task(model: type[T], raw: bytes) -> T:
    """A ``task`` (:class:`TaskMessage`) or ``task_batch`` (:class:`TaskBatch`) body."""
    if _large(raw, model is TaskBatch):
        decoded = _read(model, raw)
        if decoded is not None:
            return decoded
    return decode_event(model, raw)


def _large(raw: bytes, batch: bool) -> bool:
    """Whether ``raw`` holds at least :data:`FROM_BYTES` bytes a task: in a batch, judged by
    the distance between the first two payloads (found without reading the rest)."""
    if len(raw) < FROM_BYTES:
        return False
    if not batch:
        return True
    first = raw.find(_PAYLOAD)
    second = raw.find(_PAYLOAD, first + 1) if first >= 0 else -1
    return second < 0 or second - first >= FROM_BYTES


def _read(model: type[T], raw: bytes) -> T | None:
    try:
        fields = _BODY.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    items = fields.get("tasks") if model is TaskBatch else [fields]
    if not isinstance(items, list) or not items:
        return None
    payloads = []
    for item in items:
        if not isinstance(item, dict) or "payload" not in item:
            return None
        payloads.append(item["payload"])
        item["payload"] = None
    try:
        decoded = model.model_validate(fields)
    except ValidationError:
        return None
    tasks = decoded.tasks if isinstance(decoded, TaskBatch) else [decoded]
    for task, payload in zip(tasks, payloads, strict=True):
        task.__dict__["payload"] = payload
    return decoded
