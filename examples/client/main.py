"""The async client SDK, one call of each kind: ``python examples/client/main.py``.

Needs a scheduler and a worker with ``echo``, ``wordcount`` and ``square`` (see
``examples/scheduler`` and ``examples/worker``), on the same ``AMQPSCHED_AMQP_URL`` and
``AMQPSCHED_NAMESPACE``."""

from __future__ import annotations

import asyncio
import json
import sys

from amqpsched import AmqpschedError, Client, Settings, TaskFailed

TEXT = """The quick brown fox jumps over the lazy dog.
The dog sleeps; the fox runs.
"""


async def main() -> int:
    async with Client(Settings()) as client:
        # call: submit, wait for the answer, return the result (or raise TaskFailed).
        echoed = await client.call("echo", {"hello": "world", "n": [1, 2, 3]}, timeout=30)
        print(f"echo -> {json.dumps(echoed)}")

        counted = await client.call("wordcount", {"text": TEXT, "top": 3}, timeout=30)
        print(f"wordcount -> {json.dumps(counted)}")

        # submit: returns a handle at once; thousands can be in flight on one client.
        handles = [
            await client.submit("square", {"n": n, "delay": 0.1}, timeout=30) for n in range(1, 6)
        ]
        squares = await asyncio.gather(*(h.result() for h in handles))
        print(f"square -> {json.dumps(squares)}")

        # status: ask the scheduler about any task id it remembers.
        status = await client.status(handles[0].task_id)
        print(f"status {status.task_id} -> {status.state.value} after {status.attempts} attempt(s)")

        # failures are exceptions carrying the protocol's error type.
        try:
            await client.call("wordcount", {"txt": "no text field"}, timeout=30)
        except TaskFailed as exc:
            print(f"wordcount with a bad payload -> {exc.error_type}")

        # the live catalog: every capability some worker offers right now.
        print("capabilities:")
        for entry in await client.capabilities():
            print(f"  {entry.name:10} workers={entry.workers} slots={entry.slots}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except AmqpschedError as exc:
        print(f"client example failed: {exc}", file=sys.stderr)
        sys.exit(1)
