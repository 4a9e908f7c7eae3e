"""When a worker tells the scheduler that an attempt started: only if it still runs after
:data:`STARTED_DELAY` (a short task's outcome says all that ``started`` would)."""

from __future__ import annotations

import asyncio
from typing import Protocol

#: Seconds an attempt runs before its ``started`` notice is sent.
STARTED_DELAY = 0.05


class Notice(Protocol):
    def send(self) -> None: ...


class StartClock:
    """One timer for the ``started`` notices of every running attempt, not one per attempt: the
    notices fall due in the order they were made (a fixed delay), so the timer waits for the
    oldest still pending, sends what is due, and waits again."""

    def __init__(self, delay: float = STARTED_DELAY) -> None:
        self.delay = delay
        self._pending: dict[Notice, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, notice: Notice) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self.delay
        self._pending[notice] = due
        if self._timer is None:
            self._timer = loop.call_at(due, self._fire)

    def discard(self, notice: Notice) -> None:
        self._pending.pop(notice, None)  # the timer, if it comes first, finds nothing due

    def __len__(self) -> int:
        return len(self._pending)

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._pending:
            notice, due = next(iter(self._pending.items()))
            if due > now:
                self._timer = loop.call_at(due, self._fire)
                return
            del self._pending[notice]
            notice.send()
