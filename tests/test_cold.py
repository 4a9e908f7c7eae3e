"""Waiting tasks kept cold (amqpsched/scheduler/cold.py): past ``max_waiting_records`` the
scheduler keeps a waiting task in a few bytes and reads it back from the journal when it needs
it. Nothing a client sees changes: queries, cancels, idempotency keys, deadlines, a restart and
workers that come later all work on cold tasks as on the others."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable

import pytest

from amqpsched.errors import NoWorkerAvailable, TaskFailed
from amqpsched.protocol import TaskState
from amqpsched.scheduler import Scheduler
from amqpsched.scheduler.cold import ColdTasks, id_hash
from amqpsched.scheduler.state import MemoryTaskStore, TaskRecord

from .conftest import System

STEP = 20.0


async def until(cond: Callable[[], bool], what: str, timeout: float = STEP) -> None:
    """Wait for ``cond`` (checked whenever the loop runs: each sweep changes the store)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


def cold_ids(sched: Scheduler, ids: list[str]) -> list[str]:
    return [i for i in ids if i in sched.store.cold]


async def test_cold_tasks_answer_queries_cancels_keys_and_run_when_a_worker_comes(
    system: System,
) -> None:
    sched = await system.scheduler(max_waiting_records=5)
    client = await system.client()
    handles = [await client.submit("echo", i, timeout=60) for i in range(40)]
    keyed = await client.submit("echo", "keyed", timeout=60, idempotency_key=uuid.uuid4().hex)
    ids = [h.task_id for h in [*handles, keyed]]
    # The newest are kept cold: workers take the oldest first.
    await until(lambda: len(cold_ids(sched, ids)) == 36, "36 tasks kept cold")
    assert not cold_ids(sched, ids[:5])
    # Cold ones still count as open (the metric autoscalers read).
    assert sched.store.open_counts().get("echo") == 41

    # A query reads it back: the same answer as if it had been kept whole.
    first = handles[-1]
    assert first.task_id in sched.store.cold
    status = await first.status()
    assert (status.state, status.capability) == (TaskState.DISPATCHED, "echo")

    # A cancel of a cold task: its submitter is answered `cancelled`, no worker runs it.
    cancelled = handles[-2]
    assert cancelled.task_id in sched.store.cold
    await cancelled.cancel()
    with pytest.raises(TaskFailed) as info:
        await cancelled.result()
    assert info.value.error_type == "cancelled"

    # The same idempotency key while its task is cold: the same task, answered to both.
    assert keyed.task_id in sched.store.cold
    again = await client.submit(
        "echo", "not run", timeout=60, idempotency_key=await _key_of(sched, keyed.task_id)
    )

    worker = await system.worker("echo")
    results = await asyncio.wait_for(
        asyncio.gather(*(h.result() for h in [keyed, again, first, *handles[:-2]])), STEP
    )
    assert results == ["keyed", "keyed", 39, *range(38)]
    assert worker.executed == 40  # every task but the cancelled one, each once
    await until(lambda: len(sched.store.cold) == 0, "nothing left cold")
    assert sched.metrics.cold_missing._value.get() == 0
    assert sched.metrics.read_back._value.get() >= 3


async def _key_of(sched: Scheduler, task_id: str) -> str:
    keys = [k for k, (t, _) in sched.store._keys.items() if t == task_id]
    assert keys, "the keyed task has its key"
    return keys[0]


async def test_cold_tasks_are_answered_at_their_deadline(system: System) -> None:
    sched = await system.scheduler(max_waiting_records=2)
    system.capabilities.add("nobody")
    client = await system.client()
    handles = [await client.submit("nobody", i, timeout=3) for i in range(20)]
    ids = [h.task_id for h in handles]
    await until(lambda: len(cold_ids(sched, ids)) >= 15, "15 tasks kept cold")
    began = time.time()
    for handle in handles:
        with pytest.raises(NoWorkerAvailable):
            await asyncio.wait_for(handle.result(), STEP)
    assert time.time() - began < 10  # at their deadline, not at some later sweep
    assert sched.metrics.cold_missing._value.get() == 0


async def test_a_restarted_scheduler_keeps_recovered_tasks_cold_and_answers_them(
    system: System,
) -> None:
    first = await system.scheduler(max_waiting_records=3)
    client = await system.client()
    handles = [await client.submit("echo", i, timeout=60) for i in range(25)]
    await until(lambda: first.store.waiting() <= 3, "the first scheduler cooled its tasks")
    await first.stop()
    second = await system.scheduler(max_waiting_records=3)
    ids = [h.task_id for h in handles]
    await until(lambda: len(cold_ids(second, ids)) >= 20, "recovered tasks kept cold")
    status = await client.status(ids[0])
    assert status.state == TaskState.DISPATCHED
    await system.worker("echo")
    results = await asyncio.wait_for(asyncio.gather(*(h.result() for h in handles)), STEP)
    assert results == list(range(25))


# Without I/O.


def test_cold_tasks_are_found_taken_out_and_due_in_deadline_order() -> None:
    cold = ColdTasks()
    for i in range(3000):
        cold.add(f"t{i}", "a" if i % 2 else "b", 1000.0 + i, 10**12 + i, i % 2)
    assert len(cold) == 3000 and "t7" in cold and "nope" not in cold
    assert cold.counts() == {"a": 1500, "b": 1500}
    entry = cold.pop("t7")
    assert entry is not None
    assert (entry.since, entry.capability, entry.flags) == (10**12 + 7, "a", 1)
    assert entry.deadline == pytest.approx(1007.0, abs=0.1)
    assert cold.pop("t7") is None and "t7" not in cold
    due = cold.due(1009.5, limit=100)
    assert [e.since - 10**12 for e in due] == [0, 1, 2, 3, 4, 5, 6, 8, 9]
    assert len(cold) == 3000 - 10
    cold.add("t10", "a", 5.0, 10**12 + 10, 0)  # kept again, with its new deadline
    assert cold.due(6.0, limit=10)[0].hash == id_hash("t10")


def test_cold_tasks_cost_under_40_bytes_each() -> None:
    cold = ColdTasks()
    n = 100_000
    for i in range(n):
        cold.add(uuid.uuid4().hex, "cap", 1e9 + 3600 + i / 1000, 2**40 + i, 0)
    assert cold.nbytes() / n < 40
    while len(cold):
        assert cold.due(2e9, 10_000)
    assert cold.nbytes() < 64 * 1024  # its room is given back


def test_offsets_far_apart_are_kept_relative_to_a_new_base() -> None:
    cold = ColdTasks()
    base = 10**12
    cold.add("a", "c", 10.0, base, 0)
    cold.add("b", "c", 10.0, base + 2**31 - 1, 0)
    cold.pop("a")
    cold.add("c", "c", 10.0, base + 2**31 + 7, 0)  # too far from "a", not from "b"
    assert [e.since - base for e in cold.due(11.0, 5)] == [2**31 - 1, 2**31 + 7]
    cold.add("d", "c", 10.0, 0, 0)
    with pytest.raises(OverflowError):  # the store keeps such a task whole
        cold.add("e", "c", 10.0, 2**32, 0)


def _record(task_id: str, since: int = 0, **fields: object) -> TaskRecord:
    now = 1000.0
    return TaskRecord(task_id, "cap", "reply", task_id, now, now + 60, since=since, **fields)  # type: ignore[arg-type]


def test_the_store_keeps_the_newest_waiting_records_cold_past_its_limit() -> None:
    store = MemoryTaskStore(3600, 10_000, hot_limit=3, cold_span=3600)
    for i in range(10):
        store.add(_record(f"t{i}", state=TaskState.DISPATCHED))
    store.add(_record("watched", state=TaskState.DISPATCHED, watchers=[("r", "c")]))
    store.add(_record("unknown-offset", since=-1, state=TaskState.DISPATCHED))
    running = _record("running", state=TaskState.RUNNING)
    store.add(running)
    # 12 waiting, 3 kept whole: the oldest (workers take them first); of the 9 newest, two it
    # may not cool stay whole too.
    assert store.cool() == 7
    assert [f"t{i}" in store.cold for i in range(10)] == [False] * 3 + [True] * 7
    assert store.get("t0") is not None and store.get("t9") is None
    assert store.get("watched") is not None and store.get("unknown-offset") is not None
    assert store.open_counts() == {"cap": 13}
    assert store.cool() == 0  # the two it may not cool are the newest
    store.add(_record("t9", state=TaskState.DISPATCHED))  # known whole again
    assert "t9" not in store.cold and store.get("t9") is not None
    store.forget("t1")
    assert "t1" not in store.cold
    assert store.open_counts() == {"cap": 12}
    newest = _record("new", state=TaskState.DISPATCHED)
    store.add(newest)
    assert store.cool_one(newest) and "new" in store.cold  # confirmed: the newest goes cold
    oldest = store.get("t0")
    assert oldest is not None and not store.cool_one(oldest)  # confirmed late: stays whole


def test_a_task_longer_than_the_journal_keeps_it_stays_whole() -> None:
    store = MemoryTaskStore(3600, 10_000, hot_limit=0, cold_span=30)
    store.add(_record("long", state=TaskState.DISPATCHED))  # waits 60 s, journal keeps 30
    assert store.cool() == 0 and store.get("long") is not None


@pytest.mark.parametrize("seed", range(5))
def test_cold_tasks_behave_like_a_dict_of_deadlines(seed: int) -> None:
    """Random adds, pops and due sweeps, against a plain dict: same tasks due, none lost."""
    rng = random.Random(seed)
    cold, model = ColdTasks(), {}
    now = 1e9
    for step in range(3000):
        op = rng.random()
        if op < 0.6:
            task_id = f"t{rng.randrange(2000)}"
            deadline = now + rng.choice([5.0, 5.0, 5.0, 1.0, 30.0, rng.random() * 20])
            cold.add(task_id, "c", deadline, step, 1)
            model[task_id] = deadline
        elif op < 0.8 and model:
            task_id = rng.choice(sorted(model))
            assert cold.pop(task_id) is not None
            del model[task_id]
        else:
            now += rng.random() * 2
            due = {e.hash for e in cold.due(now, limit=10**6)}
            expected = {t for t, d in model.items() if d <= now}
            assert due == {id_hash(t) for t in expected}
            for task_id in expected:
                del model[task_id]
        assert len(cold) == len(model)
