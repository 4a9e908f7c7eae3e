"""Every exchange, queue, routing key and queue argument of amqpsched, as values, with idempotent
``declare`` functions. Nothing else names a queue or an exchange."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aiormq.exceptions
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, ExchangeType

from .errors import BrokerError
from .retry import DELAY_STEPS_MS

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
#: Dead-letter without loss: the source queue refuses publishes rather than drop a dead letter.
AT_LEAST_ONCE: dict[str, Any] = {
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
}
#: Not ``x-``-prefixed: a headers exchange ignores such headers when matching.
DELAY_HEADER = "amqpsched-delay"
#: Routing key of the journal on the tasks exchange; not a valid capability name.
JOURNAL_KEY = "_journal"

_Declare = Callable[[AbstractChannel], Awaitable[object]]


@dataclass(frozen=True)
class Topology:
    """The names of one amqpsched system. ``namespace`` prefixes all of them (empty: none)."""

    namespace: str = ""
    #: Deliveries of one task message before the broker dead-letters it (a poison message).
    delivery_limit: int = 10
    _declared: set[str] = field(default_factory=set, compare=False, repr=False)

    def _n(self, name: str) -> str:
        return f"{self.namespace}.{name}" if self.namespace else name

    # -- names ---------------------------------------------------------------------------------
    @property
    def submit_queue(self) -> str:
        """Quorum queue the scheduler consumes; clients publish to it through
        :attr:`submit_exchange`, with the queue's name as routing key."""
        return self._n("tasks.submit")

    @property
    def submit_exchange(self) -> str:
        """Direct exchange whose only binding is :attr:`submit_queue` (key: the queue's name). A
        client needs write on it alone, not on the default exchange that reaches every queue."""
        return self._n("amqpsched.submit")

    @property
    def tasks_exchange(self) -> str:
        """Topic exchange the scheduler dispatches tasks to; routing key = capability."""
        return self._n("amqpsched.tasks")

    def capability_queue(self, capability: str) -> str:
        """Quorum queue shared by every worker of one capability."""
        return self._n(f"amqpsched.cap.{capability}")

    def capability_arguments(self) -> dict[str, Any]:
        """A task delivered ``delivery_limit`` times (its worker died each time) goes to the
        results queue, where the scheduler answers it and keeps it in the dead-letter queue."""
        return {
            **QUORUM,
            **AT_LEAST_ONCE,
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.events_exchange,
            "x-dead-letter-routing-key": self.results_queue,
        }

    @property
    def delay_exchange(self) -> str:
        """Headers exchange routing a retry to the TTL queue of its delay."""
        return self._n("amqpsched.delay")

    def delay_queue(self, delay_ms: int) -> str:
        """Holds retries ``delay_ms``, then dead-letters them to the tasks exchange (same key)."""
        return self._n(f"amqpsched.delay.{delay_ms}")

    @property
    def control_exchange(self) -> str:
        """Fanout exchange of scheduler -> worker notices (cancellations)."""
        return self._n("amqpsched.control")

    def control_queue(self, worker_id: str) -> str:
        return self._n(f"amqpsched.control.{worker_id}")

    @property
    def results_queue(self) -> str:
        """Quorum queue carrying workers' started/outcome events to the scheduler."""
        return self._n("amqpsched.results")

    @property
    def events_exchange(self) -> str:
        """Direct exchange whose only binding is :attr:`results_queue` (key: the queue's name):
        workers publish their events there, and capability queues dead-letter there."""
        return self._n("amqpsched.events")

    @property
    def replies_exchange(self) -> str:
        """Topic exchange of direct answers: a worker publishes a lone succeeded outcome there
        once, with the results queue's name as routing key and ``BCC`` the client's reply queue,
        so the client gets its answer one hop sooner. Bound: :attr:`results_queue` (key: its
        name) and the reply queue of every client that takes direct answers (key: its name)."""
        return self._n("amqpsched.replies")

    @property
    def registry_exchange(self) -> str:
        """Fanout exchange of worker hello / heartbeat / goodbye messages."""
        return self._n("amqpsched.workers")

    def registry_queue(self, scheduler_id: str) -> str:
        """Each scheduler's own exclusive queue on the registry exchange."""
        return self._n(f"amqpsched.registry.{scheduler_id}")

    @property
    def journal_queue(self) -> str:
        """Stream of the scheduler's decisions, replayed when a scheduler starts."""
        return self._n("amqpsched.journal")

    async def declare_journal(self, channel: AbstractChannel, max_age_s: int) -> AbstractQueue:
        queue = await channel.declare_queue(
            self.journal_queue,
            durable=True,
            arguments={"x-queue-type": "stream", "x-max-age": f"{max_age_s}s"},
        )
        exchange = await channel.declare_exchange(
            self.tasks_exchange, ExchangeType.TOPIC, durable=True
        )
        # A dispatch carries `BCC: [JOURNAL_KEY]`: the same publish lands in the journal.
        await queue.bind(exchange, routing_key=JOURNAL_KEY)
        return queue

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
        """The submit queue with the exchange that feeds it."""
        queue = await channel.declare_queue(self.submit_queue, durable=True, arguments=QUORUM)
        exchange = await channel.declare_exchange(
            self.submit_exchange, ExchangeType.DIRECT, durable=True
        )
        await queue.bind(exchange, routing_key=self.submit_queue)
        return queue

    def _core(self) -> dict[str, tuple[Literal["queue", "exchange"], _Declare]]:
        """The core queues and exchanges, which the scheduler owns: name -> (kind, declaration)."""

        def exchange(name: str, kind: ExchangeType) -> _Declare:
            return lambda channel: channel.declare_exchange(name, kind, durable=True)

        async def results(channel: AbstractChannel) -> None:
            queue = await channel.declare_queue(self.results_queue, durable=True, arguments=QUORUM)
            events = await channel.declare_exchange(
                self.events_exchange, ExchangeType.DIRECT, durable=True
            )
            await queue.bind(events, routing_key=self.results_queue)
            replies = await channel.declare_exchange(
                self.replies_exchange, ExchangeType.TOPIC, durable=True
            )
            await queue.bind(replies, routing_key=self.results_queue)

        async def dead_letters(channel: AbstractChannel) -> None:
            dlx = await channel.declare_exchange(
                self.dead_letter_exchange, ExchangeType.FANOUT, durable=True
            )
            dead = await channel.declare_queue(
                self.dead_letter_queue, durable=True, arguments=QUORUM
            )
            await dead.bind(dlx, routing_key="")

        # An exchange is declared with the queue it feeds: nothing is published to nowhere.
        return {
            self.submit_queue: ("queue", self.declare_submit),
            self.submit_exchange: ("exchange", self.declare_submit),
            self.tasks_exchange: ("exchange", exchange(self.tasks_exchange, ExchangeType.TOPIC)),
            self.results_queue: ("queue", results),
            self.events_exchange: ("exchange", results),
            self.replies_exchange: ("exchange", results),
            self.registry_exchange: ("exchange", self.declare_registry_exchange),
            self.dead_letter_exchange: ("exchange", dead_letters),
            self.delay_exchange: ("exchange", exchange(self.delay_exchange, ExchangeType.HEADERS)),
            self.control_exchange: (
                "exchange",
                exchange(self.control_exchange, ExchangeType.FANOUT),
            ),
        }

    async def declare_core(self, channel: AbstractChannel) -> None:
        """Everything but the capability queues and the journal: idempotent. The scheduler's job;
        other roles :meth:`ensure` what they use."""
        done: list[_Declare] = []
        for _, declare in self._core().values():
            if declare not in done:  # a queue and its exchange share one declaration
                await declare(channel)
                done.append(declare)

    async def ensure(self, channel: AbstractChannel, name: str) -> None:
        """Make sure the core queue or exchange ``name`` exists; declare it (as
        :meth:`declare_core` does) only if it does not. The check is a passive declare, which
        needs no permission: a role that uses but does not own an entity needs no configure
        permission on it, so it cannot delete it either. It runs on a short-lived channel of its
        own, as a missing entity closes the channel (404 NOT_FOUND); ``channel`` survives.

        Raises :class:`BrokerError` if ``name`` is missing and this user may not create it."""
        kind, declare = self._core()[name]
        try:
            underlay = await channel.get_underlay_channel()
            probe = await underlay.connection.channel(publisher_confirms=False)
        except (RuntimeError, aiormq.exceptions.AMQPError) as exc:  # the connection is closed
            raise BrokerError(f"could not check {name}: {exc.__class__.__name__}") from exc
        try:
            if kind == "queue":
                await probe.queue_declare(name, passive=True)
            else:
                await probe.exchange_declare(name, passive=True)
            return
        except aiormq.exceptions.ChannelNotFoundEntity:
            pass  # the broker closed the probe channel
        finally:
            if not probe.is_closed:
                await probe.close()
        try:
            await declare(channel)
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise BrokerError(
                f"{name} does not exist and this user may not create it: start a scheduler first"
            ) from exc

    async def declare_delay(self, channel: AbstractChannel, delay_ms: int) -> None:
        if f"delay:{delay_ms}" in self._declared:
            return
        await self.ensure(channel, self.delay_exchange)
        queue = await channel.declare_queue(
            self.delay_queue(delay_ms),
            durable=True,
            arguments={
                **QUORUM,
                **AT_LEAST_ONCE,
                "x-message-ttl": delay_ms,
                "x-dead-letter-exchange": self.tasks_exchange,
            },
        )
        await queue.bind(
            self.delay_exchange, arguments={"x-match": "all", DELAY_HEADER: str(delay_ms)}
        )
        self._declared.add(f"delay:{delay_ms}")

    async def declare_control_queue(
        self, channel: AbstractChannel, worker_id: str
    ) -> AbstractQueue:
        await self.ensure(channel, self.control_exchange)
        queue = await channel.declare_queue(
            self.control_queue(worker_id), exclusive=True, auto_delete=True
        )
        await queue.bind(self.control_exchange, routing_key="")
        return queue

    async def declare_registry_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.declare_exchange(
            self.registry_exchange, ExchangeType.FANOUT, durable=True
        )

    async def declare_capability(self, channel: AbstractChannel, capability: str) -> AbstractQueue:
        await self.ensure(channel, self.tasks_exchange)
        queue = await channel.declare_queue(
            self.capability_queue(capability), durable=True, arguments=self.capability_arguments()
        )
        await queue.bind(self.tasks_exchange, routing_key=capability)
        self._declared.add(capability)
        return queue

    def capability_declared(self, capability: str) -> bool:
        return capability in self._declared

    def forget_capability(self, capability: str) -> None:
        self._declared.discard(capability)

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

    async def bind_replies(self, queue: AbstractQueue) -> None:
        """Bind a reply queue to :attr:`replies_exchange` by its name: workers answer it directly.
        A refusal (the user may not) closes the queue's channel."""
        await queue.bind(self.replies_exchange, routing_key=queue.name)

    def durable_names(self, capabilities: list[str]) -> tuple[list[str], list[str]]:
        """This system's durable queues (those of ``capabilities`` among them) and exchanges."""
        queues = [
            self.submit_queue,
            self.results_queue,
            self.dead_letter_queue,
            self.journal_queue,
            *(self.capability_queue(c) for c in capabilities),
            *(self.delay_queue(ms) for ms in DELAY_STEPS_MS),
        ]
        exchanges = [
            self.submit_exchange,
            self.events_exchange,
            self.replies_exchange,
            self.tasks_exchange,
            self.registry_exchange,
            self.dead_letter_exchange,
            self.delay_exchange,
            self.control_exchange,
        ]
        return queues, exchanges

    async def delete_all(self, channel: AbstractChannel, capabilities: list[str]) -> None:
        """Remove this system's durable queues and exchanges (tests, teardown)."""
        queues, exchanges = self.durable_names(capabilities)
        for name in queues:
            await channel.queue_delete(name)
        for ex in exchanges:
            await channel.exchange_delete(ex)


__all__ = ["QUORUM", "Topology"]
