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

# The demo has a virtualenv of its own, inside $(VENV) so that `make clean` removes it: locust needs gevent and
# greenlet 3, and the test tools' httpbin pins greenlet < 3.
DEMO_VENV  := $(VENV)/demo
DEMO_STAMP := $(DEMO_VENV)/.installed
DEMO_ARGS  ?=

$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	$(DEMO_VENV)/bin/python -m pip install -q -e '.[demo]'
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)  ## Bookinfo behind the ingress gateway, with a little load (locust); Ctrl-C stops everything
	$(DEMO_VENV)/bin/python examples/bookinfo/loadgen/demo.py $(DEMO_ARGS)

# The suite runs `make demo` too (tests/integration/test_demo.py), so it needs the demo's virtualenv: one
# more pip install the first time (about 30 s and 140 MB), nothing after.
test: $(STAMP) $(DEMO_STAMP)  ## the whole suite: lint, types, unit and integration tests
	$(VENV)/bin/ruff check src tests bench examples
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

bench: $(STAMP)  ## direct vs kizuna (2 sidecars) vs HAProxy (2 processes); table on stdout, JSON in bench/results/
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .kizuna .pytest_cache .mypy_cache .ruff_cache
