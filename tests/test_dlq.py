"""``amqpsched dlq``: listing the dead-letter queue without emptying it, and replaying from it."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage

from amqpsched.client import answer_value
from amqpsched.dlq import DeadLetter, dead_at, list_dead, replay, resubmission
from amqpsched.errors import TaskFailed
from amqpsched.protocol import (
    Answer,
    ErrorType,
    Kind,
    RetryOverride,
    RetryPolicy,
    Status,
    SubmitRequest,
    TaskMessage,
    decode,
    encode,
)
from amqpsched.settings import Settings
from amqpsched.transport import H_DEAD_ID, H_REASON, H_REPLAY, IncomingMessage
from amqpsched.worker import WorkerApp

from .conftest import ROOT, System

WAIT = 20.0


class Replies:
    """A submitter speaking raw AMQP: its own reply queue, every reply kept in arrival order."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def __aenter__(self) -> Replies:
        self.conn = await aio_pika.connect(self.system.settings.amqp_url.get_secret_value())
        self.channel = await self.conn.channel()
        queue = await self.channel.declare_queue(exclusive=True)
        self.reply_to = queue.name
        await queue.consume(self.inbox.put, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def send(self, body: bytes, type_: str | None = "submit") -> str:
        corr = uuid.uuid4().hex
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type="application/json",
                correlation_id=corr,
                reply_to=self.reply_to,
                type=type_,
            ),
            routing_key=self.system.topology.submit_queue,
        )
        return corr

    async def next(self, timeout: float = WAIT) -> tuple[str | None, Answer]:
        """The next reply: its correlation id and its answer."""
        async with asyncio.timeout(timeout):
            msg = await self.inbox.get()
        return msg.correlation_id, decode(Answer, msg.body)


async def dlq_depth(system: System) -> int:
    conn = await aio_pika.connect(system.settings.amqp_url.get_secret_value())
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(system.topology.dead_letter_queue, passive=True)
        result = queue.declaration_result
        assert result is not None
        return result.message_count or 0
    finally:
        await conn.close()


async def wait_depth(system: System, expect: int, timeout: float = 10.0) -> None:
    """Poll the dead-letter queue until it holds ``expect`` messages (ready ones)."""
    depth = -1
    try:
        async with asyncio.timeout(timeout):
            while (depth := await dlq_depth(system)) != expect:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"dead-letter queue holds {depth}, expected {expect}") from None


async def wait_dead(
    system: System, expect: int, timeout: float = 10.0, avoid: set[str] | None = None
) -> list[DeadLetter]:
    """Poll :func:`list_dead` until it shows ``expect`` dead letters none of whose ids is in
    ``avoid``."""
    dead: list[DeadLetter] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                dead = await list_dead(system.settings)
                fresh = [d for d in dead if d.dead_id not in (avoid or set())]
                if len(dead) == expect and len(fresh) == expect:
                    return dead
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"dead letters {dead}, expected {expect} new ones") from None


def flaky_app(fixed: asyncio.Event, calls: list[Any]) -> WorkerApp:
    app = WorkerApp()

    @app.capability("flaky", retry=RetryPolicy(max_attempts=2, backoff=0.1))
    async def flaky(payload: Any) -> Any:
        calls.append(payload)
        if not fixed.is_set():
            raise RuntimeError(f"flaky failure {len(calls)}")
        return {"fixed": payload}

    return app


async def test_exhausted_task_is_listed_then_replayed_to_its_submitter(system: System) -> None:
    fixed = asyncio.Event()
    calls: list[Any] = []
    await system.scheduler()
    await system.worker("flaky", app=flaky_app(fixed, calls))
    task_id = f"flaky-{uuid.uuid4().hex[:8]}"
    submission = {"v": 1, "capability": "flaky", "payload": 7, "task_id": task_id, "timeout": 30}
    async with Replies(system) as raw:
        corr = await raw.send(json.dumps(submission).encode())
        got_corr, answer = await raw.next()
        assert got_corr == corr
        assert answer.status == Status.FAILED
        with pytest.raises(TaskFailed) as failed:
            answer_value(answer)
        assert failed.value.error_type == ErrorType.HANDLER_ERROR
        assert failed.value.attempts == 2
        assert len(calls) == 2

        # The worker kept the task in the dead-letter queue before it reported the failure.
        [dead] = await list_dead(system.settings)
        assert dead.reason == "retries_exhausted"
        assert dead.source == "worker"
        assert dead.capability == "flaky"
        assert dead.task_id == task_id
        assert dead.attempts == 2
        assert dead.error == "handler_error: flaky failure 2"
        assert dead.original_type == "task"
        assert (dead.reply_to, dead.correlation_id) == (raw.reply_to, corr)
        assert dead.body_size > 0
        assert dead.dead_id
        assert dead.to_json()["dead_id"] == dead.dead_id

        # Listing removed nothing: the queue still holds it, and a second listing shows it.
        await wait_depth(system, 1)
        assert [d.dead_id for d in await list_dead(system.settings)] == [dead.dead_id]
        await wait_depth(system, 1)

        # A second dead letter, which the replay of the first one must leave alone.
        other_corr = await raw.send(b'{"v": 2, "capability": "flaky", "payload": 1}')
        assert (await raw.next())[0] == other_corr
        await wait_depth(system, 2)
        [other] = [d for d in await list_dead(system.settings) if d.dead_id != dead.dead_id]
        assert other.reason == "unknown_version"

        fixed.set()
        report = await replay(system.settings, [dead.dead_id, "no-such-id"])
        assert report.replayed == (dead.dead_id,)
        assert report.not_found == ("no-such-id",)
        assert not report.ok

        # The same submitter gets a second answer on the same correlation id: the task ran anew.
        got_corr, second = await raw.next()
        assert got_corr == corr
        assert second.status == Status.SUCCEEDED
        assert second.task_id == task_id
        assert second.result == {"fixed": 7}
        assert second.attempts == 1
        assert len(calls) == 3

    await wait_depth(system, 1)
    assert [d.dead_id for d in await list_dead(system.settings)] == [other.dead_id]


async def test_rejected_requests_are_replayed_as_they_were(system: System) -> None:
    await system.scheduler()
    bad_version = b'{"v": 99, "capability": "echo", "payload": 1}'
    not_json = b"\xff\x00 this is not JSON at all"
    async with Replies(system) as raw:
        corr_version = await raw.send(bad_version)
        corr_garbage = await raw.send(not_json, type_=None)
        first = dict([await raw.next(), await raw.next()])
        assert set(first) == {corr_version, corr_garbage}
        before = {d.correlation_id: d for d in await wait_dead(system, 2)}
        assert set(before) == {corr_version, corr_garbage}
        assert before[corr_version].reason == "unknown_version"
        assert before[corr_version].original_type == "submit"
        assert before[corr_version].reply_to == raw.reply_to
        assert before[corr_version].capability == "echo"
        assert before[corr_version].body_size == len(bad_version)
        assert before[corr_garbage].reason == "malformed_json"
        assert before[corr_garbage].original_type is None
        assert before[corr_garbage].task_id is None

        report = await replay(system.settings, None)
        assert sorted(report.replayed) == sorted(d.dead_id for d in before.values())
        assert report.ok

        # Rejected again: answered again on the original correlation ids...
        again = dict([await raw.next(), await raw.next()])
        assert set(again) == {corr_version, corr_garbage}
        for answer in again.values():
            assert answer.status == Status.FAILED
            assert answer.error is not None
            assert answer.error.type == ErrorType.INVALID_REQUEST
        error = again[corr_version].error
        assert error is not None
        assert error.message.startswith("unknown_version")

    # ...and back in the dead-letter queue, each with a new dead id, its body unchanged.
    old_ids = {d.dead_id for d in before.values()}
    after = {d.correlation_id: d for d in await wait_dead(system, 2, avoid=old_ids)}
    assert set(after) == {corr_version, corr_garbage}
    assert after[corr_version].reason == "unknown_version"
    assert after[corr_garbage].reason == "malformed_json"
    dead = {m.correlation_id: m for m in await system.dead_letters(2)}
    assert dead[corr_version].body == bad_version
    assert dead[corr_garbage].body == not_json
    assert dead[corr_garbage].type is None
    assert all(m.headers[H_REPLAY] for m in dead.values())
    assert {m.headers[H_DEAD_ID] for m in dead.values()}.isdisjoint(old_ids)


async def test_replay_of_an_empty_or_missing_queue(system: System) -> None:
    # No scheduler ever ran here: there is no dead-letter queue at all.
    assert await list_dead(system.settings) == []
    report = await replay(system.settings, ["abc"])
    assert report.not_found == ("abc",)
    assert (await replay(system.settings, None)).replayed == ()


async def run_cli(system: System, *args: str, **env: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "amqpsched",
        *args,
        env=system.env(**env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.system
async def test_cli_lists_and_replays(system: System) -> None:
    await system.scheduler()
    async with Replies(system) as raw:
        corr = await raw.send(b'{"v": 1, "capability": "echo"}')
        assert (await raw.next())[0] == corr
    [dead] = await wait_dead(system, 1)

    # --namespace on the command line (the environment names none).
    code, out, err = await run_cli(
        system, "dlq", "list", "--json", "--namespace", system.namespace, AMQPSCHED_NAMESPACE=""
    )
    assert code == 0, err
    [listed] = json.loads(out)
    assert listed["dead_id"] == dead.dead_id
    assert listed["reason"] == "invalid_fields"
    assert listed["capability"] == "echo"
    assert listed["correlation_id"] == corr

    code, out, err = await run_cli(system, "dlq", "list")
    assert code == 0, err
    [line] = out.splitlines()
    assert line.startswith(f"{dead.dead_id}  invalid_fields  capability=echo")
    await wait_depth(system, 1)

    code, out, err = await run_cli(system, "dlq", "replay", "no-such-id")
    assert code == 1
    assert "dead letter no-such-id not found" in err
    code, out, err = await run_cli(system, "dlq", "replay")
    assert code == 2
    assert "--all" in err
    await wait_depth(system, 1)

    code, out, err = await run_cli(system, "dlq", "replay", "--all")
    assert code == 0, err
    assert "replayed 1 dead letter(s)" in out
    # Rejected again by the scheduler: back in the queue under a new id.
    [again] = await wait_dead(system, 1, avoid={dead.dead_id})
    assert again.reason == "invalid_fields"
    assert again.correlation_id == corr


# -- units ---------------------------------------------------------------------------------------


def fake_dead(body: bytes, type_: str | None, **headers: Any) -> IncomingMessage:
    """Enough of an incoming message for :func:`resubmission`."""
    return cast(
        IncomingMessage,
        SimpleNamespace(
            body=body,
            type=type_,
            headers=headers,
            content_type="application/json",
            content_encoding=None,
            message_id="m-1",
            reply_to=None,
            correlation_id=None,
            timestamp=None,
        ),
    )


def test_task_resubmission_keeps_id_timeout_limits_and_submitter() -> None:
    now = time.time()
    task = TaskMessage(
        task_id="t-1",
        capability="flaky",
        payload={"a": [1, 2]},
        attempt=3,
        submitted_at=now - 100,
        deadline=now - 100 + 45,
        reply_to="amqpsched.reply.c1",
        correlation_id="corr-1",
        time_limit=2.5,
        retry=RetryOverride(max_attempts=4),
    )
    incoming = fake_dead(
        encode(task), "task", **{H_REASON: "retries_exhausted", "x-death": [{"reason": "expired"}]}
    )
    msg, why = resubmission(incoming, Settings())
    assert msg is not None, why
    assert msg.type == Kind.SUBMIT
    assert (msg.reply_to, msg.correlation_id) == ("amqpsched.reply.c1", "corr-1")
    assert msg.headers == {H_REPLAY: True}
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    request = decode(SubmitRequest, msg.body)
    assert request.task_id == "t-1"
    assert request.capability == "flaky"
    assert request.payload == {"a": [1, 2]}
    assert request.timeout == pytest.approx(45)
    assert request.time_limit == 2.5
    assert request.retry == RetryOverride(max_attempts=4)

    # A task whose deadline was not after its submission: the default timeout.
    stale = task.model_copy(update={"deadline": task.submitted_at})
    msg, _ = resubmission(fake_dead(encode(stale), "task"), Settings(default_timeout=12))
    assert msg is not None
    assert decode(SubmitRequest, msg.body).timeout == 12


def test_rejected_request_resubmission_is_the_original() -> None:
    incoming = fake_dead(
        b"not json",
        "status",
        **{
            "x-amqpsched-original-type": "status",
            "x-amqpsched-original-reply-to": "r",
            "x-amqpsched-original-correlation-id": "c",
            H_REASON: "malformed_json",
            "x-death": [],
            "x-custom": "kept",
        },
    )
    msg, _ = resubmission(incoming, Settings())
    assert msg is not None
    assert (msg.body, msg.type, msg.reply_to, msg.correlation_id) == (
        b"not json",
        "status",
        "r",
        "c",
    )
    assert msg.headers == {"x-custom": "kept", H_REPLAY: True}
    # A broken task message cannot be made a submission: it stays where it is.
    msg, why = resubmission(fake_dead(b"{", "task"), Settings())
    assert msg is None
    assert "not a valid task message" in why


def test_dead_at_is_the_timestamp_or_the_matching_broker_death() -> None:
    when = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    earlier = datetime(2024, 5, 1, 11, 0)
    deaths = [{"reason": "expired", "time": earlier}, {"reason": "delivery_limit", "time": when}]
    poisoned = fake_dead(b"{}", "task", **{"x-death": deaths})
    assert dead_at(poisoned, "delivery_limit") == when
    # A retry's delay (reason expired) is not when a task whose retries ran out died.
    assert dead_at(poisoned, "retries_exhausted") is None
    stamped = cast(IncomingMessage, SimpleNamespace(timestamp=earlier, headers={}))
    assert dead_at(stamped, "unknown_version") == earlier.replace(tzinfo=UTC)
