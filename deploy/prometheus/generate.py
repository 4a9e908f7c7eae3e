#!/usr/bin/env python3
"""Write amqpsched-prometheusrule.yaml from amqpsched-rules.yml (the one source of truth).

The rule file's ``groups:`` become the PrometheusRule's ``spec.groups``, text for text (indented
under ``spec:``), so both always hold the same rules. ``--check`` writes nothing and exits 1 when
the committed PrometheusRule differs from what this script would write. Standard library only.

    python3 deploy/prometheus/generate.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "amqpsched-rules.yml"
PROMETHEUS_RULE = HERE / "amqpsched-prometheusrule.yaml"

HEADER = """\
# GENERATED from amqpsched-rules.yml by deploy/prometheus/generate.py: do not edit by hand.
# The same rules as a Prometheus Operator PrometheusRule. The "release" label is an example: set
# the labels your Prometheus resource's ruleSelector matches.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: amqpsched
  labels:
    app.kubernetes.io/name: amqpsched
    app.kubernetes.io/component: alerting
    release: prometheus
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule text for the rule file text ``rules_text``."""
    lines = rules_text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("groups:")), None)
    if start is None:
        raise ValueError(f"{RULES.name} has no top-level 'groups:' key")
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args(argv)
    wanted = render(RULES.read_text(encoding="utf-8"))
    if args.check:
        current = PROMETHEUS_RULE.read_text(encoding="utf-8") if PROMETHEUS_RULE.exists() else ""
        if current != wanted:
            print(
                f"{PROMETHEUS_RULE.name} is out of date: run python3 deploy/prometheus/generate.py",
                file=sys.stderr,
            )
            return 1
        return 0
    PROMETHEUS_RULE.write_text(wanted, encoding="utf-8")
    print(f"wrote {PROMETHEUS_RULE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
