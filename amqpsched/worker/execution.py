"""How a worker takes a task and runs one attempt: slots, cancellation, deadlines, time limits,
the ``started`` notice, then the report."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
import traceback
from collections.abc import Awaitable
from concurrent.futures import Future
from random import random
from typing import Any, cast

from .. import logs, tracing, transport
from ..errors import AmqpschedError, DecodeError
from ..protocol import (
    ErrorInfo,
    ErrorType,
    Kind,
    OutcomeEvent,
    StartedEvent,
    TaskBatch,
    TaskMessage,
)
from ..retry import retry_delay
from ..transport import IncomingMessage
from .app import Handler, InvalidPayload, InvalidResult, to_json
from .decoding import decode_task
from .delivery import BatchDelivery, Delivery
from .reporting import Reporting

log = logging.getLogger("amqpsched.worker")


class Execution(Reporting):
    async def _on_task(self, msg: IncomingMessage) -> None:
        current = asyncio.current_task()
        if current is not None:
            self._running.add(current)
        try:
            await self._take(msg)
        finally:
            if current is not None:
                self._running.discard(current)

    async def _take(self, msg: IncomingMessage) -> None:
        if msg.type == Kind.TASK_BATCH:
            await self._take_batch(msg)
            return
        try:
            task = decode_task(TaskMessage, msg.body)
        except DecodeError as exc:
            await self._dead_letter(Delivery(msg), exc.reason, exc.detail)
            return
        await self._take_task(Delivery(msg), task, tracing.from_headers(msg.headers))

    async def _take_batch(self, msg: IncomingMessage) -> None:
        """Each task of a ``task_batch`` as if it had come alone, side by side."""
        try:
            batch = decode_task(TaskBatch, msg.body)
        except DecodeError as exc:
            await self._dead_letter(Delivery(msg), exc.reason, exc.detail)
            return
        if not batch.tasks:
            await transport.settle(msg)
            return
        hold = BatchDelivery(msg, len(batch.tasks))
        parents = batch.traceparents + [None] * (len(batch.tasks) - len(batch.traceparents))
        await asyncio.gather(
            *(
                self._take_task(hold.part(task), task, tracing.valid(parent))
                for task, parent in zip(batch.tasks, parents, strict=False)
            )
        )

    async def _take_task(
        self, delivery: Delivery, task: TaskMessage, traceparent: str | None
    ) -> None:
        if not await self._slots.acquire():  # False: the worker started draining
            await delivery.settle(requeue=True)  # draining: hand it back at once
            return
        self._in_flight += 1
        hold = _Hold()
        try:
            with logs.task_context(
                task.task_id, task.capability, task.attempt, self.worker_id, traceparent
            ):
                await self._execute(delivery, task, hold, traceparent)
        except AmqpschedError as exc:
            log.warning("task %s not reported, it will be redelivered: %s", task.task_id, exc)
            await delivery.settle(requeue=True)
        except asyncio.CancelledError:
            await delivery.settle(requeue=True)
            raise
        finally:
            self._free(hold)

    def _free(self, hold: _Hold) -> None:
        """Free the task's slot (once): when its handler is done, not its report. The next
        task runs while the outcome awaits its confirm, and outcomes ready together go
        together (the ack still waits for the confirm)."""
        if hold.freed:
            return
        hold.freed = True
        self._in_flight -= 1
        if hold.thread is None:
            self._slots.release()
        else:  # a sync handler past its limit still occupies a thread: keep its slot
            loop = asyncio.get_running_loop()
            hold.thread.add_done_callback(lambda _: loop.call_soon_threadsafe(self._slots.release))

    async def _execute(
        self, delivery: Delivery, task: TaskMessage, hold: _Hold, traceparent: str | None
    ) -> None:
        handler = self.handlers.get(task.capability)
        started_at = time.time()
        if task.task_id in self._cancelled:
            await self._report(delivery, task, None, _error(ErrorType.CANCELLED, "cancelled"))
            return
        if started_at > task.deadline:
            message = "the task's timeout passed before a worker could start it"
            await self._report(delivery, task, None, _error(ErrorType.EXPIRED, message))
            return
        if handler is None:  # only if a queue is shared with another app's capability
            await self._dead_letter(delivery, "no_handler", f"no handler for {task.capability!r}")
            return
        # `started` is sent only if the attempt is still running after STARTED_DELAY: a short
        # task's outcome says all it would (one message less per task, under load).
        attributes: dict[str, str | int] = {
            "amqpsched.task_id": task.task_id,
            "amqpsched.capability": task.capability,
            "amqpsched.attempt": task.attempt,
            "amqpsched.worker_id": self.worker_id,
        }
        with tracing.span(
            "amqpsched.execute", traceparent, kind=tracing.CONSUMER, attributes=attributes
        ) as span:
            # A new execute span's traceparent is the one logged and sent on from here.
            context = (
                logs.task_context(
                    task.task_id, task.capability, task.attempt, self.worker_id, span.traceparent
                )
                if span.traceparent != traceparent
                else contextlib.nullcontext()
            )
            with context:
                await self._execute_in_span(delivery, task, handler, started_at, hold, span)

    async def _execute_in_span(
        self,
        delivery: Delivery,
        task: TaskMessage,
        handler: Handler,
        started_at: float,
        hold: _Hold,
        span: tracing.Span,
    ) -> None:
        started = _StartNotice(self, task, started_at)
        try:
            error = await self._attempt(delivery, task, handler, started_at, hold, started)
            if error is not None:
                span.fail(f"{error.type.value}: {error.message}")
        finally:
            started.cancel()
            await started.wait()

    async def _attempt(
        self,
        delivery: Delivery,
        task: TaskMessage,
        handler: Handler,
        started_at: float,
        hold: _Hold,
        started: _StartNotice,
    ) -> ErrorInfo | None:
        """Run the handler once and report; return the attempt's error, if any."""
        built: tuple[OutcomeEvent, bytes] | None = None
        error: ErrorInfo | None = None
        limit = task.time_limit or handler.time_limit
        clock = time.monotonic()
        try:
            payload = handler.parse(task.payload)
            result = to_json(await self._run(task.task_id, handler, payload, limit, hold))
            built = self._outcome(task, started_at, None, result)
        except InvalidPayload as exc:
            error = _error(ErrorType.INVALID_PAYLOAD, str(exc))
        except InvalidResult as exc:
            error = _error(ErrorType.HANDLER_ERROR, str(exc), exc)
        except TimeoutError:
            error = _error(ErrorType.TIME_LIMIT, f"the attempt ran past its {limit}s time limit")
        except asyncio.CancelledError:
            if task.task_id not in self._cancelled:
                raise  # the worker is stopping: the task goes back to the queue
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                current.uncancel()  # the cancel notice's: this task goes on to report it
            error = _error(ErrorType.CANCELLED, "cancelled while running")
        except Exception as exc:
            error = _error(ErrorType.HANDLER_ERROR, str(exc) or repr(exc), exc)
        started.cancel()  # finished before `started` was due: the outcome tells it all
        self._free(hold)
        self.executed += 1
        self.metrics.execution_of(task.capability).observe(time.monotonic() - clock)
        if built is not None:
            await self._report(delivery, task, started_at, None, built)
            return None
        assert error is not None
        policy = task.retry.apply(handler.retry) if task.retry else handler.retry
        now = time.time()
        delay_ms = None
        if error.type != ErrorType.CANCELLED:
            delay_ms = retry_delay(policy, task.attempt, error.type, now, task.deadline, random())
        if delay_ms is None:
            if (
                error.type in policy.retry_on
                and policy.max_attempts > 1
                and error.type != ErrorType.CANCELLED
            ):
                # Retries exhausted (or no time left for one): keep it for `amqpsched dlq`.
                await self._dead_letter(
                    delivery,
                    "retries_exhausted",
                    f"{error.type.value}: {error.message}",
                    settle=False,
                    task=task,
                )
            await self._report(delivery, task, started_at, error)
        else:
            await self._retry(delivery, task, error, delay_ms, started_at)
        return error

    async def _run(
        self, task_id: str, handler: Handler, payload: Any, limit: float | None, hold: _Hold
    ) -> Any:
        call: asyncio.Future[Any]
        if handler.is_async:
            # Run in this task (no task of its own): a cancel notice cancels this one, and
            # _attempt takes the CancelledError as the cancel.
            current = asyncio.current_task()
            assert current is not None
            self._handler_tasks[task_id] = current
            try:
                if limit is None:  # no Timeout object for the many tasks without a limit
                    return await cast(Awaitable[Any], handler.func(payload))
                async with asyncio.timeout(limit):
                    return await cast(Awaitable[Any], handler.func(payload))
            finally:
                self._handler_tasks.pop(task_id, None)
        else:
            loop = asyncio.get_running_loop()
            # The handler's own log lines carry the task context: run it in a copy.
            thread = self._executor.submit(contextvars.copy_context().run, handler.func, payload)
            hold.thread = thread
            call = asyncio.wrap_future(thread, loop=loop)
        self._handler_tasks[task_id] = call
        try:
            return await asyncio.wait_for(call, limit)
        finally:
            self._handler_tasks.pop(task_id, None)
            if hold.thread is not None and hold.thread.done():
                hold.thread = None  # finished in time: its slot is free


class _StartNotice:
    """``started`` is sent only if the attempt still runs after STARTED_DELAY: a short task's
    outcome says all it would (one message less per task, and no task of its own until due)."""

    __slots__ = ("_clock", "_sending", "_started_at", "_task", "_worker")

    def __init__(self, worker: Execution, task: TaskMessage, started_at: float) -> None:
        self._worker = worker
        self._task = task
        self._started_at = started_at
        self._sending: asyncio.Future[None] | None = None
        self._clock = worker._start_clock
        self._clock.add(self)

    def send(self) -> None:
        event = StartedEvent(
            task_id=self._task.task_id,
            attempt=self._task.attempt,
            worker_id=self._worker.worker_id,
            started_at=self._started_at,
        )
        self._sending = asyncio.ensure_future(self._worker._publish_event(Kind.STARTED, event))

    def cancel(self) -> None:
        """Not due yet: never sent. Being sent: it goes on."""
        self._clock.discard(self)

    async def wait(self) -> None:
        if self._sending is None:
            return
        (failed,) = await asyncio.gather(self._sending, return_exceptions=True)
        if isinstance(failed, Exception):
            log.warning("`started` of task %s was not confirmed: %s", self._task.task_id, failed)


class _Hold:
    """The thread of a sync handler that outlived its attempt (time limit or cancel), and
    whether the task's slot was freed."""

    thread: Future[Any] | None = None
    freed: bool = False


def _error(kind: ErrorType, message: str, exc: BaseException | None = None) -> ErrorInfo:
    return ErrorInfo(
        type=kind,
        message=_utf8(message[:4000]),
        exception=_utf8(type(exc).__name__) if exc is not None else None,
        traceback=_utf8("".join(traceback.format_exception(exc))[-8000:])
        if exc is not None
        else None,
    )


def _utf8(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate (from bytes decoded with
    ``surrogateescape``, say) becomes ``\\udcff``, so the outcome can be encoded."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode(errors="backslashreplace").decode()
    return text
