"""The registry of live workers: pure bookkeeping over hello / heartbeat / goodbye messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..protocol import BATCH_FEATURE, CapabilityInfo, CatalogEntry, Kind, WorkerAnnouncement

#: Most tasks in one dispatch message, and how many per slot of the smallest worker.
BATCH_CAP = 256
BATCH_PER_SLOT = 2


@dataclass
class WorkerInfo:
    worker_id: str
    hostname: str
    pid: int
    capabilities: dict[str, CapabilityInfo]
    concurrency: int
    in_flight: int
    last_seen: float
    first_seen: float = field(default=0.0)
    features: frozenset[str] = frozenset()

    def shape(self) -> tuple[frozenset[str], int, frozenset[str]]:
        """What the batch limits depend on."""
        return self.features, self.concurrency, frozenset(self.capabilities)


class Registry(Protocol):
    """What the scheduler needs to know about workers; shared implementations may come later."""

    def observe(self, kind: Kind, announcement: WorkerAnnouncement, now: float) -> None: ...
    def sweep(self, now: float) -> list[str]: ...
    def excuse(self, now: float) -> None: ...
    def has_live(self, capability: str) -> bool: ...
    def catalog(self) -> list[CatalogEntry]: ...


class WorkerRegistry:
    """Workers are live from their hello (or first heartbeat) until their goodbye, or until
    ``interval * miss_limit`` seconds pass without a heartbeat."""

    def __init__(self, heartbeat_interval: float, miss_limit: int) -> None:
        self.liveness_window = heartbeat_interval * miss_limit
        self._workers: dict[str, WorkerInfo] = {}
        self._batch_limits: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._workers)

    def deadline(self, worker: WorkerInfo) -> float:
        return worker.last_seen + self.liveness_window

    def observe(self, kind: Kind, announcement: WorkerAnnouncement, now: float) -> None:
        if kind == Kind.GOODBYE:
            if self._workers.pop(announcement.worker_id, None) is not None:
                self._batch_limits.clear()
            return
        known = self._workers.get(announcement.worker_id)
        info = self._workers[announcement.worker_id] = WorkerInfo(
            worker_id=announcement.worker_id,
            hostname=announcement.hostname,
            pid=announcement.pid,
            capabilities={c.name: c for c in announcement.capabilities},
            concurrency=announcement.concurrency,
            in_flight=announcement.in_flight,
            last_seen=now,
            first_seen=known.first_seen if known else now,
            features=frozenset(announcement.features),
        )
        if known is None or known.shape() != info.shape():
            self._batch_limits.clear()

    def excuse(self, now: float) -> None:
        """The scheduler was cut off from the broker until ``now``: heartbeats could not reach it,
        so none counts as missed. Every known worker gets a whole liveness window from now."""
        for worker in self._workers.values():
            worker.last_seen = max(worker.last_seen, now)

    def sweep(self, now: float) -> list[str]:
        """Forget workers whose deadline passed; return their ids."""
        dead = [w.worker_id for w in self._workers.values() if self.deadline(w) < now]
        for worker_id in dead:
            del self._workers[worker_id]
        if dead:
            self._batch_limits.clear()
        return dead

    def batch_limit(self, capability: str) -> int:
        """Most tasks of ``capability`` one dispatch message may carry: 1 (no ``task_batch``)
        unless every live worker offering it takes batches; then a few per slot of the
        smallest one, so a batch does not leave other workers idle."""
        limit = self._batch_limits.get(capability)
        if limit is None:
            workers = self.live(capability)
            if workers and all(BATCH_FEATURE in w.features for w in workers):
                smallest = min(w.concurrency for w in workers)
                limit = max(1, min(BATCH_CAP, smallest * BATCH_PER_SLOT))
            else:
                limit = 1
            self._batch_limits[capability] = limit
        return limit

    def get(self, worker_id: str) -> WorkerInfo | None:
        return self._workers.get(worker_id)

    def live(self, capability: str | None = None) -> list[WorkerInfo]:
        return [
            w for w in self._workers.values() if capability is None or capability in w.capabilities
        ]

    def has_live(self, capability: str) -> bool:
        return any(capability in w.capabilities for w in self._workers.values())

    def catalog(self) -> list[CatalogEntry]:
        entries: dict[str, CatalogEntry] = {}
        for worker in sorted(self._workers.values(), key=lambda w: w.first_seen):
            for name, info in worker.capabilities.items():
                prev = entries.get(name)
                entries[name] = CatalogEntry(
                    name=name,
                    # the longest-known worker's description and schema win
                    description=prev.description if prev else info.description,
                    payload_schema=prev.payload_schema if prev else info.payload_schema,
                    workers=(prev.workers if prev else 0) + 1,
                    slots=(prev.slots if prev else 0) + worker.concurrency,
                    in_flight=(prev.in_flight if prev else 0) + worker.in_flight,
                )
        return [entries[k] for k in sorted(entries)]
