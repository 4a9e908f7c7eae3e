"""Cluster mode groundwork, on a private three-node RabbitMQ cluster (tests/rabbit_cluster.py):
the cluster forms, quorum queues get a member on every node, and a connection made with the
three URLs fails over when its node stops or crashes, its consumer and publisher carrying on
with no message lost."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection, DeliveryMode

from amqpsched import transport
from amqpsched.errors import BrokerError
from amqpsched.settings import Settings

from .rabbit_cluster import (  # noqa: F401 (the fixtures)
    RabbitCluster,
    rabbit_cluster_fixture,
    rabbit_cluster_module_fixture,
)
from .rabbit_node import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.system]

#: Longest wait for one step (a failover, a node's restart, the consumer catching up).
STEP = 30.0
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


class Inbox:
    """Message ids a consumer got; ``wait_for`` returns once it holds all of them. While
    ``hold()`` is on, messages are recorded but not acked (they stay unacked on the broker)."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.deliveries = 0
        self.redeliveries = 0
        self._changed = asyncio.Event()
        self._acking = asyncio.Event()
        self._acking.set()

    async def on_message(self, incoming: AbstractIncomingMessage) -> None:
        self.deliveries += 1
        self.redeliveries += incoming.redelivered is True
        if incoming.message_id:
            self.ids.add(incoming.message_id)
        self._changed.set()
        if not self._acking.is_set():  # decided on arrival, as hold() is called between two
            # Cancelled with its channel when the connection breaks: the broker redelivers.
            await asyncio.wait_for(self._acking.wait(), STEP)
        await transport.settle(incoming)

    def hold(self) -> None:
        self._acking.clear()

    def release(self) -> None:
        self._acking.set()

    async def wait_for(self, wanted: set[str], timeout: float = STEP) -> None:
        await self.wait_until(lambda: wanted <= self.ids, timeout)

    async def wait_until(self, condition: Callable[[], bool], timeout: float = STEP) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()


class Reconnects:
    """Counts ``transport.on_reconnect`` calls; ``wait_past(n)`` returns after the n+1-th."""

    def __init__(self, conn: AbstractRobustConnection) -> None:
        self.count = 0
        self._changed = asyncio.Event()
        transport.on_reconnect(conn, self._on_reconnect)

    def _on_reconnect(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait_past(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.count <= count:
                self._changed.clear()
                await self._changed.wait()


@pytest.fixture
async def cluster_settings(rabbit_cluster: RabbitCluster) -> Settings:
    return Settings(amqp_url=rabbit_cluster.amqp_url, connect_timeout=5)


@pytest.fixture
async def quorum_queue(rabbit_cluster: RabbitCluster) -> AsyncIterator[str]:
    """The name of a fresh quorum queue, declared on node 0 and deleted after the test."""
    name = f"cluster-test-{uuid.uuid4().hex[:10]}"
    conn = await aio_pika.connect(rabbit_cluster.urls[0], timeout=STEP)
    async with conn:
        channel = await conn.channel()
        await channel.declare_queue(name, durable=True, arguments=QUORUM)
    yield name
    conn = await aio_pika.connect(rabbit_cluster.urls[1], timeout=STEP)
    async with conn:
        channel = await conn.channel()
        await channel.queue_delete(name)


def test_three_nodes_form_one_cluster(rabbit_cluster: RabbitCluster) -> None:
    assert rabbit_cluster.running_nodes() == set(rabbit_cluster.nodenames)
    assert len(set(rabbit_cluster.urls)) == 3
    assert all(":5672/" not in url for url in rabbit_cluster.urls), "never the shared broker"


def test_quorum_queue_has_a_member_on_every_node(
    rabbit_cluster: RabbitCluster, quorum_queue: str
) -> None:
    members, online = rabbit_cluster.quorum_members(quorum_queue)
    assert members == set(rabbit_cluster.nodenames)
    assert online == members


async def test_connect_skips_an_address_that_does_not_answer(
    rabbit_cluster: RabbitCluster,
) -> None:
    await rabbit_cluster.astop_node(0, kill=True)
    settings = Settings(amqp_url=rabbit_cluster.amqp_url, connect_timeout=5)
    conn = await asyncio.wait_for(transport.connect(settings, "cluster-test-skip"), STEP)
    try:
        assert isinstance(conn, transport.FailoverConnection)
        assert conn.url.port == rabbit_cluster.nodes[1].port
    finally:
        await conn.close()
    await rabbit_cluster.astart_node(0)
    assert await asyncio.to_thread(rabbit_cluster.running_nodes) == set(rabbit_cluster.nodenames)


async def test_an_address_that_accepts_but_never_answers_times_out_to_the_next(
    rabbit_cluster: RabbitCluster,
) -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # says nothing; closed at the end

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"amqp://guest:guest@127.0.0.1:{port}/,{rabbit_cluster.urls[1]}"
    try:
        conn = await asyncio.wait_for(
            transport.connect(Settings(amqp_url=url, connect_timeout=0.5), "cluster-test-hang"),
            STEP,
        )
        try:
            assert isinstance(conn, transport.FailoverConnection)
            assert conn.url.port == rabbit_cluster.nodes[1].port
        finally:
            await conn.close()
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()
    assert accepted, "the silent address was tried first"


async def test_no_address_answers_names_each_without_its_password() -> None:
    ports = [free_port(), free_port()]
    url = ",".join(f"amqp://alice:s3cr3t@127.0.0.1:{port}/" for port in ports)
    with pytest.raises(BrokerError) as failed:
        await asyncio.wait_for(transport.connect(Settings(amqp_url=url), "cluster-test-none"), STEP)
    message = str(failed.value)
    assert all(f"amqp://alice:***@127.0.0.1:{port}/" in message for port in ports), message
    assert "s3cr3t" not in message


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
async def test_failover_keeps_a_quorum_consumer_receiving_with_no_message_lost(
    rabbit_cluster: RabbitCluster, cluster_settings: Settings, quorum_queue: str, kill: bool
) -> None:
    conn = await asyncio.wait_for(
        transport.connect(cluster_settings, f"cluster-test-failover-{kill}"), STEP
    )
    try:
        assert isinstance(conn, transport.FailoverConnection)
        assert conn.url.port == rabbit_cluster.nodes[0].port, "the first address answers"
        reconnects = Reconnects(conn)
        inbox = Inbox()
        consumer = await transport.confirm_channel(conn, prefetch=20)
        queue = await consumer.declare_queue(quorum_queue, durable=True, arguments=QUORUM)
        await queue.consume(inbox.on_message)
        publisher = await transport.confirm_channel(conn)
        confirmed: set[str] = set()

        async def publish(n: int) -> None:
            """Publish message ``n`` until the broker confirms it (at least once)."""
            message_id = f"m{n}"
            async with asyncio.timeout(STEP):
                while True:
                    seen = reconnects.count
                    try:
                        await transport.publish(
                            publisher.default_exchange,
                            aio_pika.Message(
                                b"x", message_id=message_id, delivery_mode=DeliveryMode.PERSISTENT
                            ),
                            quorum_queue,
                        )
                    except BrokerError:
                        # The connection broke (wait for it to come back) or the queue had no
                        # leader yet (try again soon).
                        with contextlib.suppress(TimeoutError):
                            await reconnects.wait_past(seen, timeout=1.0)
                        continue
                    confirmed.add(message_id)
                    return

        # Before: the consumer gets (and acks) what was confirmed.
        for n in range(50):
            await publish(n)
        await inbox.wait_for(confirmed)

        # A backlog when the node the connection is on goes away: up to the prefetch count
        # delivered and not acked, the rest ready in the queue.
        inbox.hold()
        delivered = inbox.deliveries
        for n in range(50, 150):
            await publish(n)
        await inbox.wait_until(lambda: inbox.deliveries >= delivered + 20)
        stopping = asyncio.create_task(rabbit_cluster.astop_node(0, kill=kill))
        # Publishing carries on meanwhile, each message retried until a node confirms it.
        n = 150
        while not stopping.done() or reconnects.count == 0:
            await publish(n)
            n += 1
            assert n < 100_000, "no failover"
        await stopping
        await reconnects.wait_past(0, timeout=STEP)
        assert conn.url.port in {node.port for node in rabbit_cluster.nodes[1:]}
        assert transport.is_connected(conn)

        # After: publishing on the restored channel, consuming on the restored consumer.
        inbox.release()
        for m in range(n, n + 50):
            await publish(m)
        try:
            await inbox.wait_for(confirmed)
        except TimeoutError:
            lost = sorted(confirmed - inbox.ids, key=lambda i: int(i[1:]))
            pytest.fail(
                f"{len(lost)} confirmed messages not received: {lost[:20]}...\n"
                f"{rabbit_cluster.diagnose()}"
            )
        assert len(confirmed) == n + 50
        assert inbox.redeliveries >= 20, "the unacked backlog came back through the new node"
        assert reconnects.count == 1, "one failover, one reconnect"
    finally:
        await conn.close()

    # The node comes back and rejoins; the queue's member there is online again.
    await rabbit_cluster.astart_node(0)
    everyone = set(rabbit_cluster.nodenames)
    assert await asyncio.to_thread(rabbit_cluster.running_nodes) == everyone
    async with asyncio.timeout(STEP):  # each look is one rabbitmqctl round trip
        while (await asyncio.to_thread(rabbit_cluster.quorum_members, quorum_queue))[1] != everyone:
            pass
