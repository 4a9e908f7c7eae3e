"""Handlers for the observability tests, loaded by
``python -m amqpsched.worker --app tests.obs_apps``: one that always fails, one that fails the
first attempt of each payload and succeeds on the retry."""

from __future__ import annotations

from pydantic import JsonValue

from amqpsched.protocol import RetryPolicy
from amqpsched.worker import WorkerApp

app = WorkerApp()

#: Payloads whose first attempt already failed (one worker process: memory is enough).
_failed_once: set[str] = set()


@app.capability("obs_fail", description="Always raises (a handler_error).")
async def obs_fail(payload: JsonValue) -> JsonValue:
    raise RuntimeError(f"obs_fail always fails ({payload!r})")


@app.capability(
    "obs_flaky",
    description="Fails the first attempt of each payload; the retry answers the payload.",
    retry=RetryPolicy(max_attempts=2, backoff=0.1),
)
async def obs_flaky(payload: JsonValue) -> JsonValue:
    key = repr(payload)
    if key not in _failed_once:
        _failed_once.add(key)
        raise RuntimeError("first attempt fails")
    return payload
