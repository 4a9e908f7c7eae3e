"""Which of a scheduler's journal writes it has not read back: confirmed by the broker, yet not
in the journal. Pure: no I/O.

A confirm does not prove a journal write is stored. When the node holding the journal stream's
leader stops, RabbitMQ 3.10 confirms the publishes on their way to that leader although the
stream never stores them (an answer then reaches its client, with no journal entry: the other
schedulers report its task ``running`` for good). A scheduler reads its own writes back anyway
(it follows the journal, skipping its own entries): a write confirmed before another write of
its own was sent, the later one read back and the earlier one not, is lost, as the stream keeps
entries in the order it stored them. It is then written again (a second copy of an entry is
harmless)."""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol import Kind


def entries(body: bytes, kind: str) -> list[bytes]:
    """What the journal reader hands on of one write: its body, or each line of JSON records
    (``journal`` writes group records, one a line)."""
    return body.splitlines() if kind == Kind.JOURNAL else [body]


@dataclass
class _Write:
    kind: str
    sent_at: float
    confirmed_at: float | None = None


class Unread:
    """Journal writes sent and not read back yet, by body (two writes with one body are one)."""

    def __init__(self) -> None:
        self._writes: dict[bytes, _Write] = {}
        #: When the latest write read back was sent.
        self._read_sent_at = float("-inf")

    def __len__(self) -> int:
        return len(self._writes)

    def sent(self, body: bytes, kind: str, now: float) -> None:
        """A write of ``body`` is about to be published."""
        for entry in entries(body, kind):
            self._writes[entry] = _Write(kind, now)

    def confirmed(self, body: bytes, kind: str, now: float) -> None:
        """The broker confirmed it (if it was read back meanwhile, nothing is left to do)."""
        for entry in entries(body, kind):
            write = self._writes.get(entry)
            if write is not None:
                write.confirmed_at = now

    def failed(self, body: bytes, kind: str) -> None:
        """Its publish failed: whoever sent it deals with that."""
        for entry in entries(body, kind):
            self._writes.pop(entry, None)

    def read(self, body: bytes) -> None:
        """An entry of this scheduler came back from the journal (a JSON record: one line)."""
        write = self._writes.pop(body, None)
        if write is not None:
            self._read_sent_at = max(self._read_sent_at, write.sent_at)

    def lost(self, now: float, keep: float = 600.0) -> list[tuple[bytes, str]]:
        """The writes confirmed before a later write was sent that is read back: not stored.
        Each is returned once (written again, it is :meth:`sent` again). Writes sent more than
        ``keep`` seconds ago and still not read back are forgotten (the journal is not being
        read)."""
        gone = [
            (body, write.kind)
            for body, write in self._writes.items()
            if write.confirmed_at is not None and write.confirmed_at < self._read_sent_at
        ]
        stale = [body for body, write in self._writes.items() if write.sent_at < now - keep]
        for body in [*(b for b, _ in gone), *stale]:
            self._writes.pop(body, None)
        return gone
