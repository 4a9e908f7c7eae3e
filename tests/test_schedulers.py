"""Several schedulers side by side on one broker: each knows every task (they follow the journal),
any answers queries, and a task's timers survive its scheduler."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from amqpsched import NoWorkerAvailable
from amqpsched.scheduler.peers import Peers, rendezvous

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
