# krakenfeed: the two commands are `make run` and `make test`; everything else is a helper.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-test
PYTEST_ARGS ?=

.PHONY: venv test lint soak bench bench-quick clean

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

soak: venv
	$(VPY) -m pytest -q -m soak -o addopts="" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis *.egg-info
