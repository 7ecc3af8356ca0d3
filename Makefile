# `make test` and `make demo` set up .venv on first use (pinned by requirements-lock.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled XLA programs are cached across runs: on 2 cores this cuts the suite a lot.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2
DEMO_DIR ?= demo_out

.PHONY: test demo clean

$(STAMP): setup.cfg requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(PY) -m train.demo --out_dir=$(DEMO_DIR)

clean:
	rm -rf $(VENV) .jax_cache $(DEMO_DIR)
