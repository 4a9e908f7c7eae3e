"""The scheduler process: consumes ``tasks.submit``, dispatches by capability, tracks workers,
answers clients. Decisions live in ``registry`` and ``state``; this module moves messages."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from pydantic import BaseModel

from .. import transport
from ..errors import AmqpschedError, BrokerError, DecodeError
from ..protocol import (
    REQUEST_MODELS,
    Answer,
    CapabilitiesReply,
    ErrorInfo,
    ErrorType,
    Kind,
    OutcomeEvent,
    StartedEvent,
    Status,
    StatusReply,
    SubmitRequest,
    TaskMessage,
    TaskQuery,
    TaskState,
    WorkerAnnouncement,
    decode,
    encode,
)
from ..settings import Settings
from ..topology import Topology
from ..transport import IncomingMessage
from .registry import WorkerRegistry
from .state import MemoryTaskStore, TaskRecord, timeout_error

log = logging.getLogger("amqpsched.scheduler")


def _peek(raw: bytes) -> tuple[str | None, str | None]:
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


class Scheduler:
    """Use as ``async with Scheduler(settings) as s: await s.wait_stopped()``."""

    def __init__(self, settings: Settings, scheduler_id: str | None = None) -> None:
        self.settings = settings
        self.scheduler_id = scheduler_id or uuid.uuid4().hex[:12]
        self.topology = Topology(settings.namespace)
        self.registry = WorkerRegistry(settings.heartbeat_interval, settings.heartbeat_miss_limit)
        self.store = MemoryTaskStore(settings.result_retention, settings.max_tracked_tasks)
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._tasks_exchange: AbstractExchange | None = None
        self._default: AbstractExchange | None = None
        self._dlx: AbstractExchange | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()
        self._capability_locks: dict[str, asyncio.Lock] = {}
        self.consuming = False

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> Scheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._conn = await transport.connect(
            self.settings, f"amqpsched-scheduler-{self.scheduler_id}"
        )
        try:
            channel = await transport.confirm_channel(self._conn, self.settings.scheduler_prefetch)
            self._channel = channel
            topo = self.topology
            await topo.declare_core(channel)
            self._tasks_exchange = await channel.get_exchange(topo.tasks_exchange)
            self._dlx = await channel.get_exchange(topo.dead_letter_exchange)
            self._default = channel.default_exchange
            registry_queue = await topo.declare_registry_queue(channel, self.scheduler_id)
            await registry_queue.consume(self._on_announcement, no_ack=True)
            results = await channel.get_queue(topo.results_queue)
            await results.consume(self._on_event)
            submit = await channel.get_queue(topo.submit_queue)
            await submit.consume(self._on_request)
        except transport.BROKER_ERRORS as exc:
            await self._conn.close()
            raise BrokerError(f"scheduler could not set up its topology: {exc}") from exc
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="amqpsched-sweeper")
        self.consuming = True
        log.info(
            "scheduler %s consuming %s on %s",
            self.scheduler_id,
            self.topology.submit_queue,
            self.settings.amqp_url_masked(),
        )

    async def stop(self) -> None:
        self.consuming = False
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._conn is not None:
            await self._conn.close()
        self._stopped.set()
        log.info("scheduler %s stopped", self.scheduler_id)

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    @property
    def ready(self) -> bool:
        return self.consuming and self._conn is not None and not self._conn.is_closed

    # -- client requests -----------------------------------------------------------------------
    async def _on_request(self, msg: IncomingMessage) -> None:
        try:
            await self._handle_request(msg)
        except AmqpschedError as exc:
            # Broker trouble mid-handling: leave the message unacked so it is redelivered.
            log.warning("request %s not handled, will be redelivered: %s", msg.message_id, exc)
            await transport.settle(msg, requeue=True)
        except Exception:
            log.exception("unexpected error on request %s", msg.message_id)
            await self._reject(msg, "internal_error", "the scheduler failed on this message")

    async def _handle_request(self, msg: IncomingMessage) -> None:
        kind_name = msg.type or Kind.SUBMIT.value
        if len(msg.body) > self.settings.max_message_bytes:
            await self._reject(
                msg,
                "too_large",
                f"body is {len(msg.body)} bytes; the limit is {self.settings.max_message_bytes}",
            )
            return
        if kind_name not in (Kind.SUBMIT, Kind.STATUS, Kind.RESULT, Kind.CAPABILITIES):
            await self._reject(msg, "unknown_type", f"unknown message type {kind_name!r}")
            return
        kind = Kind(kind_name)
        model: type[BaseModel] = REQUEST_MODELS[kind]
        try:
            request: BaseModel = decode(model, msg.body)
        except DecodeError as exc:
            await self._reject(msg, exc.reason, exc.detail)
            return
        if not msg.reply_to:
            await self._reject(
                msg, "missing_reply_to", "the reply_to property is required", request=request
            )
            return
        corr = msg.correlation_id or ""
        if isinstance(request, SubmitRequest):
            await self._submit(msg, request, msg.reply_to, corr)
        elif isinstance(request, TaskQuery):
            await self._query(kind, request, msg.reply_to, corr)
            await transport.settle(msg)
        else:
            reply = CapabilitiesReply(capabilities=self.registry.catalog())
            await self._send(msg.reply_to, corr, Kind.CAPABILITIES_REPLY, encode(reply))
            await transport.settle(msg)

    async def _submit(
        self, msg: IncomingMessage, req: SubmitRequest, reply_to: str, corr: str
    ) -> None:
        timeout = req.timeout or self.settings.default_timeout
        if timeout > self.settings.max_timeout:
            await self._reject(
                msg,
                "timeout_too_large",
                f"timeout {timeout} exceeds the maximum {self.settings.max_timeout}",
                request=req,
            )
            return
        task_id = req.task_id or uuid.uuid4().hex
        known = self.store.get(task_id)
        if known is not None:
            # Same task id again (a redelivery or a client retry): never a second execution.
            if known.answer is not None:
                await self._send(reply_to, corr, Kind.ANSWER, encode(known.answer))
            elif (reply_to, corr) != (known.reply_to, known.correlation_id):
                known.watchers.append((reply_to, corr))
            await transport.settle(msg)
            return
        now = time.time()
        record = TaskRecord(
            task_id=task_id,
            capability=req.capability,
            reply_to=reply_to,
            correlation_id=corr,
            submitted_at=now,
            deadline=now + timeout,
        )
        self.store.add(record)
        task = TaskMessage(
            task_id=task_id,
            capability=req.capability,
            payload=req.payload,
            attempt=1,
            submitted_at=now,
            deadline=record.deadline,
            reply_to=reply_to,
            correlation_id=corr,
        )
        await self._ensure_capability(req.capability)
        assert self._tasks_exchange is not None
        await transport.publish(
            self._tasks_exchange,
            transport.message(encode(task), Kind.TASK, message_id=task_id, correlation_id=corr),
            req.capability,
            mandatory=True,
        )
        if record.state == TaskState.QUEUED:
            record.state = TaskState.DISPATCHED
        await transport.settle(msg)
        log.debug("task %s (%s) dispatched", task_id, req.capability)

    async def _ensure_capability(self, capability: str) -> None:
        if self.topology.capability_declared(capability):
            return
        lock = self._capability_locks.setdefault(capability, asyncio.Lock())
        async with lock:
            if not self.topology.capability_declared(capability):
                assert self._channel is not None
                try:
                    await self.topology.declare_capability(self._channel, capability)
                except transport.BROKER_ERRORS as exc:
                    raise BrokerError(f"cannot declare queue for {capability!r}: {exc}") from exc

    async def _query(self, kind: Kind, query: TaskQuery, reply_to: str, corr: str) -> None:
        record = self.store.get(query.task_id)
        if kind == Kind.RESULT and record is not None:
            if record.answer is not None:
                await self._send(reply_to, corr, Kind.ANSWER, encode(record.answer))
            else:
                record.watchers.append((reply_to, corr))
            return
        reply = StatusReply(
            task_id=query.task_id,
            state=record.state if record else TaskState.UNKNOWN,
            capability=record.capability if record else None,
            attempts=record.attempts if record else 0,
            answer=record.answer if record else None,
        )
        await self._send(reply_to, corr, Kind.STATUS_REPLY, encode(reply))

    # -- worker events -------------------------------------------------------------------------
    async def _on_event(self, msg: IncomingMessage) -> None:
        try:
            if msg.type == Kind.STARTED:
                started = decode(StartedEvent, msg.body)
                record = self.store.get(started.task_id)
                if record is not None and not record.final:
                    record.state = TaskState.RUNNING
                    record.attempts = max(record.attempts, started.attempt)
                await transport.settle(msg)
            elif msg.type == Kind.OUTCOME:
                await self._on_outcome(msg, decode(OutcomeEvent, msg.body))
            else:
                await self._reject(msg, "unknown_type", f"unknown event type {msg.type!r}")
        except DecodeError as exc:
            await self._reject(msg, exc.reason, exc.detail)
        except AmqpschedError as exc:
            log.warning("event %s not handled, will be redelivered: %s", msg.message_id, exc)
            await transport.settle(msg, requeue=True)
        except Exception:
            log.exception("unexpected error on event %s", msg.message_id)
            await self._reject(msg, "internal_error", "the scheduler failed on this event")

    async def _on_outcome(self, msg: IncomingMessage, ev: OutcomeEvent) -> None:
        record = self.store.get(ev.task_id)
        if record is not None and record.final:
            log.debug("late outcome for answered task %s dropped", ev.task_id)
            await transport.settle(msg)
            return
        now = time.time()
        answer = Answer(
            task_id=ev.task_id,
            status=ev.status,
            capability=ev.capability,
            result=ev.result,
            error=ev.error,
            attempts=max(ev.attempt, record.attempts if record else 0),
            worker_id=ev.worker_id,
            submitted_at=ev.submitted_at,
            finished_at=ev.finished_at,
        )
        targets = [(ev.reply_to, ev.correlation_id)]
        if record is not None:
            targets += record.watchers
        else:  # a scheduler that restarted: remember it for later queries
            record = TaskRecord(
                task_id=ev.task_id,
                capability=ev.capability,
                reply_to=ev.reply_to,
                correlation_id=ev.correlation_id,
                submitted_at=ev.submitted_at,
                deadline=ev.finished_at,
            )
        body = encode(answer)
        await asyncio.gather(*(self._send(r, c, Kind.ANSWER, body) for r, c in targets))
        self.store.finish(record, answer, now)
        await transport.settle(msg)
        log.info(
            "task %s %s (%s) attempt %d on %s",
            ev.task_id,
            ev.status.value,
            ev.capability,
            ev.attempt,
            ev.worker_id,
        )

    async def _on_announcement(self, msg: IncomingMessage) -> None:
        try:
            announcement = decode(WorkerAnnouncement, msg.body)
            kind = (
                Kind(msg.type) if msg.type in (Kind.HELLO, Kind.HEARTBEAT, Kind.GOODBYE) else None
            )
        except DecodeError as exc:
            log.warning("bad worker announcement dropped: %s", exc)
            return
        if kind is None:
            log.warning("worker announcement of unknown type %r dropped", msg.type)
            return
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
        for worker_id in self.registry.sweep(now):
            log.warning("worker %s missed its heartbeats; declared dead", worker_id)
        due = self.store.due(now)
        if due:
            await asyncio.gather(*(self._expire(record, now) for record in due))
        self.store.purge(now)

    async def _expire(self, record: TaskRecord, now: float) -> None:
        error_type = timeout_error(self.registry.has_live(record.capability))
        message = (
            f"no live worker offers {record.capability!r}"
            if error_type == ErrorType.NO_WORKER
            else f"no worker started the task within its timeout ({record.capability!r})"
        )
        answer = Answer(
            task_id=record.task_id,
            status=Status.FAILED,
            capability=record.capability,
            error=ErrorInfo(type=error_type, message=message),
            attempts=record.attempts,
            submitted_at=record.submitted_at,
            finished_at=now,
        )
        targets = [(record.reply_to, record.correlation_id), *record.watchers]
        self.store.finish(record, answer, now)
        body = encode(answer)
        await asyncio.gather(*(self._send(r, c, Kind.ANSWER, body) for r, c in targets))
        log.info("task %s failed: %s", record.task_id, error_type.value)

    # -- output --------------------------------------------------------------------------------
    async def _send(self, reply_to: str, corr: str, kind: Kind, body: bytes) -> None:
        assert self._default is not None
        await transport.publish(
            self._default,
            transport.message(body, kind, correlation_id=corr, persistent=True),
            reply_to,
        )

    async def _reject(
        self, msg: IncomingMessage, reason: str, detail: str, request: Any = None
    ) -> None:
        """Dead-letter ``msg`` with its reason, answer ``invalid_request`` where we can, ack."""
        task_id, capability = _peek(msg.body) if request is None else (None, None)
        task_id = getattr(request, "task_id", task_id)
        capability = getattr(request, "capability", capability)
        assert self._dlx is not None
        await transport.publish(
            self._dlx,
            transport.dead_letter_message(
                msg,
                reason=reason,
                error=detail,
                source="scheduler",
                capability=capability,
                task_id=task_id,
            ),
            "",
        )
        if msg.reply_to:
            answer = Answer(
                task_id=task_id,
                status=Status.FAILED,
                capability=capability,
                error=ErrorInfo(type=ErrorType.INVALID_REQUEST, message=f"{reason}: {detail}"),
                finished_at=time.time(),
            )
            await self._send(msg.reply_to, msg.correlation_id or "", Kind.ANSWER, encode(answer))
        await transport.settle(msg)
        log.warning("rejected message %s: %s: %s", msg.message_id, reason, detail)
