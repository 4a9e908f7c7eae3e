"""``--py-spy DIR``: sample our processes with py-spy during the 1,000-in-flight workload (a
map-only system: during its `map`) and
summarize where their time goes (self time by function; inclusive time of amqpsched's own)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy_binary() -> str | None:
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


class Sampler:
    """One ``py-spy record --format raw`` per process, stopped with SIGINT."""

    def __init__(self, binary: str, out_dir: Path, label: str, pids: dict[str, list[int]]) -> None:
        self.files: dict[str, Path] = {}
        self._procs: list[subprocess.Popen[bytes]] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for role, role_pids in pids.items():
            for i, pid in enumerate(role_pids):
                name = f"{label}-{role}{i if len(role_pids) > 1 else ''}"
                path = out_dir / f"{name}.txt"
                self.files[name] = path
                self._procs.append(
                    subprocess.Popen(
                        [
                            binary,
                            "record",
                            "--pid",
                            str(pid),
                            "--format",
                            "raw",
                            "--rate",
                            "200",
                            "--subprocesses",
                            "--nonblocking",
                            "--output",
                            str(path),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=(out_dir / f"{name}.py-spy.log").open("wb"),
                    )
                )

    async def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self._procs:
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
            except TimeoutError:
                proc.kill()


def _function(frame: str) -> str:
    """``name (path:line)`` -> ``name (short/path)``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/amqpsched/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/amqpsched/":
                path = "amqpsched/" + path
            break
    return f"{name} ({path})"


def summarize(path: Path, top: int = 12) -> str:
    """Top functions by self samples, and amqpsched's own functions by inclusive samples."""
    if not path.exists() or path.stat().st_size == 0:
        return f"{path.name}: no samples"
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("<module>")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            if "(amqpsched/" in frame:
                inclusive[frame] += count
    lines = [f"{path.stem}: {total} samples at 200 Hz (py-spy skips idle ones)", "  self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    if inclusive:
        lines.append("  amqpsched functions, inclusive:")
        lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)
