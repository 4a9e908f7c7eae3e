"""Several schedulers side by side on one broker: each knows every task (they follow the journal),
any answers queries, and a task's timers survive its scheduler."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import aio_pika.exceptions
import pytest

from amqpsched import NoWorkerAvailable, transport
from amqpsched.batching import Done
from amqpsched.client import Client, TaskHandle
from amqpsched.errors import BrokerError
from amqpsched.protocol import (
    RESENT_HEADER,
    Answer,
    Kind,
    OutcomeEvent,
    Status,
    SubmitRequest,
    TaskMessage,
    TaskState,
    answer_of,
    decode,
    encode,
)
from amqpsched.scheduler import Scheduler
from amqpsched.scheduler.peers import Peers, rendezvous
from amqpsched.scheduler.state import TaskRecord

from .conftest import RawClient, System

TIMEOUT = 20.0


async def wait_until(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


def test_one_survivor_takes_each_task_of_a_dead_scheduler() -> None:
    now = 1000.0
    views = {}
    for me in ("a", "b", "c"):
        peers = Peers(me, window=2.0)
        for other in ("a", "b", "c", "dead"):
            peers.seen(other, now - (10 if other == "dead" else 0))
        views[me] = peers
    tasks = [f"t{i}" for i in range(300)]
    for task_id in tasks:
        takers = [me for me, p in views.items() if p.runs_timers("dead", task_id, now)]
        assert len(takers) == 1, (task_id, takers)
        owners = [me for me, p in views.items() if p.runs_timers("a", task_id, now)]
        assert owners == ["a"], "a live owner keeps its tasks"
    spread = {rendezvous(t, ["a", "b", "c"]) for t in tasks}
    assert spread == {"a", "b", "c"}, "the orphans are spread over the survivors"
    gone = views["b"]
    gone.gone("a")
    assert gone.runs_timers("a", "t1", now) == (rendezvous("t1", ["b", "c"]) == "b")


def test_the_live_schedulers_not_heard_from_since_a_moment() -> None:
    peers = Peers("me", window=2.0)
    peers.seen("old", 10.0)
    peers.seen("recent", 14.0)
    peers.seen("dead", 5.0)
    peers.seen("me", 1.0)  # itself: never waited for
    assert peers.behind(12.0, now=11.0) == ["old"]
    assert peers.behind(15.0, now=11.0) == ["old", "recent"]
    assert peers.behind(15.0, now=13.0) == ["recent"], "silent for longer than the window"
    peers.gone("recent")
    assert peers.behind(15.0, now=13.0) == []


async def test_schedulers_see_each_other_and_share_every_task(system: System) -> None:
    first = await system.scheduler()
    second = await system.scheduler()
    await wait_until(lambda: len(first.peers.live(time.time())) == 2)
    await system.worker("echo", "sleep", concurrency=16)
    client = await system.client()
    handles = [await client.submit("echo", {"i": i}) for i in range(60)]
    answers = await asyncio.wait_for(asyncio.gather(*(h.answer() for h in handles)), TIMEOUT)
    assert [a.result for a in answers] == [{"i": i} for i in range(60)]
    # Both know every task, whichever dispatched or answered it.
    await wait_until(
        lambda: all(
            (r := s.store.get(h.task_id)) is not None and r.final
            for s in (first, second)
            for h in handles
        )
    )


async def test_a_result_query_to_one_gets_the_answer_another_sends(system: System) -> None:
    schedulers = [await system.scheduler(), await system.scheduler()]
    await system.worker("sleep", concurrency=4)
    client = await system.client()
    handle = await client.submit("sleep", {"seconds": 0.5})
    # A query may overtake the journal record of its task to the other scheduler (docs/cluster.md)
    await wait_until(lambda: all(s.store.get(handle.task_id) for s in schedulers))
    # Many queries: both schedulers get some (competing consumers on tasks.submit); each waits
    # for the answer, which only one of them sends to the submitter.
    answers = await asyncio.wait_for(
        asyncio.gather(*(client.answer(handle.task_id, timeout=TIMEOUT) for _ in range(8))),
        TIMEOUT,
    )
    assert {a.status.value for a in answers} == {"succeeded"}


@pytest.mark.parametrize("goodbye", [True, False], ids=["stopped", "silent"])
async def test_a_waiting_task_is_answered_when_its_scheduler_is_gone(
    system: System, goodbye: bool
) -> None:
    first = await system.scheduler(scheduler_id="first-one")
    second = await system.scheduler(scheduler_id="second-one")
    await wait_until(lambda: len(second.peers.live(time.time())) == 2)
    system.capabilities.add("nobody")  # its queue is deleted after the test
    client = await system.client()
    # No worker offers it: the answer is `no_worker` at the deadline, from whichever scheduler
    # runs the task's timers: its owner, or a survivor once the owner is gone.
    handles = [await client.submit("nobody", i, timeout=2.0) for i in range(20)]
    await wait_until(
        lambda: (
            all(second.store.get(h.task_id) is not None for h in handles)
            and all(first.store.get(h.task_id) is not None for h in handles)
        )
    )
    if goodbye:
        await first.stop()
    else:  # as if killed: it stops its timers and says nothing
        assert first._sweeper is not None
        first._sweeper.cancel()
        first.consuming = False
    for handle in handles:
        with pytest.raises(NoWorkerAvailable):
            await asyncio.wait_for(handle.result(), TIMEOUT)


def an_outcome(reply_to: str = "nobody") -> OutcomeEvent:
    now = time.time()
    return OutcomeEvent(
        task_id=f"t-{uuid.uuid4().hex[:8]}",
        capability="echo",
        attempt=1,
        worker_id="w",
        status=Status.SUCCEEDED,
        result={"ok": 1},
        reply_to=reply_to,
        correlation_id="c",
        submitted_at=now - 1,
        started_at=now - 0.5,
        finished_at=now,
    )


class HeldJournal:
    """Holds back what a scheduler's journal reader applies, until released (as a reader that
    lags behind the journal)."""

    def __init__(self, scheduler: Scheduler) -> None:
        assert scheduler._reader is not None
        self.reader = scheduler._reader
        self.apply = self.reader.apply
        self.held: list[tuple[Any, ...]] = []
        self.reader.apply = self._hold

    def _hold(self, *entry: Any) -> None:
        self.held.append(entry)

    def holds(self, text: bytes) -> bool:
        return any(isinstance(part, bytes) and text in part for e in self.held for part in e)

    def release(self) -> None:
        self.reader.apply = self.apply
        for entry in self.held:
            self.apply(*entry)


async def test_a_redelivered_outcome_waits_for_the_journal_before_answering(
    system: System,
) -> None:
    """An outcome redelivered (its first scheduler lost its connection, maybe after answering)
    is answered only if the journal, read up to now, holds no answer: here another
    scheduler's answer is journaled, and read only later; nothing is answered twice."""
    scheduler = await system.scheduler()
    answered: list[str] = []
    finish = scheduler._finish_nowait

    def counted(record: TaskRecord, *args: Any, **kwargs: Any) -> asyncio.Future[Any] | None:
        answered.append(record.task_id)
        return finish(record, *args, **kwargs)

    scheduler._finish_nowait = counted  # type: ignore[method-assign]
    held = HeldJournal(scheduler)
    first, second = an_outcome(), an_outcome()
    async with transport.connection(system.settings, "test-journal") as conn:
        channel = await transport.confirm_channel(conn)
        for ev in (first, second):  # answered by another scheduler
            msg = transport.message(
                encode(answer_of(ev)), Kind.ANSWER, headers={transport.H_SCHEDULER: "other"}
            )
            await transport.publish(channel.default_exchange, msg, system.topology.journal_queue)
    await wait_until(lambda: held.holds(first.task_id.encode()))
    redelivered = scheduler._outcome(first, None, redelivered=True)
    assert redelivered is not None and not answered
    # It waits for a record of its own to come back from the journal, behind that answer.
    await wait_until(lambda: held.holds(b'"k":"sync"'))
    assert not redelivered.done()
    # Delivered for the first time, an outcome is answered at once: the case of the other.
    assert scheduler._outcome(second, None) is not None
    assert answered == [second.task_id]
    held.release()
    await asyncio.wait_for(redelivered, TIMEOUT)
    record = scheduler.store.get(first.task_id)
    assert record is not None and record.final
    assert answered == [second.task_id], "the redelivered outcome is not answered again"


async def test_a_journal_write_confirmed_but_not_stored_is_written_again(
    system: System,
) -> None:
    """The node of the journal's leader stopping can confirm a write that the journal never
    stores. Its writer notices that a later write of its own came back and that one did not,
    and writes it again: the other schedulers learn the answer."""
    first = await system.scheduler()
    second = await system.scheduler()
    ev = an_outcome()
    body = encode(answer_of(ev))
    now = time.monotonic()
    first._unread.sent(body, Kind.ANSWER, now)  # as if published,
    first._unread.confirmed(body, Kind.ANSWER, now)  # and confirmed, but never stored
    await wait_until(lambda: (r := second.store.get(ev.task_id)) is not None and r.final)


async def test_a_redelivered_submission_waits_for_the_journal_and_runs_as_the_next_attempt(
    system: System,
) -> None:
    """A submission handed back by a scheduler that died after dispatching its task (the
    dispatch is in the journal, not read here yet) is taken only once the journal is read up to
    now; the task then runs as attempt 2, so attempt 1's outcome is fenced and it is answered
    once (not directly by its worker: attempt 1's may have been)."""
    scheduler = await system.scheduler()
    held = HeldJournal(scheduler)
    now = time.time()
    task = TaskMessage(
        task_id=f"t-{uuid.uuid4().hex[:8]}",
        capability="echo",
        payload=1,
        attempt=1,
        submitted_at=now,
        deadline=now + 60,
        reply_to="nobody",
        correlation_id="c",
        direct=True,
    )
    async with transport.connection(system.settings, "test-journal") as conn:
        channel = await transport.confirm_channel(conn)
        msg = transport.message(encode(task), Kind.TASK, headers={transport.H_SCHEDULER: "dead"})
        await transport.publish(channel.default_exchange, msg, system.topology.journal_queue)
    await wait_until(lambda: held.holds(task.task_id.encode()))
    req = SubmitRequest(v=1, task_id=task.task_id, capability="echo", payload=1)
    accepted = scheduler._accept(
        req, 60, "nobody", "c", None, redelivered=True, replay=False, batch_reply=False, direct=True
    )
    assert accepted is not None
    await wait_until(lambda: held.holds(b'"k":"sync"'))
    assert not accepted.done() and scheduler.store.get(task.task_id) is None
    held.release()
    await asyncio.wait_for(accepted, TIMEOUT)
    record = scheduler.store.get(task.task_id)
    assert record is not None and record.attempt == 2
    assert record.task is not None and record.task.attempt == 2 and not record.task.direct
    # Attempt 1's outcome is fenced: nothing is answered for it.
    late = an_outcome().model_copy(update={"task_id": task.task_id})
    assert scheduler._outcome(late, None) is None and not record.final


async def test_redelivered_messages_at_once_share_a_journal_sync(system: System) -> None:
    """A batch of redelivered messages (after a failure) waits for the journal once or twice,
    not once per task: callers that come while a sync runs share the next one."""
    scheduler = await system.scheduler()
    before = scheduler._syncs_sent
    await asyncio.wait_for(asyncio.gather(*(scheduler._synced() for _ in range(200))), TIMEOUT)
    await asyncio.wait_for(scheduler._synced(), TIMEOUT)  # one more, after them: its own
    assert scheduler._syncs_sent - before == 2


def a_refusal() -> BrokerError:
    """A publish the broker refused (nacked): some of its destinations did not take it."""
    exc = BrokerError("publish refused (by the test)")
    exc.__cause__ = aio_pika.exceptions.DeliveryError(None, None)  # type: ignore[arg-type]
    return exc


def refuse_answer(
    scheduler: Scheduler,
    task_id: str,
    *,
    publish: bool | Literal["journal"],
    error: Callable[[], BrokerError] = a_refusal,
) -> None:
    """The scheduler's first answer to ``task_id`` fails with ``error`` (after it went out, if
    ``publish``; to the journal alone, not to its client, if ``"journal"``); a refused one is
    refused again when sent again on its own."""
    answer_then = scheduler.outbox.answer_then
    refused: list[str] = []

    def refusing(
        targets: list[tuple[str, str]],
        answer: Answer,
        done: Done,
        traceparent: str | None = None,
        batch_reply: bool = False,
    ) -> None:
        if answer.task_id != task_id or refused:
            answer_then(targets, answer, done, traceparent, batch_reply)
            return
        refused.append(task_id)
        if publish:
            if publish == "journal":
                targets = []

            def sent(exc: BaseException | None) -> None:
                done(exc or error())

            answer_then(targets, answer, sent, traceparent, batch_reply)
        else:
            asyncio.get_running_loop().call_soon(done, error())

    async def resend_refused(
        targets: list[tuple[str, str]], answer: Answer, record: TaskRecord
    ) -> None:
        raise a_refusal()

    scheduler.outbox.answer_then = refusing  # type: ignore[method-assign]
    scheduler._resend = resend_refused  # type: ignore[method-assign]


async def dispatched_here(scheduler: Scheduler, client: Client) -> tuple[TaskHandle, TaskRecord]:
    """A task nobody takes, submitted with a long timeout; its record in ``scheduler``, which
    runs its timers."""
    handle = await client.submit("echo", {"n": 1}, timeout=30.0)
    await wait_until(lambda: scheduler.store.get(handle.task_id) is not None)
    record = scheduler.store.get(handle.task_id)
    assert record is not None
    record.owner = scheduler.scheduler_id
    return handle, record


async def outcome_answer_refused(
    scheduler: Scheduler,
    record: TaskRecord,
    *,
    publish: bool | Literal["journal"],
    error: Callable[[], BrokerError] = a_refusal,
) -> OutcomeEvent:
    """The worker's outcome of ``record`` comes to ``scheduler``, whose answer fails (see
    :func:`refuse_answer`): the outcome, to hand it back."""
    refuse_answer(scheduler, record.task_id, publish=publish, error=error)
    ev = outcome_of(record)
    answering = scheduler._outcome(ev, None)
    assert answering is not None
    with pytest.raises(BrokerError):
        await asyncio.wait_for(answering, TIMEOUT)
    return ev


def outcome_of(record: TaskRecord) -> OutcomeEvent:
    now = time.time()
    return OutcomeEvent(
        task_id=record.task_id,
        capability=record.capability,
        attempt=1,
        worker_id="w",
        status=Status.SUCCEEDED,
        result={"ok": 1},
        reply_to=record.reply_to,
        correlation_id=record.correlation_id,
        submitted_at=record.submitted_at,
        started_at=now - 0.1,
        finished_at=now,
    )


async def test_an_answer_refused_yet_journaled_is_final_where_it_was_sent_and_never_expires(
    system: System,
) -> None:
    """An answer whose publish is refused can still reach its client and the journal; sent
    again on its own, refused again, its task is reopened. Its outcome is handed back, and
    taken by another scheduler, which finds the answer in the journal and drops it. The first
    finds its own answer in the journal too: the task is answered there, and never expires as
    "no worker started it" (a second, contrary answer, which every scheduler would take)."""
    first = await system.scheduler()
    second = await system.scheduler()
    await wait_until(lambda: len(first.peers.live(time.time())) == 2)
    client = await system.client()
    handle, record = await dispatched_here(first, client)
    await wait_until(lambda: second.store.get(handle.task_id) is not None)
    ev = await outcome_answer_refused(first, record, publish=True)
    answer = await asyncio.wait_for(handle.answer(), TIMEOUT)
    assert answer.status == Status.SUCCEEDED
    # Handed back, the outcome reaches the other scheduler: the journal has its answer.
    again = second._outcome(ev, None, redelivered=True)
    if again is not None:
        await asyncio.wait_for(again, TIMEOUT)
    theirs = second.store.get(handle.task_id)
    assert theirs is not None and theirs.answer is not None
    assert theirs.answer.status == Status.SUCCEEDED
    await wait_until(lambda: record.final)
    await first.sweep(record.deadline + 5)  # its deadline passes
    await asyncio.wait_for(first._synced(), TIMEOUT)  # what it journaled, the other has read
    await asyncio.wait_for(second._synced(), TIMEOUT)
    for scheduler in (first, second):
        known = scheduler.store.get(handle.task_id)
        assert known is not None and known.state == TaskState.SUCCEEDED, known


async def test_an_answer_refused_that_reached_the_journal_alone_is_sent_again_to_its_client(
    system: System,
) -> None:
    """A refused publish of an answer reached the journal and not its client's reply queue;
    sent again on its own, refused again. The other schedulers read it in the journal and never
    send it; the scheduler that sent it finds it there and sends it to the client again, marked
    as sent again (the client would otherwise wait until its timeout)."""
    scheduler = await system.scheduler()
    async with RawClient(system) as raw:
        task_id = uuid.uuid4().hex
        body = {"v": 1, "capability": "echo", "payload": 1, "task_id": task_id, "timeout": 30}
        corr = await raw.send(json.dumps(body).encode())
        await wait_until(lambda: scheduler.store.get(task_id) is not None)
        record = scheduler.store.get(task_id)
        assert record is not None
        await outcome_answer_refused(scheduler, record, publish="journal")
        msg = await raw.reply_message(corr, TIMEOUT)
    assert (msg.headers or {}).get(RESENT_HEADER) is True
    answer = decode(Answer, msg.body)
    assert answer.status == Status.SUCCEEDED and answer.result == {"ok": 1}
    assert record.final and not scheduler._unsure_to


async def test_a_task_whose_outcome_came_is_not_expired_while_its_answer_waits(
    system: System,
) -> None:
    """An outcome came, and its answer was refused (no destination took it): the task ran, so
    its deadline passing does not make it expire as never started. Handed back, the outcome
    answers it."""
    scheduler = await system.scheduler()
    client = await system.client()
    handle, record = await dispatched_here(scheduler, client)
    ev = await outcome_answer_refused(scheduler, record, publish=False)
    assert not record.final
    await scheduler.sweep(record.deadline + 5)  # its deadline passes
    assert not record.final, f"answered {record.answer}"
    again = scheduler._outcome(ev, None, redelivered=True)
    assert again is not None
    await asyncio.wait_for(again, TIMEOUT)
    answer = await asyncio.wait_for(handle.answer(), TIMEOUT)
    assert answer.status == Status.SUCCEEDED


async def test_an_answer_not_confirmed_is_looked_for_in_the_journal_until_found(
    system: System,
) -> None:
    """An answer whose publish got no confirm may have gone out: its journal copy can be stored
    late (a stream leader moving). The scheduler looks for it again, less and less often, and
    takes it as sent once found, not only on its first look."""
    scheduler = await system.scheduler()
    client = await system.client()
    handle, record = await dispatched_here(scheduler, client)
    held = HeldJournal(scheduler)  # it does not read its own entries as it follows the journal

    def unconfirmed() -> BrokerError:
        return BrokerError("no confirm (by the test)")

    ev = await outcome_answer_refused(scheduler, record, publish=False, error=unconfirmed)
    await wait_until(lambda: (c := scheduler._journal_check) is not None and c[1].done())
    assert not record.final, "its first look found nothing"
    async with transport.connection(system.settings, "test-journal") as conn:
        channel = await transport.confirm_channel(conn)  # the copy, stored late
        msg = transport.message(
            encode(answer_of(ev)),
            Kind.ANSWER,
            headers={transport.H_SCHEDULER: scheduler.scheduler_id},
        )
        await transport.publish(channel.default_exchange, msg, system.topology.journal_queue)
    await wait_until(lambda: record.final)
    assert record.answer is not None and record.answer.status == Status.SUCCEEDED
    assert held.holds(handle.task_id.encode())
