"""The Dramatiq side of the bench: one echo actor, RabbitMQ broker, Redis results.

The worker runs ``dramatiq bench.dramatiq_app`` with ``BENCH_AMQP_URL``, ``BENCH_REDIS_URL``,
``BENCH_DRAMATIQ_QUEUE`` and ``BENCH_REDIS_NAMESPACE`` set; the bench builds its client with
:func:`make`."""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

ACTOR = "bench_echo"


def make(amqp_url: str, redis_url: str, queue: str, namespace: str) -> tuple[Any, Any]:
    """The broker (also made the global one) and the echo actor."""
    broker = RabbitmqBroker(url=amqp_url)
    backend = RedisBackend(url=redis_url, namespace=namespace, use_namespace_prefix_keys=True)
    results: Any = Results  # untyped
    broker.add_middleware(results(backend=backend))
    dramatiq.set_broker(broker)

    def echo(payload: Any) -> Any:
        return payload

    actor = dramatiq.actor(actor_name=ACTOR, queue_name=queue, broker=broker, store_results=True)(
        echo
    )
    return broker, actor


if "BENCH_DRAMATIQ_QUEUE" in os.environ:
    broker, echo = make(
        os.environ["BENCH_AMQP_URL"],
        os.environ["BENCH_REDIS_URL"],
        os.environ["BENCH_DRAMATIQ_QUEUE"],
        os.environ["BENCH_REDIS_NAMESPACE"],
    )
