# `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Test workers (pytest-xdist); CI has 2 cores. `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= 2

.PHONY: setup demo test bench lint notebooks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bgeom suite --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	# CPU PyTorch for the PyTorch peers (the +cpu wheel where the index has one),
	# torchattacks without its torchvision requirement (never imported).
	$(PY) -m pip install --quiet "torch==2.13.0+cpu" || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	$(PY) benchmarks/run_all.py

# Re-generate every notebooks/*.ipynb from its .py pair, executed at full size.
notebooks: $(STAMP)
	cd notebooks && for f in *.py; do ../$(VENV)/bin/jupytext --to ipynb --execute "$$f" || exit 1; done

lint: $(STAMP)
	$(VENV)/bin/ruff check bgeom tests benchmarks

clean:
	rm -rf runs .pytest_cache
