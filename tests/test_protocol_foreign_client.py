"""A client in "another library": pika, written only from docs/protocol.md.

Nothing here uses amqpsched's client SDK, its models or its topology helper to build messages: queue
names come from the namespace rule of the document, bodies are hand-written JSON, and replies are
matched the way the document tells a client to (correlation id, then ``"final": true``). The
in-process scheduler and workers of the ``system`` fixture are the other end.

pika is blocking, so every scenario is a plain function run in a thread (``asyncio.to_thread``)
while the scheduler and workers keep running on the test's event loop. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
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
    ignored: list[tuple[str | None, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        params = pika.URLParameters(self.url)
        params.socket_timeout = 10
        params.blocked_connection_timeout = 30
        self.connection: Any = pika.BlockingConnection(params)
        self.channel: Any = self.connection.channel()
        self.channel.confirm_delivery()  # publisher confirms: basic_publish raises if not routed
        self.submit_queue = name(self.namespace, "tasks.submit")
        # Declared with exactly the scheduler's arguments: idempotent, and requests sent before
        # any scheduler runs are kept instead of dropped.
        self.channel.queue_declare(
            self.submit_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        if self.direct_reply_to:
            self.reply_to = DIRECT_REPLY_TO
        else:
            declared = self.channel.queue_declare("", exclusive=True, auto_delete=True)
            self.reply_to = str(declared.method.queue)
        # Consume before publishing (required for direct reply-to; harmless otherwise).
        self._inbox: list[tuple[str | None, str | None, bytes]] = []
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
        """Publish one request to ``tasks.submit`` through the default exchange."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        properties = pika.BasicProperties(
            content_type=CONTENT_TYPE,
            type=kind,
            correlation_id=correlation_id,
            reply_to=self.reply_to if reply_to == "" else reply_to,
            delivery_mode=2,
        )
        self.channel.basic_publish("", self.submit_queue, raw, properties, mandatory=True)

    def wait(self, correlation_id: str, timeout: float) -> Reply:
        """The first final message for ``correlation_id``; everything else is set aside."""
        deadline = time.monotonic() + timeout
        while True:
            while self._inbox:
                kind, corr, raw = self._inbox.pop(0)
                reply = self._accept(kind, corr, raw, correlation_id)
                if reply is not None:
                    return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no final reply for {correlation_id!r} in {timeout}s")
            self.connection.process_data_events(time_limit=min(0.2, remaining))

    def _accept(self, kind: str | None, corr: str | None, raw: bytes, wanted: str) -> Reply | None:
        if corr != wanted:
            self.ignored.append((corr, raw))  # someone else's, or stale
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            self.ignored.append((corr, raw))
            return None
        if not isinstance(body, dict) or body.get("final") is not True:
            self.ignored.append((corr, raw))  # a non-final message: ignore it
            return None
        return Reply(kind, corr, body)

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
        assert error["type"] in (
            "invalid_request",
            "no_worker",
            "expired",
            "invalid_payload",
            "handler_error",
            "internal_error",
        )
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
    ],
    ids=["unknown_version", "malformed_json"],
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
