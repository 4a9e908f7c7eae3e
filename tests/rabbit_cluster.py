"""A private three-node RabbitMQ cluster for tests of cluster mode (failover between nodes).

Built on :class:`RabbitNode`: each node has its own name, AMQP and distribution ports and
directories; they share one Erlang cookie. All start at once, then the others join the first, one
after the other (``rabbitmqctl stop_app; join_cluster <first>; start_app``), so quorum queues
declared afterwards get a member on every node. Nothing here touches the shared broker. Teardown
kills every node and removes their directories.

Usage: the ``rabbit_cluster`` fixture (one cluster per test module, every node running at the
start of each test; a module gets it with
``from .rabbit_cluster import rabbit_cluster_fixture, rabbit_cluster_module_fixture``),
or ``with RabbitCluster(tmp_path / "cluster") as cluster: ... cluster.urls ...
cluster.stop_node(0) ... cluster.start_node(0)``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .rabbit_node import RabbitNode, RabbitNodeError, find_sbin

#: Let three VMs share a small machine: no busy-waiting schedulers.
ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"


class RabbitCluster:
    """``size`` private RabbitMQ nodes in one cluster; node ``i`` is ``nodes[i]`` and answers
    AMQP at ``urls[i]``. A stopped or killed node that starts again rejoins by itself (its data
    directory remembers the cluster)."""

    def __init__(self, base: Path, size: int = 3, sbin: Path | None = None) -> None:
        self.base = base
        cookie = secrets.token_hex(20)
        taken: set[int] = set()
        self.nodes: list[RabbitNode] = []
        for i in range(size):
            node = RabbitNode(
                base / f"node{i}", sbin, cookie=cookie, avoid_ports=taken, erl_args=ERL_ARGS
            )
            taken |= {node.port, node.dist_port}
            self.nodes.append(node)
        #: Seconds :meth:`start` took (all nodes up, cluster formed).
        self.start_time: float | None = None

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, in node order."""
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """Every node's URL in one ``AMQPSCHED_AMQP_URL`` value."""
        return ",".join(self.urls)

    @property
    def nodenames(self) -> list[str]:
        return [node.nodename for node in self.nodes]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 90.0) -> float:
        """Start every node, join the others to the first; returns the seconds taken."""
        started = time.monotonic()
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            list(pool.map(lambda node: node.start(timeout), self.nodes))
        for node in self.nodes[1:]:  # one at a time: concurrent joins can fail to merge schemas
            self._join(node)
        running = self.running_nodes()
        if running != set(self.nodenames):
            raise RabbitNodeError(f"cluster not formed: running {sorted(running)}")
        self.start_time = time.monotonic() - started
        return self.start_time

    def _join(self, node: RabbitNode) -> None:
        seed = self.nodes[0].nodename
        for args in (("stop_app",), ("join_cluster", seed), ("start_app",)):
            self._ctl(node, *args)

    def stop_node(self, i: int, *, kill: bool = False, timeout: float = 60.0) -> float:
        """Stop node ``i``: cleanly (``rabbitmqctl stop``: it closes its connections first), or
        with ``kill`` as a crash (SIGKILL: its clients' sockets just break). Returns seconds."""
        started = time.monotonic()
        if kill:
            self.nodes[i].kill()
        else:
            self.nodes[i].stop(timeout)
        return time.monotonic() - started

    def start_node(self, i: int, timeout: float = 60.0) -> float:
        """Start node ``i`` again on its data; it rejoins the cluster. Returns seconds."""
        took = self.nodes[i].start(timeout)
        deadline = time.monotonic() + timeout
        while self.nodes[i].nodename not in self.running_nodes():
            if time.monotonic() > deadline:
                raise RabbitNodeError(f"node {i} did not rejoin in {timeout}s")
        return took

    def ensure_running(self) -> None:
        """Start every node that is down (a test before may have stopped one)."""
        for i, node in enumerate(self.nodes):
            if not node.running:
                self.start_node(i)

    async def astop_node(self, i: int, *, kill: bool = False) -> float:
        return await asyncio.to_thread(self.stop_node, i, kill=kill)

    async def astart_node(self, i: int) -> float:
        return await asyncio.to_thread(self.start_node, i)

    def close(self) -> None:
        """Kill every node (their data is thrown away) and remove their directories."""
        for node in self.nodes:
            node.kill()
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection --------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl -q args`` on the first running node; its standard output."""
        for node in self.nodes:
            if node.running:
                return self._ctl(node, "-q", *args, timeout=timeout)
        raise RabbitNodeError("no node is running")

    @staticmethod
    def _ctl(node: RabbitNode, *args: str, timeout: float = 60.0) -> str:
        done = node.ctl(*args, timeout=timeout)
        if done.returncode != 0:
            raise RabbitNodeError(
                f"rabbitmqctl {' '.join(args)} on {node.nodename} failed:\n"
                f"{done.stdout}{done.stderr}\n{node.output()[-3000:]}"
            )
        return done.stdout

    def running_nodes(self) -> set[str]:
        status = json.loads(self.ctl("cluster_status", "--formatter", "json"))
        return set(status["running_nodes"])

    def quorum_members(self, queue: str, vhost: str = "/") -> tuple[set[str], set[str]]:
        """The nodes holding a member of quorum queue ``queue``, and those of them online."""
        listed = self.ctl(
            "list_queues", "-p", vhost, "name", "members", "online", "--formatter", "json"
        )
        for row in json.loads(listed):
            if row["name"] == queue:
                return set(row["members"]), set(row["online"])
        raise KeyError(queue)

    def diagnose(self) -> str:
        """Which nodes run, and each running node's queues and channels, for failure messages."""
        out = [f"running: {[node.running for node in self.nodes]}"]
        for node in self.nodes:
            if node.running:
                out.append(f"-- {node.nodename}\n{node.diagnose()}")
        return "\n".join(out)


@pytest.fixture(name="rabbit_cluster_module", scope="module")
def rabbit_cluster_module_fixture(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RabbitCluster]:
    """One private cluster for a test module (forming one takes seconds)."""
    if find_sbin() is None:
        pytest.skip("rabbitmq-server is not installed (set RABBITMQ_SBIN)")
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    try:
        cluster.start()
    except (RabbitNodeError, subprocess.TimeoutExpired) as exc:
        cluster.close()
        pytest.fail(f"private RabbitMQ cluster did not form: {exc}")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(name="rabbit_cluster")
def rabbit_cluster_fixture(rabbit_cluster_module: RabbitCluster) -> RabbitCluster:
    """The module's cluster, every node running."""
    try:
        rabbit_cluster_module.ensure_running()
    except (RabbitNodeError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"a cluster node did not start again: {exc}")
    return rabbit_cluster_module
