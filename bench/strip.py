"""``python -m bench --timeline --strip PARTS``: a lone task's round trip with parts of amqpsched
taken out, to bound what tuning could still win. An experiment, never a way to run amqpsched:
each part stripped breaks a guarantee.

- ``outcome``: a worker's direct answer goes to the client alone. No copy reaches the results
  queue, so the scheduler never learns the outcome, never journals the answer and never acks it.
- ``journal``: the scheduler neither writes its journal (no ``BCC`` to the stream, no answer
  copies) nor follows it.
- ``classic-dispatch``: the capability queues are durable classic queues, not quorum queues (no
  delivery limit): the task's second hop costs what a classic hop costs.
- ``classic-results``: so is the results queue (the outcome's copy).

Installed by :mod:`bench.traced` in the processes it runs, from ``BENCH_STRIP`` (comma-separated).
The patches replace methods of the running process only; the package is not changed."""

from __future__ import annotations

from typing import Any

PARTS = ("outcome", "journal", "classic-dispatch", "classic-results")


def parse(text: str) -> set[str]:
    parts = {p.strip() for p in text.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) to strip: {', '.join(sorted(unknown))}")
    return parts


def install(parts: set[str]) -> None:
    if "outcome" in parts:
        _strip_outcome()
    if "journal" in parts:
        _strip_journal()
    classic = {p.removeprefix("classic-") for p in parts if p.startswith("classic-")}
    if classic:
        _classic_queues(classic)


def _classic_queues(which: set[str]) -> None:
    """Declare the capability queues (``dispatch``) and/or the results queue (``results``) as
    durable classic queues instead of quorum queues."""
    from aio_pika.channel import Channel

    from amqpsched.settings import Settings
    from amqpsched.topology import Topology

    topology = Topology(Settings().namespace)  # the names this process declares
    cap_prefix = topology.capability_queue("")
    declare = Channel.declare_queue

    async def declare_queue(self: Channel, name: str | None = None, **kwargs: Any) -> Any:
        args = dict(kwargs.get("arguments") or {})
        is_cap = bool(name) and str(name).startswith(cap_prefix)
        is_results = name == topology.results_queue
        if args.get("x-queue-type") == "quorum" and (
            ("dispatch" in which and is_cap) or ("results" in which and is_results)
        ):
            for key in ("x-queue-type", "x-delivery-limit", "x-dead-letter-strategy"):
                args.pop(key, None)
            kwargs["arguments"] = args
        return await declare(self, name, **kwargs)

    Channel.declare_queue = declare_queue  # type: ignore[method-assign]


def _strip_outcome() -> None:
    from amqpsched import transport
    from amqpsched.protocol import DIRECT_HEADER, Kind, OutcomeEvent
    from amqpsched.worker.reporting import Reporting

    async def publish_direct(
        self: Reporting, event: OutcomeEvent, traceparent: str | None, body: bytes
    ) -> None:
        assert self._replies is not None
        msg = transport.message(
            body,
            Kind.OUTCOME,
            message_id=event.task_id,
            correlation_id=event.correlation_id,
            headers={DIRECT_HEADER: event.reply_to},
        )
        await self._publish(self._replies, msg, event.reply_to, mandatory=True)

    Reporting._publish_direct = publish_direct  # type: ignore[method-assign]


def _strip_journal() -> None:
    from amqpsched import transport
    from amqpsched.scheduler.journal import JournalReader
    from amqpsched.scheduler.outbox import Outbox

    async def publish_journaled(
        self: Outbox, exchange: Any, msg: Any, routing_key: str, *, mandatory: bool = False
    ) -> None:
        if routing_key == self.topology.journal_queue:
            return  # a copy for the journal alone
        if msg.headers and "BCC" in msg.headers:
            msg.headers = {k: v for k, v in msg.headers.items() if k != "BCC"}
        await transport.publish(exchange, msg, routing_key, mandatory=mandatory)

    read = JournalReader.read

    async def read_once(self: JournalReader, **kwargs: Any) -> int:
        kwargs["follow"] = False
        return await read(self, **kwargs)

    Outbox._publish_journaled = publish_journaled  # type: ignore[method-assign]
    JournalReader.read = read_once  # type: ignore[method-assign]
