# xmag-serve developer entry points. `make serve` and `make test` are the README quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make serve runs the trained demonstration package committed in models/demo (rebuilt by
# `make demo-model`); `make model` builds the torch-free untrained placeholder the tests also build.
MODEL_DIR ?= models/demo
PLACEHOLDER_DIR ?= models/default
DATA_DIR ?= var

.PHONY: install install-gpu install-train bench-gpu demo-model bench-export model ui serve worker test test-fast lint format typecheck bench bench-tiling bench-engine bench-load bench-tiles compose-check base-image compose-e2e clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	touch $@

install: $(VENV)/.installed

# The GPU build of onnxruntime (the pinned [gpu] extra) in place of the CPU one: both install the
# same `onnxruntime` module, so the CPU wheel goes first or it may shadow the GPU one (the engine
# warns at start when both are installed). Needs the CUDA 12 / cuDNN 9 / TensorRT 10.9 libraries
# (docker/Dockerfile.worker-gpu has them).
install-gpu: $(VENV)/.installed
	$(BIN)/python -m pip uninstall -y -q onnxruntime
	$(BIN)/python -m pip install -q -e ".[gpu,dev]"
	$(BIN)/python -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"

# Training and export need torch + timm (several GB); the service and the core never do.
$(VENV)/.installed-train: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[cpu,dev,train]"
	touch $@

install-train: $(VENV)/.installed-train

# The default model package: a small untrained network built without network access (card says trained=false).
$(PLACEHOLDER_DIR)/model.json: $(VENV)/.installed model_export/default_package.py
	$(BIN)/python -m model_export.default_package --out $(PLACEHOLDER_DIR)

model: $(PLACEHOLDER_DIR)/model.json

# The web viewer (/ui): npm dependencies from the registry (package-lock.json), copied into
# service/ui/dist by service/ui/build.mjs; the browser never loads anything from elsewhere.
UI_DIR := service/ui
$(UI_DIR)/node_modules/.package-lock.json: $(UI_DIR)/package.json $(UI_DIR)/package-lock.json
	cd $(UI_DIR) && npm ci --no-audit --no-fund
$(UI_DIR)/dist/index.html: $(UI_DIR)/node_modules/.package-lock.json $(UI_DIR)/build.mjs $(wildcard $(UI_DIR)/src/*)
	cd $(UI_DIR) && node build.mjs

ui: $(UI_DIR)/dist/index.html

serve: install ui
	$(BIN)/xmag serve --data-dir $(DATA_DIR) --model $(MODEL_DIR)

worker: install
	$(BIN)/xmag worker --model $(MODEL_DIR)

# The trained demonstration package (a small distilled student + a stain head, from the real test
# slides, no network): see model_export/demo/. Needs the [train] extra.
demo-model: install-train
	$(BIN)/python -m model_export demo --out runs/demo --package $(MODEL_DIR) --slides-dir tests/data/slides

# Rebuilds the demo from the committed sources in a temporary folder and compares every file of
# models/demo with it byte for byte (ONNX: which initializers differ); fails on any difference.
.PHONY: demo-model-check
demo-model-check: install-train
	$(BIN)/python -m model_export.demo.reproduce --package $(MODEL_DIR) --slides-dir tests/data/slides

# The training guide's config reference, generated from training/config.py (docs/training.md).
.PHONY: docs-training
docs-training: install-train
	$(BIN)/python -m training docs

# Every ```bash block of docs/training.md as written, in order, in a fresh temporary folder (a few
# minutes on a CPU); stops at the first failing block; blocks marked guide-check: skip say why.
.PHONY: guide-check
guide-check: install-train
	$(BIN)/python tests/guide_runner.py docs/training.md

test: install ui
	$(BIN)/python -m pytest -q

test-fast: install ui
	$(BIN)/python -m pytest -q -m "not slow" -x

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy xmag service

bench-tiling: install
	$(BIN)/python benchmarks/bench_tiling.py

bench-engine: model
	$(BIN)/python benchmarks/bench_engine.py --model $(PLACEHOLDER_DIR)

bench-load: model
	$(BIN)/python benchmarks/bench_load.py --model $(PLACEHOLDER_DIR)

bench-export: install-train
	$(BIN)/python benchmarks/bench_export.py

bench-tiles: install
	$(BIN)/python benchmarks/bench_tiles.py

# One table for a GPU machine (TensorRT/CUDA encoder rows, reading, slides/min, GPU memory), in
# under 8 minutes; on a CPU-only machine it runs the CPU rows and says why the GPU rows were skipped.
bench-gpu: install
	$(BIN)/python benchmarks/bench_gpu.py $(BENCH_GPU_ARGS)

bench: bench-tiling bench-engine bench-load bench-export bench-tiles

# Docker without a registry: `base-image` makes the images' base from the Debian mirror
# (mmdebstrap + docker import; CAs this host added are trusted inside, for a TLS-inspecting proxy);
# `compose-check` validates the compose file with docker-compose, `docker compose` or, with
# neither, in Python (it says which); `compose-e2e` builds the images, runs the stack on a real
# slide, restarts Redis, checks nothing was lost, and always tears it down.
BASE_IMAGE ?= xmag-base:bookworm
BASE_CA_CERTS ?= $(wildcard /usr/local/share/ca-certificates/*.crt)
DEPLOY_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

base-image:
	BASE_IMAGE=$(BASE_IMAGE) EXTRA_CA_CERTS="$(BASE_CA_CERTS)" sh docker/base/build.sh

compose-check:
	$(DEPLOY_PYTHON) docker/compose_check.py docker/docker-compose.yml

compose-e2e: ui
	BASE_IMAGE=$(BASE_IMAGE) $(DEPLOY_PYTHON) docker/compose_e2e.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache $(PLACEHOLDER_DIR) $(UI_DIR)/node_modules $(UI_DIR)/dist
