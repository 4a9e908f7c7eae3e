"""Every exchange, queue, routing key and queue argument of amqpsched, as values, with idempotent
``declare`` functions. Nothing else names a queue or an exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}


@dataclass(frozen=True)
class Topology:
    """The names of one amqpsched system. ``namespace`` prefixes all of them (empty: none)."""

    namespace: str = ""
    _declared: set[str] = field(default_factory=set, compare=False, repr=False)

    def _n(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    # -- names ---------------------------------------------------------------------------------
    @property
    def submit_queue(self) -> str:
        """Quorum queue the scheduler consumes; clients publish to it via the default exchange."""
        return self._n("tasks.submit")

    @property
    def tasks_exchange(self) -> str:
        """Topic exchange the scheduler dispatches tasks to; routing key = capability."""
        return self._n("amqpsched.tasks")

    def capability_queue(self, capability: str) -> str:
        """Quorum queue shared by every worker of one capability."""
        return self._n(f"amqpsched.cap.{capability}")

    @property
    def results_queue(self) -> str:
        """Quorum queue carrying workers' started/outcome events to the scheduler."""
        return self._n("amqpsched.results")

    @property
    def registry_exchange(self) -> str:
        """Fanout exchange of worker hello / heartbeat / goodbye messages."""
        return self._n("amqpsched.workers")

    def registry_queue(self, scheduler_id: str) -> str:
        """Each scheduler's own exclusive queue on the registry exchange."""
        return self._n(f"amqpsched.registry.{scheduler_id}")

    @property
    def dead_letter_exchange(self) -> str:
        return self._n("amqpsched.dlx")

    @property
    def dead_letter_queue(self) -> str:
        """Quorum queue keeping every rejected message, with its reason in the headers."""
        return self._n("amqpsched.dead")

    def reply_queue(self, client_id: str) -> str:
        """A client's exclusive reply queue."""
        return self._n(f"amqpsched.reply.{client_id}")

    # -- declarations --------------------------------------------------------------------------
    async def declare_submit(self, channel: AbstractChannel) -> AbstractQueue:
        return await channel.declare_queue(self.submit_queue, durable=True, arguments=QUORUM)

    async def declare_core(self, channel: AbstractChannel) -> None:
        """Everything but the capability queues: idempotent, safe from any process."""
        await self.declare_submit(channel)
        await channel.declare_exchange(self.tasks_exchange, ExchangeType.TOPIC, durable=True)
        await channel.declare_queue(self.results_queue, durable=True, arguments=QUORUM)
        await self.declare_registry_exchange(channel)
        dlx = await channel.declare_exchange(
            self.dead_letter_exchange, ExchangeType.FANOUT, durable=True
        )
        dead = await channel.declare_queue(self.dead_letter_queue, durable=True, arguments=QUORUM)
        await dead.bind(dlx, routing_key="")

    async def declare_registry_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.registry_exchange, ExchangeType.FANOUT, durable=True
        )

    async def declare_capability(self, channel: AbstractChannel, capability: str) -> AbstractQueue:
        exchange = await channel.declare_exchange(
            self.tasks_exchange, ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            self.capability_queue(capability), durable=True, arguments=QUORUM
        )
        await queue.bind(exchange, routing_key=capability)
        self._declared.add(capability)
        return queue

    def capability_declared(self, capability: str) -> bool:
        return capability in self._declared

    async def declare_registry_queue(
        self, channel: AbstractChannel, scheduler_id: str
    ) -> AbstractQueue:
        exchange = await self.declare_registry_exchange(channel)
        queue = await channel.declare_queue(
            self.registry_queue(scheduler_id), exclusive=True, auto_delete=True
        )
        await queue.bind(exchange, routing_key="")
        return queue

    async def declare_reply_queue(self, channel: AbstractChannel, client_id: str) -> AbstractQueue:
        return await channel.declare_queue(
            self.reply_queue(client_id), exclusive=True, auto_delete=True
        )

    async def delete_all(self, channel: AbstractChannel, capabilities: list[str]) -> None:
        """Remove this system's durable queues and exchanges (tests, teardown)."""
        for name in [
            self.submit_queue,
            self.results_queue,
            self.dead_letter_queue,
            *(self.capability_queue(c) for c in capabilities),
        ]:
            await channel.queue_delete(name)
        for ex in (self.tasks_exchange, self.registry_exchange, self.dead_letter_exchange):
            await channel.exchange_delete(ex)


__all__ = ["QUORUM", "Topology"]
