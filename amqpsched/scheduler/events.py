"""Worker events from the results queue (``started``, ``retrying``, outcomes, dead-lettered
tasks) and worker announcements from the registry exchange."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from .. import logs, tracing, transport
from ..batching import Countdown
from ..errors import AmqpschedError, DecodeError
from ..protocol import (
    DIRECT_HEADER,
    REDELIVERED_HEADER,
    ErrorType,
    Kind,
    OutcomeBatch,
    OutcomeEvent,
    RetryingEvent,
    StartedEvent,
    TaskMessage,
    TaskState,
    WorkerAnnouncement,
    answer_of,
    decode_event,
)
from ..transport import IncomingMessage
from .answers import Answering
from .base import wait_all
from .cold import BATCH_REPLY, id_hash
from .outbox import failure
from .passthrough import decode_message
from .state import TaskRecord, is_fenced

log = logging.getLogger("amqpsched.scheduler")


def outcome_attempts(body: bytes) -> list[tuple[str, int | None]]:
    """The (task id, attempt if readable) pairs an outcome or an outcome batch names, read as
    well as its body allows (for one that does not decode)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    events = data.get("events") if isinstance(data, dict) else None
    listed = events if isinstance(events, list) else [data]
    found: list[tuple[str, int | None]] = []
    for event in listed:
        task_id = event.get("task_id") if isinstance(event, dict) else None
        if isinstance(task_id, str) and 0 < len(task_id) <= 256:
            attempt = event.get("attempt")
            found.append((task_id, attempt if type(attempt) is int else None))
    return found


def redelivered(msg: IncomingMessage) -> bool:
    """Whether an outcome may have been answered before: the message was delivered before (to
    a scheduler that lost its connection), or its task was (to a worker that did)."""
    return bool(msg.redelivered) or bool((msg.headers or {}).get(REDELIVERED_HEADER))


class Events(Answering):
    async def _on_event(self, msg: IncomingMessage) -> None:
        try:
            if msg.type == Kind.STARTED:
                started = decode_event(StartedEvent, msg.body)
                await self._warm(started.task_id)
                self._on_started(started)
                await self._share("started", msg.body)
                await transport.settle(msg)
            elif msg.type == Kind.OUTCOME:
                await self._on_outcome(msg, decode_message(OutcomeEvent, msg.body))
            elif msg.type == Kind.OUTCOME_BATCH:
                await self._on_outcome_batch(msg, decode_message(OutcomeBatch, msg.body))
            elif msg.type == Kind.RETRYING:
                retrying = decode_event(RetryingEvent, msg.body)
                await self._warm(retrying.task_id)
                self._on_retrying(retrying)
                await self._share("retrying", msg.body)
                await transport.settle(msg)
            elif msg.type == Kind.TASK:
                await self._on_dead_task(msg, decode_event(TaskMessage, msg.body))
            else:
                detail = f"unknown event type {msg.type!r}"
                await self._reject(msg, "unknown_type", detail, client_request=False)
        except DecodeError as exc:
            if msg.type in (Kind.OUTCOME, Kind.OUTCOME_BATCH):
                await self._answer_unreadable(msg.body, exc)
            await self._reject(msg, exc.reason, exc.detail, client_request=False)
        except AmqpschedError as exc:
            await self._requeue_later(msg, exc)
        except Exception:
            log.exception("unexpected error on event %s", msg.message_id)
            detail = "the scheduler failed on this event"
            await self._reject(msg, "internal_error", detail, client_request=False)

    async def _answer_unreadable(self, body: bytes, exc: DecodeError) -> None:
        """An outcome nobody can read (a worker of another version or language, or a bug): its
        tasks are answered ``internal_error`` now, not at their deadline as never started. The
        outcome itself is dead-lettered with its reason after this."""
        detail = (
            f"the worker's outcome could not be read ({exc.reason}: {exc.detail}); "
            "it is kept in the dead-letter queue"
        )
        for task_id, attempt in outcome_attempts(body):
            try:
                await self._warm(task_id)
                record = self.store.get(task_id)
                if record is None or record.final or record.answering is not None:
                    continue
                if attempt is None or not is_fenced(record, attempt):
                    now = time.time()
                    error = failure(record, ErrorType.INTERNAL_ERROR, detail, now)
                    await self._finish(record, error, now)
            except AmqpschedError as err:  # its deadline answers it, later
                log.warning("could not answer task %s of an unreadable outcome: %s", task_id, err)

    def _on_started(self, ev: StartedEvent, count: bool = True) -> None:
        record = self.store.get(ev.task_id)
        if record is None or record.final or is_fenced(record, ev.attempt):
            return
        if record.attempts == 0 and count:
            self.metrics.queue_wait.labels(record.capability).observe(
                max(ev.started_at - record.submitted_at, 0.0)
            )
        record.state = TaskState.RUNNING
        self.store.unwait(record.task_id)
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
        done = self._outcome(ev, tracing.from_headers(msg.headers), direct, redelivered(msg))
        if done is not None:
            await done
        await transport.settle(msg)

    async def _on_outcome_batch(self, msg: IncomingMessage, batch: OutcomeBatch) -> None:
        self.metrics.tasks_per_message.labels("outcome").observe(len(batch.events))
        parents = batch.traceparents + [None] * (len(batch.events) - len(batch.traceparents))
        again = redelivered(msg)
        countdown = Countdown()  # their answers: one future for all
        pending = [
            done
            for ev, parent in zip(batch.events, parents, strict=False)
            if (done := self._outcome(ev, tracing.valid(parent), False, again, countdown))
            is not None
        ]
        pending.append(countdown.seal())
        await wait_all(pending)
        await transport.settle(msg)

    def _outcome(
        self,
        ev: OutcomeEvent,
        traceparent: str | None,
        direct: bool = False,
        redelivered: bool = False,
        countdown: Countdown | None = None,
    ) -> asyncio.Future[Any] | None:
        """Answer the task of an outcome; the future is done once the answer is confirmed.
        ``direct``: its submitter has it already (from the worker): journal it, answer others.
        ``redelivered``: it was delivered before, maybe to another scheduler. ``countdown``:
        the answer is waited for there, when it is sent now (then no future)."""
        record = self.store.get(ev.task_id)
        if record is not None and record.answering is not None:
            # Answered, but not confirmed yet (a broker restart may be under way): this outcome
            # is acked only once that answer is; if it fails, this outcome answers instead.
            return asyncio.ensure_future(
                self._outcome_after(record.answering, ev, traceparent, direct)
            )
        if record is not None and ev.task_id in self._unsure:
            return asyncio.ensure_future(self._outcome_checked(ev, traceparent, direct))
        if record is None and self._paging:
            paging = self._paging.get(id_hash(ev.task_id))
            if paging is not None:  # kept cold, being read back (a query or an event asked)
                return asyncio.ensure_future(
                    self._outcome_paged(paging, ev, traceparent, direct, redelivered)
                )
        if redelivered and (record is None or not record.final):
            # Its scheduler lost its connection before the ack, maybe after the answer: that
            # answer's journal entry may not be read here yet. Read the journal up to now.
            return asyncio.ensure_future(self._outcome_synced(ev, traceparent, direct))
        # A direct outcome is not fenced off: its client has it already (an attempt dispatched
        # again for a submission handed back, protocol 5.5 and 9.6). It is the answer.
        if record is not None and (record.final or (is_fenced(record, ev.attempt) and not direct)):
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
        if record is None:  # kept cold, or a scheduler that restarted: remember it for queries
            cold = self.store.cold.pop(ev.task_id) if len(self.store.cold) else None
            record = TaskRecord(
                task_id=ev.task_id,
                capability=ev.capability,
                reply_to=ev.reply_to,
                correlation_id=ev.correlation_id,
                submitted_at=ev.submitted_at,
                deadline=ev.finished_at,
                batch_reply=cold is not None and bool(cold.flags & BATCH_REPLY),
            )
        if not record.started:
            # A worker ran it (its `started` not heard here): should this answer fail, the task
            # waits for its outcome again, not for a worker, and never expires as not started.
            record.state, record.worker_id = TaskState.RUNNING, ev.worker_id
            self.store.unwait(record.task_id)
        record.attempts = max(record.attempts, ev.attempt)
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
        return self._finish_nowait(record, answer, time.time(), answered, countdown)

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

    async def _outcome_paged(
        self,
        paging: asyncio.Future[None],
        ev: OutcomeEvent,
        traceparent: str | None,
        direct: bool,
        redelivered: bool,
    ) -> None:
        await asyncio.wait([paging])
        again = self._outcome(ev, traceparent, direct, redelivered)
        if again is not None:
            await again

    async def _outcome_synced(
        self, ev: OutcomeEvent, traceparent: str | None, direct: bool
    ) -> None:
        await self._synced()
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

    async def _on_announcement(self, kind_name: str | None, body: bytes) -> None:
        try:
            announcement = decode_event(WorkerAnnouncement, body)
        except DecodeError as exc:
            log.warning("bad worker announcement dropped: %s", exc)
            return
        if kind_name not in (Kind.HELLO, Kind.HEARTBEAT, Kind.GOODBYE):
            log.warning("worker announcement of unknown type %r dropped", kind_name)
            return
        kind = Kind(kind_name)
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
