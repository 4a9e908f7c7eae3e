"""Structured logs that follow one task across processes, and W3C trace context (with
OpenTelemetry spans when the SDK is installed) carried end to end."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from amqpsched import TaskFailed, logs, tracing
from amqpsched.protocol import PROTOCOL_VERSION

from .conftest import Proc, RawClient, System
from .trace_apps import app as trace_app

CAPS = ("trace_id", "trace_sync_log", "trace_flaky", "trace_fail")


def json_lines(output: str) -> list[dict[str, Any]]:
    """Every line of ``output``, each of which must be one JSON object."""
    lines = []
    for line in output.splitlines():
        if line.strip():
            parsed = json.loads(line)  # fails the test on any non-JSON line
            assert isinstance(parsed, dict), line
            lines.append(parsed)
    return lines


# -- (a) JSON logs across processes --------------------------------------------------------------
async def test_json_logs_follow_a_task_across_processes(
    system: System, spawn: Callable[..., Proc]
) -> None:
    system.capabilities.update(CAPS)
    env = system.env(AMQPSCHED_LOG_JSON="true", AMQPSCHED_LOG_LEVEL="DEBUG")
    sched = spawn(["-m", "amqpsched.scheduler"], env, "sched")
    worker = spawn(
        ["-m", "amqpsched.worker", "--app", "tests.trace_apps", "-c", "trace_sync_log"],
        env,
        "worker",
    )
    await asyncio.gather(sched.wait_for_output("consuming"), worker.wait_for_output("consuming"))
    client = await system.client()
    handle = await client.submit("trace_sync_log", "hello", timeout=20)
    trace_id = await handle.result()
    assert isinstance(trace_id, str) and len(trace_id) == 32

    def about_task(proc: Proc) -> list[dict[str, Any]]:
        return [line for line in json_lines(proc.output()) if line.get("task_id") == handle.task_id]

    async with asyncio.timeout(10):
        while not (about_task(sched) and about_task(worker)):
            await asyncio.sleep(0.1)
    for line in json_lines(sched.output()) + json_lines(worker.output()):
        assert {"time", "level", "logger", "message"} <= set(line), line
    for line in about_task(sched):
        assert line["capability"] == "trace_sync_log", line
        assert line["trace_id"] == trace_id, line
    handler_lines = [line for line in about_task(worker) if line["message"] == "handler says hello"]
    assert handler_lines, worker.output()  # the sync handler's own line carries the context
    for line in about_task(worker):
        assert line["capability"] == "trace_sync_log", line
        assert line["attempt"] == 1, line
        assert line["worker_id"], line
        assert line["trace_id"] == trace_id, line


def test_json_and_text_formatters_carry_the_task_context() -> None:
    record = logging.LogRecord("amqpsched.x", logging.INFO, __file__, 1, "hi %s", ("there",), None)
    tp = tracing.new_traceparent()
    plain = logs.TextFormatter("%(levelname)s %(message)s")
    assert plain.format(record) == "INFO hi there"
    assert json.loads(logs.JsonFormatter().format(record))["message"] == "hi there"
    with logs.task_context("t-1", "echo", 2, "w-1", tp):
        line = json.loads(logs.JsonFormatter().format(record))
        text = plain.format(record)
    assert line["task_id"] == "t-1"
    assert (line["capability"], line["attempt"], line["worker_id"]) == ("echo", 2, "w-1")
    assert line["trace_id"] == tp[3:35]
    assert "task_id=t-1" in text and "attempt=2" in text
    assert logs.current() is None


def test_traceparent_validation() -> None:
    tp = tracing.new_traceparent()
    assert tracing.valid(tp) == tp
    assert tracing.valid(tp.encode()) == tp
    assert tracing.valid("01-" + tp[3:] + "-extra") == "01-" + tp[3:]
    for bad in (
        None,
        42,
        "",
        "garbage",
        tp.upper(),
        "ff" + tp[2:],
        f"00-{'0' * 32}-{tp[36:52]}-01",
        f"00-{tp[3:35]}-{'0' * 16}-01",
        tp + "-extra",
        b"\xff" * 55,
    ):
        assert tracing.valid(bad) is None, bad


# -- (b) traceparent end to end -------------------------------------------------------------------
async def raw_call(
    raw: RawClient, capability: str, payload: Any, headers: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit as any AMQP client would; the answer's body and headers."""
    body = {"v": PROTOCOL_VERSION, "capability": capability, "payload": payload, "timeout": 20}
    corr = await raw.send(json.dumps(body).encode(), type_="submit", headers=headers)
    msg = await raw.reply_message(corr, timeout=20)
    return json.loads(msg.body), dict(msg.headers or {})


async def test_traceparent_travels_end_to_end(system: System) -> None:
    system.capabilities.update(CAPS)
    await system.scheduler()
    await system.worker(*CAPS, app=trace_app)
    async with RawClient(system) as raw:
        for capability in ("trace_id", "trace_sync_log", "trace_flaky"):
            tp = tracing.new_traceparent()
            answer, headers = await raw_call(raw, capability, capability, {"traceparent": tp})
            assert answer["status"] == "succeeded", answer
            assert answer["result"] == tp[3:35], capability  # what the handler saw
            back = tracing.valid(headers.get("traceparent"))
            assert back is not None and back[3:35] == tp[3:35], headers
        # A malformed traceparent is dropped: the task runs, in no trace.
        answer, headers = await raw_call(raw, "trace_id", 1, {"traceparent": "00-nonsense"})
        assert answer["status"] == "succeeded", answer
        if not tracing.enabled():  # with OpenTelemetry, the dispatch span starts a new trace
            assert answer["result"] is None
            assert "traceparent" not in headers

    # The SDK: an explicit traceparent, else a new trace per submission.
    client = await system.client()
    tp = tracing.new_traceparent()
    assert await client.call("trace_id", 1, traceparent=tp) == tp[3:35]
    first, second = await asyncio.gather(client.call("trace_id", 2), client.call("trace_id", 3))
    assert isinstance(first, str) and isinstance(second, str)
    assert len(first) == 32 and first != second


# -- (c) OpenTelemetry spans -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def span_exporter() -> Iterator[Any]:
    """One SDK tracer provider for the whole session (OpenTelemetry allows setting it once);
    tests find their own spans by trace id."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert tracing.enabled()
    yield exporter
    provider.shutdown()


async def spans_of(exporter: Any, trace_id: str, names: set[str]) -> dict[str, Any]:
    """The finished spans of ``trace_id`` by name, once all of ``names`` are there."""
    async with asyncio.timeout(10):
        while True:
            found = {
                span.name: span
                for span in exporter.get_finished_spans()
                if f"{span.context.trace_id:032x}" == trace_id
            }
            if names <= set(found):
                return found
            await asyncio.sleep(0.05)


async def test_otel_spans_are_linked_across_client_scheduler_and_worker(
    system: System, span_exporter: Any
) -> None:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind, StatusCode

    system.capabilities.update(CAPS)
    await system.scheduler()
    await system.worker(*CAPS, app=trace_app)
    client = await system.client()
    names = {"amqpsched.submit", "amqpsched.dispatch", "amqpsched.execute"}

    trace_id = await client.call("trace_id", "otel", timeout=20)
    assert isinstance(trace_id, str)
    spans = await spans_of(span_exporter, trace_id, names)
    submit, dispatch, execute = (spans[f"amqpsched.{n}"] for n in ("submit", "dispatch", "execute"))
    assert submit.kind == SpanKind.PRODUCER
    assert dispatch.parent.span_id == submit.context.span_id
    assert execute.parent.span_id == dispatch.context.span_id
    assert execute.attributes["amqpsched.capability"] == "trace_id"
    assert execute.attributes["amqpsched.attempt"] == 1
    assert execute.attributes["amqpsched.task_id"] == dispatch.attributes["amqpsched.task_id"]
    assert execute.status.status_code != StatusCode.ERROR
    # The handler saw the execute span's trace context.
    assert f"{execute.context.trace_id:032x}" == trace_id

    # Inside an application's own span, the submission joins its trace; a failure is an error.
    tracer = trace.get_tracer("tests")
    with (
        tracer.start_as_current_span("app") as app_span,
        pytest.raises(TaskFailed, match="trace_fail fails"),
    ):
        await client.call("trace_fail", 1, timeout=20)
    app_trace = f"{app_span.get_span_context().trace_id:032x}"
    spans = await spans_of(span_exporter, app_trace, names)
    assert spans["amqpsched.submit"].parent.span_id == app_span.get_span_context().span_id
    assert spans["amqpsched.execute"].status.status_code == StatusCode.ERROR
