"""Cluster mode: several schedulers side by side. Each follows the journal stream, so each knows
every task: any of them answers a status, maps an idempotency key or takes a cancel, and the
survivors carry on when one dies.

The system test runs on a private three-node RabbitMQ cluster (tests/rabbit_cluster.py): three
schedulers and two workers started by their CLIs, each given the three node URLs in its own
order; two clients submit 300 tasks; mid-load one scheduler is SIGKILLed and one node stopped.
Every final answer is counted by task id with tests/test_chaos.py's Tally (here on a quorum reply
queue, so answers outlive the node they went to). It prints ``chaos(cluster): ...``. The two
smaller tests run two in-process schedulers on the shared broker.

Run: ``pytest tests/test_cluster_mode.py -q -s`` (or ``-m cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage
from pydantic import SecretStr

from amqpsched import Client, transport
from amqpsched.protocol import ErrorType, StatusReply, TaskState
from amqpsched.scheduler import Scheduler
from amqpsched.worker import WorkerApp

from .chaos_apps import EXEC_LOG_ENV
from .conftest import Proc, System
from .rabbit_cluster import (  # noqa: F401 (the fixtures)
    RabbitCluster,
    rabbit_cluster_fixture,
    rabbit_cluster_module_fixture,
)
from .test_chaos import WORK, ExecLog, Tally, details, summarize, tail, wait_until, worker_args

pytestmark = pytest.mark.cluster

Spawn = Callable[..., Proc]
#: Longest wait for one step (processes ready, a failover, a reply).
STEP = 30.0
SCHEDULER = ["-m", "amqpsched", "scheduler"]
SCHEDULERS = 3
WORKERS = 2
#: The scheduler SIGKILLed mid-load.
KILLED = 1
#: The node stopped mid-load. Node 0 is the first address of the first scheduler to start, so the
#: queues' leaders are mostly there and move too; node 2 holds none (its members and the
#: connections to it fail over).
LEADERS_NODE = 0
OTHER_NODE = 2
TASKS_PER_CLIENT = 150
#: Seconds between two submissions of one client.
PACE = 0.04
#: Seconds every survivor has, once all is answered, to report each task ``succeeded``.
STATUS_WAIT = 10.0


def node_list(urls: list[str], first: int) -> str:
    """The nodes' URLs as one ``AMQPSCHED_AMQP_URL``, starting with node ``first`` (so that the
    connections spread over the nodes). Each asks for ``reconnect_interval=1``: aio-pika reads it
    from the address it connects to first, and a lost connection then tries the next node within
    a second (the default is 5 s)."""
    return ",".join(
        f"{urls[(first + i) % len(urls)]}?reconnect_interval=1" for i in range(len(urls))
    )


@dataclass
class ClusterTally(Tally):
    """A :class:`Tally` whose connection fails over between the nodes (``urls``, the system's
    when empty) and whose reply queue is a quorum queue: an answer survives the loss of the node
    it was routed through."""

    urls: str = ""
    #: Task id -> who sent each final answer (the scheduler id a journaled answer carries, or
    #: "-"), and whether it came redelivered: for failure messages.
    origins: dict[str, list[str]] = field(default_factory=dict)

    async def _on_answer(self, msg: AbstractIncomingMessage) -> None:
        origin = (msg.headers or {}).get(transport.H_SCHEDULER, "-")
        redelivered = " redelivered" if msg.redelivered else ""
        self.origins.setdefault(msg.correlation_id or "", []).append(f"{origin!s}{redelivered}")
        await super()._on_answer(msg)

    async def submit(
        self, capability: str, payload: Any, task_id: str, timeout: float = 60.0
    ) -> bool:
        if await super().submit(capability, payload, task_id, timeout):
            return True
        # RabbitMQ 3.10 can nack every later publish of a channel that published to a quorum
        # queue while its leader moved; a new channel is not affected. (The client side of
        # the test is not what is tested: it submits on.)
        assert self._conn is not None
        with contextlib.suppress(Exception):
            await self.ready(STEP)
            old, self._pub = (
                self._pub,
                await self._conn.channel(publisher_confirms=True, on_return_raises=True),
            )
            await old.close()
        return False

    async def __aenter__(self) -> ClusterTally:
        settings = self.system.settings
        if self.urls:
            settings = settings.model_copy(update={"amqp_url": SecretStr(self.urls)})
        self._conn = await transport.connect(settings, f"cluster-tally-{self.queue_name}")
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._sub = await self._conn.channel()
        await self._sub.set_qos(prefetch_count=200)
        queue = await self._sub.declare_queue(
            self.queue_name,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-expires": 600_000},
        )
        await queue.consume(self._on_answer)
        return self


async def submit_paced(tally: Tally, ids: list[str]) -> None:
    """Submit ``chaos_work`` tasks (0.05-0.2 s each) at a steady pace; while the connection is
    being restored, wait for it rather than count a submission as refused."""
    for n, tid in enumerate(ids):
        with contextlib.suppress(TimeoutError):  # then submit() counts it as unconfirmed
            await tally.ready(STEP)
        await tally.submit(WORK, {"id": tid, "sleep": 0.05 + 0.05 * (n % 4)}, tid, timeout=60.0)
        await asyncio.sleep(PACE)


async def not_succeeded(client: Client, ids: list[str]) -> dict[str, str]:
    """The tasks whose status is not ``succeeded``: their state, or why there is none."""
    replies = await asyncio.gather(
        *(client.status(t, timeout=STEP) for t in ids), return_exceptions=True
    )
    return {
        t: r.state.value if isinstance(r, StatusReply) else f"{type(r).__name__}: {r}"
        for t, r in zip(ids, replies, strict=True)
        if not isinstance(r, StatusReply) or r.state != TaskState.SUCCEEDED
    }


async def journal_mentions(
    system: System, task_ids: list[str], limit: int = 12, dump: Path | None = None
) -> str:
    """The journal entries naming each of ``task_ids``: offset, type, writer, an excerpt. For
    failure messages (who dispatched, answered, saw it start). With ``dump``, every entry is
    written there: offset, type, writer, the task ids it names."""
    found: dict[str, list[str]] = {t: [] for t in task_ids}
    lines: list[str] = []
    async with transport.connection(system.settings, "cluster-test-journal") as conn:
        channel = await conn.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.get_queue(system.topology.journal_queue)
        arrived = asyncio.Event()

        async def on_entry(msg: AbstractIncomingMessage) -> None:
            arrived.set()
            headers = msg.headers or {}
            named = re.findall(rb'task_id\\?":\\?"([^"\\]+)', msg.body)
            lines.append(
                f"@{headers.get('x-stream-offset')!r} {msg.type} "
                f"{headers.get(transport.H_SCHEDULER)!r} {b' '.join(named).decode()}"
            )
            for t in task_ids:
                at = msg.body.find(t.encode())
                if at >= 0:
                    excerpt = msg.body[max(at - 40, 0) : at + 120].decode(errors="replace")
                    found[t].append(
                        f"@{headers.get('x-stream-offset')!r} {msg.type} by "
                        f"{headers.get(transport.H_SCHEDULER)!r}: ...{excerpt}..."
                    )
            await msg.ack()

        await queue.consume(on_entry, arguments={"x-stream-offset": "first"})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(15):
                while True:  # until nothing has come for a second
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), 1.0)
                    except TimeoutError:
                        break
    if dump is not None:
        dump.write_text("\n".join(lines) + "\n")
    return "\n".join(
        f"journal on {t}:\n  " + "\n  ".join(mentions[:limit]) for t, mentions in found.items()
    )


def log_mentions(folder: Path, task_ids: list[str], limit: int = 12) -> str:
    """The lines of the processes' logs in ``folder`` naming each of ``task_ids``: for failure
    messages (the logs stay on the machine that ran the test)."""
    named = {t: re.compile(rf"\b{re.escape(t)}\b") for t in task_ids}
    found: dict[str, list[str]] = {t: [] for t in task_ids}
    for path in sorted(folder.glob("*.log")):
        for line in path.read_text(errors="replace").splitlines():
            for t, pattern in named.items():
                if pattern.search(line):
                    found[t].append(f"{path.stem}: {line[:300]}")
    return "\n".join(
        f"logs on {t}:\n  " + "\n  ".join(found[t][-limit:] or ["(none)"]) for t in task_ids
    )


@pytest.mark.system
@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "stopped",
    [
        pytest.param(OTHER_NODE, id="node-without-leaders"),
        pytest.param(LEADERS_NODE, id="node-with-the-leaders"),
    ],
)
async def test_three_schedulers_survive_a_scheduler_sigkill_and_a_node_stop_mid_load(
    rabbit_cluster: RabbitCluster, spawn: Spawn, tmp_path: Path, stopped: int
) -> None:
    """3 schedulers, 2 workers, 300 tasks from two clients; mid-load a scheduler is SIGKILLed,
    then a node stopped: every accepted task is answered once, and each survivor then says
    ``succeeded`` for each."""
    started = time.monotonic()
    urls = rabbit_cluster.urls
    system = System(node_list(urls, 0), heartbeat_interval=0.5, heartbeat_miss_limit=3)
    # No System.close(): its names live on the private cluster, thrown away with it.
    log = ExecLog(tmp_path / "exec.log")

    def env(first: int) -> dict[str, str]:
        return system.env(
            AMQPSCHED_AMQP_URL=node_list(urls, first), **{EXEC_LOG_ENV: str(log.path)}
        )

    # The first declares the journal stream; the others start once it is there (a scheduler
    # that starts while the stream is still being created on its node can fail to start).
    schedulers = [spawn(SCHEDULER, env(0), "sched0")]
    await schedulers[0].wait_for_output("consuming", STEP)
    schedulers += [spawn(SCHEDULER, env(i), f"sched{i}") for i in range(1, SCHEDULERS)]
    await asyncio.gather(*(s.wait_for_output("consuming", STEP) for s in schedulers[1:]))
    workers = [
        spawn(worker_args(WORK, "sleep", "echo", concurrency=8), env(i), f"worker{i}")
        for i in range(WORKERS)
    ]
    await asyncio.gather(*(w.wait_for_output("consuming", STEP) for w in workers))
    ready_s = time.monotonic() - started

    a_ids = [f"a{i:03d}" for i in range(TASKS_PER_CLIENT)]
    b_ids = [f"b{i:03d}" for i in range(TASKS_PER_CLIENT)]
    async with (
        ClusterTally(system, urls=node_list(urls, 0)) as tally_a,
        ClusterTally(system, urls=node_list(urls, 1)) as tally_b,
    ):

        def answered() -> int:
            return tally_a.answered(a_ids) + tally_b.answered(b_ids)

        submitting = asyncio.gather(submit_paced(tally_a, a_ids), submit_paced(tally_b, b_ids))
        try:
            await wait_until(lambda: answered() >= 40, STEP, "40 answers")
            victim = schedulers[KILLED]
            victim.popen.kill()
            await asyncio.to_thread(victim.popen.wait, 10)
            answered_at_kill = answered()
            await wait_until(
                lambda: answered() >= answered_at_kill + 40, STEP, "40 answers after the kill"
            )
            answered_at_stop = answered()
            node_stop_s = await rabbit_cluster.astop_node(stopped)
        finally:
            await submitting
        confirmed = tally_a.submitted + tally_b.submitted
        queues = [system.topology.capability_queue(WORK), system.topology.submit_queue]
        live = [w.popen.pid for w in workers]
        await asyncio.gather(
            tally_a.settle(tally_a.submitted, log, live, queues, timeout=45),
            tally_b.settle(tally_b.submitted, log, live, queues, timeout=45),
        )
        settled_s = time.monotonic() - started
        # Any surviving scheduler knows every task, whoever dispatched and answered it.
        settings = system.settings.model_copy(update={"amqp_url": SecretStr(node_list(urls, 2))})
        async with Client(settings) as client:
            began = time.monotonic()
            odd = first_odd = await not_succeeded(client, confirmed)
            while odd and time.monotonic() - began < STATUS_WAIT:
                await asyncio.sleep(0.2)
                odd = await not_succeeded(client, list(odd))
            status_s = time.monotonic() - began
            # Then all of them again, twice: the requests alternate between the survivors.
            for _ in range(2):
                odd |= await not_succeeded(client, confirmed)

    merged = Tally(
        system,
        answers={**tally_a.answers, **tally_b.answers},
        submitted=confirmed,
        unconfirmed=tally_a.unconfirmed + tally_b.unconfirmed,
        own_redeliveries=tally_a.own_redeliveries + tally_b.own_redeliveries,
        mismatched=tally_a.mismatched + tally_b.mismatched,
    )
    line, counts = summarize(
        "cluster",
        merged,
        confirmed,
        log,
        answered_at_kill=answered_at_kill,
        answered_at_stop=answered_at_stop,
        node_stop_s=round(node_stop_s, 1),
        cluster_start_s=round(rabbit_cluster.start_time or 0.0, 1),
        ready_s=round(ready_s, 1),
        settled_s=round(settled_s, 1),
        statuses_off_at_first=len(first_odd),
        statuses_stale=len(odd),
        statuses_s=round(status_s, 1),
        seconds=round(time.monotonic() - started, 1),
    )
    survivors = [s for i, s in enumerate(schedulers) if i != KILLED]
    problems: list[str] = []
    if counts["lost"] or counts["duplicates"] or merged.mismatched:
        problems.append(f"tasks lost or answered twice:\n{details(merged, confirmed, log)}")
        origins = {**tally_a.origins, **tally_b.origins}
        doubled = [t for t in confirmed if len(merged.answers.get(t, [])) > 1]
        problems.append(f"answered by: { {t: origins.get(t) for t in doubled[:5]} }")
        problems.append(await journal_mentions(system, doubled[:3], dump=tmp_path / "journal.txt"))
        problems.append(log_mentions(tmp_path, doubled[:3]))
    twice = [t for t in merged.unconfirmed if len(merged.answers.get(t, [])) > 1]
    if twice:
        problems.append(f"unconfirmed submissions answered twice: {twice[:5]}")
    failed = [merged.answers[t][0] for t in confirmed if merged.answers.get(t)]
    failed = [a for a in failed if a.status.value != "succeeded"]
    if failed:
        problems.append(f"{len(failed)} answers not succeeded: {failed[:3]}")
    if odd:
        # Asked again, the requests go to the survivors in turn (but a task asked about first
        # each time may reach the same one each time). Each task must be known to them and
        # reported answered by at least one (a stale state is counted above as statuses_stale).
        seen: dict[str, set[str]] = {t: set() for t in odd}
        async with Client(settings) as client:
            for _ in range(6):
                answers = await not_succeeded(client, list(odd))
                for t in odd:
                    seen[t].add(answers.get(t, "succeeded"))
        wrong = {t: sorted(v) for t, v in seen.items() if "succeeded" not in v or "unknown" in v}
        if wrong:
            problems.append(
                f"{len(wrong)} tasks no survivor reports answered {STATUS_WAIT}s after the "
                f"last answer: {dict(list(wrong.items())[:5])}"
            )
            origins = {**tally_a.origins, **tally_b.origins}
            problems.append(f"answered by: { {t: origins.get(t) for t in list(wrong)[:5]} }")
            problems.append(
                await journal_mentions(system, list(wrong)[:3], dump=tmp_path / "journal.txt")
            )
            problems.append(log_mentions(tmp_path, list(wrong)[:3]))
    dead = [p.log.name for p in [*survivors, *workers] if p.popen.poll() is not None]
    if dead:
        problems.append(f"processes exited: {dead}")
    if problems:
        problems.append(f"logs, exec log and journal dump in {tmp_path}")
        pattern = "WARNING|ERROR|Traceback"
        logs = "\n".join(f"--- {p.log.name}:\n{tail(p, pattern, 10)}" for p in survivors)
        listed = rabbit_cluster.ctl("list_queues", "name", "type", "leader", "online", "messages")
        # The problems last: a CI log shows the end of a long failure.
        pytest.fail("\n".join([line, logs, listed, "PROBLEMS:", *problems]))


# -- two schedulers in one process, on the shared broker ---------------------------------------


def submissions_taken(scheduler: Scheduler) -> float:
    """Messages this scheduler took from tasks.submit with tasks in them (its own metric)."""
    taken = scheduler.metrics.registry.get_sample_value(
        "amqpsched_tasks_per_message_count", {"kind": "submit"}
    )
    return taken or 0.0


def counting_app(calls: list[Any], gate: asyncio.Event) -> WorkerApp:
    """``counted``: records each call, waits for ``gate``, answers its payload."""
    app = WorkerApp()

    @app.capability("counted")
    async def counted(payload: Any) -> Any:
        calls.append(payload)
        await gate.wait()
        return {"payload": payload}

    return app


async def test_an_idempotency_key_maps_to_one_task_on_every_scheduler(system: System) -> None:
    """Submissions with one key land on both schedulers (competing consumers of tasks.submit):
    the handler runs once, and every submission gets that task's answer, whether it came while
    the task ran (watched where it landed) or after its answer."""
    schedulers = [await system.scheduler(), await system.scheduler()]
    calls: list[Any] = []
    gate = asyncio.Event()
    await system.worker("counted", app=counting_app(calls, gate))
    client = await system.client()
    first = await client.submit("counted", "once", idempotency_key="k", timeout=30)
    await wait_until(lambda: len(calls) == 1, STEP, "the handler to start")
    # One message per submission (each awaited): they alternate between the two schedulers.
    during = [
        await client.submit("counted", "again", idempotency_key="k", timeout=30) for _ in range(10)
    ]
    gate.set()
    answer = await first.answer(STEP)
    after = [
        await client.submit("counted", "again", idempotency_key="k", timeout=30) for _ in range(20)
    ]
    answers = await asyncio.gather(*(h.answer(STEP) for h in during + after))
    taken = [submissions_taken(s) for s in schedulers]
    assert all(n >= 5 for n in taken), f"both schedulers should have taken submissions: {taken}"
    assert answer.status.value == "succeeded", answer
    assert answer.result == {"payload": "once"}
    assert all(a.task_id == first.task_id for a in answers), [a.task_id for a in answers]
    assert all(a.result == answer.result for a in answers), [a.result for a in answers]
    assert calls == ["once"], calls
    for s in schedulers:
        record = s.store.get(first.task_id)
        assert record is not None and record.answer is not None, s.scheduler_id
        assert record.answer.result == answer.result


async def test_a_cancel_taken_by_one_scheduler_holds_on_every_scheduler(
    system: System, tmp_path: Path
) -> None:
    """A long task cancelled many times and asked about many times (the requests alternate
    between two schedulers): one final answer, ``cancelled``; every status says so; the handler
    is stopped."""
    schedulers = [await system.scheduler(), await system.scheduler()]
    worker = await system.worker("sleep", concurrency=1)
    client = await system.client()
    task_id = f"cancel-{uuid.uuid4().hex[:8]}"
    async with Tally(system) as tally:
        assert await tally.submit("sleep", {"seconds": 30}, task_id, timeout=60)
        async with asyncio.timeout(STEP):
            while (await client.status(task_id)).state != TaskState.RUNNING:
                await asyncio.sleep(0.02)
        began = time.monotonic()
        cancels = [await client.cancel(task_id) for _ in range(10)]
        status = [await client.status(task_id) for _ in range(10)]
        await wait_until(lambda: bool(tally.answers.get(task_id)), STEP, "the answer")
        # The slot comes back (concurrency 1): the handler was stopped, not left to sleep.
        assert await client.call("sleep", {"seconds": 0}, timeout=STEP) == {"slept": 0}
        assert time.monotonic() - began < 10
        # Late second answers, if any, show up within the quiet period.
        await tally.settle([task_id], ExecLog(tmp_path / "exec.log"), [], [], timeout=10)
    answers = tally.answers[task_id]
    assert len(answers) == 1, answers
    assert answers[0].error is not None and answers[0].error.type == ErrorType.CANCELLED
    assert all(r.state == TaskState.FAILED for r in cancels), [r.state for r in cancels]
    for reply in status:
        assert reply.state == TaskState.FAILED, reply
        assert reply.answer is not None and reply.answer.error is not None, reply
        assert reply.answer.error.type == ErrorType.CANCELLED, reply
    assert worker.executed == 2
    for s in schedulers:
        record = s.store.get(task_id)
        assert record is not None and record.answer is not None, s.scheduler_id
        assert record.answer.error is not None, record.answer
        assert record.answer.error.type == ErrorType.CANCELLED, (s.scheduler_id, record.answer)
