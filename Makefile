# Two commands on a fresh machine: `make train` and `make test`. Everything else is set up on the way.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/shakespeare.yaml
ARGS ?=
MODEL ?= outputs/$(basename $(notdir $(CONFIG)))
PROMPT ?= Romeo.
# CPU machines get the CPU build of torch (pinned, small); machines with an NVIDIA driver get the default CUDA build.
# Override with e.g. `make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"`.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1; then echo "torch>=2.4"; else echo "torch==2.13.0"; fi)
STAMP := $(VENV)/.installed

.PHONY: setup train test data sample eval bench bench-learning lint clean gpu-check bench-gpu

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

# One process, all cores. (`accelerate launch` would pin a single CPU process to one thread: OMP_NUM_THREADS=1.)
# For several processes or GPUs use `accelerate launch` directly, as the README shows.
train: $(STAMP)
	$(PY) recipe/train.py --config $(CONFIG) --output_dir $(MODEL) $(ARGS)

data: $(STAMP)
	$(PY) -m recipe.data --config $(CONFIG) $(ARGS)

sample: $(STAMP)
	$(PY) -m recipe.generate --model $(MODEL) --prompt "$(PROMPT)" $(ARGS)

# The downstream suite (ten lm-eval tasks, zero-shot) for any causal LM folder (ours, a checkpoint, a stock
# export): ARGS="--limit 500", ARGS="--tasks hellaswag,piqa".
eval: $(STAMP)
	$(PY) -m recipe.evaluate --model $(MODEL) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)
	$(PY) -m recipe.bench.speed $(ARGS)

# Held-out bits per byte against training cost for the default run and the candidates (long: runs train.py
# one after another; ARGS="--baseline_steps 150" for a short look). Plot: docs/learning.png.
bench-learning: $(STAMP)
	$(PY) -m recipe.bench.learning $(ARGS)

# A GPU machine's first minutes (README, "Checking a GPU machine"): no venv, no pip, no network. It uses the
# venv's Python where there is one, else $(PYTHON); `make gpu-check PYTHON=python3` names the Python to use.
# DRY_RUN=1 rehearses it on a CPU. WHEELS=<folder> first installs what is missing from wheels brought along.
GPU_CHECK_PY = $(if $(filter command line,$(origin PYTHON)),$(PYTHON),$(if $(wildcard $(PY)),$(PY),$(PYTHON)))

gpu-check:
	@if [ -n "$(WHEELS)" ]; then $(GPU_CHECK_PY) -m pip install -q --no-index --find-links "$(WHEELS)" \
		'transformers>=5.24,<6' 'accelerate>=1.15'; fi
	$(GPU_CHECK_PY) recipe/bench/gpu_check.py $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(ARGS)

# One prepared GPU benchmark (recipe/bench/gpu.py, ~5 min on one GPU): the training step's changes, micro-batches,
# stock GPT2LMHeadModel and the modern model interleaved in one process, a kernel profile, then recipe/train.py on
# real text (ARGS="--train_files 'DIR/*.txt'", or the default corpus cached). Python, DRY_RUN and WHEELS as
# gpu-check; WHEELS also installs datasets and torchdata for the train.py section where their wheels are there.
bench-gpu:
	@if [ -n "$(WHEELS)" ]; then $(GPU_CHECK_PY) -m pip install -q --no-index --find-links "$(WHEELS)" \
		'transformers>=5.24,<6' 'accelerate>=1.15' && { $(GPU_CHECK_PY) -m pip install -q --no-index \
		--find-links "$(WHEELS)" 'datasets>=5.2,<6' 'torchdata>=0.11' \
		|| echo "bench-gpu: no datasets/torchdata wheels there: the train.py section will say so"; }; fi
	$(GPU_CHECK_PY) recipe/bench/gpu.py $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check recipe tests
	$(VENV)/bin/ruff format --check recipe tests

clean:
	rm -rf $(VENV) outputs .pytest_cache build *.egg-info
