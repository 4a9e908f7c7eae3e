"""Coalescing and the batch messages, without a broker: the pure parts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import pytest

from amqpsched.batching import Coalescer, Countdown, KeyedCoalescer, batch_body, joined
from amqpsched.protocol import (
    BATCH_FEATURE,
    Answer,
    AnswerBatch,
    CapabilityInfo,
    Kind,
    OutcomeBatch,
    OutcomeEvent,
    Status,
    SubmitBatch,
    TaskBatch,
    TaskMessage,
    WorkerAnnouncement,
    decode,
    decode_event,
    encode,
)
from amqpsched.scheduler.outbox import answer_batch_body
from amqpsched.scheduler.recovery import apply_entry
from amqpsched.scheduler.registry import BATCH_CAP, BATCH_PER_SLOT, WorkerRegistry
from amqpsched.scheduler.state import MemoryTaskStore
from amqpsched.worker.slots import Slots

WAIT = 5.0


class Recorder:
    """A ``send`` that records its batches and waits for ``release`` (a confirm in flight)."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.called = asyncio.Event()
        self.fail = fail

    async def __call__(self, items: list[int]) -> None:
        self.batches.append(items)
        self.called.set()
        await self.release.wait()
        if self.fail:
            raise RuntimeError("broker said no")


async def test_with_a_hold_items_added_turns_apart_go_in_one_send() -> None:
    send = Recorder()
    coalescer = Coalescer(send, hold=0.2)
    first = coalescer.add_nowait(1)
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # a later turn of the loop, within the hold
    second = coalescer.add_nowait(2)
    await asyncio.wait_for(asyncio.gather(first, second), WAIT)
    assert send.batches == [[1, 2]]


async def test_items_added_at_the_same_moment_go_in_one_send() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_items=100)
    await asyncio.wait_for(asyncio.gather(*(coalescer.add(i) for i in range(10))), WAIT)
    assert send.batches == [list(range(10))]


async def test_a_lone_item_is_sent_alone_and_at_once() -> None:
    send = Recorder()
    coalescer = Coalescer(send)
    await asyncio.wait_for(coalescer.add(1), WAIT)
    await asyncio.wait_for(coalescer.add(2), WAIT)
    assert send.batches == [[1], [2]]
    assert coalescer.idle


async def test_items_wait_while_sends_are_in_flight_then_go_together() -> None:
    send = Recorder()
    send.release.clear()
    coalescer = Coalescer(send, max_sends=1)
    first = asyncio.ensure_future(coalescer.add(0))
    await asyncio.wait_for(send.called.wait(), WAIT)
    assert send.batches == [[0]]
    later = [asyncio.ensure_future(coalescer.add(i)) for i in range(1, 6)]
    for _ in range(5):  # turns of the loop in which a send could start
        await asyncio.sleep(0)
    assert send.batches == [[0]], "nothing more is sent while the first awaits its confirm"
    send.release.set()
    await asyncio.wait_for(asyncio.gather(first, *later), WAIT)
    assert send.batches == [[0], [1, 2, 3, 4, 5]]


async def test_batches_are_bounded_by_count_and_by_bytes() -> None:
    send = Recorder()
    coalescer = Coalescer(send, max_items=4, max_sends=10)
    await asyncio.wait_for(asyncio.gather(*(coalescer.add(i) for i in range(10))), WAIT)
    assert send.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    send.batches.clear()
    by_size = Coalescer(send, max_items=100, max_sends=10, size=lambda i: i, max_bytes=10)
    await asyncio.wait_for(asyncio.gather(*(by_size.add(i) for i in (4, 5, 3, 20, 1))), WAIT)
    # 4+5 fit; 3 would pass 10; 20 is larger than the limit and goes alone.
    assert send.batches == [[4, 5], [3], [20], [1]]


async def test_a_failed_send_fails_each_of_its_items_and_not_others() -> None:
    send = Recorder(fail=True)
    coalescer = Coalescer(send)
    results = await asyncio.wait_for(
        asyncio.gather(*(coalescer.add(i) for i in range(3)), return_exceptions=True), WAIT
    )
    assert all(isinstance(r, RuntimeError) for r in results)
    send.fail = False
    await asyncio.wait_for(coalescer.add(9), WAIT)
    assert send.batches[-1] == [9]


async def test_callbacks_of_a_send_are_called_with_its_fate_and_a_countdown_waits_for_all() -> None:
    """A batch's items waited for by one countdown: it is done once every send that carried
    one returned, and fails with a failed send's error, after the others are done too."""
    batches: list[list[int]] = []
    second_sent = asyncio.Event()

    async def send(items: list[int]) -> None:
        batches.append(items)
        if 0 in items:
            await asyncio.wait_for(second_sent.wait(), WAIT)  # fails last
            raise RuntimeError("broker said no")
        second_sent.set()

    coalescer = Coalescer(send, max_items=2, max_sends=2)
    countdown = Countdown()
    fates: dict[int, BaseException | None] = {}

    def done_of(i: int, done: Callable[[BaseException | None], None]) -> Callable[..., None]:
        def done_i(exc: BaseException | None) -> None:
            fates[i] = exc
            done(exc)

        return done_i

    for i in range(4):
        coalescer.add_then(i, done_of(i, countdown.add()))
    with pytest.raises(RuntimeError, match="broker said no"):
        await asyncio.wait_for(countdown.seal(), WAIT)
    assert batches == [[0, 1], [2, 3]]
    assert isinstance(fates[0], RuntimeError) and isinstance(fates[1], RuntimeError)
    assert fates[2] is None and fates[3] is None, "each item learns its own send's fate"
    empty = Countdown()
    await asyncio.wait_for(empty.seal(), WAIT)  # nothing to wait for: done at once


async def test_a_countdown_is_not_done_before_it_is_sealed() -> None:
    countdown = Countdown()
    done = countdown.add()
    done(None)
    await asyncio.sleep(0)
    assert not countdown.future.done(), "more may be added until it is sealed"
    late = countdown.add()
    countdown.seal()
    assert not countdown.future.done()
    late(None)
    await asyncio.wait_for(countdown.future, WAIT)


async def test_keyed_coalescers_batch_per_key_and_are_dropped_when_idle() -> None:
    sent: list[tuple[str, list[int]]] = []

    async def send(key: str, items: list[int]) -> None:
        sent.append((key, items))

    keyed: KeyedCoalescer[str, int] = KeyedCoalescer(send)
    adds = [keyed.add("a" if i % 2 else "b", i) for i in range(6)]
    await asyncio.wait_for(asyncio.gather(*adds), WAIT)
    assert sorted(sent) == [("a", [1, 3, 5]), ("b", [0, 2, 4])]
    assert len(keyed) == 0, "no coalescer is kept for a reply queue that went quiet"


def _task(i: int, now: float) -> TaskMessage:
    return TaskMessage(
        task_id=f"t{i}",
        capability="echo",
        payload={"i": i},
        attempt=1,
        submitted_at=now,
        deadline=now + 60,
        reply_to="r",
        correlation_id=f"c{i}",
    )


def _answer(i: int, now: float) -> Answer:
    return Answer(
        task_id=f"t{i}",
        status=Status.SUCCEEDED,
        capability="echo",
        result={"i": i},
        attempts=1,
        submitted_at=now,
        finished_at=now + 1,
    )


def test_batch_bodies_decode_as_their_models() -> None:
    now = time.time()
    tasks = [_task(i, now) for i in range(3)]
    body = batch_body(b"tasks", [encode(t) for t in tasks], [None, "tp", None])
    assert decode_event(TaskBatch, body) == TaskBatch(tasks=tasks, traceparents=[None, "tp", None])
    outcome = OutcomeEvent(
        task_id="t1",
        capability="echo",
        attempt=1,
        worker_id="w",
        status=Status.SUCCEEDED,
        result=1,
        reply_to="r",
        correlation_id="c1",
        submitted_at=now,
        finished_at=now,
    )
    events = decode_event(OutcomeBatch, batch_body(b"events", [encode(outcome)], [None]))
    assert events.events == [outcome]
    answers = decode_event(AnswerBatch, answer_batch_body([("c1", encode(_answer(1, now)))]))
    assert [(a.correlation_id, a.answer) for a in answers.answers] == [("c1", _answer(1, now))]


def test_submit_batch_is_strict_and_needs_task_ids_and_correlation_ids() -> None:
    good = b'{"v":1,"tasks":[{"capability":"echo","payload":1,"task_id":"a","correlation_id":"c"}]}'
    assert decode(SubmitBatch, good).tasks[0].correlation_id == "c"
    for bad in (
        b'{"v":1,"tasks":[]}',
        b'{"v":1,"tasks":[{"capability":"echo","payload":1,"correlation_id":"c"}]}',
        b'{"v":1,"tasks":[{"capability":"echo","payload":1,"task_id":"a"}]}',
        b'{"v":1,"tasks":[{"capability":"echo","payload":1,"task_id":"a","correlation_id":"c",'
        b'"typo":1}]}',
    ):
        with pytest.raises(Exception, match="tasks"):
            decode(SubmitBatch, bad)


def test_journal_batches_are_replayed_task_by_task() -> None:
    now = time.time()
    store = MemoryTaskStore(retention=600, max_size=100)
    tasks = [_task(i, now) for i in range(4)]
    apply_entry(
        store, {}, Kind.TASK_BATCH, batch_body(b"tasks", [encode(t) for t in tasks], [None] * 4)
    )
    answers = answer_batch_body([(f"c{i}", encode(_answer(i, now))) for i in (0, 2)])
    apply_entry(store, {}, Kind.ANSWER_BATCH, answers)
    records = [store.get(f"t{i}") for i in range(4)]
    assert all(r is not None for r in records)
    assert [r.final for r in records if r is not None] == [True, False, True, False]


def test_a_task_learned_from_the_journal_is_answered_as_its_client_accepts() -> None:
    """Another scheduler may answer the task (several side by side, or after a restart): the
    dispatch in the journal says whether its client takes ``answer_batch`` replies, so answers
    ready at the same moment still go together, whoever sends them."""
    now = time.time()
    store = MemoryTaskStore(retention=600, max_size=100)
    takes, plain = _task(0, now).model_copy(update={"answer_batch": True}), _task(1, now)
    apply_entry(
        store, {}, Kind.TASK_BATCH, batch_body(b"tasks", [encode(takes), encode(plain)], [None] * 2)
    )
    batch_replies = [r.batch_reply for r in (store.get("t0"), store.get("t1")) if r is not None]
    assert batch_replies == [True, False]


def _announce(
    registry: WorkerRegistry, worker_id: str, concurrency: int, batch: bool, now: float
) -> None:
    registry.observe(
        Kind.HEARTBEAT,
        WorkerAnnouncement(
            worker_id=worker_id,
            capabilities=[CapabilityInfo(name="echo")],
            concurrency=concurrency,
            sent_at=now,
            features=[BATCH_FEATURE] if batch else [],
        ),
        now,
    )


def test_tasks_are_batched_only_to_capabilities_whose_workers_all_take_batches() -> None:
    registry = WorkerRegistry(heartbeat_interval=1.0, miss_limit=3)
    now = time.time()
    assert registry.batch_limit("echo") == 1, "no worker: one task per message"
    _announce(registry, "w1", 8, True, now)
    assert registry.batch_limit("echo") == 8 * BATCH_PER_SLOT
    _announce(registry, "w2", 4, True, now)
    assert registry.batch_limit("echo") == 4 * BATCH_PER_SLOT, "sized for the smallest worker"
    _announce(registry, "w3", 64, False, now)
    assert registry.batch_limit("echo") == 1, "a worker that does not take batches"
    registry.sweep(now + 10)
    _announce(registry, "w4", 1000, True, now + 10)
    assert registry.batch_limit("echo") == BATCH_CAP


async def test_slots_are_handed_on_in_order_and_refused_once_closed() -> None:
    slots = Slots(1)
    assert await asyncio.wait_for(slots.acquire(), WAIT)
    waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters), "no slot free: they wait"
    slots.release()
    assert await asyncio.wait_for(waiters[0], WAIT), "the first waiter gets the released slot"
    waiters[1].cancel()
    slots.close()
    assert await asyncio.wait_for(waiters[2], WAIT) is False, "draining: refused at once"
    assert await asyncio.wait_for(slots.acquire(), WAIT) is False
    slots.release()
    slots.release()
    assert slots.free == 2, "slots taken before the close come back"


def test_joined_is_head_items_and_tail_with_separators() -> None:
    assert joined(b"[", [], b"]") == b"[]"
    assert joined(b"[", [b"1"], b"]") == b"[1]"
    assert joined(b"[", iter([b"1", b"22", b"333"]), b"]") == b"[1,22,333]"
    assert joined(b"", [b"a", b"b"], b"", sep=b"\n") == b"a\nb"
    many = [b"x" * 65536] * 16  # as a batch of 64 KiB tasks: valid JSON, every item whole
    assert json.loads(joined(b"[", [b'"' + m + b'"' for m in many], b"]")) == ["x" * 65536] * 16
