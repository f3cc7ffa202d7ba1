# The whole set-up on a fresh machine is `make run` or `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian packages the test suite needs (installed by `make test` when missing); the node
# preloads jemalloc when the system has it (node/memory.py).
SYSTEM_PACKAGES ?= mosquitto-clients mosquitto chromium curl libjemalloc2
ARGS ?=
PYTEST_ARGS ?=
# Processes for the tests that may run side by side (make test's first pass).
TEST_WORKERS ?= 2

.PHONY: run test lint bench bench-consume bench-sessions bench-instructions fuzz flood jepsen \
	system-deps clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# A node on the defaults, its state in ./rtnode-data (one node per data dir: a second one stops
# with the holder's pid). Its banner's token command runs as printed; the HTTP API examples of
# the README use a service token (`.venv/bin/rtnode token --sub backend --kind service`), so no
# API key is needed (ARGS="--api-key KEY" or RTNODE_API_KEY sets one).
run: $(STAMP)
	$(BIN)/rtnode run $(ARGS)

system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# Two passes: the tests that may run side by side, in TEST_WORKERS processes (pytest-xdist),
# then the ones marked serial (tests/conftest.py: seeded faults, kills, pauses, memory, rates),
# alone, so that no other test's load makes them miss a deadline. TEST_WORKERS=1 runs both
# passes in this process. pytest's exit 5 means no test ran: one pass may select none (a
# PYTEST_ARGS naming a few tests), but both selecting none checks nothing, so that fails too.
# Bytecode is written (an environment's PYTHONDONTWRITEBYTECODE is dropped here): the tests
# start many Python processes (nodes, CLIs, devices), and each compiled the project anew,
# ~0.3 s of CPU; pytest's rewritten test modules are kept for the second pass too. Measured on
# test_node_program.py and test_workers.py: 53 -> 43 s, CPU 32.6 -> 24.5 s.
test: $(STAMP) system-deps
	@unset PYTHONDONTWRITEBYTECODE; \
	if [ "$(TEST_WORKERS)" -gt 1 ]; then par="-n $(TEST_WORKERS)"; else par="-p no:xdist"; fi; \
	echo "make test: pass 1 of 2, the tests that run side by side ($$par)"; \
	$(BIN)/python -m pytest $$par -m "not serial" $(PYTEST_ARGS); one=$$?; \
	echo "make test: pass 2 of 2, the serial tests, one at a time"; \
	$(BIN)/python -m pytest -p no:xdist -m serial $(PYTEST_ARGS); two=$$?; \
	if [ $$one -eq 5 ] && [ $$two -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; \
	for rc in $$one $$two; do if [ $$rc -ne 0 ] && [ $$rc -ne 5 ]; then echo "make test: failed (pass 1: exit $$one, pass 2: exit $$two)" >&2; exit $$rc; fi; done

lint: $(STAMP)
	$(BIN)/ruff check node actors bridge devices tests bench
	$(BIN)/mypy node actors bridge devices

# The report of issue 12 (bench/__main__.py): every workload side by side (rtnode with 1 and 2
# workers, the plain websockets baseline; Mosquitto for the device ingest, installed from Debian
# when missing), printed as a table and written as JSON and PNG plots to ./bench-report/
# (--out DIR; progress on stderr). `make bench ARGS="--help"` lists the knobs;
# `make bench ARGS="fanout ..."` runs one benchmark alone.
bench: $(STAMP)
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES=mosquitto
	$(BIN)/python -m bench $(ARGS)

# Hostile clients against a node (bench/fuzz.py): FUZZ_FRAMES hostile frames over WebSocket
# (JSON, CBOR), the MQTT tunnel, plain uplinks and half-open sockets, next to well-behaved
# rooms; prints frames sent, node RSS, crashes, stuck rooms and the well-behaved p99 before and
# during. FUZZ_SEED=<n> repeats a run's draws. `make flood`: the 20-connection flood's p99
# without and during, and events lost (bench/flood.py).
FUZZ_FRAMES ?= 100000
FUZZ_SEED ?=
fuzz: $(STAMP)
	$(BIN)/python -m bench fuzz --frames $(FUZZ_FRAMES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED)) $(ARGS)

flood: $(STAMP)
	$(BIN)/python -m bench flood $(ARGS)

# Durable consumers (bench/consume.py): events/s and CPU per event of a nats-py pull baseline,
# ReplayConsumer, a group of 3, `rtnode consume` to a pipe and the webhook path, same run.
bench-consume: $(STAMP)
	$(BIN)/python -m bench consume $(ARGS)

# Persistent MQTT sessions (bench/sessions.py): 2,000 offline sessions held (node RSS per
# session, the session bucket's size), and the resume time of a device that missed 10,000
# events beside a nats-py ordered consumer reading the same events, same run.
bench-sessions: $(STAMP)
	$(BIN)/python -m bench sessions $(ARGS)

# Instructions per connect and per event under valgrind's callgrind (bench/instructions.py),
# rtnode beside the websockets baseline: repeatable within ~1% where CPU time varies by ~10% on
# a VM. Installs Debian's valgrind when missing; ARGS="--repeat 3" for the median and range.
bench-instructions: $(STAMP)
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES=valgrind
	$(BIN)/python -m bench instructions $(ARGS)

# The long run of the Jepsen-style fault test (tests/integration/test_jepsen.py; `make test` runs
# a 30 s one): JEPSEN_SECONDS of faults, its report printed. RTNODE_JEPSEN_SEED=<n> repeats a
# run's choices; RTNODE_JEPSEN_FAULTS, _RATE, _CHURN_S, _GAP_S tune it (see the test's docstring).
JEPSEN_SECONDS ?= 300
jepsen: $(STAMP)
	RTNODE_JEPSEN_SECONDS=$${RTNODE_JEPSEN_SECONDS:-$(JEPSEN_SECONDS)} \
	  $(BIN)/python -m pytest tests/integration/test_jepsen.py -s -q -p no:cacheprovider $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
