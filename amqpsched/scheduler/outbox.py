"""Everything the scheduler publishes: answers, dispatches, dead letters, cancel notices.
Each publish waits for the broker's confirm before the caller acks what caused it."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aio_pika.abc import AbstractChannel
from prometheus_client import Counter

from .. import tracing, transport
from ..errors import BrokerError
from ..protocol import Answer, CancelNotice, ErrorInfo, ErrorType, Kind, Status, TaskMessage, encode
from ..topology import JOURNAL_KEY, Topology
from ..transport import IncomingMessage
from .state import TaskRecord

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


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


class Outbox:
    def __init__(
        self, channel: AbstractChannel, topology: Topology, dead_lettered: Counter
    ) -> None:
        self.channel = channel
        self._dead_lettered = dead_lettered
        self.topology = topology
        self._locks: dict[str, asyncio.Lock] = {}

    async def send(
        self, reply_to: str, corr: str, kind: Kind, body: bytes, traceparent: str | None = None
    ) -> None:
        await transport.publish(
            self.channel.default_exchange,
            transport.message(
                body, kind, correlation_id=corr, headers=tracing.headers(traceparent)
            ),
            reply_to,
        )

    async def answer(
        self, targets: list[tuple[str, str]], answer: Answer, traceparent: str | None = None
    ) -> None:
        """Send the final answer to every target and, by the same publish as the first target's,
        to the journal: an answer is journaled exactly when it is sent."""
        body = encode(answer)
        journal = self.topology.journal_queue
        first, rest = (targets[0], targets[1:]) if targets else (None, [])
        sends = [self.send(r, c, Kind.ANSWER, body, traceparent) for r, c in rest]
        if first is not None and not first[0].startswith(DIRECT_REPLY_TO):
            msg = transport.message(
                body,
                Kind.ANSWER,
                correlation_id=first[1],
                headers=tracing.headers(traceparent, {"BCC": [journal]}),
            )
            sends.append(transport.publish(self.channel.default_exchange, msg, first[0]))
        else:
            if first is not None:  # direct reply-to takes no BCC: journal it on its own
                sends.append(self.send(first[0], first[1], Kind.ANSWER, body, traceparent))
            sends.append(self.send(journal, "", Kind.ANSWER, body, traceparent))
        await asyncio.gather(*sends)

    async def dispatch(self, task: TaskMessage, traceparent: str | None = None) -> None:
        """Publish ``task`` to its capability queue and, by the same publish, to the journal."""
        await self._ensure_capability(task.capability)
        exchange = await self.channel.get_exchange(self.topology.tasks_exchange, ensure=False)
        try:
            await transport.publish(
                exchange,
                transport.message(
                    encode(task),
                    Kind.TASK,
                    message_id=task.task_id,
                    correlation_id=task.correlation_id,
                    headers=tracing.headers(traceparent, {"BCC": [JOURNAL_KEY]}),
                ),
                task.capability,
                mandatory=True,
            )
        except BrokerError:
            self.topology.forget_capability(task.capability)  # maybe deleted: declare it again
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
