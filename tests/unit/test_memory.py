"""When the node gives memory back (node/memory.py): once a crowd of connections has gone."""

from __future__ import annotations

import itertools
import random

from node.memory import (
    GC_THRESHOLDS,
    MemoryReturn,
    allocator,
    release,
    tune_collector,
    wanted_env,
)


def test_a_crowd_that_went_is_released_once_it_stopped_leaving() -> None:
    watch = MemoryReturn(min_drop=200, again_s=None, every_s=0.0)
    assert not watch.due(100)
    assert not watch.due(1000)
    assert not watch.due(600)  # still leaving
    assert not watch.due(300)  # still leaving
    assert watch.due(300)  # gone, and by more than half
    assert watch.last_peak == 1000
    assert not watch.due(300)  # once per drop
    assert not watch.due(0)  # falling again: from a peak of 300
    assert watch.due(0)
    assert watch.releases == 2


def test_a_crowd_seen_only_as_a_high_water_mark_counts() -> None:
    watch = MemoryReturn(min_drop=200, again_s=None)
    assert not watch.due(0, high=0)
    assert watch.due(0, high=500)  # came and went between two looks


def test_small_or_partial_drops_are_not_worth_a_release() -> None:
    watch = MemoryReturn(min_drop=200)
    watch.due(300)
    assert not watch.due(150, high=300)  # falling
    assert not watch.due(150)  # by half, but only 150 gone
    watch2 = MemoryReturn(min_drop=200)
    watch2.due(10_000)
    assert not watch2.due(6_000)
    assert not watch2.due(6_000)  # 4,000 gone, but not half


def test_seeded_walks_release_only_after_half_went_and_at_most_once_per_drop() -> None:
    rng = random.Random(12)
    for _ in range(200):
        watch = MemoryReturn(min_drop=rng.choice([1, 50, 200]), again_s=None)
        open_now = 0
        for _ in range(100):
            open_now = max(0, open_now + rng.randint(-500, 500))
            if watch.due(open_now):
                assert open_now <= watch.last_peak // 2
                assert watch.last_peak - open_now >= watch.min_drop
                assert not watch.due(open_now)


def test_a_second_release_comes_once_what_the_crowd_left_of_its_limits_is_past() -> None:
    watch = MemoryReturn(min_drop=200, again_s=65.0)
    assert not watch.due(1000, now=0.0)
    assert not watch.due(0, now=2.0)  # falling
    assert watch.due(0, now=4.0)
    assert not watch.due(0, now=30.0)
    assert not watch.due(10, now=68.0)
    assert watch.due(10, now=69.0)  # 65 s after the first
    assert not watch.due(10, now=200.0)  # once
    assert watch.releases == 2


def test_a_client_cycling_connections_gets_one_release_per_interval() -> None:
    watch = MemoryReturn(min_drop=200, again_s=None, every_s=30.0)
    released = []
    for tick in range(60):  # 300 connections in, all out, every 6 s, for two minutes
        now = tick * 2.0
        if watch.due(300 if tick % 3 == 0 else 0, high=300, now=now):
            released.append(now)
    assert released and all(b - a >= 30.0 for a, b in itertools.pairwise(released))
    assert len(released) <= 5


def test_release_empties_the_caches_and_says_how_long_it_took() -> None:
    emptied = []
    took = release([lambda: emptied.append(1), lambda: emptied.append(2)])
    assert emptied == [1, 2]
    assert took >= 0


def test_the_node_runs_with_jemalloc_or_the_system_allocator_unless_told_otherwise() -> None:
    def without() -> None:
        return None

    def found() -> str:
        return "libjemalloc.so.2"

    assert wanted_env({"A": "1"}, without) == {"A": "1", "PYTHONMALLOC": "malloc"}
    assert wanted_env({"A": "1"}, found) == {"A": "1", "PYTHONMALLOC": "malloc",
                                             "LD_PRELOAD": "libjemalloc.so.2"}
    # The user's choices stay: a preload of theirs, an allocator of theirs.
    assert wanted_env({"LD_PRELOAD": "x.so"}, found) == {"LD_PRELOAD": "x.so",
                                                          "PYTHONMALLOC": "malloc"}
    assert wanted_env({"PYTHONMALLOC": "pymalloc"}, found) is None
    assert wanted_env({"PYTHONMALLOC": "malloc"}) is None
    assert allocator() == "pymalloc"  # this test process: CPython's own


def test_the_collector_is_tuned_for_a_node_that_is_up() -> None:
    import gc

    before = gc.get_threshold()
    try:
        tune_collector()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_a_crowd_whose_actors_still_wind_down_is_waited_for() -> None:
    watch = MemoryReturn(min_drop=200, again_s=None, every_s=0.0)
    assert not watch.due(1000)
    assert not watch.due(0)  # leaving
    assert not watch.due(0, settling=True)  # sockets gone, actors still stopping
    assert not watch.due(0, settling=True)
    assert watch.due(0)  # all gone now
    assert watch.last_peak == 1000
