"""Helpers for the observability tests: a real Prometheus server of the test's own, HTTP and
exposition-format helpers, PromQL and Grafana-variable helpers, and a TCP proxy to cut the
broker away from a process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

#: Ports nothing of ours may take (RabbitMQ's defaults, Prometheus's default).
RESERVED_PORTS = frozenset({4369, 5672, 9090, 15672, 15692, 25672, *range(35672, 35683)})


def require_tool(name: str) -> str:
    """The path of ``name`` (``promtool``, ``prometheus``). Absent: the test fails in CI (the
    ``CI`` environment variable is set; ``.ci/run`` installs Debian's ``prometheus`` package),
    and is skipped elsewhere."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path:
        return path
    message = (
        f"{name} not found: install Debian's prometheus package (apt-get install prometheus), "
        "which ships /usr/bin/prometheus and /usr/bin/promtool; .ci/run does it in CI"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    """A TCP port nobody listens on now, below the usual ephemeral range (so an outgoing
    connection's source port cannot take it between now and its use)."""
    for _ in range(200):
        port = 20000 + secrets.randbelow(12000)
        if port in RESERVED_PORTS:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found")


# -- HTTP ------------------------------------------------------------------------------------------
def _get(url: str, timeout: float) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


async def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    """Status and body of a GET; an HTTP error status is returned, not raised."""
    return await asyncio.to_thread(_get, url, timeout)


async def http_status(url: str, timeout: float = 2.0) -> int | None:
    """The status of a GET, or None when nothing answers."""
    try:
        return (await http_get(url, timeout))[0]
    except (OSError, urllib.error.URLError):
        return None


HEALTH_PORT_RE = re.compile(r"serving /metrics, /livez, /readyz on port (\d+)")


def logged_health_port(output: str) -> int | None:
    """The port a process started with ``--metrics-port 0`` logged, if it did yet."""
    match = HEALTH_PORT_RE.search(output)
    return int(match.group(1)) if match else None


# -- exposition format -----------------------------------------------------------------------------
Sample = tuple[str, dict[str, str], float]


def parse_exposition(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` body: (sample name, labels, value)."""
    return [
        (s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def series(samples: list[Sample], name: str, *label_names: str) -> dict[tuple[str, ...], float]:
    """The samples called ``name``, keyed by the values of ``label_names``. Two samples with the
    same key are an error (a label was forgotten)."""
    out: dict[tuple[str, ...], float] = {}
    for sample_name, labels, value in samples:
        if sample_name != name:
            continue
        key = tuple(labels.get(n, "") for n in label_names)
        assert key not in out, f"{name}: two samples for {dict(zip(label_names, key, strict=True))}"
        out[key] = value
    return out


def exported_names(samples: list[Sample]) -> set[str]:
    return {name for name, _, _ in samples}


# -- PromQL and Grafana ----------------------------------------------------------------------------
PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (strings, label matchers, ranges, grouping
    clauses, function names and keywords removed). Good enough for the expressions we ship."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = _GROUPING.sub("", text)
    text = re.sub(r"\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b", "0", text, flags=re.IGNORECASE)
    names = set()
    for match in _IDENT.finditer(text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match.group().lower() not in PROMQL_KEYWORDS:
            names.add(match.group())
    return names


_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """``expr`` with Grafana's ``$var``, ``${var}``, ``${var:fmt}`` and ``[[var]]`` replaced.
    An unknown variable is an error (a query that could never run); ``$1`` (a regex group in
    ``label_replace``) is not a variable, and Grafana leaves it alone too."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name.isdigit():
            return match.group()
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(replace, expr)


def walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside (collapsed) rows included."""
    for panel in panels:
        yield panel
        yield from walk_panels(panel.get("panels", []))


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) of every panel target of ``dashboard``."""
    out = []
    for panel in walk_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(
                    (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
                )
    return out


LABEL_VALUES_RE = re.compile(r"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$", re.DOTALL)


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, label, PromQL) of each ``label_values(selector, label)`` query variable, as an
    equivalent PromQL expression: ``count by (label) (selector)``."""
    out = []
    for var in dashboard["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES_RE.match(query)
        assert match, f"variable {var['name']}: unsupported query {query!r}"
        selector, label = match.groups()
        out.append((var["name"], label, f"count by ({label}) ({selector})"))
    return out


# -- a Prometheus server ---------------------------------------------------------------------------
class PrometheusServer:
    """A Prometheus of the test's own: its port, its data directory, its configuration (written
    as JSON, which is YAML), scraping ``jobs`` every ``scrape_interval``, with ``rule_files``."""

    def __init__(
        self,
        workdir: Path,
        jobs: Mapping[str, list[str]],
        rule_files: list[Path],
        scrape_interval: str = "1s",
    ) -> None:
        self.binary = require_tool("prometheus")
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "global": {
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "evaluation_interval": scrape_interval,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        }
        self._proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "prometheus.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps(self.config, indent=2))
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    async def wait_ready(self, timeout: float = 20.0) -> None:
        async with asyncio.timeout(timeout):
            while await http_status(f"{self.url}/-/ready") != 200:
                if self._proc is not None and self._proc.poll() is not None:
                    raise AssertionError(f"prometheus exited early:\n{self.output()}")
                await asyncio.sleep(0.1)

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        """The JSON of a GET on the HTTP API (``/api/v1/...``), whatever its status."""
        query = urllib.parse.urlencode(params)
        _, body = await http_get(f"{self.url}{path}?{query}" if query else f"{self.url}{path}")
        result: dict[str, Any] = json.loads(body)
        return result

    async def query(self, expr: str) -> dict[str, Any]:
        """``/api/v1/query`` at the current time: ``{"status": ..., "data"|"error": ...}``."""
        return await self.api("/api/v1/query", query=expr)

    async def vector(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query that must succeed."""
        answer = await self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    async def scalar(self, expr: str) -> float | None:
        """The one value of an instant query, or None when it returns nothing."""
        result = await self.vector(expr)
        assert len(result) <= 1, f"{expr}: {result}"
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)


# -- a TCP proxy -----------------------------------------------------------------------------------
class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``upstream``. :meth:`cut` stops listening and aborts every
    connection (the broker becomes unreachable for whoever goes through it); :meth:`start`
    again listens on the same port."""

    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, reuse_address=True
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            except OSError:
                writer.transport.abort()
                return
            self.connections += 1
            self._transports.update({writer.transport, up_writer.transport})
            await asyncio.gather(
                self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
            )
        finally:
            if task is not None:
                self._handlers.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()
        if self._handlers:  # aborted: their pipes end at once
            _, stuck = await asyncio.wait(set(self._handlers), timeout=5)
            for task in stuck:
                task.cancel()
