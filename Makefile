# Two commands on a fresh machine: `make test` and `make demo`.
# torch==2.13.0 is installed before the package so that pip never picks another torch build
# (on the dev/CI machines that pin resolves to a local CPU wheel; on a GPU box to CUDA).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test lint demo gpu-test clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q -ra

demo: $(STAMP)
	$(BIN)/hf-hadamard-kq demo

# On the GPU machine (torch preinstalled there): the gpu-marked tests only.
gpu-test:
	python -m pytest -q -ra -m gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
