"""What the scheduler does on its own clock: declare dead workers and re-dispatch their tasks,
expire tasks nobody started in time, say it is alive in the journal."""

from __future__ import annotations

import asyncio
import logging
import time

from .. import transport
from ..errors import AmqpschedError
from ..protocol import (
    ErrorType,
    TaskState,
)
from .answers import Answering
from .base import UNSURE_KEEP
from .outbox import failure
from .state import TaskRecord, timeout_error

log = logging.getLogger("amqpsched.scheduler")


class Timers(Answering):
    async def _alive(self) -> None:
        """Tell the other schedulers this one is alive (a journal record)."""
        now = time.time()
        self._alive_at = now
        await self.journal.append({"k": "alive", "s": self.scheduler_id, "at": now})

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
        # Read back the cold tasks that are due, or that workers are about to take.
        await self._tend_cold(now)
        # After a start, give workers one liveness window to be heard before telling
        # "no worker" from "expired".
        due = self.store.due(now) if now > self._started_at + self.registry.liveness_window else []
        due = [r for r in due if self._runs_timers(r, now)]
        if due:
            await asyncio.gather(*(self._expire(record, now) for record in due))
        self._cancels = {k: v for k, v in self._cancels.items() if v > now}
        self._unsure = {k: v for k, v in self._unsure.items() if v > now - UNSURE_KEEP}
        self._copy_late_answers(now)
        self._rewrite_lost()
        if now >= self._alive_at + self.settings.heartbeat_interval:
            await self._alive()
        self.peers.forget_old(now, UNSURE_KEEP)
        self.store.purge(now)
        self.store.fit()
        shed = self.store.shed - self._shed_seen
        if shed:
            self._shed_seen = self.store.shed
            self.metrics.results_shed.inc(shed)
            log.warning(
                "%d answered task(s) forgotten before their retention ended, to keep results "
                "within AMQPSCHED_MAX_RESULT_BYTES (%d)",
                shed,
                self.settings.max_result_bytes,
            )

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
