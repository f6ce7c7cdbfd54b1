# krakenfeed: the two commands are `make run` and `make test`; everything else is a helper.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-test
BENCH_STAMP := $(VENV)/.installed-bench
PYTEST_ARGS ?=

.PHONY: venv bench-venv test lint soak bench bench-quick clean run status stop clear-halt
SVCTL   := $(VPY) -m supervisor.supervisorctl -c supervisord.conf

# Create the venv and install the project with its test extra. Idempotent: the stamp
# is newer than pyproject.toml when nothing changed, so a second call costs nothing.
venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test]"
	@touch $@

test: venv
	$(VPY) -m ruff check .
	$(VPY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VPY) -m ruff check .

# The soak: the system at 10k msg/s for 30 minutes (SOAK_S=120 for a try), RSS growth
# per hour, latency and loss over time; bench/results/soak.{json,png}.
soak: bench-venv
	@$(VPY) bench/soak.py $(if $(SOAK_S),--seconds $(SOAK_S),)

# Benchmarks (never part of `make test`): the venv plus the bench extra (python-kraken-sdk,
# matplotlib, websockets), idempotent like `venv`. `bench` is the full load test (< 10 min),
# `bench-quick` the same at smaller scale (< 90 s). Both print a table, write
# bench/results/latest.json and two PNGs, and end with one JSON line (README "Benchmarks").
# The recipes run python directly and silently, so nothing is printed after that line.
bench-venv: $(BENCH_STAMP)

$(BENCH_STAMP): pyproject.toml
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test,bench]"
	@touch $@

bench: bench-venv
	@$(VPY) bench/loadtest.py

bench-quick: bench-venv
	@$(VPY) bench/loadtest.py --quick

# Start the whole system in the foreground under supervisord. Default: the bundled replay
# server plays a synthetic Kraken market (no network). LIVE=1: wss://ws.kraken.com/v2.
# Ctrl-C stops everything in order (ingest, bookd, bus, replay, haltd).
run: venv
	@mkdir -p run
	@if [ -f run/halt.json ]; then \
	  echo "krakenfeed is HALTED: run/halt.json says why:"; sed -n '1,20p' run/halt.json; \
	  echo "Read it, fix the cause, then 'make clear-halt' and 'make run' again."; exit 1; fi
	@$(SVCTL) status >/dev/null 2>&1; rc=$$?; if [ $$rc -ne 4 ]; then \
	  echo "krakenfeed is already running here (supervisord answers on run/supervisor.sock)."; \
	  echo "See 'make status'; stop it with 'make stop'."; exit 1; fi
	@if $(VPY) -m bookd.top --once >/dev/null 2>&1; then \
	  echo "Another krakenfeed (another checkout?) is running in this namespace: its books"; \
	  echo "are live in shared memory ($(VPY) -m bookd.top --once shows them)."; \
	  echo "Stop it, or give this checkout its own [system] namespace in etc/krakenfeed.toml."; \
	  exit 1; fi
	@if [ -n "$(LIVE)" ]; then $(VPY) scripts/live_conf.py supervisord.conf run/supervisord.live.conf; fi
	@echo "krakenfeed: starting $(if $(LIVE),LIVE on wss://ws.kraken.com/v2,on the bundled synthetic market) (Ctrl-C stops it)"
	@echo "  programs : $(if $(LIVE),,replay ,)ingest, bookd, bus, haltd (supervisord.conf)"
	@echo "  logs     : run/<program>.log, run/supervisord.log"
	@echo "  watch    : .venv/bin/python -m bus.tail          (bus events)"
	@echo "             .venv/bin/python -m bookd.top         (books in shared memory)"
	@echo "  control  : make status | make stop"
	@exec $(VPY) -m supervisor.supervisord -n -c $(if $(LIVE),run/supervisord.live.conf,supervisord.conf)

status: venv
	@$(SVCTL) status; rc=$$?; if [ $$rc -eq 4 ]; then echo "krakenfeed is not running"; exit 0; fi; \
	  $(VPY) -m bookd.top --once || true

stop: venv
	@$(SVCTL) shutdown >/dev/null 2>&1 && echo "krakenfeed: stopping (ordered shutdown)" || echo "krakenfeed is not running"

clear-halt:
	@if [ -f run/halt.json ]; then f=run/halt-$$(date -u +%Y%m%dT%H%M%SZ).json; mv run/halt.json $$f; \
	  echo "halt cleared; the decision is kept in $$f"; else echo "no halt to clear"; fi

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
