# Everything a fresh machine needs, from nothing: a virtualenv, the package, redis-server.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 5000

.PHONY: serve test lint services bench bench-quick clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

## Serve the app locally: development, in-memory sessions, no other service.
serve: $(STAMP)
	ENV=development SESSION_STORE_BACKEND=memory $(BIN)/flask --app wsgi run --port $(PORT)

## Install the services the tests start themselves, each only when missing (see the script).
services:
	@sh scripts/install-services.sh

## Run the whole test suite against the real services.
test: $(STAMP) services
	$(BIN)/python -m pytest

## Side-by-side benchmark (real redis-server, Firestore emulator, gunicorn, wrk; ss checks spread).
bench: $(STAMP) services
	@{ command -v wrk && command -v ss; } >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk iproute2 >/dev/null; }
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS=--quick

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
