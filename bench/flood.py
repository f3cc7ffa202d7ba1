"""``python -m bench flood``: well-behaved members' latency without and during a flood.

One node with its own limits; well-behaved members of their own rooms publish and receive
throughout (:mod:`bench.members`). After 2 s of warm-up (not counted) and ``--baseline-s``
alone, ``--connections`` hostile
WebSocket connections (default 20: a quarter each join/leave churn on distinct rooms, oversized
frames, malformed messages, history/presence/rpc request floods; each reconnects when the node
closes it) flood the node for ``--seconds``, from processes of their own.

Printed: the members' p99 latency without the flood and during it (same run), their ratio (the
goal: within 2x), the p99 of the part until the node stamped an event (the way into the node),
events lost (must be 0), and what the node answered the flood. The exit status
is 1 when an event was lost, a room got stuck or the node crashed.

``--kinds churn --connections 5`` floods with one kind only; ``--node-arg=--nats-sync=2m``
(repeatable) passes a flag to the node, e.g. to take JetStream's per-event fsync out of the
figures.
"""

from __future__ import annotations

import argparse
import random
import sys

from bench.attackers import AttackerSpec
from bench.hostile_run import HostileConfig, report_lines, run_hostile

__all__ = ["FLOOD_KINDS", "flood_specs", "main"]

FLOOD_KINDS = ("churn", "oversized", "malformed", "requests")
FLOOD_FRAMES = 10**9  # bounded by time only


def flood_specs(seed: int, connections: int,
                kinds: tuple[str, ...] = FLOOD_KINDS) -> tuple[AttackerSpec, ...]:
    """``connections`` flood attackers, the kinds in turn, their seeds drawn from ``seed``."""
    rng = random.Random(seed)
    return tuple(AttackerSpec(kinds[i % len(kinds)], rng.randrange(1 << 62))
                 for i in range(connections))


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FLOOD_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'none'}: the kinds are {', '.join(FLOOD_KINDS)}")
    return kinds


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench flood", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="repeat a run (default: random)")
    parser.add_argument("--connections", type=int, default=20, help="hostile connections")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the flood lasts")
    parser.add_argument("--baseline-s", type=float, default=None,
                        help="how long the members are measured alone first (default: as long "
                             "as the flood: the two p99s come from windows of the same length, "
                             "so that a rare stall of the machine is as likely in either)")
    parser.add_argument("--workers", type=int, default=2, help="attacker processes")
    parser.add_argument("--kinds", type=_kinds, default=FLOOD_KINDS,
                        help=f"comma-separated hostile kinds, dealt in turn (default: "
                             f"{','.join(FLOOD_KINDS)})")
    parser.add_argument("--node-arg", action="append", default=[], metavar="FLAG",
                        help="a flag for the node, e.g. --node-arg=--nats-sync=2m (repeatable)")
    args = parser.parse_args(argv)
    if args.baseline_s is None:
        args.baseline_s = args.seconds
    if args.connections < 1 or args.seconds <= 0 or args.baseline_s <= 0 or args.workers < 1:
        parser.error("--connections, --seconds, --baseline-s and --workers must be positive")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    cfg = HostileConfig(seed=seed, specs=flood_specs(seed, args.connections, args.kinds),
                        frames=FLOOD_FRAMES, seconds=args.seconds, workers=args.workers,
                        baseline_s=args.baseline_s, node_flags=tuple(args.node_arg))
    node = f", node flags {' '.join(args.node_arg)}" if args.node_arg else ""
    print(f"flood: seed {seed}, {args.connections} hostile connections "
          f"({', '.join(args.kinds)}{node}) for {args.seconds:g} s after {args.baseline_s:g} s "
          f"without; {cfg.rooms} well-behaved rooms of {cfg.members} members, "
          f"{cfg.rate_per_s:g} events/s each", flush=True)
    res = run_hostile(cfg)
    for line in report_lines(res):
        print(line)
    if res.p99_before and res.p99_during:
        ratio = res.p99_during / res.p99_before
        print(f"p99 during the flood / without: {ratio:.2f}x (goal: within 2x)")
    return 1 if res.error or res.crashes or res.stuck or res.lost else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
