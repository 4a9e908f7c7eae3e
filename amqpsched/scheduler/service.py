"""The scheduler process: consumes ``tasks.submit``, dispatches by capability, tracks workers,
answers clients. Decisions live in ``registry`` and ``state``; this module moves messages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from .. import logs, tracing, transport
from ..errors import AmqpschedError, BrokerError, DecodeError
from ..metrics import RegistryCollector, SchedulerMetrics
from ..protocol import (
    DIRECT_FEATURE,
    DIRECT_HEADER,
    REQUEST_MODELS,
    Answer,
    CapabilitiesReply,
    ErrorType,
    Kind,
    OutcomeBatch,
    OutcomeEvent,
    RetryingEvent,
    StartedEvent,
    StatusReply,
    SubmitBatch,
    SubmitBatchItem,
    SubmitRequest,
    TaskMessage,
    TaskQuery,
    TaskState,
    WorkerAnnouncement,
    accepts,
    answer_of,
    decode,
    decode_event,
    encode,
)
from ..settings import Settings
from ..topology import Topology
from ..transport import IncomingMessage
from .journal import Journal, JournalReader, cancelled, replay
from .outbox import Outbox, failure
from .peers import Peers
from .recovery import apply_answer, apply_entry, journaled_answers
from .registry import WorkerRegistry
from .state import MemoryTaskStore, TaskRecord, is_fenced, timeout_error

log = logging.getLogger("amqpsched.scheduler")


async def _all(pending: list[asyncio.Future[Any]]) -> None:
    """Wait for every one (not just until the first failure: none is left running when the
    message that caused them is handed back), then raise the first failure."""
    results = await asyncio.gather(*pending, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]


def _chain(source: asyncio.Future[Any], target: asyncio.Future[Any]) -> None:
    """Settle ``target`` as ``source`` was settled."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif (exc := source.exception()) is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


def _log_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("could not send an answer: %s", fut.exception())


#: Seconds to wait before handing back a message whose handling failed on the broker side, so a
#: lasting fault does not become a hot loop.
REQUEUE_PAUSE = 0.5
KIND_NAMES = frozenset(k.value for k in Kind)
#: Seconds before an unconfirmed answer from which the journal is read to find it.
UNSURE_MARGIN = 30.0
#: Seconds an unsure answer is remembered (its outcome comes back long before).
UNSURE_KEEP = 3600.0
#: Seconds an answer may wait for its confirm before it is also journaled on its own.
ANSWER_GRACE = 3.0
#: Attempts to send again, on its own, an answer whose publish was refused.
RESEND_ATTEMPTS = 5
#: Refused publishes within this many seconds after which a new channel is used to publish.
REFUSALS_LIMIT = 3
REFUSALS_WINDOW = 2.0


class Scheduler:
    """Use as ``async with Scheduler(settings) as s: await s.wait_stopped()``."""

    def __init__(
        self,
        settings: Settings,
        scheduler_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = SchedulerMetrics(registry or CollectorRegistry())
        self.scheduler_id = scheduler_id or uuid.uuid4().hex[:12]
        self.topology = Topology(settings.namespace, delivery_limit=settings.delivery_limit)
        self.registry = WorkerRegistry(settings.heartbeat_interval, settings.heartbeat_miss_limit)
        self.store = MemoryTaskStore(
            settings.result_retention, settings.max_tracked_tasks, settings.idempotency_window
        )
        self._conn: AbstractRobustConnection | None = None
        self._outbox: Outbox | None = None
        self._journal: Journal | None = None
        self._started_at = 0.0
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        #: Cancelled task id -> deadline, re-announced to workers that say hello.
        self._cancels: dict[str, float] = {}
        #: Running tasks of workers declared dead -> that worker, until dispatched again.
        self._orphans: dict[str, str] = {}
        #: Tasks whose answer was sent but not confirmed (the broker went away) -> when: it may
        #: have gone out, so the journal is asked before answering them again.
        self._unsure: dict[str, float] = {}
        #: Other schedulers running side by side (known from the journal they all follow).
        self.peers = Peers(self.scheduler_id, self.registry.liveness_window)
        self._reader: JournalReader | None = None
        self._channel: AbstractChannel | None = None
        self._refusals: list[float] = []
        self._replaced_at = -REFUSALS_WINDOW
        self._background: set[asyncio.Future[None]] = set()
        self._alive_at = 0.0
        #: Cut off from the broker at the last sweep: workers' heartbeats could not arrive.
        self._offline = False
        self._journal_check: tuple[float, asyncio.Future[dict[str, Answer]]] | None = None
        #: Answers sent and not yet confirmed: task id -> (when, answer); journaled on their own
        #: if the confirm is late.
        self._answering: dict[str, tuple[float, Answer]] = {}
        self._unsure_check: asyncio.Future[None] | None = None
        self.consuming = False
        self.fenced = 0
        self.metrics.registry.register(
            RegistryCollector(self._worker_snapshot, self.store.open_counts)
        )

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise AmqpschedError("scheduler is not started")
        return self._outbox

    async def start(self) -> None:
        self._conn = await transport.connect(
            self.settings, f"amqpsched-scheduler-{self.scheduler_id}"
        )
        try:
            channel = await transport.confirm_channel(self._conn, self.settings.scheduler_prefetch)
            self._channel = channel
            topo = self.topology
            await topo.declare_core(channel)
            await topo.declare_journal(channel, self.settings.journal_retention)
            self._outbox = Outbox(
                channel,
                topo,
                self.metrics.dead_lettered,
                self.registry.batch_limit,
                self.metrics.tasks_per_message,
                self.scheduler_id,
            )
            transport.on_reconnect(self._conn, self.metrics.reconnects.inc)
            conn = self._conn
            # Journal records on a channel of their own, replaced when a write is not confirmed.
            self._journal = Journal(
                await transport.confirm_channel(conn),
                topo,
                self.scheduler_id,
                new_channel=lambda: transport.confirm_channel(conn),
            )
            # Read the journal to its end, then go on following it: what other schedulers
            # dispatch, answer and cancel is known here too.
            recovered = await self._follow_journal()
            await self._alive()
            if recovered:
                log.info("recovered %d journal record(s), %d task(s)", recovered, len(self.store))
            registry_queue = await topo.declare_registry_queue(channel, self.scheduler_id)
            await registry_queue.consume(self._on_announcement, no_ack=True)
            results = await channel.get_queue(topo.results_queue)
            await results.consume(self._on_event)
            submit = await channel.get_queue(topo.submit_queue)
            await submit.consume(self._on_request)
        except transport.BROKER_ERRORS as exc:
            await self._conn.close()
            raise BrokerError(f"scheduler could not set up its topology: {exc}") from exc
        self._started_at = time.time()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="amqpsched-sweeper")
        self.consuming = True
        log.info(
            "scheduler %s consuming %s on %s",
            self.scheduler_id,
            self.topology.submit_queue,
            self.settings.amqp_url_masked(),
        )

    async def _follow_journal(self, attempts: int = 5) -> int:
        """Read the journal, then follow it. A stream that another scheduler declared an instant
        before may not be ready on every node yet: try again a few times."""
        assert self._conn is not None
        for attempt in range(1, attempts + 1):
            self._reader = JournalReader(self._conn, self.topology, self._apply_entry)
            try:
                return await self._reader.read(follow=True)
            except BrokerError as exc:
                if attempt == attempts:
                    raise
                log.warning("journal not readable yet (%s); trying again", exc)
                await asyncio.sleep(attempt * 0.5)
        return 0

    async def stop(self) -> None:
        self.consuming = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._journal is not None and self._conn is not None:
            try:  # the others take over its tasks' timers at once
                await asyncio.wait_for(
                    self._journal.append({"k": "gone", "s": self.scheduler_id}), 2
                )
            except (AmqpschedError, TimeoutError) as exc:
                log.warning("could not say goodbye in the journal: %s", exc)
        if self._unsure_check is not None:
            self._unsure_check.cancel()
        if self._reader is not None:
            await self._reader.close()
        if self._conn is not None:
            await self._conn.close()
        self._stopped.set()
        log.info("scheduler %s stopped", self.scheduler_id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _worker_snapshot(self) -> list[tuple[str, list[str], int, int, float]]:
        now = time.time()
        return [
            (w.worker_id, list(w.capabilities), w.concurrency, w.in_flight, now - w.last_seen)
            for w in self.registry.live()
        ]

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise AmqpschedError("scheduler is not started")
        return self._journal

    def _apply_entry(self, kind: str, body: bytes, origin: str | None) -> None:
        """A journal entry, at start or written since by another scheduler."""
        if origin == self.scheduler_id:
            # Its own: applied when it was made; but an answer whose publish failed without a
            # confirm or a refusal is known to have gone out once its journal copy is read.
            if self._unsure and kind in (Kind.ANSWER, Kind.ANSWER_BATCH):
                for answer in journaled_answers(kind, body):
                    if answer.task_id in self._unsure:
                        self._went_out(answer)
            return
        if kind in (Kind.ANSWER, Kind.ANSWER_BATCH):
            for answer in journaled_answers(kind, body):
                self._apply_answer(answer)  # and to who asked here
        elif kind != "record":
            apply_entry(self.store, self._cancels, kind, body, origin)
        else:
            record = json.loads(body)
            k = record.get("k")
            if k == "alive":
                self.peers.seen(record["s"], record["at"])
            elif k == "gone":
                self.peers.gone(record["s"])
            elif k == "started":
                self._on_started(decode_event(StartedEvent, record["event"].encode()), False)
            elif k == "retrying":
                self._on_retrying(decode_event(RetryingEvent, record["event"].encode()), False)
            else:
                apply_entry(self.store, self._cancels, kind, body)

    def _apply_answer(self, answer: Answer) -> None:
        """Another scheduler answered: remember it, and send it to who asked here."""
        record = self.store.get(answer.task_id) if answer.task_id else None
        watchers = list(record.watchers) if record is not None and not record.final else []
        apply_answer(self.store, answer)
        self._unsure.pop(answer.task_id or "", None)
        if watchers and record is not None and record.final:
            body = encode(answer)
            for reply_to, corr in watchers:
                sent = asyncio.ensure_future(self.outbox.send(reply_to, corr, Kind.ANSWER, body))
                sent.add_done_callback(_log_failure)

    def _went_out(self, answer: Answer) -> None:
        """An answer this scheduler was unsure of is in the journal: it went out."""
        task_id = answer.task_id or ""
        self._unsure.pop(task_id, None)
        record = self.store.get(task_id)
        if record is not None and not record.final and record.answering is None:
            self.store.finish(record, answer, answer.finished_at or time.time())
            log.info("answer of %s found in the journal: it went out", task_id)

    def _check_unsure_soon(self) -> None:
        if self._unsure_check is None or self._unsure_check.done():
            self._unsure_check = asyncio.ensure_future(self._check_unsure())

    async def _check_unsure(self, wait: float = 60.0) -> None:
        """Look in the journal for the answers this scheduler is unsure of, once connected
        again. Their outcomes are redelivered, maybe to another scheduler: without this, one
        that went out would stay unanswered here (a stale status)."""
        assert self._conn is not None
        await asyncio.sleep(REQUEUE_PAUSE)
        began = time.monotonic()
        while self._unsure and time.monotonic() - began < wait:
            if not transport.is_connected(self._conn):
                await asyncio.sleep(REQUEUE_PAUSE)
                continue
            try:
                found = await self._answers_in_journal(max(self._unsure.values()))
            except AmqpschedError as exc:
                log.warning("could not look for unsure answers in the journal: %s", exc)
                await asyncio.sleep(REQUEUE_PAUSE)
                continue
            for task_id in list(self._unsure):
                if task_id in found:
                    self._went_out(found[task_id])
            return

    async def _alive(self) -> None:
        """Tell the other schedulers this one is alive (a journal record)."""
        now = time.time()
        self._alive_at = now
        await self.journal.append({"k": "alive", "s": self.scheduler_id, "at": now})

    @property
    def ready(self) -> bool:
        return self.consuming and self._conn is not None and transport.is_connected(self._conn)

    async def _requeue_later(self, msg: IncomingMessage, exc: Exception) -> None:
        log.warning("message %s not handled, will be redelivered: %s", msg.message_id, exc)
        if transport.refused(exc):
            self._refused()
        await asyncio.sleep(REQUEUE_PAUSE)
        await transport.settle(msg, requeue=True)

    def _refused(self) -> None:
        """A publish was refused (nacked). After a queue's leader moved to another node,
        RabbitMQ 3.10 can go on refusing every publish of a channel that was restored, while a
        new channel works: after a few refusals in a row, publish on a new channel."""
        now = time.monotonic()
        self._refusals = [t for t in self._refusals if t > now - REFUSALS_WINDOW] + [now]
        if len(self._refusals) >= REFUSALS_LIMIT and now > self._replaced_at + REFUSALS_WINDOW:
            self._replaced_at = now
            self._refusals.clear()
            task = asyncio.ensure_future(self._replace_publishing_channel())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _replace_publishing_channel(self) -> None:
        assert self._conn is not None
        try:
            channel = await transport.confirm_channel(self._conn)
        except AmqpschedError as exc:
            log.warning("could not open a new channel to publish on: %s", exc)
            return
        old = self.outbox.channel
        self.outbox.channel = channel
        log.warning("publishes were refused: publishing on a new channel")
        await asyncio.sleep(transport.PUBLISH_TIMEOUT)  # what was sent on it is settled
        if old is not self._channel:
            await transport.close_quietly(old)

    # -- client requests -----------------------------------------------------------------------
    async def _on_request(self, msg: IncomingMessage) -> None:
        try:
            await self._handle_request(msg)
        except AmqpschedError as exc:
            await self._requeue_later(msg, exc)
        except Exception:
            log.exception("unexpected error on request %s", msg.message_id)
            await self.outbox.reject(
                msg,
                "internal_error",
                "the scheduler failed on this message",
                error=ErrorType.INTERNAL_ERROR,
            )
            await transport.settle(msg)
            self.metrics.rejected.labels("internal_error").inc()

    async def _handle_request(self, msg: IncomingMessage) -> None:
        kind_name = msg.type or Kind.SUBMIT.value
        if len(msg.body) > self.settings.max_message_bytes:
            detail = (
                f"body is {len(msg.body)} bytes; the limit is {self.settings.max_message_bytes}"
            )
            await self._reject(msg, "too_large", detail)
            return
        model = REQUEST_MODELS.get(Kind(kind_name)) if kind_name in KIND_NAMES else None
        if model is None:
            await self._reject(msg, "unknown_type", f"unknown message type {kind_name!r}")
            return
        try:
            request: BaseModel = decode(model, msg.body)
        except DecodeError as exc:
            await self._reject(msg, exc.reason, exc.detail)
            return
        if not msg.reply_to:
            await self._reject(
                msg, "missing_reply_to", "the reply_to property is required", request
            )
            return
        corr = msg.correlation_id or ""
        kind = Kind(kind_name)
        if isinstance(request, SubmitRequest):
            self.metrics.tasks_per_message.labels("submit").observe(1)
            await self._submit(msg, request, msg.reply_to, corr)
            return
        if isinstance(request, SubmitBatch):
            self.metrics.tasks_per_message.labels("submit").observe(len(request.tasks))
            await self._submit_batch(msg, request, msg.reply_to)
            return
        if isinstance(request, TaskQuery):
            if kind == Kind.CANCEL:
                await self._cancel(request.task_id, msg.reply_to, corr)
            else:
                await self._query(kind, request, msg.reply_to, corr)
        else:
            reply = CapabilitiesReply(capabilities=self.registry.catalog())
            await self.outbox.send(msg.reply_to, corr, Kind.CAPABILITIES_REPLY, encode(reply))
        await transport.settle(msg)

    async def _reject(
        self,
        msg: IncomingMessage,
        reason: str,
        detail: str,
        request: BaseModel | None = None,
        *,
        client_request: bool = True,
    ) -> None:
        await self.outbox.reject(msg, reason, detail, request)
        await transport.settle(msg)
        if client_request:
            self.metrics.rejected.labels(reason).inc()
        log.warning("rejected message %s: %s: %s", msg.message_id, reason, detail)

    def _timeout(self, req: SubmitRequest | SubmitBatchItem) -> tuple[float, str | None]:
        """The task's timeout, and why it is refused (None: it is not)."""
        timeout = req.timeout or self.settings.default_timeout
        if timeout > self.settings.max_timeout:
            return timeout, f"timeout {timeout} exceeds the maximum {self.settings.max_timeout}"
        return timeout, None

    async def _submit(
        self, msg: IncomingMessage, req: SubmitRequest, reply_to: str, corr: str
    ) -> None:
        timeout, refused = self._timeout(req)
        if refused is not None:
            await self._reject(msg, "timeout_too_large", refused, req)
            return
        headers = msg.headers or {}
        accepted = accepts(headers)
        done = self._accept(
            req,
            timeout,
            reply_to,
            corr,
            tracing.from_headers(headers),
            redelivered=bool(msg.redelivered),
            replay=bool(headers.get(transport.H_REPLAY)),
            batch_reply=Kind.ANSWER_BATCH.value in accepted,
            direct=DIRECT_FEATURE in accepted,
        )
        if done is not None:
            await done
        await transport.settle(msg)

    async def _submit_batch(self, msg: IncomingMessage, batch: SubmitBatch, reply_to: str) -> None:
        """Each task of the batch as if submitted alone; the message is acked once every one is
        dispatched (or answered). A batch with one task it must refuse is refused whole."""
        timeouts = []
        for index, item in enumerate(batch.tasks):
            timeout, refused = self._timeout(item)
            if refused is not None:
                await self._reject(msg, "timeout_too_large", f"tasks.{index}: {refused}", batch)
                return
            timeouts.append(timeout)
        headers = msg.headers or {}
        accepted = accepts(headers)
        batch_reply, direct = Kind.ANSWER_BATCH.value in accepted, DIRECT_FEATURE in accepted
        redelivered, replay = bool(msg.redelivered), bool(headers.get(transport.H_REPLAY))
        pending = []
        for item, timeout in zip(batch.tasks, timeouts, strict=True):
            done = self._accept(
                item,
                timeout,
                reply_to,
                item.correlation_id,
                tracing.valid(item.traceparent),
                redelivered=redelivered,
                replay=replay,
                batch_reply=batch_reply,
                direct=direct,
            )
            if done is not None:
                pending.append(done)
        await _all(pending)
        await transport.settle(msg)

    def _accept(
        self,
        req: SubmitRequest | SubmitBatchItem,
        timeout: float,
        reply_to: str,
        corr: str,
        traceparent: str | None,
        *,
        redelivered: bool,
        replay: bool,
        batch_reply: bool,
        direct: bool,
    ) -> asyncio.Future[Any] | None:
        """Dispatch a submitted task, or, if it is known already, answer or watch it. Returns
        the future of what it caused, done once the broker confirmed it (None: nothing to wait
        for). No task of its own per submission: the hot path of a batch."""
        now = time.time()
        replayed = self.store.get(req.task_id) if req.task_id else None
        if replayed is not None and replayed.final and replay:
            self.store.forget(replayed.task_id)  # a replay from the dead-letter queue runs anew
        known = self.store.get(req.task_id) if req.task_id else None
        if known is None and req.idempotency_key is not None:
            known = self.store.by_key(req.idempotency_key, now)
        if known is not None:
            # The same task again (a redelivery, a client retry, an idempotency key): it runs
            # once, and every submission gets its answer.
            same = (reply_to, corr) == (known.reply_to, known.correlation_id)
            if known.answer is not None:
                # A redelivery of the very submission that was answered (its scheduler died
                # before the ack) must not answer twice; any other asker gets the answer.
                if not (redelivered and same):
                    body = encode(known.answer)
                    send = self.outbox.send(reply_to, corr, Kind.ANSWER, body, known.traceparent)
                    return asyncio.ensure_future(send)
            elif not same:
                known.watchers.append((reply_to, corr))
            elif redelivered and known.owner != self.scheduler_id and known.task is not None:
                # Handed back by a scheduler that may have failed to dispatch it: the journal
                # holds the dispatch, but the capability queue may not (one of the two
                # destinations refused the publish). Dispatch it again: at worst it runs twice,
                # and is answered once.
                return self._dispatch_again(known, known.task)
            return known.dispatching  # acked only once its dispatch is confirmed
        task_id = req.task_id or uuid.uuid4().hex
        with tracing.span(
            "amqpsched.dispatch",
            traceparent,
            kind=tracing.PRODUCER,
            attributes={"amqpsched.task_id": task_id, "amqpsched.capability": req.capability},
        ) as span:
            task = TaskMessage.model_construct(
                task_id=task_id,
                capability=req.capability,
                payload=req.payload,
                attempt=1,
                submitted_at=now,
                deadline=now + timeout,
                reply_to=reply_to,
                correlation_id=corr,
                time_limit=req.time_limit,
                retry=req.retry,
                idempotency_key=req.idempotency_key,
                direct=direct,
                answer_batch=batch_reply,
            )
            return self._dispatch_new(task, span.traceparent)

    def _dispatch_again(self, record: TaskRecord, task: TaskMessage) -> asyncio.Future[None]:
        done = record.dispatching = self.outbox.dispatch_nowait(task, record.traceparent)

        def dispatched(fut: asyncio.Future[None]) -> None:
            if record.dispatching is fut:
                record.dispatching = None
            if not fut.cancelled() and fut.exception() is None:
                record.owner = self.scheduler_id
                self.metrics.of(task.capability).dispatched.inc()

        done.add_done_callback(dispatched)
        return done

    def _dispatch_new(self, task: TaskMessage, traceparent: str | None) -> asyncio.Future[None]:
        record = TaskRecord.of(task, traceparent=traceparent, owner=self.scheduler_id)
        self.store.add(record)
        done = record.dispatching = self.outbox.dispatch_nowait(task, traceparent)

        def dispatched(fut: asyncio.Future[None]) -> None:
            record.dispatching = None
            if fut.cancelled() or fut.exception() is not None:
                if self.store.get(task.task_id) is record and not record.final:
                    self.store.forget(task.task_id)  # the redelivery starts afresh
                return
            if record.state == TaskState.QUEUED:
                record.state = TaskState.DISPATCHED
            counters = self.metrics.of(task.capability)
            counters.submitted.inc()
            counters.dispatched.inc()

        done.add_done_callback(dispatched)
        return done

    async def _query(self, kind: Kind, query: TaskQuery, reply_to: str, corr: str) -> None:
        record = self.store.get(query.task_id)
        if kind == Kind.RESULT and record is not None:
            if record.answer is not None:
                await self.outbox.answer([(reply_to, corr)], record.answer, record.traceparent)
            else:
                record.watchers.append((reply_to, corr))
            return
        await self._status_reply(query.task_id, record, reply_to, corr)

    async def _status_reply(
        self, task_id: str, record: TaskRecord | None, reply_to: str, corr: str
    ) -> None:
        reply = StatusReply(
            task_id=task_id,
            state=record.state if record else TaskState.UNKNOWN,
            capability=record.capability if record else None,
            attempts=record.attempts if record else 0,
            answer=record.answer if record else None,
        )
        await self.outbox.send(reply_to, corr, Kind.STATUS_REPLY, encode(reply))

    async def _cancel(self, task_id: str, reply_to: str, corr: str) -> None:
        record = self.store.get(task_id)
        if record is not None and not record.final:
            now = time.time()
            self._cancels[task_id] = record.deadline
            await self.journal.append(cancelled(task_id, record.deadline))
            # Workers first: a queued task must be skipped, a running one stopped.
            await self.outbox.cancel_notice([task_id], record.deadline)
            if not record.final:  # its outcome may have come in meanwhile
                answer = failure(record, ErrorType.CANCELLED, "the task was cancelled", now)
                await self._finish(record, answer, now)
                log.info("task %s cancelled", task_id)
        await self._status_reply(task_id, record, reply_to, corr)

    # -- worker events -------------------------------------------------------------------------
    async def _on_event(self, msg: IncomingMessage) -> None:
        try:
            if msg.type == Kind.STARTED:
                self._on_started(decode_event(StartedEvent, msg.body))
                await self._share("started", msg.body)
                await transport.settle(msg)
            elif msg.type == Kind.OUTCOME:
                await self._on_outcome(msg, decode_event(OutcomeEvent, msg.body))
            elif msg.type == Kind.OUTCOME_BATCH:
                await self._on_outcome_batch(msg, decode_event(OutcomeBatch, msg.body))
            elif msg.type == Kind.RETRYING:
                self._on_retrying(decode_event(RetryingEvent, msg.body))
                await self._share("retrying", msg.body)
                await transport.settle(msg)
            elif msg.type == Kind.TASK:
                await self._on_dead_task(msg, decode_event(TaskMessage, msg.body))
            else:
                detail = f"unknown event type {msg.type!r}"
                await self._reject(msg, "unknown_type", detail, client_request=False)
        except DecodeError as exc:
            await self._reject(msg, exc.reason, exc.detail, client_request=False)
        except AmqpschedError as exc:
            await self._requeue_later(msg, exc)
        except Exception:
            log.exception("unexpected error on event %s", msg.message_id)
            detail = "the scheduler failed on this event"
            await self._reject(msg, "internal_error", detail, client_request=False)

    async def _share(self, kind: str, event: bytes) -> None:
        """With other schedulers alive, journal a worker's event so that they know it too (the
        task's owner runs its timers from it)."""
        if self.peers.others(time.time()):
            await self.journal.append({"k": kind, "event": event.decode()})

    def _on_started(self, ev: StartedEvent, count: bool = True) -> None:
        record = self.store.get(ev.task_id)
        if record is None or record.final or is_fenced(record, ev.attempt):
            return
        if record.attempts == 0 and count:
            self.metrics.queue_wait.labels(record.capability).observe(
                max(ev.started_at - record.submitted_at, 0.0)
            )
        record.state = TaskState.RUNNING
        record.attempts = max(record.attempts, ev.attempt)
        record.attempt = ev.attempt
        record.worker_id = ev.worker_id

    def _on_retrying(self, ev: RetryingEvent, count: bool = True) -> None:
        record = self.store.get(ev.task_id)
        if record is None or record.final or is_fenced(record, ev.attempt):
            return
        if count:
            self.metrics.retries.labels(record.capability).inc()
        if record.attempts == 0 and ev.started_at is not None and count:
            self.metrics.queue_wait.labels(record.capability).observe(
                max(ev.started_at - record.submitted_at, 0.0)
            )
        record.state = TaskState.RETRYING
        record.attempts = ev.attempt
        record.attempt = ev.attempt + 1
        record.worker_id = None
        if record.task is not None:
            record.task = record.task.model_copy(update={"attempt": ev.attempt + 1})
        log.info(
            "task %s attempt %d failed (%s), retry in %.1fs",
            ev.task_id,
            ev.attempt,
            ev.error.type.value,
            ev.delay,
        )

    async def _on_outcome(self, msg: IncomingMessage, ev: OutcomeEvent) -> None:
        self.metrics.tasks_per_message.labels("outcome").observe(1)
        # The worker sent it to the client too (protocol section 16): that client is answered.
        direct = (msg.headers or {}).get(DIRECT_HEADER) is not None
        done = self._outcome(ev, tracing.from_headers(msg.headers), direct)
        if done is not None:
            await done
        await transport.settle(msg)

    async def _on_outcome_batch(self, msg: IncomingMessage, batch: OutcomeBatch) -> None:
        self.metrics.tasks_per_message.labels("outcome").observe(len(batch.events))
        parents = batch.traceparents + [None] * (len(batch.events) - len(batch.traceparents))
        pending = [
            done
            for ev, parent in zip(batch.events, parents, strict=False)
            if (done := self._outcome(ev, tracing.valid(parent))) is not None
        ]
        await _all(pending)
        await transport.settle(msg)

    def _outcome(
        self, ev: OutcomeEvent, traceparent: str | None, direct: bool = False
    ) -> asyncio.Future[Any] | None:
        """Answer the task of an outcome; the future is done once the answer is confirmed.
        ``direct``: its submitter has it already (from the worker): journal it, answer others."""
        record = self.store.get(ev.task_id)
        if record is not None and record.answering is not None:
            # Answered, but not confirmed yet (a broker restart may be under way): this outcome
            # is acked only once that answer is; if it fails, this outcome answers instead.
            return asyncio.ensure_future(
                self._outcome_after(record.answering, ev, traceparent, direct)
            )
        if record is not None and ev.task_id in self._unsure:
            return asyncio.ensure_future(self._outcome_checked(ev, traceparent, direct))
        if record is not None and (record.final or is_fenced(record, ev.attempt)):
            if is_fenced(record, ev.attempt):
                self.fenced += 1
                self.metrics.fenced.labels(record.capability).inc()
                log.info("outcome of superseded attempt %d of %s fenced", ev.attempt, ev.task_id)
            return None
        counters = self.metrics.of(ev.capability)
        if record is not None and record.attempts == 0 and ev.started_at is not None:
            # No `started` came (a short task): its queue wait is known from the outcome.
            counters.queue_wait.observe(max(ev.started_at - record.submitted_at, 0.0))
        answer = answer_of(ev)
        if record is not None and record.attempts > ev.attempt:
            answer = answer.model_copy(update={"attempts": record.attempts})
        if record is None:  # a scheduler that restarted: remember it for later queries
            record = TaskRecord(
                task_id=ev.task_id,
                capability=ev.capability,
                reply_to=ev.reply_to,
                correlation_id=ev.correlation_id,
                submitted_at=ev.submitted_at,
                deadline=ev.finished_at,
            )
        if traceparent is not None:
            record.traceparent = traceparent  # the worker's span: the answer's parent
        if ev.started_at is not None:
            counters.execution.observe(max(ev.finished_at - ev.started_at, 0.0))
        if log.isEnabledFor(logging.DEBUG):
            with logs.task_context(
                ev.task_id, ev.capability, ev.attempt, ev.worker_id, traceparent=traceparent
            ):
                log.debug("task %s %s on %s", ev.task_id, ev.status.value, ev.worker_id)
        answered = (ev.reply_to, ev.correlation_id) if direct else None
        return self._finish_nowait(record, answer, time.time(), direct=answered)

    async def _outcome_after(
        self,
        answering: asyncio.Future[Any],
        ev: OutcomeEvent,
        traceparent: str | None,
        direct: bool,
    ) -> None:
        await asyncio.wait([answering])
        # Answered: this one is dropped (or fenced, and counted so). Not: it answers instead.
        again = self._outcome(ev, traceparent, direct)
        if again is not None:
            await again

    async def _outcome_checked(
        self, ev: OutcomeEvent, traceparent: str | None, direct: bool
    ) -> None:
        """An outcome of a task whose earlier answer may or may not have gone out: if the
        journal has that answer (it is journaled by the publish that sends it), it went out,
        and is not sent twice."""
        failed_at = self._unsure.get(ev.task_id)
        if failed_at is not None:
            sent = (await self._answers_in_journal(failed_at)).get(ev.task_id)
            self._unsure.pop(ev.task_id, None)
            record = self.store.get(ev.task_id)
            if sent is not None and record is not None and not record.final:
                self.store.finish(record, sent, sent.finished_at or time.time())
                log.info("answer of %s found in the journal: it went out", ev.task_id)
                return
        again = self._outcome(ev, traceparent, direct)
        if again is not None:
            await again

    async def _answers_in_journal(self, failed_at: float) -> dict[str, Answer]:
        """The answers journaled since a little before the earliest unsure one, read once for
        every outcome waiting on it (a read that began before ``failed_at`` does not count)."""
        check = self._journal_check
        if check is None or check[0] < failed_at or (check[1].done() and check[1].exception()):
            since = min(self._unsure.values(), default=failed_at) - UNSURE_MARGIN
            check = self._journal_check = (time.time(), asyncio.ensure_future(self._read(since)))
        return await asyncio.shield(check[1])

    async def _read(self, since: float) -> dict[str, Answer]:
        found: dict[str, Answer] = {}

        def collect(kind: str, body: bytes) -> None:
            found.update((a.task_id, a) for a in journaled_answers(kind, body) if a.task_id)

        assert self._conn is not None
        await replay(self._conn, self.topology, collect, since=since)
        return found

    async def _on_dead_task(self, msg: IncomingMessage, task: TaskMessage) -> None:
        """A task the broker dead-lettered from its capability queue: delivered ``delivery_limit``
        times, its worker dying each time (a poison message)."""
        reason = transport.death_reason(msg)
        deliveries = self.settings.delivery_limit
        detail = f"the worker died {deliveries} times running it (broker: {reason})"
        record = self.store.get(task.task_id)
        await self.outbox.dead_letter(
            msg,
            "delivery_limit" if reason == "delivery_limit" else reason,
            detail,
            task_id=task.task_id,
            capability=task.capability,
            attempts=task.attempt,
        )
        if record is None:
            record = TaskRecord(
                task.task_id,
                task.capability,
                task.reply_to,
                task.correlation_id,
                task.submitted_at,
                task.deadline,
                traceparent=tracing.from_headers(msg.headers),
            )
        if not record.final:
            now = time.time()
            record.attempts = max(record.attempts, task.attempt)
            await self._finish(record, failure(record, ErrorType.WORKER_LOST, detail, now), now)
        await transport.settle(msg)
        log.warning("task %s dead-lettered: %s", task.task_id, detail)

    async def _finish(self, record: TaskRecord, answer: Answer, now: float) -> None:
        """Send the one final answer to the submitter and every watcher, then remember it."""
        await self._finish_nowait(record, answer, now)

    def _finish_nowait(
        self,
        record: TaskRecord,
        answer: Answer,
        now: float,
        direct: tuple[str, str] | None = None,
    ) -> asyncio.Future[Any]:
        """``direct``: the (reply-to, correlation id) the worker answered itself; the answer is
        journaled, and sent to the others."""
        targets = [(record.reply_to, record.correlation_id), *record.watchers]
        targets = [t for t in targets if t[0] and t != direct]
        state, watchers, task = record.state, list(record.watchers), record.task
        self.store.finish(record, answer, now)  # final at once for status queries
        # Sent and journaled by one publish: after a crash, a restarted scheduler knows exactly
        # which answers went out. When a broker node fails, it is not all-or-nothing: a refused one
        # may be in the journal and not sent, or sent and not in the journal; one not confirmed
        # for long may be sent, with its journal copy held for good (RabbitMQ 3.10, a stream
        # leader moving). Refused: sent again on its own, then journaled on its own; late:
        # journaled on its own too (see sweep); neither: the journal tells whether it went out.
        batch_reply = record.batch_reply and direct is None
        sent = self.outbox.answer_nowait(targets, answer, record.traceparent, batch_reply)
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        record.answering = done
        self._answering[record.task_id] = (now, answer)

        def published(fut: asyncio.Future[Any]) -> None:
            exc = None if fut.cancelled() else fut.exception()
            if exc is not None and transport.refused(exc):
                self._refused()
                resent = asyncio.ensure_future(self._resend(targets, answer, record))
                resent.add_done_callback(lambda r: _chain(r, done))
                return
            _chain(fut, done)

        def answered(fut: asyncio.Future[Any]) -> None:
            self._answering.pop(record.task_id, None)
            if record.answering is fut:
                record.answering = None
            if fut.cancelled() or fut.exception() is not None:
                self.store.reopen(record, state, watchers)  # the redelivery will answer it
                record.task = task
                exc = None if fut.cancelled() else fut.exception()
                if exc is None or not transport.refused(exc):
                    # It may have gone out: the journal is asked before it is sent again.
                    self._unsure[record.task_id] = time.time()
                    self._check_unsure_soon()
                return
            outcome = answer.error.type.value if answer.error else answer.status.value
            counters = self.metrics.of(record.capability)
            counters.finished(outcome).inc()
            if record.submitted_at:
                counters.end_to_end.observe(max(now - record.submitted_at, 0.0))

        sent.add_done_callback(published)
        done.add_done_callback(answered)
        return done

    async def _resend(
        self, targets: list[tuple[str, str]], answer: Answer, record: TaskRecord
    ) -> None:
        """An answer whose publish was refused: send it again to each target on its own (a
        refused publish may have reached some of its destinations: the journal, or the reply
        queue), until confirmed, then journal it on its own."""
        body = encode(answer)
        left = list(targets)
        for attempt in range(1, RESEND_ATTEMPTS + 1):
            await asyncio.sleep(REQUEUE_PAUSE)
            results = await asyncio.gather(
                *(self.outbox.send(r, c, Kind.ANSWER, body, record.traceparent) for r, c in left),
                return_exceptions=True,
            )
            failed = [(t, r) for t, r in zip(left, results, strict=True) if r is not None]
            left = [t for t, _ in failed]
            if not left:
                break
            exc = failed[0][1]
            if not isinstance(exc, BrokerError) or attempt == RESEND_ATTEMPTS:
                raise exc
            if transport.refused(exc):
                self._refused()
        await self.journal.copy_answers([body])
        log.info("answer of %s sent again on its own: its publish was refused", record.task_id)

    def _copy_late_answers(self, now: float) -> None:
        """Journal on their own the answers whose publish waits for its confirm since
        ``ANSWER_GRACE``: its journal copy may be held for good (see :meth:`_finish_nowait`). A
        second copy in the journal is harmless."""
        late = [(t, a) for t, (at, a) in self._answering.items() if at < now - ANSWER_GRACE]
        if not late:
            return
        for task_id, _ in late:
            del self._answering[task_id]
        copies = [encode(a) for _, a in late]
        self._background.add(copy := asyncio.ensure_future(self.journal.copy_answers(copies)))
        copy.add_done_callback(self._background.discard)
        copy.add_done_callback(_log_failure)
        log.warning(
            "%d answer(s) not confirmed after %.0fs: journaled on their own",
            len(late),
            ANSWER_GRACE,
        )

    async def _on_announcement(self, msg: IncomingMessage) -> None:
        try:
            announcement = decode_event(WorkerAnnouncement, msg.body)
        except DecodeError as exc:
            log.warning("bad worker announcement dropped: %s", exc)
            return
        if msg.type not in (Kind.HELLO, Kind.HEARTBEAT, Kind.GOODBYE):
            log.warning("worker announcement of unknown type %r dropped", msg.type)
            return
        kind = Kind(msg.type)
        new = self.registry.get(announcement.worker_id) is None
        self.registry.observe(kind, announcement, time.time())
        if kind == Kind.GOODBYE:
            log.info("worker %s said goodbye", announcement.worker_id)
        elif new:
            log.info(
                "worker %s live with %s",
                announcement.worker_id,
                ",".join(c.name for c in announcement.capabilities),
            )
        if kind == Kind.HELLO:
            # Welcome it with the cancellations in force: it waits for them before consuming.
            now = time.time()
            try:
                await self.outbox.cancel_notice(
                    list(self._cancels), max(self._cancels.values(), default=now)
                )
            except AmqpschedError as exc:
                log.warning("could not welcome worker %s: %s", announcement.worker_id, exc)

    # -- timers --------------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        period = min(0.25, self.settings.heartbeat_interval / 2)
        while True:
            await asyncio.sleep(period)
            try:
                await self.sweep(time.time())
            except AmqpschedError as exc:
                log.warning("sweep failed, will retry: %s", exc)
            except Exception:
                log.exception("sweep failed")

    async def sweep(self, now: float) -> None:
        # While this scheduler is cut off, workers are not missing heartbeats: it is. None is
        # declared dead then, and each gets a whole liveness window once it is back.
        connected = self._conn is None or transport.is_connected(self._conn)
        if not connected:
            self._offline = True
        elif self._offline:
            self._offline = False
            self.registry.excuse(now)
            log.info("back on the broker: every worker has a new liveness window")
        for worker_id in self.registry.sweep(now) if connected else []:
            lost = self.store.running_on(worker_id)
            log.warning(
                "worker %s missed its heartbeats: declared dead with %d running task(s)",
                worker_id,
                len(lost),
            )
            self._orphans.update(
                (record.task_id, worker_id)
                for record in lost
                if self.peers.runs_timers(record.owner, record.task_id, now)
            )
        # Tasks of dead workers, until dispatched again (a failed dispatch is retried here).
        orphans = []
        for task_id, worker_id in list(self._orphans.items()):
            record = self.store.get(task_id)
            if record is None or record.final or record.worker_id != worker_id:
                del self._orphans[task_id]  # answered or taken up meanwhile
            else:
                orphans.append((record, worker_id))
        if orphans:
            await asyncio.gather(*(self._redispatch(r, w, now) for r, w in orphans))
        # After a start, give workers one liveness window to be heard before telling
        # "no worker" from "expired".
        due = self.store.due(now) if now > self._started_at + self.registry.liveness_window else []
        due = [r for r in due if self._runs_timers(r, now)]
        if due:
            await asyncio.gather(*(self._expire(record, now) for record in due))
        self._cancels = {k: v for k, v in self._cancels.items() if v > now}
        self._unsure = {k: v for k, v in self._unsure.items() if v > now - UNSURE_KEEP}
        self._copy_late_answers(now)
        if now >= self._alive_at + self.settings.heartbeat_interval:
            await self._alive()
        self.peers.forget_old(now, UNSURE_KEEP)
        self.store.purge(now)

    def _runs_timers(self, record: TaskRecord, now: float) -> bool:
        """Whether this scheduler runs ``record``'s timers; if not, look again later (its
        owner may die)."""
        if self.peers.runs_timers(record.owner, record.task_id, now):
            return True
        self.store.remind(record, now + self.registry.liveness_window)
        return False

    async def _redispatch(self, record: TaskRecord, worker_id: str, now: float) -> None:
        """The worker running ``record`` is dead: its attempt is superseded by a new one."""
        if record.task is None or now >= record.deadline:
            detail = f"worker {worker_id} died while running the task"
            await self._finish(record, failure(record, ErrorType.WORKER_LOST, detail, now), now)
            return
        task = record.task.model_copy(update={"attempt": record.attempt + 1})
        await self.outbox.dispatch(task, record.traceparent)  # failed: the next sweep retries
        self._orphans.pop(record.task_id, None)
        self.metrics.dispatched.labels(record.capability).inc()
        self.metrics.redispatched.labels(record.capability).inc()
        if record.final or record.worker_id != worker_id:
            return  # its first attempt answered (or was heard from) while this one was sent
        # From now on, outcomes of the attempt that was running are fenced off.
        record.attempt, record.task = task.attempt, task
        record.owner = self.scheduler_id
        record.worker_id = None
        record.state = TaskState.DISPATCHED
        log.warning("task %s dispatched again as attempt %d", record.task_id, record.attempt)

    async def _expire(self, record: TaskRecord, now: float) -> None:
        live = self.registry.has_live(record.capability)
        if record.recovered and live and record.state == TaskState.DISPATCHED:
            # Recovered from the journal: it may be running on a worker since before this
            # scheduler started. A live worker answers it either way (its result, or expired
            # when it takes it too late); look again later.
            self.store.remind(record, now + self.registry.liveness_window)
            return
        error_type = timeout_error(live)
        message = (
            f"no live worker offers {record.capability!r}"
            if error_type == ErrorType.NO_WORKER
            else f"no worker started the task within its timeout ({record.capability!r})"
        )
        try:
            await self._finish(record, failure(record, error_type, message, now), now)
        except AmqpschedError:
            self.store.remind(record, now + 1.0)
            raise
        log.info("task %s failed: %s", record.task_id, error_type.value)
