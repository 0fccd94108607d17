# xmag-serve developer entry points. `make serve` and `make test` are the README quick start.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# make serve runs the trained demonstration package committed in models/demo (rebuilt by
# `make demo-model`); `make model` builds the torch-free untrained placeholder the tests also build.
MODEL_DIR ?= models/demo
PLACEHOLDER_DIR ?= models/default
DATA_DIR ?= var

.PHONY: install install-train demo-model bench-export model serve worker test test-fast lint format typecheck bench bench-tiling bench-engine bench-load compose-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	touch $@

install: $(VENV)/.installed

# Training and export need torch + timm (several GB); the service and the core never do.
$(VENV)/.installed-train: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[cpu,dev,train]"
	touch $@

install-train: $(VENV)/.installed-train

# The default model package: a small untrained network built without network access (card says trained=false).
$(PLACEHOLDER_DIR)/model.json: $(VENV)/.installed model_export/default_package.py
	$(BIN)/python -m model_export.default_package --out $(PLACEHOLDER_DIR)

model: $(PLACEHOLDER_DIR)/model.json

serve: install
	$(BIN)/xmag serve --data-dir $(DATA_DIR) --model $(MODEL_DIR)

worker: install
	$(BIN)/xmag worker --model $(MODEL_DIR)

# The trained demonstration package (a small distilled student + a stain head, from the real test
# slides, no network): see training/demo.py. Needs the [train] extra.
demo-model: install-train
	$(BIN)/python -m training demo --out runs/demo --package $(MODEL_DIR)

test: install
	$(BIN)/python -m pytest -q

test-fast: install
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

bench: bench-tiling bench-engine bench-load bench-export

compose-check:
	docker-compose -f docker/docker-compose.yml config -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache $(PLACEHOLDER_DIR)
