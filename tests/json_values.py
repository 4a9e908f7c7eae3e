"""Random JSON values for tests that compare two ways of reading or measuring JSON."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any


def random_json(
    rng: random.Random,
    depth: int,
    leaves: Sequence[Any],
    key: Callable[[random.Random], str],
    width: int,
) -> Any:
    """A value nested up to ``depth`` deep: arrays and objects of at most ``width`` items (keys
    from ``key``), ``leaves`` at the bottom."""
    if depth == 0:
        return rng.choice(leaves)
    if rng.random() < 0.5:
        return [
            random_json(rng, depth - 1, leaves, key, width) for _ in range(rng.randint(0, width))
        ]
    return {
        key(rng): random_json(rng, depth - 1, leaves, key, width)
        for _ in range(rng.randint(0, width))
    }
