# Newcomer entry points: `make demo` (install, then compile + convert + run +
# parity on this machine, offline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo.py

test: $(STAMP)
	bash scripts/install_test_packages.sh
	$(PY) -m pytest -q -x --durations=15 tests

test-slow: $(STAMP)
	bash scripts/install_test_packages.sh
	$(PY) -m pytest -q --run-slow --parity-report -rs tests

bench: $(STAMP)
	$(VENV)/bin/mlc-vision bench
	$(PY) scripts/convert_memory.py

clean:
	rm -rf dist build bench-results
