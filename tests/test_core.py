"""Client -> scheduler -> worker -> back, on the real broker."""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import json
import time
import uuid
from collections import Counter
from typing import Any

import aio_pika
import pytest
from PIL import Image
from pydantic import BaseModel

from amqpsched import NoWorkerAvailable, SyncClient, TaskFailed, TaskTimeout, UnknownTask, WorkerApp
from amqpsched.protocol import TaskState
from amqpsched.transport import H_CAPABILITY, H_REASON, H_SOURCE
from amqpsched.worker.builtin import app as builtin_app

from .conftest import RawClient, System


def _png(width: int, height: int) -> str:
    img = Image.new("RGB", (width, height), (200, 30, 90))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def test_echo_round_trip(system: System) -> None:
    await system.scheduler()
    await system.worker("echo")
    client = await system.client()
    payload = {"text": "héllo", "n": [1, 2.5, None, True]}
    assert await client.call("echo", payload, timeout=10) == payload


async def test_sleep_round_trip(system: System) -> None:
    await system.scheduler()
    await system.worker("sleep")
    client = await system.client()
    assert await client.call("sleep", {"seconds": 0.05}, timeout=10) == {"slept": 0.05}


async def test_resize_returns_a_png_of_the_asked_size(system: System) -> None:
    await system.scheduler()
    await system.worker("resize")
    client = await system.client()
    result = await client.call("resize", {"image": _png(300, 200), "width": 64, "height": 48})
    assert isinstance(result, dict)
    assert (result["width"], result["height"]) == (64, 48)
    image = base64.b64decode(str(result["image"]))
    with Image.open(io.BytesIO(image)) as img:
        assert img.format == "PNG"
        assert img.size == (64, 48)


async def test_resize_with_a_bad_payload_is_invalid_payload(system: System) -> None:
    await system.scheduler()
    await system.worker("resize")
    client = await system.client()
    with pytest.raises(TaskFailed) as info:
        await client.call("resize", {"image": "not base64!", "width": 0, "height": 5})
    assert info.value.error_type == "invalid_payload"
    assert "width" in info.value.error_message
    not_an_image = base64.b64encode(b"hello").decode()
    with pytest.raises(TaskFailed) as info:
        await client.call("resize", {"image": not_an_image, "width": 5, "height": 5})
    assert info.value.error_type == "invalid_payload"


async def test_thousand_concurrent_calls_share_one_client(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", concurrency=64)
    client = await system.client()
    results = await asyncio.gather(*(client.call("echo", i, timeout=60) for i in range(1000)))
    assert results == list(range(1000))


async def test_two_workers_share_a_capability(system: System) -> None:
    await system.scheduler()
    a = await system.worker("sleep", concurrency=2)
    b = await system.worker("sleep", concurrency=2)
    client = await system.client()
    handles = [await client.submit("sleep", {"seconds": 0.1}) for _ in range(12)]
    answers = [await h.answer() for h in handles]
    by_worker = Counter(a.worker_id for a in answers)
    assert set(by_worker) == {a.worker_id, b.worker_id}
    assert a.executed + b.executed == 12


async def test_task_submitted_before_any_worker_runs_once_one_starts(system: System) -> None:
    await system.scheduler()
    client = await system.client()
    handle = await client.submit("echo", "early", timeout=30)
    status = await handle.status()
    assert status.state in (TaskState.QUEUED, TaskState.DISPATCHED)
    await system.worker("echo")
    assert await handle.result() == "early"


async def test_task_submitted_before_the_scheduler_runs_is_answered(system: System) -> None:
    client = await system.client()
    handle = await client.submit("echo", "before scheduler", timeout=30)
    await system.worker("echo")
    await system.scheduler()
    assert await handle.result() == "before scheduler"


async def test_no_worker_before_timeout_is_answered_no_worker(system: System) -> None:
    await system.scheduler()
    system.capabilities.add("nobody")
    client = await system.client()
    with pytest.raises(NoWorkerAvailable) as info:
        await client.call("nobody", {}, timeout=0.5)
    assert info.value.error_type == "no_worker"
    assert "nobody" in info.value.error_message


async def test_busy_workers_past_timeout_is_expired_not_no_worker(system: System) -> None:
    await system.scheduler()
    await system.worker("sleep", concurrency=1)
    client = await system.client()
    blocker = await client.submit("sleep", {"seconds": 2}, timeout=10)
    with pytest.raises(TaskFailed) as info:
        await client.call("sleep", {"seconds": 0}, timeout=0.5)
    assert info.value.error_type == "expired"
    assert await blocker.result() == {"slept": 2}


class Boom(BaseModel):
    message: str


def _failing_app() -> WorkerApp:
    app = WorkerApp()

    @app.capability("boom", payload=Boom)
    async def boom(p: Boom) -> None:
        raise RuntimeError(p.message)

    @app.capability("syncboom")
    def syncboom(p: Any) -> None:
        raise KeyError(p)

    @app.capability("notjson")
    async def notjson(p: Any) -> object:
        return object()

    @app.capability("notanumber")
    async def notanumber(p: Any) -> dict[str, Any]:
        return {"mean": float("nan"), "at": p}

    @app.capability("deep")
    async def deep(p: int) -> Any:
        nested: Any = "bottom"
        for _ in range(p):
            nested = [nested]
        return nested

    @app.capability("stamped")
    async def stamped(p: Any) -> dict[str, Any]:
        return {"at": datetime.datetime(2026, 1, 2, 3, 4, 5), "p": p}

    @app.capability("notutf8")
    async def notutf8(p: Any) -> str:
        return "half a pair: \ud800"  # a str, but not one UTF-8 can carry

    @app.capability("notutf8boom")
    async def notutf8boom(p: Any) -> None:
        raise ValueError("undecodable \udcff byte")

    return app


async def test_handler_that_raises_is_handler_error_and_worker_survives(system: System) -> None:
    await system.scheduler()
    app = _failing_app()
    app.include(builtin_app)
    await system.worker(
        "boom",
        "syncboom",
        "notjson",
        "notanumber",
        "stamped",
        "deep",
        "notutf8",
        "notutf8boom",
        "echo",
        app=app,
    )
    client = await system.client()
    with pytest.raises(TaskFailed) as info:
        await client.call("boom", {"message": "it broke"}, timeout=10)
    assert info.value.error_type == "handler_error"
    assert info.value.error_message == "it broke"
    assert info.value.detail["exception"] == "RuntimeError"
    assert "RuntimeError: it broke" in str(info.value.detail["traceback"])
    with pytest.raises(TaskFailed) as info:
        await client.call("syncboom", "k", timeout=10)
    assert info.value.detail["exception"] == "KeyError"
    with pytest.raises(TaskFailed) as info:
        await client.call("notjson", 1, timeout=10)
    assert "not JSON" in info.value.error_message
    # JSON has no NaN: an error the caller sees, not a silent null.
    with pytest.raises(TaskFailed) as info:
        await client.call("notanumber", 1, timeout=10)
    assert info.value.error_type == "handler_error" and "NaN" in info.value.error_message
    # Nested deeper than the scheduler and the client decode (220 levels): said at once, not
    # an answer lost and, at the deadline, "no worker started the task".
    assert await client.call("deep", 3, timeout=10) == [[["bottom"]]]
    with pytest.raises(TaskFailed) as info:
        await client.call("deep", 220, timeout=10)
    assert info.value.error_type == "handler_error" and "nested" in info.value.error_message
    # What pydantic serialises goes as pydantic serialises it.
    assert await client.call("stamped", 2, timeout=10) == {"at": "2026-01-02T03:04:05", "p": 2}
    # Strings that UTF-8 cannot encode (lone surrogates): a clear error, not a stuck task.
    with pytest.raises(TaskFailed) as info:
        await client.call("notutf8", 1, timeout=10)
    assert info.value.error_type == "handler_error"
    assert "JSON" in info.value.error_message
    with pytest.raises(TaskFailed) as info:
        await client.call("notutf8boom", 1, timeout=10)
    assert info.value.error_type == "handler_error"
    assert info.value.error_message.startswith("undecodable ")
    assert info.value.detail["exception"] == "ValueError"
    assert await client.call("echo", "still alive", timeout=10) == "still alive"


async def test_results_are_kept_within_max_result_bytes_the_oldest_forgotten_first(
    system: System,
) -> None:
    """Large results held for result queries stay within AMQPSCHED_MAX_RESULT_BYTES: past it,
    the tasks answered first are forgotten (status ``unknown``), and the metrics say so."""
    sched = await system.scheduler(max_result_bytes=100_000)
    await system.worker("echo")
    client = await system.client()
    rows = [{"row": i, "text": "some forty bytes of text in each row"} for i in range(700)]
    ids = [f"big-{uuid.uuid4().hex}" for _ in range(4)]  # about 40 KB a result: 2 fit
    for task_id in ids:
        handle = await client.submit("echo", rows, task_id=task_id)
        assert await handle.result(timeout=20) == rows
    registry = sched.metrics.registry
    async with asyncio.timeout(10):  # at once, or at the next sweep once its journal copy is in
        while registry.get_sample_value("amqpsched_results_shed_total") != 2:
            await asyncio.sleep(0.05)
    assert await client.result(ids[-1], timeout=10) == rows
    assert (await client.status(ids[-2])).state == TaskState.SUCCEEDED
    assert (await client.status(ids[0])).state == TaskState.UNKNOWN
    assert 0 < (registry.get_sample_value("amqpsched_result_bytes") or 0) <= 100_000


async def test_status_and_result_by_task_id_from_a_second_client(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", "sleep")
    first = await system.client()
    second = await system.client()
    handle = await first.submit("sleep", {"seconds": 0.3}, task_id=f"job-{uuid.uuid4().hex}")
    # The second client waits for a result that is not there yet: pushed when it is.
    remote = second.handle(handle.task_id)
    assert await remote.result(timeout=10) == {"slept": 0.3}
    assert await handle.result() == {"slept": 0.3}
    for _ in range(2):
        status = await second.status(handle.task_id)
        assert status.state == TaskState.SUCCEEDED
        assert status.answer is not None
        assert status.answer.result == {"slept": 0.3}
        assert await second.result(handle.task_id) == {"slept": 0.3}
    with pytest.raises(UnknownTask):
        await second.result("never-submitted")
    assert (await second.status("never-submitted")).state == TaskState.UNKNOWN


async def test_same_task_id_twice_runs_once_and_answers_both(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("sleep")
    client = await system.client()
    task_id = f"dup-{uuid.uuid4().hex}"
    h1 = await client.submit("sleep", {"seconds": 0.2}, task_id=task_id)
    h2 = await client.submit("sleep", {"seconds": 0.2}, task_id=task_id)
    assert await h1.result() == await h2.result() == {"slept": 0.2}
    h3 = await client.submit("sleep", {"seconds": 0.2}, task_id=task_id)
    assert await h3.result() == {"slept": 0.2}
    assert worker.executed == 1


async def test_capabilities_lists_the_live_catalog(system: System) -> None:
    await system.scheduler()
    await system.worker("resize", "echo", concurrency=3)
    client = await system.client()
    catalog = {c.name: c for c in await client.capabilities()}
    assert set(catalog) == {"resize", "echo"}
    assert catalog["resize"].workers == 1
    assert catalog["resize"].slots == 3
    assert "width" in json.dumps(catalog["resize"].payload_schema)
    assert catalog["resize"].description


async def test_a_stopped_worker_leaves_the_catalog(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("echo")
    client = await system.client()
    assert [c.name for c in await client.capabilities()] == ["echo"]
    await worker.stop()
    async with asyncio.timeout(5):
        while await client.capabilities():
            await asyncio.sleep(0.05)


async def test_client_gives_up_with_task_timeout(system: System) -> None:
    # No scheduler at all: nobody can answer, and the call must not hang.
    client = await system.client()
    handle = await client.submit("echo", 1, timeout=0.2)
    with pytest.raises(TaskTimeout):
        await handle.result(timeout=0.5)


@pytest.mark.system
async def test_sync_client_for_scripts(system: System, spawn: Any) -> None:
    sched = spawn(["-m", "amqpsched.scheduler"], system.env(), "scheduler")
    worker = spawn(["-m", "amqpsched.worker", "-c", "echo"], system.env(), "worker")
    await sched.wait_for_output("consuming")
    await worker.wait_for_output("consuming")

    def script() -> None:
        with SyncClient(system.settings) as client:
            assert client.call("echo", {"sync": True}, timeout=10) == {"sync": True}
            task_id = client.submit("echo", 7, timeout=10)
            assert client.result(task_id, timeout=10) == 7
            assert client.status(task_id).state == TaskState.SUCCEEDED
            # The worker may have said hello before the scheduler listened: its next
            # heartbeat registers it.
            deadline = time.monotonic() + 10
            while not client.capabilities() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [c.name for c in client.capabilities()] == ["echo"]

    await asyncio.wait_for(asyncio.to_thread(script), 60)


# -- bad input -----------------------------------------------------------------------------------


BAD_INPUTS = [
    ("malformed_json", b'{"v": 1, "capability": ', None),
    ("malformed_body", b'"just a string"', None),
    ("invalid_fields", b'{"v": 1, "capability": 42, "payload": 1}', None),
    ("invalid_fields", b'{"v": 1, "capability": "echo"}', None),
    ("missing_version", b'{"capability": "echo", "payload": 1}', None),
    ("unknown_version", b'{"v": 99, "capability": "echo", "payload": 1}', None),
    ("unknown_type", b'{"v": 1}', "frobnicate"),
    ("timeout_too_large", b'{"v": 1, "capability": "echo", "payload": 1, "timeout": 1e12}', None),
    # large bodies: their payloads are kept raw (scheduler.passthrough), and refused all the same
    (
        "invalid_fields",
        b'{"v": 1, "capability": "echo", "payload": '
        + b"[" * 200
        + b'"'
        + b"x" * 3000
        + b'"'
        + b"]" * 200
        + b"}",
        None,
    ),
    (
        "malformed_json",
        b'{"v": 1, "capability": "echo", "payload": ["' + b"\xff" * 3000 + b'"]}',
        None,
    ),
    (
        "invalid_fields",
        b'{"v": 1, "capability": "echo", "payload": "' + b"x" * 3000 + b'", "x": 1}',
        None,
    ),
]


@pytest.mark.parametrize(("reason", "body", "type_"), BAD_INPUTS)
async def test_bad_input_is_answered_and_dead_lettered(
    system: System, reason: str, body: bytes, type_: str | None
) -> None:
    await system.scheduler()
    await system.worker("echo")
    async with RawClient(system) as raw:
        corr = await raw.send(body, type_=type_)
        answer = await raw.reply(corr)
    assert answer["final"] is True
    assert answer["status"] == "failed"
    assert answer["error"]["type"] == "invalid_request"
    assert answer["error"]["message"].startswith(reason)
    [dead] = await system.dead_letters(1)
    assert dead.body == body
    assert dead.headers[H_REASON] == reason
    assert dead.headers[H_SOURCE] == "scheduler"
    client = await system.client()
    assert await client.call("echo", "still serving", timeout=10) == "still serving"


async def test_too_large_body_is_answered_and_dead_lettered(system_factory: Any) -> None:
    system: System = system_factory(max_message_bytes=1000)
    try:
        await system.scheduler()
        await system.worker("echo")
        body = json.dumps({"v": 1, "capability": "echo", "payload": "x" * 2000}).encode()
        async with RawClient(system) as raw:
            answer = await raw.reply(await raw.send(body))
        assert answer["error"]["type"] == "invalid_request"
        assert "too_large" in answer["error"]["message"]
        [dead] = await system.dead_letters(1)
        assert dead.headers[H_REASON] == "too_large"
        assert dead.headers[H_CAPABILITY] == "echo"
        assert len(dead.body) == len(body)
        client = await system.client()
        assert await client.call("echo", "small", timeout=10) == "small"
    finally:
        await system.close()


async def test_concurrent_large_tasks_stay_under_a_low_message_limit(
    system_factory: Any,
) -> None:
    """Submissions made at once travel in one batch message, but never one the scheduler would
    refuse as too large: the client keeps its batches under the same setting."""
    system: System = system_factory(max_message_bytes=200_000)
    try:
        await system.scheduler()
        await system.worker("echo")
        client = await system.client()
        payloads = [f"{i}:" + "x" * 60_000 for i in range(12)]  # 720 KB in all
        results = await asyncio.gather(*(client.call("echo", p, timeout=20) for p in payloads))
        assert results == payloads
        assert await system.dead_letters(0) == []
    finally:
        await system.close()


async def test_large_structured_payloads_reach_the_worker_as_they_were_sent(system: System) -> None:
    """The scheduler passes a large payload on as the client's bytes, alone or in batches."""
    await system.scheduler()
    await system.worker("echo")
    client = await system.client()
    rows = [
        {
            "id": i,
            "name": f"r\u00e9sum\u00e9 {i} \u2603",
            "score": i / 7,
            "big": 2**70 + i,
            "tags": ["a\n", '"q"'],
        }
        for i in range(300)
    ]
    assert await client.call("echo", rows, timeout=20) == rows
    payloads = [[i, rows] for i in range(8)]  # at once: one submit_batch, task batches
    results = await asyncio.gather(*(client.call("echo", p, timeout=20) for p in payloads))
    assert results == payloads
    # Answered by the scheduler (a client that takes no direct answer), then asked for again:
    # the result goes on as the worker's bytes, and means what the worker returned.
    body = json.dumps({"v": 1, "capability": "echo", "task_id": "rows-1", "payload": rows})
    async with RawClient(system) as raw:
        answer = await raw.reply(await raw.send(body.encode()), timeout=20)
    assert answer["status"] == "succeeded" and answer["result"] == rows
    assert await client.result("rows-1", timeout=20) == rows
    status = await client.status("rows-1")  # its answer inside, result and all
    assert status.answer is not None and status.answer.result == rows


async def test_an_outcome_nobody_can_read_answers_its_task_at_once_and_is_kept(
    system: System,
) -> None:
    """A worker's outcome that does not decode (another version's, another language's): its
    task is answered ``internal_error`` at once, not at its deadline as "never started", and
    the outcome is dead-lettered with its reason."""
    system.capabilities.add("nobody")  # its queue goes with the system's
    await system.scheduler()
    client = await system.client()
    task_id = f"unread-{uuid.uuid4().hex}"
    handle = await client.submit("nobody", 1, task_id=task_id, timeout=60)
    assert (await handle.status()).state in (TaskState.QUEUED, TaskState.DISPATCHED)
    body = json.dumps({"v": 1, "task_id": task_id, "attempt": 1, "status": "succeeded"})
    conn = await aio_pika.connect(system.settings.amqp_url.get_secret_value())
    try:
        channel = await conn.channel()
        events = await channel.get_exchange(system.topology.events_exchange)
        await events.publish(
            aio_pika.Message(body.encode(), type="outcome"),
            routing_key=system.topology.results_queue,
        )
    finally:
        await conn.close()
    with pytest.raises(TaskFailed) as info:
        await handle.result(timeout=10)
    assert info.value.error_type == "internal_error"
    assert "outcome could not be read" in info.value.error_message
    [dead] = await system.dead_letters(1)
    assert dead.headers[H_REASON] == "invalid_fields" and dead.body == body.encode()


async def test_missing_reply_to_is_dead_lettered_without_answer(system: System) -> None:
    await system.scheduler()
    await system.worker("echo")
    body = b'{"v": 1, "capability": "echo", "payload": 1}'
    async with RawClient(system) as raw:
        await raw.send(body, reply=False)
        [dead] = await system.dead_letters(1)
    assert dead.headers[H_REASON] == "missing_reply_to"
    assert dead.body == body
    client = await system.client()
    assert await client.call("echo", "after", timeout=10) == "after"


async def test_bad_answer_carries_client_task_id_when_readable(system: System) -> None:
    await system.scheduler()
    async with RawClient(system) as raw:
        body = b'{"v": 1, "capability": "echo", "task_id": "mine-1"}'
        answer = await raw.reply(await raw.send(body))
    assert answer["task_id"] == "mine-1"
    assert answer["error"]["type"] == "invalid_request"
    await system.dead_letters(1)
