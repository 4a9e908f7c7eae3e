"""A client and a worker in "another library": pika, written only from docs/protocol.md.

Nothing here uses amqpsched's client SDK, its models or its topology helper to build messages: queue
names come from the namespace rule of the document, queue arguments from its tables, bodies are
hand-written JSON, and replies are matched the way the document tells a client to (correlation id,
then ``"final": true``). The in-process scheduler and workers of the ``system`` fixture are the
other end; :class:`ForeignWorker` stands in for a worker written in another language.

pika is blocking, so every scenario is a plain function run in a thread (``asyncio.to_thread``)
while the scheduler and workers keep running on the test's event loop. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
from PIL import Image

from .conftest import System

CONTENT_TYPE = "application/json"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
#: The error types of the document's table (section 5.3).
ERROR_TYPES = (
    "invalid_request",
    "no_worker",
    "expired",
    "invalid_payload",
    "handler_error",
    "time_limit",
    "worker_lost",
    "cancelled",
    "internal_error",
)


def name(namespace: str, base: str) -> str:
    """The namespace rule of the document: ``<namespace>.<name>``, or ``<name>`` when empty."""
    return f"{namespace}.{base}" if namespace else base


@dataclass
class Reply:
    """One message taken from the reply queue and kept by the client."""

    kind: str | None  # the AMQP ``type`` property: answer, status_reply, capabilities_reply
    correlation_id: str | None
    body: dict[str, Any]


@dataclass
class ForeignClient:
    """The smallest useful client: one connection, one channel, one reply queue."""

    url: str
    namespace: str
    direct_reply_to: bool = False
    #: Take direct answers (section 16): bind the reply queue to amqpsched.replies, ask for them.
    direct_answers: bool = False
    ignored: list[tuple[str | None, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        params = pika.URLParameters(self.url)
        params.socket_timeout = 10
        params.blocked_connection_timeout = 30
        self.connection: Any = pika.BlockingConnection(params)
        self.channel: Any = self.connection.channel()
        self.channel.confirm_delivery()  # publisher confirms: basic_publish raises if not routed
        self.submit_queue = name(self.namespace, "tasks.submit")
        self.submit_exchange = name(self.namespace, "amqpsched.submit")
        # Declared with exactly the scheduler's arguments (section 3.4): idempotent, and requests
        # sent before any scheduler runs are kept instead of dropped.
        self.channel.queue_declare(
            self.submit_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        self.channel.exchange_declare(self.submit_exchange, "direct", durable=True)
        self.channel.queue_bind(self.submit_queue, self.submit_exchange, self.submit_queue)
        self.headers: dict[str, str] = {}
        if self.direct_reply_to:
            self.reply_to = DIRECT_REPLY_TO
        elif self.direct_answers:
            self.reply_to = name(self.namespace, f"amqpsched.reply.{uuid.uuid4().hex}")
            self.channel.queue_declare(self.reply_to, exclusive=True, auto_delete=True)
            replies = name(self.namespace, "amqpsched.replies")
            self.channel.queue_bind(self.reply_to, replies, routing_key=self.reply_to)
            self.headers = {"amqpsched-accept": "direct"}
        else:
            declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
            self.reply_to = str(declared.method.queue)
        # Consume before publishing (required for direct reply-to; harmless otherwise).
        self._inbox: list[tuple[str | None, str | None, bytes]] = []
        self._pending: set[str] = set()  # correlation ids of requests in flight
        self._ready: dict[str, Reply] = {}  # their first final replies, not yet taken
        self.channel.basic_consume(self.reply_to, self._on_message, auto_ack=True)

    def _on_message(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        self._inbox.append((properties.type, properties.correlation_id, body))

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> ForeignClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(
        self,
        body: dict[str, Any] | bytes,
        *,
        kind: str | None,
        correlation_id: str | None,
        reply_to: str | None = "",
    ) -> None:
        """Publish one request to ``tasks.submit`` through ``amqpsched.submit``."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            type=kind,
            correlation_id=correlation_id,
            reply_to=self.reply_to if reply_to == "" else reply_to,
            delivery_mode=2,
            headers=self.headers or None,
        )
        self.channel.basic_publish(
            self.submit_exchange, self.submit_queue, raw, properties, mandatory=True
        )
        if correlation_id is not None:
            self._pending.add(correlation_id)

    def wait(self, correlation_id: str, timeout: float) -> Reply:
        """The first final message for ``correlation_id``; replies to other requests in flight are
        kept for their own ``wait``, everything else is set aside."""
        deadline = time.monotonic() + timeout
        while True:
            reply = self.poll(correlation_id)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no final reply for {correlation_id!r} in {timeout}s")
            self.connection.process_data_events(time_limit=min(0.2, remaining))

    def poll(self, correlation_id: str) -> Reply | None:
        """The first final message for ``correlation_id`` received so far, without waiting."""
        self.connection.process_data_events(time_limit=0)
        while self._inbox:
            self._accept(*self._inbox.pop(0))
        return self._ready.pop(correlation_id, None)

    def _accept(self, kind: str | None, corr: str | None, raw: bytes) -> None:
        if corr is None or corr not in self._pending:
            self.ignored.append((corr, raw))  # someone else's, or a later final: stale
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.ignored.append((corr, raw))
            return
        final = kind == "outcome" and self.direct_answers  # a direct answer: always final
        if not isinstance(body, dict) or not (final or body.get("final") is True):
            self.ignored.append((corr, raw))  # a non-final message: ignore it
            return
        self._pending.discard(corr)
        self._ready[corr] = Reply(kind, corr, body)

    def request(
        self, body: dict[str, Any] | bytes, *, kind: str | None, timeout: float = 30.0
    ) -> Reply:
        corr = uuid.uuid4().hex
        self.send(body, kind=kind, correlation_id=corr)
        return self.wait(corr, timeout)

    def inject(self, body: bytes, correlation_id: str) -> None:
        """Put a message straight onto our own reply queue (to exercise the matching rules)."""
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, type="answer", correlation_id=correlation_id
        )
        self.channel.basic_publish("", self.reply_to, body, properties, mandatory=True)


def url_of(system: System) -> str:
    return system.settings.amqp_url.get_secret_value()


def assert_answer_shape(body: dict[str, Any]) -> None:
    """Every field the document lists for an answer is present, with its documented type."""
    assert body["v"] == 1
    assert body["final"] is True
    assert body["status"] in ("succeeded", "failed")
    assert body["task_id"] is None or isinstance(body["task_id"], str)
    assert body["capability"] is None or isinstance(body["capability"], str)
    assert "result" in body
    assert isinstance(body["attempts"], int)
    assert body["attempts"] >= 0
    assert body["worker_id"] is None or isinstance(body["worker_id"], str)
    for key in ("submitted_at", "finished_at"):
        assert body[key] is None or isinstance(body[key], float | int)
    if body["status"] == "succeeded":
        assert body["error"] is None
    else:
        error = body["error"]
        assert set(error) == {"type", "message", "exception", "traceback"}
        assert error["type"] in ERROR_TYPES
        assert isinstance(error["message"], str)


# -- submissions ---------------------------------------------------------------------------------


async def test_echo_answer_on_a_reply_queue_of_our_own(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", "resize")
    task_id = f"foreign-{uuid.uuid4().hex}"
    payload = {"text": "h\u00e9llo", "list": [1, 2.5, None, True], "nested": {"k": "v"}}

    def scenario() -> Reply:
        with ForeignClient(url_of(system), system.namespace) as client:
            assert client.submit_queue == system.topology.submit_queue
            body = {
                "v": 1,
                "capability": "echo",
                "payload": payload,
                "task_id": task_id,
                "timeout": 30,
            }
            return client.request(body, kind="submit")

    reply = await asyncio.to_thread(scenario)
    assert reply.kind == "answer"
    body = reply.body
    assert_answer_shape(body)
    assert body["status"] == "succeeded"
    assert body["task_id"] == task_id
    assert body["capability"] == "echo"
    assert body["result"] == payload
    assert body["attempts"] == 1
    assert body["worker_id"]
    assert body["submitted_at"] <= body["finished_at"]


async def test_direct_answer_from_the_worker_and_a_failure_from_the_scheduler(
    system: System,
) -> None:
    """Section 16: a client that binds its reply queue and asks gets a succeeded task's answer
    as the worker's `outcome`, once; a failed one as the scheduler's `answer`."""
    await system.scheduler()
    await system.worker("echo", "resize")

    def scenario() -> tuple[Reply, Reply, list[tuple[str | None, bytes]]]:
        with ForeignClient(url_of(system), system.namespace, direct_answers=True) as client:
            ok = client.request(
                {"v": 1, "capability": "echo", "payload": [1, "two"], "task_id": "direct-ok"},
                kind="submit",
            )
            bad = client.request(
                {"v": 1, "capability": "resize", "payload": {"image": "AAAA", "width": 1}},
                kind="submit",
            )
            # Once the scheduler says the first is done, a second answer to it would have come.
            status = client.request({"v": 1, "task_id": "direct-ok"}, kind="status")
            assert status.body["state"] == "succeeded", status
            client.request({"v": 1, "task_id": "direct-ok"}, kind="status")
            return ok, bad, client.ignored

    ok, bad, ignored = await asyncio.to_thread(scenario)
    assert ok.kind == "outcome"
    assert (ok.body["task_id"], ok.body["status"], ok.body["result"]) == (
        "direct-ok",
        "succeeded",
        [1, "two"],
    )
    assert ok.body["attempt"] == 1 and ok.body["worker_id"]
    assert bad.kind == "answer"
    assert bad.body["error"]["type"] == "invalid_payload"
    assert ignored == [], "a second final message came"


async def test_echo_answer_through_direct_reply_to_without_type_or_task_id(
    system: System,
) -> None:
    await system.scheduler()
    await system.worker("echo", "resize")

    def scenario() -> Reply:
        with ForeignClient(url_of(system), system.namespace, direct_reply_to=True) as client:
            # No ``type`` property: a submission. No task_id: the scheduler makes one.
            return client.request(
                {"v": 1, "capability": "echo", "payload": ["direct", 1]}, kind=None
            )

    reply = await asyncio.to_thread(scenario)
    assert reply.kind == "answer"
    assert_answer_shape(reply.body)
    assert reply.body["status"] == "succeeded"
    assert reply.body["result"] == ["direct", 1]
    assert isinstance(reply.body["task_id"], str)
    assert reply.body["task_id"]


async def test_resize_answers_a_png_of_the_asked_size(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", "resize")
    source = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 90)).save(source, format="PNG")
    payload = {"image": base64.b64encode(source.getvalue()).decode(), "width": 17, "height": 9}

    def scenario() -> Reply:
        with ForeignClient(url_of(system), system.namespace) as client:
            return client.request(
                {"v": 1, "capability": "resize", "payload": payload, "timeout": 60}, kind="submit"
            )

    reply = await asyncio.to_thread(scenario)
    assert_answer_shape(reply.body)
    assert reply.body["status"] == "succeeded", reply.body["error"]
    result = reply.body["result"]
    assert (result["width"], result["height"]) == (17, 9)
    with Image.open(io.BytesIO(base64.b64decode(result["image"], validate=True))) as image:
        assert image.format == "PNG"
        assert image.size == (17, 9)


async def test_capability_nobody_offers_is_answered_no_worker(system: System) -> None:
    await system.scheduler()
    capability = f"nobody-{uuid.uuid4().hex[:8]}"
    system.capabilities.add(capability)  # the scheduler declares its queue: clean it up
    task_id = f"foreign-{uuid.uuid4().hex}"

    def scenario() -> tuple[Reply, float]:
        with ForeignClient(url_of(system), system.namespace) as client:
            started = time.monotonic()
            body = {"v": 1, "capability": capability, "payload": {}, "task_id": task_id}
            reply = client.request({**body, "timeout": 1.0}, kind="submit", timeout=20)
            return reply, time.monotonic() - started

    reply, elapsed = await asyncio.to_thread(scenario)
    assert reply.kind == "answer"
    body = reply.body
    assert_answer_shape(body)
    assert body["status"] == "failed"
    assert body["error"]["type"] == "no_worker"
    assert body["task_id"] == task_id
    assert body["capability"] == capability
    assert body["attempts"] == 0
    assert body["worker_id"] is None
    assert 0.9 <= elapsed < 15  # answered at the deadline, not at once and not much later


# -- queries -------------------------------------------------------------------------------------


async def test_status_result_and_capabilities_queries(system: System) -> None:
    await system.scheduler()
    await system.worker("echo", "resize")
    task_id = f"foreign-{uuid.uuid4().hex}"
    unknown_id = f"never-{uuid.uuid4().hex}"

    def scenario() -> dict[str, Reply]:
        out: dict[str, Reply] = {}
        with ForeignClient(url_of(system), system.namespace) as client:
            out["answer"] = client.request(
                {"v": 1, "capability": "echo", "payload": 7, "task_id": task_id}, kind="submit"
            )
            out["status"] = client.request({"v": 1, "task_id": task_id}, kind="status")
            out["result"] = client.request({"v": 1, "task_id": task_id}, kind="result")
            out["unknown_status"] = client.request({"v": 1, "task_id": unknown_id}, kind="status")
            out["unknown_result"] = client.request({"v": 1, "task_id": unknown_id}, kind="result")
            deadline = time.monotonic() + 10
            while True:  # the catalog follows hello messages: poll it, bounded
                out["capabilities"] = client.request({"v": 1}, kind="capabilities")
                names = {c["name"] for c in out["capabilities"].body["capabilities"]}
                if {"echo", "resize"} <= names or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        return out

    replies = await asyncio.to_thread(scenario)
    answer = replies["answer"].body
    assert answer["status"] == "succeeded"

    status = replies["status"]
    assert status.kind == "status_reply"
    assert status.body["final"] is True
    assert status.body["task_id"] == task_id
    assert status.body["state"] == "succeeded"
    assert status.body["capability"] == "echo"
    assert status.body["answer"] == answer

    result = replies["result"]
    assert result.kind == "answer"
    assert result.body == answer

    for key in ("unknown_status", "unknown_result"):
        reply = replies[key]
        assert reply.kind == "status_reply", key
        assert reply.body["state"] == "unknown", key
        assert reply.body["task_id"] == unknown_id
        assert reply.body["answer"] is None

    catalog = replies["capabilities"]
    assert catalog.kind == "capabilities_reply"
    assert catalog.body["final"] is True
    entries = {c["name"]: c for c in catalog.body["capabilities"]}
    assert {"echo", "resize"} <= set(entries)
    resize = entries["resize"]
    assert resize["workers"] >= 1
    assert resize["slots"] >= 1
    assert isinstance(resize["in_flight"], int)
    assert isinstance(resize["description"], str)
    assert {"image", "width", "height"} <= set(resize["payload_schema"]["properties"])


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "raw", "task_id"),
    [
        (
            "unknown_version",
            b'{"v": 2, "capability": "echo", "payload": 1, "task_id": "foreign-v2"}',
            "foreign-v2",
        ),
        ("malformed_json", b'{"v": 1, "capability": "echo", "payload": ', None),
        # Strict decoding (section 4.2): exact JSON types, no NaN, closed objects.
        (
            "invalid_fields",
            b'{"v": 1, "capability": "echo", "payload": 1, "task_id": "foreign-str",'
            b' "timeout": "5"}',
            "foreign-str",
        ),
        ("unknown_version", b'{"v": true, "capability": "echo", "payload": 1}', None),
        ("malformed_json", b'{"v": 1, "capability": "echo", "payload": NaN}', None),
        (
            "invalid_fields",
            b'{"v": 1, "capability": "echo", "payload": 1, "task_id": "foreign-retry",'
            b' "retry": {"max_attempts": 2, "tries": 3}}',
            "foreign-retry",
        ),
    ],
    ids=[
        "unknown_version",
        "malformed_json",
        "string_for_number",
        "boolean_version",
        "nan",
        "unknown_retry_field",
    ],
)
async def test_bad_request_is_answered_invalid_request_and_dead_lettered(
    system: System, reason: str, raw: bytes, task_id: str | None
) -> None:
    await system.scheduler()
    await system.worker("echo", "resize")
    dead_queue = name(system.namespace, "amqpsched.dead")
    assert dead_queue == system.topology.dead_letter_queue
    corr = uuid.uuid4().hex

    def scenario() -> tuple[Reply, str, Any, bytes]:
        with ForeignClient(url_of(system), system.namespace) as client:
            client.send(raw, kind="submit", correlation_id=corr)
            reply = client.wait(corr, timeout=30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                method, properties, body = client.channel.basic_get(dead_queue, auto_ack=True)
                if method is None:
                    time.sleep(0.05)
                    continue
                headers = properties.headers or {}
                if headers.get("x-amqpsched-original-correlation-id") == corr:
                    return reply, client.reply_to, properties, body
            raise AssertionError(f"nothing for {corr} in {dead_queue}")

    reply, reply_to, properties, body = await asyncio.to_thread(scenario)
    assert reply.kind == "answer"
    answer = reply.body
    assert_answer_shape(answer)
    assert answer["status"] == "failed"
    assert answer["error"]["type"] == "invalid_request"
    assert answer["error"]["message"].startswith(f"{reason}: ")
    assert answer["task_id"] == task_id

    assert body == raw
    headers = properties.headers
    assert headers["x-amqpsched-reason"] == reason
    assert headers["x-amqpsched-source"] == "scheduler"
    assert headers["x-amqpsched-original-type"] == "submit"
    assert headers["x-amqpsched-original-reply-to"] == reply_to
    assert isinstance(headers["x-amqpsched-error"], str)
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-amqpsched-dead-id"])
    if task_id is not None:
        assert headers["x-amqpsched-task-id"] == task_id
        assert headers["x-amqpsched-capability"] == "echo"
    else:
        assert "x-amqpsched-task-id" not in headers


# -- the client-side rules -----------------------------------------------------------------------


async def test_non_final_and_foreign_messages_on_the_reply_queue_are_ignored(
    system: System,
) -> None:
    """The v1 scheduler never sends a non-final message, so this puts such messages on the reply
    queue itself, ahead of the real answer, and checks the documented matching rules hold up."""
    await system.scheduler()
    await system.worker("echo", "resize")
    corr = uuid.uuid4().hex

    def scenario() -> tuple[Reply, list[tuple[str | None, bytes]]]:
        with ForeignClient(url_of(system), system.namespace) as client:
            client.inject(b'{"v": 1, "final": false, "state": "running"}', corr)
            client.inject(b'{"v": 1, "state": "running"}', corr)
            client.inject(b'{"v": 1, "final": true, "status": "succeeded"}', "someone-else")
            client.inject(b"not json", corr)
            client.send(
                {"v": 1, "capability": "echo", "payload": "real"},
                kind="submit",
                correlation_id=corr,
            )
            return client.wait(corr, timeout=30), client.ignored

    reply, ignored = await asyncio.to_thread(scenario)
    assert reply.body["status"] == "succeeded"
    assert reply.body["result"] == "real"
    assert len(ignored) == 4


# -- new in v1: time limits, retries, idempotency keys, cancel ---------------------------------


def dead_letter_for(
    client: ForeignClient, dead_queue: str, task_id: str, timeout: float = 10.0
) -> tuple[Any, bytes]:
    """The dead letter whose ``x-amqpsched-task-id`` is ``task_id`` (others are dropped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, properties, body = client.channel.basic_get(dead_queue, auto_ack=True)
        if method is None:
            time.sleep(0.05)
            continue
        if (properties.headers or {}).get("x-amqpsched-task-id") == task_id:
            return properties, body
    raise AssertionError(f"no dead letter for {task_id} in {dead_queue}")


async def test_time_limit_and_retry_override_then_retries_exhausted(system: System) -> None:
    """Section 5.2 fields, 7.2-7.4 and 6.4: two attempts, each stopped by its time limit, 100 ms
    apart; the answer carries the last error and attempt; the task is kept in the DLQ."""
    await system.scheduler()
    await system.worker("sleep", "echo")
    task_id = f"foreign-{uuid.uuid4().hex}"
    dead_queue = name(system.namespace, "amqpsched.dead")

    def scenario() -> tuple[Reply, Reply, Any, bytes, str]:
        with ForeignClient(url_of(system), system.namespace) as client:
            body = {
                "v": 1,
                "capability": "sleep",
                "payload": {"seconds": 10},
                "task_id": task_id,
                "timeout": 30,
                "time_limit": 0.2,
                "retry": {"max_attempts": 2, "backoff": 0.1, "jitter": 0},
            }
            answer = client.request(body, kind="submit", timeout=20)
            status = client.request({"v": 1, "task_id": task_id}, kind="status")
            properties, raw = dead_letter_for(client, dead_queue, task_id)
            return answer, status, properties, raw, client.reply_to

    answer, status, properties, raw, reply_to = await asyncio.to_thread(scenario)
    assert_answer_shape(answer.body)
    assert answer.body["status"] == "failed"
    assert answer.body["error"]["type"] == "time_limit"
    assert answer.body["attempts"] == 2
    assert answer.body["worker_id"]

    assert status.kind == "status_reply"
    assert status.body["state"] == "failed"
    assert status.body["attempts"] == 2

    headers = properties.headers
    assert properties.type == "task"
    assert headers["x-amqpsched-reason"] == "retries_exhausted"
    assert headers["x-amqpsched-source"] == "worker"
    assert headers["x-amqpsched-original-type"] == "task"
    assert headers["x-amqpsched-capability"] == "sleep"
    assert headers["x-amqpsched-attempts"] == 2
    assert headers["x-amqpsched-error"].startswith("time_limit: ")
    assert headers["amqpsched-delay"] == "100"  # the next attempt went through the 100 ms queue
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-amqpsched-dead-id"])
    task = json.loads(raw)
    assert task["attempt"] == 2
    assert task["reply_to"] == reply_to
    assert task["time_limit"] == 0.2
    assert task["retry"]["max_attempts"] == 2
    assert task["retry"]["retry_on"] is None  # sent as the client gave it, nulls included


async def test_same_idempotency_key_answers_with_the_first_task(system: System) -> None:
    await system.scheduler()
    await system.worker("echo")
    key = f"foreign-key-{uuid.uuid4().hex}"
    first_id, second_id = f"foreign-{uuid.uuid4().hex}", f"foreign-{uuid.uuid4().hex}"

    def scenario() -> tuple[Reply, Reply]:
        with ForeignClient(url_of(system), system.namespace) as client:
            base = {"v": 1, "capability": "echo", "idempotency_key": key}
            first = client.request({**base, "payload": "first", "task_id": first_id}, kind=None)
            second = client.request({**base, "payload": "second", "task_id": second_id}, kind=None)
            return first, second

    first, second = await asyncio.to_thread(scenario)
    assert first.body["task_id"] == first_id
    assert first.body["result"] == "first"
    # The key matched: the first task's answer, under the first task's id.
    assert second.body["task_id"] == first_id
    assert second.body["result"] == "first"


@dataclass
class ForeignWorker:
    """A worker as section 9 describes it: control queue, hello, wait for the welcome, consume
    with ``x-consumer-timeout``, skip cancelled tasks, ``started`` then ``outcome``, then ack."""

    url: str
    namespace: str
    capability: str
    worker_id: str = field(default_factory=lambda: f"foreign-{uuid.uuid4().hex[:8]}")
    notices: list[tuple[str | None, dict[str, Any]]] = field(default_factory=list)
    handled: dict[str, str] = field(default_factory=dict)  # task id -> what was done

    def __post_init__(self) -> None:
        params = pika.URLParameters(self.url)
        params.socket_timeout = 10
        self.connection: Any = pika.BlockingConnection(params)
        self.channel: Any = self.connection.channel()
        self.channel.confirm_delivery()
        self.channel.basic_qos(prefetch_count=1)
        self._cancelled: dict[str, float] = {}
        self._deliveries: list[tuple[Any, Any, bytes]] = []
        ns = self.namespace
        control_exchange = name(ns, "amqpsched.control")
        control_queue = name(ns, f"amqpsched.control.{self.worker_id}")
        self.channel.exchange_declare(control_exchange, "fanout", durable=True)
        self.channel.queue_declare(control_queue, exclusive=True, auto_delete=True)
        self.channel.queue_bind(control_queue, control_exchange, routing_key="")
        self.channel.basic_consume(control_queue, self._on_control, auto_ack=True)
        # Exactly the arguments of section 3.3; any difference is a 406 from the broker.
        self.task_queue = name(ns, f"amqpsched.cap.{self.capability}")
        self.channel.queue_declare(
            self.task_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-delivery-limit": 10,
                "x-dead-letter-exchange": name(ns, "amqpsched.events"),
                "x-dead-letter-routing-key": name(ns, "amqpsched.results"),
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        )
        tasks_exchange = name(ns, "amqpsched.tasks")
        self.channel.exchange_declare(tasks_exchange, "topic", durable=True)
        self.channel.queue_bind(self.task_queue, tasks_exchange, routing_key=self.capability)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def __enter__(self) -> ForeignWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_control(self, _channel: Any, _method: Any, properties: Any, body: bytes) -> None:
        notice = json.loads(body)
        self.notices.append((properties.type, notice))
        for task_id in notice["task_ids"]:
            self._cancelled[task_id] = notice["until"]

    def _on_task(self, _channel: Any, method: Any, properties: Any, body: bytes) -> None:
        self._deliveries.append((method, properties, body))

    def announce(self, kind: str) -> None:
        body = {
            "v": 1,
            "worker_id": self.worker_id,
            "hostname": "foreign-host",
            "pid": 0,
            "capabilities": [
                {
                    "name": self.capability,
                    "description": "Upper-cases a string.",
                    "payload_schema": {"type": "string"},
                    "retry": {"max_attempts": 1},  # the other fields take their defaults
                    "time_limit": None,
                }
            ],
            "concurrency": 1,
            "in_flight": 0,
            "sent_at": time.time(),
        }
        properties = pika.BasicProperties(content_type=CONTENT_TYPE, type=kind, delivery_mode=1)
        self.channel.basic_publish(
            name(self.namespace, "amqpsched.workers"), "", json.dumps(body).encode(), properties
        )

    def wait_for_welcome(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.notices and time.monotonic() < deadline:
            self.connection.process_data_events(time_limit=0.05)

    def consume(self) -> None:
        self.channel.basic_consume(
            self.task_queue,
            self._on_task,
            auto_ack=False,
            arguments={"x-consumer-timeout": 60_000},
        )

    def _event(self, kind: str, body: dict[str, Any]) -> None:
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE, type=kind, message_id=body["task_id"], delivery_mode=2
        )
        self.channel.basic_publish(
            name(self.namespace, "amqpsched.events"),
            name(self.namespace, "amqpsched.results"),
            json.dumps(body).encode(),
            properties,
            mandatory=True,
        )

    def pump(self, seconds: float) -> None:
        """Serve the connection for ``seconds``, handling every task delivered meanwhile."""
        self.connection.process_data_events(time_limit=seconds)
        while self._deliveries:
            method, _properties, raw = self._deliveries.pop(0)
            task = json.loads(raw)
            now = time.time()
            common = {
                "v": 1,
                "task_id": task["task_id"],
                "capability": task["capability"],
                "attempt": task["attempt"],
                "worker_id": self.worker_id,
                "reply_to": task["reply_to"],
                "correlation_id": task["correlation_id"],
                "submitted_at": task["submitted_at"],
            }
            if self._cancelled.get(task["task_id"], 0) > now:
                error = {"type": "cancelled", "message": "cancelled", "exception": None}
                outcome = {**common, "status": "failed", "error": error, "started_at": None}
                self.handled[task["task_id"]] = "skipped: cancelled"
            else:
                started = {
                    "v": 1,
                    "task_id": task["task_id"],
                    "attempt": task["attempt"],
                    "worker_id": self.worker_id,
                    "started_at": now,
                }
                self._event("started", started)
                result = str(task["payload"]).upper()
                outcome = {**common, "status": "succeeded", "result": result, "started_at": now}
                self.handled[task["task_id"]] = "ran"
            # ``error`` / ``result`` left out where they are null: the scheduler's defaults.
            self._event("outcome", {**outcome, "finished_at": time.time()})
            self.channel.basic_ack(method.delivery_tag)  # only after the confirmed outcome


async def test_foreign_worker_waits_for_the_welcome_skips_a_cancelled_task_and_runs_one(
    system: System,
) -> None:
    await system.scheduler()
    capability = f"upper-{uuid.uuid4().hex[:8]}"
    system.capabilities.add(capability)
    cancelled_id, run_id = f"foreign-{uuid.uuid4().hex}", f"foreign-{uuid.uuid4().hex}"
    url = url_of(system)

    def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with ForeignClient(url, system.namespace) as client:
            out["cancel_unknown"] = client.request(
                {"v": 1, "task_id": f"never-{uuid.uuid4().hex}"}, kind="cancel"
            )
            # No worker yet: the scheduler declares the capability queue and the task waits there.
            body = {"v": 1, "capability": capability, "payload": "no", "task_id": cancelled_id}
            client.send({**body, "timeout": 60}, kind="submit", correlation_id="k-cancelled")
            deadline = time.monotonic() + 10
            while True:  # a cancel could overtake the submission (section 13): wait for it
                state = client.request({"v": 1, "task_id": cancelled_id}, kind="status")
                if state.body["state"] != "unknown" or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            out["cancel"] = client.request({"v": 1, "task_id": cancelled_id}, kind="cancel")
            out["cancelled_answer"] = client.wait("k-cancelled", 10)

            with ForeignWorker(url, system.namespace, capability) as worker:
                worker.announce("hello")
                worker.wait_for_welcome(timeout=10)
                worker.consume()
                body = {"v": 1, "capability": capability, "payload": "shout", "task_id": run_id}
                client.send({**body, "timeout": 30}, kind="submit", correlation_id="k-run")
                deadline = time.monotonic() + 20
                while (reply := client.poll("k-run")) is None:
                    assert time.monotonic() < deadline, "no answer from the foreign worker"
                    worker.pump(0.05)
                out["run_answer"] = reply
                out["catalog"] = client.request({"v": 1}, kind="capabilities")
                worker.announce("goodbye")
                out["notices"] = list(worker.notices)
                out["handled"] = dict(worker.handled)
                out["worker_id"] = worker.worker_id
            out["cancelled_status"] = client.request(
                {"v": 1, "task_id": cancelled_id}, kind="status"
            )
        return out

    out = await asyncio.to_thread(scenario)
    unknown = out["cancel_unknown"]
    assert unknown.kind == "status_reply"
    assert unknown.body["state"] == "unknown"

    cancel = out["cancel"]
    assert cancel.kind == "status_reply"
    assert cancel.body["state"] == "failed"
    assert cancel.body["answer"]["error"]["type"] == "cancelled"
    answer = out["cancelled_answer"]
    assert answer.kind == "answer"
    assert_answer_shape(answer.body)
    assert answer.body["error"]["type"] == "cancelled"
    assert answer.body["attempts"] == 0
    assert answer.body["worker_id"] is None

    # The welcome named the cancelled task; the worker skipped it and ran the other one.
    kind, welcome = out["notices"][0]
    assert kind == "cancelled"
    assert welcome["v"] == 1
    assert cancelled_id in welcome["task_ids"]
    assert welcome["until"] > time.time()
    assert out["handled"] == {cancelled_id: "skipped: cancelled", run_id: "ran"}

    run = out["run_answer"].body
    assert_answer_shape(run)
    assert run["status"] == "succeeded"
    assert run["result"] == "SHOUT"
    assert run["attempts"] == 1
    assert run["worker_id"] == out["worker_id"]

    entries = {c["name"]: c for c in out["catalog"].body["capabilities"]}
    assert entries[capability]["payload_schema"] == {"type": "string"}
    assert entries[capability]["workers"] == 1
    # The skipped attempt's outcome came after the answer: dropped, the answer stands.
    assert out["cancelled_status"].body["answer"]["error"]["type"] == "cancelled"
