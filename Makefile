# Two commands a new user needs: `make test` and `make demo`.
# Both create the virtualenv .venv on first use and install the project in it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test test-lowest demo bench lint typecheck clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "throttle needs Python >= 3.11 (PYTHON=$(PYTHON))" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || \
		{ echo "could not create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv'" >&2; exit 1; }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick suite against the lowest celery, kombu and redis-py that
# pyproject.toml claims (.ci/lowest.txt), in a virtualenv of its own.
LOWEST := .venv-lowest
$(LOWEST)/.installed: pyproject.toml .ci/lowest.txt
	@test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev]" -c .ci/lowest.txt
	@touch $@

test-lowest: $(LOWEST)/.installed
	$(LOWEST)/bin/python -m pip list --disable-pip-version-check 2>/dev/null | grep -iE '^(celery|kombu|redis) '
	$(LOWEST)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m producer.demo $(DEMO_ARGS)

# The bucket against its peers, then how it scales (processes, cluster,
# batching, the Celery gate, memory for 1,000,000 tenants), then a backlog
# of 100,000 tasks: countdowns vs the waiting room; then the semaphore.
bench: $(STAMP)
	$(BIN)/python -m bench.bucket $(BENCH_ARGS)
	$(BIN)/python -m bench.scale $(SCALE_ARGS)
	$(BIN)/python -m bench.backlog $(BACKLOG_ARGS)
	$(BIN)/python -m bench.semaphore $(SEMAPHORE_ARGS)
	$(BIN)/python -m bench.concurrency $(CONCURRENCY_ARGS)

clean:
	rm -rf $(VENV) $(LOWEST) build *.egg-info .mypy_cache .ruff_cache
