# The two commands: `make run` (the main job) and `make test`.
# Every target installs what it needs on first use into .venv/.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install run test lint clean dev-stop bench bench-quick flower flower-screenshot fuzz chaos chaos-quick

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m channels_cli.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check channels_core producer workers channels_cli tests scripts bench chaos
	$(BIN)/mypy

# The schemathesis run against the live ingress's /openapi.json, at length
# (make test runs a short one).
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	CHANNELS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) CHANNELS_FUZZ_TIMEOUT=3600 \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/ingress/test_ingress_fuzz.py

# Flower on the embedded broker; needs CHANNELS_FLOWER_BASIC_AUTH=user:password.
flower: $(STAMP)
	$(BIN)/channels flower

# artifacts/flower-tasks.png; needs Chromium (apt-get install chromium).
flower-screenshot: $(STAMP)
	$(BIN)/python scripts/flower_screenshot.py

# Benchmarks are not part of `make test`: they take minutes and need a quiet machine.
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --runs 3

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

# Fault injection: real processes, faults injected, three ledgers reconciled.
# Not part of `make test`; chaos-quick runs every scenario at small size.
chaos: $(STAMP)
	$(BIN)/python -m chaos.run

chaos-quick: $(STAMP)
	$(BIN)/python -m chaos.run --quick

dev-stop: $(STAMP)
	$(BIN)/channels dev stop

clean:
	rm -rf $(VENV) .channels build *.egg-info
