"""The scheduler process: consumes ``tasks.submit``, dispatches by capability, tracks workers,
answers clients. Decisions live in ``registry``, ``state`` and ``peers``; the parts that move
messages are ``requests`` (clients), ``events`` (workers), ``timers`` (its own clock) and
``answers`` (the final answer to a task), over the state declared in ``base``. This module puts
them together, starts and stops them, and follows the journal."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from .. import transport
from ..errors import AmqpschedError, BrokerError
from ..metrics import RegistryCollector, SchedulerMetrics
from ..protocol import (
    Answer,
    Kind,
    RetryingEvent,
    StartedEvent,
    decode_event,
)
from ..settings import Settings
from ..topology import Topology
from .events import Events
from .journal import Journal, JournalReader
from .outbox import Outbox
from .peers import Peers
from .readback import Unread
from .recovery import apply_entry, journaled_answers
from .registry import WorkerRegistry
from .requests import Requests
from .state import MemoryTaskStore
from .timers import Timers

log = logging.getLogger("amqpsched.scheduler")


class Scheduler(Requests, Events, Timers):
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
            settings.result_retention,
            settings.max_tracked_tasks,
            settings.idempotency_window,
            hot_limit=settings.max_waiting_records,
            # A cold task is read back from its dispatch: it must outlive the task's wait.
            cold_span=settings.journal_retention * 0.9,
            max_result_bytes=settings.max_result_bytes,
        )
        self._paging = {}
        self._wanted = []
        self._next_page = None
        self._pager = None
        self._dispatching = 0
        self._dispatch_freed = asyncio.Event()
        self.metrics.cold.set_function(lambda: len(self.store.cold))
        self.metrics.result_bytes.set_function(lambda: self.store.result_bytes)
        self._shed_seen = 0
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
        self._unsure_to: dict[str, list[tuple[str, str]]] = {}
        self._answered_waiters: dict[str, asyncio.Future[None]] = {}
        #: Other schedulers running side by side (known from the journal they all follow).
        self.peers = Peers(self.scheduler_id, self.registry.liveness_window)
        self._reader: JournalReader | None = None
        self._channel: AbstractChannel | None = None
        self._refusals = transport.Refusals()
        self._background: set[asyncio.Future[None]] = set()
        self._alive_at = 0.0
        #: Cut off from the broker at the last sweep: workers' heartbeats could not arrive.
        self._offline = False
        self._journal_check: tuple[float, asyncio.Future[dict[str, Answer]]] | None = None
        #: Answers sent and not yet confirmed: task id -> (when, answer); journaled on their own
        #: if the confirm is late.
        self._answering: dict[str, tuple[float, Answer]] = {}
        self._unsure_check: asyncio.Future[None] | None = None
        self._unread = Unread()
        self._syncs: dict[bytes, asyncio.Future[None]] = {}
        self._syncs_sent = 0
        self._running_sync: asyncio.Future[None] | None = None
        self._next_sync: asyncio.Future[None] | None = None
        self.consuming = False
        self.fenced = 0
        self.metrics.registry.register(
            RegistryCollector(self._worker_snapshot, self.store.open_counts)
        )

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
            await topo.declare_journal(channel, self.settings.journal_retention)
            self._outbox = Outbox(
                channel,
                topo,
                self.metrics.dead_lettered,
                self.registry.batch_limit,
                self.metrics.tasks_per_message,
                self.scheduler_id,
            )
            self._outbox.unread = self._unread
            transport.on_reconnect(self._conn, self.metrics.reconnects.inc)
            conn = self._conn
            # Journal records on a channel of their own, replaced when a write is not confirmed.
            self._journal = Journal(
                await transport.confirm_channel(conn),
                topo,
                self.scheduler_id,
                new_channel=lambda: transport.confirm_channel(conn),
            )
            self._journal.unread = self._unread
            # Read the journal to its end, then go on following it: what other schedulers
            # dispatch, answer and cancel is known here too.
            recovered = await self._follow_journal()
            await self._alive()
            if recovered:
                log.info("recovered %d journal record(s), %d task(s)", recovered, len(self.store))
            registry_queue = await topo.declare_registry_queue(channel, self.scheduler_id)
            await transport.consume_bodies(registry_queue, self._on_announcement)
            results = await channel.get_queue(topo.results_queue)
            await results.consume(self._on_event)
            # Submissions on a channel of their own, with a prefetch of their own: a
            # `submit_batch` holds up to 256 tasks, and what is prefetched waits in memory.
            requests = await transport.confirm_channel(conn, self.settings.submit_prefetch)
            submit = await requests.get_queue(topo.submit_queue)
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

    def _apply_entry(self, kind: str, body: bytes, origin: str | None) -> None:
        """A journal entry, at start or written since by another scheduler."""
        if origin == self.scheduler_id:
            self._unread.read(body)  # it is stored (see readback)
            if self._syncs and kind == "record":
                self._read_back(body)
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
            offset = self._reader.offset if self._reader is not None else -1
            apply_entry(self.store, self._cancels, kind, body, origin, offset)
            self.store.cool()  # a restart that reads a million waiting tasks keeps them cold
        else:
            record = json.loads(body)
            k = record.get("k")
            if k == "alive":
                self.peers.seen(record["s"], record["at"])
            elif k == "gone":
                self.peers.gone(record["s"])
            elif k == "started":
                started = decode_event(StartedEvent, record["event"].encode())
                self._warm_then(started.task_id, lambda: self._on_started(started, False))
            elif k == "retrying":
                retrying = decode_event(RetryingEvent, record["event"].encode())
                self._warm_then(retrying.task_id, lambda: self._on_retrying(retrying, False))
            else:
                apply_entry(self.store, self._cancels, kind, body)

    @property
    def ready(self) -> bool:
        return self.consuming and self._conn is not None and transport.is_connected(self._conn)
