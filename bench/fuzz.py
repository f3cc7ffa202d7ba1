"""``python -m bench fuzz``: hostile frames against a node, next to well-behaved clients.

At least 100,000 hostile frames (``--frames``) over WebSocket in JSON and CBOR, the MQTT tunnel
(``rtnode/v1/<client_id>/in``), plain uplinks (``rooms/<room>/up``) and half-open sockets,
from attacker processes separate from the node (:mod:`bench.attackers`, drawn by
:mod:`bench.hostile_frames`), while well-behaved members of their own rooms publish and
receive (:mod:`bench.members`). The node runs with its own limits. Bounded in frames and in
time (``--seconds``); seeded: the seed is printed, ``--seed`` repeats a run's draws (what the
node answers depends on timing).

Printed: frames sent, what the node answered, node RSS before and after, crashes (must be 0: the
node died, a traceback or ERROR line in its log, or a well-behaved client missed an event),
stuck rooms (a member stopped receiving), and the well-behaved clients' p99 latency before and
during the attack. The exit status is 1 when there was a crash or a stuck room.
"""

from __future__ import annotations

import argparse
import random
import sys

from bench.attackers import FUZZ_KINDS, AttackerSpec
from bench.hostile_run import HostileConfig, report_lines, run_hostile

__all__ = ["fuzz_config", "main"]


#: The fuzz is about what the node does with hostile frames, so the limits that stop a client
#: from reconnecting (the rate of connects per user, and the pause of an address whose
#: connections keep failing: all attackers share 127.0.0.1) are opened wide: the frames must
#: reach the node. Every other limit is the node's own; `make flood` measures those two.
FUZZ_NODE_FLAGS = ("--connects-per-min", "1000000", "--peer-failures-per-min", "1000000")


def fuzz_config(seed: int, frames: int, seconds: float, attackers: int,
                workers: int) -> HostileConfig:
    """The fuzz run: ``attackers`` of every kind in turn, their seeds drawn from ``seed``."""
    rng = random.Random(seed)
    specs = tuple(AttackerSpec(FUZZ_KINDS[i % len(FUZZ_KINDS)], rng.randrange(1 << 62))
                  for i in range(attackers))
    return HostileConfig(seed=seed, specs=specs, frames=frames, seconds=seconds,
                         workers=workers, node_flags=FUZZ_NODE_FLAGS)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="repeat a run (default: random)")
    parser.add_argument("--frames", type=int, default=100_000, help="hostile frames in all")
    parser.add_argument("--seconds", type=float, default=600.0,
                        help="the attack ends after this long even if frames are left")
    parser.add_argument("--attackers", type=int, default=30,
                        help="hostile clients at a time (kinds in turn: " +
                             ", ".join(FUZZ_KINDS) + ")")
    parser.add_argument("--workers", type=int, default=2, help="attacker processes")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.seconds <= 0 or args.attackers < 1 or args.workers < 1:
        parser.error("--frames, --seconds, --attackers and --workers must be positive")
    return args


def main(argv: list[str]) -> int:
    args = _parse(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    cfg = fuzz_config(seed, args.frames, args.seconds, args.attackers, args.workers)
    print(f"fuzz: seed {seed} (repeat with --seed {seed}), {args.frames} hostile frames "
          f"at most, {args.seconds:g} s at most, {args.attackers} attackers in "
          f"{args.workers} processes; {cfg.rooms} well-behaved rooms of {cfg.members} members, "
          f"{cfg.rate_per_s:g} events/s each; node flags: {' '.join(cfg.node_flags)}",
          flush=True)
    res = run_hostile(cfg)
    for line in report_lines(res):
        print(line)
    return 1 if res.error or res.crashes or res.stuck else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
