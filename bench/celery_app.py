"""The Celery side of the bench: one echo task on the shared RabbitMQ, ``rpc://`` results.

The worker runs ``celery -A bench.celery_app worker`` with ``BENCH_AMQP_URL`` and
``BENCH_CELERY_QUEUE`` set; the bench builds its client with :func:`make_app`."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

TASK = "bench.echo"


def make_app(amqp_url: str, queue: str) -> Any:
    app = Celery("bench", broker=amqp_url, backend="rpc://")
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        # No pidbox, event or gossip queues: only the task queue and its exchange are created
        # (plus the client's auto-delete reply queue).
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
    )

    @app.task(name=TASK, shared=False)  # type: ignore[untyped-decorator]
    def echo(payload: Any) -> Any:
        return payload

    return app


app = make_app(
    os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    os.environ.get("BENCH_CELERY_QUEUE", "bench.celery"),
)
