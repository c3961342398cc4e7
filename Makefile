# Quickstart: `make run` generates an image, `make test` runs the tests. Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
# The CPU build of torch: pinned first, so nothing pulls the multi-GB CUDA build. Elsewhere, add
# TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" if your pip would pick a CUDA wheel.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: setup run test lint browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	touch $@

run: setup
	$(BIN)/sdstudio txt2img "a red circle on a blue background"

lint: setup
	$(BIN)/ruff check src tests scripts examples bench

browser:
	./scripts/install_browser.sh

test: lint browser
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache outputs
