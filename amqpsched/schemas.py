"""Generating and checking the committed JSON Schemas of the wire protocol."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .protocol import json_schemas


def rendered() -> dict[str, str]:
    return {
        f"{name}.schema.json": json.dumps(schema, indent=2, sort_keys=True) + "\n"
        for name, schema in json_schemas().items()
    }


def check_or_write(directory: Path, *, check: bool) -> int:
    wanted = rendered()
    if check:
        stale = [
            name
            for name, text in wanted.items()
            if not (directory / name).exists() or (directory / name).read_text() != text
        ]
        extra = (
            sorted(p.name for p in directory.glob("*.schema.json") if p.name not in wanted)
            if directory.exists()
            else []
        )
        for name in stale + extra:
            print(f"out of date: {directory / name}", file=sys.stderr)
        if stale or extra:
            print("run: amqpsched schema", file=sys.stderr)
            return 1
        return 0
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in wanted.items():
        (directory / name).write_text(text)
    print(f"wrote {len(wanted)} schemas to {directory}")
    return 0
