"""Client requests from ``tasks.submit``: submissions (alone or batched), status, result and
cancel queries, the capability catalogue."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .. import tracing, transport
from ..batching import Countdown
from ..errors import AmqpschedError, DecodeError
from ..protocol import (
    DIRECT_FEATURE,
    REQUEST_MODELS,
    CapabilitiesReply,
    ErrorType,
    Kind,
    StatusReply,
    SubmitBatch,
    SubmitBatchItem,
    SubmitRequest,
    TaskMessage,
    TaskQuery,
    TaskState,
    accepts,
    construct,
    encode,
)
from ..transport import IncomingMessage
from .answers import Answering
from .base import KIND_NAMES, wait_all
from .journal import cancelled
from .outbox import failure
from .passthrough import decode_request
from .state import TaskRecord

log = logging.getLogger("amqpsched.scheduler")

#: Tasks whose dispatch may await its confirm at once; further submissions wait their turn.
MAX_DISPATCHING = 512
SUBMIT_KINDS = frozenset({Kind.SUBMIT.value, Kind.SUBMIT_BATCH.value})
#: Seconds a cancel of a task its worker may answer directly waits for that worker's outcome
#: (it may have answered the client before the cancel came).
CANCEL_GRACE = 0.3


class Requests(Answering):
    async def _on_request(self, msg: IncomingMessage) -> None:
        try:
            await self._handle_request(msg)
        except AmqpschedError as exc:
            await self._requeue_later(msg, exc)
        except Exception:
            log.exception("unexpected error on request %s", msg.message_id)
            try:
                await self.outbox.reject(
                    msg,
                    "internal_error",
                    "the scheduler failed on this message",
                    error=ErrorType.INTERNAL_ERROR,
                )
            except AmqpschedError as exc:  # not dead-lettered: it comes back instead
                await self._requeue_later(msg, exc)
                return
            await transport.settle(msg)
            self.metrics.rejected.labels("internal_error").inc()

    async def _handle_request(self, msg: IncomingMessage) -> None:
        kind_name = msg.type or Kind.SUBMIT.value
        if kind_name in SUBMIT_KINDS:
            await self._dispatch_room()
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
            request: BaseModel = decode_request(model, msg.body)
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
        countdown = Countdown()  # their dispatches: one future for all
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
                countdown=countdown,
            )
            if done is not None:
                pending.append(done)
        pending.append(countdown.seal())
        await wait_all(pending)
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
        synced: bool = False,
        countdown: Countdown | None = None,
    ) -> asyncio.Future[Any] | None:
        """Dispatch a submitted task, or, if it is known already, answer or watch it. Returns
        the future of what it caused, done once the broker confirmed it (None: nothing to wait
        for, or a new task's dispatch, waited for by ``countdown`` if given). No task of its own
        per submission: the hot path of a batch."""

        def again(synced: bool = synced) -> asyncio.Future[Any] | None:
            """This submission taken again, once what it waited for is done."""
            return self._accept(
                req,
                timeout,
                reply_to,
                corr,
                traceparent,
                redelivered=redelivered,
                replay=replay,
                batch_reply=batch_reply,
                direct=direct,
                synced=synced,
            )

        now = time.time()
        cold = self._cold_id(req.task_id, req.idempotency_key, now)
        if cold is not None:  # read it back first, then take the submission
            return asyncio.ensure_future(self._accept_warm(cold, again))
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
                # destinations refused the publish). Dispatch it again, as the next attempt: at
                # worst it runs twice, and the earlier attempt's outcome is fenced off (every
                # scheduler reads the new attempt in the journal), so it is answered once. Not
                # directly by its worker: the earlier attempt may have been.
                task = known.task.model_copy(update={"attempt": known.attempt + 1, "direct": False})
                known.attempt, known.task = task.attempt, task
                known.state, known.worker_id = TaskState.DISPATCHED, None
                return self._dispatch_again(known, task)
            return known.dispatching  # acked only once its dispatch is confirmed
        if redelivered and not synced and self._reader is not None:
            # Handed back by a scheduler that died or lost its connection before the ack: it may
            # have dispatched the task, and its journal entry may not be read here yet.
            return asyncio.ensure_future(self._accept_synced(lambda: again(synced=True)))
        task_id = req.task_id or uuid.uuid4().hex
        with tracing.span(
            "amqpsched.dispatch",
            traceparent,
            kind=tracing.PRODUCER,
            attributes={"amqpsched.task_id": task_id, "amqpsched.capability": req.capability},
        ) as span:
            task = construct(
                TaskMessage,
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
            return self._dispatch_new(task, span.traceparent, countdown)

    async def _dispatch_room(self) -> None:
        """Wait until fewer than :data:`MAX_DISPATCHING` dispatches await their confirm.
        Submissions can come faster than they are dispatched (a capability with no worker
        takes one message per task), and each waits in memory until its dispatch is
        confirmed. Called before a submission is decoded; from there to its dispatch nothing
        awaits, so no two submissions take the same room."""
        while self._dispatching >= MAX_DISPATCHING:
            self._dispatch_freed.clear()
            await self._dispatch_freed.wait()

    async def _accept_synced(self, accept: Callable[[], asyncio.Future[Any] | None]) -> None:
        await self._synced()
        done = accept()
        if done is not None:
            await done

    async def _accept_warm(
        self, task_id: str, accept: Callable[[], asyncio.Future[Any] | None]
    ) -> None:
        await self._find(task_id)
        done = accept()
        if done is not None:
            await done

    def _dispatch_again(self, record: TaskRecord, task: TaskMessage) -> asyncio.Future[None]:
        record.since = self._since()
        done = record.dispatching = self.outbox.dispatch_nowait(task, record.traceparent)

        def dispatched(fut: asyncio.Future[None]) -> None:
            if record.dispatching is fut:
                record.dispatching = None
            if not fut.cancelled() and fut.exception() is None:
                record.owner = self.scheduler_id
                self.metrics.of(task.capability).dispatched.inc()

        done.add_done_callback(dispatched)
        return done

    def _dispatch_new(
        self, task: TaskMessage, traceparent: str | None, countdown: Countdown | None = None
    ) -> asyncio.Future[None] | None:
        """Dispatch a new task. Returns the future done once it is confirmed; with
        ``countdown`` (a batch's tasks), None: the countdown waits for it."""
        own = countdown is None
        if countdown is None:
            countdown = Countdown()
        finished = countdown.add()
        record = TaskRecord.of(
            task, traceparent=traceparent, owner=self.scheduler_id, since=self._since()
        )
        self.store.add(record)
        # A second submission of it waits for this one's (shared with the batch's others).
        dispatching = record.dispatching = countdown.future
        self._dispatching += 1

        def dispatched(exc: BaseException | None) -> None:
            if record.dispatching is dispatching:
                record.dispatching = None
            self._dispatching -= 1
            if self._dispatching < MAX_DISPATCHING:
                self._dispatch_freed.set()
            if exc is not None:
                if self.store.get(task.task_id) is record and not record.final:
                    self.store.forget(task.task_id)  # the redelivery starts afresh
            else:
                if record.state == TaskState.QUEUED:
                    record.state = TaskState.DISPATCHED
                self.store.cool_one(record)
                counters = self.metrics.of(task.capability)
                counters.submitted.inc()
                counters.dispatched.inc()
            finished(exc)

        self.outbox.dispatch_then(task, traceparent, dispatched)
        return countdown.seal() if own else None

    async def _query(self, kind: Kind, query: TaskQuery, reply_to: str, corr: str) -> None:
        record = await self._find(query.task_id)
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

    async def _outcome_or_timeout(self, record: TaskRecord, timeout: float) -> None:
        """Return once ``record`` is answered, or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        if not record.final:
            waiter = self._answered_waiters.setdefault(
                record.task_id, asyncio.get_running_loop().create_future()
            )
            await asyncio.wait([waiter], timeout=timeout)
            if self._answered_waiters.get(record.task_id) is waiter:
                del self._answered_waiters[record.task_id]
        if record.answering is not None:  # answered, the answer not confirmed yet
            await asyncio.wait([record.answering], timeout=max(deadline - time.monotonic(), 0))

    async def _cancel(self, task_id: str, reply_to: str, corr: str) -> None:
        record = await self._find(task_id)
        if record is not None and not record.final:
            now = time.time()
            self._cancels[task_id] = record.deadline
            await self.journal.append(cancelled(task_id, record.deadline))
            # Workers first: a queued task must be skipped, a running one stopped.
            await self.outbox.cancel_notice([task_id], record.deadline)
            if not record.final and record.task is not None and record.task.direct:
                # Its worker may have answered the client itself already (section 16), the
                # outcome not consumed here yet: that outcome, not `cancelled`, is the answer.
                await self._outcome_or_timeout(record, CANCEL_GRACE)
            if not record.final:  # its outcome may have come in meanwhile
                answer = failure(record, ErrorType.CANCELLED, "the task was cancelled", now)
                await self._finish(record, answer, now)
                log.info("task %s cancelled", task_id)
        await self._status_reply(task_id, record, reply_to, corr)
