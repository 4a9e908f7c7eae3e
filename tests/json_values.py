"""Helpers for tests that compare two ways of reading or measuring JSON: random values, and
two readers held to the same result or the same refusal."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from amqpsched.errors import DecodeError


def read_alike(reference: Callable[[], Any], candidate: Callable[[], Any]) -> tuple[Any, Any]:
    """What each reader gives, or (None, None) when both refused for the same reason."""
    try:
        expected = reference()
    except DecodeError as exc:
        with pytest.raises(DecodeError) as info:
            candidate()
        assert (info.value.reason, info.value.detail) == (exc.reason, exc.detail)
        return None, None
    return expected, candidate()


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
