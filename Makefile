# Everything a fresh machine needs, from nothing: a virtualenv, the package, redis-server.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 5000

.PHONY: serve test lint services bench bench-quick lock clean

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

## Pin every runtime dependency and the build backend, with the hashes PyPI publishes, for the
## Dockerfile's `pip install --require-hashes`. Run it after changing install_requires; keeps the
## current pins that still fit (LOCK_ARGS=--upgrade moves them all to the newest allowed).
## PyPI alone, whatever pip.conf adds: a local mirror's rebuilt wheels would carry other hashes.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet 'pip-tools>=7.4,<8'
	PIP_CONFIG_FILE=/dev/null $(BIN)/pip-compile --quiet --generate-hashes --allow-unsafe \
	  --all-build-deps --strip-extras --no-emit-index-url --no-emit-find-links \
	  --output-file requirements.lock $(LOCK_ARGS) setup.cfg

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
