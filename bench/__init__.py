"""``python -m bench``: the same workloads through amqpsched and its peers, on one broker, in one
run.

Not part of the wheel. See docs/benchmarks.md."""
