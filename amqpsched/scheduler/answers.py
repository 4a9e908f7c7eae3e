"""The one final answer to a task: sent and journaled by one publish, sent again on its own when
refused, looked for in the journal when it may or may not have gone out."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from .. import transport
from ..batching import Countdown, follow
from ..errors import BrokerError
from ..protocol import (
    RESENT_HEADER,
    Answer,
    Kind,
    encode,
)
from .base import (
    ANSWER_GRACE,
    REQUEUE_PAUSE,
    RESEND_ATTEMPTS,
    SYNC_POLL,
    SYNC_TIMEOUT,
    UNSURE_MARGIN,
    UNSURE_RECHECK,
    log_failure,
)
from .journal import replay
from .paging import Paging
from .recovery import apply_answer, journaled_answers
from .state import TaskRecord

log = logging.getLogger("amqpsched.scheduler")


class Answering(Paging):
    def _apply_answer(self, answer: Answer) -> None:
        """Another scheduler answered: remember it, and send it to who asked here."""
        record = self.store.get(answer.task_id) if answer.task_id else None
        watchers = list(record.watchers) if record is not None and not record.final else []
        apply_answer(self.store, answer)
        self._unsure.pop(answer.task_id or "", None)
        self._unsure_to.pop(answer.task_id or "", None)
        if watchers and record is not None and record.final:
            body = encode(answer)
            for reply_to, corr in watchers:
                sent = asyncio.ensure_future(self.outbox.send(reply_to, corr, Kind.ANSWER, body))
                sent.add_done_callback(log_failure)

    def _went_out(self, answer: Answer) -> None:
        """An answer this scheduler was unsure of is in the journal: it went out. Its client
        may not have it (a refused publish can reach the journal and not the reply queue, and
        the other schedulers, which read it, will not send it): it is sent to them again,
        marked ``RESENT_HEADER``. A client that had it already keeps the first (protocol
        section 12)."""
        task_id = answer.task_id or ""
        self._unsure.pop(task_id, None)
        targets = self._unsure_to.pop(task_id, [])
        record = self.store.get(task_id)
        if record is not None and not record.final and record.answering is None:
            self.store.finish(record, answer, answer.finished_at or time.time())
            body = encode(answer)
            for reply_to, corr in targets:
                sent = self.outbox.send(
                    reply_to, corr, Kind.ANSWER, body, record.traceparent, {RESENT_HEADER: True}
                )
                asyncio.ensure_future(sent).add_done_callback(log_failure)
            log.info(
                "answer of %s found in the journal: it went out; sent again to %d client(s)",
                task_id,
                len(targets),
            )

    def _check_unsure_soon(self) -> None:
        if self._unsure_check is None or self._unsure_check.done():
            self._unsure_check = asyncio.ensure_future(self._check_unsure())

    async def _check_unsure(self, wait: float = 60.0) -> None:
        """Look in the journal for the answers this scheduler is unsure of, once connected
        again, until each is found or ``wait`` seconds have passed since the latest became
        unsure (or since the reconnect). Their outcomes are redelivered, maybe to another
        scheduler, which finds the answer in the journal and drops them: without this, one
        that went out would stay unanswered here (a stale status, and a task run again should
        its worker die). A copy can be stored late (a stream leader moving): one not found is
        looked for again, less and less often; one never found is answered by its outcome,
        redelivered."""
        assert self._conn is not None
        pause, read_after, since = REQUEUE_PAUSE, float("-inf"), time.time()
        while self._unsure and time.time() < max(since, *self._unsure.values()) + wait:
            await asyncio.sleep(pause)
            pause = min(2 * pause, UNSURE_RECHECK)
            if not self._unsure:  # found meanwhile, as the journal was followed
                break
            if not transport.is_connected(self._conn):
                # Looked for soon after the reconnect; the time to look counts from then.
                pause, since = REQUEUE_PAUSE, time.time()
                continue
            try:  # a read that began before the latest failure, or the last look, is no news
                found = await self._answers_in_journal(
                    max(max(self._unsure.values(), default=0.0), read_after)
                )
            except Exception as exc:  # looked for again
                log.warning("could not look for unsure answers in the journal: %s", exc)
                continue
            read_after = time.time()
            for task_id in list(self._unsure):
                if task_id in found:
                    self._went_out(found[task_id])

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

    async def _synced(self) -> None:
        """Return once this scheduler has read what the journal stored before now (see
        :meth:`_sync`). Callers that come while a sync runs share the next one: a batch of
        redelivered messages (after a scheduler or a broker node failed) makes one sync per
        sync time, not one per task."""
        if self._next_sync is None:
            self._next_sync = asyncio.ensure_future(self._sync_after(self._running_sync))
        await asyncio.shield(self._next_sync)

    async def _sync_after(self, running: asyncio.Future[None] | None) -> None:
        if running is not None:
            await asyncio.wait([running])  # it began before this one's callers came
        self._running_sync, self._next_sync = self._next_sync, None
        await self._sync()

    async def _sync(self) -> None:
        """Return once this scheduler has read what the journal stored before now (a record of
        its own, appended now, has come back), and what the other live schedulers write again
        of it (see :mod:`.readback`): each finds a write the journal lost once it reads a later
        one of its own back, so each has journaled ``alive`` a heartbeat interval after now.
        At most ``SYNC_TIMEOUT`` plus two heartbeat intervals."""
        began, interval = time.time(), self.settings.heartbeat_interval
        deadline = time.monotonic() + SYNC_TIMEOUT + 2 * interval
        self._syncs_sent += 1
        record = {"k": "sync", "s": self.scheduler_id, "n": self._syncs_sent}
        line = json.dumps(record, separators=(",", ":")).encode()  # as the journal writes it
        back = self._syncs[line] = asyncio.get_running_loop().create_future()
        try:
            await self.journal.append(record)
            await asyncio.wait_for(back, deadline - time.monotonic())
            while self.peers.behind(began + interval, time.time()):
                if time.monotonic() > deadline:
                    raise TimeoutError
                await asyncio.sleep(SYNC_POLL)
        except TimeoutError:
            log.warning("journal not read up to now in time: going on")
        finally:
            self._syncs.pop(line, None)

    def _read_back(self, line: bytes) -> None:
        """A JSON record of this scheduler came back from the journal."""
        back = self._syncs.get(line)
        if back is not None and not back.done():
            back.set_result(None)

    async def _finish(self, record: TaskRecord, answer: Answer, now: float) -> None:
        """Send the one final answer to the submitter and every watcher, then remember it."""
        done = self._finish_nowait(record, answer, now)
        assert done is not None  # no countdown given: its own future
        await done

    def _finish_nowait(
        self,
        record: TaskRecord,
        answer: Answer,
        now: float,
        direct: tuple[str, str] | None = None,
        countdown: Countdown | None = None,
    ) -> asyncio.Future[Any] | None:
        """``direct``: the (reply-to, correlation id) the worker answered itself; the answer is
        journaled, and sent to the others. Returns the future done once the answer is
        confirmed; with ``countdown`` (a batch's answers), None: the countdown waits for it."""
        own = countdown is None
        if countdown is None:
            countdown = Countdown()
        finished = countdown.add()
        targets = [(record.reply_to, record.correlation_id), *record.watchers]
        targets = [t for t in targets if t[0] and t != direct]
        state, watchers, task = record.state, list(record.watchers), record.task
        self.store.finish(record, answer, now)  # final at once for status queries
        if self._answered_waiters:
            waiter = self._answered_waiters.pop(record.task_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        # Sent and journaled by one publish: after a crash, a restarted scheduler knows exactly
        # which answers went out. When a broker node fails, it is not all-or-nothing: a refused one
        # may be in the journal and not sent, or sent and not in the journal; one not confirmed
        # for long may be sent, with its journal copy held for good (RabbitMQ 3.10, a stream
        # leader moving). Refused: sent again on its own, then journaled on its own; late:
        # journaled on its own too (see sweep); neither: the journal tells whether it went out.
        batch_reply = record.batch_reply and direct is None
        # Not final until confirmed: shared with the batch's other answers (it waits for them).
        answering = record.answering = countdown.future
        self._answering[record.task_id] = (now, answer)

        def answered(exc: BaseException | None) -> None:
            self._answering.pop(record.task_id, None)
            if record.answering is answering:
                record.answering = None
            if exc is not None:
                self.store.reopen(record, state, watchers)  # the redelivery will answer it
                record.task = task
                # It may have gone out, or be in the journal (a refused publish may have reached
                # some of its destinations; sent again on its own, refused again): the other
                # schedulers take a journaled answer as final, so the journal is asked before
                # it is sent again, and looked for until found (see _check_unsure).
                self._unsure[record.task_id] = time.time()
                self._unsure_to[record.task_id] = targets
                self._check_unsure_soon()
                log.info("answer of %s not confirmed (%s): open again", record.task_id, exc)
            else:
                outcome = answer.error.type.value if answer.error else answer.status.value
                counters = self.metrics.of(record.capability)
                counters.finished(outcome).inc()
                if record.submitted_at:
                    counters.end_to_end.observe(max(now - record.submitted_at, 0.0))
            finished(exc)

        def published(exc: BaseException | None) -> None:
            if exc is not None and transport.refused(exc):
                self._refused()
                follow(asyncio.ensure_future(self._resend(targets, answer, record)), answered)
            else:
                answered(exc)

        self.outbox.answer_then(targets, answer, published, record.traceparent, batch_reply)
        return countdown.seal() if own else None

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
        copy.add_done_callback(log_failure)
        log.warning(
            "%d answer(s) not confirmed after %.0fs: journaled on their own",
            len(late),
            ANSWER_GRACE,
        )

    def _rewrite_lost(self) -> None:
        """Write again the journal writes confirmed but not stored (see :mod:`.readback`)."""
        lost = self._unread.lost(time.monotonic())
        if not lost:
            return
        for body, kind in lost:
            self._background.add(write := asyncio.ensure_future(self.journal.rewrite(body, kind)))
            write.add_done_callback(self._background.discard)
            write.add_done_callback(log_failure)
        log.warning(
            "%d journal write(s) confirmed but not in the journal: written again", len(lost)
        )
