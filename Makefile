# `make test` and `make demo` set up .venv on first use (pinned by requirements-lock.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Compiled XLA programs are cached across runs, in the user cache directory the CLIs use
# (shared by every checkout on the machine): on 2 cores a warm cache cuts the suite from
# about 19 to about 8 minutes.
export JAX_COMPILATION_CACHE_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/realcustom_jax/xla
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES ?= 0
export TF_CPP_MIN_LOG_LEVEL ?= 2
# pytest-xdist workers, one test file each at a time: XLA compiles on one thread, so on
# 2 cores two workers nearly halve the suite. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= auto
DEMO_DIR ?= demo_out

.PHONY: test test-slow demo demo-tiny clean

$(STAMP): setup.cfg requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements-lock.txt -e '.[test,demo]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m 'not slow' tests

# The two longest end-to-end runs (kill -9 of a 2-process training and its restart; the
# toy reproduction's smoke run), about 3.5 CPU-minutes cold: outside `make test` only to
# keep it under 15 minutes on 2 cores. Run them before a release or after touching
# train/, runtime/ or toy/.
test-slow: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m slow tests

# The shipped toy model (toy/shipped/, trained by `python -m toy.reproduction`): a held-out
# subject drawn where the word is, plain T2I beside it, the mask grid, and its own reading.
DEMO_SUBJECT ?= 0
demo: $(STAMP)
	$(PY) -m toy.demo --out=$(DEMO_DIR) --subject=$(DEMO_SUBJECT)

# Embedded default end to end (random tiny models: wiring, not images): train the adapter
# on the toy shapes, export it, sample with it (image + Fig. 6-style mask grid).
# Rerunning resumes / reuses the checkpoints.
DEMO_STEPS ?= 300
demo-tiny: $(STAMP)
	mkdir -p $(DEMO_DIR)
	$(PY) -m train.main --config=configs/tiny.py --workdir=$(DEMO_DIR)/workdir \
	    --config.train.num_steps=$(DEMO_STEPS) --config.train.checkpoint_every=100 \
	    --config.train.log_every=50
	$(PY) -m train.export --workdir=$(DEMO_DIR)/workdir --out=$(DEMO_DIR)/adapter.safetensors
	$(PY) -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (64, 64), 'blue'); \
	    ImageDraw.Draw(im).ellipse((14, 14, 50, 50), fill='red'); im.save('$(DEMO_DIR)/subject.png')"
	$(PY) -m sample.main --config=configs/tiny.py --adapter=$(DEMO_DIR)/adapter.safetensors \
	    --subject=$(DEMO_DIR)/subject.png --prompt="a red circle on a green background" \
	    --word=circle --seed=0 --out=$(DEMO_DIR)/sample.png --mask_grid=$(DEMO_DIR)/mask_grid.png
	@echo "demo: wrote $(DEMO_DIR)/sample.png and $(DEMO_DIR)/mask_grid.png"

clean:
	rm -rf $(VENV) $(DEMO_DIR)  # the compile cache stays: rm -rf $(JAX_COMPILATION_CACHE_DIR)
