"""Least privilege on the broker, proven on a private RabbitMQ node (tests/rabbit_node.py).

The role definitions of ``deploy/rabbitmq/definitions.json`` are rendered with test passwords by
``deploy/rabbitmq/render_definitions.py`` (as the Kubernetes init container does) and imported
with ``rabbitmqctl import_definitions``. Then a scheduler, a worker and a client, each with its
own role's credentials, do their whole job (dispatch, retries, dead letters, cancellation,
queries), KEDA's user reads a queue's depth, and each role is refused what it must not do. Only
the scheduler may create the core topology: a client or worker started before any scheduler ran
says so. The client role's connection limits and the reply queues' policy are in force.
The same node has a TLS listener (certificates made by the test with ``openssl``, client
certificates required): the round trip runs again over ``amqps://``. docs/security.md says why.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractChannel

from amqpsched import BrokerError, Client, Settings, TaskFailed
from amqpsched.protocol import RetryPolicy
from amqpsched.scheduler import Scheduler
from amqpsched.topology import QUORUM, Topology
from amqpsched.worker import Worker, WorkerApp
from amqpsched.worker.builtin import app as builtin_app

from .conftest import ROOT
from .rabbit_node import RabbitNode, RabbitNodeError, find_sbin, free_port
from .test_chaos import wait_until

pytestmark = pytest.mark.system

DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
RENDER = ROOT / "deploy" / "rabbitmq" / "render_definitions.py"
#: The administrator the RabbitMQ Cluster Operator would add (tests the --default-user-conf path).
ADMIN = "operator-admin"
VHOST = "amqpsched"
ROLES = ("client", "worker", "scheduler", "keda")
TOPO = Topology()
#: Every wait of this module is bounded by this (seconds).
STEP = 20.0


def load_render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_definitions", RENDER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- certificates --------------------------------------------------------------------------------


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"openssl {' '.join(args)}:\n{done.stderr}"


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_certs(base: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, by it."""
    base.mkdir(parents=True)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=amqpsched test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=base)  # fmt: skip
    (base / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (base / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=amqpsched-{name}",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=base)  # fmt: skip
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
                "-out", f"{name}.pem", cwd=base)  # fmt: skip
    return Certs(
        base / "ca.pem", base / "server.pem", base / "server.key",
        base / "client.pem", base / "client.key",
    )  # fmt: skip


# -- the node ------------------------------------------------------------------------------------


@dataclass
class Broker:
    node: RabbitNode
    tls_port: int
    certs: Certs
    passwords: dict[str, str]

    def url(self, role: str, password: str | None = None, vhost: str = VHOST) -> str:
        secret = self.passwords[f"amqpsched-{role}"] if password is None else password
        return f"amqp://amqpsched-{role}:{secret}@127.0.0.1:{self.node.port}/{vhost}"

    def settings(self, role: str, vhost: str = VHOST, **overrides: Any) -> Settings:
        return Settings(amqp_url=self.url(role, vhost=vhost), heartbeat_interval=0.3, **overrides)

    def ctl(self, *args: str) -> str:
        """``rabbitmqctl -q args`` on the node (as its administrator); its standard output."""
        done = self.node.ctl("-q", *args)
        assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}:\n{done.stdout}{done.stderr}"
        return done.stdout

    def tls_settings(self, role: str, **overrides: Any) -> Settings:
        secret = self.passwords[f"amqpsched-{role}"]
        return Settings(
            amqp_url=f"amqps://amqpsched-{role}:{secret}@localhost:{self.tls_port}/{VHOST}",
            tls_ca_file=str(self.certs.ca),
            tls_cert_file=str(self.certs.client_cert),
            tls_key_file=str(self.certs.client_key),
            heartbeat_interval=0.3,
            **overrides,
        )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    if find_sbin() is None:
        pytest.skip("rabbitmq-server is not installed (set RABBITMQ_SBIN)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    base = tmp_path_factory.mktemp("secure-broker")
    certs = make_certs(base / "certs")
    node = RabbitNode(base / "rabbit")
    tls_port = free_port()
    while tls_port in (node.port, node.dist_port):
        tls_port = free_port()
    with node.config_file.open("a") as conf:
        conf.write(
            f"listeners.ssl.default = 127.0.0.1:{tls_port}\n"
            f"ssl_options.cacertfile = {certs.ca}\n"
            f"ssl_options.certfile = {certs.server_cert}\n"
            f"ssl_options.keyfile = {certs.server_key}\n"
            "ssl_options.verify = verify_peer\n"
            "ssl_options.fail_if_no_peer_cert = true\n"
        )
    try:
        node.start()
    except RabbitNodeError as exc:
        node.close()
        pytest.fail(f"private RabbitMQ node did not start: {exc}")
    try:
        # As the Kubernetes init container does: passwords from the environment, plus the
        # operator's administrator from its default_user.conf.
        definitions = json.loads(DEFINITIONS.read_text())
        render = load_render()
        passwords = {u["name"]: secrets.token_hex(16) for u in definitions["users"]}
        passwords[ADMIN] = secrets.token_hex(16)
        user_conf = base / "default_user.conf"
        user_conf.write_text(f"default_user = {ADMIN}\ndefault_pass = {passwords[ADMIN]}\n")
        path = base / "definitions.json"
        env = {**os.environ, **{render.env_name(u): p for u, p in passwords.items()}}
        done = subprocess.run(
            [sys.executable, str(RENDER), "--in", str(DEFINITIONS), "--out", str(path),
             "--default-user-conf", str(user_conf)],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert path.stat().st_mode & 0o077 == 0, "the rendered definitions are private"
        done = node.ctl("import_definitions", str(path))
        assert done.returncode == 0, done.stdout + done.stderr
        # The import is asynchronous: wait until the last user's permissions are there.
        for _ in range(100):
            listed = node.ctl("list_permissions", "-p", VHOST).stdout
            if all(f"amqpsched-{role}" in listed for role in ROLES):
                break
        else:
            pytest.fail(f"definitions not imported:\n{listed}")
        yield Broker(node, tls_port, certs, passwords)
    finally:
        node.close()


# -- a system of three roles ---------------------------------------------------------------------

flaky_app = WorkerApp()
_attempts: dict[str, int] = {}


@flaky_app.capability("flaky", retry=RetryPolicy(max_attempts=2, backoff=0.1, jitter=0))
def flaky(payload: dict[str, Any]) -> dict[str, int]:
    """Fails its first attempt; fails every attempt when ``always``."""
    key = str(payload["key"])
    _attempts[key] = _attempts.get(key, 0) + 1
    if payload.get("always") or _attempts[key] == 1:
        raise RuntimeError("flaky failure")
    return {"attempts": _attempts[key]}


flaky_app.include(builtin_app)


@asynccontextmanager
async def running(
    settings: Callable[..., Settings], capabilities: tuple[str, ...] = ("echo", "flaky")
) -> AsyncIterator[tuple[Scheduler, Client, Callable[[], Awaitable[Worker]]]]:
    """A scheduler and a client (each its own role); the caller starts the worker when it
    wants, with the returned function."""
    scheduler = Scheduler(settings("scheduler"))
    client = Client(settings("client"))
    workers: list[Worker] = []

    async def start_worker() -> Worker:
        worker = Worker(flaky_app, capabilities, settings("worker"))
        await asyncio.wait_for(worker.start(), STEP)
        workers.append(worker)
        return worker

    await asyncio.wait_for(scheduler.start(), STEP)
    try:
        await asyncio.wait_for(client.connect(), STEP)
        try:
            yield scheduler, client, start_worker
        finally:
            await client.close()
    finally:
        for worker in workers:
            await worker.stop(timeout=5)
        await scheduler.stop()


async def test_each_role_does_its_job(broker: Broker) -> None:
    async with running(broker.settings) as (_scheduler, client, start_worker):
        # Submitted before any worker runs: the scheduler declares the capability queue itself.
        early = await client.submit("echo", {"early": True}, timeout=STEP)
        worker = await start_worker()
        assert await early.result(timeout=STEP) == {"early": True}
        assert await client.call("echo", {"n": 1}, timeout=STEP) == {"n": 1}
        # The client may bind its reply queue to the replies exchange, and the worker publish
        # there: both lone tasks were answered by the worker (protocol section 16). The
        # worker counts one once its publish is confirmed, which can be after the client has it.
        direct = worker.metrics.direct_answers._value
        await wait_until(lambda: direct.get() == 2, STEP, "2 direct answers")
        # A retry goes through the delay exchange and queue the worker declares.
        assert await client.call("flaky", {"key": "retry"}, timeout=STEP) == {"attempts": 2}
        # Retries exhausted: the worker dead-letters the task.
        with pytest.raises(TaskFailed, match="handler_error"):
            await client.call("flaky", {"key": "dead", "always": True}, timeout=STEP)
        # Bad input: the scheduler dead-letters it and answers.
        with pytest.raises(TaskFailed, match="invalid_request"):
            await client.call("no such capability!", {}, timeout=STEP)
        # Cancellation goes through the control exchange; queries through the reply queue.
        handle = await client.submit("sleep", {"seconds": 30}, timeout=STEP)
        status = await handle.cancel()
        assert status.state.value == "failed", status
        assert {c.name for c in await client.capabilities()} == {"echo", "flaky"}
        assert (await client.status(early.task_id)).state.value == "succeeded"
    # KEDA's user reads a queue's depth (a passive declare) and can do nothing else.
    conn = await aio_pika.connect(broker.url("keda"), timeout=STEP)
    try:
        channel = await conn.channel()
        queue = await channel.declare_queue(TOPO.capability_queue("echo"), passive=True)
        assert queue.declaration_result.message_count == 0
        # Passive declares need no permission, of exchanges either (clients and workers check
        # the scheduler's topology that way).
        await channel.declare_exchange(TOPO.tasks_exchange, passive=True)
    finally:
        await conn.close()


def empty_vhost(broker: Broker) -> str:
    """A new vhost with the roles' permissions of the definitions, and nothing declared in it."""
    definitions = json.loads(DEFINITIONS.read_text())
    vhost = f"amqpsched-fresh-{secrets.token_hex(4)}"
    broker.ctl("add_vhost", vhost)
    for perm in definitions["permissions"]:
        broker.ctl("set_permissions", "-p", vhost, perm["user"],
                   perm["configure"], perm["write"], perm["read"])  # fmt: skip
    for perm in definitions["topic_permissions"]:
        broker.ctl("set_topic_permissions", "-p", vhost, perm["user"],
                   perm["exchange"], perm["write"], perm["read"])  # fmt: skip
    return vhost


async def test_scheduler_comes_first(broker: Broker) -> None:
    """Only the scheduler may create the topology it owns. Where none ever ran, a client and a
    worker fail with a clear error (and leave nothing behind); once one ran, both work."""
    vhost = empty_vhost(broker)
    try:
        settings = functools.partial(broker.settings, vhost=vhost)
        with pytest.raises(BrokerError) as refused:
            await asyncio.wait_for(Client(settings("client")).connect(), STEP)
        assert str(refused.value) == (
            "amqpsched.submit does not exist and this user may not create it: "
            "start a scheduler first"
        )
        worker = Worker(flaky_app, ("echo",), settings("worker"))
        with pytest.raises(BrokerError, match="may not create it: start a scheduler first"):
            await asyncio.wait_for(worker.start(), STEP)
        assert broker.ctl("list_queues", "-p", vhost, "--no-table-headers", "name") == ""
        connections = broker.ctl("list_connections", "--no-table-headers", "vhost")
        assert vhost not in connections, "they closed their connections"
        async with running(settings, ("echo",)) as (_s, client, start_worker):
            await start_worker()
            assert await client.call("echo", {"fresh": True}, timeout=STEP) == {"fresh": True}
    finally:
        broker.ctl("delete_vhost", vhost)


# -- clients cannot hoard connections, channels or reply queues ----------------------------------


def table(text: str) -> list[list[str]]:
    return [line.split("\t") for line in text.splitlines() if line]


async def test_client_limits_are_in_force(broker: Broker) -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    (user,) = (u for u in definitions["users"] if u["name"] == "amqpsched-client")
    assert set(user["limits"]) == {"max-connections", "max-channels"}
    listed = broker.ctl("list_user_limits", "--user", "amqpsched-client").strip()
    assert json.loads(listed) == user["limits"]
    # Enforced (shown with a limit of one connection, then the committed limits are back).
    broker.ctl("set_user_limits", "amqpsched-client", '{"max-connections": 1}')
    try:
        conn = await aio_pika.connect(broker.url("client"), timeout=STEP)
        try:
            with pytest.raises(aiormq.exceptions.AMQPError):
                await aio_pika.connect(broker.url("client"), timeout=STEP)
        finally:
            await conn.close()
    finally:
        broker.ctl("set_user_limits", "amqpsched-client", json.dumps(user["limits"]))
    listed = broker.ctl("list_user_limits", "--user", "amqpsched-client").strip()
    assert json.loads(listed) == user["limits"]


async def test_reply_queue_policy_applies_to_reply_queues_only(broker: Broker) -> None:
    definitions = json.loads(DEFINITIONS.read_text())
    (policy,) = definitions["policies"]
    async with running(broker.settings, ("echo",)) as (_s, client, start_worker):
        await start_worker()
        await client.call("echo", {}, timeout=STEP)  # the journal and a capability queue exist
        listed = broker.ctl(
            "list_queues", "-p", VHOST, "--no-table-headers", "name", "type", "policy"
        )
    kind_and_policy = {name: (kind, applied) for name, kind, applied in table(listed)}
    reply = TOPO.reply_queue(client.client_id)
    assert kind_and_policy.pop(reply) == ("classic", policy["name"])
    assert {kind for kind, _ in kind_and_policy.values()} >= {"quorum", "stream"}
    assert all(applied == "" for _, applied in kind_and_policy.values()), "only on reply queues"
    listed = broker.ctl("list_policies", "-p", VHOST, "--no-table-headers")
    ((vhost, name, pattern, apply_to, definition, priority),) = table(listed)
    assert [vhost, name, pattern, apply_to] == [VHOST, policy["name"], policy["pattern"], "queues"]
    assert json.loads(definition) == policy["definition"]
    assert int(priority) == policy["priority"]


# -- refusals ------------------------------------------------------------------------------------

Op = Callable[[AbstractChannel], Awaitable[Any]]


async def _noop(_msg: aio_pika.abc.AbstractIncomingMessage) -> None:
    return None


def consume(queue: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        q = await channel.get_queue(queue, ensure=False)
        await q.consume(_noop)

    return op


def publish(exchange: str, routing_key: str = "") -> Op:
    async def op(channel: AbstractChannel) -> None:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        await target.publish(aio_pika.Message(b"{}"), routing_key, timeout=STEP)

    return op


def declare_queue(name: str, **kwargs: Any) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, **kwargs)

    return op


def delete_queue(name: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.queue_delete(name)

    return op


def delete_exchange(name: str) -> Op:
    async def op(channel: AbstractChannel) -> None:
        await channel.exchange_delete(name)

    return op


def bind_reply_queue_to(exchange: str, routing_key: str = "#") -> Op:
    """Declare a reply queue of one's own (allowed for a client), then bind it to ``exchange``."""

    async def op(channel: AbstractChannel) -> None:
        queue = await TOPO.declare_reply_queue(channel, secrets.token_hex(8))
        await queue.bind(exchange, routing_key=routing_key)

    return op


REFUSED = aiormq.exceptions.ChannelAccessRefused
LOCKED = aiormq.exceptions.ChannelLockedResource

#: (role, what it tries, the operation, the refusal). A role's own job is in the test above.
FORBIDDEN: list[tuple[str, str, Op, type[Exception]]] = [
    ("client", "consume tasks.submit", consume(TOPO.submit_queue), REFUSED),
    (
        "client",
        "bypass the scheduler via the default exchange",
        publish("", TOPO.capability_queue("echo")),
        REFUSED,
    ),
    (
        "client",
        "forge an outcome via the default exchange",
        publish("", TOPO.results_queue),
        REFUSED,
    ),
    (
        "client",
        "forge an outcome via the events exchange",
        publish(TOPO.events_exchange, TOPO.results_queue),
        REFUSED,
    ),
    ("client", "publish to the dead-letter exchange", publish(TOPO.dead_letter_exchange), REFUSED),
    ("client", "publish to the tasks exchange", publish(TOPO.tasks_exchange, "echo"), REFUSED),
    ("client", "consume a capability queue", consume(TOPO.capability_queue("echo")), REFUSED),
    ("client", "consume the results queue", consume(TOPO.results_queue), REFUSED),
    ("client", "consume the dead-letter queue", consume(TOPO.dead_letter_queue), REFUSED),
    ("client", "read the journal", consume(TOPO.journal_queue), REFUSED),
    ("client", "delete the dead-letter queue", delete_queue(TOPO.dead_letter_queue), REFUSED),
    ("client", "delete tasks.submit", delete_queue(TOPO.submit_queue), REFUSED),
    (
        "client",
        "declare tasks.submit",
        declare_queue(TOPO.submit_queue, durable=True, arguments=QUORUM),
        REFUSED,
    ),
    (
        "client",
        "declare a capability queue",
        declare_queue(TOPO.capability_queue("evil"), durable=True, arguments=QUORUM),
        REFUSED,
    ),
    ("client", "pose as a worker", publish(TOPO.registry_exchange), REFUSED),
    ("client", "cancel tasks", publish(TOPO.control_exchange), REFUSED),
    ("client", "snoop on worker heartbeats", bind_reply_queue_to(TOPO.registry_exchange), REFUSED),
    ("client", "snoop on dispatched tasks", bind_reply_queue_to(TOPO.tasks_exchange), REFUSED),
    ("client", "snoop on direct answers", bind_reply_queue_to(TOPO.replies_exchange), REFUSED),
    (
        "client",
        "snoop on outcomes via the replies exchange",
        bind_reply_queue_to(TOPO.replies_exchange, TOPO.results_queue),
        REFUSED,
    ),
    (
        "client",
        "take another client's direct answers",
        bind_reply_queue_to(TOPO.replies_exchange, TOPO.reply_queue("other.*")),
        REFUSED,
    ),
    (
        "client",
        "forge an outcome via the replies exchange",
        publish(TOPO.replies_exchange, TOPO.results_queue),
        REFUSED,
    ),
    ("worker", "consume tasks.submit", consume(TOPO.submit_queue), REFUSED),
    ("worker", "forge an answer to a client", publish("", TOPO.reply_queue("x")), REFUSED),
    (
        "worker",
        "reach other queues via the replies exchange",
        publish(TOPO.replies_exchange, TOPO.submit_queue),
        REFUSED,
    ),
    ("worker", "submit tasks", publish(TOPO.submit_exchange, TOPO.submit_queue), REFUSED),
    ("worker", "publish into tasks.submit directly", publish("", TOPO.submit_queue), REFUSED),
    ("worker", "dispatch tasks itself", publish(TOPO.tasks_exchange, "echo"), REFUSED),
    ("worker", "consume the results queue", consume(TOPO.results_queue), REFUSED),
    ("worker", "consume the dead-letter queue", consume(TOPO.dead_letter_queue), REFUSED),
    ("worker", "read the journal", consume(TOPO.journal_queue), REFUSED),
    ("worker", "cancel tasks", publish(TOPO.control_exchange), REFUSED),
    ("worker", "delete tasks.submit", delete_queue(TOPO.submit_queue), REFUSED),
    ("worker", "delete the results queue", delete_queue(TOPO.results_queue), REFUSED),
    ("worker", "delete the dead-letter queue", delete_queue(TOPO.dead_letter_queue), REFUSED),
    ("worker", "delete the tasks exchange", delete_exchange(TOPO.tasks_exchange), REFUSED),
    (
        "worker",
        "declare the results queue",
        declare_queue(TOPO.results_queue, durable=True, arguments=QUORUM),
        REFUSED,
    ),
    (
        "worker",
        "declare a reply queue",
        declare_queue(TOPO.reply_queue("x"), exclusive=True),
        REFUSED,
    ),
    ("scheduler", "pose as a worker", publish(TOPO.registry_exchange), REFUSED),
    ("scheduler", "consume the dead-letter queue", consume(TOPO.dead_letter_queue), REFUSED),
    ("keda", "consume a capability queue", consume(TOPO.capability_queue("echo")), REFUSED),
    ("keda", "publish to tasks.submit", publish("", TOPO.submit_queue), REFUSED),
    ("keda", "declare a queue", declare_queue(TOPO.reply_queue("keda"), exclusive=True), REFUSED),
]


@pytest.fixture(scope="module")
def topology_ready(broker: Broker) -> None:
    """The durable topology exists (declared by the roles themselves), as in a running system."""

    async def declare() -> None:
        async with running(broker.settings, ("echo",)) as (_s, _c, start_worker):
            await start_worker()

    asyncio.run(declare())


@pytest.mark.usefixtures("topology_ready")
@pytest.mark.parametrize(
    ("role", "what", "op", "refusal"), FORBIDDEN, ids=[f"{r}-{w}" for r, w, _, _ in FORBIDDEN]
)
async def test_role_is_refused(
    broker: Broker, role: str, what: str, op: Op, refusal: type[Exception]
) -> None:
    conn = await aio_pika.connect(broker.url(role), timeout=STEP)
    try:
        channel = await conn.channel(publisher_confirms=True)
        with pytest.raises(refusal):
            await asyncio.wait_for(op(channel), STEP)
    finally:
        await conn.close()


async def test_reply_queues_are_private(broker: Broker) -> None:
    """Clients share a role, but not their reply queues: exclusive to their connection."""
    async with running(broker.settings, ("echo",)) as (_s, client, _w):
        conn = await aio_pika.connect(broker.url("client"), timeout=STEP)
        try:
            name = TOPO.reply_queue(client.client_id)
            for op in (consume(name), delete_queue(name)):
                channel = await conn.channel()
                with pytest.raises(LOCKED):
                    await asyncio.wait_for(op(channel), STEP)
        finally:
            await conn.close()


async def test_operator_administrator_is_kept(broker: Broker) -> None:
    """RabbitMQ makes no default user when it loads definitions: the rendered ones carry the
    operator's administrator, with access to every vhost."""
    for vhost in ("", VHOST):
        url = f"amqp://{ADMIN}:{broker.passwords[ADMIN]}@127.0.0.1:{broker.node.port}/{vhost}"
        conn = await aio_pika.connect(url, timeout=STEP)
        await conn.close()
    assert "administrator" in broker.node.ctl("list_users").stdout


async def test_credentials_and_vhost_are_checked(broker: Broker) -> None:
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(broker.url("client", password="wrong"), timeout=STEP)
    # The role users have no access to any other vhost.
    # (the broker closes the connection instead of opening it: NOT_ALLOWED)
    with pytest.raises(aiormq.exceptions.AMQPError):
        await aio_pika.connect(broker.url("worker", vhost=""), timeout=STEP)


# -- TLS -----------------------------------------------------------------------------------------


async def test_round_trip_over_tls(broker: Broker) -> None:
    async with running(broker.tls_settings, ("echo",)) as (scheduler, client, start_worker):
        worker = await start_worker()
        # The port speaks TLS only: the answer came through it.
        assert await client.call("echo", {"tls": True}, timeout=STEP) == {"tls": True}
        for settings in (scheduler.settings, worker.settings, client.settings):
            assert settings.amqp_url_masked().startswith("amqps://")
            assert f":{broker.tls_port}/" in settings.amqp_url_masked()


async def test_tls_requires_the_ca_and_a_client_certificate(broker: Broker) -> None:
    no_client_cert = broker.tls_settings("client").model_copy(
        update={"tls_cert_file": None, "tls_key_file": None}
    )
    with pytest.raises(BrokerError):
        await asyncio.wait_for(Client(no_client_cert).connect(), STEP)
    # A broker certificate from another CA is not trusted.
    stranger = make_certs(broker.certs.ca.parent.parent / f"other-{secrets.token_hex(4)}")
    wrong_ca = broker.tls_settings("client").model_copy(update={"tls_ca_file": str(stranger.ca)})
    with pytest.raises(BrokerError):
        await asyncio.wait_for(Client(wrong_ca).connect(), STEP)
