"""The client SDK: submit tasks, await their answers, ask for them again later.

One connection, one publishing channel and one reply queue serve every call of a client; answers
are matched to calls by correlation id, so thousands of calls can be in flight at once."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from prometheus_client import CollectorRegistry

from . import tracing, transport
from .batching import MAX_BATCH_BYTES, Coalescer, joined
from .errors import (
    AmqpschedError,
    BrokerError,
    NoWorkerAvailable,
    TaskFailed,
    TaskTimeout,
    UnknownTask,
)
from .metrics import ClientMetrics
from .protocol import (
    ACCEPT_HEADER,
    DIRECT_FEATURE,
    PROTOCOL_VERSION,
    Answer,
    AnswerBatch,
    CapabilitiesReply,
    CatalogEntry,
    ErrorType,
    Kind,
    OutcomeEvent,
    RetryOverride,
    Status,
    StatusReply,
    TaskState,
    answer_of,
    decode_event,
)
from .settings import Settings
from .topology import Topology
from .transport import IncomingMessage

log = logging.getLogger("amqpsched.client")

T = TypeVar("T")

#: Extra seconds a call waits past the task's timeout for the scheduler's ``no_worker`` answer.
ANSWER_GRACE = 5.0


def answer_value(answer: Answer) -> Any:
    """The result of a succeeded answer; the matching typed error for a failed one."""
    if answer.status == Status.SUCCEEDED:
        return answer.result
    error = answer.error
    task_id = answer.task_id or "?"
    if error is None:
        raise TaskFailed(task_id, ErrorType.INTERNAL_ERROR, "failed without an error")
    cls = NoWorkerAvailable if error.type == ErrorType.NO_WORKER else TaskFailed
    detail = {"exception": error.exception, "traceback": error.traceback}
    raise cls(task_id, error.type.value, error.message, detail, answer.attempts)


#: Most tasks a client puts in one ``submit_batch`` message.
SUBMIT_BATCH_MAX = 256


@dataclass
class _Reply:
    kind: str
    body: bytes
    #: Already decoded (an answer that came in an ``answer_batch``).
    answer: Answer | None = None

    def decoded_answer(self) -> Answer:
        return self.answer if self.answer is not None else decode_event(Answer, self.body)


@dataclass
class _Submission:
    """A submission, encoded both ways: alone (``submit``) and as a ``submit_batch`` item."""

    single: bytes
    item: bytes
    task_id: str
    correlation_id: str
    traceparent: str | None

    @classmethod
    def of(cls, body: dict[str, Any], corr: str, traceparent: str | None) -> _Submission:
        fields = _json(body)[1:-1]  # the body's members, shared by both forms
        # Both are ours and need no escaping: a correlation id of letters and digits, and a
        # traceparent that tracing.valid checked (hex digits and dashes).
        extra = b',"correlation_id":"' + corr.encode() + b'"'
        if traceparent is not None:
            extra += b',"traceparent":"' + traceparent.encode() + b'"'
        return cls(  # each copied once (see batching.joined)
            single=b"".join((b'{"v":%d,' % PROTOCOL_VERSION, fields, b"}")),
            item=b"".join((b"{", fields, extra, b"}")),
            task_id=body["task_id"],
            correlation_id=corr,
            traceparent=traceparent,
        )


def random_ids(count: int) -> list[str]:
    """``count`` random ids of 32 hex digits (as ``uuid4().hex``, from one read of the OS's
    random source instead of one per id)."""
    digits = os.urandom(16 * count).hex()
    return [digits[i : i + 32] for i in range(0, 32 * count, 32)]


def random_id() -> str:
    """A random id of 32 hex digits, as ``uuid4().hex`` (without a UUID object: a seventh of
    its cost)."""
    return os.urandom(16).hex()


async def _wait(fut: asyncio.Future[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``fut`` without cancelling it; whether it is done.
    What ``wait_for(shield(fut), timeout)`` does, with one future and one timer instead of
    four futures and their callbacks (a call's answer, on the hot path)."""
    if fut.done():
        return True
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    fut.add_done_callback(wake)
    timer = asyncio.get_running_loop().call_later(timeout, wake, None)
    try:
        await waiter
    finally:
        timer.cancel()
        fut.remove_done_callback(wake)
    return fut.done()


def _json(value: Any) -> bytes:
    """``value`` as JSON, by pydantic-core: 6 times as fast as ``json.dumps`` on a 64 KiB string
    payload (29 against 175 µs). Pydantic models, dataclasses, datetimes, UUIDs and UTF-8 bytes
    are serialised as pydantic serialises them; NaN and infinities are written as such, which
    the scheduler refuses as JSON does; another type raises :class:`TypeError`."""
    try:
        return pydantic_core.to_json(value, inf_nan_mode="constants")
    except pydantic_core.PydanticSerializationError as exc:
        raise TypeError(f"payload is not JSON serialisable: {exc}") from None


def _submission_body(
    capability: str,
    payload: Any,
    *,
    timeout: float | None = None,
    task_id: str | None = None,
    time_limit: float | None = None,
    retry: RetryOverride | dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """The members of a ``submit`` body (without ``v``), with a task id made if none is given."""
    body: dict[str, Any] = {
        "capability": capability,
        "payload": payload,
        "task_id": task_id or random_id(),
    }
    if timeout is not None:
        body["timeout"] = timeout
    if time_limit is not None:
        body["time_limit"] = time_limit
    if retry is not None:
        override = retry if isinstance(retry, RetryOverride) else RetryOverride(**retry)
        body["retry"] = override.model_dump(mode="json", exclude_none=True)
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    return body


class TaskHandle:
    """A submitted task. ``await handle.result()`` in this process, or make one elsewhere with
    ``client.handle(task_id)`` and ask the scheduler."""

    def __init__(
        self, client: Client, task_id: str, future: asyncio.Future[_Reply] | None, timeout: float
    ) -> None:
        self.client = client
        self.task_id = task_id
        self.timeout = timeout
        self._future = future

    def __repr__(self) -> str:
        return f"TaskHandle({self.task_id!r})"

    async def answer(self, timeout: float | None = None) -> Answer:
        wait = timeout if timeout is not None else self.timeout + ANSWER_GRACE
        if self._future is None:
            return await self.client.answer(self.task_id, timeout=wait)
        if not await _wait(self._future, wait):
            raise TaskTimeout(self.task_id, f"no answer for {self.task_id} in {wait:.1f}s")
        return self._future.result().decoded_answer()

    async def result(self, timeout: float | None = None) -> Any:
        return answer_value(await self.answer(timeout))

    async def status(self) -> StatusReply:
        return await self.client.status(self.task_id)

    async def cancel(self) -> StatusReply:
        return await self.client.cancel(self.task_id)


class Client:
    """``async with Client() as c: await c.call("echo", {"hi": 1})``."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        client_id: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """``registry``: export the client's own call histogram there."""
        self.settings = settings or Settings()
        self._metrics = ClientMetrics(registry) if registry is not None else None
        self.topology = Topology(self.settings.namespace)
        self.client_id = client_id or uuid.uuid4().hex
        self._conn: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._submit: AbstractExchange | None = None
        #: The channel requests are published on: ``_channel`` until refusals replace it.
        self._pub: AbstractChannel | None = None
        self._refusals = transport.Refusals()
        self._replacing: set[asyncio.Future[None]] = set()
        self._reply_queue = self.topology.reply_queue(self.client_id)
        self._pending: dict[str, asyncio.Future[_Reply]] = {}
        # Submissions made at the same moment go in one `submit_batch` message.
        # A batch stays under the scheduler's limit (the same setting), with room for its frame.
        self._submits = Coalescer(
            self._send_submissions,
            max_items=SUBMIT_BATCH_MAX,
            size=lambda s: len(s.item) + 1,
            max_bytes=min(MAX_BATCH_BYTES, self.settings.max_message_bytes - 1024),
        )
        #: Correlation id of a batch message -> those of its tasks (a rejected batch fails all).
        self._batches: dict[str, list[str]] = {}
        #: What submissions say this client takes (ACCEPT_HEADER): set by :meth:`connect`.
        self._accept = Kind.ANSWER_BATCH.value

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._conn = await transport.connect(self.settings, f"amqpsched-client-{self.client_id}")
        try:
            self._channel = await transport.confirm_channel(self._conn)
            # The scheduler owns tasks.submit; a client with its role's permissions can only
            # check it exists. Others (guest) create it, so tasks wait for a scheduler.
            await self.topology.ensure(self._channel, self.topology.submit_exchange)
            queue = await self.topology.declare_reply_queue(self._channel, self.client_id)
            if self.settings.direct_answers and await self._may_take_direct_answers():
                await self.topology.bind_replies(queue)  # restored with the queue on reconnect
                self._accept = f"{Kind.ANSWER_BATCH.value},{DIRECT_FEATURE}"
            await queue.consume(self._on_reply, no_ack=True)
            self._submit = await self._channel.get_exchange(
                self.topology.submit_exchange, ensure=False
            )
            self._pub = self._channel
        except BrokerError:
            await self._conn.close()
            raise
        except transport.BROKER_ERRORS as exc:
            await self._conn.close()
            raise BrokerError(f"client could not set up: {exc}") from exc

    async def _may_take_direct_answers(self) -> bool:
        """Whether the replies exchange exists and this user may bind its reply queue to it,
        tried on a channel of its own (a refusal closes the channel): a broker set up by an
        older scheduler, or an older role definition, means answers come from the scheduler."""
        assert self._conn is not None and self._channel is not None
        try:
            await self.topology.ensure(self._channel, self.topology.replies_exchange)
            probe = await self._conn.channel(publisher_confirms=False)
        except BrokerError as exc:
            log.info("answers come from the scheduler only: %s", exc)
            return False
        try:
            await self.topology.bind_replies(await probe.get_queue(self._reply_queue, ensure=False))
            return True
        except transport.BROKER_ERRORS as exc:
            log.info("answers come from the scheduler only (no binding allowed: %s)", exc)
            return False
        finally:
            await transport.close_quietly(probe)

    async def close(self) -> None:
        for replacing in list(self._replacing):
            replacing.cancel()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    # -- replies -------------------------------------------------------------------------------
    async def _on_reply(self, msg: IncomingMessage) -> None:
        if msg.type == Kind.ANSWER_BATCH:
            self._on_answer_batch(msg.body)
            return
        if msg.type == Kind.OUTCOME:  # a direct answer, from the worker
            self._on_direct_answer(msg.correlation_id, msg.body)
            return
        corr = msg.correlation_id
        if corr in self._batches:  # the whole batch was rejected: every task gets the answer
            for item in self._batches.pop(corr):
                waiting = self._pending.pop(item, None)
                if waiting is not None and not waiting.done():
                    waiting.set_result(_Reply(msg.type or "", msg.body))
            return
        fut = self._pending.get(corr) if corr else None
        if fut is None or fut.done():
            return
        try:
            final = json.loads(msg.body).get("final") is True
        except (ValueError, AttributeError):
            log.warning("undecodable reply for %s ignored", corr)
            return
        if final:  # later protocol versions may send non-final messages first
            del self._pending[corr]  # type: ignore[arg-type]
            fut.set_result(_Reply(msg.type or "", msg.body))

    def _on_direct_answer(self, corr: str | None, body: bytes) -> None:
        fut = self._pending.get(corr) if corr else None
        if fut is None or fut.done():
            return  # answered already (by the scheduler: a cancel or a deadline came first)
        try:
            answer = answer_of(decode_event(OutcomeEvent, body))
        except AmqpschedError as exc:
            log.warning("undecodable direct answer for %s ignored: %s", corr, exc)
            return
        del self._pending[corr]  # type: ignore[arg-type]
        fut.set_result(_Reply(Kind.ANSWER, b"", answer))

    def _on_answer_batch(self, body: bytes) -> None:
        try:
            batch = decode_event(AnswerBatch, body)
        except AmqpschedError as exc:
            log.warning("undecodable answer batch ignored: %s", exc)
            return
        for item in batch.answers:
            fut = self._pending.pop(item.correlation_id, None)
            if fut is not None and not fut.done():
                fut.set_result(_Reply(Kind.ANSWER, b"", item.answer))
        if len(self._batches) > 1024:  # forget batches none of whose tasks is waiting
            self._batches = {
                k: v for k, v in self._batches.items() if any(c in self._pending for c in v)
            }

    async def _request(
        self,
        kind: Kind,
        body: dict[str, Any],
        correlation_id: str | None = None,
        traceparent: str | None = None,
    ) -> tuple[str, asyncio.Future[_Reply]]:
        if self._submit is None:
            raise AmqpschedError("client is not connected; use 'async with Client()'")
        corr = correlation_id or random_id()
        fut: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
        self._pending[corr] = fut
        try:
            if kind == Kind.SUBMIT:
                await self._submits.add(_Submission.of(body, corr, traceparent))
            else:
                body = {"v": PROTOCOL_VERSION, **body}
                raw = json.dumps(body).encode()
                await self._publish(kind, raw, corr, traceparent, body.get("task_id"))
        except BaseException:
            self._pending.pop(corr, None)
            raise
        return corr, fut

    async def _publish(
        self,
        kind: Kind,
        body: bytes,
        corr: str,
        traceparent: str | None,
        message_id: str | None,
    ) -> None:
        assert self._submit is not None
        msg = transport.message(
            body,
            kind,
            correlation_id=corr,
            reply_to=self._reply_queue,
            message_id=message_id,
            headers=tracing.headers(traceparent, {ACCEPT_HEADER: self._accept}),
        )
        try:
            await transport.publish(self._submit, msg, self.topology.submit_queue, mandatory=True)
        except BrokerError as exc:
            if transport.refused(exc) and self._refusals.refused(time.monotonic()):
                replacing = asyncio.ensure_future(self._replace_publishing_channel())
                self._replacing.add(replacing)
                replacing.add_done_callback(self._replacing.discard)
            raise

    async def _replace_publishing_channel(self) -> None:
        """Publish on a new channel (see :class:`~amqpsched.transport.Refusals`); the first one
        goes on consuming replies."""
        assert self._conn is not None
        channel = await transport.replacement_channel(self._conn)
        if channel is None:
            return
        old, self._pub = self._pub, channel
        self._submit = await channel.get_exchange(self.topology.submit_exchange, ensure=False)
        await transport.retire(old, keep=self._channel)

    async def _send_submissions(self, items: list[_Submission]) -> None:
        """One submission as a ``submit``; several as one ``submit_batch``."""
        if len(items) == 1:
            one = items[0]
            await self._publish(
                Kind.SUBMIT, one.single, one.correlation_id, one.traceparent, one.task_id
            )
            return
        body = joined(b'{"v":%d,"tasks":[' % PROTOCOL_VERSION, (i.item for i in items), b"]}")
        corr = random_id()
        self._batches[corr] = [item.correlation_id for item in items]
        try:
            await self._publish(Kind.SUBMIT_BATCH, body, corr, None, None)
        except BaseException:
            self._batches.pop(corr, None)
            raise

    async def _rpc(self, kind: Kind, body: dict[str, Any], timeout: float) -> _Reply:
        corr, fut = await self._request(kind, body)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            self._pending.pop(corr, None)
            raise TaskTimeout(
                str(body.get("task_id", "")), f"no reply to {kind} in {timeout}s"
            ) from None

    # -- API -----------------------------------------------------------------------------------
    async def submit(
        self,
        capability: str,
        payload: Any,
        *,
        timeout: float | None = None,
        task_id: str | None = None,
        time_limit: float | None = None,
        retry: RetryOverride | dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
    ) -> TaskHandle:
        """Submit a task; its answer is pushed to this client. Returns at once with a handle.

        ``payload``: a JSON value; pydantic models, dataclasses, datetimes and UUIDs are sent as
        pydantic serialises them (anything else raises :class:`TypeError`).

        ``timeout``: seconds within which the answer is due; ``time_limit``: seconds one attempt
        may run; ``retry``: overrides of the capability's retry policy (``max_attempts``,
        ``backoff``, ``backoff_max``, ``multiplier``, ``jitter``, ``retry_on``);
        ``idempotency_key``: submissions with the same key get the same task and answer;
        ``traceparent``: the W3C trace context to continue (default: the active OpenTelemetry
        span's, else a new trace)."""
        body = _submission_body(
            capability,
            payload,
            timeout=timeout,
            task_id=task_id,
            time_limit=time_limit,
            retry=retry,
            idempotency_key=idempotency_key,
        )
        task_id = body["task_id"]
        with tracing.span(
            "amqpsched.submit",
            tracing.valid(traceparent),
            kind=tracing.PRODUCER,
            attributes={"amqpsched.task_id": task_id, "amqpsched.capability": capability},
            create=True,
        ) as span:
            _, fut = await self._request(Kind.SUBMIT, body, traceparent=span.traceparent)
        return TaskHandle(self, task_id, fut, timeout or self.settings.default_timeout)

    async def call(self, capability: str, payload: Any, **options: Any) -> Any:
        """Run a task and return its result; raise :class:`TaskFailed` (or a subclass) if it
        failed, :class:`TaskTimeout` if no answer came in time. Options as for :meth:`submit`."""
        started = time.monotonic()
        outcome = "succeeded"
        try:
            handle = await self.submit(capability, payload, **options)
            return await handle.result()
        except TaskFailed as exc:
            outcome = exc.error_type
            raise
        except TaskTimeout:
            outcome = "timeout"
            raise
        except AmqpschedError:
            outcome = "error"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.calls.labels(capability, outcome).observe(time.monotonic() - started)

    async def cancel(self, task_id: str, *, timeout: float = 10.0) -> StatusReply:
        """Cancel a queued or running task. Its answer becomes ``failed``/``cancelled`` unless it
        was already final; the reply tells which."""
        reply = await self._rpc(Kind.CANCEL, {"task_id": task_id}, timeout)
        return decode_event(StatusReply, reply.body)

    def handle(self, task_id: str, timeout: float | None = None) -> TaskHandle:
        """A handle on a task submitted elsewhere (another process, an earlier run)."""
        return TaskHandle(self, task_id, None, timeout or self.settings.default_timeout)

    async def status(self, task_id: str, *, timeout: float = 10.0) -> StatusReply:
        reply = await self._rpc(Kind.STATUS, {"task_id": task_id}, timeout)
        return decode_event(StatusReply, reply.body)

    async def answer(self, task_id: str, *, timeout: float = 60.0) -> Answer:
        """The final answer of any task the scheduler remembers, waiting for it if needed."""
        reply = await self._rpc(Kind.RESULT, {"task_id": task_id}, timeout)
        if reply.kind == Kind.STATUS_REPLY:
            status = decode_event(StatusReply, reply.body)
            if status.state == TaskState.UNKNOWN:
                raise UnknownTask(task_id, f"the scheduler does not know task {task_id}")
            if status.answer is not None:
                return status.answer
        return decode_event(Answer, reply.body)

    async def result(self, task_id: str, *, timeout: float = 60.0) -> Any:
        return answer_value(await self.answer(task_id, timeout=timeout))

    async def map(
        self,
        capability: str,
        payloads: Iterable[Any],
        *,
        ordered: bool = True,
        window: int = 10_000,
        progress: Callable[[int, int], None] | None = None,
        return_exceptions: bool = False,
        timeout: float | None = None,
        traceparent: str | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """Run ``capability`` on every payload; yield the results in input order (``ordered``)
        or as they complete. At most ``window`` tasks are in flight; ``progress(done, total)``
        is called after each answer. A failed task raises its :class:`TaskFailed` when reached,
        or is yielded as the exception with ``return_exceptions``; :class:`TaskTimeout` if no
        answer came for ``timeout`` plus a grace. Options as for :meth:`submit` (no
        ``task_id``, no ``idempotency_key``: each task gets its own). The tasks travel in
        batches ([protocol](docs/protocol.md), section 15), one trace for the whole map."""
        items = list(payloads)
        total = len(items)
        loop = asyncio.get_running_loop()
        finished: asyncio.Queue[int] = asyncio.Queue()
        futures: dict[int, asyncio.Future[_Reply]] = {}
        wait = (timeout or self.settings.default_timeout) + ANSWER_GRACE
        nxt = 0  # next input to submit
        with tracing.span(
            "amqpsched.map",
            tracing.valid(traceparent),
            kind=tracing.PRODUCER,
            attributes={"amqpsched.capability": capability, "amqpsched.tasks": total},
            create=True,
        ) as span:
            parent = span.traceparent

        def submitted(corr: str, reply: asyncio.Future[_Reply], exc: BaseException | None) -> None:
            if not reply.done() and exc is not None:
                self._pending.pop(corr, None)
                cancelled = isinstance(exc, asyncio.CancelledError)
                reply.set_exception(BrokerError("submission cancelled") if cancelled else exc)

        def arrived(index: int, _reply: asyncio.Future[_Reply]) -> None:
            finished.put_nowait(index)

        def fill(most: int = total) -> None:
            """Submit up to ``most`` more, within the window."""
            nonlocal nxt
            if self._submit is None:
                raise AmqpschedError("client is not connected; use 'async with Client()'")
            count = min(total - nxt, window - len(futures), most)
            ids = random_ids(2 * count) if count > 0 else []
            for _ in range(count):
                task_id, corr = ids.pop(), ids.pop()
                body = _submission_body(
                    capability, items[nxt], timeout=timeout, task_id=task_id, **options
                )
                reply: asyncio.Future[_Reply] = loop.create_future()
                self._pending[corr] = reply
                futures[nxt] = reply
                reply.add_done_callback(functools.partial(arrived, nxt))
                self._submits.add_then(
                    _Submission.of(body, corr, parent), functools.partial(submitted, corr, reply)
                )
                nxt += 1

        def value(reply: asyncio.Future[_Reply]) -> Any:
            error = reply.exception()
            if error is None:
                try:
                    return answer_value(reply.result().decoded_answer())
                except AmqpschedError as failed:
                    error = failed
            if return_exceptions and isinstance(error, AmqpschedError):
                return error
            raise error

        done = 0
        out = 0  # next index to yield, when ordered
        completed: dict[int, asyncio.Future[_Reply]] = {}
        try:
            # The first window a batch at a time, each let out while the next is built: the
            # scheduler and the workers start on the first tasks at once.
            fill(SUBMIT_BATCH_MAX)
            while nxt < total and len(futures) < window:
                await asyncio.sleep(0)
                fill(SUBMIT_BATCH_MAX)
            while done < total:
                if finished.empty():
                    try:
                        index = await asyncio.wait_for(finished.get(), wait)
                    except TimeoutError:
                        raise TaskTimeout(
                            "", f"map: no answer for {len(futures)} task(s) in {wait:.1f}s"
                        ) from None
                else:  # answers came together (an answer_batch): no timer for each
                    index = finished.get_nowait()
                completed[index] = futures.pop(index)
                done += 1
                if progress is not None:
                    progress(done, total)
                fill()
                if not ordered:
                    yield value(completed.pop(index))
                while ordered and out in completed:
                    yield value(completed.pop(out))
                    out += 1
        finally:
            for reply in futures.values():
                reply.cancel()
            self._pending = {c: f for c, f in self._pending.items() if not f.done()}

    async def capabilities(self, *, timeout: float = 10.0) -> list[CatalogEntry]:
        """The live catalog: each capability with its description, schema and workers."""
        reply = await self._rpc(Kind.CAPABILITIES, {}, timeout)
        return decode_event(CapabilitiesReply, reply.body).capabilities


class SyncClient:
    """A blocking wrapper for scripts: ``with SyncClient() as c: c.call("echo", 1)``.
    Runs a private event loop in a thread."""

    def __init__(self, settings: Settings | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._client = Client(settings)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __enter__(self) -> SyncClient:
        self._thread.start()
        self._run(self._client.connect())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def call(self, capability: str, payload: Any, **options: Any) -> Any:
        return self._run(self._client.call(capability, payload, **options))

    def submit(self, capability: str, payload: Any, **options: Any) -> str:
        return self._run(self._client.submit(capability, payload, **options)).task_id

    def result(self, task_id: str, *, timeout: float = 60.0) -> Any:
        return self._run(self._client.result(task_id, timeout=timeout))

    def status(self, task_id: str) -> StatusReply:
        return self._run(self._client.status(task_id))

    def cancel(self, task_id: str) -> StatusReply:
        return self._run(self._client.cancel(task_id))

    def capabilities(self) -> list[CatalogEntry]:
        return self._run(self._client.capabilities())
