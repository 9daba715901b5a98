# megamix — the two commands a newcomer needs:
#   make demo   set up, build the real multi-domain corpus, train a tiny GPT with online R&B mixing (CPU)
#   make test   set up and run the test suite (what .ci/run calls)
# Every target is idempotent: a second run reuses the venv, the package cache and the corpus.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.megamix-setup
DATA   ?= data
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: setup data demo test test-all bench-cpu clean-data

setup: $(STAMP)

# torch==2.13.0 is pinned in requirements.txt and installed in the SAME pip command as everything that
# depends on it, so pip takes the CPU wheel instead of pulling a multi-GB CUDA build.
$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch, triton, transformers, deepspeed" 
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 | grep -v "^WARNING: Location" || true
	touch $(STAMP)

data: setup
	$(BIN)/megamix data build --data-dir $(DATA)

demo: data
	$(BIN)/megamix train --config $(CONFIG) --set data.data_dir=$(DATA)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

# the kernel microbenchmark on CPU, into a new run folder under runs/bench/ (OUT=DIR names another one;
# OUT=kernels/bench/results refreshes the committed results)
bench-cpu: setup
	$(BIN)/megamix bench kernels --cpu $(if $(OUT),--out $(OUT))

clean-data:
	rm -rf $(DATA)
