"""A worker's task slots: a semaphore that a draining worker closes, turning every wait for a
slot into a refusal at once. Taking a free slot costs no future; waiting costs one."""

from __future__ import annotations

import asyncio
from collections import deque


class Slots:
    def __init__(self, count: int) -> None:
        self.free = count
        self._waiters: deque[asyncio.Future[bool]] = deque()
        self._closed = False

    async def acquire(self) -> bool:
        """Take a slot, waiting for one if needed; False once :meth:`close` was called."""
        if self._closed:
            return False
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.result():
                self.release()  # handed a slot just as the waiter was cancelled: pass it on
            else:
                fut.cancel()
            raise

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self.free += 1

    def close(self) -> None:
        """Refuse every wait, now and later; slots taken stay taken until released."""
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(False)
