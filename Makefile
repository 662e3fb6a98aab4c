# `make demo` and `make test` set up .venv themselves on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export XLA_PYTHON_CLIENT_PREALLOCATE ?= false
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Test workers (pytest-xdist); CI has 2 cores. `make test TEST_WORKERS=0` runs serially.
TEST_WORKERS ?= 2

# The exact versions the tests passed with; `make upgrade` refreshes them.
CONSTRAINTS := constraints.txt
PIP_PINNED := -m pip install --quiet -c $(CONSTRAINTS)

.PHONY: setup demo test bench lint notebooks docs upgrade clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) $(PIP_PINNED) -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/bgeom suite --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(STAMP)
	$(PY) $(PIP_PINNED) -e ".[dev,bench]"
	# CPU PyTorch for the PyTorch peers (the +cpu wheel where the index has one),
	# torchattacks without its torchvision requirement (never imported).
	$(PY) -m pip install --quiet "torch==2.13.0+cpu" || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	$(PY) benchmarks/run_all.py

# Re-generate every notebooks/*.ipynb from its .py pair, executed at full size.
notebooks: $(STAMP)
	cd notebooks && for f in *.py; do ../$(VENV)/bin/jupytext --to ipynb --execute "$$f" || exit 1; done

# The documentation site (method pages, API reference from the docstrings, notebooks with
# their outputs) into site/, strict: any warning fails. tests/test_docs.py builds it too.
docs: $(STAMP)
	$(PY) docs/stage.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(VENV)/bin/ruff check bgeom tests benchmarks

# The newest versions pyproject.toml allows, in a scratch venv; if the tests pass there,
# they become the pins (and .venv is re-installed with them on the next target).
upgrade:
	rm -rf .venv-upgrade
	$(PYTHON) -m venv .venv-upgrade
	.venv-upgrade/bin/python -m pip install --quiet --upgrade pip
	.venv-upgrade/bin/python -m pip install --quiet -e ".[dev]"
	.venv-upgrade/bin/python -m pytest -q -n $(TEST_WORKERS)
	head -3 $(CONSTRAINTS) > $(CONSTRAINTS).new
	.venv-upgrade/bin/python -m pip freeze --exclude-editable | grep -v '^-e' >> $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf .venv-upgrade
	@git diff --stat -- $(CONSTRAINTS) || true

clean:
	rm -rf runs .pytest_cache site build
