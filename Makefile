# `make test` and `make quickstart` set up .venv on first use. A GPU user picks their torch:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or installs torch into .venv first (setup keeps a torch that is already there).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# offline on a GPU too: transformers (5.25 on) would fetch hub kernels for every model it loads there
export USE_HUB_KERNELS := NO

.PHONY: setup test test-fast quickstart clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test,serve,tune]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Bradley-Terry and balanced on the same constructed data with a length shortcut, then per-cell accuracy side by side.
quickstart: setup
	$(VENV)/bin/hf-balanced-reward train --config recipes/quickstart.yaml --loss_type bradley_terry --loss_kwargs '{}' \
		--output_dir outputs/quickstart_bradley_terry
	$(VENV)/bin/hf-balanced-reward train --config recipes/quickstart.yaml --output_dir outputs/quickstart_balanced
	$(VENV)/bin/hf-balanced-reward compare outputs/quickstart_bradley_terry outputs/quickstart_balanced

clean:
	rm -rf outputs .pytest_cache
