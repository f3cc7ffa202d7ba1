"""``python -m bench``: run every benchmark and print its figures.

``python -m bench [fanout flags]`` runs the fan-out benchmark, then the ingest benchmark with
its defaults, then the scale-out benchmark with its defaults; ``python -m bench fanout [...]``,
``python -m bench ingest [...]``, ``python -m bench scaleout [...]`` or
``python -m bench recovery [...]`` (the latency of a recovering join) runs one.
``python -m bench fuzz [...]`` (hostile frames next to well-behaved clients) and
``python -m bench flood [...]`` (well-behaved latency during a 20-connection flood) run only
when named (``make fuzz``, ``make flood``), as does ``python -m bench consume [...]``
(durable consumers' events/s and CPU per event, ``make bench-consume``) and
``python -m bench sessions [...]`` (persistent MQTT sessions held, RSS per offline session,
resume time; ``make bench-sessions``) and ``python -m bench connections [...]`` (memory per
idle connection and connects/s, against plain ``websockets``).
"""

from __future__ import annotations

import os
import sys

from bench import connections, consume, fanout, flood, fuzz, ingest, recovery, scaleout, sessions


def main(argv: list[str]) -> int:
    if argv and argv[0] == "fanout":
        return fanout.main(argv[1:])
    if argv and argv[0] == "ingest":
        return ingest.main(argv[1:])
    if argv and argv[0] == "scaleout":
        return scaleout.main(argv[1:])
    if argv and argv[0] == "recovery":
        return recovery.main(argv[1:])
    if argv and argv[0] == "fuzz":
        return fuzz.main(argv[1:])
    if argv and argv[0] == "flood":
        return flood.main(argv[1:])
    if argv and argv[0] == "consume":
        return consume.main(argv[1:])
    if argv and argv[0] == "connections":
        return connections.main(argv[1:])
    if argv and argv[0] == "sessions":
        return sessions.main(argv[1:])
    rc = fanout.main(argv)
    rc = ingest.main([]) or rc
    # What syncing every stored event costs (the embedded nats-server's default, nats_sync =
    # always): the same ingest with JetStream's own default, an fsync every 2 minutes.
    print("\nbaseline for the line above: the same ingest with RTNODE_NATS_SYNC=2m "
          "(JetStream's default sync interval; a power loss can lose acked events)", flush=True)
    os.environ["RTNODE_NATS_SYNC"] = "2m"
    try:
        rc = ingest.main([]) or rc
    finally:
        del os.environ["RTNODE_NATS_SYNC"]
    return scaleout.main([]) or rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
