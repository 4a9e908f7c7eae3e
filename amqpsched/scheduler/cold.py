"""Tasks waiting in RabbitMQ, remembered in about 30 bytes each.

A task that was dispatched and has not started needs nothing from the scheduler until an event
about it arrives (its deadline, a worker taking it, a query, a cancel), and everything about it
is in the journal: the very publish that dispatched it wrote it there. So, past a limit, the
scheduler keeps such a task as three numbers in flat arrays (a hash of its id, where to start
looking for its dispatch in the journal, its deadline) and reads the rest back from the journal
when it needs the task again. No Python object per task: a million waiting tasks cost tens of
megabytes, not gigabytes.

Pure: no I/O here. The scheduler moves records in (:meth:`ColdTasks.add`) and back out
(:meth:`ColdTasks.pop`, :meth:`ColdTasks.due`)."""

from __future__ import annotations

import hashlib
import heapq
from array import array
from dataclasses import dataclass
from typing import Any

_EMPTY = -1
_DELETED = -2
_MIN_TABLE = 1024
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
#: A flag: the task was read from the journal (dispatched by a scheduler before this one).
RECOVERED = 1
#: A flag: its submitter takes ``answer_batch`` replies.
BATCH_REPLY = 2
#: Kept here only: its deadline is no earlier than any kept before it (not in a bucket).
_IN_ORDER = 0x80


def id_hash(task_id: str) -> int:
    """A 64-bit hash of a task id, never 0 (0 marks a freed slot)."""
    digest = hashlib.blake2b(task_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


@dataclass(frozen=True, slots=True)
class ColdEntry:
    """What is kept of a waiting task: enough to find its dispatch in the journal again."""

    hash: int
    #: A journal offset at or before the entry that dispatched it.
    since: int
    deadline: float
    capability: str
    flags: int


class ColdTasks:
    """Waiting tasks as flat arrays: slots in the order they were added, an open-addressing
    table from id hash to slot, and deadline buckets (whole seconds) to find the due ones."""

    def __init__(self) -> None:
        self._hash = array("Q")
        #: Offsets and deadlines relative to these, to fit in 4 bytes each.
        self._base_offset: int | None = None
        self._base_time: float | None = None
        self._since = array("i")
        self._deadline = array("f")
        self._cap = array("H")
        self._flags = array("B")
        self._table = array("i", [_EMPTY]) * _MIN_TABLE
        self._used = 0  # table cells not empty (live or deleted)
        self._live = 0
        self._first = 0  # no live slot before this one
        #: Tasks kept with a deadline no earlier than any before them need no bucket: they are
        #: due in slot order, from ``_cursor`` on (most tasks: timeouts are mostly alike).
        self._last_deadline = float("-inf")
        self._cursor = 0
        #: The other tasks by the second of their deadline.
        self._buckets: dict[int, array[int]] = {}
        self._bucket_keys: list[int] = []
        self._caps: list[str] = []
        self._cap_index: dict[str, int] = {}
        self._counts: dict[str, int] = {}

    def __len__(self) -> int:
        return self._live

    def __contains__(self, task_id: str) -> bool:
        return self._find(id_hash(task_id))[1] >= 0

    def counts(self) -> dict[str, int]:
        """Waiting tasks per capability."""
        return dict(self._counts)

    def nbytes(self) -> int:
        """Bytes of the arrays (what a task costs here, times the tasks, plus spare room)."""
        arrays: list[array[Any]] = [
            self._hash,
            self._since,
            self._deadline,
            self._cap,
            self._flags,
            self._table,
        ]
        total = sum(a.buffer_info()[1] * a.itemsize for a in arrays)
        return total + sum(b.buffer_info()[1] * b.itemsize for b in self._buckets.values())

    def add(self, task_id: str, capability: str, deadline: float, since: int, flags: int) -> None:
        """Keep a waiting task (replacing what was kept of the same id)."""
        self.restore(ColdEntry(id_hash(task_id), since, deadline, capability, flags))

    def restore(self, entry: ColdEntry) -> None:
        """Keep again what was taken out (it could not be read back)."""
        h, since, deadline, capability, flags = (
            entry.hash,
            entry.since,
            entry.deadline,
            entry.capability,
            entry.flags,
        )
        if self._find(h)[1] >= 0:
            self._remove(h)
        if self._base_offset is None or self._base_time is None:
            self._base_offset, self._base_time = since, deadline
        elif not _INT32_MIN <= since - self._base_offset <= _INT32_MAX:
            self._compact(rebase=since)
        if (self._used + 1) * 10 > len(self._table) * 7:
            self._make_room()
        slot = len(self._hash)
        cap = self._cap_index.get(capability)
        if cap is None:
            cap = self._cap_index[capability] = len(self._caps)
            self._caps.append(capability)
        self._hash.append(h)
        self._since.append(since - self._base_offset)
        self._deadline.append(deadline - self._base_time)
        self._cap.append(cap)
        in_order = deadline >= self._last_deadline
        if in_order:
            self._last_deadline = deadline
        self._flags.append(flags | _IN_ORDER if in_order else flags & ~_IN_ORDER)
        cell = self._find(h)[0]
        if self._table[cell] == _EMPTY:
            self._used += 1
        self._table[cell] = slot
        self._live += 1
        self._counts[capability] = self._counts.get(capability, 0) + 1
        if not in_order:
            self._bucket(int(deadline), slot)

    def _bucket(self, key: int, slot: int) -> None:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = array("I")
            heapq.heappush(self._bucket_keys, key)
        bucket.append(slot)

    def pop(self, task_id: str) -> ColdEntry | None:
        """Take a task out (it is needed whole again); None if it is not kept here."""
        entry = self._remove(id_hash(task_id))
        self._tidy()
        return entry

    def due(self, now: float, limit: int) -> list[ColdEntry]:
        """Take out up to ``limit`` tasks whose deadline is ``now`` or earlier."""
        out: list[ColdEntry] = []
        rel = now - (self._base_time or 0.0)
        hashes, flags, deadlines = self._hash, self._flags, self._deadline
        self._cursor = max(self._cursor, self._first)
        while self._cursor < len(hashes) and len(out) < limit:
            slot = self._cursor
            if hashes[slot] and flags[slot] & _IN_ORDER:
                if deadlines[slot] > rel:
                    break  # and so are all in order after it
                entry = self._remove(hashes[slot])
                if entry is not None:
                    out.append(entry)
            self._cursor += 1
        while self._bucket_keys and self._bucket_keys[0] <= now and len(out) < limit:
            key = self._bucket_keys[0]
            bucket = self._buckets[key]
            keep = array("I")
            for slot in bucket:
                h = self._hash[slot]
                if h == 0:
                    continue  # taken out since
                if self._deadline[slot] <= rel and len(out) < limit:
                    entry = self._remove(h)
                    if entry is not None:
                        out.append(entry)
                else:
                    keep.append(slot)
            if keep:
                self._buckets[key] = keep
                break  # the rest of this second is not due yet (or over the limit)
            heapq.heappop(self._bucket_keys)
            del self._buckets[key]
        self._tidy()
        return out

    def _find(self, h: int) -> tuple[int, int]:
        """(the table cell for ``h``: where it is or would go, its slot or -1)."""
        table = self._table
        mask = len(table) - 1
        cell = h & mask
        free = -1
        while True:
            slot = table[cell]
            if slot == _EMPTY:
                return (cell if free < 0 else free), -1
            if slot == _DELETED:
                if free < 0:
                    free = cell
            elif self._hash[slot] == h:
                return cell, slot
            cell = (cell + 1) & mask

    def _remove(self, h: int) -> ColdEntry | None:
        cell, slot = self._find(h)
        if slot < 0:
            return None
        capability = self._caps[self._cap[slot]]
        since = self._since[slot] + (self._base_offset or 0)
        deadline = self._deadline[slot] + (self._base_time or 0.0)
        entry = ColdEntry(h, since, deadline, capability, self._flags[slot] & ~_IN_ORDER)
        self._table[cell] = _DELETED
        self._hash[slot] = 0
        self._live -= 1
        left = self._counts[capability] - 1
        if left:
            self._counts[capability] = left
        else:
            del self._counts[capability]
        while self._first < len(self._hash) and self._hash[self._first] == 0:
            self._first += 1
        return entry

    def _tidy(self) -> None:
        """Give back the room of taken-out slots (never while slots are being walked)."""
        if self._live == 0:
            if self._hash:
                self._reset()
        elif self._first * 2 > len(self._hash) and self._first > _MIN_TABLE:
            self._compact()

    def _reset(self) -> None:
        for name in ("_hash", "_since", "_deadline", "_cap", "_flags"):
            setattr(self, name, array(getattr(self, name).typecode))
        self._table = array("i", [_EMPTY]) * _MIN_TABLE
        self._used = self._first = self._cursor = 0
        self._last_deadline = float("-inf")
        self._base_offset = self._base_time = None
        self._buckets.clear()
        self._bucket_keys.clear()

    def _make_room(self) -> None:
        """The table is full (70 %): drop freed slots if there are many, else grow it."""
        if len(self._hash) - self._first > self._live + self._live // 4:
            self._compact()
        else:
            self._rehash()

    def _compact(self, rebase: int | None = None) -> None:
        """Drop freed slots, in place (no second copy of the arrays at any moment). ``rebase``:
        an offset to be added, which offsets must be kept relative to a new base for."""
        hashes, sinces, deadlines, caps, flags = (
            self._hash,
            self._since,
            self._deadline,
            self._cap,
            self._flags,
        )
        old_base = self._base_offset or 0
        if rebase is not None:
            low = high = rebase
            for slot in range(self._first, len(hashes)):
                if hashes[slot]:
                    offset = sinces[slot] + old_base
                    low, high = min(low, offset), max(high, offset)
            if high - low > _INT32_MAX:
                raise OverflowError("journal offsets of waiting tasks are too far apart")
            self._base_offset = low
        shift = old_base - (self._base_offset or 0)
        kept = 0
        for slot in range(self._first, len(hashes)):
            h = hashes[slot]
            if h:
                hashes[kept] = h
                sinces[kept] = sinces[slot] + shift
                deadlines[kept] = deadlines[slot]
                caps[kept] = caps[slot]
                flags[kept] = flags[slot]
                kept += 1
        for column in (hashes, sinces, deadlines, caps, flags):
            del column[kept:]
        self._first = self._cursor = 0
        self._rehash()
        self._buckets.clear()
        self._bucket_keys.clear()
        base = self._base_time or 0.0
        for slot, rel in enumerate(deadlines):
            if not flags[slot] & _IN_ORDER:
                self._bucket(int(rel + base), slot)

    def _rehash(self) -> None:
        """A new table for the live slots, at most 45 % full."""
        size = _MIN_TABLE
        while size * 45 < (self._live + 1) * 100:
            size *= 2
        self._table = table = array("i", [_EMPTY]) * size
        mask = size - 1
        for slot in range(self._first, len(self._hash)):
            h = self._hash[slot]
            if h:
                cell = h & mask
                while table[cell] != _EMPTY:
                    cell = (cell + 1) & mask
                table[cell] = slot
        self._used = self._live
