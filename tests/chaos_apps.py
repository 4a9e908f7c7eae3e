"""Handlers for the chaos tests, loaded by ``python -m amqpsched.worker --app tests.chaos_apps``.

Each execution is written to the file named by ``CHAOS_EXEC_LOG`` (one ``O_APPEND`` write per
line, so lines of concurrent workers never interleave): ``start <id> <pid>`` before the work and
``end <id> <pid>`` after it (``cancel <id> <pid>`` if it was cancelled). That file is the ground
truth of what ran, and how often."""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, Field

from amqpsched.worker import WorkerApp

EXEC_LOG_ENV = "CHAOS_EXEC_LOG"

app = WorkerApp()


def record(event: str, task_id: str) -> None:
    path = os.environ.get(EXEC_LOG_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {task_id} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


class WorkPayload(BaseModel):
    id: str = Field(description="The task id (handlers do not see it otherwise).")
    sleep: float = Field(default=0.0, ge=0, le=60)


@app.capability(
    "chaos_work",
    description="Records its execution, sleeps, answers its id.",
    payload=WorkPayload,
)
async def chaos_work(payload: WorkPayload) -> dict[str, object]:
    record("start", payload.id)
    try:
        await asyncio.sleep(payload.sleep)
    except asyncio.CancelledError:  # e.g. its connection to the broker was lost
        record("cancel", payload.id)
        raise
    record("end", payload.id)
    return {"id": payload.id, "pid": os.getpid()}


@app.capability(
    "chaos_poison",
    description="Records its execution, then kills its worker.",
    payload=WorkPayload,
)
async def chaos_poison(payload: WorkPayload) -> None:
    record("start", payload.id)
    os._exit(1)
