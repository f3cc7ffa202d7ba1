"""``python -m bench``: the report of every workload (``make bench``), or one benchmark.

``python -m bench [report flags]`` (``make bench``) runs ``bench.suite``: idle connections,
500 rooms x 2 members publishing, device ingest and fan-out, each against rtnode with 1 and 2
workers and the plain websockets baseline, printed side by side and written as JSON and PNG
plots (``python -m bench --help``). ``python -m bench fanout [...]``,
``python -m bench ingest [...]``, ``python -m bench scaleout [...]`` or
``python -m bench recovery [...]`` (the latency of a recovering join) runs one.
``python -m bench fuzz [...]`` (hostile frames next to well-behaved clients) and
``python -m bench flood [...]`` (well-behaved latency during a 20-connection flood) run only
when named (``make fuzz``, ``make flood``), as does ``python -m bench consume [...]``
(durable consumers' events/s and CPU per event, ``make bench-consume``) and
``python -m bench sessions [...]`` (persistent MQTT sessions held, RSS per offline session,
resume time; ``make bench-sessions``) and ``python -m bench connections [...]`` (memory per
idle connection and connects/s, against plain ``websockets``), ``python -m bench storm
[...]`` (a reconnect storm: 5,000 clients of one room recover after their node restarts,
beside the unbatched baseline), and ``python -m bench instructions [...]`` (instructions per
connect and per event under valgrind's callgrind, repeatable within ~1% where CPU time is not,
beside the websockets baseline; ``make bench-instructions``).
"""

from __future__ import annotations

import sys

from bench import (
    connections,
    consume,
    fanout,
    flood,
    fuzz,
    ingest,
    instructions,
    recovery,
    scaleout,
    sessions,
    storm,
    suite,
)


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
    if argv and argv[0] == "storm":
        return storm.main(argv[1:])
    if argv and argv[0] == "instructions":
        return instructions.main(argv[1:])
    return suite.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
