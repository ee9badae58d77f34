# `make demo` trains K-FAC, Adam and SGD on Fashion-MNIST and prints a table;
# `make test` checks the code with ruff (lint and format, settings in
# pyproject.toml) and runs the test suite under Bazel (`bazel test //...`, one
# target per test file); `make pytest` runs the same files under pytest alone.
# All create .venv with the tested versions.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/installed.stamp
DEBIAN_DATA := /usr/share/datasets/fashion-mnist
KERAS_DATA := $(or $(KERAS_HOME),$(HOME)/.keras)/datasets/fashion-mnist
DATA_PROBE := train-images-idx3-ubyte.gz
# Extra flags for the demo, e.g. make demo DEMO_ARGS="--model conv --epochs 5"
DEMO_ARGS ?=

# Bazel 2.1 from the npm registry (x86_64 Linux), run offline: .bazelrc and
# bazel.rc.local point the repositories it would download at third_party/bazel/.
BAZEL_VERSION := 2.1.0
BAZEL_HOME := .bazel
BAZEL := $(BAZEL_HOME)/node_modules/@bazel/bazel-linux_x64/bazel-$(BAZEL_VERSION)-linux-x86_64

.PHONY: venv data demo lint test pytest bazel-test

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

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint bazel-test

pytest: venv
	$(PY) -m pytest -q -n auto --dist loadscope tests

$(BAZEL):
	npm install --prefix $(BAZEL_HOME) --no-save --no-audit --no-fund @bazel/bazel-linux_x64@$(BAZEL_VERSION)

# Written on every run: Bazel 2.1 takes only absolute paths in these flags. Its
# test launchers start with `#!/usr/bin/env python`, found on the PATH given
# here (the virtualenv's). py_test asks for a C++ toolchain, which Bazel
# configures from the machine's C compiler (gcc or clang; nothing is compiled).
bazel-test: venv $(BAZEL)
	printf 'build --override_repository=%s=$(CURDIR)/third_party/bazel/%s\n' \
	  rules_cc rules_cc rules_java rules_java remote_coverage_tools remote_coverage_tools > bazel.rc.local
	printf 'build --python_path=$(CURDIR)/$(PY)\n' >> bazel.rc.local
	printf 'test --test_env=PATH=$(CURDIR)/$(VENV)/bin:/usr/local/bin:/usr/bin:/bin\n' >> bazel.rc.local
	$(BAZEL) test //...
