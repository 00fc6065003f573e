# `make demo` and `make test` create .venv when missing, install the project into it, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo demo-video test test-gpu clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m opendit.demo

demo-video: $(STAMP)
	$(PY) -m opendit.demo --video

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

# On a GPU machine whose Python already has torch (see README): make test-gpu PY=python3
test-gpu:
	$(PY) -m pytest -q -m gpu

clean:
	rm -rf $(VENV) outputs samples *.egg-info
