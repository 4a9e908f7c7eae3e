"""``python -m bench --timeline``: where a lone task's round trip goes, segment by segment.

Every process of a system (and the bench's own client) records when each AMQP publish starts
and when each delivery arrives, with the machine's wall clock (one clock for all processes).
Tasks run one at a time; each one's chain of events is cut into segments:

- amqpsched: the submit hop (client publish → the scheduler's delivery, through ``tasks.submit``,
  a quorum queue), the scheduler's turn (→ its publish of the task), the dispatch hop (→ the
  worker's delivery, through the capability's quorum queue), the worker's turn (→ its publish of
  the outcome), the answer hop (→ the client's delivery of the direct answer, a classic queue),
  the client's turn (→ its next publish);
- the raw aio-pika RPC: the request hop (quorum), the server's turn, the reply hop (classic),
  the client's turn.

A hop is the broker's work and the wake-up of the receiving process; a turn is Python in one
process (aiormq, aio-pika and the system's own code). Each hop is cut again, where the bytes
leave and reach a process (``asyncio.StreamWriter.write`` of the publish, the last
``asyncio.StreamReader.feed_data`` before the delivery): the sender's *publish path* (aio-pika
and aiormq building the frames, and the turn of the loop before aiormq's writer sends them), the
*broker and kernel* (from the sender's socket to the receiver's, including the wait of a busy
receiver before it reads), and the receiver's *delivery path* (aiormq parsing the frames up to
the delivery). Only the middle part is outside Python. Hops are longer than ``--hops`` measures
on an idle broker when the broker is still busy with what the previous task left (acks, the
outcome's copy for the scheduler, journal writes). The hooks are aiormq's
``Channel.basic_publish`` and ``Channel._on_deliver_frame`` (a private method: should an
aiormq release rename it, ``--timeline`` stops at start with an AttributeError)."""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Set
from pathlib import Path
from typing import Any, NamedTuple

import aiormq.channel

from amqpsched.topology import Topology

from .base import Context, System
from .procs import Proc
from .workloads import percentile

PAYLOAD = "x" * 100
#: An AMQP method frame (type 1) of ``basic.publish`` (class 60, method 40), as aiormq writes a
#: publish: its method frame first, in one write with the content frames.
PUBLISH_FRAME_TYPE = 1
PUBLISH_METHOD = bytes([0, 60, 0, 40])
WARMUP = 50
TASKS = 1000
ROUNDS = 2


class Event(NamedTuple):
    ns: int
    #: "pub" (a publish starts), "dlv" (a delivery arrives), "wr" (a publish's frames are
    #: written to the socket), "rd" (bytes read from the socket)
    op: str
    exchange: str
    routing_key: str


class Recorder:
    """Times this process's publishes and deliveries (see the module's docstring)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def install(self) -> None:
        channel = aiormq.channel.Channel
        publish = channel.basic_publish
        deliver = channel._on_deliver_frame
        events = self.events

        async def basic_publish(
            self: aiormq.channel.Channel,
            body: bytes,
            *,
            exchange: str = "",
            routing_key: str = "",
            **kwargs: Any,
        ) -> Any:
            events.append(Event(time.time_ns(), "pub", exchange, routing_key))
            return await publish(self, body, exchange=exchange, routing_key=routing_key, **kwargs)

        async def on_deliver(self: aiormq.channel.Channel, frame: Any) -> None:
            events.append(Event(time.time_ns(), "dlv", frame.exchange or "", frame.routing_key))
            await deliver(self, frame)

        channel.basic_publish = basic_publish  # type: ignore[method-assign]
        channel._on_deliver_frame = on_deliver  # type: ignore[method-assign]

        write = asyncio.StreamWriter.write
        feed_data = asyncio.StreamReader.feed_data

        def written(self: asyncio.StreamWriter, data: Any) -> None:
            if is_publish(data):
                events.append(Event(time.time_ns(), "wr", "", ""))
            write(self, data)

        def read(self: asyncio.StreamReader, data: Any) -> None:
            events.append(Event(time.time_ns(), "rd", "", ""))
            feed_data(self, data)

        asyncio.StreamWriter.write = written  # type: ignore[method-assign]
        asyncio.StreamReader.feed_data = read  # type: ignore[method-assign]

    def write(self, path: str) -> None:
        with open(path, "w") as out:
            for event in self.events:
                out.write(json.dumps(event) + "\n")


def is_publish(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data``, one write of aiormq's, starts with a ``basic.publish`` method frame
    (type, channel, size, then class and method)."""
    return len(data) >= 11 and data[0] == PUBLISH_FRAME_TYPE and data[7:11] == PUBLISH_METHOD


def read_events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    return [Event(*json.loads(line)) for line in path.read_text().splitlines() if line]


#: One step of a task's chain: the role of the process, the event, and the exchange it names
#: ("" for any; "=" for the exchange of the client's publish that started the chain).
Step = tuple[str, str, str]
RAW_CHAIN: list[Step] = [("server", "dlv", ""), ("server", "pub", ""), ("client", "dlv", "")]
#: The processes a task passes through, from the client back to it.
RAW_ROLES = ["client", "server", "client"]
OUR_ROLES = ["client", "scheduler", "worker", "client"]


def segments(events: dict[str, list[Event]], chain: list[Step], since: int) -> list[list[float]]:
    """Per task (each client publish after ``since`` ns, up to the next), the µs between the
    steps of ``chain`` and, last, from its last step to the client's next publish. A task whose
    chain is incomplete is skipped."""
    return _durations(chains(events, chain, since))


def _durations(times: list[list[int]]) -> list[list[float]]:
    return [[(b - a) / 1000 for a, b in itertools.pairwise(t)] for t in times]


def chains(events: dict[str, list[Event]], chain: list[Step], since: int) -> list[list[int]]:
    """Per task, as :func:`segments` takes them, the times (ns) of its client publish, of each
    step of ``chain``, and of the client's next publish."""
    starts = [e for e in events["client"] if e.op == "pub" and e.ns >= since]
    times_of = {role: [e.ns for e in evs] for role, evs in events.items()}
    found: list[list[int]] = []
    for start, following in itertools.pairwise(starts):
        times = [start.ns]
        for role, op, exchange in chain:
            want = start.exchange if exchange == "=" else exchange
            evs = events.get(role, [])
            hit = None
            for e in evs[bisect.bisect_left(times_of.get(role, []), times[-1]) :]:
                if e.ns >= following.ns:
                    break
                if e.op == op and (not want or e.exchange == want):
                    hit = e.ns
                    break
            if hit is None:
                break
            times.append(hit)
        else:
            times.append(following.ns)
            found.append(times)
    return found


#: Three parts of a hop, in µs: the sender's publish path, the broker and kernel, the
#: receiver's delivery path.
HopParts = tuple[float, float, float]


def hop_parts(
    writes: list[int], reads: list[int], published: int, delivered: int
) -> HopParts | None:
    """A hop from a publish (started at ``published`` ns) to its delivery (at ``delivered``), cut
    at the first of the sender's publish ``writes`` since (sorted, ns) and the last of the
    receiver's socket ``reads`` before the delivery. None if either is missing or out of
    order."""
    i = bisect.bisect_left(writes, published)
    j = bisect.bisect_right(reads, delivered) - 1
    if i == len(writes) or j < 0:
        return None
    wrote, read = writes[i], reads[j]
    if not published <= wrote <= read <= delivered:
        return None
    return ((wrote - published) / 1000, (read - wrote) / 1000, (delivered - read) / 1000)


def split_hops(
    events: dict[str, list[Event]], roles: list[str], times: list[list[int]]
) -> list[list[HopParts]]:
    """Each task's hops cut in three (:func:`hop_parts`); ``roles`` are the processes a task
    passes through, from the client back to it (``times`` as :func:`chains` gives them: a
    publish, then the next process's delivery, and so on). A task with a hop that cannot be cut
    is left out."""
    writes = {r: [e.ns for e in events.get(r, []) if e.op == "wr"] for r in set(roles)}
    reads = {r: [e.ns for e in events.get(r, []) if e.op == "rd"] for r in set(roles)}
    found: list[list[HopParts]] = []
    for t in times:
        parts = [
            hop_parts(writes[roles[k]], reads[roles[k + 1]], t[2 * k], t[2 * k + 1])
            for k in range(len(roles) - 1)
        ]
        if all(p is not None for p in parts):
            found.append([p for p in parts if p is not None])
    return found


def _traced(cls: type[System], out_dir: Path, strip: Set[str]) -> type[System]:
    """``cls`` with every process it spawns run under :mod:`bench.traced`, without the parts
    in ``strip`` (:mod:`bench.strip`)."""

    class Traced(cls):  # type: ignore[valid-type,misc]
        def spawn(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
            env = dict(env or self.ctx.env())
            env["BENCH_TIMELINE_OUT"] = str(out_dir / f"{name}.jsonl")
            env["BENCH_STRIP"] = ",".join(sorted(strip))
            args = ["-m", "bench.traced", *args[1:]] if args[:1] == ["-m"] else args
            return super().spawn(args, name, env)  # type: ignore[no-any-return]

    return Traced


async def _run_system(
    cls: type[System],
    ctx: Context,
    recorder: Recorder,
    tasks: int,
    out_dir: Path,
    strip: Set[str] = frozenset(),
) -> tuple[dict[str, list[Event]], tuple[int, int], System]:
    """Run ``tasks`` lone tasks through ``cls``; its processes' events, the span of the measured
    tasks (ns), and the system."""
    system = _traced(cls, out_dir, strip)(ctx)
    call: Callable[[str], Awaitable[Any]] = system.call  # type: ignore[attr-defined]
    try:
        await system.start()
        for _ in range(WARMUP):
            await call(PAYLOAD)
        since = time.time_ns()
        for _ in range(tasks):
            await call(PAYLOAD)
        until = time.time_ns()
    finally:
        await system.stop()  # its processes write their events as they exit
    events = _collect(out_dir)
    events["client"] = [e for e in recorder.events if e.ns >= since]
    recorder.events.clear()
    return events, (since, until), system


def messages_per_task(
    events: dict[str, list[Event]], span: tuple[int, int], tasks: int
) -> dict[str, tuple[float, float]]:
    """Per role, the publishes and the deliveries of its processes per task within ``span`` (a
    publish with ``BCC`` counts once, however many queues it reaches)."""
    since, until = span
    counts: dict[str, tuple[float, float]] = {}
    for role, evs in events.items():
        within = [e.op for e in evs if since <= e.ns <= until]
        counts[role] = (within.count("pub") / tasks, within.count("dlv") / tasks)
    return counts


def _print_messages(name: str, counts: dict[str, tuple[float, float]]) -> None:
    parts = [f"{role} {pub:.1f} / {dlv:.1f}" for role, (pub, dlv) in sorted(counts.items())]
    print(f"  {name}: messages per task, published / delivered: {'; '.join(parts)}")


def _collect(out_dir: Path) -> dict[str, list[Event]]:
    """The events the processes wrote, by role (the files are removed)."""
    events: dict[str, list[Event]] = {}
    for path in out_dir.glob("*.jsonl"):
        role = "scheduler" if path.stem.startswith("scheduler") else "server"
        role = "worker" if path.stem.startswith("worker") else role
        events[role] = read_events(path)
        path.unlink()
    return events


def _line(label: str, column: list[float], indent: int = 4) -> float:
    """Print one segment: its median, p90 and p99; return the median."""
    column = sorted(column)
    median = percentile(column, 0.5)
    print(
        f"{' ' * indent}{label:{38 - indent}} {median:7.0f}  ({percentile(column, 0.9):.0f}, "
        f"{percentile(column, 0.99):.0f})"
    )
    return median


def _report(
    name: str,
    labels: list[str],
    rows: list[list[float]],
    roles: list[str],
    parts: list[list[HopParts]],
) -> tuple[list[float], float]:
    """Print each segment's median, p90 and p99 (under each hop, its three parts, from the
    tasks whose hops could all be cut), and the round trip's; return the medians and the round
    trip's median."""
    print(f"  {name}: {len(rows)} tasks; µs: median (p90, p99)")
    medians = []
    for i, label in enumerate(labels):
        medians.append(_line(label, [r[i] for r in rows]))
        if i % 2 == 0 and parts:
            hop = i // 2
            sender, receiver = roles[hop], roles[hop + 1]
            _line(f"{sender}'s publish path", [p[hop][0] for p in parts], 6)
            _line("broker and kernel", [p[hop][1] for p in parts], 6)
            _line(f"{receiver}'s delivery path", [p[hop][2] for p in parts], 6)
    trip = _line("round trip, publish to publish", [sum(r) for r in rows])
    return medians, trip


def _broker(parts: list[list[HopParts]]) -> float:
    """The median, over tasks, of the time a task's hops spent in the broker and kernel."""
    return percentile(sorted(sum(hop[1] for hop in p) for p in parts), 0.5) if parts else 0.0


async def run_timeline(args: argparse.Namespace) -> int:
    from .sys_amqpsched import Amqpsched
    from .sys_raw import RawAioPika

    run_id = uuid.uuid4().hex[:8]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"bench-timeline-{run_id}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    out_dir = log_dir / "timeline"
    out_dir.mkdir(exist_ok=True)
    tasks = 100 if args.quick else TASKS
    rounds = 1 if args.quick else ROUNDS
    recorder = Recorder()
    recorder.install()
    raw_rows: list[list[float]] = []
    ours_rows: list[list[float]] = []
    raw_parts: list[list[HopParts]] = []
    ours_parts: list[list[HopParts]] = []
    raw_counts: dict[str, tuple[float, float]] = {}
    ours_counts: dict[str, tuple[float, float]] = {}
    for round_ in range(rounds):
        ctx = Context(f"{run_id}r{round_}", args.amqp_url, log_dir, args.quick)
        events, span, _ = await _run_system(RawAioPika, ctx, recorder, tasks, out_dir)
        times = chains(events, RAW_CHAIN, span[0])
        raw_rows += _durations(times)
        raw_parts += split_hops(events, RAW_ROLES, times)
        raw_counts = messages_per_task(events, span, tasks)
        events, span, system = await _run_system(
            Amqpsched, ctx, recorder, tasks, out_dir, args.strip
        )
        topology = Topology(system.namespace)  # type: ignore[attr-defined]
        chain: list[Step] = [
            ("scheduler", "dlv", "="),
            ("scheduler", "pub", topology.tasks_exchange),
            ("worker", "dlv", topology.tasks_exchange),
            ("worker", "pub", topology.replies_exchange),
            ("client", "dlv", topology.replies_exchange),
        ]
        times = chains(events, chain, span[0])
        ours_rows += _durations(times)
        ours_parts += split_hops(events, OUR_ROLES, times)
        ours_counts = messages_per_task(events, span, tasks)
    print(f"timeline: a lone task, one at a time, {rounds} x {tasks} per system (logs: {log_dir})")
    if args.strip:
        print(
            f"  amqpsched stripped of: {', '.join(sorted(args.strip))} (an experiment: "
            "guarantees broken; bench/strip.py)"
        )
    raw, raw_trip = _report(
        "raw-aio-pika",
        ["request hop (quorum)", "server's turn", "reply hop (classic)", "client's turn"],
        raw_rows,
        RAW_ROLES,
        raw_parts,
    )
    _print_messages("raw-aio-pika", raw_counts)
    ours, ours_trip = _report(
        "amqpsched",
        [
            "submit hop (quorum)",
            "scheduler's turn",
            "dispatch hop (quorum)",
            "worker's turn",
            "answer hop (classic)",
            "client's turn",
        ],
        ours_rows,
        OUR_ROLES,
        ours_parts,
    )
    _print_messages("amqpsched", ours_counts)
    if raw and ours:
        hops_ours, hops_raw = ours[0] + ours[2] + ours[4], raw[0] + raw[2]
        turns_ours, turns_raw = ours[1] + ours[3] + ours[5], raw[1] + raw[3]
        print(
            f"  hops: amqpsched {hops_ours:.0f} µs, raw {hops_raw:.0f} "
            f"(x{hops_ours / hops_raw:.2f}); turns: amqpsched {turns_ours:.0f} µs, raw "
            f"{turns_raw:.0f} (x{turns_ours / turns_raw:.2f}); round trip: amqpsched "
            f"{ours_trip:.0f} µs, raw {raw_trip:.0f} (x{ours_trip / raw_trip:.2f})"
        )
    if raw_parts and ours_parts:
        broker_ours, broker_raw = _broker(ours_parts), _broker(raw_parts)
        print(
            f"  broker and kernel alone: amqpsched {broker_ours:.0f} µs, raw {broker_raw:.0f} "
            f"(x{broker_ours / broker_raw:.2f}); amqpsched's is x{broker_ours / raw_trip:.2f} "
            f"the raw RPC's whole round trip; the rest of each round trip is Python: amqpsched "
            f"{ours_trip - broker_ours:.0f} µs, raw {raw_trip - broker_raw:.0f}"
        )
    return 0
