"""Direct answers (docs/protocol.md, section 16): a worker publishes a lone succeeded outcome once,
to the results queue and, by ``BCC``, to the client's reply queue; the scheduler journals it and
answers only the other askers. Each asker gets exactly one answer.

The broker tests listen on a reply queue of their own, as a client in another language would, so
they see every message that reaches it, not only the first the SDK takes. The rule that decides
when a worker answers directly is tested without I/O at the end.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from amqpsched.protocol import ACCEPT_HEADER, TaskMessage
from amqpsched.worker import WorkerApp
from amqpsched.worker.builtin import app as builtin_app
from amqpsched.worker.direct import DEADLINE_MARGIN, Heartbeats, answers_directly

from .conftest import System

#: Longest wait for one reply.
STEP = 15.0


@dataclass
class Listener:
    """A reply queue of a raw client, and every message that reached it, by correlation id."""

    channel: AbstractChannel
    queue: str
    got: dict[str, list[AbstractIncomingMessage]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_message(self, msg: AbstractIncomingMessage) -> None:
        self.got.setdefault(msg.correlation_id or "", []).append(msg)
        self.arrived.set()

    async def send(self, system: System, kind: str, body: dict[str, Any], accept: str) -> str:
        corr = uuid.uuid4().hex
        exchange = await self.channel.get_exchange(system.topology.submit_exchange, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                json.dumps({"v": 1, **body}).encode(),
                type=kind,
                correlation_id=corr,
                reply_to=self.queue,
                content_type="application/json",
                headers={ACCEPT_HEADER: accept},
            ),
            system.topology.submit_queue,
        )
        return corr

    async def first(self, corr: str) -> AbstractIncomingMessage:
        async with asyncio.timeout(STEP):
            while not self.got.get(corr):
                self.arrived.clear()
                await self.arrived.wait()
        return self.got[corr][0]

    async def settled(self, system: System, task_id: str) -> None:
        """Once the scheduler reports the task final, ask once more: the reply to that comes
        after anything it sent before (one channel, one queue), a second answer included."""
        for _ in range(2):
            while True:
                corr = await self.send(system, "status", {"task_id": task_id}, "")
                status = json.loads((await self.first(corr)).body)
                if status["state"] in ("succeeded", "failed"):
                    break


@asynccontextmanager
async def listener(system: System, bind_direct: bool) -> AsyncIterator[Listener]:
    conn = await aio_pika.connect(system.settings.amqp_url.get_secret_value())
    try:
        channel = await conn.channel()
        queue = await system.topology.declare_reply_queue(channel, uuid.uuid4().hex)
        if bind_direct:
            await system.topology.bind_replies(queue)
        found = Listener(channel, queue.name)
        await queue.consume(found.on_message, no_ack=True)
        yield found
    finally:
        await conn.close()


async def test_a_lone_task_is_answered_once_by_its_worker(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("echo")
    async with listener(system, bind_direct=True) as client:
        corr = await client.send(
            system,
            "submit",
            {"capability": "echo", "payload": {"n": 1}, "task_id": "direct-1"},
            "answer_batch,direct",
        )
        answer = await client.first(corr)
        assert answer.type == "outcome"  # the worker's own publish
        body = json.loads(answer.body)
        assert (body["task_id"], body["status"], body["result"]) == (
            "direct-1",
            "succeeded",
            {"n": 1},
        )
        await client.settled(system, "direct-1")
        assert len(client.got[corr]) == 1, "the scheduler answered the direct answer again"
    assert worker.metrics.direct_answers._value.get() == 1


async def test_other_askers_get_the_schedulers_answer(system: System) -> None:
    """Two submissions of one task (an idempotency key): the first asker, which takes direct
    answers, has the worker's; the second, which does not, the scheduler's. One each."""
    await system.scheduler()
    await system.worker("sleep")
    async with listener(system, True) as first, listener(system, False) as second:
        submission = {"capability": "sleep", "payload": {"seconds": 1}, "idempotency_key": "k"}
        corr1 = await first.send(system, "submit", {**submission, "task_id": "w-1"}, "direct")
        # The scheduler knows the task before the second asker comes.
        while True:
            status = await first.send(system, "status", {"task_id": "w-1"}, "")
            if json.loads((await first.first(status)).body)["state"] != "unknown":
                break
        corr2 = await second.send(system, "submit", submission, "")
        one, two = await first.first(corr1), await second.first(corr2)
        assert (one.type, two.type) == ("outcome", "answer")
        task_id = json.loads(one.body)["task_id"]
        assert json.loads(two.body)["task_id"] == task_id == "w-1"
        await first.settled(system, task_id)
        await second.settled(system, task_id)
        assert (len(first.got[corr1]), len(second.got[corr2])) == (1, 1)


failing_app = WorkerApp()


@failing_app.capability("broken")
async def broken(payload: Any) -> None:
    raise RuntimeError("broken on purpose")


failing_app.include(builtin_app)


async def test_a_failure_is_answered_by_the_scheduler(system: System) -> None:
    """A failed attempt may be retried, which only the scheduler decides: it answers."""
    await system.scheduler()
    worker = await system.worker("broken", app=failing_app)
    async with listener(system, bind_direct=True) as client:
        corr = await client.send(
            system, "submit", {"capability": "broken", "payload": 1, "task_id": "b-1"}, "direct"
        )
        answer = await client.first(corr)
        assert answer.type == "answer"
        assert json.loads(answer.body)["error"]["type"] == "handler_error"
        await client.settled(system, "b-1")
        assert len(client.got[corr]) == 1
    assert worker.metrics.direct_answers._value.get() == 0


async def test_a_client_that_does_not_ask_gets_the_schedulers_answer(system: System) -> None:
    await system.scheduler()
    worker = await system.worker("echo")
    async with listener(system, bind_direct=True) as client:
        corr = await client.send(
            system, "submit", {"capability": "echo", "payload": 2, "task_id": "plain"}, ""
        )
        assert (await client.first(corr)).type == "answer"
        await client.settled(system, "plain")
        assert len(client.got[corr]) == 1
    assert worker.metrics.direct_answers._value.get() == 0


async def test_the_sdk_takes_direct_answers_and_the_journal_keeps_them(system: System) -> None:
    """The SDK's calls are answered by the worker; a scheduler started afterwards knows them
    from the journal."""
    await system.scheduler()
    worker = await system.worker("echo")
    client = await system.client()
    assert [await client.call("echo", i) for i in range(5)] == list(range(5))
    handle = await client.submit("echo", "last")
    assert await handle.result(timeout=STEP) == "last"
    async with asyncio.timeout(STEP):
        while worker.metrics.direct_answers._value.get() < 6:
            await asyncio.sleep(0.05)
    late = await system.scheduler("late")
    assert late.store.get(handle.task_id) is not None
    assert (await client.status(handle.task_id)).state.value == "succeeded"


async def test_a_cancel_after_a_direct_answer_leaves_the_task_succeeded(system: System) -> None:
    """The worker answered the client directly; the scheduler has not consumed that outcome yet
    when the client cancels the task. The cancel waits for it: the task stays ``succeeded``, and
    nobody is told it was cancelled."""
    scheduler = await system.scheduler()
    await system.worker("echo")
    client = await system.client()
    held: list[Any] = []
    hold = asyncio.Event()
    on_outcome = scheduler._on_outcome

    async def held_back(msg: Any, ev: Any) -> None:
        if hold.is_set():
            held.append((msg, ev))
            return
        await on_outcome(msg, ev)

    scheduler._on_outcome = held_back  # type: ignore[method-assign]
    hold.set()
    handle = await client.submit("echo", "done")
    assert await handle.result(timeout=STEP) == "done"  # from the worker
    async with asyncio.timeout(STEP):
        while not held:
            await asyncio.sleep(0.01)
    notice = scheduler.outbox.cancel_notice
    released: list[asyncio.Future[None]] = []

    async def then_release(task_ids: list[str], until: float) -> None:
        await notice(task_ids, until)
        hold.clear()
        for msg, ev in held:  # the outcome comes in now, the cancel under way
            released.append(asyncio.ensure_future(on_outcome(msg, ev)))

    scheduler.outbox.cancel_notice = then_release  # type: ignore[method-assign]
    reply = await handle.cancel()
    assert reply.state.value == "succeeded"
    assert reply.answer is not None and reply.answer.result == "done"
    assert (await client.status(handle.task_id)).state.value == "succeeded"
    await asyncio.wait_for(asyncio.gather(*released), STEP)


# -- the rule, without I/O -------------------------------------------------------------------------


def task(direct: bool = True, deadline_in: float = 60.0) -> TaskMessage:
    now = time.time()
    return TaskMessage(
        task_id="t",
        capability="echo",
        payload=None,
        attempt=1,
        submitted_at=now,
        deadline=now + deadline_in,
        reply_to="r",
        correlation_id="c",
        direct=direct,
    )


def rule(t: TaskMessage, **overrides: Any) -> bool:
    args: dict[str, Any] = {
        "succeeded": True,
        "redelivered": False,
        "cancelled": False,
        "started_at": time.time(),
        "batched": False,
        **overrides,
    }
    return answers_directly(t, **args)


def test_a_lone_success_of_a_client_that_asked_is_answered_directly() -> None:
    assert rule(task())


@pytest.mark.parametrize(
    ("why", "t", "overrides"),
    [
        ("the client did not ask", task(direct=False), {}),
        ("a failure may be retried", task(), {"succeeded": False}),
        ("an earlier delivery may have answered", task(), {"redelivered": True}),
        ("the scheduler answers a cancel", task(), {"cancelled": True}),
        ("a batch holds other clients' tasks", task(), {"batched": True}),
        ("the scheduler may be expiring it", task(deadline_in=DEADLINE_MARGIN / 2), {}),
        ("it may have been declared dead", task(), {"heartbeats_kept": False}),
    ],
)
def test_no_direct_answer(why: str, t: TaskMessage, overrides: dict[str, Any]) -> None:
    assert not rule(t, **overrides), why


def test_heartbeats_lapse_on_a_long_gap_or_a_lost_connection() -> None:
    beats = Heartbeats(interval=1.0, miss_limit=3, now=100.0)  # a lapse: a gap over 2.5 s
    beats.beat(101.0)
    beats.beat(102.1)
    assert beats.kept_since(101.5, now=102.5)
    beats.beat(105.0)  # 2.9 s without one: a scheduler may have declared this worker dead
    assert not beats.kept_since(101.5, now=105.1)  # an attempt started before: not directly
    assert beats.kept_since(105.0 + 0.1, now=105.5)  # one started after: directly again
    assert not beats.kept_since(105.1, now=108.0)  # none for 3 s now: not directly
    beats.beat(108.1)
    beats.broke(108.5)
    assert not beats.kept_since(108.2, now=108.6)
    assert Heartbeats(interval=1.0, miss_limit=1, now=0.0).limit < 1.0  # every gap lapses
