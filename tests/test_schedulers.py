"""Several schedulers side by side on one broker: each knows every task (they follow the journal),
any answers queries, and a task's timers survive its scheduler."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from amqpsched import NoWorkerAvailable, transport
from amqpsched.protocol import (
    Kind,
    OutcomeEvent,
    Status,
    SubmitRequest,
    TaskMessage,
    answer_of,
    encode,
)
from amqpsched.scheduler import Scheduler
from amqpsched.scheduler.peers import Peers, rendezvous
from amqpsched.scheduler.state import TaskRecord

from .conftest import System

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
