"""``python -m bench.traced MODULE [ARGS...]``: run ``python -m MODULE ARGS...`` with its AMQP
publishes and deliveries timed (:mod:`bench.timeline`), written as JSON lines to the file named
by ``BENCH_TIMELINE_OUT`` when it exits; with the parts named by ``BENCH_STRIP`` taken out
(:mod:`bench.strip`)."""

from __future__ import annotations

import atexit
import os
import runpy
import sys

from . import strip
from .timeline import Recorder


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.traced MODULE [ARGS...]")
    recorder = Recorder()
    recorder.install()
    strip.install(strip.parse(os.environ.get("BENCH_STRIP", "")))
    out = os.environ.get("BENCH_TIMELINE_OUT")
    if out:
        atexit.register(recorder.write, out)
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
