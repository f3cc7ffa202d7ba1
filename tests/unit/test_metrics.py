"""The node's own latency histogram exposes what prometheus_client's Histogram would."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from node.metrics import _Latency

BOUNDS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def _series(text: bytes) -> list[str]:
    # prometheus_client's Histogram adds a _created gauge of its own start: not a figure.
    return [line for line in text.decode().splitlines()
            if line and "_created" not in line]


@pytest.mark.parametrize("seed", range(5))
def test_the_exposition_is_prometheus_clients(seed: int) -> None:
    rng = random.Random(seed)
    theirs_registry, ours_registry = CollectorRegistry(), CollectorRegistry()
    theirs = Histogram("x_seconds", "help", registry=theirs_registry, buckets=BOUNDS)
    ours = _Latency("x_seconds", "help", BOUNDS)
    ours_registry.register(ours)
    values = [*BOUNDS, 0.0, 7.0] + [rng.expovariate(rng.choice((2, 50, 1000)))
                                    for _ in range(rng.randrange(1, 3000))]
    rng.shuffle(values)
    for v in values:
        theirs.observe(v)
        ours.observe(v)
    assert _series(generate_latest(ours_registry)) == _series(generate_latest(theirs_registry))
