"""Retries, time limits, expiry, cancellation, idempotency and fencing, on the real broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from pydantic import SecretStr

from amqpsched import TaskFailed, WorkerApp, transport
from amqpsched.errors import BrokerError
from amqpsched.protocol import RetryPolicy, TaskState
from amqpsched.scheduler import Scheduler
from amqpsched.transport import H_ATTEMPTS, H_CAPABILITY, H_ERROR, H_REASON

from .conftest import System
from .prom_server import TcpProxy


class Flaky:
    """Fails its first ``failures`` calls for each task id, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls: dict[str, int] = {}

    def app(self, **retry: Any) -> WorkerApp:
        app = WorkerApp()

        @app.capability("flaky", retry=RetryPolicy(**retry))
        async def flaky(payload: Any) -> Any:
            key = str(payload)
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] <= self.failures:
                raise ConnectionError(f"transient failure {self.calls[key]}")
            return {"calls": self.calls[key]}

        return app


async def test_a_failing_task_is_retried_with_backoff_and_answer_counts_attempts(
    system: System,
) -> None:
    await system.scheduler()
    flaky = Flaky(failures=2)
    app = flaky.app(max_attempts=3, backoff=0.1, multiplier=2.5, jitter=0)
    await system.worker("flaky", app=app)
    client = await system.client()
    started = time.monotonic()
    handle = await client.submit("flaky", "a", timeout=30)
    answer = await handle.answer()
    elapsed = time.monotonic() - started
    assert answer.status == "succeeded"
    assert answer.result == {"calls": 3}
    assert answer.attempts == 3
    # The broker held the retries: 100 ms, then 250 ms (two different delay queues).
    assert elapsed >= 0.35
    # Each attempt went through one delay queue only: no copy of an attempt runs later.
    await asyncio.sleep(0.6)
    assert flaky.calls["a"] == 3


async def test_exhausted_retries_fail_with_last_error_and_are_dead_lettered(
    system: System,
) -> None:
    await system.scheduler()
    flaky = Flaky(failures=5)
    await system.worker("flaky", app=flaky.app(max_attempts=2, backoff=0.1))
    client = await system.client()
    with pytest.raises(TaskFailed) as info:
        await client.call("flaky", "b", timeout=30)
    assert info.value.error_type == "handler_error"
    assert info.value.attempts == 2
    assert flaky.calls["b"] == 2
    [dead] = await system.dead_letters(1)
    assert dead.headers[H_REASON] == "retries_exhausted"
    assert dead.headers[H_CAPABILITY] == "flaky"
    assert dead.headers[H_ATTEMPTS] == 2
    assert "transient failure 2" in str(dead.headers[H_ERROR])


async def test_per_task_retry_override_and_non_retried_errors(system: System) -> None:
    await system.scheduler()
    flaky = Flaky(failures=1)
    await system.worker("flaky", app=flaky.app(max_attempts=1))
    client = await system.client()
    # The capability does not retry; this task asks for two attempts.
    assert await client.call("flaky", "c", retry={"max_attempts": 2, "backoff": 0.1}) == {
        "calls": 2
    }
    # A task may also narrow what is retried: here nothing is.
    with pytest.raises(TaskFailed) as info:
        await client.call("flaky", "d", retry={"max_attempts": 3, "retry_on": []})
    assert info.value.attempts == 1


async def test_async_handler_past_its_time_limit_is_cancelled(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("sleep", "echo", concurrency=1)
    client = await system.client()
    started = time.monotonic()
    with pytest.raises(TaskFailed) as info:
        await client.call("sleep", {"seconds": 30}, time_limit=0.3, timeout=20)
    assert info.value.error_type == "time_limit"
    assert time.monotonic() - started < 5
    # Its one slot is free again at once.
    assert await client.call("echo", "next", timeout=5) == "next"
    assert worker.executed == 2


def _sync_sleeper() -> tuple[WorkerApp, asyncio.Event]:
    app = WorkerApp()
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    @app.capability("block", time_limit=0.3)
    def block(seconds: Any) -> str:
        time.sleep(float(seconds))
        loop.call_soon_threadsafe(done.set)
        return "woke"

    return app, done


async def test_sync_handler_past_its_time_limit_is_answered_and_worker_stays_healthy(
    system: System,
) -> None:
    await system.scheduler()
    app, done = _sync_sleeper()
    await system.worker("block", app=app, concurrency=2)
    client = await system.client()
    with pytest.raises(TaskFailed) as info:
        await client.call("block", 1.5, timeout=20)
    assert info.value.error_type == "time_limit"
    assert not done.is_set()  # answered while the thread still runs
    # The other slot still serves; the first is given back when the thread ends.
    assert await client.call("block", 0, timeout=20) == "woke"
    await asyncio.wait_for(done.wait(), 5)


async def test_cancel_a_queued_task_it_never_runs(system: System) -> None:
    await system.scheduler()
    client = await system.client()
    handle = await client.submit("echo", "never", timeout=30)
    reply = await handle.cancel()
    assert reply.state == TaskState.FAILED
    with pytest.raises(TaskFailed) as info:
        await handle.result()
    assert info.value.error_type == "cancelled"
    worker = await system.worker("echo")
    assert await client.call("echo", "after", timeout=10) == "after"
    # The cancelled task was skipped, not run (it was ahead of "after" in the queue).
    assert worker.executed == 1


async def test_cancel_a_running_task_stops_its_handler(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("sleep", concurrency=1)
    client = await system.client()
    handle = await client.submit("sleep", {"seconds": 30}, timeout=60)
    async with asyncio.timeout(10):
        while (await handle.status()).state != TaskState.RUNNING:
            await asyncio.sleep(0.02)
    started = time.monotonic()
    await handle.cancel()
    with pytest.raises(TaskFailed) as info:
        await handle.result()
    assert info.value.error_type == "cancelled"
    # The slot comes back: the next task runs well before the cancelled one would have ended.
    assert await client.call("sleep", {"seconds": 0}, timeout=10) == {"slept": 0}
    assert time.monotonic() - started < 5
    assert worker.executed == 2


async def test_cancel_a_finished_task_changes_nothing(system: System) -> None:
    await system.scheduler()
    await system.worker("echo")
    client = await system.client()
    handle = await client.submit("echo", 1)
    assert await handle.result() == 1
    reply = await handle.cancel()
    assert reply.state == TaskState.SUCCEEDED
    assert (await client.cancel("unknown-task")).state == TaskState.UNKNOWN


async def test_same_idempotency_key_gives_same_task_and_answer(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("sleep")
    client = await system.client()
    key = f"order-{uuid.uuid4().hex}"
    first = await client.submit("sleep", {"seconds": 0.2}, idempotency_key=key)
    second = await client.submit("sleep", {"seconds": 0.2}, idempotency_key=key)
    a1, a2 = await first.answer(), await second.answer()
    assert a1.task_id == a2.task_id == first.task_id
    assert a1.result == a2.result == {"slept": 0.2}
    late = await client.submit("sleep", {"seconds": 0.2}, idempotency_key=key)
    assert (await late.answer()).task_id == first.task_id
    other = await client.submit("sleep", {"seconds": 0.0}, idempotency_key=key + "-other")
    assert (await other.answer()).task_id == other.task_id
    assert worker.executed == 2


def _gated_app() -> tuple[WorkerApp, asyncio.Event]:
    app = WorkerApp()
    gate = asyncio.Event()

    @app.capability("gated")
    async def gated(payload: Any) -> Any:
        await gate.wait()
        return payload

    return app, gate


async def test_a_hung_worker_is_declared_dead_and_its_late_result_is_fenced(
    system: System,
) -> None:
    sched = await system.scheduler()
    app, gate = _gated_app()
    hung = await system.worker("gated", app=app, concurrency=1)
    client = await system.client()
    handle = await client.submit("gated", "payload", timeout=60)
    async with asyncio.timeout(10):
        while (await handle.status()).state != TaskState.RUNNING:
            await asyncio.sleep(0.02)
    # The worker's loop "hangs" as far as the scheduler can tell: no more heartbeats.
    assert hung._heartbeat is not None
    hung._heartbeat.cancel()
    healthy_app, healthy_gate = _gated_app()
    healthy_gate.set()
    healthy = await system.worker("gated", app=healthy_app)
    answer = await handle.answer()
    assert answer.worker_id == healthy.worker_id
    assert answer.attempts == 2
    # Now the zombie finishes attempt 1: its outcome is fenced, never a second answer.
    gate.set()
    async with asyncio.timeout(10):
        while sched.fenced == 0:
            await asyncio.sleep(0.02)
    status = await handle.status()
    assert status.answer is not None
    assert status.answer.worker_id == healthy.worker_id
    # Nor did it answer the client directly (protocol section 16): its heartbeats had lapsed.
    async with asyncio.timeout(10):
        while not hung._outcomes.idle:
            await asyncio.sleep(0.02)
    assert hung.metrics.direct_answers._value.get() == 0


async def test_a_restarted_scheduler_remembers_answers_cancels_keys_and_deadlines(
    system: System,
) -> None:
    first = await system.scheduler()
    worker = await system.worker("echo")
    client = await system.client()
    done = await client.submit("echo", "kept", idempotency_key="k-1")
    assert await done.result() == "kept"
    await worker.stop()
    queued = await client.submit("echo", "cancel me", timeout=60)
    await queued.cancel()
    system.capabilities.add("nobody")
    waiting = await client.submit("nobody", 1, timeout=2)
    await first.stop()

    await system.scheduler()
    status = await client.status(done.task_id)
    assert status.state == TaskState.SUCCEEDED
    assert status.answer is not None
    assert status.answer.result == "kept"
    # The idempotency key still maps to the answered task: no second run.
    again = await client.submit("echo", "kept", idempotency_key="k-1")
    assert (await again.answer()).task_id == done.task_id
    # The deadline survived: the task nobody serves is answered no_worker by the new scheduler.
    with pytest.raises(TaskFailed) as info:
        await waiting.result(timeout=10)
    assert info.value.error_type == "no_worker"
    # The cancel survived: a worker that starts now skips the cancelled task.
    second = await system.worker("echo")
    assert await client.call("echo", "after", timeout=10) == "after"
    assert second.executed == 1


async def test_a_scheduler_cut_off_from_the_broker_declares_no_worker_dead(
    system: System,
) -> None:
    """Workers' heartbeats cannot reach a scheduler that lost the broker; that is not their
    missing them. Once it is back, its workers are still live and a task that ran meanwhile is
    answered from its one attempt (not re-dispatched, not ``worker_lost``)."""
    url = urlsplit(system.settings.amqp_url.get_secret_value())
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 5672)
    await proxy.start()
    netloc = f"{url.username}:{url.password}@127.0.0.1:{proxy.port}"
    proxied = urlunsplit(url._replace(netloc=netloc, query="reconnect_interval=0.2"))
    scheduler = Scheduler(system.settings.model_copy(update={"amqp_url": SecretStr(proxied)}))
    await scheduler.start()
    try:
        worker = await system.worker("sleep")
        client = await system.client()
        handle = await client.submit("sleep", {"seconds": 2.5}, timeout=30)
        async with asyncio.timeout(10):
            while (await handle.status()).state != TaskState.RUNNING:
                await asyncio.sleep(0.05)
        assert scheduler._conn is not None
        await proxy.cut()
        async with asyncio.timeout(10):
            while transport.is_connected(scheduler._conn):
                await asyncio.sleep(0.02)
        # Off the broker for several liveness windows (0.2 s x 3) while the task runs.
        await asyncio.sleep(1.5)
        await proxy.start()
        async with asyncio.timeout(20):
            while not transport.is_connected(scheduler._conn):
                await asyncio.sleep(0.05)
        answer = await handle.answer(timeout=20)
        assert (answer.status, answer.attempts) == ("succeeded", 1), answer
        # The scheduler took that attempt's outcome as the answer: it had not superseded it.
        async with asyncio.timeout(10):
            while (status := await handle.status()).state != TaskState.SUCCEEDED:
                await asyncio.sleep(0.05)
        assert status.attempts == 1, status
        assert scheduler.registry.get(worker.worker_id) is not None
        assert worker.executed == 1
        # Its heartbeats reach the scheduler again (their queue is consumed again after the
        # reconnect): the worker is heard with its task done.
        async with asyncio.timeout(10):
            while (info := scheduler.registry.get(worker.worker_id)) is None or info.in_flight:
                await asyncio.sleep(0.05)
    finally:
        await scheduler.stop()
        await proxy.cut()


class Refusing:
    """Makes the broker refuse (nack) every publish to ``exchange`` with ``routing_key``: a
    queue bound there that is full and rejects publishes (as RabbitMQ 3.10 may refuse those of a
    channel after a quorum queue's leader moved). Removed by :meth:`stop`."""

    def __init__(self, system: System, exchange: str, routing_key: str) -> None:
        self.system, self.exchange, self.routing_key = system, exchange, routing_key
        self.name = f"{system.namespace}.refusing.{uuid.uuid4().hex[:6]}"

    async def __aenter__(self) -> Refusing:
        self._conn = await transport.connect(self.system.settings, "test-refusing")
        channel = await self._conn.channel()
        arguments = {"x-max-length": 0, "x-overflow": "reject-publish"}
        queue = await channel.declare_queue(self.name, arguments=arguments)
        await queue.bind(self.exchange, self.routing_key)
        self._channel = channel
        return self

    async def stop(self) -> None:
        await self._channel.queue_delete(self.name)

    async def __aexit__(self, *exc: object) -> None:
        await self._conn.close()


async def test_a_worker_publishes_on_a_new_channel_after_repeated_refusals(
    system: System,
) -> None:
    await system.scheduler()
    worker = await system.worker("echo", concurrency=4)
    client = await system.client()
    topo = system.topology
    async with Refusing(system, topo.events_exchange, topo.results_queue) as refusing:
        # Its outcomes are refused: each task goes back to the queue, and runs again.
        handles = [await client.submit("echo", {"i": i}, timeout=60) for i in range(3)]
        async with asyncio.timeout(20):
            while worker._pub is worker._channel:
                await asyncio.sleep(0.02)
        await refusing.stop()
        answers = await asyncio.wait_for(asyncio.gather(*(h.answer() for h in handles)), 20)
    assert [a.result for a in answers] == [{"i": i} for i in range(3)]
    assert worker._pub is not None and not worker._pub.is_closed


async def test_a_client_publishes_on_a_new_channel_after_repeated_refusals(
    system: System,
) -> None:
    await system.scheduler()
    await system.worker("echo")
    client = await system.client()
    topo = system.topology
    async with Refusing(system, topo.submit_exchange, topo.submit_queue) as refusing:
        for _ in range(3):
            with pytest.raises(BrokerError):
                await client.submit("echo", {})
        async with asyncio.timeout(20):
            while client._pub is client._channel:
                await asyncio.sleep(0.02)
        await refusing.stop()
        assert await client.call("echo", {"after": 1}, timeout=20) == {"after": 1}
