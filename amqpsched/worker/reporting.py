"""How a worker reports: outcomes (alone, batched, or also to the client), retries through the
delay exchange, dead letters. The worker's state is declared here and set up by
:class:`~amqpsched.worker.runner.Worker`."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from pydantic_core import PydanticSerializationError

from .. import tracing, transport
from ..batching import Coalescer, batch_body
from ..errors import BrokerError
from ..metrics import WorkerMetrics
from ..protocol import (
    DIRECT_HEADER,
    REDELIVERED_HEADER,
    ErrorInfo,
    Kind,
    OutcomeEvent,
    RetryingEvent,
    StartedEvent,
    Status,
    TaskMessage,
    construct,
    encode,
)
from ..settings import Settings
from ..topology import DELAY_HEADER, Topology
from .app import Handler, InvalidResult
from .delivery import Delivery
from .direct import Heartbeats, answers_directly
from .slots import Slots
from .started import StartClock

log = logging.getLogger("amqpsched.worker")


#: An outcome to send: the event, its traceparent, the event encoded, its task unless it was
#: redelivered (then it never answers the client; :func:`answers_directly` decides the rest), and
#: whether it was redelivered (it may have run before, and been answered: the outcome says so).
Outcome = tuple[OutcomeEvent, str | None, bytes, TaskMessage | None, bool]


#: Seconds between publishes of a message the broker refused (about 6 s in all).
REPUBLISH_PAUSES = (0.2, 0.4, 0.8, 1.6, 3.2)


def _redelivered(redelivered: bool) -> dict[str, Any]:
    """The headers of an outcome (or a batch of them) that tell whether one's task message was
    redelivered."""
    return {REDELIVERED_HEADER: True} if redelivered else {}


class Reporting:
    """The worker's state, and how it publishes what its attempts did."""

    settings: Settings
    metrics: WorkerMetrics
    topology: Topology
    handlers: dict[str, Handler]
    concurrency: int
    worker_id: str
    consuming: bool
    #: Attempts this worker finished (tests, logs).
    executed: int
    _slots: Slots
    _running: set[asyncio.Task[Any]]
    _in_flight: int
    _stopping: asyncio.Event
    _executor: ThreadPoolExecutor
    _conn: AbstractRobustConnection | None
    _channel: AbstractChannel | None
    #: The channel it publishes on: ``_channel`` until refusals make it use a new one.
    _pub: AbstractChannel | None
    _refusals: transport.Refusals
    #: Publishing channels being replaced (then closed once what they carried is settled).
    _replacing: set[asyncio.Future[None]]
    _events: AbstractExchange | None
    #: Where a direct answer is published (None: the broker has no replies exchange yet).
    _replies: AbstractExchange | None
    _registry: AbstractExchange | None
    _consumers: list[tuple[AbstractQueue, str]]
    _heartbeat: asyncio.Task[None] | None
    #: Cancelled task id -> when the notice can be forgotten.
    _cancelled: dict[str, float]
    _handler_tasks: dict[str, asyncio.Future[Any]]
    _start_clock: StartClock
    _welcomed: asyncio.Event
    _beats: Heartbeats
    # Outcomes ready at the same moment go to the scheduler in one `outcome_batch`; one that goes
    # alone may go to its client too (the last item: its task, if it may).
    _outcomes: Coalescer[Outcome]

    async def _may_answer_directly(self, channel: AbstractChannel) -> bool:
        """Whether the replies exchange exists and this user may publish to it: tried with a
        message that reaches no queue, on a channel of its own (a refusal closes the channel).
        Set up by an older scheduler, or older role definitions: the scheduler answers."""
        assert self._conn is not None
        topo = self.topology
        try:
            await topo.ensure(channel, topo.replies_exchange)
        except BrokerError as exc:
            log.info("no direct answers: %s", exc)
            return False
        probe = await transport.confirm_channel(self._conn)
        try:
            replies = await probe.get_exchange(topo.replies_exchange, ensure=False)
            nobody = topo.reply_queue(f"probe-{self.worker_id}")
            await transport.publish(replies, transport.message(b"{}", Kind.OUTCOME), nobody)
            return True
        except BrokerError as exc:
            log.info("no direct answers (may not publish them: %s)", exc)
            return False
        finally:
            await transport.close_quietly(probe)

    async def _publish(
        self,
        exchange: AbstractExchange,
        msg: aio_pika.Message,
        routing_key: str,
        *,
        mandatory: bool = False,
        pauses: tuple[float, ...] = REPUBLISH_PAUSES,
    ) -> None:
        """Publish with a confirm. A refused one is published again after each of ``pauses``
        (a queue whose leader moved refuses publishes for a few seconds: an outcome published
        again spares running its task again); after repeated refusals, on a new channel."""
        for pause in (*pauses, None):
            try:
                await transport.publish(exchange, msg, routing_key, mandatory=mandatory)
                return
            except BrokerError as exc:
                if not transport.refused(exc):
                    raise
                self._refused()
                if pause is None:
                    raise
                log.info("publish to %r refused: again in %.1fs", routing_key, pause)
            await asyncio.sleep(pause)
            if msg.type in (Kind.OUTCOME, Kind.OUTCOME_BATCH):
                msg.headers.update(_redelivered(True))  # the refused one may have got through
            assert self._pub is not None
            exchange = await self._pub.get_exchange(exchange.name, ensure=False)

    def _refused(self) -> None:
        """A publish was refused: after a few, publish on a new channel (see Refusals)."""
        if self._refusals.refused(time.monotonic()):
            replacing = asyncio.ensure_future(self._replace_publishing_channel())
            self._replacing.add(replacing)
            replacing.add_done_callback(self._replacing.discard)

    async def _replace_publishing_channel(self) -> None:
        assert self._conn is not None
        topo = self.topology
        channel = await transport.replacement_channel(self._conn)
        if channel is None:
            return
        old, self._pub = self._pub, channel
        self._events = await channel.get_exchange(topo.events_exchange, ensure=False)
        self._registry = await channel.get_exchange(topo.registry_exchange, ensure=False)
        if self._replies is not None:
            self._replies = await channel.get_exchange(topo.replies_exchange, ensure=False)
        await transport.retire(old, keep=self._channel)

    async def _retry(
        self,
        delivery: Delivery,
        task: TaskMessage,
        error: ErrorInfo,
        delay_ms: int,
        started_at: float,
    ) -> None:
        """Hand the next attempt to the broker, which holds it ``delay_ms``; then tell the
        scheduler; then ack. A crash in between runs the attempt again, never loses it."""
        assert self._channel is not None and self._pub is not None
        await self.topology.declare_delay(self._channel, delay_ms)
        exchange = await self._pub.get_exchange(self.topology.delay_exchange, ensure=False)
        nxt = task.model_copy(update={"attempt": task.attempt + 1})
        await self._publish(
            exchange,
            transport.message(
                encode(nxt),
                Kind.TASK,
                message_id=task.task_id,
                correlation_id=task.correlation_id,
                headers=tracing.headers(
                    tracing.current_traceparent(), {DELAY_HEADER: str(delay_ms)}
                ),
            ),
            task.capability,
            mandatory=True,
        )
        await self._publish_event(
            Kind.RETRYING,
            RetryingEvent(
                task_id=task.task_id,
                attempt=task.attempt,
                worker_id=self.worker_id,
                error=error,
                delay=delay_ms / 1000,
                started_at=started_at,
            ),
        )
        await delivery.settle()
        self.metrics.tasks.labels(task.capability, "retrying").inc()
        log.info(
            "task %s attempt %d failed (%s): retry in %.1fs",
            task.task_id,
            task.attempt,
            error.type.value,
            delay_ms / 1000,
        )

    def _outcome(
        self,
        task: TaskMessage,
        started_at: float | None,
        error: ErrorInfo | None,
        result: Any = None,
    ) -> tuple[OutcomeEvent, bytes]:
        """The outcome of an attempt, and its body. Raise :class:`InvalidResult` if ``result``
        cannot be encoded (a string holding a lone surrogate, which UTF-8 cannot carry)."""
        outcome = construct(  # built here from checked parts: no validation
            OutcomeEvent,
            task_id=task.task_id,
            capability=task.capability,
            attempt=task.attempt,
            worker_id=self.worker_id,
            status=Status.SUCCEEDED if error is None else Status.FAILED,
            result=result,
            error=error,
            reply_to=task.reply_to,
            correlation_id=task.correlation_id,
            submitted_at=task.submitted_at,
            started_at=started_at,
            finished_at=time.time(),
        )
        try:
            return outcome, encode(outcome)
        except PydanticSerializationError as exc:
            raise InvalidResult(f"handler returned a value that is not JSON: {exc}") from None

    async def _report(
        self,
        delivery: Delivery,
        task: TaskMessage,
        started_at: float | None,
        error: ErrorInfo | None,
        built: tuple[OutcomeEvent, bytes] | None = None,
    ) -> None:
        """Send the outcome (``built`` by :meth:`_outcome`, or built here from ``error``), then
        settle the task."""
        outcome, body = built if built is not None else self._outcome(task, started_at, error)
        # The outcome is confirmed by the broker before the task is acked: never lost.
        # Whether it also answers the client is decided when it is sent (answers_directly); a
        # redelivered task never does, and the delivery is known only here.
        redelivered = bool(delivery.message.redelivered)
        direct = None if redelivered or self._replies is None else task
        traceparent = tracing.current_traceparent()
        await self._outcomes.add((outcome, traceparent, body, direct, redelivered))
        await delivery.settle()
        self.metrics.finished(
            task.capability, error.type.value if error else Status.SUCCEEDED.value
        ).inc()
        if error is not None:
            log.info("task %s failed: %s: %s", task.task_id, error.type.value, error.message)

    async def _publish_event(self, kind: Kind, event: StartedEvent | RetryingEvent) -> None:
        await self._publish_one(kind, event, tracing.current_traceparent())

    async def _publish_one(
        self,
        kind: Kind,
        event: StartedEvent | OutcomeEvent | RetryingEvent,
        traceparent: str | None,
        body: bytes | None = None,
        redelivered: bool = False,
    ) -> None:
        assert self._events is not None
        await self._publish(
            self._events,
            transport.message(
                encode(event) if body is None else body,
                kind,
                message_id=event.task_id,
                headers=tracing.headers(traceparent, _redelivered(redelivered)),
            ),
            self.topology.results_queue,
            mandatory=True,
        )

    async def _send_outcomes(self, items: list[Outcome]) -> None:
        if len(items) == 1:
            event, traceparent, body, task, redelivered = items[0]
            started_at = event.started_at or time.time()
            if task is not None and answers_directly(
                task,
                succeeded=event.status == Status.SUCCEEDED,
                redelivered=False,  # checked when the item was made
                cancelled=event.task_id in self._cancelled,
                started_at=started_at,
                batched=False,
                heartbeats_kept=self._beats.kept_since(started_at, time.time()),
            ):
                await self._publish_direct(event, traceparent, body)
            else:
                await self._publish_one(Kind.OUTCOME, event, traceparent, body, redelivered)
            return
        assert self._events is not None
        body = batch_body(b"events", [i[2] for i in items], [i[1] for i in items])
        headers = _redelivered(any(i[4] for i in items))
        await self._publish(
            self._events,
            transport.message(body, Kind.OUTCOME_BATCH, headers=headers),
            self.topology.results_queue,
            mandatory=True,
        )

    async def _publish_direct(
        self, event: OutcomeEvent, traceparent: str | None, body: bytes
    ) -> None:
        """One publish to the results queue and, by ``BCC``, to the client's reply queue."""
        assert self._replies is not None
        headers = {"BCC": [event.reply_to], DIRECT_HEADER: event.reply_to}
        await self._publish(
            self._replies,
            transport.message(
                body,
                Kind.OUTCOME,
                message_id=event.task_id,
                correlation_id=event.correlation_id,
                headers=tracing.headers(traceparent, headers),
            ),
            self.topology.results_queue,
            mandatory=True,
        )
        self.metrics.direct_answers.inc()

    async def _dead_letter(
        self,
        delivery: Delivery,
        reason: str,
        detail: str,
        *,
        settle: bool = True,
        task: TaskMessage | None = None,
    ) -> None:
        assert self._pub is not None
        dlx = await self._pub.get_exchange(self.topology.dead_letter_exchange, ensure=False)
        await self._publish(
            dlx,
            transport.dead_letter_message(
                delivery.source,
                reason=reason,
                error=detail,
                source="worker",
                capability=task.capability if task else None,
                task_id=task.task_id if task else None,
                attempts=task.attempt if task else None,
            ),
            "",
        )
        if settle:
            await delivery.settle()
        self.metrics.dead_lettered.labels(reason).inc()
        log.warning("dead-lettered message %s: %s: %s", delivery.source.message_id, reason, detail)
