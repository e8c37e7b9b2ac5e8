# Two commands set everything up on a fresh machine: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU build on this disk; GPU users install their CUDA torch into $(VENV) first (README)
TORCH_PIN ?= torch==2.13.0
ARGS ?=
# DeepSpeed JIT-builds its CPU shared-memory op (deepspeed_shm_comm) at the first
# init_distributed, into torch's extension cache; one cache per venv, so that two checkouts'
# venvs do not rebuild it in turn (each build is keyed by its venv's paths)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install train test ds-configs bench clean-runs

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: an open range resolved with no torch present pulls a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	# the hf extra (transformers, lm-eval) never moves torch: the pin is already installed
	$(PY) -m pip install -q -e ".[dev,hf]" "$$($(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])")"
	touch $@

install: $(VENV)/.installed

train: install
	$(VENV)/bin/harness train $(ARGS)

# --durations=25: every run ends with its 25 slowest tests (ARGS may override it)
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 $(ARGS)

ds-configs: install
	$(PY) -m harness.train.ds_config ds_configs

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
