"""Observability, proven: real traffic through a scheduler and a worker started by their CLIs,
their ``/metrics`` asserted to the unit, ``promtool`` on the output, a real Prometheus scraping
them and evaluating every dashboard query and every rule, the dashboards' JSON, the alert rules'
unit tests, and ``/livez`` and ``/readyz`` while the broker is cut away."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from amqpsched import Client
from amqpsched.errors import TaskFailed
from amqpsched.metrics import ClientMetrics, RegistryCollector, SchedulerMetrics, WorkerMetrics

from .conftest import ROOT, Proc, System
from .prom_server import (
    PrometheusServer,
    Sample,
    TcpProxy,
    http_get,
    http_status,
    logged_health_port,
    panel_queries,
    parse_exposition,
    promql_metric_names,
    require_tool,
    series,
    substitute,
    variable_queries,
    walk_panels,
)

pytestmark = pytest.mark.system

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "amqpsched-rules.yml"
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))

#: Metrics of RabbitMQ's rabbitmq_prometheus plugin the dashboards and rules use: from
#: ``/metrics/detailed?family=queue_coarse_metrics`` (labels ``vhost``, ``queue``). The plugin is
#: not enabled on the test broker, so queries over them must parse but cannot return data.
RABBITMQ_PLUGIN_METRICS = frozenset({"rabbitmq_detailed_queue_messages_ready"})
#: Metrics Prometheus makes itself (the rules use them; the dashboards do not).
PROMETHEUS_METRICS = frozenset({"up"})

#: Values of Grafana's variables when a dashboard query is run by hand.
GRAFANA_VALUES = {
    "datasource": "prometheus",
    "namespace": ".*",
    "capability": "echo",
    "__rate_interval": "1m",
    "__interval": "15s",
    "__range": "5m",
}
#: Concurrency of the worker under test (its slot gauges are asserted).
CONCURRENCY = 4


def load_dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in DASHBOARDS}


def exported_metric_names() -> set[str]:
    """Every sample name amqpsched can export, from ``amqpsched.metrics`` itself."""
    scheduler = CollectorRegistry()
    SchedulerMetrics(scheduler)
    scheduler.register(RegistryCollector(lambda: [("w", ["c"], 1, 0, 0.0)], lambda: {"c": 1}))
    worker = CollectorRegistry()
    WorkerMetrics(worker)
    client = CollectorRegistry()
    ClientMetrics(client)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "info": ("_info",),
        "gauge": ("",),
    }
    names: set[str] = set()
    registries: list[Collector] = [scheduler, worker, client]
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


def rule_names(kind: str) -> list[str]:
    """The ``alert`` or ``record`` names of the rule file, in order."""
    return re.findall(rf"^\s*- {kind}: (\S+)\s*$", RULES.read_text(), re.MULTILINE)


# -- (d) the dashboards' JSON ---------------------------------------------------------------------
def test_dashboards_are_importable_and_name_only_exported_metrics() -> None:
    dashboards = load_dashboards()
    assert set(dashboards) == {"amqpsched-overview.json", "amqpsched-capability.json"}
    exported = exported_metric_names()
    uids = [d["uid"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids), uids
    for name, dash in dashboards.items():
        assert dash["schemaVersion"] >= 38, name
        assert dash.get("id") is None, f"{name}: an exported dashboard has no database id"
        assert dash["uid"] and len(dash["uid"]) <= 40, name
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        ds = variables.get("datasource")
        assert ds is not None and ds["type"] == "datasource" and ds["query"] == "prometheus", name
        if name == "amqpsched-capability.json":
            assert {"datasource", "namespace", "capability"} <= set(variables), variables
            assert "amqpsched_tasks_submitted_total" in variables["capability"]["definition"]
        for var in variables.values():
            if var["type"] == "query":
                assert var["datasource"]["uid"] == "${datasource}", (name, var["name"])
        panels = list(walk_panels(dash["panels"]))
        ids = [p["id"] for p in panels]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids {ids}"
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, (name, panel["title"])
            mine = {
                (x, y)
                for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])
            }
            assert not mine & cells, f"{name}: panel {panel['title']!r} overlaps another"
            cells |= mine
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
                name,
                panel["title"],
            )
            assert panel["targets"], (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${datasource}", (name, panel["title"])
        queries = panel_queries(dash) + [(f"variable {v}", q) for v, _, q in variable_queries(dash)]
        used: set[str] = set()
        for where, expr in queries:
            # Every variable a query uses is defined (or one of Grafana's own).
            concrete = substitute(expr, {**{v: "x" for v in variables}, **GRAFANA_VALUES})
            names = promql_metric_names(concrete)
            assert names, f"{name} {where}: no metric in {expr!r}"
            unknown = names - exported - RABBITMQ_PLUGIN_METRICS
            assert not unknown, f"{name} {where}: {sorted(unknown)} is exported by no one"
            used |= names
        assert used & RABBITMQ_PLUGIN_METRICS, f"{name}: no RabbitMQ backlog panel"
    overview = {
        n
        for where, e in panel_queries(dashboards["amqpsched-overview.json"])
        for n in promql_metric_names(substitute(e, {**GRAFANA_VALUES}))
    }
    assert {
        "amqpsched_tasks_finished_total",
        "amqpsched_task_end_to_end_seconds_bucket",
        "amqpsched_workers_live",
        "amqpsched_worker_slots_used",
        "amqpsched_worker_slots_available",
        "rabbitmq_detailed_queue_messages_ready",
    } <= overview


# -- alert rules: promtool, unit tests, one source of truth --------------------------------------
def test_prometheusrule_is_generated_from_the_rule_file() -> None:
    proc = subprocess.run(
        [sys.executable, str(PROMETHEUS_DIR / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    # And what generate.py compares is the rule file itself, under spec: (nothing dropped).
    crd = (PROMETHEUS_DIR / "amqpsched-prometheusrule.yaml").read_text()
    assert "kind: PrometheusRule" in crd and "apiVersion: monitoring.coreos.com/v1" in crd
    spec = crd.split("\nspec:\n", 1)[1]
    dedented = "\n".join(line.removeprefix("  ") for line in spec.splitlines())
    rules_text = RULES.read_text()
    assert rules_text.rstrip().endswith(dedented.rstrip())
    assert dedented.startswith("groups:")


def test_alert_rules_check_and_unit_tests_pass(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    alerts, records = rule_names("alert"), rule_names("record")
    assert len(alerts) == 6, alerts
    tested = "\n".join(p.read_text() for p in RULE_TESTS)
    for alert in alerts:
        assert re.search(rf"alertname: {alert}\s", tested), f"no promtool test for {alert}"
    for record in records:
        assert re.search(rf"expr: {re.escape(record)}\s", tested), f"no promtool test for {record}"
    check = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # The PrometheusRule's groups, taken back out, are a valid rule file too.
    crd = (PROMETHEUS_DIR / "amqpsched-prometheusrule.yaml").read_text()
    spec = crd.split("\nspec:\n", 1)[1]
    extracted = tmp_path / "from-prometheusrule.yml"
    extracted.write_text("\n".join(line.removeprefix("  ") for line in spec.splitlines()))
    check = subprocess.run(
        [promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"{len(alerts) + len(records)} rules found" in check.stdout
    unit = subprocess.run(
        [promtool, "test", "rules", *map(str, RULE_TESTS)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert unit.stdout.count("SUCCESS") == len(RULE_TESTS), unit.stdout


# -- (a), (b), (c) real traffic, /metrics, promtool, a real Prometheus ---------------------------
async def started(proc: Proc, timeout: float = 20.0) -> int:
    """Wait until ``proc`` consumes; return the port its health server logged."""
    await proc.wait_for_output("consuming", timeout)
    port = logged_health_port(proc.output())
    assert port, proc.output()
    return port


async def scrape(port: int) -> tuple[str, list[Sample]]:
    status, body = await http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body
    return body, parse_exposition(body)


async def publish_malformed(system: System) -> dict[str, Any]:
    """A body that is not JSON, published raw to the submit queue; return the answer."""
    conn = await aio_pika.connect(system.settings.amqp_url.get_secret_value())
    try:
        channel = await conn.channel()
        replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{not json", reply_to=replies.name, correlation_id="bad-1"),
            routing_key=system.topology.submit_queue,
        )
        async with asyncio.timeout(10):
            while (msg := await replies.get(fail=False)) is None:
                await asyncio.sleep(0.05)
        await msg.ack()
        assert msg.correlation_id == "bad-1"
        answer: dict[str, Any] = json.loads(msg.body)
        return answer
    finally:
        await conn.close()


async def eventually(
    check: Callable[[], Any], what: str, timeout: float = 15.0, interval: float = 0.2
) -> None:
    """Wait until the coroutine function ``check`` returns a true value."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def test_traffic_metrics_promtool_and_a_real_prometheus(
    system: System, spawn: Callable[..., Proc], tmp_path: Path
) -> None:
    promtool = require_tool("promtool")
    require_tool("prometheus")
    system.capabilities.update({"obs_fail", "obs_flaky", "obs_nobody"})
    sched = spawn(["-m", "amqpsched.scheduler", "--metrics-port", "0"], system.env(), "sched")
    worker = spawn(
        [
            "-m",
            "amqpsched.worker",
            "--metrics-port",
            "0",
            "--app",
            "tests.obs_apps",
            *("-c", "echo", "-c", "obs_fail", "-c", "obs_flaky"),
            "--concurrency",
            str(CONCURRENCY),
        ],
        system.env(),
        "worker",
    )
    sched_port, worker_port = await asyncio.gather(started(sched), started(worker))
    prom = PrometheusServer(
        tmp_path / "prometheus",
        {
            "amqpsched-scheduler": [f"127.0.0.1:{sched_port}"],
            "amqpsched-worker": [f"127.0.0.1:{worker_port}"],
        },
        [RULES],
    )
    prom.start()
    client_registry = CollectorRegistry()
    client = Client(system.settings, registry=client_registry)
    try:
        await prom.wait_ready()
        await eventually(
            lambda: _equals(prom, "sum(up)", 2), "Prometheus to scrape both processes", 20
        )
        await client.connect()

        async def failure(capability: str, payload: Any, timeout: float = 10) -> str:
            with pytest.raises(TaskFailed) as info:
                await client.call(capability, payload, timeout=timeout)
            return info.value.error_type

        # Round 1: successes, a handler error, a retry, a no_worker, a bad input.
        *echoes, failed, flaky, nobody, bad = await asyncio.gather(
            *(client.call("echo", i, timeout=10) for i in range(3)),
            failure("obs_fail", "first"),
            client.call("obs_flaky", "flaky", timeout=10),
            failure("obs_nobody", "nobody", timeout=1.0),
            publish_malformed(system),
        )
        assert (echoes, failed, flaky, nobody) == ([0, 1, 2], "handler_error", "flaky", "no_worker")
        assert bad["status"] == "failed", bad
        assert bad["error"]["type"] == "invalid_request", bad
        assert bad["error"]["message"].startswith("malformed_json"), bad
        # Prometheus has seen round 1; round 2 makes rates move between two scrapes (a labelled
        # counter's first sample is its first increment, which rate() cannot see).
        await eventually(
            lambda: _equals(prom, "sum(amqpsched_tasks_finished_total)", 6), "round 1 scraped"
        )
        more = await asyncio.gather(
            client.call("echo", "a", timeout=10),
            client.call("echo", "b", timeout=10),
            failure("obs_fail", "second"),
        )
        assert list(more) == ["a", "b", "handler_error"]

        # (a) the counters and histograms, to the unit.
        async def scheduler_done() -> bool:
            # The slot gauges are as of each worker's last heartbeat (every 0.2s here).
            _, samples = await scrape(sched_port)
            finished = series(samples, "amqpsched_tasks_finished_total", "capability", "outcome")
            used = series(samples, "amqpsched_worker_slots_used", "capability")
            return sum(finished.values()) >= 9 and not any(used.values())

        await eventually(scheduler_done, "the scheduler to count 9 answers, all slots free")
        sched_text, s = await scrape(sched_port)
        worker_text, w = await scrape(worker_port)
        assert_scheduler_metrics(s)
        assert_worker_metrics(w)
        calls = series(
            parse_exposition(generate_latest(client_registry).decode()),
            "amqpsched_client_call_seconds_count",
            "capability",
            "outcome",
        )
        assert calls == {
            ("echo", "succeeded"): 5,
            ("obs_fail", "handler_error"): 2,
            ("obs_flaky", "succeeded"): 1,
            ("obs_nobody", "no_worker"): 1,
        }
        exported = exported_metric_names()
        for samples in (s, w):
            names = {n for n, _, _ in samples}
            assert names <= exported, names - exported

        # (b) promtool check metrics on each process's output.
        for who, text in (("scheduler", sched_text), ("worker", worker_text)):
            lint = subprocess.run(
                [promtool, "check", "metrics"],
                input=text,
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert lint.returncode == 0, f"{who}: {lint.stdout}{lint.stderr}"

        # (c) every dashboard query and every rule, evaluated by Prometheus.
        await eventually(
            lambda: _equals(prom, "sum(amqpsched_tasks_finished_total)", 9), "round 2 scraped"
        )
        produced = {n for n, _, _ in s + w}
        await check_dashboard_queries(prom, produced)
        await check_rules(prom, produced)

        # Scheduler down: its target fails its scrapes and the alert goes pending.
        sched.stop()

        async def scheduler_down_pending() -> bool:
            alerts = (await prom.api("/api/v1/alerts"))["data"]["alerts"]
            return any(a["labels"]["alertname"] == "AmqpschedSchedulerDown" for a in alerts)

        await eventually(scheduler_down_pending, "AmqpschedSchedulerDown to be pending", 15)
    finally:
        await client.close()
        prom.stop()


async def _equals(prom: PrometheusServer, expr: str, value: float) -> bool:
    return await prom.scalar(expr) == value


def nonzero(values: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v for k, v in values.items() if v}


def assert_scheduler_metrics(s: list[Sample]) -> None:
    per_cap = {"echo": 5, "obs_fail": 2, "obs_flaky": 1, "obs_nobody": 1}
    started = {"echo": 5, "obs_fail": 2, "obs_flaky": 1}
    cap = "capability"
    assert nonzero(series(s, "amqpsched_tasks_submitted_total", cap)) == {
        (c,): n for c, n in per_cap.items()
    }
    assert nonzero(series(s, "amqpsched_tasks_dispatched_total", cap)) == {
        (c,): n for c, n in per_cap.items()
    }
    finished = series(s, "amqpsched_tasks_finished_total", cap, "outcome")
    # Every outcome of a capability exists from its first task on, at 0: rate() sees the first.
    assert finished[("echo", "handler_error")] == 0
    assert nonzero(finished) == {
        ("echo", "succeeded"): 5,
        ("obs_fail", "handler_error"): 2,
        ("obs_flaky", "succeeded"): 1,
        ("obs_nobody", "no_worker"): 1,
    }
    assert nonzero(series(s, "amqpsched_task_retries_total", cap)) == {("obs_flaky",): 1}
    assert nonzero(series(s, "amqpsched_tasks_redispatched_total", cap)) == {}
    assert series(s, "amqpsched_fenced_results_total", cap) == {}
    rejected = series(s, "amqpsched_rejected_total", "reason")
    assert rejected[("too_large",)] == 0
    assert nonzero(rejected) == {("malformed_json",): 1}
    assert series(s, "amqpsched_dead_lettered_total", "reason") == {("malformed_json",): 1}
    assert series(s, "amqpsched_task_end_to_end_seconds_count", cap) == {
        (c,): n for c, n in per_cap.items()
    }
    assert series(s, "amqpsched_task_queue_wait_seconds_count", cap) == {
        (c,): n for c, n in started.items()
    }
    assert series(s, "amqpsched_task_execution_seconds_count", cap) == {
        (c,): n for c, n in started.items()
    }
    for histogram in ("end_to_end", "queue_wait", "execution"):
        name = f"amqpsched_task_{histogram}_seconds"
        counts = series(s, f"{name}_count", cap)
        infinite = {
            k[:1]: v for k, v in series(s, f"{name}_bucket", cap, "le").items() if k[1] == "+Inf"
        }
        assert infinite == counts, name
    # The no_worker answer came at its 1s timeout, not before.
    nobody = series(s, "amqpsched_task_end_to_end_seconds_bucket", cap, "le")
    assert nobody[("obs_nobody", "0.5")] == 0 and nobody[("obs_nobody", "5.0")] == 1
    # Capabilities seen once keep their gauges, at 0 when nothing is left.
    assert series(s, "amqpsched_tasks_in_flight", cap) == {(c,): 0 for c in per_cap}
    offered = {("echo",), ("obs_fail",), ("obs_flaky",)}
    live = series(s, "amqpsched_workers_live", cap)
    assert live == {**dict.fromkeys(offered, 1), ("obs_nobody",): 0}
    assert nonzero(series(s, "amqpsched_worker_slots_used", cap)) == {}
    available = series(s, "amqpsched_worker_slots_available", cap)
    assert nonzero(available) == dict.fromkeys(offered, CONCURRENCY)
    ages = series(s, "amqpsched_worker_heartbeat_age_seconds", "worker")
    assert len(ages) == 1 and 0 <= next(iter(ages.values())) < 2, ages
    assert series(s, "amqpsched_broker_reconnects_total") == {(): 0}
    assert series(s, "amqpsched_build_info", "component") == {("scheduler",): 1}


def assert_worker_metrics(w: list[Sample]) -> None:
    cap = "capability"
    assert series(w, "amqpsched_worker_tasks_total", cap, "outcome") == {
        ("echo", "succeeded"): 5,
        ("obs_fail", "handler_error"): 2,
        ("obs_flaky", "retrying"): 1,
        ("obs_flaky", "succeeded"): 1,
    }
    assert series(w, "amqpsched_worker_execution_seconds_count", cap) == {
        ("echo",): 5,
        ("obs_fail",): 2,
        ("obs_flaky",): 2,
    }
    assert series(w, "amqpsched_worker_slots_local") == {(): CONCURRENCY}
    assert series(w, "amqpsched_worker_slots_used_local") == {(): 0}
    assert series(w, "amqpsched_dead_lettered_total", "reason") == {}
    assert series(w, "amqpsched_broker_reconnects_total") == {(): 0}
    assert series(w, "amqpsched_build_info", "component") == {("worker",): 1}


async def check_dashboard_queries(prom: PrometheusServer, produced: set[str]) -> None:
    """Every panel query and variable query parses; those over metrics our traffic produced
    return data."""
    required = 0
    for name, dash in load_dashboards().items():
        for var, label, expr in variable_queries(dash):
            result = await prom.vector(substitute(expr, GRAFANA_VALUES))
            if var == "capability":
                offered = {r["metric"].get(label) for r in result}
                assert {"echo", "obs_fail", "obs_flaky", "obs_nobody"} <= offered, offered
        # One capability selected (not every metric has a series for it), then "All" selected:
        # every query must return data when all its metrics were produced.
        for capability, need_data in (("echo", False), ("(echo|obs_fail)", False), (".+", True)):
            values = {**GRAFANA_VALUES, "capability": capability}
            for where, template in panel_queries(dash):
                expr = substitute(template, values)
                answer = await prom.query(expr)
                assert answer["status"] == "success", f"{name} {where}: {expr}\n{answer}"
                if need_data and promql_metric_names(expr) <= produced:
                    required += 1
                    assert answer["data"]["result"], f"{name} {where}: no data for {expr}"
    assert required >= 30, f"only {required} dashboard queries could be checked for data"


async def check_rules(prom: PrometheusServer, produced: set[str]) -> None:
    """Prometheus loaded every rule, evaluates each without error, each expression parses; the
    recording rules over our metrics return data; the failure-ratio alert is pending for the
    capability that always fails, and no other alert is active."""
    alerts, records = rule_names("alert"), rule_names("record")

    async def all_evaluated() -> bool:
        groups = (await prom.api("/api/v1/rules"))["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return len(rules) == len(alerts) + len(records) and all(r["health"] == "ok" for r in rules)

    await eventually(all_evaluated, "every rule to be evaluated without error")

    async def failure_ratio_recorded() -> bool:
        # Recorded from a scrape after round 2: 100% for obs_fail, 0% for echo.
        ratio = {
            r["metric"]["capability"]: float(r["value"][1])
            for r in await prom.vector("amqpsched:task_failure_ratio:rate5m")
        }
        return ratio.get("obs_fail") == 1.0 and ratio.get("echo") == 0.0

    await eventually(failure_ratio_recorded, "the failure ratio of both rounds to be recorded", 10)
    groups = (await prom.api("/api/v1/rules"))["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == set(alerts) | set(records)
    recorded_inputs = {r: promql_metric_names(loaded[r]["query"]) for r in records}
    for rule in loaded.values():
        answer = await prom.query(rule["query"])
        assert answer["status"] == "success", f"{rule['name']}: {answer}"
    for record, inputs in recorded_inputs.items():
        if inputs <= produced:
            assert await prom.vector(record), f"recording rule {record} has no data"
        else:
            assert inputs & RABBITMQ_PLUGIN_METRICS, record
    for rule in loaded.values():
        names = promql_metric_names(rule["query"])
        unknown = names - exported_metric_names() - RABBITMQ_PLUGIN_METRICS - PROMETHEUS_METRICS
        assert unknown <= set(records), f"{rule['name']}: {unknown}"

    async def failure_ratio_pending() -> bool:
        active = (await prom.api("/api/v1/alerts"))["data"]["alerts"]
        return any(
            a["labels"]["alertname"] == "AmqpschedTaskFailureRatioHigh"
            and a["labels"].get("capability") == "obs_fail"
            for a in active
        )

    await eventually(failure_ratio_pending, "AmqpschedTaskFailureRatioHigh on obs_fail", 10)
    active = (await prom.api("/api/v1/alerts"))["data"]["alerts"]
    assert {(a["labels"]["alertname"], a["state"]) for a in active} == {
        ("AmqpschedTaskFailureRatioHigh", "pending")
    }, active


# -- (e) /livez and /readyz while the broker is unreachable ---------------------------------------
async def test_livez_stays_up_and_readyz_follows_the_broker(
    system: System, spawn: Callable[..., Proc]
) -> None:
    url = urlsplit(system.settings.amqp_url.get_secret_value())
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 5672)
    await proxy.start()
    netloc = f"{url.username}:{url.password}@127.0.0.1:{proxy.port}"
    # Reconnect attempts every 0.5s (aio-pika's default is 5s) to keep the test short.
    proxied = urlunsplit(url._replace(netloc=netloc, query="reconnect_interval=0.5"))
    env = system.env(AMQPSCHED_AMQP_URL=proxied)
    procs = {
        "scheduler": spawn(["-m", "amqpsched.scheduler", "--metrics-port", "0"], env, "sched"),
        "worker": spawn(
            ["-m", "amqpsched.worker", "--metrics-port", "0", "-c", "echo"], env, "worker"
        ),
    }
    try:
        ports = dict(
            zip(procs, await asyncio.gather(*(started(p) for p in procs.values())), strict=True)
        )

        async def health(who: str) -> tuple[int | None, int | None]:
            base = f"http://127.0.0.1:{ports[who]}"
            return await http_status(f"{base}/livez"), await http_status(f"{base}/readyz")

        async def all_ready(ready: bool) -> bool:
            for who, proc in procs.items():
                live, readyz = await health(who)
                assert live == 200, f"{who}: /livez answered {live}\n{proc.output()}"
                if readyz != (200 if ready else 503):
                    return False
            return True

        await eventually(lambda: all_ready(True), "both processes ready", 10)
        client = await system.client()  # straight to the broker, not through the proxy
        assert await client.call("echo", "before", timeout=10) == "before"

        await proxy.cut()
        await eventually(lambda: all_ready(False), "/readyz to go 503 without the broker", 10)
        for _ in range(5):  # and it stays so (while /livez stays 200) as long as the broker is away
            assert await all_ready(False)
            await asyncio.sleep(0.2)

        await proxy.start()
        await eventually(lambda: all_ready(True), "/readyz to come back", 20)
        assert await client.call("echo", "after", timeout=10) == "after"
        for who in procs:
            _, samples = await scrape(ports[who])
            # At least the one reconnect (a loaded machine can need a second attempt that gets
            # as far as a connection and loses it again).
            reconnects = series(samples, "amqpsched_broker_reconnects_total")
            assert set(reconnects) == {()} and reconnects[()] >= 1, (who, reconnects)
    finally:
        await proxy.cut()
