"""``python -m bench flood`` options: ``--kinds`` picks the hostile kinds (dealt in turn), an
unknown kind is one line and exit status 2, and ``--node-arg`` reaches the node's flags."""

from __future__ import annotations

import pytest

import bench.flood as flood
from bench.hostile_run import HostileConfig, HostileResult


def test_kinds_are_dealt_in_turn_and_seeded() -> None:
    specs = flood.flood_specs(7, 5, ("churn", "requests"))
    assert [s.kind for s in specs] == ["churn", "requests", "churn", "requests", "churn"]
    assert specs == flood.flood_specs(7, 5, ("churn", "requests"))
    assert {s.kind for s in flood.flood_specs(7, 8)} == set(flood.FLOOD_KINDS)


def test_an_unknown_kind_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        flood.main(["--kinds", "churn,bogus"])
    assert ended.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--kinds: bogus: the kinds are churn, oversized, malformed, requests")


def test_kinds_and_node_args_reach_the_run(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[HostileConfig] = []

    def run(cfg: HostileConfig) -> HostileResult:
        seen.append(cfg)
        return HostileResult(cfg, error="not run")

    monkeypatch.setattr(flood, "run_hostile", run)
    assert flood.main(["--kinds", "churn", "--connections", "3", "--seed", "1",
                       "--node-arg=--nats-sync=2m"]) == 1
    (cfg,) = seen
    assert [s.kind for s in cfg.specs] == ["churn"] * 3
    assert cfg.node_flags == ("--nats-sync=2m",)
    assert "(churn, node flags --nats-sync=2m)" in capsys.readouterr().out
