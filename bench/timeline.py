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
process (aiormq, aio-pika and the system's own code). Hops are longer than ``--hops`` measures
on an idle broker when the broker is still busy with what the previous task left (acks, the
outcome's copy for the scheduler, journal writes). The hooks are aiormq's
``Channel.basic_publish`` and ``Channel._on_deliver_frame`` (a private method: should an
aiormq release rename it, ``--timeline`` stops at start with an AttributeError)."""

from __future__ import annotations

import argparse
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
WARMUP = 50
TASKS = 1000
ROUNDS = 2


class Event(NamedTuple):
    ns: int
    op: str  #: "pub" (a publish starts) or "dlv" (a delivery arrives)
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

    def write(self, path: str) -> None:
        with open(path, "w") as out:
            for event in self.events:
                out.write(json.dumps(event) + "\n")


def read_events(path: Path) -> list[Event]:
    if not path.exists():
        return []
    return [Event(*json.loads(line)) for line in path.read_text().splitlines() if line]


#: One step of a task's chain: the role of the process, the event, and the exchange it names
#: ("" for any; "=" for the exchange of the client's publish that started the chain).
Step = tuple[str, str, str]
RAW_CHAIN: list[Step] = [("server", "dlv", ""), ("server", "pub", ""), ("client", "dlv", "")]


def segments(events: dict[str, list[Event]], chain: list[Step], since: int) -> list[list[float]]:
    """Per task (each client publish after ``since`` ns, up to the next), the µs between the
    steps of ``chain`` and, last, from its last step to the client's next publish. A task whose
    chain is incomplete is skipped."""
    starts = [e for e in events["client"] if e.op == "pub" and e.ns >= since]
    times_of = {role: [e.ns for e in evs] for role, evs in events.items()}
    found: list[list[float]] = []
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
            found.append([(b - a) / 1000 for a, b in itertools.pairwise(times)])
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


def _report(name: str, labels: list[str], rows: list[list[float]]) -> tuple[list[float], float]:
    """Print each segment's median, p90 and p99, and the round trip's; return the medians and
    the round trip's median."""
    columns = [sorted(r[i] for r in rows) for i in range(len(labels))]
    medians = [percentile(c, 0.5) for c in columns]
    totals = sorted(sum(r) for r in rows)
    print(f"  {name}: {len(rows)} tasks; µs: median (p90, p99)")
    for label, column, median in zip(labels, columns, medians, strict=True):
        print(
            f"    {label:34} {median:7.0f}  ({percentile(column, 0.9):.0f}, "
            f"{percentile(column, 0.99):.0f})"
        )
    trip = percentile(totals, 0.5)
    print(
        f"    {'round trip, publish to publish':34} {trip:7.0f}  "
        f"({percentile(totals, 0.9):.0f}, {percentile(totals, 0.99):.0f})"
    )
    return medians, trip


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
    raw_counts: dict[str, tuple[float, float]] = {}
    ours_counts: dict[str, tuple[float, float]] = {}
    for round_ in range(rounds):
        ctx = Context(f"{run_id}r{round_}", args.amqp_url, log_dir, args.quick)
        events, span, _ = await _run_system(RawAioPika, ctx, recorder, tasks, out_dir)
        raw_rows += segments(events, RAW_CHAIN, span[0])
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
        ours_rows += segments(events, chain, span[0])
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
    return 0
