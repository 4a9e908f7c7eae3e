"""Batches on the real broker: under load, what is ready at the same moment travels in one
message (submissions, dispatches, outcomes, answers), and every task still gets its own answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from amqpsched import Client, TaskFailed, WorkerApp
from amqpsched.protocol import RetryPolicy
from amqpsched.worker.builtin import app as builtin_app

from .conftest import RawClient, System

TIMEOUT = 30.0


def messages(registry: CollectorRegistry, kind: str) -> tuple[float, float]:
    """(messages, tasks) the scheduler counted for ``kind``."""
    count = registry.get_sample_value("amqpsched_tasks_per_message_count", {"kind": kind})
    total = registry.get_sample_value("amqpsched_tasks_per_message_sum", {"kind": kind})
    return count or 0.0, total or 0.0


async def test_concurrent_tasks_travel_in_batches_and_each_gets_its_answer(
    system: System,
) -> None:
    scheduler = await system.scheduler()
    await system.worker("echo", concurrency=32)
    # Every answer from the scheduler (a lone outcome would otherwise answer its client itself,
    # tests/test_direct_answers.py), so it counts them all.
    settings = system.settings.model_copy(update={"direct_answers": False})
    async with Client(settings) as client:
        n = 600
        handles = await asyncio.wait_for(
            asyncio.gather(*(client.submit("echo", {"i": i}) for i in range(n))), TIMEOUT
        )
        results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), TIMEOUT)
        assert results == [{"i": i} for i in range(n)]
        registry = scheduler.metrics.registry
        for kind in ("submit", "dispatch", "outcome", "answer"):
            count, tasks = messages(registry, kind)
            assert tasks == n, f"{kind}: every task once"
            assert count < n / 4, f"{kind}: {n} tasks in {count:.0f} messages: not batched"
        # Each task of a batch is a task like any other: its status is known by its id.
        status = await client.status(handles[7].task_id)
        assert status.state.value == "succeeded" and status.answer is not None
        assert status.answer.result == {"i": 7}


def _flaky() -> WorkerApp:
    app = WorkerApp()
    seen: dict[int, int] = {}

    @app.capability("flaky", retry=RetryPolicy(max_attempts=2, backoff=0.1, jitter=False))
    async def flaky(n: int) -> int:
        seen[n] = seen.get(n, 0) + 1
        if n % 3 == 0:
            raise ValueError(f"{n} always fails")
        if n % 3 == 1 and seen[n] == 1:
            raise ValueError(f"{n} fails once")
        return n

    app.include(builtin_app)
    return app


async def test_failures_and_retries_inside_a_batch_are_per_task(system: System) -> None:
    await system.scheduler()
    await system.worker("flaky", app=_flaky(), concurrency=16)
    client = await system.client()
    n = 60
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(client.call("flaky", i) for i in range(n)), return_exceptions=True),
        TIMEOUT,
    )
    for i, outcome in enumerate(outcomes):
        if i % 3 == 0:
            assert isinstance(outcome, TaskFailed), outcome
            assert outcome.error_type == "handler_error" and outcome.attempts == 2
        else:
            assert outcome == i, "succeeded, the second time for those that failed once"
    dead = await system.dead_letters(n // 3)
    assert {m.headers["x-amqpsched-reason"] for m in dead} == {"retries_exhausted"}
    assert all(m.type == "task" for m in dead), "each kept as a task of its own"


async def test_any_client_may_send_a_batch_and_a_bad_one_is_refused_whole(
    system: System,
) -> None:
    await system.scheduler()
    await system.worker("echo")
    async with RawClient(system) as raw:
        tasks = [
            {"capability": "echo", "payload": i, "task_id": f"raw-{i}", "correlation_id": f"c{i}"}
            for i in range(5)
        ]
        await raw.send(json.dumps({"v": 1, "tasks": tasks}).encode(), type_="submit_batch")
        # No accept header: each task is answered by an `answer` of its own.
        answers: dict[str | None, dict[str, Any]] = {}
        async with asyncio.timeout(TIMEOUT):
            while len(answers) < 5:
                msg = await raw.replies.get(fail=False, no_ack=True)
                if msg is None:
                    await asyncio.sleep(0.02)
                    continue
                assert msg.type == "answer"
                answers[msg.correlation_id] = json.loads(msg.body)
        assert {c: a["result"] for c, a in answers.items()} == {f"c{i}": i for i in range(5)}

        bad = [*tasks[:2], {**tasks[2], "timeout": 10**9}]
        corr = await raw.send(json.dumps({"v": 1, "tasks": bad}).encode(), type_="submit_batch")
        refused: dict[str, Any] = await raw.reply(corr, TIMEOUT)
        assert refused["status"] == "failed"
        assert refused["error"]["type"] == "invalid_request"
        assert "tasks.2" in refused["error"]["message"]
        no_ids = [{"capability": "echo", "payload": 1, "correlation_id": "x"}]
        corr = await raw.send(json.dumps({"v": 1, "tasks": no_ids}).encode(), type_="submit_batch")
        refused = await raw.reply(corr, TIMEOUT)
        assert refused["error"]["type"] == "invalid_request"
        assert "task_id" in refused["error"]["message"]
    dead = await system.dead_letters(2)
    reasons = sorted(str(m.headers["x-amqpsched-reason"]) for m in dead)
    assert reasons == ["invalid_fields", "timeout_too_large"]


async def test_a_task_of_a_batch_runs_while_the_outcome_before_it_awaits_its_confirm(
    system: System,
) -> None:
    """A task's slot is freed when its handler returns, not when its outcome is confirmed: with
    one slot, the second task of a ``task_batch`` runs while the first one's outcome is held
    before the broker (a slow confirm), and both are answered once it goes."""
    app = WorkerApp()
    ran: list[int] = []
    second_ran = asyncio.Event()

    @app.capability("step")
    async def step(n: int) -> int:
        ran.append(n)
        if len(ran) == 2:
            second_ran.set()
        return n

    scheduler = await system.scheduler()
    worker = await system.worker("step", app=app, concurrency=1)
    gate, held = asyncio.Event(), asyncio.Event()
    publish = worker._publish

    async def held_outcomes(exchange: Any, msg: Any, routing_key: str, **kw: Any) -> None:
        if msg.type in ("outcome", "outcome_batch"):
            held.set()
            await gate.wait()
        await publish(exchange, msg, routing_key, **kw)

    worker._publish = held_outcomes  # type: ignore[method-assign]
    client = await system.client()

    async def both() -> list[int]:
        return [n async for n in client.map("step", [1, 2])]

    results = asyncio.ensure_future(both())
    try:
        await asyncio.wait_for(held.wait(), TIMEOUT)
        count, tasks = messages(scheduler.metrics.registry, "dispatch")
        assert (count, tasks) == (1, 2), "the two tasks must come in one task_batch"
        try:
            await asyncio.wait_for(second_ran.wait(), TIMEOUT)
        except TimeoutError:
            pytest.fail("the second task waited for the first one's outcome to be confirmed")
        assert not results.done()  # nothing was answered: the first outcome is still held
    finally:
        gate.set()
    assert await asyncio.wait_for(results, TIMEOUT) == [1, 2]
    assert ran == [1, 2]
