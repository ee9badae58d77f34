# `make demo` trains K-FAC, Adam and SGD on Fashion-MNIST and prints a table;
# `make test` checks the code with ruff (lint and format, settings in
# pyproject.toml) and runs the test suite. Both create .venv with the tested versions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/installed.stamp
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
KERAS_DATA := $(or $(KERAS_HOME),$(HOME)/.keras)/datasets/fashion-mnist
DATA_PROBE := train-images-idx3-ubyte.gz
# Extra flags for the demo, e.g. make demo DEMO_ARGS="--model conv --epochs 5"
DEMO_ARGS ?=

.PHONY: venv data demo test

venv: $(STAMP)

$(STAMP): requirements-ci.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-ci.txt
	$(PY) -m pip install -e .
	touch $@

data:
	@if [ -f $(DEBIAN_DATA)/$(DATA_PROBE) ] || [ -f $(KERAS_DATA)/$(DATA_PROBE) ]; then \
	  echo "Fashion-MNIST is available."; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update && apt-get install -y dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST not found in $(DEBIAN_DATA)/ or $(KERAS_DATA)/."; \
	  echo "Install it with 'sudo apt-get install dataset-fashion-mnist' (Debian/Ubuntu),"; \
	  echo "or put the four idx .gz files of Fashion-MNIST in $(KERAS_DATA)/."; \
	  echo "The demo will otherwise try the Keras download."; \
	fi

demo: venv data
	$(PY) tutorials/compare_optimizers.py $(DEMO_ARGS)

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n auto --dist loadscope tests
