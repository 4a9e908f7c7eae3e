"""Chaos: real processes started by their CLIs, a few hundred tasks, and something breaks.

Every test submits its tasks over the wire protocol (docs/protocol.md) to a reply queue of its
own and counts *every* final answer by task id (the SDK keeps only the first). The handlers of
``tests/chaos_apps.py`` write each execution to a file: the ground truth of what ran twice.
Each test prints ``chaos(<x>): submitted=... answered=... duplicates=... lost=...
executed_twice=...`` and puts the same line in its assertion messages.

Run: ``pytest tests/test_chaos.py -q -s`` (or ``-m chaos``).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
)

from amqpsched import BrokerError, Client, TaskFailed, TaskTimeout
from amqpsched.client import ANSWER_GRACE
from amqpsched.errors import DecodeError
from amqpsched.protocol import RESENT_HEADER, Answer, TaskState, decode
from amqpsched.transport import H_REASON, H_TASK_ID

from .chaos_apps import EXEC_LOG_ENV
from .conftest import Proc, System
from .rabbit_node import RabbitNode, rabbit_node_fixture  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.chaos, pytest.mark.system]

WORK = "chaos_work"
POISON = "chaos_poison"
SCHEDULER = ["-m", "amqpsched.scheduler"]
Spawn = Callable[..., Proc]


def worker_args(*capabilities: str, concurrency: int = 4) -> list[str]:
    args = ["-m", "amqpsched.worker", "--app", "tests.chaos_apps"]
    for cap in capabilities:
        args += ["--capability", cap]
    return [*args, "--concurrency", str(concurrency)]


async def wait_for(cond: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``cond()`` held, or None if it did not within ``timeout``."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        return None
    return time.monotonic() - began


async def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def worker_id_of(proc: Proc) -> str:
    found = re.search(r"worker (\S+) consuming", proc.output())
    assert found, proc.output()
    return found.group(1)


# -- ground truth: what ran ---------------------------------------------------------------------


class ExecLog:
    """The executions written by tests/chaos_apps.py: ``start|end|cancel <task id> <pid>``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()

    def events(self) -> list[tuple[str, str, int]]:
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                out.append((parts[0], parts[1], int(parts[2])))
        return out

    def starts(self) -> Counter[str]:
        return Counter(tid for ev, tid, _ in self.events() if ev == "start")

    def running(self, pids: Iterable[int] | None = None) -> set[str]:
        """Task ids started but neither ended nor cancelled, on ``pids`` (default: any)."""
        wanted = set(pids) if pids is not None else None
        open_: Counter[tuple[str, int]] = Counter()
        for ev, tid, pid in self.events():
            if wanted is not None and pid not in wanted:
                continue
            open_[(tid, pid)] += 1 if ev == "start" else -1
        return {tid for (tid, _), n in open_.items() if n > 0}

    def history(self, task_id: str) -> list[str]:
        return [f"{ev}@{pid}" for ev, tid, pid in self.events() if tid == task_id]


# -- the counting client ------------------------------------------------------------------------


@dataclass
class Tally:
    """Submits tasks like any AMQP client (docs/protocol.md 5.2) and records every final answer
    on its own durable reply queue, by task id (correlation id = task id)."""

    system: System
    reconnect_interval: float = 1.0
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    answered_at: dict[str, float] = field(default_factory=dict)
    submitted: list[str] = field(default_factory=list)
    unconfirmed: list[str] = field(default_factory=list)
    #: Our own queue's redeliveries after a reconnect (same body again, ``redelivered`` set).
    own_redeliveries: int = 0
    #: Answers sent again, marked so, the same as the first (docs/protocol.md section 12).
    resent: int = 0
    mismatched: list[str] = field(default_factory=list)
    changes: int = 0

    def __post_init__(self) -> None:
        self.queue_name = f"{self.system.namespace}.chaos.replies.{uuid.uuid4().hex[:6]}"
        self._bodies: dict[str, set[bytes]] = {}
        self._conn: AbstractRobustConnection | None = None

    async def __aenter__(self) -> Tally:
        self._conn = await aio_pika.connect_robust(
            self.system.settings.amqp_url.get_secret_value(),
            reconnect_interval=self.reconnect_interval,
            client_properties={"connection_name": "chaos-tally"},
        )
        self._pub = await self._conn.channel(publisher_confirms=True, on_return_raises=True)
        self._sub = await self._conn.channel()
        await self._sub.set_qos(prefetch_count=200)
        # Durable and classic: it (and its persistent answers) survive a broker restart. It
        # expires by itself if a crashed test could not delete it.
        queue = await self._sub.declare_queue(
            self.queue_name, durable=True, arguments={"x-expires": 600_000}
        )
        await queue.consume(self._on_answer)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._conn is not None
        try:
            async with asyncio.timeout(15):
                # Its consumer's channel first: a robust channel whose consumer the delete
                # cancels could declare the queue again before the connection closes.
                await self._sub.close()
                channel = await self._conn.channel()
                await channel.queue_delete(self.queue_name)
        except Exception as err:  # the broker may be gone; x-expires cleans up then
            print(f"tally: could not delete {self.queue_name}: {err!r}")
        finally:
            await self._conn.close()

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the connection and both channels are restored (after a broker restart)."""
        assert self._conn is not None
        async with asyncio.timeout(timeout):
            await self._conn.ready()
            for channel in (self._pub, self._sub):
                if isinstance(channel, AbstractRobustChannel):
                    await channel.ready()

    async def _on_answer(self, msg: AbstractIncomingMessage) -> None:
        try:
            final = json.loads(msg.body).get("final") is True
        except (ValueError, AttributeError):
            final = False
        corr = msg.correlation_id or ""
        if final:
            seen = self._bodies.setdefault(corr, set())
            if msg.redelivered and msg.body in seen:
                self.own_redeliveries += 1  # not a second answer: our ack was lost
            else:
                seen.add(msg.body)
                try:
                    answer = decode(Answer, msg.body)
                except DecodeError:
                    self.mismatched.append(f"{corr}: undecodable {msg.body[:200]!r}")
                else:
                    first = self.answers.get(corr)
                    if first and (msg.headers or {}).get(RESENT_HEADER) and answer == first[0]:
                        self.resent += 1  # not a second answer: marked as the same one again
                        await msg.ack()
                        return
                    if answer.task_id != corr:
                        self.mismatched.append(f"{corr}: answer for {answer.task_id}")
                    self.answers.setdefault(corr, []).append(answer)
                    self.answered_at.setdefault(corr, time.monotonic())
                    self.changes += 1
        await msg.ack()

    async def submit(
        self, capability: str, payload: Any, task_id: str, timeout: float = 60.0
    ) -> bool:
        """Publish one submission with a confirm; True if the broker confirmed it (accepted)."""
        body = {"v": 1, "capability": capability, "payload": payload, "task_id": task_id}
        body["timeout"] = timeout
        msg = aio_pika.Message(
            json.dumps(body).encode(),
            content_type="application/json",
            type="submit",
            correlation_id=task_id,
            reply_to=self.queue_name,
            message_id=task_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            async with asyncio.timeout(10):
                await self._pub.default_exchange.publish(
                    msg, self.system.topology.submit_queue, mandatory=True
                )
        except Exception as err:
            print(f"tally: submission {task_id} not confirmed: {err!r}")
            self.unconfirmed.append(task_id)
            return False
        self.submitted.append(task_id)
        return True

    def answered(self, ids: Iterable[str]) -> int:
        return sum(1 for t in ids if self.answers.get(t))

    async def queue_depth(self, queue: str) -> int:
        """Ready messages in ``queue`` (-1 if it cannot be asked now)."""
        assert self._conn is not None
        try:
            async with asyncio.timeout(5):
                channel = await self._conn.channel()
                try:
                    declared = await channel.declare_queue(queue, passive=True)
                    result = declared.declaration_result
                    return int(result.message_count or 0)
                finally:
                    await channel.close()
        except Exception:
            return -1

    async def settle(
        self,
        ids: list[str],
        log: ExecLog,
        live_pids: Iterable[int],
        queues: Iterable[str],
        *,
        timeout: float = 60.0,
        quiet: float = 1.5,
    ) -> None:
        """Wait until every id is answered, nothing runs on a live worker, the queues are empty,
        and nothing changes for ``quiet`` seconds (so that late second answers are seen)."""
        pids, names = list(live_pids), list(queues)
        deadline = time.monotonic() + timeout
        still_since: float | None = None
        last: tuple[int, int] = (-1, -1)
        while True:
            now = time.monotonic()
            if now > deadline:
                return  # the counts will tell what is missing
            snapshot = (self.changes, len(log.events()))
            done = self.answered(ids) == len(ids) and not log.running(pids)
            if done:
                depths = [await self.queue_depth(q) for q in names]
                done = all(d == 0 for d in depths)
            if done and snapshot == last and still_since is not None:
                if now - still_since >= quiet:
                    return
            else:
                still_since = now if done else None
            last = snapshot
            await asyncio.sleep(0.1)


def summarize(
    label: str, tally: Tally, ids: list[str], log: ExecLog, **extra: object
) -> tuple[str, dict[str, int]]:
    """The counts of one test: printed, and returned for the assertion messages."""
    starts = log.starts()
    answers = {t: tally.answers.get(t, []) for t in ids}
    counts = {
        "submitted": len(ids),
        "answered": sum(1 for a in answers.values() if a),
        "duplicates": sum(max(0, len(a) - 1) for a in answers.values()),
        "lost": sum(1 for a in answers.values() if not a),
        "executed_twice": sum(1 for t in ids if starts[t] >= 2),
    }
    statuses = Counter(
        a[0].status.value + (f"/{a[0].error.type.value}" if a[0].error else "")
        for a in answers.values()
        if a
    )
    parts = [f"{k}={v}" for k, v in counts.items()]
    parts.append(f"max_executions={max((starts[t] for t in ids), default=0)}")
    parts += [f"{k}={v}" for k, v in extra.items()]
    parts.append("statuses=" + ",".join(f"{k}:{v}" for k, v in sorted(statuses.items())))
    if tally.unconfirmed:
        parts.append(f"unconfirmed_submissions={len(tally.unconfirmed)}")
    if tally.own_redeliveries:
        parts.append(f"reply_queue_redeliveries={tally.own_redeliveries}")
    line = f"chaos({label}): " + " ".join(parts)
    print(line, flush=True)
    return line, counts


def details(tally: Tally, ids: list[str], log: ExecLog, limit: int = 8) -> str:
    """Lost and doubly answered tasks, with their executions: for the failure message."""
    out = []
    lost = [t for t in ids if not tally.answers.get(t)]
    dup = [t for t in ids if len(tally.answers.get(t, [])) > 1]
    for t in lost[:limit]:
        out.append(f"  lost {t}: executions {log.history(t)}")
    for t in dup[:limit]:
        shown = [
            (
                a.status.value,
                a.error.type.value if a.error else None,
                a.attempts,
                a.worker_id,
                a.finished_at,
            )
            for a in tally.answers[t]
        ]
        out.append(f"  duplicate {t}: answers {shown} executions {log.history(t)}")
    out += [f"  mismatch {m}" for m in tally.mismatched[:limit]]
    return "\n".join(out)


def check_once(
    line: str, counts: dict[str, int], tally: Tally, ids: list[str], log: ExecLog
) -> None:
    why = f"{line}\n{details(tally, ids, log)}"
    assert not tally.mismatched, why
    assert counts["lost"] == 0, why
    assert counts["duplicates"] == 0, why


def succeeded(tally: Tally, task_id: str) -> bool:
    return tally.answers[task_id][0].status.value == "succeeded"


def tail(proc: Proc, pattern: str, limit: int = 12) -> str:
    lines = [ln for ln in proc.output().splitlines() if re.search(pattern, ln)]
    return "\n".join(lines[-limit:])


async def start_processes(
    spawn: Spawn, env: dict[str, str], *workers: list[str]
) -> tuple[Proc, list[Proc]]:
    sched = spawn(SCHEDULER, env, "sched")
    await sched.wait_for_output("consuming")
    procs = [spawn(args, env, f"worker{n}") for n, args in enumerate(workers, 1)]
    await asyncio.gather(*(p.wait_for_output("consuming") for p in procs))
    return sched, procs


async def submit_all(
    tally: Tally, ids: list[str], payload: Callable[[str], Any], pace: float = 0.0
) -> None:
    for tid in ids:
        await tally.submit(WORK, payload(tid), tid)
        if pace:
            await asyncio.sleep(pace)


# -- the tests ----------------------------------------------------------------------------------


async def test_a_worker_sigkill_mid_load_every_task_answered_once(
    system: System, spawn: Spawn, tmp_path: Path
) -> None:
    """SIGKILL one of two workers mid-load: the broker redelivers its unacked tasks."""
    started = time.monotonic()
    system.capabilities.add(WORK)
    log = ExecLog(tmp_path / "exec.log")
    env = system.env(**{EXEC_LOG_ENV: str(log.path)})
    _, (victim, survivor) = await start_processes(
        spawn, env, worker_args(WORK, concurrency=4), worker_args(WORK, concurrency=4)
    )
    ids = [f"a{i:04d}" for i in range(300)]
    async with Tally(system) as tally:
        submitting = asyncio.create_task(submit_all(tally, ids, lambda t: {"id": t, "sleep": 0.05}))
        await wait_until(
            lambda: tally.answered(ids) >= 100 and len(log.running([victim.popen.pid])) >= 2,
            30,
            "100 answers while the victim runs tasks",
        )
        in_hand = log.running([victim.popen.pid])
        victim.popen.kill()
        await asyncio.to_thread(victim.popen.wait, 10)
        await submitting
        await tally.settle(ids, log, [survivor.popen.pid], [system.topology.capability_queue(WORK)])
        line, counts = summarize(
            "a",
            tally,
            ids,
            log,
            killed_running=len(in_hand),
            seconds=round(time.monotonic() - started, 1),
        )
    check_once(line, counts, tally, ids, log)
    starts = log.starts()
    assert all(starts[t] >= 2 for t in in_hand), f"{line}\nkilled mid-run: {sorted(in_hand)}"
    failed = [t for t in ids if tally.answers[t][0].status.value != "succeeded"]
    assert not failed, f"{line}\nfailed: {[tally.answers[t][0] for t in failed[:5]]}"


async def test_b_sigstopped_worker_is_declared_dead_and_its_late_results_fenced(
    system: System, spawn: Spawn, tmp_path: Path
) -> None:
    """SIGSTOP a worker past the liveness deadline (0.2 s x 3): the scheduler dispatches its
    running tasks again to the other worker; after SIGCONT its late outcomes are fenced."""
    started = time.monotonic()
    assert system.settings.heartbeat_interval == 0.2
    assert system.settings.heartbeat_miss_limit == 3
    system.capabilities.add(WORK)
    log = ExecLog(tmp_path / "exec.log")
    env = system.env(**{EXEC_LOG_ENV: str(log.path)})
    sched, (frozen, other) = await start_processes(
        spawn, env, worker_args(WORK, concurrency=4), worker_args(WORK, concurrency=4)
    )
    frozen_id, other_id = worker_id_of(frozen), worker_id_of(other)
    ids = [f"b{i:04d}" for i in range(200)]
    client = await system.client()
    async with Tally(system) as tally:
        submitting = asyncio.create_task(submit_all(tally, ids, lambda t: {"id": t, "sleep": 0.3}))
        await wait_until(
            lambda: tally.answered(ids) >= 20 and len(log.running([frozen.popen.pid])) >= 3,
            30,
            "20 answers while the worker to stop runs tasks",
        )

        # Re-dispatch is for tasks the scheduler knows are running there (a worker reports
        # `started` once an attempt has run 50 ms): stop it while one of them is.
        async def one_known_running() -> str | None:
            for task_id in log.running([frozen.popen.pid]):
                if (await client.status(task_id)).state == TaskState.RUNNING:
                    return task_id
            return None

        async with asyncio.timeout(15):
            while True:
                known = await one_known_running()
                if known is None:
                    await asyncio.sleep(0.01)
                    continue
                frozen.popen.send_signal(signal.SIGSTOP)
                if known in log.running([frozen.popen.pid]):
                    break  # stopped before that task ended: its outcome was not sent
                frozen.popen.send_signal(signal.SIGCONT)  # it ended meanwhile: try again
        stopped_at = time.monotonic()
        try:
            in_hand = log.running([frozen.popen.pid])
            await sched.wait_for_output(f"worker {frozen_id} missed its heartbeats", timeout=10)
            declared_after = time.monotonic() - stopped_at
            await sched.wait_for_output("dispatched again as attempt 2", timeout=10)
            await submitting
            # While it is stopped, every task but those it holds unstarted gets answered.
            redispatched = set(
                re.findall(r"task (\S+) dispatched again as attempt 2", sched.output())
            )
            held = in_hand - redispatched
            await wait_until(
                lambda: all(tally.answers.get(t) for t in ids if t not in held),
                60,
                "the other worker to answer everything while the first is stopped",
            )
            answered_while_stopped = tally.answered(ids)
            redispatched_answers = [tally.answers[t][0] for t in sorted(redispatched)]
        finally:
            frozen.popen.send_signal(signal.SIGCONT)
        stopped_for = time.monotonic() - stopped_at
        await sched.wait_for_output("fenced", timeout=10)
        await tally.settle(
            ids,
            log,
            [frozen.popen.pid, other.popen.pid],
            [system.topology.capability_queue(WORK)],
        )
        fenced = len(re.findall(r"outcome of superseded attempt \d+ of \S+ fenced", sched.output()))
        line, counts = summarize(
            "b",
            tally,
            ids,
            log,
            stopped_running=len(in_hand),
            redispatched=len(redispatched),
            fenced=fenced,
            declared_dead_after_s=round(declared_after, 2),
            stopped_s=round(stopped_for, 1),
            answered_while_stopped=answered_while_stopped,
            seconds=round(time.monotonic() - started, 1),
        )
    why = f"{line}\n{tail(sched, 'fenced|declared dead|dispatched again')}"
    check_once(line, counts, tally, ids, log)
    assert redispatched, why
    # Only tasks the stopped worker had started were dispatched again.
    assert all(f"start@{frozen.popen.pid}" in log.history(t) for t in redispatched), why
    assert fenced >= 1, why
    # Declared dead once the liveness window (0.6 s from its last heartbeat) passed.
    assert 0.3 <= declared_after < 3.0, why
    for answer in redispatched_answers:
        assert answer.status.value == "succeeded", f"{why}\n{answer}"
        assert answer.worker_id == other_id, f"{why}\n{answer}"
        assert answer.attempts == 2, f"{why}\n{answer}"
    starts = log.starts()
    assert all(starts[t] >= 2 for t in redispatched), why


async def test_c_scheduler_sigkill_and_restart_mid_load(
    system: System, spawn: Spawn, tmp_path: Path
) -> None:
    """SIGKILL the scheduler mid-load (submissions keep coming), start a new one: no task lost,
    each answered once."""
    started = time.monotonic()
    system.capabilities.add(WORK)
    log = ExecLog(tmp_path / "exec.log")
    env = system.env(**{EXEC_LOG_ENV: str(log.path)})
    sched, workers = await start_processes(
        spawn, env, worker_args(WORK, concurrency=4), worker_args(WORK, concurrency=4)
    )
    ids = [f"c{i:04d}" for i in range(300)]
    async with Tally(system) as tally:
        submitting = asyncio.create_task(
            submit_all(tally, ids, lambda t: {"id": t, "sleep": 0.02}, pace=0.005)
        )
        await wait_until(lambda: tally.answered(ids) >= 60, 30, "60 answers")
        sched.popen.kill()
        await asyncio.to_thread(sched.popen.wait, 10)
        killed_at = time.monotonic()
        answered_at_kill = tally.answered(ids)
        submitted_at_kill = len(tally.submitted)
        second = spawn(SCHEDULER, env, "sched2")
        await second.wait_for_output("consuming")
        down_for = time.monotonic() - killed_at
        await submitting
        await tally.settle(
            ids,
            log,
            [w.popen.pid for w in workers],
            [system.topology.capability_queue(WORK), system.topology.submit_queue],
        )
        line, counts = summarize(
            "c",
            tally,
            ids,
            log,
            answered_at_kill=answered_at_kill,
            submitted_at_kill=submitted_at_kill,
            scheduler_down_s=round(down_for, 1),
            seconds=round(time.monotonic() - started, 1),
        )
    dup = [t for t in ids if len(tally.answers.get(t, [])) > 1]
    why = f"{line}\n{details(tally, ids, log)}"
    for t in dup[:3]:
        why += f"\n--- {t} in the new scheduler's log:\n{tail(second, re.escape(t))}"
    assert not tally.mismatched, why
    assert counts["lost"] == 0, why
    assert counts["duplicates"] == 0, why
    failed = [t for t in ids if tally.answers[t][0].status.value != "succeeded"]
    assert not failed, f"{why}\nfailed: {[tally.answers[t][0] for t in failed[:5]]}"


@dataclass
class CallOutcome:
    kind: str
    seconds: float
    detail: str = ""


async def timed_call(
    client: Client, capability: str, payload: Any, timeout: float, slack: float = 10.0
) -> CallOutcome:
    """``client.call`` with an outer bound: 'hung' if it outlives timeout + grace + slack."""
    began = time.monotonic()
    try:
        async with asyncio.timeout(timeout + ANSWER_GRACE + slack):
            await client.call(capability, payload, timeout=timeout)
        kind, detail = "ok", ""
    except TaskTimeout as err:
        kind, detail = "TaskTimeout", str(err)
    except BrokerError as err:
        kind, detail = "BrokerError", str(err)
    except TaskFailed as err:
        kind, detail = f"TaskFailed/{err.error_type}", str(err)
    except TimeoutError:
        kind, detail = "hung", ""
    except Exception as err:
        kind, detail = f"other/{type(err).__name__}", str(err)
    return CallOutcome(kind, time.monotonic() - began, detail)


@pytest.mark.timeout(180)
async def test_d_broker_restart_mid_load(
    rabbit_node: RabbitNode, spawn: Spawn, tmp_path: Path
) -> None:
    """Full stop and start of a private RabbitMQ node mid-load: services and clients reconnect
    by themselves, no accepted task is lost, and SDK calls get an answer or a clear error
    within their timeout."""
    started = time.monotonic()
    system = System(rabbit_node.url)
    system.capabilities.add(WORK)
    log = ExecLog(tmp_path / "exec.log")
    env = system.env(**{EXEC_LOG_ENV: str(log.path)})
    try:
        sched, workers = await start_processes(
            spawn,
            env,
            worker_args(WORK, "echo", "sleep", concurrency=4),
            worker_args(WORK, "echo", "sleep", concurrency=4),
        )
        client = await system.client()
        ids = [f"d{i:04d}" for i in range(300)]
        after = [f"d-after{i:03d}" for i in range(50)]
        call_timeout = 25.0
        async with Tally(system) as tally:
            await submit_all(tally, ids, lambda t: {"id": t, "sleep": 0.1})
            await wait_until(lambda: tally.answered(ids) >= 60, 30, "60 answers")
            # SDK calls in flight through the restart: running (3 s each) when the broker stops.
            in_flight = [
                asyncio.create_task(
                    timed_call(client, "sleep", {"seconds": 3.0}, timeout=call_timeout)
                )
                for _ in range(8)
            ]
            await asyncio.sleep(0.5)
            answered_at_stop = tally.answered(ids)
            stop_s = await rabbit_node.astop()
            # SDK calls made while the broker is down.
            during = [
                asyncio.create_task(timed_call(client, "echo", f"down{i}", timeout=5.0))
                for i in range(5)
            ]
            await asyncio.sleep(1.0)
            start_s = await rabbit_node.astart()
            answered_at_start = tally.answered(ids)
            # Accepted tasks survived in their durable queues; everyone reconnects. (Not
            # asserted here: on a stall the counts and the broker's view below tell more.)
            resumed_after = await wait_for(lambda: tally.answered(ids) > answered_at_start, 30)
            await tally.ready()
            await submit_all(tally, after, lambda t: {"id": t, "sleep": 0.0})
            every = ids + after
            await tally.settle(
                every,
                log,
                [w.popen.pid for w in workers],
                [system.topology.capability_queue(WORK)],
                timeout=30,
            )
            calls = await asyncio.gather(*in_flight)
            down_calls = await asyncio.gather(*during)
            kinds = Counter(c.kind for c in calls)
            down_kinds = Counter(c.kind for c in down_calls)
            line, counts = summarize(
                "d",
                tally,
                every,
                log,
                answered_at_stop=answered_at_stop,
                answered_at_start=answered_at_start,
                node_first_start_s=round(rabbit_node.start_times[0], 1),
                node_stop_s=round(stop_s, 1),
                node_start_s=round(start_s, 1),
                resumed_after_s=None if resumed_after is None else round(resumed_after, 1),
                calls_in_flight=",".join(f"{k}:{v}" for k, v in sorted(kinds.items())),
                calls_in_flight_max_s=round(max(c.seconds for c in calls), 1),
                calls_while_down=",".join(f"{k}:{v}" for k, v in sorted(down_kinds.items())),
                calls_while_down_max_s=round(max(c.seconds for c in down_calls), 1),
                seconds=round(time.monotonic() - started, 1),
            )
        why = (
            f"{line}\n{details(tally, every, log)}\n"
            f"in flight: {calls}\nwhile down: {down_calls}\n"
            f"scheduler:\n{tail(sched, 'WARNING|ERROR|Traceback|fenced|dispatched again')}"
        )
        problems = []
        if resumed_after is None:
            problems.append("no task was answered within 30 s of the broker's restart")
        if counts["lost"] or counts["duplicates"] or tally.mismatched:
            problems.append("tasks lost or answered twice")
        if tally.unconfirmed:
            problems.append(f"submissions not confirmed after the restart: {tally.unconfirmed[:3]}")
        failed = [t for t in every if tally.answers.get(t) and not succeeded(tally, t)]
        if failed:
            problems.append(f"failed: {[tally.answers[t][0] for t in failed[:5]]}")
        # An answer (even "failed") or a clear error; never anything else, never late.
        allowed = {"ok", "TaskTimeout", "BrokerError"}
        for name, group, limit in (
            ("in flight", calls, call_timeout),
            ("made while the broker was down", down_calls, 5.0),
        ):
            odd = [
                c for c in group if c.kind not in allowed and not c.kind.startswith("TaskFailed")
            ]
            if odd:
                problems.append(f"SDK calls {name} ended with an unclear error: {odd[:2]}")
            late = [c for c in group if c.seconds > limit + ANSWER_GRACE + 1.0]
            if late:
                problems.append(f"SDK calls {name} outlived their timeout {limit}s: {late[:2]}")
        if problems:
            why += "\n" + rabbit_node.diagnose()
            for w in workers:
                why += f"\n--- {w.log.name}:\n{tail(w, 'WARNING|ERROR|consuming', 8)}"
        assert not problems, "\n".join([why, "PROBLEMS:", *problems])
    finally:
        await system.close()


async def supervise(
    spawn: Spawn, args: list[str], env: dict[str, str], stop: asyncio.Event, deaths: list[float]
) -> None:
    """Keep one worker process running: start it again each time it dies (at most 30 times)."""
    n = 0
    while not stop.is_set() and n < 30:
        n += 1
        proc = spawn(args, env, f"poison-worker{n}")
        while proc.popen.poll() is None and not stop.is_set():
            await asyncio.sleep(0.05)
        if proc.popen.poll() is not None:
            deaths.append(time.monotonic())


async def test_e_poison_task_is_dead_lettered_after_the_delivery_limit(
    system_factory: Callable[..., System], spawn: Spawn, tmp_path: Path
) -> None:
    """A handler that kills its worker (``os._exit(1)``), delivery limit 2, a supervisor that
    restarts the worker each time: the task is dead-lettered (``delivery_limit``) and answered
    ``worker_lost`` once, while echo tasks keep flowing through another worker."""
    started = time.monotonic()
    system = system_factory(delivery_limit=2)
    system.capabilities.update((POISON, "echo"))
    procs: list[Proc] = []

    def spawn_kept(args: list[str], env: dict[str, str], name: str = "proc") -> Proc:
        """Spawned processes, stopped before the system's queues are deleted (they would
        declare them again)."""
        procs.append(proc := spawn(args, env, name))
        return proc

    log = ExecLog(tmp_path / "exec.log")
    env = system.env(**{EXEC_LOG_ENV: str(log.path)})
    stop = asyncio.Event()
    deaths: list[float] = []
    supervisor: asyncio.Task[None] | None = None
    try:
        sched, _ = await start_processes(
            spawn_kept,
            env,
            ["-m", "amqpsched.worker", "--capability", "echo", "--concurrency", "4"],
        )
        poison_id = "e-poison"
        echo_ids = [f"e{i:04d}" for i in range(150)]
        async with Tally(system) as tally:
            supervisor = asyncio.create_task(
                supervise(spawn_kept, worker_args(POISON, concurrency=1), env, stop, deaths)
            )
            assert await tally.submit(POISON, {"id": poison_id}, poison_id, timeout=60)

            async def echoes() -> None:
                for tid in echo_ids:
                    await tally.submit("echo", {"id": tid}, tid)
                    await asyncio.sleep(0.03)

            echoing = asyncio.create_task(echoes())
            await wait_until(lambda: bool(tally.answers.get(poison_id)), 60, "the poison answer")
            poison_answered = time.monotonic()
            dead = await system.dead_letters(1, timeout=10)
            await echoing
            await tally.settle(echo_ids, log, [], [system.topology.capability_queue("echo")])
            # Copies of the poison may still circulate (one per re-dispatch): let them drain,
            # and keep counting answers meanwhile.
            poison_queue = system.topology.capability_queue(POISON)

            def drained() -> bool:
                return not deaths or time.monotonic() - deaths[-1] > 2.0

            try:
                await wait_until(drained, 30, "the poison copies to drain")
                depth = await tally.queue_depth(poison_queue)
            finally:
                stop.set()
                await supervisor
            first_death = deaths[0] if deaths else poison_answered
            flowing = sum(
                1 for t in echo_ids if first_death <= tally.answered_at.get(t, 0) <= poison_answered
            )
            every = [poison_id, *echo_ids]
            line, counts = summarize(
                "e",
                tally,
                every,
                log,
                worker_deaths=len(deaths),
                poison_executions=log.starts()[poison_id],
                dead_letters=len(dead),
                echo_answered_during_crashes=flowing,
                poison_queue_left=depth,
                seconds=round(time.monotonic() - started, 1),
            )
        why = f"{line}\n{details(tally, every, log)}\n{tail(sched, poison_id)}"
        check_once(line, counts, tally, every, log)
        [answer] = tally.answers[poison_id]
        assert answer.status.value == "failed", why
        assert answer.error is not None and answer.error.type.value == "worker_lost", why
        assert dead[0].headers[H_REASON] == "delivery_limit", f"{why}\n{dead[0].headers}"
        assert dead[0].headers[H_TASK_ID] == poison_id, f"{why}\n{dead[0].headers}"
        assert log.starts()[poison_id] >= 2, why
        assert all(tally.answers[t][0].status.value == "succeeded" for t in echo_ids), why
        assert flowing > 0, why
    finally:
        stop.set()
        if supervisor is not None:
            await asyncio.wait({supervisor}, timeout=5)
        for proc in procs:
            proc.stop()
        await system.close()
