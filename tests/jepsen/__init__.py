"""A Jepsen-style fault test of rtnode: "nothing acknowledged is missed" (issue 16).

- :mod:`tests.jepsen.checker`: pure functions that judge a recorded history against the stream
  read back from JetStream (unit-tested with synthetic histories).
- :mod:`tests.jepsen.wire`: one raw WebSocket connection speaking the protocol's JSON frames.
- :mod:`tests.jepsen.clients`: publishers (retrying with the same ``msg_id``, every publish
  recorded as ok / failed / unknown) and churning subscribers (every ``joined`` and event
  recorded).
- :mod:`tests.jepsen.nemesis`: one fault at a time, seeded: kill -9 and SIGSTOP of
  nats-servers, cuts of a node's NATS link, kill -9 of nodes, stream leader step-downs.
- :mod:`tests.jepsen.harness`: the servers, the run, the truth read and the report.
"""
