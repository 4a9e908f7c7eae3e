"""Finding a RabbitMQ for the demo: the one at the URL, a local ``rabbitmq-server``, or Docker.

``with ensure_broker(url) as broker: ...`` then connect to ``broker.url``. Synchronous: call it
outside any running event loop (it checks AMQP logins with its own short-lived loop)."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aio_pika

from .errors import BrokerError
from .settings import mask_url

DOCKER_IMAGE = "rabbitmq:3"
START_TIMEOUT = 60.0
HOW_TO = (
    "no RabbitMQ broker found. Get one with either of:\n"
    "  apt-get install -y rabbitmq-server && rabbitmq-server -detached\n"
    f"  docker run -d -p 5672:5672 {DOCKER_IMAGE}\n"
    "or point amqpsched at yours: export AMQPSCHED_AMQP_URL=amqp://user:password@host:5672/"
)

Origin = Literal["existing", "rabbitmq-server", "docker"]
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass
class BrokerHandle:
    """A broker to use at ``url``; :meth:`close` stops it only if it is a container we started.
    A ``rabbitmq-server`` we started keeps running (stop it with ``rabbitmqctl stop``)."""

    url: str
    origin: Origin
    _container: Any = field(default=None, repr=False)

    def close(self) -> None:
        if self._container is not None:
            container, self._container = self._container, None
            container.stop()

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    default = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "localhost", parts.port or default


def port_answers(url: str, timeout: float = 2.0) -> bool:
    """True if something accepts TCP connections at the URL's host and port."""
    try:
        with socket.create_connection(_host_port(url), timeout):
            return True
    except OSError:
        return False


async def _login(url: str, timeout: float) -> None:
    conn = await aio_pika.connect(url, timeout=timeout)
    await conn.close()


def check_login(url: str, timeout: float = 5.0) -> None:
    """Open and close an AMQP connection to ``url`` (credentials and vhost included);
    :class:`BrokerError` with the broker's reason if that fails."""
    try:
        asyncio.run(_login(url, timeout))
    except Exception as exc:  # aio-pika, aiormq, OS and timeout errors alike
        reason = f"{exc.__class__.__name__}: {exc}".rstrip(": ")
        raise BrokerError(f"cannot log in to {mask_url(url)}: {reason}") from exc


def amqp_answers(url: str, timeout: float = 5.0) -> bool:
    """True if an AMQP connection to ``url`` opens."""
    try:
        check_login(url, timeout)
    except BrokerError:
        return False
    return True


def _server_binary() -> str | None:
    return shutil.which("rabbitmq-server") or shutil.which(
        "rabbitmq-server", path="/usr/sbin:/usr/local/sbin"
    )


def _docker_answers() -> bool:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _start_server(binary: str, url: str, timeout: float) -> BrokerHandle:
    _, port = _host_port(url)
    env = {**os.environ, "RABBITMQ_NODE_PORT": str(port)}  # listen where the URL says
    try:
        done = subprocess.run(
            [binary, "-detached"], capture_output=True, text=True, timeout=timeout, env=env
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"{binary} -detached failed: {exc}\n{HOW_TO}") from exc
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise BrokerError(f"{binary} -detached exited {done.returncode}: {output}\n{HOW_TO}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_answers(url, 1.0) and amqp_answers(url):
            return BrokerHandle(url, "rabbitmq-server")
        time.sleep(0.5)  # polling a server we cannot subscribe to, bounded by the deadline
    raise BrokerError(
        f"started {binary}, but {mask_url(url)} did not accept an AMQP login within "
        f"{timeout:.0f}s (see /var/log/rabbitmq/)\n{HOW_TO}"
    )


def _start_container() -> BrokerHandle | None:
    """A testcontainers RabbitMQ, or None if the package (or its pika dependency) is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.community.rabbitmq import RabbitMqContainer
    except ImportError:
        return None
    container = RabbitMqContainer(DOCKER_IMAGE)
    try:
        container.start()
        host = container.get_container_host_ip()
        port = container.get_exposed_port(container.port)
    except Exception as exc:  # docker's and testcontainers' errors have no common base
        with suppress(Exception):
            container.stop()
        raise BrokerError(f"could not start a {DOCKER_IMAGE} container: {exc}\n{HOW_TO}") from exc
    url = f"amqp://{container.username}:{container.password}@{host}:{port}/"
    return BrokerHandle(url, "docker", container)


def ensure_broker(url: str, *, start_timeout: float = START_TIMEOUT) -> BrokerHandle:
    """The broker at ``url`` if its port answers; else, for a local URL, a ``rabbitmq-server``
    started here, or a RabbitMQ container through testcontainers (at another URL, see
    ``handle.url``); else :class:`BrokerError` saying how to get one."""
    if port_answers(url):
        return BrokerHandle(url, "existing")
    host, _ = _host_port(url)
    if host not in LOCAL_HOSTS:  # never stand in for a remote broker that is down
        raise BrokerError(f"nothing answers at {mask_url(url)}; is the broker up?")
    binary = _server_binary()
    if binary is not None:
        return _start_server(binary, url, start_timeout)
    if _docker_answers():
        handle = _start_container()
        if handle is not None:
            return handle
    raise BrokerError(f"nothing answers at {mask_url(url)}; {HOW_TO}")


__all__ = ["BrokerHandle", "amqp_answers", "check_login", "ensure_broker", "port_answers"]
