"""Processes the bench starts, and what ``/proc`` says about them (CPU time, peak memory)."""

from __future__ import annotations

import asyncio
import atexit
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_TICK = float(os.sysconf("SC_CLK_TCK"))


class BenchError(Exception):
    """A system could not be started, driven or cleaned up."""


_LIVE: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftovers() -> None:
    """If the bench dies mid-run, take its processes with it."""
    for popen in list(_LIVE):
        if popen.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)


class Proc:
    """A process started by the bench; its output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, name: str) -> None:
        self.name = name
        self.log = log
        self._fh = log.open("wb")
        self.popen = subprocess.Popen(
            args,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            start_new_session=True,  # a Ctrl-C on the bench does not hit it mid-measurement
        )
        _LIVE.add(self.popen)

    @classmethod
    def python(cls, args: list[str], env: dict[str, str], log_dir: Path, name: str) -> Proc:
        return cls([sys.executable, *args], env, log_dir / f"{name}.log", name)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    async def wait_for_output(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        """Wait until ``text`` appears ``count`` times in the output."""
        try:
            async with asyncio.timeout(timeout):
                while self.output().count(text) < count:
                    if self.popen.poll() is not None:
                        raise BenchError(
                            f"{self.name} exited ({self.popen.returncode}) before it was ready; "
                            f"see {self.log}:\n{self.output()[-2000:]}"
                        )
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise BenchError(
                f"{self.name} not ready in {timeout:.0f}s (waited for {text!r}); see {self.log}"
            ) from None

    async def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.popen.poll() is None:
            with suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.popen.wait), timeout)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                await asyncio.to_thread(self.popen.wait)
        _LIVE.discard(self.popen)
        self._fh.close()


# -- /proc -------------------------------------------------------------------------------------
def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads); 0 if it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [pid], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(p) for root in pids for p in descendants(root))


def self_cpu_seconds() -> float:
    """CPU seconds of the bench process itself (the clients), every thread."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def peak_rss_mb(pids: list[int]) -> float:
    """Sum of the peak resident sizes (VmHWM) of ``pids`` and their children, MiB."""
    return sum(_status_kb(p, "VmHWM") for root in pids for p in descendants(root)) / 1024


def rss_mb(pids: list[int]) -> float:
    return sum(_status_kb(p, "VmRSS") for root in pids for p in descendants(root)) / 1024


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (every core), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICK


def listener_pid(port: int) -> int | None:
    """The process listening on ``port`` on this machine (RabbitMQ, Redis), if it can be seen."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(cols[9])
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            for fd in (entry / "fd").iterdir():
                with suppress(OSError):
                    if os.readlink(fd) in targets:
                        return int(entry.name)
    return None


# -- helpers -----------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 2):
            return True
    except OSError:
        return False


def redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), 2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def start_redis(log_dir: Path) -> tuple[Proc, int]:
    """A private, non-persisting ``redis-server`` on a free port (Debian's binary)."""
    binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/bin:/usr/sbin")
    if binary is None:
        raise BenchError(
            "no Redis on 127.0.0.1:6379 and no redis-server binary (apt-get install redis-server)"
        )
    port = free_port()
    proc = Proc(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        dict(os.environ),
        log_dir / "redis.log",
        "redis-server",
    )
    for _ in range(100):
        if redis_answers("127.0.0.1", port):
            return proc, port
        if proc.popen.poll() is not None:
            break
        await asyncio.sleep(0.1)
    await proc.stop()
    raise BenchError(f"redis-server did not start; see {proc.log}")
