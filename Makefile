# InstSynth — `make demo` and `make test` install everything on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.instsynth-installed
# Exact pins for this project's venv and CI (setup.py keeps compatible ranges for users).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_output

.PHONY: install install-detectron2 demo test clean help

help:
	@echo "make install   create $(VENV) and install InstSynth with test extras (first run only)"
	@echo "make install-detectron2 DETECTRON2_WHEEL=FILE   add a Detectron2 wheel (for the interop tests)"
	@echo "make demo      run InstSynth on the built-in demo dataset (writes $(DEMO_DIR)/)"
	@echo "make test      run the test suite"
	@echo "make clean     remove $(VENV), $(DEMO_DIR)/ and caches"

install: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install $(TORCH_PINS)
	$(PIP) install $(TORCH_PINS) -e ".[test]"
	touch $@

# Detectron2 (not on PyPI) from a wheel built for TORCH_PINS, e.g. ../shared/wheels/detectron2-0.6-*.whl
install-detectron2: $(STAMP)
	test -n "$(DETECTRON2_WHEEL)" || { echo "give DETECTRON2_WHEEL=path/to/detectron2-*.whl"; exit 2; }
	$(PIP) install $(TORCH_PINS) "$(DETECTRON2_WHEEL)"

demo: $(STAMP)
	DEMO_DIR=$(DEMO_DIR) PYTHON=$(abspath $(PY)) bash scripts/demo.sh

test: $(STAMP)
	$(VENV)/bin/lint-imports  # the layers and no-cycle contracts of .importlinter
	INSTSYNTH_NO_PROGRESS=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) $(DEMO_DIR) build *.egg-info .pytest_cache visualization/demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
