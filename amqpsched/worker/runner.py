"""The worker process: consumes capability queues, runs handlers, reports outcomes, heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from .. import transport
from ..batching import Coalescer
from ..errors import AmqpschedError, BrokerError, ConfigurationError, DecodeError
from ..metrics import WorkerMetrics
from ..protocol import (
    BATCH_FEATURE,
    CancelNotice,
    Kind,
    WorkerAnnouncement,
    decode_event,
    encode,
)
from ..settings import Settings
from ..topology import Topology
from ..transport import IncomingMessage
from .app import Handler, WorkerApp
from .direct import Heartbeats
from .execution import Execution
from .reporting import Outcome
from .slots import Slots
from .started import StartClock

log = logging.getLogger("amqpsched.worker")


class Worker(Execution):
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
        self._pub: AbstractChannel | None = None
        self._refusals = transport.Refusals()
        self._replacing: set[asyncio.Future[None]] = set()
        self._events: AbstractExchange | None = None
        #: Where a direct answer is published (None: the broker has no replies exchange yet).
        self._replies: AbstractExchange | None = None
        self._registry: AbstractExchange | None = None
        self._consumers: list[tuple[AbstractQueue, str]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        #: Cancelled task id -> when the notice can be forgotten.
        self._cancelled: dict[str, float] = {}
        self._handler_tasks: dict[str, asyncio.Future[Any]] = {}
        self._start_clock = StartClock()
        self._welcomed = asyncio.Event()
        self._beats = Heartbeats(
            settings.heartbeat_interval, settings.heartbeat_miss_limit, time.time()
        )
        # Outcomes ready at the same moment go to the scheduler in one `outcome_batch`; one
        # that goes alone may go to its client too (the last item: its task, if it may).
        self._outcomes: Coalescer[Outcome] = Coalescer(
            self._send_outcomes, size=lambda item: len(item[2])
        )
        self.consuming = False
        self.executed = 0

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self._conn = await transport.connect(self.settings, f"amqpsched-worker-{self.worker_id}")
        try:
            channel = await transport.confirm_channel(self._conn, prefetch=self.concurrency)
            self._channel = self._pub = channel
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
        for replacing in list(self._replacing):
            replacing.cancel()
        if self._conn is not None:
            await self._conn.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped after %d task(s)", self.worker_id, self.executed)

    @property
    def ready(self) -> bool:
        return self.consuming and self._conn is not None and transport.is_connected(self._conn)

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
        msg = transport.message(body, kind, persistent=False)
        await self._publish(self._registry, msg, "", pauses=())  # the next one goes soon

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
