# Two commands do everything (README): `make demo` and `make test`. Both set up the virtual
# environment first (only when pyproject.toml or constraints.txt changed since the last setup).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.setup-stamp
# Several fake CPU devices so data-parallel code paths run in tests without accelerators.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=2
DEMO_DIR ?= demo_out
# Extras installed by setup; torch is the PyTorch reference of the framework comparison (CPU build,
# ~20 s from the local wheel, so the parity tests run in CI). `make setup EXTRAS=dev` skips it.
EXTRAS ?= dev,torch

.PHONY: setup test test-slow lint format demo study bench clean

# The oneDNN convolution extension (docs/onednn.md): rebuilt when its sources change. A failed
# build prints one line and the models use XLA's convolutions.
ONEDNN_LIB := cac_jax/ops/_build/libcac_onednn_conv.so

setup: $(STAMP) $(ONEDNN_LIB)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $(STAMP)

$(ONEDNN_LIB): $(STAMP) cac_jax/ops/csrc/onednn_conv.cc cac_jax/ops/csrc/CMakeLists.txt
	$(BIN)/python -m cac_jax.ops.build

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

test: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(TEST_ENV) $(BIN)/python -m pytest -m "not slow" -n 2 --dist loadfile --durations=15

test-slow: setup
	$(TEST_ENV) $(BIN)/python -m pytest -m "slow"

demo: setup
	$(BIN)/python -m cac_jax.demo --out $(DEMO_DIR)

# The paper's experiment on a multi-site synthetic cohort (docs/study.md): hours on 2 CPU cores,
# resumable (run it again to continue). STUDY_CONFIG=configs/study.py:gpu for the GPU variant.
STUDY_DIR ?= study_out
STUDY_CONFIG ?= configs/study.py
study: setup
	$(BIN)/cac-jax study --config $(STUDY_CONFIG) --out $(STUDY_DIR)

# Every benchmark at full size, one after the other (about 35-40 minutes on 2 cores); each writes
# benchmarks/results/<name>.json and .md. Run on a quiet machine: they time alternatives side by side.
bench: setup
	$(BIN)/python benchmarks/bench_io.py
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_phantom.py --patients 40 --size 256 --workers 2
	$(BIN)/python benchmarks/bench_input_pipeline.py
	$(BIN)/python benchmarks/bench_models.py
	$(BIN)/python benchmarks/bench_layers.py
	$(BIN)/python benchmarks/bench_layer_rewrites.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
