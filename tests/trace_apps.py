"""Handlers for the tracing and log tests, loaded in process or by
``python -m amqpsched.worker --app tests.trace_apps``."""

from __future__ import annotations

import logging

from pydantic import JsonValue

from amqpsched import tracing
from amqpsched.protocol import RetryPolicy
from amqpsched.worker import WorkerApp

app = WorkerApp()
log = logging.getLogger("tests.trace_apps")

#: Payloads whose first attempt already failed.
_failed_once: set[str] = set()


@app.capability("trace_id", description="Answers the trace id the handler sees.")
async def trace_id(payload: JsonValue) -> JsonValue:
    return tracing.current_trace_id()


@app.capability("trace_sync_log", description="A sync handler that logs a line of its own.")
def trace_sync_log(payload: JsonValue) -> JsonValue:
    log.info("handler says %s", payload)
    return tracing.current_trace_id()


@app.capability(
    "trace_flaky",
    description="Fails the first attempt of each payload, then answers its trace id.",
    retry=RetryPolicy(max_attempts=2, backoff=0.1),
)
async def trace_flaky(payload: JsonValue) -> JsonValue:
    key = repr(payload)
    if key not in _failed_once:
        _failed_once.add(key)
        raise RuntimeError("first attempt fails")
    return tracing.current_trace_id()


@app.capability("trace_fail", description="Always fails.", retry=RetryPolicy(max_attempts=1))
async def trace_fail(payload: JsonValue) -> JsonValue:
    raise RuntimeError("trace_fail fails")
