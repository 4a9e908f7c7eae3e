"""``python -m bench``: start each system, drive the same workloads through it, print a table.

Systems run one after another on the same broker; each uses queue names unique to the run and
deletes them when it is done."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path

import aio_pika

from .base import Context, System
from .procs import (
    listener_pid,
    machine_busy_seconds,
    peak_rss_mb,
    port_answers,
    rss_mb,
    self_cpu_seconds,
    tree_cpu_seconds,
)
from .profile import Sampler, py_spy_binary, summarize
from .sys_amqpsched import Amqpsched, AmqpschedMap, AmqpschedNoDirect, AmqpschedUvloop
from .sys_celery import CelerySystem
from .sys_dramatiq import DramatiqSystem
from .sys_raw import RawAioPika
from .workloads import SHAPES, Measurement, Row, Workload, median_run, payload_of, plan

SYSTEMS: dict[str, type[System]] = {
    cls.name: cls
    for cls in (
        Amqpsched,
        AmqpschedNoDirect,
        AmqpschedUvloop,
        AmqpschedMap,
        RawAioPika,
        CelerySystem,
        DramatiqSystem,
    )
}
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"
PACKAGES = ("amqpsched", "aio-pika", "aiormq", "celery", "kombu", "dramatiq", "pika", "redis")
ROLES = ("scheduler", "worker", "broker", "client")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (default: all)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: small counts, seconds")
    p.add_argument(
        "--payload-shape",
        choices=SHAPES,
        default="text",
        help="text: each payload one JSON string (default); rows: a list of small objects of "
        "about the same size",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG: tasks/s vs in flight")
    p.add_argument(
        "--amqp-url",
        default=os.environ.get("AMQPSCHED_AMQP_URL", DEFAULT_URL),
        help="the broker every system shares (default: $AMQPSCHED_AMQP_URL or local)",
    )
    p.add_argument(
        "--redis-url",
        help="Redis for Dramatiq's results (default: 127.0.0.1:6379 if it answers, else a "
        "private redis-server on a free port)",
    )
    p.add_argument(
        "--schedulers",
        type=int,
        default=1,
        help="amqpsched scheduler processes side by side (default 1)",
    )
    p.add_argument(
        "--amqpsched-workers", type=int, default=1, help="amqpsched worker processes (default 1)"
    )
    p.add_argument(
        "--amqpsched-concurrency",
        type=int,
        default=64,
        help="concurrency of each amqpsched worker (default 64)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="sample the systems' processes with py-spy during the 1,000-in-flight workload "
        "(a map-only system: its map); raw stacks and a summary go to DIR",
    )
    p.add_argument(
        "--log-dir", type=Path, help="keep the processes' logs here (default: a tmp dir)"
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="run only the scale test (issue #6): scheduler RSS with --scale-tasks tasks waiting "
        "for a capability no worker serves, its CPU with --scale-workers simulated workers "
        "heartbeating",
    )
    p.add_argument(
        "--hops",
        action="store_true",
        help="run only the hop test: publish-to-delivery time of one message through a quorum "
        "and a classic queue, and the floor it sets for the sequential ratio",
    )
    p.add_argument(
        "--timeline",
        action="store_true",
        help="run only the timeline: a lone task's round trip cut into hops and turns, for "
        "amqpsched and the raw aio-pika RPC (median of one task at a time)",
    )
    p.add_argument(
        "--strip",
        default="",
        metavar="PARTS",
        help="with --timeline: take these parts out of amqpsched's processes, an experiment that "
        "breaks guarantees (outcome: no outcome copy for the scheduler; journal: no journal); "
        "comma-separated",
    )
    p.add_argument(
        "--scale-tasks", type=int, default=1_000_000, help="waiting tasks (default 1,000,000)"
    )
    p.add_argument(
        "--scale-workers", type=int, default=1_000, help="simulated workers (default 1,000)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.schedulers < 1:
        parser.error("--schedulers must be at least 1")
    if args.hops:
        from .hops import run_hops

        return asyncio.run(run_hops(args))
    if args.strip and not args.timeline:
        parser.error("--strip goes with --timeline")
    if args.timeline:
        from .strip import parse
        from .timeline import run_timeline

        try:
            args.strip = parse(args.strip)
        except ValueError as exc:
            parser.error(str(exc))

        return asyncio.run(run_timeline(args))
    if args.scale:
        from .scale import run_scale

        try:
            return asyncio.run(run_scale(args))
        except KeyboardInterrupt:
            return 130
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        print(f"bench: unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
        return 2
    try:
        return asyncio.run(run(args, names))
    except KeyboardInterrupt:
        return 130


def _machine() -> dict[str, str]:
    info = {
        "cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram"] = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    for pkg in PACKAGES:
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = "-"
    return info


async def _rabbitmq_version(url: str) -> str:
    conn = await aio_pika.connect(url)
    try:
        props = conn.transport.connection.server_properties if conn.transport else {}
        version = props.get("version", b"?")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await conn.close()


def _load() -> str:
    """The machine's load average: the bench shares the machine, this says how much."""
    try:
        one, five = Path("/proc/loadavg").read_text().split()[:2]
    except (OSError, ValueError):
        return "load average unknown"
    return f"load average {one} (1 min), {five} (5 min)"


_MACHINE = "(machine)"


def _sample(roles: dict[str, list[int]]) -> dict[str, float]:
    cpu = {role: tree_cpu_seconds(pids) for role, pids in roles.items() if role != "client"}
    cpu["client"] = self_cpu_seconds()
    cpu[_MACHINE] = machine_busy_seconds()
    return cpu


async def run(args: argparse.Namespace, names: list[str]) -> int:
    parts = args.amqp_url.split("@")[-1].split("/")[0].split(":")
    if not port_answers(parts[0] or "127.0.0.1", int(parts[1]) if len(parts) > 1 else 5672):
        print(f"bench: no broker answers at {parts[0]}; start RabbitMQ first", file=sys.stderr)
        return 1
    run_id = uuid.uuid4().hex[:8]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix=f"bench-{run_id}-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        run_id=run_id,
        amqp_url=args.amqp_url,
        log_dir=log_dir,
        quick=args.quick,
        redis_url_option=args.redis_url,
        amqpsched_workers=args.amqpsched_workers,
        amqpsched_schedulers=args.schedulers,
        amqpsched_concurrency=args.amqpsched_concurrency,
    )
    machine = _machine()
    machine["rabbitmq"] = await _rabbitmq_version(args.amqp_url)
    print(
        "bench: "
        + ", ".join(f"{k} {v}" for k, v in machine.items() if k not in ("platform", "cpu"))
        + f"\nbench: {machine.get('cpu', '?')}; run {run_id}; logs in {log_dir}",
        flush=True,
    )
    if args.payload_shape != "text":
        print(f"bench: payloads: {args.payload_shape}", flush=True)
    workloads = plan(args.quick)
    rows: list[Row] = []
    memory: list[tuple[str, str, float, float]] = []
    broker = listener_pid(ctx.amqp_port)
    started = time.monotonic()
    try:
        for name in names:
            rows += await _run_system(
                SYSTEMS[name], ctx, workloads, broker, memory, args.py_spy, args.payload_shape
            )
    finally:
        await ctx.close()
    print()
    print(format_table(rows))
    ratios = format_ratios(rows)
    if ratios:
        print()
        print(ratios)
    if memory:
        print()
        print("memory (MiB): system role idle-RSS peak-RSS(VmHWM)")
        for system, role, idle, peak in memory:
            print(f"  {system:14} {role:10} {idle:8.1f} {peak:8.1f}")
    print(f"\nbench: {time.monotonic() - started:.0f}s in all", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")
    if args.plot:
        from .plot import plot

        plot(rows, args.plot, f"{machine['cpus']} cores, RabbitMQ {machine['rabbitmq']}, one run")
    failed = [r for r in rows if r.note.startswith("failed")]
    return 1 if failed else 0


async def _run_system(
    cls: type[System],
    ctx: Context,
    workloads: list[Workload],
    broker: int | None,
    memory: list[tuple[str, str, float, float]],
    py_spy_dir: Path | None = None,
    shape: str = "text",
) -> list[Row]:
    reason = cls.unavailable()
    system = cls(ctx)
    todo = [w for w in workloads if system.unsupported(w) is None]
    if reason is not None:
        print(f"bench: {cls.name} skipped: {reason}", flush=True)
        if len(todo) == 1:
            return [Row.skipped(cls.name, todo[0], reason)]
        return [Row(cls.name, "all", 0, 0, note=reason)]  # one row, not one per workload
    rows: list[Row] = []
    cap = 90.0 if ctx.quick else 300.0
    print(f"bench: {cls.name}: starting ({system.describe()}); {_load()}", flush=True)
    try:
        await system.start()
        roles = system.roles()
        idle = {role: rss_mb(pids) for role, pids in roles.items()}
        if broker is not None:
            roles.setdefault("broker", []).insert(0, broker)
        warmup = Workload("warmup", 16, 100, 50 if ctx.quick else 300)
        await asyncio.wait_for(system.run(warmup, payload_of(100)), cap)
        # The largest throughput workload is profiled; a system that runs none, its `map`.
        kind = "throughput" if any(w.name == "throughput" for w in todo) else "map"
        profiled = max((w.in_flight for w in todo if w.name == kind), default=0)
        for w in todo:
            sampler = None
            if py_spy_dir is not None and w.name == kind and w.in_flight == profiled:
                sampler = _sampler(py_spy_dir, cls.name, system.roles())
            before = _sample(roles)
            t0 = time.perf_counter()
            runs: list[Measurement] = []
            try:
                for _ in range(w.runs):
                    runs.append(
                        await asyncio.wait_for(
                            system.run(w, payload_of(w.payload_bytes, shape)), cap
                        )
                    )
            finally:
                if sampler is not None:
                    await sampler.stop()
            after = _sample(roles)
            wall = time.perf_counter() - t0
            if sampler is not None and py_spy_dir is not None:
                summary = "\n".join(summarize(f) for f in sampler.files.values())
                (py_spy_dir / f"{cls.name}-summary.txt").write_text(summary + "\n")
                print(summary, flush=True)
            row = Row.measured(cls.name, w, median_run(runs))
            if len(runs) > 1:
                rates = ", ".join(f"{m.tasks / m.elapsed:.0f}" for m in runs)
                row.note = f"median of {len(runs)} runs: {rates} tasks/s"
            used = {role: after[role] - before[role] for role in after if role != _MACHINE}
            tasks = sum(m.tasks for m in runs)
            row.cpu_us = {role: cpu / tasks * 1e6 for role, cpu in used.items()}
            # Cores busy with anything else on the machine: the noise this row was measured in.
            other = after[_MACHINE] - before[_MACHINE] - sum(used.values())
            row.other_cores = max(other, 0.0) / wall  # below 0: clock-tick rounding
            rows.append(row)
            print(format_row(row), flush=True)
        print(f"bench: {cls.name}: done; {_load()}", flush=True)
        for role, pids in system.roles().items():
            if role == "broker":  # shared, long-lived: its peak is not this run's
                continue
            memory.append((cls.name, role, idle.get(role, 0.0), peak_rss_mb(pids)))
    except Exception as exc:  # a system that fails must not stop the others
        note = f"failed: {exc.__class__.__name__}: {str(exc)[:200]}"
        print(f"bench: {cls.name} {note}", flush=True)
        done = {(r.workload, r.in_flight, r.payload_bytes) for r in rows}
        rows += [
            Row.skipped(cls.name, w, note)
            for w in todo
            if (w.name, w.in_flight, w.payload_bytes) not in done
        ]
    finally:
        try:
            await asyncio.wait_for(system.stop(), 60)
        except Exception as exc:
            print(f"bench: {cls.name}: cleanup failed: {exc!r}", flush=True)
    return rows


def _sampler(out_dir: Path, label: str, roles: dict[str, list[int]]) -> Sampler | None:
    binary = py_spy_binary()
    if binary is None:
        print("bench: --py-spy: no py-spy binary (pip install py-spy)", flush=True)
        return None
    return Sampler(binary, out_dir, label, roles)


HEADER = (
    f"{'system':14} {'workload':10} {'in-flight':>9} {'payload':>7} {'tasks':>6} "
    f"{'tasks/s':>8} {'p50 ms':>8} {'p99 ms':>8}  CPU µs/task: "
    f"{'sched':>6} {'worker':>6} {'broker':>6} {'client':>6}  {'other':>5}"
)


def _num(x: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:{width}{fmt}}"


def format_row(r: Row) -> str:
    line = (
        f"{r.system:14} {r.workload:10} {r.in_flight:>9} {r.payload_bytes:>7} {r.tasks:>6} "
        f"{_num(r.throughput_tps, '.0f', 8)} {_num(r.p50_ms, '.2f', 8)} "
        f"{_num(r.p99_ms, '.2f', 8)}  {'':13}"
        + " ".join(_num(r.cpu_us.get(role), ".0f", 6) for role in ROLES)
        + f"  {_num(r.other_cores, '.2f', 5)}"
    )
    return f"{line}  {r.note}" if r.note else line


def format_table(rows: list[Row]) -> str:
    return "\n".join([HEADER, *(format_row(r) for r in rows)])


def format_ratios(rows: list[Row]) -> str:
    """amqpsched against each peer, workload by workload: throughput ratio (>1: amqpsched is
    faster) and p50/p99 ratios (<1: amqpsched answers sooner). ``map`` rows compare
    amqpsched-map with the peers' batch APIs."""
    measured = {
        (r.system, r.workload, r.in_flight, r.payload_bytes): r
        for r in rows
        if r.throughput_tps is not None
    }
    # amqpsched-nodirect is a peer too: what direct answers save.
    peers = [
        s for s in dict.fromkeys(r.system for r in rows) if s not in ("amqpsched", "amqpsched-map")
    ]
    lines: list[str] = []
    for (system, workload, in_flight, size), ours in measured.items():
        if system != ("amqpsched-map" if workload == "map" else "amqpsched"):
            continue
        cells = []
        for peer in peers:
            theirs = measured.get((peer, workload, in_flight, size))
            if theirs is None or not theirs.throughput_tps or ours.throughput_tps is None:
                continue
            cell = f"{peer} x{ours.throughput_tps / theirs.throughput_tps:.2f}"
            if ours.p50_ms and theirs.p50_ms and ours.p99_ms and theirs.p99_ms:
                p50 = ours.p50_ms / theirs.p50_ms
                p99 = ours.p99_ms / theirs.p99_ms
                cell += f" (p50 x{p50:.2f}, p99 x{p99:.2f})"
            cells.append(cell)
        if cells:
            lines.append(f"  {workload:10} {in_flight:>6} {size:>6} B: " + "; ".join(cells))
    if not lines:
        return ""
    title = "amqpsched / peer, same run (tasks/s: >1 = amqpsched faster; p50, p99: <1 = sooner):"
    return "\n".join([title, *lines])
