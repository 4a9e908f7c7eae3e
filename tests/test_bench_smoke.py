"""``python -m bench --quick`` runs end to end and writes rows of the documented shape.
No timing assertions: the numbers belong in docs/benchmarks.md, not in a test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.channel import Channel

from amqpsched.topology import Topology
from bench import strip
from bench.hops import bursts
from bench.timeline import Event, hop_parts, is_publish, segments, split_hops
from bench.workloads import Measurement, median_run, plan

from .conftest import ROOT

pytestmark = pytest.mark.system

KEYS = {
    "system",
    "workload",
    "in_flight",
    "payload_bytes",
    "tasks",
    "throughput_tps",
    "p50_ms",
    "p99_ms",
}


@pytest.mark.timeout(180)
def test_bench_quick_writes_rows_of_the_documented_shape(amqp_url: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--systems",
            "amqpsched,raw-aio-pika",
            "--amqp-url",
            amqp_url,
            "--json",
            str(out),
            "--log-dir",
            str(tmp_path / "logs"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    for row in rows:
        assert set(row) == KEYS, row
        assert isinstance(row["system"], str) and isinstance(row["workload"], str)
        for key in ("in_flight", "payload_bytes", "tasks"):
            assert isinstance(row[key], int), row
        for key in ("throughput_tps", "p50_ms", "p99_ms"):
            assert row[key] is None or isinstance(row[key], int | float), row
    assert {r["system"] for r in rows} == {"amqpsched", "raw-aio-pika"}
    for system in ("amqpsched", "raw-aio-pika"):
        measured = {
            (r["workload"], r["in_flight"], r["payload_bytes"])
            for r in rows
            if r["system"] == system and r["tasks"] > 0 and r["throughput_tps"] is not None
        }
        assert {("throughput", n, 100) for n in (1, 64, 1000)} <= measured, (system, measured)
        assert ("latency", 1, 100) in measured
        assert {("payload", 64, 1024), ("payload", 64, 65536)} <= measured
    assert "tasks/s" in proc.stdout  # the table was printed


def _quick_run(mode: str, amqp_url: str, *more: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench MODE --quick``, which must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", mode, "--quick", "--amqp-url", amqp_url, *more],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.mark.timeout(120)
def test_bench_hops_reports_a_quorum_and_a_classic_hop_and_the_floor(amqp_url: str) -> None:
    proc = _quick_run("--hops", amqp_url)
    assert "quorum" in proc.stdout and "classic" in proc.stdout
    assert "floor of the sequential ratio" in proc.stdout
    assert "quorum hops back to back" in proc.stdout
    assert "classic hops back to back" in proc.stdout
    assert "cancelled by the broker" not in proc.stdout + proc.stderr


def test_slow_hops_are_grouped_into_bursts() -> None:
    timed = [(0.0, 900.0), (1.0, 6000.0), (1.2, 9000.0), (1.3, 800.0), (1.6, 7000.0)]
    timed += [(2.5, 30000.0), (4.0, 1000.0), (4.1, 5000.0), (4.2, 5001.0)]
    assert bursts(timed, 5000.0, 0.5) == [[1.0, 1.2, 1.6], [2.5], [4.2]]
    assert bursts(timed, 50000.0, 0.5) == []


def test_a_repeated_workload_is_reported_by_its_median_run() -> None:
    fast, middle, slow = Measurement(10, 1.0), Measurement(10, 2.0), Measurement(10, 4.0)
    assert median_run([slow, fast, middle]) is middle
    assert median_run([fast, slow]) is slow  # of two, the slower: never the best one
    assert median_run([fast]) is fast
    (full_map,) = [w for w in plan(quick=False) if w.name == "map"]
    assert full_map.runs == 3


@pytest.mark.timeout(120)
def test_bench_timeline_cuts_both_round_trips_into_hops_and_turns(amqp_url: str) -> None:
    proc = _quick_run("--timeline", amqp_url)
    lines = proc.stdout.splitlines()
    for label in ("request hop", "server's turn", "submit hop", "dispatch hop", "worker's turn"):
        line = next((x for x in lines if label in x), None)
        assert line is not None, proc.stdout
        median = re.search(r"\s(\d+)\s+\(\d+, \d+\)$", line)  # median (p90, p99), in µs
        assert median is not None and int(median.group(1)) > 0, line
    # Every task of each system was cut (one less than run: the last has no next publish).
    assert "raw-aio-pika: 99 tasks" in proc.stdout and "amqpsched: 99 tasks" in proc.stdout
    # Each hop is cut where its bytes left one process and reached the next.
    for label in ("scheduler's publish path", "worker's delivery path", "server's publish path"):
        assert label in proc.stdout, proc.stdout
    parts = [x for x in lines if re.match(r"\s+broker and kernel\s+\d", x)]
    assert len(parts) == 5, proc.stdout  # amqpsched's 3 hops, the raw RPC's 2
    assert "broker and kernel alone: amqpsched" in proc.stdout
    # The scheduler takes each submission, its outcome and its dispatch read back from the
    # journal: at least three deliveries a task (answers read back may come together).
    assert _scheduler_messages(proc.stdout)[1] >= 3.0, proc.stdout


def _scheduler_messages(stdout: str) -> tuple[float, float]:
    """The scheduler's publishes and deliveries per task, as the timeline printed them."""
    found = re.search(r"amqpsched: messages per task.*scheduler ([\d.]+) / ([\d.]+)", stdout)
    assert found is not None, stdout
    return float(found.group(1)), float(found.group(2))


@pytest.mark.timeout(120)
def test_a_timeline_stripped_of_outcome_and_journal_leaves_the_scheduler_one_message_each_way(
    amqp_url: str,
) -> None:
    proc = _quick_run("--timeline", amqp_url, "--strip", "outcome,journal")
    assert "amqpsched stripped of: journal, outcome" in proc.stdout
    assert "amqpsched: 99 tasks" in proc.stdout  # the client still got every answer
    # The submission in, the task out: no outcome, no journal entry written or read back.
    assert _scheduler_messages(proc.stdout) == (1.0, 1.0), proc.stdout


async def test_stripping_to_classic_queues_declares_the_capability_and_results_queues_classic(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--strip classic-dispatch,classic-results``: the queues after ``tasks.submit`` are
    declared classic, so a quorum declaration of the same names is refused; the submit queue
    stays quorum."""
    topology = Topology(namespace=f"t{uuid.uuid4().hex[:10]}")
    monkeypatch.setenv("AMQPSCHED_NAMESPACE", topology.namespace)  # as in the bench's processes
    monkeypatch.setattr(Channel, "declare_queue", Channel.declare_queue)  # undone after the test
    strip.install(strip.parse("classic-dispatch,classic-results"))
    conn = await aio_pika.connect(amqp_url)
    try:
        channel = await conn.channel()
        await topology.declare_core(channel)
        await topology.declare_capability(channel, "echo")
        monkeypatch.undo()
        for name in (topology.capability_queue("echo"), topology.results_queue):
            channel = await conn.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(
                    name, durable=True, arguments={"x-queue-type": "quorum"}
                )
        channel = await conn.channel()
        await channel.declare_queue(  # the same as declared: accepted
            topology.submit_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
    finally:
        monkeypatch.undo()
        await topology.delete_all(await conn.channel(), ["echo"])
        await conn.close()


def test_a_timeline_takes_each_step_after_the_one_before_and_skips_broken_chains() -> None:
    def ev(us: int, op: str, exchange: str = "x") -> Event:
        return Event(us * 1000, op, exchange, "")

    events = {
        "client": [ev(0, "pub"), ev(50, "dlv"), ev(100, "pub"), ev(190, "pub"), ev(300, "pub")],
        # A delivery through another exchange (an outcome's copy, say) is not the request.
        "server": [ev(5, "dlv", "other"), ev(20, "dlv"), ev(30, "pub"), ev(120, "dlv")],
    }
    chain = [("server", "dlv", "="), ("server", "pub", ""), ("client", "dlv", "")]
    # The second task's chain breaks (no publish by the server): it is skipped.
    assert segments(events, chain, since=0) == [[20.0, 10.0, 20.0, 50.0]]
    assert segments(events, chain, since=1000) == []


def test_a_hop_is_cut_at_the_senders_publish_write_and_the_receivers_last_read() -> None:
    def ev(us: int, op: str) -> Event:
        return Event(us * 1000, op, "", "")

    events = {
        # A publish write before the publish started is another one's.
        "client": [ev(0, "wr"), ev(10, "pub"), ev(40, "wr"), ev(400, "rd"), ev(450, "dlv")],
        # The last read before the delivery holds it; an earlier one held something else.
        "server": [ev(100, "rd"), ev(300, "rd"), ev(330, "dlv"), ev(340, "pub"), ev(360, "wr")],
    }
    client_writes, server_reads = [0, 40_000], [100_000, 300_000]
    assert hop_parts(client_writes, server_reads, 10_000, 330_000) == (30.0, 260.0, 30.0)
    assert hop_parts([360_000], [400_000], 340_000, 450_000) == (20.0, 40.0, 50.0)
    # Nothing written since the publish: the hop cannot be cut.
    assert hop_parts([360_000], [400_000], 370_000, 450_000) is None
    times = [[10_000, 330_000, 340_000, 450_000, 500_000]]
    assert split_hops(events, ["client", "server", "client"], times) == [
        [(30.0, 260.0, 30.0), (20.0, 40.0, 50.0)]
    ]
    assert (
        split_hops(
            events, ["client", "server", "client"], [[10_000, 330_000, 370_000, 450_000, 500_000]]
        )
        == []
    )


def test_a_publish_write_is_told_by_its_first_frame() -> None:
    publish = bytes([1, 0, 1, 0, 0, 0, 20, 0, 60, 0, 40]) + b"rest of the frames"
    ack = bytes([1, 0, 1, 0, 0, 0, 13, 0, 60, 0, 80]) + bytes(13)
    assert is_publish(publish)
    assert not is_publish(ack)
    assert not is_publish(b"x" * 7 + bytes([0, 60, 0, 40]))  # not a method frame
    assert not is_publish(b"")
