# Two commands set everything up on a fresh machine: `make train` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# the CPU build on this disk; GPU users install their CUDA torch into $(VENV) first (README)
TORCH_PIN ?= torch==2.13.0
ARGS ?=
# the installed torch's version, read without importing torch (no numpy yet: it would warn)
TORCH_INSTALLED = $(PY) -c 'from importlib.metadata import version as v; print(v("torch").split("+")[0])'
# A default run JIT-compiles nothing (harness/train/engine.py skips DeepSpeed's CPU shm op;
# the optimizer is torch's AdamW). A DeepSpeed op asked for (optim.torch_adam=false) is built
# into torch's extension cache: one per venv, so that two checkouts' venvs do not rebuild it
# in turn (each build is keyed by its venv's paths)
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: install train test smoke ds-configs bench clean-runs

# pip -q is silent for minutes: each step says what it installs before it starts
$(VENV)/.installed: pyproject.toml
	@echo "install: 1/3 the virtual environment $(VENV) and an up-to-date pip"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "install: 2/3 torch ($(TORCH_PIN), the CPU build, unless $(VENV) has a torch already)"
	# torch first: an open range resolved with no torch present pulls a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	@echo "install: 3/3 this package and its dependencies (deepspeed, sentencepiece, wandb,"\
	      "transformers, lm-eval, pyarrow, zstandard, pytest, pytest-xdist)"
	# the hf extra (transformers, lm-eval) never moves torch: the pin is already installed
	$(PY) -m pip install -q -e ".[dev,hf,data]" "torch==$$($(TORCH_INSTALLED))"
	touch $@
	@echo "install: done ($(VENV)); make skips this step until pyproject.toml changes"

install: $(VENV)/.installed

train: install
	$(VENV)/bin/harness train $(ARGS)

# --durations=25: every run ends with its 25 slowest tests (ARGS may override it)
test: install
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 $(ARGS)

# the CI smoke test (docs/ci.md): train, resume, export and reload a tiny model in
# build/smoke/, one PASS/FAIL line per check; ARGS e.g. --device cpu or --dir DIR
smoke: install
	$(VENV)/bin/harness smoke $(ARGS)

ds-configs: install
	$(PY) -m harness.train.ds_config ds_configs

bench: install
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done
