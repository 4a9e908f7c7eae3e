"""The worker process: consumes capability queues, runs handlers, reports outcomes, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from random import random
from typing import Any, cast

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from .. import logs, tracing, transport
from ..batching import Coalescer, batch_body
from ..errors import AmqpschedError, BrokerError, ConfigurationError, DecodeError
from ..metrics import WorkerMetrics
from ..protocol import (
    BATCH_FEATURE,
    DIRECT_HEADER,
    CancelNotice,
    ErrorInfo,
    ErrorType,
    Kind,
    OutcomeEvent,
    RetryingEvent,
    StartedEvent,
    Status,
    TaskBatch,
    TaskMessage,
    WorkerAnnouncement,
    decode_event,
    encode,
)
from ..retry import retry_delay
from ..settings import Settings
from ..topology import DELAY_HEADER, Topology
from ..transport import IncomingMessage
from .app import Handler, InvalidPayload, InvalidResult, WorkerApp, to_json
from .delivery import BatchDelivery, Delivery
from .direct import Heartbeats, answers_directly
from .slots import Slots

log = logging.getLogger("amqpsched.worker")

#: Seconds an attempt runs before the worker tells the scheduler it started.
STARTED_DELAY = 0.05


class Worker:
    """Runs ``app``'s handlers for ``capabilities``. ``async with Worker(...)`` starts it;
    :meth:`stop` drains it: prefetched tasks go back to the queue, running ones finish."""

    def __init__(
        self,
        app: WorkerApp,
        capabilities: Iterable[str],
        settings: Settings,
        *,
        concurrency: int | None = None,
        worker_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(registry or CollectorRegistry())
        self.topology = Topology(settings.namespace, delivery_limit=settings.delivery_limit)
        names = list(dict.fromkeys(capabilities)) or list(app.handlers)
        missing = [n for n in names if n not in app.handlers]
        if missing:
            known = ", ".join(sorted(app.handlers)) or "none"
            raise ConfigurationError(f"no handler for {', '.join(missing)} (known: {known})")
        if not names:
            raise ConfigurationError("a worker needs at least one capability")
        self.handlers: dict[str, Handler] = {n: app.handlers[n] for n in names}
        self.concurrency = concurrency or settings.concurrency
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._slots = Slots(self.concurrency)
        self.metrics.slots_total.set(self.concurrency)
        self.metrics.slots_used.set_function(lambda: self._in_flight)
        self._running: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._stopping = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="amqpsched-sync")
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._events: AbstractExchange | None = None
        #: Where a direct answer is published (None: the broker has no replies exchange yet).
        self._replies: AbstractExchange | None = None
        self._registry: AbstractExchange | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        #: Cancelled task id -> when the notice can be forgotten.
        self._cancelled: dict[str, float] = {}
        self._handler_tasks: dict[str, asyncio.Future[Any]] = {}
        self._welcomed = asyncio.Event()
        self._beats = Heartbeats(
            settings.heartbeat_interval, settings.heartbeat_miss_limit, time.time()
        )
        # Outcomes ready at the same moment go to the scheduler in one `outcome_batch`; one
        # that goes alone may go to its client too (the last item: its task, if it may).
        self._outcomes: Coalescer[_Outcome] = Coalescer(
            self._send_outcomes, size=lambda item: len(item[2])
        )
        self.consuming = False
        self.executed = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._conn = await transport.connect(self.settings, f"amqpsched-worker-{self.worker_id}")
        try:
            channel = await transport.confirm_channel(self._conn, prefetch=self.concurrency)
            self._channel = channel
            topo = self.topology
            # What it uses but the scheduler owns is only checked (created if missing, which a
            # worker with its role's permissions may not do); declare_control_queue and
            # declare_capability check the control and tasks exchanges. It declares what it owns.
            for name in (
                topo.events_exchange,
                topo.registry_exchange,
                topo.dead_letter_exchange,
                topo.delay_exchange,
            ):
                await topo.ensure(channel, name)
            transport.on_reconnect(self._conn, self._reconnected)
            self._events = await channel.get_exchange(topo.events_exchange, ensure=False)
            if self.settings.direct_answers and await self._may_answer_directly(channel):
                self._replies = await channel.get_exchange(topo.replies_exchange, ensure=False)
            self._registry = await channel.get_exchange(
                self.topology.registry_exchange, ensure=False
            )
            control = await self.topology.declare_control_queue(channel, self.worker_id)
            await control.consume(self._on_control, no_ack=True)
            queues = [await self.topology.declare_capability(channel, n) for n in self.handlers]
            # A scheduler answers hello with the cancellations in force: wait for them (briefly;
            # maybe no scheduler runs yet) so a cancelled queued task is never started.
            await self._announce(Kind.HELLO)
            self._beats = Heartbeats(
                self.settings.heartbeat_interval, self.settings.heartbeat_miss_limit, time.time()
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._welcomed.wait(), self.settings.heartbeat_interval)
            # Long tasks must not be cut by the broker's delivery-ack timeout (the scheduler's
            # heartbeats find dead workers). Per consumer from RabbitMQ 3.12; older brokers
            # ignore it and need `consumer_timeout` raised in rabbitmq.conf (docs/guarantees.md).
            ack_timeout = min(int(self.settings.max_timeout * 1000), 2**31 - 1)
            for queue in queues:
                tag = await queue.consume(
                    self._on_task, arguments={"x-consumer-timeout": ack_timeout}
                )
                self._consumers.append((queue, tag))
        except BrokerError:
            await self._conn.close()
            raise
        except transport.BROKER_ERRORS as exc:
            await self._conn.close()
            raise BrokerError(f"worker could not set up its topology: {exc}") from exc
        self.consuming = True
        self._heartbeat = asyncio.create_task(self._heartbeat_forever(), name="amqpsched-heartbeat")
        log.info(
            "worker %s consuming %s (concurrency %d)",
            self.worker_id,
            ",".join(self.handlers),
            self.concurrency,
        )

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

    async def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks, hand back unstarted ones, finish running ones within ``timeout``."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._slots.close()
        self.consuming = False
        for queue, tag in self._consumers:
            try:
                await queue.cancel(tag)
            except transport.BROKER_ERRORS as exc:
                log.warning("could not cancel consumer %s: %s", tag, exc)
        limit = self.settings.shutdown_timeout if timeout is None else timeout
        if self._running:
            log.info("waiting up to %.0fs for %d running task(s)", limit, len(self._running))
            _, pending = await asyncio.wait(set(self._running), timeout=limit)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d task(s) did not finish in time; they will run again", len(pending))
                await asyncio.wait(pending, timeout=1)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        try:
            await self._announce(Kind.GOODBYE)
        except AmqpschedError as exc:
            log.warning("could not say goodbye: %s", exc)
        if self._conn is not None:
            await self._conn.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped after %d task(s)", self.worker_id, self.executed)

    @property
    def ready(self) -> bool:
        return self.consuming and self._conn is not None and transport.is_connected(self._conn)

    # -- registration --------------------------------------------------------------------------
    def announcement(self) -> WorkerAnnouncement:
        return WorkerAnnouncement(
            worker_id=self.worker_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            capabilities=[h.info() for h in self.handlers.values()],
            concurrency=self.concurrency,
            in_flight=self._in_flight,
            sent_at=time.time(),
            features=[BATCH_FEATURE],
        )

    async def _announce(self, kind: Kind) -> None:
        assert self._registry is not None
        body = encode(self.announcement())
        await transport.publish(self._registry, transport.message(body, kind, persistent=False), "")

    def _reconnected(self) -> None:
        self.metrics.reconnects.inc()
        self._beats.broke(time.time())

    async def _heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval)
            try:
                await self._announce(Kind.HEARTBEAT)
                self._beats.beat(time.time())
            except AmqpschedError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # the heartbeat must outlive any one failure
                log.exception("heartbeat failed")

    # -- cancellation --------------------------------------------------------------------------
    async def _on_control(self, msg: IncomingMessage) -> None:
        try:
            notice = decode_event(CancelNotice, msg.body)
        except DecodeError as exc:
            log.warning("bad control message dropped: %s", exc)
            return
        self._welcomed.set()
        now = time.time()
        self._cancelled = {k: v for k, v in self._cancelled.items() if v > now}
        for task_id in notice.task_ids:
            self._cancelled[task_id] = notice.until
            running = self._handler_tasks.get(task_id)
            if running is not None:
                log.info("cancelling running task %s", task_id)
                running.cancel()

    # -- tasks ---------------------------------------------------------------------------------
    async def _on_task(self, msg: IncomingMessage) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._running.add(current)
        try:
            await self._take(msg)
        finally:
            if current is not None:
                self._running.discard(current)

    async def _take(self, msg: IncomingMessage) -> None:
        if msg.type == Kind.TASK_BATCH:
            await self._take_batch(msg)
            return
        try:
            task = decode_event(TaskMessage, msg.body)
        except DecodeError as exc:
            await self._dead_letter(Delivery(msg), exc.reason, exc.detail)
            return
        await self._take_task(Delivery(msg), task, tracing.from_headers(msg.headers))

    async def _take_batch(self, msg: IncomingMessage) -> None:
        """Each task of a ``task_batch`` as if it had come alone, side by side."""
        try:
            batch = decode_event(TaskBatch, msg.body)
        except DecodeError as exc:
            await self._dead_letter(Delivery(msg), exc.reason, exc.detail)
            return
        if not batch.tasks:
            await transport.settle(msg)
            return
        hold = BatchDelivery(msg, len(batch.tasks))
        parents = batch.traceparents + [None] * (len(batch.tasks) - len(batch.traceparents))
        await asyncio.gather(
            *(
                self._take_task(hold.part(task), task, tracing.valid(parent))
                for task, parent in zip(batch.tasks, parents, strict=False)
            )
        )

    async def _take_task(
        self, delivery: Delivery, task: TaskMessage, traceparent: str | None
    ) -> None:
        if not await self._slots.acquire():  # False: the worker started draining
            await delivery.settle(requeue=True)  # draining: hand it back at once
            return
        self._in_flight += 1
        hold = _Hold()
        try:
            with logs.task_context(
                task.task_id, task.capability, task.attempt, self.worker_id, traceparent
            ):
                await self._execute(delivery, task, hold, traceparent)
        except AmqpschedError as exc:
            log.warning("task %s not reported, it will be redelivered: %s", task.task_id, exc)
            await delivery.settle(requeue=True)
        except asyncio.CancelledError:
            await delivery.settle(requeue=True)
            raise
        finally:
            self._in_flight -= 1
            if hold.thread is None:
                self._slots.release()
            else:  # a sync handler past its limit still occupies a thread: keep its slot
                loop = asyncio.get_running_loop()
                hold.thread.add_done_callback(
                    lambda _: loop.call_soon_threadsafe(self._slots.release)
                )

    async def _execute(
        self, delivery: Delivery, task: TaskMessage, hold: _Hold, traceparent: str | None
    ) -> None:
        handler = self.handlers.get(task.capability)
        started_at = time.time()
        if task.task_id in self._cancelled:
            await self._report(delivery, task, None, _error(ErrorType.CANCELLED, "cancelled"))
            return
        if started_at > task.deadline:
            message = "the task's timeout passed before a worker could start it"
            await self._report(delivery, task, None, _error(ErrorType.EXPIRED, message))
            return
        if handler is None:  # only if a queue is shared with another app's capability
            await self._dead_letter(delivery, "no_handler", f"no handler for {task.capability!r}")
            return
        # `started` is sent only if the attempt is still running after STARTED_DELAY: a short
        # task's outcome says all it would (one message less per task, under load).
        attributes: dict[str, str | int] = {
            "amqpsched.task_id": task.task_id,
            "amqpsched.capability": task.capability,
            "amqpsched.attempt": task.attempt,
            "amqpsched.worker_id": self.worker_id,
        }
        with tracing.span(
            "amqpsched.execute", traceparent, kind=tracing.CONSUMER, attributes=attributes
        ) as span:
            # A new execute span's traceparent is the one logged and sent on from here.
            context = (
                logs.task_context(
                    task.task_id, task.capability, task.attempt, self.worker_id, span.traceparent
                )
                if span.traceparent != traceparent
                else contextlib.nullcontext()
            )
            with context:
                await self._execute_in_span(delivery, task, handler, started_at, hold, span)

    async def _execute_in_span(
        self,
        delivery: Delivery,
        task: TaskMessage,
        handler: Handler,
        started_at: float,
        hold: _Hold,
        span: tracing.Span,
    ) -> None:
        started = _StartNotice(self, task, started_at)
        try:
            error = await self._attempt(delivery, task, handler, started_at, hold, started)
            if error is not None:
                span.fail(f"{error.type.value}: {error.message}")
        finally:
            started.cancel()
            await started.wait()

    async def _attempt(
        self,
        delivery: Delivery,
        task: TaskMessage,
        handler: Handler,
        started_at: float,
        hold: _Hold,
        started: _StartNotice,
    ) -> ErrorInfo | None:
        """Run the handler once and report; return the attempt's error, if any."""
        result: Any = None
        error: ErrorInfo | None = None
        limit = task.time_limit or handler.time_limit
        clock = time.monotonic()
        try:
            payload = handler.parse(task.payload)
            result = to_json(await self._run(task.task_id, handler, payload, limit, hold))
        except InvalidPayload as exc:
            error = _error(ErrorType.INVALID_PAYLOAD, str(exc))
        except InvalidResult as exc:
            error = _error(ErrorType.HANDLER_ERROR, str(exc), exc)
        except TimeoutError:
            error = _error(ErrorType.TIME_LIMIT, f"the attempt ran past its {limit}s time limit")
        except asyncio.CancelledError:
            if task.task_id not in self._cancelled:
                raise  # the worker is stopping: the task goes back to the queue
            error = _error(ErrorType.CANCELLED, "cancelled while running")
        except Exception as exc:
            error = _error(ErrorType.HANDLER_ERROR, str(exc) or repr(exc), exc)
        started.cancel()  # finished before `started` was due: the outcome tells it all
        self.executed += 1
        self.metrics.execution.labels(task.capability).observe(time.monotonic() - clock)
        if error is None:
            await self._report(delivery, task, started_at, None, result)
            return None
        policy = task.retry.apply(handler.retry) if task.retry else handler.retry
        now = time.time()
        delay_ms = None
        if error.type != ErrorType.CANCELLED:
            delay_ms = retry_delay(policy, task.attempt, error.type, now, task.deadline, random())
        if delay_ms is None:
            if (
                error.type in policy.retry_on
                and policy.max_attempts > 1
                and error.type != ErrorType.CANCELLED
            ):
                # Retries exhausted (or no time left for one): keep it for `amqpsched dlq`.
                await self._dead_letter(
                    delivery,
                    "retries_exhausted",
                    f"{error.type.value}: {error.message}",
                    settle=False,
                    task=task,
                )
            await self._report(delivery, task, started_at, error)
        else:
            await self._retry(delivery, task, error, delay_ms, started_at)
        return error

    async def _run(
        self, task_id: str, handler: Handler, payload: Any, limit: float | None, hold: _Hold
    ) -> Any:
        call: asyncio.Future[Any]
        if handler.is_async:
            call = asyncio.ensure_future(cast(Awaitable[Any], handler.func(payload)))
        else:
            loop = asyncio.get_running_loop()
            # The handler's own log lines carry the task context: run it in a copy.
            thread = self._executor.submit(contextvars.copy_context().run, handler.func, payload)
            hold.thread = thread
            call = asyncio.wrap_future(thread, loop=loop)
        self._handler_tasks[task_id] = call
        try:
            return await asyncio.wait_for(call, limit)
        finally:
            self._handler_tasks.pop(task_id, None)
            if hold.thread is not None and hold.thread.done():
                hold.thread = None  # finished in time: its slot is free

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
        assert self._channel is not None
        await self.topology.declare_delay(self._channel, delay_ms)
        exchange = await self._channel.get_exchange(self.topology.delay_exchange, ensure=False)
        nxt = task.model_copy(update={"attempt": task.attempt + 1})
        await transport.publish(
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

    async def _report(
        self,
        delivery: Delivery,
        task: TaskMessage,
        started_at: float | None,
        error: ErrorInfo | None,
        result: Any = None,
    ) -> None:
        outcome = OutcomeEvent(
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
        # The outcome is confirmed by the broker before the task is acked: never lost.
        direct = task if task.direct and error is None and self._replies is not None else None
        if direct is not None and (
            delivery.message.redelivered or task.task_id in self._cancelled or started_at is None
        ):
            direct = None
        await self._outcomes.add((outcome, tracing.current_traceparent(), encode(outcome), direct))
        await delivery.settle()
        self.metrics.tasks.labels(
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
    ) -> None:
        assert self._events is not None
        await transport.publish(
            self._events,
            transport.message(
                encode(event) if body is None else body,
                kind,
                message_id=event.task_id,
                headers=tracing.headers(traceparent),
            ),
            self.topology.results_queue,
            mandatory=True,
        )

    async def _send_outcomes(self, items: list[_Outcome]) -> None:
        if len(items) == 1:
            event, traceparent, body, task = items[0]
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
                await self._publish_one(Kind.OUTCOME, event, traceparent, body)
            return
        assert self._events is not None
        body = batch_body(b"events", [b for _, _, b, _ in items], [tp for _, tp, _, _ in items])
        await transport.publish(
            self._events,
            transport.message(body, Kind.OUTCOME_BATCH),
            self.topology.results_queue,
            mandatory=True,
        )

    async def _publish_direct(
        self, event: OutcomeEvent, traceparent: str | None, body: bytes
    ) -> None:
        """One publish to the results queue and, by ``BCC``, to the client's reply queue."""
        assert self._replies is not None
        headers = {"BCC": [event.reply_to], DIRECT_HEADER: event.reply_to}
        await transport.publish(
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
        assert self._channel is not None
        dlx = await self._channel.get_exchange(self.topology.dead_letter_exchange, ensure=False)
        await transport.publish(
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


#: An outcome to send: the event, its traceparent, the event encoded, and its task if the outcome
#: may also answer the client (:func:`answers_directly` decides when it is sent).
_Outcome = tuple[OutcomeEvent, str | None, bytes, TaskMessage | None]


class _StartNotice:
    """``started`` is sent only if the attempt still runs after STARTED_DELAY: a short task's
    outcome says all it would (one message less per task, and no task of its own until due)."""

    def __init__(self, worker: Worker, task: TaskMessage, started_at: float) -> None:
        self._worker = worker
        self._task = task
        self._started_at = started_at
        self._sending: asyncio.Future[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(STARTED_DELAY, self._send)

    def _send(self) -> None:
        event = StartedEvent(
            task_id=self._task.task_id,
            attempt=self._task.attempt,
            worker_id=self._worker.worker_id,
            started_at=self._started_at,
        )
        self._sending = asyncio.ensure_future(self._worker._publish_event(Kind.STARTED, event))

    def cancel(self) -> None:
        """Not due yet: never sent. Being sent: it goes on."""
        self._timer.cancel()

    async def wait(self) -> None:
        if self._sending is None:
            return
        (failed,) = await asyncio.gather(self._sending, return_exceptions=True)
        if isinstance(failed, Exception):
            log.warning("`started` of task %s was not confirmed: %s", self._task.task_id, failed)


class _Hold:
    """The thread of a sync handler that outlived its attempt (time limit or cancel)."""

    thread: Future[Any] | None = None


def _error(kind: ErrorType, message: str, exc: BaseException | None = None) -> ErrorInfo:
    return ErrorInfo(
        type=kind,
        message=message[:4000],
        exception=type(exc).__name__ if exc is not None else None,
        traceback="".join(traceback.format_exception(exc))[-8000:] if exc is not None else None,
    )
