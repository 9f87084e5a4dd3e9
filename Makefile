# `make train` and `make test` set up .venv on first use (Python 3.11) and run.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# No NVIDIA GPU: DeepSpeed's CPU accelerator (gloo), and 2 processes since the launcher starts one by default.
ifeq ($(shell command -v nvidia-smi),)
export DS_ACCELERATOR ?= cpu
LAUNCH_FLAGS ?= --num_gpus 2
endif
CONFIG ?= configs/gpt.json
ARGS ?=
# Quiet by default: DeepSpeed's launcher logs only errors, and the ranks drop DeepSpeed's prints and chatter
# (hybrid_ds/runtime/quiet.py); `make train VERBOSE=1` keeps all of it.
ifdef VERBOSE
DS_FLAGS ?=
TRAIN_FLAGS := --verbose
else
DS_FLAGS ?= --quiet
TRAIN_FLAGS :=
endif

# --durations: where the suite's time goes, printed by every run (CI's too), so that growth shows.
PYTEST_ARGS ?= --durations=25

.PHONY: setup train test clean sweep-newer

setup: $(VENV)/.installed

# requirements-lock.txt pins every package to the versions the suite and the sweeps were proven with.
# train.float8's torchao (pyproject.toml's float8 extra) goes to .float8, not .venv: transformers imports torchao in
# every process wherever it is installed (1.8 s and four warning lines on a CPU machine); tests/test_float8.py runs
# its checks with .float8 on PYTHONPATH.
FLOAT8 := torchao==0.18.0
$(VENV)/.installed: pyproject.toml requirements-assets.txt requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -c requirements-lock.txt -e '.[test]'
	$(BIN)/pip install --no-deps -c requirements-lock.txt -r requirements-assets.txt
	rm -rf .float8 && $(BIN)/pip install --no-deps --target .float8 '$(FLOAT8)'
	touch $@

train: setup
	PATH=$(CURDIR)/$(BIN):$$PATH deepspeed $(DS_FLAGS) $(LAUNCH_FLAGS) launch/train.py --config $(CONFIG) $(TRAIN_FLAGS) $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure too.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV) .venv-newer .float8

# A newer transformers, tried on purpose: the newest release pyproject.toml's range admits, in a venv of its own,
# through the parity sweep of every model type (bench/results/adapter_sweep_newer.md beside the locked one).
sweep-newer:
	$(PYTHON) -m venv .venv-newer
	.venv-newer/bin/pip install -c requirements-lock.txt -e '.[test]'
	.venv-newer/bin/pip install --no-deps -c requirements-lock.txt -r requirements-assets.txt
	.venv-newer/bin/pip install --upgrade 'transformers>=5.24,<6'
	.venv-newer/bin/python bench/adapter_sweep.py --out adapter_sweep_newer
