# Two commands do all the set-up on a fresh machine with Python 3.11+ and pip:
#   make demo   creates .venv, installs rlhf_jax, runs the offline end-to-end demo
#   make test   creates .venv, installs the test extras, runs ruff (lint + import order), then the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= demo_output

.PHONY: demo test bench clean

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

demo: $(VENV)/.installed-base
	$(VENV)/bin/rlhf-jax demo --output_dir $(DEMO_DIR) --overwrite

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: $(VENV)/.installed-bench
	$(PY) benchmarks/gae.py
	$(PY) benchmarks/generate.py --device cpu
	$(PY) benchmarks/ppo_iteration.py --device cpu

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
