# kizuna — see README.md. Every target works on a fresh Debian 12 machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP)  ## run the httpbin example in the mesh (Ctrl-C stops everything)
	$(VENV)/bin/kizuna up examples/httpbin

test: $(STAMP)  ## the whole suite: lint, types, unit and integration tests
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

bench: $(STAMP)  ## direct vs kizuna (2 sidecars) vs HAProxy (2 processes); table on stdout, JSON in bench/results/
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .kizuna .pytest_cache .mypy_cache .ruff_cache
