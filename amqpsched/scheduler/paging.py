"""Waiting tasks kept cold (``cold.py``): read back from the journal when the scheduler needs
them whole again: a query, a cancel, a second submission, a worker's event, their deadline, or
workers taking the tasks kept whole."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .. import tracing
from ..errors import AmqpschedError, BrokerError
from ..protocol import TaskState
from .base import SchedulerBase
from .cold import BATCH_REPLY, RECOVERED, ColdEntry, id_hash
from .journal import read_dispatches
from .recovery import journaled_tasks
from .state import TaskRecord

log = logging.getLogger("amqpsched.scheduler")

#: Cold tasks read back from the journal at once.
PAGE = 2000


class Paging(SchedulerBase):
    #: Cold tasks being read back (by id hash) -> done once they are.
    _paging: dict[int, asyncio.Future[None]]
    #: Cold tasks asked for while a read ran: read back together next.
    _wanted: list[ColdEntry]
    _next_page: asyncio.Future[None] | None
    _pager: asyncio.Future[None] | None

    def _since(self) -> int:
        """A journal offset at or before every entry this scheduler writes from now on (-1:
        not known: its tasks stay whole)."""
        return self._reader.offset if self._reader is not None else -1

    async def _find(self, task_id: str) -> TaskRecord | None:
        """The record of ``task_id``, read back from the journal if it is kept cold."""
        record = self.store.get(task_id)
        if record is not None or not (len(self.store.cold) or self._paging):
            return record
        pending = self._paging.get(id_hash(task_id))
        if pending is None:
            entry = self.store.cold.pop(task_id)
            if entry is None:
                return None
            pending = self._want(entry)
        await asyncio.wait([pending])
        if task_id in self.store.cold:  # kept cold again: the journal could not be read
            raise BrokerError(f"task {task_id} could not be read back from the journal")
        return self.store.get(task_id)

    def _want(self, entry: ColdEntry) -> asyncio.Future[None]:
        """Read ``entry`` back with the others wanted meanwhile: one read of the journal for
        all that were asked for while the last read ran. Done once it is read back."""
        self._wanted.append(entry)
        if self._next_page is None:
            self._next_page = asyncio.get_running_loop().create_future()
        self._paging[entry.hash] = self._next_page
        if self._pager is None or self._pager.done():
            self._pager = asyncio.ensure_future(self._read_wanted())
        return self._next_page

    async def _read_wanted(self) -> None:
        while self._wanted:
            batch, self._wanted = self._wanted, []
            done, self._next_page = self._next_page, None
            try:
                await self._page_in(batch)
            except AmqpschedError as exc:
                log.warning("could not read %d cold task(s) back: %s", len(batch), exc)
            except Exception:
                log.exception("reading cold tasks back failed")
            finally:
                if done is not None and not done.done():
                    done.set_result(None)

    async def _warm(self, task_id: str) -> None:
        """Make sure ``task_id`` is not kept cold (an event about it is to be applied)."""
        if self.store.get(task_id) is None and (len(self.store.cold) or self._paging):
            await self._find(task_id)

    def _warm_then(self, task_id: str, apply: Callable[[], None]) -> None:
        """``apply`` (an event about ``task_id``) once the task is not kept cold."""
        if self.store.get(task_id) is not None or not (len(self.store.cold) or self._paging):
            apply()
            return

        async def warm_then() -> None:
            try:
                await self._warm(task_id)
            except AmqpschedError as exc:  # it stays cold: the event says little a read won't
                log.warning("event of %s not applied: %s", task_id, exc)
                return
            apply()

        task = asyncio.ensure_future(warm_then())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _cold_id(self, task_id: str | None, key: str | None, now: float) -> str | None:
        """The id of the task a submission names (by id or idempotency key), if it is cold."""
        if not (len(self.store.cold) or self._paging):
            return None
        for known in (task_id, key and self.store.key_task(key, now)):
            if (
                known
                and self.store.get(known) is None
                and (known in self.store.cold or id_hash(known) in self._paging)
            ):
                return known
        return None

    async def _page_in(self, entries: list[ColdEntry]) -> int:
        """Read back the records of ``entries`` (taken out of the cold store) from their
        dispatches in the journal. Returns how many were found; the rest are logged and
        counted: nothing more is known of them. Failing to read: they are kept cold again."""
        if not entries:
            return 0
        assert self._conn is not None
        wanted = {e.hash: e for e in entries}
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for h in wanted:
            self._paging.setdefault(h, done)
        found = 0

        def take(kind: str, body: bytes, origin: str | None, offset: int, headers: Any) -> bool:
            nonlocal found
            for task in journaled_tasks(kind, body):
                entry = wanted.get(id_hash(task.task_id))
                if entry is None or offset < entry.since:
                    continue
                del wanted[entry.hash]
                found += 1
                if self.store.get(task.task_id) is None:  # not answered meanwhile
                    self.store.add(
                        TaskRecord.of(
                            task,
                            state=TaskState.DISPATCHED,
                            recovered=bool(entry.flags & RECOVERED),
                            batch_reply=bool(entry.flags & BATCH_REPLY),
                            owner=origin,
                            since=entry.since,
                            traceparent=tracing.from_headers(headers),
                        )
                    )
            return not wanted

        try:
            await read_dispatches(self._conn, self.topology, min(e.since for e in entries), take)
        except BaseException:
            for entry in wanted.values():
                self.store.cold.restore(entry)
            wanted.clear()
            raise
        finally:
            for h in [e.hash for e in entries]:
                self._paging.pop(h, None)
            done.set_result(None)
        self.metrics.read_back.inc(found)
        if wanted:
            self.metrics.cold_missing.inc(len(wanted))
            log.error(
                "%d waiting task(s) kept cold were not found in the journal: forgotten", len(wanted)
            )
        return found

    async def _tend_cold(self, now: float) -> None:
        """Keep at most ``max_waiting_records`` waiting tasks whole; read back the cold ones
        that are due. (Workers taking cold tasks need none read back: an outcome carries what
        its answer needs, and a ``started`` event reads its task back.)"""
        if self._reader is None:
            return
        self.store.cool()
        if len(self.store.cold):
            await self._page_in(self.store.cold.due(now, PAGE))
