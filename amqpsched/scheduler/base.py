"""What every part of the scheduler shares: its state (declared here, set up by
:class:`~amqpsched.scheduler.service.Scheduler`), the outbox and journal, refusals and
requeues, and the few helpers and constants the parts have in common."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from pydantic import BaseModel

from .. import transport
from ..errors import AmqpschedError
from ..metrics import SchedulerMetrics
from ..protocol import (
    Answer,
    Kind,
)
from ..settings import Settings
from ..topology import Topology
from ..transport import IncomingMessage
from .journal import Journal, JournalReader
from .outbox import Outbox
from .peers import Peers
from .readback import Unread
from .registry import WorkerRegistry
from .state import MemoryTaskStore

log = logging.getLogger("amqpsched.scheduler")


async def wait_all(pending: list[asyncio.Future[Any]]) -> None:
    """Wait for every one (not just until the first failure: none is left running when the
    message that caused them is handed back), then raise the first failure."""
    results = await asyncio.gather(*pending, return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise failed[0]


def log_failure(fut: asyncio.Future[None]) -> None:
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
#: Longest pause between two looks in the journal for an unsure answer not found yet.
UNSURE_RECHECK = 8.0
#: Seconds an answer may wait for its confirm before it is also journaled on its own.
ANSWER_GRACE = 3.0
#: Attempts to send again, on its own, an answer whose publish was refused.
RESEND_ATTEMPTS = 5
#: Seconds a scheduler waits for a record it journaled to come back from the journal.
SYNC_TIMEOUT = 10.0
#: Seconds between two looks at the other schedulers' latest ``alive`` records.
SYNC_POLL = 0.05


class SchedulerBase:
    """The scheduler's state, and what its parts share."""

    settings: Settings
    metrics: SchedulerMetrics
    scheduler_id: str
    topology: Topology
    registry: WorkerRegistry
    store: MemoryTaskStore
    peers: Peers
    consuming: bool
    fenced: int
    _conn: AbstractRobustConnection | None
    _outbox: Outbox | None
    _journal: Journal | None
    _reader: JournalReader | None
    _channel: AbstractChannel | None
    _started_at: float
    _sweeper: asyncio.Task[None] | None
    _stopped: asyncio.Event
    #: Cancelled task id -> deadline, re-announced to workers that say hello.
    _cancels: dict[str, float]
    #: Running tasks of workers declared dead -> that worker, until dispatched again.
    _orphans: dict[str, str]
    #: Tasks whose answer was sent but not confirmed (the broker went away) -> when: it may have
    #: gone out, so the journal is asked before answering them again.
    _unsure: dict[str, float]
    #: Those tasks -> who the answer was for (reply-to, correlation id): sent to them again
    #: once found in the journal, as a refused publish may have reached the journal alone.
    _unsure_to: dict[str, list[tuple[str, str]]]
    #: Tasks someone waits to see answered (a cancel: :meth:`Requests._outcome_or_timeout`).
    _answered_waiters: dict[str, asyncio.Future[None]]
    _unsure_check: asyncio.Future[None] | None
    _journal_check: tuple[float, asyncio.Future[dict[str, Answer]]] | None
    #: Answers sent and not yet confirmed: task id -> (when, answer); journaled on their own if
    #: the confirm is late.
    _answering: dict[str, tuple[float, Answer]]
    #: Its journal writes not read back yet: those confirmed but not stored are written again.
    _unread: Unread
    #: Records journaled to know when the journal is read up to them -> their future.
    _syncs: dict[bytes, asyncio.Future[None]]
    _syncs_sent: int
    #: The journal sync under way, and the one its late callers wait for (``_synced``).
    _running_sync: asyncio.Future[None] | None
    _next_sync: asyncio.Future[None] | None
    _refusals: transport.Refusals
    _background: set[asyncio.Future[None]]
    _alive_at: float
    #: Records the store had shed (``MemoryTaskStore.shed``) at the last sweep.
    _shed_seen: int
    #: Cut off from the broker at the last sweep: workers' heartbeats could not arrive.
    _offline: bool
    #: Tasks whose first dispatch awaits its confirm; set when that falls under the limit.
    _dispatching: int
    _dispatch_freed: asyncio.Event

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            raise AmqpschedError("scheduler is not started")
        return self._outbox

    @property
    def journal(self) -> Journal:
        if self._journal is None:
            raise AmqpschedError("scheduler is not started")
        return self._journal

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
        if self._refusals.refused(time.monotonic()):
            task = asyncio.ensure_future(self._replace_publishing_channel())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _replace_publishing_channel(self) -> None:
        assert self._conn is not None
        channel = await transport.replacement_channel(self._conn)
        if channel is None:
            return
        old = self.outbox.channel
        self.outbox.channel = channel
        await transport.retire(old, keep=self._channel)

    async def _share(self, kind: str, event: bytes) -> None:
        """With other schedulers alive, journal a worker's event so that they know it too (the
        task's owner runs its timers from it)."""
        if self.peers.others(time.time()):
            await self.journal.append({"k": kind, "event": event.decode()})

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
