# The two commands: `make test` (everything CI runs) and `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test test-fast demo lint lab-up lab-down venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

lint: venv
	$(VENV)/bin/ruff check patchd tests bench
	$(VENV)/bin/ruff format --check patchd tests bench
	$(VENV)/bin/mypy --strict patchd

lab-up: venv
	PATCHD_LAB_PYTHON=$(PY) tests/lab/lab.sh up

lab-down:
	tests/lab/lab.sh down

# The inner loop: unit tests and the backend contract suite on the fake backend; no test
# bed, no program it installs (tests marked integration or external are deselected, never
# skipped: `make test` runs them all), and the config fuzzer with 25 examples a test
# instead of 100 (`make test` runs them all too).
test-fast: venv
	PATCHD_FUZZ_EXAMPLES=25 $(PY) -m pytest -q -m "not integration and not external" $(PYTEST_ARGS)

# Starts the test bed, runs lint and every test, and stops the bed whatever the result.
test: venv
	@set -o pipefail; status=0; \
	PATCHD_LAB_PYTHON=$(PY) tests/lab/lab.sh up || status=$$?; \
	if [ $$status -eq 0 ]; then \
		$(MAKE) --no-print-directory lint || status=$$?; \
		$(PY) -m pytest --durations=30 $(PYTEST_ARGS) || status=$$?; \
	fi; \
	if [ -z "$$PATCHD_LAB_KEEP" ]; then tests/lab/lab.sh down || true; fi; \
	exit $$status

# The demo: starts the test bed and patches a small fleet with config/lab.toml.
# The test bed stays up afterwards for a look around; `make lab-down` stops it.
demo: venv
	PATCHD_LAB_PYTHON=$(PY) tests/lab/lab.sh up
	$(PY) tests/lab/demo.py
