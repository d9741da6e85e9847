# `make test` and `make quickstart` set up .venv on first use. A GPU user picks their torch:
#   make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# or installs torch into .venv first (setup keeps a torch that is already there).
VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast quickstart clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

quickstart: setup
	$(VENV)/bin/hf-balanced-reward train --config recipes/quickstart.yaml

clean:
	rm -rf outputs .pytest_cache
