"""A private RabbitMQ node for tests that stop and restart the broker.

The node has its own name, AMQP port, distribution port, data, log and config directories and
Erlang cookie, so it never touches the shared broker. The test owns its process (started in the
foreground, in a session of its own) and stops it, and kills anything left, at teardown.

Usage: the ``rabbit_node`` fixture (function-scoped; a test module gets it with
``from .rabbit_node import rabbit_node_fixture  # noqa: F401``), or
``with RabbitNode(tmp_path / "rabbit") as node: ... node.url ... node.restart()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Collection, Iterator
from pathlib import Path

import pytest

#: Where the real scripts live: ``/usr/sbin/rabbitmq-server`` is a wrapper that, run as root,
#: switches to the ``rabbitmq`` user (losing our environment and our private directories).
SBIN_CANDIDATES = ("/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin", "/usr/lib/rabbitmq/sbin")
RESERVED_PORTS = frozenset({4369, 5672, 15672, 25672, *range(35672, 35683)})


def find_sbin() -> Path | None:
    """The directory holding ``rabbitmq-server`` and ``rabbitmqctl`` (RABBITMQ_SBIN wins)."""
    explicit = os.environ.get("RABBITMQ_SBIN")
    if explicit:
        return Path(explicit)
    for pattern in SBIN_CANDIDATES:
        for found in sorted(glob.glob(pattern), reverse=True):
            if (Path(found) / "rabbitmq-server").exists():
                return Path(found)
    server = shutil.which("rabbitmq-server") or (
        "/usr/sbin/rabbitmq-server" if Path("/usr/sbin/rabbitmq-server").exists() else None
    )
    return Path(server).parent if server else None


def _ephemeral_ports_start() -> int:
    """The first port the kernel hands to outgoing connections (Linux; else the IANA start)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152


def free_port(low: int = 20000, high: int | None = None, avoid: Collection[int] = ()) -> int:
    """A TCP port nobody listens on now, in ``[low, high)``, away from RabbitMQ's defaults
    (25672 distribution, 35672-35682 rabbitmqctl) and from ``avoid``.

    ``high`` defaults to where the ephemeral ports start (at most 50000): a node that starts again
    on its port must not find it taken by some outgoing connection (rabbitmqctl's, another node's).
    """
    if high is None:
        high = max(low + 1000, min(50000, _ephemeral_ports_start()))
    for _ in range(200):
        port = low + secrets.randbelow(high - low)
        if port in RESERVED_PORTS or port in avoid:
            continue
        if _port_free(port):
            return port
    raise RuntimeError("no free port found")


def _port_free(port: int, reuse_addr: bool = False) -> bool:
    """Nobody listens on ``port``; with ``reuse_addr`` (as the Erlang VM binds), connections of
    a stopped node still in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        if reuse_addr:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


class RabbitNodeError(RuntimeError):
    pass


class RabbitNode:
    """One private RabbitMQ node. ``start()`` / ``stop()`` / ``restart()`` keep its data
    directory, so durable (quorum) queues and their messages survive a restart.

    ``cookie``: the Erlang cookie (nodes of one cluster share it; default: Erlang makes one).
    ``avoid_ports``: ports other nodes of the test will use. ``erl_args``: added to the VM's.
    """

    def __init__(
        self,
        base: Path,
        sbin: Path | None = None,
        *,
        cookie: str | None = None,
        avoid_ports: Collection[int] = (),
        erl_args: str = "",
    ) -> None:
        found = sbin or find_sbin()
        if found is None:
            raise RabbitNodeError("rabbitmq-server not found (set RABBITMQ_SBIN)")
        self.sbin = found
        self.base = base
        self.nodename = f"amqpsched-test-{secrets.token_hex(4)}@localhost"
        self.port = free_port(avoid=avoid_ports)
        self.dist_port = free_port(avoid={*avoid_ports, self.port})
        self.erl_args = erl_args
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._proc: subprocess.Popen[bytes] | None = None
        self._starts = 0
        #: Seconds each start took until AMQP answered (the first one creates the node).
        self.start_times: list[float] = []
        self.stop_times: list[float] = []
        for sub in ("home", "mnesia", "log"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        self.config_file = base / "rabbitmq.conf"
        self.config_file.write_text(
            "loopback_users = none\n"
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "log.console = true\n"
            "log.console.level = info\n"
            "log.file.level = info\n"
        )
        (base / "enabled_plugins").write_text("[].\n")
        (base / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq/rabbitmq-env.conf
        if cookie is not None:
            path = base / "home" / ".erlang.cookie"
            path.write_text(cookie)
            path.chmod(0o400)  # Erlang refuses a cookie others can read

    # -- environment -------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """For ``rabbitmq-server`` and ``rabbitmqctl`` of this node (HOME holds its cookie)."""
        keep = ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM")
        env = {k: v for k, v in os.environ.items() if k in keep}
        base = self.base
        env.update(
            HOME=str(base / "home"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(base / "mnesia"),
            RABBITMQ_LOG_BASE=str(base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.config_file),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(base / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                f"-kernel inet_dist_use_interface {{127,0,0,1}} {self.erl_args}".rstrip()
            ),
            ERL_EPMD_ADDRESS="127.0.0.1",
        )
        return env

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        """Console output of every start, for failure messages."""
        parts = []
        for n in range(1, self._starts + 1):
            path = self.base / f"server-{n}.log"
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> float:
        """Start the node; return when it accepts AMQP connections. Returns the seconds taken."""
        if self.running:
            raise RabbitNodeError("node already running")
        # A killed node's VM may take a moment to exit and free its ports.
        freed_by = time.monotonic() + 10
        while not all(_port_free(p, reuse_addr=True) for p in (self.port, self.dist_port)):
            if time.monotonic() > freed_by:
                raise RabbitNodeError(f"port {self.port} or {self.dist_port} is taken")
            time.sleep(0.05)
        self._starts += 1
        log = (self.base / f"server-{self._starts}.log").open("wb")
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                [str(self.sbin / "rabbitmq-server")],
                env=self.env(),
                cwd=self.base,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: kill it and its children
            )
        finally:
            log.close()
        deadline = started + timeout
        while not _answers(self.port):
            if self._proc.poll() is not None:
                raise RabbitNodeError(
                    f"rabbitmq-server exited with {self._proc.returncode}:\n{self.output()[-4000:]}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RabbitNodeError(f"node not up in {timeout}s:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        took = time.monotonic() - started
        self.start_times.append(took)
        return took

    def ctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.sbin / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def diagnose(self) -> str:
        """Queues (ready / unacked / consumers) and channels (consumers / unacked / prefetch),
        for failure messages."""
        out = []
        for args in (
            (
                "list_queues",
                "name",
                "type",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ),
            (
                "list_channels",
                "name",
                "consumer_count",
                "messages_unacknowledged",
                "prefetch_count",
            ),
        ):
            try:
                done = self.ctl("-q", *args, timeout=30)
                out.append(f"$ rabbitmqctl {' '.join(args)}\n{done.stdout}{done.stderr}")
            except (subprocess.TimeoutExpired, OSError) as exc:
                out.append(f"$ rabbitmqctl {' '.join(args)}: {exc!r}")
        return "\n".join(out)

    def stop(self, timeout: float = 60.0) -> float:
        """A clean stop (``rabbitmqctl stop``); kills the node if that fails. Returns seconds."""
        started = time.monotonic()
        if self._proc is None:
            return 0.0
        if self._proc.poll() is None:
            try:
                done = self.ctl("stop", timeout=timeout)
                if done.returncode != 0:
                    raise RabbitNodeError(f"rabbitmqctl stop failed: {done.stdout}{done.stderr}")
                self._proc.wait(timeout)
            except (subprocess.TimeoutExpired, RabbitNodeError):
                self.kill()
                raise
        self._kill_group()  # anything the node left behind in its session
        took = time.monotonic() - started
        self.stop_times.append(took)
        return took

    def kill(self) -> None:
        """SIGKILL the node and everything in its process group (a crash, or cleanup)."""
        if self._proc is None:
            return
        self._kill_group()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(10)

    def _kill_group(self) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def restart(self, timeout: float = 60.0) -> tuple[float, float]:
        """Full stop, then start on the same data. Returns (stop seconds, start seconds)."""
        return self.stop(timeout), self.start(timeout)

    # -- async wrappers: the event loop keeps running (clients reconnect meanwhile) -----------
    async def astart(self, timeout: float = 60.0) -> float:
        return await asyncio.to_thread(self.start, timeout)

    async def astop(self, timeout: float = 60.0) -> float:
        return await asyncio.to_thread(self.stop, timeout)

    async def arestart(self, timeout: float = 60.0) -> tuple[float, float]:
        return await asyncio.to_thread(self.restart, timeout)

    def close(self) -> None:
        try:
            if self.running:
                self.stop(30)
        except (RabbitNodeError, subprocess.TimeoutExpired, OSError):
            pass
        finally:
            self.kill()

    def __enter__(self) -> RabbitNode:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(name="rabbit_node")
def rabbit_node_fixture(tmp_path: Path) -> Iterator[RabbitNode]:
    """A running private RabbitMQ node, stopped (and killed if need be) after the test."""
    if find_sbin() is None:
        pytest.skip("rabbitmq-server is not installed (set RABBITMQ_SBIN)")
    node = RabbitNode(tmp_path / "rabbit")
    try:
        node.start()
    except RabbitNodeError as exc:
        node.close()
        pytest.fail(f"private RabbitMQ node did not start: {exc}")
    try:
        yield node
    finally:
        node.close()
