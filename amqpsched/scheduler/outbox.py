"""Everything the scheduler publishes: answers, dispatches, dead letters, cancel notices.
Each publish waits for the broker's confirm before the caller acks what caused it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from prometheus_client import Counter, Histogram

from .. import tracing, transport
from ..batching import Coalescer, Countdown, Done, KeyedCoalescer, batch_body, follow
from ..errors import BrokerError
from ..protocol import (
    Answer,
    CancelNotice,
    ErrorInfo,
    ErrorType,
    Kind,
    Status,
    TaskMessage,
    encode,
)
from ..topology import JOURNAL_KEY, Topology
from ..transport import IncomingMessage
from .readback import Unread
from .state import TaskRecord

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: Seconds an answer sent to nobody waits for others to share its journal entry: one task at a
#: time, each answered by its worker, then costs the scheduler and the broker one journal write
#: per few tasks rather than one each. Nobody waits for it but the ack of the outcome.
UNSENT_HOLD = 0.02


def peek(raw: bytes) -> tuple[str | None, str | None]:
    """Best-effort task id and capability of a body that failed validation, for the answer."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    task_id, capability = data.get("task_id"), data.get("capability")
    return (
        task_id if isinstance(task_id, str) and len(task_id) <= 128 else None,
        capability if isinstance(capability, str) and len(capability) <= 128 else None,
    )


def failure(record: TaskRecord, error: ErrorType, message: str, now: float, **extra: Any) -> Answer:
    return Answer(
        task_id=record.task_id,
        status=Status.FAILED,
        capability=record.capability,
        error=ErrorInfo(type=error, message=message, **extra),
        attempts=record.attempts,
        worker_id=record.worker_id,
        submitted_at=record.submitted_at,
        finished_at=now,
    )


def answer_batch_body(answers: list[tuple[str, bytes]]) -> bytes:
    """The body of an ``answer_batch``: (correlation id, encoded answer) pairs."""
    parts = [b'{"v":1,"answers":[']
    for i, (corr, answer) in enumerate(answers):
        head = b'{"correlation_id":' + json.dumps(corr).encode() + b',"answer":'
        parts += (b"," + head if i else head, answer, b"}")
    parts.append(b"]}")
    return b"".join(parts)  # copied once (see batching.joined)


#: (task, its traceparent, the task encoded); (correlation id, answer encoded, traceparent).
_Dispatch = tuple[TaskMessage, str | None, bytes]
_Answer = tuple[str, bytes, str | None]


class Outbox:
    def __init__(
        self,
        channel: AbstractChannel,
        topology: Topology,
        dead_lettered: Counter,
        batch_limit: Callable[[str], int] = lambda _capability: 1,
        tasks_per_message: Histogram | None = None,
        scheduler_id: str | None = None,
    ) -> None:
        """``batch_limit(capability)``: most tasks one dispatch message may carry (1: no
        ``task_batch``, because a worker of that capability would not understand it)."""
        self.channel = channel
        self._dead_lettered = dead_lettered
        self.topology = topology
        self._batch_limit = batch_limit
        self._tasks_per_message = tasks_per_message
        #: Headers of what is journaled by its publish: who wrote it.
        self._origin = {transport.H_SCHEDULER: scheduler_id} if scheduler_id else {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._dispatches: KeyedCoalescer[str, _Dispatch] = KeyedCoalescer(
            self._send_dispatches, size=lambda d: len(d[2])
        )
        self._answers: KeyedCoalescer[str, _Answer] = KeyedCoalescer(
            self._send_answers, size=lambda a: len(a[1])
        )
        # Answers sent to nobody (their worker answered the client: section 16) are journaled
        # a moment later, several in one entry: only the ack of their outcome waits for it.
        self._unsent: Coalescer[tuple[bytes, str | None]] = Coalescer(
            self._journal_unsent, size=lambda u: len(u[0]), hold=UNSENT_HOLD
        )
        #: Journaled publishes not read back from the journal yet (None: not tracked).
        self.unread: Unread | None = None

    async def _publish_journaled(
        self,
        exchange: AbstractExchange,
        msg: aio_pika.Message,
        routing_key: str,
        *,
        mandatory: bool = False,
    ) -> None:
        """Publish a message that is journaled too (by the publish itself, or alone), tracked
        until it is read back (a confirm does not prove the journal stored it)."""
        unread, kind = self.unread, msg.type or ""
        if unread is not None:
            unread.sent(msg.body, kind, time.monotonic())
        try:
            await transport.publish(exchange, msg, routing_key, mandatory=mandatory)
        except BaseException:
            if unread is not None:
                unread.failed(msg.body, kind)
            raise
        if unread is not None:
            unread.confirmed(msg.body, kind, time.monotonic())

    async def send(
        self,
        reply_to: str,
        corr: str,
        kind: Kind,
        body: bytes,
        traceparent: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        await transport.publish(
            self.channel.default_exchange,
            transport.message(
                body, kind, correlation_id=corr, headers=tracing.headers(traceparent, headers)
            ),
            reply_to,
        )

    async def answer(
        self,
        targets: list[tuple[str, str]],
        answer: Answer,
        traceparent: str | None = None,
        batch_reply: bool = False,
    ) -> None:
        countdown = Countdown()
        self.answer_then(targets, answer, countdown.add(), traceparent, batch_reply)
        await countdown.seal()

    def answer_then(
        self,
        targets: list[tuple[str, str]],
        answer: Answer,
        done: Done,
        traceparent: str | None = None,
        batch_reply: bool = False,
    ) -> None:
        """Send the final answer to every target and, by the same publish as the first target's,
        to the journal: an answer is journaled exactly when it is sent (with no target, it is
        only journaled). With ``batch_reply``,
        the first target takes ``answer_batch`` replies: answers to it ready at the same moment
        go together. ``done`` is called when the broker confirmed all of it, or with the error."""
        body = encode(answer)
        if len(targets) == 1 and batch_reply and not targets[0][0].startswith(DIRECT_REPLY_TO):
            reply_to, corr = targets[0]  # the common case: no task per answer
            self._answers.add_then(reply_to, (corr, body, traceparent), done)
        elif not targets:  # its worker answered the client (section 16): only journaled
            self._unsent.add_then((body, traceparent), done)
        else:
            follow(
                asyncio.ensure_future(self._answer_all(targets, body, traceparent, batch_reply)),
                done,
            )

    async def _answer_all(
        self,
        targets: list[tuple[str, str]],
        body: bytes,
        traceparent: str | None,
        batch_reply: bool,
    ) -> None:
        """Send to at least one target (see :meth:`answer_then`)."""
        first, rest = targets[0], targets[1:]
        sends = [self.send(r, c, Kind.ANSWER, body, traceparent) for r, c in rest]
        if not first[0].startswith(DIRECT_REPLY_TO):
            if batch_reply:
                sends.append(self._answers.add(first[0], (first[1], body, traceparent)))
            else:
                sends.append(self._answer_journaled(first[0], first[1], body, traceparent))
        else:  # direct reply-to takes no BCC: journal it on its own
            sends.append(self.send(first[0], first[1], Kind.ANSWER, body, traceparent))
            sends.append(self._journal_alone(body, traceparent))
        await asyncio.gather(*sends)

    async def _journal_unsent(self, unsent: list[tuple[bytes, str | None]]) -> None:
        if len(unsent) == 1:  # alone, it keeps its traceparent
            await self._journal_alone(*unsent[0])
            return
        body = answer_batch_body([("", b) for b, _ in unsent])
        msg = transport.message(body, Kind.ANSWER_BATCH, headers=self._origin)
        await self._publish_journaled(
            self.channel.default_exchange, msg, self.topology.journal_queue
        )

    async def _journal_alone(self, body: bytes, traceparent: str | None) -> None:
        """Journal an answer that no publish of ours sends: its submitter reached by direct
        reply-to, or answered by its worker (protocol section 16; see ``_unsent``)."""
        msg = transport.message(
            body, Kind.ANSWER, headers=tracing.headers(traceparent, self._origin)
        )
        await self._publish_journaled(
            self.channel.default_exchange, msg, self.topology.journal_queue
        )

    async def _answer_journaled(
        self, reply_to: str, corr: str, body: bytes, traceparent: str | None
    ) -> None:
        msg = transport.message(
            body,
            Kind.ANSWER,
            correlation_id=corr,
            headers=tracing.headers(
                traceparent, {"BCC": [self.topology.journal_queue], **self._origin}
            ),
        )
        await self._publish_journaled(self.channel.default_exchange, msg, reply_to)

    def _count(self, kind: str, tasks: int) -> None:
        if self._tasks_per_message is not None:
            self._tasks_per_message.labels(kind).observe(tasks)

    async def _send_answers(self, reply_to: str, items: list[_Answer]) -> None:
        self._count("answer", len(items))
        if len(items) == 1:
            await self._answer_journaled(reply_to, *items[0])
            return
        msg = transport.message(
            answer_batch_body([(corr, answer) for corr, answer, _ in items]),
            Kind.ANSWER_BATCH,
            headers={"BCC": [self.topology.journal_queue], **self._origin},
        )
        await self._publish_journaled(self.channel.default_exchange, msg, reply_to)

    async def dispatch(self, task: TaskMessage, traceparent: str | None = None) -> None:
        """Publish ``task`` to its capability queue and, by the same publish, to the journal;
        with other tasks of its capability dispatched at the same moment, when its workers take
        batches."""
        await self._ensure_capability(task.capability)
        await self.dispatch_nowait(task, traceparent)

    def dispatch_nowait(
        self, task: TaskMessage, traceparent: str | None = None
    ) -> asyncio.Future[None]:
        """:meth:`dispatch`, as a future."""
        countdown = Countdown()
        self.dispatch_then(task, traceparent, countdown.add())
        return countdown.seal()

    def dispatch_then(self, task: TaskMessage, traceparent: str | None, done: Done) -> None:
        """:meth:`dispatch`; ``done`` is called once it is confirmed, or with the error. No task
        of its own, nor a future, once the capability's queue is declared and its workers take
        batches (the hot path of a batch)."""
        if not self.topology.capability_declared(task.capability):
            follow(asyncio.ensure_future(self.dispatch(task, traceparent)), done)
            return
        item = (task, traceparent, encode(task))
        limit = self._batch_limit(task.capability)
        if limit > 1:
            self._dispatches.add_then(task.capability, item, done, max_items=limit)
        else:
            follow(asyncio.ensure_future(self._send_dispatches(task.capability, [item])), done)

    async def _send_dispatches(self, capability: str, items: list[_Dispatch]) -> None:
        self._count("dispatch", len(items))
        exchange = await self.channel.get_exchange(self.topology.tasks_exchange, ensure=False)
        if len(items) == 1:
            task, traceparent, body = items[0]
            msg = transport.message(
                body,
                Kind.TASK,
                message_id=task.task_id,
                correlation_id=task.correlation_id,
                headers=tracing.headers(traceparent, {"BCC": [JOURNAL_KEY], **self._origin}),
            )
        else:
            body = batch_body(b"tasks", [b for _, _, b in items], [tp for _, tp, _ in items])
            headers = {"BCC": [JOURNAL_KEY], **self._origin}
            msg = transport.message(body, Kind.TASK_BATCH, headers=headers)
        try:
            await self._publish_journaled(exchange, msg, capability, mandatory=True)
        except BrokerError:
            self.topology.forget_capability(capability)  # maybe deleted: declare it again
            raise

    async def _ensure_capability(self, capability: str) -> None:
        if self.topology.capability_declared(capability):
            return
        lock = self._locks.setdefault(capability, asyncio.Lock())
        async with lock:
            if not self.topology.capability_declared(capability):
                try:
                    await self.topology.declare_capability(self.channel, capability)
                except transport.BROKER_ERRORS as exc:
                    raise BrokerError(f"cannot declare queue for {capability!r}: {exc}") from exc

    async def cancel_notice(self, task_ids: list[str], until: float) -> None:
        exchange = await self.channel.get_exchange(self.topology.control_exchange, ensure=False)
        notice = CancelNotice(task_ids=task_ids, until=until)
        await transport.publish(
            exchange, transport.message(encode(notice), Kind.CANCELLED, persistent=False), ""
        )

    async def dead_letter(
        self,
        msg: IncomingMessage,
        reason: str,
        detail: str,
        *,
        task_id: str | None = None,
        capability: str | None = None,
        attempts: int | None = None,
    ) -> None:
        exchange = await self.channel.get_exchange(self.topology.dead_letter_exchange, ensure=False)
        await transport.publish(
            exchange,
            transport.dead_letter_message(
                msg,
                reason=reason,
                error=detail,
                source="scheduler",
                capability=capability,
                task_id=task_id,
                attempts=attempts,
            ),
            "",
        )
        self._dead_lettered.labels(reason).inc()

    async def reject(
        self,
        msg: IncomingMessage,
        reason: str,
        detail: str,
        request: Any = None,
        error: ErrorType = ErrorType.INVALID_REQUEST,
    ) -> None:
        """Keep ``msg`` in the dead-letter queue with its reason; answer its reply_to if any."""
        task_id, capability = peek(msg.body) if request is None else (None, None)
        task_id = getattr(request, "task_id", task_id)
        capability = getattr(request, "capability", capability)
        await self.dead_letter(msg, reason, detail, task_id=task_id, capability=capability)
        if msg.reply_to:
            answer = Answer(
                task_id=task_id,
                status=Status.FAILED,
                capability=capability,
                error=ErrorInfo(type=error, message=f"{reason}: {detail}"),
                finished_at=time.time(),
            )
            await self.send(msg.reply_to, msg.correlation_id or "", Kind.ANSWER, encode(answer))
