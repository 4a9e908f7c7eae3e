"""The ``amqpsched`` command: parsing only; each subcommand calls the library."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from .errors import AmqpschedError
from .settings import Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for key in ("metrics_port", "concurrency", "namespace", "log_level"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    return Settings(**overrides)


def _common(p: argparse.ArgumentParser, metrics: bool = True) -> None:
    if metrics:
        p.add_argument("--metrics-port", type=int, help="serve /metrics, /livez, /readyz here")
    p.add_argument("--namespace", help="prefix of every queue and exchange name")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amqpsched", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("scheduler", help="run a scheduler")
    _common(p)

    p = sub.add_parser("worker", help="run a worker")
    _common(p)
    p.add_argument(
        "--capability", "-c", action="append", default=[], help="capability to serve (repeatable)"
    )
    p.add_argument("--concurrency", "-n", type=int, help="tasks run at once")
    p.add_argument(
        "--app", action="append", default=[], help="module[:attr] with a WorkerApp (repeatable)"
    )

    p = sub.add_parser("call", help="run one task and print its answer")
    _common(p, metrics=False)
    p.add_argument("capability")
    p.add_argument("payload", help="JSON payload")
    p.add_argument("--timeout", type=float)

    p = sub.add_parser("map", help="run a capability on every payload of a file (JSON lines)")
    _common(p, metrics=False)
    p.add_argument("capability")
    p.add_argument("file", help="one JSON payload per line; - for standard input")
    p.add_argument("--timeout", type=float, help="seconds each task's answer is due within")
    p.add_argument("--window", type=int, default=1000, help="tasks in flight at most")
    p.add_argument("--unordered", action="store_true", help="print results as they complete")

    p = sub.add_parser("status", help="print a task's status")
    _common(p, metrics=False)
    p.add_argument("task_id")

    p = sub.add_parser("capabilities", help="list the live capabilities")
    _common(p, metrics=False)

    p = sub.add_parser("dlq", help="list or replay the dead-letter queue")
    dlq = p.add_subparsers(dest="dlq_command", required=True)
    p = dlq.add_parser("list", help="print the dead letters (none is removed)")
    _common(p, metrics=False)
    p.add_argument("--limit", type=int, default=100, help="most dead letters shown")
    p.add_argument("--json", action="store_true", help="one JSON array")
    p = dlq.add_parser("replay", help="submit dead letters again and remove them")
    _common(p, metrics=False)
    p.add_argument("ids", nargs="*", metavar="ID", help="dead-letter ids (see dlq list)")
    p.add_argument("--all", action="store_true", help="every dead letter")

    p = sub.add_parser("schema", help="write or check docs/schemas/*.json")
    p.add_argument("--dir", default="docs/schemas", type=Path)
    p.add_argument("--check", action="store_true", help="fail if the files differ")

    sub.add_parser("env-example", help="print .env.example (every setting and its default)")

    p = sub.add_parser("demo", help="run scheduler, a resize worker and a client, end to end")
    p.add_argument("--images", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except AmqpschedError as exc:
        print(f"amqpsched: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from .runtime import WORKER_GC_THRESHOLDS, run, serve, setup_logging

    if args.command == "schema":
        from .schemas import check_or_write

        return check_or_write(args.dir, check=args.check)
    if args.command == "env-example":
        from .settings import env_example

        print(env_example(), end="")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(images=args.images)
    settings = _settings(args)
    setup_logging(settings)
    if args.command == "dlq":
        return run(_dlq_command(args, settings), settings)
    if args.command == "scheduler":
        from .scheduler import Scheduler

        registry = CollectorRegistry()
        run(serve(Scheduler(settings, registry=registry), settings, registry), settings)
        return 0
    if args.command == "worker":
        from .worker import Worker, WorkerApp
        from .worker.app import load_app
        from .worker.builtin import app as builtin

        app = WorkerApp()
        app.include(builtin)
        for spec in args.app:
            app.include(load_app(spec))
        registry = CollectorRegistry()
        worker = Worker(app, args.capability, settings, registry=registry)
        run(serve(worker, settings, registry, WORKER_GC_THRESHOLDS), settings)
        return 0
    if args.command == "map":
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
        args.payloads = [json.loads(line) for line in text.splitlines() if line.strip()]
    return run(_client_command(args, settings), settings)


async def _dlq_command(args: argparse.Namespace, settings: Settings) -> int:
    from .dlq import format_line, list_dead, replay

    if args.dlq_command == "list":
        dead = await list_dead(settings, limit=args.limit)
        if args.json:
            print(json.dumps([d.to_json() for d in dead], indent=2))
        else:
            for d in dead:
                print(format_line(d))
        return 0
    if bool(args.ids) == args.all:
        print("amqpsched dlq replay: give dead-letter ids or --all (not both)", file=sys.stderr)
        return 2
    report = await replay(settings, None if args.all else args.ids)
    print(f"replayed {len(report.replayed)} dead letter(s)")
    for dead_id in report.not_found:
        print(f"amqpsched: dead letter {dead_id} not found", file=sys.stderr)
    for dead_id, why in report.skipped:
        print(f"amqpsched: dead letter {dead_id} not replayed: {why}", file=sys.stderr)
    return 0 if report.ok else 1


async def _client_command(args: argparse.Namespace, settings: Settings) -> int:
    from .client import Client

    async with Client(settings) as client:
        if args.command == "map":
            return await _map_command(client, args)
        if args.command == "call":
            handle = await client.submit(
                args.capability, json.loads(args.payload), timeout=args.timeout
            )
            answer = await handle.answer()
            print(answer.model_dump_json(indent=2))
            return 0 if answer.status == "succeeded" else 1
        if args.command == "status":
            print((await client.status(args.task_id)).model_dump_json(indent=2))
            return 0
        for entry in await client.capabilities():
            print(
                f"{entry.name:20} workers={entry.workers} slots={entry.slots}  {entry.description}"
            )
        return 0


def _progress_bar(done: int, total: int) -> None:
    width = 40
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


async def _map_command(client: Any, args: argparse.Namespace) -> int:
    from .errors import TaskFailed

    failed = 0
    options: dict[str, Any] = {} if args.timeout is None else {"timeout": args.timeout}
    async for result in client.map(
        args.capability,
        args.payloads,
        ordered=not args.unordered,
        window=args.window,
        progress=_progress_bar if sys.stderr.isatty() else None,
        return_exceptions=True,
        **options,
    ):
        if isinstance(result, TaskFailed):
            failed += 1
            print(
                json.dumps({"error": {"type": result.error_type, "message": result.error_message}})
            )
        elif isinstance(result, Exception):
            failed += 1
            print(json.dumps({"error": {"type": type(result).__name__, "message": str(result)}}))
        else:
            print(json.dumps(result))
    return 1 if failed else 0
