"""A worker with capabilities of its own: ``wordcount`` (sync) and ``square`` (async).

Run it directly, with the built-in ``echo`` too::

    python examples/worker/main.py

or load its ``app`` into the stock worker (from the repository root)::

    python -m amqpsched.worker --app examples.worker.main -c wordcount -c square -c echo

Settings come from ``AMQPSCHED_*`` environment variables (``AMQPSCHED_AMQP_URL``,
``AMQPSCHED_NAMESPACE``...) and ``.env``; SIGTERM or Ctrl+C drains it and stops it."""

from __future__ import annotations

import asyncio
import re
from collections import Counter

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field

from amqpsched import Settings, WorkerApp
from amqpsched.runtime import serve, setup_logging
from amqpsched.worker import Worker
from amqpsched.worker.builtin import app as builtin_app

#: What ``--app examples.worker.main`` loads: this module's capabilities only.
app = WorkerApp()

WORD = re.compile(r"[\w']+")


class WordCountPayload(BaseModel):
    text: str = Field(max_length=1_000_000, description="The text to count the words of.")
    top: int = Field(default=3, ge=0, le=100, description="How many of the commonest words.")


class WordCountResult(BaseModel):
    words: int
    lines: int
    top: list[tuple[str, int]] = Field(description="The commonest words, most common first.")


@app.capability("wordcount", payload=WordCountPayload)
def wordcount(payload: WordCountPayload) -> WordCountResult:
    """Counts the words and lines of a text and finds its commonest words."""
    # A plain function: the worker runs it in a thread, so CPU work never blocks the worker.
    words = [w.lower() for w in WORD.findall(payload.text)]
    return WordCountResult(
        words=len(words),
        lines=len(payload.text.splitlines()),
        top=Counter(words).most_common(payload.top),
    )


class SquarePayload(BaseModel):
    n: int = Field(description="The number to square.")
    delay: float = Field(default=0.0, ge=0, le=60, description="Seconds to wait first.")


@app.capability("square", payload=SquarePayload)
async def square(payload: SquarePayload) -> int:
    """Squares n after an optional delay (an async handler: it runs on the worker's loop)."""
    await asyncio.sleep(payload.delay)
    return payload.n * payload.n


async def main() -> None:
    settings = Settings()
    setup_logging(settings)
    everything = WorkerApp()
    everything.include(builtin_app)
    everything.include(app)
    registry = CollectorRegistry()
    worker = Worker(everything, ["echo", *app.handlers], settings, registry=registry)
    await serve(worker, settings, registry)


if __name__ == "__main__":
    asyncio.run(main())
