"""Schedulers side by side: which others are alive, and which one runs a task's timers.

Every scheduler appends an ``alive`` record to the journal each heartbeat interval and reads
everyone's records (it follows the journal), so each knows the others without a channel of their
own. A task's timers (its deadline, the re-dispatch when its worker dies) are run by the scheduler
that dispatched it, its *owner*; when the owner is gone, by one survivor, the same one for a given
task in every survivor's view: rendezvous hashing of the task id over the live schedulers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def rendezvous(key: str, candidates: Iterable[str]) -> str | None:
    """The candidate that ``key`` belongs to: the highest hash of (candidate, key). Stable
    across processes (not Python's randomised ``hash``); a candidate's leaving moves only its
    own keys."""
    best: tuple[bytes, str] | None = None
    for candidate in candidates:
        digest = hashlib.blake2b(f"{candidate}\0{key}".encode(), digest_size=8).digest()
        if best is None or (digest, candidate) > best:
            best = (digest, candidate)
    return best[1] if best else None


class Peers:
    """The other schedulers, from their ``alive`` and ``gone`` journal records."""

    def __init__(self, me: str, window: float) -> None:
        self.me = me
        self.window = window
        self._seen: dict[str, float] = {}

    def seen(self, scheduler_id: str, at: float) -> None:
        if scheduler_id != self.me and at > self._seen.get(scheduler_id, 0.0):
            self._seen[scheduler_id] = at

    def gone(self, scheduler_id: str) -> None:
        self._seen.pop(scheduler_id, None)
        self._seen[scheduler_id] = float("-inf")  # a late `alive` of it must not revive it

    def alive(self, scheduler_id: str, now: float) -> bool:
        return (
            scheduler_id == self.me
            or self._seen.get(scheduler_id, float("-inf")) + (self.window) >= now
        )

    def live(self, now: float) -> list[str]:
        """Every live scheduler, this one included."""
        return [self.me, *(s for s, at in self._seen.items() if at + self.window >= now)]

    def behind(self, since: float, now: float) -> list[str]:
        """The other live schedulers whose latest ``alive`` record read here is older than
        ``since``."""
        return [s for s, at in self._seen.items() if at + self.window >= now and at < since]

    def others(self, now: float) -> bool:
        return len(self.live(now)) > 1

    def runs_timers(self, owner: str | None, task_id: str, now: float) -> bool:
        """Whether this scheduler runs the timers of ``task_id``, dispatched by ``owner``."""
        if owner == self.me:
            return True
        if owner is not None and self.alive(owner, now):
            return False
        return rendezvous(task_id, self.live(now)) == self.me

    def forget_old(self, now: float, keep: float) -> None:
        self._seen = {s: at for s, at in self._seen.items() if at + keep >= now}
